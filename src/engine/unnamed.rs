//! Unnamed temp files (`O_TMPFILE`) for files new at their path.
//!
//! A received file whose path holds nothing indexed is written, with no name at
//! all, in its directory, flushed, and then linked to its name in one call that
//! refuses to replace anything (`linkat`, which fails if the name exists). Nothing
//! (the scanner, the watcher, a user) can see a half-written file, a crash leaves
//! nothing to clean up (the kernel frees an unnamed file when its descriptor
//! closes), and it is cheaper than a named temp file renamed into place: no temp
//! name is created and removed (on tmpfs, 20 µs instead of 26 µs a file).
//!
//! A file replacing an indexed one still goes through a named temp file: the swap
//! that keeps a racing local write (`RENAME_EXCHANGE`) needs a name on both sides.
//!
//! An unnamed file lives only as long as its descriptor, so those waiting for the
//! batch's flush hold one each: at most [`cap`] at once (a quarter of the
//! descriptor limit), beyond which [`create`] says `None` and the caller uses a
//! named temp file. It says `None` too where the file system or the kernel lacks
//! `O_TMPFILE`, or where neither way of linking works (see [`Unnamed::link`]).
//!
//! The kernel names an unnamed file `#<inode>` in the events it queues for its
//! directory's watch (its write, its mode and times set, its close): the watcher
//! drops those (see `watch::is_unnamed`), so that no scan looks up, in the index
//! and on disk, a name that never exists.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

/// Unnamed files alive now.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Set once `O_TMPFILE` or linking it proved unavailable: named temps from then on.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// Set once `linkat(AT_EMPTY_PATH)` was refused (before Linux 6.10 it needs
/// `CAP_DAC_READ_SEARCH`): linked through `/proc/self/fd` from then on.
static THROUGH_PROC: AtomicBool = AtomicBool::new(false);

/// How many unnamed files may wait at once: a quarter of the soft descriptor
/// limit, at most 4096.
fn cap() -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        limit.current.map_or(4096, |n| (n / 4).min(4096) as usize)
    })
}

/// An unnamed file being written, in the directory it will be linked into, with
/// the open root it was made below (and is linked below).
pub(super) struct Unnamed {
    file: File,
    root: Arc<OwnedFd>,
}

impl Drop for Unnamed {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Creates an unnamed file (write-only, with `mode` as far as the umask lets) in
/// `parent`, a directory below the open root `root` reached through no link.
/// `None` if that cannot be done: the caller then uses a named temp file (which
/// also creates missing parents and says precisely what is in the way).
pub(super) fn create(root: &Arc<OwnedFd>, parent: &Path, mode: u32) -> Option<Unnamed> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    if LIVE.fetch_add(1, Ordering::Relaxed) >= cap() {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let dir = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let flags = OFlags::TMPFILE | OFlags::WRONLY;
    match crate::index::open_beneath(root, dir, flags, Mode::from_raw_mode(mode)) {
        Ok(file) => Some(Unnamed {
            file,
            root: root.clone(),
        }),
        Err(e) => {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            // Not supported here (an old kernel opens the directory itself, and
            // refuses to write it), as opposed to this path's own trouble.
            if matches!(
                e,
                Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS
            ) {
                UNAVAILABLE.store(true, Ordering::Relaxed);
            }
            None
        }
    }
}

impl Unnamed {
    pub(super) fn file(&self) -> &File {
        &self.file
    }

