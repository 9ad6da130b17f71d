//! The recorder: turns source events into records, off the router's loop. Commits are recorded
//! in order, the new tip is planned (git reads in `spawn_blocking`) and each fleet that needs
//! work gets a rollout record; the router is then told, and hands each rollout to its fleet.
//! Events the store could not record (a full disk) are retried, in order, until it can.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fleet::Prepared;
use super::{TIP_KEY, record_commit_level};
use crate::manifest::Fleet;
use crate::model::{Revision, RolloutId};
use crate::planner::{self, CommitPlan};
use crate::rollout::state::{Origin, Rollout, RolloutState};
use crate::source::SourceEvent;
use crate::store::{
    CommitKind, CommitRecord, Event, EventKind, Level, RolloutFilter, Store, StoreError,
};

/// At most one "fetch failed" entry in the log per this interval while the remote stays down.
const FETCH_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(600);
/// How often events the store could not record are tried again.
const RETRY: Duration = Duration::from_secs(2);
/// Bound on queued events while the store fails (each holds a fetch's new commits).
const MAX_UNRECORDED: usize = 1024;

/// Where the next push is planned from: the last tip whose plan was applied (meta key).
pub const PLANNED_KEY: &str = "plan.base";

/// Whether a tip's plan was applied.
enum Applied {
    /// Its rollouts were created (or none was needed).
    Yes(Planned),
    /// The commit could not be planned (no manifest, a broken one, unreadable): plan the next
    /// push afresh.
    Afresh,
    /// The signature gate refused the push: nothing of it applies.
    Blocked,
}

/// What planning a tip produced.
#[derive(Debug, Default)]
pub struct Planned {
    /// The fleets of the tip's manifest (when it parsed).
    pub fleets: Option<Vec<Fleet>>,
    /// New rollouts, per fleet, with the fleet as planned.
    pub rollouts: Vec<(RolloutId, Prepared)>,
}

pub struct Recorder {
    pub store: Store,
    pub mirror: PathBuf,
    pub branch: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub out: mpsc::UnboundedSender<Planned>,
    /// Signature verification the daemon's flags impose (else `verify:` in the manifest).
    pub verify: Option<crate::verify::DaemonPolicy>,
    last_fetch_failure_logged: Option<tokio::time::Instant>,
    unrecorded: VecDeque<SourceEvent>,
}

