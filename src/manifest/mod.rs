//! `kiln.yaml`: the manifest at the root of the watched repo.
//!
//! Two stages, as ripgrep does with its flags: serde types mirror the YAML (`deny_unknown_fields`
//! so a typo fails loudly, with the line and column serde_yaml reports), then [`validate`]
//! checks what serde cannot see (stage references, hook files present in the commit) and
//! reports each problem with the file, line and column it found it at. This module is the only
//! one that imports `serde_yaml`, so swapping the YAML crate touches one file.

mod duration;

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use duration::{format_duration, parse_duration};

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
}

/// A group of identical instances behind one load balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Unique name (`[a-z0-9-]`).
    pub name: String,
    /// Path prefixes whose changes concern this fleet; empty means the image and infra paths.
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
}

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
    /// Unique within the fleet.
    pub name: String,
    /// The directory whose git tree id is the stage's cache input.
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

/// Which provider runs the instances.
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

/// How instances are replaced. Defaults follow Kubernetes Deployments and AWS instance refresh
/// (see the README's policy table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RolloutPolicy {
    /// Where instances run.
    pub provider: ProviderKind,
    /// Settings of the exec provider.
    pub exec: Option<ExecProvider>,
    /// Instances the fleet keeps running.
    pub capacity: u32,
    /// Extra instances allowed above capacity during a rollout (default 25%, rounded up).
    pub max_surge: IntOrPercent,
    /// Instances allowed below capacity during a rollout (default 0, rounded down).
    pub max_unavailable: IntOrPercent,
    /// How a new instance is judged healthy.
    pub health_check: HealthCheck,
    /// How long an instance must stay healthy before it takes traffic (default 0s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub min_healthy: Duration,
    /// How long an old instance keeps finishing requests after leaving the LB (default 5s).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub drain: Duration,
    /// A rollout making no progress this long fails (default 10m).
    #[serde(with = "duration::serde_duration")]
    #[schemars(with = "String")]
    pub progress_deadline: Duration,
    /// Replace a few instances first and wait.
    pub canary: Option<Canary>,
    /// When rollouts may start.
    pub schedule: Option<Schedule>,
    /// What happens when new instances fail.
    pub on_failure: OnFailure,
    /// The local provider's load balancer.
    pub load_balancer: LoadBalancer,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            provider: ProviderKind::Local,
            exec: None,
            capacity: 1,
            max_surge: IntOrPercent::Percent(25),
            max_unavailable: IntOrPercent::Count(0),
            health_check: HealthCheck::default(),
            min_healthy: Duration::ZERO,
            drain: Duration::from_secs(5),
            progress_deadline: Duration::from_secs(600),
            canary: None,
            schedule: None,
            on_failure: OnFailure::Rollback,
            load_balancer: LoadBalancer::default(),
        }
    }
}

impl RolloutPolicy {
    /// maxSurge as a count (at least 1 when maxUnavailable is 0, so a rollout can progress).
    pub fn surge(&self) -> u32 {
        let surge = self.max_surge.resolve(self.capacity, true);
        if surge == 0 && self.unavailable() == 0 { 1 } else { surge }
    }

    /// maxUnavailable as a count.
    pub fn unavailable(&self) -> u32 {
        self.max_unavailable.resolve(self.capacity, false).min(self.capacity)
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

/// Canary: the first `count` replacements, then a pause (or a manual promote).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Canary {
    /// Instances in the canary batch.
    pub count: u32,
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
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer { port: 8080 }
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
    /// `None` if missing, `Some(executable)` otherwise.
    fn file(&self, path: &str) -> Option<bool>;
}

/// A checkout on disk (`kiln validate PATH`).
pub struct DirFiles<'a>(pub &'a std::path::Path);

impl RepoFiles for DirFiles<'_> {
    fn file(&self, path: &str) -> Option<bool> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(self.0.join(path)).ok()?;
        Some(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    }
}

