//! The watcher task behind [`super::spawn`]: waits for a hint or the poll, checks the remote in
//! a blocking task, turns what moved into [`SourceEvent`]s, and backs off on failures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::git::{self, GitError};
use super::{SourceConfig, SourceEvent, local_path};
use crate::metrics::Metrics;
use crate::model::Revision;
use crate::retry::{RetryPolicy, nth_delay};
use crate::store::{CommitKind, CommitRecord};

/// A check during which the remote shows no sign of life for this long is abandoned (its
/// blocking thread ends on its own later) and reported as a failure, so a remote that accepts
/// connections but never answers cannot wedge the watcher. Servers send progress messages
/// while they prepare a pack, so a slow but healthy fetch keeps ticking.
const STALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Backoff between failed checks; capped by the poll interval as well.
const BACKOFF: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(500),
    max_interval: Duration::from_secs(5 * 60),
    max_elapsed: None,
};

/// While the remote fails, an explicit trigger (webhook, CLI) may cut the backoff short, but
/// never starts a check sooner than this after the last one: a flood of triggers cannot turn
/// a failing remote into a hot loop.
const FAILING_MIN_GAP: Duration = Duration::from_secs(1);

/// While the remote keeps failing with the same error, it is logged again this often (every
/// attempt in between is logged at debug level only).
const FAILURE_REMINDER: Duration = Duration::from_secs(10 * 60);

/// The trigger name of hints from the notify watcher.
const NOTIFY: &str = "notify";

