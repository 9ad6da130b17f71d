//! The bake/reconcile pipeline: what its steps get from the driver, how they fail, and what
//! they share (a hook run whose output becomes rollout events in batches).
//!
//! - [`bake`]: a fleet's image stages through their bake hooks, with the cache.
//! - [`reconcile`]: the infra hook with the image id.
//! - [`workspace`]: the commit exported for one hook run, and git reads off the runtime.
//!
//! `hooks/` stays the process runner and the hook ABI; this module is the driver's side of it.

pub mod bake;
pub mod reconcile;
pub(crate) mod workspace;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{Classify, ErrorClass};
use crate::hooks::{HookError, HookOutcome, HookSpec, Stream, TRUNCATED_NOTICE};
use crate::manifest::Fleet;
use crate::model::{Revision, RolloutId};
use crate::store::{Event, EventKind, Level, Store};

pub(crate) use workspace::{Workspace, git};

/// Output lines buffered before a forced write; a timer also writes every [`FLUSH_EVERY`].
const BATCH: usize = 512;
/// How often buffered output lines are written while a hook runs.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// How many pipeline steps run at once across all fleets by default (`kiln run --jobs`).
pub const DEFAULT_JOBS: usize = 8;

/// Bounds how many pipeline steps (each an export of the commit and a hook run: bake, reconcile,
/// a drift check's plan) run at once across every fleet, so that a push touching a thousand
/// fleets bakes them a few at a time instead of a thousand exports and hooks fighting over the
/// disk, the CPU and the blocking pool. A step waiting for a slot is recorded as such.
#[derive(Debug, Clone)]
pub struct Slots {
    permits: Arc<tokio::sync::Semaphore>,
    size: usize,
}

impl Slots {
    /// `size` steps at once (at least one).
    pub fn new(size: usize) -> Slots {
        let size = size.max(1);
        Slots { permits: Arc::new(tokio::sync::Semaphore::new(size)), size }
    }

    /// How many steps may run at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A slot at once, if one is free.
    pub(crate) fn try_acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Waits for a slot (the semaphore is never closed).
    pub(crate) async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }
}

impl Default for Slots {
    fn default() -> Slots {
        Slots::new(DEFAULT_JOBS)
    }
}

/// Everything a pipeline step needs. Borrowed from the driver for one step.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// The store (events, bake cache).
    pub store: &'a Store,
    /// The rollout the step belongs to.
    pub rollout: RolloutId,
    /// The fleet, as the manifest at `revision` describes it.
    pub fleet: &'a Fleet,
    /// The commit.
    pub revision: &'a Revision,
    /// The bare mirror of the watched repo (read with `source::git`).
    pub mirror: &'a Path,
    /// The data dir (work trees go under `work/`).
    pub data_dir: &'a Path,
    /// Fires when a newer commit supersedes this rollout or an operator aborts it.
    pub cancel: &'a CancellationToken,
    /// Daemon environment variables allowed through to hooks (`--hook-env NAME`).
    pub hook_env: &'a [(String, String)],
    /// Where durations are observed.
    pub metrics: &'a crate::metrics::Metrics,
    /// The daemon-wide bound on steps running at once.
    pub slots: &'a Slots,
}

impl StepContext<'_> {
    /// Appends an event to the rollout's timeline; a store failure is logged, not propagated
    /// (losing a log line must not fail a bake that succeeded).
    pub fn event(&self, level: Level, kind: EventKind, message: impl Into<String>) {
        self.event_with(level, kind, message, None);
    }

    /// [`Self::event`] with structured data.
    pub fn event_with(
        &self,
        level: Level,
        kind: EventKind,
        message: impl Into<String>,
        data: Option<serde_json::Value>,
    ) {
        if let Err(error) = self.store.append_event(self.rollout, level, kind, message, data) {
            tracing::warn!(rollout = %self.rollout, error = %crate::error::chain(&error), "Could not record an event.");
        }
    }
}

