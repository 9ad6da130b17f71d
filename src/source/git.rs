//! The git side: the only module that imports `git2`. Every function is blocking and opens the
//! repository itself; callers run them in `spawn_blocking` and never hold a `Repository` across
//! `.await`.
//!
//! Two groups of functions live here:
//! - readers of a commit in the mirror ([`read_file`], [`file_mode`], [`tree_id`], [`export`],
//!   [`commit_record`], [`commits_since`]), used by the planner, bake and the watcher;
//! - the mirror's upkeep ([`ensure_mirror`], [`fetch`]), used by the watcher.
//!
//! OWNER: source helper. Signatures are the contract.

use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use git2::{
    AutotagOption, Cred, CredentialType, ErrorClass as Git2Class, ErrorCode, FetchOptions,
    FetchPrune, ObjectType, Oid, RemoteCallbacks, Repository, Sort,
};

use crate::error::{Classify, ErrorClass, redact};
use crate::model::Revision;
use crate::store::{CommitKind, CommitRecord};

/// The name of the mirror's only remote.
pub const REMOTE: &str = "origin";

/// How long one fetch may keep transferring before it is abandoned (a first clone of a large
/// repository over a slow link is the longest legitimate case). A fetch that stops getting
/// data is the caller's watchdog's business (see [`fetch_observed`]): libgit2's socket
/// timeouts can only be set through an `unsafe` global, which this crate forbids.
const FETCH_DEADLINE: Duration = Duration::from_secs(60 * 60);

/// Git file modes (as stored in trees).
const MODE_EXECUTABLE: i32 = 0o100755;
const MODE_SYMLINK: i32 = 0o120000;
const MODE_SUBMODULE: i32 = 0o160000;

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

impl GitError {
    fn git(action: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
        let action = action.into();
        move |source| GitError::Git { action: redact(&action), source }
    }

    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> GitError {
        let action = action.into();
        move |source| GitError::Io { action, source }
    }
}

impl Classify for GitError {
    /// Network, transport and lock contention errors are worth retrying; a missing commit or
    /// a corrupt mirror is not.
    fn class(&self) -> ErrorClass {
        match self {
            GitError::Io { .. } => ErrorClass::Transient,
            GitError::Git { source, .. } => {
                let transient_class = matches!(
                    source.class(),
                    Git2Class::Net
                        | Git2Class::Ssh
                        | Git2Class::Http
                        | Git2Class::Ssl
                        | Git2Class::Os
                        | Git2Class::Callback
                );
                let transient_code = source.code() == ErrorCode::Locked;
                if transient_class || transient_code {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Stalled
                }
            }
        }
    }
}

fn open(mirror: &Path) -> Result<Repository, GitError> {
    Repository::open(mirror).map_err(GitError::git(format!("open {}", mirror.display())))
}

fn find_commit<'r>(
    repo: &'r Repository,
    revision: &Revision,
) -> Result<git2::Commit<'r>, GitError> {
    repo.revparse_single(revision.as_str())
        .and_then(|object| object.peel_to_commit())
        .map_err(GitError::git(format!("find commit {revision}")))
}

/// `./image/base/` → `image/base`; `""`, `.` and `/` → `""` (the root).
fn clean_path(path: &str) -> &str {
    let path = path.trim_start_matches("./").trim_matches('/');
    if path == "." { "" } else { path }
}

/// The tree entry at `path` in the commit, `None` if absent. The root has no entry.
fn entry_at<'r>(
    repo: &'r Repository,
    revision: &Revision,
    path: &str,
) -> Result<Option<git2::TreeEntry<'r>>, GitError> {
    let commit = find_commit(repo, revision)?;
    let tree = commit.tree().map_err(GitError::git(format!("read the tree of {revision}")))?;
    let path = clean_path(path);
    if path.is_empty() {
        return Ok(None);
    }
    match tree.get_path(Path::new(path)) {
        Ok(entry) => Ok(Some(entry)),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(GitError::git(format!("look up {path} at {revision}"))(e)),
    }
}

fn is_regular_file(entry: &git2::TreeEntry<'_>) -> bool {
    entry.kind() == Some(ObjectType::Blob) && entry.filemode() != MODE_SYMLINK
}

/// A file's content at a commit, `None` if the path is absent (or not a file). A symlink is
/// not a file here: its target is not followed, so a manifest cannot point outside the tree.
pub fn read_file(
    mirror: &Path,
    revision: &Revision,
    path: &str,
) -> Result<Option<Vec<u8>>, GitError> {
    let repo = open(mirror)?;
    let Some(entry) = entry_at(&repo, revision, path)? else { return Ok(None) };
    if !is_regular_file(&entry) {
        return Ok(None);
    }
    let blob =
        repo.find_blob(entry.id()).map_err(GitError::git(format!("read {path} at {revision}")))?;
    Ok(Some(blob.content().to_vec()))
}

/// What [`read_file_capped`] found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileAt {
    /// Nothing there (or a directory, or a submodule).
    Absent,
    /// A symbolic link (mode 120000); its target was not followed.
    Symlink,
    /// A file larger than the cap, with its size; its content was not read.
    TooLarge(u64),
    /// A regular file's content.
    Content(Vec<u8>),
}

/// [`read_file`] with a size cap checked from the object header before the content is read,
/// and symlinks reported rather than taken for absence.
pub fn read_file_capped(
    mirror: &Path,
    revision: &Revision,
    path: &str,
    max_bytes: u64,
) -> Result<FileAt, GitError> {
    CommitTree::open(mirror, revision)?.read_file_capped(path, max_bytes)
}

/// Whether `path`, or a directory on the way to it, is a symbolic link at the commit.
pub fn symlink_in_path(mirror: &Path, revision: &Revision, path: &str) -> Result<bool, GitError> {
    CommitTree::open(mirror, revision)?.symlink_in_path(path)
}

/// One commit's tree, opened once for many lookups (the planner reads hundreds of paths per
/// commit; opening the repository for each cost seconds). Blocking, like everything here: use
/// it inside one `spawn_blocking` and drop it there.
pub struct CommitTree {
    repo: Repository,
    tree: Oid,
    revision: Revision,
    /// The root tree's entries by name (`tree_id` is asked for every path of every fleet:
    /// parsing a root of a thousand entries for each would be quadratic).
    root: std::cell::OnceCell<std::collections::HashMap<String, Oid>>,
}

impl CommitTree {
    /// Opens the mirror and finds the commit's tree.
    pub fn open(mirror: &Path, revision: &Revision) -> Result<CommitTree, GitError> {
        let repo = open(mirror)?;
        let tree = find_commit(&repo, revision)?.tree_id();
        Ok(CommitTree { repo, tree, revision: revision.clone(), root: std::cell::OnceCell::new() })
    }

    fn root_index(&self) -> Result<&std::collections::HashMap<String, Oid>, GitError> {
        if let Some(index) = self.root.get() {
            return Ok(index);
        }
        let revision = &self.revision;
        let tree = self
            .repo
            .find_tree(self.tree)
            .map_err(GitError::git(format!("read the tree of {revision}")))?;
        let index = tree
            .iter()
            .filter_map(|entry| entry.name().map(|name| (name.to_owned(), entry.id())))
            .collect();
        Ok(self.root.get_or_init(|| index))
    }

