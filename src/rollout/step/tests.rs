//! Table tests of the pure `step`, plus a randomized simulation checking the capacity invariants
//! over many policies. The simulated fleet applies actions exactly as a provider would; nothing
//! here does IO, so every case runs in microseconds with simulated wall-clock time.

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;
use crate::manifest::{
    Canary, Capacity, CapacityRange, IntOrPercent, OnFailure, RolloutPolicy, Schedule, Window,
};
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};

const A: &str = "img-a";
const B: &str = "img-b";

fn t0() -> Timestamp {
    "2025-01-01T10:00:00Z".parse().expect("valid timestamp")
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn base_rollout(state: RolloutState) -> Rollout {
    Rollout {
        id: RolloutId(7),
        fleet: Some("web".into()),
        revision: "0123456789abcdef0123456789abcdef01234567".into(),
        summary: "change".into(),
        trigger: "test".into(),
        origin: Origin::Commit,
        state,
        paused_from: None,
        plan: Plan { bake: vec![], reconcile: false, roll: true, reason: String::new() },
        image: Some(B.into()),
        stage_images: Default::default(),
        previous_image: Some(A.into()),
        outputs: Default::default(),
        reason: None,
        created_at: t0(),
        started_at: None,
        finished_at: None,
        not_before: None,
        attempt: 0,
        rolling: None,
        verified: None,
    }
}

fn policy(capacity: u32, surge: IntOrPercent, unavailable: IntOrPercent) -> RolloutPolicy {
    let mut p = RolloutPolicy {
        capacity: capacity.into(),
        max_surge: surge,
        max_unavailable: unavailable,
        drain: secs(1),
        ..RolloutPolicy::default()
    };
    p.health_check.timeout = secs(10);
    p.health_check.interval = secs(1);
    p
}

fn instance(id: &str, image: &str, attached: bool) -> Instance {
    Instance {
        id: id.into(),
        image: image.into(),
        address: Some(format!("127.0.0.1:{}", 40000 + id.len())),
        running: true,
        attached,
        launched_at: None,
        launch_key: None,
    }
}

/// A fleet that applies actions as a provider would, and checks the invariants after each.
struct Sim {
    rollout: Rollout,
    policy: RolloutPolicy,
    instances: Vec<Instance>,
    now: Timestamp,
    bad: BTreeSet<String>,
    control: Control,
    next_id: u32,
    /// Keys launched, one entry per instance actually created.
    created: Vec<String>,
    acts: usize,
    max_running: u32,
    min_serving: u32,
    /// Serving floor to hold: capacity - unavailable, or less if the fleet started below it.
    floor: u32,
    /// Crash (drop the effect after writing the intent) every n-th act, if set.
    crash_every: Option<usize>,
    log: Vec<String>,
    /// The provider's desired count, reported with every listing.
    desired: Option<u32>,
    /// The count the rollout must converge to (the independent expectation the checks use).
    expected: u32,
    /// Instances the simulated cloud launched itself (an autoscaler's scale-out).
    cloud_launched: u32,
}

impl Sim {
    fn new(policy: RolloutPolicy, olds: usize) -> Sim {
        let instances: Vec<Instance> =
            (0..olds).map(|n| instance(&format!("old{n}"), A, true)).collect();
        let serving = u32::try_from(olds).unwrap_or(0);
        let expected = match policy.capacity {
            Capacity::Fixed(n) => n,
            Capacity::Range(r) => serving.clamp(r.min, r.max),
        };
        let floor = serving.min(expected.saturating_sub(policy.unavailable_for(expected)));
        Sim {
            rollout: base_rollout(RolloutState::Pending),
            policy,
            instances,
            now: t0(),
            bad: BTreeSet::new(),
            control: Control::Run,
            next_id: 0,
            created: Vec::new(),
            acts: 0,
            max_running: serving,
            min_serving: serving,
            floor,
            crash_every: None,
            log: Vec::new(),
            desired: None,
            expected,
            cloud_launched: 0,
        }
    }

    /// At most this many instances run while converging to `expected`.
    fn ceiling(&self) -> u32 {
        self.expected + self.policy.surge_for(self.expected)
    }

    /// The cloud's autoscaler launches `n` instances on `image` itself and puts them in
    /// service, as an ASG does on a scale-out.
    fn cloud_add(&mut self, n: u32, image: &str) {
        for _ in 0..n {
            self.cloud_launched += 1;
            self.instances.push(instance(&format!("asg{}", self.cloud_launched), image, true));
        }
        self.rebase(format!("autoscaler launched {n} on {image}"));
    }

    /// The cloud's autoscaler terminates `n` instances, old-image ones first (as an ASG's
    /// `OldestLaunchTemplate` policy does).
    fn cloud_remove(&mut self, n: u32) {
        for _ in 0..n {
            let pos = self
                .instances
                .iter()
                .position(|i| i.running && i.image.as_str() == A)
                .or_else(|| self.instances.iter().position(|i| i.running));
            if let Some(pos) = pos {
                self.instances.remove(pos);
            }
        }
        self.rebase(format!("autoscaler terminated {n}"));
    }

    /// Sets what the provider reports and what the rollout must converge to now.
    fn scale(&mut self, desired: Option<u32>, expected: u32) {
        self.desired = desired;
        self.expected = expected;
        self.rebase(format!("desired {desired:?}, expecting {expected}"));
    }

    /// After a change behind the rollout's back, the invariants hold from the new state on.
    fn rebase(&mut self, what: String) {
        self.log.push(what);
        self.max_running = self.max_running.max(self.running());
        let floor = self.expected.saturating_sub(self.policy.unavailable_for(self.expected));
        self.floor = self.serving().min(floor);
        self.min_serving = self.min_serving.min(self.serving());
    }

    fn serving(&self) -> u32 {
        count(self.instances.iter().filter(|i| i.running && i.attached).count())
    }

    fn running(&self) -> u32 {
        count(self.instances.iter().filter(|i| i.running).count())
    }

    fn images(&self) -> Vec<String> {
        self.instances.iter().map(|i| i.image.0.clone()).collect()
    }

    fn next(&self) -> Next {
        let observed =
            Observed { instances: &self.instances, has_infra: false, desired: self.desired };
        step(&self.rollout, &self.policy, &observed, &self.control, self.now)
    }

    fn perform(&mut self, action: &Action) -> Option<Instance> {
        match action {
            Action::Launch { image, key } => {
                if let Some(i) =
                    self.instances.iter().find(|i| i.launch_key.as_deref() == Some(key.as_str()))
                {
                    return Some(i.clone());
                }
                self.next_id += 1;
                let mut i = instance(&format!("new{}", self.next_id), image.as_str(), false);
                i.launch_key = Some(key.clone());
                self.instances.push(i.clone());
                self.created.push(key.clone());
                Some(i)
            }
            Action::Attach { id } => {
                let bad = self.bad.clone();
                if let Some(i) = self.instances.iter_mut().find(|i| &i.id == id) {
                    assert!(!bad.contains(i.image.as_str()), "attached unhealthy {id}");
                    i.attached = true;
                }
                None
            }
            Action::Detach { id } => {
                if let Some(i) = self.instances.iter_mut().find(|i| &i.id == id) {
                    i.attached = false;
                }
                None
            }
            Action::Terminate { id, .. } => {
                self.instances.retain(|i| &i.id != id);
                None
            }
        }
    }

    /// Applies one `Next`; returns the state when done.
    fn apply(&mut self) -> Option<RolloutState> {
        let next = self.next();
        match next {
            Next::Done(state) => return Some(state),
            Next::Record { rollout, message } => {
                self.log.push(message);
                self.rollout = *rollout;
            }
            Next::Bake => self.rollout = baked(&self.rollout, B.into(), Default::default()),
            Next::Reconcile => self.rollout = reconciled(&self.rollout, Default::default()),
            Next::Act(action) => {
                self.acts += 1;
                self.log.push(format!("{action:?}"));
                self.rollout = begin(&self.rollout, &action, self.now);
                let crash =
                    self.crash_every.filter(|n| self.acts % n == 0).map(|n| self.acts / n % 2);
                if crash == Some(0) {
                    // Crash after the intent was written: the next step must redo it safely.
                    return None;
                }
                let (running_before, serving_before) = (self.running(), self.serving());
                let launched = self.perform(&action);
                if crash == Some(1) {
                    // Crash after the effect, before its result was recorded.
                    return None;
                }
                self.rollout = complete(&self.rollout, &action, launched.as_ref(), self.now);
                self.max_running = self.max_running.max(self.running());
                self.min_serving = self.min_serving.min(self.serving());
                // No action takes the fleet over the ceiling or under the floor (an autoscaler
                // may have left it there: then it must not get worse).
                let ceiling = self.ceiling();
                assert!(
                    self.running() <= ceiling.max(running_before),
                    "{} running > capacity+surge {ceiling}\n{:#?}",
                    self.running(),
                    self.log
                );
                assert!(
                    self.serving() >= self.floor.min(serving_before),
                    "{} serving < floor {}\n{:#?}",
                    self.serving(),
                    self.floor,
                    self.log
                );
            }
            Next::Probe(targets) => {
                let results: Vec<(InstanceId, Result<(), String>)> = targets
                    .iter()
                    .map(|t| {
                        let image = self
                            .instances
                            .iter()
                            .find(|i| i.id == t.id)
                            .map(|i| i.image.0.clone())
                            .unwrap_or_default();
                        let res = if self.bad.contains(&image) {
                            Err(format!(
                                "GET /healthz on {}: 500",
                                t.address.clone().unwrap_or_default()
                            ))
                        } else {
                            Ok(())
                        };
                        (t.id.clone(), res)
                    })
                    .collect();
                self.rollout = record_probes(&self.rollout, &self.policy, &results, self.now);
                self.now = add(self.now, Duration::from_millis(10));
            }
            Next::Sleep { until, why } => {
                assert!(until > self.now, "sleep into the past ({why})");
                self.now = until;
            }
        }
        None
    }

    fn run(&mut self) -> RolloutState {
        for _ in 0..20_000 {
            if let Some(state) = self.apply() {
                return state;
            }
        }
        panic!("rollout did not finish: {:#?}", &self.log[self.log.len().saturating_sub(30)..]);
    }

    /// Runs until `acts` side effects were made (or the rollout stops).
    fn run_acts(&mut self, acts: usize) {
        for _ in 0..20_000 {
            if self.acts >= acts || self.apply().is_some() {
                return;
            }
        }
        panic!("stuck");
    }
}

/// What a table case expects.
#[derive(Debug, Default)]
struct Expect {
    state: Option<RolloutState>,
    max_running: Option<u32>,
    min_serving: Option<u32>,
    launches: Option<usize>,
    all_on: Option<&'static str>,
}

#[track_caller]
fn check(policy: RolloutPolicy, olds: usize, bad: &[&str], expect: Expect) -> Sim {
    let mut sim = Sim::new(policy, olds);
    sim.bad = bad.iter().map(|s| s.to_string()).collect();
    let state = sim.run();
    let log = &sim.log;
    if let Some(want) = expect.state {
        assert_eq!(state, want, "final state; reason {:?}; log {log:#?}", sim.rollout.reason);
    }
    if let Some(want) = expect.max_running {
        assert_eq!(sim.max_running, want, "max running; log {log:#?}");
    }
    if let Some(want) = expect.min_serving {
        assert_eq!(sim.min_serving, want, "min serving; log {log:#?}");
    }
    if let Some(want) = expect.launches {
        assert_eq!(sim.created.len(), want, "launches; log {log:#?}");
    }
    if let Some(image) = expect.all_on {
        assert!(sim.images().iter().all(|i| i == image), "all on {image}: {:?}", sim.images());
        assert_eq!(sim.running(), sim.expected, "capacity; log {log:#?}");
        assert_eq!(sim.serving(), sim.expected, "all serving");
    }
    sim
}

use IntOrPercent::{Count as N, Percent as P};
use RolloutState as S;

fn done(state: RolloutState, image: &'static str) -> Expect {
    Expect { state: Some(state), all_on: Some(image), ..Expect::default() }
}

#[test]
fn surge_bounds_the_instance_count() {
    let cases = [(3, N(1), 4), (3, N(2), 5), (4, P(25), 5), (4, P(50), 6)];
    for (capacity, surge, max) in cases {
        check(
            policy(capacity, surge, N(0)),
            capacity as usize,
            &[],
            Expect { max_running: Some(max), min_serving: Some(capacity), ..done(S::Succeeded, B) },
        );
    }
}

#[test]
fn unavailable_bounds_the_serving_floor() {
    let cases = [(4, N(0), N(0), 4), (4, N(0), N(1), 3), (4, N(0), P(50), 2), (4, N(1), N(1), 3)];
    for (capacity, surge, unavailable, floor) in cases {
        let p = policy(capacity, surge, unavailable);
        let sim = check(
            p.clone(),
            capacity as usize,
            &[],
            Expect {
                min_serving: Some(floor),
                launches: Some(capacity as usize),
                ..done(S::Succeeded, B)
            },
        );
        assert!(sim.max_running <= capacity + p.surge());
    }
}

#[test]
fn first_deploy_launches_capacity_in_one_batch() {
    let sim = check(
        policy(3, N(1), N(0)),
        0,
        &[],
        Expect { launches: Some(3), max_running: Some(3), ..done(S::Succeeded, B) },
    );
    assert_eq!(sim.rollout.rolling.as_ref().map(|r| r.batch), Some(1));
}

#[test]
fn rerun_on_converged_fleet_succeeds_without_launches() {
    let mut sim = Sim::new(policy(3, N(1), N(0)), 0);
    sim.instances = (0..3).map(|n| instance(&format!("b{n}"), B, true)).collect();
    sim.floor = 3;
    assert_eq!(sim.run(), S::Succeeded);
    assert!(sim.created.is_empty(), "no launches: {:?}", sim.log);
    assert_eq!(sim.acts, 0);
}

#[test]
fn health_timeout_rolls_back_pauses_or_fails() {
    // Rollback: the fleet ends on the previous image, the reason names the instance and check.
    let sim = check(policy(3, N(1), N(0)), 3, &[B], done(S::RolledBack, A));
    let reason = sim.rollout.reason.clone().unwrap_or_default();
    assert!(reason.contains("GET /healthz on 127.0.0.1:"), "{reason}");
    assert!(reason.contains("new1"), "{reason}");
    assert_eq!(sim.min_serving, 3);

    // Pause: the unhealthy instance is terminated, the old ones keep serving.
    let mut p = policy(3, N(1), N(0));
    p.on_failure = OnFailure::Pause;
    let sim = check(p, 3, &[B], done(S::Paused, A));
    assert!(sim.rollout.reason.as_deref().unwrap_or("").contains("failed its health check"));

    // No previous image: failed, unhealthy instances gone.
    let mut sim = Sim::new(policy(2, N(1), N(0)), 0);
    sim.rollout.previous_image = None;
    sim.bad.insert(B.into());
    assert_eq!(sim.run(), S::Failed);
    assert!(sim.instances.is_empty(), "{:?}", sim.instances);
    assert!(sim.rollout.reason.as_deref().unwrap_or("").contains("no previous image"));
}

#[test]
fn rollback_replaces_already_attached_new_instances() {
    // The canary passes on B; then B turns bad: the attached B canary is replaced with A.
    let mut p = policy(3, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: None, pause: Some(secs(30)), manual: false });
    let mut sim = Sim::new(p, 3);
    while !sim.rollout.rolling.as_ref().is_some_and(|r| r.canary_done) {
        assert!(sim.apply().is_none());
    }
    sim.bad.insert(B.into());
    assert_eq!(sim.run(), S::RolledBack);
    assert!(sim.images().iter().all(|i| i == A), "{:?}", sim.images());
    assert_eq!(sim.serving(), 3);
    assert_eq!(sim.min_serving, 3);
}

