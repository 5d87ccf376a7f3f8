//! The wire format: pinned bytes (a change here is a protocol change) and
//! round trips of arbitrary messages.

use dirsync::hash::ContentHash;
use dirsync::wire::{
    decode_frame, encode_frame, Block, Copy, Decoded, FileEntry, LockInfo, MergedEntry, Message,
    Timestamp,
};
use proptest::prelude::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn golden_bytes() {
    let entry = FileEntry {
        path: "x".into(),
        size: 300,
        modified: Timestamp { secs: 1, nanos: 2 },
        hash: ContentHash([0xab; 32]),
    };
    let cases = [
        // length prefix | variant | fields (postcard varints; i64 zigzag)
        (
            Message::Hello {
                version: 1,
                name: "a".into(),
            },
            "00000004 00 01 0161".to_string(),
        ),
        (
            Message::Refused {
                reason: "no".into(),
            },
            "00000004 01 026e6f".to_string(),
        ),
        (Message::ListRequest, "00000001 02".to_string()),
        (Message::PeerListRequest, "00000001 03".to_string()),
        (
            Message::LocalEntries(vec![entry]),
            format!("00000028 04 01 0178 ac02 02 02 {}", "ab".repeat(32)),
        ),
        (
            Message::ListEnd {
                nodes: vec!["a".into()],
                warnings: vec![],
            },
            "00000005 06 01 0161 00".to_string(),
        ),
        (
            Message::LockRequest {
                path: "x".into(),
                ttl_secs: Some(60),
            },
            "00000005 0f 0178 01 3c".to_string(),
        ),
        (
            Message::UnlockRequest {
                path: "x".into(),
                force: true,
            },
            "00000004 10 0178 01".to_string(),
        ),
        (Message::LocksRequest, "00000001 11".to_string()),
        (
            Message::Locks(vec![LockInfo {
                path: "x".into(),
                owner: "a".into(),
                since: Timestamp { secs: 1, nanos: 2 },
                expires: None,
                queued: 3,
                releasing: false,
            }]),
            "0000000b 12 01 0178 0161 02 02 00 03 00".to_string(),
        ),
        (
            Message::Unlocked {
                path: "x".into(),
                queued: 3,
                applied: 2,
            },
            "00000005 13 0178 03 02".to_string(),
        ),
        (
            Message::BlocksRequest {
                path: "x".into(),
                hash: ContentHash([0xab; 32]),
            },
            format!("00000023 14 0178 {}", "ab".repeat(32)),
        ),
        (
            Message::Blocks {
                avg: 65536,
                blocks: vec![Block {
                    len: 300,
                    hash: ContentHash([0xab; 32]),
                }],
            },
            format!("00000027 15 808004 01 ac02 {}", "ab".repeat(32)),
        ),
        (
            Message::RangesRequest {
                ranges: vec![(1, 300)],
            },
            "00000005 16 01 01ac02".to_string(),
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(
            hex(&encode_frame(&msg).unwrap()),
            want.replace(' ', ""),
            "{msg:?}"
        );
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zé/ 日._-]{0,40}").unwrap()
}

fn arb_ts() -> impl Strategy<Value = Timestamp> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(secs, nanos)| Timestamp { secs, nanos })
}

fn arb_entry() -> impl Strategy<Value = FileEntry> {
    (arb_string(), any::<u64>(), arb_ts(), any::<[u8; 32]>()).prop_map(
        |(path, size, modified, h)| FileEntry {
            path,
            size,
            modified,
            hash: ContentHash(h),
        },
    )
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), arb_string()).prop_map(|(version, name)| Message::Hello { version, name }),
        arb_string().prop_map(|reason| Message::Refused { reason }),
        Just(Message::ListRequest),
        Just(Message::PeerListRequest),
        proptest::collection::vec(arb_entry(), 0..20).prop_map(Message::LocalEntries),
        proptest::collection::vec(
            (
                arb_string(),
                proptest::collection::vec((arb_string(), arb_entry()), 0..4)
            )
                .prop_map(|(path, copies)| {
                    MergedEntry {
                        path,
                        copies: copies
                            .into_iter()
                            .map(|(node, e)| Copy {
                                node,
                                size: e.size,
                                modified: e.modified,
                                hash: e.hash,
                            })
                            .collect(),
                    }
                }),
            0..10
        )
        .prop_map(Message::MergedEntries),
        (
            proptest::collection::vec(arb_string(), 0..4),
            proptest::collection::vec(arb_string(), 0..4)
        )
            .prop_map(|(nodes, warnings)| Message::ListEnd { nodes, warnings }),
        (arb_string(), proptest::option::of(any::<u64>()))
            .prop_map(|(path, ttl_secs)| Message::LockRequest { path, ttl_secs }),
        (arb_string(), any::<bool>())
            .prop_map(|(path, force)| Message::UnlockRequest { path, force }),
        Just(Message::LocksRequest),
        proptest::collection::vec(
            (
                arb_string(),
                arb_string(),
                arb_ts(),
                proptest::option::of(arb_ts()),
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(|(path, owner, since, expires, queued, releasing)| {
                    LockInfo {
                        path,
                        owner,
                        since,
                        expires,
                        queued,
                        releasing,
                    }
                }),
            0..5
        )
        .prop_map(Message::Locks),
        (arb_string(), any::<u32>(), any::<u32>()).prop_map(|(path, queued, applied)| {
            Message::Unlocked {
                path,
                queued,
                applied,
            }
        }),
        (arb_string(), any::<[u8; 32]>()).prop_map(|(path, h)| Message::BlocksRequest {
            path,
            hash: ContentHash(h)
        }),
        (
            any::<u32>(),
            proptest::collection::vec((any::<u32>(), any::<[u8; 32]>()), 0..20)
        )
            .prop_map(|(avg, blocks)| Message::Blocks {
                avg,
                blocks: blocks
                    .into_iter()
                    .map(|(len, h)| Block {
                        len,
                        hash: ContentHash(h)
                    })
                    .collect(),
            }),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20)
            .prop_map(|ranges| Message::RangesRequest { ranges }),
    ]
}

proptest! {
    #[test]
    fn round_trip(msg in arb_message()) {
        let frame = encode_frame(&msg).unwrap();
        prop_assert_eq!(decode_frame(&frame).unwrap(), Decoded::Frame(msg.clone(), frame.len()));
        // Every strict prefix is "incomplete", never an error or a wrong message.
        for cut in [0, 1, 3, frame.len() / 2, frame.len() - 1] {
            let is_incomplete = matches!(decode_frame(&frame[..cut]), Ok(Decoded::Incomplete { .. }));
            prop_assert!(is_incomplete);
        }
        // Two frames back to back decode one at a time.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        prop_assert_eq!(decode_frame(&two).unwrap(), Decoded::Frame(msg, frame.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
    }
}
