//! The daemon's event loop: source events, operator commands and timers in, one serial lane per
//! fleet out (newest commit wins).
//!

use crate::manifest::{Fleet, ProviderSpec};
use crate::model::{ImageRef, Revision};
use crate::planner::{self, CommitPlan};
use crate::provider::SharedProvider;
use crate::rollout::driver::{self, DriverEnv};
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};
use crate::rollout::step::Control;
use crate::source::SourceEvent;
use crate::store::{CommitKind, CommitRecord, Level, RolloutFilter, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::RolloutId;
use crate::source::SourceHandle;
use crate::store::Store;

/// An operator verb, as the CLI and API send it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum Command {
    /// Stop the fleet's running rollout at the next safe point.
    Pause {
        /// Fleet.
        fleet: String,
    },
    /// Continue a paused rollout (also promotes a manual canary).
    Resume {
        /// Fleet.
        fleet: String,
    },
    /// Stop the fleet's rollout for good at the next safe point.
    Abort {
        /// Fleet.
        fleet: String,
    },
    /// Put the fleet back on a previous image (the one before the current, or `to`'s).
    Rollback {
        /// Fleet.
        fleet: String,
        /// A commit (prefix) whose image to restore.
        #[serde(default)]
        to: Option<String>,
    },
}

impl Command {
    /// The fleet the verb applies to.
    pub fn fleet(&self) -> &str {
        match self {
            Command::Pause { fleet }
            | Command::Resume { fleet }
            | Command::Abort { fleet }
            | Command::Rollback { fleet, .. } => fleet,
        }
    }
}

/// Why a verb was refused (shown to the user as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct CommandError {
    /// HTTP-ish status: 404 unknown fleet/commit, 409 not applicable now, 500 internal.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

/// A verb plus where to send its answer.
#[derive(Debug)]
pub struct CommandRequest {
    /// The verb.
    pub command: Command,
    /// The rollout affected or created.
    pub reply: oneshot::Sender<Result<RolloutId, CommandError>>,
}

/// What the API holds to talk to the running operator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OperatorHandle {
    /// The store (read-only use by the API).
    pub store: Store,
    /// The watcher (webhooks trigger fetches through it).
    pub source: SourceHandle,
    /// Verbs.
    pub commands: mpsc::Sender<CommandRequest>,
    /// Fleets and their instances, as last observed.
    pub fleets: FleetView,
    /// Metrics shared with the parts that observe.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl OperatorHandle {
    /// A snapshot of every fleet's status.
    pub fn fleet_status(&self) -> Vec<FleetStatus> {
        self.fleets.read().map(|v| v.clone()).unwrap_or_default()
    }
}

impl OperatorHandle {
    /// Sends a verb and waits for its answer.
    pub async fn command(&self, command: Command) -> Result<RolloutId, CommandError> {
        let (reply, rx) = oneshot::channel();
        let gone = || CommandError { status: 503, message: "the operator is shutting down".into() };
        self.commands.send(CommandRequest { command, reply }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// One fleet as `kiln status` shows it. Kept current by the operator.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FleetStatus {
    /// Fleet name.
    pub name: String,
    /// Provider kind (`local`, `exec`).
    pub provider: String,
    /// The commit the fleet runs, if any rollout succeeded yet.
    pub revision: Option<crate::model::Revision>,
    /// The image the fleet runs.
    pub image: Option<crate::model::ImageRef>,
    /// Capacity from the manifest.
    pub capacity: u32,
    /// The rollout in progress, if any.
    pub active_rollout: Option<RolloutId>,
    /// Its state.
    pub active_state: Option<crate::rollout::state::RolloutState>,
    /// Where clients reach the fleet (the load balancer URL), when known.
    pub endpoint: Option<String>,
    /// Instances as last observed.
    pub instances: Vec<InstanceStatus>,
    /// When this view was refreshed.
    pub observed_at: Option<crate::model::Timestamp>,
}

/// One instance as `kiln status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    /// Provider id.
    pub id: crate::model::InstanceId,
    /// Its image.
    pub image: crate::model::ImageRef,
    /// `host:port`.
    pub address: Option<String>,
    /// Process / VM running.
    pub running: bool,
    /// In the load balancer.
    pub attached: bool,
    /// Last health check result, if checked.
    pub healthy: Option<bool>,
}

/// The shared, operator-maintained view of every fleet.
pub type FleetView = std::sync::Arc<std::sync::RwLock<Vec<FleetStatus>>>;

// ---------------------------------------------------------------------------------------------
// The event loop.
// ---------------------------------------------------------------------------------------------

/// How often fleet status is refreshed and idle fleets are checked for capacity.
const TICK: Duration = Duration::from_secs(2);
/// At most one "fetch failed" entry in the log per this interval while the remote stays down.
const FETCH_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(600);

/// Settings of the operator (resolved by the daemon).
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Data dir.
    pub data_dir: PathBuf,
    /// The tracked branch (for messages).
    pub branch: String,
    /// The kiln executable (the local provider starts `kiln lb` from it).
    pub kiln_exe: PathBuf,
    /// Garbage collection keeps the images of this many successful rollouts per fleet.
    pub keep_images: usize,
}

