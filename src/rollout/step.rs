//! The pure transition function: `step(&Rollout, &RolloutPolicy, &Observed, &Control, now) -> Next`.
//!
//! `step` reads the persisted record, the fleet's policy and what the provider reports, and says
//! what to do next; it performs no IO, reads no clock and never fails. The small `begin`,
//! `complete`, `record_probes`, `baked`, `reconciled` and `retry_or_fail` functions fold the
//! result of a side effect back into the record, also purely. The driver persists every record
//! they return before it acts again, so a restart resumes from exactly what was decided.
//!
//! One replacement, in the order `step` allows it (old = any image but the target):
//!
//! ```text
//! launch new ─▶ probe until healthyThreshold OK, then minHealthy ─▶ attach ─▶ detach+drain old ─▶ terminate old
//! ```
//!
//! Limits: at most `target + surge` running instances, and never fewer than
//! `target - unavailable` attached (old instances are taken as healthy; new ones are attached
//! only once healthy). `target` is `capacity::target`, recomputed at every step from what is
//! observed then (the provider's desired count, the fleet's current count), and maxSurge /
//! maxUnavailable percentages resolve against it: an autoscaler's scale-out mid-rollout raises
//! it, and a rollout never shrinks the fleet below it.

use std::time::Duration;

use chrono::Timelike;

use super::state::{Action, Ending, Intent, Probe, Rolling, Rollout, RolloutState};
use crate::manifest::{OnFailure, RolloutPolicy, Window};
use crate::model::{ImageRef, InstanceId, RolloutId, Timestamp};
use crate::provider::Instance;

/// What the operator wants of a rollout, sent to the driver through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going (and resume a paused rollout when driven again).
    Run,
    /// Stop at the next safe point, state `paused`.
    Pause,
    /// Stop for good, state `aborted`. A rollout that moved instances returns the fleet to its
    /// stable image (`previous_image`) first: new instances are detached and replaced by
    /// stable ones. Without a stable image (a first deployment) the fleet is left as is.
    Abort,
    /// A newer rollout takes over: stop at once before rolling, or after the replacement in
    /// flight while rolling.
    Supersede(RolloutId),
}

/// What the engine sees of the world besides the record.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The fleet's instances as the provider lists them (only read while rolling).
    pub instances: &'a [Instance],
    /// Whether the fleet has an `infra` section (the reconcile hook).
    pub has_infra: bool,
    /// The provider's desired count, when it owns one (only read while rolling).
    pub desired: Option<u32>,
}

/// A new instance to health-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The instance.
    pub id: InstanceId,
    /// Its `host:port`, for the HTTP check.
    pub address: Option<String>,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Persist this record (bookkeeping or a state change, described by `message`), then step
    /// again.
    Record {
        /// The new record.
        rollout: Box<Rollout>,
        /// What changed, for the timeline.
        message: String,
    },
    /// Run the bake hooks (the `baking` state is the intent: bakes are cached, so a rerun after
    /// a crash is cheap and produces the same image).
    Bake,
    /// Run the reconcile hook (idempotent by nature, like `terraform apply`).
    Reconcile,
    /// Write `Intent` with this action (see [`begin`]), perform it, then [`complete`] it.
    Act(Action),
    /// Health-check these new instances, then [`record_probes`].
    Probe(Vec<ProbeTarget>),
    /// Nothing to do before `until`.
    Sleep {
        /// When to step again.
        until: Timestamp,
        /// What is being waited for.
        why: String,
    },
    /// The rollout is terminal or paused.
    Done(RolloutState),
}

/// How the load balancer routes the fleet's traffic for `rollout` (the driver tells the
/// provider whenever this changes): while it rolls toward its new image (paused included),
/// the gray listener serves only that image, and during the canary phase a `canary.weight`
/// gives the new image that share of requests. A rollback, an abort, an ending or a finished
/// rollout routes as usual (`None`).
pub fn route(rollout: &Rollout, policy: &RolloutPolicy) -> Option<crate::provider::Route> {
    let rolling = rollout.rolling.as_ref()?;
    let active = matches!(rollout.state, RolloutState::Rolling | RolloutState::Paused);
    if !active
        || rolling.rollback
        || rolling.aborting
        || rolling.ending.is_some()
        || rollout.origin == crate::rollout::state::Origin::Prune
    {
        return None;
    }
    let image = rolling.target.clone()?;
    let percent =
        if rolling.canary_done { None } else { policy.canary.as_ref().and_then(|c| c.weight) };
    Some(crate::provider::Route { image, percent })
}

/// Adds a std duration to a timestamp, saturating far in the future.
pub fn add(ts: Timestamp, duration: Duration) -> Timestamp {
    chrono::TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| ts.checked_add_signed(delta))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// The idempotency key of launch slot `slot` of rollout `id`.