#[test]
fn progress_deadline_fails_a_stuck_rollout() {
    let mut p = policy(2, N(1), N(0));
    p.health_check.timeout = secs(3600);
    p.progress_deadline = secs(20);
    let sim = check(p, 2, &[B], done(S::RolledBack, A));
    assert!(sim.rollout.reason.as_deref().unwrap_or("").contains("progress deadline"));
}

#[test]
fn canary_timed_pause_waits_then_goes_on() {
    let mut p = policy(4, N(2), N(0));
    p.canary = Some(Canary { count: 1, weight: None, pause: Some(secs(30)), manual: false });
    let mut sim = Sim::new(p, 4);
    // Run until the canary gate sets its pause.
    while sim.rollout.not_before.is_none() {
        assert!(sim.apply().is_none(), "ended before the canary gate");
    }
    let new_serving = sim.instances.iter().filter(|i| i.image.as_str() == B && i.attached).count();
    assert_eq!(new_serving, 1, "exactly the canary serves");
    assert_eq!(sim.running(), 4);
    let gate = sim.now;
    match sim.next() {
        Next::Sleep { until, .. } => assert_eq!(until, add(gate, secs(30))),
        other => panic!("expected the canary pause, got {other:?}"),
    }
    assert_eq!(sim.run(), S::Succeeded);
    assert!(sim.images().iter().all(|i| i == B));
}

