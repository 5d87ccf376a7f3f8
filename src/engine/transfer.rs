//! One QUIC stream per file: the sending side reads the file and streams it after a
//! `FileHeader`; the receiving side writes a temporary file while hashing, and
//! accepts it only if the BLAKE3 hash is the one the index record promised.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};

use super::delta;
use super::Engine;
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::sync::record::Kind;
use crate::wire::io::{read_message, take_end, write_message, write_message_and, StreamError};
use crate::wire::Message;

/// The most a large file's transfer reads or writes at a time.
pub(super) const CHUNK: usize = 256 * 1024;

/// Chunks of a delta's fetched bytes that may wait for the assembler.
const ASSEMBLY_QUEUE: usize = 16;

/// Transfers running and waiting for a slot, for `status`.
#[derive(Default, Debug)]
pub struct Counters {
    pub in_flight: AtomicU64,
    pub queued: AtomicU64,
}

/// Why a transfer failed; all of these are retried later.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("content does not match the announced hash (the file changed during the transfer, or the peer lied)")]
    HashMismatch,
    #[error("peer announced {announced} bytes, the index record says {expected}")]
    SizeMismatch { announced: u64, expected: u64 },
    #[error("stream: {0}")]
    Stream(#[from] StreamError),
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent {0} where a file header was expected")]
    Unexpected(&'static str),
    #[error("the peer ended the stream after {got} of {size} bytes")]
    Truncated { got: u64, size: u64 },
    #[error("peer's block list: {0}")]
    Blocks(String),
    #[error("no delta: {0}")]
    NoDelta(String),
}

/// Files up to this size are read (sender) or received (receiver) whole in memory,
/// so each side touches the disk in one blocking call per file; larger ones stream
/// in `CHUNK`s with bounded memory.
pub const SMALL_FILE: u64 = 256 * 1024;

/// What the sender found for a requested version: a small file read whole, a large
/// one opened to stream, or why it refuses.
enum Found {
    Bytes(Vec<u8>),
    Open(File, u64),
    Refuse(String),
}

/// Answers a peer's `FetchRequest`: the file, if it is still at `hash`.
pub async fn serve_fetch(
    engine: &Arc<Engine>,
    path: String,
    hash: ContentHash,
    send: &mut SendStream,
) -> Result<(), StreamError> {
    let refuse = |reason: String| Message::Refused { reason };
    let (mut file, size) = match requested(engine, &path, hash).await {
        Found::Bytes(bytes) => {
            let size = bytes.len() as u64;
            let header = Message::FileHeader { size };
            return write_message_and(send, &header, bytes.into()).await;
        }
        Found::Open(file, size) => (file, size),
        Found::Refuse(reason) => return write_message(send, &refuse(reason)).await,
    };
    write_message(send, &Message::FileHeader { size }).await?;
    let mut left = size;
    while left > 0 {
        // Each piece is read into a buffer of its own and handed to QUIC as it is
        // (no copy into the stream's buffer).
        let want = (left as usize).min(CHUNK);
        let mut buf = Vec::with_capacity(want);
        let n = match Read::by_ref(&mut file)
            .take(want as u64)
            .read_to_end(&mut buf)
        {
            Ok(n) if n == want => n,
            _ => {
                // The file shrank under us: abort the stream, the receiver retries.
                let _ = send.reset(1u32.into());
                return Ok(());
            }
        };
        send.write_chunk(buf.into())
            .await
            .map_err(StreamError::Write)?;
        left -= n as u64;
    }
    Ok(())
}

/// What a peer's request for `path` at `hash` finds ([`find_version`]): the path
/// checked first, the index check and the open (and a small file's read) in one
/// call on a blocking worker.
async fn requested(engine: &Arc<Engine>, path: &str, hash: ContentHash) -> Found {
    let path = match RelPath::parse(path) {
        Ok(r) => String::from(r),
        Err(e) => return Found::Refuse(e.to_string()),
    };
    let me = engine.clone();
    engine
        .small_io
        .run(move || find_version(&me, &path, hash))
        .await
        .unwrap_or_else(|e| Found::Refuse(e.to_string()))
}

/// The indexed file `path` if it is still at `hash`: read whole if small, opened to
/// stream otherwise. Exactly the indexed size is served: a file that only grew since
/// still serves the indexed version (the receiver verifies the hash); one that
/// shrank cannot. Links are never followed, at its end or on its way.
fn find_version(engine: &Engine, path: &str, hash: ContentHash) -> Found {
    let asked =
        |c: &crate::index::store::Served| !c.deleted && c.kind == Kind::File && c.hash == hash;
    let current = {
        let mut reader = engine.reader.lock().unwrap_or_else(|p| p.into_inner());
        match reader.served(path) {
            Ok(Some(c)) if asked(&c) => Ok(Some(c)),
            // The reader's snapshot may be a few milliseconds older than the
            // version asked for: asked again from what is committed now.
            _ => reader.served_now(path),
        }
    };
    let current = match current {
        Ok(Some(c)) => c,
        _ => return Found::Refuse(format!("{path} is not in the index")),
    };
    let moved_on = || Found::Refuse(format!("{path} is no longer at that version"));
    if !asked(&current) {
        return moved_on();
    }
    // Opened from the open root through no link (and without blocking on a fifo
    // put in its place), then checked through the open file: nothing swapped in
    // between a check and the open.
    let root = engine.root_dir_or_open();
    let opened = crate::index::open_read_below(root.as_deref(), &engine.root, path)
        .and_then(|f| f.metadata().map(|m| (f, m)));
    let (file, meta) = match opened {
        Ok((f, m)) if m.is_file() => (f, m),
        Ok(_) => return Found::Refuse(format!("{path} is not a regular file")),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Found::Refuse(format!(
                "{path} is not a regular file, or a link is on its way"
            ))
        }
        Err(e) => return Found::Refuse(format!("{path}: {e}")),
    };
    let size = current.size;
    if meta.len() < size {
        return moved_on();
    }
    if size > SMALL_FILE {
        return Found::Open(file, size);
    }
    let mut bytes = Vec::with_capacity(size as usize);
    match file.take(size).read_to_end(&mut bytes) {
        Ok(n) if n as u64 == size => Found::Bytes(bytes),
        Ok(_) => moved_on(),
        Err(e) => Found::Refuse(format!("{path}: {e}")),
    }
}

