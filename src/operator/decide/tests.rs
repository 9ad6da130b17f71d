use super::*;
use crate::rollout::state::RolloutState as S;

fn t(secs: i64) -> Timestamp {
    chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
}

fn run(lane: &Lane, input: Input, now: Timestamp) -> (Lane, Vec<Effect>) {
    decide(lane, input, "web", now)
}

fn id(n: u64) -> RolloutId {
    RolloutId(n)
}

fn is_conflict(effects: &[Effect]) -> bool {
    matches!(effects, [Effect::Reply(Err(CommandError { status: 409, .. }))])
}

#[test]
fn a_planned_rollout_starts_on_an_idle_lane_and_supersedes_on_a_busy_one() {
    let (lane, effects) = run(&Lane::default(), Input::Planned(id(1)), t(0));
    assert_eq!(effects, vec![Effect::Start(id(1))]);
    assert_eq!(lane.running, Some(Running { rollout: id(1), control: Control::Run }));

    let (lane, effects) = run(&lane, Input::Planned(id(2)), t(1));
    assert_eq!(effects, vec![Effect::Signal(Control::Supersede(id(2)))]);
    assert_eq!(lane.queued, Some(id(2)));

    // A third commit supersedes the queued one at once and re-targets the running job.
    let (lane, effects) = run(&lane, Input::Planned(id(3)), t(2));
    assert_eq!(effects, vec![superseded(id(2), id(3)), Effect::Signal(Control::Supersede(id(3)))]);
    assert_eq!(lane.queued, Some(id(3)));

    let ended =
        Input::JobEnded { rollout: id(1), repair: false, outcome: Outcome::Ended(S::Superseded) };
    let (lane, effects) = run(&lane, ended, t(3));
    assert_eq!(effects, vec![Effect::Start(id(3))]);
    assert_eq!(lane.queued, None);
}

#[test]
fn verbs_are_answered_at_once() {
    let idle = Lane::default();
    assert!(is_conflict(&run(&idle, Input::Verb(Verb::Pause), t(0)).1));
    assert!(is_conflict(&run(&idle, Input::Verb(Verb::Resume), t(0)).1));
    assert!(is_conflict(&run(&idle, Input::Verb(Verb::Abort), t(0)).1));

    let (busy, _) = run(&idle, Input::Planned(id(4)), t(0));
    let (paused_lane, effects) = run(&busy, Input::Verb(Verb::Pause), t(1));
    assert_eq!(effects, vec![Effect::Signal(Control::Pause), Effect::Reply(Ok(id(4)))]);
    // Resume while the job still runs (it has not reached its safe point) is refused.
    assert!(is_conflict(&run(&paused_lane, Input::Verb(Verb::Resume), t(2)).1));

    let ended =
        Input::JobEnded { rollout: id(4), repair: false, outcome: Outcome::Ended(S::Paused) };
    let (lane, effects) = run(&paused_lane, ended, t(3));
    assert_eq!(effects, vec![Effect::Observe], "a paused fleet is only observed");
    assert_eq!(lane.paused, Some(id(4)));
    let (lane, effects) = run(&lane, Input::Verb(Verb::Resume), t(4));
    assert_eq!(effects, vec![Effect::Start(id(4)), Effect::Reply(Ok(id(4)))]);
    assert_eq!(lane.paused, None);

    // Abort of a running job with one queued behind it aborts both.
    let (lane, _) = run(&lane, Input::Planned(id(5)), t(5));
    let (lane, effects) = run(&lane, Input::Verb(Verb::Abort), t(6));
    assert_eq!(
        effects,
        vec![Effect::Reply(Ok(id(4))), aborted(id(5))],
        "the running job is already superseding, so no second signal"
    );
    assert_eq!(lane.queued, None);
    // A stopping job cannot be paused.
    assert!(is_conflict(&run(&lane, Input::Verb(Verb::Pause), t(7)).1));
}