#[test]
fn canary_manual_pauses_until_resumed() {
    let mut p = policy(3, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: None, pause: None, manual: true });
    let mut sim = Sim::new(p, 3);
    assert_eq!(sim.run(), S::Paused);
    assert_eq!(sim.images().iter().filter(|i| *i == B).count(), 1);
    assert!(sim.rollout.reason.as_deref().unwrap_or("").contains("canary"));
    // Stays paused when stepped again.
    assert_eq!(sim.next(), Next::Done(S::Paused));
    sim.rollout = resume(&sim.rollout, sim.now);
    assert_eq!(sim.rollout.state, S::Rolling);
    assert_eq!(sim.run(), S::Succeeded);
    assert!(sim.images().iter().all(|i| i == B));
}

#[test]
fn pause_abort_supersede_stop_at_safe_points() {
    for (control, want) in [
        (Control::Pause, S::Paused),
        (Control::Abort, S::Aborted),
        (Control::Supersede(RolloutId(9)), S::Superseded),
    ] {
        for after in [1, 2, 3, 4, 5] {
            let mut sim = Sim::new(policy(4, N(1), N(1)), 4);
            sim.run_acts(after);
            sim.control = control;
            assert_eq!(sim.run(), want, "after {after} acts");
            // Safe point: nothing launched but not serving, nothing detached but running.
            assert!(
                sim.instances.iter().all(|i| i.attached),
                "half-done replacement left: {:?}",
                sim.instances
            );
            if want == S::Paused {
                assert_eq!(sim.running(), 4, "capacity kept: {:?}", sim.log);
            } else {
                // Unproven new instances are terminated at once; a slot emptied under
                // maxUnavailable is refilled by the next rollout or the capacity keeper.
                assert!(sim.running() >= sim.floor, "serving floor kept: {:?}", sim.log);
                assert!(sim.instances.iter().all(|i| i.running), "{:?}", sim.instances);
            }
            let reason = sim.rollout.reason.clone().unwrap_or_default();
            if want == S::Superseded {
                assert!(reason.contains("fleet left as is"), "{reason}");
            }
            if want == S::Aborted {
                // Issue 17: an abort returns the fleet to the stable image, at capacity.
                assert!(reason.contains("back on the stable image img-a"), "{reason}");
                assert!(sim.images().iter().all(|i| i == A), "{:?}", sim.log);
                assert_eq!(sim.running(), 4, "capacity restored: {:?}", sim.log);
            }
            if want == S::Paused {
                assert_eq!(sim.rollout.paused_from, Some(S::Rolling));
                sim.control = Control::Run;
                sim.rollout = resume(&sim.rollout, sim.now);
                assert_eq!(sim.run(), S::Succeeded);
                assert!(sim.images().iter().all(|i| i == B));
            }
        }
    }
}

