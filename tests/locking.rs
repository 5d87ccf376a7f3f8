//! Locks with a staged FIFO queue, with real nodes: while a path is locked on a,
//! b's versions of it are staged and queued on a, and applied in order on unlock.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use dirsync::events::EventKind;

fn staged_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join(".dirsync").join("staged"))
        .map(|r| r.count())
        .unwrap_or(0)
}

/// Waits until a has staged `n` versions of `path` in total.
async fn wait_staged(log: &EventLog, path: &str, n: usize) {
    wait_until(
        &format!("{n} staged versions of {path}"),
        Duration::from_secs(20),
        || {
            log.all()
                .iter()
                .filter(|e| e.event == EventKind::Staged && e.path.as_deref() == Some(path))
                .count()
                >= n
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_staged_while_locked_are_applied_in_order_on_unlock() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    write(&da, "doc.txt", b"original");
    wait_content(&db, "doc.txt", b"original").await;

    let cli = env.client(&a).await;
    let lock = cli.lock("doc.txt", None).await.expect("lock");
    assert_eq!(lock.owner, "cli");
    let log = EventLog::of(&a);
    let versions: [&[u8]; 3] = [b"one", b"two 2", b"three 333"];
    for (i, v) in versions.iter().enumerate() {
        write(&db, "doc.txt", v);
        wait_staged(&log, "doc.txt", i + 1).await;
    }
    assert_eq!(std::fs::read(da.join("doc.txt")).unwrap(), b"original");
    assert_eq!(std::fs::read(db.join("doc.txt")).unwrap(), b"three 333");
    assert_eq!(staged_files(&da), 3);
    let locks = cli.locks().await.unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!((locks[0].path.as_str(), locks[0].queued), ("doc.txt", 3));
    let listing = cli.list().await.unwrap();
    assert_eq!(
        listing.lock_of("doc.txt").map(|l| l.owner.as_str()),
        Some("cli")
    );

    let (queued, applied) = cli.unlock("doc.txt", false).await.expect("unlock");
    assert_eq!((queued, applied), (3, 3));
    let order: Vec<u64> = log
        .all()
        .iter()
        .filter(|e| e.event == EventKind::StagedApplied)
        .filter_map(|e| e.bytes)
        .collect();
    assert_eq!(order, vec![3, 5, 9], "applied in FIFO order");
    assert_eq!(std::fs::read(da.join("doc.txt")).unwrap(), b"three 333");
    assert_eq!(
        staged_files(&da),
        0,
        "staged files are removed once applied"
    );
    assert!(cli.locks().await.unwrap().is_empty());
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_while_locked_waits_for_the_unlock() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    write(&da, "keep/me.txt", b"still here");
    wait_content(&db, "keep/me.txt", b"still here").await;
    let cli = env.client(&a).await;
    cli.lock("keep/me.txt", None).await.expect("lock");
    let log = EventLog::of(&a);
    std::fs::remove_file(db.join("keep/me.txt")).unwrap();
    wait_staged(&log, "keep/me.txt", 1).await;
    assert_eq!(
        std::fs::read(da.join("keep/me.txt")).unwrap(),
        b"still here"
    );
    assert_eq!(cli.unlock("keep/me.txt", false).await.unwrap(), (1, 1));
    wait_gone(&da, "keep/me.txt").await;
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_on_both_sides_while_locked_lose_nothing() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    write(&da, "notes.txt", b"base");
    wait_content(&db, "notes.txt", b"base").await;
    let cli = env.client(&a).await;
    cli.lock("notes.txt", None).await.expect("lock");
    let log = EventLog::of(&a);
    write(&db, "notes.txt", b"b's edit");
    wait_staged(&log, "notes.txt", 1).await;
    // The lock holder edits too: that edit syncs out as usual.
    write(&da, "notes.txt", b"a's edit, made while locked");
    cli.unlock("notes.txt", false).await.expect("unlock");
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    for dir in [&da, &db] {
        let contents: Vec<String> = tree(dir).into_values().collect();
        let all: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        assert!(
            all.iter().any(|c| c == b"b's edit"),
            "b's edit kept on {}: {contents:?}",
            dir.display()
        );
        assert!(
            all.iter().any(|c| c == b"a's edit, made while locked"),
            "a's edit kept on {}: {contents:?}",
            dir.display()
        );
    }
    let names: Vec<String> = tree(&da).into_keys().collect();
    assert!(
        names.iter().any(|n| n.contains(".sync-conflict-")),
        "one version is a conflict copy: {names:?}"
    );
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_staged_files_survive_a_restart() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let b = env.start("b", &[]).await;
    let a = env.start("a", &[b.local_addr()]).await;
    wait_connected(&[&a, &b]).await;
    write(&db, "report.txt", b"draft");
    wait_content(&da, "report.txt", b"draft").await;
    let cli = env.client(&a).await;
    cli.lock("report.txt", None).await.expect("lock");
    let log = EventLog::of(&a);
    write(&db, "report.txt", b"second draft");
    wait_staged(&log, "report.txt", 1).await;
    write(&db, "report.txt", b"final version!");
    wait_staged(&log, "report.txt", 2).await;
    cli.close().await;
    a.shutdown().await;
    assert_eq!(staged_files(&da), 2);

    let a = env.start("a", &[b.local_addr()]).await;
    wait_connected(&[&a, &b]).await;
    let cli = env.client(&a).await;
    let locks = cli.locks().await.unwrap();
    assert_eq!(locks.len(), 1, "the lock survives: {locks:?}");
    assert_eq!(locks[0].queued, 2);
    assert_eq!(std::fs::read(da.join("report.txt")).unwrap(), b"draft");
    assert_eq!(cli.unlock("report.txt", false).await.unwrap(), (2, 2));
    assert_eq!(
        std::fs::read(da.join("report.txt")).unwrap(),
        b"final version!"
    );
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    cli.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_unlocks_unless_an_admin_forces() {
    let env = TestEnv::new();
    let da = env.dir("a");
    let a = env.start("a", &[]).await;
    write(&da, "plan.txt", b"x");
    let cli = env.client(&a).await;
    // Lockable once indexed (a few milliseconds after the write).
    let mut locked = None;
    for _ in 0..100 {
        match cli.lock("plan.txt", None).await {
            Ok(l) => {
                locked = Some(l);
                break;
            }
            Err(e) if e.to_string().contains("does not exist") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(locked.is_some(), "plan.txt never became lockable");
    let bob = env.client_as(&a, "bob").await;
    let err = bob.lock("plan.txt", None).await.unwrap_err().to_string();
    assert!(err.contains("locked by cli since"), "{err}");
    let err = bob.unlock("plan.txt", false).await.unwrap_err().to_string();
    assert!(err.contains("only cli can unlock"), "{err}");
    let err = bob.unlock("plan.txt", true).await.unwrap_err().to_string();
    assert!(err.contains("needs an admin certificate"), "{err}");
    let admin = env.client_as(&a, "admin").await;
    assert_eq!(admin.unlock("plan.txt", true).await.unwrap(), (0, 0));
    assert!(cli.locks().await.unwrap().is_empty());
    let err = cli.unlock("plan.txt", false).await.unwrap_err().to_string();
    assert!(err.contains("not locked"), "{err}");
    let err = cli.lock("no/such.txt", None).await.unwrap_err().to_string();
    assert!(err.contains("does not exist on node a"), "{err}");
    let err = cli
        .lock("../etc/passwd", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(".."), "{err}");
    for c in [cli, bob, admin] {
        c.close().await;
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_ttl_expires_is_released_and_its_queue_applied() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    write(&da, "t.txt", b"before");
    wait_content(&db, "t.txt", b"before").await;
    let cli = env.client(&a).await;
    let log = EventLog::of(&a);
    let lock = cli
        .lock("t.txt", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(lock.expires.is_some());
    write(&db, "t.txt", b"after the ttl");
    wait_staged(&log, "t.txt", 1).await;
    assert_eq!(std::fs::read(da.join("t.txt")).unwrap(), b"before");
    log.wait_for("t.txt", |e| {
        e.event == EventKind::Unlocked && e.detail.as_deref().unwrap_or("").contains("TTL")
    })
    .await;
    wait_content(&da, "t.txt", b"after the ttl").await;
    assert!(cli.locks().await.unwrap().is_empty());
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_deleted_around_a_locked_file_goes_after_the_unlock() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    write(&da, "proj/src/locked.rs", b"fn main() {}");
    write(&da, "proj/src/other.rs", b"// other");
    write(&da, "proj/README", b"readme");
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    let cli = env.client(&a).await;
    cli.lock("proj/src/locked.rs", None).await.expect("lock");
    let log = EventLog::of(&a);
    std::fs::remove_dir_all(db.join("proj")).unwrap();
    wait_staged(&log, "proj/src/locked.rs", 1).await;
    wait_gone(&da, "proj/src/other.rs").await;
    wait_gone(&da, "proj/README").await;
    // The locked file, and the directories holding it, stay until the unlock.
    assert_eq!(
        std::fs::read(da.join("proj/src/locked.rs")).unwrap(),
        b"fn main() {}"
    );
    cli.unlock("proj/src/locked.rs", false)
        .await
        .expect("unlock");
    wait_gone(&da, "proj").await;
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_versions_staged_while_locked_come_as_deltas() {
    let env = TestEnv::new();
    let (da, db) = (env.dir("a"), env.dir("b"));
    let (a, b) = env.pair().await;
    let mut content = pseudo_random(4 << 20, 0x2545f4914f6cdd1d);
    std::fs::write(env.tmp.path().join("big.tmp"), &content).unwrap();
    std::fs::rename(env.tmp.path().join("big.tmp"), db.join("big.bin")).unwrap();
    wait_content(&da, "big.bin", &content).await;
    let original = content.clone();
    let cli = env.client(&a).await;
    cli.lock("big.bin", None).await.expect("lock");
    let log = EventLog::of(&a);
    // What came from the peer for each staged version.
    let fetched = |log: &EventLog| -> Vec<Option<u64>> {
        log.all()
            .iter()
            .filter(|e| e.event == EventKind::Staged && e.path.as_deref() == Some("big.bin"))
            .map(|e| {
                let d = e.detail.as_deref()?.split("delta: fetched ").nth(1)?;
                d.split(' ').next()?.parse().ok()
            })
            .collect()
    };
    // Each staged version comes as a delta (the first against the locked file,
    // the second against the first staged version) of at most the two blocks
    // (256 KiB at most each) around its edit.
    for (i, at) in [1usize << 20, 3 << 20].into_iter().enumerate() {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(db.join("big.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&[i as u8 + 1; 4096]).unwrap();
        drop(f);
        content[at..at + 4096].fill(i as u8 + 1);
        wait_staged(&log, "big.bin", i + 1).await;
    }
    let sizes = fetched(&log);
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(
        sizes
            .iter()
            .all(|n| n.is_some_and(|n| n > 0 && n <= 512 * 1024)),
        "staged versions came as deltas: {sizes:?}"
    );
    assert_eq!(std::fs::read(da.join("big.bin")).unwrap(), original);
    assert_eq!(cli.unlock("big.bin", false).await.expect("unlock"), (2, 2));
    wait_content(&da, "big.bin", &content).await;
    wait_same_trees(&[&da, &db], Duration::from_secs(20)).await;
    cli.close().await;
    b.shutdown().await;
    a.shutdown().await;
}
