//! [`RelPath`]: a path relative to the synced root, validated when parsed, so that a
//! path from a peer can never name anything outside the root or inside dirsync's
//! own state.
//!
//! Validation is lexical only. It cannot see the disk, so whoever writes below a
//! `RelPath` still has to check that no ancestor is a symlink
//! ([`RelPath::ancestors`] lists what to check, top-down).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// One definition of dirsync's reserved names, shared with the scanner and the
// engine, so that what they create is exactly what a peer may not name.
use crate::index::{STATE_DIR_NAME, TEMP_PREFIX};

/// Longest accepted path, in bytes (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest accepted component, in bytes (Linux's NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Why a string is not an acceptable relative path. The path is shown with `{:?}`
/// so control characters from a peer cannot forge log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("{0:?} is absolute (paths must be relative to the synced root)")]
    Absolute(String),
    #[error("{0:?} has an empty component (`//` or a trailing `/`)")]
    EmptyComponent(String),
    #[error("{0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("{} has a component longer than {MAX_NAME} bytes", Shown(.0))]
    NameTooLong(String),
    #[error("{} is longer than {MAX_PATH} bytes", Shown(.0))]
    TooLong(String),
    #[error("{0:?} is inside dirsync's state directory `{STATE_DIR_NAME}`")]
    StateDir(String),
    #[error("{0:?} names a dirsync temporary file (`{TEMP_PREFIX}*`)")]
    TempFile(String),
}

impl PathError {
    /// The refused path (empty for [`PathError::Empty`]).
    pub fn path(&self) -> &str {
        match self {
            PathError::Empty => "",
            PathError::Absolute(p)
            | PathError::EmptyComponent(p)
            | PathError::DotComponent(p)
            | PathError::Nul(p)
            | PathError::NameTooLong(p)
            | PathError::TooLong(p)
            | PathError::StateDir(p)
            | PathError::TempFile(p) => p,
        }
    }
}

/// An over-long path, shortened for messages: a peer could otherwise make every
/// refusal log line kilobytes long.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KEEP: usize = 80;
        if self.0.len() <= KEEP {
            return write!(f, "{:?}", self.0);
        }
        let mut end = KEEP;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}... ({} bytes)", &self.0[..end], self.0.len())
    }
}

