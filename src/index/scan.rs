//! Walking the synced tree and hashing what changed.

use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{StatKey, TEMP_PREFIX};
use crate::hash::ContentHash;
use crate::sync::record::Kind;
use crate::wire::Timestamp;
use rustix::fs::FileType;

/// A file whose mtime is this close to the moment it was hashed may still be written
/// within the same timestamp tick, so its hash is not trusted later ("racy clean",
/// as git calls it): it is hashed again on the next scan.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Errors that stop a scan as a whole (a single unreadable entry only warns).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("synced directory {path} is not readable: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One path as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub modified: Timestamp,
    pub mode: u32,
    pub hash: ContentHash,
    pub target: Option<String>,
    /// The stat that proves `hash`; `None` if it must not be trusted later
    /// (changed while hashed, or modified within the racy window).
    pub stat: Option<StatKey>,
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// Files, directories and symlinks, sorted by path, except those found
    /// exactly as indexed: the context keeps track of those
    /// ([`ScanContext::unchanged`]), which is what keeps a rescan of a large,
    /// mostly unchanged tree small.
    pub entries: Vec<Observed>,
    /// Entries that were skipped, with the reason.
    pub warnings: Vec<String>,
    /// How many files had to be hashed (not proven unchanged by the cache).
    pub hashed_files: usize,
    pub hashed_bytes: u64,
    /// Files that changed while they were hashed: look at them again shortly.
    pub unstable: Vec<String>,
    /// Files skipped because the engine is installing them: look again later.
    pub claimed: Vec<String>,
    /// Paths that exist but could not be read (a directory: nothing below it was
    /// seen). Not observed, and never taken as deleted: an unreadable file or
    /// folder must not delete the peers' copies.
    pub unreadable: Vec<String>,
    /// Files found by the walk that still need hashing (empty once `scan` returns).
    pub to_hash: Vec<HashJob>,
    /// Their sizes, added up.
    pub to_hash_bytes: u64,
}

impl ScanOutcome {
    /// What the scan observed (all it found except what it found exactly as
    /// indexed), after logging the warnings as `node`'s; the unstable, the
    /// claimed and the unreadable paths go to the caller's lists.
    pub fn entries_logged(self, node: &str, lists: &mut NotObserved) -> Vec<Observed> {
        for w in &self.warnings {
            tracing::warn!("{node}: {w}");
        }
        lists.unstable.extend(self.unstable);
        lists.claimed.extend(self.claimed);
        lists.unreadable.extend(self.unreadable);
        self.entries
    }

    /// Keeps `obs`, unless the context proves it unchanged.
    fn found(&mut self, obs: Observed, ctx: &impl ScanContext) {
        if !ctx.unchanged(&obs) {
            self.entries.push(obs);
        }
    }

    /// Hashes the files a [`walk`] left in `to_hash` into the entries, and sorts
    /// the entries by path.
    pub fn hash_found(&mut self, root: &Path) {
        let jobs = std::mem::take(&mut self.to_hash);
        self.to_hash_bytes = 0;
        hash_all(root, jobs, self);
        self.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    }

    /// Records that `rel` exists but could not be read, and why.
    fn unreadable(&mut self, rel: &str, why: String) {
        self.warnings.push(why);
        self.unreadable.push(rel.to_string());
    }
}

/// Paths a scan found but did not observe, by reason (see [`ScanOutcome`]).
#[derive(Debug, Default)]
pub struct NotObserved {
    pub unstable: Vec<String>,
    pub claimed: Vec<String>,
    pub unreadable: Vec<String>,
}

/// What a scan needs to know besides the disk.
pub trait ScanContext {
    /// The hash of `path` if it was computed when the file had exactly `stat`.
    fn cached_hash(&self, path: &str, stat: &StatKey) -> Option<ContentHash>;
    /// Whether `obs` is exactly what the index holds (nothing to version or
    /// refresh): then the context notes that its entry was found, and the scan
    /// keeps nothing of it.
    fn unchanged(&self, _obs: &Observed) -> bool {
        false
    }
    /// Paths the user asked to ignore (`.dirsyncignore`).
    fn is_ignored(&self, path: &str, is_dir: bool) -> bool;
    /// Paths the engine is installing right now: not hashed (the install's own
    /// result is about to be committed), reported in [`ScanOutcome::claimed`].
    fn is_claimed(&self, _path: &str) -> bool {
        false
    }
}

