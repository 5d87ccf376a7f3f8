//! Executing a plan against the disk: every file is written to a temporary name in
//! its target directory, verified, fsynced, and renamed into place only if the
//! local path is still what the index says (a concurrent local edit is never
//! overwritten: the scanner versions it and the version vectors decide).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::Connection;
use tokio::task::JoinSet;

use super::{transfer, Engine, EngineError};
use crate::events::{Event, EventKind};
use crate::hash::ContentHash;
use crate::index::changes::within;
use crate::index::queue::NewQueued;
use crate::index::store::IndexId;
use crate::index::{Entry, StatKey, Store, Update, TEMP_PREFIX};
use crate::path::RelPath;
use crate::sync::diff::{self, LocalIndex, Step};
use crate::sync::record::{Kind, Record};
use crate::watch::Unwatched;
use crate::wire::Timestamp;

/// How many files of one batch are fetched at once. A small file's round trip is
/// mostly waiting (for the peer's read, for the write here), so the more are in
/// flight, the more of them each wake-up of a blocking worker finds queued; at 32
/// the workers drained their queues empty and slept between files. Each holds at
/// most [`transfer::SMALL_FILE`] in memory.
const PARALLEL_FETCHES: usize = 96;

/// Transfers of a batch are started again once this many of the
/// [`PARALLEL_FETCHES`] have ended, together (their requests share datagrams).
const REFILL_FROM: usize = 16;

/// A batch still running this long after it started has the directories it made
/// watched from then on (see [`Batch::unwatched`]): a local write there is seen
/// at once, not when the batch ends (hours, for a large tree on a slow link).
/// Shorter batches, nearly all, never watch their own installs.
const WATCH_MADE_DIRS_AFTER: Duration = Duration::from_secs(1);

/// The index, as the pure planner sees it.
pub(super) struct View<'a>(pub(super) &'a Store);

impl LocalIndex for View<'_> {
    fn get(&self, path: &str) -> Option<Record> {
        match self.0.get(path) {
            Ok(e) => e.map(|e| e.record),
            Err(e) => {
                tracing::warn!("index read for {path}: {e}");
                None
            }
        }
    }
    fn find_by_hash(&self, hash: &ContentHash) -> Option<String> {
        self.0.find_by_hash(hash).ok().flatten()
    }
}

/// Where file contents come from.
#[derive(Clone)]
pub(crate) enum Source {
    /// Fetched from the peer on this connection, one stream per file.
    Peer(Connection),
    /// A staged file (in the state dir) holding the version being applied.
    Staged(PathBuf),
}

/// What applying a batch achieved.
#[derive(Debug, Default)]
pub struct Applied {
    /// Records that could not be applied now, to retry.
    pub failed: Vec<Record>,
    /// Number of steps carried out.
    pub steps: usize,
    /// Records that lost a conflict to ours, with the sequence number of our
    /// record they lost to (see [`diff::Plan::outvoted`]).
    pub outvoted: Vec<(Record, u64)>,
}

/// The result of one step: index updates, an event, directories to fsync, and
/// paths the scanner should look at again.
#[derive(Default)]
pub(super) struct Done {
    pub(super) updates: Vec<Update>,
    pub(super) event: Option<Event>,
    pub(super) dirs: Vec<PathBuf>,
    pub(super) rescan: Vec<String>,
    /// Versions of locked paths, staged, to append to their queues.
    pub(super) enqueue: Vec<NewQueued>,
    /// A small file written to its temp file but not yet fsynced or renamed: they
    /// are synced together, every `COMMIT_EVERY` and at the batch's end, then
    /// installed ([`finish_pending`]).
    pub(super) pending: Option<Pending>,
}

/// A received small file waiting in its temp file for the batch's sync.
pub(super) struct Pending {
    temp: Temp,
    /// The temp file's stat once written, to recognise it once in place.
    made: StatKey,
    target: Target,
}

/// A written temp file, not yet in place.
pub(super) enum Temp {
    /// Beside the target under a temp name, closed (found again by its name).
    Named(PathBuf),
    /// Unnamed in the target's directory, held open until linked into place.
    Unnamed(super::unnamed::Unnamed),
}

impl Temp {
    /// Removes the temp file (an unnamed one vanishes when closed).
    fn discard(self) {
        if let Temp::Named(path) = self {
            let _ = fs::remove_file(path);
        }
    }

    /// Flushes the temp file's content to disk.
    fn sync(&self) -> Result<(), String> {
        match self {
            Temp::Named(path) => File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display())),
            Temp::Unnamed(u) => u.file().sync_all().map_err(|e| e.to_string()),
        }
    }
}

/// A temp file open for writing.
enum OpenTemp {
    Named(PathBuf, File),
    Unnamed(super::unnamed::Unnamed),
}

impl OpenTemp {
    fn file(&self) -> &File {
        match self {
            OpenTemp::Named(_, file) => file,
            OpenTemp::Unnamed(u) => u.file(),
        }
    }

    fn file_mut(&mut self) -> &mut File {
        match self {
            OpenTemp::Named(_, file) => file,
            OpenTemp::Unnamed(u) => u.file_mut(),
        }
    }

    /// Done writing: a named temp file is closed (it is found again by its
    /// name), an unnamed one stays open (closing it would free it).
    fn close(self) -> Temp {
        match self {
            OpenTemp::Named(path, _) => Temp::Named(path),
            OpenTemp::Unnamed(u) => Temp::Unnamed(u),
        }
    }
}

/// Plans and applies `records` from `peer`, then commits the results together with
/// the peer's progress: `progress` is `(index id, sequence)` to record unless a
/// record of this batch fails, in which case progress stops just before it.
pub async fn apply_batch(
    engine: &Arc<Engine>,
    peer: &str,
    conn: &Connection,
    records: Vec<Record>,
    progress: Option<(IndexId, u64)>,
) -> Result<Applied, EngineError> {
    engine.open_root_dir();
    // What this node ignores, it neither receives nor deletes.
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| {
            !engine.is_ignored(&r.path, r.kind == Kind::Dir)
                || crate::path::RelPath::parse(&r.path).is_err()
        })
        .collect();
    // Claimed before planning, so no scan versions these paths behind the plan, and
    // no lock is taken or released on them until this batch is committed.
    let claim = engine.claim(records.iter().map(|r| r.path.clone()).collect());
    let mut applied = Applied::default();
    let records: Vec<Record> = if claim.busy.is_empty() {
        records
    } else {
        // Another batch is installing these paths: retry them shortly.
        let busy: std::collections::HashSet<&String> = claim.busy.iter().collect();
        let (busy, free): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|r| busy.contains(&r.path));
        applied.failed = busy;
        free
    };
    let super::Claim {
        guard: mut claim, ..
    } = claim;
    let by_path: HashMap<String, Record> = records
        .iter()
        .map(|r| (r.path.clone(), r.clone()))
        .collect();
    // The plan and the local entries it was made from, read together: the paths
    // are claimed, so these entries stay true until the batch commits (a local
    // edit meanwhile shows on disk, which every step checks before writing).
    let (plan, planned) = engine
        .with_store(move |s| {
            s.read(|s| {
                let mut planned: HashMap<String, Option<Entry>> =
                    HashMap::with_capacity(records.len());
                for r in &records {
                    planned.insert(r.path.clone(), s.get(&r.path)?);
                }
                let view = Planned(s, &planned);
                Ok((diff::plan(&view, &records), planned))
            })
        })
        .await??;
    applied.outvoted = plan
        .outvoted
        .iter()
        .filter_map(|r| {
            let ours = planned.get(&r.path)?.as_ref()?;
            Some((r.clone(), ours.record.seq))
        })
        .collect();
    let by_path = Arc::new(Batch {
        records: by_path,
        planned,
        unwatched: Mutex::new(Unwatched::none(&engine.deferred)),
    });
    for (path, why) in &plan.refused {
        tracing::warn!("{}: refused a record from {peer}: {why}", engine.name);
        engine.emit(
            Event::new(&engine.name, EventKind::Refused)
                .path(path.clone())
                .peer(peer)
                .detail(why.to_string()),
        );
    }
    let locked = engine.claim_more(&mut claim, plan.steps.iter().flat_map(step_paths).collect());
    let steps = divert(plan.steps, &locked);

    let mut done: Vec<Done> = Vec::new();
    // Phases: directories, links and version merges in plan order (parents first);
    // then file contents in parallel; then deletions (children first). A link is
    // therefore in place before any file below its name is considered, and refused.
    let (mut first, mut files, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for step in steps {
        match step {
            Work::Stage(_) | Work::Requested { .. } => files.push(step),
            Work::Apply(step) => match step {
                Step::MakeDir { .. } | Step::MakeSymlink { .. } | Step::Adopt { .. } => {
                    first.push(Work::Apply(step))
                }
                // A directory that wins over a file must exist before its children.
                Step::Conflict { ref remote, .. }
                    if remote.kind == Kind::Dir && !remote.deleted =>
                {
                    first.push(Work::Apply(step))
                }
                Step::Delete { .. } => deletes.push(Work::Apply(step)),
                _ => files.push(Work::Apply(step)),
            },
        }
    }
    let watch_made_dirs = tokio::time::sleep(WATCH_MADE_DIRS_AFTER);
    tokio::pin!(watch_made_dirs);
    let source = Source::Peer(conn.clone());
    run_in_order(
        engine,
        peer,
        &source,
        first,
        &by_path,
        &mut done,
        &mut applied,
    )
    .await;
    // At most PARALLEL_FETCHES steps exist as tasks at a time; the others wait as
    // plain steps (a few hundred bytes each, not a task and its future each).
    let mut parallel = JoinSet::new();
    let mut waiting_steps = Waiting::new(engine, files);
    // Started a few at a time (see `start_next`): `REFILL_FROM` slots free up first.
    let mut refill = async |set: &mut JoinSet<Finished>, least: usize| {
        if PARALLEL_FETCHES - set.len() < least {
            return;
        }
        while set.len() < PARALLEL_FETCHES
            && start_next(set, &mut waiting_steps, engine, peer, &source, &by_path).await
        {}
    };
    refill(&mut parallel, 1).await;
    // Received files are synced, renamed and committed in chunks while the rest of
    // the batch is still being fetched: one chunk installs while new transfers
    // start, so neither the network nor the disk idles through the other's work.
    // Chunks install one at a time, in order.
    let mut waiting = 0;
    let mut installing: Option<std::pin::Pin<Box<ChunkInstall<'_>>>> = None;
    let mut made_dirs_watched = false;
    loop {
        tokio::select! {
            // Only while there is work left: otherwise the loop ends at once.
            _ = &mut watch_made_dirs, if !made_dirs_watched && (installing.is_some() || !parallel.is_empty()) => {
                made_dirs_watched = true;
                by_path.watch_made_dirs();
            }
            installed = async { installing.as_mut().expect("guarded").as_mut().await }, if installing.is_some() => {
                installing = None;
                applied.failed.extend(installed?);
            }
            joined = parallel.join_next(), if !parallel.is_empty() => {
                let Some(joined) = joined else { continue };
                refill(&mut parallel, REFILL_FROM).await;
                let Some(d) = finished(joined, &mut applied) else {
                    continue;
                };
                waiting += usize::from(d.pending.is_some());
                done.push(d);
                if waiting >= COMMIT_EVERY {
                    waiting = 0;
                    if let Some(previous) = installing.take() {
                        applied.failed.extend(previous.await?);
                    }
                    let chunk = std::mem::take(&mut done);
                    installing = Some(Box::pin(install_chunk(engine, peer, chunk, &by_path)));
                }
            }
            else => break,
        }
    }
    let done_files = std::mem::take(&mut done);
    done = finish_pending(engine, peer, done_files, &mut applied).await;
    run_in_order(
        engine,
        peer,
        &source,
        deletes,
        &by_path,
        &mut done,
        &mut applied,
    )
    .await;
    commit(
        engine,
        peer,
        done,
        progress,
        &mut applied,
        Some(claim),
        &by_path,
    )
    .await?;
    Ok(applied)
}