/// Parses and validates manifest text. `file` names it in errors.
pub fn load(text: &str, file: &str, files: &dyn RepoFiles) -> Result<Manifest, ManifestError> {
    let manifest = parse(text, file)?;
    validate(&manifest, text, file, files)?;
    Ok(manifest)
}

/// Parses without checking files (syntax and field-level errors only).
pub fn parse(text: &str, file: &str) -> Result<Manifest, ManifestError> {
    serde_yaml::from_str::<Manifest>(text).map_err(|error| {
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
            .and_then(|value| locate_value(text, value, line))
            .unwrap_or((line, column));
        ManifestError { problems: vec![Problem { file: file.to_owned(), line, column, message }] }
    })
}

/// The first `backticked` part of a message.
fn quoted_value(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(&message[start..end]).filter(|v| !v.is_empty())
}

/// The first place at or after `from_line` where `value` follows a `key:` on the line.
fn locate_value(text: &str, value: &str, from_line: usize) -> Option<(usize, usize)> {
    text.lines().enumerate().skip(from_line.saturating_sub(1)).find_map(|(i, line)| {
        let pos = line.find(value)?;
        line[..pos].contains(':').then_some((i + 1, pos + 1))
    })
}

/// Finds where `key: value` (or `- value` under key) sits in the text, for errors on values that
/// parsed fine but mean something wrong. Searches from `after_line` on (1-based).
fn locate(text: &str, key: &str, value: &str, after_line: usize) -> (usize, usize) {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate().skip(after_line.saturating_sub(1)) {
        if let Some(kpos) = line.find(&format!("{key}:")) {
            let rest = &line[kpos..];
            if let Some(vpos) = rest.find(value) {
                return (i + 1, kpos + vpos + 1);
            }
            if value.is_empty() {
                return (i + 1, kpos + 1);
            }
        }
    }
    (0, 0)
}

fn line_of_fleet(text: &str, name: &str) -> usize {
    locate(text, "name", name, 1).0.max(1)
}