#[test]
fn abort_of_a_paused_rollout_starts_a_job_that_returns_the_fleet_to_stable() {
    // Issue 17: ending a paused canary without a job left the canary taking traffic.
    let lane = Lane { paused: Some(id(9)), ..Lane::default() };
    let (lane, effects) = run(&lane, Input::Verb(Verb::Abort), t(0));
    assert_eq!(effects, vec![Effect::Revert(id(9)), Effect::Reply(Ok(id(9)))]);
    assert_eq!(lane.running, Some(Running { rollout: id(9), control: Control::Abort }));
    assert_eq!(lane.paused, None);
    // A second abort while it goes back is answered, not signalled again.
    let (lane, effects) = run(&lane, Input::Verb(Verb::Abort), t(1));
    assert_eq!(effects, vec![Effect::Reply(Ok(id(9)))]);
    // Pause and resume do not interfere with the return.
    assert!(is_conflict(&run(&lane, Input::Verb(Verb::Pause), t(1)).1));
    assert!(is_conflict(&run(&lane, Input::Verb(Verb::Resume), t(1)).1));
    let ended =
        Input::JobEnded { rollout: id(9), repair: false, outcome: Outcome::Ended(S::Aborted) };
    let (lane, effects) = run(&lane, ended, t(2));
    assert_eq!(effects, vec![Effect::Observe]);
    assert_eq!((lane.running, lane.queued, lane.paused), (None, None, None));
}

#[test]
fn an_abort_whose_job_cannot_start_ends_aborted_and_is_never_retried() {
    // A retry would start the rollout with `Run`, resuming the canary the operator aborted.
    let lane = Lane { paused: Some(id(9)), ..Lane::default() };
    let (lane, _) = run(&lane, Input::Verb(Verb::Abort), t(0));
    let blip = Outcome::NotStarted { transient: true, error: "provider unreachable".into() };
    let (lane, effects) =
        run(&lane, Input::JobEnded { rollout: id(9), repair: false, outcome: blip }, t(1));
    assert_eq!(
        effects,
        vec![
            Effect::Finish {
                rollout: id(9),
                state: S::Aborted,
                reason: "aborted by an operator; the fleet is left as is (provider unreachable)"
                    .into(),
            },
            Effect::Observe
        ]
    );
    assert_eq!((lane.running, lane.queued, lane.paused), (None, None, None));
}

#[test]
fn abort_ends_a_queued_rollout_without_a_job() {
    let lane = Lane { queued: Some(id(9)), retry_at: Some(t(5)), ..Lane::default() };
    let (lane, effects) = run(&lane, Input::Verb(Verb::Abort), t(0));
    assert_eq!(effects, vec![aborted(id(9)), Effect::Reply(Ok(id(9)))]);
    assert_eq!(lane, Lane::default());
}

#[test]
fn a_transient_start_failure_retries_with_backoff_and_a_permanent_one_fails() {
    let (lane, _) = run(&Lane::default(), Input::Planned(id(1)), t(0));
    let blip = Outcome::NotStarted { transient: true, error: "lb restarting".into() };
    let (lane, effects) =
        run(&lane, Input::JobEnded { rollout: id(1), repair: false, outcome: blip.clone() }, t(0));
    assert_eq!(effects, vec![Effect::Observe]);
    assert_eq!(lane.queued, Some(id(1)));
    assert_eq!(next_wake(&lane), Some(t(1)));
    assert!(run(&lane, Input::Wake, t(0)).1.is_empty(), "not before the backoff");
    let (lane, effects) = run(&lane, Input::Wake, t(1));
    assert_eq!(effects, vec![Effect::Start(id(1))]);
    // The second failure waits twice as long.
    let (lane, _) =
        run(&lane, Input::JobEnded { rollout: id(1), repair: false, outcome: blip }, t(1));
    assert_eq!(next_wake(&lane), Some(t(3)));
    let (lane, _) = run(&lane, Input::Wake, t(3));

    let refused = Outcome::NotStarted { transient: false, error: "no fleet `web`".into() };
    let (lane, effects) =
        run(&lane, Input::JobEnded { rollout: id(1), repair: false, outcome: refused }, t(4));
    assert_eq!(
        effects[0],
        Effect::Finish {
            rollout: id(1),
            state: S::Failed,
            reason: "could not start: no fleet `web`".into()
        }
    );
    assert_eq!(lane.queued, None);
}

