//! Mutual TLS and roles: who is refused, with what reason, and that the node keeps
//! serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use dirsync::certs::{self, Ca, CertRequest};
use dirsync::client::{Client, ClientError};
use dirsync::events::EventKind;
use dirsync::tls::{self, Credentials, Role};
use dirsync::wire::io::{read_message, write_message};
use dirsync::wire::Message;

/// A bare QUIC connection to `node` with `creds`, for speaking the protocol by hand.
async fn raw(
    addr: std::net::SocketAddr,
    creds: &Credentials,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client(LOOPBACK.parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(creds).unwrap());
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    (ep, conn)
}

async fn ask(conn: &quinn::Connection, msg: &Message) -> Result<Option<Message>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_message(&mut send, msg)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    read_message(&mut recv).await.map_err(|e| e.to_string())
}

/// Connects to `node` as node c: hello, then a's subscription to c's index, whose
/// stream is returned for c to answer with whatever records the test needs.
async fn pose_as_c(
    env: &TestEnv,
    node: &dirsync::node::NodeHandle,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream) {
    let c = Credentials::load(&env.certs, "c").unwrap();
    let (ep, conn) = raw(node.local_addr(), &c).await;
    let hello = Message::Hello {
        version: dirsync::wire::PROTOCOL_VERSION,
        name: "c".into(),
    };
    assert!(matches!(
        ask(&conn, &hello).await,
        Ok(Some(Message::Hello { .. }))
    ));
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    assert!(matches!(
        read_message(&mut recv).await,
        Ok(Some(Message::Subscribe { .. }))
    ));
    (ep, conn, send)
}

/// The node still answers a legitimate client.
async fn still_serving(env: &TestEnv, node: &dirsync::node::NodeHandle) {
    let listing = env
        .client(node)
        .await
        .list()
        .await
        .expect("node still serves");
    assert_eq!(listing.nodes, ["a"]);
}

