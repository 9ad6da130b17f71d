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
    /// A drift check's findings (a record in the log, never driven: see `drift`).
    Drift,
    /// Bringing a drifted fleet back to its deployed image (and infra) without a commit.
    Repair,
    /// `kiln retry`: the same commit (and image, once baked) as a rollout that did not succeed.
    Retry {
        /// The rollout re-run.
        of: RolloutId,
    },
    /// `kiln deploy COMMIT`: a commit of the branch's history, deployed on request.
    Deploy,
    /// Retiring a fleet removed from kiln.yaml (`prune: true`, `kiln run --prune` or
    /// `kiln down`): its instances are drained and terminated, its load balancer stopped.
    Prune,
}

impl Origin {
    /// A rollback takes the fast path: no schedule delay, no maintenance window, no canary
    /// gate (it restores an image that already served).
    pub fn is_fast(&self) -> bool {
        matches!(self, Origin::Rollback { .. } | Origin::AutoRollback { .. })
    }
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
    /// How the commit passed signature verification, when `verify:` required it (records
    /// written before verification existed read as `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
}

/// How a commit passed signature verification (see `crate::verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// `head` or `range`.
    pub mode: String,
    /// Where the trust came from: `daemon flags` or `kiln.yaml at <commit>`.
    pub policy: String,
    /// The last deployed commit the range starts after (`None`: the tip alone was checked).
    #[serde(default)]
    pub since: Option<Revision>,
    /// How many commits were verified.
    pub commits: usize,
    /// The tip's signature: `ssh` or `gpg`.
    pub method: String,
    /// Who signed the tip: the allowed-signers principal or the OpenPGP user id.
    pub signer: String,
    /// The tip's key: `SHA256:…` (SSH) or the OpenPGP fingerprint.
    pub key: String,
    /// Every distinct `method signer key` in the range.
    #[serde(default)]
    pub signers: Vec<String>,
}

/// The persisted state of instance replacement (owned by `rollout::step`/`driver`).
///
/// Everything the engine cannot re-observe from the provider lives here: the intent of the side
/// effect in flight, health-probe streaks, the canary gate, batch bookkeeping and the failure
/// that turned a rollout into a rollback. New fields carry `#[serde(default)]` so records written
/// by an older build still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rolling {
    /// Instances on the old image still to replace.
    pub todo: Vec<InstanceId>,
    /// New instances launched and not yet through their checks.
    pub launched: Vec<InstanceId>,
    /// Instances retired: old ones replaced, dead ones terminated (an instance an autoscaler
    /// added mid-rollout too, once replaced); never the rollout's own launches.
    pub done: Vec<InstanceId>,
    /// The instances running when rolling began: the base of the fleet's count for a
    /// `capacity: {min, max}` without a provider desired count (see `rollout::capacity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<InstanceId>,
    /// The image instances are moved to (the rollout's image, or the previous one when rolling
    /// back).
    #[serde(default)]
    pub target: Option<ImageRef>,
    /// True once health checks failed and the fleet is being moved back to `previous_image`.
    #[serde(default)]
    pub rollback: bool,
    /// The failure that started a rollback (kept for the final reason).
    #[serde(default)]
    pub failure: Option<String>,
    /// True once an operator aborted the rollout and the fleet is being returned to its stable
    /// image (`previous_image`, with `rollback` set); it then ends `aborted`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub aborting: bool,
    /// Set when the rolling phase must end: unhealthy new instances are terminated first, then
    /// the rollout moves to `ending.state`.
    #[serde(default)]
    pub ending: Option<Ending>,
    /// The side effect written ahead of being performed; present after a crash means "find
    /// out whether it happened" (every action is idempotent, launches through their key).
    #[serde(default)]
    pub intent: Option<Intent>,
    /// The next launch slot; launch idempotency keys are `r{rollout}-{slot}`.
    #[serde(default)]
    pub next_slot: u64,
    /// Launches still allowed in the current batch (0: a new batch must start).
    #[serde(default)]
    pub batch_left: u32,
    /// Batches started so far (1-based once the first starts).
    #[serde(default)]
    pub batch: u32,
    /// Whether the canary gate is behind us (true when there is no canary).
    #[serde(default)]
    pub canary_done: bool,
    /// Whether the rollout is paused at the canary gate (resume promotes).
    #[serde(default)]
    pub canary_hold: bool,
    /// Health-probe state of new instances not attached yet, by instance id.
    #[serde(default)]
    pub probes: BTreeMap<String, Probe>,
    /// New instances this rollout attached to the load balancer.
    #[serde(default)]
    pub attached: Vec<InstanceId>,
    /// Last time the rollout made progress (progress deadline counts from here).
    #[serde(default)]
    pub last_progress: Option<Timestamp>,
    /// New instances that failed their health checks (or died before passing them), by id,
    /// with the failed check (`GET /healthz on 127.0.0.1:41234: 500`). Their termination is
    /// journaled `unhealthy` and counted as failed, not as replaced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<String, String>,
}

