//! Benchmarks that print figures (never timed assertions): `just bench` or
//! `cargo bench --bench sync [-- latency small large restart delta]`; `scale`
//! (100,000 tiny files, with memory per file) runs only when named.
//!
//! Both nodes run in this process over loopback QUIC with real certificates.
//! Reference tools measured in the same run: `cp -a` and an rsync daemon over
//! loopback (skipped with a note if rsync is not installed). Workloads come from
//! the shared deterministic generator (`../shared/workloads/gen.py`, or
//! `$DIRSYNC_WORKLOADS`). `DIRSYNC_BENCH_DIR=/dev/shm` runs everything on tmpfs,
//! which takes the (shared, noisy) disk out of the comparison.
//! `DIRSYNC_BENCH_ROUNDS=N` runs `small` and `large` N times, each round next to
//! its own rsync run, and prints the medians, the ratio per round and in how
//! many rounds dirsync was no slower: one run on a shared machine decides little.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dirsync::certs::{self, CertRequest};
use dirsync::events::EventKind;
use dirsync::node::{self, NodeConfig, NodeHandle};

struct Bench {
    tmp: tempfile::TempDir,
    certs: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        // DIRSYNC_BENCH_DIR=/dev/shm measures the software alone (fsync is free
        // on tmpfs); the default temp dir measures the disk too.
        let mut builder = tempfile::Builder::new();
        builder.prefix("dirsync-bench-");
        let tmp = match std::env::var_os("DIRSYNC_BENCH_DIR") {
            Some(dir) => builder.tempdir_in(dir),
            None => builder.tempdir(),
        }
        .expect("temp dir");
        println!("working in {}", tmp.path().display());
        let certs = tmp.path().join("certs");
        certs::generate(&CertRequest::defaults(&certs)).expect("certs");
        Bench { tmp, certs }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn config(&self, name: &str, dir: &Path, peers: &[&NodeHandle]) -> NodeConfig {
        let mut c = NodeConfig::new(
            name,
            dir.to_path_buf(),
            "127.0.0.1:0".parse().unwrap(),
            self.certs.clone(),
        );
        c.peers = peers.iter().map(|p| p.local_addr().to_string()).collect();
        c.max_backoff = Duration::from_millis(200);
        c
    }
}

/// A loopback address with a UDP port that was free a moment ago.
fn free_local_addr() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free loopback port")
}

async fn wait_connected(a: &NodeHandle, b: &NodeHandle) {
    while a.connected_peers().is_empty() || b.connected_peers().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until `b` indexes as many files and bytes as `want` (a's totals, sent
/// once a has started). Counting is a scan of b's index (it holds b's store
/// while it runs, a few ms for 10,000 files), so it is done only once b has
/// reported as many installed files as `a` has, when events were lost, or every
/// 500 ms as a fallback: the measuring must not slow down what it measures.
async fn wait_caught_up(
    b: &NodeHandle,
    mut events: tokio::sync::broadcast::Receiver<dirsync::events::Event>,
    mut want: tokio::sync::watch::Receiver<Option<(u64, u64)>>,
    limit: Duration,
    since: Instant,
) -> Option<Duration> {
    use tokio::sync::broadcast::error::RecvError;
    let mut first: Option<Duration> = None;
    let mut last = Duration::ZERO;
    let deadline = Instant::now() + limit;
    let mut installed = 0u64;
    let mut lost = false;
    let mut last_check = Instant::now();
    let mut times: Vec<Duration> = Vec::new();
    while Instant::now() < deadline {
        let target = *want.borrow();
        let check = tokio::select! {
            r = tokio::time::timeout(Duration::from_millis(500), events.recv()) => match r {
                Ok(Ok(e)) => {
                    if matches!(e.event, EventKind::Received | EventKind::CopiedLocally) {
                        installed += 1;
                        last = since.elapsed();
                        first.get_or_insert(last);
                        times.push(last);
                    }
                    target.is_some_and(|w| installed >= w.0)
                        || last_check.elapsed() > Duration::from_millis(500)
                }
                Ok(Err(RecvError::Lagged(_))) => {
                    lost = true;
                    true
                }
                Err(_) => true,
                Ok(Err(RecvError::Closed)) => return None,
            },
            _ = want.changed(), if target.is_none() => true,
        };
        let Some(target) = *want.borrow() else {
            continue;
        };
        if check {
            let checked = since.elapsed();
            if b.engine().totals().await.expect("totals") == target {
                let equal = since.elapsed();
                if let Some(first) = first {
                    println!(
                        "  (first file installed on b at {:.3} s, last at {:.3} s; the index check that found it equal ran {:.3}-{:.3} s{})",
                        first.as_secs_f64(),
                        last.as_secs_f64(),
                        checked.as_secs_f64(),
                        equal.as_secs_f64(),
                        if lost { "; some events were lost" } else { "" }
                    );
                }
                if std::env::var_os("DIRSYNC_BENCH_TIMELINE").is_some() {
                    print_timeline(&times);
                }
                // b's tree was equal when its last file was installed (each event
                // comes after its file is in place and committed); the check only
                // confirms it, and counting its full-table query (several ms for
                // 10,000 files) would charge the benchmark's own work to dirsync.
                return Some(if first.is_some() { last } else { checked });
            }
            last_check = Instant::now();
        }
    }
    None
}

/// With `DIRSYNC_BENCH_TIMELINE` set: how many install events b emitted in each
/// 50 ms since both nodes started. Small files' events come when their chunk
/// commits (every 1024), so this shows commits, not single files arriving.
fn print_timeline(times: &[Duration]) {
    let mut buckets = vec![0usize; 1];
    for t in times {
        let i = (t.as_millis() / 50) as usize;
        if buckets.len() <= i {
            buckets.resize(i + 1, 0);
        }
        buckets[i] += 1;
    }
    let line: Vec<String> = buckets.iter().map(|n| n.to_string()).collect();
    println!("  (install events per 50 ms: {})", line.join(" "));
}

fn gen(what: &str, dir: &Path) {
    let script = std::env::var("DIRSYNC_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/workloads/gen.py")
        });
    let ok = Command::new("python3")
        .arg(&script)
        .arg(what)
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "workload generator {} failed", script.display());
}

