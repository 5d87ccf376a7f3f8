//! Message types. Variant order is part of the wire format: append only.

use serde::{Deserialize, Serialize};

use crate::events::{Event, NodeStatus};
use crate::hash::ContentHash;
use crate::sync::record::Record;

/// A point in time as seconds and nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// Nanoseconds since the epoch.
    pub fn as_nanos(&self) -> i128 {
        self.secs as i128 * 1_000_000_000 + self.nanos as i128
    }

    /// From a file's modification time.
    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: represent as negative seconds with a positive nanos part.
                let d = e.duration();
                let (mut secs, mut nanos) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Timestamp { secs, nanos }
            }
        }
    }

    /// As a UTC date-time, if representable.
    pub fn to_datetime(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp(self.secs, self.nanos.min(999_999_999))
    }
}

/// One regular file as a single node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the synced root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub modified: Timestamp,
    pub hash: ContentHash,
}

/// One node's copy of a file in a merged listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    pub node: String,
    pub size: u64,
    pub modified: Timestamp,
    pub hash: ContentHash,
}

/// A path in the merged listing with every node's copy, copies sorted by node name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedEntry {
    pub path: String,
    pub copies: Vec<Copy>,
}

/// A lock on one path of a node, as `dirsync-cli locks` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub path: String,
    /// The client certificate name that took the lock.
    pub owner: String,
    pub since: Timestamp,
    /// When the lock expires by itself (its TTL), if it has one.
    pub expires: Option<Timestamp>,
    /// Remote versions staged for this path, waiting for the unlock.
    pub queued: u32,
    /// The lock is being released: its queue is being applied.
    pub releasing: bool,
}

/// Everything that crosses a stream. See the module map in [`crate::wire`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// 0: first request on a node-to-node connection, and its answer.
    Hello { version: u32, name: String },
    /// 1: the request was refused; `reason` is meant for a human.
    Refused { reason: String },
    /// 2: client -> node: the merged listing of all nodes.
    ListRequest,
    /// 3: node -> node: the answering node's own files.
    PeerListRequest,
    /// 4: a chunk of a node's own files.
    LocalEntries(Vec<FileEntry>),
    /// 5: a chunk of the merged listing.
    MergedEntries(Vec<MergedEntry>),
    /// 6: end of a listing: the nodes whose files it holds, and warnings naming
    /// peers that could not be asked.
    ListEnd {
        nodes: Vec<String>,
        warnings: Vec<String>,
    },
    /// 7: node -> node: send me your index records after `since` (from 0 if
    /// `index_id` is not your index's id), then keep sending new ones as they come.
    Subscribe {
        index_id: Option<[u8; 16]>,
        since: u64,
    },
    /// 8: index records in sequence order; `max_seq` is the last one's sequence.
    IndexBatch {
        index_id: [u8; 16],
        max_seq: u64,
        records: Vec<Record>,
    },
    /// 9: node -> node: the content of `path`, which must still have `hash`.
    FetchRequest { path: String, hash: ContentHash },
    /// 10: answer to `FetchRequest`: exactly `size` raw bytes follow on the stream.
    FileHeader { size: u64 },
    /// 11: client -> node: stream this node's events as they happen.
    WatchRequest,
    /// 12: one event (answer to `WatchRequest`).
    Event(Event),
    /// 13: client -> node: this node's status.
    StatusRequest,
    /// 14: answer to `StatusRequest`.
    Status(NodeStatus),
    /// 15: client -> node: lock `path` for the caller, for `ttl_secs` if given.
    /// Answered by `Locks` with the lock, or `Refused`.
    LockRequest { path: String, ttl_secs: Option<u64> },
    /// 16: client -> node: release the caller's lock on `path` (anyone's with
    /// `force`, for an admin) and apply its queue. Answered by `Unlocked` or
    /// `Refused`.
    UnlockRequest { path: String, force: bool },
    /// 17: client -> node: every lock. Answered by `Locks`.
    LocksRequest,
    /// 18: locks (answer to `LocksRequest` and `LockRequest`; also sent before
    /// `ListEnd` in a listing).
    Locks(Vec<LockInfo>),
    /// 19: answer to `UnlockRequest`: the lock is gone and `applied` queued
    /// versions were applied (of `queued`).
    Unlocked {
        path: String,
        queued: u32,
        applied: u32,
    },
    /// 20: node -> node: the blocks of `path`, which must still have `hash`, to
    /// fetch only what the asking node's older version lacks. Answered by `Blocks`
    /// (or `Refused`); the asker then sends one `RangesRequest` on the same stream.
    BlocksRequest { path: String, hash: ContentHash },
    /// 21: answer to `BlocksRequest`: the file cut by content (FastCDC, average
    /// block `avg` bytes, at least `avg / 4`, at most `avg * 4`), in order.
    Blocks { avg: u32, blocks: Vec<Block> },
    /// 22: after `Blocks`, on the same stream: send these `(offset, length)` byte
    /// ranges of the file. Answered by a `FileHeader` with their total length, then
    /// exactly that many raw bytes: the ranges' contents, in order.
    RangesRequest { ranges: Vec<(u64, u64)> },
}

