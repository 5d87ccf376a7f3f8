//! What a node does, as events: printed as one human line each on the node's
//! stderr, and streamed to `dirsync-cli watch` (JSON lines).

use serde::{Deserialize, Serialize};

use crate::listing::human_size;

/// The kind of an [`Event`]. Variant order is part of the wire format: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A file's content arrived from a peer and was installed.
    Received,
    /// A file was made from a local file with the same content (no transfer).
    CopiedLocally,
    /// A file was moved locally because a peer renamed it (no transfer).
    Renamed,
    Deleted,
    MadeDir,
    MadeLink,
    /// Concurrent edits: one version kept, the other saved as a conflict copy.
    Conflict,
    /// Local changes were indexed and announced to peers.
    LocalChanges,
    PeerConnected,
    PeerDisconnected,
    /// A peer sent something that was refused (an invalid path...).
    Refused,
    /// A step failed and will be retried.
    Failed,
    /// A remote version of a locked file was staged instead of applied.
    Staged,
    /// A client locked a path (`peer` is the client's name).
    Locked,
    /// A lock was released (by its owner, an admin, or its TTL).
    Unlocked,
    /// A staged version was applied after an unlock (in queue order).
    StagedApplied,
}

/// One thing a node did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    pub event: EventKind,
    pub path: Option<String>,
    pub peer: Option<String>,
    pub bytes: Option<u64>,
    pub millis: Option<u64>,
    /// Free text: the conflict copy's name, a rename's source, an error...
    pub detail: Option<String>,
}

impl Event {
    pub fn new(node: &str, event: EventKind) -> Event {
        Event {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            node: node.to_string(),
            event,
            path: None,
            peer: None,
            bytes: None,
            millis: None,
            detail: None,
        }
    }
    pub fn path(mut self, p: impl Into<String>) -> Self {
        self.path = Some(p.into());
        self
    }
    pub fn peer(mut self, p: impl Into<String>) -> Self {
        self.peer = Some(p.into());
        self
    }
    pub fn bytes(mut self, b: u64) -> Self {
        self.bytes = Some(b);
        self
    }
    pub fn millis(mut self, m: u64) -> Self {
        self.millis = Some(m);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    /// The line printed on the node's stderr, e.g.
    /// `a: <- docs/report.pdf from b (1.2 MiB, 38 ms)`.
    pub fn human(&self) -> String {
        let node = &self.node;
        let path = self.path.as_deref().unwrap_or("");
        let peer = self.peer.as_deref().unwrap_or("?");
        let detail = self.detail.as_deref().unwrap_or("");
        match self.event {
            EventKind::Received => format!(
                "{node}: <- {path} from {peer} ({}, {} ms{}{detail})",
                human_size(self.bytes.unwrap_or(0)),
                self.millis.unwrap_or(0),
                if detail.is_empty() { "" } else { ", " }
            ),
            EventKind::CopiedLocally => {
                format!("{node}: <- {path} copied locally from {detail} (for {peer}; no transfer)")
            }
            EventKind::Renamed => {
                format!("{node}: renamed {detail} -> {path} (from {peer}; no transfer)")
            }
            EventKind::Deleted => format!("{node}: deleted {path} (from {peer})"),
            EventKind::MadeDir => format!("{node}: mkdir {path} (from {peer})"),
            EventKind::MadeLink => format!("{node}: link {path} -> {detail} (from {peer})"),
            EventKind::Conflict => format!("{node}: conflict {path} -> {detail}"),
            EventKind::LocalChanges => format!("{node}: {detail}"),
            EventKind::PeerConnected => format!("{node}: peer {peer} connected"),
            EventKind::PeerDisconnected => format!("{node}: peer {peer} disconnected ({detail})"),
            EventKind::Refused => format!("{node}: refused {path} from {peer}: {detail}"),
            EventKind::Failed => {
                format!("{node}: failed {path} from {peer}: {detail} (will retry)")
            }
            EventKind::Staged => format!("{node}: staged {path} from {peer} ({detail})"),
            EventKind::Locked => format!("{node}: locked {path} for {peer} ({detail})"),
            EventKind::Unlocked => format!("{node}: unlocked {path} ({detail})"),
            EventKind::StagedApplied => {
                format!("{node}: applied staged {path} from {peer} ({detail})")
            }
        }
    }
}

/// A peer as `dirsync-cli status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    /// The peer's name if known, else the configured address.
    pub name: String,
    pub address: Option<String>,
    pub connected: bool,
    /// RFC 3339: since when connected (or disconnected).
    pub since: Option<String>,
    pub last_error: Option<String>,
}

/// What `dirsync-cli status` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub dir: String,
    pub peers: Vec<PeerState>,
    pub files: u64,
    pub bytes: u64,
    pub transfers_in_flight: u64,
    pub transfers_queued: u64,
}
