//! The sync engine of one node.
//!
//! - Local side: scans (whole tree, or the paths a watcher batch names) are compared
//!   with the index; differences become new local versions, committed in one
//!   transaction per batch and announced to subscribed peers through `seq`.
//! - Remote side ([`apply`]): a batch of a peer's records is planned with the pure
//!   [`crate::sync::diff::plan`], then executed: files come from a local file with
//!   the same content or over one QUIC stream each ([`transfer`]), are verified,
//!   fsynced and renamed into place; the results are committed with the peer's
//!   progress in one transaction.
//! - Locks ([`locks`]): a remote version of a locked path is fetched and verified
//!   as usual but staged in `STATE/staged/` and queued; an unlock applies the queue
//!   in order through the same steps.
//! - The folder marker (`DIR/.dirsync/folder-id`) guards against a vanished or
//!   unmounted directory being read as "everything was deleted".

pub mod apply;
pub mod delta;
pub mod io_queue;
pub mod locks;
pub mod session;
pub mod transfer;
mod unnamed;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use crate::events::{Event, EventKind};
use crate::hash::ContentHash;
use crate::ignore::IgnoreRules;
use crate::index::changes::{detect, within, Entries};
use crate::index::scan::{self, NotObserved, ScanContext};
use crate::index::store::{Proof, ScanReader, Seen, Snapshot};
use crate::index::{ScanError, StatKey, Store, StoreError, STATE_DIR_NAME};
use crate::sync::record::Kind;
use crate::wire::Timestamp;

