//! One reconciler per fleet: a task that owns the fleet's lane, applies what
//! [`decide`](super::decide) returns, and runs everything slow — opening the provider, driving a
//! rollout, observing instances — in tasks of its own with deadlines. Its own loop only waits on
//! channels and timers and writes small records, so a verb is answered in the time of a store
//! write whatever the provider does, and one fleet's slow cloud never delays another fleet.
//!
//! ```text
//!            ┌────────── FleetMsg (planned, verb, manifest) ◀── router
//!  reconciler┤ decide(lane, input, now) → effects → apply
//!            ├──▶ job task:     gate.read → prepare → provider::open → driver::drive → JobEnded
//!            └──▶ observe task: provider.list + health (deadline) → Observation → status, repair
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::decide::{self, Effect, Input, Lane, Observation, Outcome, Verb};
use super::{
    Command, CommandError, FleetStatus, FleetView, InstanceStatus, OperatorConfig, RollbackError,
};
use crate::error::chain;
use crate::manifest::{Fleet, ProviderKind};
use crate::model::{Revision, RolloutId};
use crate::provider::SharedProvider;
use crate::rollout::driver::{self, DriverEnv};
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};
use crate::rollout::step::Control;
use crate::store::{CommitKind, CommitRecord, EventKind, Level, RolloutFilter};

/// Longest an observation (list + health checks) may take.
const OBSERVE_DEADLINE: Duration = Duration::from_secs(60);
/// How often an idle local fleet is observed (cheap: records on disk and the load balancer).
const OBSERVE_LOCAL: Duration = Duration::from_secs(2);
/// How often an idle fleet on another provider is observed (each look is a cloud API call).
const OBSERVE_REMOTE: Duration = Duration::from_secs(300);
/// `drift.interval` of a fleet the tip's manifest does not describe.
const DEFAULT_DRIFT_INTERVAL: Duration = Duration::from_secs(300);

/// A fleet as the manifest at a commit describes it, with the tree ids the planner computed
/// (stored as deployed when the rollout succeeds). Saves the job a manifest parse.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The fleet.
    pub fleet: Fleet,
    /// Tree ids of its inputs at the commit.
    pub trees: BTreeMap<String, String>,
}

/// What the router tells a fleet's reconciler.
#[derive(Debug)]
pub enum FleetMsg {
    /// The fleet as the newest tip's manifest describes it.
    Manifest(Box<Fleet>),
    /// A rollout was recorded for the fleet.
    Planned {
        /// The rollout.
        id: RolloutId,
        /// The fleet at the rollout's commit, when the planner has it at hand.
        prepared: Option<Box<Prepared>>,
    },
    /// An operator verb and where to answer.
    Verb(Command, oneshot::Sender<Result<RolloutId, CommandError>>),
    /// The newest tip's manifest no longer has the fleet.
    Removed,
}

/// What the router, garbage collection and the reconciler share about a fleet.
#[derive(Debug, Default)]
pub struct Shared {
    /// Held (read) by the fleet's job for its whole run; garbage collection takes it (write) so
    /// it never deletes under a job that is starting.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// The fleet's open provider.
    pub provider: tokio::sync::Mutex<ProviderSlot>,
    /// A rollout is running, queued or paused.
    pub busy: std::sync::atomic::AtomicBool,
}

/// A fleet's open provider and the last failure to open one (recorded in the log once).
#[derive(Debug, Default)]
pub struct ProviderSlot {
    /// The key (`provider::open_key`) and the provider.
    pub current: Option<(String, SharedProvider)>,
    /// The last failure recorded in the log.
    pub last_failure: Option<String>,
}

/// What every fleet's reconciler needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// The driver's environment (store, mirror, hooks, metrics, clock).
    pub env: Arc<DriverEnv>,
    /// The operator's settings.
    pub config: Arc<OperatorConfig>,
    /// The status view the API reads.
    pub view: FleetView,
    /// Told when a job ends (garbage collection runs soon after).
    pub jobs_ended: mpsc::UnboundedSender<String>,
    /// Bounds the observations running at once (a thousand fleets starting together must not
    /// start a thousand provider calls together).
    pub observe_slots: Arc<tokio::sync::Semaphore>,
}

/// Observations that may run at once, across all fleets.
pub const MAX_OBSERVATIONS: usize = 16;

/// Starts the reconciler of fleet `name`. `active` are its unfinished rollouts in the store.
pub fn spawn(
    name: String,
    cx: Context,
    shared: Arc<Shared>,
    fleet: Option<Fleet>,
    active: Vec<(RolloutId, RolloutState)>,
    shutdown: CancellationToken,
) -> (mpsc::Sender<FleetMsg>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let reconciler = Reconciler::new(name, cx, shared, fleet);
    let task = tokio::spawn(reconciler.run(rx, active, shutdown));
    (tx, task)
}

struct Job {
    control: watch::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
}

struct JobEnded {
    rollout: RolloutId,
    outcome: Outcome,
}

