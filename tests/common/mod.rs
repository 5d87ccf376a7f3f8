//! Test harness: certificates in a temp dir, real nodes on 127.0.0.1:0, a client,
//! waiting on conditions with deadlines, and a UDP relay that can cut a link.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirsync::certs::{self, CertRequest};
use dirsync::client::Client;
use dirsync::node::{self, NodeConfig, NodeHandle};

pub const LOOPBACK: &str = "127.0.0.1:0";

/// A temp directory with certificates for nodes a, b, c and client cli.
pub struct TestEnv {
    pub tmp: tempfile::TempDir,
    pub certs: PathBuf,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        // RUST_LOG=dirsync=debug shows what the nodes do (captured per test).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let tmp = tempfile::tempdir().expect("temp dir");
        let certs = tmp.path().join("certs");
        let mut req = CertRequest::defaults(&certs);
        req.nodes.push("c".into());
        req.clients.push("bob".into());
        certs::generate(&req).expect("certificates");
        TestEnv { tmp, certs }
    }

    /// The synced directory of node `name` (created).
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join("nodes").join(name);
        std::fs::create_dir_all(&d).expect("node dir");
        d
    }

    /// A configuration with short timeouts, listening on an ephemeral loopback port.
    pub fn config(&self, name: &str, peers: &[SocketAddr]) -> NodeConfig {
        let mut c = NodeConfig::new(
            name,
            self.dir(name),
            LOOPBACK.parse().unwrap(),
            self.certs.clone(),
        );
        c.peers = peers.iter().map(|p| p.to_string()).collect();
        c.peer_timeout = Duration::from_secs(2);
        c.max_backoff = Duration::from_millis(400);
        c
    }

    pub async fn start(&self, name: &str, peers: &[SocketAddr]) -> NodeHandle {
        node::start(self.config(name, peers))
            .await
            .expect("node starts")
    }

    /// Nodes `a` and `b` (b dials a), once both see the session.
    pub async fn pair(&self) -> (NodeHandle, NodeHandle) {
        let a = self.start("a", &[]).await;
        let b = self.start("b", &[a.local_addr()]).await;
        wait_connected(&[&a, &b]).await;
        (a, b)
    }

    /// Nodes `a` and `b`, b dialing a through a [`Relay`] that can cut the link,
    /// once both see the session.
    pub async fn pair_via_relay(&self) -> (NodeHandle, Relay, NodeHandle) {
        let a = self.start("a", &[]).await;
        let relay = Relay::start(a.local_addr()).await;
        let b = self.start("b", &[relay.addr]).await;
        wait_connected(&[&a, &b]).await;
        (a, relay, b)
    }

    /// A node that serves and lists but never applies peers' changes, so that
    /// listings of diverging trees stay as they are.
    pub async fn start_send_only(&self, name: &str, peers: &[SocketAddr]) -> NodeHandle {
        let mut c = self.config(name, peers);
        c.send_only = true;
        node::start(c).await.expect("node starts")
    }

    pub async fn client(&self, node: &NodeHandle) -> Client {
        self.client_as(node, "cli").await
    }

    /// A client with certificate `name` (`cli`, `bob`, or the admin `admin`).
    pub async fn client_as(&self, node: &NodeHandle, name: &str) -> Client {
        Client::connect(&node.local_addr().to_string(), &self.certs, name)
            .await
            .expect("client connects")
    }
}

/// Polls `cond` every 10 ms until it holds, or panics after `limit` naming `what`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every node in `nodes` has a session with every other.
pub async fn wait_connected(nodes: &[&NodeHandle]) {
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    for n in nodes {
        let want: Vec<String> = names.iter().filter(|m| *m != n.name()).cloned().collect();
        wait_until(
            &format!("{} connected to {want:?}", n.name()),
            Duration::from_secs(10),
            || {
                let have = n.connected_peers();
                want.iter().all(|w| have.contains(w))
            },
        )
        .await;
    }
}

/// Writes `content` at `rel` under `root`, creating parents.
pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// A free UDP port on loopback (bound then released; a small race is accepted).
pub fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind(LOOPBACK).unwrap();
    s.local_addr().unwrap()
}

