//! The driver: runs one rollout to a terminal or paused state, persisting before each effect.
//!
//! Each turn of the loop reloads the record, observes the provider (while rolling), asks the
//! pure [`step`] what to do and does exactly one thing:
//!
//! ```text
//! Record  → put_rollout (flushed) + event
//! Act     → put_rollout(intent) ─▶ provider call ─▶ put_rollout(result) + journal + event
//! Probe   → health checks ─▶ put_rollout(streaks)
//! Sleep   → wait for the time or for a control change
//! ```
//!
//! Nothing that changes a decision is kept in memory between turns, so dropping the future (or
//! a `kill -9`) at any await point resumes correctly from the store: an intent left behind is
//! completed through the provider's idempotency (a launch key returns the same instance).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

pub use super::step::Control;
use super::step::{
    self, Next, Observed, ProbeTarget, baked, begin, complete, reconciled, record_probes,
    retry_or_fail,
};
use crate::error::{Classify, ErrorClass, chain};
use crate::manifest::Fleet;
use crate::metrics::Metrics;
use crate::model::{Clock, ImageRef, InstanceId, RolloutId, Timestamp};
use crate::pipeline::StepContext;
use crate::provider::{Health, Instance, Provider, ProviderError, SharedProvider};
use crate::rollout::state::{Action, Origin, Rollout, RolloutState};
use crate::store::{
    Deployed, Event, EventKind, InstanceAction, InstanceEvent, Level, Store, StoreError,
};

/// Everything the driver needs besides the fleet and its provider.
#[derive(Debug, Clone)]
pub struct DriverEnv {
    /// The store.
    pub store: Store,
    /// The bare mirror of the watched repo (for `StepContext`).
    pub mirror: PathBuf,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Environment passed through to hooks.
    pub hook_env: Vec<(String, String)>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time (persisted timestamps, timeouts).
    pub clock: Arc<dyn Clock>,
    /// The daemon-wide bound on bake/reconcile steps running at once.
    pub slots: crate::pipeline::Slots,
}

/// Why driving a rollout stopped with an error. Failures of the rollout
/// itself are not errors: they end the rollout in `failed` / `rolled_back` with a reason.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The store could not be read or written; the rollout resumes when it can.
    #[error("failed to read or write rollout #{id}")]
    Store {
        /// The rollout.
        id: RolloutId,
        /// The cause.
        #[source]
        source: StoreError,
    },
    /// The rollout is not one of this fleet.
    #[error("rollout #{id} belongs to {}, not to fleet `{fleet}`", found.as_deref().map_or("no fleet".to_owned(), |f| format!("fleet `{f}`")))]
    WrongFleet {
        /// The rollout.
        id: RolloutId,
        /// The fleet asked for.
        fleet: String,
        /// The fleet on record.
        found: Option<String>,
    },
}

impl Classify for DriveError {
    fn class(&self) -> ErrorClass {
        match self {
            DriveError::Store { .. } => ErrorClass::Transient,
            DriveError::WrongFleet { .. } => ErrorClass::Stalled,
        }
    }
}

/// Longest a single HTTP health check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the driver sleeps without re-observing the provider while rolling.
const MAX_NAP: Duration = Duration::from_secs(5);

fn http_client() -> Option<reqwest::Client> {
    // No proxy: health checks go to instance addresses on private networks or 127.0.0.1.
    reqwest::Client::builder().timeout(PROBE_TIMEOUT).no_proxy().build().ok()
}

/// One health check: the provider's own view when it has one, else `GET healthCheck.http`.
/// `Err` describes the failed check as `GET /healthz on 127.0.0.1:41234: 500`.
async fn probe(
    provider: &dyn Provider,
    http: Option<&reqwest::Client>,
    path: &str,
    target: &ProbeTarget,
) -> Result<(), String> {
    match provider.health(&target.id).await {
        Ok(Some(Health::Healthy)) => return Ok(()),
        Ok(Some(Health::Unhealthy)) => {
            return Err(format!("provider `{}` reports {} unhealthy", provider.name(), target.id));
        }
        Ok(None) => {}
        Err(error) => return Err(format!("health of {}: {}", target.id, chain(&error))),
    }
    let Some(address) = &target.address else {
        return Err(format!("{} has no address to check", target.id));
    };
    let Some(http) = http else {
        return Err("no HTTP client for health checks".into());
    };
    match http.get(format!("http://{address}{path}")).send().await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("GET {path} on {address}: {}", response.status().as_u16())),
        Err(error) => {
            let what = if error.is_timeout() {
                format!("timed out after {}s", PROBE_TIMEOUT.as_secs())
            } else if error.is_connect() {
                "connection failed".to_owned()
            } else {
                chain(&error)
            };
            Err(format!("GET {path} on {address}: {what}"))
        }
    }
}

