//! `kiln.yaml`: the manifest at the root of the watched repo.
//!
//! Two stages, as ripgrep does with its flags: serde types mirror the YAML (`deny_unknown_fields`
//! so a typo fails loudly, with the line and column serde_yaml reports), then [`validate`]
//! checks what serde cannot see (stage references, hook files present in the commit) and
//! reports each problem with the file, line and column it found it at. This module is the only
//! one that imports `serde_yaml`, so swapping the YAML crate touches one file.

mod duration;
mod limits;
mod notify;
mod settings;
mod text;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use duration::{format_duration, parse_duration};
pub use limits::{
    MAX_EXEC_ENV, MAX_FLEETS, MAX_MANIFEST_BYTES, MAX_NODES, MAX_PATHS, MAX_SCALAR_BYTES,
    MAX_STAGES,
};
pub use notify::{
    Forge, ForgeKind, MAX_SINKS, NotifyEvent, SecretRef, Sink, SinkKind, Smtp, SmtpTls,
};
pub use settings::{
    MAX_SETTINGS_BYTES, ProviderSettings, SETTINGS_FILE, SettingDecl, parse_settings,
    setting_env_name,
};
use text::{Text, locate};

/// The manifest's file name at the repo root.
pub const MANIFEST_FILE: &str = "kiln.yaml";

/// One problem in a manifest, located.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file (`kiln.yaml`).
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
    }
}

/// Every problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl ManifestError {
    /// A problem with the file as a whole (no line or column).
    pub fn whole_file(file: &str, message: impl Into<String>) -> ManifestError {
        ManifestError {
            problems: vec![Problem {
                file: file.to_owned(),
                line: 0,
                column: 0,
                message: message.into(),
            }],
        }
    }

    /// The file is larger than [`MAX_MANIFEST_BYTES`] (`size` bytes): refused before reading it.
    pub fn too_large(file: &str, size: u64) -> ManifestError {
        ManifestError::whole_file(
            file,
            format!(
                "{file} is {size} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes \
                 (MAX_MANIFEST_BYTES); it was not read"
            ),
        )
    }

    /// The file is a symbolic link: refused (it could point anywhere, inside the repo or not).
    pub fn symlink(file: &str) -> ManifestError {
        ManifestError::whole_file(
            file,
            format!("{file} is a symbolic link; it must be a regular file in the repo"),
        )
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The fleets this repo describes.
    pub fleets: Vec<Fleet>,
    /// The default of every fleet's `prune` (a fleet's own setting wins): retire a fleet's
    /// instances and load balancer when a later commit removes it from this file.
    #[serde(default)]
    pub prune: bool,
    /// Which commits may be deployed: signed by trusted keys (see docs/security.md). Read from
    /// the last *deployed* commit, never from the commit being verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyPolicy>,
    /// Notification sinks told about every fleet's rollouts (see docs/notifications.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<Sink>,
    /// Commit statuses on the forge hosting the repo (see docs/notifications.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<Forge>,
}

/// `verify:`: deploy only commits signed by trusted keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VerifyPolicy {
    /// `head`: the new tip only; `range` (default): every commit since the last deployed one.
    #[serde(default)]
    pub mode: VerifyMode,
    /// An OpenSSH `allowed_signers` file (repo path) naming the trusted SSH keys.
    #[serde(default)]
    pub ssh_allowed_signers: Option<String>,
    /// An OpenPGP keyring (repo path, armored or binary): every key in it is trusted.
    #[serde(default)]
    pub gpg_keyring: Option<String>,
    /// Who may change the trust files (and this section): SSH principals, OpenPGP
    /// fingerprints or user ids. Empty: any trusted signer.
    #[serde(default)]
    pub trust_files_changed_by: Vec<String>,
}

/// How much of the history `verify:` checks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Only the commit being deployed.
    Head,
    /// Every commit since the last deployed one, merges' second parents included.
    #[default]
    Range,
}

impl VerifyMode {
    /// `head` or `range`.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Head => "head",
            VerifyMode::Range => "range",
        }
    }
}

/// A group of identical instances behind one load balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Unique name, a DNS label (`[a-z0-9][a-z0-9-]{0,62}`): it names directories.
    pub name: String,
    /// Path prefixes whose changes concern this fleet; empty means the image and infra paths.
    /// Relative, inside the repo (no leading `/`, no `..`); at most [`MAX_PATHS`].
    #[serde(default)]
    pub paths: Vec<String>,
    /// How the image is baked.
    pub image: Image,
    /// How the infrastructure is reconciled (optional).
    #[serde(default)]
    pub infra: Option<Infra>,
    /// How instances are replaced.
    #[serde(default)]
    pub rollout: RolloutPolicy,
    /// How often kiln inspects the fleet for drift, and what it does about it (optional).
    #[serde(default)]
    pub drift: DriftPolicy,
    /// When a later commit removes (or renames) this fleet, drain and terminate its instances
    /// and stop its load balancer (a `prune` rollout). Default: the manifest's top-level
    /// `prune`, else `false` (the fleet is reported orphaned and left running until
    /// `kiln down FLEET`).
    #[serde(default)]
    pub prune: Option<bool>,
    /// Notification sinks told about this fleet only (besides the top-level `notify:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<Sink>,
}

impl Fleet {
    /// Whether the fleet is retired when a commit removes it (see [`Fleet::prune`]).
    pub fn prunes(&self) -> bool {
        self.prune.unwrap_or(false)
    }
}

/// Drift inspection: instances off the deployed image, missing, dead or unknown; load-balancer
/// backends kiln did not attach; infra drift from the reconcile hook in plan mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftPolicy {
    /// How often the fleet is checked (default 5m; at least [`MIN_DRIFT_INTERVAL`]).
    #[serde(default = "defaults::drift_interval", with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// `report` (default): findings are recorded and shown. `repair`: instance drift starts a
    /// `repair` rollout, infra drift a reconcile run.
    #[serde(default)]
    pub mode: DriftMode,
}

impl Default for DriftPolicy {
    fn default() -> Self {
        DriftPolicy { interval: defaults::drift_interval(), mode: DriftMode::default() }
    }
}