/// A validated, `/`-separated path relative to the synced root. Orders by the bytes
/// of the string, so a directory sorts before everything below it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Parses `s`, refusing anything that could leave the root or touch dirsync's
    /// own files.
    pub fn parse(s: &str) -> Result<RelPath, PathError> {
        let owned = || s.to_string();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        // Length first: every later check is linear, and this bounds the work.
        if s.len() > MAX_PATH {
            return Err(PathError::TooLong(owned()));
        }
        if s.contains('\0') {
            return Err(PathError::Nul(owned()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(owned()));
        }
        for (i, c) in s.split('/').enumerate() {
            match c {
                "" => return Err(PathError::EmptyComponent(owned())),
                "." | ".." => return Err(PathError::DotComponent(owned())),
                _ if c.len() > MAX_NAME => return Err(PathError::NameTooLong(owned())),
                // Only the root's state directory is reserved: `docs/.dirsync` is
                // an ordinary user name.
                _ if i == 0 && c == STATE_DIR_NAME => return Err(PathError::StateDir(owned())),
                _ if c.starts_with(TEMP_PREFIX) => return Err(PathError::TempFile(owned())),
                _ => {}
            }
        }
        Ok(RelPath(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The names from the top down; never empty, no name is empty.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent directory; `None` for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        // A prefix ending at a separator of a valid path is itself valid.
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_string()))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, name)| name)
    }

    /// `self/name`, validated as a whole (so `name` may not be `..`, empty, a temp
    /// name, or push the path over its length limit).
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::parse(&format!("{}/{name}", self.0))
    }

    /// The path under `root`. Purely lexical: it stays below `root` as long as no
    /// ancestor on disk is a symlink.
    pub fn to_path(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    /// Every ancestor directory, from the top-level one down, excluding `self`.
    pub fn ancestors(&self) -> Vec<RelPath> {
        self.0
            .match_indices('/')
            .map(|(i, _)| RelPath(self.0[..i].to_string()))
            .collect()
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RelPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RelPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RelPath::parse(s)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RelPath::parse(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let long_name = "x".repeat(256);
        let long_path = "x/".repeat(2100);
        type Reason = fn(String) -> PathError;
        let cases: [(&str, Reason); 15] = [
            ("/etc/passwd", PathError::Absolute),
            ("/", PathError::Absolute),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("../x", PathError::DotComponent),
            ("a/../../x", PathError::DotComponent),
            ("a/./b", PathError::DotComponent),
            (".", PathError::DotComponent),
            ("nul\0", PathError::Nul),
            (&long_name, PathError::NameTooLong),
            (&long_path, PathError::TooLong),
            (".dirsync", PathError::StateDir),
            (".dirsync/index.db", PathError::StateDir),
            ("d/.dirsync-tmp-1-x", PathError::TempFile),
            (".dirsync-tmp-", PathError::TempFile),
        ];
        for (bad, reason) in cases {
            assert_eq!(RelPath::parse(bad), Err(reason(bad.to_string())), "{bad:?}");
        }
        assert_eq!(RelPath::parse(""), Err(PathError::Empty));
    }

    #[test]
    fn accepts_ordinary_and_lookalike_names() {
        let at_limit = format!("{}/{}", "d".repeat(255), "f".repeat(255));
        for good in [
            "a",
            "a/b c/ünï.txt",
            "d/.dirsync",
            ".dirsyncignore",
            ".dirsync-tmp",
            "..a",
            "a..b",
            "...",
            "back\\slash",
            "a/.hidden/x",
            &at_limit,
        ] {
            assert_eq!(p(good).as_str(), good);
        }
        let exactly_max = format!("{}xx", "x/".repeat(2047));
        assert_eq!(exactly_max.len(), MAX_PATH);
        assert!(RelPath::parse(&exactly_max).is_ok());
        assert!(matches!(
            RelPath::parse(&format!("{exactly_max}x")),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn messages_name_the_path_and_stay_short() {
        let e = RelPath::parse("a/../etc").unwrap_err();
        assert!(e.to_string().contains("\"a/../etc\""), "{e}");
        assert_eq!(e.path(), "a/../etc");
        let forged = RelPath::parse("/x\n[INFO] all good")
            .unwrap_err()
            .to_string();
        assert!(!forged.contains('\n'), "{forged}");
        let long = RelPath::parse(&"é".repeat(3000)).unwrap_err().to_string();
        assert!(long.len() < 300 && long.contains("6000 bytes"), "{long}");
    }

    #[test]
    fn parts() {
        let x = p("a/b/c.txt");
        assert_eq!(x.parent(), Some(p("a/b")));
        assert_eq!(x.file_name(), "c.txt");
        assert_eq!(x.components().collect::<Vec<_>>(), ["a", "b", "c.txt"]);
        assert_eq!(x.ancestors(), [p("a"), p("a/b")]);
        assert_eq!(p("top").parent(), None);
        assert_eq!(p("top").file_name(), "top");
        assert!(p("top").ancestors().is_empty());
        assert_eq!(x.join("d").unwrap(), p("a/b/c.txt/d"));
        assert!(matches!(x.join(".."), Err(PathError::DotComponent(_))));
        assert!(matches!(x.join(""), Err(PathError::EmptyComponent(_))));
        assert!(matches!(
            p(".x").join(".dirsync-tmp-9"),
            Err(PathError::TempFile(_))
        ));
        assert_eq!(x.to_path(Path::new("/r")), Path::new("/r/a/b/c.txt"));
        assert_eq!(x.to_string(), "a/b/c.txt");
        assert_eq!("a/b".parse::<RelPath>(), Ok(p("a/b")));
    }

    #[test]
    fn orders_by_bytes_with_parents_first() {
        let mut v = [p("b"), p("a/b"), p("a b"), p("a"), p("B"), p("a/a")];
        v.sort();
        let s: Vec<&str> = v.iter().map(RelPath::as_str).collect();
        assert_eq!(s, ["B", "a", "a b", "a/a", "a/b", "b"]);
    }

    #[test]
    fn serde_is_a_plain_string_validated_on_the_way_in() {
        let x = p("a/b");
        assert_eq!(serde_json::to_string(&x).unwrap(), "\"a/b\"");
        assert_eq!(serde_json::from_str::<RelPath>("\"a/b\"").unwrap(), x);
        for bad in [
            "\"../x\"",
            "\"/etc/passwd\"",
            "\".dirsync/index.db\"",
            "\"\"",
        ] {
            assert!(serde_json::from_str::<RelPath>(bad).is_err(), "{bad}");
        }
        let bytes = postcard::to_stdvec(&x).unwrap();
        assert_eq!(bytes, postcard::to_stdvec("a/b").unwrap());
        assert!(postcard::from_bytes::<RelPath>(&postcard::to_stdvec("a/..").unwrap()).is_err());
    }

    /// Paths built from the names most likely to break validation.
    fn tricky() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just(".dirsync".to_string()),
            Just(".dirsync-tmp-1".to_string()),
            Just("/".to_string()),
            Just("\0".to_string()),
            "[a./\\\\ é-]{1,6}",
        ];
        proptest::collection::vec(part, 1..6).prop_map(|v| v.join("/"))
    }

    proptest! {
        #[test]
        fn accepted_paths_stay_strictly_inside_the_root(s in prop_oneof!["[a./\\\\ é-]{0,24}", tricky()]) {
            if let Ok(rel) = RelPath::parse(&s) {
                let root = Path::new("/root/of/sync");
                let joined = rel.to_path(root);
                prop_assert!(joined.starts_with(root) && joined != root, "{joined:?}");
                let below: Vec<Component> = joined.strip_prefix(root).unwrap().components().collect();
                prop_assert!(below.iter().all(|c| matches!(c, Component::Normal(_))), "{joined:?}");
                prop_assert_eq!(below.len(), rel.components().count());
                prop_assert_eq!(RelPath::parse(rel.as_str()), Ok(rel.clone()));
                for a in rel.ancestors() {
                    let prefix = format!("{a}/");
                    prop_assert!(rel.as_str().starts_with(&prefix), "{} under {}", rel, a);
                    prop_assert_eq!(RelPath::parse(a.as_str()), Ok(a.clone()));
                }
            }
        }
    }
}
