//! Drift: how far a fleet is from what kiln deployed, inspected and reported.
//!
//! A check (every `drift.interval`, and on `kiln drift` / `POST /api/v1/fleets/{fleet}/drift`)
//! observes the fleet through its provider and its reconcile hook in plan mode, and finds:
//!
//! - instances not on the deployed image, not running, missing (fewer running than
//!   `capacity`), or unknown to kiln's instance journal (`drift.instance`);
//! - load-balancer backends kiln did not attach (`drift.backend`; the local provider removes
//!   them on sight and remembers them for this report);
//! - infra drift: the reconcile hook run with `KILN_MODE=plan` exited 2 (`drift.infra`).
//!
//! [`inspect`] is the pure part (observations in, findings out). [`check_fleet`] does the IO
//! under a deadline, and [`record`] writes a report with findings to the store as a rollout
//! record of origin `drift` (state `failed`: the fleet failed its inspection), one event per
//! finding, so it shows in `kiln log` / `kiln show`; the last report of every fleet is kept in
//! the store's meta (`drift.last/<fleet>`) for `kiln status` and the API. [`wants_repair`]
//! decides what `drift.mode: repair` does about a report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::manifest::Fleet;
use crate::model::{ImageRef, InstanceId, Revision, RolloutId, Timestamp};
use crate::provider::{ForeignBackend, Instance, SharedProvider};
use crate::rollout::state::{Origin, Plan, Rollout, RolloutState};
use crate::store::{InstanceAction, InstanceEvent, Level, Store, StoreError};

/// Event kind of an instance finding.
pub const EVENT_INSTANCE: &str = "drift.instance";
/// Event kind of a load-balancer backend finding.
pub const EVENT_BACKEND: &str = "drift.backend";
/// Event kind of an infra finding.
pub const EVENT_INFRA: &str = "drift.infra";
/// Event kind of a part of the check that could not be done.
pub const EVENT_ERROR: &str = "drift.error";

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A running instance on another image than the deployed one.
    OffImage,
    /// An instance that is not running (or died since the last check).
    NotRunning,
    /// Fewer instances running than `capacity`.
    Missing,
    /// An instance kiln's journal has never seen.
    Unknown,
    /// A load-balancer backend kiln did not attach.
    Backend,
    /// The reconcile hook in plan mode found the infrastructure changed.
    Infra,
}

impl FindingKind {
    /// The event kind a finding of this kind is recorded as.
    pub fn event_kind(self) -> &'static str {
        match self {
            FindingKind::OffImage
            | FindingKind::NotRunning
            | FindingKind::Missing
            | FindingKind::Unknown => EVENT_INSTANCE,
            FindingKind::Backend => EVENT_BACKEND,
            FindingKind::Infra => EVENT_INFRA,
        }
    }
}

/// One thing that is not as kiln deployed it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    /// What kind of drift.
    pub kind: FindingKind,
    /// The instance or backend concerned, if one.
    #[serde(default)]
    pub subject: Option<String>,
    /// In words.
    pub message: String,
}

/// The outcome of one drift check of one fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// The fleet.
    pub fleet: String,
    /// When the check ended.
    pub checked_at: Timestamp,
    /// What started it: `interval` or `command`.
    pub trigger: String,
    /// The deployed commit it compared against.
    pub revision: Option<Revision>,
    /// The deployed image it compared against.
    pub image: Option<ImageRef>,
    /// What differs (empty: no drift).
    pub findings: Vec<Finding>,
    /// Parts of the check that could not be done (provider unreachable, plan hook failed,
    /// deadline passed).
    #[serde(default)]
    pub errors: Vec<String>,
    /// The record of this report in the log (`origin: drift`), when it found something.
    #[serde(default)]
    pub record: Option<RolloutId>,
    /// The `repair` rollout `drift.mode: repair` started for it.
    #[serde(default)]
    pub repair: Option<RolloutId>,
}

impl DriftReport {
    /// Whether the fleet is as kiln deployed it (as far as the check could tell).
    pub fn clean(&self) -> bool {
        self.findings.is_empty() && self.errors.is_empty()
    }

    /// A one-line summary (`2 findings: ...`).
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self.findings.iter().map(|f| f.message.clone()).collect();
        parts.extend(self.errors.iter().map(|e| format!("check failed: {e}")));
        match parts.len() {
            0 => "no drift".to_owned(),
            n => {
                let first = parts.into_iter().take(3).collect::<Vec<_>>().join("; ");
                let more = if n > 3 { format!("; and {} more", n - 3) } else { String::new() };
                format!("drift: {first}{more}")
            }
        }
    }
}

