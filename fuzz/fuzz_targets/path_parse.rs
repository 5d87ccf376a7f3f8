//! Arbitrary strings as peer paths: whatever `RelPath::parse` accepts must stay
//! strictly inside the root and never name dirsync's own files.
#![no_main]

use std::path::{Component, Path};

use dirsync::path::RelPath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = RelPath::parse(s) {
        let root = Path::new("/sync/root");
        let joined = p.to_path(root);
        assert!(joined.starts_with(root) && joined != root);
        assert!(joined.components().all(|c| matches!(c, Component::Normal(_) | Component::RootDir)));
        assert!(!p.as_str().starts_with(".dirsync/") && p.as_str() != ".dirsync");
    }
});
