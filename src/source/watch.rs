//! The watcher task behind [`super::spawn`]: waits for a hint or the poll, checks the remote in
//! a blocking task, turns what moved into [`SourceEvent`]s, and backs off on failures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::git::{self, GitError};
use super::{SourceConfig, SourceEvent};
use crate::metrics::Metrics;
use crate::model::Revision;
use crate::retry::{RetryPolicy, nth_delay};
use crate::store::{CommitKind, CommitRecord};

/// A check during which the remote shows no sign of life for this long is abandoned (its
/// blocking thread ends on its own later) and reported as a failure, so a remote that accepts
/// connections but never answers cannot wedge the watcher. Servers send progress messages
/// while they prepare a pack, so a slow but healthy fetch keeps ticking.
const STALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Backoff between failed checks; capped by the poll interval as well (see `next_wait`).
const BACKOFF: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(500),
    max_interval: Duration::from_secs(5 * 60),
    max_elapsed: None,
};

/// What one check needs, moved into the blocking task.
struct Check {
    mirror: PathBuf,
    url: String,
    branch: String,
    /// The last reported tip.
    last: Option<Revision>,
    /// The branch was reported deleted.
    deleted: bool,
    /// The mirror exists and its remote is configured (skip `ensure_mirror`).
    mirror_ready: bool,
    trigger: String,
}

/// What one check found.
enum Outcome {
    /// The branch is where it was.
    Unchanged,
    /// The remote has no such branch.
    Missing {
        /// The record of the last known tip, if the mirror still has the commit.
        last: Option<CommitRecord>,
    },
    /// The branch moved: the new commits, oldest first, tip last.
    Moved(Vec<CommitRecord>),
}

pub(super) struct Watcher {
    config: Arc<SourceConfig>,
    /// The tip last reported (or acknowledged by the store at startup).
    last_tip: Option<Revision>,
    /// Whether the branch was reported deleted (so it is reported once, and its return is a
    /// `BranchCreated`).
    deleted: bool,
    /// The mirror has been created and its remote configured.
    mirror_ready: bool,
    /// Consecutive failed checks (drives the backoff).
    failures: u32,
    hints_tx: mpsc::Sender<String>,
    hints: mpsc::Receiver<String>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    checks: Arc<AtomicU64>,
    metrics: Option<Arc<Metrics>>,
}

impl Watcher {
    pub(super) fn new(
        config: Arc<SourceConfig>,
        last_tip: Option<Revision>,
        (hints_tx, hints): (mpsc::Sender<String>, mpsc::Receiver<String>),
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
        checks: Arc<AtomicU64>,
        metrics: Option<Arc<Metrics>>,
    ) -> Watcher {
        Watcher {
            config,
            last_tip,
            deleted: false,
            mirror_ready: false,
            failures: 0,
            hints_tx,
            hints,
            events,
            shutdown,
            checks,
            metrics,
        }
    }

