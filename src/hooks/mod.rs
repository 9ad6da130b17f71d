//! Running the repo's hooks: the only code that spawns processes.
//!
//! A hook run ([`run`]) is one child process in its own process group, started with a clean
//! environment (see [`contract`] and docs/hooks.md), stdin from `HookSpec::stdin` or /dev/null, stdout and stderr read
//! line by line and handed to a [`LineSink`] (the caller turns them into rollout events) and to
//! tracing. Capture is capped at [`OUTPUT_CAP`] bytes per run: later lines are still read, so
//! the child never blocks on a full pipe, but dropped, and memory stays flat. A timeout or a
//! cancellation kills the whole group (SIGTERM, [`KILL_GRACE`], SIGKILL), so grandchildren go
//! too; so does a normal exit, which takes any background process the hook left behind with it.
//! Processes that left the group (`setsid`) are found by the run's marker,
//! [`contract::KILN_HOOK_RUN`], in `/proc/*/environ` and killed with it. A step's run is recorded
//! (marker, then pid and start time) in `<data-dir>/run/hooks/` before the hook starts, so a
//! daemon restarted after a `kill -9` kills what the dead one left ([`kill_leftover`]) before the
//! step runs again. The timeout bounds a step's attempts and retry waits together.
//!
//! ```text
//!  run_with_retry_in ──(exit 75: backoff)──▶ run_in ──spawn──▶ hook (pgid = pid)
//!                                              │  ◀── stdout/stderr lines ── capped ──▶ sink
//!                                              └─ $KILN_OUTPUT ──▶ HookOutcome.outputs
//! ```

pub mod contract;
pub mod output;
pub mod packer;
pub mod process;
pub mod signers;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;

use crate::error::{Classify, ErrorClass};
use crate::retry::RetryPolicy;

/// Bytes of output (both streams, line bytes plus newline) per run handed to the sink and to
/// tracing; past it one [`TRUNCATED_NOTICE`] is sent and the rest is read and dropped.
pub const OUTPUT_CAP: usize = 1024 * 1024;

/// Longest line kept; the rest of a longer line is read and dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Bytes of the end of stdout kept beyond [`OUTPUT_CAP`] for parsers: Packer prints its artifact
/// lines last, after however much build output.
const STDOUT_TAIL: usize = 256 * 1024;

/// Time a hook's process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Sent once to the sink (as stderr) when capture reaches [`OUTPUT_CAP`].
pub const TRUNCATED_NOTICE: &str =
    "[kiln] output truncated: capture limit reached, further output is discarded";

/// How many stderr lines an [`HookError::Exited`] quotes.
const STDERR_TAIL_LINES: usize = 5;

/// Which stream a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One hook invocation.
#[derive(Debug, Clone)]
pub struct HookSpec {
    /// Display name for logs and errors, e.g. `bake web/app`.
    pub name: String,
    /// The executable (absolute path).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory (a clean export of the commit).
    pub workdir: PathBuf,
    /// `KILN_*` inputs; the allow-listed daemon environment is added by the runner.
    pub env: Vec<(String, String)>,
    /// Kill the process group after this long.
    pub timeout: Duration,
    /// Bytes written to the hook's stdin (then closed); `None` gives it /dev/null.
    pub stdin: Option<Vec<u8>>,
}

