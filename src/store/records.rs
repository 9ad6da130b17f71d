//! Persisted record shapes other than the rollout itself. Each is serde JSON inside a versioned
//! envelope (see `codec`); changing a shape means bumping `SCHEMA_VERSION` and migrating.

use serde::{Deserialize, Serialize};

use crate::model::{ImageRef, InstanceId, Revision, RolloutId, Timestamp};

/// How a commit arrived relative to the previously seen tip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommitKind {
    /// The first commit kiln saw on the branch.
    Initial,
    /// A fast-forward descendant of the previous tip.
    Push,
    /// The new tip does not descend from the previous one (history was rewritten).
    ForcePush {
        /// The tip that was overwritten.
        previous: Revision,
    },
    /// The branch reappeared after being deleted.
    BranchCreated,
    /// The branch was deleted; `revision` is the last tip it had.
    BranchDeleted,
}

/// A commit kiln has seen on the tracked branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The commit.
    pub revision: Revision,
    /// Its parents.
    pub parents: Vec<Revision>,
    /// First line of the message.
    pub summary: String,
    /// `Name <email>`.
    pub author: String,
    /// Commit time.
    pub committed_at: Timestamp,
    /// When kiln recorded it.
    pub seen_at: Timestamp,
    /// How it arrived.
    pub kind: CommitKind,
    /// Which trigger noticed it.
    pub trigger: String,
    /// Whether it was the tip of its fetch (only tips are deployed; others are recorded).
    pub tip: bool,
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Progress.
    Info,
    /// Something retried or skipped.
    Warn,
    /// Something failed.
    Error,
}

/// One line in a rollout's timeline. Append-only; `seq` is monotonic across the whole store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Store-wide monotonic sequence number.
    pub seq: u64,
    /// The rollout it belongs to.
    pub rollout: RolloutId,
    /// When.
    pub at: Timestamp,
    /// Severity.
    pub level: Level,
    /// Dotted kind: `state`, `plan`, `bake.start`, `hook.stdout`, `instance.launched`, ...
    pub kind: String,
    /// Human-readable text.
    pub message: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// What happened to an instance (the per-instance journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceAction {
    /// Started.
    Launched,
    /// Passed its health check `healthyThreshold` times and stayed healthy `minHealthy`.
    Healthy,
    /// Failed its health check past the deadline.
    Unhealthy,
    /// Added to the load balancer.
    Attached,
    /// Removed from the load balancer after draining.
    Drained,
    /// Stopped for good.
    Terminated,
    /// Found again after a daemon restart.
    Adopted,
    /// Died outside a rollout (replaced to keep capacity).
    Died,
}

/// One entry of the per-instance journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEvent {
    /// Store-wide monotonic sequence number.
    pub seq: u64,
    /// The fleet.
    pub fleet: String,
    /// The instance.
    pub instance: InstanceId,
    /// The instance's image.
    pub image: Option<ImageRef>,
    /// The rollout that caused it, if any.
    pub rollout: Option<RolloutId>,
    /// What happened.
    pub action: InstanceAction,
    /// When.
    pub at: Timestamp,
    /// Why, when not obvious.
    pub reason: Option<String>,
}

/// A finished bake, keyed by its cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeRecord {
    /// The cache key (tree id + parent image + hook digest, hashed).
    pub key: String,
    /// The fleet.
    pub fleet: String,
    /// The stage.
    pub stage: String,
    /// The image produced.
    pub image: ImageRef,
    /// The commit it was baked from.
    pub revision: Revision,
    /// The rollout that baked it.
    pub rollout: RolloutId,
    /// When.
    pub baked_at: Timestamp,
    /// Every output line of the hook's `$KILN_OUTPUT`.
    #[serde(default)]
    pub outputs: std::collections::BTreeMap<String, String>,
}

/// What a fleet currently runs (updated when a rollout succeeds or rolls back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The fleet.
    pub fleet: String,
    /// The commit whose image the fleet runs.
    pub revision: Revision,
    /// The image.
    pub image: ImageRef,
    /// The rollout that put it there.
    pub rollout: RolloutId,
    /// Tree ids of the fleet's paths at `revision` (the planner diffs against these).
    pub trees: std::collections::BTreeMap<String, String>,
    /// When.
    pub at: Timestamp,
}