/// Walks `root` (or only the subtree `sub` of it, if given), never entering the
/// directories whose (dev, inode) is in `excluded`, and hashes what the cache
/// cannot prove unchanged.
pub fn scan(
    root: &Path,
    sub: Option<&str>,
    excluded: &[(u64, u64)],
    ctx: &impl ScanContext,
) -> Result<ScanOutcome, ScanError> {
    let mut out = walk(root, sub, excluded, ctx, None)?;
    out.hash_found(root);
    Ok(out)
}

/// Called by [`walk`] after each directory it has read, with what it found so
/// far (directories before what is in them): it may take any of it, to hash and
/// commit as a part. Returns false to stop the walk.
pub type Flush<'a> = &'a mut dyn FnMut(&mut ScanOutcome) -> bool;

/// The walk of [`scan`] alone: what it observed (unsorted), with the files that
/// still need hashing left in [`ScanOutcome::to_hash`], for
/// [`ScanOutcome::hash_found`].
pub fn walk(
    root: &Path,
    sub: Option<&str>,
    excluded: &[(u64, u64)],
    ctx: &impl ScanContext,
    mut flush: Option<Flush<'_>>,
) -> Result<ScanOutcome, ScanError> {
    let mut out = ScanOutcome::default();
    let root_meta = fs::metadata(root).map_err(|source| ScanError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    if !root_meta.is_dir() {
        return Err(ScanError::Root {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let at = Root::open(root);
    let mut stack: Vec<String> = Vec::new();
    match sub {
        None | Some("") => stack.push(String::new()),
        Some(rel) => {
            // The subtree itself is observed like any entry; only a directory is walked.
            if let Some(dir) = observe(&at, rel.to_string(), None, excluded, ctx, &mut out) {
                stack.push(dir);
            }
        }
    }
    let mut dirents = vec![std::mem::MaybeUninit::<u8>::uninit(); 32 << 10];
    while let Some(rel) = stack.pop() {
        // Each directory is opened once, and what is in it is read and stat'ed
        // through that descriptor: one name resolved per entry, not every
        // component of its path from the root again.
        let dir_fd = match at.open_dir(&rel) {
            Ok(d) => d,
            Err(e) if rel.is_empty() => {
                return Err(ScanError::Root {
                    path: root.to_path_buf(),
                    source: e,
                })
            }
            Err(e) => {
                out.unreadable(&rel, format!("skipped directory {rel}: {e}"));
                continue;
            }
        };
        let mut read = rustix::fs::RawDir::new(&dir_fd, &mut dirents);
        while let Some(dirent) = read.next() {
            let dirent = match dirent {
                Ok(d) => d,
                Err(e) => {
                    out.unreadable(&rel, format!("skipped an entry of {rel}/: {e}"));
                    break;
                }
            };
            let name = dirent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                out.warnings.push(format!(
                    "skipped {:?}: file name is not UTF-8",
                    root.join(&rel).join(std::ffi::OsStr::from_bytes(name))
                ));
                continue;
            };
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if let Some(dir) = observe(&at, child, Some(&dir_fd), excluded, ctx, &mut out) {
                stack.push(dir);
            }
        }
        if let Some(flush) = flush.as_mut() {
            if !flush(&mut out) {
                break;
            }
        }
    }
    Ok(out)
}

/// The synced root, held open while a scan runs: the paths below it that the
/// scan stats and opens are resolved from there ([`super::lstat_below`],
/// [`super::open_read_below`]), not again from `/` through each of the root's
/// own components, twice or three times per file.
struct Root<'a> {
    path: &'a Path,
    /// `None` if it could not be opened: then paths are resolved whole.
    dir: Option<rustix::fd::OwnedFd>,
}

impl<'a> Root<'a> {
    fn open(path: &'a Path) -> Root<'a> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = rustix::fs::open(path, flags, Mode::empty()).ok();
        Root { path, dir }
    }

    /// The directory `rel` (`""`: the root) open for reading its entries, never
    /// through a link (`ELOOP`, taken as unreadable: the tree changed under the
    /// walk, and the change's own event or the next scan sees it).
    fn open_dir(&self, rel: &str) -> std::io::Result<fs::File> {
        use rustix::fs::OFlags;
        let rel = if rel.is_empty() { "." } else { rel };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
        super::open_below(self.dir.as_ref(), self.path, rel, flags)
    }

    /// The status of `rel` itself (a link is not followed).
    fn stat(&self, rel: &str) -> std::io::Result<rustix::fs::Stat> {
        super::lstat_below(self.dir.as_ref(), self.path, rel)
    }

    /// `rel` open for reading, never through a link (`ELOOP`) and never
    /// blocking on a fifo put in its place.
    fn open_read(&self, rel: &str) -> std::io::Result<fs::File> {
        super::open_read_below(self.dir.as_ref(), self.path, rel)
    }
}

/// A status's mtime.
fn modified_of(stat: &rustix::fs::Stat) -> Option<SystemTime> {
    let nanos = Duration::from_nanos(stat.st_mtime_nsec);
    if stat.st_mtime >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(stat.st_mtime as u64) + nanos)
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(stat.st_mtime.unsigned_abs()))?
            .checked_add(nanos)
    }
}

