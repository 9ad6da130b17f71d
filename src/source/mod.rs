//! Watching the tracked branch: a bare mirror in the data dir, fetched on a jittered poll, on
//! `notify` events from a local remote's refs, and on explicit triggers (webhooks, CLI). A burst
//! of triggers coalesces into one fetch; fetch errors retry with backoff and never stop kiln.
//!
//! ```text
//!  poll (jittered) ──┐
//!  notify (local) ───┼─▶ hint channel (capacity 1) ─▶ check: fetch (a no-op if unmoved),
//!  trigger(origin) ──┘                                 walk new commits ─▶ SourceEvent
//! ```
//!
//! The hint channel holds one hint: a check in progress plus any number of hints arriving
//! meanwhile cost at most one more check. Triggers are only hints; the poll always runs, so a
//! lost webhook or notify event delays a commit by at most one poll interval.
//!
//! Only a change of the tracked branch's ref (its loose ref file created, written, renamed
//! into place or removed, or `packed-refs` replaced) is a notify hint: opens and reads are not,
//! since kiln's own fetch opens those files. An idle daemon therefore fetches only on the poll,
//! which for a local remote is a slow safety net ([`default_poll`]).
//!
//! A failing remote is retried with exponential backoff (capped by the poll interval); notify
//! hints never cut the backoff short, and other triggers not sooner than a second after the
//! last attempt. The failure is logged as a warning when it starts or its error changes, then
//! every ten minutes while it lasts; the recovery is logged once.
//!
//! OWNER: source helper. Signatures are the contract.

pub mod git;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::Revision;
use crate::store::CommitRecord;

/// The poll interval when none is configured, for a network remote (`git://`, `http(s)://`,
/// `ssh://`, scp-like): the only way to notice a push without a webhook.
pub const NETWORK_POLL: Duration = Duration::from_secs(60);

/// The poll interval when none is configured, for a local remote (a path): its refs are
/// watched through inotify, which notices a push within milliseconds, so the poll is only a
/// safety net (for an event lost to a full inotify queue, or a remote mounted over NFS, where
/// inotify sees no changes made by other hosts: set `--poll` explicitly there).
pub const LOCAL_POLL: Duration = Duration::from_secs(5 * 60);

/// The default poll interval for `url`: [`LOCAL_POLL`] for a local path, else
/// [`NETWORK_POLL`].
pub fn default_poll(url: &str) -> Duration {
    if local_path(url).is_some() { LOCAL_POLL } else { NETWORK_POLL }
}

/// The repository path if `url` names a local repository (a path or a `file://` URL), `None`
/// for network remotes (`git://`, `http(s)://`, `ssh://`, `user@host:path`).
pub fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(path) = url.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    if url.contains("://") {
        return None;
    }
    let path = Path::new(url);
    if path.exists() {
        return Some(path.to_path_buf());
    }
    // scp-like syntax: a colon before any slash.
    let scp_like = url.split_once(':').is_some_and(|(host, _)| !host.contains('/'));
    if scp_like { None } else { Some(path.to_path_buf()) }
}

/// The path `url` names when it is a local path that holds no git repository (no such
/// directory, or one with neither `HEAD` nor `.git`): a typo there would otherwise be retried
/// forever as a fetch failure. `None` for a repository and for network remotes.
pub fn missing_local_repo(url: &str) -> Option<PathBuf> {
    let path = local_path(url)?;
    let is_repo = path.is_dir() && (path.join("HEAD").is_file() || path.join(".git").exists());
    (!is_repo).then_some(path)
}

/// How to watch.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Remote URL or local path.
    pub url: String,
    /// Branch name.
    pub branch: String,
    /// Where the bare mirror lives (`<data-dir>/mirror.git`).
    pub mirror: PathBuf,
    /// Poll interval (jittered ±10%).
    pub poll: Duration,
}

/// What the watcher tells the operator.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// New commits: every commit between the last tip and the new one, oldest first, with their
    /// kind (push, force push, branch created) set. The last one is the tip (`tip: true`).
    Commits(Vec<CommitRecord>),
    /// The branch disappeared from the remote; the record carries the last known tip.
    BranchDeleted(CommitRecord),
    /// A fetch failed (it is retried with backoff; sent for every failed attempt, and logged by
    /// the watcher itself, deduplicated).
    FetchFailed {
        /// The redacted error chain.
        message: String,
        /// Which trigger asked.
        trigger: String,
    },
}

/// A handle to the running watcher; cheap to clone.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    hints: mpsc::Sender<String>,
    config: std::sync::Arc<SourceConfig>,
    checks: Arc<AtomicU64>,
}