/// What a check observed, for [`inspect`].
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The image the fleet should run (the deployed one).
    pub desired: Option<ImageRef>,
    /// `capacity` from the manifest.
    pub capacity: u32,
    /// The provider's list.
    pub instances: Vec<Instance>,
    /// Every instance id kiln's journal names for the fleet.
    pub journal: BTreeSet<InstanceId>,
    /// Instances the journal says died since the previous check (replaced meanwhile, so the
    /// provider no longer lists them).
    pub died: Vec<(InstanceId, Option<ImageRef>)>,
    /// Backends kiln did not attach.
    pub foreign_backends: Vec<ForeignBackend>,
    /// The plan hook's summary when it found infra drift.
    pub infra: Option<String>,
}

/// The findings of a check: pure, in a stable order.
pub fn inspect(observed: &Observed) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut running = 0u32;
    let mut seen_dead = BTreeSet::new();
    for instance in &observed.instances {
        let id = instance.id.to_string();
        if !instance.running {
            seen_dead.insert(instance.id.clone());
            findings.push(Finding {
                kind: FindingKind::NotRunning,
                subject: Some(id.clone()),
                message: format!("instance {id} ({}) is not running", instance.image),
            });
        } else {
            running += 1;
            if let Some(desired) = observed.desired.as_ref().filter(|d| **d != instance.image) {
                findings.push(Finding {
                    kind: FindingKind::OffImage,
                    subject: Some(id.clone()),
                    message: format!(
                        "instance {id} runs image {}, not the deployed {desired}",
                        instance.image
                    ),
                });
            }
        }
        if !observed.journal.contains(&instance.id) {
            findings.push(Finding {
                kind: FindingKind::Unknown,
                subject: Some(id.clone()),
                message: format!("instance {id} is unknown to kiln's journal"),
            });
        }
    }
    for (id, image) in &observed.died {
        if seen_dead.contains(id) {
            continue;
        }
        let image = image.as_ref().map(|i| format!(" ({i})")).unwrap_or_default();
        findings.push(Finding {
            kind: FindingKind::NotRunning,
            subject: Some(id.to_string()),
            message: format!("instance {id}{image} died since the last check"),
        });
    }
    if running < observed.capacity {
        findings.push(Finding {
            kind: FindingKind::Missing,
            subject: None,
            message: format!(
                "{running} of {} instance(s) running: {} missing",
                observed.capacity,
                observed.capacity - running
            ),
        });
    }
    for backend in &observed.foreign_backends {
        let removed = if backend.removed { "; removed" } else { "" };
        findings.push(Finding {
            kind: FindingKind::Backend,
            subject: Some(backend.id.clone()),
            message: format!(
                "load balancer backend {} at {} was not attached by kiln{removed}",
                backend.id, backend.address
            ),
        });
    }
    if let Some(summary) = &observed.infra {
        let summary = summary.trim();
        findings.push(Finding {
            kind: FindingKind::Infra,
            subject: None,
            message: if summary.is_empty() {
                "infrastructure differs from the commit (reconcile hook, plan mode)".to_owned()
            } else {
                format!("infrastructure differs from the commit: {summary}")
            },
        });
    }
    findings
}

/// What `drift.mode: repair` does about a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// Run the reconcile hook (apply) again: infra drift.
    pub reconcile: bool,
    /// Replace dead and off-image instances, launch missing ones: instance drift.
    pub roll: bool,
}

/// The repair a report calls for, if any. Unknown instances and foreign backends call for none:
/// kiln never terminates what it does not know, and the local provider already removed the
/// backends.
pub fn wants_repair(report: &DriftReport) -> Option<Repair> {
    let has = |kinds: &[FindingKind]| report.findings.iter().any(|f| kinds.contains(&f.kind));
    let repair = Repair {
        reconcile: has(&[FindingKind::Infra]),
        roll: has(&[FindingKind::OffImage, FindingKind::NotRunning, FindingKind::Missing]),
    };
    (repair.reconcile || repair.roll).then_some(repair)
}

