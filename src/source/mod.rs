//! Watching the tracked branch: a bare mirror in the data dir, fetched on a jittered poll, on
//! `notify` events from a local remote's refs, and on explicit triggers (webhooks, CLI). A burst
//! of triggers coalesces into one fetch; fetch errors retry with backoff and never stop kiln.
//!
//! OWNER: source helper. Signatures are the contract.

pub mod git;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
}

/// Starts the watcher. `last_tip` is the tip recorded in the store (what the operator last
/// acknowledged), so commits made while kiln was down are all reported. Events go to `events`;
/// the watcher stops when `shutdown` fires.
pub fn spawn(
    config: SourceConfig,
    last_tip: Option<Revision>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> SourceHandle {
    let _ = (last_tip, events, shutdown);
    let (hints, _rx) = mpsc::channel(1);
    SourceHandle { hints, config: std::sync::Arc::new(config) }
}
