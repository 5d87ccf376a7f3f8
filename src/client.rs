//! A typed client of one node, used by `dirsync-cli` and by tests.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::events::{Event, NodeStatus};
use crate::listing::Listing;
use crate::tls::{self, Credentials, TlsError};
use crate::wire::io::{read_message, write_message, StreamError};
use crate::wire::{LockInfo, Message};

/// What a client call can run into; every message says what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0:?} is not HOST:PORT (e.g. 127.0.0.1:4433)")]
    BadAddress(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot reach the node at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("the node at {server} answered badly: {reason}")]
    Protocol { server: String, reason: String },
    #[error("the node at {server} refused: {reason}")]
    Refused { server: String, reason: String },
    #[error(
        "no answer from the node at {server} within {timeout:?}: is dirsync-node running there?"
    )]
    Timeout { server: String, timeout: Duration },
}

/// A connection to one node, authenticated with a client certificate.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    server: String,
    timeout: Duration,
}

impl Client {
    /// Connects to `server` (`HOST:PORT`) as `name`, with `certs_dir/NAME.pem`.
    pub async fn connect(
        server: &str,
        certs_dir: &Path,
        name: &str,
    ) -> Result<Client, ClientError> {
        let creds = Credentials::load(certs_dir, name)?;
        Self::connect_with(server, &creds).await
    }

