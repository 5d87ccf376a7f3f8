//! File locks with a staged FIFO queue.
//!
//! A client locks a path on this node. While it is locked, a remote version of the
//! path is fetched and verified as usual, but written to `STATE/staged/` (fsynced,
//! then renamed to its final name) and appended to the path's queue in the same
//! transaction that records the peer's progress: the node's own file is untouched,
//! and its local edits still sync out. On unlock (or TTL expiry) the queue is
//! applied oldest first, each version planned against the current local record by
//! the same version-vector rules as a live update (a version concurrent with a local
//! edit is a conflict, and the loser is kept as a conflict copy), then installed
//! atomically; the index update and the removal of the queue entry share one
//! transaction, so a crash never applies a version twice or drops one.
//!
//! Lock order: `Engine::locks`, then the store, then `Engine::installing`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quinn::Connection;

use super::apply::{self, delta_base, Batch, Done, Source, View};
use super::{transfer, Engine, EngineError};
use crate::events::{Event, EventKind};
use crate::index::queue::{NewQueued, Queued};
use crate::index::{Store, StoreError, TEMP_PREFIX};
use crate::listing::human_size;
use crate::path::RelPath;
use crate::sync::diff::{self, Step};
use crate::sync::record::{Kind, Record};
use crate::wire::{LockInfo, Timestamp};

/// The staging directory's name inside the state dir.
pub const STAGING_DIR: &str = "staged";
/// How long `lock` waits for an update of the path that is being installed.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// How often a queued version that fails to apply is tried again before the
/// release gives up for now (the lock stays "releasing" and is retried later).
const APPLY_ATTEMPTS: u32 = 10;