/// What a successful hook produced.
#[derive(Debug, Clone, Default)]
pub struct HookOutcome {
    /// `key=value` lines from `$KILN_OUTPUT` (plus parsed Packer / Terraform output).
    pub outputs: BTreeMap<String, String>,
    /// Lines captured (stdout + stderr).
    pub lines: u64,
    /// Whether capture hit the size cap.
    pub truncated: bool,
    /// Wall time.
    pub elapsed: Duration,
    /// Captured stdout (capped), for parsers that read it (Packer `-machine-readable`).
    pub stdout: String,
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The executable could not be started.
    #[error("failed to start hook `{name}` ({program})")]
    Spawn {
        /// Hook name.
        name: String,
        /// Program path.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Ran past its timeout (which bounds every attempt and the waits between them together);
    /// everything it started was killed.
    #[error("hook `{name}` timed out after {}{}", crate::manifest::format_duration(*timeout), if *attempts > 1 { format!(" ({attempts} attempts; each earlier one exited 75, transient)") } else { String::new() })]
    TimedOut {
        /// Hook name.
        name: String,
        /// The timeout.
        timeout: Duration,
        /// How many times the hook was started within it.
        attempts: u32,
    },
    /// Exited non-zero (75 = transient).
    #[error("hook `{name}` exited with status {code}{}", if stderr_tail.is_empty() { String::new() } else { format!(": {stderr_tail}") })]
    Exited {
        /// Hook name.
        name: String,
        /// Exit code (or 128+signal).
        code: i32,
        /// Last stderr lines.
        stderr_tail: String,
    },
    /// Succeeded but its output is unusable (e.g. no image id).
    #[error("hook `{name}` {message}")]
    BadOutput {
        /// Hook name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Cancelled because a newer commit superseded the run.
    #[error("hook `{name}` cancelled")]
    Cancelled {
        /// Hook name.
        name: String,
    },
}

impl Classify for HookError {
    fn class(&self) -> ErrorClass {
        match self {
            HookError::Exited { code: contract::EXIT_TRANSIENT, .. } => ErrorClass::Transient,
            _ => ErrorClass::Stalled,
        }
    }
}

/// Receives captured output lines as they arrive.
pub type LineSink<'a> = &'a (dyn Fn(Stream, &str) + Send + Sync);

/// Called before each retry of a transient failure with the error and the wait.
pub type RetrySink<'a> = &'a (dyn Fn(&HookError, Duration) + Send + Sync);

/// The daemon variables every hook inherits: the [`contract::BASE_ENV`] names the daemon has,
/// and a default `PATH` when it has none.
pub fn base_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = contract::BASE_ENV
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_owned(), contract::DEFAULT_PATH.to_owned()));
    }
    env
}

/// Runs a hook once: clean environment (allow-list + `spec.env` + `KILN_OUTPUT`), own process
/// group, output streamed to `sink` line by line and capped, killed (TERM, grace, KILL) at its
/// timeout or when `cancel` fires. `$KILN_OUTPUT` lives in a private temp directory removed
/// afterwards; use [`run_in`] to read other files the hook writes to `$KILN_OUTPUT_DIR`.
pub async fn run(
    spec: &HookSpec,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    let dir = TempOutputDir::new();
    run_in(spec, &dir.0, sink, cancel).await
}

/// [`run`] for a routine call (an exec provider operation: list, health, … at every tick): its
/// start, end and output are logged at DEBUG instead of INFO, so an idle daemon's log stays
/// quiet. Failures are the caller's to report; the runner's warnings (a kill) stay WARN.
pub async fn run_routine(
    spec: &HookSpec,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    let dir = TempOutputDir::new();
    run_once(spec, spec.timeout, &dir.0, None, sink, cancel, Loudness::Routine).await
}

/// [`run`], retrying exit 75 with backoff (bounded by `spec.timeout` overall).
pub async fn run_with_retry(
    spec: &HookSpec,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    let dir = TempOutputDir::new();
    run_with_retry_in(spec, &dir.0, sink, cancel, &|_, _| {}).await
}

/// [`run_in`], retrying exit 75 ([`contract::EXIT_TRANSIENT`]) with exponential backoff until
/// it succeeds, fails otherwise, or `spec.timeout` has elapsed in total: the timeout bounds the
/// whole run, every attempt and every wait included (each attempt gets what is left of it, and
/// a wait that would end past it ends the run at once with [`HookError::TimedOut`] naming the
/// number of attempts). `on_retry` sees each transient failure before the wait. Cancellation
/// stops the waits too.
pub async fn run_with_retry_in(
    spec: &HookSpec,
    out_dir: &Path,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
    on_retry: RetrySink<'_>,
) -> Result<HookOutcome, HookError> {
    run_with_retry_recorded(spec, out_dir, None, sink, cancel, on_retry).await
}