/// A `repair` rollout for `report`: the deployed commit and image, no bake, the reconcile hook
/// when the infra drifted, and a roll (which replaces what is dead or off-image and launches
/// what is missing; on a converged fleet it ends at once).
pub fn repair_rollout(
    report: &DriftReport,
    deployed: &crate::store::Deployed,
    repair: Repair,
    now: Timestamp,
) -> Rollout {
    let mut record = Rollout::new(
        Some(report.fleet.clone()),
        deployed.revision.clone(),
        format!("repair drift ({})", report.summary()),
        "drift".into(),
        Origin::Repair,
        now,
    );
    let what = match (repair.reconcile, repair.roll) {
        (true, true) => "reconcile the infrastructure and replace drifted instances",
        (true, false) => "reconcile the infrastructure",
        _ => "replace drifted instances",
    };
    record.plan = Plan {
        bake: vec![],
        reconcile: repair.reconcile,
        // Always roll: a reconcile-only plan would end without re-checking the instances.
        roll: true,
        reason: format!("drift.mode repair: {what} (deployed image {})", deployed.image),
    };
    record.image = Some(deployed.image.clone());
    record.previous_image = Some(deployed.image.clone());
    record
}

/// The meta key of a fleet's last report.
pub fn last_key(fleet: &str) -> String {
    format!("drift.last/{fleet}")
}

/// A fleet's last drift report, if it was ever checked.
pub fn last_report(store: &Store, fleet: &str) -> Result<Option<DriftReport>, StoreError> {
    store.get_meta(&last_key(fleet))
}

/// Everything a check needs, owned (it runs in its own task).
#[derive(Debug, Clone)]
pub struct CheckInput {
    /// The fleet as the manifest at the deployed commit describes it.
    pub fleet: Fleet,
    /// What the fleet runs.
    pub deployed: crate::store::Deployed,
    /// Its provider.
    pub provider: SharedProvider,
    /// The store.
    pub store: Store,
    /// The bare mirror.
    pub mirror: PathBuf,
    /// The data dir.
    pub data_dir: PathBuf,
    /// `--hook-env` pairs.
    pub hook_env: Vec<(String, String)>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The daemon-wide bound on pipeline steps (the plan hook takes a slot).
    pub slots: crate::pipeline::Slots,
    /// The provider's recent list of the idle fleet, used instead of listing again.
    pub listing: Option<crate::provider::Observation>,
    /// `interval` or `command`.
    pub trigger: String,
    /// The whole check ends by then (the plan hook is killed).
    pub deadline: Duration,
    /// Fires when a rollout of the fleet starts: the check stops (its plan hook is killed).
    pub cancel: CancellationToken,
}