/// What kiln does about drift it finds.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DriftMode {
    /// Record and show the findings; change nothing.
    #[default]
    Report,
    /// Record them, then bring the fleet back: a `repair` rollout, a reconcile run.
    Repair,
}

/// The shortest `drift.interval` (each check lists instances and may run the plan hook).
pub const MIN_DRIFT_INTERVAL: Duration = Duration::from_secs(1);

/// The image and its bake stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Stages in any order; `from` gives the layering. The last stage that nothing builds
    /// `from` is the fleet's image.
    pub stages: Vec<Stage>,
    /// Per-stage bake timeout (default 30m).
    #[serde(default = "defaults::bake_timeout", with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Rebake on a schedule without a commit (security updates), e.g. `7d`.
    #[serde(default, with = "duration::serde_opt_duration")]
    #[schemars(with = "Option<String>")]
    pub rebake: Option<Duration>,
}

/// One bake stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Unique within the fleet, a DNS label (`[a-z0-9][a-z0-9-]{0,62}`): it names directories.
    pub name: String,
    /// The directory whose git tree id is the stage's cache input (inside the repo).
    pub path: String,
    /// The bake hook, a path in the repo.
    pub bake: String,
    /// The stage this one layers on (its image id is passed as `KILN_PARENT_IMAGE`).
    #[serde(default)]
    pub from: Option<String>,
}

/// The reconcile step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Infra {
    /// The infra directory (its tree id decides whether reconcile runs).
    pub path: String,
    /// The reconcile hook, a path in the repo.
    pub reconcile: String,
    /// Timeout (default 15m).
    #[serde(default = "defaults::reconcile_timeout", with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

/// Which provider runs the instances (the `provider:` tag of a fleet's `rollout`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Processes on this machine behind kiln's own load balancer (the embedded default).
    #[default]
    Local,
    /// Hook executables speaking JSON (any cloud CLI).
    Exec,
}

impl ProviderKind {
    /// The name written in `kiln.yaml` (`local`, `exec`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Exec => "exec",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fleet's provider with the settings of that provider, and only those.
///
/// In `kiln.yaml` the `provider:` tag picks the variant and the provider's own section holds
/// its settings: `loadBalancer:` for `local`, `exec:` for `exec`. A section of another provider
/// is an error naming it, with its line and column.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderSpec {
    /// Processes on this machine behind kiln's own load balancer.
    Local {
        /// The load balancer (`loadBalancer:`).
        load_balancer: LoadBalancer,
    },
    /// Scripts in the repo speaking JSON (`exec:`).
    Exec(ExecProvider),
}

impl Default for ProviderSpec {
    fn default() -> Self {
        ProviderSpec::Local { load_balancer: LoadBalancer::default() }
    }
}

impl ProviderSpec {
    /// Which provider this is.
    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderSpec::Local { .. } => ProviderKind::Local,
            ProviderSpec::Exec(_) => ProviderKind::Exec,
        }
    }

    /// The local provider's load balancer, if this is the local provider.
    pub fn load_balancer(&self) -> Option<&LoadBalancer> {
        match self {
            ProviderSpec::Local { load_balancer } => Some(load_balancer),
            ProviderSpec::Exec(_) => None,
        }
    }

    /// The exec provider's settings, if this is the exec provider.
    pub fn exec(&self) -> Option<&ExecProvider> {
        match self {
            ProviderSpec::Exec(exec) => Some(exec),
            ProviderSpec::Local { .. } => None,
        }
    }
}

/// What to do when new instances fail their health checks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Put the fleet back on the previous image.
    #[default]
    Rollback,
    /// Stop where it is and wait for a human (`kiln resume|rollback|abort`).
    Pause,
}

/// A count or a percentage of capacity (`1`, `"25%"`), as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum IntOrPercent {
    /// An absolute count.
    Count(u32),
    /// A percentage, written `"25%"`.
    Percent(
        #[serde(with = "duration::serde_percent")]
        #[schemars(with = "String")]
        u32,
    ),
}

impl IntOrPercent {
    /// Resolves against `capacity`; percentages round as Kubernetes does (`round_up`).
    pub fn resolve(self, capacity: u32, round_up: bool) -> u32 {
        match self {
            IntOrPercent::Count(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = u64::from(capacity) * u64::from(p);
                let n = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }
}

/// The most instances a fleet may have (`capacity`, its `max`, and a provider's desired count).
pub const MAX_CAPACITY: u32 = 10_000;

/// How many instances a fleet runs: a number (`3`), or a range (`{min: 2, max: 6}`) inside which
/// an autoscaler (the provider's desired count, or whoever scaled the fleet) decides.
///
/// The count a rollout converges to is `rollout::capacity::target`; a provider that reports a
/// desired count (an AWS ASG, an Alibaba ESS group) wins over both forms, clamped into the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Capacity {
    /// Exactly this many instances (unless the provider reports a desired count).
    Fixed(u32),
    /// As many as the provider wants, or as the fleet runs, within `[min, max]`.
    Range(CapacityRange),
}

/// `capacity: {min, max}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapacityRange {
    /// The fewest instances the fleet runs.
    pub min: u32,
    /// The most instances the fleet runs.
    pub max: u32,
}

impl Capacity {
    /// The fewest instances the manifest allows (the number itself for a fixed capacity).
    pub fn min(self) -> u32 {
        match self {
            Capacity::Fixed(n) => n,
            Capacity::Range(r) => r.min,
        }
    }

    /// The most instances the manifest allows (the number itself for a fixed capacity).
    pub fn max(self) -> u32 {
        match self {
            Capacity::Fixed(n) => n,
            Capacity::Range(r) => r.max,
        }
    }
}

impl From<u32> for Capacity {
    fn from(n: u32) -> Self {
        Capacity::Fixed(n)
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capacity::Fixed(n) => write!(f, "{n}"),
            Capacity::Range(r) => write!(f, "{}..{}", r.min, r.max),
        }
    }
}

// A hand-written visitor instead of `#[serde(untagged)]`: serde_yaml then keeps the line and
// column of a bad value, and errors inside `{min, max}` (a typo, a missing `max`) name the field.
impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Capacity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count of instances or `{min: N, max: M}`")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Capacity, E> {
                u32::try_from(n).map(Capacity::Fixed).map_err(|_| {
                    E::custom(format!("capacity {n} is over the limit of {MAX_CAPACITY}"))
                })
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Capacity, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("capacity {n} is negative"))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Capacity, A::Error> {
                CapacityRange::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Capacity::Range)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// How instances are replaced. Defaults follow Kubernetes Deployments and AWS instance refresh
