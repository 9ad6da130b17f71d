//! The operator: a router in front of one reconciler per fleet.
//!
//! ```text
//!  source events ──▶ recorder task: record commits, plan the tip (git, off the loop), create rollouts
//!                                   │ Planned
//!  verbs (API) ──────▶ router ◀─────┘  ──FleetMsg──▶ fleet reconciler (one task per fleet, `fleet.rs`)
//!                        │ gc (a task, between jobs)          decide(lane, input, now) → effects
//! ```
//!
//! The router only moves messages: nothing it does waits on git, a hook or a provider, so a verb
//! or a webhook is recorded at once whatever a provider does. Policy is in [`decide`] (pure);
//! everything slow runs in a fleet's own tasks (`fleet.rs`) or the recorder.

pub mod decide;
pub mod fleet;
mod recorder;

use crate::manifest::Fleet;
use crate::model::Revision;
use crate::planner;
use crate::rollout::driver::DriverEnv;
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};
use crate::source::SourceEvent;
use crate::store::{CommitRecord, EventKind, Level, RolloutFilter, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
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
    /// Run again, as a new rollout (origin `retry`), the fleet's last rollout when it failed,
    /// rolled back or was aborted: the same commit, and the same image once it was baked.
    Retry {
        /// Fleet.
        fleet: String,
    },
    /// Deploy a commit of the tracked branch's history (a full id or a prefix of at least 7
    /// hex digits) as a new rollout (origin `deploy`).
    Deploy {
        /// Fleet.
        fleet: String,
        /// The commit.
        commit: String,
    },
    /// Retire a fleet removed from kiln.yaml: drain and terminate its instances and stop its
    /// load balancer (a `prune` rollout). Refused for a fleet the tip's manifest still has.
    Down {
        /// Fleet.
        fleet: String,
    },
    /// Check the fleet for drift now (in the background; the report lands in
    /// `FleetStatus::drift`). Answers [`NO_ROLLOUT`].
    Drift {
        /// Fleet.
        fleet: String,
    },
}

/// The id a verb that creates no rollout answers with (`drift`).
pub const NO_ROLLOUT: RolloutId = RolloutId(0);