/// A planned step, or a version of a locked path to stage instead.
enum Work {
    Apply(Step),
    Stage(Record),
    /// A small file's fetch whose request was sent (see [`start_next`]): what
    /// is left is to receive and write it, or to fail with why it could not be
    /// sent.
    Requested {
        remote: Record,
        answer: Result<quinn::RecvStream, transfer::TransferError>,
        started: Instant,
    },
}

impl Work {
    /// The peer's records this work applies: all of them are retried if it fails
    /// (a rename carries the tombstone of its source too).
    fn records(&self) -> Vec<Record> {
        match self {
            Work::Apply(Step::Rename {
                remote,
                from_tombstone,
                ..
            }) => vec![remote.clone(), from_tombstone.clone()],
            Work::Apply(step) => step_remote(step).into_iter().cloned().collect(),
            Work::Stage(r) | Work::Requested { remote: r, .. } => vec![r.clone()],
        }
    }
}

/// Steps touching a locked path (or deleting a directory above one) are not
/// applied: the remote version is staged.
/// A rename away from a locked path becomes a copy (the locked file stays) plus a
/// staged deletion; a rename onto one becomes a staged version plus the deletion of
/// the source.
fn divert(steps: Vec<Step>, locked: &std::collections::HashSet<String>) -> Vec<Work> {
    if locked.is_empty() {
        return steps.into_iter().map(Work::Apply).collect();
    }
    let mut out = Vec::new();
    for step in steps {
        match step {
            Step::Adopt { .. } => out.push(Work::Apply(step)),
            Step::Rename {
                from,
                remote,
                from_tombstone,
            } => match (locked.contains(&from), locked.contains(&remote.path)) {
                (false, false) => out.push(Work::Apply(Step::Rename {
                    from,
                    remote,
                    from_tombstone,
                })),
                (true, false) => {
                    out.push(Work::Apply(Step::Fetch {
                        remote,
                        local_source: Some(from),
                    }));
                    out.push(Work::Stage(from_tombstone));
                }
                (false, true) => {
                    out.push(Work::Stage(remote));
                    out.push(Work::Apply(Step::Delete {
                        remote: from_tombstone,
                    }));
                }
                (true, true) => {
                    out.push(Work::Stage(remote));
                    out.push(Work::Stage(from_tombstone));
                }
            },
            // The deletion of a directory that holds a locked file waits too (in
            // the directory's own queue, applied once nothing below it is locked).
            Step::Delete { ref remote }
                if remote.kind == Kind::Dir && locked.iter().any(|l| within(l, &remote.path)) =>
            {
                out.push(Work::Stage(remote.clone()))
            }
            other => match step_remote(&other) {
                Some(r) if locked.contains(&r.path) => out.push(Work::Stage(r.clone())),
                _ => out.push(Work::Apply(other)),
            },
        }
    }
    out
}

async fn run_work(
    engine: Arc<Engine>,
    peer: String,
    source: Source,
    work: Work,
    batch: &Batch,
) -> Result<Done, String> {
    match work {
        // Boxed: most steps of a large batch are small files already requested,
        // whose task then needs none of run_step's larger state (each task of
        // `gen.py small` was 4,464 bytes, moved into place as it is spawned; now
        // 2,960).
        Work::Apply(step) => Box::pin(run_step(engine, peer, source, step, batch)).await,
        Work::Requested {
            remote,
            answer,
            started,
        } => fetch_small_file(&engine, &peer, remote, answer, started, batch).await,
        Work::Stage(remote) => {
            let Source::Peer(conn) = source else {
                return Err("only a peer's versions are staged".into());
            };
            Box::pin(super::locks::stage(&engine, &peer, &conn, remote)).await
        }
    }
}

/// Runs `steps` one after another (directories, links, merges; deletions).
async fn run_in_order(
    engine: &Arc<Engine>,
    peer: &str,
    source: &Source,
    steps: Vec<Work>,
    by_path: &Arc<Batch>,
    done: &mut Vec<Done>,
    applied: &mut Applied,
) {
    for step in steps {
        let records = step.records();
        match run_work(
            engine.clone(),
            peer.to_string(),
            source.clone(),
            step,
            by_path,
        )
        .await
        {
            Ok(d) => done.push(d),
            Err(e) => fail(engine, peer, records, e, applied),
        }
        applied.steps += 1;
    }
}

/// Records that `records` (a failed step's) are to be retried, and says so.
fn fail(engine: &Engine, peer: &str, records: Vec<Record>, error: String, applied: &mut Applied) {
    let path = records.first().map(|r| r.path.clone()).unwrap_or_default();
    tracing::debug!("{}: {path} from {peer} failed: {error}", engine.name);
    engine.emit(
        Event::new(&engine.name, EventKind::Failed)
            .path(path)
            .peer(peer)
            .detail(error),
    );
    for r in records {
        // Whatever failed, the disk may no longer be what the index says (a local
        // edit or deletion under the install): look at the path again once this
        // batch lets go of it, even if no event comes and even if it looks like
        // our own last write, so the local change is versioned and the retry is
        // decided against it.
        engine.forget_written(&r.path);
        engine.recheck_after_install(vec![r.path.clone()]);
        applied.failed.push(r);
    }
}

/// A finished parallel step: who ran it, for which records, and how it went.
type Finished = (Arc<Engine>, String, Vec<Record>, Result<Done, String>);

/// Steps of a batch not yet started, counted as queued transfers (for `status`)
/// until they start or the batch is dropped.
struct Waiting<'a> {
    engine: &'a Engine,
    steps: std::vec::IntoIter<Work>,
}