/// A user-space UDP relay between one client and `target`, that can drop all
/// packets (a partition) while `cut` is set, and police what `target` sends to a
/// rate (a slow link: what goes over it is dropped, as a policer does).
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bytes per second from `target` to the client; 0: unlimited.
    rate: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let rate = Arc::new(AtomicU64::new(0));
        let (c, limit) = (cut.clone(), rate.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            // A token bucket of at most 16 KiB, filled at `rate`.
            let (mut tokens, mut filled) = (0f64, Instant::now());
            let mut within_rate = |n: usize| {
                let rate = limit.load(Ordering::SeqCst) as f64;
                if rate == 0.0 {
                    return true;
                }
                let now = Instant::now();
                tokens = (tokens + rate * (now - filled).as_secs_f64()).min(16384.0);
                filled = now;
                let fits = tokens >= n as f64;
                if fits {
                    tokens -= n as f64;
                }
                fits
            };
            let (mut b1, mut b2) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    r = front.recv_from(&mut b1) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        if !c.load(Ordering::SeqCst) { let _ = back.send(&b1[..n]).await; }
                    }
                    r = back.recv(&mut b2) => {
                        let Ok(n) = r else { continue };
                        if let (Some(to), false) = (client, c.load(Ordering::SeqCst)) {
                            if !within_rate(n) {
                                continue;
                            }
                            let _ = front.send_to(&b2[..n], to).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            cut,
            rate,
            task,
        }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    /// Polices what the target sends to `bytes_per_second` (`None`: no limit).
    pub fn set_rate_from_target(&self, bytes_per_second: Option<u64>) {
        self.rate
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A snapshot of a synced tree: path -> what is there (content, link target, dir),
/// without dirsync's own state and temp files.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in read.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (rel.is_empty() && name == ".dirsync") || name.starts_with(".dirsync-tmp-") {
                continue;
            }
            let p = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.file_type().is_symlink() {
                out.insert(
                    p,
                    format!("-> {}", std::fs::read_link(e.path()).unwrap().display()),
                );
            } else if m.is_dir() {
                out.insert(p.clone(), "dir".into());
                stack.push((e.path(), p));
            } else {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                out.insert(
                    p,
                    format!("{} bytes {}", bytes.len(), blake3::hash(&bytes).to_hex()),
                );
            }
        }
    }
    out
}

/// Waits until every directory in `dirs` holds the same tree.
pub async fn wait_same_trees(dirs: &[&Path], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let started = Instant::now();
        let trees: Vec<_> = dirs.iter().map(|d| tree(d)).collect();
        // Comparing big trees costs: poll no more than a third of the time.
        let pause = (started.elapsed() * 2).max(Duration::from_millis(20));
        if trees.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        if Instant::now() > deadline {
            let mut diff = String::new();
            for (k, v) in &trees[0] {
                for (i, t) in trees.iter().enumerate().skip(1) {
                    if t.get(k) != Some(v) {
                        diff.push_str(&format!("{k}: {v} vs node {i}: {:?}\n", t.get(k)));
                    }
                }
            }
            for (i, t) in trees.iter().enumerate().skip(1) {
                for (k, v) in t {
                    if !trees[0].contains_key(k) {
                        diff.push_str(&format!("{k}: only on node {i}: {v}\n"));
                    }
                }
            }
            panic!("trees still differ after {limit:?}:\n{diff}");
        }
        tokio::time::sleep(pause).await;
    }
}

/// Number of regular files under `root` (metadata only, no content read).
pub fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in read.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t)
                    if t.is_file()
                        && !e.file_name().to_string_lossy().starts_with(".dirsync-tmp-") =>
                {
                    n += 1
                }
                _ => {}
            }
        }
    }
    n
}

/// Sets the modification time of the file `root/rel`.
pub fn set_mtime(root: &Path, rel: &str, when: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(root.join(rel))
        .expect("file to stamp")
        .set_modified(when)
        .expect("mtime set");
}

/// Waits until `root/rel` exists with exactly `content`.
pub async fn wait_content(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    wait_until(
        &format!("{} to hold {} bytes", p.display(), content.len()),
        Duration::from_secs(20),
        || std::fs::read(&p).map(|b| b == content).unwrap_or(false),
    )
    .await;
}

/// Waits until `root/rel` does not exist (not even as a dangling link).
pub async fn wait_gone(root: &Path, rel: &str) {
    let p = root.join(rel);
    wait_until(
        &format!("{} to disappear", p.display()),
        Duration::from_secs(20),
        || p.symlink_metadata().is_err(),
    )
    .await;
}

/// Collects events of one node in the background.
pub struct EventLog {
    pub events: Arc<std::sync::Mutex<Vec<dirsync::events::Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    pub fn of(node: &NodeHandle) -> EventLog {
        let mut rx = node.events();
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Ok(e) = rx.recv().await {
                sink.lock().unwrap().push(e);
            }
        });
        EventLog { events, task }
    }

    pub fn kinds_for(&self, path: &str) -> Vec<dirsync::events::EventKind> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.path.as_deref() == Some(path))
            .map(|e| e.event)
            .collect()
    }

    /// Waits until an event for `path` satisfies `pred` (events are emitted after
    /// the index commit, a moment after the file is on disk).
    pub async fn wait_for(&self, path: &str, pred: impl Fn(&dirsync::events::Event) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events.lock().unwrap().clone();
            if events
                .iter()
                .any(|e| e.path.as_deref() == Some(path) && pred(e))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no matching event for {path} within 20 s; its events: {:#?}",
                events
                    .iter()
                    .filter(|e| e.path.as_deref() == Some(path))
                    .map(|e| e.human())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn all(&self) -> Vec<dirsync::events::Event> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `n` deterministic, non-repeating bytes (xorshift), for large test files.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
