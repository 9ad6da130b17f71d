//! The JSON API under `/api/v1`, its DTOs, SSE follow and `/metrics`.
//!
//! The DTOs here are the wire format (docs/api.md) and are deliberately separate from the store
//! records, so the on-disk schema can change without breaking scripts and the other way round.
//! The CLI deserialises the same types.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, Shared};
use crate::model::{RolloutId, Timestamp};
use crate::operator::{Command, FleetStatus, InstanceStatus};
use crate::rollout::state::{ALL_STATES, Origin, Rollout, RolloutState};
use crate::store::{
    CommitKind, CommitRecord, Event, InstanceEvent, Level, RolloutFilter, StoreError,
};

/// Default page size of `GET /rollouts`.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page size of `GET /rollouts` and `GET /commits`.
pub const MAX_LIMIT: usize = 1000;

/// A rollout as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDto {
    /// Monotonic id.
    pub id: u64,
    /// The fleet (`null` for commit-level records such as a broken manifest).
    pub fleet: Option<String>,
    /// The full commit id.
    pub commit: String,
    /// The commit's first line.
    pub summary: String,
    /// What noticed the commit (`poll`, `notify`, `webhook:gitlab`, `cli`, ...).
    pub trigger: String,
    /// How it started: `commit`, `rollback`, `auto_rollback`, `rebake`, `drift` (a drift check's
    /// findings), `repair`.
    pub origin: String,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it ended as it did.
    pub reason: Option<String>,
    /// The image the fleet moves to, once known.
    pub image: Option<String>,
    /// The image the fleet ran before.
    pub previous_image: Option<String>,
    /// Images per bake stage.
    #[serde(default)]
    pub stage_images: BTreeMap<String, String>,
    /// The planner's decision.
    pub plan: PlanDto,
    /// Outputs of the reconcile hook.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Instance replacement progress while (or after) rolling.
    #[serde(default)]
    pub progress: Option<ProgressDto>,
    /// When recorded.
    pub created_at: Timestamp,
    /// When work started.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// The timeline (only in the one-rollout view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventDto>>,
    /// How the commit passed signature verification (`verify:`), when it was required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifiedDto>,
}

/// How a rollout's commit passed signature verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedDto {
    /// `head` or `range`.
    pub mode: String,
    /// Where the trust came from: `daemon flags` or `kiln.yaml at <commit>`.
    pub policy: String,
    /// The deployed commit the verified range starts after (`null`: the tip alone).
    pub since: Option<String>,
    /// Commits verified.
    pub commits: usize,
    /// `ssh` or `gpg`: how the tip is signed.
    pub method: String,
    /// The tip's signer (allowed-signers principal or OpenPGP user id).
    pub signer: String,
    /// The tip's key (`SHA256:…` or OpenPGP fingerprint).
    pub key: String,
    /// Every distinct `method signer key` in the range.
    pub signers: Vec<String>,
}

/// The planner's decision for one fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDto {
    /// Stages to bake.
    pub bake: Vec<String>,
    /// Whether the reconcile hook runs.
    pub reconcile: bool,
    /// Whether instances are replaced.
    pub roll: bool,
    /// Why, in words.
    pub reason: String,
}

/// How far instance replacement got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressDto {
    /// Old instances replaced.
    pub replaced: usize,
    /// Old instances to replace in total (0 on a first deployment: nothing to replace).
    pub total: usize,
    /// New instances this rollout put in the load balancer so far.
    #[serde(default)]
    pub attached: usize,
}