#[tokio::test]
async fn client_from_a_foreign_ca_is_refused() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let foreign_dir = env.tmp.path().join("foreign");
    certs::generate(&CertRequest::defaults(&foreign_dir)).unwrap();

    // Entirely foreign: the client does not trust the node either.
    let err = Client::connect(&a.local_addr().to_string(), &foreign_dir, "cli").await;
    let err = match err {
        Ok(c) => c.list().await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");

    // A foreign certificate that trusts our CA: the node must refuse it. The
    // handshake "succeeds" for the client; the refusal shows on the first stream.
    let mut creds = Credentials::load(&foreign_dir, "cli").unwrap();
    creds.ca = Credentials::load(&env.certs, "cli").unwrap().ca;
    let client = Client::connect_with(&a.local_addr().to_string(), &creds)
        .await
        .unwrap();
    let err = client.list().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("refused our certificate"), "{text}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let ca = Ca::load(&env.certs).unwrap().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = ca
        .issue_with_validity(
            "old",
            Role::Client,
            &[],
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let dir = env.tmp.path().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(env.certs.join("ca.pem"), dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("old.pem"), cert).unwrap();
    std::fs::write(dir.join("old.key"), key).unwrap();
    let client = Client::connect(&a.local_addr().to_string(), &dir, "old")
        .await
        .unwrap();
    let text = client.list().await.unwrap_err().to_string();
    assert!(text.contains("expired"), "{text}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_cannot_act_as_a_node() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let cli = Credentials::load(&env.certs, "cli").unwrap();
    let (_ep, conn) = raw(a.local_addr(), &cli).await;
    let hello = Message::Hello {
        version: dirsync::wire::PROTOCOL_VERSION,
        name: "cli".into(),
    };
    match ask(&conn, &hello).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("role client"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        closed.to_string().contains("only node certificates"),
        "{closed}"
    );
    assert!(a.connected_peers().is_empty());

    // Node-only requests are refused too, on a fresh connection.
    let (_ep2, conn) = raw(a.local_addr(), &cli).await;
    match ask(&conn, &Message::PeerListRequest).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("client certificate"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // And a node cannot be started with a client certificate.
    let mut config = env.config("cli", &[]);
    config.dir = env.dir("cli");
    let err = dirsync::node::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("client certificate"), "{err}");
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn protocol_version_mismatch_is_refused_with_a_reason() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let c = Credentials::load(&env.certs, "c").unwrap();
    let (_ep, conn) = raw(a.local_addr(), &c).await;
    match ask(
        &conn,
        &Message::Hello {
            version: 99,
            name: "c".into(),
        },
    )
    .await
    {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("version mismatch"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        closed.to_string().contains("protocol version mismatch"),
        "{closed}"
    );

    // A hello whose name does not match the certificate is refused as well.
    let (_ep, conn) = raw(a.local_addr(), &c).await;
    let hello = Message::Hello {
        version: dirsync::wire::PROTOCOL_VERSION,
        name: "b".into(),
    };
    match ask(&conn, &hello).await {
        Ok(Some(Message::Refused { reason })) => {
            assert!(reason.contains("certificate"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(a.connected_peers().is_empty());
    still_serving(&env, &a).await;
    a.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let env = TestEnv::new();
    let a = env.start("a", &[]).await;
    let c = Credentials::load(&env.certs, "c").unwrap();
    for garbage in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 3, 0x7f, 1, 2][..],
    ] {
        let (_ep, conn) = raw(a.local_addr(), &c).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(garbage).await.unwrap();
        let _ = send.finish();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap();
        let text = closed.to_string();
        assert!(
            text.contains("malformed") || text.contains("exceeds"),
            "{text}"
        );
    }
    still_serving(&env, &a).await;
    a.shutdown().await;
}

fn record(
    path: &str,
    kind: dirsync::sync::record::Kind,
    content: &[u8],
    target: Option<&str>,
) -> dirsync::sync::record::Record {
    let mut version = dirsync::sync::version::VersionVector::new();
    version.bump("c");
    dirsync::sync::record::Record {
        path: path.into(),
        kind,
        size: content.len() as u64,
        modified: dirsync::wire::Timestamp {
            secs: 1_700_000_000,
            nanos: 0,
        },
        mode: 0o644,
        hash: dirsync::hash::ContentHash::of(content),
        target: target.map(str::to_owned),
        version,
        deleted: false,
        modified_by: "c".into(),
        seq: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_write_outside_the_root() {
    use dirsync::sync::record::Kind;
    let env = TestEnv::new();
    let da = env.dir("a");
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let a = env.start("a", &[]).await;
    let log = EventLog::of(&a);

    // Pose as node c: hello, then answer a's subscription with hostile records.
    let (_ep, conn, mut send) = pose_as_c(&env, &a).await;
    let hostile = [
        "../escaped.txt",
        "/tmp/absolute.txt",
        ".dirsync/index.db",
        "ok/../../up.txt",
        "nul\0byte",
    ];
    let mut records: Vec<_> = hostile
        .iter()
        .map(|p| record(p, Kind::File, b"evil", None))
        .collect();
    records.push(record(
        "link",
        Kind::Symlink,
        outside.to_str().unwrap().as_bytes(),
        outside.to_str(),
    ));
    records.push(record("link/through.txt", Kind::File, b"evil", None));
    records.push(record("good.txt", Kind::File, b"good", None));
    for (i, r) in records.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
    }
    let batch = Message::IndexBatch {
        index_id: [7; 16],
        max_seq: records.len() as u64,
        records,
    };
    write_message(&mut send, &batch).await.unwrap();

    // Serve whatever a asks for: the hostile content included, to prove a refuses it.
    let server = tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            if let Ok(Some(Message::FetchRequest { path, .. })) = read_message(&mut recv).await {
                let body: &[u8] = if path == "good.txt" { b"good" } else { b"evil" };
                let _ = write_message(
                    &mut send,
                    &Message::FileHeader {
                        size: body.len() as u64,
                    },
                )
                .await;
                let _ = send.write_all(body).await;
                let _ = send.finish();
            }
        }
    });
    wait_content(&da, "good.txt", b"good").await;
    wait_until(
        "the symlink was made, as a link",
        Duration::from_secs(10),
        || da.join("link").symlink_metadata().is_ok(),
    )
    .await;
    // The failure of the path through the link runs beside good.txt's install.
    log.wait_for("link/through.txt", |e| {
        matches!(e.event, EventKind::Refused | EventKind::Failed)
    })
    .await;
    let refused: Vec<String> = log
        .all()
        .iter()
        .filter(|e| matches!(e.event, EventKind::Refused | EventKind::Failed))
        .filter_map(|e| e.path.clone())
        .collect();
    for p in hostile {
        assert!(
            refused.iter().any(|r| r == p),
            "{p:?} not refused: {refused:?}"
        );
    }
    assert!(
        refused.iter().any(|r| r == "link/through.txt"),
        "{refused:?}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert!(!env.tmp.path().join("nodes/escaped.txt").exists());
    assert!(!env.tmp.path().join("up.txt").exists());
    assert!(!std::path::Path::new("/tmp/absolute.txt").exists());
    server.abort();
    a.shutdown().await;
}

/// A peer whose block list does not make the version it announced (here: a list
/// of the blocks a already has) costs a whole-file fetch, never a wrong file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_block_list_falls_back_to_the_whole_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let env = TestEnv::new();
    let da = env.dir("a");
    let pseudo = |seed: u64| pseudo_random(2 << 20, seed);
    let (old, new) = (pseudo(3), pseudo(5));
    std::fs::write(da.join("big.bin"), &old).unwrap();
    let a = env.start("a", &[]).await;
    let log = EventLog::of(&a);
    let ours = a.engine().record("big.bin").await.unwrap().unwrap();

    let (_ep, conn, mut send) = pose_as_c(&env, &a).await;
    // A newer version of big.bin than a's (it dominates a's version vector).
    let mut newer = record("big.bin", dirsync::sync::record::Kind::File, &new, None);
    newer.version = ours.version.clone();
    newer.version.bump("c");
    newer.seq = 1;
    let batch = Message::IndexBatch {
        index_id: [7; 16],
        max_seq: 1,
        records: vec![newer],
    };
    write_message(&mut send, &batch).await.unwrap();

    let asked_blocks = Arc::new(AtomicBool::new(false));
    let asked = asked_blocks.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            match read_message(&mut recv).await {
                Ok(Some(Message::BlocksRequest { .. })) => {
                    asked.store(true, Ordering::SeqCst);
                    // The blocks of the *old* content: a has them all.
                    let dir = tempfile::tempdir().unwrap();
                    std::fs::write(dir.path().join("old"), &old).unwrap();
                    let f = std::fs::File::open(dir.path().join("old")).unwrap();
                    let avg = dirsync::engine::delta::avg_for(old.len() as u64).unwrap();
                    let blocks = dirsync::engine::delta::cut(&f, old.len() as u64, avg).unwrap();
                    let blocks = blocks.into_iter().map(|(_, b)| b).collect();
                    let _ = write_message(&mut send, &Message::Blocks { avg, blocks }).await;
                    if let Ok(Some(Message::RangesRequest { ranges })) =
                        read_message(&mut recv).await
                    {
                        let total = ranges.iter().map(|(_, l)| l).sum();
                        let _ =
                            write_message(&mut send, &Message::FileHeader { size: total }).await;
                        for (o, l) in ranges {
                            let _ = send.write_all(&new[o as usize..(o + l) as usize]).await;
                        }
                    }
                    let _ = send.finish();
                }
                Ok(Some(Message::FetchRequest { .. })) => {
                    let header = Message::FileHeader {
                        size: new.len() as u64,
                    };
                    let _ = write_message(&mut send, &header).await;
                    let _ = send.write_all(&new).await;
                    let _ = send.finish();
                }
                _ => {}
            }
        }
    });
    wait_content(&da, "big.bin", &pseudo(5)).await;
    assert!(
        asked_blocks.load(Ordering::SeqCst),
        "a asked for blocks first"
    );
    log.wait_for("big.bin", |e| {
        e.event == EventKind::Received && e.bytes == Some(2 << 20) && e.detail.is_none()
    })
    .await;
    server.abort();
    a.shutdown().await;
}