    fn entry(&self, path: &str) -> Result<Option<git2::TreeEntry<'static>>, GitError> {
        let path = clean_path(path);
        if path.is_empty() {
            return Ok(None);
        }
        let revision = &self.revision;
        let tree = self
            .repo
            .find_tree(self.tree)
            .map_err(GitError::git(format!("read the tree of {revision}")))?;
        match tree.get_path(Path::new(path)) {
            Ok(entry) => Ok(Some(entry)),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(GitError::git(format!("look up {path} at {revision}"))(e)),
        }
    }

    /// As [`read_file_capped`].
    pub fn read_file_capped(&self, path: &str, max_bytes: u64) -> Result<FileAt, GitError> {
        let revision = &self.revision;
        let Some(entry) = self.entry(path)? else { return Ok(FileAt::Absent) };
        if entry.kind() != Some(ObjectType::Blob) {
            return Ok(FileAt::Absent);
        }
        if entry.filemode() == MODE_SYMLINK {
            return Ok(FileAt::Symlink);
        }
        let odb = self.repo.odb().map_err(GitError::git("open the object database"))?;
        let (size, _) = odb
            .read_header(entry.id())
            .map_err(GitError::git(format!("read the size of {path} at {revision}")))?;
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        if size > max_bytes {
            return Ok(FileAt::TooLarge(size));
        }
        let blob = self
            .repo
            .find_blob(entry.id())
            .map_err(GitError::git(format!("read {path} at {revision}")))?;
        Ok(FileAt::Content(blob.content().to_vec()))
    }

    /// As [`symlink_in_path`].
    pub fn symlink_in_path(&self, path: &str) -> Result<bool, GitError> {
        let mut prefix = String::new();
        for part in clean_path(path).split('/').filter(|p| !p.is_empty() && *p != ".") {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.entry(&prefix)? {
                Some(entry) if entry.filemode() == MODE_SYMLINK => return Ok(true),
                Some(_) => {}
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// As [`file_mode`].
    pub fn file_mode(&self, path: &str) -> Result<Option<bool>, GitError> {
        let Some(entry) = self.entry(path)? else { return Ok(None) };
        if !is_regular_file(&entry) {
            return Ok(None);
        }
        Ok(Some(entry.filemode() == MODE_EXECUTABLE))
    }

    /// As [`tree_id`].
    pub fn tree_id(&self, path: &str) -> Result<Option<String>, GitError> {
        let clean = clean_path(path);
        if clean.is_empty() {
            return Ok(Some(self.tree.to_string()));
        }
        // The first component from the root's index, the rest from its (small) subtree.
        let (first, rest) = clean.split_once('/').unwrap_or((clean, ""));
        let Some(&oid) = self.root_index()?.get(first) else { return Ok(None) };
        let rest = rest.trim_matches('/');
        if rest.is_empty() {
            return Ok(Some(oid.to_string()));
        }
        let Ok(subtree) = self.repo.find_tree(oid) else {
            // `first` is a file, so nothing lies below it.
            return Ok(None);
        };
        match subtree.get_path(Path::new(rest)) {
            Ok(entry) => Ok(Some(entry.id().to_string())),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(GitError::git(format!("look up {clean} at {}", self.revision))(e)),
        }
    }
}

/// More changed paths than this between two commits: [`changed_paths`] gives up (planning every
/// fleet is then cheaper than matching each against the list).
pub const MAX_CHANGED_PATHS: usize = 100_000;

/// The paths that differ between two commits' trees (added, removed, changed, or changed type,
/// on either side), sorted and deduplicated; identical subtrees are skipped by id, so the cost
/// follows the change, not the repository. `None` when `from` is not in the mirror (history
/// rewritten and collected) or more than [`MAX_CHANGED_PATHS`] paths changed.
pub fn changed_paths(
    mirror: &Path,
    from: &Revision,
    to: &Revision,
) -> Result<Option<Vec<String>>, GitError> {
    let repo = open(mirror)?;
    let Ok(old) = find_commit(&repo, from)
        .and_then(|c| c.tree().map_err(GitError::git(format!("read the tree of {from}"))))
    else {
        return Ok(None);
    };
    let new =
        find_commit(&repo, to)?.tree().map_err(GitError::git(format!("read the tree of {to}")))?;
    let mut options = git2::DiffOptions::new();
    options.skip_binary_check(true).include_typechange(true).ignore_submodules(false);
    let diff = repo
        .diff_tree_to_tree(Some(&old), Some(&new), Some(&mut options))
        .map_err(GitError::git(format!("compare {from} with {to}")))?;
    let mut paths = std::collections::BTreeSet::new();
    for delta in diff.deltas() {
        for file in [delta.old_file(), delta.new_file()] {
            if let Some(path) = file.path_bytes() {
                paths.insert(String::from_utf8_lossy(path).into_owned());
            }
        }
        if paths.len() > MAX_CHANGED_PATHS {
            return Ok(None);
        }
    }
    Ok(Some(paths.into_iter().collect()))
}

/// Whether `path` exists at the commit as a file, and if so whether it is executable.
pub fn file_mode(mirror: &Path, revision: &Revision, path: &str) -> Result<Option<bool>, GitError> {
    let repo = open(mirror)?;
    let Some(entry) = entry_at(&repo, revision, path)? else { return Ok(None) };
    if !is_regular_file(&entry) {
        return Ok(None);
    }
    Ok(Some(entry.filemode() == MODE_EXECUTABLE))
}

/// The git tree (or blob) id of `path` at the commit (`""` = root), `None` if absent.
pub fn tree_id(mirror: &Path, revision: &Revision, path: &str) -> Result<Option<String>, GitError> {
    let repo = open(mirror)?;
    if clean_path(path).is_empty() {
        let commit = find_commit(&repo, revision)?;
        return Ok(Some(commit.tree_id().to_string()));
    }
    Ok(entry_at(&repo, revision, path)?.map(|entry| entry.id().to_string()))
}

/// A tree entry name that is safe to create under the export directory. git itself refuses
/// the others, but a hand-crafted tree could carry them.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.eq_ignore_ascii_case(".git")
}

/// Writes the commit's tree into `dest` (created; must not exist): files with their modes,
/// symlinks as symlinks. Never touches the mirror's own work tree (it has none). Submodules
/// become empty directories (their content is not in this repository).
pub fn export(mirror: &Path, revision: &Revision, dest: &Path) -> Result<(), GitError> {
    export_dirs(mirror, revision, dest, &[String::new()])
}

/// [`export`] of some directories only (`""` is the whole tree), each at its own place under
/// `dest`: what the exec provider's scripts need, without writing a copy of a thousand fleets'
/// directories for every fleet. A directory absent at the commit (or not a directory) is left
/// out; one under another listed directory comes with it.
pub fn export_dirs(
    mirror: &Path,
    revision: &Revision,
    dest: &Path,
    dirs: &[String],
) -> Result<(), GitError> {
    let repo = open(mirror)?;
    let commit = find_commit(&repo, revision)?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(GitError::io(format!("create {}", parent.display())))?;
    }
    fs::create_dir(dest).map_err(GitError::io(format!("create {}", dest.display())))?;
    let mut dirs: Vec<&str> = dirs.iter().map(|d| clean_path(d)).collect();
    dirs.sort_unstable();
    dirs.dedup();
    let mut exported: Vec<&str> = Vec::new();
    for dir in dirs {
        if exported.iter().any(|done| done.is_empty() || dir.starts_with(&format!("{done}/"))) {
            continue;
        }
        let tree = if dir.is_empty() {
            commit.tree_id()
        } else {
            match entry_at(&repo, revision, dir)? {
                Some(entry) if entry.kind() == Some(ObjectType::Tree) => entry.id(),
                _ => continue,
            }
        };
        // The directory's own path, component by component (each a safe name).
        let mut target = dest.to_path_buf();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            if !safe_name(part) {
                return Err(GitError::Io {
                    action: format!("export {revision}: unsafe path {dir:?}"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                });
            }
            target.push(part);
            match fs::create_dir(&target) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(GitError::io(format!("create {}", target.display()))(e));
                }
                _ => {}
            }
        }
        export_tree(&repo, revision, tree, &target)?;
        exported.push(dir);
    }
    Ok(())
}

