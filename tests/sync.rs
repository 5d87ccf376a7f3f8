//! The sync engine between real nodes: what one node changes, the others get.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use dirsync::events::EventKind;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_modify_delete_dirs_and_empty_dirs() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "before/start.txt", b"there before the nodes started");
    let a = env.start("a", &[]).await;
    let b = env.start("b", &[a.local_addr()]).await;
    wait_same_trees(&[&da, &db], T).await;
    assert_eq!(
        std::fs::read(db.join("before/start.txt")).unwrap(),
        b"there before the nodes started"
    );

    write(&da, "new.txt", b"hello");
    wait_content(&db, "new.txt", b"hello").await;
    write(&da, "new.txt", b"hello again, longer");
    wait_content(&db, "new.txt", b"hello again, longer").await;
    std::fs::create_dir_all(da.join("empty/nested/deeper")).unwrap();
    write(&db, "from b/ünïcödé name.txt", b"the other way");
    wait_content(&da, "from b/ünïcödé name.txt", b"the other way").await;
    wait_until("empty dirs on b", T, || {
        db.join("empty/nested/deeper").is_dir()
    })
    .await;

    std::fs::remove_file(da.join("new.txt")).unwrap();
    wait_gone(&db, "new.txt").await;
    std::fs::remove_dir_all(db.join("empty")).unwrap();
    wait_gone(&da, "empty").await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Directories a node creates while installing a batch are watched only once the
