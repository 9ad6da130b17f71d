//! Process primitives shared by the hook runner and the local provider: long-lived detached
//! children and process-group signalling. `hooks` is the only module that spawns processes.

use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A detached child that outlives the daemon, identified by pid *and* start time so a reused pid
/// is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRef {
    /// Process id (also its process group id).
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

/// Starts `program` in its own process group and session, detached from the daemon (stdin from
/// /dev/null, stdout and stderr appended to `log`), with exactly `env` as its environment.
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    workdir: &Path,
    log: &Path,
) -> std::io::Result<ProcessRef> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
    // The child is not waited on here: a reaper thread collects it so it never lingers as a
    // zombie while the daemon runs; after the daemon exits, init adopts it.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let start_ticks =
        start_ticks(pid).ok_or_else(|| std::io::Error::other("child exited at once"))?;
    Ok(ProcessRef { pid, start_ticks })
}

/// Whether the test-only fault `name` is injected: `KILN_FAULT` is a comma-separated list of fault
/// names. Only tests set it (e.g. `launch-after-spawn` makes the local provider abort the daemon
/// right after starting an instance and before recording it, the window a `kill -9` can hit).
pub fn fault_injected(name: &str) -> bool {
    std::env::var("KILN_FAULT").is_ok_and(|faults| faults.split(',').any(|f| f.trim() == name))
}

/// The start time of `pid` (`/proc/PID/stat` field 22), or `None` if it is not running.
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, ticks)| ticks)
}

/// `(process group id, start ticks)` of `pid` from `/proc/PID/stat`, `None` if it is not running
/// (a zombie is not running).
fn stat(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field 5 (pgrp) is index 2, field 22 is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(2)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// A live process found by [`find_by_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The process (pid and start time).
    pub process: ProcessRef,
    /// Its process group id (`== process.pid` for a group leader).
    pub pgid: i32,
    /// The value of the variable looked for.
    pub value: String,
}

impl Found {
    /// Whether it leads its process group (as every process kiln starts does).
    pub fn is_group_leader(&self) -> bool {
        self.pgid == self.process.pid
    }
}

/// Every live process of this user (other than this one) whose initial environment
/// (`/proc/PID/environ`) sets `name`, with the value; `accept` filters on the value before the
/// process's stat is read. Processes of other users, and ones that exit meanwhile, are skipped.
///
/// This is how kiln finds what it started when its own record of a pid was lost (a `kill -9`
/// between spawning and recording): every hook run and every local instance carries a marker
/// variable naming it.
pub fn find_by_env(name: &str, accept: impl Fn(&str) -> bool) -> Vec<Found> {
    use std::os::unix::fs::MetadataExt as _;
    let me = std::process::id();
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let prefix = format!("{name}=");
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || entry.metadata().map(|m| m.uid()).ok() != Some(uid) {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let value = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let Some(value) = value.filter(|v| accept(v)) else { continue };
        let Ok(pid) = i32::try_from(pid) else { continue };
        if let Some((pgid, start_ticks)) = stat(pid) {
            found.push(Found { process: ProcessRef { pid, start_ticks }, pgid, value });
        }
    }
    found
}

/// SIGKILLs every process [`find_by_env`] finds (and the groups they lead), e.g. what a hook run
/// left behind. Returns how many processes were found.
pub fn kill_by_env(name: &str, accept: impl Fn(&str) -> bool) -> usize {
    let found = find_by_env(name, accept);
    for f in &found {
        if f.is_group_leader() {
            f.process.signal(Signal::SIGKILL);
        } else {
            f.process.signal_one(Signal::SIGKILL);
        }
    }
    found.len()
}

impl ProcessRef {
    /// Whether this exact process (same pid, same start time) is still alive.
    pub fn alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }

    /// Sends `signal` to this process alone, if it is still the one we started.
    pub fn signal_one(&self, signal: Signal) -> bool {
        self.pid > 1
            && self.alive()
            && nix::sys::signal::kill(Pid::from_raw(self.pid), signal).is_ok()
    }

    /// Sends `signal` to the whole process group, if this process is still the one we started.
    pub fn signal(&self, signal: Signal) -> bool {
        // pid 0 or 1 would signal our own group or init's: never a process kiln started.
        self.pid > 1 && self.alive() && killpg(Pid::from_raw(self.pid), signal).is_ok()
    }
}

/// Sends SIGTERM to the group, waits up to `grace` for it to exit, then SIGKILL.
pub async fn stop(process: ProcessRef, grace: std::time::Duration) {
    if !process.signal(Signal::SIGTERM) {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    // Most processes exit within milliseconds of SIGTERM, and a rollout waits on this once per
    // replaced instance: poll often at first, then back off to 20 ms.
    let mut pause = std::time::Duration::from_millis(1);
    while tokio::time::Instant::now() < deadline {
        if !process.alive() {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(20));
    }
    process.signal(Signal::SIGKILL);
    for _ in 0..100 {
        if !process.alive() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Kills (SIGKILL) what is left of `process`'s group after its leader died, e.g. children of an
/// instance whose main process was killed with `kill -9`. Returns whether a signal was sent.
///
/// Safe against pid reuse: while any member of the old group lives, Linux does not hand its
/// id out as a new pid, so the group is only signalled when no process holds the leader's pid.
pub fn kill_orphaned_group(process: ProcessRef) -> bool {
    if process.pid <= 1 || start_ticks(process.pid).is_some() {
        return false;
    }
    killpg(Pid::from_raw(process.pid), Signal::SIGKILL).is_ok()
}