/// What occupies a fleet's lane.
struct Job {
    /// The rollout driven, or `None` for a capacity check.
    rollout: Option<RolloutId>,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Lane {
    running: Option<Job>,
    queued: Option<RolloutId>,
    paused: Option<RolloutId>,
}

/// A lane's job finished.
struct JobDone {
    fleet: String,
    rollout: Option<RolloutId>,
    result: Result<RolloutState, String>,
}

/// The operator: owns the lanes; everything it knows that matters is in the store.
pub struct Operator {
    config: OperatorConfig,
    env: Arc<DriverEnv>,
    fleets: BTreeMap<String, Fleet>,
    lanes: BTreeMap<String, Lane>,
    providers: BTreeMap<String, (String, SharedProvider)>,
    view: FleetView,
    done_tx: mpsc::UnboundedSender<JobDone>,
    done_rx: mpsc::UnboundedReceiver<JobDone>,
    last_fetch_failure_logged: Option<tokio::time::Instant>,
    /// When garbage collection runs next (at the first tick, then every `gc::INTERVAL`).
    next_gc: Option<tokio::time::Instant>,
    /// Per fleet, the last local-provider open failure recorded in the log (recorded once).
    provider_failures: BTreeMap<String, String>,
    /// Source events the store could not record yet (a full disk), oldest first. The watcher
    /// has moved on and will not send them again, so they are retried on every tick.
    unrecorded: std::collections::VecDeque<SourceEvent>,
}

type OpResult<T> = Result<T, StoreError>;

impl Operator {
    /// Creates the operator; `view` is shared with the API.
    pub fn new(config: OperatorConfig, env: DriverEnv, view: FleetView) -> Operator {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Operator {
            config,
            env: Arc::new(env),
            fleets: BTreeMap::new(),
            lanes: BTreeMap::new(),
            providers: BTreeMap::new(),
            view,
            done_tx,
            done_rx,
            last_fetch_failure_logged: None,
            next_gc: None,
            provider_failures: BTreeMap::new(),
            unrecorded: std::collections::VecDeque::new(),
        }
    }

    fn store(&self) -> &Store {
        &self.env.store
    }

    /// Runs until `shutdown` fires. Resumes the rollouts a previous run left in motion first.
    pub async fn run(
        mut self,
        mut source_events: mpsc::Receiver<SourceEvent>,
        mut commands: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) {
        if let Err(error) = self.load_fleets_at_tip().await {
            tracing::warn!(error = %format!("{error:#}"), "Could not read the manifest at the recorded tip.");
        }
        if let Err(error) = self.resume_active().await {
            tracing::error!(error = %crate::error::chain(&error), "Could not resume rollouts from the store.");
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = source_events.recv() => {
                    self.unrecorded.push_back(event);
                    self.record_source_events().await;
                }
                Some(request) = commands.recv() => {
                    let res = self.on_command(request.command).await;
                    let _ = request.reply.send(res);
                }
                Some(done) = self.done_rx.recv() => self.on_done(done).await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
        for lane in self.lanes.values_mut() {
            if let Some(job) = lane.running.take() {
                // Every step is persisted before it is taken: the next start resumes from here.
                job.task.abort();
            }
        }
    }

    async fn load_fleets_at_tip(&mut self) -> anyhow::Result<()> {
        let Some(tip) = self.store().get_meta::<Revision>(TIP_KEY)? else {
            return Ok(());
        };
        let mirror = self.env.mirror.clone();
        let manifest =
            tokio::task::spawn_blocking(move || planner::manifest_at(&mirror, &tip)).await??;
        if let Some(Ok(manifest)) = manifest {
            self.fleets = manifest.fleets.into_iter().map(|f| (f.name.clone(), f)).collect();
        }
        Ok(())
    }

    async fn resume_active(&mut self) -> OpResult<()> {
        for rollout in self.store().active_rollouts()? {
            let Some(fleet) = rollout.fleet.clone() else { continue };
            if rollout.state == RolloutState::Paused {
                let lane = self.lanes.entry(fleet).or_default();
                if let Some(older) = lane.paused.replace(rollout.id) {
                    self.supersede(older, rollout.id)?;
                }
                continue;
            }
            tracing::info!(rollout = %rollout.id, fleet = %fleet, state = %rollout.state, "Resuming rollout.");
            self.store().append_event(
                rollout.id,
                Level::Info,
                "resume",
                "daemon restarted; resuming from the recorded state",
                None,
            )?;
            self.enqueue(&fleet, rollout.id).await?;
        }
        Ok(())
    }

    // --- source events ---

    /// Handles the source events not recorded yet, in order. One that fails because the store
    /// cannot write stays queued (with those after it) for the next tick; recording is
    /// idempotent (commits are deduplicated, a planned tip is not planned again).
    async fn record_source_events(&mut self) {
        /// Bound on queued events while the store fails (each holds a fetch's new commits).
        const MAX_UNRECORDED: usize = 1024;
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
                if self.store().record_commit(&record)? {
                    let reason = format!(
                        "branch `{}` was deleted on the remote; fleets keep running as they are",
                        self.config.branch
                    );
                    tracing::warn!(revision = %record.revision, "{reason}");
                    self.record_commit_level(&record, RolloutState::Skipped, reason)?;
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
                        .store()
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
                    self.record_commit_level(
                        &record,
                        RolloutState::Failed,
                        format!("fetch failed: {message}"),
                    )?;
                }
                self.store().set_meta("source.last_error", &message)?;
                Ok(())
            }
        }
    }

