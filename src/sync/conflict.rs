//! Conflicts: which of two concurrent versions wins (the same answer on every node,
//! with no coordination), and the name under which the losing local version is kept.

use std::cmp::Ordering;

use chrono::Datelike;

use super::record::{Kind, Record};
use crate::path::{RelPath, MAX_NAME, MAX_PATH};
use crate::wire::Timestamp;

/// What marks a conflict copy's name, between the original stem and the extension.
const MARK: &str = ".sync-conflict-";
/// `YYYYMMDD-HHMMSS`: always this many bytes (years outside 0..=9999 are not shown).
const STAMP_LEN: usize = 15;
/// The node name is shortened to this many bytes, leaving most of a file name's
/// 255 bytes to the original name.
const MAX_NODE: usize = 64;

/// Which side of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Local,
    Remote,
}

/// The winner between two concurrent records. Every node must pick the same version
/// without talking, so this is a total order on records and swapping the arguments
/// swaps the answer; only records with identical content tie (then `Local`, as
/// nothing needs to happen).
///
/// In order: a live record beats a tombstone (deleting is never worth losing an
/// edit); a directory beats anything else (moving a whole tree aside would be a
/// surprise); the newer modification time; the greater node name; the greater
/// hash; then kind, executable bits and link target, so that records differing
/// only there still have one winner.
pub fn winner(local: &Record, remote: &Record) -> Side {
    match precedence(local, remote) {
        Ordering::Less => Side::Remote,
        Ordering::Equal | Ordering::Greater => Side::Local,
    }
}

fn precedence(a: &Record, b: &Record) -> Ordering {
    let live = |r: &Record| !r.deleted;
    let dir = |r: &Record| !r.deleted && r.kind == Kind::Dir;
    live(a)
        .cmp(&live(b))
        .then(dir(a).cmp(&dir(b)))
        .then(a.modified.cmp(&b.modified))
        .then(a.modified_by.cmp(&b.modified_by))
        .then(a.hash.cmp(&b.hash))
        .then_with(|| content_order(a, b))
}

/// The rest of what [`Record::same_content`] compares (tombstones have no content).
fn content_order(a: &Record, b: &Record) -> Ordering {
    if a.deleted || b.deleted {
        return Ordering::Equal;
    }
    let kind = |k: Kind| match k {
        Kind::File => 0u8,
        Kind::Dir => 1,
        Kind::Symlink => 2,
    };
    kind(a.kind)
        .cmp(&kind(b.kind))
        .then((a.mode & 0o111).cmp(&(b.mode & 0o111)))
        .then_with(|| a.target.cmp(&b.target))
}

/// `x.sync-conflict-DATE-TIME-NODE.ext` -> `x.sync-conflict-DATE-TIME-NODE-n.ext`.
pub fn numbered(copy: &str, n: u32) -> String {
    let (dir, file) = match copy.rsplit_once('/') {
        Some((d, f)) => (format!("{d}/"), f),
        None => (String::new(), copy),
    };
    let mark = file.find(".sync-conflict-").map_or(0, |i| i + 1);
    match file[mark..].find('.') {
        Some(dot) => format!("{dir}{}-{n}{}", &file[..mark + dot], &file[mark + dot..]),
        None => format!("{dir}{file}-{n}"),
    }
}