impl<'a> Waiting<'a> {
    fn new(engine: &'a Engine, steps: Vec<Work>) -> Waiting<'a> {
        engine
            .transfers
            .queued
            .fetch_add(steps.len() as u64, Ordering::Relaxed);
        Waiting {
            engine,
            steps: steps.into_iter(),
        }
    }

    fn next(&mut self) -> Option<Work> {
        let step = self.steps.next()?;
        self.engine.transfers.queued.fetch_sub(1, Ordering::Relaxed);
        Some(step)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let left = self.steps.len() as u64;
        self.engine
            .transfers
            .queued
            .fetch_sub(left, Ordering::Relaxed);
    }
}

/// Starts the next waiting step as a task of `set`; false when none is left.
///
/// A small file's request is sent here, before its task starts: the requests of
/// the steps started one after another here leave in the same datagrams. Sent
/// from each step's own task, nearly every request took a datagram of its own
/// (the connection ran between two tasks): on `gen.py small`, 8,681 datagrams
/// for 10,038 requests.
async fn start_next(
    set: &mut JoinSet<Finished>,
    waiting: &mut Waiting<'_>,
    engine: &Arc<Engine>,
    peer: &str,
    source: &Source,
    batch: &Arc<Batch>,
) -> bool {
    let Some(step) = waiting.next() else {
        return false;
    };
    let step = match (step, source) {
        (
            Work::Apply(Step::Fetch {
                remote,
                local_source: None,
            }),
            Source::Peer(conn),
        ) if remote.size <= transfer::SMALL_FILE => {
            let started = Instant::now();
            let answer = transfer::send_request(conn, &remote.path, remote.hash).await;
            Work::Requested {
                remote,
                answer,
                started,
            }
        }
        (step, _) => step,
    };
    let records = step.records();
    let (engine, peer, source, batch) = (
        engine.clone(),
        peer.to_string(),
        source.clone(),
        batch.clone(),
    );
    engine.transfers.in_flight.fetch_add(1, Ordering::Relaxed);
    set.spawn(async move {
        let r = run_work(engine.clone(), peer.clone(), source, step, &batch).await;
        engine.transfers.in_flight.fetch_sub(1, Ordering::Relaxed);
        (engine, peer, records, r)
    });
    true
}

/// The outcome of a finished parallel step: its `Done` if it succeeded (a failure
/// is recorded in `applied`; a task that panicked or was cancelled is dropped).
fn finished(
    joined: Result<Finished, tokio::task::JoinError>,
    applied: &mut Applied,
) -> Option<Done> {
    let (engine, peer, records, r) = joined.ok()?;
    applied.steps += 1;
    match r {
        Ok(d) => Some(d),
        Err(e) => {
            fail(&engine, &peer, records, e, applied);
            None
        }
    }
}

/// Received small files are installed and committed every this many, while the
/// batch's other transfers go on.
const COMMIT_EVERY: usize = 1024;

/// Below this many received small files, each is fsynced on its own; from this
/// many on, one `syncfs` flushes them all (one flush instead of one per file).
const SYNCFS_FROM: usize = 8;

/// A chunk of a batch being installed and committed: the records that failed.
type ChunkInstall<'a> =
    dyn std::future::Future<Output = Result<Vec<Record>, EngineError>> + Send + 'a;

/// Installs and commits a chunk of finished steps (without the peer's progress,
/// which waits for the batch's end); returns the records that failed, to retry.
async fn install_chunk(
    engine: &Arc<Engine>,
    peer: &str,
    chunk: Vec<Done>,
    batch: &Batch,
) -> Result<Vec<Record>, EngineError> {
    let mut applied = Applied::default();
    let chunk = finish_pending(engine, peer, chunk, &mut applied).await;
    commit(engine, peer, chunk, None, &mut applied, None, batch).await?;
    Ok(applied.failed)
}

/// `path` if its install is not provably what was written (no `stat`: a local
/// edit reached it at once), to be scanned again once the batch is committed.
fn unproven(stat: Option<&StatKey>, path: &str) -> Option<String> {
    stat.is_none().then(|| path.to_string())
}

/// Makes received small files durable at once, then renames each into
/// place (if its target is still what the index says); a file that cannot be
/// installed becomes a failed record, retried later.
async fn finish_pending(
    engine: &Arc<Engine>,
    peer: &str,
    done: Vec<Done>,
    applied: &mut Applied,
) -> Vec<Done> {
    let (mut waiting, mut ready): (Vec<Done>, Vec<Done>) =
        done.into_iter().partition(|d| d.pending.is_some());
    if waiting.is_empty() {
        return ready;
    }
    let pending: Vec<Pending> = waiting
        .iter_mut()
        .filter_map(|d| d.pending.take())
        .collect();
    let n = pending.len();
    let root = engine.root.clone();
    let placed = tokio::task::spawn_blocking(move || {
        let synced = sync_all_pending(&root, &pending);
        pending
            .into_iter()
            .map(|p| match &synced {
                Ok(()) => p.target.place_synced(p.temp, p.made),
                Err(e) => {
                    p.temp.discard();
                    Err(e.clone())
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    // A failed blocking task installed nothing we can vouch for: every file of
    // it is retried.
    .unwrap_or_else(|e| vec![Err(format!("installing received files: {e}")); n]);
    for (mut d, r) in waiting.into_iter().zip(placed) {
        match r {
            Ok(stat) => {
                if let Some(u) = d.updates.first_mut() {
                    d.rescan.extend(unproven(stat.as_ref(), &u.record.path));
                    u.stat = stat;
                }
                ready.push(d)
            }
            Err(e) => {
                let records = d.updates.into_iter().take(1).map(|u| u.record).collect();
                fail(engine, peer, records, e, applied);
            }
        }
    }
    ready
}

/// Flushes the temp files: one `syncfs` for many, an fsync each for a few.
fn sync_all_pending(root: &Path, pending: &[Pending]) -> Result<(), String> {
    if pending.len() >= SYNCFS_FROM {
        let dir = File::open(root).map_err(|e| format!("{}: {e}", root.display()))?;
        return rustix::fs::syncfs(&dir).map_err(|e| format!("syncfs: {e}"));
    }
    pending.iter().try_for_each(|p| p.temp.sync())
}

/// Fsyncs the touched directories, commits every update and the peer's progress in
/// one transaction, then announces: only now does the index call these files synced.
async fn commit(
    engine: &Arc<Engine>,
    peer: &str,
    done: Vec<Done>,
    progress: Option<(IndexId, u64)>,
    applied: &mut Applied,
    claim: Option<super::InstallGuard>,
    batch: &Batch,
) -> Result<(), EngineError> {
    let dirs: BTreeSet<PathBuf> = done.iter().flat_map(|d| d.dirs.iter().cloned()).collect();
    let updates: Vec<Update> = done
        .iter()
        .flat_map(|d| d.updates.iter().cloned())
        .collect();
    let rescan: Vec<String> = done.iter().flat_map(|d| d.rescan.iter().cloned()).collect();
    let enqueue: Vec<NewQueued> = done
        .iter()
        .flat_map(|d| d.enqueue.iter().cloned())
        .collect();
    let floor = applied.failed.iter().map(|r| r.seq.saturating_sub(1)).min();
    let progress = progress.map(|(id, seq)| (id, floor.map_or(seq, |f| f.min(seq))));
    let written: Vec<(String, Option<StatKey>)> = updates
        .iter()
        .filter(|u| u.record.deleted || u.stat.is_some())
        .map(|u| (u.record.path.clone(), u.stat))
        .collect();
    // Records stored exactly as the peer sent them: never echoed back to it. Only
    // the last update of a path counts (it is what the index keeps).
    let last: HashMap<&str, &Update> = updates
        .iter()
        .map(|u| (u.record.path.as_str(), u))
        .collect();
    let taken: std::collections::HashSet<String> = last
        .into_iter()
        .filter(|(path, u)| {
            batch
                .records
                .get(*path)
                .is_some_and(|r| r.version == u.record.version && r.deleted == u.record.deleted)
        })
        .map(|(path, _)| path.to_string())
        .collect();
    let peer_name = peer.to_string();
    let result = engine
        .with_store(move |s| {
            for d in &dirs {
                if let Ok(f) = File::open(d) {
                    let _ = f.sync_all();
                }
            }
            if updates.is_empty() && progress.is_none() && enqueue.is_empty() {
                return Ok(s.max_seq());
            }
            s.commit_with(
                &updates,
                progress
                    .as_ref()
                    .map(|(id, seq)| (peer_name.as_str(), *id, *seq)),
                &enqueue,
                &[],
                Some((peer_name.as_str(), &taken)),
            )
        })
        .await;
    let max = result??;
    engine.remember_written(written);
    drop(claim);
    engine.seq.send_if_modified(|s| {
        let changed = *s != max;
        *s = max;
        changed
    });
    for d in done {
        if let Some(e) = d.event {
            tracing::debug!("{}", e.human());
            engine.emit(e);
        }
    }
    if !rescan.is_empty() {
        if let Err(e) = engine.scan(Some(rescan)).await {
            tracing::warn!("{}: rescan after apply: {e}", engine.name);
        }
    }
    Ok(())
}

/// Every path a step writes, so scans leave them alone until the commit.
pub(super) fn step_paths(step: &Step) -> Vec<String> {
    match step {
        Step::Adopt { path, .. } => vec![path.clone()],
        Step::Fetch { remote, .. }
        | Step::MakeDir { remote }
        | Step::MakeSymlink { remote }
        | Step::Delete { remote } => {
            vec![remote.path.clone()]
        }
        Step::Rename { from, remote, .. } => vec![from.clone(), remote.path.clone()],
        Step::Conflict {
            remote,
            conflict_copy,
            ..
        } => vec![remote.path.clone(), conflict_copy.clone()],
    }
}

fn step_remote(step: &Step) -> Option<&Record> {
    match step {
        Step::Adopt { .. } => None,
        Step::Fetch { remote, .. }
        | Step::MakeDir { remote }
        | Step::MakeSymlink { remote }
        | Step::Delete { remote }
        | Step::Rename { remote, .. }
        | Step::Conflict { remote, .. } => Some(remote),
    }
}

/// A batch's records by path, and the sequence number each path had in the local
/// index when the batch was planned.
pub(super) struct Batch {
    pub(super) records: HashMap<String, Record>,
    pub(super) planned: HashMap<String, Option<Entry>>,
    /// Directories this batch created, unwatched until it is done (see
    /// [`crate::watch::Deferred`]) or has run for [`WATCH_MADE_DIRS_AFTER`];
    /// released when the batch is dropped.
    pub(super) unwatched: Mutex<Unwatched>,
}

impl Batch {
    /// Watches (and has the engine scan) the directories this batch made so far.
    fn watch_made_dirs(&self) {
        self.unwatched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release_now();
    }

    /// The local entry of `path` the plan was made from (the path is claimed, so it
    /// is still the index's), or the index's for a path outside the batch.
    async fn entry(&self, engine: &Arc<Engine>, path: &str) -> Result<Option<Entry>, String> {
        match self.planned.get(path) {
            Some(e) => Ok(e.clone()),
            None => local_entry(engine, path).await,
        }
    }
}

/// The index as the planner sees it, with the batch's own paths already read.
struct Planned<'a>(&'a Store, &'a HashMap<String, Option<Entry>>);

impl LocalIndex for Planned<'_> {
    fn get(&self, path: &str) -> Option<Record> {
        match self.1.get(path) {
            Some(e) => e.as_ref().map(|e| e.record.clone()),
            None => View(self.0).get(path),
        }
    }
    fn find_by_hash(&self, hash: &ContentHash) -> Option<String> {
        View(self.0).find_by_hash(hash)
    }
}

async fn local_entry(engine: &Arc<Engine>, path: &str) -> Result<Option<Entry>, String> {
    let p = path.to_string();
    match engine.with_store(move |s| s.get(&p)).await {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A small file from the peer, requested at `started` (`answer` is the reply
/// stream, or why the request could not be sent): received whole, checked, and
/// written to a temp file that the chunk's install makes durable and renames
/// into place.
async fn fetch_small_file(
    engine: &Arc<Engine>,
    peer: &str,
    remote: Record,
    answer: Result<quinn::RecvStream, transfer::TransferError>,
    started: Instant,
    batch: &Batch,
) -> Result<Done, String> {
    let local = batch.entry(engine, &remote.path).await?;
    let bytes = match answer {
        Ok(answer) => transfer::receive_small(answer, remote.hash, remote.size).await,
        Err(e) => Err(e),
    }
    .map_err(|e| e.to_string())?;
    let target = Target::of(engine, &remote, local)?;
    let n = bytes.len() as u64;
    let dir = parent_of(&target.rel.to_path(&engine.root));
    let tmp = engine
        .small_io
        .run(move || {
            target
                .write_unsynced(&bytes)
                .map(|(temp, made)| Pending { temp, made, target })
        })
        .await
        .map_err(|e| e.to_string())??;
    let event = Event::new(&engine.name, EventKind::Received)
        .path(remote.path.as_str())
        .peer(peer)
        .bytes(n)
        .millis(started.elapsed().as_millis() as u64);
    Ok(Done {
        updates: vec![Update {
            record: remote,
            stat: None,
        }],
        event: Some(event),
        dirs: vec![dir],
        pending: Some(tmp),
        ..Done::default()
    })
}

pub(super) async fn run_step(
    engine: Arc<Engine>,
    peer: String,
    source: Source,
    step: Step,
    batch: &Batch,
) -> Result<Done, String> {
    let ev = |kind: EventKind, path: &str| {
        Event::new(&engine.name, kind)
            .path(path)
            .peer(peer.as_str())
    };
    match step {
        Step::Adopt { path, version } => {
            let local = batch.entry(&engine, &path).await?;
            let (record, stat) = match local {
                Some(e) => (
                    Record {
                        version,
                        ..e.record
                    },
                    e.stat,
                ),
                None => match batch.records.get(&path) {
                    Some(r) => (r.clone(), None),
                    None => return Err(format!("nothing to adopt for {path}")),
                },
            };
            Ok(Done {
                updates: vec![Update { record, stat }],
                ..Done::default()
            })
        }
        // A batch's small files from a peer are requested by `start_next` and
        // never come here; one that does is installed whole below.
        Step::Fetch {
            remote,
            local_source,
        } => {
            let local = batch.entry(&engine, &remote.path).await?;
            // Boxed: a streamed transfer's state is large, and most steps are small files.
            let Installed {
                stat,
                bytes,
                millis,
                dir,
                fetched,
            } = Box::pin(install_file(
                &engine,
                &source,
                &remote,
                local.as_ref(),
                local_source.as_deref(),
            ))
            .await?;
            let event = match &local_source {
                Some(src) => ev(EventKind::CopiedLocally, &remote.path)
                    .detail(src.clone())
                    .bytes(bytes),
                None => {
                    let e = ev(EventKind::Received, &remote.path)
                        .bytes(bytes)
                        .millis(millis);
                    match fetched {
                        Some(n) => e.detail(format!("delta: fetched {n} of {bytes} bytes")),
                        None => e,
                    }
                }
            };
            let rescan = unproven(stat.as_ref(), &remote.path).into_iter().collect();
            Ok(Done {
                updates: vec![Update {
                    record: remote,
                    stat,
                }],
                event: Some(event),
                dirs: vec![dir],
                rescan,
                enqueue: vec![],
                pending: None,
            })
        }
        Step::MakeDir { remote } => {
            let local = batch.entry(&engine, &remote.path).await?;
            let (stat, dir) = make_dir(
                &engine.root,
                &engine.name,
                &remote,
                local.as_ref(),
                Some(&batch.unwatched),
            )?;
            Ok(Done {
                updates: vec![Update {
                    record: remote.clone(),
                    stat: Some(stat),
                }],
                event: Some(ev(EventKind::MadeDir, &remote.path)),
                dirs: vec![dir],
                rescan: vec![],
                enqueue: vec![],
                pending: None,
            })
        }
        Step::MakeSymlink { remote } => {
            let local = batch.entry(&engine, &remote.path).await?;
            let (stat, dir) = make_symlink(&engine.root, &engine.name, &remote, local.as_ref())?;
            let target = remote.target.clone().unwrap_or_default();
            Ok(Done {
                updates: vec![Update {
                    record: remote.clone(),
                    stat: Some(stat),
                }],
                event: Some(ev(EventKind::MadeLink, &remote.path).detail(target)),
                dirs: vec![dir],
                rescan: vec![],
                enqueue: vec![],
                pending: None,
            })
        }
        Step::Delete { remote } => {
            let local = batch.entry(&engine, &remote.path).await?;
            let (dir, rescan) = delete(&engine.root, &engine.name, &remote, local.as_ref())?;
            if !rescan.is_empty() && only_indexed_children(&engine, &remote.path).await {
                // What is left is known to the index: its deletions are still on
                // their way (another batch). Retry rather than resurrect the tree.
                return Err(format!("{} is not empty yet", remote.path));
            }
            Ok(Done {
                updates: vec![Update {
                    record: remote.clone(),
                    stat: None,
                }],
                event: Some(ev(EventKind::Deleted, &remote.path)),
                dirs: dir.into_iter().collect(),
                rescan,
                enqueue: vec![],
                pending: None,
            })
        }
        Step::Rename {
            from,
            remote,
            from_tombstone,
        } => {
            let local_from = local_entry(&engine, &from).await?;
            let local_to = batch.entry(&engine, &remote.path).await?;
            let (stat, dirs) = rename(
                &engine.root,
                &from,
                &remote,
                local_from.as_ref(),
                local_to.as_ref(),
            )?;
            let rescan = unproven(stat.as_ref(), &remote.path).into_iter().collect();
            let updates = vec![
                Update {
                    record: remote.clone(),
                    stat,
                },
                Update {
                    record: from_tombstone,
                    stat: None,
                },
            ];
            Ok(Done {
                updates,
                event: Some(ev(EventKind::Renamed, &remote.path).detail(from)),
                dirs,
                rescan,
                enqueue: vec![],
                pending: None,
            })
        }
        Step::Conflict {
            local,
            remote,
            conflict_copy,
        } => {
            // Rare and large: boxed, so every step's future stays small.
            Box::pin(conflict(
                &engine,
                &peer,
                &source,
                local,
                remote,
                conflict_copy,
            ))
            .await
        }
    }
}

/// Whether every entry left in directory `path` has a live index record (so it is
/// synced content whose deletion has not arrived yet, not new local content).
async fn only_indexed_children(engine: &Arc<Engine>, path: &str) -> bool {
    let Ok(abs) = rel_abs(&engine.root, path) else {
        return false;
    };
    let Ok(read) = fs::read_dir(&abs) else {
        return false;
    };
    let children: Vec<String> = read
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(|n| format!("{path}/{n}")))
        .collect();
    let lookup = engine
        .with_store(move |s| {
            children
                .iter()
                .all(|c| matches!(s.get(c), Ok(Some(e)) if !e.record.deleted))
        })
        .await;
    matches!(lookup, Ok(true))
}

/// The local copy lost a conflict: move it aside as a conflict copy (a new local
/// file that syncs like any other), then take the winner under a merged version.
async fn conflict(
    engine: &Arc<Engine>,
    peer: &str,
    source: &Source,
    local: Record,
    remote: Record,
    copy: String,
) -> Result<Done, String> {
    let entry = local_entry(engine, &local.path).await?;
    if entry.as_ref().map(|e| e.record.seq) != Some(local.seq) {
        return Err(format!(
            "{} changed locally while the conflict was planned; retrying",
            local.path
        ));
    }
    let abs = rel_abs(&engine.root, &local.path)?;
    check_unchanged(&abs, entry.as_ref())?;
    // Two conflicts on one path within a second would get the same name: number them.
    // (A name the batch itself brings a record for was numbered by the plan.) A
    // name the index knows only as deleted counts as taken too: a peer's tombstone
    // of it may still be on its way (in a later batch), and a copy under it would
    // be decided against that tombstone instead of syncing as a new file.
    let mut copy = copy;
    let base = copy.clone();
    for n in 2.. {
        let taken = rel_abs(&engine.root, &copy)?.symlink_metadata().is_ok()
            || local_entry(engine, &copy).await?.is_some();
        if !taken {
            break;
        }
        if n > 1000 {
            return Err(format!("no free conflict copy name for {}", local.path));
        }
        copy = crate::sync::conflict::numbered(&base, n);
    }
    let copy_entry = local_entry(engine, &copy).await?;
    let copy_abs = rel_abs(&engine.root, &copy)?;
    #[cfg(test)]
    if let Some(hook) = engine
        .before_move_aside
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        hook();
    }
    // Never over something that took the copy's name meanwhile.
    rename_noreplace(&abs, &copy_abs).map_err(|e| format!("moving {} aside: {e}", local.path))?;
    let copy_stat = copy_abs.symlink_metadata().map(|m| StatKey::of(&m)).ok();
    // A local write since the check above went aside with the rename: then the
    // copy is not the version the record describes. It is not remembered as our
    // write, and is scanned right after the commit, so the newer local version is
    // versioned and synced (not masked as our echo, with a hash no one can fetch).
    let moved_is_indexed = holds_version(&copy_abs, &local, |_| false);
    let (copy_stat, rescan) = if moved_is_indexed {
        (copy_stat, vec![])
    } else {
        (None, vec![copy.clone()])
    };
    let mut copy_version = copy_entry.map(|e| e.record.version).unwrap_or_default();
    copy_version.bump(&engine.name);
    let copy_record = Record {
        path: copy.clone(),
        version: copy_version,
        modified_by: engine.name.clone(),
        deleted: false,
        ..local.clone()
    };
    let winner = Record {
        version: local.version.merge(&remote.version),
        ..remote.clone()
    };
    let mut dirs = vec![parent_of(&copy_abs)];
    let installed = match winner.kind {
        _ if winner.deleted => Ok(None),
        Kind::File => install_file(engine, source, &winner, None, None)
            .await
            .map(|installed| {
                dirs.push(installed.dir);
                installed.stat
            }),
        Kind::Dir => {
            make_dir(&engine.root, &engine.name, &winner, None, None).map(|(s, _)| Some(s))
        }
        Kind::Symlink => {
            make_symlink(&engine.root, &engine.name, &winner, None).map(|(s, _)| Some(s))
        }
    };
    let mut rescan = rescan;
    let stat = match installed {
        Ok(None) if winner.kind == Kind::File && !winner.deleted => {
            rescan.push(winner.path.clone()); // a local edit reached it at once
            None
        }
        Ok(s) => s,
        Err(e) => {
            // Put the local version back where it was (unless something new is
            // there: then it stays a conflict copy, which the scan syncs): the
            // conflict is retried.
            if rename_noreplace(&copy_abs, &abs).is_err() {
                tracing::warn!("{}: {} stays saved as {copy}", engine.name, local.path);
            }
            return Err(e);
        }
    };
    let detail = format!(
        "kept {}'s; {}'s copy saved as {copy}",
        remote.modified_by, local.modified_by
    );
    let event = Event::new(&engine.name, EventKind::Conflict)
        .path(local.path.clone())
        .peer(peer)
        .detail(detail);
    Ok(Done {
        updates: vec![
            Update {
                record: copy_record,
                stat: copy_stat,
            },
            Update {
                record: winner,
                stat,
            },
        ],
        event: Some(event),
        dirs,
        rescan,
        enqueue: vec![],
        pending: None,
    })
}

fn rel_abs(root: &Path, path: &str) -> Result<PathBuf, String> {
    RelPath::parse(path)
        .map(|r| r.to_path(root))
        .map_err(|e| e.to_string())
}

pub(super) fn parent_of(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Creates the missing parent directories of `rel`, refusing to go through anything
/// that is not a real directory (a symlink planted by a peer must never redirect a
/// write outside the root).
fn ensure_parents(root: &Path, rel: &RelPath) -> Result<(), String> {
    for ancestor in rel.ancestors() {
        let abs = ancestor.to_path(root);
        match abs.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("refused: {ancestor} is not a directory (a symlink or a file), so {rel} is not written")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&abs).map_err(|e| format!("creating {ancestor}: {e}"))?;
            }
            Err(e) => return Err(format!("{ancestor}: {e}")),
        }
    }
    Ok(())
}

/// The path on disk is still what the index entry says (or absent, for none or a
/// tombstone): otherwise a local change happened after planning, and wins.
fn check_unchanged(abs: &Path, local: Option<&Entry>) -> Result<(), String> {
    let ok = match local.filter(|e| !e.record.deleted) {
        None => {
            matches!(abs.symlink_metadata(), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        }
        // A stat that moved without a content change (a touch, a backup tool) is
        // not a local edit: the hash decides.
        Some(e) => holds_version(abs, &e.record, |now| e.stat.as_ref() == Some(now)),
    };
    if ok {
        Ok(())
    } else {
        Err(changed_locally(abs))
    }
}

/// Whether what is at `at` is the version `record` describes: a file if `proven`
/// accepts its stat, or else by its hash; a link by its target.
fn holds_version(at: &Path, record: &Record, proven: impl FnOnce(&StatKey) -> bool) -> bool {
    let Ok(meta) = at.symlink_metadata() else {
        return false;
    };
    match record.kind {
        Kind::File => {
            meta.is_file()
                && (proven(&StatKey::of(&meta))
                    || ContentHash::of_file(at).ok() == Some(record.hash))
        }
        Kind::Symlink => {
            meta.file_type().is_symlink()
                && fs::read_link(at)
                    .ok()
                    .and_then(|t| t.to_str().map(str::to_owned))
                    == record.target
        }
        Kind::Dir => meta.is_dir(),
    }
}

/// Whether `now` is `recorded` with only its ctime moved (a rename moves it).
fn renamed(recorded: Option<&StatKey>, now: &StatKey) -> bool {
    recorded.is_some_and(|s| {
        StatKey {
            ctime_ns: now.ctime_ns,
            ..*s
        } == *now
    })
}

/// Puts `new` (a temp file or link of ours, or with `temp` `None` a local file
/// being renamed) at `abs`, where the index has `local`, never losing what is
/// there if it is not `local`: see [`place_new`] and [`swap_in`]. On failure a
/// temp `new` is removed; a renamed one stays where it was.
///
/// `root` (the open root directory and its path), if given, resolves the rename
/// of a new path from there.
fn install_over(
    root: Option<(&rustix::fd::OwnedFd, &Path)>,
    new: &Path,
    abs: &Path,
    local: Option<&Entry>,
    temp: Option<(&Path, &RelPath, &str)>,
) -> Result<(), String> {
    let Some(entry) = local.filter(|e| !e.record.deleted) else {
        return place_new(root, new, abs, temp.is_some());
    };
    let checked = check_unchanged(abs, Some(entry)).and_then(|_| match entry.record.kind {
        Kind::Dir => remove_empty_dir(abs),
        _ => Ok(()),
    });
    if let Err(e) = checked {
        if temp.is_some() {
            let _ = fs::remove_file(new);
        }
        return Err(e);
    }
    match entry.record.kind {
        Kind::Dir => place_new(root, new, abs, temp.is_some()),
        _ => swap_in(new, abs, entry, temp),
    }
}

/// Renames `new` to `abs`, where nothing is indexed, refusing to replace whatever
/// appeared there meanwhile: one call, no window between a check and the rename
/// (only a file system without `RENAME_NOREPLACE` checks first). On failure `new`
/// is removed if it is a temp file. With `root` (the open root directory and its
/// path), both paths are resolved from it.
fn place_new(
    root: Option<(&rustix::fd::OwnedFd, &Path)>,
    new: &Path,
    abs: &Path,
    temp: bool,
) -> Result<(), String> {
    let result = match rename_noreplace_at(root, new, abs) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(changed_locally(abs)),
        Err(e) => Err(format!("installing {}: {e}", abs.display())),
    };
    if temp {
        let _ = fs::remove_file(new);
    }
    result
}

/// Renames `from` to `to` unless something is at `to` (`AlreadyExists`): with
/// `RENAME_NOREPLACE`, or on a file system without it, after a check.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    rename_noreplace_at(None, from, to)
}

/// [`rename_noreplace`]; with `root` (the open root directory and its path), both
/// paths are resolved from it rather than again from `/`.
fn rename_noreplace_at(
    root: Option<(&rustix::fd::OwnedFd, &Path)>,
    from: &Path,
    to: &Path,
) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let below = root.and_then(|(dir, root)| {
        Some((
            dir,
            from.strip_prefix(root).ok()?,
            to.strip_prefix(root).ok()?,
        ))
    });
    let renamed = match below {
        Some((dir, from, to)) => renameat_with(dir, from, dir, to, RenameFlags::NOREPLACE),
        None => renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE),
    };
    match renamed {
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if to.symlink_metadata().is_ok() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(from, to)
        }
        r => r.map_err(Into::into),
    }
}