pub fn launch_key(id: RolloutId, slot: u64) -> String {
    format!("r{id}-{slot}")
}

fn record(rollout: Rollout, message: impl Into<String>) -> Next {
    Next::Record { rollout: Box::new(rollout), message: message.into() }
}

/// Moves `rollout` to `state` (terminal or paused) with `reason`.
fn finish(rollout: &Rollout, state: RolloutState, reason: Option<String>, now: Timestamp) -> Next {
    let mut r = rollout.clone();
    if state == RolloutState::Paused {
        r.paused_from = Some(if r.state == RolloutState::Paused {
            r.paused_from.unwrap_or(RolloutState::Pending)
        } else {
            r.state
        });
    } else {
        r.paused_from = None;
    }
    r.state = state;
    r.reason = reason.clone();
    if state.is_terminal() {
        r.finished_at = Some(now);
        r.not_before = None;
    }
    if let Some(rolling) = r.rolling.as_mut() {
        rolling.ending = None;
        rolling.intent = None;
        // A resumed rollout starts a new batch (and checks the window again).
        rolling.batch_left = 0;
    }
    let message = match &reason {
        Some(reason) => reason.clone(),
        None => format!("rollout {}", state),
    };
    record(r, message)
}

fn stop_of(control: &Control) -> Option<(RolloutState, String)> {
    match control {
        Control::Run => None,
        Control::Pause => Some((RolloutState::Paused, "paused by operator".to_owned())),
        Control::Abort => Some((RolloutState::Aborted, "aborted by operator".to_owned())),
        Control::Supersede(by) => {
            Some((RolloutState::Superseded, format!("superseded by rollout #{by}")))
        }
    }
}

/// `abort` of a rollout that moved instances: the fleet goes back to the stable image (the one
/// it ran before, `previous_image`) through the rolling machine, which then ends `aborted`.
/// `None` when there is nothing to return to (no stable image, a first deployment, nothing
/// rolled yet) or the rollout is already going back.
fn revert(rollout: &Rollout, now: Timestamp) -> Option<Next> {
    let rolling = rollout.rolling.as_ref()?;
    if rolling.rollback || rolling.aborting || rolling.intent.is_some() {
        return None;
    }
    let stable = rollout.previous_image.clone()?;
    if rolling.target.as_ref().or(rollout.image.as_ref()) == Some(&stable) {
        return None;
    }
    let mut r = rollout.clone();
    let rr = r.rolling.as_mut()?;
    rr.rollback = true;
    rr.aborting = true;
    rr.target = Some(stable.clone());
    rr.failure = None;
    rr.ending = None;
    rr.batch_left = 0;
    rr.canary_done = true;
    rr.canary_hold = false;
    rr.probes.clear();
    rr.last_progress = Some(now);
    r.state = RolloutState::Rolling;
    r.paused_from = None;
    r.not_before = None;
    r.attempt = 0;
    r.reason = None;
    Some(record(
        r,
        format!("aborted by operator; returning the fleet to the stable image {stable}"),
    ))
}