struct Reconciler {
    name: String,
    cx: Context,
    shared: Arc<Shared>,
    fleet: Option<Fleet>,
    lane: Lane,
    job: Option<Job>,
    /// Prepared fleets of planned rollouts not started yet.
    prepared: BTreeMap<RolloutId, Prepared>,
    done_tx: mpsc::UnboundedSender<JobEnded>,
    observed_tx: mpsc::UnboundedSender<Observed>,
    /// The provider's last list of the fleet, and when it was taken: a drift check that comes
    /// while it is fresh uses it instead of listing again.
    listing: Option<(tokio::time::Instant, crate::provider::Observation)>,
    observing: Option<tokio::task::JoinHandle<()>>,
    next_observe: tokio::time::Instant,
    status: FleetStatus,
    /// Stops the drift check in flight (a rollout starts, shutdown).
    drift_cancel: Option<CancellationToken>,
    drift_tx: mpsc::UnboundedSender<Result<Option<crate::drift::DriftReport>, String>>,
    /// When the next periodic drift check is due.
    next_drift: tokio::time::Instant,
    /// The last report that asked for a repair (consumed by `CreateDriftRepair`).
    drift_report: Option<crate::drift::DriftReport>,
    /// The lane generation the drift check in flight started under.
    drift_generation: u64,
    /// `kiln deploy` commits resolved off the loop (git), with where to answer.
    deploy_tx: mpsc::UnboundedSender<DeployResolved>,
}

type Reply = oneshot::Sender<Result<RolloutId, CommandError>>;
type DeployResolved = (Result<super::Deployable, CommandError>, Reply);

impl Reconciler {
    fn new(name: String, cx: Context, shared: Arc<Shared>, fleet: Option<Fleet>) -> Reconciler {
        let (done_tx, _) = mpsc::unbounded_channel();
        let (observed_tx, _) = mpsc::unbounded_channel();
        let (drift_tx, _) = mpsc::unbounded_channel();
        let (deploy_tx, _) = mpsc::unbounded_channel();
        let interval = fleet.as_ref().map_or(DEFAULT_DRIFT_INTERVAL, |f| f.drift.interval);
        let drift = crate::drift::last_report(&cx.env.store, &name).ok().flatten();
        Reconciler {
            drift_cancel: None,
            drift_tx,
            next_drift: tokio::time::Instant::now() + interval,
            drift_report: None,
            drift_generation: 0,
            deploy_tx,
            status: FleetStatus { name: name.clone(), drift, ..FleetStatus::default() },
            name,
            cx,
            shared,
            fleet,
            lane: Lane::default(),
            job: None,
            prepared: BTreeMap::new(),
            done_tx,
            observed_tx,
            listing: None,
            observing: None,
            // Spread the first observations of many fleets over a second.
            next_observe: tokio::time::Instant::now()
                + Duration::from_millis(fastrand::u64(0..1000)),
        }
    }