/// Steps until some new instance passed `healthyThreshold` and waits out `minHealthy`.
fn run_until_healthy_pending(sim: &mut Sim) -> Timestamp {
    for _ in 0..10_000 {
        let since = sim
            .rollout
            .rolling
            .as_ref()
            .and_then(|r| r.probes.values().find_map(|p| p.healthy_since));
        if let Some(since) = since {
            return since;
        }
        assert!(sim.apply().is_none(), "ended before a new instance was healthy: {:#?}", sim.log);
    }
    panic!("no new instance became healthy: {:#?}", sim.log);
}

#[test]
fn abort_does_not_wait_out_min_healthy() {
    // Issue 9: an abort sent while a new instance waits out a long minHealthy was ignored until
    // the progress deadline. Verbs act at the next step.
    for unavailable in [N(0), N(1)] {
        let mut p = policy(3, N(1), unavailable);
        p.min_healthy = secs(3600);
        p.progress_deadline = secs(7200);
        let mut sim = Sim::new(p.clone(), 3);
        let healthy_since = run_until_healthy_pending(&mut sim);
        let asked = sim.now;
        sim.control = Control::Abort;
        assert_eq!(sim.run(), S::Aborted, "{:#?}", sim.log);
        assert!(
            sim.now < add(healthy_since, p.min_healthy),
            "the abort waited for minHealthy: asked at {asked}, ended at {}",
            sim.now
        );
        assert!(sim.instances.iter().all(|i| i.image.as_str() == A), "{:?}", sim.instances);
        assert!(sim.instances.iter().all(|i| i.attached), "{:?}", sim.instances);
        let reason = sim.rollout.reason.clone().unwrap_or_default();
        assert!(reason.contains("aborted by operator"), "{reason}");
        assert!(reason.contains("back on the stable image"), "{reason}");
        assert_eq!(sim.running(), 3, "capacity restored: {:#?}", sim.log);
    }
}

#[test]
fn a_newer_commit_supersedes_an_unproven_canary_at_once() {
    // Issue 10: a fix pushed while the broken canary was still being checked waited out the
    // whole healthCheck.timeout.
    let mut p = policy(3, N(1), N(0));
    p.health_check.timeout = secs(3600);
    p.progress_deadline = secs(7200);
    p.canary = Some(Canary { count: 1, weight: None, pause: None, manual: false });
    let mut sim = Sim::new(p.clone(), 3);
    sim.bad.insert(B.into());
    // Run until the canary failed a few checks.
    while !sim.rollout.rolling.as_ref().is_some_and(|r| {
        r.probes.values().any(|probe| {
            probe.last_error.is_some() && probe.last_at > Some(add(probe.since, secs(3)))
        })
    }) {
        assert!(sim.apply().is_none(), "{:#?}", sim.log);
    }
    let launched_at =
        sim.rollout.rolling.as_ref().and_then(|r| r.probes.values().next().map(|p| p.since));
    sim.control = Control::Supersede(RolloutId(8));
    assert_eq!(sim.run(), S::Superseded, "{:#?}", sim.log);
    let launched_at = launched_at.expect("a probed canary");
    assert!(sim.now < add(launched_at, p.health_check.timeout), "waited for the health timeout");
    assert!(
        sim.instances.iter().all(|i| i.image.as_str() == A && i.attached),
        "{:?}",
        sim.instances
    );
    assert_eq!(sim.running(), 3);
    let reason = sim.rollout.reason.clone().unwrap_or_default();
    assert!(reason.contains("superseded by rollout #8"), "{reason}");
    assert!(reason.contains("1 unproven new instance(s) terminated"), "{reason}");

    // Once a new instance serves, a supersede still lets the replacement in flight finish.
    let mut p = policy(3, N(1), N(0));
    p.min_healthy = secs(60);
    let mut sim = Sim::new(p, 3);
    while sim.instances.iter().filter(|i| i.image.as_str() == B && i.attached).count() < 1
        || !sim.instances.iter().any(|i| i.image.as_str() == B && !i.attached)
    {
        assert!(sim.apply().is_none(), "{:#?}", sim.log);
    }
    sim.control = Control::Supersede(RolloutId(8));
    assert_eq!(sim.run(), S::Superseded);
    assert!(sim.instances.iter().all(|i| i.attached), "{:?}", sim.instances);
    assert_eq!(sim.images().iter().filter(|i| *i == B).count(), 2, "{:#?}", sim.log);
}

#[test]
fn instances_failing_their_checks_are_terminated_as_unhealthy() {
    // Issue 10: an instance that failed its health checks was terminated as `replaced`.
    let sim = check(policy(3, N(1), N(0)), 3, &[B], done(S::RolledBack, A));
    let failed = sim.rollout.rolling.as_ref().map(|r| r.failed.clone()).unwrap_or_default();
    let check = failed.get("new1").unwrap_or_else(|| panic!("new1 recorded failed: {failed:?}"));
    assert!(check.starts_with("GET /healthz on 127.0.0.1:") && check.ends_with(": 500"), "{check}");
    let terminations: Vec<&String> =
        sim.log.iter().filter(|l| l.starts_with("Terminate { id: InstanceId(\"new")).collect();
    assert!(!terminations.is_empty(), "{:#?}", sim.log);
    assert!(
        terminations.iter().all(|l| l.contains("why: \"unhealthy\"")),
        "failed new instances are terminated as unhealthy: {terminations:#?}"
    );
    // Old instances replaced on the way back are still `replaced`... there are none here: the
    // olds never left. A dead new instance is a failure too.
    let mut sim = Sim::new(policy(2, N(1), N(0)), 2);
    sim.run_acts(1);
    for i in sim.instances.iter_mut().filter(|i| i.image.as_str() == B) {
        i.running = false;
    }
    assert_eq!(sim.run(), S::RolledBack);
    let failed = sim.rollout.rolling.as_ref().map(|r| r.failed.clone()).unwrap_or_default();
    assert!(failed.get("new1").is_some_and(|why| why.contains("stopped running")), "{failed:?}");
}

