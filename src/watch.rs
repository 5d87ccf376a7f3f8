//! Filesystem events (inotify) turned into batches of changed paths for the engine.
//!
//! A batch closes when no event came for `quiet` (2 ms by default: long enough to
//! absorb a burst of writes to one file, short enough for the latency target) or
//! `max_delay` after its first event, so bulk operations (a checkout, an unpacked
//! archive, `rm -rf`) arrive as a few large batches, not one event at a time.
//! Close-after-write marks a finished write; renames report both names; a created or
//! moved-in directory is reported itself, and the engine scans it as a subtree, which
//! also covers files created in it before its watch was in place.
//!
//! A file that is created or written to but not yet closed after writing is still
//! being written: it is held back ([`Tree::writing`]) until its close, its rename
//! or its deletion, or until it has been quiet for [`SETTLE`] (a hard link, or a
//! writer that keeps it open), or at most [`WRITING_AT_MOST`] after its first write
//! (a log appended to forever). So a file written slowly (a large copy, a
//! download, an archive being packed) is not announced half-written every time its
//! writer pauses, and an editor's or a tool's temporary file that is renamed over
//! the real one is never announced at all, however long its writing took.
//!
//! This talks to inotify directly (through the `inotify` crate, which is also what
//! `notify` uses on Linux) for three reasons measured on bulk transfers: `notify` 8
//! always asks for `IN_OPEN`, so every file this node reads (hashing, serving a
//! peer) queued an event; it turns every event into an owned path and a channel
//! message, where most of ours are about dirsync's own temporary files and are
//! dropped here by name, before anything is allocated; and it stats every created
//! path, where the event's `IN_ISDIR` already says whether a watch is needed.
//! Events are read on the runtime (no thread of their own), a buffer at a time.
//!
//! A directory this node creates while installing a batch from a peer is left
//! unwatched until the batch is committed, or has run for a second ([`Deferred`]): every file installed
//! into it would otherwise queue six events (its temporary file created, written,
//! changed, closed, renamed from and to), each one an echo of our own write, and
//! on `gen.py small` watching cost ~15% of both nodes' CPU. Once released, the
//! directory is watched and reported like a directory just created, so the
//! engine scans it as a subtree and finds anything written there meanwhile.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::index::{STATE_DIR_NAME, TEMP_PREFIX};

/// The exact fix for a full inotify watch table.
pub const WATCH_LIMIT_FIX: &str = "sysctl fs.inotify.max_user_watches=524288";

/// What every directory is watched for: content written and closed, metadata
/// (mode, mtime), names appearing and going, and the directory itself going.
/// Not opens or reads. Links are never followed, and unlinked files that are still
/// open report nothing more.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// A file being written that has had no event for this long is reported anyway.
pub const SETTLE: Duration = Duration::from_secs(1);
/// A file being written is reported at least this often while writes go on.
pub const WRITING_AT_MOST: Duration = Duration::from_secs(10);

/// A batch with at least this many events is a bulk change: from then on the
/// coalescer sleeps through each quiet period instead of waking for every event.
const BULK_EVENTS: usize = 64;

/// Coalescing settings.
#[derive(Clone, Copy, Debug)]
pub struct WatchConfig {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            quiet: Duration::from_millis(2),
            max_delay: Duration::from_millis(100),
        }
    }
}

/// Paths that changed, relative to the root and `/`-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub paths: BTreeSet<String>,
    /// Events were lost or a directory could not be watched: rescan everything.
    pub rescan: bool,
}

/// Why watching could not start at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {reason}")]
pub struct WatchError {
    pub path: PathBuf,
    pub reason: String,
}