/// (see the README's policy table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "RawRolloutPolicy", into = "RawRolloutPolicy")]
pub struct RolloutPolicy {
    /// Where instances run, with that provider's settings.
    pub provider: ProviderSpec,
    /// Instances the fleet keeps running: a number, or `{min, max}` for an autoscaled fleet.
    pub capacity: Capacity,
    /// Extra instances allowed above capacity during a rollout (default 25%, rounded up).
    pub max_surge: IntOrPercent,
    /// Instances allowed below capacity during a rollout (default 0, rounded down).
    pub max_unavailable: IntOrPercent,
    /// How a new instance is judged healthy.
    pub health_check: HealthCheck,
    /// How long an instance must stay healthy before it takes traffic (default 0s).
    pub min_healthy: Duration,
    /// How long an old instance keeps finishing requests after leaving the LB (default 5s).
    pub drain: Duration,
    /// A rollout making no progress this long fails (default 10m).
    pub progress_deadline: Duration,
    /// Replace a few instances first and wait.
    pub canary: Option<Canary>,
    /// When rollouts may start.
    pub schedule: Option<Schedule>,
    /// What happens when new instances fail.
    pub on_failure: OnFailure,
}

/// `rollout:` as written: the `provider:` tag beside every provider's section. Converted to
/// [`RolloutPolicy`] (a provider's section under another provider is an error there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default = "raw_policy_default")]
struct RawRolloutPolicy {
    /// Where instances run: `local` (with `loadBalancer:`) or `exec` (with `exec:`).
    provider: ProviderKind,
    /// Settings of the exec provider (only with `provider: exec`).
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<ExecProvider>,
    /// Instances the fleet keeps running.
    capacity: Capacity,
    /// Extra instances allowed above capacity during a rollout (default 25%, rounded up).
    max_surge: IntOrPercent,
    /// Instances allowed below capacity during a rollout (default 0, rounded down).
    max_unavailable: IntOrPercent,
    /// How a new instance is judged healthy.
    health_check: HealthCheck,
    /// How long an instance must stay healthy before it takes traffic (default 0s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    min_healthy: Duration,
    /// How long an old instance keeps finishing requests after leaving the LB (default 5s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    drain: Duration,
    /// A rollout making no progress this long fails (default 10m).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    progress_deadline: Duration,
    /// Replace a few instances first and wait.
    canary: Option<Canary>,
    /// When rollouts may start.
    schedule: Option<Schedule>,
    /// What happens when new instances fail.
    on_failure: OnFailure,
    /// The local provider's load balancer (only with `provider: local`).
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancer: Option<LoadBalancer>,
}

/// What an omitted `rollout:` key means. No provider section: the conversion fills in the
/// provider's defaults (and does not mistake a default `loadBalancer` for a written one).
fn raw_policy_default() -> RawRolloutPolicy {
    RawRolloutPolicy { load_balancer: None, ..RolloutPolicy::default().into() }
}

/// Why a `rollout:` section cannot become a [`RolloutPolicy`]. The backticked part of each
/// message is the key the error is located at.
#[derive(Debug)]
enum PolicyError {
    ExecWithoutSection,
    Misplaced { section: &'static str, belongs: ProviderKind, provider: ProviderKind },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::ExecWithoutSection => f.write_str(
                "`provider` is `exec`, which needs an `exec:` section (its scripts and settings)",
            ),
            PolicyError::Misplaced { section, belongs, provider } => write!(
                f,
                "`{section}` is a setting of the {belongs} provider; this fleet's provider is \
                 `{provider}` (remove it, or set `provider: {belongs}`)"
            ),
        }
    }
}

impl TryFrom<RawRolloutPolicy> for RolloutPolicy {
    type Error = PolicyError;

    fn try_from(raw: RawRolloutPolicy) -> Result<Self, PolicyError> {
        let provider = match (raw.provider, raw.exec, raw.load_balancer) {
            (ProviderKind::Local, None, load_balancer) => {
                ProviderSpec::Local { load_balancer: load_balancer.unwrap_or_default() }
            }
            (ProviderKind::Local, Some(_), _) => {
                return Err(PolicyError::Misplaced {
                    section: "exec",
                    belongs: ProviderKind::Exec,
                    provider: ProviderKind::Local,
                });
            }
            (ProviderKind::Exec, _, Some(_)) => {
                return Err(PolicyError::Misplaced {
                    section: "loadBalancer",
                    belongs: ProviderKind::Local,
                    provider: ProviderKind::Exec,
                });
            }
            (ProviderKind::Exec, None, None) => return Err(PolicyError::ExecWithoutSection),
            (ProviderKind::Exec, Some(exec), None) => ProviderSpec::Exec(exec),
        };
        Ok(RolloutPolicy {
            provider,
            capacity: raw.capacity,
            max_surge: raw.max_surge,
            max_unavailable: raw.max_unavailable,
            health_check: raw.health_check,
            min_healthy: raw.min_healthy,
            drain: raw.drain,
            progress_deadline: raw.progress_deadline,
            canary: raw.canary,
            schedule: raw.schedule,
            on_failure: raw.on_failure,
        })
    }
}

impl From<RolloutPolicy> for RawRolloutPolicy {
    fn from(policy: RolloutPolicy) -> Self {
        let kind = policy.provider.kind();
        let (exec, load_balancer) = match policy.provider {
            ProviderSpec::Local { load_balancer } => (None, Some(load_balancer)),
            ProviderSpec::Exec(exec) => (Some(exec), None),
        };
        RawRolloutPolicy {
            provider: kind,
            exec,
            capacity: policy.capacity,
            max_surge: policy.max_surge,
            max_unavailable: policy.max_unavailable,
            health_check: policy.health_check,
            min_healthy: policy.min_healthy,
            drain: policy.drain,
            progress_deadline: policy.progress_deadline,
            canary: policy.canary,
            schedule: policy.schedule,
            on_failure: policy.on_failure,
            load_balancer,
        }
    }
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            provider: ProviderSpec::default(),
            capacity: Capacity::Fixed(1),
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Count(0),
            health_check: HealthCheck::default(),
            min_healthy: Duration::ZERO,
            drain: Duration::from_secs(5),
            progress_deadline: Duration::from_secs(600),
            canary: None,
            schedule: None,
            on_failure: OnFailure::Rollback,
        }
    }
}

