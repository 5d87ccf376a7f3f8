//! Reconciliation as a pure function: the local index and a peer's records in, a
//! [`Plan`] out. The engine only executes plans, so every decision here is tested
//! without a disk or a network, and a dry run is a printed plan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::conflict::{conflict_name, numbered, winner, Side};
use super::record::{Kind, Record};
use super::version::{VersionVector, VvOrdering};
use crate::hash::ContentHash;
use crate::path::{PathError, RelPath};

/// What the planner needs to know about the local side.
pub trait LocalIndex {
    /// The local record of `path`, including tombstones.
    fn get(&self, path: &str) -> Option<Record>;
    /// A live local regular file whose content has this hash, if any (for local
    /// copies instead of transfers).
    fn find_by_hash(&self, hash: &ContentHash) -> Option<String>;
}

impl LocalIndex for HashMap<String, Record> {
    fn get(&self, path: &str) -> Option<Record> {
        HashMap::get(self, path).cloned()
    }

    /// The first matching path in byte order, so that plans are reproducible.
    fn find_by_hash(&self, hash: &ContentHash) -> Option<String> {
        self.values()
            .filter(|r| !r.deleted && r.kind == Kind::File && r.hash == *hash)
            .map(|r| &r.path)
            .min()
            .cloned()
    }
}

/// One thing to do to make the local side take a remote record into account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Histories differ but content is the same: record `version` (merged), no I/O.
    Adopt {
        path: String,
        version: VersionVector,
    },
    /// Make the remote file the local one: copy from `local_source` (a local file
    /// with the same hash) if `Some`, else fetch from the peer.
    Fetch {
        remote: Record,
        local_source: Option<String>,
    },
    /// The peer renamed `from` to `remote.path`: move the local file instead of
    /// fetching. Only planned when the same plan deletes `from`, whose local record
    /// is a live file with the same hash; that deletion is implied, not a separate
    /// step. `from_tombstone` is the peer's tombstone of `from`.
    Rename {
        from: String,
        remote: Record,
        from_tombstone: Record,
    },
    MakeDir {
        remote: Record,
    },
    MakeSymlink {
        remote: Record,
    },
    /// Remove the local path; a directory only after its contents (the plan orders
    /// children before parents).
    Delete {
        remote: Record,
    },
    /// Concurrent, different, and the remote wins: save the local version as
    /// `conflict_copy`, then apply `remote` (fetch, mkdir, symlink as appropriate).
    Conflict {
        local: Record,
        remote: Record,
        conflict_copy: String,
    },
}

impl Step {
    /// The path this step brings in line with the peer.
    pub fn path(&self) -> &str {
        match self {
            Step::Adopt { path, .. } => path,
            Step::Fetch { remote, .. }
            | Step::Rename { remote, .. }
            | Step::MakeDir { remote }
            | Step::MakeSymlink { remote }
            | Step::Delete { remote }
            | Step::Conflict { remote, .. } => &remote.path,
        }
    }
}

/// One line per step, for logs and `--dry-run`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path();
        match self {
            Step::Adopt { version, .. } => write!(f, "adopt {path} at {version}"),
            Step::Fetch {
                local_source: None, ..
            } => write!(f, "fetch {path}"),
            Step::Fetch {
                local_source: Some(src),
                ..
            } => write!(f, "copy {src} -> {path}"),
            Step::Rename { from, .. } => write!(f, "rename {from} -> {path}"),
            Step::MakeDir { .. } => write!(f, "mkdir {path}"),
            Step::MakeSymlink { remote } => {
                let target = remote.target.as_deref().unwrap_or_default();
                write!(f, "symlink {path} -> {target}")
            }
            Step::Delete { .. } => write!(f, "delete {path}"),
            Step::Conflict {
                conflict_copy: copy,
                ..
            } => {
                write!(f, "conflict {path}: keep ours as {copy}, take theirs")
            }
        }
    }
}

/// The steps for one batch of remote records, in execution order, and the records
/// refused because their path is not acceptable (for the engine to report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub refused: Vec<(String, PathError)>,
    /// Remote records that lost a conflict to the local version (nothing to do
    /// now: the peer takes ours). If ours changes before the peer has taken it
    /// (we delete it, say), the outcome must be decided again: see
    /// `engine::session`.
    pub outvoted: Vec<Record>,
}