/// Directories being created by this node's install of a batch, left unwatched
/// (their creation event is not followed) until the batch is committed.
///
/// The engine holds a directory before creating it and releases it when the
/// batch that made it ends ([`Unwatched`] does on drop, whatever the outcome),
/// or sooner if the batch runs long ([`Unwatched::release_now`]).
/// Released directories are then watched, below them too, and reported, so the
/// engine scans each as a subtree: a local write made there while it was
/// unwatched is found then (and a periodic full rescan finds it in any case).
#[derive(Default)]
pub struct Deferred {
    state: Mutex<DeferredState>,
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct DeferredState {
    /// A watcher is reading the releases; without one nothing is held.
    attached: bool,
    held: HashSet<String>,
    released: Vec<String>,
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeferredState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `rel` (a directory about to be created) unwatched until the returned
    /// guard is dropped. Nothing is held when no watcher is running.
    pub fn hold(self: &Arc<Self>, rel: &str) -> Unwatched {
        let mut state = self.lock();
        let rels = if state.attached && state.held.insert(rel.to_string()) {
            vec![rel.to_string()]
        } else {
            Vec::new()
        };
        Unwatched {
            deferred: self.clone(),
            rels,
        }
    }

    fn release(&self, rels: Vec<String>) {
        if rels.is_empty() {
            return;
        }
        let mut state = self.lock();
        for rel in rels {
            if state.held.remove(&rel) && state.attached {
                state.released.push(rel);
            }
        }
        drop(state);
        self.released.notify_one();
    }

    fn is_held(&self, rel: &str) -> bool {
        self.lock().held.contains(rel)
    }

    fn take_released(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().released)
    }

    fn attach(&self, attached: bool) {
        let mut state = self.lock();
        state.attached = attached;
        if !attached {
            state.released.clear();
        }
    }
}

/// Directories held unwatched; dropping this releases them.
pub struct Unwatched {
    deferred: Arc<Deferred>,
    rels: Vec<String>,
}

impl Unwatched {
    /// An empty set, to [`merge`](Unwatched::merge) others into.
    pub fn none(deferred: &Arc<Deferred>) -> Unwatched {
        Unwatched {
            deferred: deferred.clone(),
            rels: Vec::new(),
        }
    }

    /// Holds one more directory in the same registry, as its own guard (to
    /// [`merge`](Unwatched::merge) once the directory is made).
    pub fn hold(&self, rel: &str) -> Unwatched {
        self.deferred.hold(rel)
    }

    /// Takes over what `other` holds (released together, when `self` drops).
    pub fn merge(&mut self, mut other: Unwatched) {
        self.rels.append(&mut other.rels);
    }

    /// Releases what is held now, without waiting for the drop; what is held
    /// after this is released with the guard, as before.
    pub fn release_now(&mut self) {
        self.deferred.release(std::mem::take(&mut self.rels));
    }
}

impl Drop for Unwatched {
    fn drop(&mut self) {
        self.deferred.release(std::mem::take(&mut self.rels));
    }
}

/// Watches a tree until dropped.
pub struct Watcher {
    task: tokio::task::JoinHandle<()>,
    degraded: Arc<AtomicBool>,
    deferred: Arc<Deferred>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
        self.deferred.attach(false);
    }
}