/// Observes the fleet (provider list, foreign backends, the plan hook) within
/// `input.deadline` and returns the report (not yet recorded: see [`record`]), or `None` when
/// `input.cancel` fired (a rollout started, the daemon stops): a check cut short says nothing.
pub async fn check_fleet(input: CheckInput) -> Option<DriftReport> {
    let mut errors = Vec::new();
    let previous = last_report(&input.store, &input.fleet.name).ok().flatten();
    let since = previous.as_ref().map(|r| r.checked_at);
    let mut observed = Observed {
        desired: Some(input.deployed.image.clone()),
        capacity: input.fleet.rollout.capacity.min(),
        ..Observed::default()
    };
    let work = async {
        let listed = match input.listing.clone() {
            Some(listing) => Ok(listing),
            None => input.provider.observe().await,
        };
        match listed {
            Ok(seen) => {
                // What the fleet should run: an autoscaler's count, else the manifest's.
                let running = seen.instances.iter().filter(|i| i.running).count();
                observed.capacity = crate::rollout::capacity::target(
                    input.fleet.rollout.capacity,
                    seen.desired,
                    u32::try_from(running).unwrap_or(u32::MAX),
                );
                observed.instances = seen.instances;
            }
            Err(error) => {
                errors.push(format!("listing instances: {error}"));
                // Without a list there is nothing to compare capacity with.
                observed.capacity = 0;
            }
        }
        match input.provider.foreign_backends().await {
            Ok(found) => observed.foreign_backends = found,
            Err(error) => errors.push(format!("listing load balancer backends: {error}")),
        }
        match input.store.instance_journal(&input.fleet.name) {
            Ok(journal) => {
                // An instance the previous report already named dead is not news.
                let named: BTreeSet<&str> = previous
                    .iter()
                    .flat_map(|r| &r.findings)
                    .filter(|f| f.kind == FindingKind::NotRunning)
                    .filter_map(|f| f.subject.as_deref())
                    .collect();
                observed.died = died_since(&journal, since)
                    .into_iter()
                    .filter(|(id, _)| !named.contains(id.as_str()))
                    .collect();
                observed.journal = journal.into_iter().map(|e| e.instance).collect();
            }
            Err(error) => {
                errors.push(format!("reading the instance journal: {error}"));
                // Unknown to a journal that could not be read is no finding.
                observed.journal = observed.instances.iter().map(|i| i.id.clone()).collect();
            }
        }
        let cx = crate::pipeline::StepContext {
            store: &input.store,
            rollout: RolloutId(0),
            fleet: &input.fleet,
            revision: &input.deployed.revision,
            mirror: &input.mirror,
            data_dir: &input.data_dir,
            cancel: &input.cancel,
            hook_env: &input.hook_env,
            metrics: &input.metrics,
            slots: &input.slots,
        };
        match crate::pipeline::reconcile::plan_fleet(&cx, &input.deployed.image).await {
            Ok(Some(crate::pipeline::reconcile::PlanOutcome::Drift { summary })) => {
                observed.infra = Some(summary);
            }
            Ok(_) => {}
            Err(error) => {
                errors.push(format!("reconcile hook in plan mode: {}", crate::error::chain(&error)))
            }
        }
    };
    let finished = tokio::select! {
        () = work => true,
        () = tokio::time::sleep(input.deadline) => false,
    };
    if input.cancel.is_cancelled() {
        return None;
    }
    if !finished {
        // Dropping `work` dropped the hook run, which kills its process group.
        input.cancel.cancel();
        errors.push(format!(
            "the check did not finish within {}",
            crate::manifest::format_duration(input.deadline)
        ));
    }
    let mut findings = inspect(&observed);
    findings.dedup();
    Some(DriftReport {
        fleet: input.fleet.name.clone(),
        checked_at: crate::model::now(),
        trigger: input.trigger,
        revision: Some(input.deployed.revision.clone()),
        image: Some(input.deployed.image.clone()),
        findings,
        errors,
        record: None,
        repair: None,
    })
}

/// The instances the journal says died after `since` (all of them on a first check would be
/// old news: none then).
fn died_since(
    journal: &[InstanceEvent],
    since: Option<Timestamp>,
) -> Vec<(InstanceId, Option<ImageRef>)> {
    let Some(since) = since else { return Vec::new() };
    let mut died: BTreeMap<InstanceId, Option<ImageRef>> = BTreeMap::new();
    for entry in journal.iter().filter(|e| e.action == InstanceAction::Died && e.at > since) {
        died.insert(entry.instance.clone(), entry.image.clone());
    }
    died.into_iter().collect()
}