    pub(super) fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// Links the file at `rel` below the open root it was made below; `AlreadyExists` if
    /// something is there (which is kept). Through the descriptor itself
    /// (`AT_EMPTY_PATH`) or, where the kernel refuses that, through
    /// `/proc/self/fd`; if neither works while the parent directory exists, no
    /// further unnamed files are made.
    pub(super) fn link(&self, rel: &str) -> std::io::Result<()> {
        let root = &*self.root;
        if !THROUGH_PROC.load(Ordering::Relaxed) {
            match rustix::fs::linkat(self.file.as_fd(), "", root, rel, AtFlags::EMPTY_PATH) {
                Err(Errno::NOENT) => {}
                linked => return linked.map_err(Into::into),
            }
        }
        let proc = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        match rustix::fs::linkat(CWD, proc.as_str(), root, rel, AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => {
                THROUGH_PROC.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(Errno::NOENT) => {
                let parent = Path::new(rel)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty());
                let parent_there = parent
                    .is_none_or(|p| rustix::fs::statat(root, p, AtFlags::SYMLINK_NOFOLLOW).is_ok());
                if parent_there {
                    UNAVAILABLE.store(true, Ordering::Relaxed);
                }
                Err(Errno::NOENT.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::watch::tests::until;
    use std::io::Write as _;

    /// `path` open as a root directory.
    pub(in crate::engine) fn open_root(path: &Path) -> Arc<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Arc::new(rustix::fs::open(path, flags, Mode::empty()).unwrap())
    }

    /// The watcher hears of an unnamed file's write, mode and close under
    /// `#<inode>`, a name no directory holds: it reports none of them, only the
    /// name the file is linked at; a real file spelled like that is reported,
    /// written and deleted.
    #[tokio::test]
    async fn the_watcher_reports_no_unnamed_file_under_its_placeholder_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().canonicalize().unwrap();
        let deferred = Arc::new(crate::watch::Deferred::default());
        let config = crate::watch::WatchConfig::default();
        let (_watcher, mut batches) =
            crate::watch::Watcher::start(&path, config, deferred).unwrap();
        let root = open_root(&path);
        let Some(mut u) = create(&root, Path::new(""), 0o644) else {
            eprintln!("skipped: no O_TMPFILE on {}", path.display());
            return;
        };
        let ino = rustix::fs::fstat(u.file()).unwrap().st_ino;
        u.file_mut().write_all(b"theirs").unwrap();
        u.file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        u.link("named.txt").unwrap();
        drop(u);
        std::fs::write(path.join("marker"), b"after the close").unwrap();
        // A name linked is reported once it settles (no close comes under it).
        let (heard, _) = until(&mut batches, |s| {
            s.contains("marker") && s.contains("named.txt")
        })
        .await;
        assert!(
            heard.iter().all(|p| !p.starts_with('#')),
            "a placeholder reached the engine: {heard:?}"
        );
        // A real file with the kernel's spelling: its write and its deletion.
        let real = format!("#{ino}");
        std::fs::write(path.join(&real), b"mine").unwrap();
        until(&mut batches, |s| s.contains(&real)).await;
        std::fs::remove_file(path.join(&real)).unwrap();
        until(&mut batches, |s| s.contains(&real)).await;
    }

    /// Written with no name, linked to its name: nothing else ever appears in the
    /// directory; a name already taken is kept and the link refused; a file never
    /// linked leaves nothing behind.
    #[test]
    fn an_unnamed_file_appears_only_at_its_name_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let root = open_root(dir.path());
        let Some(mut u) = create(&root, Path::new("sub"), 0o644) else {
            eprintln!("skipped: no O_TMPFILE on {}", dir.path().display());
            return;
        };
        u.file_mut().write_all(b"theirs").unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            0
        );
        u.link("sub/new.txt").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("sub/new.txt")).unwrap(),
            b"theirs"
        );

        std::fs::write(dir.path().join("taken.txt"), b"made here").unwrap();
        let mut u = create(&root, Path::new(""), 0o644).unwrap();
        u.file_mut().write_all(b"theirs").unwrap();
        let e = u.link("taken.txt").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::read(dir.path().join("taken.txt")).unwrap(),
            b"made here"
        );
        drop(u);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["sub", "taken.txt"]);
    }

    /// A path through a link is refused at creation: the caller's named temp
    /// then says what is in the way.
    #[test]
    fn an_unnamed_file_is_never_made_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let root = open_root(dir.path());
        assert!(create(&root, Path::new("link"), 0o644).is_none());
    }
}