    /// A record in the log for a commit that concerns no single fleet.
    fn record_commit_level(
        &self,
        commit: &CommitRecord,
        state: RolloutState,
        reason: String,
    ) -> OpResult<Rollout> {
        let now = crate::model::now();
        let mut record = Rollout::new(
            None,
            commit.revision.clone(),
            commit.summary.clone(),
            commit.trigger.clone(),
            Origin::Commit,
            now,
        );
        record.state = state;
        record.plan = Plan { reason: reason.clone(), ..Plan::default() };
        record.reason = Some(reason.clone());
        record.finished_at = Some(now);
        let rollout = self.store().create_rollout(record)?;
        let level = if state == RolloutState::Failed { Level::Error } else { Level::Info };
        self.store().append_event(
            rollout.id,
            level,
            "state",
            format!("{state}: {reason}"),
            None,
        )?;
        Ok(rollout)
    }

    async fn on_commits(&mut self, commits: Vec<CommitRecord>) -> anyhow::Result<()> {
        for commit in &commits {
            if self.store().record_commit(commit)? {
                self.env.metrics.commit_seen();
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
            self.store().get_meta::<Revision>(TIP_KEY)?.as_ref() == Some(&tip.revision);
        let moved_back =
            matches!(tip.kind, CommitKind::ForcePush { .. } | CommitKind::BranchCreated);
        let planned = acknowledged
            || (!moved_back
                && !self
                    .store()
                    .rollouts(&RolloutFilter {
                        commit: Some(tip.revision.0.clone()),
                        limit: Some(1),
                        ..RolloutFilter::default()
                    })?
                    .is_empty());
        if !planned {
            self.plan_tip(&tip).await?;
        }
        self.store().set_meta(TIP_KEY, &tip.revision)?;
        Ok(())
    }

    async fn plan_tip(&mut self, tip: &CommitRecord) -> anyhow::Result<()> {
        let mirror = self.env.mirror.clone();
        let revision = tip.revision.clone();
        let store = self.store().clone();
        let deployed = move |fleet: &str| store.deployed(fleet).ok().flatten();
        let plan = tokio::task::spawn_blocking(move || {
            planner::plan_commit(&mirror, &revision, &deployed)
        })
        .await?;
        let note = match &tip.kind {
            CommitKind::ForcePush { previous } => {
                Some(format!("force-push: history rewritten (previous tip {})", previous.short()))
            }
            CommitKind::BranchCreated => Some(format!("branch `{}` recreated", self.config.branch)),
            _ => None,
        };
        let with_note = |reason: String| match &note {
            Some(note) => format!("{note}; {reason}"),
            None => reason,
        };
        let plans = match plan {
            Err(error) => {
                let reason = format!("could not read the commit: {}", crate::error::chain(&error));
                self.record_commit_level(tip, RolloutState::Failed, with_note(reason))?;
                return Ok(());
            }
            Ok(CommitPlan::NoManifest) => {
                let reason = format!(
                    "no {} at the repo root; nothing to deploy",
                    crate::manifest::MANIFEST_FILE
                );
                self.record_commit_level(tip, RolloutState::Skipped, with_note(reason))?;
                return Ok(());
            }
            Ok(CommitPlan::Invalid(error)) => {
                let reason = format!("invalid manifest, fleets left as they are: {error}");
                let rollout =
                    self.record_commit_level(tip, RolloutState::Failed, with_note(reason))?;
                for problem in &error.problems {
                    self.store().append_event(
                        rollout.id,
                        Level::Error,
                        "manifest",
                        problem.to_string(),
                        None,
                    )?;
                }
                tracing::error!(revision = %tip.revision.short(), error = %error, "Invalid manifest.");
                return Ok(());
            }
            Ok(CommitPlan::Fleets(plans)) => plans,
        };
        self.fleets = plans.iter().map(|p| (p.fleet.name.clone(), p.fleet.clone())).collect();
        let mut skipped = Vec::new();
        for fleet_plan in plans {
            if fleet_plan.is_noop() {
                skipped.push(format!("{}: {}", fleet_plan.fleet.name, fleet_plan.plan.reason));
                continue;
            }
            let name = fleet_plan.fleet.name.clone();
            let previous_image = self.store().deployed(&name)?.map(|d| d.image);
            let now = crate::model::now();
            let mut record = Rollout::new(
                Some(name.clone()),
                tip.revision.clone(),
                tip.summary.clone(),
                tip.trigger.clone(),
                Origin::Commit,
                now,
            );
            record.plan = fleet_plan.plan.clone();
            record.previous_image = previous_image;
            let rollout = self.store().create_rollout(record)?;
            if let Some(note) = &note {
                self.store().append_event(rollout.id, Level::Warn, "source", note.clone(), None)?;
            }
            self.store().append_event(
                rollout.id,
                Level::Info,
                "plan",
                format!(
                    "{} (bake: [{}], reconcile: {}, roll: {})",
                    fleet_plan.plan.reason,
                    fleet_plan.plan.bake.join(", "),
                    fleet_plan.plan.reconcile,
                    fleet_plan.plan.roll
                ),
                Some(serde_json::json!({ "trees": fleet_plan.trees })),
            )?;
            tracing::info!(rollout = %rollout.id, fleet = %name, revision = %tip.revision.short(), "Rollout planned.");
            self.enqueue(&name, rollout.id).await?;
        }
        if !skipped.is_empty() && self.fleets.len() == skipped.len() {
            let reason = format!("touches no fleet's paths ({})", skipped.join("; "));
            self.record_commit_level(tip, RolloutState::Skipped, with_note(reason))?;
        }
        Ok(())
    }

    // --- lanes ---

    fn supersede(&self, id: RolloutId, by: RolloutId) -> OpResult<()> {
        self.finish_outside_driver(
            id,
            RolloutState::Superseded,
            format!("superseded by rollout #{by}"),
        )
    }

    /// Ends a rollout no driver is running (queued, paused).
    fn finish_outside_driver(
        &self,
        id: RolloutId,
        state: RolloutState,
        reason: String,
    ) -> OpResult<()> {
        let mut rollout = self.store().rollout(id)?;
        if rollout.state.is_terminal() {
            return Ok(());
        }
        let from = rollout.state;
        rollout.state = state;
        rollout.reason = Some(reason.clone());
        rollout.finished_at = Some(crate::model::now());
        self.store().put_rollout(&rollout)?;
        self.store().append_event(
            id,
            Level::Warn,
            "state",
            format!("{from} → {state}: {reason}"),
            None,
        )?;
        Ok(())
    }

    async fn enqueue(&mut self, fleet: &str, id: RolloutId) -> OpResult<()> {
        let lane = self.lanes.entry(fleet.to_owned()).or_default();
        let paused = lane.paused.take();
        let queued = lane.queued.replace(id);
        let mut supersede_running = None;
        let mut abort_keeper = None;
        if let Some(job) = &lane.running {
            match job.rollout {
                Some(_) => supersede_running = Some(job.control.clone()),
                None => abort_keeper = lane.running.take(),
            }
        }
        for older in paused.into_iter().chain(queued) {
            self.supersede(older, id)?;
        }
        if let Some(control) = supersede_running {
            // It stops at its next safe point; `on_done` then starts the queued one.
            let _ = control.send(Control::Supersede(id));
            return Ok(());
        }
        if let Some(keeper) = abort_keeper {
            keeper.task.abort();
        }
        self.start_next(fleet).await;
        Ok(())
    }

    async fn start_next(&mut self, fleet: &str) {
        let Some(lane) = self.lanes.get_mut(fleet) else { return };
        if lane.running.is_some() {
            return;
        }
        let Some(id) = lane.queued.take() else { return };
        if let Err(error) = self.start(fleet, id).await {
            if is_transient(&error) {
                // A load balancer taking over from a killed one, a cloud API hiccup: the rollout
                // stays queued and the next tick starts it, it is not failed for a blip.
                tracing::warn!(rollout = %id, fleet = %fleet, error = %format!("{error:#}"), "Rollout could not start yet; retrying at the next tick.");
                let lane = self.lanes.entry(fleet.to_owned()).or_default();
                if lane.queued.is_none() {
                    lane.queued = Some(id);
                }
                return;
            }
            let reason = format!("could not start: {error:#}");
            tracing::error!(rollout = %id, fleet = %fleet, error = %reason, "Rollout could not start.");
            let _ = self.finish_outside_driver(id, RolloutState::Failed, reason);
        }
    }

    async fn start(&mut self, fleet_name: &str, id: RolloutId) -> anyhow::Result<()> {
        let rollout = self.store().rollout(id)?;
        let mirror = self.env.mirror.clone();
        let revision = rollout.revision.clone();
        let name = fleet_name.to_owned();
        let (fleet, trees) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let fleet = planner::fleet_at(&mirror, &revision, &name)?.ok_or_else(|| {
                anyhow::anyhow!("fleet `{name}` is not in the manifest at {}", revision.short())
            })?;
            let trees = planner::fleet_trees(&mirror, &revision, &fleet)?;
            Ok((fleet, trees))
        })
        .await??;
        let provider = self.provider(&fleet, &rollout.revision).await?;
        let (control, control_rx) = watch::channel(Control::Run);
        let env = self.env.clone();
        let done = self.done_tx.clone();
        let fleet_name = fleet.name.clone();
        let task = tokio::spawn(async move {
            let result = driver::drive(&env, &fleet, provider, id, trees, control_rx)
                .await
                .map_err(|e| crate::error::chain(&e));
            let _ = done.send(JobDone { fleet: fleet.name.clone(), rollout: Some(id), result });
        });
        self.lanes.entry(fleet_name).or_default().running =
            Some(Job { rollout: Some(id), control, task });
        Ok(())
    }

