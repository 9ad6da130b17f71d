//! The git side: the only module that imports `git2`. Every function is blocking and opens the
//! repository itself; callers run them in `spawn_blocking` and never hold a `Repository` across
//! `.await`.
//!
//! OWNER: source helper. Signatures are the contract.

use std::path::Path;

use crate::model::Revision;

/// Errors from git.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// A git2 operation failed.
    #[error("git: failed to {action}")]
    Git {
        /// What was attempted (with the redacted remote or path).
        action: String,
        /// Cause.
        #[source]
        source: git2::Error,
    },
    /// I/O around git (exporting a tree).
    #[error("git: failed to {action}")]
    Io {
        /// What was attempted.
        action: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A file's content at a commit, `None` if the path is absent (or not a file).
pub fn read_file(
    mirror: &Path,
    revision: &Revision,
    path: &str,
) -> Result<Option<Vec<u8>>, GitError> {
    let _ = (mirror, revision, path);
    todo!("source helper")
}

/// Whether `path` exists at the commit as a file, and if so whether it is executable.
pub fn file_mode(mirror: &Path, revision: &Revision, path: &str) -> Result<Option<bool>, GitError> {
    let _ = (mirror, revision, path);
    todo!("source helper")
}

/// The git tree (or blob) id of `path` at the commit (`""` = root), `None` if absent.
pub fn tree_id(mirror: &Path, revision: &Revision, path: &str) -> Result<Option<String>, GitError> {
    let _ = (mirror, revision, path);
    todo!("source helper")
}

/// Writes the commit's tree into `dest` (created; must not exist): files with their modes,
/// symlinks as symlinks. Never touches the mirror's own work tree (it has none).
pub fn export(mirror: &Path, revision: &Revision, dest: &Path) -> Result<(), GitError> {
    let _ = (mirror, revision, dest);
    todo!("source helper")
}