    fn now(&self) -> crate::model::Timestamp {
        self.cx.env.clock.now()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<FleetMsg>,
        active: Vec<(RolloutId, RolloutState)>,
        shutdown: CancellationToken,
    ) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let (observed_tx, mut observed_rx) = mpsc::unbounded_channel();
        let (drift_tx, mut drift_rx) = mpsc::unbounded_channel();
        let (deploy_tx, mut deploy_rx) = mpsc::unbounded_channel();
        self.deploy_tx = deploy_tx;
        self.done_tx = done_tx;
        self.observed_tx = observed_tx;
        self.drift_tx = drift_tx;
        for (id, state) in &active {
            if *state != RolloutState::Paused {
                tracing::info!(rollout = %id, fleet = %self.name, state = %state, "Resuming rollout.");
                let _ = self.cx.env.store.append_event(
                    *id,
                    Level::Info,
                    EventKind::Resume,
                    "daemon restarted; resuming from the recorded state",
                    None,
                );
            }
        }
        self.feed(Input::Recovered(active));
        loop {
            let wake = decide::next_wake(&self.lane).map(|at| {
                let wait = (at - self.now()).to_std().unwrap_or(Duration::ZERO);
                tokio::time::Instant::now() + wait
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.on_message(msg),
                    None => break,
                },
                Some(ended) = done_rx.recv() => {
                    let repair = self.is_repair(ended.rollout);
                    self.job = None;
                    let _ = self.cx.jobs_ended.send(self.name.clone());
                    self.feed(Input::JobEnded { rollout: ended.rollout, repair, outcome: ended.outcome });
                }
                Some(observed) = observed_rx.recv() => {
                    self.observing = None;
                    if let Some(instances) = observed.instances {
                        self.status.instances = instances;
                        self.status.observed_at = Some(self.now());
                    }
                    if observed.endpoint.is_some() {
                        self.status.endpoint = observed.endpoint;
                    }
                    if let Some(listing) = observed.listing {
                        self.listing = Some((tokio::time::Instant::now(), listing));
                    }
                    self.feed(Input::Observed(observed.observation));
                }
                () = sleep_until(wake) => self.feed(Input::Wake),
                () = tokio::time::sleep_until(self.next_observe) => self.observe(),
                () = tokio::time::sleep_until(self.next_drift) => {
                    self.next_drift = tokio::time::Instant::now() + self.drift_interval();
                    self.feed(Input::DriftDue);
                }
                Some(result) = drift_rx.recv() => self.on_drift_checked(result),
                Some((resolved, reply)) = deploy_rx.recv() => {
                    let _ = reply.send(self.deploy(resolved));
                }
            }
        }
        if let Some(cancel) = self.drift_cancel.take() {
            cancel.cancel();
        }
        if let Some(job) = self.job.take() {
            // Every step is persisted before it is taken: the next start resumes from here.
            job.task.abort();
        }
        if let Some(task) = self.observing.take() {
            task.abort();
        }
    }

    fn is_repair(&self, id: RolloutId) -> bool {
        self.cx.env.store.rollout(id).is_ok_and(|r| r.origin == Origin::Repair)
    }

    fn on_message(&mut self, msg: FleetMsg) {
        match msg {
            FleetMsg::Manifest(fleet) => {
                // The manifest changed somewhere; this fleet's entry perhaps not.
                if self.fleet.as_ref() != Some(&*fleet) {
                    self.fleet = Some(*fleet);
                    self.publish();
                }
            }
            FleetMsg::Removed => self.removed(),
            FleetMsg::Planned { id, prepared } => {
                if let Some(prepared) = prepared {
                    self.prepared.insert(id, *prepared);
                }
                self.feed(Input::Planned(id));
            }
            FleetMsg::Verb(command, reply) => {
                let verb = match command {
                    Command::Pause { .. } => Verb::Pause,
                    Command::Resume { .. } => Verb::Resume,
                    Command::Abort { .. } => Verb::Abort,
                    Command::Drift { .. } => Verb::Drift,
                    Command::Rollback { to, .. } => {
                        let _ = reply.send(self.rollback(to.as_deref()));
                        return;
                    }
                    Command::Retry { .. } => {
                        let _ = reply.send(self.retry());
                        return;
                    }
                    Command::Deploy { commit, .. } => {
                        self.resolve_deploy(commit, reply);
                        return;
                    }
                    Command::Down { .. } => {
                        let _ = reply.send(self.down());
                        return;
                    }
                };
                if verb == Verb::Resume {
                    if let Some(id) = self.lane.paused {
                        let _ = self.cx.env.store.append_event(
                            id,
                            Level::Info,
                            EventKind::Command,
                            "resumed by an operator",
                            None,
                        );
                    }
                }
                let effects = self.decide(Input::Verb(verb));
                let mut reply = Some(reply);
                for effect in effects {
                    match effect {
                        Effect::Reply(answer) => {
                            if let Some(reply) = reply.take() {
                                let _ = reply.send(answer);
                            }
                        }
                        other => self.apply(other),
                    }
                }
                self.publish();
            }
        }
    }

    fn rollback(&mut self, to: Option<&str>) -> Result<RolloutId, CommandError> {
        let id =
            super::create_rollback(&self.cx.env.store, &self.name, to).map_err(command_error)?;
        self.feed(Input::Planned(id));
        Ok(id)
    }

    /// The tip's manifest dropped the fleet: recorded orphaned once, and pruned when the spec
    /// it was last seen with (or the manifest's top-level `prune`) says so.
    fn removed(&mut self) {
        let Some(spec) = self.fleet.take() else { return };
        let store = &self.cx.env.store;
        let deployed = match store.deployed(&self.name) {
            Ok(Some(deployed)) => deployed,
            Ok(None) => return self.publish(),
            Err(error) => {
                tracing::error!(fleet = %self.name, error = %chain(&error), "Could not read the deployment of a removed fleet.");
                return self.publish();
            }
        };
        let prune = spec.prunes();
        tracing::warn!(fleet = %self.name, prune, "Fleet removed from kiln.yaml while deployed.");
        if let Err(error) = super::record_orphaned(store, &self.name, &deployed, prune) {
            tracing::error!(fleet = %self.name, error = %chain(&error), "Could not record an orphaned fleet.");
        }
        if prune {
            match super::create_prune(
                store,
                &self.name,
                &deployed,
                "removed from kiln.yaml, prune: true",
            ) {
                Ok(id) => self.feed(Input::Planned(id)),
                Err(error) => {
                    tracing::error!(fleet = %self.name, error = %chain(&error), "Could not record a prune.")
                }
            }
        }
        self.publish();
    }

    /// `kiln down FLEET`: retires a fleet the tip's manifest no longer has.
    fn down(&mut self) -> Result<RolloutId, CommandError> {
        if self.fleet.is_some() {
            return Err(CommandError {
                status: 409,
                message: format!(
                    "fleet `{}` is still in kiln.yaml at the tip; remove it there first (`kiln down` retires fleets the manifest no longer has)",
                    self.name
                ),
            });
        }
        let store = &self.cx.env.store;
        let deployed = store
            .deployed(&self.name)
            .map_err(|e| CommandError { status: 500, message: chain(&e) })?
            .ok_or_else(|| CommandError {
                status: 409,
                message: format!("fleet `{}` has nothing deployed to take down", self.name),
            })?;
        let id = super::create_prune(store, &self.name, &deployed, "kiln down")
            .map_err(|e| CommandError { status: 500, message: chain(&e) })?;
        let _ = store.append_event(
            id,
            Level::Info,
            EventKind::Command,
            "down requested by an operator",
            None,
        );
        self.feed(Input::Planned(id));
        Ok(id)
    }

    fn retry(&mut self) -> Result<RolloutId, CommandError> {
        let id = super::create_retry(&self.cx.env.store, &self.name).map_err(command_error)?;
        self.feed(Input::Planned(id));
        Ok(id)
    }

    /// `kiln deploy COMMIT`: the commit is resolved in the mirror off the loop (git reads);
    /// [`Reconciler::deploy`] records the rollout when it comes back.
    fn resolve_deploy(&mut self, commit: String, reply: Reply) {
        let store = self.cx.env.store.clone();
        let mirror = self.cx.env.mirror.clone();
        let branch = self.cx.config.branch.clone();
        let fleet = self.name.clone();
        let tx = self.deploy_tx.clone();
        tokio::spawn(async move {
            let resolved = tokio::task::spawn_blocking(move || {
                let tip = store
                    .get_meta::<Revision>(super::TIP_KEY)
                    .map_err(|e| CommandError { status: 500, message: chain(&e) })?;
                super::resolve_deploy(&mirror, tip.as_ref(), &branch, &commit, &fleet)
            })
            .await
            .unwrap_or_else(|e| Err(CommandError { status: 500, message: e.to_string() }));
            let _ = tx.send((resolved, reply));
        });
    }

    fn deploy(
        &mut self,
        resolved: Result<super::Deployable, CommandError>,
    ) -> Result<RolloutId, CommandError> {
        let deployable = resolved?;
        let rollout = super::create_deploy(&self.cx.env.store, &deployable)
            .map_err(|e| CommandError { status: 500, message: chain(&e) })?;
        tracing::info!(rollout = %rollout.id, fleet = %self.name, commit = %rollout.revision.short(), "Deploy requested.");
        self.prepared.insert(rollout.id, deployable.prepared);
        self.feed(Input::Planned(rollout.id));
        Ok(rollout.id)
    }

    fn decide(&mut self, input: Input) -> Vec<Effect> {
        let now = self.now();
        let (lane, effects) = decide::decide(&self.lane, input, &self.name, now);
        self.lane = lane;
        effects
    }

    /// Decides and applies; replies (none expected here) are dropped.
    fn feed(&mut self, input: Input) {
        let effects = self.decide(input);
        for effect in effects {
            self.apply(effect);
        }
        self.publish();
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Start(id) => self.start(id, Control::Run),
            Effect::Revert(id) => {
                let _ = self.cx.env.store.append_event(
                    id,
                    Level::Info,
                    EventKind::Command,
                    "aborted by an operator; returning the fleet to its stable image",
                    None,
                );
                self.start(id, Control::Abort)
            }
            Effect::Signal(control) => {
                if let Some(job) = &self.job {
                    let _ = job.control.send(control);
                }
            }
            Effect::Finish { rollout, state, reason } => {
                self.prepared.remove(&rollout);
                if let Err(error) =
                    super::finish_outside_driver(&self.cx.env.store, rollout, state, reason)
                {
                    tracing::error!(rollout = %rollout, error = %chain(&error), "Could not record the end of a rollout.");
                }
            }
            Effect::Reply(_) => {}
            Effect::DriverFailed { rollout, error } => {
                tracing::error!(rollout = %rollout, fleet = %self.name, error = %error, "Rollout driver failed.");
                let _ = self.cx.env.store.append_event(
                    rollout,
                    Level::Error,
                    EventKind::Driver,
                    format!("driver stopped: {error}"),
                    None,
                );
            }
            Effect::CreateRepair { reason } => match self.create_repair(&reason) {
                Ok(id) => self.feed(Input::Planned(id)),
                Err(error) => {
                    tracing::error!(fleet = %self.name, error = %format!("{error:#}"), "Could not record a repair.")
                }
            },
            Effect::CreateRebake => match self.create_rebake() {
                Ok(Some(id)) => self.feed(Input::Planned(id)),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(fleet = %self.name, error = %format!("{error:#}"), "Could not schedule a rebake.")
                }
            },
            Effect::Observe => self.next_observe = tokio::time::Instant::now(),
            Effect::CheckDrift { trigger } => self.check_drift(trigger),
            Effect::CreateDriftRepair => match self.create_drift_repair() {
                Ok(Some(id)) => self.feed(Input::Planned(id)),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(fleet = %self.name, error = %format!("{error:#}"), "Could not plan a drift repair.")
                }
            },
        }
    }

    fn drift_interval(&self) -> Duration {
        self.fleet.as_ref().map_or(DEFAULT_DRIFT_INTERVAL, |f| f.drift.interval)
    }

    /// Starts a drift check in its own task (one at a time); its report comes back through
    /// `drift_rx`. Needs the fleet in the manifest and a deployed image.
    fn check_drift(&mut self, trigger: &'static str) {
        if self.drift_cancel.is_some() {
            return;
        }
        let Some(fleet) = self.fleet.clone() else { return };
        let store = self.cx.env.store.clone();
        let Some(deployed) = store.deployed(&self.name).ok().flatten() else {
            tracing::debug!(fleet = %self.name, "No drift check: never deployed.");
            return;
        };
        // A periodic check looks at the fleet's last idle list when it is fresh (one provider
        // call per fleet and interval, not two); `kiln drift` always lists anew.
        let fresh = self.drift_interval().min(OBSERVE_REMOTE);
        let listing = match trigger {
            "interval" => self
                .listing
                .as_ref()
                .filter(|(at, _)| at.elapsed() < fresh)
                .map(|(_, listing)| listing.clone()),
            _ => None,
        };
        let cancel = CancellationToken::new();
        self.drift_cancel = Some(cancel.clone());
        self.drift_generation = self.lane.generation;
        let (cx, shared, tx) = (self.cx.clone(), self.shared.clone(), self.drift_tx.clone());
        tracing::debug!(fleet = %self.name, trigger, "Drift check started.");
        tokio::spawn(async move {
            let provider = match provider_for(&cx, &shared, &fleet, &deployed.revision).await {
                Ok(provider) => provider,
                Err(error) => {
                    let _ = tx.send(Err(format!("provider unavailable: {}", chain(&error))));
                    return;
                }
            };
            let deadline = fleet.infra.as_ref().map_or(Duration::ZERO, |i| i.timeout)
                + Duration::from_secs(60);
            let input = crate::drift::CheckInput {
                fleet,
                deployed,
                provider,
                store: store.clone(),
                mirror: cx.env.mirror.clone(),
                data_dir: cx.env.data_dir.clone(),
                hook_env: cx.env.hook_env.clone(),
                metrics: cx.env.metrics.clone(),
                slots: cx.env.slots.clone(),
                listing,
                trigger: trigger.to_owned(),
                deadline,
                cancel,
            };
            let result = match crate::drift::check_fleet(input).await {
                Some(report) => {
                    tokio::task::spawn_blocking(move || crate::drift::record(&store, report))
                        .await
                        .map_err(|e| format!("drift record task failed: {e}"))
                        .and_then(|res| res.map(Some).map_err(|e| chain(&e)))
                }
                None => Ok(None),
            };
            let _ = tx.send(result);
        });
    }

    fn on_drift_checked(&mut self, result: Result<Option<crate::drift::DriftReport>, String>) {
        self.drift_cancel = None;
        self.next_drift = tokio::time::Instant::now() + self.drift_interval();
        let report = match result {
            Ok(Some(report)) => report,
            Ok(None) => {
                tracing::debug!(fleet = %self.name, "Drift check stopped before it ended.");
                return;
            }
            Err(error) => {
                tracing::warn!(fleet = %self.name, error = %error, "Drift check failed.");
                return;
            }
        };
        if report.clean() {
            tracing::debug!(fleet = %self.name, "No drift.");
        } else {
            tracing::warn!(fleet = %self.name, record = report.record.map(|id| id.0), summary = %report.summary(), "Drift found.");
        }
        let repair =
            self.fleet.as_ref().is_some_and(|f| f.drift.mode == crate::manifest::DriftMode::Repair)
                && crate::drift::wants_repair(&report).is_some();
        self.status.drift = Some(report.clone());
        self.drift_report = repair.then_some(report);
        let generation = self.drift_generation;
        self.feed(Input::DriftChecked { generation, repair });
    }

    /// `drift.mode: repair`: a `repair` rollout for what the last report found (instances,
    /// and infra through a reconcile).
    fn create_drift_repair(&mut self) -> anyhow::Result<Option<RolloutId>> {
        let Some(mut report) = self.drift_report.take() else { return Ok(None) };
        let Some(repair) = crate::drift::wants_repair(&report) else { return Ok(None) };
        let store = &self.cx.env.store;
        let Some(deployed) = store.deployed(&self.name)? else { return Ok(None) };
        let record = crate::drift::repair_rollout(&report, &deployed, repair, self.now());
        let rollout = store.create_rollout(record)?;
        store.append_event(
            rollout.id,
            Level::Info,
            EventKind::Plan,
            rollout.plan.reason.clone(),
            report.record.map(|id| serde_json::json!({ "drift_record": id.0 })),
        )?;
        report.repair = Some(rollout.id);
        store.set_meta(&crate::drift::last_key(&self.name), &report)?;
        self.status.drift = Some(report);
        tracing::info!(rollout = %rollout.id, fleet = %self.name, "Drift repair planned.");
        Ok(Some(rollout.id))
    }

    /// Keeps the fleet's entry in the status view current (lane part; instances come from
    /// observations).
    fn publish(&mut self) {
        let store = &self.cx.env.store;
        let deployed = store.deployed(&self.name).ok().flatten();
        let active = self.lane.running.map(|r| r.rollout).or(self.lane.paused).or(self.lane.queued);
        self.shared.busy.store(active.is_some(), std::sync::atomic::Ordering::SeqCst);
        let status = &mut self.status;
        if let Some(fleet) = &self.fleet {
            status.provider = fleet.rollout.provider.kind().to_string();
            status.capacity = fleet.rollout.capacity.min();
        }
        status.orphaned = self.fleet.is_none() && deployed.is_some();
        status.revision = deployed.as_ref().map(|d| d.revision.clone());
        status.image = deployed.as_ref().map(|d| d.image.clone());
        status.active_rollout = active;
        status.active_state = active.and_then(|id| store.rollout(id).ok()).map(|r| r.state);
        if self.fleet.is_none() && deployed.is_none() && active.is_none() {
            // A fleet only known from old rollouts (or pruned): not shown.
            if let Ok(mut view) = self.cx.view.write() {
                view.remove(&self.name);
            }
            return;
        }
        if let Ok(mut view) = self.cx.view.write() {
            view.insert(self.name.clone(), status.clone());
        }
    }

    fn start(&mut self, id: RolloutId, control: Control) {
        // The fleet is about to change: what it was listed as no longer holds.
        self.listing = None;
        // A drift check of the fleet stops: its plan hook must not run beside the rollout's.
        if let Some(cancel) = self.drift_cancel.take() {
            cancel.cancel();
        }
        let (control, control_rx) = watch::channel(control);
        let cx = self.cx.clone();
        let shared = self.shared.clone();
        let name = self.name.clone();
        let prepared = self.prepared.remove(&id);
        let done = self.done_tx.clone();
        let task = tokio::spawn(async move {
            let outcome = run_job(&cx, &shared, &name, id, prepared, control_rx).await;
            let _ = done.send(JobEnded { rollout: id, outcome });
        });
        self.job = Some(Job { control, task });
    }

    fn observe(&mut self) {
        let every = match self.fleet.as_ref().map(|f| f.rollout.provider.kind()) {
            Some(ProviderKind::Local) | None => OBSERVE_LOCAL,
            Some(_) => OBSERVE_REMOTE,
        };
        self.next_observe = tokio::time::Instant::now() + every;
        if self.observing.is_some() {
            return;
        }
        let Some(fleet) = self.fleet.clone() else { return };
        let (cx, shared, generation) = (self.cx.clone(), self.shared.clone(), self.lane.generation);
        let tx = self.observed_tx.clone();
        let busy = self.lane.running.is_some();
        self.observing = Some(tokio::spawn(async move {
            let _slot = cx.observe_slots.clone().acquire_owned().await;
            let result = tokio::time::timeout(
                OBSERVE_DEADLINE,
                observe(&cx, &shared, &fleet, generation, busy),
            )
            .await;
            let result = result.unwrap_or_else(|_| {
                tracing::warn!(fleet = %fleet.name, "Observing the fleet timed out.");
                Observed::nothing(Observation { generation, ..Observation::default() })
            });
            let _ = tx.send(result);
        }));
    }

    fn create_repair(&self, reason: &str) -> anyhow::Result<RolloutId> {
        let store = &self.cx.env.store;
        let deployed = store
            .deployed(&self.name)?
            .ok_or_else(|| anyhow::anyhow!("fleet `{}` was never deployed", self.name))?;
        let deployed_rollout = store.rollout(deployed.rollout)?;
        let mut record = Rollout::new(
            Some(self.name.clone()),
            deployed.revision.clone(),
            format!("repair: {reason}"),
            "repair".into(),
            Origin::Repair,
            self.now(),
        );
        record.plan = Plan {
            bake: vec![],
            reconcile: false,
            roll: true,
            reason: format!("repair onto the deployed image {}: {reason}", deployed.image),
        };
        record.image = Some(deployed.image.clone());
        record.stage_images = deployed_rollout.stage_images.clone();
        record.outputs = deployed_rollout.outputs.clone();
        record.previous_image = Some(deployed.image.clone());
        let rollout = store.create_rollout(record)?;
        tracing::warn!(rollout = %rollout.id, fleet = %self.name, reason, "Repairing the fleet.");
        store.append_event(
            rollout.id,
            Level::Warn,
            EventKind::Plan,
            rollout.plan.reason.clone(),
            None,
        )?;
        Ok(rollout.id)
    }

    /// `image.rebake`: bake again from the deployed commit without the cache (security updates
    /// of the base), reconcile and roll. One attempt per interval.
    fn create_rebake(&self) -> anyhow::Result<Option<RolloutId>> {
        let store = &self.cx.env.store;
        let Some(fleet) = &self.fleet else { return Ok(None) };
        let Some(every) = fleet.image.rebake else { return Ok(None) };
        let Some(deployed) = store.deployed(&self.name)? else { return Ok(None) };
        let interval = crate::manifest::format_duration(every);
        let mut record = Rollout::new(
            Some(fleet.name.clone()),
            deployed.revision.clone(),
            format!("scheduled rebake (every {interval})"),
            "schedule".into(),
            Origin::Rebake,
            self.now(),
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
        let rollout = store.create_rollout(record)?;
        tracing::info!(rollout = %rollout.id, fleet = %fleet.name, "Scheduled rebake.");
        store.append_event(
            rollout.id,
            Level::Info,
            EventKind::Plan,
            rollout.plan.reason.clone(),
            None,
        )?;
        Ok(Some(rollout.id))
    }
}