/// One health check of each running instance, all at once (for `kiln status`): `Some(true)`
/// healthy, `Some(false)` failing, `None` not running. Same check as during a rollout.
pub async fn check_health(
    provider: SharedProvider,
    path: &str,
    instances: &[Instance],
) -> Vec<Option<bool>> {
    let http = http_client();
    let mut checks = tokio::task::JoinSet::new();
    for (i, instance) in instances.iter().enumerate() {
        if !instance.running {
            continue;
        }
        let target = ProbeTarget { id: instance.id.clone(), address: instance.address.clone() };
        let (provider, http, path) = (provider.clone(), http.clone(), path.to_owned());
        checks.spawn(async move {
            (i, probe(provider.as_ref(), http.as_ref(), &path, &target).await.is_ok())
        });
    }
    let mut health = vec![None; instances.len()];
    while let Some(Ok((i, ok))) = checks.join_next().await {
        health[i] = Some(ok);
    }
    health
}

fn load(store: &Store, id: RolloutId) -> Result<Rollout, DriveError> {
    store.rollout(id).map_err(|source| DriveError::Store { id, source })
}

fn save(store: &Store, rollout: &Rollout) -> Result<(), DriveError> {
    store.put_rollout(rollout).map_err(|source| DriveError::Store { id: rollout.id, source })
}

/// Appends an event; losing a timeline line must not stop a rollout, so failures are logged.
fn event(
    store: &Store,
    id: RolloutId,
    level: Level,
    kind: EventKind,
    message: String,
    data: Option<serde_json::Value>,
) {
    if let Err(error) = store.append_event(id, level, kind, message, data) {
        warn!(rollout = %id, error = %chain(&error), "Could not record an event.");
    }
}

/// Persists `next` and records what changed.
fn commit(
    store: &Store,
    before: &Rollout,
    next: &Rollout,
    message: &str,
) -> Result<(), DriveError> {
    if before.state != next.state {
        let level = match next.state {
            RolloutState::Failed => Level::Error,
            RolloutState::RolledBack | RolloutState::Paused | RolloutState::Aborted => Level::Warn,
            _ => Level::Info,
        };
        let text = format!("{} → {}: {message}", before.state, next.state);
        // The record and its `state` event in one write: a kill never keeps one without the other.
        store
            .put_rollout_with_change(next, before.state, level, text)
            .map_err(|source| DriveError::Store { id: next.id, source })?;
        if level == Level::Error {
            tracing::error!(state = %next.state, reason = %message, "Rollout failed.");
        } else {
            info!(from = %before.state, to = %next.state, "{message}");
        }
        return Ok(());
    }
    save(store, next)?;
    if !message.is_empty() {
        info!("{message}");
        event(store, next.id, Level::Info, EventKind::Rollout, message.to_owned(), None);
    }
    Ok(())
}

/// Where instance journal entries go: the fleet, and the rollout that caused them (if any).
struct Journal<'a> {
    store: &'a Store,
    clock: &'a dyn Clock,
    fleet: &'a str,
    rollout: Option<RolloutId>,
}

/// One per-instance journal entry and, for a rollout, the matching timeline event.
type JournalEntry = (InstanceEvent, Option<Event>);