/// Semantic checks serde cannot do. Every problem is reported, not just the first.
pub fn validate(
    manifest: &Manifest,
    text: &str,
    file: &str,
    files: &dyn RepoFiles,
) -> Result<(), ManifestError> {
    let mut problems = Vec::new();
    let mut push = |(line, column): (usize, usize), message: String| {
        problems.push(Problem { file: file.to_owned(), line, column, message });
    };
    if manifest.fleets.is_empty() {
        push(locate(text, "fleets", "", 1), "no fleets defined".into());
    }
    let mut fleet_names = BTreeSet::new();
    let mut lb_ports = BTreeSet::new();
    for fleet in &manifest.fleets {
        let at = line_of_fleet(text, &fleet.name);
        if !fleet_names.insert(fleet.name.as_str()) {
            push(
                locate(text, "name", &fleet.name, at),
                format!("duplicate fleet `{}`", fleet.name),
            );
        }
        let valid_name = !fleet.name.is_empty()
            && fleet.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_name {
            push(
                locate(text, "name", &fleet.name, at),
                format!("fleet name `{}` must be lowercase letters, digits and `-`", fleet.name),
            );
        }
        let stage_names: BTreeSet<&str> =
            fleet.image.stages.iter().map(|s| s.name.as_str()).collect();
        if fleet.image.stages.is_empty() {
            push(locate(text, "stages", "", at), format!("fleet `{}` has no stages", fleet.name));
        }
        if stage_names.len() != fleet.image.stages.len() {
            push(
                locate(text, "stages", "", at),
                format!("fleet `{}` has duplicate stage names", fleet.name),
            );
        }
        for stage in &fleet.image.stages {
            if let Some(parent) = &stage.from {
                if !stage_names.contains(parent.as_str()) {
                    push(
                        locate(text, "from", parent, at),
                        format!(
                            "stage `{}` is built from `{parent}`, which is not a stage of fleet `{}`",
                            stage.name, fleet.name
                        ),
                    );
                } else if parent == &stage.name {
                    push(
                        locate(text, "from", parent, at),
                        format!("stage `{}` is built from itself", stage.name),
                    );
                }
            }
            check_hook(&mut push, text, at, files, "bake", &stage.bake);
        }
        if has_cycle(fleet) {
            push(
                locate(text, "stages", "", at),
                format!("stages of fleet `{}` form a cycle", fleet.name),
            );
        }
        if let Some(infra) = &fleet.infra {
            check_hook(&mut push, text, at, files, "reconcile", &infra.reconcile);
        }
        let policy = &fleet.rollout;
        if policy.capacity == 0 {
            push(locate(text, "capacity", "0", at), "capacity must be at least 1".into());
        }
        for (key, value) in
            [("maxSurge", policy.max_surge), ("maxUnavailable", policy.max_unavailable)]
        {
            if let IntOrPercent::Percent(p) = value {
                if p > 100 {
                    push(
                        locate(text, key, &format!("{p}%"), at),
                        format!("{key} {p}% is over 100%"),
                    );
                }
            }
        }
        if policy.health_check.healthy_threshold == 0 {
            push(
                locate(text, "healthyThreshold", "0", at),
                "healthyThreshold must be at least 1".into(),
            );
        }
        if !policy.health_check.http.starts_with('/') {
            push(
                locate(text, "http", &policy.health_check.http, at),
                format!(
                    "healthCheck.http `{}` must be a path starting with `/`",
                    policy.health_check.http
                ),
            );
        }
        if let Some(canary) = &policy.canary {
            if canary.count == 0 || canary.count > policy.capacity {
                push(
                    locate(text, "count", &canary.count.to_string(), at),
                    format!(
                        "canary.count {} must be between 1 and capacity {}",
                        canary.count, policy.capacity
                    ),
                );
            }
        }
        if let Some(window) = policy.schedule.as_ref().and_then(|s| s.window.as_ref()) {
            if window.bounds().is_none() {
                push(
                    locate(text, "window", "", at),
                    format!(
                        "schedule.window `{}`-`{}` must be HH:MM times",
                        window.start, window.end
                    ),
                );
            }
        }
        match (policy.provider, &policy.exec) {
            (ProviderKind::Exec, None) => push(
                locate(text, "provider", "exec", at),
                "provider `exec` needs an `exec:` section".into(),
            ),
            (ProviderKind::Exec, Some(exec)) => {
                for (op, path) in [
                    ("list", &exec.list),
                    ("launch", &exec.launch),
                    ("attach", &exec.attach),
                    ("detach", &exec.detach),
                    ("terminate", &exec.terminate),
                ] {
                    check_hook(&mut push, text, at, files, op, path);
                }
                if let Some(health) = &exec.health {
                    check_hook(&mut push, text, at, files, "health", health);
                }
            }
            (ProviderKind::Local, _) => {
                let port = policy.load_balancer.port;
                if port != 0 && !lb_ports.insert(port) {
                    push(
                        locate(text, "port", &port.to_string(), at),
                        format!("loadBalancer.port {port} is used by two fleets"),
                    );
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort_by_key(|p| (p.line, p.column));
        Err(ManifestError { problems })
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
    push: &mut impl FnMut((usize, usize), String),
    text: &str,
    at: usize,
    files: &dyn RepoFiles,
    key: &str,
    path: &str,
) {
    let clean = path.trim_start_matches("./");
    if clean.starts_with('/') || clean.split('/').any(|part| part == "..") {
        push(
            locate(text, key, path, at),
            format!("{key} hook `{path}` must be a relative path inside the repo"),
        );
        return;
    }
    match files.file(clean) {
        None => push(
            locate(text, key, path, at),
            format!("{key} hook `{path}` does not exist in the commit"),
        ),
        Some(false) => push(
            locate(text, key, path, at),
            format!("{key} hook `{path}` is not executable (chmod +x and commit)"),
        ),
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
