//! Local change detection: observations from a scan compared with the index
//! (pure; no I/O). A difference becomes a new local version: this node's counter in
//! the path's version vector goes up, and the store gives it a new sequence number.

use super::scan::Observed;
use super::store::Proof;
use super::{Entry, StatKey, Update};
use crate::hash::ContentHash;
use crate::sync::record::{Kind, Record};
use crate::sync::version::VersionVector;
use crate::wire::Timestamp;

/// The index entries a scan compares the disk with (those of the paths it
/// observed, and those it did not find), sorted by path and looked up by binary
/// search: a map would hold each path twice (as key and in the record) with room
/// to spare.
#[derive(Debug, Default)]
pub struct Entries(Vec<Entry>);

impl Entries {
    /// The entries of `list`, in any order; of a path given twice, the first.
    pub fn new(mut list: Vec<Entry>) -> Entries {
        if !list.windows(2).all(|w| w[0].record.path < w[1].record.path) {
            list.sort_by(|a, b| a.record.path.cmp(&b.record.path));
            list.dedup_by(|later, first| later.record.path == first.record.path);
        }
        Entries(list)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.position(path).map(|i| &self.0[i])
    }

    /// Where `path`'s entry is in the sorted list (see [`Entries::at`]).
    pub fn position(&self, path: &str) -> Option<usize> {
        self.0
            .binary_search_by(|e| e.record.path.as_str().cmp(path))
            .ok()
    }

    /// The entry at `position` (from [`Entries::position`]).
    pub fn at(&self, position: usize) -> Option<&Entry> {
        self.0.get(position)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.0.iter()
    }
}

impl FromIterator<Entry> for Entries {
    fn from_iter<I: IntoIterator<Item = Entry>>(iter: I) -> Entries {
        Entries::new(iter.into_iter().collect())
    }
}

/// What a scan changed in the index.
#[derive(Debug, Default)]
pub struct LocalChanges {
    /// New versions (including tombstones), to commit.
    pub updates: Vec<Update>,
    /// Paths whose content is unchanged but whose stat proof moved (a touch, a
    /// rename of the inode...): refreshed without a new version.
    pub refreshed: Vec<(String, StatKey)>,
}

/// Compares `observed` (what a scan found, except what it found exactly as
/// indexed) with `index`: the entries of the observed paths, and those of the
/// scanned scope that the scan did not find at all (the ones it found as indexed
/// are left out of both). `in_scope(path)` tells whether the scan covered
/// `path`: index entries outside the scanned scope are never taken as deleted.
/// `skip(path)` is true for paths that must not be versioned now (ignored, or being
/// installed by the engine).
pub fn detect(
    node: &str,
    index: &Entries,
    observed: &[Observed],
    in_scope: &dyn Fn(&str) -> bool,
    now: Timestamp,
    skip: &dyn Fn(&str) -> bool,
) -> LocalChanges {
    let mut out = LocalChanges::default();
    // Which index entries the scan met (those it found exactly as indexed are
    // not in `index`, see [`proven_unchanged`]).
    let mut seen = vec![false; index.len()];
    for obs in observed {
        if let Some(i) = index.position(&obs.path) {
            seen[i] = true;
        }
        if skip(&obs.path) {
            continue;
        }
        match index.get(&obs.path) {
            Some(e) if !e.record.deleted && !differs(&e.record, obs) => {
                if obs.stat.is_some() && obs.stat != e.stat {
                    if let Some(stat) = obs.stat {
                        out.refreshed.push((obs.path.clone(), stat));
                    }
                }
            }
            previous => {
                let mut version = previous
                    .map(|e| e.record.version.clone())
                    .unwrap_or_default();
                version.bump(node);
                out.updates.push(Update {
                    record: Record {
                        path: obs.path.clone(),
                        kind: obs.kind,
                        size: obs.size,
                        modified: obs.modified,
                        mode: obs.mode,
                        hash: obs.hash,
                        target: obs.target.clone(),
                        version,
                        deleted: false,
                        modified_by: node.to_string(),
                        seq: 0,
                    },
                    stat: obs.stat,
                });
            }
        }
    }
    for (e, _) in index.iter().zip(&seen).filter(|(_, &seen)| !seen) {
        let path = e.record.path.as_str();
        if e.record.deleted || !in_scope(path) || skip(path) {
            continue;
        }
        let mut version = e.record.version.clone();
        version.bump(node);
        out.updates.push(Update {
            record: tombstone(&e.record, version, node, now),
            stat: None,
        });
    }
    // Sequence order is the order peers apply in: creations parents-first, then
    // deletions children-first, so a directory's deletion never arrives before its
    // contents'.
    out.updates
        .sort_by(|a, b| match (a.record.deleted, b.record.deleted) {
            (false, false) => a.record.path.cmp(&b.record.path),
            (true, true) => b.record.path.cmp(&a.record.path),
            (x, y) => x.cmp(&y),
        });
    out
}