/// One block of a file cut by content: its length and BLAKE3 hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub len: u32,
    pub hash: ContentHash,
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Refused { .. } => "Refused",
            Message::ListRequest => "ListRequest",
            Message::PeerListRequest => "PeerListRequest",
            Message::LocalEntries(_) => "LocalEntries",
            Message::MergedEntries(_) => "MergedEntries",
            Message::ListEnd { .. } => "ListEnd",
            Message::Subscribe { .. } => "Subscribe",
            Message::IndexBatch { .. } => "IndexBatch",
            Message::FetchRequest { .. } => "FetchRequest",
            Message::FileHeader { .. } => "FileHeader",
            Message::WatchRequest => "WatchRequest",
            Message::Event(_) => "Event",
            Message::StatusRequest => "StatusRequest",
            Message::Status(_) => "Status",
            Message::LockRequest { .. } => "LockRequest",
            Message::UnlockRequest { .. } => "UnlockRequest",
            Message::LocksRequest => "LocksRequest",
            Message::Locks(_) => "Locks",
            Message::Unlocked { .. } => "Unlocked",
            Message::BlocksRequest { .. } => "BlocksRequest",
            Message::Blocks { .. } => "Blocks",
            Message::RangesRequest { .. } => "RangesRequest",
        }
    }
}

/// Splits `items` into runs whose estimated encoded size stays near `target` bytes,
/// so that a list of any length crosses the network in bounded frames.
pub fn chunk_by_size<T>(
    items: Vec<T>,
    target: usize,
    estimate: impl Fn(&T) -> usize,
) -> impl Iterator<Item = Vec<T>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for item in items {
        let s = estimate(&item);
        if !current.is_empty() && size + s > target {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += s;
        current.push(item);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks.into_iter()
}

impl FileEntry {
    /// Upper bound of this entry's encoded size.
    pub fn encoded_size_hint(&self) -> usize {
        self.path.len() + 32 + 10 + 10 + 5 + 5
    }
}

impl Record {
    /// Upper bound of this record's encoded size.
    pub fn encoded_size_hint(&self) -> usize {
        self.path.len()
            + self.modified_by.len()
            + self.target.as_ref().map_or(0, |t| t.len())
            + self
                .version
                .iter()
                .map(|(n, _)| n.len() + 15)
                .sum::<usize>()
            + 90
    }
}

impl MergedEntry {
    /// Upper bound of this entry's encoded size.
    pub fn encoded_size_hint(&self) -> usize {
        self.path.len()
            + 5
            + self
                .copies
                .iter()
                .map(|c| c.node.len() + 5 + 32 + 10 + 10 + 5)
                .sum::<usize>()
    }
}