impl Watcher {
    /// Starts watching `root` recursively (needs a tokio runtime). Hitting the
    /// inotify watch limit does not fail: the watcher runs degraded (see
    /// [`Watcher::degraded`]) and the node relies on rescans for what it cannot
    /// watch.
    /// Directories held in `deferred` are watched only once released.
    pub fn start(
        root: &Path,
        config: WatchConfig,
        deferred: Arc<Deferred>,
    ) -> Result<(Watcher, mpsc::Receiver<Batch>), WatchError> {
        let fail = |path: &Path, e: std::io::Error| WatchError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let root = root.canonicalize().map_err(|e| fail(root, e))?;
        let inotify = Inotify::init().map_err(|e| fail(&root, e))?;
        let degraded = Arc::new(AtomicBool::new(false));
        let mut tree = Tree {
            root: root.clone(),
            watches: inotify.watches(),
            dirs: HashMap::new(),
            writing: HashMap::new(),
            degraded: degraded.clone(),
            deferred: deferred.clone(),
        };
        // The root itself must be watched; below it, what cannot be watched is
        // left to rescans.
        let wd = tree
            .watches
            .add(&root, mask())
            .map_err(|e| fail(&root, e))?;
        tree.dirs.insert(wd, String::new());
        let mut unused = Batch::default();
        tree.watch_below("", &mut unused);
        // SAFETY: the descriptor belongs to `inotify`, which the `AsyncFd` owns: it
        // stays open, and the same, until the `AsyncFd` has deregistered it.
        let fd = unsafe { AsyncFd::register(inotify) }.map_err(|e| WatchError {
            path: root.clone(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel(64);
        deferred.attach(true);
        let task = tokio::spawn(coalesce(fd, tree, config, tx));
        Ok((
            Watcher {
                task,
                degraded,
                deferred,
            },
            rx,
        ))
    }

    /// True once some directory could not be watched (the inotify limit).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

fn warn_limit_once(degraded: &AtomicBool) {
    if !degraded.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the inotify watch limit is reached: some directories are not watched, and their changes are found by periodic rescans only. Raise it with: {WATCH_LIMIT_FIX}"
        );
    }
}

/// The watched directories, by watch descriptor, as paths relative to the root.
struct Tree {
    root: PathBuf,
    watches: Watches,
    dirs: HashMap<WatchDescriptor, String>,
    /// Files being written (created or written to, not yet closed after writing),
    /// with when their first and their last event came.
    writing: HashMap<String, (Instant, Instant)>,
    degraded: Arc<AtomicBool>,
    deferred: Arc<Deferred>,
}

impl Tree {
    /// Watches `rel` (a directory below the root) and every directory under it.
    fn watch_dir(&mut self, rel: &str, batch: &mut Batch) {
        match self.watches.add(self.root.join(rel), mask()) {
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_string());
                self.watch_below(rel, batch);
            }
            // Gone already, or replaced by something that is not a directory: its
            // own event says so.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                warn_limit_once(&self.degraded);
                batch.rescan = true;
            }
            Err(e) => {
                tracing::debug!("cannot watch {rel}: {e}");
                batch.rescan = true;
            }
        }
    }

    /// Watches the directories inside `rel` (not `rel` itself), recursively.
    fn watch_below(&mut self, rel: &str, batch: &mut Batch) {
        let Ok(read) = std::fs::read_dir(self.root.join(rel)) else {
            return;
        };
        for entry in read.flatten() {
            // The directory entry's own type: a link to a directory is not followed.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(child) = join(rel, &entry.file_name()) else {
                batch.rescan = true;
                continue;
            };
            if !skipped(&child) {
                self.watch_dir(&child, batch);
            }
        }
    }

    /// Stops watching `rel` and everything below it (it moved away).
    fn forget(&mut self, rel: &str) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, p)| crate::index::changes::within(p, rel))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.watches.remove(wd);
        }
    }

    /// Adds what one event says to `batch`.
    fn absorb(
        &mut self,
        wd: &WatchDescriptor,
        mask: EventMask,
        name: Option<&OsStr>,
        batch: &mut Batch,
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            batch.rescan = true;
            return;
        }
        let Some(dir) = self.dirs.get(wd) else {
            return; // a watch already forgotten
        };
        let Some(name) = name else {
            // The watched directory itself.
            if mask.intersects(
                EventMask::IGNORED
                    | EventMask::DELETE_SELF
                    | EventMask::MOVE_SELF
                    | EventMask::UNMOUNT,
            ) {
                if dir.is_empty() {
                    // The root itself went (moved, deleted, unmounted): look at everything.
                    batch.rescan = true;
                }
                if mask.contains(EventMask::IGNORED) {
                    self.dirs.remove(wd);
                }
            }
            return;
        };
        // dirsync's own temporary files are most events during a transfer: drop
        // them before anything is allocated.
        if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
            return;
        }
        let Some(rel) = join(dir, name) else {
            batch.rescan = true;
            return;
        };
        if skipped(&rel) {
            return;
        }
        if mask.contains(EventMask::ISDIR) {
            if mask.contains(EventMask::MOVED_FROM) {
                self.forget(&rel);
            } else if mask.contains(EventMask::CREATE) && self.deferred.is_held(&rel) {
                // Made by an install: watched and reported once released.
                return;
            } else if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                self.watch_dir(&rel, batch);
            }
        } else if mask.contains(EventMask::MODIFY)
            || (mask.contains(EventMask::CREATE) && self.is_regular_file(&rel))
        {
            // Still being written: reported at its close (or see `settled`). A
            // link or a fifo created is done at once.
            let now = Instant::now();
            self.writing
                .entry(rel)
                .and_modify(|(_, last)| *last = now)
                .or_insert((now, now));
            return;
        } else if mask.contains(EventMask::ATTRIB) && self.writing.contains_key(&rel) {
            // Its mode or times set while it is being written: it still is.
            return;
        } else {
            // Closed after writing, renamed or deleted: done, whatever it was.
            self.writing.remove(&rel);
            // A name appearing or going is reported whatever it is spelled.
            let names =
                EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO;
            if !mask.intersects(names) && is_unnamed(&self.root, &rel) {
                return;
            }
        }
        batch.paths.insert(rel);
    }

    /// Whether `rel` is a regular file now (a link is not followed).
    fn is_regular_file(&self, rel: &str) -> bool {
        std::fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.file_type().is_file())
    }

    /// Reports the files being written that have settled by `now` (see
    /// [`SETTLE`] and [`WRITING_AT_MOST`]).
    fn settled(&mut self, now: Instant, batch: &mut Batch) {
        if self.writing.is_empty() {
            return;
        }
        let root = &self.root;
        self.writing.retain(|rel, (first, last)| {
            let done = *last + SETTLE <= now || *first + WRITING_AT_MOST <= now;
            if done && !is_unnamed(root, rel) {
                batch.paths.insert(rel.clone());
            }
            !done
        });
    }

    /// When the next file being written settles, if any is.
    fn next_settled(&self) -> Option<Instant> {
        self.writing
            .values()
            .map(|(first, last)| (*last + SETTLE).min(*first + WRITING_AT_MOST))
            .min()
    }

    /// Watches and reports the directories released since last asked (each with
    /// what is below it: a released directory inside another is covered by it);
    /// returns how many were reported.
    fn absorb_released(&mut self, batch: &mut Batch) -> usize {
        let mut released = self.deferred.take_released();
        if released.is_empty() {
            return 0;
        }
        released.sort();
        let mut n = 0;
        let mut last: Option<String> = None;
        for rel in released {
            if last
                .as_deref()
                .is_some_and(|l| crate::index::changes::within(&rel, l))
            {
                continue;
            }
            self.watch_dir(&rel, batch);
            batch.paths.insert(rel.clone());
            last = Some(rel);
            n += 1;
        }
        n
    }
}

