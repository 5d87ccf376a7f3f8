//! The merged listing: every node's files side by side (pure; no I/O).
//!
//! [`merge`] combines per-node file lists into [`MergedEntry`]s sorted by path;
//! [`Listing`] renders them as the `dirsync-cli ls` table or as the public JSON
//! schema ([`JsonEntry`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::wire::{Copy, FileEntry, LockInfo, MergedEntry, Timestamp};

/// Merges each node's own entries into one list sorted by path; within an entry,
/// copies are sorted by node name.
pub fn merge(sources: Vec<(String, Vec<FileEntry>)>) -> Vec<MergedEntry> {
    let mut by_path: BTreeMap<String, Vec<Copy>> = BTreeMap::new();
    for (node, entries) in sources {
        for e in entries {
            by_path.entry(e.path).or_default().push(Copy {
                node: node.clone(),
                size: e.size,
                modified: e.modified,
                hash: e.hash,
            });
        }
    }
    by_path
        .into_iter()
        .map(|(path, mut copies)| {
            copies.sort_by(|a, b| a.node.cmp(&b.node));
            MergedEntry { path, copies }
        })
        .collect()
}

impl MergedEntry {
    /// The copy that describes the file as a whole: the most recently modified one
    /// (ties broken by node name, so every reader picks the same).
    pub fn newest(&self) -> Option<&Copy> {
        self.copies
            .iter()
            .max_by(|a, b| a.modified.cmp(&b.modified).then(b.node.cmp(&a.node)))
    }

    /// All copies have the same content.
    pub fn in_sync(&self) -> bool {
        self.copies.windows(2).all(|w| w[0].hash == w[1].hash)
    }
}

/// A merged listing as received by a client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<MergedEntry>,
    /// The nodes whose files the listing holds, sorted.
    pub nodes: Vec<String>,
    /// Peers that could not be asked (down, or no answer in time).
    pub warnings: Vec<String>,
    /// The answering node's locks.
    pub locks: Vec<LockInfo>,
}

/// One file in `dirsync-cli ls --json`. This schema is a public interface:
/// fields are only ever added.
#[derive(Debug, Serialize)]
pub struct JsonEntry<'a> {
    pub index: usize,
    pub path: &'a str,
    pub size: u64,
    pub modified: String,
    pub blake3: String,
    pub copies: BTreeMap<&'a str, JsonCopy>,
    pub in_sync: bool,
    /// Locked on the node that answered the listing.
    pub locked: bool,
    /// The client certificate name holding the lock (`null` if not locked).
    pub lock_owner: Option<&'a str>,
}

/// One node's copy in [`JsonEntry::copies`].
#[derive(Debug, Serialize)]
pub struct JsonCopy {
    pub size: u64,
    pub modified: String,
    pub blake3: String,
}

/// RFC 3339 in UTC with nanoseconds, e.g. `2026-11-25T02:10:33.123456789Z`.
pub fn rfc3339(t: Timestamp) -> String {
    match t.to_datetime() {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => format!("{}s", t.secs),
    }
}