/// Replaces the indexed local version at `abs` (a file or a link) by `new`
/// without a window in which a local write is lost: the two are exchanged in one
/// call, then what came out is checked. If it is not the indexed version (a local
/// write landed after [`check_unchanged`]), the exchange is undone and the local
/// write wins for now, as if the check had caught it.
///
/// `temp` says `new` is a temp file of ours, for `(root, rel, node)`: it is gone
/// afterwards whatever happens, unless a second local write left something else at
/// its name, which is then kept as a conflict copy. Otherwise `new` is a local file
/// being renamed: on failure it is left where it was.
fn swap_in(
    new: &Path,
    abs: &Path,
    entry: &Entry,
    temp: Option<(&Path, &RelPath, &str)>,
) -> Result<(), String> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use std::os::unix::fs::MetadataExt;
    let fail = |e: String| {
        if temp.is_some() {
            let _ = fs::remove_file(new);
        }
        Err(e)
    };
    let what = || format!("installing {}", abs.display());
    let ours = match new.symlink_metadata() {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) => return fail(format!("{}: {e}", new.display())),
    };
    #[cfg(test)]
    BEFORE_SWAP.with(|hook| hook.take().map(|h| h(abs)));
    match renameat_with(CWD, new, CWD, abs, RenameFlags::EXCHANGE) {
        Ok(()) => {}
        // Deleted locally since the check: the deletion wins for now.
        Err(rustix::io::Errno::NOENT) => return fail(changed_locally(abs)),
        // A file system without RENAME_EXCHANGE: a plain rename (the check
        // above is all there is).
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            return fs::rename(new, abs).or_else(|e| fail(format!("{}: {e}", what())))
        }
        Err(e) => return fail(format!("{}: {e}", what())),
    }
    #[cfg(test)]
    AFTER_SWAP.with(|hook| hook.take().map(|h| h(abs)));
    if holds_version(new, &entry.record, |now| renamed(entry.stat.as_ref(), now)) {
        let _ = fs::remove_file(new); // the version being replaced
        return Ok(());
    }
    // Put the local write back; `new` then holds ours again, unless yet another
    // write replaced the path meanwhile.
    let _ = renameat_with(CWD, new, CWD, abs, RenameFlags::EXCHANGE);
    let back = new
        .symlink_metadata()
        .is_ok_and(|m| (m.dev(), m.ino()) == ours);
    match temp {
        Some(_) if back => {
            let _ = fs::remove_file(new);
        }
        Some((root, rel, node)) => keep_as_copy(root, rel, node, new),
        // A renamed file that is not back stays under its old name, which the
        // scan sees: nothing is at a temp name.
        None => {}
    }
    Err(changed_locally(abs))
}