/// Why a lock request failed; every message is meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0}")]
    Path(#[from] crate::path::PathError),
    #[error("{path} does not exist on node {node} (see `dirsync-cli ls`)")]
    NotFound { path: String, node: String },
    #[error("{path} is a {kind} on node {node}; only files can be locked")]
    NotAFile {
        path: String,
        kind: &'static str,
        node: String,
    },
    #[error("{path} is locked by {owner} since {since}")]
    HeldBy {
        path: String,
        owner: String,
        since: String,
    },
    #[error("{path} is not locked on node {node}")]
    NotLocked { path: String, node: String },
    #[error("{path} is locked by {owner}, not by {caller}; only {owner} can unlock it (an admin can add --force)")]
    NotOwner {
        path: String,
        owner: String,
        caller: String,
    },
    #[error("--force needs an admin certificate; {caller} has a client certificate (make one with `dirsync-cli certs --admin NAME`)")]
    ForceNotAllowed { caller: String },
    #[error(
        "{path} is being released (its queued updates are being applied); try again in a moment"
    )]
    Releasing { path: String },
    #[error("{path} is being updated from a peer right now; try again in a moment")]
    Busy { path: String },
    #[error("applying the queued updates of {path} failed: {reason}; the lock is kept and the release is retried")]
    Apply { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Creates the staging directory, removes staged files no queue refers to (a crash
/// between staging and committing), and returns the locks to mirror in memory.
pub(super) fn open_staging(
    store: &Store,
    staging: &Path,
) -> Result<HashMap<String, Option<Timestamp>>, EngineError> {
    fs::create_dir_all(staging).map_err(super::io_err(staging))?;
    let referenced: std::collections::HashSet<String> = store.staged_names()?.into_iter().collect();
    let read = fs::read_dir(staging).map_err(super::io_err(staging))?;
    for entry in read.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !referenced.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(store
        .locks()?
        .into_iter()
        .map(|l| (l.path, l.expires))
        .collect())
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

fn local_time(t: Timestamp) -> String {
    t.to_datetime()
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| format!("{}s", t.secs))
}

impl Engine {
    /// Locks `path` for `owner` (a client certificate name), for `ttl` if given.
    /// Locking again by the same owner renews the TTL. Waits (bounded) while an
    /// update of the path is being installed, so a lock never lands mid-install.
    pub async fn lock(
        self: &Arc<Self>,
        path: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> Result<LockInfo, LockError> {
        let rel = RelPath::parse(path)?;
        let (path, owner) = (rel.as_str().to_string(), owner.to_string());
        let me = self.clone();
        let (info, renewed) =
            tokio::task::spawn_blocking(move || me.lock_blocking(&path, &owner, ttl))
                .await
                .map_err(|e| EngineError::Join(e.to_string()))??;
        let detail = match (renewed, info.expires) {
            (true, Some(t)) => format!("renewed, until {}", local_time(t)),
            (true, None) => "renewed, no TTL".to_string(),
            (false, Some(t)) => format!("until {}", local_time(t)),
            (false, None) => "no TTL".to_string(),
        };
        self.emit(
            Event::new(&self.name, EventKind::Locked)
                .path(info.path.clone())
                .peer(info.owner.clone())
                .detail(detail),
        );
        Ok(info)
    }

    fn lock_blocking(
        &self,
        path: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> Result<(LockInfo, bool), LockError> {
        let deadline = Instant::now() + BUSY_WAIT;
        loop {
            {
                let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
                let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                match store.get(path)? {
                    Some(e) if !e.record.deleted && e.record.kind == Kind::File => {}
                    Some(e) if !e.record.deleted => {
                        return Err(LockError::NotAFile {
                            path: path.into(),
                            kind: match e.record.kind {
                                Kind::Dir => "directory",
                                _ => "symlink",
                            },
                            node: self.name.clone(),
                        })
                    }
                    _ => {
                        return Err(LockError::NotFound {
                            path: path.into(),
                            node: self.name.clone(),
                        })
                    }
                }
                let existing = store.lock(path)?;
                if let Some(l) = &existing {
                    if l.owner != owner {
                        return Err(LockError::HeldBy {
                            path: path.into(),
                            owner: l.owner.clone(),
                            since: local_time(l.since),
                        });
                    }
                    if l.releasing {
                        return Err(LockError::Releasing { path: path.into() });
                    }
                }
                if !self.is_claimed(path) {
                    let now = now();
                    let expires = ttl.map(|d| Timestamp {
                        secs: now.secs.saturating_add(d.as_secs().max(1) as i64),
                        nanos: 0,
                    });
                    let info = LockInfo {
                        path: path.into(),
                        owner: owner.into(),
                        since: existing.as_ref().map_or(now, |l| l.since),
                        expires,
                        queued: existing.as_ref().map_or(0, |l| l.queued),
                        releasing: false,
                    };
                    store.put_lock(&info)?;
                    locks.insert(path.into(), expires);
                    return Ok((info, existing.is_some()));
                }
            }
            if Instant::now() > deadline {
                return Err(LockError::Busy { path: path.into() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every lock on this node, with its queue length.
    pub async fn locks(self: &Arc<Self>) -> Result<Vec<LockInfo>, LockError> {
        Ok(self.with_store(|s| s.locks()).await??)
    }

    /// Releases `path`'s lock for `caller` and applies its queue in order. Only the
    /// owner may unlock, or an admin with `force`. Returns (queued, applied).
    pub async fn unlock(
        self: &Arc<Self>,
        path: &str,
        caller: &str,
        force: bool,
        admin: bool,
    ) -> Result<(u32, u32), LockError> {
        let rel = RelPath::parse(path)?;
        let path = rel.as_str().to_string();
        // Held from the check on: the TTL loop must not release this lock under us.
        let _one_at_a_time = self.releases.lock().await;
        let (p, c, node) = (path.clone(), caller.to_string(), self.name.clone());
        let lock = self
            .with_store(move |s| -> Result<LockInfo, LockError> {
                let lock = s.lock(&p)?.ok_or(LockError::NotLocked {
                    path: p.clone(),
                    node,
                })?;
                if lock.owner != c {
                    if !force {
                        return Err(LockError::NotOwner {
                            path: p,
                            owner: lock.owner,
                            caller: c,
                        });
                    }
                    if !admin {
                        return Err(LockError::ForceNotAllowed { caller: c });
                    }
                }
                s.set_releasing(&p)?;
                Ok(lock)
            })
            .await??;
        let why = if lock.owner == caller {
            format!("by {caller}")
        } else {
            format!("forced by {caller}; it was {}'s", lock.owner)
        };
        self.release(&path, &why).await
    }

    /// Releases locks whose TTL has passed, and finishes releases a restart or a
    /// failure interrupted (locks marked releasing, queues without a lock).
    pub async fn release_due(self: &Arc<Self>) -> Result<(), LockError> {
        let now = now();
        let expired: Vec<String> = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, e)| e.is_some_and(|t| t <= now))
            .map(|(p, _)| p.clone())
            .collect();
        let _one_at_a_time = self.releases.lock().await;
        for path in expired {
            let p = path.clone();
            self.with_store(move |s| s.set_releasing(&p)).await??;
            if let Err(e) = self.release(&path, "TTL expired").await {
                tracing::warn!("{}: {e}", self.name);
            }
        }
        // The index is only asked again after a release (or at start): nothing can
        // become due otherwise.
        if !self.resume_releases.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let pending = self
            .with_store(|s| -> Result<Vec<String>, StoreError> {
                let mut paths: Vec<String> = s
                    .locks()?
                    .into_iter()
                    .filter(|l| l.releasing)
                    .map(|l| l.path)
                    .collect();
                paths.extend(s.orphan_queues()?);
                Ok(paths)
            })
            .await??;
        // A directory's queued deletion waits until nothing below it is locked.
        let locked = self.locked_paths();
        let pending = pending.into_iter().filter(|p| {
            !locked
                .iter()
                .any(|l| l != p && crate::index::changes::within(l, p))
        });
        for path in pending {
            if let Err(e) = self.release(&path, "resumed").await {
                tracing::warn!("{}: {e}", self.name);
            }
        }
        Ok(())
    }

    /// Applies `path`'s queue oldest first (versions staged meanwhile included),
    /// then removes the lock once the queue is empty and no update of the path is in
    /// flight. The caller holds `releases`.
    async fn release(self: &Arc<Self>, path: &str, why: &str) -> Result<(u32, u32), LockError> {
        // Whatever happens here (a failure to retry, a directory queue that no
        // longer waits for this lock), the next tick looks again.
        self.resume_releases.store(true, Ordering::Relaxed);
        self.open_root_dir();
        let (mut queued, mut applied) = (0u32, 0u32);
        let p = path.to_string();
        // A directory's queue (a deletion that waited for a lock below it) has no
        // lock of its own to announce.
        let had_lock = self.with_store(move |s| s.lock(&p)).await??.is_some();
        loop {
            let p = path.to_string();
            let queue = self.with_store(move |s| s.queue(&p)).await??;
            if queue.is_empty() {
                let me = self.clone();
                let p = path.to_string();
                let removed = tokio::task::spawn_blocking(move || -> Result<bool, StoreError> {
                    let mut locks = me.locks.lock().unwrap_or_else(|p| p.into_inner());
                    if me.is_claimed(&p) {
                        return Ok(false);
                    }
                    let mut store = me.store.lock().unwrap_or_else(|p| p.into_inner());
                    if store.remove_lock_if_drained(&p)? {
                        locks.remove(&p);
                        return Ok(true);
                    }
                    Ok(false)
                })
                .await
                .map_err(|e| EngineError::Join(e.to_string()))??;
                if removed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let total = queue.len();
            for (i, q) in queue.into_iter().enumerate() {
                queued += 1;
                if self.apply_queued(q, i + 1, total).await? {
                    applied += 1;
                }
            }
        }
        let detail = format!("{why}; {applied} of {queued} queued updates applied");
        if !had_lock {
            tracing::debug!("{}: applied the queue of {path}: {detail}", self.name);
            return Ok((queued, applied));
        }
        self.emit(
            Event::new(&self.name, EventKind::Unlocked)
                .path(path)
                .detail(detail),
        );
        Ok((queued, applied))
    }

    /// Applies one queued version (retrying a few times if the local file is
    /// changing right now). Returns whether it changed anything locally.
    async fn apply_queued(
        self: &Arc<Self>,
        q: Queued,
        nth: usize,
        of: usize,
    ) -> Result<bool, LockError> {
        let staged = q.staged.as_ref().map(|n| self.staging.join(n));
        if let Some(f) = staged.as_ref().filter(|f| !f.exists()) {
            // Only a damaged state dir gets here; the peer still has its version.
            tracing::warn!(
                "{}: staged file {} of {} is missing; skipping that queued update",
                self.name,
                f.display(),
                q.path
            );
            self.finish_queued(&q, Vec::new(), None).await?;
            return Ok(false);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_apply_queued(&q, staged.clone(), nth, of).await {
                Ok(changed) => return Ok(changed),
                Err(reason) if attempt >= APPLY_ATTEMPTS => {
                    return Err(LockError::Apply {
                        path: q.path.clone(),
                        reason,
                    })
                }
                Err(reason) => {
                    tracing::debug!("{}: queued {} not applied yet: {reason}", self.name, q.path);
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
            }
        }
    }

    async fn try_apply_queued(
        self: &Arc<Self>,
        q: &Queued,
        staged: Option<PathBuf>,
        nth: usize,
        of: usize,
    ) -> Result<bool, String> {
        let super::Claim {
            guard: mut claim,
            busy,
            ..
        } = self.claim(vec![q.path.clone()]);
        if !busy.is_empty() {
            return Err(format!("{} is being installed from a peer", q.path));
        }
        let records = vec![q.record.clone()];
        let path = q.path.clone();
        let (plan, planned) = self
            .with_store(move |s| {
                let entry = s.get(&path).map_err(|e| e.to_string())?;
                let planned: HashMap<String, Option<crate::index::Entry>> = [(path, entry)].into();
                Ok::<_, String>((diff::plan(&View(s), &records), planned))
            })
            .await
            .map_err(|e| e.to_string())??;
        let step = plan.steps.into_iter().next();
        let Some(step) = step else {
            let why = match plan.refused.first() {
                Some((_, e)) => format!("refused: {e}"),
                None => "this node's version is newer or the same: nothing to apply".into(),
            };
            let event = self.applied_event(q, nth, of, why);
            self.finish_queued(q, Vec::new(), Some(event))
                .await
                .map_err(|e| e.to_string())?;
            return Ok(false);
        };
        self.claim_more(&mut claim, apply::step_paths(&step));
        let what = match &step {
            Step::Adopt { .. } => "same content, versions merged".to_string(),
            Step::Fetch { remote, .. } => format!("{} installed", human_size(remote.size)),
            Step::Delete { .. } => "deleted".to_string(),
            Step::MakeDir { .. } => "now a directory".to_string(),
            Step::MakeSymlink { .. } => "now a link".to_string(),
            Step::Rename { .. } => "renamed".to_string(),
            Step::Conflict { .. } => "concurrent with a local edit: conflict".to_string(),
        };
        let batch = Batch {
            records: [(q.path.clone(), q.record.clone())].into(),
            planned,
            unwatched: std::sync::Mutex::new(crate::watch::Unwatched::none(&self.deferred)),
        };
        let source = Source::Staged(staged.unwrap_or_default());
        let done = apply::run_step(self.clone(), q.peer.clone(), source, step, &batch).await?;
        let conflict = done
            .event
            .clone()
            .filter(|e| e.event == EventKind::Conflict);
        let mut event = self.applied_event(q, nth, of, what);
        if q.record.kind == Kind::File && !q.record.deleted {
            event = event.bytes(q.record.size);
        }
        let dirs = done.dirs.clone();
        self.finish_queued(
            q,
            vec![Done {
                event: None,
                dirs,
                ..done
            }],
            Some(event),
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Some(c) = conflict {
            self.emit(c);
        }
        drop(claim);
        Ok(true)
    }

    fn applied_event(&self, q: &Queued, nth: usize, of: usize, what: String) -> Event {
        Event::new(&self.name, EventKind::StagedApplied)
            .path(q.path.clone())
            .peer(q.peer.clone())
            .detail(format!(
                "{nth} of {of}, staged at {}: {what}",
                local_time(q.received)
            ))
    }

    /// Commits what applying `q` did together with its removal from the queue,
    /// then deletes its staged file and tells everyone.
    async fn finish_queued(
        self: &Arc<Self>,
        q: &Queued,
        done: Vec<Done>,
        event: Option<Event>,
    ) -> Result<(), LockError> {
        let updates: Vec<_> = done.iter().flat_map(|d| d.updates.clone()).collect();
        let dirs: std::collections::BTreeSet<PathBuf> =
            done.iter().flat_map(|d| d.dirs.clone()).collect();
        let id = q.id;
        let max = self
            .with_store(move |s| {
                for d in &dirs {
                    if let Ok(f) = File::open(d) {
                        let _ = f.sync_all();
                    }
                }
                s.commit_with(&updates, None, &[], &[id], None)
            })
            .await??;
        if let Some(name) = &q.staged {
            let _ = fs::remove_file(self.staging.join(name));
        }
        self.seq.send_if_modified(|s| {
            let changed = *s != max;
            *s = max;
            changed
        });
        if let Some(e) = event {
            tracing::debug!("{}", e.human());
            self.emit(e);
        }
        Ok(())
    }
}

/// What a staged download of `remote` (a large file) is made a delta against:
/// the newest staged version of its path, the closest to it, else the locked
/// file itself as the index knows it. Either may change or go away meanwhile
/// (an unlock applies the queue, the lock holder edits): the delta then fails
/// its hash check, and the file is fetched whole.
async fn staging_base(engine: &Arc<Engine>, remote: &Record) -> Option<PathBuf> {
    if remote.size < super::delta::DELTA_FROM {
        return None;
    }
    let path = remote.path.clone();
    let (queue, live) = engine
        .with_store(move |s| {
            (
                s.queue(&path).unwrap_or_default(),
                s.get(&path).ok().flatten(),
            )
        })
        .await
        .ok()?;
    if let Some(q) = queue
        .iter()
        .rev()
        .find(|q| q.staged.is_some() && !q.record.deleted)
    {
        let name = q.staged.as_ref()?;
        return delta_base(remote, Some(&q.record)).then(|| engine.staging.join(name));
    }
    let live = live?;
    if !delta_base(remote, Some(&live.record)) {
        return None;
    }
    RelPath::parse(&remote.path)
        .ok()
        .map(|rel| rel.to_path(&engine.root))
}

static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Stages `remote`, a peer's version of a locked path: a live file's content is
/// fetched and verified like any transfer, fsynced in the staging directory and
/// renamed to its final name there; the queue entry is committed with the batch.
pub(super) async fn stage(
    engine: &Arc<Engine>,
    peer: &str,
    conn: &Connection,
    remote: Record,
) -> Result<Done, String> {
    // With a delta transfer, the bytes that came from the peer.
    let mut delta = None;
    let staged = if remote.kind == Kind::File && !remote.deleted {
        let n = STAGE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let stamp = now();
        let name = format!(
            "{}-{:09}-{}-{n}",
            stamp.secs,
            stamp.nanos,
            std::process::id()
        );
        let tmp = engine.staging.join(format!("{TEMP_PREFIX}{name}"));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let base = staging_base(engine, &remote).await;
        let want = (remote.path.as_str(), remote.hash, remote.size);
        let fetched =
            transfer::fetch_with_base(conn, &engine.name, want, base.as_deref(), &mut file)
                .await
                .map_err(|e| e.to_string());
        let synced = match fetched {
            Ok(d) => {
                delta = d;
                tokio::task::spawn_blocking(move || file.sync_all().map_err(|e| e.to_string()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
            Err(e) => Err(e),
        };
        let final_path = engine.staging.join(&name);
        if let Err(e) = synced.and_then(|_| {
            fs::rename(&tmp, &final_path).map_err(|e| format!("staging {}: {e}", remote.path))
        }) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Some(name)
    } else {
        None
    };
    let owner = engine
        .with_store({
            let p = remote.path.clone();
            move |s| s.lock(&p).ok().flatten().map(|l| l.owner)
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "?".into());
    let what = if remote.deleted {
        "a deletion".to_string()
    } else {
        match remote.kind {
            Kind::File => human_size(remote.size),
            Kind::Dir => "a directory".to_string(),
            Kind::Symlink => "a link".to_string(),
        }
    };
    let mut event = Event::new(&engine.name, EventKind::Staged)
        .path(remote.path.clone())
        .peer(peer)
        .detail(match delta {
            Some(n) => format!(
                "{what}; locked by {owner}, applied on unlock; delta: fetched {n} of {} bytes",
                remote.size
            ),
            None => format!("{what}; locked by {owner}, applied on unlock"),
        });
    if remote.kind == Kind::File && !remote.deleted {
        event = event.bytes(remote.size);
    }
    Ok(Done {
        updates: Vec::new(),
        event: Some(event),
        dirs: vec![engine.staging.clone()],
        rescan: Vec::new(),
        enqueue: vec![NewQueued {
            path: remote.path.clone(),
            peer: peer.to_string(),
            received: now(),
            record: remote,
            staged,
        }],
        pending: None,
    })
}
