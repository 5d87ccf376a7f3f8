//! Index exchange with one peer over a live connection.
//!
//! Each side subscribes to the other: it sends `Subscribe { index_id, since }` with
//! what it last applied from that peer, and receives `IndexBatch`es: first what it
//! missed, then every change as it is committed. Records that fail to apply (a file
//! changed during its transfer, a transient error) are retried; the recorded
//! progress never passes a record that has not been applied, so a restart resumes
//! from there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, SendStream};

use super::apply::apply_batch;
use super::Engine;
use crate::index::store::IndexId;
use crate::sync::record::Record;
use crate::wire::io::{read_message, write_message, StreamError};
use crate::wire::messages::chunk_by_size;
use crate::wire::{Message, CHUNK_TARGET};

/// How many records are read from the index at a time when catching a peer up.
const PAGE: usize = 4096;
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Index frames already received are merged into one batch up to this many records.
const MERGE_UP_TO: usize = 4096;
/// A record that still fails after this many attempts is given up (and logged): it
/// comes back when the peer changes the path again, or after a reconnect.
const MAX_ATTEMPTS: u32 = 20;
/// At most this many outvoted records are watched per session (conflicts are rare;
/// this only bounds memory against a peer that makes thousands).
const MAX_OUTVOTED: usize = 10_000;