/// The step that makes the local side what `remote` describes.
fn take(remote: &Record) -> Step {
    let remote = remote.clone();
    if remote.deleted {
        return Step::Delete { remote };
    }
    match remote.kind {
        Kind::File => Step::Fetch {
            remote,
            local_source: None,
        },
        Kind::Dir => Step::MakeDir { remote },
        Kind::Symlink => Step::MakeSymlink { remote },
    }
}

fn adopt(remote: &Record, version: VersionVector) -> Step {
    Step::Adopt {
        path: remote.path.clone(),
        version,
    }
}

/// The decision for one path. `None`: nothing to do (same version; ours is newer
/// and the peer will pull it; or ours wins a conflict). Does not validate
/// `remote.path`: [`plan`] does, before calling this.
pub fn decide(local: Option<&Record>, remote: &Record) -> Option<Step> {
    let Some(local) = local else {
        // A tombstone for something we never had is still recorded, so that a
        // third node's older live copy cannot bring it back through us.
        return Some(if remote.deleted {
            adopt(remote, remote.version.clone())
        } else {
            take(remote)
        });
    };
    match remote.version.compare(&local.version) {
        VvOrdering::Equal | VvOrdering::Less => None,
        VvOrdering::Greater => Some(dominated(local, remote)),
        VvOrdering::Concurrent if local.same_content(remote) => {
            Some(adopt(remote, local.version.merge(&remote.version)))
        }
        VvOrdering::Concurrent => concurrent(local, remote),
    }
}

/// The remote version has seen ours and more: apply it.
fn dominated(local: &Record, remote: &Record) -> Step {
    let unchanged_file = local.kind == Kind::File && local.mode == remote.mode;
    if local.same_content(remote) && (local.deleted || unchanged_file) {
        // Typically the peer merged versions after a conflict we both resolved the
        // same way: nothing on disk would change, so skip the transfer.
        adopt(remote, remote.version.clone())
    } else {
        take(remote)
    }
}

/// Both sides changed and the content differs: the deterministic winner decides.
fn concurrent(local: &Record, remote: &Record) -> Option<Step> {
    match winner(local, remote) {
        Side::Local => None,
        // Deleted here, modified there: nothing of ours to save. The record taken
        // keeps what our tombstone had seen: storing the peer's version alone
        // would set our own counter for the path back, and our next edit would
        // reuse a counter a peer already saw (on our deletion), so a later
        // deletion there could wrongly dominate that edit.
        Side::Remote if local.deleted => Some(take(&Record {
            version: local.version.merge(&remote.version),
            ..remote.clone()
        })),
        Side::Remote => {
            let path = RelPath::parse(&local.path).ok()?;
            let copy = conflict_name(&path, local.modified, &local.modified_by);
            // Never plan to move our version onto itself and then overwrite it:
            // keeping ours (and staying in conflict) is better than losing it.
            if copy == path {
                return None;
            }
            Some(Step::Conflict {
                local: local.clone(),
                remote: remote.clone(),
                conflict_copy: copy.to_string(),
            })
        }
    }
}

/// Plans a batch: one decision per acceptable path, then renames and local copies
/// instead of transfers, then execution order.
pub fn plan(local: &impl LocalIndex, remote: &[Record]) -> Plan {
    let (accepted, refused) = screen(remote);
    let paths: HashSet<String> = accepted.keys().map(|p| p.to_string()).collect();
    let mut outvoted = Vec::new();
    let mut steps: Vec<Step> = accepted
        .into_values()
        .filter_map(|r| {
            let ours = local.get(&r.path);
            let step = decide(ours.as_ref(), r);
            let concurrent = ours
                .as_ref()
                .is_some_and(|l| r.version.compare(&l.version) == VvOrdering::Concurrent);
            if step.is_none() && concurrent {
                outvoted.push(r.clone());
            }
            step
        })
        .collect();
    number_copies(&paths, &mut steps);
    let mut steps = pair_renames(local, steps);
    use_local_copies(local, &mut steps);
    Plan {
        steps: order(steps),
        refused,
        outvoted,
    }
}