/// The stat of a written temp file (through its descriptor: no path lookup).
fn made(file: &File) -> Result<StatKey, String> {
    file.metadata()
        .map(|m| StatKey::of(&m))
        .map_err(|e| e.to_string())
}

/// Keeps a local version that a race left at the temp name `tmp` (where the
/// start-up clean-up would remove it) as a conflict copy of `rel`, which the scan
/// then finds and syncs like any file.
fn keep_as_copy(root: &Path, rel: &RelPath, node: &str, tmp: &Path) {
    let when = Timestamp::from_system_time(SystemTime::now());
    let base = crate::sync::conflict::conflict_name(rel, when, node);
    for n in 1..=100 {
        let name = match n {
            1 => base.as_str().to_string(),
            n => crate::sync::conflict::numbered(base.as_str(), n),
        };
        let Ok(copy) = RelPath::parse(&name) else {
            break;
        };
        match rename_noreplace(tmp, &copy.to_path(root)) {
            Ok(()) => {
                tracing::warn!(
                    "{node}: {rel} was written locally twice while a peer's version was applied; one of those versions is saved as {copy}"
                );
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => break,
        }
    }
    tracing::error!(
        "{node}: a local version of {rel} is left at {} (move it before the node restarts: temp files are removed at start-up)",
        tmp.display()
    );
}

fn changed_locally(abs: &Path) -> String {
    format!(
        "{} changed locally since it was indexed; the local change wins for now",
        abs.display()
    )
}

/// Removes the indexed (and just checked) `local` at `abs` so that something of
/// another kind can take its place: a directory only if empty, a file or link
/// only if it is still the indexed version ([`remove_unchanged`]).
fn clear_for_kind_change(
    root: &Path,
    node: &str,
    abs: &Path,
    local: Option<&Entry>,
    new_kind: Kind,
) -> Result<(), String> {
    let Some(e) = local.filter(|e| !e.record.deleted && e.record.kind != new_kind) else {
        return Ok(());
    };
    match e.record.kind {
        Kind::Dir => remove_empty_dir(abs),
        _ => remove_unchanged(root, node, abs, e).map(|_| ()),
    }
}

/// Removes the directory `abs` for something of another kind, only if empty
/// (nothing can be lost in that).
fn remove_empty_dir(abs: &Path) -> Result<(), String> {
    fs::remove_dir(abs).map_err(|err| {
        format!(
            "replacing directory {} (must be empty): {err}",
            abs.display()
        )
    })
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The process's umask, read once (from `/proc/self/status`: setting it to read it
/// would race with other threads creating files); `None` if unknown.
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// A temporary name next to `abs`, never listed or synced.
fn temp_name(abs: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name: String = abs
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("f")
        .chars()
        .take(100)
        .collect();
    // The process id (asked once: it is a system call) keeps names unique across
    // nodes sharing a tree by mistake; the counter, within this process.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    parent_of(abs).join(format!("{TEMP_PREFIX}{pid}-{n}-{name}"))
}

pub(super) fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos.into())
    }
}

/// Writes the remote file's content to a temp file (from a local copy with the same
/// hash, or from the peer), verifies it, sets mode and mtime, fsyncs, and renames it
/// into place if the local path is unchanged. A large file of which this node has
/// an older version at the same path comes as a delta (only the blocks it lacks).
async fn install_file(
    engine: &Arc<Engine>,
    source: &Source,
    remote: &Record,
    local: Option<&Entry>,
    local_source: Option<&str>,
) -> Result<Installed, String> {
    let rel = RelPath::parse(&remote.path).map_err(|e| e.to_string())?;
    let abs = rel.to_path(&engine.root);
    let started = Instant::now();
    let content = match (local_source, source) {
        (Some(src), _) => Content::Ready(Ready::Copy(rel_abs(&engine.root, src)?)),
        (None, Source::Staged(staged)) => Content::Ready(Ready::Copy(staged.clone())),
        // A small file arrives whole, then touches the disk in one blocking call.
        (None, Source::Peer(conn)) if remote.size <= transfer::SMALL_FILE => {
            Content::Ready(Ready::Bytes(
                transfer::fetch_small(conn, &remote.path, remote.hash, remote.size)
                    .await
                    .map_err(|e| e.to_string())?,
            ))
        }
        (None, Source::Peer(conn)) => Content::Stream(conn.clone()),
    };
    let base = delta_base(remote, local.map(|e| &e.record)).then(|| abs.clone());
    let target = Target::of(engine, remote, local.cloned())?;
    let mut fetched = None;
    let (stat, bytes) = match content {
        Content::Stream(conn) => {
            let mut open = target.open_temp()?;
            let want = (remote.path.as_str(), remote.hash, remote.size);
            let got = transfer::fetch_with_base(
                &conn,
                &engine.name,
                want,
                base.as_deref(),
                open.file_mut(),
            )
            .await;
            match got {
                Ok(delta) => {
                    fetched = delta;
                    let placed = tokio::task::spawn_blocking(move || target.place(open)).await;
                    (placed.map_err(|e| e.to_string())??, remote.size)
                }
                Err(e) => {
                    open.close().discard();
                    return Err(e.to_string());
                }
            }
        }
        Content::Ready(ready) => tokio::task::spawn_blocking(move || target.write(ready))
            .await
            .map_err(|e| e.to_string())??,
    };
    Ok(Installed {
        stat,
        bytes,
        millis: started.elapsed().as_millis() as u64,
        dir: parent_of(&abs),
        fetched,
    })
}

