//! The dirsync wire protocol.
//!
//! # Goals
//! - One small message vocabulary shared by nodes and clients, encoded with
//!   [postcard](https://docs.rs/postcard) and framed by a 4-byte big-endian length.
//! - Parsing untrusted bytes never panics and never allocates more than
//!   [`MAX_FRAME`] for one frame: the length prefix is checked first.
//! - No I/O in [`codec`] and [`messages`]: both are unit-tested and fuzzed on byte
//!   buffers (`fuzz/fuzz_targets/frame_decode.rs`). [`io`] holds the thin async
//!   helpers that move frames over QUIC streams.
//!
//! # Non-goals
//! - Self-description: both ends must speak the same [`PROTOCOL_VERSION`]. The version
//!   is in the TLS ALPN (`dirsync/1`) and in the [`Message::Hello`] exchange.
//!
//! # Transport
//! Every connection is QUIC with mutual TLS 1.3. Each request runs on its own
//! bidirectional stream: the opener writes one request frame, the other side answers
//! with zero or more data frames and a final frame, then finishes the stream.
//!
//! | stream opened by | request | answer |
//! |---|---|---|
//! | a node dialing a peer (first stream) | `Hello` | `Hello`, or `Refused` and the connection is closed |
//! | a client | `ListRequest` | `MergedEntries`*, `Locks`, then `ListEnd` |
//! | a node, to a connected peer | `PeerListRequest` | `LocalEntries`* then `ListEnd` |
//! | a node, to a connected peer | `Subscribe` | `IndexBatch`* (live, until closed) |
//! | a node, to a connected peer | `FetchRequest` | `FileHeader` then raw bytes |
//! | a client | `WatchRequest` | `Event`* (live) |
//! | a client | `StatusRequest` | `Status` |
//! | a client | `LockRequest` | `Locks` (the new lock) |
//! | a client | `UnlockRequest` | `Unlocked` (after the queue is applied) |
//! | a client | `LocksRequest` | `Locks` |
//!
//! Any request may instead be answered by `Refused { reason }` (for example a client
//! certificate asking for a node-only request).
//!
//! # Compatibility
//! postcard encodes an enum variant by its index, so variants of [`Message`] are only
//! ever appended, never reordered or removed; `tests/golden` pins the bytes.

pub mod codec;
pub mod io;
pub mod messages;

pub use codec::{decode_frame, encode_frame, Decoded, FrameError, MAX_FRAME};
pub use messages::{Block, Copy, FileEntry, LockInfo, MergedEntry, Message, Timestamp};

/// The protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The TLS ALPN protocol identifier; carries the protocol version.
pub const ALPN: &[u8] = b"dirsync/1";

/// Target size of one data frame when streaming long lists: far below [`MAX_FRAME`]
/// so that one more entry (a path is at most 4 KiB) always fits.
pub const CHUNK_TARGET: usize = 64 * 1024;
