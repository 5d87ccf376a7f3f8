//! Finding local changes while the node runs: inotify batches (short coalescing, so
//! a write is announced within milliseconds) and a periodic full rescan as a safety
//! net, which is all there is when the watcher is unavailable.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::Shared;
use tokio::sync::mpsc;

use crate::watch::{Batch, WatchConfig, Watcher};

/// Rescan period when the watcher is missing or degraded.
const DEGRADED_RESCAN: Duration = Duration::from_secs(30);

/// A started watcher and its batches, if watching is on and possible.
pub(crate) type Watching = Option<(Watcher, mpsc::Receiver<Batch>)>;

/// Starts watching `root` (before the start-up scan, so that nothing written
/// between the scan and the first watch goes unnoticed).
pub(crate) fn start_watching(
    name: &str,
    root: &std::path::Path,
    enabled: bool,
    deferred: Arc<crate::watch::Deferred>,
) -> Watching {
    if !enabled {
        return None;
    }
    match Watcher::start(root, WatchConfig::default(), deferred) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "{name}: cannot watch {} ({e}); falling back to a rescan every {DEGRADED_RESCAN:?}",
                root.display()
            );
            None
        }
    }
}

pub(crate) async fn watch_loop(shared: Arc<Shared>, watching: Watching) {
    let engine = shared.engine.clone();
    let (watcher, mut batches) = match watching {
        Some((w, rx)) => (Some(w), Some(rx)),
        None => (None, None),
    };
    // The rescan period: short while the watcher is missing or degraded (the
    // watch limit was hit, or it stopped reading), checked again after every scan.
    let period_now = |batches: &Option<mpsc::Receiver<Batch>>| {
        let degraded = batches.is_none() || watcher.as_ref().is_none_or(|w| w.degraded());
        if degraded {
            shared.config.rescan_interval.min(DEGRADED_RESCAN)
        } else {
            shared.config.rescan_interval
        }
    };
    let mut period = period_now(&batches);
    let mut rescan = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        let scopes: Option<Vec<String>> = tokio::select! {
            _ = shared.cancelled() => return,
            _ = rescan.tick() => None,
            batch = async { match batches.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match batch {
                    // The watcher stopped (it said why): what it missed is found by
                    // a full scan now, later changes by the shorter period.
                    None => {
                        warn!(
                            "{}: the watcher stopped; rescanning every {:?} from now on",
                            engine.name(),
                            shared.config.rescan_interval.min(DEGRADED_RESCAN)
                        );
                        batches = None;
                        None
                    }
                    Some(batch) => {
                        if batch.paths.contains(".dirsyncignore") {
                            engine.reload_ignore();
                            None
                        } else if batch.rescan {
                            None
                        } else {
                            Some(batch.paths.into_iter().collect())
                        }
                    }
                }
            }
        };
        debug!(
            "{}: scanning {:?}",
            engine.name(),
            scopes.as_ref().map(|s| if s.len() > 5 {
                vec![format!("{} paths", s.len())]
            } else {
                s.clone()
            })
        );
        if let Err(e) = engine.scan(scopes).await {
            warn!("{}: scan failed: {e}", engine.name());
        }
        let want = period_now(&batches);
        if want != period {
            period = want;
            rescan = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        }
    }
}

/// How often lock TTLs are checked (and interrupted releases retried).
const LOCK_TICK: Duration = Duration::from_millis(250);

/// Releases locks whose TTL passed, and finishes releases that a restart or an
/// error interrupted (the first tick runs at start-up). Each tick also runs the
/// engine's housekeeping ([`Engine::tidy`](crate::engine::Engine::tidy)).
pub(crate) async fn lock_loop(shared: Arc<Shared>) {
    let engine = shared.engine.clone();
    let mut tick = tokio::time::interval(LOCK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shared.cancelled() => return,
            _ = tick.tick() => {}
        }
        engine.tidy();
        match engine.release_due().await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!("{}: releasing locks: {e}", engine.name());
                }
            }
        }
    }
}