fn command_error(error: RollbackError) -> CommandError {
    match error {
        RollbackError::BadPrefix(message) => CommandError { status: 400, message },
        RollbackError::Refused(message) => CommandError { status: 409, message },
        RollbackError::Store(e) => CommandError { status: 500, message: chain(&e) },
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A job: prepares the rollout (the fleet at its commit, the provider) and drives it.
async fn run_job(
    cx: &Context,
    shared: &Shared,
    name: &str,
    id: RolloutId,
    prepared: Option<Prepared>,
    mut control: watch::Receiver<Control>,
) -> Outcome {
    let _gate = shared.gate.clone().read_owned().await;
    let preparing = prepare(cx, shared, name, id, prepared);
    tokio::pin!(preparing);
    // A stop that arrives while the provider is slow to open ends a rollout that has not
    // started rolling at once; a rolling one needs its provider and waits.
    let (fleet, trees, provider) = loop {
        tokio::select! {
            res = &mut preparing => match res {
                Ok(ready) => break ready,
                Err(outcome) => return outcome,
            },
            changed = control.changed() => {
                if changed.is_err() {
                    // The reconciler is gone (shutdown): nothing more to do.
                    return Outcome::DriverFailed("the fleet's reconciler stopped".into());
                }
                let ctl = *control.borrow_and_update();
                if ctl != Control::Run {
                    match driver::stop_before_rolling(&cx.env, id, ctl) {
                        Ok(Some(state)) => return Outcome::Ended(state),
                        Ok(None) => {}
                        Err(error) => return Outcome::DriverFailed(chain(&error)),
                    }
                }
            }
        }
    };
    match driver::drive(&cx.env, &fleet, provider, id, trees, control).await {
        Ok(state) => {
            tracing::info!(rollout = %id, fleet = %name, state = %state, "Rollout ended.");
            Outcome::Ended(state)
        }
        Err(error) => Outcome::DriverFailed(chain(&error)),
    }
}

type Ready = (Fleet, BTreeMap<String, String>, SharedProvider);

async fn prepare(
    cx: &Context,
    shared: &Shared,
    name: &str,
    id: RolloutId,
    prepared: Option<Prepared>,
) -> Result<Ready, Outcome> {
    let store = &cx.env.store;
    let rollout = store.rollout(id).map_err(|e| Outcome::NotStarted {
        transient: e.is_io(),
        error: format!("reading rollout #{id}: {}", chain(&e)),
    })?;
    let (fleet, trees) = match prepared {
        Some(p) if p.fleet.name == name => (p.fleet, p.trees),
        _ => {
            let mirror = cx.env.mirror.clone();
            let revision = rollout.revision.clone();
            let fleet_name = name.to_owned();
            let read = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let fleet = crate::planner::fleet_at(&mirror, &revision, &fleet_name)?.ok_or_else(
                    || {
                        anyhow::anyhow!(
                            "fleet `{fleet_name}` is not in the manifest at {}",
                            revision.short()
                        )
                    },
                )?;
                let trees = crate::planner::fleet_trees(&mirror, &revision, &fleet)?;
                Ok((fleet, trees))
            })
            .await;
            match read {
                Ok(Ok(read)) => read,
                Ok(Err(error)) => {
                    return Err(Outcome::NotStarted {
                        transient: false,
                        error: format!("{error:#}"),
                    });
                }
                Err(error) => {
                    return Err(Outcome::NotStarted { transient: true, error: error.to_string() });
                }
            }
        }
    };
    let provider = provider_for(cx, shared, &fleet, &rollout.revision).await.map_err(|error| {
        Outcome::NotStarted { transient: error.is_transient(), error: chain(&error) }
    })?;
    Ok((fleet, trees, provider))
}