    async fn provider(
        &mut self,
        fleet: &Fleet,
        revision: &Revision,
    ) -> anyhow::Result<SharedProvider> {
        let policy = &fleet.rollout;
        let key = match &policy.provider {
            ProviderSpec::Local { load_balancer } => format!("local:{}", load_balancer.port),
            ProviderSpec::Exec(_) => format!("exec:{revision}"),
        };
        if let Some((existing, provider)) = self.providers.get(&fleet.name) {
            if *existing == key {
                return Ok(provider.clone());
            }
        }
        let fleet_dir =
            crate::fsutil::safe_join(&self.config.data_dir.join("fleets"), &fleet.name)?;
        let provider: SharedProvider = match &policy.provider {
            ProviderSpec::Local { load_balancer } => {
                let opened = crate::provider::local::LocalProvider::open(
                    crate::provider::local::LocalConfig {
                        fleet: fleet.name.clone(),
                        dir: fleet_dir,
                        lb_port: load_balancer.port,
                        kiln_exe: self.config.kiln_exe.clone(),
                    },
                )
                .await;
                match opened {
                    Ok(provider) => {
                        self.provider_failures.remove(&fleet.name);
                        Arc::new(provider)
                    }
                    Err(error) => return self.local_provider_failed(fleet, revision, error),
                }
            }
            ProviderSpec::Exec(spec) => {
                let repo_dir =
                    crate::fsutil::safe_join(&fleet_dir.join("provider"), revision.as_str())?;
                if !repo_dir.exists() {
                    let mirror = self.env.mirror.clone();
                    let revision = revision.clone();
                    let dest = repo_dir.clone();
                    tokio::task::spawn_blocking(move || {
                        crate::source::git::export(&mirror, &revision, &dest)
                    })
                    .await??;
                }
                Arc::new(crate::provider::exec::ExecProvider::new(
                    &fleet.name,
                    spec,
                    repo_dir,
                    fleet_dir.join("exec"),
                ))
            }
        };
        self.providers.insert(fleet.name.clone(), (key, provider.clone()));
        Ok(provider)
    }