/// Writes the tree `root` into the existing, empty directory `dest`.
fn export_tree(
    repo: &Repository,
    revision: &Revision,
    root: Oid,
    dest: &Path,
) -> Result<(), GitError> {
    // An explicit stack instead of recursion: deep trees cannot overflow the blocking thread.
    let mut stack: Vec<(Oid, PathBuf)> = vec![(root, dest.to_path_buf())];
    while let Some((tree_oid, dir)) = stack.pop() {
        let tree = repo
            .find_tree(tree_oid)
            .map_err(GitError::git(format!("read tree {tree_oid} of {revision}")))?;
        for entry in tree.iter() {
            let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
            if !safe_name(&name) {
                return Err(GitError::Io {
                    action: format!("export {revision}: unsafe entry name {name:?}"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                });
            }
            let target = dir.join(&name);
            match (entry.kind(), entry.filemode()) {
                (Some(ObjectType::Tree), _) => {
                    fs::create_dir(&target)
                        .map_err(GitError::io(format!("create {}", target.display())))?;
                    stack.push((entry.id(), target));
                }
                (Some(ObjectType::Blob), MODE_SYMLINK) => {
                    let blob = repo
                        .find_blob(entry.id())
                        .map_err(GitError::git(format!("read symlink {name} of {revision}")))?;
                    let link = blob.content();
                    if link.is_empty() || link.contains(&0) {
                        return Err(GitError::Io {
                            action: format!("export symlink {}: bad target", target.display()),
                            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                        });
                    }
                    let link = std::ffi::OsStr::from_bytes(link);
                    std::os::unix::fs::symlink(link, &target)
                        .map_err(GitError::io(format!("create symlink {}", target.display())))?;
                }
                (Some(ObjectType::Blob), mode) => {
                    let blob = repo
                        .find_blob(entry.id())
                        .map_err(GitError::git(format!("read {name} of {revision}")))?;
                    let perm = if mode == MODE_EXECUTABLE { 0o755 } else { 0o644 };
                    write_file(&target, blob.content(), perm)?;
                }
                (Some(ObjectType::Commit), _) | (_, MODE_SUBMODULE) => {
                    fs::create_dir(&target)
                        .map_err(GitError::io(format!("create {}", target.display())))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn write_file(target: &Path, content: &[u8], perm: u32) -> Result<(), GitError> {
    let action = || format!("write {}", target.display());
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(perm)
        .open(target)
        .map_err(GitError::io(action()))?;
    file.write_all(content).map_err(GitError::io(action()))?;
    // The umask may have cleared bits of `mode`; the tree's mode is what the hook expects.
    fs::set_permissions(target, fs::Permissions::from_mode(perm)).map_err(GitError::io(action()))
}

fn record_of(commit: &git2::Commit<'_>, kind: CommitKind) -> CommitRecord {
    let author = commit.author();
    let author = match (author.name(), author.email()) {
        (Some(name), Some(email)) => format!("{name} <{email}>"),
        (Some(name), None) => name.to_owned(),
        (None, Some(email)) => format!("<{email}>"),
        (None, None) => String::new(),
    };
    let time = commit.committer().when();
    let committed_at = chrono::DateTime::from_timestamp(time.seconds(), 0).unwrap_or_default();
    CommitRecord {
        revision: Revision(commit.id().to_string()),
        parents: commit.parent_ids().map(|id| Revision(id.to_string())).collect(),
        summary: String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default()).into_owned(),
        author,
        committed_at,
        seen_at: crate::model::now(),
        kind,
        trigger: String::new(),
        tip: false,
    }
}

/// The record of one commit in the mirror, with `kind: Push`, an empty `trigger` and
/// `tip: false`; the caller sets those.
pub fn commit_record(mirror: &Path, revision: &Revision) -> Result<CommitRecord, GitError> {
    let repo = open(mirror)?;
    let commit = find_commit(&repo, revision)?;
    Ok(record_of(&commit, CommitKind::Push))
}

/// Whether the mirror holds this commit.
pub fn has_commit(mirror: &Path, revision: &Revision) -> Result<bool, GitError> {
    let repo = open(mirror)?;
    let Ok(oid) = Oid::from_str(revision.as_str()) else { return Ok(false) };
    Ok(repo.find_commit(oid).is_ok())
}

/// Whether `descendant` is `ancestor` or descends from it.
pub fn is_ancestor(
    mirror: &Path,
    ancestor: &Revision,
    descendant: &Revision,
) -> Result<bool, GitError> {
    let repo = open(mirror)?;
    let a = find_commit(&repo, ancestor)?.id();
    let d = find_commit(&repo, descendant)?.id();
    if a == d {
        return Ok(true);
    }
    repo.graph_descendant_of(d, a)
        .map_err(GitError::git(format!("compare {ancestor} and {descendant}")))
}

/// The mirror's copy of `branch` (what the last fetch brought), `None` if never fetched.
pub fn branch_tip(mirror: &Path, branch: &str) -> Result<Option<Revision>, GitError> {
    let repo = open(mirror)?;
    match repo.refname_to_id(&format!("refs/heads/{branch}")) {
        Ok(oid) => Ok(Some(Revision(oid.to_string()))),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(GitError::git(format!("read branch {branch}"))(e)),
    }
}

/// The commits that arrived with `tip` since `previous`, oldest first, with their kind set and
/// the last one marked `tip`:
/// - no `previous`: just the tip, `Initial` (the whole history is not news);
/// - `tip` descends from `previous`: every commit in between, `Push`;
/// - otherwise (history rewritten, or `previous` unknown to the mirror): the commits from the
///   merge base to the tip (just the tip if there is none), `ForcePush { previous }`.
///
/// `tip == previous` gives an empty list. `trigger` is copied into every record.
pub fn commits_since(
    mirror: &Path,
    previous: Option<&Revision>,
    tip: &Revision,
    trigger: &str,
) -> Result<Vec<CommitRecord>, GitError> {
    let repo = open(mirror)?;
    let tip_commit = find_commit(&repo, tip)?;
    let tip_oid = tip_commit.id();
    let previous_oid = previous
        .and_then(|p| Oid::from_str(p.as_str()).ok().filter(|o| repo.find_commit(*o).is_ok()));

    let (kind, hide) = match (previous, previous_oid) {
        (None, _) => (CommitKind::Initial, None),
        (Some(_), Some(old)) if old == tip_oid => return Ok(Vec::new()),
        (Some(_), Some(old))
            if repo
                .graph_descendant_of(tip_oid, old)
                .map_err(GitError::git(format!("compare {tip} with its predecessor")))? =>
        {
            (CommitKind::Push, Some(old))
        }
        (Some(previous), Some(old)) => {
            let base = match repo.merge_base(tip_oid, old) {
                Ok(base) => Some(base),
                Err(e) if e.code() == ErrorCode::NotFound => None,
                Err(e) => return Err(GitError::git(format!("find the merge base of {tip}"))(e)),
            };
            (CommitKind::ForcePush { previous: previous.clone() }, base)
        }
        (Some(previous), None) => (CommitKind::ForcePush { previous: previous.clone() }, None),
    };

    let mut records = Vec::new();
    if matches!(kind, CommitKind::Initial) || hide.is_none() {
        records.push(record_of(&tip_commit, kind));
    } else {
        let action = || format!("walk the history of {tip}");
        let mut walk = repo.revwalk().map_err(GitError::git(action()))?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME | Sort::REVERSE)
            .map_err(GitError::git(action()))?;
        walk.push(tip_oid).map_err(GitError::git(action()))?;
        if let Some(hide) = hide {
            walk.hide(hide).map_err(GitError::git(action()))?;
        }
        for oid in walk {
            let oid = oid.map_err(GitError::git(action()))?;
            let commit = repo.find_commit(oid).map_err(GitError::git(action()))?;
            records.push(record_of(&commit, kind.clone()));
        }
        if records.is_empty() {
            // The branch was reset to an ancestor of the previous tip: nothing new to walk, but
            // the tip itself is the news.
            records.push(record_of(&tip_commit, kind));
        }
    }
    for record in &mut records {
        record.trigger = trigger.to_owned();
    }
    if let Some(last) = records.last_mut() {
        last.tip = true;
    }
    Ok(records)
}

/// A commit as signature verification sees it: who wrote it, its signature (the `gpgsig`
/// header) with the bytes that signature covers, and which of the asked-about paths it changed.
#[derive(Debug, Clone)]
pub struct SignedCommit {
    /// The commit.
    pub revision: Revision,
    /// `Name <email>` of its author.
    pub author: String,
    /// Its first line.
    pub summary: String,
    /// `(signature, signed payload)`, `None` for an unsigned commit.
    pub signature: Option<(Vec<u8>, Vec<u8>)>,
    /// The asked-about paths whose content this commit introduced: different from every
    /// parent's (a merge that takes a file from one side changed nothing itself).
    pub changed: Vec<String>,
}

/// The commits to verify for `tip`, oldest first: every commit reachable from `tip` and not
/// from `base` (merges' second parents included; after a force push that is everything since
/// the merge base), or only `tip` when `base` is `None`. `base` must be in the mirror.
/// `paths` are the files whose changes matter ([`SignedCommit::changed`]).
pub fn signed_commits(
    mirror: &Path,
    tip: &Revision,
    base: Option<&Revision>,
    paths: &[String],
) -> Result<Vec<SignedCommit>, GitError> {
    let repo = open(mirror)?;
    let tip_oid = find_commit(&repo, tip)?.id();
    let mut oids = Vec::new();
    match base {
        None => oids.push(tip_oid),
        Some(base) => {
            let base_oid = find_commit(&repo, base)?.id();
            let action = || format!("walk the history of {tip} since {base}");
            let mut walk = repo.revwalk().map_err(GitError::git(action()))?;
            walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE).map_err(GitError::git(action()))?;
            walk.push(tip_oid).map_err(GitError::git(action()))?;
            walk.hide(base_oid).map_err(GitError::git(action()))?;
            for oid in walk {
                oids.push(oid.map_err(GitError::git(action()))?);
            }
        }
    }
    let path_id = |tree: &git2::Tree<'_>, path: &str| -> Option<Oid> {
        let path = clean_path(path);
        tree.get_path(Path::new(path)).ok().map(|entry| entry.id())
    };
    let mut commits = Vec::with_capacity(oids.len());
    for oid in oids {
        let action = || format!("read commit {oid}");
        let commit = repo.find_commit(oid).map_err(GitError::git(action()))?;
        let signature = match repo.extract_signature(&oid, None) {
            Ok((signature, payload)) => Some((signature.to_vec(), payload.to_vec())),
            Err(e) if e.code() == ErrorCode::NotFound => None,
            Err(e) => return Err(GitError::git(format!("read the signature of {oid}"))(e)),
        };
        let mut changed = Vec::new();
        if !paths.is_empty() {
            let tree = commit.tree().map_err(GitError::git(action()))?;
            let parents = commit
                .parents()
                .map(|parent| parent.tree())
                .collect::<Result<Vec<_>, _>>()
                .map_err(GitError::git(action()))?;
            for path in paths {
                let now = path_id(&tree, path);
                let introduced = if parents.is_empty() {
                    now.is_some()
                } else {
                    parents.iter().all(|parent| path_id(parent, path) != now)
                };
                if introduced {
                    changed.push(path.clone());
                }
            }
        }
        let record = record_of(&commit, CommitKind::Push);
        commits.push(SignedCommit {
            revision: record.revision,
            author: record.author,
            summary: record.summary,
            signature,
            changed,
        });
    }
    Ok(commits)
}

fn refspec(branch: &str) -> String {
    format!("+refs/heads/{branch}:{}", tracking_ref(branch))
}

/// Creates the bare mirror at `mirror` if absent (with remote `origin` fetching only
/// `branch`), or points an existing mirror's `origin` at `url`/`branch` if they changed.
pub fn ensure_mirror(mirror: &Path, url: &str, branch: &str) -> Result<(), GitError> {
    let shown = redact(url);
    let repo = match Repository::open_bare(mirror) {
        Ok(repo) => repo,
        Err(e) if e.code() == ErrorCode::NotFound => Repository::init_bare(mirror)
            .map_err(GitError::git(format!("create the mirror {}", mirror.display())))?,
        Err(e) => return Err(GitError::git(format!("open the mirror {}", mirror.display()))(e)),
    };
    let wanted = refspec(branch);
    let action = || format!("configure the remote {shown} in {}", mirror.display());
    match repo.find_remote(REMOTE) {
        Ok(remote) => {
            let refspecs = remote.fetch_refspecs().map_err(GitError::git(action()))?;
            let same_refspec = refspecs.len() == 1 && refspecs.get(0) == Some(wanted.as_str());
            if !same_refspec {
                drop(remote);
                repo.remote_delete(REMOTE).map_err(GitError::git(action()))?;
                repo.remote_with_fetch(REMOTE, url, &wanted).map_err(GitError::git(action()))?;
            } else if remote.url() != Some(url) {
                repo.remote_set_url(REMOTE, url).map_err(GitError::git(action()))?;
            }
        }
        Err(e) if e.code() == ErrorCode::NotFound => {
            repo.remote_with_fetch(REMOTE, url, &wanted).map_err(GitError::git(action()))?;
        }
        Err(e) => return Err(GitError::git(action())(e)),
    }
    // HEAD names the tracked branch so `git log` in the mirror shows it.
    repo.set_head(&format!("refs/heads/{branch}")).map_err(GitError::git(action()))?;
    protect(mirror)
}

/// Keeps the mirror private: its `config` holds the remote URL, credentials included, so it is
/// 0600 (libgit2 writes it 0644 less the umask, on every change), and the mirror directory is
/// 0700 so nothing else in it (packs, refs, a future `FETCH_HEAD`) is readable by other users.
fn protect(mirror: &Path) -> Result<(), GitError> {
    for (path, mode) in [(mirror.to_path_buf(), 0o700), (mirror.join("config"), 0o600)] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(GitError::io(format!("restrict the permissions of {}", path.display())))?;
    }
    Ok(())
}

/// A local remote (a path) that does not exist: libgit2 would call it an "unsupported URL
/// protocol", since only an existing path selects its local transport.
fn missing_local_remote(url: &str) -> Option<std::io::Error> {
    let path = super::local_path(url)?;
    if path.exists() {
        return None;
    }
    Some(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("the local repository {} does not exist", path.display()),
    ))
}

