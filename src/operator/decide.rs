//! A fleet's policy as a pure function: `decide(&Lane, Input, now) -> (Lane, Vec<Effect>)`.
//!
//! The lane is what a fleet's reconciler knows besides the store: which rollout its job drives,
//! which one waits, which one is paused, and when a failed start or a failed repair may be tried
//! again. `decide` reads no clock and does no IO; the reconciler (`operator::fleet`) performs the
//! effects in order and feeds their outcomes back as inputs. After a restart the lane is rebuilt
//! from the store's unfinished rollouts (`Input::Recovered`), so nothing here needs persisting.
//!
//! Rules, in words:
//! - one job per fleet; a newer rollout supersedes the queued and paused ones at once and asks
//!   the running one to stop at its next safe point;
//! - verbs are answered at once: pause/abort signal the running job (it stops at a safe point;
//!   an abort returns the fleet to its stable image), abort ends a queued rollout and starts a
//!   job that returns a paused one's fleet to the stable image, resume restarts a paused one
//!   when the lane is free;
//! - a start that failed for a reason that may pass (a provider unreachable) stays queued and is
//!   retried with backoff; any other failure to start fails the rollout;
//! - an idle, deployed fleet whose observation shows a lost, dead or unattached instance (or an
//!   instance off the deployed image, when drift mode is `repair`) gets a `repair` rollout; a
//!   failed repair is not retried before a backoff, so a crashing image cannot loop.

use std::time::Duration;

use super::CommandError;
use crate::model::{RolloutId, Timestamp};
use crate::rollout::state::RolloutState;
use crate::rollout::step::{Control, add};

/// What a fleet's reconciler holds in memory (rebuilt from the store after a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lane {
    /// The rollout the fleet's job drives.
    pub running: Option<Running>,
    /// The next rollout to start (the newest planned).
    pub queued: Option<RolloutId>,
    /// A paused rollout, waiting for `resume` (or to be superseded / aborted).
    pub paused: Option<RolloutId>,
    /// The queued rollout does not start before this (its start failed transiently).
    pub retry_at: Option<Timestamp>,
    /// Consecutive transient start failures of the queued rollout.
    pub start_failures: u32,
    /// No repair rollout is created before this (the last one failed).
    pub repair_after: Option<Timestamp>,
    /// Consecutive failed repairs.
    pub repair_failures: u32,
    /// Bumped whenever a job starts or ends: an observation taken under an older generation
    /// may show a fleet in the middle of a change and is ignored.
    pub generation: u64,
}

/// The job of a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// The rollout driven.
    pub rollout: RolloutId,
    /// The last control sent to it.
    pub control: Control,
}

/// A verb after the applier resolved it (`rollback` becomes a planned rollout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Stop the running rollout at its next safe point.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Stop the running, paused or queued rollout for good.
    Abort,
    /// Check the fleet for drift now.
    Drift,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The driver brought the rollout to this state (terminal or paused).
    Ended(RolloutState),
    /// The job could not start the rollout (read its manifest, open its provider).
    NotStarted {
        /// Worth retrying (the provider was unreachable).
        transient: bool,
        /// What failed.
        error: String,
    },
    /// The driver stopped with an error that is not the rollout's (recorded, left as is).
    DriverFailed(String),
}

/// What an idle fleet looks like, as an observation task saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The lane generation the observation started under.
    pub generation: u64,
    /// The fleet has a deployed image (else there is nothing to keep).
    pub deployed: bool,
    /// The count the fleet should run (capacity, or the provider's desired count).
    pub capacity: u32,
    /// Running instances, on any image.
    pub running: u32,
    /// Instances that are not running any more.
    pub dead: u32,
    /// Running instances on the deployed image that are not attached to the load balancer.
    pub unattached: u32,
    /// Running instances on another image than the deployed one.
    pub off_image: u32,
    /// Off-image instances are replaced (drift mode `repair`), not only reported.
    pub repair_off_image: bool,
    /// The fleet's image is older than `image.rebake` and no rebake was tried this interval.
    pub rebake_due: bool,
}