#[test]
fn an_idle_deployed_fleet_short_of_instances_gets_a_repair_that_backs_off_when_it_fails() {
    let obs = |generation, running| Observation {
        generation,
        deployed: true,
        capacity: 3,
        running,
        ..Observation::default()
    };
    let idle = Lane::default();
    assert!(run(&idle, Input::Observed(obs(0, 3)), t(0)).1.is_empty(), "healthy: nothing");
    let (_, effects) = run(&idle, Input::Observed(obs(0, 2)), t(0));
    assert_eq!(effects, vec![Effect::CreateRepair { reason: "2 of 3 instance(s) running".into() }]);
    // Never deployed: nothing to keep. A stale observation: ignored.
    let undeployed = Observation { deployed: false, ..obs(0, 0) };
    assert!(run(&idle, Input::Observed(undeployed), t(0)).1.is_empty());
    assert!(run(&idle, Input::Observed(obs(7, 0)), t(0)).1.is_empty());

    let (lane, _) = run(&idle, Input::Planned(id(2)), t(0));
    assert!(run(&lane, Input::Observed(obs(lane.generation, 0)), t(0)).1.is_empty(), "busy");
    let failed =
        Input::JobEnded { rollout: id(2), repair: true, outcome: Outcome::Ended(S::Failed) };
    let (lane, effects) = run(&lane, failed, t(10));
    assert_eq!(effects, vec![Effect::Observe]);
    assert_eq!(lane.repair_after, Some(t(40)));
    let observed = Input::Observed(obs(lane.generation, 2));
    assert!(run(&lane, observed.clone(), t(39)).1.is_empty(), "inside the repair backoff");
    assert_eq!(run(&lane, observed, t(40)).1.len(), 1);

    // Off-image instances are repaired only in drift mode `repair`.
    let off = Observation { off_image: 1, ..obs(0, 3) };
    assert!(run(&idle, Input::Observed(off.clone()), t(0)).1.is_empty());
    let off = Observation { repair_off_image: true, ..off };
    assert_eq!(run(&idle, Input::Observed(off), t(0)).1.len(), 1);
    // A due rebake takes precedence (it replaces every instance anyway).
    let due = Observation { rebake_due: true, ..obs(0, 1) };
    assert_eq!(run(&idle, Input::Observed(due), t(0)).1, vec![Effect::CreateRebake]);
}

#[test]
fn drift_is_checked_and_repaired_only_on_an_idle_fleet() {
    let idle = Lane::default();
    let (_, effects) = run(&idle, Input::Verb(Verb::Drift), t(0));
    assert_eq!(
        effects,
        vec![
            Effect::CheckDrift { trigger: "command" },
            Effect::Reply(Ok(super::super::NO_ROLLOUT))
        ]
    );
    assert_eq!(
        run(&idle, Input::DriftDue, t(0)).1,
        vec![Effect::CheckDrift { trigger: "interval" }]
    );
    let checked = |generation, repair| Input::DriftChecked { generation, repair };
    assert_eq!(run(&idle, checked(0, true), t(0)).1, vec![Effect::CreateDriftRepair]);
    assert!(run(&idle, checked(0, false), t(0)).1.is_empty(), "mode report: nothing");

    let (busy, _) = run(&idle, Input::Planned(id(1)), t(0));
    assert!(is_conflict(&run(&busy, Input::Verb(Verb::Drift), t(0)).1));
    assert!(run(&busy, Input::DriftDue, t(0)).1.is_empty());
    assert!(run(&busy, checked(busy.generation, true), t(0)).1.is_empty());
    // A check that started before a rollout came and went reports a fleet that moved since.
    let ended =
        Input::JobEnded { rollout: id(1), repair: false, outcome: Outcome::Ended(S::Succeeded) };
    let (after, _) = run(&busy, ended, t(1));
    assert!(run(&after, checked(0, true), t(1)).1.is_empty(), "stale report: no repair");
}