/// Observes one path, through `parent` (its directory, open) when given;
/// returns it as a directory to walk if it is one.
fn observe(
    root: &Root<'_>,
    rel: String,
    parent: Option<&fs::File>,
    excluded: &[(u64, u64)],
    ctx: &impl ScanContext,
    out: &mut ScanOutcome,
) -> Option<String> {
    let name = rel.rsplit('/').next().unwrap_or(&rel);
    if name.starts_with(TEMP_PREFIX) {
        return None;
    }
    // lstat: links are never followed.
    let meta = match parent {
        Some(dir) => rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(std::io::Error::from),
        None => root.stat(&rel),
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None, // vanished
        Err(e) => {
            out.unreadable(&rel, format!("skipped {rel}: {e}"));
            return None;
        }
    };
    let ft = FileType::from_raw_mode(meta.st_mode);
    let is_dir = ft == FileType::Directory;
    if ctx.is_ignored(&rel, is_dir) {
        return None;
    }
    let stat = StatKey::of_stat(&meta);
    let mtime = modified_of(&meta);
    let modified = Timestamp::from_system_time(mtime.unwrap_or(SystemTime::UNIX_EPOCH));
    let mode = meta.st_mode & 0o777;
    if is_dir {
        if excluded.contains(&(stat.dev, stat.ino)) {
            return None;
        }
        out.found(
            Observed {
                path: rel.clone(),
                kind: Kind::Dir,
                size: 0,
                modified,
                mode,
                hash: ContentHash([0; 32]),
                target: None,
                stat: Some(stat),
            },
            ctx,
        );
        return Some(rel);
    }
    if ft == FileType::Symlink {
        let target = match parent {
            Some(dir) => rustix::fs::readlinkat(dir, name, Vec::new())
                .map(|t| std::ffi::OsString::from_vec(t.into_bytes()))
                .map_err(std::io::Error::from),
            None => fs::read_link(root.path.join(&rel)).map(|t| t.into_os_string()),
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => {
                out.unreadable(&rel, format!("skipped link {rel}: {e}"));
                return None;
            }
        };
        let Some(target) = target.to_str().map(str::to_owned) else {
            out.unreadable(&rel, format!("skipped link {rel}: target is not UTF-8"));
            return None;
        };
        out.found(
            Observed {
                size: target.len() as u64,
                hash: ContentHash::of(target.as_bytes()),
                path: rel,
                kind: Kind::Symlink,
                modified,
                mode,
                target: Some(target),
                stat: Some(stat),
            },
            ctx,
        );
        return None;
    }
    if ft != FileType::RegularFile {
        out.warnings.push(format!(
            "skipped {rel}: not a regular file, directory or symlink (fifo, socket or device)"
        ));
        return None;
    }
    if ctx.is_claimed(&rel) {
        out.claimed.push(rel);
        return None;
    }
    match ctx.cached_hash(&rel, &stat) {
        Some(hash) => out.found(
            Observed {
                path: rel,
                kind: Kind::File,
                size: stat.size,
                modified,
                mode,
                hash,
                target: None,
                stat: Some(stat),
            },
            ctx,
        ),
        // Hashed after the walk, on several threads when there is much to hash.
        None => {
            out.to_hash_bytes += stat.size;
            out.to_hash.push(HashJob {
                rel,
                stat,
                mtime,
                modified,
                mode,
            })
        }
    }
    None
}

