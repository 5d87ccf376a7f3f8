//! What a node knows about its own directory.
//!
//! - [`scan`] walks the tree (or part of it) and hashes what the cache cannot prove
//!   unchanged, producing [`scan::Observed`] entries.
//! - [`store`] is the persistent index (SQLite): records, version vectors,
//!   sequence numbers, stat proofs, and per-peer progress.
//! - [`changes`] compares observations with the index and turns differences into
//!   new local versions (and tombstones).
//! - [`queue`] holds file locks and, per locked path, the FIFO queue of staged
//!   remote versions (same database, same transactions).

pub mod changes;
pub mod queue;
pub mod scan;
pub mod store;

use std::fs;
use std::os::unix::fs::MetadataExt;

pub use scan::{ScanError, ScanOutcome};
pub use store::{Entry, Store, StoreError, Update};

/// Names starting with this prefix are dirsync's own temporary files: never listed,
/// never synced.
pub const TEMP_PREFIX: &str = ".dirsync-tmp-";

/// The default state directory's name, directly under the synced root.
pub const STATE_DIR_NAME: &str = ".dirsync";

/// What proves a file unchanged since it was hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    pub dev: u64,
}

impl StatKey {
    pub fn of(meta: &fs::Metadata) -> StatKey {
        StatKey {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }

    /// The same from a raw status (`fstatat`), as [`StatKey::of`] has it.
    pub fn of_stat(st: &rustix::fs::Stat) -> StatKey {
        StatKey {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            ctime_ns: st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128,
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }
}