impl RolloutPolicy {
    /// maxSurge as a count against the manifest's base count (the number, or `min`). A rollout
    /// resolves it against its current target with [`RolloutPolicy::surge_for`].
    pub fn surge(&self) -> u32 {
        self.surge_for(self.capacity.min())
    }

    /// maxUnavailable as a count against the manifest's base count (the number, or `min`).
    pub fn unavailable(&self) -> u32 {
        self.unavailable_for(self.capacity.min())
    }

    /// maxSurge as a count for a fleet of `target` instances (at least 1 when maxUnavailable is
    /// 0, so a rollout can progress).
    pub fn surge_for(&self, target: u32) -> u32 {
        let surge = self.max_surge.resolve(target, true);
        if surge == 0 && self.unavailable_for(target) == 0 { 1 } else { surge }
    }

    /// maxUnavailable as a count for a fleet of `target` instances.
    pub fn unavailable_for(&self, target: u32) -> u32 {
        self.max_unavailable.resolve(target, false).min(target)
    }
}

/// The HTTP health check of a new instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HealthCheck {
    /// The path to GET; 2xx is healthy.
    pub http: String,
    /// Time between checks (default 1s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Consecutive successes needed (default 2).
    pub healthy_threshold: u32,
    /// Deadline for a new instance to become healthy (default 60s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            http: "/healthz".into(),
            interval: Duration::from_secs(1),
            healthy_threshold: 2,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Canary: the first `count` replacements, then a pause (or a manual promote). With `weight`,
/// the canary instances take that share of the load balancer's requests (instead of their
/// round-robin share) until the canary is promoted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Canary {
    /// Instances in the canary batch (default 1).
    #[serde(default = "defaults::canary_count")]
    pub count: u32,
    /// The share of requests the canary takes until it is promoted, e.g. `"10%"` (local
    /// provider; 1% to 99%). Without it the canary gets its round-robin share.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_percent"
    )]
    #[schemars(with = "Option<String>")]
    pub weight: Option<u32>,
    /// How long to watch the canary before going on.
    #[serde(default, with = "duration::serde_opt_duration")]
    #[schemars(with = "Option<String>")]
    pub pause: Option<Duration>,
    /// Wait for `kiln resume` instead of a timed pause.
    #[serde(default)]
    pub manual: bool,
}

/// When rollouts may start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Schedule {
    /// Wait this long after the commit before rolling.
    #[serde(default, with = "duration::serde_opt_duration")]
    #[schemars(with = "Option<String>")]
    pub delay: Option<Duration>,
    /// Only start new batches inside this daily UTC window.
    #[serde(default)]
    pub window: Option<Window>,
}

/// A daily maintenance window in UTC, e.g. `{ start: "02:00", end: "04:00" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `HH:MM` start (inclusive).
    pub start: String,
    /// `HH:MM` end (exclusive); may be before `start` to span midnight.
    pub end: String,
}

impl Window {
    fn minutes(text: &str) -> Option<u32> {
        let (h, m) = text.split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    }

    /// Start and end as minutes after midnight, if well-formed.
    pub fn bounds(&self) -> Option<(u32, u32)> {
        Some((Self::minutes(&self.start)?, Self::minutes(&self.end)?))
    }
}

/// The local provider's load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancer {
    /// The port it listens on (127.0.0.1). 0 picks a free port.
    pub port: u16,
    /// A second listener (127.0.0.1) that routes only to instances on a rollout's new image
    /// while the rollout rolls (testers try the canary before users do); between rollouts it
    /// serves like `port`.
    #[serde(rename = "grayPort", skip_serializing_if = "Option::is_none")]
    pub gray_port: Option<u16>,
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer { port: 8080, gray_port: None }
    }
}

/// The exec provider: one executable per operation, in the repo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecProvider {
    /// Lists the fleet's instances.
    pub list: String,
    /// Launches one instance on an image.
    pub launch: String,
    /// Attaches an instance to the load balancer.
    pub attach: String,
    /// Detaches (and drains) an instance.
    pub detach: String,
    /// Terminates an instance.
    pub terminate: String,
    /// Reports an instance's health (optional; the HTTP check is used otherwise).
    #[serde(default)]
    pub health: Option<String>,
    /// Per-call timeout (default 5m).
    #[serde(default = "defaults::exec_timeout", with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Non-secret settings passed to every call as `KILN_PROVIDER_<NAME>`.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

impl ExecProvider {
    /// Each operation's script, as `(operation, path)`, `health` included when set.
    pub fn scripts(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("list", self.list.as_str()),
            ("launch", self.launch.as_str()),
            ("attach", self.attach.as_str()),
            ("detach", self.detach.as_str()),
            ("terminate", self.terminate.as_str()),
        ]
        .into_iter()
        .chain(self.health.as_deref().map(|health| ("health", health)))
    }
}

mod defaults {
    use std::time::Duration;
    pub fn bake_timeout() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn reconcile_timeout() -> Duration {
        Duration::from_secs(15 * 60)
    }
    pub fn exec_timeout() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn drift_interval() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn canary_count() -> u32 {
        1
    }
}

impl Fleet {
    /// The paths whose changes concern the fleet (explicit, or the stage and infra paths).
    pub fn watched_paths(&self) -> Vec<String> {
        if !self.paths.is_empty() {
            return self.paths.clone();
        }
        let mut paths: Vec<String> = self.image.stages.iter().map(|s| s.path.clone()).collect();
        paths.extend(self.infra.iter().map(|i| i.path.clone()));
        paths
    }

