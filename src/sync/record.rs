//! What a node knows about one path: the unit of the index and of index exchange.

use serde::{Deserialize, Serialize};

use super::version::VersionVector;
use crate::hash::ContentHash;
use crate::wire::Timestamp;

/// What a path is. Variant order is part of the wire format: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One path's state and history, as held in a node's index and sent to peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Relative to the synced root, `/`-separated; see [`crate::path::RelPath`].
    pub path: String,
    pub kind: Kind,
    /// Content size (files), target length (symlinks), 0 (directories, tombstones).
    pub size: u64,
    pub modified: Timestamp,
    /// Permission bits (`0o777` mask); the executable bits are what matters.
    pub mode: u32,
    /// BLAKE3 of the content (files) or of the link target (symlinks); zero otherwise.
    pub hash: ContentHash,
    /// The link target, for symlinks.
    pub target: Option<String>,
    /// How this state came about.
    pub version: VersionVector,
    /// A tombstone: the path was deleted at this version.
    pub deleted: bool,
    /// The node that made this version (the last local change).
    pub modified_by: String,
    /// The sending node's sequence number for this record.
    pub seq: u64,
}

impl Record {
    /// True if both describe the same content and kind, whatever their history:
    /// then a difference in versions needs no transfer, only a merge.
    pub fn same_content(&self, other: &Record) -> bool {
        if self.deleted || other.deleted {
            return self.deleted == other.deleted;
        }
        self.kind == other.kind
            && match self.kind {
                Kind::File => self.hash == other.hash && self.mode & 0o111 == other.mode & 0o111,
                Kind::Dir => true,
                Kind::Symlink => self.target == other.target,
            }
    }
}
