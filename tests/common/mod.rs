//! Test harness: certificates in a temp dir, real nodes on 127.0.0.1:0, a client,
//! waiting on conditions with deadlines, and a UDP relay that can cut a link.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
        let tmp = tempfile::tempdir().expect("temp dir");
        let certs = tmp.path().join("certs");
        let mut req = CertRequest::defaults(&certs);
        req.nodes.push("c".into());
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

    pub async fn client(&self, node: &NodeHandle) -> Client {
        Client::connect(&node.local_addr().to_string(), &self.certs, "cli")
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
/// packets (a partition) while `cut` is set.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind(LOOPBACK).await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
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
                            let _ = front.send_to(&b2[..n], to).await;
                        }
                    }
                }
            }
        });
        Relay { addr, cut, task }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