impl SourceHandle {
    /// Asks for a fetch soon. `origin` names the trigger (`webhook:gitlab`, `cli`, ...). Never
    /// blocks; hints arriving while a fetch is pending coalesce into it.
    pub fn trigger(&self, origin: &str) {
        let _ = self.hints.try_send(origin.to_owned());
    }

    /// The watched source.
    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// How many times the watcher has checked the remote so far (each check is one fetch, which
    /// downloads objects only when the branch moved). Exposed for metrics and tests.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// A handle with no watcher behind it: hints land in the returned receiver. For tests of
    /// code that triggers fetches (webhooks, CLI) without a repository.
    pub fn detached(config: SourceConfig) -> (SourceHandle, mpsc::Receiver<String>) {
        let (hints, rx) = mpsc::channel(16);
        let handle =
            SourceHandle { hints, config: Arc::new(config), checks: Arc::new(AtomicU64::new(0)) };
        (handle, rx)
    }
}

/// Starts the watcher. `last_tip` is the tip recorded in the store (what the operator last
/// acknowledged), so commits made while kiln was down are all reported. Events go to `events`;
/// the watcher stops when `shutdown` fires (or when `events` is closed).
///
/// Must be called inside a tokio runtime. The first check runs at once (trigger `startup`).
/// A branch missing on the remote is reported once per watcher (so once more after a restart).
pub fn spawn(
    config: SourceConfig,
    last_tip: Option<Revision>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> SourceHandle {
    spawn_with_metrics(config, last_tip, events, shutdown, None)
}

/// [`spawn`], counting every check in `metrics`: `fetch()` when it succeeds, `fetch_error()`
/// when it fails (so whoever handles [`SourceEvent::FetchFailed`] must not count it again).
pub fn spawn_with_metrics(
    config: SourceConfig,
    last_tip: Option<Revision>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
) -> SourceHandle {
    // Capacity 1 is the coalescing: one pending hint stands for any number of them.
    let (hints, rx) = mpsc::channel(1);
    let config = Arc::new(config);
    let checks = Arc::new(AtomicU64::new(0));
    let watcher = watch::Watcher::new(
        config.clone(),
        last_tip,
        (hints.clone(), rx),
        events,
        shutdown,
        checks.clone(),
        metrics,
    );
    tokio::spawn(watcher.run());
    SourceHandle { hints, config, checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_path_without_a_repository_is_missing() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let nowhere = tmp.path().join("nowhere");
        assert_eq!(missing_local_repo(&nowhere.to_string_lossy()), Some(nowhere.clone()));
        let url = format!("file://{}", nowhere.display());
        assert_eq!(missing_local_repo(&url), Some(nowhere));
        // A plain directory is no repository either.
        assert!(missing_local_repo(&tmp.path().to_string_lossy()).is_some());
        let bare = tmp.path().join("infra.git");
        std::fs::create_dir_all(&bare).expect("dir");
        std::fs::write(bare.join("HEAD"), "ref: refs/heads/main\n").expect("HEAD");
        assert_eq!(missing_local_repo(&bare.to_string_lossy()), None);
        let work = tmp.path().join("work");
        std::fs::create_dir_all(work.join(".git")).expect("dir");
        assert_eq!(missing_local_repo(&work.to_string_lossy()), None);
        assert_eq!(missing_local_repo("https://gitlab.example/x.git"), None);
        assert_eq!(missing_local_repo("git@gitlab.example:x.git"), None);
    }

    #[test]
    fn local_path_tells_paths_from_network_remotes() {
        assert_eq!(local_path("/srv/git/infra.git"), Some(PathBuf::from("/srv/git/infra.git")));
        assert_eq!(local_path("file:///srv/infra.git"), Some(PathBuf::from("/srv/infra.git")));
        assert_eq!(local_path("../infra"), Some(PathBuf::from("../infra")));
        assert_eq!(local_path("git://127.0.0.1:9418/r.git"), None);
        assert_eq!(local_path("https://gitlab.example/x.git"), None);
        assert_eq!(local_path("ssh://git@host/x.git"), None);
        assert_eq!(local_path("git@gitlab.example:group/x.git"), None);
    }

    #[test]
    fn a_local_remote_is_polled_slowly_by_default() {
        assert_eq!(default_poll("/srv/git/infra.git"), LOCAL_POLL);
        assert_eq!(default_poll("file:///srv/infra.git"), LOCAL_POLL);
        assert_eq!(default_poll("https://gitlab.example/x.git"), NETWORK_POLL);
        assert_eq!(default_poll("git@gitlab.example:group/x.git"), NETWORK_POLL);
    }
}
