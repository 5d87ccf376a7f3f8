//! Merged listings across real nodes over real QUIC. The nodes are send-only so
//! that diverging trees stay diverged while they are listed.

mod common;

use std::time::Duration;

use common::*;
use dirsync::hash::ContentHash;

#[tokio::test]
async fn merged_listing_of_two_nodes() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "only-a.txt", b"aaa");
    write(&db, "only-b.txt", b"bbbb");
    write(&da, "same.txt", b"identical");
    write(&db, "same.txt", b"identical");
    write(&da, "differs.txt", b"version a");
    write(&db, "differs.txt", b"version b, longer");
    write(&da, "deep/er/nested file.txt", b"nested");
    write(&db, "ünï cödé/日本語 名前.txt", b"unicode");
    let a = env.start_send_only("a", &[]).await;
    let b = env.start_send_only("b", &[a.local_addr()]).await;
    wait_connected(&[&a, &b]).await;

    for server in [&a, &b] {
        let client = env.client(server).await;
        let listing = client.list().await.unwrap();
        assert!(listing.warnings.is_empty(), "{:?}", listing.warnings);
        assert_eq!(listing.nodes, ["a", "b"]);
        let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "deep/er/nested file.txt",
                "differs.txt",
                "only-a.txt",
                "only-b.txt",
                "same.txt",
                "ünï cödé/日本語 名前.txt"
            ]
        );
        let by = |p: &str| listing.entries.iter().find(|e| e.path == p).unwrap();
        let nodes = |p: &str| {
            by(p)
                .copies
                .iter()
                .map(|c| c.node.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(nodes("only-a.txt"), ["a"]);
        assert_eq!(nodes("only-b.txt"), ["b"]);
        assert_eq!(nodes("same.txt"), ["a", "b"]);
        assert!(by("same.txt").in_sync());
        assert!(!by("differs.txt").in_sync());
        let d = by("differs.txt");
        assert_eq!(d.copies[0].size, 9);
        assert_eq!(d.copies[0].hash, ContentHash::of(b"version a"));
        assert_eq!(d.copies[1].size, 17);
        assert_eq!(d.copies[1].hash, ContentHash::of(b"version b, longer"));
        assert_eq!(
            by("ünï cödé/日本語 名前.txt").copies[0].hash,
            ContentHash::of(b"unicode")
        );

        let json: serde_json::Value = serde_json::from_str(&listing.to_json()).unwrap();
        assert_eq!(json[1]["index"], 2);
        assert_eq!(json[1]["path"], "differs.txt");
        assert_eq!(json[1]["in_sync"], false);
        assert_eq!(json[1]["copies"]["b"]["size"], 17);
        assert_eq!(json[4]["in_sync"], true);
        client.close().await;
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn three_nodes_and_a_large_listing_in_many_frames() {
    let env = TestEnv::new();
    let dc = env.dir("c");
    // ~3000 entries with long names: far more than one 64 KiB frame.
    for i in 0..3000i32 {
        write(
            &dc,
            &format!(
                "many/{:04}/{}.bin",
                i / 100,
                "x".repeat(60) + &i.to_string()
            ),
            &i.to_le_bytes(),
        );
    }
    write(&env.dir("b"), "from-b", b"b");
    let a = env.start_send_only("a", &[]).await;
    let b = env.start_send_only("b", &[a.local_addr()]).await;
    let c = env.start_send_only("c", &[a.local_addr()]).await;
    wait_connected(&[&a, &b]).await;
    wait_connected(&[&a, &c]).await;
    let client = env.client(&a).await;
    let listing = client.list().await.unwrap();
    assert_eq!(listing.nodes, ["a", "b", "c"]);
    assert_eq!(listing.entries.len(), 3001);
    assert!(
        listing.entries.windows(2).all(|w| w[0].path < w[1].path),
        "sorted"
    );
    let e = listing
        .entries
        .iter()
        .find(|e| e.path.ends_with("x2999.bin"))
        .unwrap();
    assert_eq!(e.copies[0].hash, ContentHash::of(&2999i32.to_le_bytes()));
    client.close().await;
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_peer_that_is_down_does_not_break_ls() {
    let env = TestEnv::new();
    write(&env.dir("a"), "here.txt", b"still listed");
    let nobody = free_port();
    let a = env.start_send_only("a", &[nobody]).await;
    let client = env.client(&a).await;
    let listing = client.list().await.unwrap();
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(listing.warnings.len(), 1, "{:?}", listing.warnings);
    assert!(
        listing.warnings[0].contains(&nobody.to_string()),
        "{:?}",
        listing.warnings
    );
    client.close().await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_is_named_and_the_rest_is_listed() {
    let env = TestEnv::new();
    write(&env.dir("a"), "mine.txt", b"a");
    write(&env.dir("b"), "theirs.txt", b"b");
    let a = env.start_send_only("a", &[]).await;
    let relay = Relay::start(a.local_addr()).await;
    let b = env.start_send_only("b", &[relay.addr]).await;
    wait_connected(&[&a, &b]).await;
    assert_eq!(env.client(&a).await.list().await.unwrap().entries.len(), 2);

    relay.set_cut(true); // partition: b's session on a is still up, but silent
    let client = env.client(&a).await;
    let started = std::time::Instant::now();
    let listing = client.list().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
    let paths: Vec<_> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["mine.txt"]);
    assert!(
        listing.warnings.iter().any(|w| w.contains("peer b")),
        "{:?}",
        listing.warnings
    );

    relay.set_cut(false);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn nodes_dialing_each_other_keep_one_session_and_reconnect_after_restart() {
    let env = TestEnv::new();
    let (pa, pb) = (free_port(), free_port());
    let mut ca = env.config("a", &[pb]);
    ca.send_only = true;
    ca.listen = pa;
    let mut cb = env.config("b", &[pa]);
    cb.send_only = true;
    cb.listen = pb;
    let a = dirsync::node::start(ca).await.unwrap();
    let b = dirsync::node::start(cb.clone()).await.unwrap();
    wait_connected(&[&a, &b]).await;
    write(&env.dir("b"), "b.txt", b"b");
    // Whatever the race between the two dials, one session each, and it works.
    for _ in 0..3 {
        assert_eq!(a.session_count(), 1);
        assert_eq!(b.session_count(), 1);
        let listing = env.client(&a).await.list().await.unwrap();
        assert_eq!(listing.nodes, ["a", "b"], "{:?}", listing.warnings);
    }

    b.shutdown().await;
    wait_until("a notices b left", Duration::from_secs(10), || {
        a.connected_peers().is_empty()
    })
    .await;
    let b = dirsync::node::start(cb).await.unwrap();
    wait_connected(&[&a, &b]).await;
    assert_eq!(env.client(&a).await.list().await.unwrap().nodes, ["a", "b"]);
    b.shutdown().await;
    a.shutdown().await;
}