/// `dir/NAME.EXT` -> `dir/NAME.sync-conflict-YYYYMMDD-HHMMSS-NODE.EXT`, with the
/// UTC time of `when`.
///
/// The extension is what follows the last dot (`a.tar.gz` keeps `.gz`), so the copy
/// still opens with the same program; a name whose only dot leads it (`.bashrc`)
/// has none. NAME is shortened (on a character boundary) to keep the file name
/// within 255 bytes and the path within 4096. The result is always a valid path
/// different from `path`: in the absurd case of a directory too deep to hold any
/// conflict name, the copy goes to the top level rather than being lost.
pub fn conflict_name(path: &RelPath, when: Timestamp, node: &str) -> RelPath {
    let name = path.file_name();
    let tag = format!("{MARK}{}-{}", stamp(when), sanitize_node(node));
    let (stem, ext) = match name.rfind('.') {
        // An extension too long to keep beside the tag is treated as part of NAME.
        Some(i) if i > 0 && tag.len() + (name.len() - i) <= MAX_NAME => name.split_at(i),
        _ => (name, ""),
    };
    let in_dir = path.parent().and_then(|dir| {
        let room = MAX_PATH.checked_sub(dir.as_str().len() + 1)?;
        let file = fit(stem, &tag, ext, room)?;
        dir.join(&file).ok()
    });
    in_dir
        .or_else(|| fit(stem, &tag, ext, MAX_NAME).and_then(|f| RelPath::parse(&f).ok()))
        // Unreachable: `tag` and `ext` fit in MAX_NAME by construction and the stem
        // of a valid name cannot make a reserved one. Callers compare with `path`.
        .unwrap_or_else(|| path.clone())
}

/// `stem` (shortened as needed) + `tag` + `ext` in at most `room` bytes, if the
/// tag and extension fit at all.
fn fit(stem: &str, tag: &str, ext: &str, room: usize) -> Option<String> {
    let mut keep = room
        .min(MAX_NAME)
        .checked_sub(tag.len() + ext.len())?
        .min(stem.len());
    while !stem.is_char_boundary(keep) {
        keep -= 1;
    }
    Some(format!("{}{tag}{ext}", &stem[..keep]))
}

fn stamp(when: Timestamp) -> String {
    match when.to_datetime() {
        // Outside these years `%Y` is not four digits, and the tag's width matters.
        Some(d) if (0..=9999).contains(&d.year()) => d.format("%Y%m%d-%H%M%S").to_string(),
        _ => "00000000-000000".to_string(),
    }
}

/// The node name as it can appear in a file name: no separators, NUL or control
/// characters, at most [`MAX_NODE`] bytes.
fn sanitize_node(node: &str) -> String {
    let mut out = String::new();
    for c in node.chars().filter(|c| *c != '/' && !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_NODE {
            break;
        }
        out.push(c);
    }
    out
}

