//! Content hashes: a BLAKE3 digest newtype and streaming file hashing.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest of a file's content. Displays (and parses) as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    /// Hashes everything `reader` yields, 64 KiB at a time (never the whole input in memory).
    pub fn of_reader(reader: impl Read) -> io::Result<Self> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(reader)?;
        Ok(ContentHash(*hasher.finalize().as_bytes()))
    }

    /// Hashes the file at `path` by streaming it.
    pub fn of_file(path: &Path) -> io::Result<Self> {
        Self::of_reader(std::fs::File::open(path)?)
    }

    /// Hashes the first `len` bytes of the file at `path`. Returns `None` if the file
    /// is shorter than that (it changed since its size was read).
    pub fn of_file_prefix(path: &Path, len: u64) -> io::Result<Option<Self>> {
        Self::of_reader_prefix(std::fs::File::open(path)?, len)
    }

    /// The hash of the first `len` bytes read from `file`, or `None` if it
    /// ends before that.
    pub fn of_reader_prefix(file: impl io::Read, len: u64) -> io::Result<Option<Self>> {
        let mut hasher = blake3::Hasher::new();
        let mut file = file.take(len);
        // Large reads let BLAKE3 hash many chunks at once with SIMD.
        let mut buf = vec![0u8; (256 * 1024).min(len.max(1) as usize)];
        let mut read = 0u64;
        loop {
            let n = match io::Read::read(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        Ok((read == len).then(|| ContentHash(*hasher.finalize().as_bytes())))
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", &self.to_hex()[..16])
    }
}

/// The text was not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a BLAKE3 hash (expected 64 hex digits)")]
pub struct ParseHashError;

impl FromStr for ContentHash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        blake3::Hash::from_hex(s)
            .map(|h| ContentHash(*h.as_bytes()))
            .map_err(|_| ParseHashError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_streaming_matches_one_shot() {
        let data = vec![7u8; 200_000];
        let a = ContentHash::of(&data);
        let b = ContentHash::of_reader(&data[..]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_hex().len(), 64);
        assert_eq!(a.to_hex().parse::<ContentHash>().unwrap(), a);
        assert!("xyz".parse::<ContentHash>().is_err());
        // Known vector: BLAKE3 of the empty input.
        assert_eq!(
            ContentHash::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}