/// A file [`install_file`] installed.
struct Installed {
    /// Its stat, if provably the file written.
    stat: Option<StatKey>,
    /// Its size.
    bytes: u64,
    /// How long the install took.
    millis: u64,
    /// Its directory, to fsync.
    dir: PathBuf,
    /// With a delta transfer, the bytes that came from the peer.
    fetched: Option<u64>,
}

/// Whether a large file `remote` is fetched as a delta against `older`, a version
/// of it we hold: both large enough (ours not far larger), ours a live file with
/// other content.
pub(super) fn delta_base(remote: &Record, older: Option<&Record>) -> bool {
    use super::delta::{DELTA_FROM, MAX_GROWTH};
    older.is_some_and(|o| {
        !o.deleted
            && o.kind == Kind::File
            && o.size >= DELTA_FROM
            && o.size <= remote.size.saturating_mul(MAX_GROWTH)
            && o.hash != remote.hash
    }) && remote.size >= DELTA_FROM
}

/// Where a file's content comes from.
enum Content {
    /// At hand: written in one blocking call.
    Ready(Ready),
    /// A large file, streamed from the peer into the temp file.
    Stream(Connection),
}

/// Content at hand, without the network.
enum Ready {
    /// A local file (a copy with the same hash, or a staged version), verified.
    Copy(PathBuf),
    /// A small file already received and verified.
    Bytes(Vec<u8>),
}

/// A file about to be installed, with what must still be true to install it.
struct Target {
    root: PathBuf,
    /// The root, open: temp files are created relative to it (see
    /// [`Target::create_temp`]).
    root_dir: Option<Arc<rustix::fd::OwnedFd>>,
    rel: RelPath,
    mode: u32,
    modified: SystemTime,
    hash: ContentHash,
    /// The local entry the step was planned against.
    local: Option<Entry>,
    /// This node's name (for a conflict copy's name).
    node: String,
}

#[cfg(test)]
type SwapHook = std::cell::Cell<Option<Box<dyn FnOnce(&Path)>>>;

#[cfg(test)]
thread_local! {
    /// Run in [`Target::swap_in`] and [`remove_unchanged`] (on the calling thread)
    /// with the target path: between the check and the exchange (or the move
    /// aside), and right after it.
    static BEFORE_SWAP: SwapHook = const { std::cell::Cell::new(None) };
    static AFTER_SWAP: SwapHook = const { std::cell::Cell::new(None) };
}

impl Target {
    fn of(engine: &Engine, remote: &Record, local: Option<Entry>) -> Result<Target, String> {
        Ok(Target {
            root: engine.root.clone(),
            root_dir: engine.root_dir(),
            rel: RelPath::parse(&remote.path).map_err(|e| e.to_string())?,
            mode: remote.mode & 0o777,
            modified: system_time(remote.modified),
            hash: remote.hash,
            local,
            node: engine.name.clone(),
        })
    }

    /// Writes `bytes` to a new temp file with mode and mtime set, not yet fsynced
    /// (blocking).
    fn write_unsynced(&self, bytes: &[u8]) -> Result<(Temp, StatKey), String> {
        let mut open = self.open_temp()?;
        let written = open
            .file_mut()
            .write_all(bytes)
            .map_err(|e| e.to_string())
            .and_then(|_| self.set_metadata(open.file()))
            .and_then(|_| made(open.file()));
        match written {
            Ok(made) => Ok((open.close(), made)),
            Err(e) => {
                open.close().discard();
                Err(e)
            }
        }
    }

    /// A temp file for the target: unnamed if its path holds nothing indexed (see
    /// [`Target::create_unnamed`]), else named beside it.
    fn open_temp(&self) -> Result<OpenTemp, String> {
        if let Some(u) = self.create_unnamed() {
            return Ok(OpenTemp::Unnamed(u));
        }
        self.create_temp()
            .map(|(path, file)| OpenTemp::Named(path, file))
    }

    /// Puts an already synced temp file in place if the target is still what the
    /// index says (blocking): a named one is renamed over it, an unnamed one
    /// linked at the (new) path. The temp file is gone on failure.
    ///
    /// Returns the installed file's stat if the file at the path is provably the
    /// one written (`made`: same inode, size and mtime; the rename or link moved
    /// only its ctime), `None` if a local write reached it right after: then it
    /// must be rescanned, not remembered as our write (which would mask that edit).
    fn place_synced(&self, temp: Temp, made: StatKey) -> Result<Option<StatKey>, String> {
        let abs = self.rel.to_path(&self.root);
        let dir = self.root_dir.as_deref();
        match temp {
            Temp::Unnamed(u) => match u.link(self.rel.as_str()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(changed_locally(&abs))
                }
                Err(e) => return Err(format!("installing {}: {e}", abs.display())),
            },
            Temp::Named(tmp) => {
                let temp = (self.root.as_path(), &self.rel, self.node.as_str());
                let root = dir.map(|d| (d, self.root.as_path()));
                install_over(root, &tmp, &abs, self.local.as_ref(), Some(temp))?;
            }
        }
        let now = crate::index::lstat_below(dir, &self.root, self.rel.as_str())
            .map(|st| StatKey::of_stat(&st))
            .map_err(|e| format!("{}: {e}", abs.display()))?;
        Ok(renamed(Some(&made), &now).then_some(now))
    }

    /// An unnamed temp file in the target's directory, if the target's path holds
    /// nothing indexed (see [`super::unnamed`]); `None` where one cannot be made.
    fn create_unnamed(&self) -> Option<super::unnamed::Unnamed> {
        if self.local.as_ref().is_some_and(|e| !e.record.deleted) {
            return None;
        }
        let parent = Path::new(self.rel.as_str()).parent()?;
        super::unnamed::create(self.root_dir.as_ref()?, parent, self.mode)
    }

    /// Creates a temp file beside the target, with the target's mode (as far as
    /// the umask lets), never through a link.
    ///
    /// The common case is one `openat2` below the root that the kernel refuses to
    /// resolve through any symlink or out of the root. When that fails (a parent is
    /// missing, something in the way is not a directory, or the kernel has no
    /// `openat2`), the parents are checked one by one and created as needed, which
    /// also says precisely what was in the way.
    fn create_temp(&self) -> Result<(PathBuf, File), String> {
        let tmp = temp_name(&self.rel.to_path(&self.root));
        if let Some(file) = self.create_beneath(&tmp) {
            return Ok((tmp, file));
        }
        ensure_parents(&self.root, &self.rel)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok((tmp, file))
    }

    /// `tmp`, created with `openat2(root, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`.
    fn create_beneath(&self, tmp: &Path) -> Option<File> {
        use rustix::fs::{Mode, OFlags};
        let dir = self.root_dir.as_ref()?;
        let rel = tmp.strip_prefix(&self.root).ok()?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
        crate::index::open_beneath(dir, rel, flags, Mode::from_raw_mode(self.mode)).ok()
    }

    /// Writes `content` to a temp file and places it (blocking).
    fn write(self, content: Ready) -> Result<(Option<StatKey>, u64), String> {
        let mut open = self.open_temp()?;
        let written = match content {
            Ready::Copy(src) => {
                transfer::copy_local(&src, self.hash, open.file_mut()).map_err(|e| e.to_string())
            }
            Ready::Bytes(bytes) => open
                .file_mut()
                .write_all(&bytes)
                .map(|_| bytes.len() as u64)
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(n) => self.place(open).map(|stat| (stat, n)),
            Err(e) => {
                open.close().discard();
                Err(e)
            }
        }
    }

    /// Sets mode and mtime, fsyncs, and puts the temp file in place if the target
    /// is still what the index says (blocking). The temp file is gone on any
    /// failure.
    fn place(&self, open: OpenTemp) -> Result<Option<StatKey>, String> {
        let synced = self
            .set_metadata(open.file())
            .and_then(|_| open.file().sync_all().map_err(|e| e.to_string()))
            .and_then(|_| made(open.file()));
        match synced {
            Ok(made) => self.place_synced(open.close(), made),
            Err(e) => {
                open.close().discard();
                Err(e)
            }
        }
    }

    /// The record's mode and mtime on the temp file (created with the mode: a
    /// `chmod` is needed only where the umask took bits away).
    fn set_metadata(&self, file: &File) -> Result<(), String> {
        if umask().is_none_or(|m| self.mode & m != 0) {
            file.set_permissions(Permissions::from_mode(self.mode))
                .map_err(|e| e.to_string())?;
        }
        file.set_modified(self.modified).map_err(|e| e.to_string())
    }
}

/// Makes the directory `remote` (if it is not one already). With `unwatched`, a
/// directory it creates is held unwatched until that batch is done.
fn make_dir(
    root: &Path,
    node: &str,
    remote: &Record,
    local: Option<&Entry>,
    unwatched: Option<&Mutex<Unwatched>>,
) -> Result<(StatKey, PathBuf), String> {
    let rel = RelPath::parse(&remote.path).map_err(|e| e.to_string())?;
    ensure_parents(root, &rel)?;
    let abs = rel.to_path(root);
    match abs.symlink_metadata() {
        Ok(m) if m.is_dir() => {}
        _ => {
            check_unchanged(&abs, local)?;
            clear_for_kind_change(root, node, &abs, local, Kind::Dir)?;
            // Held before it exists, so its creation event already finds it held;
            // released at once (the guard drops) if the mkdir fails.
            let held = unwatched.map(|batch| {
                let batch = batch.lock().unwrap_or_else(|p| p.into_inner());
                batch.hold(&remote.path)
            });
            fs::create_dir(&abs).map_err(|e| format!("mkdir {rel}: {e}"))?;
            if let (Some(held), Some(batch)) = (held, unwatched) {
                batch.lock().unwrap_or_else(|p| p.into_inner()).merge(held);
            }
        }
    }
    let _ = fs::set_permissions(&abs, Permissions::from_mode((remote.mode & 0o777) | 0o700));
    let stat = abs
        .symlink_metadata()
        .map(|m| StatKey::of(&m))
        .map_err(|e| e.to_string())?;
    Ok((stat, parent_of(&abs)))
}