impl RolloutDto {
    /// The API view of a stored rollout (without events).
    pub fn from_rollout(rollout: &Rollout) -> Self {
        let origin = match rollout.origin {
            Origin::Commit => "commit",
            Origin::Rollback { .. } => "rollback",
            Origin::AutoRollback { .. } => "auto_rollback",
            Origin::Rebake => "rebake",
            Origin::Drift => "drift",
            Origin::Repair => "repair",
            Origin::Retry { .. } => "retry",
            Origin::Deploy => "deploy",
            Origin::Prune => "prune",
        };
        let progress = rollout.rolling.as_ref().map(|rolling| ProgressDto {
            replaced: rolling.done.len(),
            total: rolling.done.len() + rolling.todo.len(),
            attached: rolling.attached.len(),
        });
        RolloutDto {
            id: rollout.id.0,
            fleet: rollout.fleet.clone(),
            commit: rollout.revision.0.clone(),
            summary: rollout.summary.clone(),
            trigger: rollout.trigger.clone(),
            origin: origin.to_owned(),
            state: rollout.state,
            reason: rollout.reason.clone(),
            image: rollout.image.as_ref().map(|i| i.0.clone()),
            previous_image: rollout.previous_image.as_ref().map(|i| i.0.clone()),
            stage_images: rollout
                .stage_images
                .iter()
                .map(|(stage, image)| (stage.clone(), image.0.clone()))
                .collect(),
            plan: PlanDto {
                bake: rollout.plan.bake.clone(),
                reconcile: rollout.plan.reconcile,
                roll: rollout.plan.roll,
                reason: rollout.plan.reason.clone(),
            },
            outputs: rollout.outputs.clone(),
            progress,
            created_at: rollout.created_at,
            started_at: rollout.started_at,
            finished_at: rollout.finished_at,
            events: None,
            verified: rollout.verified.as_ref().map(|v| VerifiedDto {
                mode: v.mode.clone(),
                policy: v.policy.clone(),
                since: v.since.as_ref().map(|r| r.0.clone()),
                commits: v.commits,
                method: v.method.clone(),
                signer: v.signer.clone(),
                key: v.key.clone(),
                signers: v.signers.clone(),
            }),
        }
    }
}

/// One line of a rollout's timeline, and one entry of the event feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventDto {
    /// Store-wide monotonic sequence number (the SSE `id`; what a feed consumer stores).
    pub seq: u64,
    /// The rollout.
    pub rollout: u64,
    /// The rollout's fleet (`null` for commit-level records).
    #[serde(default)]
    pub fleet: Option<String>,
    /// The rollout's commit (full id).
    #[serde(default)]
    pub commit: Option<String>,
    /// When.
    pub at: Timestamp,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// Dotted kind (`state`, `bake.start`, `hook.stdout`, ...; see docs/api.md). A string on
    /// the wire so a client reads kinds newer than itself.
    pub kind: String,
    /// For `state` events: `{"from": …, "to": …}` rollout states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<StateChangeDto>,
    /// Text.
    pub message: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// A rollout's state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChangeDto {
    /// The state before.
    pub from: RolloutState,
    /// The state after.
    pub to: RolloutState,
}

/// A page of `GET /events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    /// Events with `seq > after`, ascending.
    pub events: Vec<EventDto>,
    /// Pass as `after=` for the next page: the last `seq` in this page, or the `after` asked
    /// for when the page is empty.
    pub next_after: u64,
    /// The newest `seq` the feed holds now; `next_after < latest` means more to read.
    pub latest: u64,
}

/// Default page size of `GET /events`.
pub const DEFAULT_EVENT_LIMIT: usize = 100;

impl From<&Event> for EventDto {
    fn from(event: &Event) -> Self {
        let level = match event.level {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        EventDto {
            seq: event.seq,
            rollout: event.rollout.0,
            fleet: event.fleet.clone(),
            commit: event.revision.as_ref().map(|r| r.0.clone()),
            at: event.at,
            level: level.to_owned(),
            kind: event.kind.as_str().to_owned(),
            change: event.change.map(|c| StateChangeDto { from: c.from, to: c.to }),
            message: event.message.clone(),
            data: event.data.clone(),
        }
    }
}

/// A page of `GET /rollouts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPage {
    /// Newest first.
    pub rollouts: Vec<RolloutDto>,
    /// Pass as `before=` for the next page; `null` on the last page.
    pub next_before: Option<u64>,
}

