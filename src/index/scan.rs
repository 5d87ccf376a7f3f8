//! Walking the synced tree and hashing what changed.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::hash::ContentHash;
use crate::wire::{FileEntry, Timestamp};

use super::TEMP_PREFIX;

/// A file whose mtime is this close to the moment it was hashed may still be written
/// within the same timestamp tick, so its hash is not cached ("racy clean", as git
/// calls it): it is hashed again next time.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Errors that stop a scan as a whole (a single unreadable file only warns).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("synced directory {path} is not readable: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What proves a file unchanged since it was hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatKey {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl StatKey {
    fn of(meta: &fs::Metadata) -> StatKey {
        StatKey {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// Hashes of files by relative path, valid while their [`StatKey`] is unchanged.
#[derive(Default, Debug)]
pub struct HashCache {
    entries: HashMap<String, (StatKey, ContentHash)>,
}

impl HashCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// Regular files, sorted by path.
    pub entries: Vec<FileEntry>,
    /// Files and directories that were skipped, with the reason.
    pub warnings: Vec<String>,
    /// How many files had to be hashed (not proven unchanged by the cache).
    pub hashed_files: usize,
    pub hashed_bytes: u64,
}

/// Walks a root directory, skipping the node's state directory and temp files.
#[derive(Debug)]
pub struct Scanner {
    root: PathBuf,
    /// (dev, inode) of directories never to enter (the state dir).
    excluded: Vec<(u64, u64)>,
    cache: HashCache,
}

impl Scanner {
    /// A scanner of `root` that never enters the directories in `exclude`
    /// (those that do not exist are ignored).
    pub fn new(root: PathBuf, exclude: &[PathBuf]) -> Scanner {
        let excluded = exclude
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        Scanner {
            root,
            excluded,
            cache: HashCache::default(),
        }
    }

    pub fn cache(&self) -> &HashCache {
        &self.cache
    }

    /// Walks the whole tree. Unreadable entries are reported as warnings; only an
    /// unreadable root is an error.
    pub fn scan(&mut self) -> Result<ScanOutcome, ScanError> {
        let mut out = ScanOutcome::default();
        let mut seen = HashMap::with_capacity(self.cache.entries.len());
        let mut stack: Vec<(PathBuf, String)> = vec![(self.root.clone(), String::new())];
        let mut first = true;
        while let Some((dir, rel)) = stack.pop() {
            let read = match fs::read_dir(&dir) {
                Ok(r) => r,
                Err(source) if first => {
                    return Err(ScanError::Root {
                        path: self.root.clone(),
                        source,
                    })
                }
                Err(e) => {
                    out.warnings.push(format!("skipped directory {rel}: {e}"));
                    continue;
                }
            };
            first = false;
            for dirent in read {
                let dirent = match dirent {
                    Ok(d) => d,
                    Err(e) => {
                        out.warnings
                            .push(format!("skipped an entry of {rel}/: {e}"));
                        continue;
                    }
                };
                let Some(name) = dirent.file_name().to_str().map(str::to_owned) else {
                    out.warnings.push(format!(
                        "skipped {:?}: file name is not UTF-8",
                        dirent.path()
                    ));
                    continue;
                };
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let child_rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                // symlink_metadata: links are never followed.
                let meta = match dirent.path().symlink_metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished
                    Err(e) => {
                        out.warnings.push(format!("skipped {child_rel}: {e}"));
                        continue;
                    }
                };
                let ft = meta.file_type();
                if ft.is_dir() {
                    if !self.excluded.contains(&(meta.dev(), meta.ino())) {
                        stack.push((dirent.path(), child_rel));
                    }
                } else if ft.is_file() {
                    if let Some(entry) =
                        self.file_entry(&dirent.path(), child_rel, &meta, &mut out, &mut seen)
                    {
                        out.entries.push(entry);
                    }
                }
                // Symlinks and special files are not listed.
            }
        }
        self.cache.entries = seen;
        out.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn file_entry(
        &self,
        abs: &Path,
        rel: String,
        meta: &fs::Metadata,
        out: &mut ScanOutcome,
        seen: &mut HashMap<String, (StatKey, ContentHash)>,
    ) -> Option<FileEntry> {
        let key = StatKey::of(meta);
        let modified =
            Timestamp::from_system_time(meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        let hash = match self.cache.entries.get(&rel) {
            Some((cached, hash)) if *cached == key => *hash,
            _ => {
                let started = SystemTime::now();
                let hash = match ContentHash::of_file(abs) {
                    Ok(h) => h,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(e) => {
                        out.warnings.push(format!("skipped {rel}: {e}"));
                        return None;
                    }
                };
                out.hashed_files += 1;
                out.hashed_bytes += key.size;
                // Cache only what is provably stable: unchanged while hashed and
                // not modified within the racy window.
                let after = abs.symlink_metadata().ok().map(|m| StatKey::of(&m));
                let racy = meta
                    .modified()
                    .map(|m| {
                        started
                            .duration_since(m)
                            .map_or(true, |age| age < RACY_WINDOW)
                    })
                    .unwrap_or(true);
                if after != Some(key) {
                    out.warnings
                        .push(format!("{rel} changed while being hashed"));
                } else if !racy {
                    seen.insert(rel.clone(), (key, hash));
                }
                return Some(FileEntry {
                    path: rel,
                    size: key.size,
                    modified,
                    hash,
                });
            }
        };
        seen.insert(rel.clone(), (key, hash));
        Some(FileEntry {
            path: rel,
            size: key.size,
            modified,
            hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn set_old_mtime(p: &Path) {
        let f = fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn lists_files_skips_state_and_temp_and_uses_cache() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::create_dir_all(root.join(".dirsync")).unwrap();
        fs::write(root.join("sub/deeper/x y.txt"), b"hello").unwrap();
        fs::write(root.join("é.txt"), b"unicode").unwrap();
        fs::write(root.join(".dirsync/state"), b"no").unwrap();
        fs::write(root.join(format!("{TEMP_PREFIX}123")), b"partial").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        for p in ["sub/deeper/x y.txt", "é.txt"] {
            set_old_mtime(&root.join(p));
        }
        let mut s = Scanner::new(root.to_path_buf(), &[root.join(".dirsync")]);
        let out = s.scan().unwrap();
        let paths: Vec<_> = out.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["sub/deeper/x y.txt", "é.txt"]);
        assert_eq!(out.entries[0].hash, ContentHash::of(b"hello"));
        assert_eq!(out.entries[0].size, 5);
        assert_eq!(out.hashed_files, 2);

        // Second scan: nothing rehashed.
        let again = s.scan().unwrap();
        assert_eq!(again.hashed_files, 0);
        assert_eq!(again.entries, out.entries);

        // A change (same size, new content, new mtime) is noticed.
        fs::write(root.join("é.txt"), b"UNICODE").unwrap();
        let third = s.scan().unwrap();
        assert_eq!(third.hashed_files, 1);
        assert_eq!(third.entries[1].hash, ContentHash::of(b"UNICODE"));
    }

    #[test]
    fn recently_modified_files_are_not_trusted_from_cache() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("fresh"), b"1").unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf(), &[]);
        assert_eq!(s.scan().unwrap().hashed_files, 1);
        assert_eq!(
            s.scan().unwrap().hashed_files,
            1,
            "racy file must be rehashed"
        );
    }

    #[test]
    fn missing_root_is_an_error() {
        let mut s = Scanner::new("/nonexistent/dirsync-test".into(), &[]);
        assert!(matches!(s.scan(), Err(ScanError::Root { .. })));
    }
}