#[test]
fn recovery_resumes_the_newest_and_keeps_the_newest_paused() {
    let active =
        vec![(id(3), S::Paused), (id(5), S::Paused), (id(6), S::Rolling), (id(7), S::Pending)];
    let (lane, effects) = run(&Lane::default(), Input::Recovered(active), t(0));
    assert_eq!(
        effects,
        vec![
            superseded(id(3), id(5)),
            superseded(id(5), id(6)),
            superseded(id(6), id(7)),
            Effect::Start(id(7)),
        ]
    );
    assert_eq!(lane.running.map(|r| r.rollout), Some(id(7)));
    assert_eq!((lane.queued, lane.paused), (None, None));
}

// ---------------------------------------------------------------------------------------------
// Randomized sequences with crashes, checked against a model of the store and the job.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rec {
    Active,
    Paused,
    Done(S),
}

struct World {
    store: std::collections::BTreeMap<RolloutId, Rec>,
    repairs: std::collections::BTreeSet<RolloutId>,
    job: Option<(RolloutId, Control)>,
    next_id: u64,
    lane: Lane,
    now: i64,
    replies: usize,
}

impl World {
    fn new() -> World {
        World {
            store: Default::default(),
            repairs: Default::default(),
            job: None,
            next_id: 1,
            lane: Lane::default(),
            now: 0,
            replies: 0,
        }
    }

    fn create(&mut self, repair: bool) -> RolloutId {
        let id = id(self.next_id);
        self.next_id += 1;
        self.store.insert(id, Rec::Active);
        if repair {
            self.repairs.insert(id);
        }
        id
    }

    fn feed(&mut self, input: Input, log: &mut Vec<String>) {
        log.push(format!("{input:?}"));
        let (lane, effects) = decide(&self.lane, input, "web", t(self.now));
        self.lane = lane;
        for effect in effects {
            self.apply(effect, log);
        }
    }

    fn apply(&mut self, effect: Effect, log: &mut Vec<String>) {
        log.push(format!("  -> {effect:?}"));
        match effect {
            Effect::Start(id) => {
                assert!(self.job.is_none(), "two jobs at once: {log:#?}");
                let rec = self.store.get_mut(&id).expect("started an unknown rollout");
                assert!(!matches!(rec, Rec::Done(_)), "started a finished rollout: {log:#?}");
                *rec = Rec::Active; // a paused rollout resumes
                self.job = Some((id, Control::Run));
            }
            Effect::Revert(id) => {
                assert!(self.job.is_none(), "two jobs at once: {log:#?}");
                let rec = self.store.get_mut(&id).expect("reverted an unknown rollout");
                assert_eq!(*rec, Rec::Paused, "only a paused rollout is reverted: {log:#?}");
                *rec = Rec::Active;
                self.job = Some((id, Control::Abort));
            }
            Effect::Signal(control) => {
                let job = self.job.as_mut().expect("signal without a job");
                job.1 = control;
            }
            Effect::Finish { rollout, state, .. } => {
                assert!(self.job.is_none_or(|(j, _)| j != rollout), "finished the running job");
                let rec = self.store.get_mut(&rollout).expect("finished an unknown rollout");
                assert!(!matches!(rec, Rec::Done(_)), "finished twice: {log:#?}");
                *rec = Rec::Done(state);
            }
            Effect::Reply(_) => self.replies += 1,
            Effect::DriverFailed { .. } | Effect::Observe | Effect::CheckDrift { .. } => {}
            Effect::CreateDriftRepair => {
                let id = self.create(true);
                self.feed(Input::Planned(id), log);
            }
            Effect::CreateRepair { .. } => {
                let id = self.create(true);
                self.feed(Input::Planned(id), log);
            }
            Effect::CreateRebake => {
                let id = self.create(false);
                self.feed(Input::Planned(id), log);
            }
        }
    }