/// A conflict copy never takes a name the batch brings a record for (say, the
/// tombstone of an earlier copy made in the same second), nor another copy's:
/// one path would get two records in one commit. Such a copy is numbered.
fn number_copies(batch: &HashSet<String>, steps: &mut [Step]) {
    let mut used: HashSet<String> = HashSet::new();
    for step in steps.iter_mut() {
        let Step::Conflict { conflict_copy, .. } = step else {
            continue;
        };
        let base = conflict_copy.clone();
        let mut n = 2;
        while (batch.contains(conflict_copy.as_str()) || used.contains(conflict_copy.as_str()))
            && n <= 1000
        {
            *conflict_copy = numbered(&base, n);
            n += 1;
        }
        used.insert(conflict_copy.clone());
    }
}

/// Valid records by path, and the refused ones in input order. A path listed twice
/// (a buggy or hostile peer) is planned once, from the record that has seen most.
fn screen(remote: &[Record]) -> (BTreeMap<&str, &Record>, Vec<(String, PathError)>) {
    let mut accepted: BTreeMap<&str, &Record> = BTreeMap::new();
    let mut refused = Vec::new();
    for r in remote {
        if let Err(e) = RelPath::parse(&r.path) {
            refused.push((r.path.clone(), e));
            continue;
        }
        match accepted.get(r.path.as_str()) {
            Some(seen) if r.version.compare(&seen.version) == VvOrdering::Less => {}
            _ => {
                accepted.insert(&r.path, r);
            }
        }
    }
    (accepted, refused)
}

/// A live local file deleted by this plan whose content the plan also creates at a
/// path that is new here is a rename on the peer: move it instead of fetching it
/// and deleting the original. Pairs are made in path order, so duplicates of one
/// content are matched reproducibly.
fn pair_renames(local: &impl LocalIndex, steps: Vec<Step>) -> Vec<Step> {
    let mut gone: HashMap<ContentHash, Vec<usize>> = HashMap::new();
    for (i, step) in steps.iter().enumerate().rev() {
        let Step::Delete { remote } = step else {
            continue;
        };
        let ours = local
            .get(&remote.path)
            .filter(|l| !l.deleted && l.kind == Kind::File);
        if let Some(l) = ours {
            gone.entry(l.hash).or_default().push(i);
        }
    }
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    for i in 0..slots.len() {
        let Some(remote) = slots[i].as_ref().and_then(from_peer) else {
            continue;
        };
        if local.get(&remote.path).is_some_and(|l| !l.deleted) {
            continue;
        }
        let Some(d) = gone.get_mut(&remote.hash).and_then(Vec::pop) else {
            continue;
        };
        let Some(Step::Delete { remote: tomb }) = &slots[d] else {
            continue;
        };
        let (from, from_tombstone) = (tomb.path.clone(), tomb.clone());
        let remote = remote.clone();
        slots[i] = Some(Step::Rename {
            from,
            remote,
            from_tombstone,
        });
        slots[d] = None;
    }
    slots.into_iter().flatten().collect()
}

/// The file of a fetch that would go to the peer.
fn from_peer(step: &Step) -> Option<&Record> {
    match step {
        Step::Fetch {
            remote,
            local_source: None,
        } => Some(remote),
        _ => None,
    }
}

/// Fetches whose content a local file already has copy it from there, unless the
/// plan changes that file before deletions run (the engine performs those steps
/// concurrently with the copy).
fn use_local_copies(local: &impl LocalIndex, steps: &mut [Step]) {
    let busy: HashSet<String> = steps
        .iter()
        .flat_map(|s| match s {
            Step::Adopt { .. } | Step::Delete { .. } => vec![],
            Step::Rename { from, remote, .. } => vec![from.clone(), remote.path.clone()],
            other => vec![other.path().to_string()],
        })
        .collect();
    for step in steps {
        if let Step::Fetch {
            remote,
            local_source,
        } = step
        {
            let src = local
                .find_by_hash(&remote.hash)
                .filter(|src| !busy.contains(src));
            *local_source = local_source.take().or(src);
        }
    }
}

