//! Serving: accepting connections, and answering requests on their streams.

use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use super::{close_code, Shared};
use crate::engine::session::serve_subscribe;
use crate::engine::transfer::{serve_blocks, serve_fetch};
use crate::events::{Event, EventKind, NodeStatus};
use crate::listing::merge;
use crate::tls::{self, Identity, Role};
use crate::wire::io::{read_message, take_end, write_message, StreamError};
use crate::wire::messages::chunk_by_size;
use crate::wire::{FileEntry, Message, CHUNK_TARGET, PROTOCOL_VERSION};

/// Accepts connections until shutdown; each gets its own task.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = shared.cancelled() => break,
            i = shared.endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let shared = shared.clone();
        conns.spawn(
            async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(
                            "refused connection from {remote}: {}",
                            tls::explain_connection_error(&e)
                        );
                        return;
                    }
                };
                let id = match tls::peer_identity(&conn) {
                    Ok(id) => id,
                    Err(e) => {
                        warn!("refused connection from {remote}: {e}");
                        conn.close(close_code::FORBIDDEN.into(), e.to_string().as_bytes());
                        return;
                    }
                };
                debug!("connection from {} ({}) at {remote}", id.name, id.role);
                serve_connection(shared.clone(), conn.clone(), id.clone()).await;
                if id.role == Role::Node {
                    shared.unregister(&id.name, &conn);
                }
            }
            .in_current_span(),
        );
    }
    drain(conns).await;
}

/// Lets tasks finish on their own (their connections are closing: a batch being
/// applied still commits what it installed), then aborts what is left.
async fn drain(mut set: JoinSet<()>) {
    let all = async { while set.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(2), all)
        .await
        .is_err()
    {
        set.shutdown().await;
    }
}

/// Answers requests on `conn`'s streams until the connection closes.
pub(crate) async fn serve_connection(shared: Arc<Shared>, conn: Connection, id: Identity) {
    let mut streams = JoinSet::new();
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let span = tracing::debug_span!("stream", peer = %id.name);
        streams.spawn(
            handle_stream(shared.clone(), conn.clone(), id.clone(), send, recv).instrument(span),
        );
    }
    drain(streams).await;
}

async fn handle_stream(
    shared: Arc<Shared>,
    conn: Connection,
    id: Identity,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let request = match read_message(&mut recv).await {
        // A block list is followed by the asker's ranges on the same stream.
        Ok(Some(m)) => {
            if !matches!(m, Message::BlocksRequest { .. }) {
                take_end(&mut recv).await;
            }
            m
        }
        Ok(None) => return,
        Err(StreamError::Frame(e)) => {
            warn!(
                "malformed request from {}: {e}; closing the connection",
                id.name
            );
            conn.close(
                close_code::PROTOCOL.into(),
                format!("malformed request: {e}").as_bytes(),
            );
            return;
        }
        Err(e) => {
            debug!("stream from {} failed: {e}", id.name);
            return;
        }
    };
    // Every request but a file fetch is rare or long-lived: boxed, so the task
    // spawned per stream (one per file transferred) stays small.
    let result = match request {
        Message::Hello { version, name } => {
            Box::pin(answer_hello(&shared, &conn, &id, &mut send, version, name)).await
        }
        Message::ListRequest => Box::pin(answer_list(&shared, &mut send)).await,
        Message::PeerListRequest if id.role == Role::Node => {
            Box::pin(answer_peer_list(&shared, &mut send)).await
        }
        Message::Subscribe { index_id, since } if id.role == Role::Node => {
            Box::pin(serve_subscribe(
                &shared.engine,
                &id.name,
                index_id,
                since,
                &mut send,
            ))
            .await
        }
        Message::FetchRequest { path, hash } if id.role == Role::Node => {
            serve_fetch(&shared.engine, path, hash, &mut send).await
        }
        Message::BlocksRequest { path, hash } if id.role == Role::Node => {
            Box::pin(serve_blocks(
                &shared.engine,
                path,
                hash,
                &mut send,
                &mut recv,
            ))
            .await
        }
        Message::WatchRequest => Box::pin(answer_watch(&shared, &mut send)).await,
        request @ (Message::LockRequest { .. }
        | Message::UnlockRequest { .. }
        | Message::LocksRequest)
            if id.role != Role::Node =>
        {
            Box::pin(answer_locks(&shared, &id, request, &mut send)).await
        }
        Message::StatusRequest => {
            let status = Box::pin(status(&shared)).await;
            write_message(&mut send, &Message::Status(status)).await
        }
        other => {
            let reason = match id.role {
                Role::Client | Role::Admin => format!(
                    "{} has a {} certificate and may not send {}",
                    id.name,
                    id.role,
                    other.kind()
                ),
                Role::Node => format!("unexpected request {}", other.kind()),
            };
            warn!("refused a request from {}: {reason}", id.name);
            write_message(&mut send, &Message::Refused { reason }).await
        }
    };
    match result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => debug!("answering {} failed: {e}", id.name),
    }
}

