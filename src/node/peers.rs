//! Peer sessions: dialing, the hello exchange, and one session per peer.
//!
//! Two nodes that dial each other at the same time end up with two connections.
//! Both sides keep the one dialed by the node whose name sorts first and close the
//! other with [`close_code::DUPLICATE`]; the rule needs no coordination because both
//! apply it to the same facts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::Connection;
use tracing::{debug, info, warn};

use super::{close_code, Shared};
use crate::events::{Event, EventKind};
use crate::tls::{self, Role};
use crate::wire::io::{read_message, write_message};
use crate::wire::{Message, PROTOCOL_VERSION};

/// A live connection with a peer node.
#[derive(Clone)]
pub(crate) struct Session {
    pub conn: Connection,
    /// Name of the node that dialed this connection.
    pub dialer: String,
    pub since: SystemTime,
}

/// What we know about a configured peer address.
#[derive(Clone, Debug)]
pub(crate) enum PeerStatus {
    Connecting,
    Connected { name: String },
    Down { error: String },
}

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

impl Shared {
    /// Sessions whose connection is still open.
    pub(crate) fn live_sessions(&self) -> Vec<(String, Connection)> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .iter()
            .filter(|(_, s)| s.conn.close_reason().is_none())
            .map(|(n, s)| (n.clone(), s.conn.clone()))
            .collect()
    }

    fn session(&self, peer: &str) -> Option<Connection> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(peer)
            .filter(|s| s.conn.close_reason().is_none())
            .map(|s| s.conn.clone())
    }

    /// Makes `conn` the session with `peer`, unless a preferred live one exists.
    /// Returns false if `conn` lost and must be closed as a duplicate.
    pub(crate) fn register(&self, peer: &str, conn: &Connection, dialer: &str) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = sessions.get(peer) {
            if old.conn.stable_id() != conn.stable_id() && old.conn.close_reason().is_none() {
                let preferred = std::cmp::min(self.name(), peer);
                // Same dialer twice means a reconnect: the old connection is stale.
                if old.dialer == preferred && dialer != preferred {
                    return false;
                }
                old.conn.close(
                    close_code::DUPLICATE.into(),
                    b"duplicate connection replaced",
                );
            }
        }
        sessions.insert(
            peer.to_string(),
            Session {
                conn: conn.clone(),
                dialer: dialer.to_string(),
                since: SystemTime::now(),
            },
        );
        info!(
            "peer {peer} connected ({} {})",
            if dialer == self.name() {
                "dialed"
            } else {
                "from"
            },
            conn.remote_address()
        );
        self.engine.emit(
            Event::new(self.name(), EventKind::PeerConnected)
                .peer(peer)
                .detail(conn.remote_address().to_string()),
        );
        true
    }

    /// Forgets the session with `peer` if it is still `conn`.
    pub(crate) fn unregister(&self, peer: &str, conn: &Connection) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions
            .get(peer)
            .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
        {
            sessions.remove(peer);
            let reason = conn
                .close_reason()
                .map(|e| tls::explain_connection_error(&e))
                .unwrap_or_else(|| "closed".into());
            info!("peer {peer} disconnected: {reason}");
            self.engine.emit(
                Event::new(self.name(), EventKind::PeerDisconnected)
                    .peer(peer)
                    .detail(reason),
            );
        }
    }

    fn set_status(&self, peer_addr: &str, status: PeerStatus) {
        let mut map = self.peer_status.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(peer_addr.to_string(), status);
    }

    /// Configured peers that are not connected, with why: for listing warnings.
    pub(crate) fn unreachable_peers(&self) -> Vec<(String, String)> {
        let map = self.peer_status.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(addr, st)| match st {
                PeerStatus::Connected { name } if self.session(name).is_some() => None,
                PeerStatus::Connected { .. } => Some((addr.clone(), "connection lost".into())),
                PeerStatus::Connecting => Some((addr.clone(), "not connected yet".into())),
                PeerStatus::Down { error } => Some((addr.clone(), error.clone())),
            })
            .collect()
    }
}

/// Why a dial attempt failed.
enum DialError {
    /// Worth retrying later.
    Retry(String),
    /// The peer is already connected through another connection: wait for it.
    Duplicate(Connection),
}