/// A file the cache could not prove unchanged.
#[derive(Debug)]
pub struct HashJob {
    /// The path, relative to the root (it is opened from the open root: a
    /// start-up scan holds a job for every file of the tree).
    rel: String,
    stat: StatKey,
    mtime: Option<SystemTime>,
    modified: Timestamp,
    mode: u32,
}

/// Below this many bytes to hash, one thread does it (threads cost more).
const PARALLEL_HASH_FROM: u64 = 4 << 20;

/// Hashes every job into `out`: on up to 4 threads for large amounts.
fn hash_all(root: &Path, jobs: Vec<HashJob>, out: &mut ScanOutcome) {
    if jobs.is_empty() {
        return;
    }
    let root = &Root::open(root);
    let bytes: u64 = jobs.iter().map(|j| j.stat.size).sum();
    if bytes < PARALLEL_HASH_FROM {
        jobs.iter().for_each(|j| hash_one(root, j, out));
        return;
    }
    // Asked once: `available_parallelism` reads cgroup files on every call, and
    // small scoped scans run thousands of times during a bulk transfer.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = cpus.min(4).min(jobs.len());
    if threads < 2 {
        jobs.iter().for_each(|j| hash_one(root, j, out));
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts: Vec<std::thread::Result<ScanOutcome>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut part = ScanOutcome::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break };
                        hash_one(root, job, &mut part);
                    }
                    part
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join()).collect()
    });
    if parts.iter().any(|p| p.is_err()) {
        // Never return a partial result (missing files would read as deleted):
        // do it all again here.
        jobs.iter().for_each(|j| hash_one(root, j, out));
        return;
    }
    for part in parts.into_iter().flatten() {
        out.entries.extend(part.entries);
        out.warnings.extend(part.warnings);
        out.unstable.extend(part.unstable);
        out.unreadable.extend(part.unreadable);
        out.hashed_files += part.hashed_files;
        out.hashed_bytes += part.hashed_bytes;
    }
}