/// A fleet as `GET /fleets` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetDto {
    /// Name.
    pub name: String,
    /// Provider kind.
    pub provider: String,
    /// The commit it runs.
    pub revision: Option<String>,
    /// The image it runs.
    pub image: Option<String>,
    /// Capacity.
    pub capacity: u32,
    /// The rollout in progress.
    pub active_rollout: Option<u64>,
    /// Its state.
    pub active_state: Option<RolloutState>,
    /// Where clients reach the fleet.
    pub endpoint: Option<String>,
    /// Instances.
    pub instances: Vec<InstanceDto>,
    /// When observed (`null` when read from the store without a daemon).
    pub observed_at: Option<Timestamp>,
    /// The last drift check (`null`: never checked).
    #[serde(default)]
    pub drift: Option<DriftDto>,
    /// The tip's kiln.yaml no longer has the fleet, but it still runs (`kiln down` retires it).
    #[serde(default)]
    pub orphaned: bool,
}

/// A drift check's report (`GET /fleets/{name}/drift`, and in every fleet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftDto {
    /// The fleet.
    pub fleet: String,
    /// When the check ended.
    pub checked_at: Timestamp,
    /// `interval` or `command`.
    pub trigger: String,
    /// The deployed commit compared against.
    pub commit: Option<String>,
    /// The deployed image compared against.
    pub image: Option<String>,
    /// What differs; empty when nothing does.
    pub findings: Vec<FindingDto>,
    /// Parts of the check that could not be done.
    pub errors: Vec<String>,
    /// The record in the log (`origin: drift`) holding the findings as events.
    pub record: Option<u64>,
    /// The `repair` rollout started for it (`drift.mode: repair`).
    pub repair: Option<u64>,
}

/// One drift finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingDto {
    /// `off_image`, `not_running`, `missing`, `unknown`, `backend`, `infra`.
    pub kind: String,
    /// The instance or backend concerned.
    pub subject: Option<String>,
    /// In words.
    pub message: String,
}

impl From<&crate::drift::DriftReport> for DriftDto {
    fn from(report: &crate::drift::DriftReport) -> Self {
        DriftDto {
            fleet: report.fleet.clone(),
            checked_at: report.checked_at,
            trigger: report.trigger.clone(),
            commit: report.revision.as_ref().map(|r| r.0.clone()),
            image: report.image.as_ref().map(|i| i.0.clone()),
            findings: report
                .findings
                .iter()
                .map(|f| FindingDto {
                    kind: serde_json::to_value(f.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    subject: f.subject.clone(),
                    message: f.message.clone(),
                })
                .collect(),
            errors: report.errors.clone(),
            record: report.record.map(|id| id.0),
            repair: report.repair.map(|id| id.0),
        }
    }
}

impl From<&FleetStatus> for FleetDto {
    fn from(fleet: &FleetStatus) -> Self {
        FleetDto {
            name: fleet.name.clone(),
            provider: fleet.provider.clone(),
            revision: fleet.revision.as_ref().map(|r| r.0.clone()),
            image: fleet.image.as_ref().map(|i| i.0.clone()),
            capacity: fleet.capacity,
            active_rollout: fleet.active_rollout.map(|id| id.0),
            active_state: fleet.active_state,
            endpoint: fleet.endpoint.clone(),
            instances: fleet.instances.iter().map(InstanceDto::from).collect(),
            observed_at: fleet.observed_at,
            drift: fleet.drift.as_ref().map(DriftDto::from),
            orphaned: fleet.orphaned,
        }
    }
}

/// An instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDto {
    /// Provider id.
    pub id: String,
    /// Image.
    pub image: String,
    /// `host:port`.
    pub address: Option<String>,
    /// Running.
    pub running: bool,
    /// In the load balancer.
    pub attached: bool,
    /// Last health check.
    pub healthy: Option<bool>,
}

impl From<&InstanceStatus> for InstanceDto {
    fn from(instance: &InstanceStatus) -> Self {
        InstanceDto {
            id: instance.id.0.clone(),
            image: instance.image.0.clone(),
            address: instance.address.clone(),
            running: instance.running,
            attached: instance.attached,
            healthy: instance.healthy,
        }
    }
}

