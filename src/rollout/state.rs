//! The persisted rollout record: one commit's journey for one fleet.
//!
//! A rollout goes `pending → (scheduled) → baking → reconciling → rolling → succeeded`, or ends
//! `failed`, `rolled_back`, `superseded`, `aborted` or `skipped`. The record *is* the state
//! machine's state: the driver rebuilds everything from it after a restart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{ImageRef, InstanceId, Revision, RolloutId, Timestamp};

/// Where a rollout stands. Serialized in snake_case; these names are part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Recorded, not started yet.
    Pending,
    /// Waiting for its schedule (delay or maintenance window).
    Scheduled,
    /// Bake hooks running.
    Baking,
    /// Reconcile hook running.
    Reconciling,
    /// Instances being replaced.
    Rolling,
    /// Stopped by an operator or by `onFailure: pause`; `resume` continues it.
    Paused,
    /// The fleet runs the new image.
    Succeeded,
    /// Stopped on an error; the fleet was left as it was (or as far as it got, then paused).
    Failed,
    /// Health checks failed and the fleet was rolled back to the previous image.
    RolledBack,
    /// A newer commit took over before this one finished.
    Superseded,
    /// Stopped by an operator.
    Aborted,
    /// Nothing to do for this commit (no fleet paths touched, branch deleted, ...).
    Skipped,
}

impl RolloutState {
    /// True once the rollout can never move again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::RolledBack
                | Self::Superseded
                | Self::Aborted
                | Self::Skipped
        )
    }

    /// The snake_case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Baking => "baking",
            Self::Reconciling => "reconciling",
            Self::Rolling => "rolling",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Superseded => "superseded",
            Self::Aborted => "aborted",
            Self::Skipped => "skipped",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        ALL_STATES.iter().copied().find(|state| state.as_str() == s)
    }
}

/// Every state, in lifecycle order (used by `/metrics` and filters).
pub const ALL_STATES: [RolloutState; 12] = [
    RolloutState::Pending,
    RolloutState::Scheduled,
    RolloutState::Baking,
    RolloutState::Reconciling,
    RolloutState::Rolling,
    RolloutState::Paused,
    RolloutState::Succeeded,
    RolloutState::Failed,
    RolloutState::RolledBack,
    RolloutState::Superseded,
    RolloutState::Aborted,
    RolloutState::Skipped,
];

impl std::fmt::Display for RolloutState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the planner decided for one fleet at one commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Stages whose inputs changed (bake hooks may still hit the cache).
    pub bake: Vec<String>,
    /// Whether the reconcile hook runs.
    pub reconcile: bool,
    /// Whether instances are replaced.
    pub roll: bool,
    /// Why, in words (shown by `kiln show`).
    pub reason: String,
}

/// How the rollout was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A commit on the tracked branch.
    Commit,
    /// `kiln rollback`: back to a previous image.
    Rollback {
        /// The rollout whose image is restored.
        from: Option<RolloutId>,
    },
    /// Automatic rollback after a failed rollout.
    AutoRollback {
        /// The failed rollout.
        of: RolloutId,
    },
    /// A scheduled rebake (security updates) without a commit.
    Rebake,
}

/// One commit's journey for one fleet. Stored under `rollouts/<id>`; history is append-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Monotonic id.
    pub id: RolloutId,
    /// The fleet, or `None` for commit-level records (broken manifest, branch deleted).
    pub fleet: Option<String>,
    /// The commit.
    pub revision: Revision,
    /// The commit's first line.
    pub summary: String,
    /// Which trigger noticed the commit (`poll`, `notify`, `webhook:gitlab`, ...).
    pub trigger: String,
    /// How it started.
    pub origin: Origin,
    /// Where it stands.
    pub state: RolloutState,
    /// State before `paused` (what `resume` returns to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_from: Option<RolloutState>,
    /// The planner's decision.
    pub plan: Plan,
    /// The image the fleet moves to, once known.
    pub image: Option<ImageRef>,
    /// Images per bake stage, once baked.
    #[serde(default)]
    pub stage_images: BTreeMap<String, ImageRef>,
    /// The image the fleet ran before (what a rollback restores).
    pub previous_image: Option<ImageRef>,
    /// Outputs of the reconcile hook.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Why it ended as it did (failure reason, skip reason).
    pub reason: Option<String>,
    /// When recorded.
    pub created_at: Timestamp,
    /// When work started.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// Earliest time the driver may act (schedule, backoff).
    pub not_before: Option<Timestamp>,
    /// Attempts in the current phase (transient failures).
    #[serde(default)]
    pub attempt: u32,
    /// The rolling phase's persisted state machine.
    #[serde(default)]
    pub rolling: Option<Rolling>,
}

/// The persisted state of instance replacement (owned by `rollout::step`/`driver`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rolling {
    /// Instances on the old image still to replace.
    pub todo: Vec<InstanceId>,
    /// New instances launched and not yet through their checks.
    pub launched: Vec<InstanceId>,
    /// Old instances replaced.
    pub done: Vec<InstanceId>,
}