fn make_symlink(
    root: &Path,
    node: &str,
    remote: &Record,
    local: Option<&Entry>,
) -> Result<(StatKey, PathBuf), String> {
    let rel = RelPath::parse(&remote.path).map_err(|e| e.to_string())?;
    let target = remote
        .target
        .as_deref()
        .ok_or_else(|| format!("symlink {rel} without a target"))?;
    ensure_parents(root, &rel)?;
    let abs = rel.to_path(root);
    let tmp = temp_name(&abs);
    // The link is created, never followed: its target may point anywhere.
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| format!("symlink {rel}: {e}"))?;
    install_over(None, &tmp, &abs, local, Some((root, &rel, node)))?;
    let stat = abs
        .symlink_metadata()
        .map(|m| StatKey::of(&m))
        .map_err(|e| e.to_string())?;
    Ok((stat, parent_of(&abs)))
}

/// Deletes the local path if it is unchanged. A directory that still holds local
/// files the peer did not know is kept and rescanned, so it comes back everywhere.
fn delete(
    root: &Path,
    node: &str,
    remote: &Record,
    local: Option<&Entry>,
) -> Result<(Option<PathBuf>, Vec<String>), String> {
    let abs = rel_abs(root, &remote.path)?;
    let Some(entry) = local.filter(|e| !e.record.deleted) else {
        return Ok((None, vec![]));
    };
    check_unchanged(&abs, Some(entry))?;
    let r = match entry.record.kind {
        // A directory holding anything is not removed (see below).
        Kind::Dir => fs::remove_dir(&abs),
        _ => return remove_unchanged(root, node, &abs, entry).map(|gone| (gone, vec![])),
    };
    match r {
        Ok(()) => Ok((Some(parent_of(&abs)), vec![])),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((None, vec![])),
        Err(_) if entry.record.kind == Kind::Dir => Ok((None, vec![remote.path.clone()])),
        Err(e) => Err(format!("deleting {}: {e}", remote.path)),
    }
}

/// Removes the file or link at `abs` only if it is the indexed version, with no
/// window in which a local write is deleted: it is first renamed aside (one call),
/// then checked. What is not the indexed version goes back (a local write landed
/// after [`check_unchanged`]: it wins for now), or, if the path was taken again
/// meanwhile, is kept as a conflict copy. Returns the parent directory to fsync.
fn remove_unchanged(
    root: &Path,
    node: &str,
    abs: &Path,
    entry: &Entry,
) -> Result<Option<PathBuf>, String> {
    let rel = RelPath::parse(&entry.record.path).map_err(|e| e.to_string())?;
    let aside = temp_name(abs);
    #[cfg(test)]
    BEFORE_SWAP.with(|hook| hook.take().map(|h| h(abs)));
    match fs::rename(abs, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("deleting {}: {e}", entry.record.path)),
    }
    if holds_version(&aside, &entry.record, |now| {
        renamed(entry.stat.as_ref(), now)
    }) {
        return match fs::remove_file(&aside) {
            Ok(()) => Ok(Some(parent_of(abs))),
            Err(e) => {
                let _ = fs::rename(&aside, abs);
                Err(format!("deleting {}: {e}", entry.record.path))
            }
        };
    }
    #[cfg(test)]
    AFTER_SWAP.with(|hook| hook.take().map(|h| h(abs)));
    if rename_noreplace(&aside, abs).is_err() {
        keep_as_copy(root, &rel, node, &aside);
    }
    Err(changed_locally(abs))
}

/// Renames the local `from` to `remote`'s path. Returns the stat of the result if
/// it is provably the renamed version (a local write to `from` just before the
/// rename went with it: then the path must be scanned), and the directories to
/// fsync.
fn rename(
    root: &Path,
    from: &str,
    remote: &Record,
    local_from: Option<&Entry>,
    local_to: Option<&Entry>,
) -> Result<(Option<StatKey>, Vec<PathBuf>), String> {
    let from_abs = rel_abs(root, from)?;
    let rel = RelPath::parse(&remote.path).map_err(|e| e.to_string())?;
    let to_abs = rel.to_path(root);
    let Some(source) = local_from.filter(|e| !e.record.deleted && e.record.hash == remote.hash)
    else {
        return Err(format!("{from} no longer has the renamed content"));
    };
    check_unchanged(&from_abs, Some(source))?;
    ensure_parents(root, &rel)?;
    install_over(None, &from_abs, &to_abs, local_to, None)
        .map_err(|e| format!("renaming {from} to {rel}: {e}"))?;
    let proven = holds_version(&to_abs, &source.record, |now| {
        renamed(source.stat.as_ref(), now)
    });
    // Opened without following a link (only what was renamed is touched) and
    // read-only (a read-only file is renamed too; mode and times are its owner's
    // to set through any descriptor). Only what differs is set: a `mv` keeps both.
    // Setting either happens with the file already visible under its new name, and
    // would give a write landing just before it our stat (the mtime we set over
    // its own): then nothing is proven, and the path is rescanned and hashed.
    let f = File::options()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&to_abs)
        .map_err(|e| e.to_string())?;
    let before = f.metadata().map_err(|e| e.to_string())?;
    let (mode, mtime) = (remote.mode & 0o777, system_time(remote.modified));
    let mut set = false;
    if before.permissions().mode() & 0o777 != mode {
        let _ = f.set_permissions(Permissions::from_mode(mode));
        set = true;
    }
    if before.modified().ok() != Some(mtime) {
        let _ = f.set_modified(mtime);
        set = true;
    }
    let stat = StatKey::of(&before);
    let proven = proven && !set && stat.size == source.record.size;
    Ok((
        proven.then_some(stat),
        vec![parent_of(&from_abs), parent_of(&to_abs)],
    ))
}