    fn check(&self, log: &[String]) {
        assert_eq!(self.job.map(|j| j.0), self.lane.running.map(|r| r.rollout), "{log:#?}");
        let tracked: Vec<RolloutId> = self
            .lane
            .running
            .map(|r| r.rollout)
            .into_iter()
            .chain(self.lane.queued)
            .chain(self.lane.paused)
            .collect();
        for (id, rec) in &self.store {
            let open = !matches!(rec, Rec::Done(_));
            let count = tracked.iter().filter(|t| *t == id).count();
            assert_eq!(
                count,
                usize::from(open),
                "rollout {id} ({rec:?}) lost or doubled: {log:#?}"
            );
        }
        if let (Some(running), Some(queued)) = (self.lane.running, self.lane.queued) {
            assert!(queued > running.rollout, "queued behind a newer job: {log:#?}");
        }
    }
}

#[test]
fn random_sequences_with_crashes_never_lose_double_start_or_revive_a_rollout() {
    for seed in 0..400u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut world = World::new();
        let mut log = vec![format!("seed {seed}")];
        for _ in 0..60 {
            world.now += i64::from(rng.u8(0..40));
            match rng.u8(0..9) {
                0 | 1 => {
                    let id = world.create(false);
                    world.feed(Input::Planned(id), &mut log);
                }
                2 => {
                    let before = world.replies;
                    let verb =
                        [Verb::Pause, Verb::Resume, Verb::Abort, Verb::Drift][rng.usize(0..4)];
                    world.feed(Input::Verb(verb), &mut log);
                    assert_eq!(world.replies, before + 1, "a verb not answered once: {log:#?}");
                }
                3 | 4 => {
                    let Some((job, control)) = world.job else { continue };
                    // What the driver does with the control it was given.
                    let outcome = match control {
                        Control::Pause => Outcome::Ended(S::Paused),
                        Control::Abort => Outcome::Ended(S::Aborted),
                        Control::Supersede(_) => Outcome::Ended(S::Superseded),
                        Control::Run => match rng.u8(0..6) {
                            0 => Outcome::Ended(S::Failed),
                            1 => Outcome::Ended(S::Paused),
                            2 => Outcome::NotStarted { transient: true, error: "blip".into() },
                            3 => Outcome::NotStarted { transient: false, error: "no".into() },
                            _ => Outcome::Ended(S::Succeeded),
                        },
                    };
                    world.job = None;
                    match &outcome {
                        Outcome::Ended(S::Paused) => {
                            world.store.insert(job, Rec::Paused);
                        }
                        Outcome::Ended(state) => {
                            world.store.insert(job, Rec::Done(*state));
                        }
                        _ => {}
                    }
                    // The lane must still think the job runs until told.
                    world.job = Some((job, control));
                    let repair = world.repairs.contains(&job);
                    log.push(format!("job {job} ends"));
                    world.job = None;
                    let (lane, effects) = decide(
                        &world.lane,
                        Input::JobEnded { rollout: job, repair, outcome },
                        "web",
                        t(world.now),
                    );
                    world.lane = lane;
                    for effect in effects {
                        world.apply(effect, &mut log);
                    }
                }
                5 => {
                    let obs = Observation {
                        generation: world.lane.generation,
                        deployed: true,
                        capacity: 2,
                        running: rng.u32(0..3),
                        rebake_due: rng.u8(0..10) == 0,
                        ..Observation::default()
                    };
                    world.feed(Input::Observed(obs), &mut log);
                }
                6 => match rng.u8(0..3) {
                    0 => world.feed(Input::Wake, &mut log),
                    1 => world.feed(Input::DriftDue, &mut log),
                    _ => {
                        let checked = Input::DriftChecked {
                            generation: world.lane.generation,
                            repair: rng.bool(),
                        };
                        world.feed(checked, &mut log)
                    }
                },
                7 => {
                    // kill -9: the job dies with the daemon; the store keeps every record.
                    log.push("crash".into());
                    world.job = None;
                    world.lane = Lane::default();
                    let active = world
                        .store
                        .iter()
                        .filter_map(|(id, rec)| match rec {
                            Rec::Active => Some((*id, S::Rolling)),
                            Rec::Paused => Some((*id, S::Paused)),
                            Rec::Done(_) => None,
                        })
                        .collect();
                    world.feed(Input::Recovered(active), &mut log);
                }
                _ => {
                    world.now += 3600;
                    world.feed(Input::Wake, &mut log);
                }
            }
            world.check(&log);
        }
    }
}
