//! A running `dirsync-node`: one QUIC endpoint that both accepts and dials.
//!
//! - [`start`] binds the endpoint and spawns the accept loop and one dialer per
//!   configured peer; it returns a [`NodeHandle`] that owns every task.
//! - [`peers`]: dialing with capped exponential backoff, the hello exchange, and the
//!   session table that keeps exactly one connection per peer.
//! - [`serve`]: requests arriving on streams, checked against the caller's role.

mod local;
mod peers;
mod serve;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::engine::Engine;
use crate::events::Event;
use crate::tls::{self, Credentials, Role, TlsError};

/// Everything a node needs to run. See `dirsync-node --help` for the flags.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's name: its certificate is `certs_dir/NAME.pem`.
    pub name: String,
    /// The synced directory.
    pub dir: PathBuf,
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// Peers to dial, as `HOST:PORT`.
    pub peers: Vec<String>,
    pub certs_dir: PathBuf,
    /// Node state; never synced or listed. Usually `dir/.dirsync`.
    pub state_dir: PathBuf,
    /// How long a peer may take to answer a request made on a client's behalf.
    pub peer_timeout: Duration,
    /// Upper bound of the delay between two attempts to reach a peer.
    pub max_backoff: Duration,
    /// Watch the tree with inotify (otherwise only periodic rescans find changes).
    pub watch: bool,
    /// A full rescan runs this often, as a safety net behind the watcher.
    pub rescan_interval: Duration,
    /// Serve and list, but never apply peers' changes here.
    pub send_only: bool,
}

impl NodeConfig {
    /// Defaults for a node named `name` over `dir`: listen on `listen`, state in
    /// `dir/.dirsync`, certificates in `certs_dir`, no peers.
    pub fn new(name: &str, dir: PathBuf, listen: SocketAddr, certs_dir: PathBuf) -> Self {
        NodeConfig {
            name: name.to_string(),
            state_dir: dir.join(".dirsync"),
            dir,
            listen,
            peers: Vec::new(),
            certs_dir,
            peer_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(10),
            watch: true,
            rescan_interval: Duration::from_secs(300),
            send_only: false,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("synced directory {0} does not exist or is not a directory")]
    NoDir(PathBuf),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "{0} is a {1} certificate; a node needs a node certificate (dirsync-cli certs --node NAME)"
    )]
    WrongRole(String, Role),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// QUIC application close codes used by nodes.
pub mod close_code {
    /// Orderly shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer speaks another protocol version.
    pub const VERSION_MISMATCH: u32 = 1;
    /// The peer's certificate may not do what it asked.
    pub const FORBIDDEN: u32 = 2;
    /// Another connection with the same peer is kept instead.
    pub const DUPLICATE: u32 = 3;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 4;
}

/// State shared by all of a node's tasks.
pub(crate) struct Shared {
    config: NodeConfig,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    sessions: Mutex<HashMap<String, peers::Session>>,
    /// Per configured peer address: its state, for warnings in listings.
    peer_status: Mutex<BTreeMap<String, peers::PeerStatus>>,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
    /// True once the start-up scan has versioned what changed while the node was
    /// down: nothing is taken from a peer before that.
    scanned: watch::Sender<bool>,
}

impl Shared {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// Resolves when the node is shutting down.
    async fn cancelled(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// A running node. Dropping it aborts its tasks; [`NodeHandle::shutdown`] stops it
/// gracefully.
pub struct NodeHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    local_addr: SocketAddr,
}

impl NodeHandle {
    /// The UDP address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The node's sync engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// Everything the node does from now on (transfers, deletions, conflicts...).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.shared.engine.events()
    }