/// Why a bake or reconcile step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// Reading the commit failed.
    #[error(transparent)]
    Git(#[from] crate::source::git::GitError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Anything else (I/O preparing a work tree, ...), described.
    #[error("{0}")]
    Other(String),
}

impl Classify for StepError {
    fn class(&self) -> ErrorClass {
        match self {
            StepError::Hook(e) => e.class(),
            StepError::Git(_) | StepError::Store(_) => ErrorClass::Transient,
            StepError::Other(_) => ErrorClass::Stalled,
        }
    }
}

/// Turns captured lines into `hook.stdout` / `hook.stderr` events (and the truncation notice into
/// one `hook.truncated` event), written in batches with one flush each.
pub(crate) struct EventSink<'c, 'a> {
    cx: &'c StepContext<'a>,
    pending: Mutex<Vec<Event>>,
}

impl<'c, 'a> EventSink<'c, 'a> {
    pub fn new(cx: &'c StepContext<'a>) -> Self {
        EventSink { cx, pending: Mutex::new(Vec::new()) }
    }

    pub fn line(&self, stream: Stream, line: &str) {
        let (kind, level) = match stream {
            _ if line == TRUNCATED_NOTICE => (EventKind::HookTruncated, Level::Warn),
            Stream::Stdout => (EventKind::HookStdout, Level::Info),
            Stream::Stderr => (EventKind::HookStderr, Level::Info),
        };
        let event = Event::new(self.cx.rollout, level, kind, crate::error::redact(line), None);
        let full = match self.pending.lock() {
            Ok(mut pending) => {
                pending.push(event);
                pending.len() >= BATCH
            }
            Err(_) => false,
        };
        if full {
            self.flush();
        }
    }

    pub fn flush(&self) {
        let mut batch = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.cx.store.append_events(&mut batch) {
            tracing::warn!(rollout = %self.cx.rollout, error = %crate::error::chain(&error), "Could not record hook output.");
        }
    }
}

/// Runs a hook for a step: retried on exit 75 (each retry is a `hook.retry` event), output into
/// the rollout's events, cancelled by `cx.cancel`.
pub(crate) async fn run_hook(
    cx: &StepContext<'_>,
    spec: &HookSpec,
    out_dir: &Path,
) -> Result<HookOutcome, HookError> {
    let sink = EventSink::new(cx);
    let on_line = |stream: Stream, line: &str| sink.line(stream, line);
    let on_retry = |error: &HookError, wait: Duration| {
        sink.flush();
        cx.event(
            Level::Warn,
            EventKind::HookRetry,
            format!("{error}; retrying in {:.1}s", wait.as_secs_f64()),
        );
    };
    // One record per fleet and step (the name without the hook path): a run a dead daemon left
    // behind is killed before this one starts, so two runs of one step never overlap.
    let step = spec.name.split(" (").next().unwrap_or(&spec.name);
    let record = crate::hooks::run_record_path(cx.data_dir, step);
    let leftovers = crate::hooks::kill_leftover(&record).await;
    if leftovers > 0 {
        cx.event(
            Level::Warn,
            EventKind::HookLeftover,
            format!("killed {leftovers} process(es) of an earlier run of `{step}` left running by a daemon that died"),
        );
    }
    let run = crate::hooks::run_with_retry_recorded(
        spec,
        out_dir,
        Some(&record),
        &on_line,
        cx.cancel,
        &on_retry,
    );
    let mut run = std::pin::pin!(run);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    let res = loop {
        tokio::select! {
            res = &mut run => break res,
            _ = tick.tick() => sink.flush(),
        }
    };
    sink.flush();
    res
}

/// The process environment for a step's hook: the operator's `--hook-env` pairs, then the
/// `KILN_*` inputs (which win over an allowed variable of the same name).
pub(crate) fn hook_env(cx: &StepContext<'_>, inputs: Vec<(&str, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = cx.hook_env.to_vec();
    env.extend(inputs.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env
}

/// `sha256` over length-prefixed parts, hex: unambiguous however the parts are split.
pub(crate) fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}