/// CPU time (user + system) this process has used so far, from /proc (Linux).
fn cpu_seconds() -> f64 {
    proc_cpu("self", false)
}

/// CPU seconds of process `pid` from `/proc/PID/stat`: its own, or with
/// `children` that of its children it has waited for.
fn proc_cpu(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the
    // state; cutime and cstime the next two.
    let at = if children { 13 } else { 11 };
    (ticks(at) + ticks(at + 1)) / 100.0
}

fn time_cmd(cmd: &mut Command) -> Option<Duration> {
    let t = Instant::now();
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    ok.then(|| t.elapsed())
}

/// What one rsync run took.
struct RsyncRun {
    took: Duration,
    /// Peak RSS (KiB) of the receiving client process.
    rss_kib: Option<u64>,
    /// CPU seconds of all its processes: the client (with the receiver it forks)
    /// and the daemon's sender.
    cpu: Option<f64>,
}

/// rsync daemon on loopback serving `src`; copies it into `dst`. The peak RSS
/// and the CPU time need `/usr/bin/time`.
fn rsync_time(src: &Path, dst: &Path, work: &Path) -> Option<RsyncRun> {
    let daemon = RsyncDaemon::start(src, work)?;
    let url = format!("rsync://127.0.0.1:{}/w/", daemon.port);
    let gnu_time = Path::new("/usr/bin/time");
    if !gnu_time.exists() {
        let took = time_cmd(Command::new("rsync").arg("-a").arg(&url).arg(dst))?;
        return Some(RsyncRun {
            took,
            rss_kib: None,
            cpu: None,
        });
    }
    let daemon_pid = daemon.child.id().to_string();
    let sender_before = proc_cpu(&daemon_pid, true);
    let out = work.join("rsync-usage");
    let took = time_cmd(
        Command::new(gnu_time)
            .args(["-f", "%M %U %S", "-o"])
            .arg(&out)
            .args(["rsync", "-a"])
            .arg(&url)
            .arg(dst),
    )?;
    // The daemon reaps its sender for this connection as the client ends.
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sender = proc_cpu(&daemon_pid, true) - sender_before;
    while sender <= 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        sender = proc_cpu(&daemon_pid, true) - sender_before;
    }
    let usage = std::fs::read_to_string(&out).unwrap_or_default();
    let fields: Vec<&str> = usage.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let cpu = match (num(1), num(2)) {
        (Some(u), Some(s)) => Some(u + s + sender),
        _ => None,
    };
    Some(RsyncRun {
        took,
        rss_kib: num(0).map(|k| k as u64),
        cpu,
    })
}