    /// A local provider could not be opened with the manifest's settings (e.g. the new
    /// `loadBalancer.port` is busy): the failure is recorded once in the log, and the fleet
    /// keeps the provider it had, so it goes on serving where it was.
    fn local_provider_failed(
        &mut self,
        fleet: &Fleet,
        revision: &Revision,
        error: crate::provider::ProviderError,
    ) -> anyhow::Result<SharedProvider> {
        let message = format!("fleet `{}`: {error}", fleet.name);
        let transient = matches!(error, crate::provider::ProviderError::Transient { .. });
        // A transient failure (the load balancer restarting) is retried, not a failed change.
        if !transient && self.provider_failures.get(&fleet.name) != Some(&message) {
            tracing::error!(fleet = %fleet.name, error = %message, "Load balancer change failed; the fleet keeps its current one.");
            let now = crate::model::now();
            // The change came with the newest commit, not with the deployed one.
            let tip = self.store().get_meta::<Revision>(TIP_KEY).ok().flatten();
            let record = CommitRecord {
                revision: tip.unwrap_or_else(|| revision.clone()),
                parents: vec![],
                summary: format!("load balancer change for fleet `{}`", fleet.name),
                author: String::new(),
                committed_at: now,
                seen_at: now,
                kind: CommitKind::Push,
                trigger: "provider".to_owned(),
                tip: false,
            };
            self.record_commit_level(&record, RolloutState::Failed, message.clone())?;
            self.provider_failures.insert(fleet.name.clone(), message);
        }
        match self.providers.get(&fleet.name) {
            Some((key, provider)) if key.starts_with("local:") => Ok(provider.clone()),
            _ => Err(error.into()),
        }
    }

    async fn on_done(&mut self, done: JobDone) {
        let lane = self.lanes.entry(done.fleet.clone()).or_default();
        // A lane may have been restarted meanwhile (a keeper aborted): only clear our own job.
        if lane.running.as_ref().is_some_and(|job| job.rollout == done.rollout) {
            lane.running = None;
        }
        match (&done.rollout, &done.result) {
            (Some(id), Ok(RolloutState::Paused)) => {
                lane.paused = Some(*id);
                tracing::info!(rollout = %id, fleet = %done.fleet, "Rollout paused.");
            }
            (Some(id), Ok(state)) => {
                tracing::info!(rollout = %id, fleet = %done.fleet, state = %state, "Rollout ended.")
            }
            (Some(id), Err(error)) => {
                tracing::error!(rollout = %id, fleet = %done.fleet, error = %error, "Rollout driver failed.");
                let _ = self.store().append_event(
                    *id,
                    Level::Error,
                    "driver",
                    format!("driver stopped: {error}"),
                    None,
                );
            }
            (None, Ok(_)) => {}
            (None, Err(error)) => {
                tracing::warn!(fleet = %done.fleet, error = %error, "Capacity check failed.")
            }
        }
        let fleet = done.fleet.clone();
        self.start_next(&fleet).await;
        if done.rollout.is_some() {
            // Show the outcome in `kiln status` now rather than at the next tick.
            self.on_tick().await;
            self.collect_garbage().await;
        }
    }

    // --- commands ---