/// The answer to a peer's first request: hello back, or a refusal that closes the
/// connection with a reason both sides log.
async fn answer_hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    id: &Identity,
    send: &mut SendStream,
    version: u32,
    name: String,
) -> Result<(), StreamError> {
    let refusal = if id.role != Role::Node {
        Some((
            close_code::FORBIDDEN,
            format!(
                "certificate {:?} has role {}; only node certificates may act as nodes",
                id.name, id.role
            ),
        ))
    } else if version != PROTOCOL_VERSION {
        Some((
            close_code::VERSION_MISMATCH,
            format!(
                "protocol version mismatch: {} speaks {version}, {} speaks {PROTOCOL_VERSION}",
                id.name,
                shared.name()
            ),
        ))
    } else if name != id.name {
        Some((
            close_code::FORBIDDEN,
            format!("hello says {name:?} but the certificate is {:?}", id.name),
        ))
    } else if id.name == shared.name() {
        Some((
            close_code::FORBIDDEN,
            format!("a node named {:?} connected to itself", id.name),
        ))
    } else {
        None
    };
    if let Some((code, reason)) = refusal {
        warn!(
            "refused peer {} at {}: {reason}",
            id.name,
            conn.remote_address()
        );
        write_message(
            send,
            &Message::Refused {
                reason: reason.clone(),
            },
        )
        .await?;
        let _ = send.finish();
        // Give the refusal a moment to leave before the close discards it.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), send.stopped()).await;
        conn.close(code.into(), reason.as_bytes());
        return Ok(());
    }
    if !shared.register(&id.name, conn, &id.name) {
        conn.close(close_code::DUPLICATE.into(), b"duplicate connection");
        return Ok(());
    }
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        name: shared.name().to_string(),
    };
    write_message(send, &hello).await?;
    let _ = send.finish();
    // This stream's task now pulls the peer's index for as long as the session lives.
    super::peers::pull_from(shared.clone(), id.name.clone(), conn.clone()).await;
    Ok(())
}

/// This node's own files: a rescan (cheap: the index proves unchanged files by
/// their stat) and then the index.
async fn local_entries(shared: &Shared) -> Result<Vec<FileEntry>, String> {
    if let Err(e) = shared.engine.scan(None).await {
        warn!("{e}");
    }
    shared.engine.local_files().await.map_err(|e| e.to_string())
}

/// Streams this node's events to a client until it goes away.
async fn answer_watch(shared: &Shared, send: &mut SendStream) -> Result<(), StreamError> {
    let mut events = shared.engine.events();
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = send.stopped() => return Ok(()),
        };
        match event {
            Ok(e) => write_message(send, &Message::Event(e)).await?,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let note = Event::new(shared.name(), EventKind::Failed)
                    .detail(format!("{n} events dropped: the watcher was too slow"));
                write_message(send, &Message::Event(note)).await?
            }
            Err(_) => return Ok(()),
        }
    }
}

/// The node's status for `dirsync-cli status`.
async fn status(shared: &Shared) -> NodeStatus {
    let (files, bytes) = shared.engine.totals().await.unwrap_or((0, 0));
    let (in_flight, queued) = shared.engine.transfers.snapshot();
    NodeStatus {
        name: shared.name().to_string(),
        dir: shared.config.dir.display().to_string(),
        peers: shared.peer_states(),
        files,
        bytes,
        transfers_in_flight: in_flight,
        transfers_queued: queued,
    }
}

async fn answer_peer_list(shared: &Shared, send: &mut SendStream) -> Result<(), StreamError> {
    let entries = match local_entries(shared).await {
        Ok(e) => e,
        Err(reason) => return write_message(send, &Message::Refused { reason }).await,
    };
    for chunk in chunk_by_size(entries, CHUNK_TARGET, FileEntry::encoded_size_hint) {
        write_message(send, &Message::LocalEntries(chunk)).await?;
    }
    let nodes = vec![shared.name().to_string()];
    write_message(
        send,
        &Message::ListEnd {
            nodes,
            warnings: Vec::new(),
        },
    )
    .await
}