fn hash_one(root: &Root<'_>, job: &HashJob, out: &mut ScanOutcome) {
    let (rel, stat) = (&job.rel, job.stat);
    let started = SystemTime::now();
    // Exactly the size that was stat'ed, so size and hash always describe the same
    // bytes, even if the file grows meanwhile. The status after the read is the
    // open file's own: if it is the walk's, the bytes hashed are that file's,
    // unchanged while read (a file put at the path later is a later change, which
    // the watcher or the next scan sees by its other inode).
    let hashed = root.open_read(rel).and_then(|f| {
        let hash = ContentHash::of_reader_prefix(&f, stat.size)?;
        let after = rustix::fs::fstat(&f).map(|st| StatKey::of_stat(&st));
        Ok(hash.map(|h| (h, after.ok())))
    });
    let (hash, after) = match hashed {
        Ok(Some(h)) => h,
        Ok(None) => {
            out.unstable.push(rel.clone());
            return;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        // A link took the file's place (or a directory's on the way) since the
        // walk: looked at again. (A fifo reads as too short, above.)
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            out.unstable.push(rel.clone());
            return;
        }
        Err(e) => {
            out.unreadable(rel, format!("skipped {rel}: {e}"));
            return;
        }
    };
    out.hashed_files += 1;
    out.hashed_bytes += stat.size;
    let racy = job
        .mtime
        .map(|m| {
            started
                .duration_since(m)
                .map_or(true, |age| age < RACY_WINDOW)
        })
        .unwrap_or(true);
    if after != Some(stat) {
        out.unstable.push(rel.clone());
    }
    let trusted = after == Some(stat) && !racy;
    out.entries.push(Observed {
        path: rel.clone(),
        kind: Kind::File,
        size: stat.size,
        modified: job.modified,
        mode: job.mode,
        hash,
        target: None,
        stat: trusted.then_some(stat),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Mutex;

    /// A status taken through the open root (or through the whole path, when it
    /// could not be opened) must equal std's field for field: the hash cache
    /// compares stats made both ways.
    #[test]
    fn the_open_root_stats_as_std_does_and_never_opens_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"x").unwrap();
        fs::write(root.join("a/old"), b"y").unwrap();
        fs::set_permissions(root.join("a/b/f"), fs::Permissions::from_mode(0o751)).unwrap();
        // Before 1970 (a negative mtime with nanoseconds) and an hour ago.
        let before = SystemTime::UNIX_EPOCH - Duration::from_millis(1500);
        let f = fs::File::options()
            .write(true)
            .open(root.join("a/old"))
            .unwrap();
        f.set_modified(before).unwrap();
        set_old_mtime(&root.join("a/b/f"));
        std::os::unix::fs::symlink("f", root.join("a/b/l")).unwrap();
        let at = Root::open(root);
        assert!(at.dir.is_some());
        let whole = Root {
            path: root,
            dir: None,
        };
        for rel in ["a", "a/b", "a/b/f", "a/b/l", "a/old"] {
            let meta = root.join(rel).symlink_metadata().unwrap();
            for r in [&at, &whole] {
                let st = r.stat(rel).unwrap();
                assert_eq!(StatKey::of_stat(&st), StatKey::of(&meta), "{rel}");
                assert_eq!(modified_of(&st), meta.modified().ok(), "{rel}");
                assert_eq!(st.st_mode & 0o777, meta.permissions().mode() & 0o777);
                assert_eq!(FileType::from_raw_mode(st.st_mode).is_dir(), meta.is_dir());
            }
        }
        assert_eq!(modified_of(&at.stat("a/old").unwrap()), Some(before));
        // From the open root, not through a link on the way either.
        std::os::unix::fs::symlink("a/b", root.join("c")).unwrap();
        let on_the_way = at.open_read("c/f").unwrap_err();
        assert_eq!(
            on_the_way.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
        for r in [&at, &whole] {
            let link = r.open_read("a/b/l").unwrap_err();
            assert_eq!(
                link.raw_os_error(),
                Some(rustix::io::Errno::LOOP.raw_os_error())
            );
            assert_eq!(
                r.stat("a/none").unwrap_err().kind(),
                std::io::ErrorKind::NotFound
            );
            let hash = ContentHash::of_reader_prefix(r.open_read("a/b/f").unwrap(), 1);
            assert_eq!(hash.unwrap(), Some(ContentHash::of(b"x")));
        }
    }

    #[derive(Default)]
    struct Cache(Mutex<HashMap<String, (StatKey, ContentHash)>>);
    impl ScanContext for Cache {
        fn cached_hash(&self, path: &str, stat: &StatKey) -> Option<ContentHash> {
            let m = self.0.lock().unwrap();
            m.get(path).filter(|(s, _)| s == stat).map(|(_, h)| *h)
        }
        fn is_ignored(&self, path: &str, _: bool) -> bool {
            path.ends_with(".ignored")
        }
    }
    impl Cache {
        fn learn(&self, out: &ScanOutcome) {
            let mut m = self.0.lock().unwrap();
            for e in &out.entries {
                if let Some(s) = e.stat {
                    m.insert(e.path.clone(), (s, e.hash));
                }
            }
        }
    }

    fn set_old_mtime(p: &Path) {
        let f = fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    fn excluded(p: &Path) -> Vec<(u64, u64)> {
        let m = fs::metadata(p).unwrap();
        vec![(m.dev(), m.ino())]
    }

    #[test]
    fn observes_kinds_skips_state_temp_ignored_and_uses_cache() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::create_dir_all(root.join(".dirsync")).unwrap();
        fs::write(root.join("sub/deeper/x y.txt"), b"hello").unwrap();
        fs::write(root.join("é.txt"), b"unicode").unwrap();
        fs::write(root.join("skip.ignored"), b"no").unwrap();
        fs::write(root.join(".dirsync/state"), b"no").unwrap();
        fs::write(root.join(format!("{TEMP_PREFIX}123")), b"partial").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        for p in ["sub/deeper/x y.txt", "é.txt"] {
            set_old_mtime(&root.join(p));
        }
        let cache = Cache::default();
        let ex = excluded(&root.join(".dirsync"));
        let out = scan(root, None, &ex, &cache).unwrap();
        let got: Vec<(&str, Kind)> = out
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            got,
            [
                ("empty", Kind::Dir),
                ("link", Kind::Symlink),
                ("sub", Kind::Dir),
                ("sub/deeper", Kind::Dir),
                ("sub/deeper/x y.txt", Kind::File),
                ("é.txt", Kind::File)
            ]
        );
        assert_eq!(out.entries[1].target.as_deref(), Some("/etc/passwd"));
        assert_eq!(out.entries[4].hash, ContentHash::of(b"hello"));
        assert_eq!(out.hashed_files, 2);
        cache.learn(&out);

        let again = scan(root, None, &ex, &cache).unwrap();
        assert_eq!(
            again.hashed_files, 0,
            "unchanged files are not hashed again"
        );
        assert_eq!(again.entries, out.entries);

        fs::write(root.join("é.txt"), b"UNICODE").unwrap();
        let third = scan(root, Some("é.txt"), &ex, &cache).unwrap();
        assert_eq!(third.hashed_files, 1);
        assert_eq!(third.entries.len(), 1);
        assert_eq!(third.entries[0].hash, ContentHash::of(b"UNICODE"));
        assert_eq!(third.entries[0].stat, None, "a racy file is not trusted");

        let sub = scan(root, Some("sub"), &ex, &cache).unwrap();
        let paths: Vec<&str> = sub.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["sub", "sub/deeper", "sub/deeper/x y.txt"]);
    }

    /// A directory replaced by a link to somewhere outside the root after the walk
    /// found it (and before it read it) is not read through the link: nothing
    /// outside the root is listed, and the directory counts as unreadable (so
    /// what the index holds below it is not taken as deleted).
    #[test]
    fn a_directory_swapped_for_a_link_mid_walk_is_not_walked_through_it() {
        struct SwapOnSight {
            root: PathBuf,
            outside: PathBuf,
        }
        impl ScanContext for SwapOnSight {
            fn cached_hash(&self, _: &str, _: &StatKey) -> Option<ContentHash> {
                None
            }
            // Asked right after the directory's lstat, before it is read.
            fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
                if path == "d" && is_dir {
                    fs::rename(self.root.join("d"), self.root.join("d.moved")).unwrap();
                    std::os::unix::fs::symlink(&self.outside, self.root.join("d")).unwrap();
                }
                false
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"not ours").unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"ours").unwrap();
        for sub in [None, Some("d")] {
            if root.join("d.moved").exists() {
                fs::remove_file(root.join("d")).unwrap();
                fs::rename(root.join("d.moved"), root.join("d")).unwrap();
            }
            let ctx = SwapOnSight {
                root: root.clone(),
                outside: outside.path().to_path_buf(),
            };
            let out = scan(&root, sub, &[], &ctx).unwrap();
            let below: Vec<&str> = out
                .entries
                .iter()
                .map(|e| e.path.as_str())
                .filter(|p| p.starts_with("d/"))
                .collect();
            assert!(
                below.is_empty(),
                "{sub:?}: walked through the link: {below:?}"
            );
            assert_eq!(out.unreadable, ["d"], "{sub:?}");
        }
    }

    #[test]
    fn special_files_are_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(dir.path().join("fifo"))
            .status();
        if !status.map(|s| s.success()).unwrap_or(false) {
            return; // no mkfifo here: nothing to check
        }
        let out = scan(dir.path(), None, &[], &Cache::default()).unwrap();
        assert!(out.entries.is_empty());
        assert!(out.warnings[0].contains("fifo"), "{:?}", out.warnings);
    }

    #[test]
    fn missing_root_is_an_error() {
        let r = scan(
            Path::new("/nonexistent/dirsync-test"),
            None,
            &[],
            &Cache::default(),
        );
        assert!(matches!(r, Err(ScanError::Root { .. })));
    }
}