/// Describes which images the fleet runs, for abort reasons (`2 on img-b, 1 on img-a`).
fn image_mix(instances: &[Instance]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for instance in instances.iter().filter(|i| i.running) {
        *counts.entry(instance.image.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "no instances running".to_owned();
    }
    let parts: Vec<String> = counts.iter().map(|(image, n)| format!("{n} on {image}")).collect();
    let mixed = if counts.len() > 1 { " (a mix of images)" } else { "" };
    format!("{}{mixed}", parts.join(", "))
}

/// Whether `now` is inside the daily UTC window; if not, when it next opens.
pub fn window_check(window: &Window, now: Timestamp) -> Result<(), Timestamp> {
    let Some((start, end)) = window.bounds() else {
        // A malformed window is rejected by manifest validation; never block on one.
        return Ok(());
    };
    if start == end {
        return Ok(());
    }
    let minute = now.hour() * 60 + now.minute();
    let inside =
        if start < end { minute >= start && minute < end } else { minute >= start || minute < end };
    if inside {
        return Ok(());
    }
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or(now);
    let mut next = add(midnight, Duration::from_secs(u64::from(start) * 60));
    if next <= now {
        next = add(next, Duration::from_secs(24 * 3600));
    }
    Err(next)
}

/// Decides what to do next. Pure: no IO, no clock, never fails.
pub fn step(
    rollout: &Rollout,
    policy: &RolloutPolicy,
    observed: &Observed<'_>,
    control: &Control,
    now: Timestamp,
) -> Next {
    use RolloutState as S;
    if rollout.state.is_terminal() {
        return Next::Done(rollout.state);
    }
    // Before rolling there is no half-done work: stop at once.
    if matches!(rollout.state, S::Pending | S::Scheduled | S::Baking | S::Reconciling | S::Paused) {
        match control {
            Control::Abort | Control::Supersede(_) => {
                if *control == Control::Abort {
                    if let Some(next) = revert(rollout, now) {
                        return next;
                    }
                }
                let (state, mut reason) = stop_of(control).unwrap_or((S::Aborted, String::new()));
                if rollout.rolling.is_some() {
                    reason =
                        format!("{reason}; fleet left as is: {}", image_mix(observed.instances));
                }
                return finish(rollout, state, Some(reason), now);
            }
            Control::Pause if rollout.state != S::Paused => {
                return finish(rollout, S::Paused, Some("paused by operator".into()), now);
            }
            _ => {}
        }
    }
    let backoff = rollout.not_before.filter(|t| *t > now);
    match rollout.state {
        S::Paused => Next::Done(S::Paused),
        S::Pending => {
            let delay = policy.schedule.as_ref().and_then(|s| s.delay);
            let delay = delay.filter(|_| !rollout.origin.is_fast());
            let mut r = rollout.clone();
            r.started_at.get_or_insert(now);
            if let Some(delay) = delay {
                let at = add(rollout.created_at, delay);
                if at > now {
                    r.state = S::Scheduled;
                    r.not_before = Some(at);
                    return record(
                        r,
                        format!(
                            "scheduled: {} after the commit",
                            crate::manifest::format_duration(delay)
                        ),
                    );
                }
            }
            r.state = S::Baking;
            record(r, "started")
        }
        S::Scheduled => match backoff {
            Some(until) => Next::Sleep { until, why: "schedule delay".into() },
            None => {
                let mut r = rollout.clone();
                r.state = S::Baking;
                r.not_before = None;
                record(r, "schedule delay over")
            }
        },
        S::Baking => {
            if let Some(until) = backoff {
                return Next::Sleep { until, why: "retrying the bake".into() };
            }
            match &rollout.image {
                Some(image) => {
                    let mut r = rollout.clone();
                    r.state = S::Reconciling;
                    r.attempt = 0;
                    record(r, format!("image {image} already known; nothing to bake"))
                }
                None => Next::Bake,
            }
        }
        S::Reconciling => {
            if let Some(until) = backoff {
                return Next::Sleep { until, why: "retrying the reconcile".into() };
            }
            if rollout.plan.reconcile && observed.has_infra {
                Next::Reconcile
            } else {
                after_reconcile(rollout, now)
            }
        }
        S::Rolling => step_rolling(rollout, policy, observed, control, now),
        // Terminal states returned above.
        _ => Next::Done(rollout.state),
    }
}

fn after_reconcile(rollout: &Rollout, now: Timestamp) -> Next {
    let mut r = rollout.clone();
    r.attempt = 0;
    r.not_before = None;
    if rollout.plan.roll {
        r.state = RolloutState::Rolling;
        record(r, "reconciled; rolling instances")
    } else {
        finish(&r, RolloutState::Succeeded, None, now)
    }
}

/// The fleet sorted out relative to the target image.
struct View<'a> {
    dead: Vec<&'a Instance>,
    new_attached: Vec<&'a Instance>,
    pending: Vec<&'a Instance>,
    old_attached: Vec<&'a Instance>,
    old_detached: Vec<&'a Instance>,
}