#[test]
fn stops_before_rolling_are_immediate() {
    let observed = Observed { instances: &[], has_infra: false, desired: None };
    let p = policy(1, N(1), N(0));
    for state in [S::Pending, S::Scheduled, S::Baking, S::Reconciling] {
        let r = base_rollout(state);
        let next = step(&r, &p, &observed, &Control::Supersede(RolloutId(8)), t0());
        let Next::Record { rollout, .. } = next else { panic!("{next:?}") };
        assert_eq!(rollout.state, S::Superseded);
        assert_eq!(rollout.reason.as_deref(), Some("superseded by rollout #8"));
        assert_eq!(rollout.finished_at, Some(t0()));
        let next = step(&r, &p, &observed, &Control::Pause, t0());
        let Next::Record { rollout, .. } = next else { panic!("{next:?}") };
        assert_eq!((rollout.state, rollout.paused_from), (S::Paused, Some(state)));
    }
}

#[test]
fn schedule_delay_then_bake() {
    let mut p = policy(1, N(1), N(0));
    p.schedule = Some(Schedule { delay: Some(secs(60)), window: None });
    let observed = Observed { instances: &[], has_infra: false, desired: None };
    let mut r = base_rollout(S::Pending);
    r.image = None;
    let Next::Record { rollout, .. } = step(&r, &p, &observed, &Control::Run, t0()) else {
        panic!("expected a record")
    };
    assert_eq!(rollout.state, S::Scheduled);
    assert_eq!(rollout.not_before, Some(add(t0(), secs(60))));
    let later = add(t0(), secs(30));
    assert!(matches!(
        step(&rollout, &p, &observed, &Control::Run, later),
        Next::Sleep { until, .. } if until == add(t0(), secs(60))
    ));
    let Next::Record { rollout, .. } =
        step(&rollout, &p, &observed, &Control::Run, add(t0(), secs(60)))
    else {
        panic!("expected a record")
    };
    assert_eq!(rollout.state, S::Baking);
    assert_eq!(step(&rollout, &p, &observed, &Control::Run, add(t0(), secs(61))), Next::Bake);
    // A commit older than its delay goes straight to baking.
    let Next::Record { rollout, .. } = step(&r, &p, &observed, &Control::Run, add(t0(), secs(120)))
    else {
        panic!("expected a record")
    };
    assert_eq!(rollout.state, S::Baking);
}

#[test]
fn window_gates_new_batches_only() {
    let mut p = policy(2, N(1), N(0));
    p.health_check.timeout = secs(3600);
    // 10:00 is outside 02:00-04:00.
    p.schedule = Some(Schedule {
        delay: None,
        window: Some(Window { start: "02:00".into(), end: "04:00".into() }),
    });
    let mut sim = Sim::new(p.clone(), 2);
    sim.rollout = base_rollout(S::Rolling);
    // Initialise the rolling record.
    assert!(sim.apply().is_none());
    match sim.next() {
        Next::Sleep { until, why } => {
            assert_eq!(until, "2025-01-02T02:00:00Z".parse::<Timestamp>().expect("ts"));
            assert!(why.contains("window"), "{why}");
        }
        other => panic!("expected a window wait, got {other:?}"),
    }
    // Inside the window a batch starts; when the window closes the batch still finishes.
    sim.now = "2025-01-02T03:59:00Z".parse().expect("ts");
    sim.run_acts(1);
    assert_eq!(sim.created.len(), 1);
    sim.now = "2025-01-02T04:00:30Z".parse().expect("ts");
    let mut waited_for_window = false;
    for _ in 0..1000 {
        if let Next::Sleep { why, until } = sim.next() {
            if why.contains("window") {
                waited_for_window = true;
                assert_eq!(until, "2025-01-03T02:00:00Z".parse::<Timestamp>().expect("ts"));
                break;
            }
        }
        assert!(sim.apply().is_none(), "{:#?}", sim.log);
    }
    assert!(waited_for_window);
    // The started batch finished: one old replaced, nothing half done.
    assert_eq!(sim.images().iter().filter(|i| *i == B).count(), 1);
    assert!(sim.instances.iter().all(|i| i.attached));
    assert_eq!(sim.running(), 2);
    // Midnight-spanning windows.
    let w = Window { start: "22:00".into(), end: "02:00".into() };
    assert!(window_check(&w, "2025-01-01T23:00:00Z".parse().expect("ts")).is_ok());
    assert!(window_check(&w, "2025-01-01T01:59:00Z".parse().expect("ts")).is_ok());
    assert_eq!(
        window_check(&w, "2025-01-01T02:00:00Z".parse().expect("ts")),
        Err("2025-01-01T22:00:00Z".parse().expect("ts"))
    );
}

#[test]
fn intent_after_crash_is_completed_not_reissued() {
    let mut sim = Sim::new(policy(2, N(1), N(0)), 2);
    sim.run_acts(0);
    // Step until the first launch is decided; write its intent and "crash" before performing.
    let action = loop {
        match sim.next() {
            Next::Act(action) => break action,
            _ => assert!(sim.apply().is_none()),
        }
    };
    sim.rollout = begin(&sim.rollout, &action, sim.now);
    assert_eq!(sim.next(), Next::Act(action.clone()), "the intent is redone first");
    // Perform it, crash before recording the result: the redo returns the same instance.
    let first = sim.perform(&action);
    let again = sim.perform(&action);
    assert_eq!(first, again);
    assert_eq!(sim.created.len(), 1);
    // Crash-heavy full runs never duplicate a launch.
    for every in [2, 3, 5] {
        let mut sim = Sim::new(policy(3, N(1), N(1)), 3);
        sim.crash_every = Some(every);
        assert_eq!(sim.run(), S::Succeeded);
        assert_eq!(sim.created.len(), 3, "one launch per replacement with crashes every {every}");
        assert!(sim.images().iter().all(|i| i == B));
    }
}

#[test]
fn dead_new_instance_is_a_failure_dead_old_is_replaced() {
    let mut sim = Sim::new(policy(2, N(1), N(0)), 2);
    sim.run_acts(1); // the first launch
    for i in sim.instances.iter_mut().filter(|i| i.image.as_str() == B) {
        i.running = false;
    }
    assert_eq!(sim.run(), S::RolledBack);
    assert!(sim.rollout.reason.as_deref().unwrap_or("").contains("stopped running"));
    assert!(sim.images().iter().all(|i| i == A));
}