    /// Stages in dependency order (parents first). Assumes a validated manifest.
    pub fn stages_in_order(&self) -> Vec<&Stage> {
        let mut out: Vec<&Stage> = Vec::new();
        let mut remaining: Vec<&Stage> = self.image.stages.iter().collect();
        while !remaining.is_empty() {
            let before = remaining.len();
            remaining.retain(|stage| {
                let ready = stage
                    .from
                    .as_ref()
                    .is_none_or(|parent| out.iter().any(|done| &done.name == parent));
                if ready {
                    out.push(stage);
                }
                !ready
            });
            if remaining.len() == before {
                // A cycle; validation reports it. Keep the rest in file order.
                out.append(&mut remaining);
            }
        }
        out
    }

    /// The stage whose image the instances run: the last one no other stage builds from.
    pub fn final_stage(&self) -> Option<&Stage> {
        let ordered = self.stages_in_order();
        ordered
            .iter()
            .rev()
            .find(|s| !self.image.stages.iter().any(|o| o.from.as_deref() == Some(&s.name)))
            .copied()
    }
}

/// How [`validate`] learns whether a path in the repo exists and is executable.
pub trait RepoFiles {
    /// `None` if missing (or not a regular file), `Some(executable)` otherwise. Symlinks are
    /// not followed.
    fn file(&self, path: &str) -> Option<bool>;

    /// Whether `path`, or a directory on the way to it, is a symbolic link. Hooks must not be:
    /// the daemon runs them from an export of the commit, where a link could lead anywhere.
    fn symlink(&self, _path: &str) -> bool {
        false
    }

    /// The text of a small file (an exec provider's [`SETTINGS_FILE`]): `Ok(None)` if absent,
    /// `Err(why)` if it is there but refused (a symlink, over `max_bytes`, not UTF-8).
    fn read(&self, _path: &str, _max_bytes: u64) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// Where the files are, as problems name it: the daemon reads a commit, `kiln validate` a
    /// working tree on disk.
    fn place(&self) -> &'static str {
        "the commit"
    }
}

/// A checkout on disk (`kiln validate PATH`). Answers as the daemon does from git: a symlink
/// is not a file, and a path never leaves the checkout.
pub struct DirFiles<'a>(pub &'a std::path::Path);

impl RepoFiles for DirFiles<'_> {
    fn place(&self) -> &'static str {
        "the working tree"
    }

    fn file(&self, path: &str) -> Option<bool> {
        use std::os::unix::fs::PermissionsExt;
        let full = crate::fsutil::safe_join(self.0, path).ok()?;
        let meta = std::fs::symlink_metadata(full).ok()?;
        meta.is_file().then(|| meta.permissions().mode() & 0o111 != 0)
    }

    fn symlink(&self, path: &str) -> bool {
        let Ok(full) = crate::fsutil::safe_join(self.0, path) else { return false };
        let Ok(relative) = full.strip_prefix(self.0) else { return false };
        let mut at = self.0.to_path_buf();
        relative.components().any(|part| {
            at.push(part);
            std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink())
        })
    }

    fn read(&self, path: &str, max_bytes: u64) -> Result<Option<String>, String> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let Ok(full) = crate::fsutil::safe_join(self.0, path) else { return Ok(None) };
        if self.symlink(path) {
            return Err("it is a symbolic link (or lies under one)".into());
        }
        // O_NOFOLLOW: a symlink swapped in after the check above is refused too.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(full);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        if !file.metadata().map_err(|e| e.to_string())?.is_file() {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > max_bytes {
            return Err(format!("it is over the limit of {max_bytes} bytes"));
        }
        String::from_utf8(bytes).map(Some).map_err(|_| "it is not valid UTF-8".into())
    }
}

/// The answers of a [`RepoFiles`], each asked once per validation: many fleets name the same
/// hooks and provider scripts, and each question costs a stat (or a git lookup).
struct Memo<'a> {
    files: &'a dyn RepoFiles,
    file: RefCell<HashMap<String, Option<bool>>>,
    symlink: RefCell<HashMap<String, bool>>,
    settings: RefCell<HashMap<String, Option<Rc<ProviderSettings>>>>,
}

impl<'a> Memo<'a> {
    fn new(files: &'a dyn RepoFiles) -> Memo<'a> {
        Memo {
            files,
            file: RefCell::default(),
            symlink: RefCell::default(),
            settings: RefCell::default(),
        }
    }

    fn file(&self, path: &str) -> Option<bool> {
        if let Some(known) = self.file.borrow().get(path) {
            return *known;
        }
        let answer = self.files.file(path);
        self.file.borrow_mut().insert(path.to_owned(), answer);
        answer
    }

    fn symlink(&self, path: &str) -> bool {
        if let Some(known) = self.symlink.borrow().get(path) {
            return *known;
        }
        let answer = self.files.symlink(path);
        self.symlink.borrow_mut().insert(path.to_owned(), answer);
        answer
    }

    /// The settings declared in `dir` (`None` when it has no [`SETTINGS_FILE`]). A broken
    /// declaration is reported once, the first time it is read.
    fn settings(&self, report: &mut Report<'_>, dir: &str) -> Option<Rc<ProviderSettings>> {
        if let Some(known) = self.settings.borrow().get(dir) {
            return known.clone();
        }
        let path = if dir.is_empty() {
            SETTINGS_FILE.to_owned()
        } else {
            format!("{dir}/{SETTINGS_FILE}")
        };
        let parsed = match self.files.read(&path, MAX_SETTINGS_BYTES) {
            Ok(None) => None,
            Ok(Some(text)) => match parse_settings(&text, &path) {
                Ok(settings) => Some(Rc::new(settings)),
                Err(error) => {
                    error.problems.into_iter().for_each(|p| report.push_problem(p));
                    None
                }
            },
            Err(why) => {
                report.push_problem(Problem {
                    file: path.clone(),
                    line: 0,
                    column: 0,
                    message: format!("{path} cannot be read: {why}"),
                });
                None
            }
        };
        self.settings.borrow_mut().insert(dir.to_owned(), parsed.clone());
        parsed
    }
}

/// Parses and validates manifest text. `file` names it in errors.
pub fn load(text: &str, file: &str, files: &dyn RepoFiles) -> Result<Manifest, ManifestError> {
    let manifest = parse(text, file)?;
    validate(&manifest, text, file, files)?;
    Ok(manifest)
}

/// Parses without checking files (syntax and field-level errors only). The size and expansion
/// limits (see [`MAX_MANIFEST_BYTES`], [`MAX_NODES`]) are checked here, before anything is built.
pub fn parse(text: &str, file: &str) -> Result<Manifest, ManifestError> {
    let size = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if size > MAX_MANIFEST_BYTES {
        return Err(ManifestError::too_large(file, size));
    }
    if let Some((which, error)) = limits::check(serde_yaml::Deserializer::from_str(text)) {
        let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
        let message = which.to_string();
        return Err(ManifestError {
            problems: vec![Problem { file: file.to_owned(), line, column, message }],
        });
    }
    let manifest = serde_yaml::from_str::<Manifest>(text).map_err(|error| {
        let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
        let message = error.to_string();
        // serde_yaml appends " at line X column Y"; the location is reported separately.
        let message = match message.find(" at line ") {
            Some(pos) => message[..pos].to_owned(),
            None => message,
        };
        // For errors raised while converting a value (a bad duration), serde_yaml reports where
        // the enclosing mapping starts. The message quotes the value: point at it instead.
        let (line, column) = quoted_value(&message)
            .and_then(|value| text::locate_value(&Text::new(text), value, line))
            .unwrap_or((line, column));
        ManifestError { problems: vec![Problem { file: file.to_owned(), line, column, message }] }
    });
    let mut manifest = manifest?;
    // The top-level `prune` is each fleet's default: a fleet carries its own answer, so the
    // spec kept with a deployment says whether to prune it.
    for fleet in &mut manifest.fleets {
        fleet.prune.get_or_insert(manifest.prune);
    }
    Ok(manifest)
}

/// The first `backticked` part of a message.
fn quoted_value(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(&message[start..end]).filter(|v| !v.is_empty())
}

/// Problems reported in full; past this many they are only counted (locating one scans the text).
const MAX_PROBLEMS: usize = 50;

/// The problems found so far. A location is computed only for a problem that is reported.
struct Report<'a> {
    file: &'a str,
    problems: Vec<Problem>,
    omitted: usize,
}