/// One entry of a fleet's instance journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEventDto {
    /// Sequence number.
    pub seq: u64,
    /// Instance.
    pub instance: String,
    /// Its image.
    pub image: Option<String>,
    /// Rollout that caused it.
    pub rollout: Option<u64>,
    /// `launched`, `healthy`, `attached`, `drained`, `terminated`, ...
    pub action: String,
    /// When.
    pub at: Timestamp,
    /// Why.
    pub reason: Option<String>,
}

impl From<&InstanceEvent> for InstanceEventDto {
    fn from(event: &InstanceEvent) -> Self {
        let action = serde_json::to_value(event.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        InstanceEventDto {
            seq: event.seq,
            instance: event.instance.0.clone(),
            image: event.image.as_ref().map(|i| i.0.clone()),
            rollout: event.rollout.map(|id| id.0),
            action,
            at: event.at,
            reason: event.reason.clone(),
        }
    }
}

/// `GET /fleets/{name}/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetInstances {
    /// The fleet.
    pub fleet: String,
    /// Instances as last observed.
    pub instances: Vec<InstanceDto>,
    /// The instance journal, oldest first.
    pub journal: Vec<InstanceEventDto>,
}

/// A commit kiln has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitDto {
    /// Full id.
    pub revision: String,
    /// Parents.
    pub parents: Vec<String>,
    /// First line.
    pub summary: String,
    /// `Name <email>`.
    pub author: String,
    /// Commit time.
    pub committed_at: Timestamp,
    /// When kiln recorded it.
    pub seen_at: Timestamp,
    /// `initial`, `push`, `force_push`, `branch_created`, `branch_deleted`.
    pub kind: String,
    /// For a force push, the tip that was overwritten.
    pub overwrote: Option<String>,
    /// What noticed it.
    pub trigger: String,
    /// Whether it was the tip of its fetch.
    pub tip: bool,
    /// What became of it (`GET /commits` fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<CommitOutcomeDto>,
}

/// What became of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitOutcomeDto {
    /// `rollouts` (it produced the rollouts listed), `skipped`, `failed` (e.g. a broken
    /// manifest), `branch_deleted` (this entry records the branch's deletion) or `pending`
    /// (the tip, not planned yet).
    pub status: String,
    /// Why, for `skipped`, `failed` and `branch_deleted`.
    pub reason: Option<String>,
    /// The fleet rollouts it produced, oldest first.
    pub rollouts: Vec<CommitRolloutDto>,
}

/// A rollout a commit produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRolloutDto {
    /// Rollout id.
    pub id: u64,
    /// The fleet.
    pub fleet: String,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it ended as it did.
    pub reason: Option<String>,
}

