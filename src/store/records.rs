//! Persisted record shapes other than the rollout itself. Each is serde JSON inside a versioned
//! envelope (see `codec`); changing a shape means bumping `SCHEMA_VERSION` and migrating.

use serde::{Deserialize, Serialize};

use crate::model::{ImageRef, InstanceId, Revision, RolloutId, Timestamp};
use crate::rollout::state::RolloutState;

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

/// What an event says happened. The serde form is the dotted string kiln has always stored
/// (`state`, `bake.start`, `instance.launched`, ...), so records written before this enum read
/// unchanged; a string this build does not know reads as [`EventKind::Other`] rather than
/// failing (a newer kiln may add kinds, and a downgrade must still show the timeline).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The rollout's state changed; [`Event::change`] says from what to what.
    State,
    /// A rollout message without a state change (the driver's progress notes).
    Rollout,
    /// The planner's decision for the fleet.
    Plan,
    /// The daemon restarted and resumes the rollout from its recorded state.
    Resume,
    /// An operator verb (resume, rollback) acted on the rollout.
    Command,
    /// One problem of an invalid manifest.
    Manifest,
    /// A note about how the commit arrived (force push, recreated branch).
    Source,
    /// A commit that failed signature verification (`verify:`), or how the range passed.
    Verify,
    /// The rollout's driver stopped on an error.
    Driver,
    /// A stage's image came from the bake cache.
    BakeCached,
    /// A bake hook started.
    BakeStart,
    /// A bake hook produced an image.
    BakeDone,
    /// A bake hook failed.
    BakeFailed,
    /// The reconcile hook started.
    ReconcileStart,
    /// The reconcile hook finished.
    ReconcileDone,
    /// The reconcile hook failed.
    ReconcileFailed,
    /// A line a hook wrote to stdout.
    HookStdout,
    /// A line a hook wrote to stderr.
    HookStderr,
    /// A hook's output passed the capture cap; the rest was dropped.
    HookTruncated,
    /// A hook failed transiently and is retried.
    HookRetry,
    /// Processes of an earlier run of the same step were killed before this one.
    HookLeftover,
    /// Something happened to one instance (`instance.launched`, `instance.healthy`, ...).
    Instance(InstanceAction),
    /// Garbage collection removed files for the fleet (summary).
    Gc,
    /// Garbage collection removed one image, instance dir or repo copy.
    GcRemoved,
    /// A drift check found an instance that is not what was deployed.
    DriftInstance,
    /// A drift check found a load-balancer backend kiln did not attach.
    DriftBackend,
    /// A drift check found infra drift (the reconcile hook's plan).
    DriftInfra,
    /// A drift check could not look at something.
    DriftError,
    /// A kind this build does not know (written by a newer kiln); kept verbatim.
    Other(String),
}

impl EventKind {
    /// Every kind this build writes, in a stable order (for docs and tests).
    pub const KNOWN: [EventKind; 35] = [
        EventKind::State,
        EventKind::Rollout,
        EventKind::Plan,
        EventKind::Resume,
        EventKind::Command,
        EventKind::Manifest,
        EventKind::Source,
        EventKind::Verify,
        EventKind::Driver,
        EventKind::BakeCached,
        EventKind::BakeStart,
        EventKind::BakeDone,
        EventKind::BakeFailed,
        EventKind::ReconcileStart,
        EventKind::ReconcileDone,
        EventKind::ReconcileFailed,
        EventKind::HookStdout,
        EventKind::HookStderr,
        EventKind::HookTruncated,
        EventKind::HookRetry,
        EventKind::HookLeftover,
        EventKind::Instance(InstanceAction::Launched),
        EventKind::Instance(InstanceAction::Healthy),
        EventKind::Instance(InstanceAction::Unhealthy),
        EventKind::Instance(InstanceAction::Attached),
        EventKind::Instance(InstanceAction::Drained),
        EventKind::Instance(InstanceAction::Terminated),
        EventKind::Instance(InstanceAction::Adopted),
        EventKind::Instance(InstanceAction::Died),
        EventKind::Gc,
        EventKind::GcRemoved,
        EventKind::DriftInstance,
        EventKind::DriftBackend,
        EventKind::DriftInfra,
        EventKind::DriftError,
    ];