/// [`run_with_retry_in`], keeping a [`RunRecord`] of each attempt at `record` (see
/// [`kill_leftover`]) while it runs.
pub async fn run_with_retry_recorded(
    spec: &HookSpec,
    out_dir: &Path,
    record: Option<&Path>,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
    on_retry: RetrySink<'_>,
) -> Result<HookOutcome, HookError> {
    let policy = RetryPolicy {
        initial: Duration::from_millis(500),
        max_interval: Duration::from_secs(30),
        max_elapsed: None,
    };
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let timed_out = |attempts: u32| HookError::TimedOut {
        name: spec.name.clone(),
        timeout: spec.timeout,
        attempts,
    };
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match run_once(spec, left, out_dir, record, sink, cancel, Loudness::Step).await
        {
            Err(HookError::TimedOut { .. }) => return Err(timed_out(attempts)),
            Err(error @ HookError::Exited { code: contract::EXIT_TRANSIENT, .. }) => error,
            other => return other,
        };
        let wait = crate::retry::nth_delay(&policy, attempts - 1);
        if tokio::time::Instant::now() + wait >= deadline {
            tracing::warn!(hook = %spec.name, attempts, error = %error, "Hook failed transiently and its timeout leaves no room for another attempt.");
            return Err(timed_out(attempts));
        }
        tracing::warn!(hook = %spec.name, error = %error, wait_ms = wait.as_millis() as u64, "Hook failed transiently; retrying.");
        on_retry(&error, wait);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Err(HookError::Cancelled { name: spec.name.clone() }),
        }
    }
}

/// Runs a hook once with `$KILN_OUTPUT` = `out_dir/output` and `$KILN_OUTPUT_DIR` = `out_dir`.
/// `out_dir` is emptied (created if missing) before the hook starts and left in place after,
/// so the caller can read other files the hook wrote there; the caller removes it.
pub async fn run_in(
    spec: &HookSpec,
    out_dir: &Path,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    run_once(spec, spec.timeout, out_dir, None, sink, cancel, Loudness::Step).await
}

/// At which level a run's start, end and output lines are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loudness {
    /// A bake or reconcile step a human follows: INFO.
    Step,
    /// A provider call repeated at every tick: DEBUG.
    Routine,
}

/// Logs at INFO for a [`Loudness::Step`], at DEBUG for a [`Loudness::Routine`] run.
macro_rules! log_at {
    ($loudness:expr, $($arg:tt)+) => {
        match $loudness {
            Loudness::Step => tracing::info!($($arg)+),
            Loudness::Routine => tracing::debug!($($arg)+),
        }
    };
}