impl Report<'_> {
    fn push(&mut self, at: impl FnOnce() -> (usize, usize), message: String) {
        if self.problems.len() >= MAX_PROBLEMS {
            self.omitted += 1;
            return;
        }
        let (line, column) = at();
        self.problems.push(Problem { file: self.file.to_owned(), line, column, message });
    }

    /// A problem located already (in another file, such as a provider's [`SETTINGS_FILE`]).
    fn push_problem(&mut self, problem: Problem) {
        if self.problems.len() >= MAX_PROBLEMS {
            self.omitted += 1;
            return;
        }
        self.problems.push(problem);
    }
}

/// Whether `name` may become part of a path: a DNS label, `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_safe_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    !bytes.is_empty() && bytes.len() <= 63 && bytes[0] != b'-' && bytes.iter().all(allowed)
}

/// Whether `path` is a relative path that stays inside the repo: no leading `/`, no `..`
/// component, no NUL.
pub fn is_repo_path(path: &str) -> bool {
    !path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|part| part == "..")
}

/// Semantic checks serde cannot do. Every problem is reported, not just the first (up to a
/// bound; the rest are counted).
pub fn validate(
    manifest: &Manifest,
    text: &str,
    file: &str,
    files: &dyn RepoFiles,
) -> Result<(), ManifestError> {
    let mut report = Report { file, problems: Vec::new(), omitted: 0 };
    check_manifest(&mut report, manifest, &Text::new(text), &Memo::new(files));
    let Report { mut problems, omitted, .. } = report;
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort_by_key(|p| (p.line, p.column));
    if omitted > 0 {
        problems.push(Problem {
            file: file.to_owned(),
            line: 0,
            column: 0,
            message: format!("{omitted} more problems not shown"),
        });
    }
    Err(ManifestError { problems })
}

/// `verify:` names at least one trust file, and each is a regular file inside the repo.
fn check_verify(report: &mut Report<'_>, verify: &VerifyPolicy, text: &Text<'_>, files: &Memo<'_>) {
    if verify.ssh_allowed_signers.is_none() && verify.gpg_keyring.is_none() {
        report.push(
            || locate(text, "verify", "", 1),
            "verify: names no trusted keys (set sshAllowedSigners, gpgKeyring or both)".into(),
        );
    }
    let fields =
        [("sshAllowedSigners", &verify.ssh_allowed_signers), ("gpgKeyring", &verify.gpg_keyring)];
    for (field, path) in fields {
        let Some(path) = path else { continue };
        if !is_repo_path(path) || path.trim_matches('/').is_empty() {
            report.push(
                || locate(text, field, path, 1),
                format!("verify.{field} `{path}` must be a relative path inside the repo"),
            );
        } else if files.file(path).is_none() {
            report.push(
                || locate(text, field, path, 1),
                format!("verify.{field} `{path}` is not a file in the repo"),
            );
        }
    }
}

fn check_manifest(report: &mut Report<'_>, manifest: &Manifest, text: &Text<'_>, files: &Memo<'_>) {
    if manifest.fleets.is_empty() {
        report.push(|| locate(text, "fleets", "", 1), "no fleets defined".into());
    }
    if manifest.fleets.len() > MAX_FLEETS {
        report.push(
            || locate(text, "fleets", "", 1),
            format!(
                "{} fleets, over the limit of {MAX_FLEETS} (MAX_FLEETS)",
                manifest.fleets.len()
            ),
        );
        return;
    }
    if let Some(verify) = &manifest.verify {
        check_verify(report, verify, text, files);
    }
    notify::check(report, manifest, text);
    let mut fleet_names = HashSet::new();
    let mut lb_ports = BTreeSet::new();
    // Fleets are in file order: each one's `name:` is searched from the line after the
    // previous one's, so finding them all reads the text once (from the top only for a name
    // not found there, such as fleets written in flow style on one line).
    let mut next = 1;
    for fleet in &manifest.fleets {
        let at = text::locate_name(text, &fleet.name, next)
            .or_else(|| text::locate_name(text, &fleet.name, 1))
            .unwrap_or(1);
        next = at + 1;
        if !fleet_names.insert(fleet.name.as_str()) {
            report.push(
                || locate(text, "name", &fleet.name, at),
                format!("duplicate fleet `{}`", fleet.name),
            );
        }
        if !is_safe_name(&fleet.name) {
            report.push(
                || locate(text, "name", &fleet.name, at),
                format!(
                    "fleet name `{}` must be 1 to 63 lowercase letters, digits and `-`, \
                     not starting with `-` (it names directories)",
                    fleet.name
                ),
            );
        }
        if fleet.paths.len() > MAX_PATHS {
            report.push(
                || locate(text, "paths", "", at),
                format!(
                    "fleet `{}` has {} paths, over the limit of {MAX_PATHS} (MAX_PATHS)",
                    fleet.name,
                    fleet.paths.len()
                ),
            );
        } else {
            for path in &fleet.paths {
                check_repo_path(report, text, at, "paths", path);
            }
        }
        check_stages(report, fleet, text, at, files);
        if let Some(infra) = &fleet.infra {
            check_repo_path(report, text, at, "path", &infra.path);
            check_hook(report, text, at, files, "reconcile", &infra.reconcile);
        }
        check_policy(report, fleet, text, at, files, &mut lb_ports);
    }
}