/// `O_NOFOLLOW | O_NONBLOCK`: a link is refused (`ELOOP`), a fifo does not block.
fn no_follow_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

/// Fetches a small file whole into memory, checking its size and hash.
pub async fn fetch_small(
    conn: &Connection,
    path: &str,
    hash: ContentHash,
    size: u64,
) -> Result<Vec<u8>, TransferError> {
    receive_small(send_request(conn, path, hash).await?, hash, size).await
}

/// Receives the answer to a request [`send_request`] sent for a small file
/// (`size` bytes at `hash`) whole into memory, checking its size and hash.
pub async fn receive_small(
    mut recv: RecvStream,
    hash: ContentHash,
    size: u64,
) -> Result<Vec<u8>, TransferError> {
    read_header(&mut recv, size).await?;
    let mut bytes = Vec::with_capacity(size as usize);
    while (bytes.len() as u64) < size {
        let want = (size - bytes.len() as u64) as usize;
        match recv.read_chunk(want, true).await? {
            Some(c) => bytes.extend_from_slice(&c.bytes),
            None => {
                return Err(TransferError::Truncated {
                    got: bytes.len() as u64,
                    size,
                })
            }
        }
    }
    take_end(&mut recv).await;
    if ContentHash::of(&bytes) != hash {
        return Err(TransferError::HashMismatch);
    }
    Ok(bytes)
}

/// Sends a `FetchRequest` and reads the header: the stream is then at the content.
async fn request(
    conn: &Connection,
    path: &str,
    hash: ContentHash,
    size: u64,
) -> Result<quinn::RecvStream, TransferError> {
    let mut recv = send_request(conn, path, hash).await?;
    read_header(&mut recv, size).await?;
    Ok(recv)
}