#[test]
fn randomized_policies_keep_the_invariants() {
    let mut rng = fastrand::Rng::with_seed(0x6b696c6e);
    for case in 0..400 {
        let capacity = rng.u32(1..=6);
        let amount = |rng: &mut fastrand::Rng| {
            if rng.bool() { N(rng.u32(0..=3)) } else { P(rng.u32(0..=100)) }
        };
        let mut p = policy(capacity, amount(&mut rng), amount(&mut rng));
        p.health_check.healthy_threshold = rng.u32(1..=3);
        p.min_healthy = secs(rng.u64(0..=3));
        if rng.bool() {
            p.canary = Some(Canary {
                count: rng.u32(1..=capacity),
                weight: None,
                pause: rng.bool().then(|| secs(rng.u64(0..=60))),
                manual: false,
            });
        }
        if rng.bool() {
            p.on_failure = OnFailure::Pause;
        }
        let olds = rng.usize(0..=capacity as usize);
        let mut sim = Sim::new(p.clone(), olds);
        let bad = rng.u8(0..4) == 0;
        if bad {
            sim.bad.insert(B.into());
        }
        if rng.u8(0..3) == 0 {
            sim.crash_every = Some(rng.usize(2..6));
        }
        let control = match rng.u8(0..8) {
            0 => Some(Control::Pause),
            1 => Some(Control::Abort),
            2 => Some(Control::Supersede(RolloutId(99))),
            _ => None,
        };
        if let Some(control) = control {
            sim.run_acts(rng.usize(0..8));
            sim.control = control;
        }
        let state = sim.run();
        let ceiling = capacity + p.surge();
        assert!(sim.max_running <= ceiling, "case {case}: {p:?}");
        assert!(sim.min_serving >= sim.floor, "case {case}: {p:?}");
        // Never more instances created than keys handed out, and no instance left half-done.
        let keys: BTreeSet<&String> = sim.created.iter().collect();
        assert_eq!(keys.len(), sim.created.len(), "case {case}: duplicate launch");
        let unhealthy_serving =
            sim.instances.iter().any(|i| i.attached && sim.bad.contains(i.image.as_str()));
        assert!(!unhealthy_serving, "case {case}: unhealthy instance serving");
        match (control, bad) {
            (None, false) => {
                assert_eq!(state, S::Succeeded, "case {case}: {p:?} {:#?}", sim.log);
                assert!(sim.images().iter().all(|i| i == B), "case {case}");
                assert_eq!(sim.running(), capacity, "case {case}");
            }
            (None, true) => {
                let want = match (p.on_failure, olds) {
                    (OnFailure::Pause, _) => S::Paused,
                    (OnFailure::Rollback, _) => S::RolledBack,
                };
                assert_eq!(state, want, "case {case}: {p:?} {:?}", sim.rollout.reason);
                if want == S::RolledBack {
                    assert!(sim.images().iter().all(|i| i == A), "case {case}");
                    assert_eq!(sim.running(), capacity, "case {case}");
                }
            }
            (Some(_), _) => {
                assert!(
                    sim.instances.iter().all(|i| i.attached),
                    "case {case}: half-done replacement {:?}",
                    sim.instances
                );
            }
        }
    }
}

fn range(min: u32, max: u32) -> Capacity {
    Capacity::Range(CapacityRange { min, max })
}

/// Runs `sim` to the end and checks it converged: succeeded, `expected` instances all on the new
/// image and serving, no instance the autoscaler added terminated except to replace it.
#[track_caller]
fn converges(sim: &mut Sim) {
    let state = sim.run();
    let log = &sim.log;
    assert_eq!(state, S::Succeeded, "reason {:?}; log {log:#?}", sim.rollout.reason);
    assert!(sim.images().iter().all(|i| i == B), "all on {B}: {:?}; log {log:#?}", sim.images());
    assert_eq!(sim.running(), sim.expected, "converged count; log {log:#?}");
    assert_eq!(sim.serving(), sim.expected, "all serving; log {log:#?}");
    assert!(sim.running() <= sim.ceiling(), "within the ceiling");
}

#[test]
fn a_scale_out_mid_rollout_raises_the_target_and_is_rolled_too() {
    // A fixed number with a provider that owns the desired count: the provider wins. The
    // autoscaler adds two instances on the old image (its launch template) mid-rollout.
    for crash_every in [None, Some(3)] {
        let mut sim = Sim::new(policy(3, N(1), N(0)), 3);
        sim.crash_every = crash_every;
        sim.scale(Some(3), 3);
        sim.run_acts(4); // launch, attach, detach, terminate: one replaced (without crashes)
        if crash_every.is_none() {
            let done = sim.rollout.rolling.as_ref().map(|r| r.done.len());
            assert_eq!(done, Some(1), "{:#?}", sim.log);
        }
        sim.scale(Some(5), 5);
        sim.cloud_add(2, A);
        converges(&mut sim);
        // One launch per old instance, the autoscaler's two included; none terminated to shrink.
        assert_eq!(sim.created.len(), 5, "{:#?}", sim.log);
        assert_eq!(sim.rollout.rolling.as_ref().map(|r| r.done.len()), Some(5));
        assert!(sim.max_running <= 6, "5 + surge 1: {}", sim.max_running);
    }
}

#[test]
fn a_scale_out_on_the_new_image_is_kept_not_shrunk() {
    // The reconcile updated the launch template: the autoscaler's instances come up on the new
    // image and serve; the old code terminated two old instances too many to get back to 3.
    let mut sim = Sim::new(policy(3, N(1), N(0)), 3);
    sim.scale(Some(3), 3);
    sim.run_acts(2); // the first new instance launched and attached
    sim.scale(Some(5), 5);
    sim.cloud_add(2, B);
    converges(&mut sim);
    assert_eq!(sim.created.len(), 3, "only the three old instances replaced: {:#?}", sim.log);
    assert!(sim.instances.iter().filter(|i| i.id.as_str().starts_with("asg")).count() == 2);
}