/// Asks one peer for its own files.
async fn fetch_peer_listing(conn: Connection) -> Result<Vec<FileEntry>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_message(&mut send, &Message::PeerListRequest)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut entries = Vec::new();
    loop {
        match read_message(&mut recv).await.map_err(|e| e.to_string())? {
            Some(Message::LocalEntries(chunk)) => entries.extend(chunk),
            Some(Message::ListEnd { .. }) => return Ok(entries),
            Some(Message::Refused { reason }) => return Err(format!("refused: {reason}")),
            Some(other) => return Err(format!("unexpected {}", other.kind())),
            None => return Err("listing ended early".into()),
        }
    }
}

/// The merged listing: ours and every connected peer's, each peer bounded by the
/// configured timeout; peers that cannot answer become warnings.
async fn answer_list(shared: &Shared, send: &mut SendStream) -> Result<(), StreamError> {
    let mut asks = JoinSet::new();
    for (name, conn) in shared.live_sessions() {
        let timeout = shared.config.peer_timeout;
        asks.spawn(async move {
            let r = match tokio::time::timeout(timeout, fetch_peer_listing(conn)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            (name, r)
        });
    }
    let mut sources = Vec::new();
    let mut warnings = Vec::new();
    match local_entries(shared).await {
        Ok(entries) => sources.push((shared.name().to_string(), entries)),
        Err(e) => warnings.push(format!("node {}: {e}", shared.name())),
    }
    while let Some(joined) = asks.join_next().await {
        match joined {
            Ok((name, Ok(entries))) => sources.push((name, entries)),
            Ok((name, Err(e))) => {
                info!("peer {name} left out of a listing: {e}");
                warnings.push(format!("peer {name}: {e}"));
            }
            Err(e) => warnings.push(format!("a peer query failed: {e}")),
        }
    }
    for (addr, why) in shared.unreachable_peers() {
        warnings.push(format!("peer {addr} is not connected: {why}"));
    }
    let mut nodes: Vec<String> = sources.iter().map(|(n, _)| n.clone()).collect();
    nodes.sort();
    let merged = merge(sources);
    for chunk in chunk_by_size(merged, CHUNK_TARGET, |e| e.encoded_size_hint()) {
        write_message(send, &Message::MergedEntries(chunk)).await?;
    }
    match shared.engine.locks().await {
        Ok(locks) => {
            for chunk in chunk_by_size(locks, CHUNK_TARGET, lock_size_hint) {
                write_message(send, &Message::Locks(chunk)).await?;
            }
        }
        Err(e) => warnings.push(format!("node {}: locks not listed: {e}", shared.name())),
    }
    write_message(send, &Message::ListEnd { nodes, warnings }).await
}

fn lock_size_hint(l: &crate::wire::LockInfo) -> usize {
    l.path.len() + l.owner.len() + 48
}

/// Lock, unlock and list locks for a client; the owner is the client's certificate
/// name, and only an admin certificate may force.
async fn answer_locks(
    shared: &Shared,
    id: &Identity,
    request: Message,
    send: &mut SendStream,
) -> Result<(), StreamError> {
    let engine = &shared.engine;
    let refused = |e: crate::engine::locks::LockError| Message::Refused {
        reason: e.to_string(),
    };
    let answer = match request {
        Message::LockRequest { path, ttl_secs } => {
            let ttl = ttl_secs.map(std::time::Duration::from_secs);
            match engine.lock(&path, &id.name, ttl).await {
                Ok(lock) => {
                    info!("{}: {} locked {}", shared.name(), id.name, lock.path);
                    Message::Locks(vec![lock])
                }
                Err(e) => refused(e),
            }
        }
        Message::UnlockRequest { path, force } => {
            let admin = id.role == Role::Admin;
            match engine.unlock(&path, &id.name, force, admin).await {
                Ok((queued, applied)) => {
                    info!("{}: {} unlocked {path}", shared.name(), id.name);
                    Message::Unlocked {
                        path,
                        queued,
                        applied,
                    }
                }
                Err(e) => refused(e),
            }
        }
        _ => match engine.locks().await {
            Ok(locks) => Message::Locks(locks),
            Err(e) => refused(e),
        },
    };
    if let Message::Refused { reason } = &answer {
        info!(
            "{}: lock request from {} refused: {reason}",
            shared.name(),
            id.name
        );
    }
    write_message(send, &answer).await
}
