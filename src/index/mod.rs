//! What a node knows about its own directory.
//!
//! [`scan`] walks the tree and hashes regular files, reusing a [`scan::HashCache`]
//! keyed by what proves a file unchanged, so that a large tree is hashed once.

pub mod scan;

pub use scan::{HashCache, ScanError, ScanOutcome, Scanner};

/// Names starting with this prefix are dirsync's own temporary files: never listed,
/// never synced.
pub const TEMP_PREFIX: &str = ".dirsync-tmp-";