/// Opens a file's stream and sends its `FetchRequest`, without waiting for the
/// answer. Requests sent one after another in one task go out together: the
/// connection sends what is queued when it next runs, so many requests share a
/// datagram instead of taking one each.
pub async fn send_request(
    conn: &Connection,
    path: &str,
    hash: ContentHash,
) -> Result<RecvStream, TransferError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_message(
        &mut send,
        &Message::FetchRequest {
            path: path.to_string(),
            hash,
        },
    )
    .await?;
    let _ = send.finish();
    Ok(recv)
}

/// Reads the `FileHeader` that starts an answer of `expected` raw bytes.
async fn read_header(recv: &mut RecvStream, expected: u64) -> Result<(), TransferError> {
    let announced = match read_message(recv).await? {
        Some(Message::FileHeader { size }) => size,
        Some(Message::Refused { reason }) => return Err(TransferError::Refused(reason)),
        Some(other) => return Err(TransferError::Unexpected(other.kind())),
        None => return Err(TransferError::Unexpected("end of stream")),
    };
    if announced != expected {
        return Err(TransferError::SizeMismatch {
            announced,
            expected,
        });
    }
    Ok(())
}

/// Fetches `path` at `hash` (`size` bytes) from the peer on `conn` into `out`,
/// hashing as it goes. `out` is left at the end of the written content.
pub async fn fetch(
    conn: &Connection,
    path: &str,
    hash: ContentHash,
    size: u64,
    out: &mut File,
) -> Result<u64, TransferError> {
    let mut recv = request(conn, path, hash, size).await?;
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    // QUIC hands over packets' worth of bytes; hashing and writing them in
    // `CHUNK`s lets BLAKE3 use its SIMD paths and makes far fewer write calls.
    let mut buf = Vec::with_capacity(CHUNK);
    while got < size {
        let chunk = match recv
            .read_chunk((size - got).min(CHUNK as u64) as usize, true)
            .await?
        {
            Some(c) => c,
            None => return Err(TransferError::Truncated { got, size }),
        };
        got += chunk.bytes.len() as u64;
        buf.extend_from_slice(&chunk.bytes);
        if buf.len() >= CHUNK || got == size {
            hasher.update(&buf);
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    take_end(&mut recv).await;
    if ContentHash(*hasher.finalize().as_bytes()) != hash {
        return Err(TransferError::HashMismatch);
    }
    Ok(got)
}

/// Answers a peer's `BlocksRequest` for a large file that the index still has at
/// `hash`: its block list, then the byte ranges the peer asks for on the same
/// stream.
pub async fn serve_blocks(
    engine: &Arc<Engine>,
    path: String,
    hash: ContentHash,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), StreamError> {
    let refuse = |reason: String| Message::Refused { reason };
    let (file, size) = match requested(engine, &path, hash).await {
        Found::Open(file, size) => (file, size),
        Found::Bytes(_) => {
            return write_message(send, &refuse(format!("{path} is small: fetch it whole"))).await
        }
        Found::Refuse(reason) => return write_message(send, &refuse(reason)).await,
    };
    let Some(avg) = delta::avg_for(size) else {
        return write_message(send, &refuse(format!("{path} is too large for blocks"))).await;
    };
    // Reading the whole file: on a blocking thread. The list is of the file as
    // it is now; if that is no longer `hash` (an edit the scan has not seen yet),
    // the receiver's whole-file check refuses what it assembles.
    let cut = tokio::task::spawn_blocking(move || {
        let r = delta::cut(&file, size, avg);
        (file, r)
    })
    .await;
    let (file, blocks) = match cut {
        Ok((file, Ok(blocks))) => (file, blocks),
        Ok((_, Err(e))) => return write_message(send, &refuse(format!("{path}: {e}"))).await,
        Err(e) => return write_message(send, &refuse(format!("{path}: {e}"))).await,
    };
    let blocks = blocks.into_iter().map(|(_, b)| b).collect();
    write_message(send, &Message::Blocks { avg, blocks }).await?;
    let ranges = match read_message(recv).await? {
        Some(Message::RangesRequest { ranges }) => ranges,
        // The peer gave up on the delta (it fetches the file whole): nothing to send.
        _ => return Ok(()),
    };
    take_end(recv).await;
    let total = match delta::check_ranges(&ranges, size) {
        Ok(t) => t,
        Err(e) => return write_message(send, &refuse(e)).await,
    };
    write_message(send, &Message::FileHeader { size: total }).await?;
    for (offset, len) in ranges {
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            if std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, offset + done).is_err() {
                // The file shrank under us: abort the stream, the receiver retries.
                let _ = send.reset(1u32.into());
                return Ok(());
            }
            send.write_chunk(buf.into())
                .await
                .map_err(StreamError::Write)?;
            done += want as u64;
        }
    }
    Ok(())
}

