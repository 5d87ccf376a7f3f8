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
use std::path::Path;

use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags, ResolveFlags};

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

/// The status of `rel` itself (a link is not followed), resolved from `dir`, the
/// open root, when there is one: only `rel`'s own components are walked, not
/// the root's again. Without `dir`, `root/rel` is resolved whole.
pub fn lstat_below(
    dir: Option<&OwnedFd>,
    root: &Path,
    rel: &str,
) -> std::io::Result<rustix::fs::Stat> {
    let stat = match dir {
        Some(dir) => rustix::fs::statat(dir, rel, rustix::fs::AtFlags::SYMLINK_NOFOLLOW),
        None => rustix::fs::lstat(root.join(rel)),
    };
    stat.map_err(std::io::Error::from)
}

/// `rel` opened with `openat2` from `dir` (the open root), which the kernel
/// resolves only below it and through no link at all (`ELOOP`): the index holds
/// no path through a link, so one there means the tree changed.
pub fn open_beneath(
    dir: &OwnedFd,
    rel: impl AsRef<Path>,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<fs::File> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    rustix::fs::openat2(dir, rel.as_ref(), flags | OFlags::CLOEXEC, mode, resolve)
        .map(fs::File::from)
}

/// `rel` opened for reading without following a link at its end and without
/// blocking on a fifo put in its place: see [`open_below`].
pub fn open_read_below(dir: Option<&OwnedFd>, root: &Path, rel: &str) -> std::io::Result<fs::File> {
    open_below(
        dir,
        root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
    )
}

/// `rel` opened with `flags`: [`open_beneath`] from `dir` when there is one (and
/// the kernel has `openat2`), else `root/rel` as it resolves.
pub fn open_below(
    dir: Option<&OwnedFd>,
    root: &Path,
    rel: &str,
    flags: OFlags,
) -> std::io::Result<fs::File> {
    if let Some(dir) = dir {
        match open_beneath(dir, rel, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOSYS) => {}
            opened => return opened.map_err(Into::into),
        }
    }
    rustix::fs::open(root.join(rel), flags | OFlags::CLOEXEC, Mode::empty())
        .map(fs::File::from)
        .map_err(Into::into)
}