/// A `/proc/self/status` figure in KiB (`VmRSS`, `VmHWM`); Linux.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// Starts measuring the process's peak RSS afresh (`VmHWM`), so one workload's
/// peak is not an earlier one's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// rsync from the daemon serving `src` into `dst` (which already holds an older
/// copy, so rsync sends a delta): its time and the bytes it received.
fn rsync_update(port: u16, dst: &Path) -> Option<(Duration, u64)> {
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["-a", "--stats"])
        .arg(format!("rsync://127.0.0.1:{port}/w/"))
        .arg(dst)
        .output()
        .ok()?;
    let took = t.elapsed();
    let stats = String::from_utf8_lossy(&out.stdout);
    let received = stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes received: "))?
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    out.status.success().then_some((took, received))
}

/// `gen.py delta` (one 256 MiB file) synced, then changed by `gen.py modify` (4 KiB
/// overwritten in place) and `gen.py insert` (4 KiB inserted): the time until b
/// has each version and the bytes it fetched, against rsync updating its own copy.
async fn delta(bench: &Bench) {
    let (da, db) = (bench.dir("delta-a"), bench.dir("delta-b"));
    gen("delta", &da);
    let a = node::start(bench.config("a", &da, &[])).await.expect("a");
    let b = node::start(bench.config("b", &db, &[&a])).await.expect("b");
    let t = Instant::now();
    let (_, want) = tokio::sync::watch::channel(Some(a.engine().totals().await.expect("totals")));
    wait_caught_up(&b, b.events(), want, Duration::from_secs(600), t).await;
    println!(
        "delta: one 256 MiB file, synced whole in {:.3} s; then changed",
        t.elapsed().as_secs_f64()
    );
    // rsync's copy, made whole first (outside the timing), served by a daemon.
    let rs_dst = bench.dir("delta-rsync");
    let daemon = RsyncDaemon::start(&da, bench.tmp.path());
    if let Some(d) = &daemon {
        rsync_update(d.port, &rs_dst);
    }
    for (step, what) in [
        ("modify", "4 KiB overwritten in place at 128 MiB"),
        ("insert", "4 KiB inserted at 128 MiB"),
    ] {
        let mut events = b.events();
        gen(step, &da);
        let t = Instant::now();
        let mut fetched = None;
        let mut arrived = None;
        while Instant::now() < t + Duration::from_secs(120) {
            let Ok(Ok(e)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await
            else {
                continue;
            };
            if e.event == EventKind::Received && e.path.as_deref() == Some("delta.bin") {
                // The clock is read first: hashing both 256 MiB versions to check
                // them must not count as dirsync's time (nor run before a starts).
                arrived = Some(t.elapsed());
                fetched = Some(e.detail.unwrap_or_else(|| "whole file".into()));
                let hash =
                    |dir: &Path| dirsync::hash::ContentHash::of_file(&dir.join("delta.bin")).ok();
                let got = hash(&db);
                if got.is_some() && got == hash(&da) {
                    break;
                }
            }
        }
        let ours = arrived.unwrap_or_else(|| t.elapsed());
        println!(
            "  {what}: dirsync {:.3} s ({}; includes a noticing and hashing the change)",
            ours.as_secs_f64(),
            fetched.as_deref().unwrap_or("DID NOT ARRIVE")
        );
        if let Some((took, received)) = daemon.as_ref().and_then(|d| rsync_update(d.port, &rs_dst))
        {
            println!(
                "    rsync daemon over loopback: {:.3} s, received {received} bytes (dirsync / rsync = {:.2}x)",
                took.as_secs_f64(),
                ours.as_secs_f64() / took.as_secs_f64()
            );
        }
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// An rsync daemon on loopback serving `src` as module `w`, killed when dropped.
struct RsyncDaemon {
    port: u16,
    child: std::process::Child,
}

impl RsyncDaemon {
    fn start(src: &Path, work: &Path) -> Option<RsyncDaemon> {
        if Command::new("rsync").arg("--version").output().is_err() {
            println!("  rsync: not installed (apt-get install rsync), skipped");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let conf = work.join(format!("rsyncd-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\n[w]\npath = {}\nread only = yes\n",
                src.display()
            ),
        )
        .ok()?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_millis(300)); // let it bind (outside timing)
        Some(RsyncDaemon { port, child })
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn latency(bench: &Bench) {
    println!("latency: a 4 KiB file written on a, until b has installed it (200 runs)");
    let (da, db) = (bench.dir("lat-a"), bench.dir("lat-b"));
    let a = node::start(bench.config("a", &da, &[])).await.expect("a");
    let b = node::start(bench.config("b", &db, &[&a])).await.expect("b");
    wait_connected(&a, &b).await;
    let mut events = b.events();
    let mut samples = Vec::new();
    for i in 0..200u32 {
        let path = format!("f{i}.bin");
        let body: Vec<u8> = (0..4096u32)
            .map(|j| (j.wrapping_mul(31) ^ i) as u8)
            .collect();
        let t = Instant::now();
        std::fs::write(da.join(&path), &body).expect("write");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Ok(e))
                    if e.event == EventKind::Received
                        && e.path.as_deref() == Some(path.as_str()) =>
                {
                    break
                }
                Ok(_) => continue,
                Err(_) => panic!("{path} did not arrive"),
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!("  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (targets: p50 <= 10 ms, p99 <= 50 ms; lsyncd delay=0 ~11 ms, Syncthing default 10 s)",
        pct(50).as_secs_f64() * 1e3, pct(90).as_secs_f64() * 1e3, pct(99).as_secs_f64() * 1e3);
    b.shutdown().await;
    a.shutdown().await;
}

/// One run of a workload: dirsync's time and CPU, and rsync's in the same round.
struct Round {
    ours: Duration,
    cpu: f64,
    rsync: Option<RsyncRun>,
}

/// Runs `what` from an empty peer, then `cp -a` and rsync of the same tree;
/// `round` names this run's directories, which are removed at the end (a round
/// of `large` takes 4 GiB while it runs).
async fn workload(bench: &Bench, what: &str, restart: bool, round: usize) -> Round {
    let (da, db) = (
        bench.dir(&format!("{what}-{round}-a")),
        bench.dir(&format!("{what}-{round}-b")),
    );
    gen(what, &da);
    reset_peak_rss();
    let rss_before = status_kib("VmRSS");
    let cpu = cpu_seconds();
    // Both nodes start at once, as two machines would; b is given a's address (a
    // port found free just before). a serves its index while it hashes its tree.
    let mut a_config = bench.config("a", &da, &[]);
    a_config.listen = free_local_addr();
    let mut b_config = bench.config("b", &db, &[]);
    b_config.peers = vec![a_config.listen.to_string()];
    let t = Instant::now();
    let (want_tx, want) = tokio::sync::watch::channel(None);
    let ((a, indexed), (b, ok)) = tokio::join!(
        async {
            let a = node::start(a_config).await.expect("a");
            let indexed = t.elapsed();
            want_tx.send_replace(Some(a.engine().totals().await.expect("totals")));
            (a, indexed)
        },
        async {
            // Listened to at once: b starts fetching while a is still starting.
            let b = node::start(b_config.clone()).await.expect("b");
            let events = b.events();
            let ok = wait_caught_up(&b, events, want, Duration::from_secs(600), t).await;
            (b, ok)
        }
    );
    let cpu = cpu_seconds() - cpu;
    let ours = ok.unwrap_or_else(|| t.elapsed());
    let ok = ok.is_some();
    println!(
        "  (a's start-up scan ended at {:.3} s; b caught up {:.3} s later)",
        indexed.as_secs_f64(),
        ours.saturating_sub(indexed).as_secs_f64()
    );
    let (rss_peak, rss_after) = (status_kib("VmHWM"), status_kib("VmRSS"));

    let (files, bytes) = a.engine().totals().await.expect("totals");
    println!(
        "{what}: {files} files, {:.1} MB, from an empty peer",
        bytes as f64 / 1e6
    );
    if let (Some(before), Some(peak), Some(after)) = (rss_before, rss_peak, rss_after) {
        let per_file = |kib: u64| kib.saturating_sub(before) as f64 * 1024.0 / files.max(1) as f64;
        println!(
            "  memory of both nodes (above the process's {:.1} MB before they started): peak {:.1} MB, {:.0} bytes per file; once in sync {:.1} MB, {:.0} bytes per file",
            before as f64 / 1024.0,
            peak.saturating_sub(before) as f64 / 1024.0,
            per_file(peak),
            after.saturating_sub(before) as f64 / 1024.0,
            per_file(after),
        );
    }
    println!(
        "  dirsync (start both nodes, hash, sync, fsync): {:.3} s, {cpu:.2} s of CPU for both nodes{}",
        ours.as_secs_f64(),
        if ok { "" } else { " (DID NOT FINISH)" }
    );
    let cp = time_cmd(
        Command::new("cp")
            .arg("-a")
            .arg(&da)
            .arg(bench.tmp.path().join(format!("{what}-{round}-cp"))),
    );
    let rs = rsync_time(
        &da,
        &bench.dir(&format!("{what}-{round}-rsync")),
        bench.tmp.path(),
    );
    if let Some(cp) = cp {
        println!(
            "  cp -a: {:.3} s (dirsync / cp = {:.2}x)",
            cp.as_secs_f64(),
            ours.as_secs_f64() / cp.as_secs_f64()
        );
    }
    if let Some(rs) = &rs {
        println!(
            "  rsync daemon over loopback: {:.3} s (dirsync / rsync = {:.2}x){}{}",
            rs.took.as_secs_f64(),
            ours.as_secs_f64() / rs.took.as_secs_f64(),
            rs.cpu
                .map(|c| format!(
                    ", {c:.2} s of CPU for its processes (dirsync / rsync = {:.2}x)",
                    cpu / c.max(0.01)
                ))
                .unwrap_or_default(),
            rs.rss_kib
                .map(|k| format!(
                    "; its receiving client's peak RSS {:.1} MB",
                    k as f64 / 1024.0
                ))
                .unwrap_or_default()
        );
    }
    if what == "many" {
        // What an idle node keeps: the engine forgets its own writes after 10-20 s.
        tokio::time::sleep(Duration::from_secs(25)).await;
        if let (Some(before), Some(idle)) = (rss_before, status_kib("VmRSS")) {
            println!(
                "  memory of both nodes 25 s after: {:.1} MB, {:.0} bytes per file",
                idle.saturating_sub(before) as f64 / 1024.0,
                idle.saturating_sub(before) as f64 * 1024.0 / files.max(1) as f64
            );
        }
    }
    if restart {
        b.shutdown().await;
        reset_peak_rss();
        let rss_before = status_kib("VmRSS");
        let t = Instant::now();
        let b = node::start(b_config).await.expect("b again");
        let rescan_peak = match (rss_before, status_kib("VmHWM")) {
            (Some(before), Some(peak)) => format!(
                "; memory at the rescan's peak: {:.1} MB above the process's size before it",
                peak.saturating_sub(before) as f64 / 1024.0
            ),
            _ => String::new(),
        };
        let started = t.elapsed();
        wait_connected(&a, &b).await;
        let connected = t.elapsed();
        // A probe proves the session is live again end to end.
        std::fs::write(da.join("probe.txt"), b"probe").expect("probe");
        while std::fs::read(db.join("probe.txt"))
            .map(|c| c != b"probe")
            .unwrap_or(true)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let target = if what == "small" {
            " (target 0.5 s; unison no-change ~0.15 s)"
        } else {
            ""
        };
        println!("  restart of b with {files} unchanged files: rescan {:.3} s, reconnected {:.3} s, a new file through {:.3} s{target}{rescan_peak}",
            started.as_secs_f64(), connected.as_secs_f64(), t.elapsed().as_secs_f64());
        b.shutdown().await;
    } else {
        b.shutdown().await;
    }
    a.shutdown().await;
    for dir in ["a", "b", "cp", "rsync"] {
        let _ = std::fs::remove_dir_all(bench.tmp.path().join(format!("{what}-{round}-{dir}")));
    }
    Round {
        ours,
        cpu,
        rsync: rs,
    }
}

/// `rounds` runs of `what`, each next to an rsync run, and what they add up to:
/// on a shared machine one round says little, and rsync's time drifts with
/// dirsync's over the day, so the ratio is taken per round.
async fn workload_rounds(bench: &Bench, what: &str, restart: bool, rounds: usize) {
    let mut all = Vec::new();
    for round in 0..rounds {
        if rounds > 1 {
            println!("{what}, round {} of {rounds}:", round + 1);
        }
        all.push(workload(bench, what, restart && round == 0, round).await);
    }
    if rounds < 2 {
        return;
    }
    let spread = |mut v: Vec<f64>| -> String {
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) => format!("median {:.3} ({lo:.3}-{hi:.3})", median(&v)),
            _ => "none".to_string(),
        }
    };
    println!(
        "{what} over {rounds} rounds: dirsync {} s, {} s of CPU",
        spread(all.iter().map(|r| r.ours.as_secs_f64()).collect()),
        spread(all.iter().map(|r| r.cpu).collect())
    );
    let pairs: Vec<(f64, &RsyncRun)> = all
        .iter()
        .filter_map(|r| r.rsync.as_ref().map(|rs| (r.ours.as_secs_f64(), rs)))
        .collect();
    if pairs.is_empty() {
        println!("  (no rsync runs to compare with)");
        return;
    }
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(ours, rs)| ours / rs.took.as_secs_f64())
        .collect();
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
    let met = ratios.iter().filter(|r| **r <= 1.0).count();
    ratios.sort_by(f64::total_cmp);
    println!(
        "  rsync {} s; dirsync / rsync per round {}: median {:.2}x, no slower in {met} of {}",
        spread(pairs.iter().map(|(_, rs)| rs.took.as_secs_f64()).collect()),
        listed.join(" "),
        median(&ratios),
        ratios.len()
    );
    let cpu_ratios: Vec<f64> = all
        .iter()
        .filter_map(|r| r.rsync.as_ref()?.cpu.map(|c| r.cpu / c.max(0.01)))
        .collect();
    if !cpu_ratios.is_empty() {
        let mut sorted = cpu_ratios;
        sorted.sort_by(f64::total_cmp);
        println!(
            "  CPU, dirsync / rsync: median {:.2}x ({:.2}x-{:.2}x)",
            median(&sorted),
            sorted[0],
            sorted[sorted.len() - 1]
        );
    }
}

/// The median of sorted, non-empty `v`.
fn median(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Cutting one 256 MiB file into blocks, as both sides of a delta do: dirsync's
/// cutter against FastCDC's own streaming chunker (same cut points, checked),
/// each hashing its blocks, interleaved over a few rounds; CPU time of this
/// thread, which is steadier than wall time on a shared machine.
fn cut(bench: &Bench) {
    use dirsync::engine::delta;
    let size: u64 = 256 << 20;
    let path = bench.dir("cut").join("file.bin");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, &bytes).expect("cut file");
    drop(bytes);
    let avg = delta::avg_for(size).expect("an average") as usize;
    let thread_cpu = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let f = std::fs::File::open(&path).expect("open");
        let t = thread_cpu();
        let a = delta::cut(&f, size, avg as u32).expect("cut");
        ours.push(thread_cpu() - t);
        let f = std::fs::File::open(&path).expect("open");
        let t = thread_cpu();
        let b: Vec<(u64, dirsync::wire::Block)> =
            fastcdc::v2020::StreamCDC::new(f, avg / 4, avg, avg * 4)
                .map(|c| {
                    let c = c.expect("chunk");
                    let hash = dirsync::hash::ContentHash::of(&c.data);
                    let block = dirsync::wire::Block {
                        len: c.length as u32,
                        hash,
                    };
                    (c.offset, block)
                })
                .collect();
        theirs.push(thread_cpu() - t);
        assert_eq!(a, b, "the same blocks");
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
    let mbps = |s: f64| size as f64 / 1e6 / s;
    println!(
        "cut: 256 MiB into {} KiB blocks (best of 3, CPU): dirsync {:.3} s ({:.0} MB/s); FastCDC's StreamCDC {:.3} s ({:.0} MB/s); dirsync / StreamCDC = {:.2}x",
        avg >> 10,
        best(&ours),
        mbps(best(&ours)),
        best(&theirs),
        mbps(best(&theirs)),
        best(&ours) / best(&theirs)
    );
}

fn main() {
    // As the binaries do, before the runtime starts its threads.
    dirsync::memory::limit_arenas();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    if let Ok(filter) = std::env::var("DIRSYNC_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    // DIRSYNC_BENCH_ROUNDS=N runs `small` and `large` N times, each round next
    // to an rsync run, and prints medians and the ratio per round.
    let rounds = std::env::var("DIRSYNC_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let bench = Bench::new();
    rt.block_on(async {
        if want("latency") {
            latency(&bench).await;
        }
        if want("small") || want("restart") {
            workload_rounds(&bench, "small", want("restart"), rounds).await;
        }
        if want("large") {
            workload_rounds(&bench, "large", false, rounds).await;
        }
        if want("delta") {
            delta(&bench).await;
        }
        if want("cut") {
            cut(&bench);
        }
        // Long (100,000 files are generated first): only when asked for.
        if args.iter().any(|a| a == "scale") {
            workload(&bench, "many", true, 0).await;
        }
    });
}