impl Journal<'_> {
    /// A journal entry and, for a rollout, its timeline event (`instance.launched`, ...).
    fn entry(
        &self,
        instance: &InstanceId,
        image: Option<&ImageRef>,
        action: InstanceAction,
        reason: Option<String>,
    ) -> JournalEntry {
        let at = self.clock.now();
        let entry = InstanceEvent {
            seq: 0,
            fleet: self.fleet.to_owned(),
            instance: instance.clone(),
            image: image.cloned(),
            rollout: self.rollout,
            action,
            at,
            reason: reason.clone(),
        };
        let event = self.rollout.map(|id| {
            let name = serde_json::to_value(action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "changed".into());
            let image_text = image.map(|i| format!(" ({i})")).unwrap_or_default();
            let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
            let level = match action {
                InstanceAction::Unhealthy | InstanceAction::Died => Level::Warn,
                _ => Level::Info,
            };
            let mut event = Event::new(
                id,
                level,
                EventKind::Instance(action),
                format!("{instance}{image_text} {name}{why}"),
                Some(serde_json::json!({ "instance": instance, "image": image })),
            );
            event.at = at;
            event
        });
        (entry, event)
    }

    /// Writes `rollout` with `entries` (journal and timeline) in one transaction, so a kill
    /// between them cannot keep one and lose the other.
    fn record_step(&self, rollout: &Rollout, entries: Vec<JournalEntry>) -> Result<(), DriveError> {
        let (journal, events): (Vec<InstanceEvent>, Vec<Option<Event>>) =
            entries.into_iter().unzip();
        let events: Vec<Event> = events.into_iter().flatten().collect();
        self.store
            .record_step(rollout, journal, events)
            .map(drop)
            .map_err(|source| DriveError::Store { id: rollout.id, source })
    }
}