/// Whether `rel` is the name the kernel gives, in its directory's events, a file
/// that has none (an `O_TMPFILE` file being written, as the engine writes new
/// files): `#` and the inode number, spelled with no sign or leading zero, and no
/// such name in the directory. Such events are dropped: before, every file
/// installed into a watched directory cost a scan of a name that never exists
/// (1,600 of them on `gen.py small`). A real file spelled like that is reported
/// as usual; and dropping a write, mode or close event of a name that is gone
/// loses nothing, since whatever removed or renamed it is an event of its own.
fn is_unnamed(root: &Path, rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    is_unnamed_spelling(name.as_bytes())
        && std::fs::symlink_metadata(root.join(rel))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// `#<inode number>` as the kernel spells it (see [`is_unnamed`]).
fn is_unnamed_spelling(name: &[u8]) -> bool {
    match name {
        [b'#', b'1'..=b'9', rest @ ..] => rest.len() < 20 && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// `dir/name` as a relative path; `None` if the name is not UTF-8.
fn join(dir: &str, name: &OsStr) -> Option<String> {
    let name = name.to_str()?;
    Some(if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    })
}

/// The state directory at the root is never watched or reported.
fn skipped(rel: &str) -> bool {
    rel.split('/').next() == Some(STATE_DIR_NAME)
}

/// Reads every event queued now into `batch`; returns how many were read, or
/// `None` if the inotify descriptor failed.
fn read_queued(
    fd: &mut AsyncFd<Inotify>,
    tree: &mut Tree,
    buf: &mut [u8],
    batch: &mut Batch,
) -> Option<usize> {
    let mut n = tree.absorb_released(batch);
    loop {
        match fd.get_mut().read_events(buf) {
            Ok(events) => {
                for e in events {
                    n += 1;
                    tree.absorb(&e.wd, e.mask, e.name, batch);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading inotify events: {e}; changes are found by rescans only");
                return None;
            }
        }
    }
}

/// Waits until the inotify descriptor is readable (readiness reset first, so a
/// stale readiness does not spin); `false` if it failed.
async fn readable(fd: &mut AsyncFd<Inotify>) -> bool {
    match fd.readable_mut().await {
        Ok(mut guard) => {
            guard.clear_ready();
            true
        }
        Err(_) => false,
    }
}

async fn coalesce(
    mut fd: AsyncFd<Inotify>,
    mut tree: Tree,
    config: WatchConfig,
    out: mpsc::Sender<Batch>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut batch = Batch::default();
        let mut events = 0;
        // Wait for the first event of a batch, or for a file being written to
        // settle.
        while events == 0 {
            match read_queued(&mut fd, &mut tree, &mut buf, &mut batch) {
                Some(0) => {
                    let deferred = tree.deferred.clone();
                    let settles = tree.next_settled();
                    tokio::select! {
                        ok = readable(&mut fd) => if !ok {
                            return;
                        },
                        _ = deferred.released.notified() => {}
                        _ = async { match settles {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        } } => {
                            tree.settled(Instant::now(), &mut batch);
                            if !batch.paths.is_empty() {
                                break;
                            }
                        }
                    }
                }
                Some(n) => events = n,
                None => return,
            }
        }
        let opened = Instant::now();
        let mut last = opened;
        loop {
            let deadline = (last + config.quiet).min(opened + config.max_delay);
            let got = if events < BULK_EVENTS {
                // A few events (one edit): wake as soon as the next one comes, so
                // the batch closes `quiet` after the last event.
                match tokio::time::timeout_at(deadline, readable(&mut fd)).await {
                    Ok(true) => read_queued(&mut fd, &mut tree, &mut buf, &mut batch),
                    Ok(false) => None,
                    Err(_) => Some(0),
                }
            } else {
                // A bulk change (thousands of events a second): one wake-up per
                // quiet period, taking everything that came meanwhile.
                tokio::time::sleep_until(deadline).await;
                read_queued(&mut fd, &mut tree, &mut buf, &mut batch)
            };
            let Some(n) = got else {
                let _ = out.send(batch).await;
                return;
            };
            let now = Instant::now();
            if n > 0 {
                events += n;
                last = now;
            }
            if last + config.quiet <= now || opened + config.max_delay <= now {
                break;
            }
        }
        tree.settled(Instant::now(), &mut batch);
        if (!batch.paths.is_empty() || batch.rescan) && out.send(batch).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Batch>) -> Batch {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a batch in time")
            .expect("open")
    }

    /// Collects batches until `done` holds for their union.
    pub(crate) async fn until(
        rx: &mut mpsc::Receiver<Batch>,
        done: impl Fn(&BTreeSet<String>) -> bool,
    ) -> (BTreeSet<String>, usize) {
        let (mut all, mut n) = (BTreeSet::new(), 0);
        while !done(&all) {
            let b = next(rx).await;
            n += 1;
            all.extend(b.paths);
        }
        (all, n)
    }

    #[tokio::test]
    async fn writes_renames_dirs_and_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join(".dirsync")).unwrap();
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default(), Arc::default()).unwrap();
        std::fs::write(root.join(".dirsync/index.db"), b"x").unwrap();
        std::fs::write(root.join(".dirsync-tmp-1-f"), b"x").unwrap();
        std::fs::write(root.join("f.txt"), b"hello").unwrap();
        let (all, _) = until(&mut rx, |s| s.contains("f.txt")).await;
        assert!(all.iter().all(|p| !p.starts_with(".dirsync")), "{all:?}");

        // An editor's atomic save: write a temp name, rename over.
        std::fs::write(root.join("x.tmp"), b"new").unwrap();
        std::fs::rename(root.join("x.tmp"), root.join("x")).unwrap();
        until(&mut rx, |s| s.contains("x")).await;

        std::fs::create_dir(root.join("newdir")).unwrap();
        std::fs::write(root.join("newdir/inside.txt"), b"i").unwrap();
        until(&mut rx, |s| s.contains("newdir")).await;
    }

    #[tokio::test]
    async fn bursts_arrive_in_few_batches() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default(), Arc::default()).unwrap();
        std::fs::create_dir(root.join("burst")).unwrap();
        for i in 0..2000 {
            std::fs::write(root.join(format!("burst/{i}")), b"b").unwrap();
        }
        let (_, n) = until(&mut rx, |s| s.contains("burst") || s.contains("burst/1999")).await;
        assert!(n < 50, "{n} batches");
    }

    /// A renamed directory is watched under its new name (files written in it
    /// afterwards are reported there), and reading files reports nothing.
    #[tokio::test]
    async fn renamed_directories_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("old/deep")).unwrap();
        std::fs::write(root.join("old/deep/f"), b"f").unwrap();
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default(), Arc::default()).unwrap();
        std::fs::rename(root.join("old"), root.join("new")).unwrap();
        until(&mut rx, |s| s.contains("old") && s.contains("new")).await;
        std::fs::write(root.join("new/deep/g"), b"g").unwrap();
        let (all, _) = until(&mut rx, |s| s.contains("new/deep/g")).await;
        assert!(!all.iter().any(|p| p.starts_with("old/")), "{all:?}");

        // Reads (opens without writing) are not changes: nothing names the file
        // read until the write that follows the reads is reported.
        for _ in 0..10 {
            std::fs::read(root.join("new/deep/f")).unwrap();
        }
        std::fs::write(root.join("marker"), b"m").unwrap();
        let (all, _) = until(&mut rx, |s| s.contains("marker")).await;
        assert!(!all.contains("new/deep/f"), "{all:?}");
    }

    /// A directory held while it is created is neither watched nor reported;
    /// released, it is reported (and scanned by the engine), and watched from then
    /// on, below it too. A failed creation releases at once.
    #[tokio::test]
    async fn a_held_directory_is_watched_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let deferred = Arc::new(Deferred::default());
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default(), deferred.clone()).unwrap();
        let mut batch_dirs = Unwatched::none(&deferred);
        batch_dirs.merge(deferred.hold("made"));
        std::fs::create_dir(root.join("made")).unwrap();
        batch_dirs.merge(deferred.hold("made/sub"));
        std::fs::create_dir(root.join("made/sub")).unwrap();
        std::fs::write(root.join("made/sub/installed"), b"i").unwrap();
        std::fs::write(root.join("marker"), b"m").unwrap();
        let (all, _) = until(&mut rx, |s| s.contains("marker")).await;
        assert!(!all.iter().any(|p| p.starts_with("made")), "{all:?}");

        drop(batch_dirs);
        let (all, _) = until(&mut rx, |s| s.contains("made")).await;
        assert!(!all.contains("made/sub"), "covered by made: {all:?}");
        std::fs::write(root.join("made/sub/later"), b"l").unwrap();
        until(&mut rx, |s| s.contains("made/sub/later")).await;

        // Held, but the creation fails (it exists): released with the guard.
        std::fs::create_dir(root.join("taken")).unwrap();
        until(&mut rx, |s| s.contains("taken")).await;
        let held = deferred.hold("taken");
        assert!(std::fs::create_dir(root.join("taken")).is_err());
        drop(held);
        until(&mut rx, |s| s.contains("taken")).await;
        std::fs::write(root.join("taken/f"), b"f").unwrap();
        until(&mut rx, |s| s.contains("taken/f")).await;
        assert!(deferred.lock().held.is_empty());
    }

    /// A file still open after writing is not reported while other changes are;
    /// it is at its close, or once it has been quiet for `SETTLE` if it stays
    /// open; a link appears at once.
    #[tokio::test]
    async fn a_file_being_written_is_reported_once_closed_or_settled() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let deferred = Arc::new(Deferred::default());
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default(), deferred).unwrap();
        let mut open = std::fs::File::create(root.join("copying.bin")).unwrap();
        open.write_all(b"the first half").unwrap();
        std::os::unix::fs::symlink("copying.bin", root.join("link")).unwrap();
        std::fs::write(root.join("marker"), b"m").unwrap();
        let (all, _) = until(&mut rx, |s| s.contains("marker")).await;
        assert!(all.contains("link"), "{all:?}");
        assert!(!all.contains("copying.bin"), "half written: {all:?}");
        open.write_all(b", the second half").unwrap();
        drop(open);
        until(&mut rx, |s| s.contains("copying.bin")).await;

        let mut kept = std::fs::File::create(root.join("kept-open.log")).unwrap();
        kept.write_all(b"a line").unwrap();
        let since = Instant::now();
        until(&mut rx, |s| s.contains("kept-open.log")).await;
        assert!(since.elapsed() >= SETTLE - Duration::from_millis(50));
        drop(kept);
    }

    #[test]
    fn the_kernels_spelling_of_an_unnamed_file() {
        for name in ["#1", "#1791860", "#18446744073709551615"] {
            assert!(is_unnamed_spelling(name.as_bytes()), "{name}");
        }
        for name in [
            "#",
            "#0",
            "#01",
            "#+1",
            "#-1",
            "#1#",
            "#x1",
            "1",
            "a#1",
            "#123456789012345678901",
        ] {
            assert!(!is_unnamed_spelling(name.as_bytes()), "{name}");
        }
    }

    /// Without a watcher nothing is held (so nothing waits for a release).
    #[test]
    fn nothing_is_held_without_a_watcher() {
        let deferred = Arc::new(Deferred::default());
        let held = deferred.hold("d");
        assert!(!deferred.is_held("d"));
        drop(held);
        assert!(deferred.take_released().is_empty());
    }
}