/// A remote that is failing: what the log said about it last.
struct Failing {
    /// The last error (a different one is news).
    message: String,
    /// When the first failure of this run happened.
    since: tokio::time::Instant,
    /// Failed attempts so far.
    attempts: u32,
    /// When the failure was last logged as a warning.
    warned_at: tokio::time::Instant,
}

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
        let mut notify = self.watch_local(&url, true);
        let mut trigger = "startup".to_owned();
        let mut failing: Option<Failing> = None;
        loop {
            // Hints queued before this check starts are answered by it.
            while self.hints.try_recv().is_ok() {}
            let wait = match self.check(&url, &trigger).await {
                Ok(true) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.fetch();
                    }
                    if let Some(failed) = failing.take() {
                        tracing::info!(
                            failed_attempts = failed.attempts,
                            failing_for = ?failed.since.elapsed(),
                            "The remote answers again."
                        );
                    }
                    if notify.is_none() {
                        // A local remote that was missing at startup exists now.
                        notify = self.watch_local(&url, false);
                    }
                    self.jittered_poll()
                }
                Ok(false) => return,
                Err(message) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.fetch_error();
                    }
                    let attempts = failing.as_ref().map_or(0, |f| f.attempts);
                    let wait = nth_delay(&BACKOFF, attempts).min(self.jittered_poll());
                    log_failure(&mut failing, &message, &trigger, wait);
                    let event = SourceEvent::FetchFailed { message, trigger: trigger.clone() };
                    if !self.send(event).await {
                        return;
                    }
                    wait
                }
            };
            match self.wait(wait, failing.is_some()).await {
                Some(next) => trigger = next,
                None => return,
            }
        }
    }

    /// Watches a local remote's refs (`None` for a network remote, or when the watch cannot be
    /// set up: then only the poll notices pushes, which is logged when `loud`).
    fn watch_local(&self, url: &str, loud: bool) -> Option<notify::RecommendedWatcher> {
        let path = local_path(url)?;
        match watch_refs(&path, &self.config.branch, self.hints_tx.clone()) {
            Ok(watcher) => {
                tracing::debug!(path = %path.display(), poll = ?self.config.poll, "Watching the local remote's refs.");
                Some(watcher)
            }
            Err(error) if loud => {
                tracing::warn!(
                    path = %path.display(), %error, poll = ?self.config.poll,
                    "Cannot watch the local remote's refs; relying on the poll."
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Waits `wait` (the poll, or the backoff while `failing`) or until a hint arrives, and
    /// returns the trigger of the next check (`None`: stop). While the remote fails, notify
    /// hints never cut the backoff short (a failing local remote must not be retried on every
    /// file event) and other hints no sooner than [`FAILING_MIN_GAP`] after the last check.
    async fn wait(&mut self, wait: Duration, failing: bool) -> Option<String> {
        let now = tokio::time::Instant::now();
        let mut deadline = now + wait;
        let gate = now + FAILING_MIN_GAP;
        let mut pending: Option<String> = None;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = self.events.closed() => return None,
                hint = self.hints.recv() => {
                    let hint = hint.unwrap_or_else(|| "poll".to_owned());
                    if !failing {
                        return Some(hint);
                    }
                    if hint != NOTIFY {
                        deadline = deadline.min(gate.max(tokio::time::Instant::now()));
                        pending = Some(hint);
                    } else {
                        pending.get_or_insert(hint);
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Some(pending.unwrap_or_else(|| "poll".to_owned()));
                }
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

/// Logs a failed check: a warning when the remote starts failing or the error changes, and a
/// reminder every [`FAILURE_REMINDER`] while it stays down; each attempt in between at debug
/// level. (The operator records failures in the rollout log, rate-limited on its side.)
fn log_failure(failing: &mut Option<Failing>, message: &str, trigger: &str, retry_in: Duration) {
    let now = tokio::time::Instant::now();
    match failing {
        None => {
            tracing::warn!(%trigger, error = %message, ?retry_in, "Fetch failed; retrying with backoff.");
            *failing = Some(Failing {
                message: message.to_owned(),
                since: now,
                attempts: 1,
                warned_at: now,
            });
        }
        Some(failed) => {
            failed.attempts = failed.attempts.saturating_add(1);
            if failed.message != message {
                tracing::warn!(
                    %trigger, error = %message, attempts = failed.attempts, ?retry_in,
                    "Fetch still failing, with a different error."
                );
                failed.message = message.to_owned();
                failed.warned_at = now;
            } else if now.duration_since(failed.warned_at) >= FAILURE_REMINDER {
                tracing::warn!(
                    error = %message, attempts = failed.attempts,
                    failing_for = ?now.duration_since(failed.since), ?retry_in,
                    "Fetch still failing."
                );
                failed.warned_at = now;
            } else {
                tracing::debug!(%trigger, error = %message, attempts = failed.attempts, ?retry_in, "Fetch failed again.");
            }
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
    match local_path(url) {
        Some(path) if !url.starts_with("file://") => std::path::absolute(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| url.to_owned()),
        _ => url.to_owned(),
    }
}

/// Whether a file event in a watched repository can mean that the tracked branch moved: a ref
/// file of the branch (or `packed-refs`) was created, written, renamed into place or removed.
/// Opens, reads, closes and metadata changes never count: kiln's own fetch opens these very
/// files, and counting that would make every fetch trigger the next one.
fn is_ref_change(event: &notify::Event, branch_ref: &Path, packed_refs: &Path) -> bool {
    use notify::EventKind;
    use notify::event::ModifyKind;
    let kind_counts = match event.kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any) => true,
        EventKind::Modify(_) | EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    };
    // git writes `<ref>.lock` and renames it into place; the rename is the change.
    kind_counts && event.paths.iter().any(|path| path == branch_ref || path == packed_refs)
}

/// Watches a local repository's ref of `branch` (its loose ref file and `packed-refs`) and
/// sends a `notify` hint when it changes, so a push is noticed within milliseconds.
fn watch_refs(
    repo: &Path,
    branch: &str,
    hints: mpsc::Sender<String>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher as _;

    let git_dir = if repo.join(".git").is_dir() { repo.join(".git") } else { repo.to_path_buf() };
    // Canonical paths: inotify reports paths under the watched path as given, and the events'
    // paths are compared with these.
    let git_dir = std::fs::canonicalize(&git_dir).unwrap_or(git_dir);
    let heads = git_dir.join("refs").join("heads");
    let branch_ref = heads.join(branch);
    let packed = git_dir.join("packed-refs");
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if is_ref_change(&event, &branch_ref, &packed) {
            // A full channel means a check is already pending: this hint is part of it.
            let _ = hints.try_send(NOTIFY.to_owned());
        }
    })?;
    // Recursive: a branch named `team/x` lives in a subdirectory, created on its first push.
    watcher.watch(&heads, notify::RecursiveMode::Recursive)?;
    // Non-recursive: sees `packed-refs` being replaced without the churn under `objects/`.
    watcher.watch(&git_dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_of_the_branch_ref_count() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
            RemoveKind, RenameMode,
        };
        let git = Path::new("/r.git");
        let (main, packed) = (git.join("refs/heads/main"), git.join("packed-refs"));
        let event = |kind: EventKind, path: &Path| notify::Event::new(kind).add_path(path.into());
        let counts =
            |kind: EventKind, path: &Path| is_ref_change(&event(kind, path), &main, &packed);
        // What a push (or `git gc`) does to the refs.
        assert!(counts(EventKind::Modify(ModifyKind::Name(RenameMode::To)), &main));
        assert!(counts(EventKind::Modify(ModifyKind::Name(RenameMode::To)), &packed));
        assert!(counts(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &main));
        assert!(counts(EventKind::Create(CreateKind::File), &main));
        assert!(counts(EventKind::Remove(RemoveKind::File), &main));
        let both = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(git.join("refs/heads/main.lock"))
            .add_path(main.clone());
        assert!(is_ref_change(&both, &main, &packed));
        // What a fetch (kiln's own included) does: opens and reads. Never a trigger.
        assert!(!counts(EventKind::Access(AccessKind::Open(AccessMode::Any)), &main));
        assert!(!counts(EventKind::Access(AccessKind::Close(AccessMode::Read)), &packed));
        assert!(!counts(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &git.join("refs/heads")
        ));
        assert!(!counts(EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)), &main));
        // Other files and other branches.
        assert!(!counts(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            &git.join("refs/heads/main.lock")
        ));
        assert!(!counts(EventKind::Create(CreateKind::File), &git.join("refs/heads/other")));
        assert!(!counts(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &git.join("config")));
        assert!(!counts(EventKind::Other, &main));
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