/// Name of the folder marker file inside `DIR/.dirsync/`.
const MARKER: &str = "folder-id";
/// When a file changed while it was hashed, it is scanned again after this long.
const RECHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(200);
/// Blocking workers for small-file reads and writes (page-cache work, mostly).
const SMALL_IO_WORKERS: usize = 2;
/// The first scan of a new tree commits and announces a part once the walk has
/// found this many entries (at the end of a directory), each next part once it
/// has found twice as many as for the last, up to [`PART_FILES_MAX`], or sooner
/// when the files to hash add up to [`PART_BYTES`].
const FIRST_PART_FILES: usize = 256;
const PART_FILES_MAX: usize = 8192;
const PART_BYTES: u64 = 256 << 20;
/// A scan naming more paths than this (after our own echoes are dropped) walks
/// the whole tree instead.
const FULL_SCAN_ABOVE: usize = 2000;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the folder marker {marker} is missing or belongs to another index, but the index in {state} knows {files} files: the folder looks unmounted or replaced, so nothing is scanned (that would delete everything on every peer). Mount or restore the folder; if it really is a new, empty folder, remove {state}/index.db and this node will only receive")]
    MarkerMissing {
        marker: PathBuf,
        state: PathBuf,
        files: u64,
    },
    #[error(".dirsyncignore: {0}")]
    Ignore(String),
    #[error("engine task failed: {0}")]
    Join(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the engine wrote lately, path by path (its stat, or `None` for a
/// deletion): the watcher's events for these are our own echo. They are needed
/// only until the watcher has reported them, milliseconds later, so entries live
/// between one and two [`ECHO_MEMORY`] periods and are then forgotten: after a
/// bulk install of a million files the node does not keep a million paths.
/// Forgetting one early only costs a scan of that path, which finds it unchanged.
/// Aged by [`Engine::tidy`].
#[derive(Default)]
struct Written {
    recent: HashMap<String, Option<StatKey>>,
    older: HashMap<String, Option<StatKey>>,
    since: Option<Instant>,
}

/// How long the index must stay unchanged before freed memory is handed back.
const QUIET_BEFORE_TRIM: Duration = Duration::from_secs(5);

/// See [`Engine::tidy`].
struct Quiet {
    /// The index's sequence number at the last tick, and since when it is that.
    seq: Option<u64>,
    since: Instant,
    /// The sequence number memory was last handed back at.
    trimmed: Option<u64>,
}

impl Default for Quiet {
    fn default() -> Quiet {
        Quiet {
            seq: None,
            since: Instant::now(),
            trimmed: None,
        }
    }
}

/// How long the engine's own writes are remembered as such (see [`Written`]).
const ECHO_MEMORY: Duration = Duration::from_secs(10);
/// The most writes one generation of [`Written`] holds.
const ECHO_MEMORY_MAX: usize = 200_000;

impl Written {
    /// Moves on a generation when the current one is old enough; true if that
    /// forgot some writes.
    fn age(&mut self) -> bool {
        if self.recent.is_empty() && self.older.is_empty() {
            self.since = None;
            return false;
        }
        let now = Instant::now();
        match self.since {
            Some(t) if now.duration_since(t) < ECHO_MEMORY => false,
            Some(_) => {
                let forgot = !self.older.is_empty();
                self.older = std::mem::take(&mut self.recent);
                self.since = Some(now);
                forgot
            }
            None => {
                self.since = Some(now);
                false
            }
        }
    }
}

/// One node's sync engine; shared by the node's tasks.
pub struct Engine {
    name: String,
    root: PathBuf,
    /// The root directory, open (`O_PATH`), for creating files relative to it;
    /// opened again by every batch (so a folder remounted meanwhile is the one
    /// written to).
    root_dir: RwLock<Option<Arc<rustix::fd::OwnedFd>>>,
    state_dir: PathBuf,
    /// (dev, inode) of directories never scanned: the state dir and the marker dir.
    excluded: Vec<(u64, u64)>,
    store: Mutex<Store>,
    /// Directories an install is creating, which the watcher leaves alone until
    /// the install's batch is committed.
    pub(crate) deferred: Arc<crate::watch::Deferred>,
    /// The index read-only, for serving fetches without waiting for commits.
    pub(crate) reader: Mutex<crate::index::store::Reader>,
    /// Read-only connections for scans to compare the disk with, one for each
    /// scan running at once (opened when none is free).
    scan_readers: Mutex<Vec<ScanReader>>,
    ignore: RwLock<IgnoreRules>,
    /// Paths being installed from a peer (with how many batches claim each): scans
    /// leave them alone until committed.
    installing: Mutex<HashMap<String, usize>>,
    seq: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    /// Locked paths and when each expires (mirror of the store's locks table;
    /// taken before `installing` when both are needed).
    locks: Mutex<HashMap<String, Option<Timestamp>>>,
    /// Where staged versions of locked paths wait, inside the state dir.
    staging: PathBuf,
    /// What the engine itself just wrote: the watcher's events for it are
    /// recognised by a stat, without a scan.
    written: Mutex<Written>,
    /// When the index last changed and when freed memory was last handed back
    /// (see [`Engine::tidy`]).
    quiet: Mutex<Quiet>,
    /// Paths a scan found claimed by an install: looked at again once the last
    /// claim on each is released (taken after `installing`).
    after_install: Mutex<HashSet<String>>,
    /// Held while a lock's queue is applied: one release at a time.
    releases: tokio::sync::Mutex<()>,
    /// Set at start and by every release: interrupted or newly possible releases
    /// (locks marked releasing, queues without a lock) are looked for once.
    resume_releases: std::sync::atomic::AtomicBool,
    /// Transfers running and waiting, for status.
    pub(crate) transfers: transfer::Counters,
    /// Where small files are read (to serve them) and written (when received).
    pub(crate) small_io: io_queue::IoQueue,
    /// A handle on ourselves for delayed work; never keeps the engine alive.
    me: std::sync::Weak<Engine>,
    /// Run once between a scan's walk and its change detection (tests of races).
    #[cfg(test)]
    after_walk: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once just before a conflict moves the local version aside (tests).
    #[cfg(test)]
    pub(crate) before_move_aside: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// What a scan compares the disk with: a snapshot of the index, looked up path
/// by path as the walk meets them (`None`: a tree the index knows nothing of).
struct Ctx<'a> {
    snapshot: Option<&'a Snapshot<'a>>,
    /// The entries found exactly as indexed.
    seen: RefCell<Seen>,
    /// The last path looked up and its proof: a file is asked about twice in a
    /// row ([`ScanContext::cached_hash`], then [`ScanContext::unchanged`]).
    last: RefCell<(String, Option<(i64, Proof)>)>,
    /// Why a look-up failed, if one did: the scan is given up after its walk.
    failed: RefCell<Option<StoreError>>,
    ignore: &'a IgnoreRules,
    installing: &'a Mutex<HashMap<String, usize>>,
}

impl<'a> Ctx<'a> {
    /// A context for a scan of the `whole` tree, or of a few paths.
    fn new(
        snapshot: Option<&'a Snapshot<'a>>,
        whole: bool,
        ignore: &'a IgnoreRules,
        installing: &'a Mutex<HashMap<String, usize>>,
    ) -> Ctx<'a> {
        Ctx {
            seen: RefCell::new(snapshot.map_or(Seen::Set(HashSet::new()), |s| s.seen(whole))),
            snapshot,
            last: RefCell::new((String::new(), None)),
            failed: RefCell::default(),
            ignore,
            installing,
        }
    }

    /// `f` of `path`'s proof in the snapshot (with its row id), if it has one.
    fn with_proof<R>(&self, path: &str, f: impl FnOnce(Option<&(i64, Proof)>) -> R) -> R {
        let Some(snapshot) = self.snapshot else {
            return f(None);
        };
        let mut last = self.last.borrow_mut();
        if last.0 != path || last.0.is_empty() {
            let found = snapshot.proof(path).unwrap_or_else(|e| {
                self.failed.borrow_mut().get_or_insert(e);
                None
            });
            last.0.clear();
            last.0.push_str(path);
            last.1 = found;
        }
        f(last.1.as_ref())
    }

    /// What [`detect`] compares `observed` with: the entries of the observed
    /// paths, and those of the scanned scopes (`None`: the whole index) that the
    /// scan found neither observed nor as indexed. The ones it found as indexed
    /// are left out: a rescan of a large unchanged tree holds none of them.
    fn entries_for(
        &self,
        observed: &[scan::Observed],
        scopes: Option<&[&str]>,
    ) -> Result<Entries, EngineError> {
        if let Some(e) = self.failed.borrow_mut().take() {
            return Err(e.into());
        }
        let Some(snapshot) = self.snapshot else {
            return Ok(Entries::default());
        };
        let mut seen = self.seen.borrow_mut();
        let mut list = Vec::new();
        for obs in observed {
            if let Some((id, entry)) = snapshot.get(&obs.path)? {
                seen.insert(id);
                list.push(entry);
            }
        }
        match scopes {
            None => snapshot.each_unseen(None, &seen, &mut |e| list.push(e))?,
            Some(scopes) => {
                for scope in scopes {
                    snapshot.each_unseen(Some(scope), &seen, &mut |e| list.push(e))?;
                }
            }
        }
        Ok(Entries::new(list))
    }
}

impl ScanContext for Ctx<'_> {
    fn cached_hash(&self, path: &str, stat: &StatKey) -> Option<ContentHash> {
        self.with_proof(path, |found| {
            found
                .map(|(_, p)| p)
                .filter(|p| !p.deleted && p.stat.as_ref() == Some(stat))
                .map(|p| p.hash)
        })
    }
    fn unchanged(&self, obs: &scan::Observed) -> bool {
        let id = self.with_proof(&obs.path, |found| {
            found
                .filter(|(_, p)| crate::index::changes::proven_unchanged(p, obs))
                .map(|(id, _)| *id)
        });
        if let Some(id) = id {
            self.seen.borrow_mut().insert(id);
        }
        id.is_some()
    }
    fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
        self.ignore.is_ignored(path, is_dir)
    }
    fn is_claimed(&self, path: &str) -> bool {
        self.installing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(path)
    }
}