/// [`run_in`] with `timeout` in place of `spec.timeout`, recording the run at `record`.
async fn run_once(
    spec: &HookSpec,
    timeout: Duration,
    out_dir: &Path,
    record: Option<&Path>,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
    loudness: Loudness,
) -> Result<HookOutcome, HookError> {
    let started = tokio::time::Instant::now();
    let spawn_error = |source: std::io::Error| HookError::Spawn {
        name: spec.name.clone(),
        program: spec.program.display().to_string(),
        source,
    };
    let output_file = prepare_out_dir(out_dir).await.map_err(spawn_error)?;
    let marker = new_marker();
    // Written before the hook starts: a daemon killed at any later point leaves a record that
    // names every process of the run (by its marker), so the next daemon can kill them.
    let mut run_record = RunRecord {
        name: spec.name.clone(),
        marker: marker.clone(),
        daemon_pid: std::process::id(),
        process: None,
    };
    if let Some(path) = record {
        write_record(path, &run_record).await.map_err(spawn_error)?;
    }

    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(base_env())
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(contract::KILN_OUTPUT, &output_file)
        .env(contract::KILN_OUTPUT_DIR, out_dir)
        .env(contract::KILN_HOOK_RUN, &marker)
        .current_dir(&spec.workdir)
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout can kill everything the hook started, not just the hook.
        .process_group(0)
        .kill_on_drop(true);
    // If this future is dropped mid-run (the caller gave up), the run is killed on the way out.
    let mut guard = GroupGuard {
        pgid: None,
        marker: marker.clone(),
        window: None,
        record: record.map(Path::to_owned),
        armed: true,
    };
    // Before the spawn: every process of the run gets a pid allocated after this point.
    let window = process::PidWindow::start();
    guard.window = window;
    let mut child = command.spawn().map_err(spawn_error)?;
    let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    guard.pgid = pgid;
    if let (Some(path), Some(pid)) = (record, pgid) {
        run_record.process = process::start_ticks(pid.as_raw())
            .map(|start_ticks| process::ProcessRef { pid: pid.as_raw(), start_ticks });
        if let Err(error) = write_record(path, &run_record).await {
            // The marker written before is enough to find the run again.
            tracing::warn!(hook = %spec.name, error = %error, "Could not record the hook's process.");
        }
    }
    log_at!(loudness, hook = %spec.name, program = %spec.program.display(), pid = ?pgid, "Hook started.");

    if let (Some(bytes), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        // Written concurrently and then closed (EOF), so a hook that reads its input after
        // writing output never deadlocks; a hook that ignores stdin is fine too (EPIPE).
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let capture = Capture::new(&spec.name, sink, loudness);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut pumps = std::pin::pin!(async {
        tokio::join!(pump(stdout, Stream::Stdout, &capture), pump(stderr, Stream::Stderr, &capture))
    });

    let work = async {
        let mut pumps_done = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = &mut pumps, if !pumps_done => pumps_done = true,
            }
        };
        // The hook is done; whatever it left running goes now, in its group or escaped from
        // it (setsid) but carrying the run's marker, which also closes the pipes those
        // processes held.
        signal_group(pgid, Signal::SIGTERM);
        signal_marked(&marker, window, Signal::SIGTERM);
        if !pumps_done {
            let _ = tokio::time::timeout(KILL_GRACE, &mut pumps).await;
        }
        signal_group(pgid, Signal::SIGKILL);
        signal_marked(&marker, window, Signal::SIGKILL);
        status
    };
    let res = tokio::select! {
        status = work => Ok(status),
        () = tokio::time::sleep(timeout) => {
            Err(HookError::TimedOut { name: spec.name.clone(), timeout, attempts: 1 })
        }
        () = cancel.cancelled() => Err(HookError::Cancelled { name: spec.name.clone() }),
    };
    let status = match res {
        Ok(status) => status,
        Err(error) => {
            tracing::warn!(hook = %spec.name, error = %error, "Killing the hook's process group.");
            kill_group(&mut child, pgid).await;
            signal_marked(&marker, window, Signal::SIGKILL);
            guard.disarm();
            return Err(error);
        }
    };
    guard.disarm();
    let status = status.map_err(spawn_error)?;
    let elapsed = started.elapsed();
    let state = capture.finish();
    let code = exit_code(&status);
    log_at!(loudness, hook = %spec.name, code, elapsed_ms = elapsed.as_millis() as u64, lines = state.lines, truncated = state.truncated, "Hook finished.");
    if code != 0 {
        let stderr_tail: Vec<String> = state.stderr_tail.into_iter().collect();
        return Err(HookError::Exited {
            name: spec.name.clone(),
            code,
            stderr_tail: stderr_tail.join("; "),
        });
    }
    let text = output::read_output_file(&output_file)
        .await
        .map_err(|message| HookError::BadOutput { name: spec.name.clone(), message })?;
    let outputs = output::parse_outputs(&text)
        .map_err(|message| HookError::BadOutput { name: spec.name.clone(), message })?;
    let mut stdout = state.stdout_head;
    for line in state.stdout_tail {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    Ok(HookOutcome { outputs, lines: state.lines, truncated: state.truncated, elapsed, stdout })
}

/// Empties (or creates) `dir` and creates the empty `$KILN_OUTPUT` file in it.
async fn prepare_out_dir(dir: &Path) -> std::io::Result<PathBuf> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await?;
    let file = dir.join("output");
    tokio::fs::write(&file, b"").await?;
    Ok(file)
}

/// The exit code, or 128 + the signal number for a child killed by a signal (as shells do).
fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

/// Sends `signal` to the group; a group that is already empty is fine.
fn signal_group(pgid: Option<Pid>, signal: Signal) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, signal);
    }
}