/// `user:password@` from a URL, for HTTP remotes that carry a token.
fn url_userinfo(url: &str) -> Option<(String, String)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, password) = userinfo.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Fetch callbacks: credentials (ssh-agent, then the default keys for SSH; URL userinfo, then
/// the git credential helper for HTTP), a transfer deadline, and `progress` ticked on every
/// sign of life from the remote (so a caller can tell a slow fetch from a stalled one).
fn callbacks(progress: &AtomicU64) -> RemoteCallbacks<'_> {
    let mut callbacks = RemoteCallbacks::new();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let keys: Vec<PathBuf> = home
        .map(|home| {
            ["id_ed25519", "id_ecdsa", "id_rsa"]
                .iter()
                .map(|name| home.join(".ssh").join(name))
                .filter(|path| path.exists())
                .collect()
        })
        .unwrap_or_default();
    // libgit2 calls back after every rejected credential; each kind is tried a bounded number
    // of times instead of looping forever.
    let (mut ssh_tries, mut password_tries, mut other_tries) = (0usize, 0usize, 0usize);
    callbacks.credentials(move |url, username_from_url, allowed| {
        let user = username_from_url.unwrap_or("git");
        if allowed.contains(CredentialType::SSH_KEY) {
            ssh_tries += 1;
            return match ssh_tries {
                1 => Cred::ssh_key_from_agent(user),
                n => match keys.get(n - 2) {
                    Some(key) => Cred::ssh_key(user, None, key, None),
                    None => Err(git2::Error::from_str(
                        "authentication failed: neither ssh-agent nor ~/.ssh/id_* was accepted",
                    )),
                },
            };
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            password_tries += 1;
            let from_url = url_userinfo(url);
            match (password_tries, from_url) {
                (1, Some((user, password))) => return Cred::userpass_plaintext(&user, &password),
                (1, None) | (2, Some(_)) => {
                    if let Ok(config) = git2::Config::open_default() {
                        return Cred::credential_helper(&config, url, username_from_url);
                    }
                }
                _ => {}
            }
            return Err(git2::Error::from_str(
                "authentication failed: no accepted username and password (URL or credential helper)",
            ));
        }
        other_tries += 1;
        if other_tries > 3 {
            return Err(git2::Error::from_str("authentication failed: no credential was accepted"));
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(user);
        }
        if allowed.contains(CredentialType::DEFAULT) {
            return Cred::default();
        }
        Err(git2::Error::from_str("authentication failed: no usable credential type"))
    });
    let deadline = Instant::now() + FETCH_DEADLINE;
    callbacks.transfer_progress(move |_| {
        progress.fetch_add(1, Ordering::Relaxed);
        Instant::now() < deadline
    });
    callbacks.sideband_progress(move |_| {
        progress.fetch_add(1, Ordering::Relaxed);
        true
    });
    callbacks
}