    /// Connects with already loaded credentials.
    pub async fn connect_with(server: &str, creds: &Credentials) -> Result<Client, ClientError> {
        // A QUIC handshake to a closed UDP port gets no answer at all: keep this short.
        let connect_timeout = Duration::from_secs(5);
        let timeout = Duration::from_secs(15);
        let (host, _) = server
            .rsplit_once(':')
            .ok_or_else(|| ClientError::BadAddress(server.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host(server)
            .await
            .map_err(|e| ClientError::Resolve(server.to_string(), e.to_string()))?
            .next()
            .ok_or_else(|| ClientError::Resolve(server.to_string(), "no address".into()))?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("valid literal")
        } else {
            "0.0.0.0:0".parse().expect("valid literal")
        };
        let connect_err = |reason: String| ClientError::Connect {
            server: server.to_string(),
            reason,
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(tls::client_config(creds)?);
        let connecting = endpoint
            .connect(addr, host)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    server: server.to_string(),
                    timeout: connect_timeout,
                })
            }
            Ok(Err(e)) => return Err(connect_err(tls::explain_connection_error(&e))),
            Ok(Ok(c)) => c,
        };
        Ok(Client {
            endpoint,
            conn,
            server: server.to_string(),
            timeout,
        })
    }

    /// How long a whole request may take (default 10 s, plus the node's own wait
    /// for slow peers).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Turns a stream failure into what happened to the connection, if anything:
    /// a certificate refused by mutual TLS only shows up here, on the first stream.
    fn stream_error(&self, e: &dyn std::fmt::Display) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => ClientError::Connect {
                server: self.server.clone(),
                reason: tls::explain_connection_error(&reason),
            },
            None => ClientError::Protocol {
                server: self.server.clone(),
                reason: e.to_string(),
            },
        }
    }

    async fn request(
        &self,
        msg: &Message,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| self.stream_error(&e))?;
        write_message(&mut send, msg)
            .await
            .map_err(|e| self.stream_error(&e))?;
        let _ = send.finish();
        Ok((send, recv))
    }

    async fn next(&self, recv: &mut quinn::RecvStream) -> Result<Message, ClientError> {
        match read_message(recv).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(self.stream_error(&"the node ended the answer early")),
            Err(StreamError::Frame(e)) => Err(ClientError::Protocol {
                server: self.server.clone(),
                reason: e.to_string(),
            }),
            Err(e) => Err(self.stream_error(&e)),
        }
    }

    /// The merged listing of the node and all its connected peers.
    pub async fn list(&self) -> Result<Listing, ClientError> {
        let work = async {
            let (_send, mut recv) = self.request(&Message::ListRequest).await?;
            let mut listing = Listing::default();
            loop {
                match self.next(&mut recv).await? {
                    Message::MergedEntries(chunk) => listing.entries.extend(chunk),
                    Message::Locks(locks) => listing.locks.extend(locks),
                    Message::ListEnd { nodes, warnings } => {
                        listing.nodes = nodes;
                        listing.warnings = warnings;
                        return Ok(listing);
                    }
                    Message::Refused { reason } => {
                        return Err(ClientError::Refused {
                            server: self.server.clone(),
                            reason,
                        })
                    }
                    other => {
                        return Err(ClientError::Protocol {
                            server: self.server.clone(),
                            reason: format!("unexpected {}", other.kind()),
                        })
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                server: self.server.clone(),
                timeout: self.timeout,
            }),
        }
    }

    /// Sends `msg` and returns the one answer, refusals turned into errors.
    async fn ask(&self, msg: &Message, timeout: Duration) -> Result<Message, ClientError> {
        let work = async {
            let (_send, mut recv) = self.request(msg).await?;
            match self.next(&mut recv).await? {
                Message::Refused { reason } => Err(ClientError::Refused {
                    server: self.server.clone(),
                    reason,
                }),
                answer => Ok(answer),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                server: self.server.clone(),
                timeout,
            }),
        }
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.ask(&Message::StatusRequest, self.timeout).await? {
            Message::Status(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    /// Locks `path` on the node for this client, for `ttl` if given (renews the
    /// TTL if this client already holds it).
    pub async fn lock(&self, path: &str, ttl: Option<Duration>) -> Result<LockInfo, ClientError> {
        let msg = Message::LockRequest {
            path: path.to_string(),
            ttl_secs: ttl.map(|d| d.as_secs().max(1)),
        };
        // The node waits (up to 30 s) for an update of the path in progress.
        match self
            .ask(&msg, self.timeout.max(Duration::from_secs(40)))
            .await?
        {
            Message::Locks(mut locks) if locks.len() == 1 => Ok(locks.remove(0)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Releases this client's lock on `path` (anyone's with `force`, for an admin
    /// certificate); returns once the queued updates are applied, with (queued,
    /// applied).
    pub async fn unlock(&self, path: &str, force: bool) -> Result<(u32, u32), ClientError> {
        let msg = Message::UnlockRequest {
            path: path.to_string(),
            force,
        };
        // Applying a long queue of large files takes a while.
        match self
            .ask(&msg, self.timeout.max(Duration::from_secs(600)))
            .await?
        {
            Message::Unlocked {
                queued, applied, ..
            } => Ok((queued, applied)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Every lock on the node.
    pub async fn locks(&self) -> Result<Vec<LockInfo>, ClientError> {
        match self.ask(&Message::LocksRequest, self.timeout).await? {
            Message::Locks(locks) => Ok(locks),
            other => Err(self.unexpected(other)),
        }
    }

    /// Streams the node's events to `on_event` until it returns false or the node
    /// goes away.
    pub async fn watch(&self, mut on_event: impl FnMut(Event) -> bool) -> Result<(), ClientError> {
        let (_send, mut recv) = self.request(&Message::WatchRequest).await?;
        loop {
            match self.next(&mut recv).await? {
                Message::Event(e) => {
                    if !on_event(e) {
                        return Ok(());
                    }
                }
                other => return Err(self.unexpected(other)),
            }
        }
    }

    fn unexpected(&self, msg: Message) -> ClientError {
        match msg {
            Message::Refused { reason } => ClientError::Refused {
                server: self.server.clone(),
                reason,
            },
            other => ClientError::Protocol {
                server: self.server.clone(),
                reason: format!("unexpected {}", other.kind()),
            },
        }
    }

    /// Closes the connection politely and waits briefly for the close to be sent.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}
