//! Options of `dirsync-node`: one struct for flags and environment variables,
//! turned into a [`NodeConfig`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::duration::parse_duration;
use crate::node::NodeConfig;

/// Keep a directory identical to the same directory on peer nodes, over QUIC.
#[derive(Parser, Debug, Clone)]
#[command(name = "dirsync-node", version, about)]
pub struct NodeArgs {
    /// The directory to sync.
    #[arg(long, env = "DIRSYNC_DIR", default_value = ".")]
    pub dir: PathBuf,
    /// UDP address to listen on; `:PORT` means all interfaces.
    #[arg(long, env = "DIRSYNC_LISTEN", default_value = ":4433")]
    pub listen: String,
    /// A peer node to dial, HOST:PORT; repeat for several (env: comma-separated).
    #[arg(long = "peer", env = "DIRSYNC_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Directory with ca.pem, NAME.pem and NAME.key (`just certs` makes it).
    #[arg(long, env = "DIRSYNC_CERTS", default_value = "certs")]
    pub certs: PathBuf,
    /// This node's name (its certificate's name); defaults to the host name.
    #[arg(long, env = "DIRSYNC_NAME")]
    pub name: Option<String>,
    /// State directory, never synced; defaults to DIR/.dirsync.
    #[arg(long, env = "DIRSYNC_STATE")]
    pub state: Option<PathBuf>,
    /// How long a peer may take to answer a listing made for a client.
    #[arg(long, env = "DIRSYNC_PEER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub peer_timeout: Duration,
    /// Longest delay between two attempts to reach a peer that is down.
    #[arg(long, env = "DIRSYNC_MAX_BACKOFF", default_value = "10s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// Full rescan period, a safety net behind the inotify watcher.
    #[arg(long, env = "DIRSYNC_RESCAN_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub rescan_interval: Duration,
    /// Do not watch with inotify; find changes by periodic rescans only.
    #[arg(long, env = "DIRSYNC_NO_WATCH")]
    pub no_watch: bool,
    /// Serve and list this directory, but never apply peers' changes to it.
    #[arg(long, env = "DIRSYNC_SEND_ONLY")]
    pub send_only: bool,
    /// Log filter, e.g. `info` or `dirsync=debug` (default: $RUST_LOG, else info).
    #[arg(long, env = "DIRSYNC_LOG")]
    pub log: Option<String>,
}

/// Bad option values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?}: {1}")]
    Listen(String, String),
    #[error("cannot tell this host's name for --name: {0}; pass --name")]
    HostName(String),
}

/// Parses `:PORT` (all interfaces), `IP:PORT` or `HOST:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    let err = |why: &str| ConfigError::Listen(s.to_string(), why.to_string());
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| err("expected :PORT, HOST:PORT or IP:PORT"))?;
        return Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
    }
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| err(&e.to_string()))?
        .next()
        .ok_or_else(|| err("resolves to no address"))
}

impl NodeArgs {
    /// The node configuration these options describe.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let name = match self.name {
            Some(n) => n,
            None => gethostname::gethostname()
                .into_string()
                .map_err(|h| ConfigError::HostName(format!("{h:?} is not UTF-8")))?,
        };
        let listen = parse_listen(&self.listen)?;
        let mut config = NodeConfig::new(&name, self.dir, listen, self.certs);
        if let Some(state) = self.state {
            config.state_dir = state;
        }
        config.peers = self
            .peers
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .collect();
        config.peer_timeout = self.peer_timeout;
        config.max_backoff = self.max_backoff;
        config.rescan_interval = self.rescan_interval;
        config.watch = !self.no_watch;
        config.send_only = self.send_only;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen(":4433").unwrap().port(), 4433);
        assert!(parse_listen(":4433").unwrap().ip().is_unspecified());
        assert_eq!(
            parse_listen("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert!(parse_listen(":x").is_err());
    }

    #[test]
    fn flags_and_defaults() {
        let args = NodeArgs::parse_from([
            "dirsync-node",
            "--peer",
            "b:4434",
            "--peer",
            "c:4435",
            "--name",
            "a",
        ]);
        let c = args.into_config().unwrap();
        assert_eq!(c.peers, ["b:4434", "c:4435"]);
        assert_eq!(c.state_dir, PathBuf::from("./.dirsync"));
        assert_eq!(c.listen.port(), 4433);
    }
}