impl Observation {
    /// Why the fleet needs a repair rollout, if it does.
    pub fn repair_reason(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.dead > 0 {
            why.push(format!("{} instance(s) not running", self.dead));
        }
        if self.running < self.capacity {
            why.push(format!("{} of {} instance(s) running", self.running, self.capacity));
        }
        if self.unattached > 0 {
            why.push(format!("{} instance(s) not in the load balancer", self.unattached));
        }
        if self.repair_off_image && self.off_image > 0 {
            why.push(format!("{} instance(s) off the deployed image", self.off_image));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// What the fleet's reconciler is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// After a (re)start: the fleet's unfinished rollouts in the store, oldest first.
    Recovered(Vec<(RolloutId, RolloutState)>),
    /// A new rollout was recorded for the fleet (a commit, a rebake, a rollback, a repair).
    Planned(RolloutId),
    /// An operator verb.
    Verb(Verb),
    /// The job of `rollout` ended.
    JobEnded {
        /// Its rollout.
        rollout: RolloutId,
        /// Whether it was a `repair` rollout (a failed one delays the next repair).
        repair: bool,
        /// How.
        outcome: Outcome,
    },
    /// An observation of the fleet finished.
    Observed(Observation),
    /// A timer fired (a retry or repair backoff is over).
    Wake,
    /// `drift.interval` passed since the last drift check.
    DriftDue,
    /// A drift check ended and recorded its report.
    DriftChecked {
        /// The lane generation the check started under.
        generation: u64,
        /// The report asks for a repair and the fleet's drift mode is `repair`.
        repair: bool,
    },
}

/// What the reconciler does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start a job driving this rollout (with `Control::Run`; a paused rollout resumes).
    Start(RolloutId),
    /// Start a job driving this paused rollout with `Control::Abort`: the fleet returns to its
    /// stable image (a paused canary's instances are replaced) and the rollout ends `aborted`.
    Revert(RolloutId),
    /// Send this control to the running job.
    Signal(Control),
    /// End a rollout no job drives (queued or paused) in `state` with `reason`.
    Finish {
        /// The rollout.
        rollout: RolloutId,
        /// Its terminal state.
        state: RolloutState,
        /// Why.
        reason: String,
    },
    /// Answer the verb.
    Reply(Result<RolloutId, CommandError>),
    /// Record that the driver stopped with an error (the rollout is left as is).
    DriverFailed {
        /// The rollout.
        rollout: RolloutId,
        /// The error.
        error: String,
    },
    /// Create a `repair` rollout onto the deployed image (then `Planned` it).
    CreateRepair {
        /// Why, in words.
        reason: String,
    },
    /// Create a scheduled rebake rollout (then `Planned` it).
    CreateRebake,
    /// Observe the fleet now (a job ended: refresh the status and check capacity).
    Observe,
    /// Start a drift check (unless one runs).
    CheckDrift {
        /// `command` or `interval`.
        trigger: &'static str,
    },
    /// Create a `repair` rollout from the last drift report (then `Planned` it).
    CreateDriftRepair,
}

/// Backoff of transient start failures: 1 s doubling to 60 s.
pub const START_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Backoff after a failed repair: 30 s doubling to 15 min.
pub const REPAIR_RETRY: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(15 * 60));

/// The `n`th (1-based) delay of a doubling backoff.
pub fn backoff((first, max): (Duration, Duration), n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(max)
}

fn conflict(message: String) -> Effect {
    Effect::Reply(Err(CommandError { status: 409, message }))
}

fn superseded(id: RolloutId, by: RolloutId) -> Effect {
    Effect::Finish {
        rollout: id,
        state: RolloutState::Superseded,
        reason: format!("superseded by rollout #{by}"),
    }
}