/// Commits seen, newest first, each with what became of it: the rollouts it produced, or the
/// commit-level record that says why it produced none (skipped, failed), or that it is not
/// the tip of its fetch (only tips are deployed). Shared by `GET /commits` and the CLI's
/// offline `kiln log --commits`.
pub fn commit_log(store: &crate::store::Store, limit: usize) -> Result<Vec<CommitDto>, StoreError> {
    let commits = store.commits(limit)?;
    // Each commit's rollouts through the commit index: the cost follows the page.
    let mut by_revision: BTreeMap<&str, Vec<Rollout>> = BTreeMap::new();
    for commit in &commits {
        if by_revision.contains_key(commit.revision.as_str()) {
            continue;
        }
        let found = store.rollouts(&RolloutFilter {
            commit: Some(commit.revision.0.clone()),
            ..RolloutFilter::default()
        })?;
        // The index matches a prefix; a full revision only matches itself, but be exact.
        let found = found.into_iter().filter(|r| r.revision == commit.revision).collect();
        by_revision.insert(commit.revision.as_str(), found);
    }
    // Newest first: a branch deletion (recorded after the commit it names) claims the newest
    // commit-level record of that revision; the commit's own entry gets the rest.
    let mut claimed: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(commits.len());
    for commit in &commits {
        let mut dto = CommitDto::from(commit);
        let records = by_revision.get(commit.revision.as_str()).map_or(&[][..], Vec::as_slice);
        let commit_level = |r: &&Rollout| {
            r.fleet.is_none()
                && r.origin == Origin::Commit
                && !claimed.contains(&r.id.0)
                // A failed fetch is recorded against the tip it could not move past.
                && !(r.summary == "fetch failed"
                    && r.reason.as_deref().is_some_and(|w| w.starts_with("fetch failed")))
        };
        let outcome = if commit.kind == CommitKind::BranchDeleted {
            let record =
                records.iter().find(|r| commit_level(r) && r.state == RolloutState::Skipped);
            let reason = record.and_then(|r| r.reason.clone());
            if let Some(record) = record {
                claimed.insert(record.id.0);
            }
            CommitOutcomeDto {
                status: "branch_deleted".into(),
                reason: Some(reason.unwrap_or_else(|| "the branch was deleted".into())),
                rollouts: vec![],
            }
        } else {
            let mut fleets: Vec<CommitRolloutDto> = records
                .iter()
                .filter(|r| r.origin == Origin::Commit)
                .filter_map(|r| {
                    Some(CommitRolloutDto {
                        id: r.id.0,
                        fleet: r.fleet.clone()?,
                        state: r.state,
                        reason: r.reason.clone(),
                    })
                })
                .collect();
            fleets.sort_by_key(|r| r.id);
            let level = records.iter().find(commit_level);
            match (fleets.is_empty(), level) {
                (false, _) => {
                    CommitOutcomeDto { status: "rollouts".into(), reason: None, rollouts: fleets }
                }
                (true, Some(record)) => CommitOutcomeDto {
                    status: record.state.as_str().to_owned(),
                    reason: record.reason.clone(),
                    rollouts: vec![],
                },
                (true, None) if !commit.tip => CommitOutcomeDto {
                    status: "skipped".into(),
                    reason: Some(
                        "not the tip of its fetch: a newer commit arrived with it, and only the tip is deployed"
                            .into(),
                    ),
                    rollouts: vec![],
                },
                (true, None) => CommitOutcomeDto {
                    status: "pending".into(),
                    reason: Some("not planned yet".into()),
                    rollouts: vec![],
                },
            }
        };
        dto.outcome = Some(outcome);
        out.push(dto);
    }
    Ok(out)
}

/// `GET /gc`: the last garbage collection and the running totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcDto {
    /// The last run that removed something (`null` before the first).
    pub last: Option<crate::gc::Report>,
    /// Totals over every run that removed something.
    pub totals: crate::gc::Totals,
}

impl From<&CommitRecord> for CommitDto {
    fn from(commit: &CommitRecord) -> Self {
        let (kind, overwrote) = match &commit.kind {
            CommitKind::Initial => ("initial", None),
            CommitKind::Push => ("push", None),
            CommitKind::ForcePush { previous } => ("force_push", Some(previous.0.clone())),
            CommitKind::BranchCreated => ("branch_created", None),
            CommitKind::BranchDeleted => ("branch_deleted", None),
        };
        CommitDto {
            revision: commit.revision.0.clone(),
            parents: commit.parents.iter().map(|p| p.0.clone()).collect(),
            summary: commit.summary.clone(),
            author: commit.author.clone(),
            committed_at: commit.committed_at,
            seen_at: commit.seen_at,
            kind: kind.to_owned(),
            overwrote,
            trigger: commit.trigger.clone(),
            tip: commit.tip,
            outcome: None,
        }
    }
}

/// Answer of a verb or `POST /trigger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Always `accepted`.
    pub status: String,
    /// The rollout affected or created (verbs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<u64>,
}

/// Body of `POST /fleets/{name}/rollback` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// A commit (prefix) whose image to restore.
    #[serde(default)]
    pub to: Option<String>,
}

/// Body of `POST /fleets/{name}/deploy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    /// The commit to deploy (a full id or a prefix of at least 7 hex digits) on the tracked
    /// branch's history.
    pub commit: String,
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/fleets", get(fleets))
        .route("/fleets/{name}/instances", get(instances))
        .route("/fleets/{name}/drift", get(drift_report).post(drift_verb))
        .route("/fleets/{name}/{verb}", post(verb))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/events", get(follow))
        .route("/events", get(events))
        .route("/events/stream", get(event_stream))
        .route("/commits", get(commits))
        .route("/gc", get(gc))
        .route("/notify", get(notify_status))
        .route("/trigger", post(trigger))
}

