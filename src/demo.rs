//! The local two-node demo behind `dirsync-cli demo`: certificates, two folders
//! with different sample files (one edited differently on each side, a conflict),
//! nodes `a` and `b` on loopback syncing them, and a client of `a` listing the result.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::certs::{self, CertRequest};
use crate::client::{Client, ClientError};
use crate::events::Event;
use crate::listing::Listing;
use crate::node::{self, NodeConfig, NodeError, NodeHandle};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("starting a demo node: {0}")]
    Node(#[from] NodeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("nodes a and b did not connect within {0:?}")]
    NotConnected(Duration),
}

/// Files of the demo: (node, path, content). Some are on one node only, one is on
/// both and identical, one is on both with different content.
const SAMPLES: &[(&str, &str, &str)] = &[
    (
        "a",
        "README.md",
        "# Shared notes\nThe same on both nodes.\n",
    ),
    (
        "b",
        "README.md",
        "# Shared notes\nThe same on both nodes.\n",
    ),
    ("a", "docs/plan.txt", "Plan, as edited on a.\n"),
    (
        "b",
        "docs/plan.txt",
        "Plan, as edited on b: different content.\n",
    ),
    (
        "a",
        "photos/été 2026/plage.txt",
        "a file with unicode and spaces in its path\n",
    ),
    ("a", "only on a.txt", "only a has this one\n"),
    ("b", "notes/todo list.md", "- try `dirsync-cli ls --json`\n"),
];

/// A running demo.
pub struct Demo {
    pub base: PathBuf,
    pub certs: PathBuf,
    pub nodes: Vec<NodeHandle>,
    /// Each node's events since it started.
    events: Vec<tokio::sync::broadcast::Receiver<Event>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Demo {
    /// Prepares `base` (certificates in `base/certs`, folders `base/a` and `base/b`)
    /// and starts both nodes on loopback, waiting until they are connected.
    pub async fn start(base: &Path) -> Result<Demo, DemoError> {
        let certs_dir = base.join("certs");
        certs::generate(&CertRequest::defaults(&certs_dir))?;
        for (node, path, content) in SAMPLES {
            let file = base.join(node).join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::fs::write(&file, content).map_err(io_err(&file))?;
        }
        let loopback = "127.0.0.1:0".parse().expect("valid literal");
        let a = node::start(NodeConfig::new(
            "a",
            base.join("a"),
            loopback,
            certs_dir.clone(),
        ))
        .await?;
        let a_events = a.events();
        let mut b_config = NodeConfig::new("b", base.join("b"), loopback, certs_dir.clone());
        b_config.peers = vec![a.local_addr().to_string()];
        let b = node::start(b_config).await?;
        let events = vec![a_events, b.events()];
        let demo = Demo {
            base: base.to_path_buf(),
            certs: certs_dir,
            nodes: vec![a, b],
            events,
        };
        let limit = Duration::from_secs(10);
        let deadline = Instant::now() + limit;
        while demo.nodes.iter().any(|n| n.connected_peers().is_empty()) {
            if Instant::now() > deadline {
                return Err(DemoError::NotConnected(limit));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(demo)
    }

    /// Calls `on_event` for everything either node has done since it started.
    pub fn forward_events(
        &mut self,
        on_event: impl Fn(Event) + Send + Sync + 'static,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let on_event = std::sync::Arc::new(on_event);
        std::mem::take(&mut self.events)
            .into_iter()
            .map(|mut rx| {
                let f = on_event.clone();
                tokio::spawn(async move {
                    while let Ok(e) = rx.recv().await {
                        f(e);
                    }
                })
            })
            .collect()
    }

    /// Waits until both nodes hold the same files with the same content; returns the
    /// merged listing then.
    pub async fn converged(&self, limit: Duration) -> Result<Listing, DemoError> {
        let deadline = Instant::now() + limit;
        loop {
            let listing = self.listing().await?;
            let done = listing
                .entries
                .iter()
                .all(|e| e.copies.len() == self.nodes.len() && e.in_sync());
            if done || Instant::now() > deadline {
                return Ok(listing);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of node `a`, which the demo's client talks to.
    pub fn server(&self) -> String {
        self.nodes[0].local_addr().to_string()
    }

    /// The merged listing, asked of node `a` as client `cli`.
    pub async fn listing(&self) -> Result<Listing, DemoError> {
        let client = Client::connect(&self.server(), &self.certs, "cli").await?;
        let listing = client.list().await?;
        client.close().await;
        Ok(listing)
    }

    /// Stops both nodes, the dialing one first so that nobody redials a stopped node.
    pub async fn shutdown(self) {
        for n in self.nodes.into_iter().rev() {
            n.shutdown().await;
        }
    }
}