    async fn on_command(&mut self, command: Command) -> Result<RolloutId, CommandError> {
        let fleet = command.fleet().to_owned();
        let conflict = |message: String| CommandError { status: 409, message };
        let internal =
            |e: &dyn std::fmt::Display| CommandError { status: 500, message: e.to_string() };
        if !self.fleets.contains_key(&fleet) && !self.lanes.contains_key(&fleet) {
            return Err(CommandError { status: 404, message: format!("no fleet `{fleet}`") });
        }
        let lane = self.lanes.entry(fleet.clone()).or_default();
        let running =
            lane.running.as_ref().and_then(|job| job.rollout.map(|id| (id, job.control.clone())));
        match command {
            Command::Pause { .. } => match running {
                Some((id, control)) => {
                    let _ = control.send(Control::Pause);
                    Ok(id)
                }
                None => Err(conflict(format!("fleet `{fleet}` has no rollout in progress"))),
            },
            Command::Abort { .. } => {
                if let Some((id, control)) = running {
                    let _ = control.send(Control::Abort);
                    return Ok(id);
                }
                let lane = self.lanes.entry(fleet.clone()).or_default();
                let Some(id) = lane.paused.take().or_else(|| lane.queued.take()) else {
                    return Err(conflict(format!("fleet `{fleet}` has no rollout to abort")));
                };
                self.finish_outside_driver(
                    id,
                    RolloutState::Aborted,
                    "aborted by an operator".into(),
                )
                .map_err(|e| internal(&e))?;
                Ok(id)
            }
            Command::Resume { .. } => {
                let lane = self.lanes.entry(fleet.clone()).or_default();
                let Some(id) = lane.paused.take() else {
                    return Err(conflict(format!("fleet `{fleet}` has no paused rollout")));
                };
                if lane.running.is_some() {
                    lane.paused = Some(id);
                    return Err(conflict(format!("fleet `{fleet}` is busy")));
                }
                let _ = self.store().append_event(
                    id,
                    Level::Info,
                    "command",
                    "resumed by an operator",
                    None,
                );
                self.start(&fleet, id).await.map_err(|e| internal(&format!("{e:#}")))?;
                Ok(id)
            }
            Command::Rollback { to, .. } => {
                let id = self.rollback(&fleet, to.as_deref()).map_err(|e| match e {
                    RollbackError::BadPrefix(message) => CommandError { status: 400, message },
                    RollbackError::Refused(message) => conflict(message),
                    RollbackError::Store(e) => internal(&e),
                })?;
                self.enqueue(&fleet, id).await.map_err(|e| internal(&e))?;
                Ok(id)
            }
        }
    }

    fn rollback(&self, fleet: &str, to: Option<&str>) -> Result<RolloutId, RollbackError> {
        let deployed = self.store().deployed(fleet)?;
        // `--to` names one commit unambiguously among the fleet's rollouts.
        let to = match to {
            Some(prefix) => {
                let prefix = check_prefix(prefix).map_err(RollbackError::BadPrefix)?;
                let known = self.store().rollouts(&RolloutFilter {
                    fleet: Some(fleet.to_owned()),
                    commit: Some(prefix.clone()),
                    ..RolloutFilter::default()
                })?;
                let revisions = known.iter().map(|r| (&r.revision, r.summary.as_str()));
                Some(unambiguous(&prefix, revisions).map_err(RollbackError::BadPrefix)?)
            }
            None => None,
        };
        let to = to.as_deref();
        let succeeded = self.store().rollouts(&RolloutFilter {
            fleet: Some(fleet.to_owned()),
            state: Some(RolloutState::Succeeded),
            commit: to.map(str::to_owned),
            ..RolloutFilter::default()
        })?;
        let current = deployed.as_ref().map(|d| d.image.clone());
        let target = succeeded
            .into_iter()
            .filter(|r| r.image.is_some())
            .find(|r| to.is_some() || r.image != current)
            .ok_or_else(|| {
                RollbackError::Refused(match to {
                    Some(to) => format!("no succeeded rollout of fleet `{fleet}` at commit `{to}`"),
                    None => format!("fleet `{fleet}` has no earlier image to roll back to"),
                })
            })?;
        let image: Option<ImageRef> = target.image.clone();
        let now = crate::model::now();
        let mut record = Rollout::new(
            Some(fleet.to_owned()),
            target.revision.clone(),
            format!("rollback to {} ({})", target.revision.short(), target.summary),
            "command".into(),
            Origin::Rollback { from: Some(target.id) },
            now,
        );
        record.plan = Plan {
            bake: vec![],
            reconcile: false,
            roll: true,
            reason: format!("manual rollback to the image of rollout #{}", target.id),
        };
        record.image = image;
        record.stage_images = target.stage_images.clone();
        record.previous_image = current;
        record.outputs = target.outputs.clone();
        let rollout = self.store().create_rollout(record)?;
        self.store().append_event(
            rollout.id,
            Level::Info,
            "command",
            "rollback requested by an operator",
            None,
        )?;
        Ok(rollout.id)
    }

    // --- periodic work ---