/// SIGTERM to the group, up to [`KILL_GRACE`] for the hook to exit, then SIGKILL to whatever is
/// left of the group, and the hook reaped.
async fn kill_group(child: &mut tokio::process::Child, pgid: Option<Pid>) {
    signal_group(pgid, Signal::SIGTERM);
    let exited = tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok();
    signal_group(pgid, Signal::SIGKILL);
    if !exited {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
}

/// Sends `signal` to every process carrying the run's marker (see [`contract::KILN_HOOK_RUN`]):
/// what the hook started, including what left its process group.
fn signal_marked(marker: &str, window: Option<process::PidWindow>, signal: Signal) {
    for found in
        process::find_by_env_since(contract::KILN_HOOK_RUN, |value| value == marker, window)
    {
        if found.is_group_leader() {
            found.process.signal(signal);
        }
        found.process.signal_one(signal);
    }
}

/// Kills the run (group and marked processes) with SIGKILL when dropped while armed, and
/// removes its record once the run is over either way.
struct GroupGuard {
    pgid: Option<Pid>,
    marker: String,
    /// Where pid allocation stood when the run started (narrows the marker sweep).
    window: Option<process::PidWindow>,
    record: Option<PathBuf>,
    armed: bool,
}

impl GroupGuard {
    /// The run ended and was cleaned up: only the record remains to remove.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
            signal_marked(&self.marker, self.window, Signal::SIGKILL);
        }
        if let Some(path) = &self.record {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What `<data-dir>/run/hooks/<step>.json` says about a hook run in progress: written before
/// the hook starts (with the marker) and again once it runs (with its process group), removed
/// when the run is over. A record found at start-up, or before the same step runs again, belongs
/// to a daemon that died mid-run: [`kill_leftover`] kills what that run left.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// The hook's display name.
    pub name: String,
    /// The run's [`contract::KILN_HOOK_RUN`] value.
    pub marker: String,
    /// The daemon that started it.
    pub daemon_pid: u32,
    /// The hook's process (and group), once started.
    pub process: Option<process::ProcessRef>,
}

/// A value of [`contract::KILN_HOOK_RUN`] unique to one run.
fn new_marker() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// Writes `record` to `path` atomically (tmp + rename, synced), creating the directory.
async fn write_record(path: &Path, record: &RunRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp-{:08x}", fastrand::u32(..)));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `<data_dir>/run/hooks`: where [`RunRecord`]s live.
pub fn run_records_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("hooks")
}

/// The [`RunRecord`] path of step `step` (e.g. `bake web/app`): one file per fleet and step, so
/// two runs of one step never overlap unseen.
pub fn run_record_path(data_dir: &Path, step: &str) -> PathBuf {
    let name: String = step
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '+' })
        .collect();
    run_records_dir(data_dir).join(format!("{name}.json"))
}

/// Kills what the run recorded at `record` left behind (a daemon died while it ran): its process
/// group (TERM, [`KILL_GRACE`], KILL; pid and start time checked) and every process carrying its
/// marker; then removes the record. Returns how many processes it found. No record: nothing.
pub async fn kill_leftover(record: &Path) -> usize {
    let Ok(bytes) = tokio::fs::read(record).await else { return 0 };
    let mut killed = 0;
    match serde_json::from_slice::<RunRecord>(&bytes) {
        Ok(run) => {
            if let Some(leader) = run.process {
                if leader.alive() {
                    killed += 1;
                    tracing::warn!(hook = %run.name, pid = leader.pid, "Killing a hook a previous daemon left running.");
                    process::stop(leader, KILL_GRACE).await;
                } else {
                    process::kill_orphaned_group(leader);
                }
            }
            let marker = run.marker;
            killed += process::kill_by_env(contract::KILN_HOOK_RUN, |value| value == marker);
        }
        Err(error) => {
            tracing::warn!(record = %record.display(), error = %error, "Ignoring an unreadable hook run record.");
        }
    }
    let _ = tokio::fs::remove_file(record).await;
    killed
}

/// [`kill_leftover`] for every record under `<data_dir>/run/hooks` (at daemon start, before any
/// hook runs). Returns how many processes it found.
pub async fn kill_all_leftovers(data_dir: &Path) -> usize {
    let Ok(mut entries) = tokio::fs::read_dir(run_records_dir(data_dir)).await else { return 0 };
    let mut killed = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            killed += kill_leftover(&path).await;
        } else {
            // A temp file of an interrupted write.
            let _ = tokio::fs::remove_file(&path).await;
        }
    }
    killed
}