/// batch is done (their own installs are not reported back to the node); what is
/// written in them locally, during the batch or after it, still reaches the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_writes_in_directories_made_by_an_install_are_synced() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let big: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8).collect();
    write(&da, "fresh/first.txt", b"first");
    write(&da, "fresh/deep/big.bin", &big);
    let (a, b) = env.pair().await;
    // As soon as the first file is on b, most likely while the large one of the
    // same batch is still arriving.
    wait_content(&db, "fresh/first.txt", b"first").await;
    write(
        &db,
        "fresh/deep/during.txt",
        b"written on b during the install",
    );
    wait_content(
        &da,
        "fresh/deep/during.txt",
        b"written on b during the install",
    )
    .await;
    wait_content(&db, "fresh/deep/big.bin", &big).await;
    write(&db, "fresh/deep/after.txt", b"written on b after it");
    wait_content(&da, "fresh/deep/after.txt", b"written on b after it").await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_is_a_local_move_not_a_transfer() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    let content = vec![42u8; 300_000];
    write(&da, "docs/old name.bin", &content);
    wait_content(&db, "docs/old name.bin", &content).await;
    let log = EventLog::of(&b);
    std::fs::create_dir_all(da.join("archive")).unwrap();
    std::fs::rename(
        da.join("docs/old name.bin"),
        da.join("archive/new name.bin"),
    )
    .unwrap();
    wait_content(&db, "archive/new name.bin", &content).await;
    wait_gone(&db, "docs/old name.bin").await;
    log.wait_for("archive/new name.bin", |_| true).await;
    let kinds = log.kinds_for("archive/new name.bin");
    assert!(
        !kinds.contains(&EventKind::Received),
        "renamed content must not cross the network: {kinds:?}"
    );
    assert!(
        kinds.contains(&EventKind::Renamed) || kinds.contains(&EventKind::CopiedLocally),
        "{kinds:?}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_synced_as_links_and_the_exec_bit_travels() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    std::os::unix::fs::symlink("../../../../etc/passwd", da.join("outside")).unwrap();
    std::os::unix::fs::symlink("script.sh", da.join("inside")).unwrap();
    write(&da, "script.sh", b"#!/bin/sh\necho hi\n");
    wait_content(&db, "script.sh", b"#!/bin/sh\necho hi\n").await;
    wait_until("links on b", T, || {
        db.join("outside").symlink_metadata().is_ok()
            && db.join("inside").symlink_metadata().is_ok()
    })
    .await;
    assert_eq!(
        std::fs::read_link(db.join("outside")).unwrap().to_str(),
        Some("../../../../etc/passwd")
    );
    assert!(db
        .join("outside")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());

    std::fs::set_permissions(da.join("script.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    wait_until("exec bit on b", T, || {
        std::fs::metadata(db.join("script.sh"))
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
    .await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_deletion_wins_when_the_node_comes_back() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "doomed.txt", b"x");
    write(&da, "kept.txt", b"y");
    let a = env.start("a", &[]).await;
    let cb = env.config("b", &[a.local_addr()]);
    let b = dirsync::node::start(cb.clone()).await.unwrap();
    wait_content(&db, "doomed.txt", b"x").await;
    wait_content(&db, "kept.txt", b"y").await;

    // Deleted on a while b is down: the deletion reaches b when it returns.
    b.shutdown().await;
    std::fs::remove_file(da.join("doomed.txt")).unwrap();
    let b = dirsync::node::start(cb.clone()).await.unwrap();
    wait_gone(&db, "doomed.txt").await;

    // Deleted on b while b is down: b sees it at start-up and a follows.
    b.shutdown().await;
    std::fs::remove_file(db.join("kept.txt")).unwrap();
    let b = dirsync::node::start(cb).await.unwrap();
    wait_gone(&da, "kept.txt").await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_on_both_sides_keep_both_versions() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "notes.txt", b"original");
    write(&da, "same.txt", b"original");
    let a = env.start("a", &[]).await;
    let cb = env.config("b", &[a.local_addr()]);
    let b = dirsync::node::start(cb.clone()).await.unwrap();
    wait_content(&db, "notes.txt", b"original").await;
    b.shutdown().await;
    let log = EventLog::of(&a);

    write(&da, "notes.txt", b"edited on a");
    write(&db, "notes.txt", b"edited on b, later");
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    set_mtime(&db, "notes.txt", later);
    write(&da, "same.txt", b"identical edit");
    write(&db, "same.txt", b"identical edit");
    a.engine().scan(None).await.unwrap();

    let b = dirsync::node::start(cb).await.unwrap();
    wait_content(&da, "notes.txt", b"edited on b, later").await;
    wait_same_trees(&[&da, &db], T).await;
    let tree = tree(&da);
    let copies: Vec<&String> = tree
        .keys()
        .filter(|k| k.contains(".sync-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "exactly one conflict copy: {tree:#?}");
    assert!(
        copies[0].starts_with("notes.sync-conflict-") && copies[0].ends_with("-a.txt"),
        "{copies:?}"
    );
    assert_eq!(std::fs::read(da.join(copies[0])).unwrap(), b"edited on a");
    assert_eq!(
        std::fs::read(db.join("same.txt")).unwrap(),
        b"identical edit"
    );
    log.wait_for("notes.txt", |e| e.event == EventKind::Conflict)
        .await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A conflict copy whose name an earlier, deleted copy had (same file, same
/// second, same node) while the batch that brings the conflict also brings that
/// old copy's tombstone: the new copy gets a numbered name and syncs like any
/// file (found by the soak: it stayed on one node, indexed under the tombstone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_copy_never_reuses_a_name_the_same_batch_deletes() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, relay, b) = env.pair_via_relay().await;
    // a's edit is stamped 2021-06-01 12:00:00 UTC: a copy of it made on a is
    // named after that second.
    let stamp = std::time::UNIX_EPOCH + Duration::from_secs(1_622_548_800);
    let old_copy = "notes.sync-conflict-20210601-120000-a.txt";
    write(&da, "notes.txt", b"original");
    write(&da, old_copy, b"an older copy");
    wait_content(&db, old_copy, b"an older copy").await;
    wait_content(&db, "notes.txt", b"original").await;
    std::fs::remove_file(da.join(old_copy)).unwrap();
    wait_gone(&db, old_copy).await;

    relay.set_cut(true);
    // b brings the old copy back and deletes it again: its tombstone is news to a.
    write(&db, old_copy, b"back for a moment");
    b.engine().scan(None).await.unwrap();
    std::fs::remove_file(db.join(old_copy)).unwrap();
    write(&db, "notes.txt", b"edited on b, later");
    b.engine().scan(None).await.unwrap();
    write(&da, "notes.txt", b"edited on a");
    set_mtime(&da, "notes.txt", stamp);
    a.engine().scan(None).await.unwrap();
    relay.set_cut(false);

    wait_content(&da, "notes.txt", b"edited on b, later").await;
    wait_same_trees(&[&da, &db], T).await;
    let tree = tree(&db);
    let copies: Vec<&String> = tree
        .keys()
        .filter(|k| k.contains(".sync-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "one conflict copy: {tree:#?}");
    assert_ne!(copies[0], old_copy, "the deleted name is not reused");
    assert_eq!(std::fs::read(db.join(copies[0])).unwrap(), b"edited on a");
    b.shutdown().await;
    a.shutdown().await;
}

/// A node whose disk no longer matches its index (a deletion its watcher did not
/// report: here there is no watcher) refuses a peer's version over it, and then
/// looks at the path itself: the deletion is versioned, the peer's edit wins over
/// it, and the nodes converge without waiting for the periodic rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_install_rescans_the_path_instead_of_waiting_for_an_event() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "f.txt", b"first");
    let (a, b) = pair_unwatched_a(&env).await;
    wait_content(&db, "f.txt", b"first").await;
    let log = EventLog::of(&a);
    // Gone on a's disk, unknown to a's index.
    std::fs::remove_file(da.join("f.txt")).unwrap();
    write(&db, "f.txt", b"edited on b");
    log.wait_for("f.txt", |e| e.event == EventKind::Failed)
        .await;
    wait_content(&da, "f.txt", b"edited on b").await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// Node a without a watcher (changes behind its back stay unknown to its index),
/// and node b connected to it.
async fn pair_unwatched_a(env: &TestEnv) -> (dirsync::node::NodeHandle, dirsync::node::NodeHandle) {
    let mut ca = env.config("a", &[]);
    ca.watch = false;
    let a = dirsync::node::start(ca).await.unwrap();
    let b = env.start("b", &[a.local_addr()]).await;
    (a, b)
}

/// A peer's rename that cannot be applied (a file the index does not know yet is
/// in the way) is retried with the deletion of its source: the deletion is part
/// of the rename, not a record to drop with it (release soak, seed 132: a kept
/// the source for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rename_still_deletes_its_source() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, "e/f.txt", b"moved on b");
    let (a, b) = pair_unwatched_a(&env).await;
    wait_content(&db, "e/f.txt", b"moved on b").await;
    let log = EventLog::of(&a);
    // On a's disk, unknown to a's index (a has no watcher): the rename's target.
    write(&da, "d/g.txt", b"made on a");
    std::fs::create_dir_all(db.join("d")).unwrap();
    std::fs::rename(db.join("e/f.txt"), db.join("d/g.txt")).unwrap();
    log.wait_for("d/g.txt", |e| e.event == EventKind::Failed)
        .await;
    wait_gone(&da, "e/f.txt").await;
    wait_same_trees(&[&da, &db], T).await;
    // Nothing lost: both versions of d/g.txt are on both nodes.
    let contents: Vec<Vec<u8>> = std::fs::read_dir(da.join("d"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(contents.iter().any(|c| c == b"made on a"), "{contents:?}");
    assert!(contents.iter().any(|c| c == b"moved on b"), "{contents:?}");
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_converges_through_the_middle_node() {
    let env = TestEnv::new();
    let (da, db, dc) = (env.dir("a"), env.dir("b"), env.dir("c"));
    let a = env.start("a", &[]).await;
    let b = env.start("b", &[a.local_addr()]).await;
    let c = env.start("c", &[b.local_addr()]).await;
    wait_connected(&[&a, &b]).await;
    wait_connected(&[&b, &c]).await;
    write(&da, "from-a/deep/file.txt", b"travels two hops");
    write(&dc, "from-c.txt", b"and back");
    wait_content(&dc, "from-a/deep/file.txt", b"travels two hops").await;
    wait_content(&da, "from-c.txt", b"and back").await;
    std::fs::remove_dir_all(da.join("from-a")).unwrap();
    wait_gone(&dc, "from-a").await;
    wait_same_trees(&[&da, &db, &dc], T).await;
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_is_streamed_and_verified() {
    large_file(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_growing_in_place_arrives_whole() {
    large_file(true).await;
}

/// 64 MiB of non-repeating bytes, written in pieces (never one 64 MiB buffer),
/// either in place (the file grows under the watcher for a while) or beside the tree
/// and moved in, as most tools save large files.
async fn large_file(in_place: bool) {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    let log = EventLog::of(&b);
    {
        use std::io::Write;
        let partial = match in_place {
            true => da.join("big.bin"),
            false => env.tmp.path().join("big.bin.partial"),
        };
        let mut f = std::fs::File::create(&partial).unwrap();
        let mut block = [0u8; 1 << 16];
        for i in 0u32..1024 {
            for (j, chunk) in block.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&(i.wrapping_mul(2654435761) ^ j as u32).to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        if !in_place {
            std::fs::rename(&partial, da.join("big.bin")).unwrap();
        }
    }
    let want = dirsync::hash::ContentHash::of_file(&da.join("big.bin")).unwrap();
    let size = 64 << 20;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::metadata(db.join("big.bin"))
            .map(|m| m.len() == size)
            .unwrap_or(false)
            && dirsync::hash::ContentHash::of_file(&db.join("big.bin")).ok() == Some(want);
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "big.bin not on b after 120 s; b's events: {:#?}",
            log.all().iter().map(|e| e.human()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.wait_for("big.bin", |e| {
        e.event == EventKind::Received && e.bytes == Some(size)
    })
    .await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A large file edited in place, then with bytes inserted (saved the way editors
/// do: a new file renamed over it), crosses as a delta: b keeps the blocks its
/// version already has and fetches only those around the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_edited_or_grown_sends_only_the_blocks_around_the_change() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    let log = EventLog::of(&b);
    let mut content = pseudo_random(16 << 20, 0x9e3779b97f4a7c15);
    std::fs::write(env.tmp.path().join("big.tmp"), &content).unwrap();
    std::fs::rename(env.tmp.path().join("big.tmp"), da.join("big.bin")).unwrap();
    wait_content(&db, "big.bin", &content).await;
    let fetched = |e: &dirsync::events::Event| -> Option<u64> {
        let d = e.detail.as_deref()?.strip_prefix("delta: fetched ")?;
        d.split(' ').next()?.parse().ok()
    };
    // Each change touches at most the two blocks around it (a block is at most
    // 256 KiB for a file this size).
    let limit = 512 * 1024;

    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(da.join("big.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
    }
    content[5 << 20..(5 << 20) + 4096].fill(0x5a);
    wait_content(&db, "big.bin", &content).await;
    log.wait_for("big.bin", |e| {
        e.event == EventKind::Received && fetched(e).is_some_and(|n| n > 0 && n <= limit)
    })
    .await;

    content.splice(9 << 20..9 << 20, [0xa5; 4096]);
    std::fs::write(env.tmp.path().join("big.tmp"), &content).unwrap();
    std::fs::rename(env.tmp.path().join("big.tmp"), da.join("big.bin")).unwrap();
    wait_content(&db, "big.bin", &content).await;
    log.wait_for("big.bin", |e| {
        e.event == EventKind::Received
            && e.bytes == Some(content.len() as u64)
            && fetched(e).is_some_and(|n| n >= 4096 && n <= limit + 4096)
    })
    .await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_and_delete_of_ten_thousand_files() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    for i in 0..10_000 {
        write(
            &da,
            &format!("bulk/{:02}/{i}.txt", i % 50),
            format!("file {i}").as_bytes(),
        );
    }
    let on_b = || count_files(&db.join("bulk"));
    wait_until("10,000 files on b", Duration::from_secs(180), || {
        on_b() == 10_000
    })
    .await;
    wait_same_trees(&[&da, &db], T).await;
    let log = EventLog::of(&b);
    std::fs::remove_dir_all(da.join("bulk")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while db.join("bulk").exists() {
        if std::time::Instant::now() > deadline {
            let failures: Vec<_> = log
                .all()
                .into_iter()
                .filter(|e| e.event != EventKind::Deleted)
                .take(20)
                .collect();
            panic!(
                "bulk still on b: {} entries left; a has {:?}; events: {failures:#?}",
                tree(&db).len(),
                tree(&da).len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_paths_are_neither_sent_nor_deleted_and_nodes_go_quiet() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    write(&da, ".dirsyncignore", b"*.log\nbuild/\n");
    write(&db, ".dirsyncignore", b"*.log\nbuild/\n");
    write(&da, "build/out.o", b"object");
    write(&da, "app.log", b"log line");
    write(&da, "src/main.rs", b"fn main() {}");
    write(&db, "b-only.log", b"b's own log");
    let a = env.start("a", &[]).await;
    let b = env.start("b", &[a.local_addr()]).await;
    wait_content(&db, "src/main.rs", b"fn main() {}").await;
    write(&da, "later.log", b"not synced either");
    let log_b = EventLog::of(&b);
    write(&da, "src/lib.rs", b"// synced");
    wait_content(&db, "src/lib.rs", b"// synced").await;
    assert!(
        !db.join("build").exists()
            && !db.join("app.log").exists()
            && !db.join("later.log").exists()
    );
    assert!(
        da.join("build/out.o").exists()
            && db.join("b-only.log").exists()
            && !da.join("b-only.log").exists()
    );

    // Once converged (b has committed what it received), nothing echoes back and
    // forth: both indexes stay put.
    log_b
        .wait_for("src/lib.rs", |e| e.event == EventKind::Received)
        .await;
    let (sa, sb) = (a.engine().seq(), b.engine().seq());
    let (before_a, before_b) = (*sa.borrow(), *sb.borrow());
    tokio::time::sleep(Duration::from_millis(1500)).await; // an observation window, not a sync wait
    let after = (*sa.borrow(), *sb.borrow());
    assert_eq!(
        after,
        (before_a, before_b),
        "index sequences moved after convergence; a wrote {:?}, b wrote {:?}",
        written_since(&da, before_a),
        written_since(&db, before_b)
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_folder_marker_stops_the_node_instead_of_deleting_everything() {
    let env = TestEnv::new();
    let da = env.dir("a");
    write(&da, "precious.txt", b"keep me");
    let mut config = env.config("a", &[]);
    // State outside the synced directory, as with a separate disk for the data.
    config.state_dir = env.tmp.path().join("state-a");
    let a = dirsync::node::start(config.clone()).await.unwrap();
    a.shutdown().await;

    // The data disk "is not mounted": the directory is there, empty, no marker.
    std::fs::remove_dir_all(&da).unwrap();
    std::fs::create_dir_all(&da).unwrap();
    let err = dirsync::node::start(config.clone())
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("marker") && text.contains("unmounted"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_files_of_an_interrupted_transfer_are_removed_at_start() {
    let env = TestEnv::new();
    let da = env.dir("a");
    write(&da, "sub/.dirsync-tmp-123-0-report.pdf", b"half a file");
    write(&da, "sub/real.txt", b"real");
    let a = env.start("a", &[]).await;
    assert!(!da.join("sub/.dirsync-tmp-123-0-report.pdf").exists());
    let files = a.engine().local_files().await.unwrap();
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["sub/real.txt"]
    );
    a.shutdown().await;
}

/// What `dir`'s index recorded after `seq` (path, seq, last modified by, deleted),
/// read straight from its SQLite file, to say what moved when a test fails.
fn written_since(dir: &std::path::Path, seq: u64) -> Vec<String> {
    let db = dir.join(".dirsync/index.db");
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let rows = rusqlite::Connection::open_with_flags(&db, flags).and_then(|c| {
        let mut stmt = c.prepare(
            "SELECT path, seq, modified_by, deleted FROM files WHERE seq > ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([seq as i64], |r| {
            Ok(format!(
                "{} (seq {}, by {}{})",
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                if r.get::<_, bool>(3)? {
                    ", deleted"
                } else {
                    ""
                }
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()
    });
    rows.unwrap_or_else(|e| vec![format!("(cannot read {}: {e})", db.display())])
}

/// A node starting on a tree its index knows nothing of serves it while its
/// start-up scan still runs: the files at the top of the tree are committed as
/// a first part and fetched by a peer before the scan has hashed a large file
/// further down (the walk reads a directory's own entries before the
/// directories in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tree_is_served_while_its_first_scan_runs() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    for i in 0..300 {
        write(&da, &format!("f{i:03}.txt"), format!("top {i}").as_bytes());
    }
    // Sparse: 2 GiB to hash (0.4 s or more on one thread), little disk used.
    std::fs::create_dir(da.join("deep")).unwrap();
    let big = std::fs::File::create(da.join("deep/big.bin")).unwrap();
    big.set_len(2 << 30).unwrap();
    drop(big);
    let mut a_config = env.config("a", &[]);
    a_config.listen = free_port();
    let a_addr = a_config.listen;
    let a_start = tokio::spawn(dirsync::node::start(a_config));
    let b = env.start("b", &[a_addr]).await;
    wait_until("b has a's top files", T, || {
        (0..300).all(|i| db.join(format!("f{i:03}.txt")).is_file())
    })
    .await;
    assert!(
        !a_start.is_finished(),
        "a's start-up scan ended before b had the files it committed first"
    );
    assert_eq!(
        std::fs::read(db.join("f299.txt")).unwrap(),
        b"top 299".to_vec()
    );
    // b is stopped before it fetches the large file.
    b.shutdown().await;
    let a = a_start.await.unwrap().expect("a starts");
    a.shutdown().await;
}

/// A directory made by a batch that runs long (here it waits for a large file on
/// a slow link) is watched before the batch ends: a local write into it reaches
/// the peer while the batch is still receiving, not once the batch is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_a_long_batch_made_is_watched_before_the_batch_ends() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, relay, b) = env.pair_via_relay().await;
    // 8 MiB at 256 KiB/s: the batch takes over 30 s, beyond `wait_content`'s 20.
    relay.set_rate_from_target(Some(256 << 10));
    // The directory and its file appear at once (renamed in): one batch.
    let big = pseudo_random(8 << 20, 7);
    let outside = env.dir("outside");
    write(&outside, "made/big.bin", &big);
    std::fs::rename(outside.join("made"), da.join("made")).unwrap();
    wait_until("b made the directory", T, || db.join("made").is_dir()).await;
    // b looks into the new directory once when it sets its mode, so a first
    // write there may be found that way. Once a has it, that look is over: the
    // second write can only be seen if the directory is watched by then.
    write(&db, "made/local.txt", b"written on b");
    wait_content(&da, "made/local.txt", b"written on b").await;
    write(&db, "made/local.txt", b"written on b again, later");
    wait_content(&da, "made/local.txt", b"written on b again, later").await;
    let client = env.client(&b).await;
    let status = client.status().await.unwrap();
    assert!(
        status.transfers_in_flight >= 1 && !db.join("made/big.bin").exists(),
        "the batch was still receiving: {status:?}"
    );
    relay.set_rate_from_target(None);
    wait_content(&db, "made/big.bin", &big).await;
    wait_same_trees(&[&da, &db], T).await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A tool's temporary file, written slowly and renamed over the real one (an
/// atomic save of a large file), reaches the peer as the real file only: the
/// half-written temporary is never announced, however long it stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_atomic_save_syncs_only_the_saved_file() {
    use std::io::Write as _;
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    let log = EventLog::of(&b);
    let mut tmp = std::fs::File::create(da.join("report.pdf.tmp")).unwrap();
    tmp.write_all(b"the first part of the new version").unwrap();
    // Later changes go through while the temporary is still open.
    write(&da, "other.txt", b"written meanwhile");
    wait_content(&db, "other.txt", b"written meanwhile").await;
    tmp.write_all(b", and the rest").unwrap();
    std::fs::rename(da.join("report.pdf.tmp"), da.join("report.pdf")).unwrap();
    drop(tmp);
    let saved = b"the first part of the new version, and the rest";
    wait_content(&db, "report.pdf", saved).await;
    wait_same_trees(&[&da, &db], T).await;
    assert!(
        log.kinds_for("report.pdf.tmp").is_empty(),
        "the temporary file reached b: {:?}",
        log.kinds_for("report.pdf.tmp")
    );
    b.shutdown().await;
    a.shutdown().await;
}