    pub(super) async fn run(mut self) {
        let url = remote_url(&self.config.url);
        // Kept alive for the task's lifetime; dropping it stops the notify thread.
        let _notify = match local_repo(&url) {
            Some(path) => match watch_refs(&path, self.hints_tx.clone()) {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(
                        path = %path.display(), %error,
                        "Cannot watch the local remote's refs; relying on the poll."
                    );
                    None
                }
            },
            None => None,
        };
        let mut trigger = "startup".to_owned();
        loop {
            // Hints queued before this check starts are answered by it.
            while self.hints.try_recv().is_ok() {}
            let wait = match self.check(&url, &trigger).await {
                Ok(true) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.fetch();
                    }
                    self.failures = 0;
                    self.jittered_poll()
                }
                Ok(false) => return,
                Err(message) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.fetch_error();
                    }
                    tracing::warn!(trigger = %trigger, error = %message, "Fetch failed; retrying.");
                    let event = SourceEvent::FetchFailed { message, trigger: trigger.clone() };
                    if !self.send(event).await {
                        return;
                    }
                    let backoff = nth_delay(&BACKOFF, self.failures);
                    self.failures = self.failures.saturating_add(1);
                    backoff.min(self.jittered_poll())
                }
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = self.events.closed() => return,
                hint = self.hints.recv() => trigger = hint.unwrap_or_else(|| "poll".to_owned()),
                () = tokio::time::sleep(wait) => trigger = "poll".to_owned(),
            }
        }
    }

    fn jittered_poll(&self) -> Duration {
        self.config.poll.mul_f64(0.9 + fastrand::f64() * 0.2)
    }

    /// Sends an event; false if the watcher should stop (shutdown, or nobody listens).
    async fn send(&self, event: SourceEvent) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            res = self.events.send(event) => res.is_ok(),
        }
    }

    /// One check of the remote. `Ok(false)`: stop the watcher. `Err`: the redacted failure.
    async fn check(&mut self, url: &str, trigger: &str) -> Result<bool, String> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let check = Check {
            mirror: self.config.mirror.clone(),
            url: url.to_owned(),
            branch: self.config.branch.clone(),
            last: self.last_tip.clone(),
            deleted: self.deleted,
            mirror_ready: self.mirror_ready,
            trigger: trigger.to_owned(),
        };
        let progress = Arc::new(AtomicU64::new(0));
        let ticks = progress.clone();
        let job = tokio::task::spawn_blocking(move || check_blocking(&check, &ticks));
        let res = tokio::select! {
            () = self.shutdown.cancelled() => return Ok(false),
            res = job => res,
            () = stalled(&progress, STALL_TIMEOUT) => {
                return Err(format!("git: the remote stopped answering for {STALL_TIMEOUT:?}"));
            }
        };
        let outcome = match res {
            Err(join) => return Err(format!("git: check of the remote crashed: {join}")),
            Ok(Err(error)) => return Err(crate::error::chain(&error)),
            Ok(Ok(outcome)) => outcome,
        };
        self.mirror_ready = true;
        match outcome {
            Outcome::Unchanged => Ok(true),
            Outcome::Missing { last } => {
                let Some(last_tip) = self.last_tip.clone() else { return Ok(true) };
                if self.deleted {
                    return Ok(true);
                }
                let mut record = last.unwrap_or_else(|| bare_record(last_tip));
                record.kind = CommitKind::BranchDeleted;
                record.trigger = trigger.to_owned();
                record.tip = false;
                tracing::warn!(revision = %record.revision, "The tracked branch was deleted.");
                if !self.send(SourceEvent::BranchDeleted(record)).await {
                    return Ok(false);
                }
                self.deleted = true;
                Ok(true)
            }
            Outcome::Moved(records) => {
                let Some(tip) = records.last().map(|r| r.revision.clone()) else { return Ok(true) };
                tracing::info!(
                    revision = %tip, n_commits = records.len(), trigger,
                    "New commits on the tracked branch."
                );
                if !self.send(SourceEvent::Commits(records)).await {
                    return Ok(false);
                }
                self.last_tip = Some(tip);
                self.deleted = false;
                Ok(true)
            }
        }
    }
}

/// The blocking half of a check: make sure the mirror exists, fetch the branch (which
/// downloads nothing when it did not move), and walk the new commits.
fn check_blocking(check: &Check, progress: &AtomicU64) -> Result<Outcome, GitError> {
    let Check { mirror, url, branch, last, deleted, mirror_ready, trigger } = check;
    let (mirror, last, deleted) = (mirror.as_path(), last.as_ref(), *deleted);
    if !*mirror_ready {
        git::ensure_mirror(mirror, url, branch)?;
    }
    let Some(tip) = git::fetch_observed(mirror, branch, progress)? else {
        let last = match last {
            Some(last) => git::commit_record(mirror, last).ok(),
            None => None,
        };
        return Ok(Outcome::Missing { last });
    };
    if last == Some(&tip) && !deleted {
        return Ok(Outcome::Unchanged);
    }
    let mut records = git::commits_since(mirror, last, &tip, trigger)?;
    if deleted {
        if records.is_empty() {
            // Recreated at the very commit it had: still news (the branch is back).
            let mut record = git::commit_record(mirror, &tip)?;
            record.trigger = trigger.to_owned();
            record.tip = true;
            records.push(record);
        }
        for record in &mut records {
            record.kind = CommitKind::BranchCreated;
        }
    }
    Ok(Outcome::Moved(records))
}