/// `1.2 KiB`-style sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Listing {
    /// The answering node's lock on `path`, if any.
    pub fn lock_of(&self, path: &str) -> Option<&LockInfo> {
        self.locks.iter().find(|l| l.path == path)
    }

    /// The path shown at 1-based `index` by `ls`, or a clear error.
    pub fn path_at(&self, index: usize) -> Result<&str, String> {
        match index.checked_sub(1).and_then(|i| self.entries.get(i)) {
            Some(e) => Ok(&e.path),
            None if self.entries.is_empty() => Err(format!(
                "index {index} is out of range: the listing is empty"
            )),
            None => Err(format!(
                "index {index} is out of range: `dirsync-cli ls` shows 1 to {}",
                self.entries.len()
            )),
        }
    }

    /// The `--json` document: an array of [`JsonEntry`], indexes 1-based.
    pub fn to_json(&self) -> String {
        let entries: Vec<JsonEntry<'_>> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let newest = e.newest()?;
                Some(JsonEntry {
                    index: i + 1,
                    path: &e.path,
                    size: newest.size,
                    modified: rfc3339(newest.modified),
                    blake3: newest.hash.to_hex(),
                    copies: e
                        .copies
                        .iter()
                        .map(|c| {
                            (
                                c.node.as_str(),
                                JsonCopy {
                                    size: c.size,
                                    modified: rfc3339(c.modified),
                                    blake3: c.hash.to_hex(),
                                },
                            )
                        })
                        .collect(),
                    in_sync: e.in_sync(),
                    locked: self.lock_of(&e.path).is_some(),
                    lock_owner: self.lock_of(&e.path).map(|l| l.owner.as_str()),
                })
            })
            .collect();
        serde_json::to_string_pretty(&entries).unwrap_or_else(|_| "[]".into())
    }

    /// The human table: index, path, size, local modification time, where the file
    /// is, and `differs` when the copies' contents are not identical.
    pub fn to_table(&self) -> String {
        let all_nodes = &self.nodes;
        let rows: Vec<[String; 5]> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let newest = e.newest()?;
                let local = newest
                    .modified
                    .to_datetime()
                    .map(|d| {
                        d.with_timezone(&chrono::Local)
                            .format("%Y-%m-%d %H:%M:%S")
                            .to_string()
                    })
                    .unwrap_or_default();
                let nodes: Vec<&str> = e.copies.iter().map(|c| c.node.as_str()).collect();
                let mut place = if nodes.len() == 1 && all_nodes.len() > 1 {
                    format!("{} only", nodes[0])
                } else {
                    nodes.join(" ")
                };
                if !e.in_sync() {
                    place.push_str("  (differs)");
                }
                if let Some(l) = self.lock_of(&e.path) {
                    let _ = write!(place, "  [locked by {}]", l.owner);
                }
                Some([
                    (i + 1).to_string(),
                    e.path.clone(),
                    human_size(newest.size),
                    local,
                    place,
                ])
            })
            .collect();
        let header = ["#", "PATH", "SIZE", "MODIFIED", "WHERE"];
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: [&str; 5]| {
            let _ = write!(out, "{:>w0$}  ", cells[0], w0 = widths[0]);
            let _ = write!(out, "{}  ", pad(cells[1], widths[1]));
            let _ = write!(out, "{:>w2$}  ", cells[2], w2 = widths[2]);
            let _ = write!(out, "{}  ", pad(cells[3], widths[3]));
            let _ = writeln!(out, "{}", cells[4]);
        };
        line(header);
        for row in &rows {
            line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
        }
        out
    }
}

/// Left-aligns `s` to `width` characters (not bytes: names may be unicode).
fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;

    fn fe(path: &str, content: &[u8], secs: i64) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: content.len() as u64,
            modified: Timestamp { secs, nanos: 5 },
            hash: ContentHash::of(content),
        }
    }

    #[test]
    fn merge_sorts_and_marks_differences() {
        let merged = merge(vec![
            (
                "b".into(),
                vec![
                    fe("both", b"x", 10),
                    fe("diff", b"new", 20),
                    fe("only-b", b"b", 1),
                ],
            ),
            (
                "a".into(),
                vec![
                    fe("both", b"x", 10),
                    fe("diff", b"old", 10),
                    fe("a/nested", b"n", 1),
                ],
            ),
        ]);
        let paths: Vec<_> = merged.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a/nested", "both", "diff", "only-b"]);
        assert!(merged[1].in_sync());
        assert!(!merged[2].in_sync());
        assert_eq!(merged[2].newest().unwrap().node, "b");
        assert_eq!(merged[2].copies[0].node, "a");

        let listing = Listing {
            entries: merged,
            nodes: vec!["a".into(), "b".into()],
            warnings: vec![],
            locks: vec![LockInfo {
                path: "both".into(),
                owner: "alice".into(),
                since: Timestamp { secs: 1, nanos: 0 },
                expires: None,
                queued: 2,
                releasing: false,
            }],
        };
        let json: serde_json::Value = serde_json::from_str(&listing.to_json()).unwrap();
        assert_eq!(json[1]["locked"], true);
        assert_eq!(json[1]["lock_owner"], "alice");
        assert_eq!(json[2]["lock_owner"], serde_json::Value::Null);
        assert_eq!(listing.path_at(2), Ok("both"));
        assert!(listing.path_at(0).is_err());
        assert!(listing.path_at(5).unwrap_err().contains("1 to 4"));
        assert_eq!(json[2]["index"], 3);
        assert_eq!(json[2]["size"], 3);
        assert_eq!(json[2]["in_sync"], false);
        assert_eq!(json[2]["locked"], false);
        assert_eq!(json[2]["blake3"], ContentHash::of(b"new").to_hex());
        assert_eq!(
            json[2]["copies"]["a"]["blake3"],
            ContentHash::of(b"old").to_hex()
        );
        assert_eq!(json[2]["modified"], "1970-01-01T00:00:20.000000005Z");
        let table = listing.to_table();
        assert!(table.contains("only-b"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.contains("both") && l.ends_with("[locked by alice]")),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.contains("only-b") && l.ends_with("b only")),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.contains("diff") && l.ends_with("a b  (differs)")),
            "{table}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