/// Serves a peer's subscription until the stream or connection ends.
pub async fn serve_subscribe(
    engine: &Arc<Engine>,
    peer: &str,
    their_id: Option<IndexId>,
    since: u64,
    send: &mut SendStream,
) -> Result<(), StreamError> {
    let our_id = engine
        .with_store(|s| s.index_id())
        .await
        .map_err(|_| StreamError::Truncated)?;
    // Sequence numbers of another index incarnation mean nothing here: start over.
    let mut cursor = if their_id == Some(our_id) { since } else { 0 };
    let mut seq = engine.seq();
    // Records we took unchanged from this peer are left out (it has them: no
    // echo). A peer catching up from scratch may have lost its index, so it does
    // get back what we took from it before this session (adopting those versions
    // keeps its counters from going backwards); only later ones are left out.
    let filter_after = if cursor > 0 { 0 } else { *seq.borrow() };
    loop {
        seq.borrow_and_update();
        let from = cursor;
        let peer = peer.to_string();
        let page = engine.with_store(move |s| s.since_for(from, PAGE, &peer, filter_after));
        let records = match page.await {
            Ok(Ok((r, last))) => {
                if r.is_empty() && last > cursor {
                    // All left out: move on without a frame.
                    cursor = last;
                    continue;
                }
                r
            }
            Ok(Err(e)) => {
                tracing::warn!("{}: reading the index for a peer: {e}", engine.name());
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        if records.is_empty() {
            tokio::select! {
                changed = seq.changed() => if changed.is_err() { return Ok(()) },
                _ = send.stopped() => return Ok(()),
            }
            continue;
        }
        for chunk in chunk_by_size(records, CHUNK_TARGET, Record::encoded_size_hint) {
            let max_seq = chunk.last().map_or(cursor, |r| r.seq);
            write_message(
                send,
                &Message::IndexBatch {
                    index_id: our_id,
                    max_seq,
                    records: chunk,
                },
            )
            .await?;
            cursor = max_seq;
        }
    }
}

/// Subscribes to `peer`'s index and applies what arrives, until the connection ends.
pub async fn pull(engine: Arc<Engine>, peer: String, conn: Connection) -> Result<(), String> {
    let p = peer.clone();
    let progress = engine
        .with_store(move |s| s.peer_progress(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let subscribe = Message::Subscribe {
        index_id: progress.map(|(id, _)| id),
        since: progress.map_or(0, |(_, seq)| seq),
    };
    write_message(&mut send, &subscribe)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    // Frames are read by their own task: `read_message` is not cancel-safe, and the
    // loop below also waits on a retry timer. Dropping a half-read frame would
    // desynchronise the stream for good.
    let (tx, mut frames) = tokio::sync::mpsc::channel(16);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let msg = read_message(&mut recv).await;
            let end = !matches!(msg, Ok(Some(_)));
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    }));
    let mut pending: BTreeMap<String, (Record, u32)> = BTreeMap::new();
    // Records of this peer that lost a conflict to ours, with the sequence number
    // of our record. Nothing was done (the peer takes ours), and our progress moved
    // past them. If our record changes before the peer has taken it (we delete the
    // file, say), the peer's record is decided again: otherwise the peer, which
    // already took ours as the winner and sees our new record as concurrent with
    // its own, waits for us, and we for it. Dropped when the peer sends a newer
    // record of the path. Kept in the index, so a reconnect (a partition, say)
    // does not forget them.
    let p = peer.clone();
    let mut outvoted: BTreeMap<String, (Record, u64)> = engine
        .with_store(move |s| s.outvoted(&p))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(r, seq)| (r.path.clone(), (r, seq)))
        .collect();
    let mut last: Option<(IndexId, u64)> = progress;
    let mut retry = tokio::time::interval(RETRY_EVERY);
    // A frame taken out of the channel while merging, not part of the batch.
    let mut held = None;
    loop {
        tokio::select! {
            msg = async { match held.take() { Some(m) => Some(m), None => frames.recv().await } } => {
                let msg = msg.unwrap_or(Ok(None));
                let (index_id, mut max_seq, mut records) = match msg {
                    Ok(Some(Message::IndexBatch { index_id, max_seq, records })) => (index_id, max_seq, records),
                    Ok(Some(other)) => return Err(format!("unexpected {} on the index stream", other.kind())),
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                };
                // Frames that are already here join this batch: fewer plans,
                // commits and waits for a batch's slowest file.
                while records.len() < MERGE_UP_TO {
                    match frames.try_recv() {
                        Ok(Ok(Some(Message::IndexBatch { index_id: id, max_seq: m, records: more }))) if id == index_id => {
                            // A later record of a path replaces an earlier one.
                            let newer: std::collections::HashSet<&str> = more.iter().map(|r| r.path.as_str()).collect();
                            records.retain(|r| !newer.contains(r.path.as_str()));
                            records.extend(more);
                            max_seq = m;
                        }
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // A newer record of a path supersedes a failed or outvoted older one.
                let mut superseded = Vec::new();
                for r in &records {
                    pending.remove(&r.path);
                    if outvoted.remove(&r.path).is_some() {
                        superseded.push(r.path.clone());
                    }
                }
                let floor = pending.values().map(|(r, _)| r.seq.saturating_sub(1)).min();
                let upto = floor.map_or(max_seq, |f| f.min(max_seq));
                let applied = apply_batch(&engine, &peer, &conn, records, Some((index_id, upto))).await.map_err(|e| e.to_string())?;
                pending.extend(applied.failed.into_iter().map(|r| (r.path.clone(), (r, 1))));
                let added = remember_outvoted(&mut outvoted, applied.outvoted);
                save_outvoted(&engine, &peer, added, superseded).await;
                last = Some((index_id, max_seq));
            }
            _ = retry.tick(), if !pending.is_empty() || !outvoted.is_empty() => {
                let attempts: BTreeMap<String, u32> = pending.iter().map(|(p, (_, n))| (p.clone(), *n)).collect();
                let mut records: Vec<Record> = std::mem::take(&mut pending).into_values().map(|(r, _)| r).collect();
                let again = changed_since_outvoted(&engine, &mut outvoted).await?;
                let again_paths: Vec<String> = again.iter().map(|r| r.path.clone()).collect();
                records.extend(again);
                if records.is_empty() {
                    continue;
                }
                let applied = apply_batch(&engine, &peer, &conn, records, last).await.map_err(|e| e.to_string())?;
                let added = remember_outvoted(&mut outvoted, applied.outvoted);
                let removed = again_paths.into_iter().filter(|p| !outvoted.contains_key(p)).collect();
                save_outvoted(&engine, &peer, added, removed).await;
                for r in applied.failed {
                    let n = attempts.get(&r.path).copied().unwrap_or(0) + 1;
                    if n >= MAX_ATTEMPTS {
                        tracing::warn!("{}: giving up on {} from {peer} after {n} attempts", engine.name(), r.path);
                    } else {
                        pending.insert(r.path.clone(), (r, n));
                    }
                }
            }
        }
    }
}

/// Adds `more` to `outvoted` (within its bound); returns what was added.
fn remember_outvoted(
    outvoted: &mut BTreeMap<String, (Record, u64)>,
    more: Vec<(Record, u64)>,
) -> Vec<(Record, u64)> {
    let mut added = Vec::new();
    for (r, ours) in more {
        if outvoted.len() >= MAX_OUTVOTED && !outvoted.contains_key(&r.path) {
            tracing::debug!("too many outvoted records to watch; {} is not", r.path);
            continue;
        }
        outvoted.insert(r.path.clone(), (r.clone(), ours));
        added.push((r, ours));
    }
    added
}

/// Records the changes to `peer`'s outvoted records in the index. A failure is
/// logged: it only means a restart may forget one.
async fn save_outvoted(
    engine: &Arc<Engine>,
    peer: &str,
    add: Vec<(Record, u64)>,
    remove: Vec<String>,
) {
    if add.is_empty() && remove.is_empty() {
        return;
    }
    let p = peer.to_string();
    match engine
        .with_store(move |s| s.update_outvoted(&p, &add, &remove))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{}: recording outvoted records: {e}", engine.name()),
        Err(e) => tracing::warn!("{}: recording outvoted records: {e}", engine.name()),
    }
}

/// Takes out of `outvoted` the records whose path our index has changed since they
/// lost to it: they are to be decided again.
async fn changed_since_outvoted(
    engine: &Arc<Engine>,
    outvoted: &mut BTreeMap<String, (Record, u64)>,
) -> Result<Vec<Record>, String> {
    if outvoted.is_empty() {
        return Ok(Vec::new());
    }
    let watched: Vec<(String, u64)> = outvoted
        .iter()
        .map(|(p, (_, seq))| (p.clone(), *seq))
        .collect();
    let changed = engine
        .with_store(move |s| {
            s.read(|s| {
                let mut changed = Vec::new();
                for (path, seq) in watched {
                    if s.get(&path)?.map(|e| e.record.seq) != Some(seq) {
                        changed.push(path);
                    }
                }
                Ok(changed)
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    for p in &changed {
        tracing::debug!(
            "{}: {p} changed here since a peer's version lost to it: deciding again",
            engine.name()
        );
    }
    Ok(changed
        .into_iter()
        .filter_map(|p| outvoted.remove(&p).map(|(r, _)| r))
        .collect())
}

/// Aborts a task when dropped, so no reader outlives its session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
