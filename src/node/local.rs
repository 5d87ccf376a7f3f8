//! Finding local changes while the node runs: inotify batches (short coalescing, so
//! a write is announced within milliseconds) and a periodic full rescan as a safety
//! net, which is all there is when the watcher is unavailable.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::Shared;
use crate::watch::{WatchConfig, Watcher};

/// A watcher batch naming more paths than this is handled as one full rescan.
const FULL_SCAN_ABOVE: usize = 2000;
/// Rescan period when the watcher is missing or degraded.
const DEGRADED_RESCAN: Duration = Duration::from_secs(30);

pub(crate) async fn watch_loop(shared: Arc<Shared>) {
    let engine = shared.engine.clone();
    let mut watcher = None;
    let mut batches = None;
    if shared.config.watch {
        match Watcher::start(engine.root(), WatchConfig::default()) {
            Ok((w, rx)) => {
                watcher = Some(w);
                batches = Some(rx);
            }
            Err(e) => warn!(
                "{}: cannot watch {} ({e}); falling back to a rescan every {DEGRADED_RESCAN:?}",
                engine.name(),
                engine.root().display()
            ),
        }
    }
    let degraded = watcher.as_ref().is_none_or(|w| w.degraded());
    let period = if degraded {
        shared.config.rescan_interval.min(DEGRADED_RESCAN)
    } else {
        shared.config.rescan_interval
    };
    let mut rescan = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        let scopes: Option<Vec<String>> = tokio::select! {
            _ = shared.cancelled() => return,
            _ = rescan.tick() => None,
            batch = async { match batches.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let Some(batch) = batch else {
                    batches = None;
                    continue;
                };
                if batch.paths.contains(".dirsyncignore") {
                    engine.reload_ignore();
                    None
                } else if batch.rescan || batch.paths.len() > FULL_SCAN_ABOVE {
                    None
                } else {
                    Some(batch.paths.into_iter().collect())
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
    }
}
