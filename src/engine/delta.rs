//! Delta transfer of large files: both sides cut their version of a file into
//! blocks by content (FastCDC), so an edit, an insertion or a deletion moves only
//! the block boundaries near it. The receiver asks for the new version's block
//! list, keeps every block its own older version already has, and fetches only
//! the byte ranges of the rest (see [`transfer::fetch_delta`]). The assembled file
//! is accepted only if its whole BLAKE3 hash is the one the index promised, so a
//! wrong block (or a lying peer) costs a retry, never a wrong file.
//!
//! The planning and checking here are pure functions; the I/O is in `transfer`.
//!
//! [`transfer::fetch_delta`]: super::transfer::fetch_delta

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::hash::ContentHash;
use crate::wire::Block;

/// Files below this size (on either side) are fetched whole: a block list and a
/// second request cost more than they save.
pub const DELTA_FROM: u64 = 1 << 20;
// Deltas are made on the streaming path, which only files above SMALL_FILE take.
const _: () = assert!(DELTA_FROM > super::transfer::SMALL_FILE);
/// The smallest average block: an edit costs at most a few of these.
pub const MIN_AVG: u32 = 64 * 1024;
/// The largest average block FastCDC allows; files that would need larger ones
/// (over 16 GiB) are fetched whole.
pub const MAX_AVG: u32 = 4 * 1024 * 1024;
/// A delta is made only against an older version at most this many times the new
/// one's size: the receiver keeps a map of its own blocks (about 50 bytes each),
/// which stays within a few MB that way.
pub const MAX_GROWTH: u64 = 4;
/// The sender picks the average so that a file has about this many blocks.
const TARGET_BLOCKS: u64 = 4096;
/// The most blocks a list may have: every block but the last is at least a
/// quarter of the average, so a list cut with [`avg_for`] has at most four times
/// [`TARGET_BLOCKS`], plus one. It keeps a `Blocks` frame (36 bytes a block) well
/// under the frame limit.
pub const MAX_BLOCKS: usize = 4 * TARGET_BLOCKS as usize + 1;

/// The average block size to cut a file of `size` bytes with, or `None` if the
/// file is too large for a delta.
pub fn avg_for(size: u64) -> Option<u32> {
    let want = size.div_ceil(TARGET_BLOCKS).next_power_of_two();
    let avg = want.max(u64::from(MIN_AVG));
    (avg <= u64::from(MAX_AVG)).then_some(avg as u32)
}

/// Whether a peer's `avg` is one [`avg_for`] can choose.
fn valid_avg(avg: u32) -> bool {
    avg.is_power_of_two() && (MIN_AVG..=MAX_AVG).contains(&avg)
}

/// A file's blocks, each with its offset, in file order.
pub type Blocks = Vec<(u64, Block)>;