#[test]
fn a_scale_out_without_a_desired_count_counts_within_the_range() {
    // No desired count reported: the range keeps what runs. Someone adds two instances mid-
    // rollout (a fleet of 3 becomes 5, inside {2, 6}): the rollout ends with 5 on the new image.
    let mut sim = Sim::new(RolloutPolicy { capacity: range(2, 6), ..policy(1, N(1), N(0)) }, 3);
    assert_eq!(sim.expected, 3);
    sim.run_acts(3);
    sim.cloud_add(2, A);
    sim.scale(None, 5);
    converges(&mut sim);
    // Beyond max, the range caps it: 5 + 3 = 8 > 6.
    let mut sim = Sim::new(RolloutPolicy { capacity: range(2, 6), ..policy(1, N(1), N(0)) }, 5);
    sim.run_acts(1);
    sim.cloud_add(3, A);
    sim.scale(None, 6);
    converges(&mut sim);
}

#[test]
fn a_scale_in_mid_rollout_by_the_provider_lowers_the_target() {
    for capacity in [Capacity::Fixed(5), range(2, 6)] {
        let mut sim = Sim::new(RolloutPolicy { capacity, ..policy(5, N(1), N(0)) }, 5);
        sim.scale(Some(5), 5);
        sim.run_acts(5);
        sim.scale(Some(3), 3);
        sim.cloud_remove(2);
        converges(&mut sim);
        // Desired lowered but the cloud has not terminated yet: kiln converges to it, retiring
        // old instances, never new ones.
        let mut sim = Sim::new(RolloutPolicy { capacity, ..policy(5, N(1), N(0)) }, 5);
        sim.scale(Some(5), 5);
        sim.run_acts(2);
        sim.scale(Some(3), 3);
        converges(&mut sim);
        assert_eq!(sim.created.len(), 3, "{capacity}: {:#?}", sim.log);
    }
}

#[test]
fn ranges_clamp_the_current_count_and_the_desired_count() {
    // (range, olds, desired, expected): a fleet of 4 in {2, 6} stays 4; below min grows to min;
    // above max shrinks to max; a desired count is clamped into the range.
    let cases = [
        ((2, 6), 4, None, 4),
        ((2, 6), 1, None, 2),
        ((2, 6), 0, None, 2),
        ((2, 6), 8, None, 6),
        ((2, 6), 4, Some(5), 5),
        ((2, 6), 4, Some(9), 6),
        ((2, 6), 4, Some(1), 2),
        ((3, 3), 5, None, 3),
    ];
    for ((min, max), olds, desired, expected) in cases {
        let mut sim =
            Sim::new(RolloutPolicy { capacity: range(min, max), ..policy(1, N(1), N(0)) }, olds);
        sim.scale(desired, expected);
        converges(&mut sim);
    }
    // A fixed number without a desired count is exact, as before: 5 old instances, capacity 3.
    let mut sim = Sim::new(policy(3, N(1), N(0)), 5);
    sim.floor = 3;
    converges(&mut sim);
}

#[test]
fn percent_surge_and_unavailable_resolve_against_the_raised_count() {
    // maxSurge 50% of a manifest 4 is 2; the provider raised the fleet to 8, so it is 4.
    let mut sim = Sim::new(policy(4, P(50), N(0)), 8);
    sim.scale(Some(8), 8);
    converges(&mut sim);
    assert_eq!(sim.max_running, 12, "8 + 50% of 8: {:#?}", sim.log);
    assert_eq!(sim.min_serving, 8);
    // maxUnavailable 50%: 4 of 8 may be out of service at once (2 of the manifest's 4).
    let mut sim = Sim::new(policy(4, N(0), P(50)), 8);
    sim.scale(Some(8), 8);
    converges(&mut sim);
    assert_eq!(sim.min_serving, 4, "8 - 50% of 8: {:#?}", sim.log);
    assert_eq!(sim.max_running, 8);
}

#[test]
fn randomized_autoscaling_keeps_the_invariants() {
    let mut rng = fastrand::Rng::with_seed(0x6173_6773);
    for case in 0..400 {
        let amount = |rng: &mut fastrand::Rng| {
            if rng.bool() { N(rng.u32(0..=3)) } else { P(rng.u32(0..=100)) }
        };
        let min = rng.u32(1..=4);
        let max = rng.u32(min..=8);
        let capacity = if rng.bool() { Capacity::Fixed(rng.u32(1..=6)) } else { range(min, max) };
        let mut p = RolloutPolicy { capacity, ..policy(1, amount(&mut rng), amount(&mut rng)) };
        p.health_check.healthy_threshold = rng.u32(1..=3);
        p.min_healthy = secs(rng.u64(0..=3));
        let olds = rng.u32(0..=6);
        let mut sim = Sim::new(p.clone(), olds as usize);
        let clamp = |n: u32| match capacity {
            Capacity::Fixed(_) => n,
            Capacity::Range(r) => n.clamp(r.min, r.max),
        };
        let with_desired = matches!(capacity, Capacity::Fixed(_)) || rng.bool();
        if with_desired {
            let desired = rng.u32(1..=6);
            sim.scale(Some(desired), clamp(desired));
        }
        sim.run_acts(rng.usize(0..12));
        // Instances already on the new image when the count drops are kept: a rollout retires
        // old instances down to the target, never healthy new ones.
        let mut new_at_scale = 0;
        if !sim.rollout.state.is_terminal() {
            let image = if rng.bool() { A } else { B };
            if with_desired {
                let desired = rng.u32(1..=8);
                let before = sim.expected;
                sim.scale(Some(desired), clamp(desired));
                if sim.expected > before {
                    sim.cloud_add(sim.expected - before, image);
                } else if rng.bool() {
                    sim.cloud_remove(before - sim.expected);
                }
            } else {
                let added = rng.u32(1..=3);
                sim.cloud_add(added, image);
                // Before rolling began the fleet's count is what runs; after, the range's
                // target so far plus what was added.
                let expected = if sim.rollout.rolling.is_none() {
                    clamp(sim.running())
                } else {
                    clamp(sim.expected + added)
                };
                sim.scale(None, expected);
            }
            new_at_scale =
                count(sim.instances.iter().filter(|i| i.running && i.image.as_str() == B).count());
        }
        let state = sim.run();
        assert_eq!(state, S::Succeeded, "case {case}: {p:?} {:#?}", sim.log);
        assert!(sim.images().iter().all(|i| i == B), "case {case}: {:#?}", sim.log);
        let most = sim.expected.max(new_at_scale);
        assert!(
            (sim.expected..=most).contains(&sim.running()),
            "case {case}: {} running, expected {}..={most}: {p:?} {:#?}",
            sim.running(),
            sim.expected,
            sim.log
        );
        assert!(sim.instances.iter().all(|i| i.attached), "case {case}");
        let keys: BTreeSet<&String> = sim.created.iter().collect();
        assert_eq!(keys.len(), sim.created.len(), "case {case}: duplicate launch");
    }
}