fn check_stages(
    report: &mut Report<'_>,
    fleet: &Fleet,
    text: &Text<'_>,
    at: usize,
    files: &Memo<'_>,
) {
    let stages = &fleet.image.stages;
    if stages.is_empty() {
        report.push(
            || locate(text, "stages", "", at),
            format!("fleet `{}` has no stages", fleet.name),
        );
        return;
    }
    if stages.len() > MAX_STAGES {
        report.push(
            || locate(text, "stages", "", at),
            format!(
                "fleet `{}` has {} stages, over the limit of {MAX_STAGES} (MAX_STAGES)",
                fleet.name,
                stages.len()
            ),
        );
        return;
    }
    let stage_names: BTreeSet<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    if stage_names.len() != stages.len() {
        report.push(
            || locate(text, "stages", "", at),
            format!("fleet `{}` has duplicate stage names", fleet.name),
        );
    }
    for stage in stages {
        if !is_safe_name(&stage.name) {
            report.push(
                || locate(text, "name", &stage.name, at),
                format!(
                    "stage name `{}` must be 1 to 63 lowercase letters, digits and `-`, \
                     not starting with `-` (it names directories)",
                    stage.name
                ),
            );
        }
        check_repo_path(report, text, at, "path", &stage.path);
        if let Some(parent) = &stage.from {
            if !stage_names.contains(parent.as_str()) {
                report.push(
                    || locate(text, "from", parent, at),
                    format!(
                        "stage `{}` is built from `{parent}`, which is not a stage of fleet `{}`",
                        stage.name, fleet.name
                    ),
                );
            } else if parent == &stage.name {
                report.push(
                    || locate(text, "from", parent, at),
                    format!("stage `{}` is built from itself", stage.name),
                );
            }
        }
        check_hook(report, text, at, files, "bake", &stage.bake);
    }
    if has_cycle(fleet) {
        report.push(
            || locate(text, "stages", "", at),
            format!("stages of fleet `{}` form a cycle", fleet.name),
        );
    }
}

fn check_policy(
    report: &mut Report<'_>,
    fleet: &Fleet,
    text: &Text<'_>,
    at: usize,
    files: &Memo<'_>,
    lb_ports: &mut BTreeSet<u16>,
) {
    if fleet.drift.interval < MIN_DRIFT_INTERVAL {
        let written = format_duration(fleet.drift.interval);
        report.push(
            || locate(text, "interval", &written, locate(text, "drift", "", at).0.max(at)),
            format!(
                "drift.interval {written} is under the minimum of {}",
                format_duration(MIN_DRIFT_INTERVAL)
            ),
        );
    }
    let policy = &fleet.rollout;
    match policy.capacity {
        Capacity::Fixed(0) => {
            report.push(|| locate(text, "capacity", "0", at), "capacity must be at least 1".into())
        }
        Capacity::Fixed(n) if n > MAX_CAPACITY => report.push(
            || locate(text, "capacity", &n.to_string(), at),
            format!("capacity {n} is over the limit of {MAX_CAPACITY}"),
        ),
        Capacity::Fixed(_) => {}
        Capacity::Range(CapacityRange { min, max }) => {
            if min == 0 {
                report.push(
                    || locate(text, "min", "0", at),
                    "capacity.min must be at least 1".into(),
                );
            }
            if min > max {
                report.push(
                    || locate(text, "capacity", "", at),
                    format!("capacity.min {min} is more than capacity.max {max}"),
                );
            }
            if max > MAX_CAPACITY {
                report.push(
                    || locate(text, "max", &max.to_string(), at),
                    format!("capacity.max {max} is over the limit of {MAX_CAPACITY}"),
                );
            }
        }
    }
    for (key, value) in [("maxSurge", policy.max_surge), ("maxUnavailable", policy.max_unavailable)]
    {
        if let IntOrPercent::Percent(p) = value {
            if p > 100 {
                report.push(
                    || locate(text, key, &format!("{p}%"), at),
                    format!("{key} {p}% is over 100%"),
                );
            }
        }
    }
    if policy.health_check.healthy_threshold == 0 {
        report.push(
            || locate(text, "healthyThreshold", "0", at),
            "healthyThreshold must be at least 1".into(),
        );
    }
    if !policy.health_check.http.starts_with('/') {
        report.push(
            || locate(text, "http", &policy.health_check.http, at),
            format!(
                "healthCheck.http `{}` must be a path starting with `/`",
                policy.health_check.http
            ),
        );
    }
    if let Some(canary) = &policy.canary {
        if canary.count == 0 || canary.count > policy.capacity.min() {
            report.push(
                || locate(text, "count", &canary.count.to_string(), at),
                format!(
                    "canary.count {} must be between 1 and capacity {}",
                    canary.count,
                    policy.capacity.min()
                ),
            );
        }
        if let Some(weight) = canary.weight {
            if !(1..=99).contains(&weight) {
                report.push(
                    || locate(text, "weight", &format!("{weight}%"), at),
                    format!("canary.weight {weight}% must be between 1% and 99%"),
                );
            }
        }
    }
    if let Some(lb) = policy.provider.load_balancer() {
        if let Some(gray) = lb.gray_port {
            if gray == 0 || gray == lb.port {
                report.push(
                    || locate(text, "grayPort", &gray.to_string(), at),
                    format!(
                        "loadBalancer.grayPort {gray} must be a port of its own (not 0, not `port`)"
                    ),
                );
            }
        }
    }
    if let Some(window) = policy.schedule.as_ref().and_then(|s| s.window.as_ref()) {
        if window.bounds().is_none() {
            report.push(
                || locate(text, "window", "", at),
                format!("schedule.window `{}`-`{}` must be HH:MM times", window.start, window.end),
            );
        }
    }
    match &policy.provider {
        ProviderSpec::Exec(exec) => {
            for (op, path) in exec.scripts() {
                check_hook(report, text, at, files, op, path);
            }
            if exec.env.len() > MAX_EXEC_ENV {
                report.push(
                    || locate(text, "env", "", at),
                    format!(
                        "exec.env has {} entries, over the limit of {MAX_EXEC_ENV} (MAX_EXEC_ENV)",
                        exec.env.len()
                    ),
                );
            } else {
                check_exec_settings(report, text, at, files, exec);
            }
        }
        ProviderSpec::Local { load_balancer } => {
            let port = load_balancer.port;
            if port != 0 && !lb_ports.insert(port) {
                report.push(
                    || locate(text, "port", &port.to_string(), at),
                    format!("loadBalancer.port {port} is used by two fleets"),
                );
            }
        }
    }
}