/// A unique directory under the system temp dir, removed on drop.
struct TempOutputDir(PathBuf);

impl TempOutputDir {
    fn new() -> TempOutputDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempOutputDir(std::env::temp_dir().join(format!(
            "kiln-hook-{}-{n}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        )))
    }
}

impl Drop for TempOutputDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What has been captured so far.
#[derive(Default)]
struct CaptureState {
    /// Bytes handed to the sink.
    bytes: usize,
    lines: u64,
    truncated: bool,
    stdout_head: String,
    head_full: bool,
    stdout_tail: VecDeque<String>,
    stdout_tail_bytes: usize,
    stderr_tail: VecDeque<String>,
}

/// Shared by the two stream readers of one run (they run in the same task, so the lock is never
/// contended; it is there because the future must be `Send`).
struct Capture<'a> {
    name: &'a str,
    sink: LineSink<'a>,
    loudness: Loudness,
    state: Mutex<CaptureState>,
}

impl<'a> Capture<'a> {
    fn new(name: &'a str, sink: LineSink<'a>, loudness: Loudness) -> Capture<'a> {
        Capture { name, sink, loudness, state: Mutex::new(CaptureState::default()) }
    }

    fn line(&self, stream: Stream, line: &str) {
        let Ok(mut state) = self.state.lock() else { return };
        state.lines += 1;
        let size = line.len() + 1;
        match stream {
            Stream::Stdout if !state.head_full && state.stdout_head.len() + size <= OUTPUT_CAP => {
                state.stdout_head.push_str(line);
                state.stdout_head.push('\n');
            }
            Stream::Stdout => {
                // Once a line misses the head, later ones go to the tail too: order is kept.
                state.head_full = true;
                state.stdout_tail.push_back(line.to_owned());
                state.stdout_tail_bytes += size;
                while state.stdout_tail_bytes > STDOUT_TAIL {
                    let Some(old) = state.stdout_tail.pop_front() else { break };
                    state.stdout_tail_bytes -= old.len() + 1;
                }
            }
            Stream::Stderr => {
                if !line.trim().is_empty() {
                    let short: String = line.chars().take(300).collect();
                    state.stderr_tail.push_back(short);
                    if state.stderr_tail.len() > STDERR_TAIL_LINES {
                        state.stderr_tail.pop_front();
                    }
                }
            }
        }
        if !state.truncated && state.bytes + size <= OUTPUT_CAP {
            state.bytes += size;
            drop(state);
            match stream {
                Stream::Stdout => log_at!(self.loudness, hook = %self.name, "stdout: {line}"),
                Stream::Stderr => log_at!(self.loudness, hook = %self.name, "stderr: {line}"),
            }
            (self.sink)(stream, line);
        } else if !state.truncated {
            state.truncated = true;
            drop(state);
            tracing::warn!(hook = %self.name, cap = OUTPUT_CAP, "Hook output truncated.");
            (self.sink)(Stream::Stderr, TRUNCATED_NOTICE);
        }
    }

    fn finish(&self) -> CaptureState {
        match self.state.lock() {
            Ok(mut state) => std::mem::take(&mut *state),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

/// Reads `reader` to the end, one line at a time, cutting lines at [`MAX_LINE`] bytes without
/// ever buffering more than that.
async fn pump<R: AsyncRead + Unpin>(reader: Option<R>, stream: Stream, capture: &Capture<'_>) {
    let Some(reader) = reader else { return };
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(error) => {
                tracing::debug!(hook = %capture.name, error = %error, "Stopped reading hook output.");
                break;
            }
        };
        if buf.is_empty() {
            if !line.is_empty() {
                emit(capture, stream, &line);
            }
            break;
        }
        let (chunk, consumed, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(consumed);
        if complete {
            emit(capture, stream, &line);
            line.clear();
        }
    }
}

fn emit(capture: &Capture<'_>, stream: Stream, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    capture.line(stream, text.strip_suffix('\r').unwrap_or(&text));
}
