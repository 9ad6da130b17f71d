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
//! OWNER: source helper. Signatures are the contract.

pub mod git;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::Revision;
use crate::store::CommitRecord;

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
    /// A fetch failed (it is retried with backoff).
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
