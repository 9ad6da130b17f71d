//! The local provider: instances are processes started from a baked directory image, fronted by
//! a load balancer process of kiln's own. Both outlive the daemon, as servers outlive a control
//! plane; on restart kiln re-adopts them by pid and start time.
//!
//! Layout of `<dir>` (one fleet):
//!
//! ```text
//! lb/port              the LB's traffic port, stable across restarts when `lb_port` is 0
//! lb/admin-token       the bearer token of the LB's admin endpoint (mode 0600)
//! lb/lb.json           the running LB: pid, start ticks, ports (written by the LB)
//! lb/backends.json     the attached set (written by the LB)
//! lb/log               the LB's output
//! instances/<id>/instance.json   one instance: image, launch key, port, state, process
//! instances/<id>/log             its output
//! instances/<id>/work/           its working directory
//! ```
//!
//! `instance.json` is written atomically (tmp + rename) before the process is spawned (state
//! `launching`, with the port) and again after (state `running`, with the process). Every
//! instance process carries `KILN_INSTANCE_DIR=<canonical instance dir>` in its environment, so a
//! `kill -9` of the daemon at any point leaves nothing kiln cannot find again:
//!
//! - a `launching` record whose process did start (the daemon died before recording it) is
//!   *adopted*: `open`, `launch` and `terminate` find the process by that variable in
//!   `/proc/*/environ` (same user) and record it `running`; it is never started twice;
//! - a `launching` record with no process is not an instance yet: `list` leaves it out, and a
//!   `launch` with the same key starts it (a second launch never starts a second process);
//! - at `open`, an instance process whose record is terminated or missing is killed;
//! - `terminate` also kills every process that still carries the instance's variable.

pub mod lb;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hooks::process::{self, ProcessRef};
use crate::model::{ImageRef, InstanceId, Timestamp};
use crate::provider::{ForeignBackend, Instance, Provider, ProviderError};

/// How long an instance gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a freshly spawned load balancer gets to write its state and answer.
const LB_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin calls other than a drain answer at once on localhost; this only bounds a wedged LB.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one fleet's local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The fleet.
    pub fleet: String,
    /// Where instances' state, work dirs and logs live (`<data-dir>/fleets/<fleet>`).
    pub dir: PathBuf,
    /// The load balancer's listening port on 127.0.0.1 (0 = pick one, remembered in `dir`).
    pub lb_port: u16,
    /// The kiln executable (started as `kiln lb ...` for the load balancer process).
    pub kiln_exe: PathBuf,
}

/// The local provider for one fleet.
#[derive(Debug)]
pub struct LocalProvider {
    config: LocalConfig,
    /// The LB's traffic port, resolved from `config.lb_port` or the remembered one.
    lb_port: u16,
    /// PATH, HOME and LANG: the only parts of the daemon's environment children see.
    base_env: Vec<(String, String)>,
    http: reqwest::Client,
    /// Bearer token of the LB's admin endpoint (`lb/admin-token`).
    admin_token: String,
    /// Serialises launch and terminate within this process, so two launches with one key
    /// cannot both miss the other's record.
    lock: tokio::sync::Mutex<()>,
    /// Backends kiln did not attach, removed since the last [`Provider::foreign_backends`]
    /// (oldest first, at most [`MAX_FOREIGN`]): removed on sight, remembered for the drift report.
    foreign: std::sync::Mutex<Vec<ForeignBackend>>,
    /// Where instance ports come from (`kiln run --instance-ports`); `None`: any free port.
    instance_ports: Option<PortRange>,
}

/// A range of TCP ports on 127.0.0.1 (`20000-20999`, both ends included) that instances of the
/// local provider listen on, so a firewall or a shared host can expect them there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The lowest port.
    pub low: u16,
    /// The highest port.
    pub high: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a port range like 20000-20999");
        let (low, high) = text.split_once('-').ok_or_else(bad)?;
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || low > high {
            return Err(format!("`{text}`: the range must be LOW-HIGH with 1 <= LOW <= HIGH"));
        }
        Ok(PortRange { low, high })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

/// A port of `range` free on 127.0.0.1 now, tried from a random start so concurrent launches
/// rarely race for one; any free port when `range` is `None`.
fn pick_port(range: Option<PortRange>) -> std::io::Result<u16> {
    let Some(range) = range else { return free_port() };
    let size = u32::from(range.high - range.low) + 1;
    let start = fastrand::u32(0..size);
    for i in 0..size {
        let port = u32::from(range.low) + (start + i) % size;
        let port = u16::try_from(port).map_err(std::io::Error::other)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("every port of {range} is in use"),
    ))
}

