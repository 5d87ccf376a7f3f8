//! `.dirsyncignore`: gitignore-syntax rules at the root of the synced tree, applied
//! to scanning, watching and listing. dirsync's own state directory and temporary
//! files are always ignored; `.dirsyncignore` itself syncs like any file.
//!
//! A line the gitignore parser rejects does not stop the node: the other lines
//! apply, and the rejected ones are reported by [`IgnoreRules::warnings`].

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::index::{STATE_DIR_NAME, TEMP_PREFIX};

/// The rules file's name, at the synced root.
pub const IGNORE_FILE: &str = ".dirsyncignore";

/// Errors loading the rules.
#[derive(Debug, thiserror::Error)]
pub enum IgnoreError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
}

/// The ignore rules of one synced tree.
#[derive(Debug, Default)]
pub struct IgnoreRules {
    rules: Option<Gitignore>,
    warnings: Vec<String>,
}

impl IgnoreRules {
    /// Only the built-in rules.
    pub fn none() -> IgnoreRules {
        IgnoreRules::default()
    }

    /// Reads `root/.dirsyncignore`; no file means no rules.
    pub fn load(root: &Path) -> Result<IgnoreRules, IgnoreError> {
        let file = root.join(IGNORE_FILE);
        if !file.is_file() {
            return Ok(IgnoreRules::none());
        }
        let mut builder = GitignoreBuilder::new(root);
        let mut warnings = Vec::new();
        if let Some(e) = builder.add(&file) {
            warnings.push(e.to_string());
        }
        let rules = builder.build().map_err(|e| IgnoreError::Load {
            path: file.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(IgnoreRules {
            rules: Some(rules),
            warnings,
        })
    }

    /// Lines of `.dirsyncignore` that could not be used.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether `rel` (relative, `/`-separated) is ignored, by itself or through a
    /// parent directory.
    pub fn is_ignored(&self, rel: &str, is_dir: bool) -> bool {
        if rel.is_empty() {
            return false;
        }
        if rel.split('/').next() == Some(STATE_DIR_NAME)
            || rel.split('/').any(|c| c.starts_with(TEMP_PREFIX))
        {
            return true;
        }
        // Only relative, root-less paths reach the matcher (it asserts on others).
        if rel.starts_with('/') {
            return false;
        }
        self.rules
            .as_ref()
            .is_some_and(|g| g.matched_path_or_any_parents(rel, is_dir).is_ignore())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignore_syntax_and_built_in_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(IGNORE_FILE),
            "*.log\n!keep.log\nbuild/\n/rooted\n# comment\nsub/**/cache\n",
        )
        .unwrap();
        let r = IgnoreRules::load(dir.path()).unwrap();
        assert!(r.warnings().is_empty());
        assert!(r.is_ignored("x.log", false));
        assert!(r.is_ignored("deep/er/x.log", false));
        assert!(!r.is_ignored("keep.log", false));
        assert!(r.is_ignored("build", true));
        assert!(
            r.is_ignored("build/out/a.o", false),
            "ignored through a parent"
        );
        assert!(r.is_ignored("rooted", false));
        assert!(!r.is_ignored("nested/rooted", false));
        assert!(r.is_ignored("sub/a/b/cache", true));
        assert!(!r.is_ignored("src/main.rs", false));
        assert!(!r.is_ignored(IGNORE_FILE, false));
        assert!(r.is_ignored(".dirsync/index.db", false));
        assert!(r.is_ignored("d/.dirsync-tmp-1-x", false));
        assert!(
            !r.is_ignored("d/.dirsync", true),
            "only the root's state dir"
        );
    }

    #[test]
    fn no_file_means_only_built_in_rules() {
        let dir = tempfile::tempdir().unwrap();
        let r = IgnoreRules::load(dir.path()).unwrap();
        assert!(!r.is_ignored("x.log", false));
        assert!(r.is_ignored(".dirsync", true));
    }
}