/// Decides what a fleet's reconciler does about `input`. Pure: no IO, no clock.
pub fn decide(lane: &Lane, input: Input, fleet: &str, now: Timestamp) -> (Lane, Vec<Effect>) {
    let mut lane = lane.clone();
    let mut effects = Vec::new();
    match input {
        Input::Recovered(active) => {
            for (id, state) in active {
                if state == RolloutState::Paused {
                    if let Some(older) = lane.paused.replace(id) {
                        effects.push(superseded(older, id));
                    }
                } else {
                    enqueue(&mut lane, &mut effects, id);
                }
            }
            start_queued(&mut lane, &mut effects, now);
        }
        Input::Planned(id) => {
            enqueue(&mut lane, &mut effects, id);
            start_queued(&mut lane, &mut effects, now);
        }
        Input::Verb(verb) => on_verb(&mut lane, &mut effects, verb, fleet),
        Input::JobEnded { rollout, repair, outcome } => {
            if let Some(running) = lane.running.filter(|r| r.rollout == rollout) {
                lane.running = None;
                lane.generation += 1;
                let requeued = matches!(outcome, Outcome::NotStarted { transient: true, .. });
                if repair && !requeued {
                    let succeeded = outcome == Outcome::Ended(RolloutState::Succeeded);
                    lane = repair_ended(&lane, succeeded, now);
                }
                on_ended(&mut lane, &mut effects, running, outcome, now);
                start_queued(&mut lane, &mut effects, now);
                if lane.running.is_none() {
                    effects.push(Effect::Observe);
                }
            }
        }
        Input::Observed(observation) => {
            if idle(&lane) && observation.generation == lane.generation && observation.deployed {
                if observation.rebake_due {
                    effects.push(Effect::CreateRebake);
                } else if let Some(reason) = observation.repair_reason() {
                    if lane.repair_after.is_none_or(|at| at <= now) {
                        effects.push(Effect::CreateRepair { reason });
                    }
                }
            }
        }
        Input::Wake => start_queued(&mut lane, &mut effects, now),
        Input::DriftDue => {
            if idle(&lane) {
                effects.push(Effect::CheckDrift { trigger: "interval" });
            }
        }
        Input::DriftChecked { generation, repair } => {
            // A rollout that started meanwhile moves the fleet anyway.
            if repair && idle(&lane) && generation == lane.generation {
                effects.push(Effect::CreateDriftRepair);
            }
        }
    }
    (lane, effects)
}

/// No rollout runs, waits or is paused.
fn idle(lane: &Lane) -> bool {
    lane.running.is_none() && lane.queued.is_none() && lane.paused.is_none()
}

/// `id` becomes the queued rollout: older queued and paused ones are superseded, a running one
/// is asked to stop.
fn enqueue(lane: &mut Lane, effects: &mut Vec<Effect>, id: RolloutId) {
    if lane.running.is_some_and(|r| r.rollout >= id) || lane.queued.is_some_and(|q| q >= id) {
        // Already known (a recovery racing a plan): nothing changes.
        return;
    }
    for older in lane.paused.take().into_iter().chain(lane.queued.take()) {
        effects.push(superseded(older, id));
    }
    lane.queued = Some(id);
    lane.retry_at = None;
    lane.start_failures = 0;
    if let Some(running) = lane.running.as_mut() {
        if running.control != Control::Supersede(id) {
            running.control = Control::Supersede(id);
            effects.push(Effect::Signal(Control::Supersede(id)));
        }
    }
}

fn start_queued(lane: &mut Lane, effects: &mut Vec<Effect>, now: Timestamp) {
    if lane.running.is_some() || lane.retry_at.is_some_and(|at| at > now) {
        return;
    }
    let Some(id) = lane.queued.take() else { return };
    lane.retry_at = None;
    lane.running = Some(Running { rollout: id, control: Control::Run });
    lane.generation += 1;
    effects.push(Effect::Start(id));
}

