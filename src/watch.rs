//! Filesystem events (inotify through `notify`) turned into batches of changed
//! paths for the engine.
//!
//! A batch closes when no event came for `quiet` (2 ms by default: long enough to
//! absorb a burst of writes to one file, short enough for the latency target) or
//! `max_delay` after its first event, so bulk operations (a checkout, an unpacked
//! archive, `rm -rf`) arrive as a few large batches, not one event at a time.
//! Close-after-write marks a finished write; renames report both names; a created or
//! moved-in directory is reported itself, and the engine scans it as a subtree, which
//! also covers files created in it before its watch was in place.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::index::{STATE_DIR_NAME, TEMP_PREFIX};

/// The exact fix for a full inotify watch table.
pub const WATCH_LIMIT_FIX: &str = "sysctl fs.inotify.max_user_watches=524288";

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

/// Watches a tree until dropped.
pub struct Watcher {
    _inner: RecommendedWatcher,
    degraded: Arc<AtomicBool>,
}

type Raw = notify::Result<Event>;

impl Watcher {
    /// Starts watching `root` recursively. Hitting the inotify watch limit does not
    /// fail: the watcher runs degraded (see [`Watcher::degraded`]) and the node
    /// relies on rescans for what it cannot watch.
    pub fn start(
        root: &Path,
        config: WatchConfig,
    ) -> Result<(Watcher, mpsc::Receiver<Batch>), WatchError> {
        let root = root.canonicalize().map_err(|e| WatchError {
            path: root.to_path_buf(),
            reason: e.to_string(),
        })?;
        let (raw_tx, raw_rx) = mpsc::unbounded_channel::<(Instant, Raw)>();
        let mut inner = notify::recommended_watcher(move |res: Raw| {
            let _ = raw_tx.send((Instant::now(), res));
        })
        .map_err(|e| WatchError {
            path: root.clone(),
            reason: e.to_string(),
        })?;
        let degraded = Arc::new(AtomicBool::new(false));
        if let Err(e) = inner.watch(&root, RecursiveMode::Recursive) {
            if is_watch_limit(&e) {
                warn_limit_once(&degraded);
            } else {
                return Err(WatchError {
                    path: root,
                    reason: e.to_string(),
                });
            }
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(coalesce(root, config, raw_rx, tx, degraded.clone()));
        Ok((
            Watcher {
                _inner: inner,
                degraded,
            },
            rx,
        ))
    }

    /// True once some directory could not be watched (the inotify limit).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

fn is_watch_limit(e: &notify::Error) -> bool {
    matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(28))
}

fn warn_limit_once(degraded: &AtomicBool) {
    if !degraded.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the inotify watch limit is reached: some directories are not watched, and their changes are found by periodic rescans only. Raise it with: {WATCH_LIMIT_FIX}"
        );
    }
}

async fn coalesce(
    root: PathBuf,
    config: WatchConfig,
    mut raw: mpsc::UnboundedReceiver<(Instant, Raw)>,
    out: mpsc::Sender<Batch>,
    degraded: Arc<AtomicBool>,
) {
    loop {
        let Some((mut last, first)) = raw.recv().await else {
            return;
        };
        let mut batch = Batch::default();
        absorb(&root, first, &mut batch, &degraded);
        let opened = Instant::now();
        // Sleep through the quiet period and then take everything that came
        // meanwhile, instead of waking for each event: a bulk change (thousands of
        // events a second) costs one wake-up per quiet period, not one per event.
        // Events carry their arrival time, so the batch still closes `quiet` after
        // the last one.
        loop {
            let deadline = (last + config.quiet).min(opened + config.max_delay);
            tokio::time::sleep_until(deadline).await;
            let mut closed = false;
            loop {
                match raw.try_recv() {
                    Ok((at, e)) => {
                        last = last.max(at);
                        absorb(&root, e, &mut batch, &degraded);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                let _ = out.send(batch).await;
                return;
            }
            let now = Instant::now();
            if last + config.quiet <= now || opened + config.max_delay <= now {
                break;
            }
        }
        if (!batch.paths.is_empty() || batch.rescan) && out.send(batch).await.is_err() {
            return;
        }
    }
}

fn absorb(root: &Path, raw: Raw, batch: &mut Batch, degraded: &AtomicBool) {
    let event = match raw {
        Ok(e) => e,
        Err(e) => {
            if is_watch_limit(&e) {
                warn_limit_once(degraded);
            } else {
                tracing::debug!("watch error: {e}");
            }
            batch.rescan = true;
            return;
        }
    };
    if event.need_rescan() {
        batch.rescan = true;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return,
        _ => {}
    }
    for path in &event.paths {
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let Some(rel) = rel.to_str() else {
            batch.rescan = true;
            continue;
        };
        if rel.is_empty() {
            // The root itself changed (moved, deleted, remounted): look at everything.
            batch.rescan = true;
            continue;
        }
        if rel.split('/').next() == Some(STATE_DIR_NAME)
            || rel.split('/').any(|c| c.starts_with(TEMP_PREFIX))
        {
            continue;
        }
        batch.paths.insert(rel.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(rx: &mut mpsc::Receiver<Batch>) -> Batch {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a batch in time")
            .expect("open")
    }

    /// Collects batches until `done` holds for their union.
    async fn until(
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
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default()).unwrap();
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
        let (_w, mut rx) = Watcher::start(&root, WatchConfig::default()).unwrap();
        std::fs::create_dir(root.join("burst")).unwrap();
        for i in 0..2000 {
            std::fs::write(root.join(format!("burst/{i}")), b"b").unwrap();
        }
        let (_, n) = until(&mut rx, |s| s.contains("burst") || s.contains("burst/1999")).await;
        assert!(n < 50, "{n} batches");
    }
}