/// Resolves when the operator asks to stop for good (abort or supersede); never if the channel
/// closes.
async fn until_stop(control: &mut watch::Receiver<Control>) {
    loop {
        if matches!(*control.borrow_and_update(), Control::Abort | Control::Supersede(_)) {
            return;
        }
        if control.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sleeps until `until` or until the control value changes.
async fn nap(
    clock: &dyn Clock,
    control: &mut watch::Receiver<Control>,
    until: Timestamp,
    cap: Duration,
) {
    let wait = (until - clock.now()).to_std().unwrap_or(Duration::ZERO).min(cap);
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        changed = control.changed() => {
            if changed.is_err() {
                // The operator dropped its sender: nobody can change the control any more.
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Drives rollout `id` of `fleet` (the manifest at the rollout's commit) until it is terminal
/// or paused. Resumes correctly from any persisted state (after a crash). Driving a paused
/// rollout with `Control::Run` resumes it (promoting a manual canary); with `Control::Pause`
/// it returns `Paused` at once.
///
/// A store that fails to write (a full disk) does not end the drive: the turn is retried with
/// backoff until the store works again, re-reading the record each time (every decision is in
/// the store, so a retried turn is a resumed one). A verb still wakes the wait.
#[instrument(skip_all, fields(rollout = %id, fleet = %fleet.name))]
pub async fn drive(
    env: &DriverEnv,
    fleet: &Fleet,
    provider: SharedProvider,
    id: RolloutId,
    trees: BTreeMap<String, String>,
    mut control: watch::Receiver<Control>,
) -> Result<RolloutState, DriveError> {
    let mut attempt = 0u32;
    let mut streak = None;
    loop {
        let res = drive_turns(env, fleet, provider.clone(), id, &trees, &mut control).await;
        match res {
            Err(error) if error.is_store_io() => {
                // A new failure streak starts the backoff over.
                let since = env.store.failure().map(|f| f.since);
                if since != streak {
                    streak = since;
                    attempt = 0;
                }
                let wait = crate::retry::nth_delay(&STORE_RETRY, attempt);
                attempt = attempt.saturating_add(1);
                warn!(error = %chain(&error), attempt, ?wait, "The store failed; retrying.");
                let until = step::add(env.clock.now(), wait);
                nap(env.clock.as_ref(), &mut control, until, wait).await;
            }
            other => return other,
        }
    }
}

/// Backoff between turns retried after a store failure: quick at first, at most 5 s apart, for
/// as long as it takes.
const STORE_RETRY: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    initial: Duration::from_millis(200),
    max_interval: Duration::from_secs(5),
    max_elapsed: None,
};

impl DriveError {
    /// True when the store failed to read or write (retried, not the rollout's failure).
    fn is_store_io(&self) -> bool {
        match self {
            DriveError::Store { source, .. } => source.is_io(),
            _ => false,
        }
    }
}

async fn drive_turns(
    env: &DriverEnv,
    fleet: &Fleet,
    provider: SharedProvider,
    id: RolloutId,
    trees: &BTreeMap<String, String>,
    control: &mut watch::Receiver<Control>,
) -> Result<RolloutState, DriveError> {
    let store = &env.store;
    let policy = &fleet.rollout;
    let cancel = CancellationToken::new();
    let http = http_client();
    let first = load(store, id)?;
    if first.fleet.as_deref() != Some(fleet.name.as_str()) {
        return Err(DriveError::WrongFleet { id, fleet: fleet.name.clone(), found: first.fleet });
    }
    if first.state == RolloutState::Paused && *control.borrow() == Control::Run {
        let resumed = step::resume(&first, env.clock.now());
        commit(store, &first, &resumed, "resumed")?;
    }
    // The route last given to the provider (`None`: not told yet in this job).
    let mut routed: Option<Option<crate::provider::Route>> = None;
    loop {
        let rollout = load(store, id)?;
        let ctl = *control.borrow_and_update();
        // Traffic follows the record: set before the next action (a canary is launched only
        // once the gray listener is kept off the old image), cleared when it ends.
        let wanted = step::route(&rollout, policy);
        let touched = wanted.is_some() || routed.is_some() || rollout.rolling.is_some();
        if routed.as_ref() != Some(&wanted) && touched {
            match provider.route(wanted.as_ref()).await {
                Ok(()) => routed = Some(wanted),
                Err(error) => {
                    let text = format!("routing traffic: {}", chain(&error));
                    warn!(error = %text, "Provider failed; retrying.");
                    let next = on_error(&rollout, error.class(), &text, env.clock.now());
                    commit(store, &rollout, &next, &text)?;
                    if let Some(until) = next.not_before {
                        nap(env.clock.as_ref(), control, until, MAX_NAP).await;
                    }
                    continue;
                }
            }
        }
        let needs_fleet = rollout.state == RolloutState::Rolling
            || (rollout.rolling.is_some() && rollout.state == RolloutState::Paused);
        let observation = if needs_fleet {
            match provider.observe().await {
                Ok(observation) => observation,
                Err(error) => {
                    let text = format!("listing instances: {}", chain(&error));
                    warn!(error = %text, "Provider failed; retrying.");
                    let next = on_error(&rollout, error.class(), &text, env.clock.now());
                    commit(store, &rollout, &next, &text)?;
                    if let Some(until) = next.not_before {
                        nap(env.clock.as_ref(), control, until, MAX_NAP).await;
                    }
                    continue;
                }
            }
        } else {
            Default::default()
        };
        let now = env.clock.now();
        let observed = Observed {
            instances: &observation.instances,
            has_infra: fleet.infra.is_some(),
            desired: observation.desired,
        };
        match step::step(&rollout, policy, &observed, &ctl, now) {
            Next::Done(state) => {
                if state.is_terminal() {
                    unroute(provider.as_ref(), &routed).await;
                }
                // A store failure between recording success and recording the deployment
                // leaves a succeeded rollout that is not deployed: finish that here.
                if state == RolloutState::Succeeded && rollout.origin == Origin::Prune {
                    // Recorded pruned, then killed before the load balancer went: finish it.
                    retire(env, provider.as_ref(), &rollout).await?;
                } else if state == RolloutState::Succeeded && rollout.plan.roll {
                    let recorded = store
                        .deployed(&fleet.name)
                        .map_err(|source| DriveError::Store { id, source })?;
                    if recorded.is_none_or(|d| d.rollout < id) {
                        deployed(env, fleet, &rollout, trees)?;
                    }
                }
                return Ok(state);
            }
            Next::Record { rollout: next, message } => {
                if next.state == RolloutState::Succeeded && next.origin == Origin::Prune {
                    if let Err(error) = provider.retire().await {
                        let text = format!("stopping the load balancer: {}", chain(&error));
                        warn!(error = %text, "Provider failed; retrying.");
                        let retry = on_error(&rollout, error.class(), &text, env.clock.now());
                        commit(store, &rollout, &retry, &text)?;
                        if let Some(until) = retry.not_before {
                            nap(env.clock.as_ref(), control, until, MAX_NAP).await;
                        }
                        continue;
                    }
                    commit(store, &rollout, &next, &message)?;
                    retire(env, provider.as_ref(), &next).await?;
                    return Ok(next.state);
                }
                commit(store, &rollout, &next, &message)?;
                if next.state == RolloutState::Succeeded {
                    deployed(env, fleet, &next, trees)?;
                }
                if next.state.is_terminal() {
                    unroute(provider.as_ref(), &routed).await;
                }
                // Ended or paused: return now, not after another look at a (slow) provider.
                if next.state.is_terminal() || next.state == RolloutState::Paused {
                    return Ok(next.state);
                }
            }
            Next::Bake | Next::Reconcile => {
                run_hook(env, fleet, &rollout, &cancel, control).await?;
            }
            Next::Act(action) => {
                act(env, fleet, provider.as_ref(), &rollout, &observation.instances, action)
                    .await?;
            }
            Next::Probe(targets) => {
                let mut set = tokio::task::JoinSet::new();
                for target in targets {
                    let provider = provider.clone();
                    let http = http.clone();
                    let path = policy.health_check.http.clone();
                    set.spawn(async move {
                        let res = probe(provider.as_ref(), http.as_ref(), &path, &target).await;
                        (target.id, res)
                    });
                }
                let mut results = Vec::new();
                while let Some(joined) = set.join_next().await {
                    match joined {
                        Ok(result) => results.push(result),
                        Err(error) => warn!(error = %error, "A health check task failed."),
                    }
                }
                for (instance, res) in &results {
                    if let Err(error) = res {
                        debug!(%instance, %error, "Health check failed.");
                    }
                }
                let next = record_probes(&rollout, policy, &results, env.clock.now());
                save(store, &next)?;
            }
            Next::Sleep { until, why } => {
                debug!(%until, %why, "Waiting.");
                let cap = if needs_fleet { MAX_NAP } else { Duration::from_secs(3600) };
                nap(env.clock.as_ref(), control, until, cap).await;
            }
        }
    }
}

/// Routes traffic as usual again once a rollout that set a route ended (best effort: the
/// next rollout sets its own, and a stale route only narrows the gray listener).
async fn unroute(provider: &dyn Provider, routed: &Option<Option<crate::provider::Route>>) {
    if matches!(routed, Some(Some(_))) {
        if let Err(error) = provider.route(None).await {
            warn!(error = %chain(&error), "Cannot clear the rollout's route.");
        }
    }
}

/// The one retry rule for a failed side effect (a provider call, a hook): an error that is
/// waiting on something (a lock, a busy backend) waits 5 s without spending an attempt; a
/// transient one is retried with backoff until the rollout's attempts run out; any other fails
/// the rollout.
fn on_error(rollout: &Rollout, class: ErrorClass, text: &str, now: Timestamp) -> Rollout {
    match class {
        ErrorClass::Waiting => {
            let mut next = rollout.clone();
            next.not_before = Some(step::add(now, WAITING_RETRY));
            next
        }
        class => {
            let delay = crate::retry::nth_delay(&Default::default(), rollout.attempt);
            retry_or_fail(rollout, class == ErrorClass::Transient, text, delay, now)
        }
    }
}

/// How long a step waiting on something (not failing) waits before it is tried again.
const WAITING_RETRY: Duration = Duration::from_secs(5);

/// Ends a rollout that has not started rolling when a stop (pause, abort, supersede) arrives
/// before its driver could start (its provider is slow to open). Returns the state it ended in,
/// or `None` when the rollout is rolling (then only a driver with its provider may stop it).
pub fn stop_before_rolling(
    env: &DriverEnv,
    id: RolloutId,
    control: Control,
) -> Result<Option<RolloutState>, DriveError> {
    let rollout = load(&env.store, id)?;
    if rollout.rolling.is_some() || rollout.state == RolloutState::Rolling {
        return Ok(None);
    }
    let observed = Observed { instances: &[], has_infra: false, desired: None };
    match step::step(
        &rollout,
        &crate::manifest::RolloutPolicy::default(),
        &observed,
        &control,
        env.clock.now(),
    ) {
        Next::Record { rollout: next, message }
            if next.state.is_terminal() || next.state == RolloutState::Paused =>
        {
            commit(&env.store, &rollout, &next, &message)?;
            Ok(Some(next.state))
        }
        Next::Done(state) => Ok(Some(state)),
        _ => Ok(None),
    }
}

/// After a `prune` rollout: the load balancer stopped (idempotent) and the deployment
/// forgotten, so the fleet no longer shows in `kiln status`.
async fn retire(
    env: &DriverEnv,
    provider: &dyn Provider,
    rollout: &Rollout,
) -> Result<(), DriveError> {
    if let Err(error) = provider.retire().await {
        warn!(error = %chain(&error), "Could not stop the pruned fleet's load balancer.");
    }
    let Some(fleet) = rollout.fleet.as_deref() else { return Ok(()) };
    let store = &env.store;
    let deployed =
        store.deployed(fleet).map_err(|source| DriveError::Store { id: rollout.id, source })?;
    if deployed.is_some_and(|d| d.rollout < rollout.id) {
        store
            .clear_deployed(fleet)
            .map_err(|source| DriveError::Store { id: rollout.id, source })?;
    }
    Ok(())
}

/// Records what the fleet runs after a successful rollout.
fn deployed(
    env: &DriverEnv,
    fleet: &Fleet,
    rollout: &Rollout,
    trees: &BTreeMap<String, String>,
) -> Result<(), DriveError> {
    let Some(image) = rollout.image.clone() else { return Ok(()) };
    let record = Deployed {
        fleet: fleet.name.clone(),
        revision: rollout.revision.clone(),
        image,
        rollout: rollout.id,
        trees: trees.clone(),
        at: env.clock.now(),
    };
    env.store.set_deployed(&record).map_err(|source| DriveError::Store { id: rollout.id, source })
}

/// Runs the bake or reconcile hook of the rollout's current state; aborting or superseding
/// cancels the hook.
async fn run_hook(
    env: &DriverEnv,
    fleet: &Fleet,
    rollout: &Rollout,
    cancel: &CancellationToken,
    control: &mut watch::Receiver<Control>,
) -> Result<(), DriveError> {
    let store = &env.store;
    let cx = StepContext {
        store,
        rollout: rollout.id,
        fleet,
        revision: &rollout.revision,
        mirror: &env.mirror,
        data_dir: &env.data_dir,
        cancel,
        hook_env: &env.hook_env,
        metrics: &env.metrics,
        slots: &env.slots,
    };
    let baking = rollout.state == RolloutState::Baking;
    let work = async {
        if baking {
            // A scheduled rebake exists to pick up updates the inputs don't show: skip the cache.
            let options = crate::pipeline::bake::BakeOptions {
                force: matches!(rollout.origin, crate::rollout::state::Origin::Rebake),
            };
            crate::pipeline::bake::bake_fleet_with(&cx, options)
                .await
                .map(|b| baked(rollout, b.image, b.stage_images))
        } else {
            let image = rollout.image.clone().unwrap_or_else(|| ImageRef::from(""));
            crate::pipeline::reconcile::reconcile_fleet(&cx, &image, &rollout.stage_images)
                .await
                .map(|outputs| reconciled(rollout, outputs))
        }
    };
    tokio::pin!(work);
    let res = tokio::select! {
        res = &mut work => res,
        () = until_stop(control) => {
            cancel.cancel();
            // Let the hook runner kill and reap its process group before stepping on.
            let _ = work.await;
            return Ok(());
        }
    };
    let now = env.clock.now();
    match res {
        Ok(next) => {
            let message = if baking {
                format!("baked {}", next.image.as_ref().map(|i| i.as_str()).unwrap_or("?"))
            } else {
                format!("reconciled ({} output(s))", next.outputs.len())
            };
            commit(store, rollout, &next, &message)?;
            if next.state == RolloutState::Succeeded {
                deployed(env, fleet, &next, &BTreeMap::new())?;
            }
        }
        // The store failed under the hook's bookkeeping (a full disk): not the rollout's
        // fault, so no attempt is spent; the driver retries once the store works again.
        Err(crate::pipeline::StepError::Store(source)) if source.is_io() => {
            return Err(DriveError::Store { id: rollout.id, source });
        }
        Err(error) => {
            let text = chain(&error);
            let next = on_error(rollout, error.class(), &text, now);
            if next.state == RolloutState::Failed {
                commit(store, rollout, &next, &text)?;
            } else {
                warn!(error = %text, attempt = next.attempt, "Step failed; retrying.");
                commit(store, rollout, &next, &format!("retrying after: {text}"))?;
            }
        }
    }
    Ok(())
}

/// Performs one rolling action with its intent written ahead.
async fn act(
    env: &DriverEnv,
    fleet: &Fleet,
    provider: &dyn Provider,
    rollout: &Rollout,
    instances: &[Instance],
    action: Action,
) -> Result<(), DriveError> {
    let store = &env.store;
    let clock = env.clock.as_ref();
    let begun = begin(rollout, &action, clock.now());
    if &begun != rollout {
        save(store, &begun)?;
    }
    let target = begun.rolling.as_ref().and_then(|r| r.target.clone());
    let image_of = |id: &InstanceId| {
        instances.iter().find(|i| &i.id == id).map(|i| i.image.clone()).or_else(|| target.clone())
    };
    let res: Result<Option<Instance>, ProviderError> = match &action {
        Action::Launch { image, key } => {
            // Observe before re-issuing: after a crash the instance may already exist.
            match instances.iter().find(|i| i.launch_key.as_deref() == Some(key.as_str())) {
                Some(found) => Ok(Some(found.clone())),
                None => provider.launch(image, key).await.map(Some),
            }
        }
        Action::Attach { id } => provider.attach(id).await.map(|()| None),
        Action::Detach { id } => provider.detach(id, fleet.rollout.drain).await.map(|()| None),
        Action::Terminate { id, .. } => match provider.terminate(id).await {
            Err(ProviderError::NotFound(_)) => Ok(None),
            other => other.map(|()| None),
        },
    };
    let now = clock.now();
    let res = match res {
        // Gone already: the next observation decides what that means.
        Err(ProviderError::NotFound(_)) if !matches!(action, Action::Launch { .. }) => Ok(None),
        other => other,
    };
    match res {
        Ok(launched) => {
            let done = complete(&begun, &action, launched.as_ref(), now);
            let log = Journal { store, clock, fleet: &fleet.name, rollout: Some(rollout.id) };
            let mut entries = Vec::new();
            let mut failed = false;
            match &action {
                Action::Launch { image, .. } => {
                    if let Some(instance) = &launched {
                        let reason = instance.address.as_ref().map(|a| format!("at {a}"));
                        entries.push(log.entry(
                            &instance.id,
                            Some(image),
                            InstanceAction::Launched,
                            reason,
                        ));
                    }
                }
                Action::Attach { id } => {
                    let image = image_of(id);
                    entries.push(log.entry(id, image.as_ref(), InstanceAction::Healthy, None));
                    entries.push(log.entry(id, image.as_ref(), InstanceAction::Attached, None));
                }
                Action::Detach { id } => {
                    // The drain ends early once no request is in flight, so name the bound,
                    // not a time that may not have been spent.
                    let reason = Some(format!(
                        "out of the load balancer; drain up to {}",
                        crate::manifest::format_duration(fleet.rollout.drain)
                    ));
                    entries.push(log.entry(
                        id,
                        image_of(id).as_ref(),
                        InstanceAction::Drained,
                        reason,
                    ));
                }
                Action::Terminate { id, why } => {
                    let image = image_of(id);
                    // A new instance that failed its checks: journal the check that failed.
                    let check = begun.rolling.as_ref().and_then(|r| r.failed.get(id.as_str()));
                    if let Some(check) = check {
                        failed = true;
                        entries.push(log.entry(
                            id,
                            image.as_ref(),
                            InstanceAction::Unhealthy,
                            Some(check.clone()),
                        ));
                    }
                    entries.push(log.entry(
                        id,
                        image.as_ref(),
                        InstanceAction::Terminated,
                        Some(why.clone()),
                    ));
                }
            }
            // The result, the journal and the timeline in one write.
            log.record_step(&done, entries)?;
            if let Action::Terminate { why, .. } = &action {
                if failed {
                    env.metrics.instance_failed();
                } else if why == "replaced" {
                    env.metrics.instance_replaced();
                }
            }
        }
        Err(error) => {
            let text = chain(&error);
            let next = on_error(&begun, error.class(), &text, now);
            warn!(error = %text, action = %action, "Provider action failed.");
            commit(store, &begun, &next, &format!("{action} failed: {text}"))?;
        }
    }
    Ok(())
}