/// Directories to create first, parents before children (a path sorts before
/// everything below it); then everything else; then deletions, children first.
fn order(steps: Vec<Step>) -> Vec<Step> {
    let (mut dirs, mut middle, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for s in steps {
        match &s {
            Step::MakeDir { .. } => dirs.push(s),
            // A directory that wins a conflict over a file is a directory to create.
            Step::Conflict { remote, .. } if remote.kind == Kind::Dir && !remote.deleted => {
                dirs.push(s)
            }
            Step::Delete { .. } => deletes.push(s),
            _ => middle.push(s),
        }
    }
    dirs.sort_by(|a, b| a.path().cmp(b.path()));
    middle.sort_by(|a, b| a.path().cmp(b.path()));
    deletes.sort_by(|a, b| b.path().cmp(a.path()));
    dirs.into_iter().chain(middle).chain(deletes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Timestamp;
    use proptest::prelude::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// A file as node `b` made it at version `b:n`, `n` seconds after the epoch.
    fn file(path: &str, content: &[u8], n: u64) -> Record {
        Record {
            path: path.into(),
            kind: Kind::File,
            size: content.len() as u64,
            modified: Timestamp {
                secs: n as i64,
                nanos: 0,
            },
            mode: 0o644,
            hash: ContentHash::of(content),
            target: None,
            version: vv(&[("b", n)]),
            deleted: false,
            modified_by: "b".into(),
            seq: 0,
        }
    }

    /// `r` as `node` made it at `secs`, with `version`.
    fn by(mut r: Record, version: &[(&str, u64)], secs: i64, node: &str) -> Record {
        (r.version, r.modified.secs, r.modified_by) = (vv(version), secs, node.into());
        r
    }

    fn dir(path: &str, n: u64) -> Record {
        let mut r = file(path, b"", n);
        (r.kind, r.hash) = (Kind::Dir, ContentHash([0; 32]));
        r
    }

    fn link(path: &str, target: &str, n: u64) -> Record {
        let mut r = file(path, target.as_bytes(), n);
        (r.kind, r.target) = (Kind::Symlink, Some(target.into()));
        r
    }

    fn dead(mut r: Record) -> Record {
        (r.deleted, r.hash, r.size) = (true, ContentHash([0; 32]), 0);
        r
    }

    /// A decision as its display line ("-" for nothing to do).
    fn says(local: Option<&Record>, remote: &Record) -> String {
        decide(local, remote).map_or("-".into(), |s| s.to_string())
    }

    fn run(local: &[Record], batch: &[Record]) -> Plan {
        let index: HashMap<String, Record> =
            local.iter().map(|r| (r.path.clone(), r.clone())).collect();
        plan(&index, batch)
    }

    /// A plan as display lines, which is also what a dry run prints.
    fn lines(local: &[Record], batch: &[Record]) -> Vec<String> {
        let steps = run(local, batch).steps;
        steps.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_paths_are_created_and_unknown_tombstones_recorded() {
        let f = file("f", b"1", 1);
        let fetch = decide(None, &f);
        assert!(matches!(fetch, Some(Step::Fetch { remote, local_source: None }) if remote == f));
        assert_eq!(says(None, &dir("d", 1)), "mkdir d");
        assert_eq!(says(None, &link("l", "f", 1)), "symlink l -> f");
        let gone = dead(file("never/seen", b"", 2));
        assert_eq!(says(None, &gone), "adopt never/seen at {b:2}");
        assert_eq!(lines(&[], &[gone]), ["adopt never/seen at {b:2}"]);
    }

    #[test]
    fn same_or_older_remote_needs_nothing_newer_is_applied() {
        let (v1, v2, gone) = (
            file("f", b"1", 1),
            file("f", b"2", 2),
            dead(file("f", b"", 3)),
        );
        assert_eq!(says(Some(&v2), &v2.clone()), "-");
        assert_eq!(
            says(Some(&v2), &by(v2.clone(), &[("b", 2), ("c", 0)], 2, "b")),
            "-"
        );
        assert_eq!(
            says(Some(&v2), &v1),
            "-",
            "ours is newer: the peer pulls it"
        );
        assert_eq!(says(Some(&v1), &v2), "fetch f");
        assert!(
            matches!(decide(Some(&v2), &gone), Some(Step::Delete { remote }) if remote == gone)
        );
        assert_eq!(says(Some(&dir("f", 2)), &dead(dir("f", 3))), "delete f");
        assert_eq!(says(Some(&gone), &file("f", b"4", 4)), "fetch f");
        assert_eq!(
            says(Some(&gone), &dead(file("f", b"", 5))),
            "adopt f at {b:5}"
        );
        assert_eq!(says(Some(&v1), &link("f", "x", 2)), "symlink f -> x");
        // A newer history of the same file (a merge after a conflict) needs no transfer.
        let ours = by(file("f", b"x", 1), &[("a", 1)], 1, "a");
        let mut merged = by(file("f", b"x", 1), &[("a", 1), ("b", 1)], 1, "b");
        assert_eq!(says(Some(&ours), &merged), "adopt f at {a:1, b:1}");
        merged.mode = 0o755;
        assert_eq!(says(Some(&ours), &merged), "fetch f");
    }

    #[test]
    fn concurrent_identical_edits_merge_without_conflict() {
        let a = by(file("n", b"same", 0), &[("a", 2), ("b", 1)], 100, "a");
        let b = by(file("n", b"same", 0), &[("a", 1), ("b", 2)], 90, "b");
        assert_eq!(says(Some(&a), &b), "adopt n at {a:2, b:2}");
        assert_eq!(says(Some(&b), &a), "adopt n at {a:2, b:2}");
    }

    #[test]
    fn concurrent_different_edits_conflict_on_the_losing_side_only() {
        let a = by(
            file("docs/notes.txt", b"a", 0),
            &[("a", 2), ("b", 1)],
            100,
            "a",
        );
        let b = by(
            file("docs/notes.txt", b"b", 0),
            &[("a", 1), ("b", 2)],
            200,
            "b",
        );
        // On a, b's newer edit wins: a keeps its own as a conflict copy.
        let copy = "docs/notes.sync-conflict-19700101-000140-a.txt".to_string();
        let want = Step::Conflict {
            local: a.clone(),
            remote: b.clone(),
            conflict_copy: copy,
        };
        assert_eq!(decide(Some(&a), &b), Some(want));
        // On b, its own version wins: nothing to do, a will take it.
        assert_eq!(decide(Some(&b), &a), None);
    }

    #[test]
    fn records_that_lose_to_ours_are_reported_as_outvoted() {
        let ours = by(file("n", b"ours", 0), &[("a", 1), ("b", 2)], 200, "b");
        let theirs = by(file("n", b"theirs", 0), &[("a", 2), ("b", 1)], 100, "a");
        let older = by(file("o", b"old", 0), &[("b", 1)], 100, "a");
        let index: HashMap<String, Record> =
            [ours, by(file("o", b"new", 0), &[("b", 2)], 200, "b")]
                .into_iter()
                .map(|r| (r.path.clone(), r))
                .collect();
        let p = plan(&index, &[theirs.clone(), older]);
        assert!(p.steps.is_empty(), "{:?}", p.steps);
        // Only the concurrent loser: an older version is simply behind.
        assert_eq!(p.outvoted, vec![theirs]);
    }

    #[test]
    fn a_conflict_copy_avoids_names_the_batch_brings() {
        let ours = by(file("notes.txt", b"a", 0), &[("a", 2), ("b", 1)], 100, "a");
        let theirs = by(file("notes.txt", b"b", 0), &[("a", 1), ("b", 2)], 200, "b");
        let name = "notes.sync-conflict-19700101-000140-a.txt";
        let old_copy = dead(by(file(name, b"", 0), &[("a", 1), ("b", 1)], 150, "b"));
        let theirs_only = lines(std::slice::from_ref(&ours), std::slice::from_ref(&theirs));
        assert_eq!(
            theirs_only,
            [format!(
                "conflict notes.txt: keep ours as {name}, take theirs"
            )]
        );
        let plan = lines(&[ours], &[theirs, old_copy]);
        assert!(
            plan.iter().any(|l| l
                == "conflict notes.txt: keep ours as notes.sync-conflict-19700101-000140-a-2.txt, take theirs"),
            "{plan:?}"
        );
    }

    #[test]
    fn modify_beats_delete_in_both_directions() {
        let edited = by(file("f", b"edit", 0), &[("a", 2), ("b", 1)], 100, "a");
        let deleted = dead(by(file("f", b"", 0), &[("a", 1), ("b", 2)], 999, "b"));
        assert_eq!(
            says(Some(&edited), &deleted),
            "-",
            "our edit survives their delete"
        );
        // Their edit replaces our delete; there is nothing of ours to save.
        assert_eq!(says(Some(&deleted), &edited), "fetch f");
        // ... under a version that has seen our delete too (found by the soak:
        // with the peer's version alone, the deleting node's counter went back,
        // its next edit reused a counter the peer had already merged, and a
        // later deletion on the peer overruled that edit).
        let Some(Step::Fetch { remote, .. }) = decide(Some(&deleted), &edited) else {
            panic!("not a fetch");
        };
        assert_eq!(remote.version, vv(&[("a", 2), ("b", 2)]));
        assert_eq!(remote.hash, edited.hash);
    }

    #[test]
    fn a_directory_wins_over_a_file_and_is_created_first() {
        let ours = by(file("x", b"file", 0), &[("a", 1)], 500, "a");
        let theirs = dir("x", 1);
        assert_eq!(says(Some(&theirs), &ours), "-");
        let want = "conflict x: keep ours as x.sync-conflict-19700101-000820-a, take theirs";
        assert_eq!(
            lines(&[ours], &[file("x/y", b"y", 1), theirs]),
            [want, "fetch x/y"]
        );
    }

    #[test]
    fn renames_need_no_transfer() {
        let batch = [
            dead(file("old.bin", b"", 2)),
            file("dir/new.bin", b"content", 2),
        ];
        let p = run(&[file("old.bin", b"content", 1)], &batch);
        let (from_tombstone, remote) = (batch[0].clone(), batch[1].clone());
        assert_eq!(
            p.steps,
            [Step::Rename {
                from: "old.bin".into(),
                remote,
                from_tombstone
            }]
        );
    }

    #[test]
    fn duplicate_contents_pair_up_in_path_order() {
        let local = [file("a1", b"dup", 1), file("a2", b"dup", 1)];
        let (d1, d2) = (dead(file("a1", b"", 2)), dead(file("a2", b"", 2)));
        let batch = [
            d2,
            d1,
            file("z2", b"dup", 2),
            file("z1", b"dup", 2),
            file("z3", b"dup", 2),
        ];
        // z3's only local source is being moved away by a rename: it is fetched.
        let want = ["rename a1 -> z1", "rename a2 -> z2", "fetch z3"];
        assert_eq!(lines(&local, &batch), want);
    }

    #[test]
    fn no_rename_without_a_planned_delete_or_onto_a_live_file() {
        let local = [file("src", b"c", 1), file("dst", b"old", 1)];
        assert_eq!(lines(&local, &[file("cp", b"c", 2)]), ["copy src -> cp"]);
        // The target is live here: copied, and the source deleted afterwards.
        let batch = [dead(file("src", b"", 2)), file("dst", b"c", 2)];
        assert_eq!(lines(&local, &batch), ["copy src -> dst", "delete src"]);
    }

    #[test]
    fn local_copies_need_no_transfer() {
        let local = [file("other.bin", b"copy me", 1)];
        let new = file("copy.bin", b"copy me", 2);
        let steps = run(&local, std::slice::from_ref(&new)).steps;
        let src = Some("other.bin".to_string());
        assert_eq!(
            steps,
            [Step::Fetch {
                remote: new.clone(),
                local_source: src
            }]
        );
        // A source that this plan rewrites is not one to copy from.
        let batch = [file("other.bin", b"changed", 2), new];
        assert_eq!(lines(&local, &batch), ["fetch copy.bin", "fetch other.bin"]);
    }

    #[test]
    fn unacceptable_paths_are_refused_not_planned() {
        let bad = [
            "../x",
            "/etc/passwd",
            ".dirsync/index.db",
            "a/../../etc",
            ".dirsync-tmp-1",
        ];
        let mut batch: Vec<Record> = bad.iter().map(|p| file(p, b"e", 1)).collect();
        batch.push(dead(file("ok", b"", 1)));
        let p = run(&[], &batch);
        let refused: Vec<&str> = p.refused.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(refused, bad);
        assert_eq!(p.refused[0].1, PathError::DotComponent("../x".into()));
        assert_eq!(p.refused[1].1, PathError::Absolute("/etc/passwd".into()));
        assert_eq!(
            p.refused[2].1,
            PathError::StateDir(".dirsync/index.db".into())
        );
        assert_eq!(p.steps.iter().map(Step::path).collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn dirs_parents_first_then_files_then_deletes_children_first() {
        let local = [dir("x", 1), file("x/y", b"y", 1), dir("x/z", 1)];
        let gone = [
            dead(dir("x", 2)),
            dead(file("x/y", b"", 2)),
            dead(dir("x/z", 2)),
        ];
        let new = [
            dir("a/b", 1),
            file("a/b/f", b"f", 1),
            dir("a", 1),
            link("a/l", "b", 1),
        ];
        let batch: Vec<Record> = gone.into_iter().chain(new).collect();
        let want = ["mkdir a", "mkdir a/b", "fetch a/b/f", "symlink a/l -> b"];
        let want = want
            .into_iter()
            .chain(["delete x/z", "delete x/y", "delete x"]);
        assert_eq!(lines(&local, &batch), want.collect::<Vec<_>>());
    }

    #[test]
    fn a_path_listed_twice_is_planned_once_from_the_newest_record() {
        let (v1, v2) = (file("f", b"1", 1), file("f", b"2", 2));
        let newest =
            |p: Plan| matches!(&p.steps[..], [Step::Fetch { remote, .. }] if *remote == v2);
        assert!(newest(run(&[], &[v2.clone(), v1.clone()])));
        assert!(newest(run(&[], &[v1, v2.clone()])));
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let version = proptest::collection::btree_map("[ab]", 0u64..3, 0..3);
        let parts = (0..3usize, version, 0i64..3, "[ab]", 0u8..3, any::<bool>());
        parts.prop_map(|(k, version, secs, node, content, deleted)| {
            let mut r = by(file("p", &[content], 0), &[], secs, &node);
            (r.kind, r.version) = ([Kind::File, Kind::Dir, Kind::Symlink][k], version.into());
            r.target = (r.kind == Kind::Symlink).then(|| content.to_string());
            if deleted {
                dead(r)
            } else {
                r
            }
        })
    }

    /// Whether a decision changes the local path (more than its recorded version).
    fn writes(step: &Option<Step>) -> bool {
        !matches!(step, None | Some(Step::Adopt { .. }))
    }

    proptest! {
        /// Two nodes comparing each other's records must neither both keep their own
        /// version (no convergence) nor both take the other's (ping-pong).
        #[test]
        fn exactly_one_side_gives_way(x in arb_record(), y in arb_record()) {
            let (on_x, on_y) = (decide(Some(&x), &y), decide(Some(&y), &x));
            let order = x.version.compare(&y.version);
            if order == VvOrdering::Equal {
                prop_assert_eq!((on_x, on_y), (None, None));
            } else if order == VvOrdering::Concurrent && x.same_content(&y) {
                let merged = x.version.merge(&y.version);
                let adopt = Some(Step::Adopt { path: "p".into(), version: merged });
                prop_assert_eq!((&on_x, &on_y), (&adopt, &adopt));
            } else {
                prop_assert!(on_x.is_none() || on_y.is_none(), "both act: {:?} / {:?}", on_x, on_y);
                let same = x.same_content(&y);
                prop_assert!(same || writes(&on_x) != writes(&on_y), "{:?} / {:?}", on_x, on_y);
            }
        }
    }
}