/// `exec.env` against the settings the provider's scripts declare they read (the
/// [`SETTINGS_FILE`] in each directory holding one of its scripts): every setting given must be
/// declared, every required one given. A provider declaring nothing is not checked.
fn check_exec_settings(
    report: &mut Report<'_>,
    text: &Text<'_>,
    at: usize,
    files: &Memo<'_>,
    exec: &ExecProvider,
) {
    let dirs: BTreeSet<&str> = exec
        .scripts()
        .map(|(_, path)| path.trim_start_matches("./"))
        .filter(|path| !path.is_empty() && is_repo_path(path))
        .map(|path| path.rsplit_once('/').map_or("", |(dir, _)| dir))
        .collect();
    // Declared settings by variable name: (name as declared, declaring file, declaration).
    let mut declared: BTreeMap<String, (String, String, SettingDecl)> = BTreeMap::new();
    let mut found = Vec::new();
    for dir in dirs {
        let Some(settings) = files.settings(report, dir) else { continue };
        let path = if dir.is_empty() {
            SETTINGS_FILE.to_owned()
        } else {
            format!("{dir}/{SETTINGS_FILE}")
        };
        for (name, decl) in &settings.settings {
            declared
                .entry(setting_env_name(name))
                .or_insert_with(|| (name.clone(), path.clone(), decl.clone()));
        }
        found.push(path);
    }
    if found.is_empty() {
        return;
    }
    let declaring = found.join(", ");
    let given: HashSet<String> = exec.env.keys().map(|k| setting_env_name(k)).collect();
    for key in exec.env.keys() {
        if !declared.contains_key(&setting_env_name(key)) {
            let names: Vec<&str> = declared.values().map(|(name, ..)| name.as_str()).collect();
            report.push(
                || locate(text, key, "", at),
                format!(
                    "exec.env setting `{key}` is not read by the provider's scripts \
                     ({declaring} declares: {})",
                    names.join(", ")
                ),
            );
        }
    }
    for (var, (name, path, decl)) in &declared {
        if decl.required && !given.contains(var) {
            let what = decl.description.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            report.push(
                || match locate(text, "env", "", at) {
                    (0, _) => locate(text, "exec", "", at),
                    found => found,
                },
                format!("exec.env lacks setting `{name}`, which {path} requires{what}"),
            );
        }
    }
}

/// A `path:` or `paths:` value must stay inside the repo.
fn check_repo_path(report: &mut Report<'_>, text: &Text<'_>, at: usize, key: &str, path: &str) {
    if !is_repo_path(path) {
        let locate_it = || match key {
            "paths" => text::locate_item(text, key, path, at),
            _ => locate(text, key, path, at),
        };
        report.push(
            locate_it,
            format!(
                "{key} `{path}` must be a relative path inside the repo (no leading `/`, no `..`)"
            ),
        );
    }
}

fn has_cycle(fleet: &Fleet) -> bool {
    fleet.image.stages.iter().any(|start| {
        let mut seen = BTreeSet::new();
        let mut current = Some(start);
        while let Some(stage) = current {
            if !seen.insert(&stage.name) {
                return true;
            }
            current =
                stage.from.as_ref().and_then(|p| fleet.image.stages.iter().find(|s| &s.name == p));
        }
        false
    })
}

fn check_hook(
    report: &mut Report<'_>,
    text: &Text<'_>,
    at: usize,
    files: &Memo<'_>,
    key: &str,
    path: &str,
) {
    let clean = path.trim_start_matches("./");
    let here = || locate(text, key, path, at);
    if clean.is_empty() || !is_repo_path(clean) {
        report.push(here, format!("{key} hook `{path}` must be a relative path inside the repo"));
        return;
    }
    if files.symlink(clean) {
        report.push(
            here,
            format!(
                "{key} hook `{path}` is a symbolic link (or lies under one); hooks must be \
                 regular files in the repo"
            ),
        );
        return;
    }
    match files.file(clean) {
        None => report
            .push(here, format!("{key} hook `{path}` does not exist in {}", files.files.place())),
        Some(false) => {
            let fix = if files.files.place() == "the commit" {
                "chmod +x and commit"
            } else {
                "chmod +x"
            };
            report.push(here, format!("{key} hook `{path}` is not executable ({fix})"))
        }
        Some(true) => {}
    }
}

/// The JSON Schema of `kiln.yaml` (`kiln schema`), for editors' YAML language servers.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Manifest);
    let mut value = serde_json::to_value(&schema).unwrap_or(serde_json::Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert("title".into(), "kiln.yaml".into());
        object.insert(
            "description".into(),
            "The kiln manifest: fleets, their image stages, infra and rollout policy.".into(),
        );
    }
    value
}

/// The manifest as pretty JSON (for records and `kiln show`).
pub fn to_json(manifest: &Manifest) -> serde_json::Value {
    serde_json::to_value(manifest).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests;