/// The check of every mutating call: same origin, then the API token or a dashboard session
/// with its CSRF token (`auth.rs`).
fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    super::auth::authorize(shared, headers).map(|_| ())
}

fn parse_id(text: &str) -> Result<RolloutId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("`{text}` is not a rollout id"))
    })
}

async fn fleets(State(shared): State<Shared>) -> Json<Vec<FleetDto>> {
    Json(shared.app.operator.fleet_status().iter().map(FleetDto::from).collect())
}

async fn instances(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<FleetInstances>, ApiError> {
    let fleet = shared.app.operator.fleet_status().into_iter().find(|f| f.name == name);
    let journal = shared.app.operator.store.instance_journal(&name)?;
    if fleet.is_none() && journal.is_empty() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no fleet `{name}`")));
    }
    Ok(Json(FleetInstances {
        fleet: name,
        instances: fleet
            .map(|f| f.instances.iter().map(InstanceDto::from).collect())
            .unwrap_or_default(),
        journal: journal.iter().map(InstanceEventDto::from).collect(),
    }))
}

/// Query of `GET /rollouts`.
#[derive(Debug, Default, Deserialize)]
struct RolloutQuery {
    fleet: Option<String>,
    commit: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    before: Option<u64>,
}

async fn rollouts(
    State(shared): State<Shared>,
    Query(query): Query<RolloutQuery>,
) -> Result<Json<RolloutPage>, ApiError> {
    let state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => Some(RolloutState::parse(text).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("unknown rollout state `{text}`"))
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let filter = RolloutFilter {
        fleet: query.fleet.filter(|s| !s.is_empty()),
        commit: query.commit.filter(|s| !s.is_empty()),
        state,
        before: query.before.map(RolloutId),
        limit: Some(limit),
    };
    let found = shared.app.operator.store.rollouts(&filter)?;
    let next_before = if found.len() == limit { found.last().map(|r| r.id.0) } else { None };
    Ok(Json(RolloutPage {
        rollouts: found.iter().map(RolloutDto::from_rollout).collect(),
        next_before,
    }))
}

async fn rollout(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<RolloutDto>, ApiError> {
    let id = parse_id(&id)?;
    let store = &shared.app.operator.store;
    let mut dto = RolloutDto::from_rollout(&store.rollout(id)?);
    dto.events = Some(store.events(id, 0)?.iter().map(EventDto::from).collect());
    Ok(Json(dto))
}

/// Query of `GET /commits`.
#[derive(Debug, Default, Deserialize)]
struct CommitQuery {
    limit: Option<usize>,
}

async fn commits(
    State(shared): State<Shared>,
    Query(query): Query<CommitQuery>,
) -> Result<Json<Vec<CommitDto>>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    Ok(Json(commit_log(&shared.app.operator.store, limit)?))
}

async fn gc(State(shared): State<Shared>) -> Result<Json<GcDto>, ApiError> {
    let store = &shared.app.operator.store;
    Ok(Json(GcDto {
        last: store.get_meta(crate::gc::LAST_KEY)?,
        totals: store.get_meta(crate::gc::TOTALS_KEY)?.unwrap_or_default(),
    }))
}

/// `GET /notify`: the notification outbox (pending per sink, dead letters).
async fn notify_status(
    State(shared): State<Shared>,
) -> Result<Json<crate::notify::OutboxStatus>, ApiError> {
    Ok(Json(crate::notify::status(&shared.app.operator.store)?))
}

