//! The binaries, run as a user would: `certs`, two `dirsync-node`s, `ls`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLI: &str = env!("CARGO_BIN_EXE_dirsync-cli");
const NODE: &str = env!("CARGO_BIN_EXE_dirsync-node");

/// A `dirsync-node` process whose stderr is collected line by line.
struct NodeProc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl NodeProc {
    fn spawn(args: &[&str], envs: &[(&str, &str)]) -> NodeProc {
        let mut child = Command::new(NODE)
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dirsync-node");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        NodeProc { child, log }
    }

    /// Node `name` syncing `dir` with the certificates in `certs`, on an ephemeral
    /// loopback port, plus `extra` arguments.
    fn node(dir: &std::path::Path, certs: &str, name: &str, extra: &[&str]) -> NodeProc {
        let dir = dir.to_str().unwrap();
        let mut args = vec![
            "--dir",
            dir,
            "--listen",
            "127.0.0.1:0",
            "--certs",
            certs,
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        NodeProc::spawn(&args, &[])
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}; log: {:#?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address from the "listening on ADDR," line.
    fn addr(&self) -> String {
        let line = self.wait_for("listening on ");
        let rest = &line[line.find("listening on ").unwrap() + 13..];
        rest[..rest.find(',').unwrap()].to_string()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dirsync-cli")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_one_clear_line(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail");
    let err = text(&out.stderr);
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn certs_two_nodes_and_ls_json() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();
    let out = cli(&["certs", "--out", certs_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "ca.pem", "ca.key", "a.pem", "a.key", "b.pem", "b.key", "cli.pem", "cli.key",
    ] {
        assert!(certs.join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::metadata(certs.join("a.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let again = cli(&["certs", "--out", certs_s]);
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("kept"),
        "{}",
        text(&again.stdout)
    );

    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    common::write(&da, "shared.txt", b"same");
    common::write(&db, "shared.txt", b"same");
    common::write(&db, "sub dir/only b.txt", b"bee");
    // Send-only (both nodes): this test checks the listing of diverging trees.
    let a = NodeProc::node(&da, certs_s, "a", &["--send-only"]);
    let a_addr = a.addr();
    // b is configured through environment variables only.
    let b = NodeProc::spawn(
        &[],
        &[
            ("DIRSYNC_DIR", db.to_str().unwrap()),
            ("DIRSYNC_LISTEN", "127.0.0.1:0"),
            ("DIRSYNC_PEERS", &a_addr),
            ("DIRSYNC_CERTS", certs_s),
            ("DIRSYNC_NAME", "b"),
            ("DIRSYNC_SEND_ONLY", "true"),
        ],
    );
    b.wait_for("peer a connected");
    a.wait_for("peer b connected");

    let out = cli(&["--server", &a_addr, "--certs", certs_s, "ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let keys: Vec<&str> = arr[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in [
        "index", "path", "size", "modified", "blake3", "copies", "in_sync", "locked",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    assert_eq!(arr[0]["path"], "shared.txt");
    assert_eq!(arr[0]["in_sync"], true);
    assert_eq!(arr[0]["blake3"], blake3::hash(b"same").to_hex().as_str());
    assert!(arr[0]["modified"].as_str().unwrap().ends_with('Z'));
    assert_eq!(arr[1]["path"], "sub dir/only b.txt");
    assert_eq!(arr[1]["index"], 2);
    assert!(arr[1]["copies"].get("a").is_none());
    assert_eq!(arr[1]["copies"]["b"]["size"], 3);

    let table = cli(&["--server", &a_addr, "--certs", certs_s, "ls"]);
    let table = text(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("sub dir/only b.txt") && l.trim_end().ends_with("b only")),
        "{table}"
    );

    // SIGTERM: a graceful stop, exit status 0.
    let mut b = b;
    let status = Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "{code:?}");
    b.wait_for("shutting down");
    a.wait_for("peer b disconnected");
}

#[test]
fn user_errors_print_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();
    assert!(cli(&["certs", "--out", certs_s]).status.success());

    let out = cli(&["--certs", "/nonexistent/certs", "ls"]);
    assert_one_clear_line(&out, "just certs");

    let nobody = common::free_port().to_string();
    let out = cli(&["--server", &nobody, "--certs", certs_s, "ls"]);
    assert_one_clear_line(&out, "dirsync-node running");

    let out = Command::new(NODE)
        .args([
            "--dir",
            "/nonexistent/dir",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            certs_s,
            "--name",
            "a",
        ])
        .output()
        .unwrap();
    assert_one_clear_line(&out, "does not exist");

    let out = cli(&["certs", "--out", certs_s, "--node", "../evil"]);
    assert_one_clear_line(&out, "invalid name");

    // --strict turns an unreachable peer into a failure, after printing the listing.
    let da = tmp.path().join("a");
    common::write(&da, "f", b"1");
    let a = NodeProc::node(&da, certs_s, "a", &["--peer", &nobody]);
    let addr = a.addr();
    let relaxed = cli(&["--server", &addr, "--certs", certs_s, "ls"]);
    assert!(relaxed.status.success());
    assert!(
        text(&relaxed.stderr).contains(&nobody),
        "{}",
        text(&relaxed.stderr)
    );
    let strict = cli(&["--server", &addr, "--certs", certs_s, "ls", "--strict"]);
    assert!(!strict.status.success());
    assert!(text(&strict.stdout).contains('f'));
}

#[test]
fn demo_prints_a_merged_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(&["demo", "--dir", tmp.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let table = stdout.split("converged").nth(1).unwrap_or_default();
    let line_with = |needle: &str| {
        table
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
    };
    // The nodes synced: everything is on both, and the file edited differently on
    // each side was kept twice (the winner, and the loser as a conflict copy).
    assert!(stdout.contains("converged"), "{stdout}");
    for path in [
        "docs/plan.txt",
        "docs/plan.sync-conflict-",
        "notes/todo list.md",
        "only on a.txt",
    ] {
        assert!(
            line_with(path).trim_end().ends_with("a b"),
            "{path}: {stdout}"
        );
    }
    assert!(!stdout.contains("(differs)"), "{stdout}");
    assert!(
        stdout.contains("a: <- notes/todo list.md from b"),
        "{stdout}"
    );
    assert!(stdout.contains("conflict docs/plan.txt"), "{stdout}");
    assert!(Path::new(&tmp.path().join("certs/ca.pem")).exists());
}

#[test]
fn status_and_watch_show_what_a_node_does() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();
    assert!(cli(&["certs", "--out", certs_s]).status.success());
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = NodeProc::node(&da, certs_s, "a", &[]);
    let addr = a.addr();
    let b = NodeProc::node(&db, certs_s, "b", &["--peer", &addr]);
    a.wait_for("peer b connected");

    // watch: start streaming, then make b receive a file.
    let mut watch = Command::new(CLI)
        .args(["--server", &addr, "--certs", certs_s, "watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The watch stream is live once a's own change shows up in it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let mut n = 0;
    loop {
        n += 1;
        std::fs::write(db.join(format!("hello-{n}.txt")), b"from b").unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.push(line);
            break;
        }
        assert!(Instant::now() < deadline, "no event from watch");
    }
    while !seen.iter().any(|l| l.contains("\"received\"")) {
        seen.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("a received event"),
        );
    }
    let event: serde_json::Value =
        serde_json::from_str(seen.iter().find(|l| l.contains("\"received\"")).unwrap()).unwrap();
    assert_eq!(event["node"], "a");
    assert_eq!(event["peer"], "b");
    assert!(event["path"].as_str().unwrap().starts_with("hello-"));
    assert_eq!(event["bytes"], 6);
    assert!(event["time"].as_str().unwrap().ends_with('Z'));
    let _ = watch.kill();
    let _ = watch.wait();
    b.wait_for("peer a connected");

    let out = cli(&["--server", &addr, "--certs", certs_s, "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["name"], "a");
    assert!(status["files"].as_u64().unwrap() >= 1);
    assert_eq!(status["peers"][0]["name"], "b");
    assert_eq!(status["peers"][0]["connected"], true);
    let human = text(&cli(&["--server", &addr, "--certs", certs_s, "status"]).stdout);
    assert!(human.contains("peer b: connected since"), "{human}");
}

#[test]
fn lock_by_index_and_by_path_from_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();
    assert!(cli(&["certs", "--out", certs_s]).status.success());
    let da = tmp.path().join("a");
    std::fs::create_dir_all(&da).unwrap();
    std::fs::write(da.join("alpha.txt"), b"a").unwrap();
    std::fs::write(da.join("beta.txt"), b"b").unwrap();
    let a = NodeProc::node(&da, certs_s, "a", &[]);
    let addr = a.addr();
    let run = |extra: &[&str]| {
        let mut all = vec!["--server", addr.as_str(), "--certs", certs_s];
        all.extend_from_slice(extra);
        cli(&all)
    };

    // By index, as `ls` numbers them (sorted by path: 1 alpha, 2 beta).
    let out = run(&["lock", "-i", "2", "--ttl", "1h"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.starts_with("locked beta.txt for cli until "), "{said}");
    // By path.
    let out = run(&["lock", "alpha.txt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "locked alpha.txt for cli");

    let ls: serde_json::Value = serde_json::from_slice(&run(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(ls[1]["path"], "beta.txt");
    assert_eq!(ls[1]["locked"], true);
    assert_eq!(ls[1]["lock_owner"], "cli");
    let table = text(&run(&["ls"]).stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("beta.txt") && l.ends_with("[locked by cli]")),
        "{table}"
    );
    let locks: serde_json::Value =
        serde_json::from_slice(&run(&["locks", "--json"]).stdout).unwrap();
    assert_eq!(locks.as_array().unwrap().len(), 2);
    assert_eq!(locks[1]["path"], "beta.txt");
    assert_eq!(locks[1]["owner"], "cli");
    assert_eq!(locks[1]["queued"], 0);
    assert!(locks[1]["ttl_left_secs"].as_i64().unwrap() > 3500);
    assert_eq!(locks[0]["ttl_left_secs"], serde_json::Value::Null);
    let human = text(&run(&["locks"]).stdout);
    assert!(human.contains("alpha.txt\tcli\t"), "{human}");

    // Someone else cannot take or release it; the errors say who holds it.
    assert_one_clear_line(
        &run(&["--name", "admin", "lock", "beta.txt"]),
        "beta.txt is locked by cli since",
    );
    assert_one_clear_line(&run(&["lock", "-i", "9"]), "index 9 is out of range");
    assert_one_clear_line(
        &run(&["lock", "gone.txt"]),
        "gone.txt does not exist on node a",
    );
    assert_one_clear_line(&run(&["unlock", "gone.txt"]), "gone.txt is not locked");

    let out = run(&["unlock", "--index", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "unlocked beta.txt; applied 0 of 0 queued updates"
    );
    let out = run(&["--name", "admin", "unlock", "--force", "alpha.txt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&run(&["locks"]).stdout).trim(), "no locks");
    drop(a);
}