/// Whether `path` is `scope` or below it.
pub fn within(path: &str, scope: &str) -> bool {
    scope.is_empty()
        || path == scope
        || path
            .strip_prefix(scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A deletion of `of` at `version`.
pub fn tombstone(of: &Record, version: VersionVector, node: &str, now: Timestamp) -> Record {
    Record {
        path: of.path.clone(),
        kind: of.kind,
        size: 0,
        modified: now,
        mode: 0,
        hash: ContentHash([0; 32]),
        target: None,
        version,
        deleted: true,
        modified_by: node.to_string(),
        seq: 0,
    }
}

/// Whether `obs` is exactly what `entry` says: the same stat (so the same
/// inode, size, mtime and ctime: nothing about the file changed since it was
/// indexed) and nothing [`detect`] would version or refresh. A scan keeps nothing
/// of such an observation but that its entry was found.
pub fn proven_unchanged(proof: &Proof, obs: &Observed) -> bool {
    !proof.deleted
        && obs.stat.is_some()
        && obs.stat == proof.stat
        && !differs_from(
            proof.kind,
            &proof.hash,
            proof.mode,
            proof.target.as_deref(),
            obs,
        )
}

/// Whether what is on disk is a different version than the record: content, kind,
/// link target or executable bits. Timestamps alone are not a change.
fn differs(r: &Record, o: &Observed) -> bool {
    differs_from(r.kind, &r.hash, r.mode, r.target.as_deref(), o)
}

/// [`differs`] of a record given by its kind, hash, mode and link target.
fn differs_from(
    kind: Kind,
    hash: &ContentHash,
    mode: u32,
    target: Option<&str>,
    o: &Observed,
) -> bool {
    if kind != o.kind {
        return true;
    }
    match o.kind {
        Kind::File => *hash != o.hash || (mode & 0o111) != (o.mode & 0o111),
        Kind::Dir => false,
        Kind::Symlink => target != o.target.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(path: &str, content: &[u8]) -> Observed {
        Observed {
            path: path.into(),
            kind: Kind::File,
            size: content.len() as u64,
            modified: Timestamp {
                secs: 100,
                nanos: 0,
            },
            mode: 0o644,
            hash: ContentHash::of(content),
            target: None,
            stat: Some(StatKey {
                size: content.len() as u64,
                mtime_ns: 1,
                ctime_ns: 1,
                ino: 1,
                dev: 1,
            }),
        }
    }

    fn index_of(changes: &LocalChanges) -> Entries {
        changes
            .updates
            .iter()
            .map(|u| Entry {
                record: u.record.clone(),
                stat: u.stat,
            })
            .collect()
    }

    /// The index a first scan that observed `found` makes.
    fn first_index(found: &[Observed]) -> Entries {
        let all = |_: &str| true;
        let none = |_: &str| false;
        index_of(&detect("a", &Entries::default(), found, &all, NOW, &none))
    }

    const NOW: Timestamp = Timestamp {
        secs: 200,
        nanos: 0,
    };

    #[test]
    fn new_changed_deleted_and_unchanged() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let first = detect(
            "a",
            &Entries::default(),
            &[obs("x", b"1"), obs("y", b"2")],
            &all,
            NOW,
            &none,
        );
        assert_eq!(first.updates.len(), 2);
        assert_eq!(first.updates[0].record.version.get("a"), 1);
        let index = index_of(&first);

        // Unchanged: nothing. Changed content: version 2. Missing: tombstone.
        let second = detect(
            "a",
            &index,
            &[obs("x", b"1"), obs("z", b"3")],
            &all,
            NOW,
            &none,
        );
        let paths: Vec<(&str, bool, u64)> = second
            .updates
            .iter()
            .map(|u| {
                (
                    u.record.path.as_str(),
                    u.record.deleted,
                    u.record.version.get("a"),
                )
            })
            .collect();
        assert_eq!(
            paths,
            [("z", false, 1), ("y", true, 2)],
            "creations first, then deletions"
        );

        let mut changed = obs("x", b"1!");
        changed.stat = None;
        let third = detect("a", &index, &[changed], &|p| within(p, "x"), NOW, &none);
        assert_eq!(
            third.updates.len(),
            1,
            "y is outside the scope, not deleted"
        );
        assert_eq!(third.updates[0].record.version.get("a"), 2);
    }

    #[test]
    fn touch_refreshes_and_exec_bit_is_a_change_and_skip_is_respected() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let index = first_index(&[obs("x", b"1")]);
        let mut touched = obs("x", b"1");
        touched.stat = Some(StatKey {
            mtime_ns: 9,
            ..touched.stat.unwrap()
        });
        let c = detect("a", &index, &[touched.clone()], &all, NOW, &none);
        assert!(c.updates.is_empty());
        assert_eq!(c.refreshed.len(), 1);

        touched.mode = 0o755;
        let c = detect("a", &index, &[touched], &all, NOW, &none);
        assert_eq!(c.updates.len(), 1);

        let skip_x = |p: &str| p == "x";
        let c = detect("a", &index, &[], &all, NOW, &skip_x);
        assert!(
            c.updates.is_empty(),
            "a skipped path is never taken as deleted"
        );
    }

    #[test]
    fn an_entry_found_as_indexed_is_left_out_and_neither_versioned_nor_deleted() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let index = first_index(&[obs("x", b"1"), obs("y", b"2"), obs("z", b"3")]);
        let y = index.position("y").unwrap();
        assert!(proven_unchanged(
            &Proof::of(index.at(y).unwrap()),
            &obs("y", b"2")
        ));
        // x changed, y is as indexed (so the scan hands over neither its
        // observation nor its entry), z is gone.
        let without_y: Entries = index
            .iter()
            .filter(|e| e.record.path != "y")
            .cloned()
            .collect();
        let c = detect("a", &without_y, &[obs("x", b"1!")], &all, NOW, &none);
        let got: Vec<(&str, bool)> = c
            .updates
            .iter()
            .map(|u| (u.record.path.as_str(), u.record.deleted))
            .collect();
        assert_eq!(
            got,
            [("x", false), ("z", true)],
            "y is neither versioned nor deleted"
        );
        assert!(c.refreshed.is_empty());

        // Not proven: another stat (touched), another exec bit, a tombstone.
        let mut touched = obs("y", b"2");
        touched.stat = Some(StatKey {
            ctime_ns: 9,
            ..touched.stat.unwrap()
        });
        assert!(!proven_unchanged(
            &Proof::of(index.at(y).unwrap()),
            &touched
        ));
        let mut exec = obs("y", b"2");
        exec.mode = 0o755;
        exec.stat = index.at(y).unwrap().stat;
        assert!(!proven_unchanged(&Proof::of(index.at(y).unwrap()), &exec));
        let mut unproven = obs("y", b"2");
        unproven.stat = None;
        assert!(!proven_unchanged(
            &Proof::of(index.at(y).unwrap()),
            &unproven
        ));
        let gone = index_of(&detect("a", &index, &[], &|p| p == "y", NOW, &none));
        assert!(!proven_unchanged(
            &Proof::of(gone.at(0).unwrap()),
            &obs("y", b"2")
        ));
    }
}