/// The mirror's remote-tracking ref for `branch` (what the remote had at the last fetch).
fn tracking_ref(branch: &str) -> String {
    format!("refs/remotes/{REMOTE}/{branch}")
}

/// Fetches `branch` from the remote and returns its tip there, `None` if the remote has no
/// such branch. Tags are not fetched.
///
/// The remote's ref lands in `refs/remotes/origin/<branch>` (pruned when the branch is gone),
/// and `refs/heads/<branch>` follows it while it exists, so the last known commits stay
/// reachable in the mirror after the branch is deleted. A fetch that finds the branch where it
/// was downloads nothing: the ref advertisement is the whole cost, like `git ls-remote`.
/// (`git2`'s ref listing is not used: it aborts the process on a remote with no refs at all.)
pub fn fetch(mirror: &Path, branch: &str) -> Result<Option<Revision>, GitError> {
    fetch_observed(mirror, branch, &AtomicU64::new(0))
}

/// [`fetch`], ticking `progress` whenever the remote shows signs of life (progress messages,
/// received objects), for a watchdog that abandons stalled fetches.
pub fn fetch_observed(
    mirror: &Path,
    branch: &str,
    progress: &AtomicU64,
) -> Result<Option<Revision>, GitError> {
    let repo = open(mirror)?;
    let mut remote = repo.find_remote(REMOTE).map_err(GitError::git("find the remote origin"))?;
    let shown = redact(remote.url().unwrap_or(REMOTE));
    if let Some(error) = remote.url().and_then(missing_local_remote) {
        return Err(GitError::Io { action: format!("fetch {branch} from {shown}"), source: error });
    }
    let tracking = tracking_ref(branch);
    // A first fetch from a local path: share the source's object files, as `git clone`
    // does for a local path (libgit2's local transport re-packs every object, minutes for a
    // large repository). Later fetches go through libgit2 and transfer only what is new.
    if repo.find_reference(&tracking).is_err() {
        let source = remote.url().and_then(super::local_path);
        if let Some(source) = source {
            if let Some(tip) = link_local(&repo, &source, branch)? {
                progress.fetch_add(1, Ordering::Relaxed);
                drop(remote);
                repo.reference(&tracking, tip, true, "kiln: first fetch from a local path")
                    .map_err(GitError::git(format!("update {tracking}")))?;
                repo.reference(&format!("refs/heads/{branch}"), tip, true, "kiln: fetch")
                    .map_err(GitError::git(format!("update the mirror's {branch}")))?;
                return Ok(Some(Revision(tip.to_string())));
            }
        }
    }
    let mut options = FetchOptions::new();
    options.remote_callbacks(callbacks(progress));
    options.download_tags(AutotagOption::None);
    options.update_fetchhead(false);
    options.prune(FetchPrune::On);
    let refspec = format!("+refs/heads/{branch}:{tracking}");
    remote
        .fetch(&[refspec], Some(&mut options), None)
        .map_err(GitError::git(format!("fetch {branch} from {shown}")))?;
    drop(remote);
    let tip = match repo.refname_to_id(&tracking) {
        Ok(oid) => oid,
        Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(GitError::git(format!("read {tracking}"))(e)),
    };
    repo.reference(&format!("refs/heads/{branch}"), tip, true, "kiln: fetch")
        .map_err(GitError::git(format!("update the mirror's {branch}")))?;
    Ok(Some(Revision(tip.to_string())))
}

/// The first fetch of `branch` from the repository at `source` (a local path) into `mirror`:
/// hard-links the source's object files (packs, loose objects; copies them when the two are on
/// different file systems) and its alternates into the mirror, as `git clone` does for a local
/// path. Objects are immutable and named by their content, so sharing the files is safe.
/// Returns the branch's tip, or `None` (nothing done, the caller fetches as usual) when the
/// source has no such branch or is not a plain repository; the tip must read back in the
/// mirror, else the caller's normal fetch runs.
fn link_local(mirror: &Repository, source: &Path, branch: &str) -> Result<Option<Oid>, GitError> {
    let Ok(origin) = Repository::open(source) else { return Ok(None) };
    let Ok(tip) = origin.refname_to_id(&format!("refs/heads/{branch}")) else { return Ok(None) };
    let from = origin.path().join("objects");
    let to = mirror.path().join("objects");
    if !from.is_dir() || origin.path().join("commondir").exists() {
        return Ok(None);
    }
    let action = || format!("link the objects of {} into {}", source.display(), to.display());
    link_tree(&from, &to, true).map_err(GitError::io(action()))?;
    // Objects the source borrows from elsewhere: borrow them too (absolute paths).
    if let Ok(text) = fs::read_to_string(from.join("info/alternates")) {
        let mut lines = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
            let path = Path::new(line.trim());
            let path = if path.is_absolute() { path.to_path_buf() } else { from.join(path) };
            lines.push(path.display().to_string());
        }
        if !lines.is_empty() {
            fs::create_dir_all(to.join("info")).map_err(GitError::io(action()))?;
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(to.join("info/alternates"))
                .map_err(GitError::io(action()))?;
            file.write_all((lines.join("\n") + "\n").as_bytes()).map_err(GitError::io(action()))?;
        }
    }
    drop(origin);
    // The new files are seen by a fresh look at the object directory.
    let odb = mirror.odb().map_err(GitError::git(action()))?;
    odb.refresh().map_err(GitError::git(action()))?;
    if mirror.find_commit(tip).is_err() {
        return Ok(None);
    }
    Ok(Some(tip))
}