    async fn on_tick(&mut self) {
        // A failing store is probed so it recovers (and `/healthz` turns ok) even when idle.
        if let Err(error) = self.store().heal() {
            tracing::debug!(error = %crate::error::chain(&error), "The store still fails.");
        }
        if !self.unrecorded.is_empty() {
            self.record_source_events().await;
        }
        // Rollouts whose start failed transiently are queued on an idle lane: start them now.
        let waiting: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.running.is_none() && lane.queued.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for fleet in waiting {
            self.start_next(&fleet).await;
        }
        let names: Vec<String> = self.fleets.keys().cloned().collect();
        let mut statuses = Vec::new();
        for name in names {
            let Some(fleet) = self.fleets.get(&name).cloned() else { continue };
            let deployed = self.store().deployed(&name).ok().flatten();
            let lane = self.lanes.entry(name.clone()).or_default();
            let active =
                lane.running.as_ref().and_then(|j| j.rollout).or(lane.paused).or(lane.queued);
            let idle = lane.running.is_none() && lane.paused.is_none() && lane.queued.is_none();
            let mut status = FleetStatus {
                name: name.clone(),
                provider: fleet.rollout.provider.kind().to_string(),
                revision: deployed.as_ref().map(|d| d.revision.clone()),
                image: deployed.as_ref().map(|d| d.image.clone()),
                capacity: fleet.rollout.capacity,
                active_rollout: active,
                active_state: active
                    .and_then(|id| self.env.store.rollout(id).ok())
                    .map(|r| r.state),
                observed_at: Some(crate::model::now()),
                ..FleetStatus::default()
            };
            // Fleets never deployed have no provider yet; opening one would start a load balancer.
            if let Some(deployed) = &deployed {
                match self.provider(&fleet, &deployed.revision).await {
                    Ok(provider) => {
                        status.endpoint = provider.endpoint();
                        if let Ok(instances) = provider.list().await {
                            let health = driver::check_health(
                                provider.clone(),
                                &fleet.rollout.health_check.http,
                                &instances,
                            )
                            .await;
                            status.instances = instances
                                .into_iter()
                                .zip(health)
                                .map(|(i, healthy)| InstanceStatus {
                                    id: i.id,
                                    image: i.image,
                                    address: i.address,
                                    running: i.running,
                                    attached: i.attached,
                                    healthy,
                                })
                                .collect();
                        }
                        if idle
                            && crate::bake::rebake_due(self.store(), &fleet, crate::model::now())
                        {
                            if let Err(error) = self.schedule_rebake(&fleet, deployed).await {
                                tracing::error!(fleet = %name, error = %crate::error::chain(&error), "Could not schedule a rebake.");
                            }
                        } else if idle {
                            self.spawn_keeper(&fleet, provider, deployed.image.clone());
                        }
                    }
                    Err(error) => {
                        tracing::warn!(fleet = %name, error = %format!("{error:#}"), "Provider unavailable.")
                    }
                }
            }
            statuses.push(status);
        }
        if let Ok(mut view) = self.view.write() {
            *view = statuses;
        }
        if self.next_gc.is_none_or(|at| tokio::time::Instant::now() >= at) {
            self.collect_garbage().await;
        }
    }

    /// Garbage-collects images, terminated instance dirs and exec repo copies of every fleet
    /// with no rollout running, queued or paused (see `gc`). It runs inside the event loop, so
    /// no job can start while it deletes.
    async fn collect_garbage(&mut self) {
        let busy = self
            .lanes
            .iter()
            .filter(|(_, lane)| {
                lane.queued.is_some()
                    || lane.paused.is_some()
                    || lane.running.as_ref().is_some_and(|job| job.rollout.is_some())
            })
            .map(|(name, _)| name.clone())
            .collect();
        let providers = self
            .providers
            .iter()
            .map(|(fleet, (key, provider))| (fleet.clone(), key.clone(), provider.clone()))
            .collect();
        let report = crate::gc::run(
            self.store().clone(),
            self.config.data_dir.clone(),
            self.config.keep_images,
            busy,
            providers,
        )
        .await;
        // More due than one run removes: continue soon, not in ten minutes.
        let wait = if report.is_some_and(|r| r.more) { TICK } else { crate::gc::INTERVAL };
        self.next_gc = Some(tokio::time::Instant::now() + wait);
    }

    /// `image.rebake`: the fleet's image is older than the interval, so bake it again from the
    /// deployed commit without the cache (security updates of the base), reconcile and roll.
    async fn schedule_rebake(
        &mut self,
        fleet: &Fleet,
        deployed: &crate::store::Deployed,
    ) -> OpResult<()> {
        let Some(every) = fleet.image.rebake else { return Ok(()) };
        // One attempt per interval: a rebake that failed is not retried on every tick.
        let recent = self
            .store()
            .rollouts(&RolloutFilter {
                fleet: Some(fleet.name.clone()),
                limit: Some(50),
                ..RolloutFilter::default()
            })?
            .into_iter()
            .find(|r| r.origin == Origin::Rebake)
            .is_some_and(|r| {
                crate::model::now()
                    .signed_duration_since(r.created_at)
                    .to_std()
                    .is_ok_and(|age| age < every)
            });
        if recent {
            return Ok(());
        }
        let interval = crate::manifest::format_duration(every);
        let mut record = Rollout::new(
            Some(fleet.name.clone()),
            deployed.revision.clone(),
            format!("scheduled rebake (every {interval})"),
            "schedule".into(),
            Origin::Rebake,
            crate::model::now(),
        );
        record.plan = Plan {
            bake: fleet.image.stages.iter().map(|s| s.name.clone()).collect(),
            reconcile: fleet.infra.is_some(),
            roll: true,
            reason: format!(
                "image older than image.rebake ({interval}): rebaking without the cache"
            ),
        };
        record.previous_image = Some(deployed.image.clone());
        let rollout = self.store().create_rollout(record)?;
        tracing::info!(rollout = %rollout.id, fleet = %fleet.name, "Scheduled rebake.");
        self.store().append_event(
            rollout.id,
            Level::Info,
            "plan",
            rollout.plan.reason.clone(),
            None,
        )?;
        self.enqueue(&fleet.name, rollout.id).await
    }