/// Resolves once `progress` has not moved for `limit`.
async fn stalled(progress: &AtomicU64, limit: Duration) {
    let step = (limit / 10).max(Duration::from_millis(10));
    let mut seen = progress.load(Ordering::Relaxed);
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

/// A record for a commit the mirror does not have (only its id is known).
fn bare_record(revision: Revision) -> CommitRecord {
    let now = crate::model::now();
    CommitRecord {
        revision,
        parents: Vec::new(),
        summary: String::new(),
        author: String::new(),
        committed_at: now,
        seen_at: now,
        kind: CommitKind::BranchDeleted,
        trigger: String::new(),
        tip: false,
    }
}

/// The URL handed to git: local paths are made absolute (the mirror's config outlives the
/// current directory), everything else is left alone.
fn remote_url(url: &str) -> String {
    match local_repo(url) {
        Some(path) if !url.starts_with("file://") => std::path::absolute(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| url.to_owned()),
        _ => url.to_owned(),
    }
}

/// The repository path if `url` names a local repository (a path or a `file://` URL), `None`
/// for network remotes (`git://`, `http(s)://`, `ssh://`, `user@host:path`).
fn local_repo(url: &str) -> Option<PathBuf> {
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

/// Watches a local repository's branch refs (loose refs and `packed-refs`) and sends a
/// `notify` hint on every change, so a push is noticed within milliseconds.
fn watch_refs(
    repo: &Path,
    hints: mpsc::Sender<String>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher as _;

    let git_dir = if repo.join(".git").is_dir() { repo.join(".git") } else { repo.to_path_buf() };
    let heads = git_dir.join("refs").join("heads");
    let packed = git_dir.join("packed-refs");
    let (watch_heads, watch_packed) = (heads.clone(), packed.clone());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // git writes `<ref>.lock` and renames it into place; the rename is the change.
        let relevant = event.paths.iter().any(|path| {
            let is_lock = path.extension().is_some_and(|ext| ext == "lock");
            !is_lock && (path.starts_with(&watch_heads) || *path == watch_packed)
        });
        if relevant {
            // A full channel means a check is already pending: this hint is part of it.
            let _ = hints.try_send("notify".to_owned());
        }
    })?;
    watcher.watch(&heads, notify::RecursiveMode::Recursive)?;
    // Non-recursive: sees `packed-refs` being replaced without the churn under `objects/`.
    watcher.watch(&git_dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_repo_tells_paths_from_network_remotes() {
        assert_eq!(local_repo("/srv/git/infra.git"), Some(PathBuf::from("/srv/git/infra.git")));
        assert_eq!(local_repo("file:///srv/infra.git"), Some(PathBuf::from("/srv/infra.git")));
        assert_eq!(local_repo("../infra"), Some(PathBuf::from("../infra")));
        assert_eq!(local_repo("git://127.0.0.1:9418/r.git"), None);
        assert_eq!(local_repo("https://gitlab.example/x.git"), None);
        assert_eq!(local_repo("ssh://git@host/x.git"), None);
        assert_eq!(local_repo("git@gitlab.example:group/x.git"), None);
    }

    #[tokio::test]
    async fn stalled_waits_for_silence_not_for_slowness() {
        let progress = Arc::new(AtomicU64::new(0));
        let ticker = {
            let progress = progress.clone();
            tokio::spawn(async move {
                // A slow but live transfer: a tick every 50 ms for a second.
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let started = tokio::time::Instant::now();
        let limit = Duration::from_millis(500);
        tokio::time::timeout(Duration::from_secs(30), stalled(&progress, limit))
            .await
            .expect("stalled() never fired after the ticks stopped");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1), "fired while the transfer was live: {waited:?}");
        ticker.await.expect("ticker");
    }

    #[test]
    fn remote_url_makes_local_paths_absolute() {
        assert!(Path::new(&remote_url("some/relative/repo")).is_absolute());
        assert_eq!(remote_url("git://h/r"), "git://h/r");
        assert_eq!(remote_url("file:///srv/r.git"), "file:///srv/r.git");
    }
}