/// Removes temporary files an interrupted transfer left behind. Returns how many.
pub fn clean_temp_files(root: &Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX)) {
                if fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            } else if ft.is_dir() && name != crate::index::STATE_DIR_NAME {
                stack.push(entry.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(root: &Path, path: &str) -> Target {
        Target {
            root: root.to_path_buf(),
            root_dir: None,
            rel: RelPath::parse(path).unwrap(),
            mode: 0o644,
            modified: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000),
            hash: ContentHash::of(b"theirs"),
            local: None,
            node: "b".into(),
        }
    }

    /// A new file is put in place only if nothing took its name meanwhile: what
    /// appeared there is kept, and no temp file is left. Both ways: a named temp
    /// file renamed (no open root) and an unnamed one linked (the open root).
    #[test]
    fn a_new_file_never_replaces_what_appeared_at_its_path() {
        for open in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let root_dir = open.then(|| super::super::unnamed::tests::open_root(dir.path()));
            let at = |path: &str| Target {
                root_dir: root_dir.clone(),
                ..target(dir.path(), path)
            };
            let names = || {
                let mut names: Vec<String> = std::fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                names
            };
            let t = at("f.txt");
            let (tmp, made) = t.write_unsynced(b"theirs").unwrap();
            let unnamed_here = root_dir
                .as_ref()
                .is_some_and(|r| super::super::unnamed::create(r, Path::new(""), 0o600).is_some());
            if open && !unnamed_here {
                eprintln!(
                    "no O_TMPFILE on {}: named temp files only",
                    dir.path().display()
                );
            }
            assert_eq!(matches!(tmp, Temp::Unnamed(_)), unnamed_here);
            std::fs::write(dir.path().join("f.txt"), b"made here meanwhile").unwrap();
            let err = t.place_synced(tmp, made).unwrap_err();
            assert!(err.contains("changed locally"), "{err}");
            assert_eq!(
                std::fs::read(dir.path().join("f.txt")).unwrap(),
                b"made here meanwhile"
            );
            assert_eq!(names(), ["f.txt"], "the temp file is gone");

            let t = at("g.txt");
            let (tmp, made) = t.write_unsynced(b"theirs").unwrap();
            let stat = t.place_synced(tmp, made).unwrap();
            let placed = dir.path().join("g.txt");
            assert_eq!(std::fs::read(&placed).unwrap(), b"theirs");
            assert_eq!(stat, Some(StatKey::of(&placed.symlink_metadata().unwrap())));
            assert_eq!(names(), ["f.txt", "g.txt"]);
        }
    }

    /// `f.txt` on disk and indexed (with its stat), and a target replacing it.
    fn indexed(root: &Path, content: &[u8]) -> Target {
        let abs = root.join("f.txt");
        std::fs::write(&abs, content).unwrap();
        let record = Record {
            path: "f.txt".into(),
            kind: Kind::File,
            size: content.len() as u64,
            modified: Timestamp::from_system_time(SystemTime::now()),
            mode: 0o644,
            hash: ContentHash::of(content),
            target: None,
            version: Default::default(),
            deleted: false,
            modified_by: "b".into(),
            seq: 1,
        };
        let stat = Some(StatKey::of(&abs.symlink_metadata().unwrap()));
        Target {
            local: Some(Entry { record, stat }),
            ..target(root, "f.txt")
        }
    }

    /// Names in `dir` other than `f.txt`.
    fn others(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "f.txt")
            .collect();
        names.sort();
        names
    }

    /// A named local edit, and what it leaves at the path.
    type Race = (&'static str, fn(&Path), Option<&'static [u8]>);

    /// Local edits that race an install.
    const RACES: [Race; 3] = [
        ("atomic save", atomic_save, Some(SAVED)),
        (
            "in-place write",
            |abs| std::fs::write(abs, IN_PLACE).unwrap(),
            Some(IN_PLACE),
        ),
        ("deletion", |abs| std::fs::remove_file(abs).unwrap(), None),
    ];
    const SAVED: &[u8] = b"saved by an editor";
    const IN_PLACE: &[u8] = b"written in place, longer";

    /// An editor's save: a new file renamed over the path.
    fn atomic_save(abs: &Path) {
        let new = abs.with_extension("new");
        std::fs::write(&new, SAVED).unwrap();
        std::fs::rename(new, abs).unwrap();
    }

    /// Whether the file system of the temp dir has `RENAME_EXCHANGE` (without it
    /// the install falls back to check-then-rename, and the races below are not
    /// closed: the tests say so and skip).
    fn exchange_supported() -> bool {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (dir.path().join("x"), dir.path().join("y"));
        std::fs::write(&x, b"x").unwrap();
        std::fs::write(&y, b"y").unwrap();
        let ok = renameat_with(CWD, &x, CWD, &y, RenameFlags::EXCHANGE).is_ok();
        if !ok {
            eprintln!("skipped: no RENAME_EXCHANGE on {}", dir.path().display());
        }
        ok
    }

    /// Runs `before` between the last check and the swap, `after` right after it.
    fn race(before: impl FnOnce(&Path) + 'static, after: Option<fn(&Path)>) {
        BEFORE_SWAP.with(|h| h.set(Some(Box::new(before))));
        AFTER_SWAP.with(|h| h.set(after.map(|f| Box::new(f) as Box<dyn FnOnce(&Path)>)));
    }

    /// `f.txt` holds `content` and nothing else is left in `dir` (no temp file).
    fn assert_left(dir: &Path, content: Option<&[u8]>, what: &str) {
        let found = std::fs::read(dir.join("f.txt")).ok();
        assert_eq!(found.as_deref(), content, "{what}");
        assert!(others(dir).is_empty(), "{what}: {:?}", others(dir));
    }

    fn assert_changed_locally<T: std::fmt::Debug>(r: Result<T, String>, what: &str) {
        let e = r.expect_err(what);
        assert!(e.contains("changed locally"), "{what}: {e}");
    }

    /// Replacing or deleting an indexed file: a local write that lands after the
    /// last check (an editor's atomic save, an in-place write) is never lost; it
    /// wins for now, as if the check had seen it, and no temp file is left. A local
    /// deletion meanwhile stays a deletion.
    #[test]
    fn a_local_write_racing_a_replace_or_delete_is_kept() {
        if !exchange_supported() {
            return;
        }
        let none: fn(&Path) = |_| {};
        for (what, edit, left) in [("no race", none, Some(&b"theirs"[..]))]
            .into_iter()
            .chain(RACES)
        {
            let dir = tempfile::tempdir().unwrap();
            let t = indexed(dir.path(), b"mine");
            let (tmp, made) = t.write_unsynced(b"theirs").unwrap();
            race(edit, None);
            let placed = t.place_synced(tmp, made);
            match what {
                "no race" => assert!(placed.is_ok(), "{placed:?}"),
                _ => assert_changed_locally(placed, what),
            }
            assert_left(dir.path(), left, what);
        }
        for (what, edit, left) in [("no race", none, None)].into_iter().chain(RACES) {
            let dir = tempfile::tempdir().unwrap();
            let entry = indexed(dir.path(), b"mine").local.unwrap();
            let remote = Record {
                deleted: true,
                ..entry.record.clone()
            };
            race(edit, None);
            let deleted = delete(dir.path(), "b", &remote, Some(&entry));
            match left {
                None => assert!(deleted.is_ok(), "{what}: {deleted:?}"),
                Some(_) => assert_changed_locally(deleted, what),
            }
            assert_left(dir.path(), left, what);
        }
    }

    /// A local write that reaches the installed file right after the swap: the
    /// install stands, but its stat is not taken for the one written (`None`: the
    /// path is rescanned), so the write is versioned instead of being masked as our
    /// own echo (soak seed 13: the index kept the peer's hash over the local edit).
    #[test]
    fn a_local_write_right_after_an_install_is_not_taken_for_it() {
        if !exchange_supported() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = indexed(dir.path(), b"mine");
        let (tmp, made) = t.write_unsynced(b"theirs").unwrap();
        race(|_| {}, Some(|abs| std::fs::write(abs, IN_PLACE).unwrap()));
        assert_eq!(t.place_synced(tmp, made), Ok(None));
        assert_left(dir.path(), Some(IN_PLACE), "written after the install");
    }

    /// A second local write between the swap and its undo: one local version is
    /// back at the path, the other kept as a conflict copy (not left at a temp
    /// name, which the start-up clean-up would remove).
    #[test]
    fn a_second_racing_write_is_kept_as_a_conflict_copy() {
        if !exchange_supported() {
            return;
        }
        let first = |abs: &Path| std::fs::write(abs, b"first local write").unwrap();
        let kept = |dir: &Path, at_path: &[u8], copied: &[u8]| {
            assert_eq!(std::fs::read(dir.join("f.txt")).unwrap(), at_path);
            let copies = others(dir);
            assert_eq!(copies.len(), 1, "{copies:?}");
            assert!(
                crate::sync::conflict::is_conflict_copy(&copies[0]),
                "{copies:?}"
            );
            assert_eq!(std::fs::read(dir.join(&copies[0])).unwrap(), copied);
        };

        let dir = tempfile::tempdir().unwrap();
        let t = indexed(dir.path(), b"mine");
        let (tmp, made) = t.write_unsynced(b"theirs").unwrap();
        race(first, Some(atomic_save));
        assert_changed_locally(t.place_synced(tmp, made), "replace");
        kept(dir.path(), b"first local write", SAVED);

        let dir = tempfile::tempdir().unwrap();
        let entry = indexed(dir.path(), b"mine").local.unwrap();
        let remote = Record {
            deleted: true,
            ..entry.record.clone()
        };
        race(first, Some(atomic_save));
        assert_changed_locally(delete(dir.path(), "b", &remote, Some(&entry)), "delete");
        kept(dir.path(), SAVED, b"first local write");
    }

    /// A link or a directory replacing an indexed file, and a local rename onto an
    /// indexed file, keep a local write to that file that lands after the check; a
    /// rename whose source was written just before it moved is not taken as the
    /// renamed version (no stat: it is rescanned).
    #[test]
    fn links_dirs_and_renames_keep_racing_local_writes() {
        if !exchange_supported() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for kind in [Kind::Symlink, Kind::Dir] {
            let local = indexed(dir.path(), b"mine").local.unwrap();
            let remote = Record {
                kind,
                target: Some("elsewhere".into()),
                ..local.record.clone()
            };
            race(atomic_save, None);
            let made = match kind {
                Kind::Dir => make_dir(dir.path(), "b", &remote, Some(&local), None),
                _ => make_symlink(dir.path(), "b", &remote, Some(&local)),
            };
            assert_changed_locally(made, "link or dir");
            assert_left(dir.path(), Some(SAVED), "link or dir");
        }

        for edit_source in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let to = indexed(dir.path(), b"old target").local.unwrap();
            let g = dir.path().join("g.txt");
            std::fs::write(&g, b"renamed").unwrap();
            let from = Entry {
                record: Record {
                    path: "g.txt".into(),
                    size: 7,
                    hash: ContentHash::of(b"renamed"),
                    ..to.record.clone()
                },
                stat: Some(StatKey::of(&g.symlink_metadata().unwrap())),
            };
            let remote = Record {
                path: "f.txt".into(),
                ..from.record.clone()
            };
            let renamed = || rename(dir.path(), "g.txt", &remote, Some(&from), Some(&to));
            if edit_source {
                let g = g.clone();
                race(
                    move |_| std::fs::write(g, b"renamed, then edited").unwrap(),
                    None,
                );
                let (stat, _) = renamed().unwrap();
                assert!(
                    stat.is_none(),
                    "the edited source is not the renamed version"
                );
                assert_left(dir.path(), Some(b"renamed, then edited"), "edited source");
            } else {
                race(atomic_save, None);
                assert_changed_locally(renamed(), "rename");
                assert_eq!(std::fs::read(&g).unwrap(), b"renamed");
                assert_eq!(std::fs::read(dir.path().join("f.txt")).unwrap(), SAVED);
            }
        }
    }

    /// A read-only file is renamed like any other: its mode and mtime are set
    /// through a read-only descriptor. (Run as root, the test drops, for its own
    /// thread, the capability that bypasses permissions.)
    #[test]
    fn a_read_only_file_is_renamed_locally() {
        use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("g.txt");
        std::fs::write(&g, b"renamed").unwrap();
        std::fs::set_permissions(&g, Permissions::from_mode(0o444)).unwrap();
        let meta = g.symlink_metadata().unwrap();
        let from = Entry {
            record: Record {
                path: "g.txt".into(),
                kind: Kind::File,
                size: 7,
                modified: Timestamp::from_system_time(meta.modified().unwrap()),
                mode: 0o444,
                hash: ContentHash::of(b"renamed"),
                target: None,
                version: Default::default(),
                deleted: false,
                modified_by: "b".into(),
                seq: 1,
            },
            stat: Some(StatKey::of(&meta)),
        };
        let remote = Record {
            path: "f.txt".into(),
            modified: Timestamp::from_system_time(SystemTime::UNIX_EPOCH),
            ..from.record.clone()
        };
        let mut caps = capabilities(None).unwrap();
        caps.effective -= CapabilitySet::DAC_OVERRIDE;
        set_capabilities(None, caps).unwrap();
        let renamed = rename(dir.path(), "g.txt", &remote, Some(&from), None);
        caps.effective |= CapabilitySet::DAC_OVERRIDE;
        set_capabilities(None, caps).unwrap();
        let (stat, _) = renamed.unwrap();
        let f = dir.path().join("f.txt");
        assert_eq!(
            f.metadata().unwrap().modified().unwrap(),
            SystemTime::UNIX_EPOCH
        );
        assert!(!g.exists());
        // The mtime had to be set after the rename: not proven, rescanned.
        assert_eq!(stat, None);

        // A plain `mv` (mode and mtime as the record says) is proven by its stat.
        let moved = Entry {
            record: remote.clone(),
            stat: Some(StatKey::of(&f.symlink_metadata().unwrap())),
        };
        let back = Record {
            path: "h.txt".into(),
            ..remote.clone()
        };
        let (stat, _) = rename(dir.path(), "f.txt", &back, Some(&moved), None).unwrap();
        let h = dir.path().join("h.txt");
        assert_eq!(stat, Some(StatKey::of(&h.symlink_metadata().unwrap())));
    }

    /// The local version is moved aside as the conflict copy. A local write that
    /// lands between the conflict's check and that move goes aside with it: the
    /// copy is then not what the record says, so it must be rescanned, not
    /// remembered as our own write (which masked it: the index kept a hash the
    /// node could no longer serve, and the peer retried forever; soak seed 130).
    #[tokio::test]
    async fn a_local_write_moved_aside_by_a_conflict_is_rescanned() {
        for edit in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            std::fs::create_dir(&root).unwrap();
            let engine =
                Engine::open("b", &root, &root.join(crate::index::STATE_DIR_NAME)).unwrap();
            std::fs::write(root.join("b.txt"), b"b's version").unwrap();
            engine.scan(None).await.unwrap();
            let local = engine.record("b.txt").await.unwrap().unwrap();
            let mut version = crate::sync::version::VersionVector::default();
            version.bump("a");
            let remote = Record {
                version,
                deleted: true,
                modified_by: "a".into(),
                ..local.clone()
            };
            if edit {
                let abs = root.join("b.txt");
                *engine.before_move_aside.lock().unwrap() = Some(Box::new(move || {
                    std::fs::write(abs, b"edited while the conflict was decided").unwrap()
                }));
            }
            let copy = "b.sync-conflict-20261201-000000-b.txt".to_string();
            let source = Source::Staged(PathBuf::new());
            let done = conflict(&engine, "a", &source, local, remote, copy.clone())
                .await
                .unwrap();
            let saved = std::fs::read(root.join(&copy)).unwrap();
            let update = &done.updates[0];
            assert_eq!(update.record.path, copy);
            if edit {
                assert_eq!(saved, b"edited while the conflict was decided");
                assert!(update.stat.is_none(), "not remembered as our write");
                assert_eq!(done.rescan, vec![copy]);
            } else {
                assert_eq!(saved, b"b's version");
                assert!(update.stat.is_some());
                assert!(done.rescan.is_empty());
            }
        }
    }
}