/// Whether a file name is a conflict copy made by [`conflict_name`].
pub fn is_conflict_copy(name: &str) -> bool {
    name.match_indices(MARK).any(|(i, _)| {
        let rest = &name.as_bytes()[i + MARK.len()..];
        rest.len() > STAMP_LEN
            && rest[..STAMP_LEN].iter().enumerate().all(|(j, b)| {
                if j == 8 {
                    *b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            })
            && rest[STAMP_LEN] == b'-'
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::ContentHash;
    use crate::sync::version::VersionVector;
    use proptest::prelude::*;

    #[test]
    fn numbered_conflict_copies() {
        assert_eq!(
            numbered("d/n.sync-conflict-20260101-000000-a.txt", 2),
            "d/n.sync-conflict-20260101-000000-a-2.txt"
        );
        assert_eq!(
            numbered("Makefile.sync-conflict-20260101-000000-a", 3),
            "Makefile.sync-conflict-20260101-000000-a-3"
        );
        assert_eq!(
            numbered(".bashrc.sync-conflict-20260101-000000-a", 2),
            ".bashrc.sync-conflict-20260101-000000-a-2"
        );
    }

    fn rec(kind: Kind, secs: i64, by: &str, content: &[u8], deleted: bool) -> Record {
        Record {
            path: "p".into(),
            kind,
            size: content.len() as u64,
            modified: Timestamp { secs, nanos: 0 },
            mode: 0o644,
            hash: ContentHash::of(content),
            target: None,
            version: VersionVector::new(),
            deleted,
            modified_by: by.into(),
            seq: 0,
        }
    }

    fn other(side: Side) -> Side {
        match side {
            Side::Local => Side::Remote,
            Side::Remote => Side::Local,
        }
    }

    /// `first` must win, whichever side it is on.
    fn beats(first: &Record, second: &Record) {
        assert_eq!(
            winner(first, second),
            Side::Local,
            "{first:?}\nvs {second:?}"
        );
        assert_eq!(
            winner(second, first),
            Side::Remote,
            "{second:?}\nvs {first:?}"
        );
    }

    #[test]
    fn live_beats_tombstone_whatever_else() {
        let old_edit = rec(Kind::File, 1, "a", b"x", false);
        beats(&old_edit, &rec(Kind::File, 9, "z", b"", true));
        beats(&old_edit, &rec(Kind::Dir, 9, "z", b"", true));
    }

    #[test]
    fn directory_beats_file_and_symlink() {
        let dir = rec(Kind::Dir, 1, "a", b"", false);
        beats(&dir, &rec(Kind::File, 9, "z", b"y", false));
        beats(&dir, &rec(Kind::Symlink, 9, "z", b"y", false));
    }

    #[test]
    fn then_newer_then_node_then_hash() {
        beats(
            &rec(Kind::File, 9, "a", b"x", false),
            &rec(Kind::File, 1, "z", b"y", false),
        );
        let mut nanos = rec(Kind::File, 5, "a", b"x", false);
        nanos.modified.nanos = 1;
        beats(&nanos, &rec(Kind::File, 5, "z", b"y", false));
        beats(
            &rec(Kind::File, 5, "b", b"x", false),
            &rec(Kind::File, 5, "a", b"y", false),
        );
        let (x, y) = (
            rec(Kind::File, 5, "a", b"x", false),
            rec(Kind::File, 5, "a", b"y", false),
        );
        if x.hash > y.hash {
            beats(&x, &y);
        } else {
            beats(&y, &x);
        }
    }

    #[test]
    fn identical_records_keep_local_and_near_identical_ones_still_have_a_winner() {
        let x = rec(Kind::File, 5, "a", b"x", false);
        assert_eq!(
            (winner(&x, &x), winner(&x, &x.clone())),
            (Side::Local, Side::Local)
        );
        let mut exec = x.clone();
        exec.mode = 0o755;
        beats(&exec, &x);
        // A symlink whose target text equals a file's content has the same hash.
        let mut link = x.clone();
        link.kind = Kind::Symlink;
        link.target = Some("x".into());
        beats(&link, &x);
    }

    #[test]
    fn names() {
        let t = Timestamp {
            secs: 1_764_000_000,
            nanos: 0,
        }; // 2025-11-24 16:00:00 UTC
        let n = |p: &str| conflict_name(&RelPath::parse(p).unwrap(), t, "b").to_string();
        assert_eq!(
            n("docs/notes.txt"),
            "docs/notes.sync-conflict-20251124-160000-b.txt"
        );
        assert_eq!(n("Makefile"), "Makefile.sync-conflict-20251124-160000-b");
        assert_eq!(n(".bashrc"), ".bashrc.sync-conflict-20251124-160000-b");
        assert_eq!(
            n("d/archive.tar.gz"),
            "d/archive.tar.sync-conflict-20251124-160000-b.gz"
        );
        assert_eq!(
            n(".config.json"),
            ".config.sync-conflict-20251124-160000-b.json"
        );
        let odd = conflict_name(&RelPath::parse("f").unwrap(), t, "we/ird\nnode");
        assert_eq!(odd.as_str(), "f.sync-conflict-20251124-160000-weirdnode");
        let before_epoch = conflict_name(
            &RelPath::parse("f").unwrap(),
            Timestamp { secs: -1, nanos: 0 },
            "b",
        );
        assert_eq!(before_epoch.as_str(), "f.sync-conflict-19691231-235959-b");
        let far = conflict_name(
            &RelPath::parse("f").unwrap(),
            Timestamp {
                secs: i64::MAX,
                nanos: 0,
            },
            "b",
        );
        assert_eq!(far.as_str(), "f.sync-conflict-00000000-000000-b");
    }

    #[test]
    fn long_names_are_shortened_on_char_boundaries() {
        let t = Timestamp { secs: 0, nanos: 0 };
        let name = format!("{}.txt", "é".repeat(125)); // 254 bytes
        let got = conflict_name(&RelPath::parse(&format!("d/{name}")).unwrap(), t, "node");
        let file = got.file_name();
        assert!(
            file.len() <= MAX_NAME && file.ends_with("-node.txt"),
            "{file}"
        );
        assert!(file.starts_with("éé") && is_conflict_copy(file));
        // An "extension" too long to keep becomes part of the shortened name.
        let long_ext = format!("a.{}", "x".repeat(250));
        let got = conflict_name(&RelPath::parse(&long_ext).unwrap(), t, &"n".repeat(300));
        assert_eq!(got.as_str().len(), MAX_NAME);
        assert!(got
            .as_str()
            .ends_with(&format!("-{}", "n".repeat(MAX_NODE))));
    }

    #[test]
    fn a_path_too_deep_for_any_conflict_name_puts_it_at_the_top() {
        let deep = format!("{}f.txt", "d/".repeat(2040)); // 4085 bytes
        let got = conflict_name(
            &RelPath::parse(&deep).unwrap(),
            Timestamp { secs: 0, nanos: 0 },
            "b",
        );
        assert_eq!(got.as_str(), "f.sync-conflict-19700101-000000-b.txt");
        let roomy = format!("{}f.txt", "d/".repeat(2000));
        let got = conflict_name(
            &RelPath::parse(&roomy).unwrap(),
            Timestamp { secs: 0, nanos: 0 },
            "b",
        );
        assert!(got.as_str().starts_with("d/d/") && got.as_str().len() <= MAX_PATH);
        assert!(
            got.as_str()
                .ends_with(".sync-conflict-19700101-000000-b.txt"),
            "{got}"
        );
    }

    #[test]
    fn recognises_conflict_copies_only() {
        assert!(is_conflict_copy(
            "notes.sync-conflict-20251124-160000-b.txt"
        ));
        assert!(is_conflict_copy("x.sync-conflict-00000000-000000-"));
        assert!(!is_conflict_copy("notes.txt"));
        assert!(!is_conflict_copy("my.sync-conflict-notes.txt"));
        assert!(!is_conflict_copy("x.sync-conflict-2025112-160000-b"));
        assert!(!is_conflict_copy("x.sync-conflict-20251124-160000"));
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            0..3u8,
            0i64..3,
            "[ab]",
            0u8..3,
            any::<bool>(),
            prop_oneof![Just(0o644u32), Just(0o755)],
        )
            .prop_map(|(k, secs, by, content, deleted, mode)| {
                let kind = [Kind::File, Kind::Dir, Kind::Symlink][usize::from(k)];
                let mut r = rec(kind, secs, &by, &[content], deleted);
                r.mode = mode;
                r.target = (kind == Kind::Symlink).then(|| content.to_string());
                r
            })
    }

    proptest! {
        #[test]
        fn winner_is_symmetric_and_ties_only_on_same_content(x in arb_record(), y in arb_record()) {
            let (xy, yx) = (winner(&x, &y), winner(&y, &x));
            if precedence(&x, &y) == Ordering::Equal {
                prop_assert!(x.same_content(&y));
                prop_assert_eq!((xy, yx), (Side::Local, Side::Local));
            } else {
                prop_assert_eq!(yx, other(xy));
            }
        }

        #[test]
        fn conflict_names_are_valid_and_distinct(
            path in "[a-zé.]{1,12}(/[a-zé.]{1,12}){0,3}",
            secs in any::<i64>(),
            node in "\\PC{0,80}",
        ) {
            if let Ok(p) = RelPath::parse(&path) {
                let c = conflict_name(&p, Timestamp { secs, nanos: 0 }, &node);
                prop_assert_ne!(&c, &p);
                prop_assert_eq!(c.parent(), p.parent());
                prop_assert!(is_conflict_copy(c.file_name()));
            }
        }
    }
}