    fn spawn_keeper(&mut self, fleet: &Fleet, provider: SharedProvider, image: ImageRef) {
        let env = self.env.clone();
        let done = self.done_tx.clone();
        let fleet = fleet.clone();
        let name = fleet.name.clone();
        let (control, _) = watch::channel(Control::Run);
        let task = tokio::spawn(async move {
            let result = driver::keep_capacity(&env, &fleet, provider, &image)
                .await
                .map(|_| RolloutState::Succeeded)
                .map_err(|e| crate::error::chain(&e));
            let _ = done.send(JobDone { fleet: fleet.name.clone(), rollout: None, result });
        });
        self.lanes.entry(name).or_default().running = Some(Job { rollout: None, control, task });
    }
}

#[derive(Debug, thiserror::Error)]
enum RollbackError {
    /// The `--to` prefix is too short, not a commit id, or names several commits.
    #[error("{0}")]
    BadPrefix(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The meta key of the last tip the operator acknowledged.
pub const TIP_KEY: &str = "source.tip";

/// The shortest commit prefix `rollback --to` accepts (git's default abbreviation).
pub const MIN_COMMIT_PREFIX: usize = 7;

/// Checks a commit prefix given to `rollback --to`: at least [`MIN_COMMIT_PREFIX`] hex digits.
/// Returns it lowercased.
fn check_prefix(prefix: &str) -> Result<String, String> {
    let prefix = prefix.trim();
    if !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("`{prefix}` is not a commit id: use the hex digits of a commit"));
    }
    if prefix.len() < MIN_COMMIT_PREFIX {
        return Err(format!(
            "commit prefix `{prefix}` is too short: give at least {MIN_COMMIT_PREFIX} characters of the commit id"
        ));
    }
    Ok(prefix.to_ascii_lowercase())
}

/// The one revision among `known` (revision, summary) that `prefix` names, or `prefix` itself
/// when it names none (the caller reports that). Several revisions are an error listing them.
fn unambiguous<'a>(
    prefix: &str,
    known: impl Iterator<Item = (&'a Revision, &'a str)>,
) -> Result<String, String> {
    let mut matches: Vec<(&Revision, &str)> = Vec::new();
    for (revision, summary) in known {
        if revision.0.starts_with(prefix) && !matches.iter().any(|(r, _)| *r == revision) {
            matches.push((revision, summary));
        }
    }
    match matches.as_slice() {
        [] => Ok(prefix.to_owned()),
        [(only, _)] => Ok(only.0.clone()),
        several => {
            let listed: Vec<String> = several
                .iter()
                .map(|(r, summary)| format!("{} ({summary})", r.0.get(..12).unwrap_or(&r.0)))
                .collect();
            Err(format!(
                "commit prefix `{prefix}` is ambiguous: it matches {}; give more characters",
                listed.join(", ")
            ))
        }
    }
}

/// Whether a rollout's start failed for a reason worth retrying (a provider that could not be
/// reached), rather than one that will fail again (a fleet missing from the manifest).
fn is_transient(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<crate::provider::ProviderError>(),
            Some(crate::provider::ProviderError::Transient { .. })
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_prefixes_must_be_long_and_unambiguous() {
        let error = check_prefix("a").unwrap_err();
        assert!(error.contains("too short") && error.contains("at least 7"), "{error}");
        assert!(check_prefix("abc12e").unwrap_err().contains("too short"));
        assert!(check_prefix("main~1x").unwrap_err().contains("not a commit id"));
        assert_eq!(check_prefix("ABC12EF").as_deref(), Ok("abc12ef"));

        let a = Revision("abc12ef0000000000000000000000000000000aa".into());
        let b = Revision("abc12ef9999999999999999999999999999999bb".into());
        let known = [(&a, "first"), (&b, "second"), (&a, "first again")];
        let error = unambiguous("abc12ef", known.iter().copied()).unwrap_err();
        assert!(error.contains("ambiguous"), "{error}");
        assert!(error.contains(a.short()) && error.contains(b.short()), "{error}");
        assert!(error.contains("first") && error.contains("second"), "{error}");
        assert_eq!(unambiguous("abc12ef0", known.iter().copied()), Ok(a.0.clone()));
        assert_eq!(unambiguous("abc12ef9", known.iter().copied()), Ok(b.0.clone()));
        assert_eq!(unambiguous("fedcba9", known.iter().copied()), Ok("fedcba9".to_owned()));
    }

    #[test]
    fn only_transient_provider_errors_keep_a_rollout_queued() {
        use crate::provider::ProviderError;
        let blip = ProviderError::Transient {
            provider: "local",
            op: "list",
            message: "load balancer unreachable".into(),
        };
        assert!(is_transient(&anyhow::Error::new(blip).context("could not start")));
        let refused =
            ProviderError::Failed { provider: "local", op: "open", message: "port busy".into() };
        assert!(!is_transient(&anyhow::Error::new(refused)));
        assert!(!is_transient(&anyhow::anyhow!("fleet `web` is not in the manifest")));
    }
}