/// What a delta transfer took from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaStats {
    /// Bytes of the new version received from the peer.
    pub fetched: u64,
}

/// Fetches `path` at `hash` (`size` bytes) into `out` like [`fetch`], but only
/// the blocks that `old` (this node's older version of it) does not already have;
/// the rest is copied from `old`. The result is accepted only if its whole hash
/// is `hash`.
pub async fn fetch_delta(
    conn: &Connection,
    path: &str,
    hash: ContentHash,
    size: u64,
    old: &Path,
    out: &mut File,
) -> Result<DeltaStats, TransferError> {
    let old = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow_flags())
        .open(old)?;
    let meta = old.metadata()?;
    if !meta.is_file() {
        return Err(TransferError::NoDelta(
            "our version is not a regular file".into(),
        ));
    }
    let old_size = meta.len();
    if old_size > size.saturating_mul(delta::MAX_GROWTH) {
        // Its block map would be out of proportion to what it can save.
        return Err(TransferError::NoDelta(format!(
            "our version ({old_size} bytes) is far larger than the new one"
        )));
    }
    // Our own version is cut while the peer cuts its own, with the average it
    // picks for this size (both sides use `avg_for`): which blocks we have, where.
    let Some(ours) = delta::avg_for(size) else {
        return Err(TransferError::NoDelta(format!(
            "{size} bytes is too large for blocks"
        )));
    };
    let cutting = tokio::task::spawn_blocking(move || {
        let r = delta::cut(&old, old_size, ours);
        (old, r)
    });
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(
        &mut send,
        &Message::BlocksRequest {
            path: path.to_string(),
            hash,
        },
    )
    .await?;
    let (avg, blocks) = match read_message(&mut recv).await? {
        Some(Message::Blocks { avg, blocks }) => (avg, blocks),
        Some(Message::Refused { reason }) => return Err(TransferError::Refused(reason)),
        Some(other) => return Err(TransferError::Unexpected(other.kind())),
        None => return Err(TransferError::Unexpected("end of stream")),
    };
    delta::check_blocks(avg, &blocks, size).map_err(TransferError::Blocks)?;
    let joined = |e: tokio::task::JoinError| std::io::Error::other(e.to_string());
    let (mut old, mut has) = cutting.await.map_err(joined)?;
    if avg != ours {
        // The peer cut with another average: cut ours again the same way.
        (old, has) = tokio::task::spawn_blocking(move || {
            let r = delta::cut(&old, old_size, avg);
            (old, r)
        })
        .await
        .map_err(joined)?;
    }
    let has: std::collections::HashMap<ContentHash, u64> =
        has?.into_iter().map(|(o, b)| (b.hash, o)).collect();
    let (pieces, ranges) = delta::plan(&blocks, &has);
    let fetched: u64 = ranges.iter().map(|(_, l)| l).sum();
    write_message(&mut send, &Message::RangesRequest { ranges }).await?;
    let _ = send.finish();
    read_header(&mut recv, fetched).await?;
    // The file is assembled on a blocking thread (copying our own version can be
    // most of a large file), fed the sender's bytes as they arrive; the channel
    // is bounded, so a slow disk slows the sender through QUIC's flow control.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(ASSEMBLY_QUEUE);
    let mut writer = out.try_clone()?;
    let assembling = tokio::task::spawn_blocking(move || {
        delta::assemble(&pieces, &old, &mut writer, || rx.blocking_recv())
    });
    let mut got = 0u64;
    let received: Result<(), TransferError> = async {
        while got < fetched {
            let want = ((fetched - got) as usize).min(CHUNK);
            let chunk = match recv.read_chunk(want, true).await? {
                Some(c) => c.bytes,
                None => return Err(TransferError::Truncated { got, size: fetched }),
            };
            got += chunk.len() as u64;
            if !chunk.is_empty() && tx.send(chunk).await.is_err() {
                // The assembler stopped; its error says why.
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    // Awaited even when receiving failed: the caller reuses `out` only once
    // nothing writes to it any more.
    let assembled = assembling.await;
    received?;
    let written = assembled.map_err(|e| std::io::Error::other(e.to_string()))??;
    take_end(&mut recv).await;
    if written != hash {
        return Err(TransferError::HashMismatch);
    }
    Ok(DeltaStats { fetched })
}

/// Fetches `path` at `hash` (`size` bytes) into `out`, a new empty temp file:
/// only the blocks that `base` (our older version of it) lacks, if there is one
/// and the delta works; else, or after any delta failure, the whole file. Returns
/// the bytes that came from the peer when a delta did it.
pub async fn fetch_with_base(
    conn: &Connection,
    node: &str,
    (path, hash, size): (&str, ContentHash, u64),
    base: Option<&Path>,
    out: &mut File,
) -> Result<Option<u64>, TransferError> {
    if let Some(old) = base {
        match fetch_delta(conn, path, hash, size, old, out).await {
            Ok(d) => return Ok(Some(d.fetched)),
            Err(e) => {
                tracing::debug!("{node}: delta of {path} failed ({e}); fetching it whole");
                out.set_len(0)?;
                out.rewind()?;
            }
        }
    }
    fetch(conn, path, hash, size, out).await.map(|_| None)
}

/// Copies the local file `from` into `out`, checking it still has `hash`.
pub fn copy_local(from: &Path, hash: ContentHash, out: &mut File) -> Result<u64, TransferError> {
    let meta = from.symlink_metadata()?;
    if !meta.is_file() {
        return Err(TransferError::HashMismatch);
    }
    let mut src = File::open(from)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    if ContentHash(*hasher.finalize().as_bytes()) != hash {
        return Err(TransferError::HashMismatch);
    }
    Ok(total)
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.in_flight.load(Ordering::Relaxed),
            self.queued.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::STATE_DIR_NAME;

    /// The served file is the indexed one at its path: a link or a fifo put in its
    /// place is refused (not followed, not waited on), even with the same content.
    #[tokio::test]
    async fn a_link_or_fifo_in_place_of_an_indexed_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let engine = Engine::open("a", &root, &root.join(STATE_DIR_NAME)).unwrap();
        std::fs::write(root.join("f.txt"), b"secret").unwrap();
        engine.scan(None).await.unwrap();
        let hash = engine.record("f.txt").await.unwrap().unwrap().hash;
        let abs = root.join("f.txt");
        assert!(matches!(find_version(&engine, "f.txt", hash), Found::Bytes(b) if b == b"secret"));

        std::fs::write(dir.path().join("outside.txt"), b"secret").unwrap();
        std::fs::remove_file(&abs).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.txt"), &abs).unwrap();
        assert!(
            matches!(find_version(&engine, "f.txt", hash), Found::Refuse(r) if r.contains("not a regular file"))
        );

        std::fs::remove_file(&abs).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &abs,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        assert!(
            matches!(find_version(&engine, "f.txt", hash), Found::Refuse(r) if r.contains("not a regular file"))
        );
    }

    /// A directory of an indexed path replaced by a link (here to a copy of the
    /// tree outside the root, same content): nothing is served through it.
    #[tokio::test]
    async fn nothing_is_served_through_a_link_put_in_place_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        let engine = Engine::open("a", &root, &root.join(STATE_DIR_NAME)).unwrap();
        std::fs::write(root.join("d/f.txt"), b"secret").unwrap();
        engine.scan(None).await.unwrap();
        let hash = engine.record("d/f.txt").await.unwrap().unwrap().hash;
        assert!(
            matches!(find_version(&engine, "d/f.txt", hash), Found::Bytes(b) if b == b"secret")
        );

        std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
        std::fs::write(dir.path().join("elsewhere/f.txt"), b"secret").unwrap();
        std::fs::rename(root.join("d"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), root.join("d")).unwrap();
        assert!(
            matches!(find_version(&engine, "d/f.txt", hash), Found::Refuse(r) if r.contains("a link is on its way"))
        );
    }
}