impl Recorder {
    pub fn new(
        store: Store,
        mirror: PathBuf,
        branch: String,
        metrics: Arc<crate::metrics::Metrics>,
        out: mpsc::UnboundedSender<Planned>,
    ) -> Recorder {
        Recorder {
            store,
            mirror,
            branch,
            metrics,
            out,
            verify: None,
            last_fetch_failure_logged: None,
            unrecorded: VecDeque::new(),
        }
    }

    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => {
                        self.unrecorded.push_back(event);
                        // Take whatever else arrived meanwhile too, in order.
                        while let Ok(event) = events.try_recv() {
                            self.unrecorded.push_back(event);
                        }
                        self.record_all().await;
                    }
                    None => break,
                },
                () = tokio::time::sleep(RETRY), if !self.unrecorded.is_empty() => {
                    if let Err(error) = self.store.heal() {
                        tracing::debug!(error = %crate::error::chain(&error), "The store still fails.");
                    }
                    self.record_all().await;
                }
            }
        }
    }

    /// Handles the events not recorded yet, in order. One that fails because the store cannot
    /// write stays queued (with those after it); recording is idempotent (commits are
    /// deduplicated, a planned tip is not planned again).
    async fn record_all(&mut self) {
        while let Some(event) = self.unrecorded.pop_front() {
            let keep = match &event {
                SourceEvent::Commits(_) | SourceEvent::BranchDeleted(_) => Some(event.clone()),
                // A fetch failure is reported again by the next failing fetch.
                SourceEvent::FetchFailed { .. } => None,
            };
            let Err(error) = self.on_source(event).await else { continue };
            let store_failed = error
                .chain()
                .any(|cause| cause.downcast_ref::<StoreError>().is_some_and(StoreError::is_io));
            match keep {
                Some(event) if store_failed => {
                    tracing::warn!(error = %format!("{error:#}"), "Could not record a source event; retrying when the store works again.");
                    self.unrecorded.push_front(event);
                    if self.unrecorded.len() > MAX_UNRECORDED {
                        self.unrecorded.pop_front();
                        tracing::error!("Dropped the oldest unrecorded source event.");
                    }
                    return;
                }
                _ => {
                    tracing::error!(error = %format!("{error:#}"), "Could not record a source event.")
                }
            }
        }
    }

    async fn on_source(&mut self, event: SourceEvent) -> anyhow::Result<()> {
        match event {
            SourceEvent::Commits(commits) => self.on_commits(commits).await,
            SourceEvent::BranchDeleted(record) => {
                if self.store.record_commit(&record)? {
                    let reason = format!(
                        "branch `{}` was deleted on the remote; fleets keep running as they are",
                        self.branch
                    );
                    tracing::warn!(revision = %record.revision, "{reason}");
                    record_commit_level(&self.store, &record, RolloutState::Skipped, reason)?;
                }
                Ok(())
            }
            SourceEvent::FetchFailed { message, trigger } => {
                // The watcher counts fetch errors in the metrics and logs them (deduplicated).
                tracing::debug!(trigger = %trigger, error = %message, "Fetch failed.");
                let due = self
                    .last_fetch_failure_logged
                    .is_none_or(|at| at.elapsed() >= FETCH_FAILURE_LOG_INTERVAL);
                if due {
                    self.last_fetch_failure_logged = Some(tokio::time::Instant::now());
                    let tip = self
                        .store
                        .get_meta::<Revision>(TIP_KEY)?
                        .unwrap_or_else(|| Revision(String::new()));
                    let record = CommitRecord {
                        revision: tip,
                        parents: vec![],
                        summary: "fetch failed".into(),
                        author: String::new(),
                        committed_at: crate::model::now(),
                        seen_at: crate::model::now(),
                        kind: CommitKind::Push,
                        trigger,
                        tip: false,
                    };
                    record_commit_level(
                        &self.store,
                        &record,
                        RolloutState::Failed,
                        format!("fetch failed: {message}"),
                    )?;
                }
                self.store.set_meta("source.last_error", &message)?;
                Ok(())
            }
        }
    }

    async fn on_commits(&mut self, commits: Vec<CommitRecord>) -> anyhow::Result<()> {
        for commit in &commits {
            if self.store.record_commit(commit)? {
                self.metrics.commit_seen();
                tracing::info!(revision = %commit.revision.short(), kind = ?commit.kind, trigger = %commit.trigger, "Commit recorded.");
            }
        }
        let Some(tip) = commits.iter().rev().find(|c| c.tip).or(commits.last()).cloned() else {
            return Ok(());
        };
        // A crash between planning and acknowledging re-sends the tip: plan it once only. A
        // force push or a recreated branch pointing at an older commit changes what should be
        // deployed, so it is planned again even though that commit was planned before.
        let acknowledged =
            self.store.get_meta::<Revision>(TIP_KEY)?.as_ref() == Some(&tip.revision);
        let moved_back =
            matches!(tip.kind, CommitKind::ForcePush { .. } | CommitKind::BranchCreated);
        let planned = acknowledged
            || (!moved_back
                && !self
                    .store
                    .rollouts(&RolloutFilter {
                        commit: Some(tip.revision.0.clone()),
                        limit: Some(1),
                        ..RolloutFilter::default()
                    })?
                    .is_empty());
        // What was planned last: the new tip is planned against it (only what changed between
        // the two), unless history moved back (a force push, a recreated branch): then afresh.
        let since = if moved_back { None } else { self.store.get_meta::<Revision>(PLANNED_KEY)? };
        let result = if planned { Planned::default() } else { self.plan_tip(&tip, since).await? };
        self.store.set_meta(TIP_KEY, &tip.revision)?;
        if result.fleets.is_some() || !result.rollouts.is_empty() {
            let _ = self.out.send(result);
        }
        Ok(())
    }

    /// Plans the tip against `since` and creates its rollouts. Only a plan that was applied
    /// (its rollouts created, or none needed) becomes the base the next push is planned
    /// against ([`PLANNED_KEY`]); a broken manifest or a commit that could not be read plans
    /// the next push afresh, and a push the signature gate blocked leaves the base where it was.
    async fn plan_tip(
        &mut self,
        tip: &CommitRecord,
        since: Option<Revision>,
    ) -> anyhow::Result<Planned> {
        let planned = self.plan_and_create(tip, since).await?;
        match &planned {
            Applied::Yes(_) => self.store.set_meta(PLANNED_KEY, &tip.revision)?,
            Applied::Afresh => self.store.remove_meta(PLANNED_KEY)?,
            Applied::Blocked => {}
        }
        Ok(match planned {
            Applied::Yes(planned) => planned,
            Applied::Afresh | Applied::Blocked => Planned::default(),
        })
    }

    async fn plan_and_create(
        &mut self,
        tip: &CommitRecord,
        since: Option<Revision>,
    ) -> anyhow::Result<Applied> {
        let mirror = self.mirror.clone();
        let revision = tip.revision.clone();
        let store = self.store.clone();
        let deployed = move |fleet: &str| store.deployed(fleet).ok().flatten();
        let plan = tokio::task::spawn_blocking(move || {
            planner::plan_commit(&mirror, &revision, since.as_ref(), &deployed)
        })
        .await?;
        let note = match &tip.kind {
            CommitKind::ForcePush { previous } => {
                Some(format!("force-push: history rewritten (previous tip {})", previous.short()))
            }
            CommitKind::BranchCreated => Some(format!("branch `{}` recreated", self.branch)),
            _ => None,
        };
        let with_note = |reason: String| match &note {
            Some(note) => format!("{note}; {reason}"),
            None => reason,
        };
        let store = &self.store;
        let plans = match plan {
            Err(error) => {
                let reason = format!("could not read the commit: {}", crate::error::chain(&error));
                record_commit_level(store, tip, RolloutState::Failed, with_note(reason))?;
                return Ok(Applied::Afresh);
            }
            Ok(CommitPlan::NoManifest) => {
                let reason = format!(
                    "no {} at the repo root; nothing to deploy",
                    crate::manifest::MANIFEST_FILE
                );
                record_commit_level(store, tip, RolloutState::Skipped, with_note(reason))?;
                return Ok(Applied::Afresh);
            }
            Ok(CommitPlan::Invalid(error)) => {
                let reason = format!("invalid manifest, fleets left as they are: {error}");
                let rollout =
                    record_commit_level(store, tip, RolloutState::Failed, with_note(reason))?;
                for problem in &error.problems {
                    store.append_event(
                        rollout.id,
                        Level::Error,
                        EventKind::Manifest,
                        problem.to_string(),
                        None,
                    )?;
                }
                tracing::error!(revision = %tip.revision.short(), error = %error, "Invalid manifest.");
                return Ok(Applied::Afresh);
            }
            Ok(CommitPlan::Fleets(plans)) => plans,
        };
        let fleet_count = plans.index.fleets().len();
        // Signatures are checked before anything is created: a blocked push is one failed
        // record and no rollout (see `crate::verify`).
        let mut verified = None;
        if plans.plans.iter().any(|p| !p.is_noop()) {
            let gate = crate::verify::gate(
                store,
                &self.mirror,
                tip,
                self.verify.as_ref(),
                note.as_deref(),
            );
            match gate.await? {
                crate::verify::Gate::Open(result) => verified = result,
                crate::verify::Gate::Closed => {
                    // Nothing of this push was applied: the next one is planned against the
                    // last push that was (or afresh), so this push's fleets are not forgotten.
                    return Ok(Applied::Blocked);
                }
            }
        }
        let mut planned = Planned {
            // The reconcilers learn the manifest again only when its fleets changed.
            fleets: plans.manifest_changed.then(|| plans.index.fleets().to_vec()),
            rollouts: Vec::new(),
        };
        let unchanged = fleet_count - plans.plans.len();
        let mut skipped = Vec::new();
        let mut batch = Vec::new();
        let mut prepared = Vec::new();
        for fleet_plan in plans.plans {
            if fleet_plan.is_noop() {
                skipped.push(format!("{}: {}", fleet_plan.fleet.name, fleet_plan.plan.reason));
                continue;
            }
            let name = fleet_plan.fleet.name.clone();
            let previous_image = store.deployed(&name)?.map(|d| d.image);
            let mut record = Rollout::new(
                Some(name.clone()),
                tip.revision.clone(),
                tip.summary.clone(),
                tip.trigger.clone(),
                Origin::Commit,
                crate::model::now(),
            );
            record.plan = fleet_plan.plan.clone();
            record.previous_image = previous_image;
            record.verified = verified.clone();
            let mut events = Vec::new();
            if let Some(note) = &note {
                events.push(Event::new(
                    RolloutId(0),
                    Level::Warn,
                    EventKind::Source,
                    note.clone(),
                    None,
                ));
            }
            events.push(Event::new(
                RolloutId(0),
                Level::Info,
                EventKind::Plan,
                format!(
                    "{} (bake: [{}], reconcile: {}, roll: {})",
                    fleet_plan.plan.reason,
                    fleet_plan.plan.bake.join(", "),
                    fleet_plan.plan.reconcile,
                    fleet_plan.plan.roll
                ),
                Some(serde_json::json!({ "trees": fleet_plan.trees })),
            ));
            batch.push((record, events));
            prepared.push(Prepared { fleet: fleet_plan.fleet, trees: fleet_plan.trees });
        }
        // Every rollout of the push in one write: a push touching a thousand fleets is recorded
        // in one flush.
        let created = store.create_rollouts(batch)?;
        for (rollout, prepared) in created.into_iter().zip(prepared) {
            tracing::info!(rollout = %rollout.id, fleet = %prepared.fleet.name, revision = %tip.revision.short(), "Rollout planned.");
            planned.rollouts.push((rollout.id, prepared));
        }
        if skipped.len() + unchanged == fleet_count {
            // Bounded: a commit touching none of a thousand fleets is one short line.
            const NAMED: usize = 5;
            let mut parts: Vec<String> = skipped.iter().take(NAMED).cloned().collect();
            if skipped.len() > NAMED {
                parts.push(format!("{} more like these", skipped.len() - NAMED));
            }
            if unchanged > 0 {
                let s = if unchanged == 1 { "" } else { "s" };
                parts.push(format!("{unchanged} fleet{s} with nothing they track changed"));
            }
            let reason = format!("touches no fleet's paths ({})", parts.join("; "));
            record_commit_level(store, tip, RolloutState::Skipped, with_note(reason))?;
        }
        Ok(Applied::Yes(planned))
    }
}