/// How the rolling phase ends once its cleanup is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ending {
    /// The state the rollout moves to.
    pub state: RolloutState,
    /// Why.
    pub reason: String,
}

/// A side effect written to the record before it is performed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// What is being done.
    pub action: Action,
    /// When it was first attempted.
    pub at: Timestamp,
}

/// One side effect of the rolling phase. Every one is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Action {
    /// Launch one instance on `image`; the provider returns the same instance for the same key.
    Launch {
        /// The image.
        image: ImageRef,
        /// The idempotency key (`r{rollout}-{slot}`).
        key: String,
    },
    /// Add a healthy new instance to the load balancer.
    Attach {
        /// The instance.
        id: InstanceId,
    },
    /// Take an old instance out of the load balancer and drain it.
    Detach {
        /// The instance.
        id: InstanceId,
    },
    /// Stop an instance for good.
    Terminate {
        /// The instance.
        id: InstanceId,
        /// Why (old and drained, failed its checks, dead).
        why: String,
    },
}

impl std::fmt::Display for Action {
    /// What the action does, in the words of the rollout's timeline (`launch on IMAGE (key
    /// r3-0)`, `terminate i-1 (replaced)`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Launch { image, key } => write!(f, "launch on {image} (key {key})"),
            Action::Attach { id } => write!(f, "attach {id}"),
            Action::Detach { id } => write!(f, "detach {id}"),
            Action::Terminate { id, why } => write!(f, "terminate {id} ({why})"),
        }
    }
}

/// Health-probe state of one new instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// When probing started (the launch); the health timeout counts from here.
    pub since: Timestamp,
    /// Consecutive successful probes.
    #[serde(default)]
    pub ok_streak: u32,
    /// When the streak reached `healthyThreshold` (minHealthy counts from here).
    #[serde(default)]
    pub healthy_since: Option<Timestamp>,
    /// When it was last probed.
    #[serde(default)]
    pub last_at: Option<Timestamp>,
    /// The last failed check, as `GET /healthz on 127.0.0.1:41234: 500`.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Rollout {
    /// A new `pending` record (id assigned by `Store::create_rollout`) with nothing planned or
    /// done yet: no image, no outputs, no timestamps besides `created_at`.
    pub fn new(
        fleet: Option<String>,
        revision: Revision,
        summary: String,
        trigger: String,
        origin: Origin,
        now: Timestamp,
    ) -> Rollout {
        let state = RolloutState::Pending;
        let plan = Plan::default();
        Rollout {
            id: RolloutId(0),
            fleet,
            revision,
            summary,
            trigger,
            origin,
            state,
            paused_from: None,
            plan,
            image: None,
            stage_images: BTreeMap::new(),
            previous_image: None,
            outputs: BTreeMap::new(),
            reason: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            not_before: None,
            attempt: 0,
            rolling: None,
            verified: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_read_as_words_not_rust_debug_text() {
        let launch = Action::Launch { image: ImageRef("web-app-1".into()), key: "r3-0".into() };
        assert_eq!(launch.to_string(), "launch on web-app-1 (key r3-0)");
        let id = InstanceId("i-7".into());
        assert_eq!(Action::Attach { id: id.clone() }.to_string(), "attach i-7");
        assert_eq!(Action::Detach { id: id.clone() }.to_string(), "detach i-7");
        let terminate = Action::Terminate { id, why: "replaced".into() };
        assert_eq!(terminate.to_string(), "terminate i-7 (replaced)");
    }
}