    /// The stored (and wire) name.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::State => "state",
            EventKind::Rollout => "rollout",
            EventKind::Plan => "plan",
            EventKind::Resume => "resume",
            EventKind::Command => "command",
            EventKind::Manifest => "manifest",
            EventKind::Source => "source",
            EventKind::Verify => "verify",
            EventKind::Driver => "driver",
            EventKind::BakeCached => "bake.cached",
            EventKind::BakeStart => "bake.start",
            EventKind::BakeDone => "bake.done",
            EventKind::BakeFailed => "bake.failed",
            EventKind::ReconcileStart => "reconcile.start",
            EventKind::ReconcileDone => "reconcile.done",
            EventKind::ReconcileFailed => "reconcile.failed",
            EventKind::HookStdout => "hook.stdout",
            EventKind::HookStderr => "hook.stderr",
            EventKind::HookTruncated => "hook.truncated",
            EventKind::HookRetry => "hook.retry",
            EventKind::HookLeftover => "hook.leftover",
            EventKind::Instance(action) => match action {
                InstanceAction::Launched => "instance.launched",
                InstanceAction::Healthy => "instance.healthy",
                InstanceAction::Unhealthy => "instance.unhealthy",
                InstanceAction::Attached => "instance.attached",
                InstanceAction::Drained => "instance.drained",
                InstanceAction::Terminated => "instance.terminated",
                InstanceAction::Adopted => "instance.adopted",
                InstanceAction::Died => "instance.died",
            },
            EventKind::Gc => "gc",
            EventKind::GcRemoved => "gc.removed",
            EventKind::DriftInstance => "drift.instance",
            EventKind::DriftBackend => "drift.backend",
            EventKind::DriftInfra => "drift.infra",
            EventKind::DriftError => "drift.error",
            EventKind::Other(text) => text,
        }
    }

    /// The kind named `text`; never fails (unknown names are [`EventKind::Other`]).
    pub fn parse(text: &str) -> EventKind {
        EventKind::KNOWN
            .iter()
            .find(|kind| kind.as_str() == text)
            .cloned()
            .unwrap_or_else(|| EventKind::Other(text.to_owned()))
    }

    /// True for `instance.*` kinds.
    pub fn is_instance(&self) -> bool {
        matches!(self, EventKind::Instance(_))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&str> for EventKind {
    fn from(text: &str) -> Self {
        EventKind::parse(text)
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(EventKind::parse(&text))
    }
}

/// A rollout's state change, as typed fields (a `state` event carries one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The state before.
    pub from: RolloutState,
    /// The state after.
    pub to: RolloutState,
}

/// One line in a rollout's timeline. Append-only; `seq` is monotonic across the whole store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Store-wide monotonic sequence number.
    pub seq: u64,
    /// The rollout it belongs to.
    pub rollout: RolloutId,
    /// The rollout's fleet (`None` for a commit-level record). Filled in by the store when the
    /// event is appended; records written before it existed are filled in on read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// The rollout's commit. Filled in like `fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// When.
    pub at: Timestamp,
    /// Severity.
    pub level: Level,
    /// What happened.
    pub kind: EventKind,
    /// For [`EventKind::State`]: from which state to which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<StateChange>,
    /// Human-readable text.
    pub message: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Event {
    /// An event of `rollout` to be appended (the store numbers it and fills in its fleet and
    /// commit).
    pub fn new(
        rollout: RolloutId,
        level: Level,
        kind: EventKind,
        message: impl Into<String>,
        data: Option<serde_json::Value>,
    ) -> Event {
        Event {
            seq: 0,
            rollout,
            fleet: None,
            revision: None,
            at: crate::model::now(),
            level,
            kind,
            change: None,
            message: message.into(),
            data,
        }
    }

    /// Fills in what a record written by an older kiln lacks: the typed change of a `state`
    /// event whose `data` holds `{from, to}`.
    pub(crate) fn upgrade(mut self) -> Event {
        if self.kind == EventKind::State && self.change.is_none() {
            self.change = self
                .data
                .as_ref()
                .and_then(|d| serde_json::from_value::<StateChange>(d.clone()).ok());
        }
        self
    }
}

/// What happened to an instance (the per-instance journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