/// Keeps a session with the peer at `addr` up until shutdown, logging changes of
/// state once rather than on every attempt.
pub(crate) async fn dial_loop(shared: Arc<Shared>, addr: String) {
    let mut backoff = FIRST_BACKOFF;
    let mut last_error: Option<String> = None;
    loop {
        let attempt = tokio::select! {
            _ = shared.cancelled() => return,
            r = dial(&shared, &addr) => r,
        };
        match attempt {
            Ok((name, conn)) => {
                last_error = None;
                backoff = FIRST_BACKOFF;
                shared.set_status(&addr, PeerStatus::Connected { name: name.clone() });
                let served = super::serve::serve_connection(
                    shared.clone(),
                    conn.clone(),
                    tls::Identity {
                        name: name.clone(),
                        role: Role::Node,
                    },
                );
                let pulled = pull_from(shared.clone(), name.clone(), conn.clone());
                // Not cut short on shutdown: closing the endpoint ends the session,
                // and a batch being applied still commits what it installed.
                tokio::join!(served, pulled);
                if *shared.shutdown.borrow() {
                    shared.unregister(&name, &conn);
                    return;
                }
                shared.unregister(&name, &conn);
                shared.set_status(
                    &addr,
                    PeerStatus::Down {
                        error: "disconnected".into(),
                    },
                );
            }
            Err(DialError::Duplicate(existing)) => {
                debug!("peer at {addr} already connected; waiting on that session");
                tokio::select! {
                    _ = shared.cancelled() => return,
                    _ = existing.closed() => {}
                }
            }
            Err(DialError::Retry(error)) => {
                if last_error.as_deref() != Some(error.as_str()) {
                    warn!(
                        "peer {addr} unreachable: {error}; retrying with backoff up to {:?}",
                        shared.config.max_backoff
                    );
                } else {
                    debug!("peer {addr} still unreachable: {error}");
                }
                shared.set_status(
                    &addr,
                    PeerStatus::Down {
                        error: error.clone(),
                    },
                );
                last_error = Some(error);
                let jitter = Duration::from_millis(
                    u64::from(
                        SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.subsec_millis())
                            .unwrap_or(0),
                    ) % 100,
                );
                tokio::select! {
                    _ = shared.cancelled() => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(shared.config.max_backoff);
            }
        }
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT` too) into the TLS server name and a socket address.
async fn resolve(addr: &str) -> Result<(String, SocketAddr), String> {
    let (host, _) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    let first = addrs
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    Ok((host, first))
}

/// One attempt: connect, check the peer is a node, exchange hellos, register.
async fn dial(shared: &Arc<Shared>, addr: &str) -> Result<(String, Connection), DialError> {
    let (host, sock) = resolve(addr).await.map_err(DialError::Retry)?;
    // An IPv6 endpoint reaches IPv4 peers through mapped addresses.
    let sock = match (shared.endpoint.local_addr(), sock) {
        (Ok(local), SocketAddr::V4(v4)) if local.is_ipv6() => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => sock,
    };
    let connecting = shared
        .endpoint
        .connect_with(shared.client_config.clone(), sock, &host)
        .map_err(|e| DialError::Retry(e.to_string()))?;
    let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Err(_) => return Err(DialError::Retry("no answer (timed out)".into())),
        Ok(Err(e)) => return Err(DialError::Retry(tls::explain_connection_error(&e))),
        Ok(Ok(c)) => c,
    };
    let fail = |conn: &Connection, code: u32, why: String| {
        conn.close(code.into(), why.as_bytes());
        DialError::Retry(why)
    };
    let id =
        tls::peer_identity(&conn).map_err(|e| fail(&conn, close_code::FORBIDDEN, e.to_string()))?;
    if id.role != Role::Node {
        return Err(fail(
            &conn,
            close_code::FORBIDDEN,
            format!(
                "{addr} presented a {} certificate ({}), not a node's",
                id.role, id.name
            ),
        ));
    }
    if id.name == shared.name() {
        return Err(fail(
            &conn,
            close_code::FORBIDDEN,
            format!("{addr} is this node itself ({})", id.name),
        ));
    }
    let reply = tokio::time::timeout(DIAL_TIMEOUT, hello(shared, &conn)).await;
    match reply {
        Err(_) => {
            return Err(fail(
                &conn,
                close_code::PROTOCOL,
                "no hello from peer in time".into(),
            ))
        }
        Ok(Err(e)) => {
            if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                if u64::from(c.error_code) == u64::from(close_code::DUPLICATE) {
                    if let Some(existing) = shared.session(&id.name) {
                        return Err(DialError::Duplicate(existing));
                    }
                }
            }
            return Err(DialError::Retry(e));
        }
        Ok(Ok(Message::Hello { version, name })) => {
            if version != PROTOCOL_VERSION {
                let why = format!("protocol version mismatch: {addr} speaks {version}, we speak {PROTOCOL_VERSION}");
                return Err(fail(&conn, close_code::VERSION_MISMATCH, why));
            }
            if name != id.name {
                return Err(fail(
                    &conn,
                    close_code::PROTOCOL,
                    format!(
                        "{addr} says it is {name:?} but its certificate is {:?}",
                        id.name
                    ),
                ));
            }
        }
        Ok(Ok(Message::Refused { reason })) => {
            return Err(DialError::Retry(format!("refused: {reason}")))
        }
        Ok(Ok(other)) => {
            return Err(fail(
                &conn,
                close_code::PROTOCOL,
                format!("unexpected {} instead of Hello", other.kind()),
            ))
        }
    }
    if !shared.register(&id.name, &conn, shared.name()) {
        conn.close(close_code::DUPLICATE.into(), b"duplicate connection");
        return match shared.session(&id.name) {
            Some(existing) => Err(DialError::Duplicate(existing)),
            None => Err(DialError::Retry("duplicate connection".into())),
        };
    }
    Ok((id.name, conn))
}

/// Sends our hello on a new stream and reads the answer.
async fn hello(shared: &Shared, conn: &Connection) -> Result<Message, String> {
    let explain = |e: &dyn std::fmt::Display| match conn.close_reason() {
        Some(c) => tls::explain_connection_error(&c),
        None => e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| explain(&e))?;
    let msg = Message::Hello {
        version: PROTOCOL_VERSION,
        name: shared.name().to_string(),
    };
    write_message(&mut send, &msg)
        .await
        .map_err(|e| explain(&e))?;
    let _ = send.finish();
    match read_message(&mut recv).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("peer closed the hello stream without answering".into()),
        Err(e) => Err(explain(&e)),
    }
}

/// Applies the peer's index until the connection ends; a failure closes the
/// connection so that the dialer reconnects and resumes from the recorded progress.
pub(crate) async fn pull_from(shared: Arc<Shared>, peer: String, conn: Connection) {
    if shared.config.send_only {
        return;
    }
    let mut scanned = shared.scanned.subscribe();
    tokio::select! {
        _ = shared.cancelled() => return,
        _ = conn.closed() => return,
        _ = scanned.wait_for(|done| *done) => {}
    }
    if let Err(e) =
        crate::engine::session::pull(shared.engine.clone(), peer.clone(), conn.clone()).await
    {
        if conn.close_reason().is_none() {
            warn!("index exchange with {peer} failed: {e}");
            conn.close(
                close_code::PROTOCOL.into(),
                format!("index exchange failed: {e}").as_bytes(),
            );
        }
    }
}

impl Shared {
    /// Every configured or connected peer, for status.
    pub(crate) fn peer_states(&self) -> Vec<crate::events::PeerState> {
        let rfc = |t: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        };
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<crate::events::PeerState> = sessions
            .iter()
            .filter(|(_, s)| s.conn.close_reason().is_none())
            .map(|(name, s)| crate::events::PeerState {
                name: name.clone(),
                address: Some(s.conn.remote_address().to_string()),
                connected: true,
                since: Some(rfc(s.since)),
                last_error: None,
            })
            .collect();
        drop(sessions);
        for (addr, why) in self.unreachable_peers() {
            out.push(crate::events::PeerState {
                name: addr.clone(),
                address: Some(addr),
                connected: false,
                since: None,
                last_error: Some(why),
            });
        }
        out
    }
}