/// Records a report: with findings or errors, a rollout record of origin `drift` (unless a
/// periodic check found exactly what the previous report found: then the previous record
/// stands) with one event per finding; always the fleet's last report in meta. Returns the
/// report with `record` set.
pub fn record(store: &Store, mut report: DriftReport) -> Result<DriftReport, StoreError> {
    let previous = last_report(store, &report.fleet)?;
    let unchanged = previous.as_ref().is_some_and(|p| {
        p.record.is_some() && p.findings == report.findings && p.errors == report.errors
    });
    if report.clean() {
        report.record = None;
        // A clean check after a clean one changes nothing worth a write (the daemon shows the
        // fresh report from memory): an idle fleet's periodic checks cost no disk flushes.
        // `checked_at` on record stays that of the first clean check, which only widens the
        // window the next check reads deaths from the journal in (each reported once anyway).
        if previous.as_ref().is_some_and(|p| p.clean()) && report.trigger != "command" {
            return Ok(report);
        }
    } else if unchanged && report.trigger != "command" {
        report.record = previous.and_then(|p| p.record);
    } else {
        let revision = report.revision.clone().unwrap_or_else(|| Revision(String::new()));
        let mut rollout = Rollout::new(
            Some(report.fleet.clone()),
            revision,
            format!("drift check ({})", report.trigger),
            report.trigger.clone(),
            Origin::Drift,
            report.checked_at,
        );
        let summary = report.summary();
        rollout.state = RolloutState::Failed;
        rollout.image = None;
        rollout.previous_image = report.image.clone();
        rollout.plan = Plan { reason: summary.clone(), ..Plan::default() };
        rollout.reason = Some(summary.clone());
        rollout.started_at = Some(report.checked_at);
        rollout.finished_at = Some(report.checked_at);
        let rollout = store.create_rollout(rollout)?;
        let mut events: Vec<crate::store::Event> = report
            .findings
            .iter()
            .map(|f| {
                let mut event = crate::store::Event::new(
                    rollout.id,
                    Level::Warn,
                    crate::store::EventKind::parse(f.kind.event_kind()),
                    f.message.clone(),
                    serde_json::to_value(f).ok(),
                );
                event.at = report.checked_at;
                event
            })
            .collect();
        events.extend(report.errors.iter().map(|e| {
            let mut event = crate::store::Event::new(
                rollout.id,
                Level::Error,
                crate::store::EventKind::DriftError,
                e.clone(),
                None,
            );
            event.at = report.checked_at;
            event
        }));
        store.append_events(&mut events)?;
        report.record = Some(rollout.id);
    }
    store.set_meta(&last_key(&report.fleet), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, image: &str, running: bool) -> Instance {
        Instance {
            id: InstanceId(id.into()),
            image: ImageRef(image.into()),
            address: Some("127.0.0.1:1".into()),
            running,
            attached: running,
            launched_at: None,
            launch_key: None,
        }
    }

    fn observed(instances: Vec<Instance>) -> Observed {
        Observed {
            desired: Some(ImageRef("/img/v2".into())),
            capacity: 2,
            journal: instances.iter().map(|i| i.id.clone()).collect(),
            instances,
            ..Observed::default()
        }
    }

    fn kinds(findings: &[Finding]) -> Vec<(FindingKind, Option<&str>)> {
        findings.iter().map(|f| (f.kind, f.subject.as_deref())).collect()
    }

    #[test]
    fn a_converged_fleet_has_no_drift() {
        let o = observed(vec![instance("a", "/img/v2", true), instance("b", "/img/v2", true)]);
        assert_eq!(inspect(&o), vec![]);
        // More than capacity (an autoscaler) is not drift.
        let mut o = o;
        o.instances.push(instance("c", "/img/v2", true));
        o.journal.insert(InstanceId("c".into()));
        assert_eq!(inspect(&o), vec![]);
    }

    #[test]
    fn off_image_dead_and_missing_instances_are_found() {
        let o = observed(vec![instance("a", "/img/v1", true), instance("b", "/img/v2", false)]);
        let found = inspect(&o);
        assert_eq!(
            kinds(&found),
            [
                (FindingKind::OffImage, Some("a")),
                (FindingKind::NotRunning, Some("b")),
                (FindingKind::Missing, None),
            ]
        );
        assert!(found[0].message.contains("/img/v1") && found[0].message.contains("/img/v2"));
        assert!(found[2].message.contains("1 of 2"), "{}", found[2].message);
        assert!(found.iter().all(|f| f.kind.event_kind() == EVENT_INSTANCE));
    }

    #[test]
    fn unknown_instances_backends_and_infra_are_found() {
        let mut o = observed(vec![instance("a", "/img/v2", true), instance("x", "/img/v2", true)]);
        o.journal.remove(&InstanceId("x".into()));
        o.foreign_backends.push(ForeignBackend {
            id: "web-deadbeef".into(),
            address: "127.0.0.1:9".into(),
            seen_at: crate::model::now(),
            removed: true,
        });
        o.infra = Some("Plan: 1 to add, 0 to change, 0 to destroy.".into());
        let found = inspect(&o);
        assert_eq!(
            kinds(&found),
            [
                (FindingKind::Unknown, Some("x")),
                (FindingKind::Backend, Some("web-deadbeef")),
                (FindingKind::Infra, None),
            ]
        );
        assert_eq!(found[1].kind.event_kind(), EVENT_BACKEND);
        assert!(found[1].message.contains("127.0.0.1:9") && found[1].message.contains("removed"));
        assert_eq!(found[2].kind.event_kind(), EVENT_INFRA);
        assert!(found[2].message.contains("Plan: 1 to add"));
    }

    #[test]
    fn an_instance_that_died_and_was_replaced_is_still_reported() {
        let mut o = observed(vec![instance("a", "/img/v2", true), instance("c", "/img/v2", true)]);
        o.died = vec![(InstanceId("b".into()), Some(ImageRef("/img/v2".into())))];
        let found = inspect(&o);
        assert_eq!(kinds(&found), [(FindingKind::NotRunning, Some("b"))]);
        assert!(found[0].message.contains("died since the last check"));
        // Listed dead and journalled dead: one finding.
        let mut o = observed(vec![instance("a", "/img/v2", true), instance("b", "/img/v2", false)]);
        o.died = vec![(InstanceId("b".into()), None)];
        assert_eq!(inspect(&o).iter().filter(|f| f.kind == FindingKind::NotRunning).count(), 1);
    }

    #[test]
    fn without_a_deployed_image_nothing_is_off_image() {
        let mut o = observed(vec![instance("a", "/img/v1", true), instance("b", "/img/v9", true)]);
        o.desired = None;
        assert_eq!(inspect(&o), vec![]);
    }

    #[test]
    fn died_since_reads_only_deaths_after_the_previous_check() {
        let t0 = crate::model::now();
        let entry = |id: &str, action, at| InstanceEvent {
            seq: 0,
            fleet: "web".into(),
            instance: InstanceId(id.into()),
            image: None,
            rollout: None,
            action,
            at,
            reason: None,
        };
        let later = t0 + chrono::Duration::seconds(5);
        let journal = vec![
            entry("old", InstanceAction::Died, t0),
            entry("new", InstanceAction::Died, later),
            entry("new2", InstanceAction::Launched, later),
        ];
        assert_eq!(died_since(&journal, None), vec![]);
        let died = died_since(&journal, Some(t0));
        assert_eq!(died.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["new"]);
    }

    fn report(findings: Vec<Finding>) -> DriftReport {
        DriftReport {
            fleet: "web".into(),
            checked_at: crate::model::now(),
            trigger: "interval".into(),
            revision: None,
            image: None,
            findings,
            errors: vec![],
            record: None,
            repair: None,
        }
    }

    fn finding(kind: FindingKind) -> Finding {
        Finding { kind, subject: None, message: format!("{kind:?}") }
    }

    #[test]
    fn repair_is_wanted_for_instance_and_infra_drift_only() {
        assert_eq!(wants_repair(&report(vec![])), None);
        assert_eq!(wants_repair(&report(vec![finding(FindingKind::Backend)])), None);
        assert_eq!(wants_repair(&report(vec![finding(FindingKind::Unknown)])), None);
        for kind in [FindingKind::OffImage, FindingKind::NotRunning, FindingKind::Missing] {
            assert_eq!(
                wants_repair(&report(vec![finding(kind)])),
                Some(Repair { reconcile: false, roll: true }),
                "{kind:?}"
            );
        }
        assert_eq!(
            wants_repair(&report(vec![finding(FindingKind::Infra)])),
            Some(Repair { reconcile: true, roll: false })
        );
        assert_eq!(
            wants_repair(&report(vec![finding(FindingKind::Infra), finding(FindingKind::Missing)])),
            Some(Repair { reconcile: true, roll: true })
        );
    }

    #[test]
    fn a_repair_rollout_redeploys_the_deployed_image_without_a_bake() {
        let deployed = crate::store::Deployed {
            fleet: "web".into(),
            revision: Revision("a".repeat(40)),
            image: ImageRef("/img/v2".into()),
            rollout: RolloutId(3),
            trees: BTreeMap::new(),
            at: crate::model::now(),
        };
        let r = report(vec![finding(FindingKind::Infra)]);
        let rollout =
            repair_rollout(&r, &deployed, Repair { reconcile: true, roll: false }, r.checked_at);
        assert_eq!(rollout.origin, Origin::Repair);
        assert_eq!(rollout.revision, deployed.revision);
        assert_eq!(rollout.image.as_ref(), Some(&deployed.image));
        assert!(rollout.plan.bake.is_empty() && rollout.plan.reconcile && rollout.plan.roll);
        assert_eq!(rollout.state, RolloutState::Pending);
    }

    #[test]
    fn the_summary_lists_the_first_findings() {
        assert_eq!(report(vec![]).summary(), "no drift");
        let many: Vec<Finding> = (0..5).map(|_| finding(FindingKind::Missing)).collect();
        let summary = report(many).summary();
        assert!(summary.starts_with("drift: Missing; Missing; Missing; and 2 more"), "{summary}");
    }
}