    /// Names of peers with a live session, sorted.
    pub fn connected_peers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .shared
            .live_sessions()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        names
    }

    /// Number of live peer sessions (one per connected peer).
    pub fn session_count(&self) -> usize {
        self.shared.live_sessions().len()
    }

    /// Stops accepting, closes every connection with a reason, and waits for tasks.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.shared
            .endpoint
            .close(close_code::SHUTDOWN.into(), b"node shutting down");
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(3), drain)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
        // The endpoint's driver task releases the socket once the last handle is
        // gone; wait (bounded) until it has, so a restart can bind the same port.
        let addr = self.local_addr;
        drop(self);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while std::net::UdpSocket::bind(addr).is_err() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Binds the endpoint and starts serving and dialing.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    if !config.dir.is_dir() {
        return Err(NodeError::NoDir(config.dir.clone()));
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|source| NodeError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let creds = Credentials::load(&config.certs_dir, &config.name)?;
    if creds.identity.role != Role::Node {
        return Err(NodeError::WrongRole(
            config
                .certs_dir
                .join(format!("{}.pem", config.name))
                .display()
                .to_string(),
            creds.identity.role,
        ));
    }
    let server_config = tls::server_config(&creds)?;
    let client_config = tls::client_config(&creds)?;
    let endpoint = bind(server_config, config.listen)?;
    let local_addr = endpoint.local_addr().map_err(|source| NodeError::Bind {
        addr: config.listen,
        source,
    })?;
    let engine = Engine::open(&config.name, &config.dir, &config.state_dir)?;
    let watching = local::start_watching(
        &config.name,
        &config.dir,
        config.watch,
        engine.deferred.clone(),
    );
    let (stop, shutdown) = watch::channel(false);
    let shared = Arc::new(Shared {
        endpoint,
        client_config,
        sessions: Mutex::default(),
        peer_status: Mutex::new(
            config
                .peers
                .iter()
                .map(|p| (p.clone(), peers::PeerStatus::Connecting))
                .collect(),
        ),
        engine,
        shutdown,
        scanned: watch::Sender::new(false),
        config,
    });
    let span = tracing::info_span!("node", name = %shared.name());
    // Dropped on an early return: the accept loop is aborted with it.
    let mut tasks = JoinSet::new();
    // Peers and clients are served during the start-up scan (a new tree's index
    // grows part by part as it is hashed), but what changed while the node was
    // down is versioned before anything is taken from a peer (`scanned`), and
    // before this node dials anyone.
    tasks.spawn(serve::accept_loop(shared.clone()).instrument(span.clone()));
    let changed = shared.engine.scan(None).await?;
    if changed > 0 {
        tracing::info!("{}: {changed} changes since the last run", shared.name());
    }
    shared.scanned.send_replace(true);
    tasks.spawn(local::watch_loop(shared.clone(), watching).instrument(span.clone()));
    tasks.spawn(local::lock_loop(shared.clone()).instrument(span.clone()));
    for peer in shared.config.peers.clone() {
        tasks.spawn(peers::dial_loop(shared.clone(), peer).instrument(span.clone()));
    }
    tracing::info!(parent: &span, "listening on {local_addr}, syncing {}", shared.config.dir.display());
    Ok(NodeHandle {
        shared,
        stop,
        tasks,
        local_addr,
    })
}

/// Socket buffer size asked for (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max`).
const SOCKET_BUFFER: usize = 8 << 20;

/// The default UDP receive buffer (~200 KiB) overflows while a burst of 32
/// transfers arrives faster than the receiver drains it, even on loopback: every
/// lost datagram is a congestion event that halves the sending rate, and losses of
/// large datagrams make MTU discovery fall back to 1200 bytes for a minute.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let recv = rustix::net::sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER);
    let send = rustix::net::sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER);
    if let Err(e) = recv.and(send) {
        tracing::debug!("UDP socket buffers left at their defaults: {e}");
    }
}

/// Binds a UDP endpoint. An unspecified IPv6 address (`:PORT`) falls back to IPv4
/// on hosts without IPv6.
fn bind(
    server_config: quinn::ServerConfig,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, NodeError> {
    let server = |addr: SocketAddr| {
        let socket = std::net::UdpSocket::bind(addr)?;
        enlarge_buffers(&socket);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
        quinn::Endpoint::new(
            crate::tls::endpoint_config(),
            Some(server_config.clone()),
            socket,
            runtime,
        )
    };
    match server(addr) {
        Ok(ep) => Ok(ep),
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            server(v4).map_err(|_| NodeError::Bind { addr, source: e })
        }
        Err(source) => Err(NodeError::Bind { addr, source }),
    }
}