impl<'a> View<'a> {
    fn new(instances: &'a [Instance], target: &ImageRef) -> Self {
        let mut sorted: Vec<&Instance> = instances.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        let mut view = View {
            dead: Vec::new(),
            new_attached: Vec::new(),
            pending: Vec::new(),
            old_attached: Vec::new(),
            old_detached: Vec::new(),
        };
        for i in sorted {
            let list = match (i.running, &i.image == target, i.attached) {
                (false, _, _) => &mut view.dead,
                (true, true, true) => &mut view.new_attached,
                (true, true, false) => &mut view.pending,
                (true, false, true) => &mut view.old_attached,
                (true, false, false) => &mut view.old_detached,
            };
            list.push(i);
        }
        view
    }
    fn running(&self) -> u32 {
        count(self.new_attached.len() + self.pending.len() + self.old_attached.len())
            + count(self.old_detached.len())
    }
    fn new_total(&self) -> u32 {
        count(self.new_attached.len() + self.pending.len())
    }
    fn serving(&self) -> u32 {
        count(self.new_attached.len() + self.old_attached.len())
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Healthy for `healthyThreshold` checks and `minHealthy`. Returning to the stable image after
/// an abort does not wait out `minHealthy`: that image served until the rollout began.
fn probe_ready(
    probe: Option<&Probe>,
    policy: &RolloutPolicy,
    aborting: bool,
    now: Timestamp,
) -> bool {
    let min_healthy = if aborting { Duration::ZERO } else { policy.min_healthy };
    probe.is_some_and(|p| {
        p.ok_streak >= policy.health_check.healthy_threshold.max(1)
            && p.healthy_since.is_some_and(|h| add(h, min_healthy) <= now)
    })
}

fn step_rolling(
    rollout: &Rollout,
    policy: &RolloutPolicy,
    observed: &Observed<'_>,
    control: &Control,
    now: Timestamp,
) -> Next {
    use RolloutState as S;
    let Some(image) = rollout.image.clone() else {
        return finish(rollout, S::Failed, Some("no image to roll out".into()), now);
    };
    let prune = rollout.origin == crate::rollout::state::Origin::Prune;
    let Some(rolling) = &rollout.rolling else {
        if prune {
            let mut r = rollout.clone();
            let todo: Vec<InstanceId> = observed.instances.iter().map(|i| i.id.clone()).collect();
            let message = format!("pruning: draining and terminating {} instance(s)", todo.len());
            r.rolling = Some(Rolling {
                todo,
                canary_done: true,
                last_progress: Some(now),
                ..Rolling::default()
            });
            return record(r, message);
        }
        let olds: Vec<InstanceId> = observed
            .instances
            .iter()
            .filter(|i| i.running && i.image != image)
            .map(|i| i.id.clone())
            .collect();
        let mut r = rollout.clone();
        let message = format!("rolling {} old instance(s) onto {image}", olds.len());
        let seen = observed.instances.iter().filter(|i| i.running).map(|i| i.id.clone()).collect();
        r.rolling = Some(Rolling {
            canary_done: policy.canary.is_none() || olds.is_empty() || rollout.origin.is_fast(),
            todo: olds,
            seen,
            target: Some(image),
            last_progress: Some(now),
            ..Rolling::default()
        });
        return record(r, message);
    };
    let target = rolling.target.clone().unwrap_or(image);
    // A side effect may or may not have happened before a crash: finish it first. Every action
    // is idempotent (launches through their key), so completing it never duplicates it.
    if let Some(intent) = &rolling.intent {
        return Next::Act(intent.action.clone());
    }
    if prune {
        return step_prune(rollout, rolling, observed, control, now);
    }
    if *control == Control::Abort {
        if let Some(next) = revert(rollout, now) {
            return next;
        }
    }
    let view = View::new(observed.instances, &target);
    // The count this rollout converges to, as of now (see `capacity::target`).
    let capacity = super::capacity::target(
        policy.capacity,
        observed.desired,
        super::capacity::fleet_count(observed.instances, rolling, policy.capacity.min()),
    );
    let surge = policy.surge_for(capacity);
    let unavailable = policy.unavailable_for(capacity);
    let min_serving = capacity.saturating_sub(unavailable);

    // Cleanup before ending: new instances that are not serving go, then the state changes.
    if let Some(ending) = &rolling.ending {
        let leftover = observed
            .instances
            .iter()
            .filter(|i| i.image == target && !i.attached)
            .min_by(|a, b| a.id.cmp(&b.id));
        if let Some(instance) = leftover {
            return terminate(
                rolling,
                instance,
                "new instance not in service when the rollout stopped",
            );
        }
        let reason = if ending.state == S::Aborted || ending.state == S::Superseded {
            format!("{}; fleet left as is: {}", ending.reason, image_mix(observed.instances))
        } else {
            ending.reason.clone()
        };
        return finish(rollout, ending.state, Some(reason), now);
    }

    // A fleet going back to its stable image (an abort, a failed rollout) keeps going: that
    // is what an abort asks for.
    let stopping =
        if rolling.rollback && *control == Control::Abort { None } else { stop_of(control) };

    // Failures: a new instance that died or stayed unhealthy too long, or no progress at all.
    // `failed` collects the new instances that failed, with the check that failed.
    let mut failure: Option<String> = None;
    let mut failed: Vec<(InstanceId, String)> = Vec::new();
    for instance in &view.dead {
        if instance.image == target
            && !instance.attached
            && rolling.probes.contains_key(instance.id.as_str())
        {
            let last = rolling.probes.get(instance.id.as_str()).and_then(|p| p.last_error.clone());
            failure = Some(format!(
                "instance {} on {target} stopped running before it became healthy{}",
                instance.id,
                last.as_ref().map(|e| format!(" (last check: {e})")).unwrap_or_default()
            ));
            let why = last.map_or_else(
                || "stopped running before it became healthy".to_owned(),
                |e| format!("stopped running before it became healthy; last check: {e}"),
            );
            failed.push((instance.id.clone(), why));
            break;
        }
    }
    if failure.is_none() {
        for instance in &view.pending {
            let Some(probe) = rolling.probes.get(instance.id.as_str()) else { continue };
            if probe.healthy_since.is_none() && now >= add(probe.since, policy.health_check.timeout)
            {
                let check = probe.last_error.as_deref().unwrap_or("never became healthy");
                failure = Some(format!(
                    "instance {} on {target} failed its health check for {}: {check}",
                    instance.id,
                    crate::manifest::format_duration(policy.health_check.timeout),
                ));
                failed.push((instance.id.clone(), check.to_owned()));
                break;
            }
        }
    }
    if failure.is_some() {
        // The rest of the batch goes too; those whose last check failed failed as well.
        for instance in &view.pending {
            let Some(probe) = rolling.probes.get(instance.id.as_str()) else { continue };
            if let (None, Some(error)) = (probe.healthy_since, &probe.last_error) {
                if !failed.iter().any(|(id, _)| id == &instance.id) {
                    failed.push((instance.id.clone(), error.clone()));
                }
            }
        }
    }
    // Replacements under way (a slot emptied under maxUnavailable is covered by `batch_left`).
    let in_flight =
        !view.pending.is_empty() || !view.old_detached.is_empty() || view.serving() > capacity;
    if failure.is_none() && (in_flight || rolling.batch_left > 0) {
        if let Some(last) = rolling.last_progress {
            if now > add(last, policy.progress_deadline) {
                failure = Some(format!(
                    "no progress within the progress deadline of {} onto {target}",
                    crate::manifest::format_duration(policy.progress_deadline)
                ));
            }
        }
    }
    if let Some(reason) = failure {
        let mut r = rollout.clone();
        if let Some(rr) = r.rolling.as_mut() {
            rr.failed.extend(failed.into_iter().map(|(id, why)| (id.0, why)));
        }
        let Some(rolling) = r.rolling.clone() else { return Next::Done(rollout.state) };
        return on_failure(&r, &rolling, policy, stopping, &target, reason, now);
    }
    // Backoff after a transient provider error applies to every action.
    if let Some(until) = rollout.not_before.filter(|t| *t > now && rollout.attempt > 0) {
        return Next::Sleep { until, why: "retrying after an error".into() };
    }

    // Dead instances take no traffic and hold no capacity worth keeping.
    if let Some(instance) = view.dead.first() {
        return terminate(rolling, instance, "not running");
    }

    // Converged: nothing old left, every new instance serving.
    if view.old_attached.is_empty()
        && view.old_detached.is_empty()
        && view.pending.is_empty()
        && view.new_attached.len() >= capacity as usize
    {
        return if rolling.aborting {
            let reason = format!(
                "aborted by operator; the fleet is back on the stable image {target} ({} instance(s))",
                view.new_attached.len()
            );
            finish(rollout, S::Aborted, Some(reason), now)
        } else if rolling.rollback {
            let reason = format!(
                "rolled back to {target}: {}",
                rolling.failure.as_deref().unwrap_or("new instances failed")
            );
            finish(rollout, S::RolledBack, Some(reason), now)
        } else {
            finish(rollout, S::Succeeded, None, now)
        };
    }

    // Finish replacements in flight: attach healthy new instances, retire surplus old ones.
    if let Some(instance) = view
        .pending
        .iter()
        .find(|i| probe_ready(rolling.probes.get(i.id.as_str()), policy, rolling.aborting, now))
    {
        return Next::Act(Action::Attach { id: instance.id.clone() });
    }
    if let Some(instance) = view.old_detached.first() {
        return terminate(rolling, instance, "replaced");
    }
    if let Some(instance) = view.old_attached.first() {
        if view.serving() > capacity && view.serving() > min_serving {
            return Next::Act(Action::Detach { id: instance.id.clone() });
        }
    }
    let running = view.running();
    let new_total = view.new_total();
    let launch = || {
        Next::Act(Action::Launch {
            image: target.clone(),
            key: launch_key(rollout.id, rolling.next_slot),
        })
    };

    if let Some((state, reason)) = stopping {
        // An abort, or a newer commit while no new instance serves yet, does not wait for
        // unproven new instances: a broken image would hold the stop for the whole health
        // timeout, a healthy one for its minHealthy. They are terminated (they take no
        // traffic) and the rollout ends; a slot emptied under maxUnavailable is left to the
        // next rollout or the capacity keeper.
        let at_once = match control {
            Control::Abort => true,
            Control::Supersede(_) => view.new_attached.is_empty(),
            Control::Pause | Control::Run => false,
        };
        if at_once && !view.pending.is_empty() {
            let mut r = rollout.clone();
            let Some(rr) = r.rolling.as_mut() else { return Next::Done(rollout.state) };
            let n = view.pending.len();
            let why = format!(
                "{reason}; {n} unproven new instance(s) terminated without waiting for their health checks"
            );
            rr.ending = Some(Ending { state, reason: why.clone() });
            return record(r, why);
        }
        // A slot emptied under maxUnavailable is owed its new instance.
        if !at_once && running < capacity && new_total < capacity && running < capacity + surge {
            return launch();
        }
        if view.pending.is_empty() {
            let reason = if state == S::Aborted || state == S::Superseded {
                format!("{reason}; fleet left as is: {}", image_mix(observed.instances))
            } else {
                reason
            };
            return finish(rollout, state, Some(reason), now);
        }
        return probe_or_sleep(rollout, rolling, policy, &view, now);
    }

    if let Some(until) = rollout.not_before.filter(|t| *t > now) {
        return Next::Sleep { until, why: "canary pause".into() };
    }

    // The canary gate: once the canary batch serves and nothing is in flight.
    if !rolling.canary_done && !rolling.rollback && !in_flight {
        if let Some(canary) = &policy.canary {
            if view.new_attached.len() >= canary.count as usize {
                let mut r = rollout.clone();
                let Some(rr) = r.rolling.as_mut() else { return Next::Done(rollout.state) };
                if canary.manual {
                    rr.canary_hold = true;
                    let reason = format!(
                        "canary: {} instance(s) on {target} serving; waiting for resume to promote",
                        view.new_attached.len()
                    );
                    return finish(&r, S::Paused, Some(reason), now);
                }
                rr.canary_done = true;
                let message = match canary.pause {
                    Some(pause) if !pause.is_zero() => {
                        let until = add(now, pause);
                        r.not_before = Some(until);
                        rr.last_progress = Some(until);
                        format!(
                            "canary healthy; watching it for {} before going on",
                            crate::manifest::format_duration(pause)
                        )
                    }
                    _ => "canary healthy; promoting".to_owned(),
                };
                return record(r, message);
            }
        }
    }

    // A new batch starts only when nothing is in flight (and inside the window).
    if rolling.batch_left == 0 {
        let remaining = capacity.saturating_sub(new_total);
        if in_flight || remaining == 0 {
            return probe_or_sleep(rollout, rolling, policy, &view, now);
        }
        if !rolling.rollback && !rollout.origin.is_fast() {
            if let Some(window) = policy.schedule.as_ref().and_then(|s| s.window.as_ref()) {
                if let Err(until) = window_check(window, now) {
                    return Next::Sleep {
                        until,
                        why: format!("maintenance window {}-{} UTC", window.start, window.end),
                    };
                }
            }
        }
        let olds = view.old_attached.len() + view.old_detached.len();
        let mut size = if olds == 0 { remaining } else { (surge + unavailable).max(1) };
        if !rolling.canary_done && !rolling.rollback {
            if let Some(canary) = &policy.canary {
                size = size.min(canary.count.saturating_sub(new_total).max(1));
            }
        }
        let size = size.min(remaining);
        let mut r = rollout.clone();
        let Some(rr) = r.rolling.as_mut() else { return Next::Done(rollout.state) };
        rr.batch_left = size;
        rr.batch += 1;
        rr.last_progress = Some(now);
        let kind = if !rolling.canary_done && !rolling.rollback { " (canary)" } else { "" };
        let message = format!("batch {}{kind}: {size} instance(s) onto {target}", rr.batch);
        return record(r, message);
    }

    if new_total < capacity && running < capacity + surge {
        return launch();
    }
    // Under maxUnavailable an old instance may go before its replacement exists, as long as
    // the batch still has a launch for it.
    let owed = capacity.saturating_sub(running);
    if let Some(instance) = view.old_attached.first() {
        if view.serving() > min_serving && owed < rolling.batch_left {
            return Next::Act(Action::Detach { id: instance.id.clone() });
        }
    }
    probe_or_sleep(rollout, rolling, policy, &view, now)
}

/// A `prune` rollout: every instance of the removed fleet is detached (drained), then
/// terminated; then the rollout succeeds (the driver stops the load balancer and forgets the
/// deployment). Pause does not stop a teardown; abort, or a newer commit that brings the fleet
/// back, stops it between two actions, leaving what still runs.
fn step_prune(
    rollout: &Rollout,
    rolling: &Rolling,
    observed: &Observed<'_>,
    control: &Control,
    now: Timestamp,
) -> Next {
    if let (Control::Abort | Control::Supersede(_), Some((state, reason))) =
        (control, stop_of(control))
    {
        let reason = format!("{reason}; fleet left as is: {}", image_mix(observed.instances));
        return finish(rollout, state, Some(reason), now);
    }
    if let Some(until) = rollout.not_before.filter(|t| *t > now && rollout.attempt > 0) {
        return Next::Sleep { until, why: "retrying after an error".into() };
    }
    let mut sorted: Vec<&Instance> = observed.instances.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(instance) = sorted.iter().find(|i| i.running && i.attached) {
        return Next::Act(Action::Detach { id: instance.id.clone() });
    }
    if let Some(instance) = sorted.first() {
        return Next::Act(Action::Terminate {
            id: instance.id.clone(),
            why: "pruned: the fleet was removed from kiln.yaml".into(),
        });
    }
    let reason = format!(
        "pruned: {} instance(s) drained and terminated; load balancer stopped",
        rolling.done.len()
    );
    finish(rollout, RolloutState::Succeeded, Some(reason), now)
}

/// Terminates `instance`; one that failed its health checks is terminated as `unhealthy`,
/// whatever else `why` says (it was not replaced: it never served).
fn terminate(rolling: &Rolling, instance: &Instance, why: &str) -> Next {
    let why = if rolling.failed.contains_key(instance.id.as_str()) { "unhealthy" } else { why };
    Next::Act(Action::Terminate { id: instance.id.clone(), why: why.to_owned() })
}

fn on_failure(
    rollout: &Rollout,
    rolling: &Rolling,
    policy: &RolloutPolicy,
    stopping: Option<(RolloutState, String)>,
    target: &ImageRef,
    reason: String,
    now: Timestamp,
) -> Next {
    use RolloutState as S;
    let mut r = rollout.clone();
    let Some(rr) = r.rolling.as_mut() else { return Next::Done(rollout.state) };
    rr.ending = Some(if let Some((state, stop_reason)) = stopping {
        Ending { state, reason: format!("{stop_reason}; {reason}") }
    } else if rolling.aborting {
        Ending {
            state: S::Failed,
            reason: format!("aborted, but returning to the stable image {target} failed: {reason}"),
        }
    } else if rolling.rollback {
        Ending {
            state: S::Failed,
            reason: format!(
                "rollback to {target} failed: {reason} (after: {})",
                rolling.failure.as_deref().unwrap_or("a failed rollout")
            ),
        }
    } else if policy.on_failure == OnFailure::Pause {
        Ending { state: S::Paused, reason: reason.clone() }
    } else {
        match rollout.previous_image.clone() {
            Some(previous) if &previous != target => {
                rr.rollback = true;
                rr.target = Some(previous.clone());
                rr.failure = Some(reason.clone());
                rr.batch_left = 0;
                rr.canary_done = true;
                rr.canary_hold = false;
                rr.probes.clear();
                rr.last_progress = Some(now);
                r.not_before = None;
                r.attempt = 0;
                return record(r, format!("{reason}; rolling back to {previous}"));
            }
            _ => Ending {
                state: S::Failed,
                reason: format!("{reason}; no previous image to roll back to"),
            },
        }
    });
    record(r, format!("{reason}; stopping"))
}

fn probe_or_sleep(
    rollout: &Rollout,
    rolling: &Rolling,
    policy: &RolloutPolicy,
    view: &View<'_>,
    now: Timestamp,
) -> Next {
    let interval = policy.health_check.interval.max(Duration::from_millis(50));
    let due: Vec<ProbeTarget> = view
        .pending
        .iter()
        .filter(|i| {
            rolling
                .probes
                .get(i.id.as_str())
                .and_then(|p| p.last_at)
                .is_none_or(|last| add(last, interval) <= now)
        })
        .map(|i| ProbeTarget { id: i.id.clone(), address: i.address.clone() })
        .collect();
    if !due.is_empty() {
        return Next::Probe(due);
    }
    let mut until = add(now, interval);
    let mut why = "waiting";
    for instance in &view.pending {
        if let Some(p) = rolling.probes.get(instance.id.as_str()) {
            if let Some(last) = p.last_at {
                until = until.min(add(last, interval));
                why = "health checks";
            }
            if let Some(h) = p.healthy_since {
                until = until.min(add(h, policy.min_healthy).max(now));
                why = "health checks";
            }
        }
    }
    if let Some(t) = rollout.not_before.filter(|t| *t > now) {
        until = until.min(t);
    }
    Next::Sleep { until, why: why.into() }
}

/// Writes the intent of `action` ahead of performing it (launch slots and batch are consumed).
pub fn begin(rollout: &Rollout, action: &Action, now: Timestamp) -> Rollout {
    let mut r = rollout.clone();
    if let Some(rr) = r.rolling.as_mut() {
        if rr.intent.is_none() {
            if matches!(action, Action::Launch { .. }) {
                rr.next_slot += 1;
                rr.batch_left = rr.batch_left.saturating_sub(1);
            }
            rr.intent = Some(Intent { action: action.clone(), at: now });
        }
    }
    r
}

/// Folds a performed action into the record. `launched` is the instance a launch returned.
pub fn complete(
    rollout: &Rollout,
    action: &Action,
    launched: Option<&Instance>,
    now: Timestamp,
) -> Rollout {
    let mut r = rollout.clone();
    r.attempt = 0;
    r.not_before = None;
    let Some(rr) = r.rolling.as_mut() else { return r };
    rr.intent = None;
    rr.last_progress = Some(now);
    match action {
        Action::Launch { .. } => {
            if let Some(instance) = launched {
                if !rr.launched.contains(&instance.id) {
                    rr.launched.push(instance.id.clone());
                }
                rr.probes.entry(instance.id.0.clone()).or_insert(Probe {
                    since: now,
                    ok_streak: 0,
                    healthy_since: None,
                    last_at: None,
                    last_error: None,
                });
            }
        }
        Action::Attach { id } => {
            rr.launched.retain(|i| i != id);
            rr.probes.remove(id.as_str());
            if !rr.attached.contains(id) {
                rr.attached.push(id.clone());
            }
        }
        Action::Detach { .. } => {}
        Action::Terminate { id, .. } => {
            rr.probes.remove(id.as_str());
            // An instance this rollout did not launch was retired (replaced, or dead): it
            // counts in `done`, also when it joined the fleet mid-rollout (an autoscaler's).
            let own = rr.launched.contains(id) || rr.attached.contains(id);
            rr.launched.retain(|i| i != id);
            rr.todo.retain(|i| i != id);
            if !own && !rr.done.contains(id) {
                rr.done.push(id.clone());
            }
        }
    }
    r
}

/// Folds health-probe results (`Ok` or the failed check's description) into the record.
pub fn record_probes(
    rollout: &Rollout,
    policy: &RolloutPolicy,
    results: &[(InstanceId, Result<(), String>)],
    now: Timestamp,
) -> Rollout {
    let mut r = rollout.clone();
    let Some(rr) = r.rolling.as_mut() else { return r };
    for (id, result) in results {
        let probe = rr.probes.entry(id.0.clone()).or_insert(Probe {
            since: now,
            ok_streak: 0,
            healthy_since: None,
            last_at: None,
            last_error: None,
        });
        probe.last_at = Some(now);
        match result {
            Ok(()) => {
                probe.ok_streak = probe.ok_streak.saturating_add(1);
                if probe.ok_streak >= policy.health_check.healthy_threshold.max(1)
                    && probe.healthy_since.is_none()
                {
                    probe.healthy_since = Some(now);
                }
            }
            Err(error) => {
                probe.ok_streak = 0;
                probe.healthy_since = None;
                probe.last_error = Some(error.clone());
            }
        }
    }
    r
}

/// The bake produced `image`: record it and move on to reconciling.
pub fn baked(
    rollout: &Rollout,
    image: ImageRef,
    stage_images: std::collections::BTreeMap<String, ImageRef>,
) -> Rollout {
    let mut r = rollout.clone();
    r.image = Some(image);
    r.stage_images = stage_images;
    r.state = RolloutState::Reconciling;
    r.attempt = 0;
    r.not_before = None;
    r
}

/// The reconcile hook succeeded with `outputs`: record them and move on.
pub fn reconciled(
    rollout: &Rollout,
    outputs: std::collections::BTreeMap<String, String>,
) -> Rollout {
    let mut r = rollout.clone();
    r.outputs = outputs;
    r.attempt = 0;
    r.not_before = None;
    if r.plan.roll {
        r.state = RolloutState::Rolling;
    } else {
        r.state = RolloutState::Succeeded;
    }
    r
}

/// How many transient failures in a row a rollout tolerates before it fails.
pub const MAX_ATTEMPTS: u32 = 8;

/// A side effect failed with `error`: retry after `delay` when `transient` and attempts are
/// left, otherwise fail the rollout with the error.
pub fn retry_or_fail(
    rollout: &Rollout,
    transient: bool,
    error: &str,
    delay: Duration,
    now: Timestamp,
) -> Rollout {
    let mut r = rollout.clone();
    if transient && r.attempt + 1 < MAX_ATTEMPTS {
        r.attempt += 1;
        r.not_before = Some(add(now, delay));
        return r;
    }
    let during = r.state;
    r.state = RolloutState::Failed;
    r.paused_from = None;
    r.reason = Some(format!("{during} failed: {error}"));
    r.finished_at = Some(now);
    r.not_before = None;
    if let Some(rr) = r.rolling.as_mut() {
        rr.intent = None;
    }
    r
}

/// Resumes a paused rollout (the operator re-drives it with `Control::Run`). Resuming at the
/// canary gate promotes the canary; resuming after `onFailure: pause` tries again.
pub fn resume(rollout: &Rollout, now: Timestamp) -> Rollout {
    let mut r = rollout.clone();
    if r.state != RolloutState::Paused {
        return r;
    }
    r.state = r.paused_from.take().unwrap_or(RolloutState::Pending);
    r.reason = None;
    if r.state != RolloutState::Scheduled {
        r.not_before = None;
    }
    r.attempt = 0;
    if let Some(rr) = r.rolling.as_mut() {
        if rr.canary_hold {
            rr.canary_hold = false;
            rr.canary_done = true;
        }
        if !rr.rollback {
            rr.failure = None;
        }
        rr.ending = None;
        rr.batch_left = 0;
        rr.last_progress = Some(now);
        rr.probes.retain(|_, p| p.healthy_since.is_some());
    }
    r
}

#[cfg(test)]
mod tests;