impl Command {
    /// The fleet the verb applies to.
    pub fn fleet(&self) -> &str {
        match self {
            Command::Pause { fleet }
            | Command::Resume { fleet }
            | Command::Abort { fleet }
            | Command::Rollback { fleet, .. }
            | Command::Retry { fleet }
            | Command::Deploy { fleet, .. }
            | Command::Down { fleet }
            | Command::Drift { fleet } => fleet,
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
        self.fleets.read().map(|v| v.values().cloned().collect()).unwrap_or_default()
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
    /// The last drift check's report, if the fleet was ever checked.
    #[serde(default)]
    pub drift: Option<crate::drift::DriftReport>,
    /// The tip's kiln.yaml no longer has the fleet, but it has a deployment (instances, a load
    /// balancer): `kiln down FLEET` retires it, `prune: true` does so by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub orphaned: bool,
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

/// The shared, operator-maintained view of every fleet, by name (each fleet's reconciler keeps
/// its own entry current).
pub type FleetView = std::sync::Arc<std::sync::RwLock<BTreeMap<String, FleetStatus>>>;

// ---------------------------------------------------------------------------------------------
// The router.
// ---------------------------------------------------------------------------------------------

/// How often a failing store is probed so it recovers (and `/healthz` turns ok) even when idle.
const HEAL_EVERY: Duration = Duration::from_secs(2);
/// Garbage collection runs this long after a job ended (several ending together: one run).
const GC_AFTER_JOB: Duration = Duration::from_secs(1);

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
    /// Garbage collection compacts the events of rollouts that ended longer ago than this.
    pub compact_after: Option<Duration>,
    /// The ports local instances listen on (`None`: any free port).
    pub instance_ports: Option<crate::provider::local::PortRange>,
    /// Signature verification imposed by the daemon's flags (`None`: the manifest decides).
    pub verify: Option<crate::verify::DaemonPolicy>,
}

struct FleetEntry {
    tx: mpsc::Sender<fleet::FleetMsg>,
    shared: Arc<fleet::Shared>,
}

/// The operator: routes source events, verbs and timers to one reconciler per fleet.
/// Everything it knows that matters is in the store.
pub struct Operator {
    cx: fleet::Context,
    jobs_ended: mpsc::UnboundedReceiver<String>,
    fleets: BTreeMap<String, FleetEntry>,
    tasks: Vec<JoinHandle<()>>,
}

impl Operator {
    /// Creates the operator; `view` is shared with the API.
    pub fn new(config: OperatorConfig, env: DriverEnv, view: FleetView) -> Operator {
        let (jobs_ended_tx, jobs_ended) = mpsc::unbounded_channel();
        Operator {
            cx: fleet::Context {
                env: Arc::new(env),
                config: Arc::new(config),
                view,
                jobs_ended: jobs_ended_tx,
                observe_slots: Arc::new(tokio::sync::Semaphore::new(fleet::MAX_OBSERVATIONS)),
            },
            jobs_ended,
            fleets: BTreeMap::new(),
            tasks: Vec::new(),
        }
    }

    fn store(&self) -> &Store {
        &self.cx.env.store
    }

    /// Runs until `shutdown` fires. Resumes the rollouts a previous run left in motion first.
    pub async fn run(
        mut self,
        source_events: mpsc::Receiver<SourceEvent>,
        mut commands: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) {
        let fleets = match self.fleets_at_tip().await {
            Ok(fleets) => fleets,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "Could not read the manifest at the recorded tip.");
                Vec::new()
            }
        };
        let mut active: BTreeMap<String, Vec<(RolloutId, RolloutState)>> = BTreeMap::new();
        match self.store().active_rollouts() {
            Ok(rollouts) => {
                for rollout in rollouts {
                    if let Some(fleet) = rollout.fleet {
                        active.entry(fleet).or_default().push((rollout.id, rollout.state));
                    }
                }
            }
            Err(error) => {
                tracing::error!(error = %crate::error::chain(&error), "Could not resume rollouts from the store.")
            }
        }
        for fleet in fleets {
            let name = fleet.name.clone();
            let recovered = active.remove(&name).unwrap_or_default();
            self.spawn_fleet(&name, Some(fleet), recovered, &shutdown);
        }
        for (name, recovered) in active {
            // Unfinished rollouts of a fleet the tip no longer has: finished all the same.
            self.spawn_fleet(&name, None, recovered, &shutdown);
        }
        // Deployed fleets the tip no longer has are orphaned: shown, and `kiln down` reaches them.
        for name in self.store().deployed_fleets().unwrap_or_default() {
            if !self.fleets.contains_key(&name) {
                self.spawn_fleet(&name, None, Vec::new(), &shutdown);
            }
        }

        let (planned_tx, mut planned_rx) = mpsc::unbounded_channel();
        let mut recorder = recorder::Recorder::new(
            self.store().clone(),
            self.cx.env.mirror.clone(),
            self.cx.config.branch.clone(),
            self.cx.env.metrics.clone(),
            planned_tx,
        );
        recorder.verify = self.cx.config.verify.clone();
        self.tasks.push(tokio::spawn(recorder.run(source_events, shutdown.clone())));

        let mut heal = tokio::time::interval(HEAL_EVERY);
        heal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first collection runs soon after start, then every `gc::INTERVAL` or after jobs.
        let mut gc_due = Some(tokio::time::Instant::now() + HEAL_EVERY);
        let mut gc_task: Option<JoinHandle<Option<crate::gc::Report>>> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(planned) = planned_rx.recv() => self.on_planned(planned, &shutdown).await,
                Some(request) = commands.recv() => self.on_command(request, &shutdown),
                Some(_fleet) = self.jobs_ended.recv() => {
                    let soon = tokio::time::Instant::now() + GC_AFTER_JOB;
                    gc_due = Some(gc_due.map_or(soon, |at| at.min(soon)));
                }
                () = sleep_until(gc_due), if gc_task.is_none() => {
                    gc_due = None;
                    gc_task = Some(tokio::spawn(collect_garbage(self.cx.clone(), self.shared())));
                }
                report = join(&mut gc_task) => {
                    gc_task = None;
                    // More due than one run removes: continue soon, not in ten minutes.
                    let wait = if report.flatten().is_some_and(|r| r.more) { HEAL_EVERY } else { crate::gc::INTERVAL };
                    let next = tokio::time::Instant::now() + wait;
                    gc_due = Some(gc_due.map_or(next, |at| at.min(next)));
                }
                _ = heal.tick() => {
                    if let Err(error) = self.store().heal() {
                        tracing::debug!(error = %crate::error::chain(&error), "The store still fails.");
                    }
                }
            }
        }
        if let Some(task) = gc_task {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }

    async fn fleets_at_tip(&self) -> anyhow::Result<Vec<Fleet>> {
        let Some(tip) = self.store().get_meta::<Revision>(TIP_KEY)? else {
            return Ok(Vec::new());
        };
        let mirror = self.cx.env.mirror.clone();
        let manifest =
            tokio::task::spawn_blocking(move || planner::manifest_at(&mirror, &tip)).await??;
        Ok(match manifest {
            Some(Ok(manifest)) => manifest.fleets,
            _ => Vec::new(),
        })
    }

    fn shared(&self) -> Vec<(String, Arc<fleet::Shared>)> {
        self.fleets.iter().map(|(name, entry)| (name.clone(), entry.shared.clone())).collect()
    }

    fn spawn_fleet(
        &mut self,
        name: &str,
        spec: Option<Fleet>,
        active: Vec<(RolloutId, RolloutState)>,
        shutdown: &CancellationToken,
    ) -> mpsc::Sender<fleet::FleetMsg> {
        let shared = Arc::new(fleet::Shared::default());
        let (tx, task) = fleet::spawn(
            name.to_owned(),
            self.cx.clone(),
            shared.clone(),
            spec,
            active,
            shutdown.clone(),
        );
        self.tasks.push(task);
        self.fleets.insert(name.to_owned(), FleetEntry { tx: tx.clone(), shared });
        tx
    }

    async fn on_planned(&mut self, planned: recorder::Planned, shutdown: &CancellationToken) {
        if let Some(fleets) = &planned.fleets {
            // A fleet the tip's (valid) manifest no longer has was removed (or renamed).
            let removed: Vec<mpsc::Sender<fleet::FleetMsg>> = self
                .fleets
                .iter()
                .filter(|(name, _)| !fleets.iter().any(|f| &f.name == *name))
                .map(|(_, entry)| entry.tx.clone())
                .collect();
            for tx in removed {
                let _ = tx.send(fleet::FleetMsg::Removed).await;
            }
        }
        for spec in planned.fleets.into_iter().flatten() {
            let name = spec.name.clone();
            match self.fleets.get(&name) {
                Some(entry) => {
                    let _ = entry.tx.send(fleet::FleetMsg::Manifest(Box::new(spec))).await;
                }
                None => {
                    self.spawn_fleet(&name, Some(spec), Vec::new(), shutdown);
                }
            }
        }
        for (id, prepared) in planned.rollouts {
            let name = prepared.fleet.name.clone();
            let tx = match self.fleets.get(&name) {
                Some(entry) => entry.tx.clone(),
                None => self.spawn_fleet(&name, Some(prepared.fleet.clone()), Vec::new(), shutdown),
            };
            let msg = fleet::FleetMsg::Planned { id, prepared: Some(Box::new(prepared)) };
            let _ = tx.send(msg).await;
        }
    }

    fn on_command(&mut self, request: CommandRequest, shutdown: &CancellationToken) {
        let name = request.command.fleet().to_owned();
        if matches!(request.command, Command::Down { .. })
            && !self.fleets.contains_key(&name)
            && self.store().deployed(&name).ok().flatten().is_some()
        {
            self.spawn_fleet(&name, None, Vec::new(), shutdown);
        }
        let Some(entry) = self.fleets.get(&name) else {
            let message = format!("no fleet `{name}`");
            let _ = request.reply.send(Err(CommandError { status: 404, message }));
            return;
        };
        if let Err(error) = entry.tx.try_send(fleet::FleetMsg::Verb(request.command, request.reply))
        {
            let (reply, message) = match error {
                mpsc::error::TrySendError::Full(fleet::FleetMsg::Verb(_, reply)) => {
                    (Some(reply), format!("fleet `{name}` is busy; try again"))
                }
                mpsc::error::TrySendError::Closed(fleet::FleetMsg::Verb(_, reply)) => {
                    (Some(reply), "the operator is shutting down".to_owned())
                }
                _ => (None, String::new()),
            };
            if let Some(reply) = reply {
                let _ = reply.send(Err(CommandError { status: 503, message }));
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Option<T> {
    match task {
        Some(handle) => handle.await.ok(),
        None => std::future::pending().await,
    }
}

/// Garbage-collects images, terminated instance dirs and exec repo copies of every fleet with
/// no rollout running, queued or paused (see `gc`). Each idle fleet's gate is held while it
/// runs, so no job of those fleets can start under it.
async fn collect_garbage(
    cx: fleet::Context,
    fleets: Vec<(String, Arc<fleet::Shared>)>,
) -> Option<crate::gc::Report> {
    let mut guards = Vec::new();
    let mut busy = std::collections::BTreeSet::new();
    let mut providers = Vec::new();
    for (name, shared) in fleets {
        if shared.busy.load(std::sync::atomic::Ordering::SeqCst) {
            busy.insert(name);
            continue;
        }
        match shared.gate.clone().try_write_owned() {
            Ok(guard) => guards.push(guard),
            Err(_) => {
                busy.insert(name);
                continue;
            }
        }
        if let Ok(slot) = shared.provider.try_lock() {
            if let Some((key, provider)) = &slot.current {
                providers.push((name.clone(), key.clone(), provider.clone()));
            }
        }
    }
    let report = crate::gc::run(
        cx.env.store.clone(),
        cx.config.data_dir.clone(),
        cx.config.keep_images,
        cx.config.compact_after,
        busy,
        providers,
    )
    .await;
    drop(guards);
    report
}

// ---------------------------------------------------------------------------------------------
// Records the reconcilers and the recorder share.
// ---------------------------------------------------------------------------------------------

/// A record in the log for a commit that concerns no single fleet.
pub(crate) fn record_commit_level(
    store: &Store,
    commit: &CommitRecord,
    state: RolloutState,
    reason: String,
) -> Result<Rollout, StoreError> {
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
    let rollout = store.create_rollout(record)?;
    let level = if state == RolloutState::Failed { Level::Error } else { Level::Info };
    // Created in its final state: it moved from `pending` without passing anything else.
    store.append_state_change(
        rollout.id,
        level,
        RolloutState::Pending,
        state,
        format!("{state}: {reason}"),
    )?;
    Ok(rollout)
}

/// Ends a rollout no driver is running (queued, paused).
pub(crate) fn finish_outside_driver(
    store: &Store,
    id: RolloutId,
    state: RolloutState,
    reason: String,
) -> Result<(), StoreError> {
    let mut rollout = store.rollout(id)?;
    if rollout.state.is_terminal() {
        return Ok(());
    }
    let from = rollout.state;
    rollout.state = state;
    rollout.reason = Some(reason.clone());
    rollout.finished_at = Some(crate::model::now());
    // The record and its state event in one write: a feed consumer never misses the change.
    store.put_rollout_with_change(
        &rollout,
        from,
        Level::Warn,
        format!("{from} → {state}: {reason}"),
    )?;
    Ok(())
}

/// `kiln rollback [--to COMMIT]`: records a rollout that puts `fleet` back on the image of an
/// earlier successful rollout (the one before the current image, or `to`'s).
pub(crate) fn create_rollback(
    store: &Store,
    fleet: &str,
    to: Option<&str>,
) -> Result<RolloutId, RollbackError> {
    let deployed = store.deployed(fleet)?;
    // `--to` names one commit unambiguously among the fleet's rollouts.
    let to = match to {
        Some(prefix) => {
            let prefix = check_prefix(prefix).map_err(RollbackError::BadPrefix)?;
            let known = store.rollouts(&RolloutFilter {
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
    let succeeded = store.rollouts(&RolloutFilter {
        fleet: Some(fleet.to_owned()),
        state: Some(RolloutState::Succeeded),
        commit: to.map(str::to_owned),
        ..RolloutFilter::default()
    })?;
    let current = deployed.as_ref().map(|d| d.image.clone());
    let target = match to {
        Some(_) => succeeded.iter().find(|r| r.image.is_some()),
        None => last_good(&succeeded, current.as_ref()),
    }
    .cloned()
    .ok_or_else(|| {
        RollbackError::Refused(match to {
            Some(to) => format!("no succeeded rollout of fleet `{fleet}` at commit `{to}`"),
            None => format!("fleet `{fleet}` has no earlier image to roll back to"),
        })
    })?;
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
        reason: format!(
            "manual rollback to the image of rollout #{} (fast path: no canary gate, window or delay)",
            target.id
        ),
    };
    record.image = target.image.clone();
    record.stage_images = target.stage_images.clone();
    record.previous_image = current;
    record.outputs = target.outputs.clone();
    let rollout = store.create_rollout(record)?;
    store.append_event(
        rollout.id,
        Level::Info,
        EventKind::Command,
        "rollback requested by an operator",
        None,
    )?;
    Ok(rollout.id)
}

/// The image `rollback` restores: the newest succeeded rollout's image that is neither the
/// current one nor one a rollback moved away from. So a rollback after a rollback goes one
/// good release further back, never to the image just rolled back from. `succeeded` is newest
/// first; repairs and drift records restore nothing of their own and are passed over.
pub(crate) fn last_good<'a>(
    succeeded: &'a [Rollout],
    current: Option<&crate::model::ImageRef>,
) -> Option<&'a Rollout> {
    let mut skip: Vec<&crate::model::ImageRef> = current.into_iter().collect();
    for rollout in succeeded {
        if rollout.origin.is_fast() {
            skip.extend(rollout.previous_image.as_ref());
            continue;
        }
        if matches!(rollout.origin, Origin::Repair | Origin::Drift) {
            continue;
        }
        match &rollout.image {
            Some(image) if !skip.contains(&image) => return Some(rollout),
            _ => {}
        }
    }
    None
}

/// `kiln retry FLEET`: records a rollout that runs the fleet's last rollout again when it
/// failed, rolled back or was aborted (a cause outside the commit: a cloud API outage, a quota).
/// Repairs and drift records are not what an operator retries and are passed over.
pub(crate) fn create_retry(store: &Store, fleet: &str) -> Result<RolloutId, RollbackError> {
    let recent = store.rollouts(&RolloutFilter {
        fleet: Some(fleet.to_owned()),
        limit: Some(200),
        ..RolloutFilter::default()
    })?;
    let last = recent
        .into_iter()
        .find(|r| !matches!(r.origin, Origin::Repair | Origin::Drift))
        .ok_or_else(|| {
            RollbackError::Refused(format!("fleet `{fleet}` has no rollout to retry"))
        })?;
    match last.state {
        RolloutState::Failed | RolloutState::RolledBack | RolloutState::Aborted => {}
        state if !state.is_terminal() => {
            return Err(RollbackError::Refused(format!(
                "rollout #{} of fleet `{fleet}` is still {state}; retry re-runs a rollout that failed, rolled back or was aborted",
                last.id
            )));
        }
        state => {
            return Err(RollbackError::Refused(format!(
                "the last rollout of fleet `{fleet}` (#{}) {state}; retry re-runs a rollout that failed, rolled back or was aborted",
                last.id
            )));
        }
    }
    let current = store.deployed(fleet)?.map(|d| d.image);
    let mut record = Rollout::new(
        Some(fleet.to_owned()),
        last.revision.clone(),
        last.summary.clone(),
        "command".into(),
        Origin::Retry { of: last.id },
        crate::model::now(),
    );
    record.plan = Plan {
        reason: format!("retry of rollout #{} ({}): {}", last.id, last.state, last.plan.reason),
        ..last.plan.clone()
    };
    // A baked image is reused (the bake is not what failed, or it would have none).
    record.image = last.image.clone();
    record.stage_images = last.stage_images.clone();
    record.previous_image = current;
    let rollout = store.create_rollout(record)?;
    store.append_event(
        rollout.id,
        Level::Info,
        EventKind::Command,
        format!("retry of rollout #{} requested by an operator", last.id),
        None,
    )?;
    Ok(rollout.id)
}

/// Records that `fleet` was removed from kiln.yaml while deployed: a fleet-level entry in the
/// log (`skipped`, with an `orphaned` plan event) saying what still runs and what to do.
pub(crate) fn record_orphaned(
    store: &Store,
    fleet: &str,
    deployed: &crate::store::Deployed,
    prune: bool,
) -> Result<Rollout, StoreError> {
    let now = crate::model::now();
    let tip = store.get_meta::<Revision>(TIP_KEY)?.unwrap_or_else(|| deployed.revision.clone());
    let mut record = Rollout::new(
        Some(fleet.to_owned()),
        tip.clone(),
        format!("fleet `{fleet}` removed from kiln.yaml"),
        "plan".into(),
        Origin::Commit,
        now,
    );
    let next = if prune {
        "prune is set: its instances and load balancer are being retired".to_owned()
    } else {
        format!(
            "its instances and load balancer still run on {}; `kiln down {fleet}` retires them (or set `prune: true`)",
            deployed.image
        )
    };
    let reason =
        format!("orphaned: fleet `{fleet}` is not in kiln.yaml at {}; {next}", tip.short());
    record.state = RolloutState::Skipped;
    record.plan = Plan { reason: reason.clone(), ..Plan::default() };
    record.reason = Some(reason.clone());
    record.previous_image = Some(deployed.image.clone());
    record.finished_at = Some(now);
    let rollout = store.create_rollout(record)?;
    store.append_event(rollout.id, Level::Warn, EventKind::Plan, reason, None)?;
    store.append_state_change(
        rollout.id,
        Level::Warn,
        RolloutState::Pending,
        RolloutState::Skipped,
        "skipped: orphaned".to_owned(),
    )?;
    Ok(rollout)
}

/// Records a `prune` rollout retiring `fleet` (its deployed commit's spec drives it).
pub(crate) fn create_prune(
    store: &Store,
    fleet: &str,
    deployed: &crate::store::Deployed,
    why: &str,
) -> Result<RolloutId, StoreError> {
    let summary = store
        .rollout(deployed.rollout)
        .map(|r| r.summary)
        .unwrap_or_else(|_| format!("fleet `{fleet}`"));
    let mut record = Rollout::new(
        Some(fleet.to_owned()),
        deployed.revision.clone(),
        format!("prune: {summary}"),
        "command".into(),
        Origin::Prune,
        crate::model::now(),
    );
    record.plan = Plan {
        bake: vec![],
        reconcile: false,
        roll: true,
        reason: format!(
            "retiring fleet `{fleet}` ({why}): drain and terminate its instances, stop its load balancer"
        ),
    };
    record.image = Some(deployed.image.clone());
    record.previous_image = Some(deployed.image.clone());
    let rollout = store.create_rollout(record)?;
    store.append_event(
        rollout.id,
        Level::Warn,
        EventKind::Plan,
        rollout.plan.reason.clone(),
        None,
    )?;
    Ok(rollout.id)
}

/// A commit `kiln deploy` may deploy, resolved in the mirror (blocking git reads).
#[derive(Debug)]
pub(crate) struct Deployable {
    /// The commit.
    pub commit: CommitRecord,
    /// The fleet at that commit.
    pub prepared: fleet::Prepared,
}

/// Resolves `commit` (a prefix) for `kiln deploy`: it must be on the tracked branch's history
/// (an ancestor of the last tip kiln recorded, or that tip) and its kiln.yaml must describe
/// `fleet`. Blocking: run it off the async loops.
pub(crate) fn resolve_deploy(
    mirror: &std::path::Path,
    tip: Option<&Revision>,
    branch: &str,
    commit: &str,
    fleet: &str,
) -> Result<Deployable, CommandError> {
    let refuse = |status: u16, message: String| CommandError { status, message };
    let prefix = check_prefix(commit).map_err(|m| refuse(400, m))?;
    let Some(tip) = tip else {
        return Err(refuse(409, format!("no commit of branch `{branch}` was recorded yet")));
    };
    let wanted = Revision(prefix.clone());
    let record = crate::source::git::commit_record(mirror, &wanted).map_err(|e| {
        refuse(404, format!("no commit `{prefix}` in the repository ({})", crate::error::chain(&e)))
    })?;
    let on_branch = crate::source::git::is_ancestor(mirror, &record.revision, tip)
        .map_err(|e| refuse(500, crate::error::chain(&e)))?;
    if !on_branch {
        return Err(refuse(
            409,
            format!(
                "commit {} is not on the history of branch `{branch}` (tip {}); kiln deploys only commits of its branch",
                record.revision.short(),
                tip.short()
            ),
        ));
    }
    let spec = planner::fleet_at(mirror, &record.revision, fleet)
        .map_err(|e| refuse(500, crate::error::chain(&e)))?
        .ok_or_else(|| {
            refuse(
                409,
                format!(
                    "fleet `{fleet}` is not in kiln.yaml at {} (or that kiln.yaml is invalid)",
                    record.revision.short()
                ),
            )
        })?;
    let trees = planner::fleet_trees(mirror, &record.revision, &spec)
        .map_err(|e| refuse(500, crate::error::chain(&e)))?;
    Ok(Deployable { commit: record, prepared: fleet::Prepared { fleet: spec, trees } })
}

/// Records the rollout of `kiln deploy`: every stage baked (the bake cache makes an image
/// already built free), the reconcile hook run, instances rolled through the fleet's gates.
pub(crate) fn create_deploy(store: &Store, deployable: &Deployable) -> Result<Rollout, StoreError> {
    let spec = &deployable.prepared.fleet;
    let commit = &deployable.commit;
    let mut record = Rollout::new(
        Some(spec.name.clone()),
        commit.revision.clone(),
        commit.summary.clone(),
        "command".into(),
        Origin::Deploy,
        crate::model::now(),
    );
    record.plan = Plan {
        bake: spec.image.stages.iter().map(|s| s.name.clone()).collect(),
        reconcile: spec.infra.is_some(),
        roll: true,
        reason: format!("deploy of commit {} requested by an operator", commit.revision.short()),
    };
    record.previous_image = store.deployed(&spec.name)?.map(|d| d.image);
    let rollout = store.create_rollout(record)?;
    store.append_event(
        rollout.id,
        Level::Info,
        EventKind::Command,
        rollout.plan.reason.clone(),
        None,
    )?;
    Ok(rollout)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RollbackError {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn succeeded(id: u64, origin: Origin, image: &str, previous: Option<&str>) -> Rollout {
        let mut r = Rollout::new(
            Some("web".into()),
            Revision(format!("{id:040}")),
            String::new(),
            "test".into(),
            origin,
            crate::model::now(),
        );
        r.id = RolloutId(id);
        r.state = RolloutState::Succeeded;
        r.image = Some(image.into());
        r.previous_image = previous.map(Into::into);
        r
    }

    #[test]
    fn rollback_goes_one_good_release_back_never_to_the_image_a_rollback_left() {
        // Issue 17: a rollback after a rollback redeployed the image just rolled back from.
        let back = |from: u64| Origin::Rollback { from: Some(RolloutId(from)) };
        let mut history = vec![
            succeeded(1, Origin::Commit, "a", None),
            succeeded(2, Origin::Commit, "b", Some("a")),
            succeeded(3, Origin::Commit, "c", Some("b")),
        ];
        history.reverse();
        let target = |h: &[Rollout], current: &str| {
            last_good(h, Some(&current.into())).and_then(|r| r.image.clone()).map(|i| i.0)
        };
        assert_eq!(target(&history, "c").as_deref(), Some("b"));
        history.insert(0, succeeded(4, back(2), "b", Some("c")));
        assert_eq!(target(&history, "b").as_deref(), Some("a"), "not c, rolled back from");
        history.insert(0, succeeded(5, back(1), "a", Some("b")));
        assert_eq!(target(&history, "a"), None, "nothing older");
        // Repairs restore nothing of their own; a new commit after rollbacks is a new release.
        history.insert(0, succeeded(6, Origin::Repair, "a", Some("a")));
        history.insert(0, succeeded(7, Origin::Commit, "d", Some("a")));
        assert_eq!(target(&history, "d").as_deref(), Some("a"), "b and c were left by rollbacks");
        history.insert(0, succeeded(8, Origin::Commit, "e", Some("d")));
        assert_eq!(target(&history, "e").as_deref(), Some("d"));
    }

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
}