/// The fleet's provider for `revision`: the open one when its key matches, else a new one.
/// A local provider that cannot open with new settings (a busy `loadBalancer.port`) is recorded
/// in the log once and the fleet keeps the one it has, so it goes on serving where it was.
pub async fn provider_for(
    cx: &Context,
    shared: &Shared,
    fleet: &Fleet,
    revision: &Revision,
) -> Result<SharedProvider, crate::provider::OpenError> {
    let key = crate::provider::open_key(fleet, revision);
    let mut slot = shared.provider.lock().await;
    if let Some((existing, provider)) = &slot.current {
        if *existing == key {
            return Ok(provider.clone());
        }
    }
    let open_cx = crate::provider::OpenContext {
        fleets_dir: cx.config.data_dir.join("fleets"),
        mirror: cx.env.mirror.clone(),
        kiln_exe: cx.config.kiln_exe.clone(),
        instance_ports: cx.config.instance_ports,
    };
    match crate::provider::open(fleet, revision, &open_cx).await {
        Ok(provider) => {
            slot.current = Some((key, provider.clone()));
            slot.last_failure = None;
            Ok(provider)
        }
        Err(error) if fleet.rollout.provider.kind() == ProviderKind::Local => {
            let message = format!("fleet `{}`: {error}", fleet.name);
            if !error.is_transient() && slot.last_failure.as_ref() != Some(&message) {
                tracing::error!(fleet = %fleet.name, error = %message, "Load balancer change failed; the fleet keeps its current one.");
                record_provider_failure(&cx.env.store, fleet, revision, &message);
                slot.last_failure = Some(message);
            }
            match &slot.current {
                Some((key, provider)) if key.starts_with("local:") => Ok(provider.clone()),
                _ => Err(error),
            }
        }
        Err(error) => Err(error),
    }
}