async fn verb(
    State(shared): State<Shared>,
    Path((fleet, verb)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    // The token (or session and CSRF token) is checked before a byte of the body is read.
    let by = super::auth::authorize(&shared, &headers)?;
    let body = shared
        .bodies
        .read(&headers, body, super::MAX_API_BODY, shared.app.config.limits.body_timeout)
        .await
        .map_err(|error| ApiError::new(error.status(), error.to_string()))?;
    let body = body.bytes;
    let command = match verb.as_str() {
        "pause" => Command::Pause { fleet },
        "resume" => Command::Resume { fleet },
        "abort" => Command::Abort { fleet },
        "drift" => Command::Drift { fleet },
        "retry" => Command::Retry { fleet },
        "down" => Command::Down { fleet },
        "deploy" => {
            let body: DeployBody = serde_json::from_slice(&body).map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("bad deploy body (want {{\"commit\": \"<id>\"}}): {error}"),
                )
            })?;
            Command::Deploy { fleet, commit: body.commit }
        }
        "rollback" => {
            let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
                RollbackBody::default()
            } else {
                serde_json::from_slice(&body).map_err(|error| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("bad rollback body: {error}"))
                })?
            };
            Command::Rollback { fleet, to: body.to.filter(|s| !s.is_empty()) }
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown verb `{other}` (pause, resume, abort, rollback, retry, deploy, down, drift)"
                ),
            ));
        }
    };
    tracing::info!(command = ?command, by = ?by, "Operator verb received over the API.");
    match shared.app.operator.command(command).await {
        Ok(id) => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                status: "accepted".into(),
                rollout: (id != crate::operator::NO_ROLLOUT).then_some(id.0),
            }),
        )),
        Err(error) => Err(ApiError::new(
            StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error.message,
        )),
    }
}

/// `POST /fleets/{name}/drift`: starts a drift check in the background (202; the report
/// appears in `GET /fleets/{name}/drift` and in the fleet's status when it ends).
async fn drift_verb(
    State(shared): State<Shared>,
    Path(fleet): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    verb(State(shared), Path((fleet, "drift".to_owned())), headers, body).await
}

/// `GET /fleets/{name}/drift`: the fleet's last drift report (404 if never checked).
async fn drift_report(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<DriftDto>, ApiError> {
    // The fleet's reconciler holds the newest report (an unchanged clean one is not rewritten).
    let live = shared
        .app
        .operator
        .fleets
        .read()
        .ok()
        .and_then(|view| view.get(&name).and_then(|status| status.drift.clone()));
    let report = match live {
        Some(report) => Some(report),
        None => crate::drift::last_report(&shared.app.operator.store, &name)?,
    };
    match report {
        Some(report) => Ok(Json(DriftDto::from(&report))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("fleet `{name}` has no drift report yet"),
        )),
    }
}

async fn trigger(
    State(shared): State<Shared>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    authorize(&shared, &headers)?;
    shared.app.operator.source.trigger("api");
    Ok((StatusCode::ACCEPTED, Json(Accepted { status: "accepted".into(), rollout: None })))
}

