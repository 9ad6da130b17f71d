//! What the bake and reconcile steps get from the driver, and how they fail.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::error::{Classify, ErrorClass};
use crate::manifest::Fleet;
use crate::model::{Revision, RolloutId};
use crate::store::{EventKind, Level, Store};

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