fn record_provider_failure(
    store: &crate::store::Store,
    fleet: &Fleet,
    revision: &Revision,
    message: &str,
) {
    let now = crate::model::now();
    // The change came with the newest commit, not with the deployed one.
    let tip = store.get_meta::<Revision>(super::TIP_KEY).ok().flatten();
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
    if let Err(error) =
        super::record_commit_level(store, &record, RolloutState::Failed, message.to_owned())
    {
        tracing::error!(error = %chain(&error), "Could not record a load balancer failure.");
    }
}

/// What one look at the fleet found.
#[derive(Debug)]
struct Observed {
    /// For `decide`.
    observation: Observation,
    /// Instances with their health (for the status view), when the provider answered.
    instances: Option<Vec<InstanceStatus>>,
    /// The load balancer's address, when there is one.
    endpoint: Option<String>,
    /// The provider's list as it came (a drift check reuses it).
    listing: Option<crate::provider::Observation>,
}

impl Observed {
    fn nothing(observation: Observation) -> Observed {
        Observed { observation, instances: None, endpoint: None, listing: None }
    }
}

/// One look at the fleet: instances, their health, whether a rebake is due.
async fn observe(
    cx: &Context,
    shared: &Shared,
    fleet: &Fleet,
    generation: u64,
    busy: bool,
) -> Observed {
    let store = &cx.env.store;
    let mut observation = Observation { generation, ..Observation::default() };
    // Fleets never deployed have no provider yet; opening one would start a load balancer.
    let Some(deployed) = store.deployed(&fleet.name).ok().flatten() else {
        return Observed::nothing(observation);
    };
    observation.deployed = true;
    // While a job runs, look through its provider rather than opening the deployed commit's.
    let current = if busy {
        shared.provider.lock().await.current.as_ref().map(|(_, p)| p.clone())
    } else {
        None
    };
    let opened = match current {
        Some(provider) => Ok(provider),
        None => provider_for(cx, shared, fleet, &deployed.revision).await,
    };
    let provider = match opened {
        Ok(provider) => provider,
        Err(error) => {
            tracing::debug!(fleet = %fleet.name, error = %chain(&error), "Provider unavailable.");
            observation.deployed = false;
            return Observed::nothing(observation);
        }
    };
    let endpoint = provider.endpoint();
    let listing = match provider.observe().await {
        Ok(listing) => listing,
        Err(error) => {
            tracing::debug!(fleet = %fleet.name, error = %chain(&error), "Could not list instances.");
            observation.deployed = false;
            return Observed { endpoint, ..Observed::nothing(observation) };
        }
    };
    let (instances, desired) = (&listing.instances, listing.desired);
    for instance in instances {
        match (instance.running, instance.image == deployed.image) {
            (false, _) => observation.dead += 1,
            (true, on_image) => {
                observation.running += 1;
                if !on_image {
                    observation.off_image += 1;
                } else if !instance.attached {
                    observation.unattached += 1;
                }
            }
        }
    }
    // An idle fleet keeps what its provider wants (an autoscaler's count), else its manifest
    // number, or within `{min, max}` whatever it runs.
    observation.capacity =
        crate::rollout::capacity::target(fleet.rollout.capacity, desired, observation.running);
    observation.rebake_due = !busy && rebake_due(store, fleet, cx.env.clock.now());
    // Probing each instance costs a provider call per instance for a remote provider (a process
    // and an API request each): an idle remote fleet shows the health its `list` reported (one
    // call for the whole fleet), or none. The local provider's probes are plain HTTP.
    let probe = busy || fleet.rollout.provider.kind() == ProviderKind::Local;
    let health = if probe {
        driver::check_health(provider.clone(), &fleet.rollout.health_check.http, instances).await
    } else {
        instances.iter().map(|i| listing.health.get(&i.id).copied()).collect()
    };
    let statuses = instances
        .iter()
        .cloned()
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
    // Only an idle fleet's list stands for what it runs between rollouts.
    let listing = (!busy).then_some(listing);
    Observed { observation, instances: Some(statuses), endpoint, listing }
}

/// The image is older than `image.rebake` and no rebake was tried within the interval.
fn rebake_due(store: &crate::store::Store, fleet: &Fleet, now: crate::model::Timestamp) -> bool {
    let Some(every) = fleet.image.rebake else { return false };
    if !crate::pipeline::bake::rebake_due(store, fleet, now) {
        return false;
    }
    let recent = store
        .rollouts(&RolloutFilter {
            fleet: Some(fleet.name.clone()),
            limit: Some(50),
            ..RolloutFilter::default()
        })
        .map(|rollouts| {
            rollouts.into_iter().find(|r| r.origin == Origin::Rebake).is_some_and(|r| {
                now.signed_duration_since(r.created_at).to_std().is_ok_and(|age| age < every)
            })
        })
        .unwrap_or(true);
    !recent
}