/// Cuts the first `size` bytes of `file` (read from its current position) into
/// blocks of average `avg`, each with its offset. Fewer than `size` bytes there
/// give fewer blocks (the receiver's whole-file check catches that).
///
/// The cut points are FastCDC's (normalization level 1, the default gear
/// table), the same as its streaming chunker finds; but the file is read many
/// blocks at a time into one buffer and each block is hashed where it lies. The
/// streaming chunker reads one block's worth at a time, copies each block out
/// and moves the rest of its buffer down after each: three times a block's
/// bytes moved per block, about a quarter of a cut's time. Memory is bounded by
/// [`cut_buffer`] (at most 32 MiB, for the largest blocks).
pub fn cut(file: &File, size: u64, avg: u32) -> std::io::Result<Blocks> {
    use fastcdc::v2020::{select_masks, Normalization};
    let avg = avg as usize;
    let (min, max) = (avg / 4, avg * 4);
    let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
    let mut source = file.take(size);
    let mut buf = vec![0u8; cut_buffer(max)];
    // The bytes not yet cut are `buf[start..end]`; `offset` is where `start` is
    // in the file.
    let (mut start, mut end, mut offset) = (0usize, 0usize, 0u64);
    let mut eof = false;
    let mut blocks = Vec::new();
    loop {
        // A cut looks at most `max` bytes ahead: with fewer left, read more
        // first, so every cut sees what the streaming chunker would.
        if !eof && end - start < max {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            while !eof && end < buf.len() {
                match source.read(&mut buf[end..]) {
                    Ok(0) => eof = true,
                    Ok(n) => end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if start == end {
            return Ok(blocks);
        }
        let ahead = &buf[start..start + (end - start).min(max)];
        let (_, len) = fastcdc::v2020::cut(
            ahead,
            min,
            avg,
            max,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        if len == 0 {
            // Never for bytes that are there; ending here keeps the loop finite.
            return Ok(blocks);
        }
        blocks.push((
            offset,
            Block {
                len: len as u32,
                hash: ContentHash::of(&ahead[..len]),
            },
        ));
        start += len;
        offset += len as u64;
    }
}

/// The buffer [`cut`] reads into for blocks of at most `max` bytes: eight of
/// the largest blocks (2 MiB for the usual 64 KiB average), at most 32 MiB, and
/// never less than one block.
fn cut_buffer(max: usize) -> usize {
    max.saturating_mul(8).min(32 << 20).max(max)
}

/// Checks a peer's block list for a file of `size` bytes.
pub fn check_blocks(avg: u32, blocks: &[Block], size: u64) -> Result<(), String> {
    if !valid_avg(avg) {
        return Err(format!("block average {avg} is not one we cut with"));
    }
    if blocks.len() > MAX_BLOCKS {
        return Err(format!("{} blocks (at most {MAX_BLOCKS})", blocks.len()));
    }
    if blocks
        .iter()
        .any(|b| b.len == 0 || b.len > avg.saturating_mul(4))
    {
        return Err("a block is empty or longer than the cut allows".into());
    }
    let total: u64 = blocks.iter().map(|b| u64::from(b.len)).sum();
    if total != size {
        return Err(format!(
            "blocks add up to {total} bytes, the file has {size}"
        ));
    }
    Ok(())
}

/// Checks a peer's ranges against a file of `size` bytes; returns their total.
pub fn check_ranges(ranges: &[(u64, u64)], size: u64) -> Result<u64, String> {
    if ranges.len() > MAX_BLOCKS {
        return Err(format!("{} ranges (at most {MAX_BLOCKS})", ranges.len()));
    }
    let mut total = 0u64;
    for &(offset, len) in ranges {
        match offset.checked_add(len) {
            Some(end) if end <= size => total += len,
            _ => {
                return Err(format!(
                    "range {offset}+{len} is outside the file's {size} bytes"
                ))
            }
        }
    }
    if total > size {
        return Err(format!(
            "ranges ask for {total} bytes of a {size}-byte file"
        ));
    }
    Ok(total)
}

/// Where one block of the new version comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at `offset` of the receiver's own older version.
    Local { offset: u64, len: u64 },
    /// The next `len` bytes of the sender's answer to the ranges.
    Remote { len: u64 },
}

/// The plan to assemble the new version from its blocks `new`, given the blocks
/// the receiver already `has` (hash -> offset in its older version): the pieces in
/// file order, and the byte ranges of the new version to fetch (adjacent ones
/// merged, so the answer streams them back to back).
pub fn plan(new: &[Block], has: &HashMap<ContentHash, u64>) -> (Vec<Piece>, Vec<(u64, u64)>) {
    let mut pieces = Vec::with_capacity(new.len());
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    for b in new {
        let len = u64::from(b.len);
        match has.get(&b.hash) {
            Some(&at) => pieces.push(Piece::Local { offset: at, len }),
            None => {
                pieces.push(Piece::Remote { len });
                match ranges.last_mut() {
                    Some((start, l)) if *start + *l == offset => *l += len,
                    _ => ranges.push((offset, len)),
                }
            }
        }
        offset += len;
    }
    (pieces, ranges)
}

/// Writes the new version to `out` by its `pieces` (blocking): each local piece
/// read from `old`, our older version, and each remote one taken in order from
/// `remote`, the sender's bytes of the fetched ranges in chunks of any size (none
/// left: `None`). Returns the BLAKE3 hash of what it wrote. The remote bytes
/// running out early is an `UnexpectedEof` error.
///
/// The bytes are hashed on a second thread while this one reads and writes the
/// next ones: for a large file the copying and the hashing take about as long,
/// so together they take about half the time (256 MiB: 264 ms one after the
/// other on this project's 2-core machine). The hasher is handed the very
/// buffers that were written, so what is hashed is exactly what is in `out`.
pub fn assemble(
    pieces: &[Piece],
    old: &File,
    out: &mut impl Write,
    mut remote: impl FnMut() -> Option<Bytes>,
) -> std::io::Result<ContentHash> {
    std::thread::scope(|s| {
        let (to_hash, chunks) = std::sync::mpsc::sync_channel::<Written>(HASH_QUEUE);
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let hashing = s.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for chunk in chunks {
                match chunk {
                    Written::Own(buf, n) => {
                        hasher.update(&buf[..n]);
                        // The writer may have finished already: nothing to do then.
                        let _ = give_back.send(buf);
                    }
                    Written::Peer(bytes) => {
                        hasher.update(&bytes);
                    }
                }
            }
            ContentHash(*hasher.finalize().as_bytes())
        });
        let written = write_pieces(pieces, old, out, &mut remote, &to_hash, &spare);
        drop(to_hash);
        let hash = hashing
            .join()
            .map_err(|_| std::io::Error::other("the hashing thread panicked"))?;
        written.map(|()| hash)
    })
}

/// Written chunks that may wait for the hasher (each at most
/// `transfer::CHUNK` bytes).
const HASH_QUEUE: usize = 4;

/// A chunk [`assemble`] has written, on its way to the hasher: `n` bytes of a
/// buffer read from our own version (handed back for reuse), or the sender's.
enum Written {
    Own(Vec<u8>, usize),
    Peer(Bytes),
}

/// [`assemble`]'s reading and writing: each chunk, once written, goes to the
/// hasher through `to_hash`; buffers it is done with come back through `spare`.
fn write_pieces(
    pieces: &[Piece],
    old: &File,
    out: &mut impl Write,
    remote: &mut impl FnMut() -> Option<Bytes>,
    to_hash: &std::sync::mpsc::SyncSender<Written>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let hasher_gone = || std::io::Error::other("the hashing thread stopped");
    let mut pending = Bytes::new();
    for piece in pieces {
        match *piece {
            Piece::Local { offset, len } => {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(super::transfer::CHUNK as u64) as usize;
                    let mut buf = spare
                        .try_recv()
                        .unwrap_or_else(|_| vec![0u8; super::transfer::CHUNK]);
                    old.read_exact_at(&mut buf[..n], offset + done)?;
                    out.write_all(&buf[..n])?;
                    to_hash
                        .send(Written::Own(buf, n))
                        .map_err(|_| hasher_gone())?;
                    done += n as u64;
                }
            }
            Piece::Remote { len } => {
                let mut left = len;
                while left > 0 {
                    if pending.is_empty() {
                        pending = remote().ok_or_else(|| {
                            std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the peer's ranges ended early",
                            )
                        })?;
                        continue;
                    }
                    let part = pending.split_to(pending.len().min(left as usize));
                    out.write_all(&part)?;
                    left -= part.len() as u64;
                    to_hash
                        .send(Written::Peer(part))
                        .map_err(|_| hasher_gone())?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// `bytes` in a temp file, open for reading (with the directory that holds it).
    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (dir, f)
    }

    /// The cut points and block hashes are exactly those of FastCDC's own
    /// streaming chunker with the same sizes, whatever the file's length is
    /// against the buffer, and for a file read from a position other than its
    /// start.
    #[test]
    fn cuts_where_the_streaming_chunker_does() {
        use std::io::{Seek, SeekFrom};
        let streamed = |bytes: &[u8], avg: u32| -> Vec<(u64, Block)> {
            let avg = avg as usize;
            fastcdc::v2020::StreamCDC::new(bytes, avg / 4, avg, avg * 4)
                .map(|c| {
                    let c = c.unwrap();
                    let block = Block {
                        len: c.length as u32,
                        hash: ContentHash::of(&c.data),
                    };
                    (c.offset, block)
                })
                .collect()
        };
        let buffer = cut_buffer(4 * MIN_AVG as usize);
        let data = pseudo_random(3 * buffer + 12_345, 11);
        for len in [
            0,
            10,
            16_383,
            70_000,
            buffer - 1,
            buffer,
            buffer + 1,
            data.len(),
        ] {
            let bytes = &data[..len];
            assert_eq!(
                cut_bytes(bytes, MIN_AVG),
                streamed(bytes, MIN_AVG),
                "{len} bytes"
            );
        }
        // Long runs of one byte cut at the largest block size.
        let flat = vec![7u8; buffer + 300_000];
        assert_eq!(cut_bytes(&flat, MIN_AVG), streamed(&flat, MIN_AVG));
        let big_avg = 4 * MIN_AVG;
        assert_eq!(cut_bytes(&data, big_avg), streamed(&data, big_avg));
        // From the current position, and no further than `size`.
        let (_dir, mut f) = file_of(&data);
        f.seek(SeekFrom::Start(1000)).unwrap();
        let blocks = cut(&f, 500_000, MIN_AVG).unwrap();
        assert_eq!(blocks, streamed(&data[1000..501_000], MIN_AVG));
    }

    fn cut_bytes(bytes: &[u8], avg: u32) -> Vec<(u64, Block)> {
        let (_dir, f) = file_of(bytes);
        let blocks = cut(&f, bytes.len() as u64, avg).unwrap();
        let mut at = 0;
        for (offset, b) in &blocks {
            assert_eq!(*offset, at);
            let end = at as usize + b.len as usize;
            assert_eq!(b.hash, ContentHash::of(&bytes[at as usize..end]));
            at = end as u64;
        }
        assert_eq!(at, bytes.len() as u64);
        blocks
    }

    fn fetched_for(old: &[u8], new: &[u8]) -> u64 {
        let avg = avg_for(new.len() as u64).unwrap();
        let has: HashMap<ContentHash, u64> = cut_bytes(old, avg)
            .into_iter()
            .map(|(o, b)| (b.hash, o))
            .collect();
        let blocks: Vec<Block> = cut_bytes(new, avg).into_iter().map(|(_, b)| b).collect();
        check_blocks(avg, &blocks, new.len() as u64).unwrap();
        let (pieces, ranges) = plan(&blocks, &has);
        let total = check_ranges(&ranges, new.len() as u64).unwrap();
        // Assembling the pieces gives the new version back, whatever sizes the
        // sender's bytes arrive in (here 1000, across piece boundaries).
        let wanted: Vec<u8> = ranges
            .iter()
            .flat_map(|&(o, l)| &new[o as usize..(o + l) as usize])
            .copied()
            .collect();
        let mut arriving = wanted.chunks(1000).map(Bytes::copy_from_slice);
        let (_dir, old_file) = file_of(old);
        let mut out = Vec::new();
        let hash = assemble(&pieces, &old_file, &mut out, || arriving.next()).unwrap();
        assert!(out == new, "the plan rebuilds the new version");
        assert_eq!(hash, ContentHash::of(new));
        if total > 0 {
            // Fewer bytes than the ranges promise: an error, not a short file.
            let mut short = wanted[..wanted.len() - 1]
                .chunks(1000)
                .map(Bytes::copy_from_slice);
            let e = assemble(&pieces, &old_file, &mut Vec::new(), || short.next()).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        total
    }

    #[test]
    fn an_edit_an_insertion_and_a_deletion_fetch_only_blocks_near_them() {
        let old = pseudo_random(8 << 20, 7);
        let limit = 4 * u64::from(MIN_AVG) * 2; // two maximal blocks around the change
        let mut edited = old.clone();
        edited[3 << 20..(3 << 20) + 4096].copy_from_slice(&pseudo_random(4096, 9));
        assert!(fetched_for(&old, &edited) <= limit);
        let mut inserted = old.clone();
        inserted.splice(5 << 20..5 << 20, pseudo_random(4096, 11));
        assert!(fetched_for(&old, &inserted) <= limit + 4096);
        let mut deleted = old.clone();
        deleted.drain(1 << 20..(1 << 20) + 10_000);
        assert!(fetched_for(&old, &deleted) <= limit);
        assert_eq!(fetched_for(&old, &old), 0);
        // Nothing in common: everything is fetched, as one range.
        let other = pseudo_random(8 << 20, 13);
        assert_eq!(fetched_for(&old, &other), other.len() as u64);
    }

    #[test]
    fn block_lists_and_ranges_from_a_peer_are_checked() {
        let b = |len| Block {
            len,
            hash: ContentHash([0; 32]),
        };
        assert!(check_blocks(MIN_AVG, &[b(100), b(200)], 300).is_ok());
        assert!(check_blocks(MIN_AVG, &[b(100), b(200)], 301).is_err());
        assert!(check_blocks(MIN_AVG, &[b(0), b(300)], 300).is_err());
        assert!(check_blocks(MIN_AVG, &[b(4 * MIN_AVG + 1)], 4 * u64::from(MIN_AVG) + 1).is_err());
        assert!(check_blocks(MIN_AVG + 1, &[b(300)], 300).is_err());
        assert!(check_blocks(MAX_AVG * 2, &[b(300)], 300).is_err());
        assert!(check_blocks(MIN_AVG, &vec![b(1); MAX_BLOCKS + 1], MAX_BLOCKS as u64 + 1).is_err());
        assert_eq!(check_ranges(&[(0, 10), (20, 5)], 30), Ok(15));
        assert!(check_ranges(&[(25, 10)], 30).is_err());
        assert!(check_ranges(&[(u64::MAX, 2)], 30).is_err());
        assert!(check_ranges(&[(0, 30), (0, 30)], 30).is_err());
        assert_eq!(avg_for(1 << 20), Some(MIN_AVG));
        assert_eq!(avg_for(1 << 30), Some(256 * 1024));
        assert_eq!(avg_for(16 << 30), Some(MAX_AVG));
        assert_eq!(avg_for((16 << 30) + 1), None);
    }
}