#[test]
fn abort_of_a_manual_canary_returns_every_instance_to_the_stable_image() {
    // Issue 17: `abort` used to end the rollout with the canary still taking traffic.
    let mut p = policy(3, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: None, pause: None, manual: true });
    let mut sim = Sim::new(p, 3);
    assert_eq!(sim.run(), S::Paused);
    assert!(sim.instances.iter().any(|i| i.image.as_str() == B && i.attached), "canary serves");
    sim.control = Control::Abort;
    assert_eq!(sim.run(), S::Aborted, "{:#?}", sim.log);
    assert!(sim.images().iter().all(|i| i == A), "{:#?}", sim.log);
    assert_eq!((sim.running(), sim.serving()), (3, 3), "{:#?}", sim.log);
    // The canary was detached before it was terminated: never killed while serving.
    let log = sim.log.join("\n");
    let canary = sim
        .log
        .iter()
        .find_map(|l| l.strip_prefix("Attach { id: InstanceId(\""))
        .map(|l| l.split('"').next().unwrap_or("").to_owned())
        .unwrap_or_default();
    let detach =
        log.find(&format!("Detach {{ id: InstanceId(\"{canary}\")")).expect("canary detached");
    let terminate =
        log.find(&format!("Terminate {{ id: InstanceId(\"{canary}\")")).expect("canary terminated");
    assert!(detach < terminate, "{log}");
    assert!(sim.rollout.rolling.as_ref().is_some_and(|r| r.aborting));
}

#[test]
fn abort_of_a_first_deployment_leaves_the_fleet_as_is() {
    // No stable image to go back to: unproven instances go, the rest stays.
    let mut sim = Sim::new(policy(2, N(1), N(0)), 0);
    sim.rollout.previous_image = None;
    sim.run_acts(1);
    sim.control = Control::Abort;
    assert_eq!(sim.run(), S::Aborted);
    let reason = sim.rollout.reason.clone().unwrap_or_default();
    assert!(reason.contains("fleet left as is"), "{reason}");
}

#[test]
fn a_rollback_skips_the_canary_gate_the_window_and_the_delay() {
    // Issue 17: `rollback` is a fast path; before, it paused at a manual canary.
    let mut p = policy(3, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: None, pause: None, manual: true });
    p.schedule = Some(Schedule {
        delay: Some(secs(3600)),
        window: Some(Window { start: "03:00".into(), end: "04:00".into() }),
    });
    let mut sim = Sim::new(p.clone(), 3);
    sim.rollout.origin = Origin::Rollback { from: Some(RolloutId(3)) };
    assert_eq!(sim.run(), S::Succeeded, "{:#?}", sim.log);
    assert!(sim.images().iter().all(|i| i == B));
    assert_eq!(sim.now.date_naive(), t0().date_naive(), "no window wait");
    assert!(sim.now < add(t0(), secs(3600)), "no schedule delay: {}", sim.now);
    // A commit with the same policy waits for all three.
    let mut sim = Sim::new(p, 3);
    assert_ne!(sim.run(), S::Succeeded);
}

#[test]
fn a_prune_drains_then_terminates_every_instance_and_succeeds() {
    // Issue 17: a fleet removed from kiln.yaml is retired by a `prune` rollout.
    let mut sim = Sim::new(policy(3, N(1), N(0)), 3);
    sim.rollout.origin = Origin::Prune;
    sim.rollout.image = Some(A.into());
    sim.instances.push(instance("stray", B, false));
    sim.floor = 0;
    sim.expected = 0;
    assert_eq!(sim.run(), S::Succeeded, "{:#?}", sim.log);
    assert!(sim.instances.is_empty(), "{:?}", sim.instances);
    assert!(sim.created.is_empty(), "nothing launched");
    // Every serving instance was detached before its termination.
    for id in ["old0", "old1", "old2"] {
        let detach = sim.log.iter().position(|l| l.starts_with("Detach") && l.contains(id));
        let terminate = sim.log.iter().position(|l| l.starts_with("Terminate") && l.contains(id));
        assert!(detach.is_some() && detach < terminate, "{id}: {:#?}", sim.log);
    }
    let reason = sim.rollout.reason.clone().unwrap_or_default();
    assert!(reason.contains("pruned: 4 instance(s)"), "{reason}");
}

#[test]
fn route_splits_during_the_canary_then_promotes_and_clears() {
    let mut p = policy(4, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: Some(10), pause: None, manual: true });
    let mut sim = Sim::new(p, 4);
    assert_eq!(route(&sim.rollout, &sim.policy), None, "no route before rolling");
    let canary = Some(crate::provider::Route { image: B.into(), percent: Some(10) });
    // Every new-image instance exists under the canary route (the driver sets it first).
    for _ in 0..20_000 {
        let wanted = route(&sim.rollout, &sim.policy);
        let on_b = sim.instances.iter().any(|i| i.image.as_str() == B);
        if let Some(state) = sim.apply() {
            assert_eq!(state, S::Paused);
            break;
        }
        if sim.instances.iter().any(|i| i.image.as_str() == B) && !on_b {
            assert_eq!(wanted, canary, "a canary launched without the route");
        }
    }
    assert_eq!(sim.rollout.state, S::Paused);
    assert_eq!(route(&sim.rollout, &sim.policy), canary, "the split holds while paused");
    sim.rollout = resume(&sim.rollout, sim.now);
    let promoted = route(&sim.rollout, &sim.policy);
    assert_eq!(promoted, Some(crate::provider::Route { image: B.into(), percent: None }));
    assert_eq!(sim.run(), S::Succeeded);
    assert_eq!(route(&sim.rollout, &sim.policy), None, "a finished rollout routes as usual");
}

#[test]
fn route_is_cleared_by_a_rollback() {
    let mut p = policy(3, N(1), N(0));
    p.canary = Some(Canary { count: 1, weight: Some(25), pause: None, manual: true });
    let mut sim = Sim::new(p, 3);
    assert_eq!(sim.run(), S::Paused);
    assert!(route(&sim.rollout, &sim.policy).is_some());
    sim.control = Control::Abort;
    let next = sim.next();
    let Next::Record { rollout, .. } = next else { panic!("abort records the revert: {next:?}") };
    assert!(rollout.rolling.as_ref().is_some_and(|r| r.rollback));
    assert_eq!(route(&rollout, &sim.policy), None, "going back to the stable image");
}