/// `GET /metrics`: the shared counters plus rollouts by state counted from the store.
pub(crate) async fn metrics(State(shared): State<Shared>) -> Result<Response, ApiError> {
    let mut by_state: BTreeMap<String, u64> =
        ALL_STATES.iter().map(|s| (s.as_str().to_owned(), 0)).collect();
    for (state, n) in shared.app.operator.store.rollout_counts()? {
        *by_state.entry(state.as_str().to_owned()).or_default() += n;
    }
    let text = shared.app.operator.metrics.render(&by_state);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// How often a follower re-reads the rollout in case it ended without a new event.
const FOLLOW_RECHECK: Duration = Duration::from_secs(1);

/// `GET /rollouts/{id}/events` as Server-Sent Events: every stored event (after `Last-Event-ID`
/// if given), then live ones, then a final `end` event carrying the rollout once it is terminal.
async fn follow(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let store = shared.app.operator.store.clone();
    // Subscribe before reading history so nothing falls between the two.
    let mut live = store.subscribe();
    store.rollout(id)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let mut last = after;
        let send_stored = |last: &mut u64| -> Vec<SseEvent> {
            // Only events known flushed, in seq order (see `Store::events_after`).
            let durable = store.durable_seq();
            let mut stored = store.events(id, *last).unwrap_or_default();
            stored.retain(|e| e.seq <= durable);
            if let Some(event) = stored.last() {
                *last = event.seq;
            }
            stored.iter().map(sse_event).collect()
        };
        for event in send_stored(&mut last) {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let mut recheck = tokio::time::interval(FOLLOW_RECHECK);
        loop {
            match store.rollout(id) {
                Ok(rollout) if rollout.state.is_terminal() => {
                    // Anything appended between the last read and the terminal state.
                    for event in send_stored(&mut last) {
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    let dto = RolloutDto::from_rollout(&rollout);
                    let end = SseEvent::default()
                        .event("end")
                        .data(serde_json::to_string(&dto).unwrap_or_default());
                    let _ = tx.send(Ok(end)).await;
                    return;
                }
                Ok(_) => {}
                // Pruned or unreadable: nothing more will come.
                Err(_) => return,
            }
            tokio::select! {
                received = live.recv() => match received {
                    // Read from the store, not taken from the message: two writers may
                    // publish out of seq order, and the store has both in order.
                    Ok(event) if event.rollout == id && event.seq > last => {
                        for event in send_stored(&mut last) {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        for event in send_stored(&mut last) {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = recheck.tick() => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .event("event")
        .id(event.seq.to_string())
        .data(serde_json::to_string(&EventDto::from(event)).unwrap_or_default())
}

/// Query of `GET /events` and `GET /events/stream`.
#[derive(Debug, Default, Deserialize)]
struct EventQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /events?after=SEQ&limit=N`: the feed of every rollout's events with `seq > after`,
/// ascending, one page at a time.
async fn events(
    State(shared): State<Shared>,
    Query(query): Query<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let store = &shared.app.operator.store;
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(DEFAULT_EVENT_LIMIT).clamp(1, MAX_LIMIT);
    let latest = store.durable_seq();
    let page = store.events_after(after, limit)?;
    let next_after = page.last().map_or(after, |e| e.seq);
    Ok(Json(EventPage { events: page.iter().map(EventDto::from).collect(), next_after, latest }))
}

/// How many events the stream reads from the store at a time.
const STREAM_PAGE: usize = 256;

/// The sequence number a stream resumes after: `Last-Event-ID` (what an SSE client sends
/// when it reconnects) wins over `?after=` (what it was first opened with), else 0.
fn resume_point(headers: &HeaderMap, after: Option<u64>) -> Result<u64, ApiError> {
    match headers.get("last-event-id") {
        Some(value) => {
            let text = value.to_str().unwrap_or("").trim();
            if text.is_empty() {
                return Ok(after.unwrap_or(0));
            }
            text.parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("`Last-Event-ID: {text}` is not an event sequence number"),
                )
            })
        }
        None => Ok(after.unwrap_or(0)),
    }
}

/// `GET /events/stream` as Server-Sent Events: every event with `seq` above the resume point
/// (`Last-Event-ID`, else `?after=`, else 0), then live ones, each with `id:` = seq. The live
/// feed is subscribed before the backlog is read and every message comes from the store in
/// seq order, so nothing falls between the backlog and the live part and nothing repeats.
async fn event_stream(
    State(shared): State<Shared>,
    Query(query): Query<EventQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, query.after)?;
    let store = shared.app.operator.store.clone();
    // Subscribe before reading the backlog: an event appended in between wakes us below.
    let mut live = store.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let mut last = after;
        let mut read = true;
        loop {
            // Everything after `last` the store holds, in order (backlog, then what woke us).
            if read {
                loop {
                    let page = match store.events_after(last, STREAM_PAGE) {
                        Ok(page) => page,
                        Err(error) => {
                            tracing::warn!(error = %crate::error::chain(&error), "Event stream: store read failed; retrying.");
                            if tx.is_closed() {
                                return;
                            }
                            tokio::time::sleep(FOLLOW_RECHECK).await;
                            continue;
                        }
                    };
                    let Some(end) = page.last().map(|e| e.seq) else { break };
                    for event in &page {
                        if tx.send(Ok(sse_event(event))).await.is_err() {
                            return;
                        }
                    }
                    last = end;
                }
            }
            read = tokio::select! {
                received = live.recv() => match received {
                    // Not yet sent: read it (and anything before it) from the store.
                    Ok(event) => event.seq > last,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            };
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
}