fn on_verb(lane: &mut Lane, effects: &mut Vec<Effect>, verb: Verb, fleet: &str) {
    match verb {
        Verb::Pause => match lane.running.as_mut() {
            Some(running)
                if running.control == Control::Run || running.control == Control::Pause =>
            {
                running.control = Control::Pause;
                effects.push(Effect::Signal(Control::Pause));
                effects.push(Effect::Reply(Ok(running.rollout)));
            }
            Some(running) => effects.push(conflict(format!(
                "rollout #{} of fleet `{fleet}` is already stopping",
                running.rollout
            ))),
            None => effects.push(conflict(format!("fleet `{fleet}` has no rollout in progress"))),
        },
        Verb::Abort => {
            if let Some(running) = lane.running.as_mut() {
                if !matches!(running.control, Control::Abort | Control::Supersede(_)) {
                    running.control = Control::Abort;
                    effects.push(Effect::Signal(Control::Abort));
                }
                effects.push(Effect::Reply(Ok(running.rollout)));
                // A queued rollout would start when the aborted one stops: abort it too.
                if let Some(queued) = lane.queued.take() {
                    effects.push(aborted(queued));
                }
                return;
            }
            if let Some(id) = lane.paused.take() {
                // A paused rollout may have moved instances (a manual canary serves): a job
                // returns them to the stable image, or ends it at once if none moved.
                if let Some(queued) = lane.queued.take() {
                    effects.push(aborted(queued));
                }
                lane.retry_at = None;
                lane.running = Some(Running { rollout: id, control: Control::Abort });
                lane.generation += 1;
                effects.push(Effect::Revert(id));
                effects.push(Effect::Reply(Ok(id)));
                return;
            }
            match lane.queued.take() {
                Some(id) => {
                    lane.retry_at = None;
                    effects.push(aborted(id));
                    effects.push(Effect::Reply(Ok(id)));
                }
                None => effects.push(conflict(format!("fleet `{fleet}` has no rollout to abort"))),
            }
        }
        Verb::Drift => {
            if idle(lane) {
                effects.push(Effect::CheckDrift { trigger: "command" });
                effects.push(Effect::Reply(Ok(super::NO_ROLLOUT)));
            } else {
                effects.push(conflict(format!(
                    "fleet `{fleet}` has a rollout in progress; drift is checked when it is idle"
                )));
            }
        }
        Verb::Resume => match (lane.paused, lane.running) {
            (None, _) => effects.push(conflict(format!("fleet `{fleet}` has no paused rollout"))),
            (Some(_), Some(running)) => effects.push(conflict(format!(
                "fleet `{fleet}` is busy with rollout #{}",
                running.rollout
            ))),
            (Some(id), None) => {
                lane.paused = None;
                lane.running = Some(Running { rollout: id, control: Control::Run });
                lane.generation += 1;
                effects.push(Effect::Start(id));
                effects.push(Effect::Reply(Ok(id)));
            }
        },
    }
}

fn aborted(id: RolloutId) -> Effect {
    Effect::Finish {
        rollout: id,
        state: RolloutState::Aborted,
        reason: "aborted by an operator".into(),
    }
}

fn on_ended(
    lane: &mut Lane,
    effects: &mut Vec<Effect>,
    running: Running,
    outcome: Outcome,
    now: Timestamp,
) {
    let rollout = running.rollout;
    match outcome {
        // An aborted rollout whose job could not start is not retried (a retry would run it):
        // it ends here, and the fleet stays as it is.
        Outcome::NotStarted { error, .. } if running.control == Control::Abort => {
            effects.push(Effect::Finish {
                rollout,
                state: RolloutState::Aborted,
                reason: format!("aborted by an operator; the fleet is left as is ({error})"),
            })
        }
        Outcome::Ended(RolloutState::Paused) => match lane.queued {
            // A newer rollout arrived while it paused: it takes over.
            Some(newer) => effects.push(superseded(rollout, newer)),
            None => lane.paused = Some(rollout),
        },
        Outcome::Ended(_) => {}
        Outcome::NotStarted { transient: true, .. } => match lane.queued {
            Some(newer) => effects.push(superseded(rollout, newer)),
            None => {
                lane.queued = Some(rollout);
                lane.start_failures = lane.start_failures.saturating_add(1);
                lane.retry_at = Some(add(now, backoff(START_RETRY, lane.start_failures)));
            }
        },
        Outcome::NotStarted { transient: false, error } => effects.push(Effect::Finish {
            rollout,
            state: RolloutState::Failed,
            reason: format!("could not start: {error}"),
        }),
        Outcome::DriverFailed(error) => effects.push(Effect::DriverFailed { rollout, error }),
    }
}

/// Records how a repair rollout ended: a failed one delays the next repair.
fn repair_ended(lane: &Lane, succeeded: bool, now: Timestamp) -> Lane {
    let mut lane = lane.clone();
    if succeeded {
        lane.repair_failures = 0;
        lane.repair_after = None;
    } else {
        lane.repair_failures = lane.repair_failures.saturating_add(1);
        lane.repair_after = Some(add(now, backoff(REPAIR_RETRY, lane.repair_failures)));
    }
    lane
}

/// When the reconciler must wake up by itself: a retry of the queued rollout.
pub fn next_wake(lane: &Lane) -> Option<Timestamp> {
    if lane.running.is_some() || lane.queued.is_none() {
        return None;
    }
    lane.retry_at
}

#[cfg(test)]
mod tests;