/// Hard-links (or copies, across file systems) every file under `from` into `to`, keeping
/// files already there; `top` skips `info/` (alternates are rewritten by the caller).
fn link_tree(from: &Path, to: &Path, top: bool) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && name == "info" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            link_tree(&src, &dst, false)?;
        } else if kind.is_file() && !dst.exists() && fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Creates a new repository for `kiln quickstart`: a bare `bare` repository (the "remote" kiln
/// watches, HEAD → `main`) and a clone of it at `work` holding `files` (path, contents,
/// executable) in one commit pushed to `main`. The clone gets a local identity so the user can
/// commit at once.
pub fn create_demo_repo(
    bare: &Path,
    work: &Path,
    files: &[(String, Vec<u8>, bool)],
    message: &str,
) -> Result<Revision, GitError> {
    let remote = git2::Repository::init_opts(
        bare,
        git2::RepositoryInitOptions::new().bare(true).initial_head("main"),
    )
    .map_err(GitError::git(format!("create {}", bare.display())))?;
    drop(remote);
    let repo =
        git2::Repository::init_opts(work, git2::RepositoryInitOptions::new().initial_head("main"))
            .map_err(GitError::git(format!("create {}", work.display())))?;
    let mut config = repo.config().map_err(GitError::git("open the clone's config"))?;
    for (key, value) in [("user.name", "kiln demo"), ("user.email", "demo@kiln.invalid")] {
        config.set_str(key, value).map_err(GitError::git(format!("set {key}")))?;
    }
    for (path, contents, executable) in files {
        let dest = work.join(path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(GitError::io(format!("create {}", parent.display())))?;
        }
        fs::write(&dest, contents).map_err(GitError::io(format!("write {}", dest.display())))?;
        let mode = if *executable { 0o755 } else { 0o644 };
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
            .map_err(GitError::io(format!("chmod {}", dest.display())))?;
    }
    let mut index = repo.index().map_err(GitError::git("open the index"))?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .map_err(GitError::git("stage the demo files"))?;
    index.write().map_err(GitError::git("write the index"))?;
    let tree_id = index.write_tree().map_err(GitError::git("write the tree"))?;
    let tree = repo.find_tree(tree_id).map_err(GitError::git("read the tree"))?;
    let signature = repo.signature().map_err(GitError::git("make a signature"))?;
    let commit = repo
        .commit(Some("HEAD"), &signature, &signature, message, &tree, &[])
        .map_err(GitError::git("commit the demo"))?;
    let url = bare.to_string_lossy().into_owned();
    let mut origin = repo.remote("origin", &url).map_err(GitError::git("add the origin remote"))?;
    origin
        .push(&["refs/heads/main:refs/heads/main"], None)
        .map_err(GitError::git(format!("push to {url}")))?;
    let mut config = repo.config().map_err(GitError::git("open the clone's config"))?;
    for (key, value) in [("branch.main.remote", "origin"), ("branch.main.merge", "refs/heads/main")]
    {
        config.set_str(key, value).map_err(GitError::git(format!("set {key}")))?;
    }
    Ok(Revision(commit.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A non-bare repository built with git2, standing in for a mirror (the readers only need
    /// the object database) and for a local remote.
    struct Work {
        _dir: tempfile::TempDir,
        path: PathBuf,
        repo: Repository,
    }

    impl Work {
        fn new() -> Work {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("work");
            let repo = Repository::init(&path).expect("init");
            Work { _dir: dir, path, repo }
        }

        fn write(&self, path: &str, contents: &str, executable: bool) {
            let full = self.path.join(path);
            fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            fs::write(&full, contents).expect("write");
            let mode = if executable { 0o755 } else { 0o644 };
            fs::set_permissions(&full, fs::Permissions::from_mode(mode)).expect("chmod");
        }

        fn symlink(&self, path: &str, target: &str) {
            std::os::unix::fs::symlink(target, self.path.join(path)).expect("symlink");
        }

        /// Commits the whole work tree with these parents and points `main` at it (moving
        /// the branch anywhere, which also covers history rewrites).
        fn commit_with(&self, message: &str, parents: &[Oid]) -> Revision {
            let mut index = self.repo.index().expect("index");
            index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).expect("add");
            index.update_all(["*"], None).expect("update");
            index.write().expect("write index");
            let tree_id = index.write_tree().expect("tree");
            let tree = self.repo.find_tree(tree_id).expect("find tree");
            let sig = git2::Signature::now("Ada", "ada@example.com").expect("sig");
            let parents: Vec<git2::Commit<'_>> =
                parents.iter().map(|p| self.repo.find_commit(*p).expect("parent")).collect();
            let refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
            let oid = self.repo.commit(None, &sig, &sig, message, &tree, &refs).expect("commit");
            self.repo.reference("refs/heads/main", oid, true, "test").expect("ref");
            self.repo.set_head("refs/heads/main").expect("head");
            Revision(oid.to_string())
        }

        /// Commits on top of HEAD.
        fn commit(&self, message: &str) -> Revision {
            let head: Vec<Oid> =
                self.repo.head().ok().and_then(|h| h.target()).into_iter().collect();
            self.commit_with(message, &head)
        }
    }

    fn oid(revision: &Revision) -> Oid {
        Oid::from_str(revision.as_str()).expect("oid")
    }

    #[test]
    fn signed_commits_cover_merged_side_branches_and_the_files_each_commit_changed() {
        let work = Work::new();
        work.write("trust", "alice\n", false);
        let base = work.commit("deployed");
        work.write("a", "1", false);
        let main = work.commit("main work");
        // A side branch off the deployed commit that changes the trust file.
        work.write("trust", "alice\nmallory\n", false);
        fs::remove_file(work.path.join("a")).expect("rm");
        let side = work.commit_with("side", &[oid(&base)]);
        // The merge takes the side's trust file: it introduces nothing itself.
        work.write("a", "1", false);
        let merge = work.commit_with("merge", &[oid(&main), oid(&side)]);
        let paths = vec!["trust".to_owned()];
        let commits = signed_commits(&work.path, &merge, Some(&base), &paths).expect("walk");
        let ids: Vec<&Revision> = commits.iter().map(|c| &c.revision).collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert!(ids.contains(&&side) && ids.contains(&&main), "{ids:?}");
        assert_eq!(ids.last(), Some(&&merge), "the tip comes last");
        let changed =
            |r: &Revision| commits.iter().find(|c| &c.revision == r).expect("c").changed.clone();
        assert_eq!(changed(&side), ["trust"]);
        assert!(changed(&main).is_empty() && changed(&merge).is_empty());
        assert!(commits.iter().all(|c| c.signature.is_none()), "git2 commits are unsigned");
        assert_eq!(commits[0].author, "Ada <ada@example.com>");
        // Head mode: the tip alone.
        let tip = signed_commits(&work.path, &merge, None, &[]).expect("tip");
        assert_eq!(tip.len(), 1);
        assert_eq!(tip[0].revision, merge);
    }

    #[test]
    fn capped_reads_report_symlinks_and_sizes_without_reading() {
        let work = Work::new();
        work.write("kiln.yaml", "fleets: []\n", false);
        work.write("big.yaml", &"x".repeat(4096), false);
        work.write("real/hooks/bake", "#!/bin/sh\n", true);
        work.symlink("link.yaml", "/etc/passwd");
        work.symlink("hooks", "real/hooks");
        let rev = work.commit("first");
        let at = |path: &str, max| read_file_capped(&work.path, &rev, path, max).expect("read");
        assert_eq!(at("kiln.yaml", 100), FileAt::Content(b"fleets: []\n".to_vec()));
        assert_eq!(at("big.yaml", 4095), FileAt::TooLarge(4096));
        assert_eq!(at("big.yaml", 4096), FileAt::Content(vec![b'x'; 4096]));
        assert_eq!(at("link.yaml", 100), FileAt::Symlink);
        assert_eq!(at("missing.yaml", 100), FileAt::Absent);
        assert_eq!(at("real", 100), FileAt::Absent);

        let tree = CommitTree::open(&work.path, &rev).expect("open");
        assert!(tree.symlink_in_path("hooks/bake").expect("lookup"), "under a symlinked dir");
        assert!(tree.symlink_in_path("./link.yaml").expect("lookup"));
        assert!(!tree.symlink_in_path("real/hooks/bake").expect("lookup"));
        assert!(!tree.symlink_in_path("missing/x").expect("lookup"));
        assert_eq!(tree.file_mode("real/hooks/bake").expect("mode"), Some(true));
        assert_eq!(tree.file_mode("hooks/bake").expect("mode"), None);
        assert_eq!(
            tree.tree_id("real").expect("id"),
            tree_id(&work.path, &rev, "real").expect("id")
        );
    }

    #[test]
    fn read_file_returns_files_only() {
        let work = Work::new();
        work.write("kiln.yaml", "fleets: []\n", false);
        work.write("image/base/setup.sh", "#!/bin/sh\n", true);
        work.symlink("link.yaml", "kiln.yaml");
        let rev = work.commit("first");

        let got = read_file(&work.path, &rev, "kiln.yaml").expect("read");
        assert_eq!(got.as_deref(), Some(&b"fleets: []\n"[..]));
        let got = read_file(&work.path, &rev, "./image/base/setup.sh").expect("read nested");
        assert_eq!(got.as_deref(), Some(&b"#!/bin/sh\n"[..]));
        assert_eq!(read_file(&work.path, &rev, "missing.yaml").expect("absent"), None);
        assert_eq!(read_file(&work.path, &rev, "image").expect("dir"), None);
        assert_eq!(read_file(&work.path, &rev, "link.yaml").expect("symlink"), None);
        assert_eq!(read_file(&work.path, &rev, "").expect("root"), None);

        let bogus = Revision("0".repeat(40));
        let err = read_file(&work.path, &bogus, "kiln.yaml").expect_err("unknown commit");
        assert!(err.to_string().contains("find commit"), "{err}");
    }

    #[test]
    fn file_mode_reports_the_executable_bit() {
        let work = Work::new();
        work.write("hooks/bake", "#!/bin/sh\n", true);
        work.write("README", "hi\n", false);
        let rev = work.commit("first");
        assert_eq!(file_mode(&work.path, &rev, "hooks/bake").expect("exec"), Some(true));
        assert_eq!(file_mode(&work.path, &rev, "README").expect("plain"), Some(false));
        assert_eq!(file_mode(&work.path, &rev, "hooks").expect("dir"), None);
        assert_eq!(file_mode(&work.path, &rev, "nope").expect("absent"), None);
    }

    #[test]
    fn tree_id_changes_only_with_content() {
        let work = Work::new();
        work.write("image/base/a", "1", false);
        work.write("infra/main.tf", "x", false);
        let first = work.commit("first");
        work.write("infra/main.tf", "y", false);
        let second = work.commit("second");

        let image_1 = tree_id(&work.path, &first, "image/").expect("tree id");
        let image_2 = tree_id(&work.path, &second, "image").expect("tree id");
        assert!(image_1.is_some());
        assert_eq!(image_1, image_2, "image/ did not change");
        let infra_1 = tree_id(&work.path, &first, "infra").expect("tree id");
        let infra_2 = tree_id(&work.path, &second, "infra").expect("tree id");
        assert_ne!(infra_1, infra_2, "infra/ changed");
        let root_1 = tree_id(&work.path, &first, "").expect("root");
        let root_2 = tree_id(&work.path, &second, "/").expect("root");
        assert_ne!(root_1, root_2);
        assert!(tree_id(&work.path, &first, "image/base/a").expect("blob").is_some());
        assert_eq!(tree_id(&work.path, &first, "nope").expect("absent"), None);
    }

    #[test]
    fn export_writes_modes_and_symlinks() {
        let work = Work::new();
        work.write("hooks/bake", "#!/bin/sh\necho hi\n", true);
        work.write("image/base/conf", "plain\n", false);
        work.write("empty", "", false);
        work.symlink("current", "image/base");
        let rev = work.commit("first");

        let out = tempfile::tempdir().expect("temp dir");
        let dest = out.path().join("nested/tree");
        export(&work.path, &rev, &dest).expect("export");

        let bake = dest.join("hooks/bake");
        assert_eq!(fs::read_to_string(&bake).expect("bake"), "#!/bin/sh\necho hi\n");
        let mode = fs::metadata(&bake).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        let conf = dest.join("image/base/conf");
        let mode = fs::metadata(&conf).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read(dest.join("empty")).expect("empty"), b"");
        let link = fs::read_link(dest.join("current")).expect("symlink");
        assert_eq!(link, Path::new("image/base"));
        assert_eq!(fs::read_to_string(dest.join("current/conf")).expect("via link"), "plain\n");
        assert!(!dest.join(".git").exists());

        let err = export(&work.path, &rev, &dest).expect_err("dest exists");
        assert!(err.to_string().contains("create"), "{err}");
    }

    #[test]
    fn export_dirs_writes_only_the_directories_asked_for() {
        let work = Work::new();
        work.write("hooks/provider/x/list", "#!/bin/sh\n", true);
        work.write("hooks/provider/x/lib.py", "x = 1\n", false);
        work.write("hooks/provider/x/deep/more", "m\n", false);
        work.write("hooks/bake", "#!/bin/sh\n", true);
        work.write("fleets/a/v", "0\n", false);
        work.write("kiln.yaml", "fleets: []\n", false);
        let rev = work.commit("first");

        let out = tempfile::tempdir().expect("temp dir");
        let dest = out.path().join("copy");
        let dirs = ["hooks/provider/x", "./hooks/provider/x/deep", "absent", "kiln.yaml"];
        let dirs: Vec<String> = dirs.iter().map(|d| d.to_string()).collect();
        export_dirs(&work.path, &rev, &dest, &dirs).expect("export");
        let list = dest.join("hooks/provider/x/list");
        assert_eq!(fs::metadata(&list).expect("list").permissions().mode() & 0o777, 0o755);
        assert_eq!(
            fs::read_to_string(dest.join("hooks/provider/x/lib.py")).expect("lib"),
            "x = 1\n"
        );
        assert!(dest.join("hooks/provider/x/deep/more").is_file());
        // Nothing else: no sibling hook, no fleet directory, no file asked for as a directory.
        assert!(!dest.join("hooks/bake").exists());
        assert!(!dest.join("fleets").exists());
        assert!(!dest.join("kiln.yaml").exists());
        assert!(!dest.join("absent").exists());

        // The root is the whole tree.
        let whole = out.path().join("whole");
        export_dirs(&work.path, &rev, &whole, &[String::new()]).expect("export");
        assert!(whole.join("fleets/a/v").is_file() && whole.join("hooks/bake").is_file());
    }

    #[test]
    fn commits_since_classifies_pushes() {
        let work = Work::new();
        work.write("a", "1", false);
        let c1 = work.commit("one");
        work.write("a", "2", false);
        let c2 = work.commit("two");
        work.write("a", "3", false);
        let c3 = work.commit("three\n\nbody");

        let initial = commits_since(&work.path, None, &c3, "poll").expect("initial");
        assert_eq!(initial.len(), 1);
        assert_eq!(initial[0].revision, c3);
        assert_eq!(initial[0].kind, CommitKind::Initial);
        assert!(initial[0].tip);
        assert_eq!(initial[0].summary, "three");
        assert_eq!(initial[0].author, "Ada <ada@example.com>");
        assert_eq!(initial[0].parents, vec![c2.clone()]);
        assert_eq!(initial[0].trigger, "poll");

        let push = commits_since(&work.path, Some(&c1), &c3, "notify").expect("push");
        let revs: Vec<_> = push.iter().map(|r| r.revision.clone()).collect();
        assert_eq!(revs, vec![c2.clone(), c3.clone()], "oldest first, old tip excluded");
        assert!(push.iter().all(|r| r.kind == CommitKind::Push && r.trigger == "notify"));
        assert_eq!(push.iter().map(|r| r.tip).collect::<Vec<_>>(), vec![false, true]);

        assert!(commits_since(&work.path, Some(&c3), &c3, "poll").expect("same").is_empty());

        // Rewrite: two new commits on top of c1 replace c2 and c3.
        work.write("a", "2b", false);
        let d2 = work.commit_with("two-b", &[oid(&c1)]);
        work.write("a", "3b", false);
        let d3 = work.commit("three-b");
        let forced = commits_since(&work.path, Some(&c3), &d3, "webhook:gitlab").expect("force");
        let revs: Vec<_> = forced.iter().map(|r| r.revision.clone()).collect();
        assert_eq!(revs, vec![d2, d3.clone()], "from the merge base c1 to the new tip");
        let previous = CommitKind::ForcePush { previous: c3.clone() };
        assert!(forced.iter().all(|r| r.kind == previous));

        // A reset to an ancestor: just the tip, as a force push.
        let reset = commits_since(&work.path, Some(&c3), &c1, "poll").expect("reset");
        assert_eq!(reset.len(), 1);
        assert_eq!(reset[0].revision, c1);
        assert_eq!(reset[0].kind, CommitKind::ForcePush { previous: c3.clone() });

        // An unrelated history (no merge base): just the tip.
        work.write("a", "orphan", false);
        let orphan = work.commit_with("orphan", &[]);
        let forced = commits_since(&work.path, Some(&d3), &orphan, "poll").expect("orphan");
        assert_eq!(forced.len(), 1);
        assert_eq!(forced[0].revision, orphan);

        // A previous tip the mirror never saw: treated as a rewrite, just the tip.
        let unknown = Revision("1".repeat(40));
        let forced = commits_since(&work.path, Some(&unknown), &c2, "poll").expect("unknown");
        assert_eq!(forced.len(), 1);
        assert_eq!(forced[0].kind, CommitKind::ForcePush { previous: unknown });

        assert!(is_ancestor(&work.path, &c1, &c3).expect("ancestor"));
        assert!(!is_ancestor(&work.path, &c3, &c1).expect("not ancestor"));
        assert!(has_commit(&work.path, &c2).expect("has"));
        assert!(!has_commit(&work.path, &Revision("2".repeat(40))).expect("has not"));
    }

    #[test]
    fn mirror_fetches_the_tracked_branch() {
        let work = Work::new();
        work.write("kiln.yaml", "a", false);
        let c1 = work.commit("one");
        let data = tempfile::tempdir().expect("temp dir");
        let mirror = data.path().join("mirror.git");
        let url = work.path.to_str().expect("utf-8 path");

        ensure_mirror(&mirror, url, "main").expect("create mirror");
        ensure_mirror(&mirror, url, "main").expect("idempotent");
        assert_eq!(branch_tip(&mirror, "main").expect("tip"), None);
        assert_eq!(fetch(&mirror, "main").expect("fetch"), Some(c1.clone()));
        assert_eq!(read_file(&mirror, &c1, "kiln.yaml").expect("read").as_deref(), Some(&b"a"[..]));

        work.write("kiln.yaml", "b", false);
        let c2 = work.commit("two");
        assert_eq!(fetch(&mirror, "main").expect("fetch again"), Some(c2.clone()));
        assert_eq!(branch_tip(&mirror, "main").expect("tip"), Some(c2.clone()));

        // The branch disappears: reported as None, and the mirror keeps its copy of the last
        // tip.
        work.repo.set_head_detached(oid(&c2)).expect("detach");
        work.repo.find_reference("refs/heads/main").expect("ref").delete().expect("delete");
        assert_eq!(fetch(&mirror, "main").expect("fetch a missing branch"), None);
        assert_eq!(branch_tip(&mirror, "main").expect("tip"), Some(c2.clone()));
        assert!(has_commit(&mirror, &c2).expect("kept"));

        ensure_mirror(&mirror, "/nonexistent/repo", "main").expect("repoint");
        let err = fetch(&mirror, "main").expect_err("remote gone");
        let chain = crate::error::chain(&err);
        assert!(chain.contains("fetch main from /nonexistent/repo"), "{chain}");
        // Named as a missing path, not as libgit2's "unsupported URL protocol".
        assert!(chain.contains("the local repository /nonexistent/repo does not exist"), "{chain}");
        assert!(!chain.contains("unsupported URL protocol"), "{chain}");
        assert_eq!(err.class(), ErrorClass::Transient, "the path may come back");
    }

    #[test]
    fn a_first_fetch_from_a_local_path_shares_the_object_files() {
        use std::os::unix::fs::MetadataExt as _;
        let work = Work::new();
        work.write("kiln.yaml", "a", false);
        let c1 = work.commit("one");
        let data = tempfile::tempdir().expect("temp dir");
        let mirror = data.path().join("mirror.git");
        let url = work.path.to_str().expect("utf-8 path");
        ensure_mirror(&mirror, url, "main").expect("create mirror");
        assert_eq!(fetch(&mirror, "main").expect("first fetch"), Some(c1.clone()));
        // The commit's object file is the source's own (a hard link), not a re-packed copy.
        let (dir, file) = c1.0.split_at(2);
        let object = |root: &Path| root.join("objects").join(dir).join(file);
        let source = fs::metadata(object(&work.path.join(".git"))).expect("source object");
        let linked = fs::metadata(object(&mirror)).expect("the mirror has the object file");
        assert_eq!((linked.dev(), linked.ino()), (source.dev(), source.ino()));
        assert_eq!(branch_tip(&mirror, "main").expect("tip"), Some(c1.clone()));
        assert_eq!(read_file(&mirror, &c1, "kiln.yaml").expect("read").as_deref(), Some(&b"a"[..]));
        // Later fetches are ordinary incremental ones.
        work.write("kiln.yaml", "b", false);
        let c2 = work.commit("two");
        assert_eq!(fetch(&mirror, "main").expect("second fetch"), Some(c2.clone()));
        assert_eq!(read_file(&mirror, &c2, "kiln.yaml").expect("read").as_deref(), Some(&b"b"[..]));
        assert_eq!(commits_since(&mirror, Some(&c1), &c2, "poll").expect("walk").len(), 1);
    }

    #[test]
    fn the_mirror_keeps_the_remote_url_private() {
        let work = Work::new();
        work.write("kiln.yaml", "a", false);
        let c1 = work.commit("one");
        let data = tempfile::tempdir().expect("temp dir");
        let mirror = data.path().join("mirror.git");
        let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        let url = work.path.to_str().expect("utf-8 path");

        ensure_mirror(&mirror, url, "main").expect("create mirror");
        assert_eq!(mode(&mirror.join("config")), 0o600, "config after creation");
        assert_eq!(mode(&mirror), 0o700, "the mirror directory");
        assert_eq!(fetch(&mirror, "main").expect("fetch"), Some(c1));
        assert_eq!(mode(&mirror.join("config")), 0o600, "config after a fetch");

        // A mirror made by an older kiln (0644) is fixed the next time it is opened, and a
        // change of remote (libgit2 rewrites the config) keeps it private.
        fs::set_permissions(mirror.join("config"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        fs::set_permissions(&mirror, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_mirror(&mirror, "https://u:pa'ss@example.invalid/r.git", "main").expect("repoint");
        assert_eq!(mode(&mirror.join("config")), 0o600, "config after a change of remote");
        assert_eq!(mode(&mirror), 0o700);
        // FETCH_HEAD (which would repeat the URL) is left empty (libgit2 creates it anyway).
        let fetch_head = fs::read_to_string(mirror.join("FETCH_HEAD")).unwrap_or_default();
        assert!(!fetch_head.contains(url), "FETCH_HEAD names the remote: {fetch_head}");
    }
}