/// How many removed foreign backends are remembered until a drift check reads them.
const MAX_FOREIGN: usize = 64;

/// Lifecycle of an instance record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordState {
    /// Written before spawning; no process yet (or the daemon died before recording it).
    Launching,
    /// Spawned; `process` names it.
    Running,
    /// Stopped for good; kept for its log, hidden from `list`.
    Terminated,
}

/// `instances/<id>/instance.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceRecord {
    id: String,
    image: String,
    key: String,
    port: u16,
    state: RecordState,
    process: Option<ProcessRef>,
    launched_at: Timestamp,
}

/// The environment variable naming an instance's (canonical) directory in every process it runs:
/// how kiln finds an instance whose launch a crash interrupted.
pub const INSTANCE_MARKER: &str = "KILN_INSTANCE_DIR";

/// Writes `value` as JSON to `path` atomically: a reader (or a crash) sees the old file or the
/// new one, never half of either.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write as _;
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// This process's pid: an LB served in-process (tests) must never be signalled.
fn own_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(-1)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl LocalProvider {
    /// Serves the load balancer's gray listener on `port` (none: closes it). A port that cannot
    /// be bound is an error naming it; the traffic port keeps serving.
    pub async fn set_gray_port(&self, port: Option<u16>) -> Result<(), ProviderError> {
        const OP: &str = "set the gray port";
        let state = self.ensure_lb(false).await?;
        if state.gray_port == port {
            return Ok(());
        }
        let url = format!("http://127.0.0.1:{}/gray", state.admin_port);
        let reply = self
            .admin_request(reqwest::Method::PUT, url)
            .json(&lb::GrayRequest { port })
            .timeout(ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient(OP, format!("load balancer unreachable: {e}")))?;
        check_status(OP, reply).await?;
        tracing::info!(fleet = %self.config.fleet, ?port, "Gray port set.");
        Ok(())
    }

    /// Instances launched from now on listen on a port of `range` (`None`: any free port).
    pub fn with_instance_ports(mut self, range: Option<PortRange>) -> Self {
        self.instance_ports = range;
        self
    }

    /// Opens the fleet's state under `config.dir`, re-adopting live instances and starting the
    /// load balancer process if it is not running.
    pub async fn open(config: LocalConfig) -> Result<LocalProvider, ProviderError> {
        let lb_dir = config.dir.join("lb");
        for dir in [&lb_dir, &config.dir.join("instances")] {
            std::fs::create_dir_all(dir)
                .map_err(|e| failed("open", format!("cannot create {}: {e}", dir.display())))?;
        }
        let lb_port = match config.lb_port {
            // A running LB's port wins over a fresh pick when the remembered one is lost.
            0 => remembered_port(
                &lb_dir,
                lb::read_state(&lb_dir).filter(|s| s.process.alive()).map(|s| s.port),
            )?,
            port => port,
        };
        let base_env = vec![
            (
                "PATH".to_owned(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ),
            (
                "HOME".to_owned(),
                std::env::var("HOME").unwrap_or_else(|_| config.dir.display().to_string()),
            ),
            ("LANG".to_owned(), std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".to_owned())),
        ];
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| failed("open", format!("cannot build an HTTP client: {e}")))?;
        let admin_token = lb::ensure_admin_token(&lb_dir).map_err(|e| {
            failed(
                "open",
                format!("cannot read or create {}: {e}", lb_dir.join(lb::TOKEN_FILE).display()),
            )
        })?;
        let provider = LocalProvider {
            config,
            lb_port,
            base_env,
            http,
            admin_token,
            lock: tokio::sync::Mutex::new(()),
            foreign: std::sync::Mutex::new(Vec::new()),
            instance_ports: None,
        };
        let state = provider.ensure_lb(true).await?;
        if state.port != provider.lb_port {
            provider.move_listener(&state).await?;
        }
        // Instances launched before a crash are adopted (or killed when unknown) first, so the
        // backend reconcile below knows every live instance.
        provider.sweep_instances();
        // Whatever the LB serves that is not one of this fleet's instances goes.
        provider.backends().await?;
        Ok(provider)
    }

    /// An admin request to the running LB, with the bearer token.
    fn admin_request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.admin_token)
    }

    /// Moves the running LB's traffic listener to `self.lb_port` (a config change): it binds
    /// the new port before closing the old one, so a busy port leaves the fleet serving where
    /// it was, and the error names the port.
    async fn move_listener(&self, state: &lb::LbState) -> Result<(), ProviderError> {
        const OP: &str = "move the load balancer";
        let url = format!("http://127.0.0.1:{}/listener", state.admin_port);
        let reply = self
            .admin_request(reqwest::Method::PUT, url)
            .json(&lb::ListenerRequest { port: self.lb_port })
            .timeout(ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient(OP, format!("load balancer unreachable: {e}")))?;
        let status = reply.status();
        if !status.is_success() {
            let body = reply.text().await.unwrap_or_default();
            return Err(failed(
                OP,
                format!("from port {} to port {}: {}", state.port, self.lb_port, body.trim()),
            ));
        }
        tracing::info!(fleet = %self.config.fleet, from = state.port, to = self.lb_port, "Load balancer moved to its new port.");
        Ok(())
    }

    fn lb_dir(&self) -> PathBuf {
        self.config.dir.join("lb")
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.config.dir.join("instances").join(id)
    }

    /// The running load balancer, started (or restarted) if it is not. With `probe`, a live
    /// process must also answer its admin endpoint to be adopted. A live LB serving another
    /// port is adopted as it is: moving it is a planned change ([`Self::move_listener`]), never
    /// a restart that would drop the fleet if the new port were busy.
    async fn ensure_lb(&self, probe: bool) -> Result<lb::LbState, ProviderError> {
        let dir = self.lb_dir();
        if let Some(mut state) = lb::read_state(&dir) {
            if !state.process.alive() && state.standby.is_some_and(|s| s.alive()) {
                // The serving process died and its standby is taking over: wait for it.
                let deadline = tokio::time::Instant::now() + LB_START_TIMEOUT;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    match lb::read_state(&dir) {
                        Some(now) if now.process.alive() => {
                            state = now;
                            break;
                        }
                        _ if !state.standby.is_some_and(|s| s.alive()) => break,
                        _ => {}
                    }
                }
            }
            if state.process.alive() && (!probe || self.admin_ok(&state).await) {
                return Ok(state);
            }
            if state.process.alive() && state.process.pid != own_pid() {
                // A wedged LB: it does not answer its admin endpoint.
                tracing::warn!(fleet = %self.config.fleet, pid = state.process.pid, "Replacing the load balancer.");
                process::stop(state.process, STOP_GRACE).await;
            }
            if let Some(standby) = state.standby {
                // Its sockets must go too, or the new LB could not bind the port.
                process::stop(standby, STOP_GRACE).await;
            }
        }
        let args = vec![
            "lb".to_owned(),
            "--state-dir".to_owned(),
            dir.display().to_string(),
            "--port".to_owned(),
            self.lb_port.to_string(),
        ];
        let mut env = self.base_env.clone();
        if let Ok(filter) = std::env::var("RUST_LOG") {
            env.push(("RUST_LOG".to_owned(), filter));
        }
        let log = dir.join("log");
        let spawned = process::spawn_detached(&self.config.kiln_exe, &args, &env, &dir, &log)
            .map_err(|e| {
                failed(
                    "start the load balancer",
                    format!("cannot run {}: {e}", self.config.kiln_exe.display()),
                )
            })?;
        let deadline = tokio::time::Instant::now() + LB_START_TIMEOUT;
        loop {
            if let Some(state) = lb::read_state(&dir) {
                if state.process == spawned && self.admin_ok(&state).await {
                    tracing::info!(fleet = %self.config.fleet, port = state.port, "Load balancer started.");
                    return Ok(state);
                }
            }
            if !spawned.alive() {
                return Err(failed(
                    "start the load balancer",
                    format!("`{} lb` exited: {}", self.config.kiln_exe.display(), log_tail(&log)),
                ));
            }
            if tokio::time::Instant::now() > deadline {
                process::stop(spawned, STOP_GRACE).await;
                return Err(transient(
                    "start the load balancer",
                    format!("it did not answer within {LB_START_TIMEOUT:?}: {}", log_tail(&log)),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin_ok(&self, state: &lb::LbState) -> bool {
        let url = format!("http://127.0.0.1:{}/healthz", state.admin_port);
        let request = self.admin_request(reqwest::Method::GET, url);
        match request.timeout(Duration::from_secs(2)).send().await {
            Ok(reply) => reply
                .json::<lb::LbState>()
                .await
                .is_ok_and(|answered| answered.process == state.process),
            Err(_) => false,
        }
    }

    async fn admin_url(&self) -> Result<String, ProviderError> {
        let state = self.ensure_lb(false).await?;
        Ok(format!("http://127.0.0.1:{}", state.admin_port))
    }

    /// The LB's backends, after removing every one that is not a live instance of this fleet
    /// at its recorded address (something else attached it, or a record was lost): the LB
    /// serves only what kiln launched.
    async fn backends(&self) -> Result<Vec<lb::BackendView>, ProviderError> {
        let attached = self.attached_backends().await?;
        // Records are read after the backends: an attach needs its record first, so a backend
        // attached by kiln is never mistaken for an unknown one.
        let known: Vec<(String, String)> = self
            .records()?
            .into_iter()
            .filter(|r| r.state != RecordState::Terminated)
            .map(|r| (r.id, format!("127.0.0.1:{}", r.port)))
            .collect();
        let mut kept = Vec::with_capacity(attached.len());
        for backend in attached {
            if known.iter().any(|(id, address)| *id == backend.id && *address == backend.address) {
                kept.push(backend);
                continue;
            }
            tracing::warn!(fleet = %self.config.fleet, backend = %backend.id, address = %backend.address, "Removing a backend kiln did not attach.");
            self.remove_backend(&backend.id, Duration::ZERO, "list").await?;
            if let Ok(mut foreign) = self.foreign.lock() {
                if foreign.len() >= MAX_FOREIGN {
                    foreign.remove(0);
                }
                foreign.push(ForeignBackend {
                    id: backend.id.clone(),
                    address: backend.address.clone(),
                    seen_at: crate::model::now(),
                    removed: true,
                });
            }
        }
        Ok(kept)
    }

    async fn attached_backends(&self) -> Result<Vec<lb::BackendView>, ProviderError> {
        let url = format!("{}/backends", self.admin_url().await?);
        let reply = self
            .admin_request(reqwest::Method::GET, url)
            .timeout(ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient("list", format!("load balancer unreachable: {e}")))?;
        let reply = check_status("list", reply).await?;
        reply.json().await.map_err(|e| failed("list", format!("load balancer answered junk: {e}")))
    }

    async fn remove_backend(
        &self,
        id: &str,
        drain: Duration,
        op: &'static str,
    ) -> Result<(), ProviderError> {
        let url = format!("{}/backends/{id}", self.admin_url().await?);
        let drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
        let reply = self
            .admin_request(reqwest::Method::DELETE, url)
            .query(&[("drain_ms", drain_ms)])
            .timeout(drain + ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient(op, format!("load balancer unreachable: {e}")))?;
        check_status(op, reply).await?;
        Ok(())
    }

    fn read_record(&self, id: &str) -> Option<InstanceRecord> {
        // Ids name directories: refuse anything that could step outside `instances/`.
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return None;
        }
        let text = std::fs::read(self.instance_dir(id).join("instance.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_record(&self, record: &InstanceRecord, op: &'static str) -> Result<(), ProviderError> {
        let path = self.instance_dir(&record.id).join("instance.json");
        write_json_atomic(&path, record)
            .map_err(|e| failed(op, format!("cannot write {}: {e}", path.display())))
    }

    fn records(&self) -> Result<Vec<InstanceRecord>, ProviderError> {
        let dir = self.config.dir.join("instances");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| failed("list", format!("cannot read {}: {e}", dir.display())))?;
        let mut records: Vec<InstanceRecord> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str().and_then(|id| self.read_record(id)))
            .collect();
        records.sort_by(|a, b| a.launched_at.cmp(&b.launched_at).then(a.id.cmp(&b.id)));
        Ok(records)
    }

    fn to_instance(&self, record: &InstanceRecord, attached: &[lb::BackendView]) -> Instance {
        let running =
            record.state == RecordState::Running && record.process.is_some_and(|p| p.alive());
        Instance {
            id: InstanceId(record.id.clone()),
            image: ImageRef(record.image.clone()),
            address: Some(format!("127.0.0.1:{}", record.port)),
            running,
            attached: attached.iter().any(|b| b.id == record.id && !b.draining),
            launched_at: Some(record.launched_at),
            launch_key: Some(record.key.clone()),
        }
    }

    /// `<dir>/instances`, canonical (the prefix of every instance marker).
    fn instances_root(&self) -> PathBuf {
        let dir = self.config.dir.join("instances");
        std::fs::canonicalize(&dir).unwrap_or(dir)
    }

    /// The [`INSTANCE_MARKER`] value of instance `id`.
    fn marker(&self, id: &str) -> String {
        self.instances_root().join(id).display().to_string()
    }

    /// Live processes carrying instance `id`'s marker.
    fn processes_of(&self, id: &str) -> Vec<process::Found> {
        let marker = self.marker(id);
        process::find_by_env(INSTANCE_MARKER, |value| value == marker)
    }

    /// Completes a `launching` record whose process started but was never recorded (the daemon
    /// died in between): the oldest group leader carrying its marker is recorded as its process
    /// and the record becomes `running`. Returns whether the record now names a live process.
    fn adopt(&self, record: &mut InstanceRecord) -> bool {
        if record.process.is_some_and(|p| p.alive()) {
            return true;
        }
        if record.state != RecordState::Launching {
            return false;
        }
        let mut leaders: Vec<process::Found> =
            self.processes_of(&record.id).into_iter().filter(|f| f.is_group_leader()).collect();
        leaders.sort_by_key(|f| f.process.start_ticks);
        let Some(found) = leaders.first() else { return false };
        record.process = Some(found.process);
        record.state = RecordState::Running;
        if let Err(error) = self.write_record(record, "launch") {
            // The process is adopted in memory; the next observation records it again.
            tracing::warn!(fleet = %self.config.fleet, instance = %record.id, error = %error, "Could not record an adopted instance.");
        }
        tracing::warn!(fleet = %self.config.fleet, instance = %record.id, pid = found.process.pid, "Adopted an instance whose launch was interrupted.");
        true
    }

    /// At open: adopts interrupted launches and kills instance processes kiln does not know
    /// (their record is terminated or missing). Returns how many processes were killed.
    fn sweep_instances(&self) -> usize {
        let root = format!("{}/", self.instances_root().display());
        let found = process::find_by_env(INSTANCE_MARKER, |value| value.starts_with(&root));
        let mut killed = 0;
        for f in &found {
            let id = &f.value[root.len()..];
            let mut record = self.read_record(id);
            let known = match record.as_mut() {
                Some(record) if record.state == RecordState::Launching => self.adopt(record),
                Some(record) => record.state == RecordState::Running,
                None => false,
            };
            if !known {
                tracing::warn!(fleet = %self.config.fleet, instance = %id, pid = f.process.pid, "Killing an instance process kiln does not know.");
                if f.is_group_leader() {
                    f.process.signal(nix::sys::signal::Signal::SIGKILL);
                } else {
                    f.process.signal_one(nix::sys::signal::Signal::SIGKILL);
                }
                killed += 1;
            }
        }
        killed
    }

    /// Spawns the record's process and records it. The record is `launching` on disk first.
    fn spawn(&self, record: &mut InstanceRecord) -> Result<(), ProviderError> {
        let image_dir = Path::new(&record.image);
        let dir = self.instance_dir(&record.id);
        let workdir = dir.join("work");
        std::fs::create_dir_all(&workdir)
            .map_err(|e| failed("launch", format!("cannot create {}: {e}", workdir.display())))?;
        record.port = pick_port(self.instance_ports)
            .map_err(|e| transient("launch", format!("no free port: {e}")))?;
        record.state = RecordState::Launching;
        record.process = None;
        self.write_record(record, "launch")?;
        let mut env = self.base_env.clone();
        env.extend([
            ("PORT".to_owned(), record.port.to_string()),
            ("KILN_INSTANCE_ID".to_owned(), record.id.clone()),
            ("KILN_IMAGE".to_owned(), record.image.clone()),
            ("KILN_FLEET".to_owned(), self.config.fleet.clone()),
            (INSTANCE_MARKER.to_owned(), self.marker(&record.id)),
        ]);
        let spawned =
            process::spawn_detached(&image_dir.join("run"), &[], &env, &workdir, &dir.join("log"))
                .map_err(|e| failed("launch", format!("cannot run {}/run: {e}", record.image)))?;
        if process::fault_injected("launch-after-spawn") {
            // Test-only: die exactly where a `kill -9` orphaned instances (started, unrecorded).
            tracing::error!(instance = %record.id, "KILN_FAULT=launch-after-spawn: aborting.");
            std::process::abort();
        }
        record.process = Some(spawned);
        record.state = RecordState::Running;
        self.write_record(record, "launch")?;
        tracing::info!(fleet = %self.config.fleet, instance = %record.id, image = %record.image, port = record.port, "Instance launched.");
        Ok(())
    }

    /// Stops the load balancer process (for tests and for removing a fleet). Attached backends
    /// stay recorded, so the next [`LocalProvider::open`] serves them again.
    pub async fn stop_load_balancer(&self) {
        if let Some(state) = lb::read_state(&self.lb_dir()) {
            if state.process.pid != own_pid() {
                process::stop(state.process, STOP_GRACE).await;
            }
            // A graceful stop tells the standby to quit; this covers a killed LB's standby.
            if let Some(standby) = state.standby.filter(|s| s.pid != own_pid()) {
                process::stop(standby, STOP_GRACE).await;
            }
        }
    }

    /// The load balancer's admin endpoint (`http://127.0.0.1:<port>`), starting the LB if needed.
    pub async fn admin_endpoint(&self) -> Result<String, ProviderError> {
        self.admin_url().await
    }

    /// The bearer token of the admin endpoint.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

/// The LB port remembered in `lb_dir/port`, else `running` (the live LB's), else a newly
/// picked free one (then remembered).
fn remembered_port(lb_dir: &Path, running: Option<u16>) -> Result<u16, ProviderError> {
    let path = lb_dir.join("port");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(port) = text.trim().parse::<u16>() {
            if port != 0 {
                return Ok(port);
            }
        }
    }
    let port = match running {
        Some(port) => port,
        None => free_port().map_err(|e| transient("open", format!("no free port: {e}")))?,
    };
    write_json_atomic(&path, &port)
        .map_err(|e| failed("open", format!("cannot write {}: {e}", path.display())))?;
    Ok(port)
}

fn failed(op: &'static str, message: String) -> ProviderError {
    ProviderError::Failed { provider: "local", op, message }
}

fn transient(op: &'static str, message: String) -> ProviderError {
    ProviderError::Transient { provider: "local", op, message }
}

async fn check_status(
    op: &'static str,
    reply: reqwest::Response,
) -> Result<reqwest::Response, ProviderError> {
    let status = reply.status();
    if status.is_success() {
        return Ok(reply);
    }
    let body = reply.text().await.unwrap_or_default();
    let message = format!("load balancer answered {status}: {}", body.trim());
    if status.is_server_error() { Err(transient(op, message)) } else { Err(failed(op, message)) }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn retire(&self) -> Result<(), ProviderError> {
        self.stop_load_balancer().await;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let backends = self.backends().await?;
        // A `launching` record is not an instance (yet): an interrupted launch whose process
        // runs was adopted at `open`, and one that never started is started by a launch with
        // its key.
        Ok(self
            .records()?
            .iter()
            .filter(|r| r.state == RecordState::Running)
            .map(|r| self.to_instance(r, &backends))
            .collect())
    }

    async fn launch(&self, image: &ImageRef, key: &str) -> Result<Instance, ProviderError> {
        let _guard = self.lock.lock().await;
        let image_dir = Path::new(image.as_str());
        if !image_dir.is_absolute() {
            return Err(failed(
                "launch",
                format!("image `{image}` is not an absolute directory path"),
            ));
        }
        let run = image_dir.join("run");
        let executable = std::fs::metadata(&run).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt as _;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        });
        if !executable {
            return Err(failed("launch", format!("image `{image}` has no executable `run`")));
        }
        let backends = self.backends().await?;
        if let Some(mut record) = self.records()?.into_iter().find(|r| r.key == key) {
            // A launch interrupted before its process was recorded is adopted if the process
            // started, and completed if it did not; never repeated.
            if record.state == RecordState::Launching && !self.adopt(&mut record) {
                self.spawn(&mut record)?;
            }
            return Ok(self.to_instance(&record, &backends));
        }
        let instances = self.config.dir.join("instances");
        let id = loop {
            let id = format!("{}-{:08x}", self.config.fleet, fastrand::u32(..));
            match std::fs::create_dir(instances.join(&id)) {
                Ok(()) => break id,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(failed(
                        "launch",
                        format!("cannot create {}: {e}", instances.display()),
                    ));
                }
            }
        };
        let mut record = InstanceRecord {
            id,
            image: image.to_string(),
            key: key.to_owned(),
            port: 0,
            state: RecordState::Launching,
            process: None,
            launched_at: crate::model::now(),
        };
        self.spawn(&mut record)?;
        Ok(self.to_instance(&record, &backends))
    }

    async fn attach(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let record = self
            .read_record(id.as_str())
            .filter(|r| r.state != RecordState::Terminated)
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        let url = format!("{}/backends/{id}", self.admin_url().await?);
        let body = lb::AttachRequest {
            address: format!("127.0.0.1:{}", record.port),
            weight: None,
            image: Some(record.image.clone()),
        };
        let reply = self
            .admin_request(reqwest::Method::PUT, url)
            .json(&body)
            .timeout(ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient("attach", format!("load balancer unreachable: {e}")))?;
        check_status("attach", reply).await?;
        Ok(())
    }

    async fn detach(&self, id: &InstanceId, drain: Duration) -> Result<(), ProviderError> {
        self.remove_backend(id.as_str(), drain, "detach").await
    }

    async fn terminate(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let _guard = self.lock.lock().await;
        let Some(mut record) = self.read_record(id.as_str()) else {
            return Ok(());
        };
        if record.state == RecordState::Terminated {
            return Ok(());
        }
        // Out of the LB before the process goes, so no request is routed to a dying backend.
        self.remove_backend(id.as_str(), Duration::ZERO, "terminate").await?;
        // A launch interrupted before its process was recorded may still have one: find it.
        self.adopt(&mut record);
        if let Some(process) = record.process {
            process::stop(process, STOP_GRACE).await;
            process::kill_orphaned_group(process);
        }
        // Whatever still carries the instance's marker (children that left its group) goes too.
        let marker = self.marker(&record.id);
        process::kill_by_env(INSTANCE_MARKER, |value| value == marker);
        record.state = RecordState::Terminated;
        self.write_record(&record, "terminate")?;
        tracing::info!(fleet = %self.config.fleet, instance = %id, "Instance terminated.");
        Ok(())
    }

    async fn route(&self, route: Option<&crate::provider::Route>) -> Result<(), ProviderError> {
        const OP: &str = "route traffic";
        let url = format!("{}/route", self.admin_url().await?);
        let request = match route {
            Some(route) => self
                .admin_request(reqwest::Method::PUT, url)
                .json(&lb::RouteRequest { image: route.image.to_string(), percent: route.percent }),
            None => self.admin_request(reqwest::Method::DELETE, url),
        };
        let reply = request
            .timeout(ADMIN_TIMEOUT)
            .send()
            .await
            .map_err(|e| transient(OP, format!("load balancer unreachable: {e}")))?;
        check_status(OP, reply).await?;
        Ok(())
    }

    async fn foreign_backends(&self) -> Result<Vec<ForeignBackend>, ProviderError> {
        // Removes (and remembers) what the LB serves now that kiln did not attach.
        self.backends().await?;
        Ok(self.foreign.lock().map(|mut found| std::mem::take(&mut *found)).unwrap_or_default())
    }

    fn endpoint(&self) -> Option<String> {
        Some(format!("http://127.0.0.1:{}", self.lb_port))
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!("20000-20999".parse(), Ok(PortRange { low: 20000, high: 20999 }));
        for bad in ["", "20000", "2-1", "0-10", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_ports_stay_in_their_range_and_a_full_range_is_an_error() {
        // Find two adjacent free ports, and hold one: the other is the only free one.
        let (held, free) = loop {
            let held = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
            let port = held.local_addr().expect("addr").port();
            if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break (held, port + 1);
            }
        };
        let low = free - 1;
        let range = PortRange { low, high: free };
        for _ in 0..20 {
            assert_eq!(pick_port(Some(range)).expect("a free port"), free);
        }
        let _also_held = std::net::TcpListener::bind(("127.0.0.1", free)).expect("bind");
        let error = pick_port(Some(range)).expect_err("no port is free");
        assert!(error.to_string().contains(&format!("every port of {range} is in use")));
        drop(held);
    }
}