impl Engine {
    /// Opens the index in `state_dir` for the tree at `root`, checking the folder
    /// marker, and cleans temporary files a crash may have left.
    pub fn open(name: &str, root: &Path, state_dir: &Path) -> Result<Arc<Engine>, EngineError> {
        std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let store = Store::open(&state_dir.join("index.db"))?;
        let reader = crate::index::store::Reader::open(&state_dir.join("index.db"))?;
        let marker_dir = root.join(STATE_DIR_NAME);
        let marker = marker_dir.join(MARKER);
        let id_hex: String = store
            .index_id()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (files, _) = store.totals()?;
        match std::fs::read_to_string(&marker) {
            Ok(found) if found.trim() == id_hex => {}
            _ if store.max_seq() > 0 => {
                return Err(EngineError::MarkerMissing {
                    marker,
                    state: state_dir.to_path_buf(),
                    files,
                })
            }
            _ => {
                std::fs::create_dir_all(&marker_dir).map_err(io_err(&marker_dir))?;
                std::fs::write(&marker, format!("{id_hex}\n")).map_err(io_err(&marker))?;
            }
        }
        let excluded = [state_dir, marker_dir.as_path()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let ignore = IgnoreRules::load(root).map_err(|e| EngineError::Ignore(e.to_string()))?;
        let removed = apply::clean_temp_files(root);
        if removed > 0 {
            tracing::info!("removed {removed} temporary files left by an interrupted transfer");
        }
        let staging = state_dir.join(locks::STAGING_DIR);
        let locked = locks::open_staging(&store, &staging)?;
        let (seq, _) = watch::channel(store.max_seq());
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new_cyclic(|me| Engine {
            name: name.to_string(),
            root: root.to_path_buf(),
            root_dir: RwLock::new(None),
            state_dir: state_dir.to_path_buf(),
            excluded,
            store: Mutex::new(store),
            reader: Mutex::new(reader),
            scan_readers: Mutex::default(),
            deferred: Arc::default(),
            ignore: RwLock::new(ignore),
            installing: Mutex::default(),
            seq,
            events,
            locks: Mutex::new(locked),
            staging,
            written: Mutex::default(),
            after_install: Mutex::default(),
            quiet: Mutex::default(),
            small_io: io_queue::IoQueue::new(SMALL_IO_WORKERS),
            releases: tokio::sync::Mutex::new(()),
            resume_releases: std::sync::atomic::AtomicBool::new(true),
            transfers: transfer::Counters::default(),
            me: me.clone(),
            #[cfg(test)]
            after_walk: Mutex::default(),
            #[cfg(test)]
            before_move_aside: Mutex::default(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The highest local sequence number; changes when the index changes.
    pub fn seq(&self) -> watch::Receiver<u64> {
        self.seq.subscribe()
    }

    /// Everything the node does from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Runs `f` on the store on a blocking thread (SQLite calls may fsync).
    pub(crate) async fn with_store<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = me.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut store)
        })
        .await
        .map_err(|e| EngineError::Join(e.to_string()))
    }

    /// Claims `paths` for an install: scans leave them alone, and locks are neither
    /// taken nor released on them, until the guard drops. Returns the guard and
    /// the locked paths.
    /// A path another batch is installing right now is not claimed but returned in
    /// `busy`: one install per path at a time, so two peers' versions never race on
    /// one file (the busy record is retried shortly).
    pub(crate) fn claim(self: &Arc<Self>, paths: Vec<String>) -> Claim {
        let mut guard = InstallGuard {
            engine: self.clone(),
            paths: Vec::new(),
        };
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let mut busy = Vec::new();
        {
            let mut map = self.installing.lock().unwrap_or_else(|p| p.into_inner());
            for p in paths {
                if map.contains_key(&p) {
                    busy.push(p);
                } else {
                    map.insert(p.clone(), 1);
                    guard.paths.push(p);
                }
            }
        }
        drop(locks);
        Claim { guard, busy }
    }

    /// Adds `paths` to a claim; returns every locked path (a snapshot that holds
    /// for the claimed paths until the guard drops).
    pub(crate) fn claim_more(
        &self,
        guard: &mut InstallGuard,
        paths: Vec<String>,
    ) -> HashSet<String> {
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        guard.add(paths);
        locks.keys().cloned().collect()
    }

    /// Every locked path.
    pub(crate) fn locked_paths(&self) -> Vec<String> {
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.keys().cloned().collect()
    }

    /// Opens the root directory again for the files a batch creates (see
    /// `apply::Target::create_temp`).
    pub(crate) fn open_root_dir(&self) {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = rustix::fs::open(&self.root, flags, Mode::empty())
            .ok()
            .map(Arc::new);
        *self.root_dir.write().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// The root directory open: as the last batch opened it, or opened now if
    /// none has yet.
    pub(crate) fn root_dir_or_open(&self) -> Option<Arc<rustix::fd::OwnedFd>> {
        if let Some(dir) = self.root_dir() {
            return Some(dir);
        }
        self.open_root_dir();
        self.root_dir()
    }

    /// The root directory as the current batch opened it.
    pub(crate) fn root_dir(&self) -> Option<Arc<rustix::fd::OwnedFd>> {
        self.root_dir
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_claimed(&self, path: &str) -> bool {
        self.installing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(path)
    }

    /// Remembers what the engine wrote, so the watcher's echo of it costs a stat.
    pub(crate) fn remember_written(
        &self,
        written: impl IntoIterator<Item = (String, Option<StatKey>)>,
    ) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if w.recent.len() > ECHO_MEMORY_MAX {
            // Bounded even if the tick that ages it falls behind.
            w.older = std::mem::take(&mut w.recent);
        }
        w.recent.extend(written);
    }

    /// Housekeeping, run on the node's periodic tick: forgets the engine's writes
    /// older than [`ECHO_MEMORY`], and once the index has stayed unchanged for
    /// [`QUIET_BEFORE_TRIM`] after changing (a bulk sync or scan is over), hands
    /// the memory it freed back to the system (see [`crate::memory`]): a node
    /// that once synced 100,000 files would otherwise stay at its peak size.
    /// It also ends the fetch reader's read transaction once it is stale (see
    /// [`crate::index::store::SNAPSHOT_FOR`]), so an idle node holds none.
    pub(crate) fn tidy(&self) {
        let forgot = self.written.lock().unwrap_or_else(|p| p.into_inner()).age();
        // Not waited for: a fetch holding it is done in microseconds, and the
        // next tick comes.
        if let Ok(mut reader) = self.reader.try_lock() {
            reader.end_stale_snapshot();
        }
        let seq = *self.seq.borrow();
        let now = Instant::now();
        let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        if forgot {
            // What was just forgotten is handed back too.
            quiet.trimmed = None;
        }
        if quiet.seq != Some(seq) {
            quiet.seq = Some(seq);
            quiet.since = now;
        } else if quiet.trimmed != Some(seq)
            && now.duration_since(quiet.since) >= QUIET_BEFORE_TRIM
            && self
                .transfers
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        {
            quiet.trimmed = Some(seq);
            tokio::task::spawn_blocking(crate::memory::release_freed);
        }
    }

    /// Forgets what the engine last wrote at `path`: its next event or recheck is
    /// a real scan.
    pub(crate) fn forget_written(&self, path: &str) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        w.recent.remove(path);
        w.older.remove(path);
    }

    /// Whether `path` is still exactly what the engine last wrote there (then a
    /// watcher event for it is our own echo and needs no scan).
    fn is_echo(&self, path: &str) -> bool {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let Some(expected) = w.recent.get(path).or_else(|| w.older.get(path)) else {
            return false;
        };
        let now = self.root.join(path).symlink_metadata();
        let same = match (expected, now) {
            (Some(stat), Ok(m)) => StatKey::of(&m) == *stat,
            (None, Err(e)) => e.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        };
        if !same {
            w.recent.remove(path);
            w.older.remove(path);
        }
        same
    }

    fn marker_present(&self) -> bool {
        self.root.join(STATE_DIR_NAME).join(MARKER).is_file()
    }

    /// The index record of `path`, if any (for diagnostics and tests).
    pub async fn record(
        self: &Arc<Self>,
        path: &str,
    ) -> Result<Option<crate::sync::record::Record>, EngineError> {
        let path = path.to_string();
        Ok(self
            .with_store(move |s| s.get(&path))
            .await??
            .map(|e| e.record))
    }

    /// This node's own regular files, from the index (for listings).
    pub async fn local_files(self: &Arc<Self>) -> Result<Vec<crate::wire::FileEntry>, EngineError> {
        let records = self.with_store(|s| s.live_files()).await??;
        Ok(records
            .into_iter()
            .map(|r| crate::wire::FileEntry {
                path: r.path,
                size: r.size,
                modified: r.modified,
                hash: r.hash,
            })
            .collect())
    }

    /// Number of live files and their bytes.
    pub async fn totals(self: &Arc<Self>) -> Result<(u64, u64), EngineError> {
        Ok(self.with_store(|s| s.totals()).await??)
    }

    /// Whether `path` is ignored here (by `.dirsyncignore` or built-in rules).
    pub fn is_ignored(&self, path: &str, is_dir: bool) -> bool {
        self.ignore
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_ignored(path, is_dir)
    }

    /// Re-reads `.dirsyncignore` (after it changed).
    pub fn reload_ignore(&self) {
        match IgnoreRules::load(&self.root) {
            Ok(rules) => *self.ignore.write().unwrap_or_else(|p| p.into_inner()) = rules,
            Err(e) => tracing::warn!("{}: .dirsyncignore not reloaded: {e}", self.name),
        }
    }

    /// Scans the whole tree (`scopes` None) or the given paths and the subtrees
    /// below them, and commits what changed as new local versions, in one
    /// transaction. Returns the number of new versions.
    pub async fn scan(self: &Arc<Self>, scopes: Option<Vec<String>>) -> Result<usize, EngineError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.scan_blocking(scopes.as_deref()))
            .await
            .map_err(|e| EngineError::Join(e.to_string()))?
    }

    /// Files still being written are looked at again shortly, even if no further
    /// event comes (the last write may have landed while they were hashed).
    fn recheck_later(&self, paths: Vec<String>) {
        self.scan_after(paths, RECHECK_AFTER);
    }

    /// Looks at `paths` again once no install claims them any more: a scan that
    /// met them mid-install could not tell a local edit from the install itself.
    /// Waiting for the release (instead of polling) keeps a bulk transfer from
    /// rescanning its own files every few hundred milliseconds.
    pub(crate) fn recheck_after_install(&self, paths: Vec<String>) {
        let installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let mut waiting = self.after_install.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = Vec::new();
        for p in paths {
            if installing.contains_key(&p) {
                waiting.insert(p);
            } else {
                now.push(p);
            }
        }
        drop(waiting);
        drop(installing);
        self.scan_soon(now);
    }

    /// Scans `paths` now, as a background task.
    fn scan_soon(&self, paths: Vec<String>) {
        self.scan_after(paths, std::time::Duration::ZERO);
    }

    /// Scans `paths` (if any) after `delay`, as a background task.
    fn scan_after(&self, paths: Vec<String>, delay: std::time::Duration) {
        if paths.is_empty() {
            return;
        }
        let (Ok(rt), Some(me)) = (tokio::runtime::Handle::try_current(), self.me.upgrade()) else {
            return; // no runtime (shutting down): the start-up scan covers it
        };
        rt.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = me.scan(Some(paths)).await {
                tracing::debug!("{}: recheck: {e}", me.name);
            }
        });
    }

    fn scan_blocking(&self, scopes: Option<&[String]>) -> Result<usize, EngineError> {
        if !self.marker_present() {
            let (files, _) = self
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .totals()?;
            return Err(EngineError::MarkerMissing {
                marker: self.root.join(STATE_DIR_NAME).join(MARKER),
                state: self.state_dir.clone(),
                files,
            });
        }
        // Nested scopes are covered by their ancestors; our own writes are not
        // scanned again; a file an install holds right now is looked at when the
        // install lets go (a scan would only skip it). A directory is scanned now:
        // it is cheapest while the install is still filling it.
        let mut wait_for_install = Vec::new();
        let scopes: Option<Vec<&str>> = scopes.map(|list| {
            let installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
            let mut sorted: Vec<&str> = list
                .iter()
                .map(String::as_str)
                .filter(|p| !self.is_echo(p))
                .filter(|p| {
                    let held = installing.contains_key(*p)
                        && !self
                            .root
                            .join(p)
                            .symlink_metadata()
                            .is_ok_and(|m| m.is_dir());
                    if held {
                        wait_for_install.push(p.to_string());
                    }
                    !held
                })
                .collect();
            sorted.sort_unstable();
            sorted.dedup();
            let mut kept: Vec<&str> = Vec::new();
            for s in sorted {
                if !kept.last().is_some_and(|k| within(s, k)) {
                    kept.push(s);
                }
            }
            kept
        });
        self.recheck_after_install(wait_for_install);
        // Many paths left after dropping our echoes: one walk of the tree is
        // cheaper than as many scoped look-ups.
        let scopes = scopes.filter(|list| list.len() <= FULL_SCAN_ABOVE);
        if scopes.as_ref().is_some_and(|list| list.is_empty()) {
            return Ok(0);
        }
        let pooled = self
            .scan_readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut reader = match pooled {
            Some(r) => r,
            None => ScanReader::open(&self.state_dir.join("index.db"))?,
        };
        let scanned = self.scan_against(&mut reader, scopes.as_deref());
        self.scan_readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reader);
        scanned
    }

    /// [`Engine::scan_blocking`] of `scopes` (`None`: the whole tree), compared
    /// with a snapshot of the index read through `reader`.
    fn scan_against(
        &self,
        reader: &mut ScanReader,
        scopes: Option<&[&str]>,
    ) -> Result<usize, EngineError> {
        let snapshot = reader.snapshot()?;
        let seq_read = snapshot.max_seq();
        let ignore = self.ignore.read().unwrap_or_else(|p| p.into_inner());
        if scopes.is_none() && snapshot.is_empty() {
            drop(snapshot);
            let ctx = Ctx::new(None, true, &ignore, &self.installing);
            return self.index_new_tree(&Entries::default(), seq_read, &ctx, &ignore);
        }
        let ctx = Ctx::new(Some(&snapshot), scopes.is_none(), &ignore, &self.installing);
        let mut observed: Vec<scan::Observed> = Vec::new();
        let mut missed = NotObserved::default();
        let roots: Vec<Option<&str>> = match scopes {
            None => vec![None],
            Some(list) => list.iter().map(|s| Some(*s)).collect(),
        };
        for scope in roots {
            let outcome = scan::scan(&self.root, scope, &self.excluded, &ctx)?;
            let more = outcome.entries_logged(&self.name, &mut missed);
            if observed.is_empty() {
                observed = more; // a full scan's one list, not copied
            } else {
                observed.extend(more);
            }
        }
        self.after_walk_hook();
        let entries = ctx.entries_for(&observed, scopes)?;
        drop(ctx);
        // The index is compared with as it was; what moved on since is caught below.
        drop(snapshot);
        self.version_observed(observed, missed, &entries, seq_read, scopes, &ignore)
            .map(|(n, _)| n)
    }

    /// Runs the test hook set for the moment between a scan's walk and its commit.
    fn after_walk_hook(&self) {
        #[cfg(test)]
        {
            // Taken out first: the hook may scan again.
            let hook = self
                .after_walk
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    /// The first scan of a tree the index knows nothing of (a new node on an
    /// existing folder): everything found is new, so nothing can read as deleted
    /// or renamed, and what the walk finds is hashed, committed and announced part
    /// by part while it goes on. Peers start fetching after the first part, not
    /// after the whole tree is walked and hashed (hours, for a photo library).
    fn index_new_tree(
        &self,
        entries: &Entries,
        seq_read: u64,
        ctx: &Ctx<'_>,
        ignore: &IgnoreRules,
    ) -> Result<usize, EngineError> {
        let mut parts = Parts {
            seq_read,
            files: FIRST_PART_FILES,
            changed: 0,
            failed: None,
            first: true,
        };
        let mut flush = |found: &mut scan::ScanOutcome| {
            if found.to_hash.len() + found.entries.len() < parts.files
                && found.to_hash_bytes < PART_BYTES
            {
                return true;
            }
            let part = std::mem::take(found);
            match self.commit_part(part, entries, &mut parts, ignore) {
                Ok(()) => true,
                Err(e) => {
                    parts.failed = Some(e);
                    false
                }
            }
        };
        let rest = scan::walk(&self.root, None, &self.excluded, ctx, Some(&mut flush))?;
        if let Some(e) = parts.failed.take() {
            return Err(e);
        }
        self.commit_part(rest, entries, &mut parts, ignore)?;
        Ok(parts.changed)
    }

    /// Hashes, versions and commits one part of a new tree's first scan.
    fn commit_part(
        &self,
        mut part: scan::ScanOutcome,
        entries: &Entries,
        parts: &mut Parts,
        ignore: &IgnoreRules,
    ) -> Result<(), EngineError> {
        if std::mem::take(&mut parts.first) {
            self.after_walk_hook();
        }
        part.hash_found(&self.root);
        let mut missed = NotObserved::default();
        let observed = part.entries_logged(&self.name, &mut missed);
        let (n, seq) =
            self.version_observed(observed, missed, entries, parts.seq_read, None, ignore)?;
        parts.changed += n;
        parts.seq_read = seq;
        parts.files = (parts.files * 2).min(PART_FILES_MAX);
        Ok(())
    }

    /// Versions what a scan observed against the index `entries` it was compared
    /// with (read when the index's highest sequence was `seq_read`) and commits the
    /// changes. Returns how many there were and the sequence to compare a further
    /// part of the same scan with.
    fn version_observed(
        &self,
        observed: Vec<scan::Observed>,
        missed: NotObserved,
        entries: &Entries,
        seq_read: u64,
        scopes: Option<&[&str]>,
        ignore: &IgnoreRules,
    ) -> Result<(usize, u64), EngineError> {
        let in_scope = |p: &str| scopes.is_none_or(|list| list.iter().any(|s| within(p, s)));
        let installing: HashSet<String> = self
            .installing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        // An ignored path is left alone, never taken as deleted: ignoring something
        // stops syncing it, it does not delete it on peers. Unobserved paths are
        // checked both as file and as directory (`build/` only matches a dir).
        // A file that changed while hashed was not observed this time, but is not
        // deleted either: the recheck decides. Nor is what could not be read (an
        // unreadable folder must not delete the peers' copies of what is in it).
        // Claimed paths are skipped as being installed, including those the walk
        // met claimed whose install ended before `installing` was read above.
        let NotObserved {
            unstable,
            mut claimed,
            unreadable,
        } = missed;
        let not_observed: HashSet<&str> = unstable
            .iter()
            .chain(&claimed)
            .map(String::as_str)
            .collect();
        let skip = |p: &str| {
            installing.contains(p)
                || not_observed.contains(p)
                || unreadable.iter().any(|u| within(p, u))
                || ignore.is_ignored(p, false)
                || ignore.is_ignored(p, true)
        };
        // A local change to a path that is being installed is not versioned now
        // (the install would race it); look again once the install is over, so the
        // change is never left unindexed until the next full rescan. A directory
        // only counts if it stopped being one or its mode changed: its mtime moves
        // with every file installed into it, and rechecking it means walking it.
        let deferred = observed
            .iter()
            .filter(|o| installing.contains(&o.path))
            .filter(|o| match (o.kind, entries.get(&o.path)) {
                (Kind::Dir, None) => false,
                (Kind::Dir, Some(e)) => e.record.kind != Kind::Dir || e.record.mode != o.mode,
                (_, e) => o.stat.is_none() || e.and_then(|e| e.stat) != o.stat,
            })
            .map(|o| o.path.clone())
            .collect::<Vec<_>>();
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        let mut changes = detect(&self.name, entries, &observed, &in_scope, now, &skip);
        drop(not_observed);
        claimed.extend(deferred);
        self.recheck_after_install(claimed);
        if !unstable.is_empty() {
            self.recheck_later(unstable);
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        // The entries were read before the walk: a path a peer's batch installed
        // meanwhile has moved on in the index, and comparing the disk with the stale
        // entry would invent a local edit concurrent with the peer's version. Such
        // paths are left for a recheck against the fresh entry. Every change of a
        // record takes a new sequence number: if the highest is the one seen when
        // the entries were read, no entry moved on (and no path needs a look-up).
        let mut raced = Vec::new();
        let moved_on = store.max_seq() != seq_read;
        if moved_on {
            changes.updates.retain(|u| {
                let before = entries.get(&u.record.path).map(|e| e.record.seq);
                let now = store
                    .get(&u.record.path)
                    .ok()
                    .map(|e| e.map(|e| e.record.seq));
                let same = now == Some(before);
                if !same {
                    raced.push(u.record.path.clone());
                }
                same
            });
            changes.refreshed.retain(|(path, _)| {
                let before = entries.get(path).map(|e| e.record.seq);
                store.get(path).ok().map(|e| e.map(|e| e.record.seq)) == Some(before)
            });
        }
        if !raced.is_empty() {
            tracing::debug!(
                "{}: {} paths changed in the index during a scan; rechecking",
                self.name,
                raced.len()
            );
            self.recheck_later(raced);
        }
        for (path, stat) in &changes.refreshed {
            store.refresh_stat(path, stat)?;
        }
        if changes.updates.is_empty() {
            return Ok((0, seq_read));
        }
        let max = store.commit(&changes.updates, None)?;
        // Only our own commit moved the index on: a further part compares with it.
        // Otherwise the next part checks its paths against the index again.
        let seq_next = if moved_on { seq_read } else { max };
        for u in changes.updates.iter().take(20) {
            tracing::debug!(
                "{}: indexed {} at {} ({} bytes{}{})",
                self.name,
                u.record.path,
                u.record.version,
                u.record.size,
                if u.record.deleted { ", deleted" } else { "" },
                if u.stat.is_none() { ", unproven" } else { "" }
            );
        }
        drop(store);
        let n = changes.updates.len();
        let summary = if n <= 3 {
            let names: Vec<String> = changes
                .updates
                .iter()
                .map(|u| {
                    format!(
                        "{}{}",
                        if u.record.deleted { "-" } else { "+" },
                        u.record.path
                    )
                })
                .collect();
            format!("local changes: {}", names.join(" "))
        } else {
            format!("{n} local changes")
        };
        self.emit(Event::new(&self.name, EventKind::LocalChanges).detail(summary));
        self.seq.send_replace(max);
        Ok((n, seq_next))
    }
}

/// Where the first scan of a new tree is, between its parts.
struct Parts {
    /// The index's highest sequence the next part is compared with.
    seq_read: u64,
    /// The next part's size, in entries.
    files: usize,
    /// New versions so far.
    changed: usize,
    /// Why the walk was stopped.
    failed: Option<EngineError>,
    /// No part committed yet.
    first: bool,
}

/// What [`Engine::claim`] got: the guard, and the paths that were busy (not
/// claimed).
pub(crate) struct Claim {
    pub(crate) guard: InstallGuard,
    pub(crate) busy: Vec<String>,
}

/// Paths claimed by one batch being installed; released when dropped (also on an
/// early error return, so a failed batch never leaves paths unscanned forever).
pub(crate) struct InstallGuard {
    engine: Arc<Engine>,
    paths: Vec<String>,
}

impl InstallGuard {
    pub(crate) fn add(&mut self, paths: Vec<String>) {
        let mut map = self
            .engine
            .installing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for p in &paths {
            *map.entry(p.clone()).or_default() += 1;
        }
        self.paths.extend(paths);
    }
}

impl Drop for InstallGuard {
    fn drop(&mut self) {
        let mut map = self
            .engine
            .installing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut waiting = self
            .engine
            .after_install
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut recheck = Vec::new();
        for p in &self.paths {
            if let Some(n) = map.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    map.remove(p);
                    if waiting.remove(p) {
                        recheck.push(p.clone());
                    }
                }
            }
        }
        drop(waiting);
        drop(map);
        self.engine.scan_soon(recheck);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_writes_are_remembered_for_one_to_two_periods() {
        let mut w = Written::default();
        let one_period_ago = |w: &Written| w.since.and_then(|t| t.checked_sub(ECHO_MEMORY));
        w.recent.insert("f".into(), None);
        assert!(!w.age()); // the period starts
        assert!(w.recent.contains_key("f"));
        assert!(!w.age()); // not over yet
        assert!(w.recent.contains_key("f"));
        w.since = one_period_ago(&w);
        assert!(!w.age(), "still remembered, as older");
        assert!(w.recent.is_empty() && w.older.contains_key("f"));
        w.since = one_period_ago(&w);
        assert!(w.age(), "forgotten");
        assert!(w.recent.is_empty() && w.older.is_empty());
        assert!(!w.age());
        assert_eq!(w.since, None, "nothing left: no period running");
    }

    async fn indexed(engine: &Arc<Engine>, path: &str) -> Option<crate::sync::record::Record> {
        engine.record(path).await.unwrap()
    }

    /// An engine over an empty `root` in a temp dir (kept alive by the guard).
    fn fresh_engine() -> (tempfile::TempDir, PathBuf, Arc<Engine>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let engine = Engine::open("a", &root, &root.join(STATE_DIR_NAME)).unwrap();
        (dir, root, engine)
    }

    /// A rescan of a tree found exactly as indexed holds nothing of it but one
    /// bit per entry: files (proven by their cached hash), directories and links
    /// alike are neither observed in full nor handed to change detection.
    #[tokio::test]
    async fn a_rescan_of_an_unchanged_tree_holds_no_entry() {
        let (_dir, root, engine) = fresh_engine();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for d in 0..3 {
            std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
            for f in 0..5 {
                let path = root.join(format!("d{d}/f{f}"));
                std::fs::write(&path, format!("{d}/{f}")).unwrap();
                // Older than the racy window, so its hash is trusted later.
                let file = std::fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(old).unwrap();
            }
        }
        std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
        assert_eq!(engine.scan(None).await.unwrap(), 19);
        let mut reader = ScanReader::open(&engine.state_dir.join("index.db")).unwrap();
        let snapshot = reader.snapshot().unwrap();
        assert!(!snapshot.is_empty());
        let ignore = engine.ignore.read().unwrap();
        let installing = Mutex::default();
        let ctx = Ctx::new(Some(&snapshot), true, &ignore, &installing);
        let out = scan::scan(&root, None, &engine.excluded, &ctx).unwrap();
        assert!(
            out.entries.is_empty(),
            "observed in full: {:?}",
            out.entries
        );
        assert_eq!(out.hashed_files, 0);
        let entries = ctx.entries_for(&out.entries, None).unwrap();
        assert!(entries.is_empty(), "all 19 were found as indexed");

        // One file gone and one changed: only their two entries are compared.
        std::fs::remove_file(root.join("d1/f1")).unwrap();
        std::fs::write(root.join("d2/f2"), b"changed").unwrap();
        let ctx = Ctx::new(Some(&snapshot), true, &ignore, &installing);
        let out = scan::scan(&root, None, &engine.excluded, &ctx).unwrap();
        let observed: Vec<&str> = out.entries.iter().map(|o| o.path.as_str()).collect();
        // d1 itself changed too (its mtime moved with the removal).
        assert_eq!(observed, ["d1", "d2/f2"]);
        let entries = ctx.entries_for(&out.entries, None).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.record.path.as_str()).collect();
        assert_eq!(paths, ["d1", "d1/f1", "d2/f2"]);
    }

    /// A scan that meets a path mid-install leaves it alone, and the path is looked
    /// at again as soon as the install lets go of it, with no further event.
    #[tokio::test]
    async fn a_path_met_mid_install_is_rescanned_when_the_install_ends() {
        let (_dir, root, engine) = fresh_engine();
        engine.scan(None).await.unwrap();
        let claim = engine.claim(vec!["f.txt".to_string()]);
        assert!(claim.busy.is_empty());
        std::fs::write(root.join("f.txt"), b"written during an install").unwrap();
        engine.scan(Some(vec!["f.txt".to_string()])).await.unwrap();
        assert!(
            indexed(&engine, "f.txt").await.is_none(),
            "claimed: not indexed yet"
        );
        drop(claim.guard);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(e) = indexed(&engine, "f.txt").await {
                assert_eq!(e.size, 25);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never rescanned");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A file indexed as live, met claimed by the walk, whose install lets go
    /// before the scan compares: it was not observed, and must not be taken as
    /// deleted (seen in CI: the node then deleted a file it had just received).
    #[tokio::test]
    async fn a_claim_released_mid_scan_is_not_a_deletion() {
        let (_dir, root, engine) = fresh_engine();
        std::fs::write(root.join("f.txt"), b"installed").unwrap();
        engine.scan(None).await.unwrap();
        assert!(indexed(&engine, "f.txt").await.is_some_and(|r| !r.deleted));
        let claim = engine.claim(vec!["f.txt".to_string()]);
        assert!(claim.busy.is_empty());
        let guard = claim.guard;
        *engine.after_walk.lock().unwrap() = Some(Box::new(move || drop(guard)));
        engine.scan(None).await.unwrap();
        assert!(engine.after_walk.lock().unwrap().is_none(), "hook ran");
        let record = indexed(&engine, "f.txt").await.unwrap();
        assert!(!record.deleted, "taken as deleted: {record:?}");
    }

    /// The first scan of a tree the index knows nothing of is committed in
    /// growing parts (peers fetch from the first on), and versions every path
    /// once, even when another scan indexes the same tree meanwhile.
    #[tokio::test]
    async fn a_new_tree_is_indexed_in_parts_each_path_versioned_once() {
        let (_dir, root, engine) = fresh_engine();
        for d in 0..10 {
            std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
            for f in 0..100 {
                std::fs::write(root.join(format!("d{d}/f{f}.txt")), format!("{d}/{f}")).unwrap();
            }
        }
        let mut events = engine.events();
        let mut seq = engine.seq();
        assert_eq!(engine.scan(None).await.unwrap(), 1010);
        let mut parts = Vec::new();
        while let Ok(e) = events.try_recv() {
            if matches!(e.event, EventKind::LocalChanges) {
                parts.push(e.detail.clone().unwrap_or_default());
            }
        }
        // A part closes at the end of a directory: the root's 10 directories and
        // three directories of files (256 entries or more), then six (512 or
        // more), then the last one.
        assert_eq!(
            parts,
            [
                "310 local changes",
                "600 local changes",
                "100 local changes"
            ]
        );
        assert_eq!(*seq.borrow_and_update(), 1010);
        for d in 0..10 {
            let r = indexed(&engine, &format!("d{d}/f99.txt")).await.unwrap();
            assert_eq!((r.version.get("a"), r.deleted), (1, false));
        }
        assert_eq!(
            engine.scan(None).await.unwrap(),
            0,
            "a second scan finds nothing"
        );

        // Another scan of the same new tree commits between the walk and the
        // parts: nothing is versioned twice.
        let (_dir, root, engine) = fresh_engine();
        for f in 0..600 {
            std::fs::write(root.join(format!("f{f}.txt")), format!("{f}")).unwrap();
        }
        let other = engine.clone();
        *engine.after_walk.lock().unwrap() = Some(Box::new(move || {
            assert_eq!(other.scan_blocking(None).unwrap(), 600);
        }));
        engine.scan(None).await.unwrap();
        assert!(engine.after_walk.lock().unwrap().is_none(), "hook ran");
        assert_eq!(*engine.seq().borrow(), 600, "one version per path");
        let r = indexed(&engine, "f599.txt").await.unwrap();
        assert_eq!(r.version.get("a"), 1);
    }

    /// What exists but cannot be read (a folder or a file without permission) is
    /// not observed, and must not be versioned as deleted: that would delete the
    /// peers' copies. (Run as root, the test drops the capabilities that bypass
    /// permissions, for its own thread and the threads it starts.)
    #[test]
    fn unreadable_entries_are_not_deletions() {
        use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("private")).unwrap();
        std::fs::write(root.join("private/a.txt"), b"in a folder").unwrap();
        std::fs::write(root.join("secret.txt"), b"a file").unwrap();
        let mut caps = capabilities(None).unwrap();
        caps.effective -= CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH;
        set_capabilities(None, caps).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mode = |p: &str, m: u32| {
            std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        rt.block_on(async {
            let engine = Engine::open("a", &root, &root.join(STATE_DIR_NAME)).unwrap();
            engine.scan(None).await.unwrap();
            mode("private", 0o000);
            mode("secret.txt", 0o000);
            let denied = std::fs::read(root.join("secret.txt")).unwrap_err();
            assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
            engine.scan(None).await.unwrap();
            for path in ["private/a.txt", "secret.txt"] {
                let record = indexed(&engine, path).await.unwrap();
                assert!(!record.deleted, "{path} taken as deleted");
            }
        });
        mode("private", 0o755);
        mode("secret.txt", 0o644);
    }
}
