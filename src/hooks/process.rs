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
        found.extend(marked(pid, &prefix, &accept));
    }
    found
}

/// Where the kernel's pid allocation stood when a run started: the run's processes all got pids
/// after it, so a sweep for them need only look at the pids allocated since (see
/// [`find_by_env_since`]) instead of reading every process's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidWindow {
    /// The last pid allocated before the run started (`/proc/sys/kernel/ns_last_pid`).
    last_pid: u32,
    /// Processes forked since boot at that moment (`/proc/stat` `processes`).
    forks: u64,
}

/// Pids at most this far apart are probed one by one; a wider window is swept through `/proc`.
const PROBE_AT_MOST: u32 = 2048;

impl PidWindow {
    /// The window starting now; `None` where `/proc` does not tell (then sweeps read everything).
    pub fn start() -> Option<PidWindow> {
        Some(PidWindow { last_pid: last_pid()?, forks: forks_since_boot()? })
    }

    /// The pids allocated since the window started, oldest first, or `None` when they cannot
    /// be told apart from older ones (the pid space may have wrapped around since: then every
    /// pid is a candidate).
    fn pids_since(&self) -> Option<Vec<u32>> {
        let (now, forks) = (last_pid()?, forks_since_boot()?);
        let max = pid_max()?;
        // Fewer forks than half the pid space: no pid allocated before the window was reused.
        if forks.checked_sub(self.forks)? >= u64::from(max / 2) || now >= max {
            return None;
        }
        let span =
            if now >= self.last_pid { now - self.last_pid } else { max - self.last_pid + now };
        if span > PROBE_AT_MOST {
            return None;
        }
        Some((1..=span).map(|i| (self.last_pid + i) % max).filter(|&pid| pid != 0).collect())
    }
}

fn last_pid() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").ok()?.trim().parse().ok()
}

fn pid_max() -> Option<u32> {
    static MAX: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()
    })
}

fn forks_since_boot() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|line| line.strip_prefix("processes ")?.trim().parse().ok())
}

/// [`find_by_env`] for processes started since `window` (a hook run's): only the pids allocated
/// since are read, one by one, when there are few; else (or without a window) every process.
/// Cheap enough to run after every provider call of a thousand fleets.
pub fn find_by_env_since(
    name: &str,
    accept: impl Fn(&str) -> bool,
    window: Option<PidWindow>,
) -> Vec<Found> {
    let Some(pids) = window.and_then(|w| w.pids_since()) else {
        return find_by_env(name, accept);
    };
    let me = std::process::id();
    let prefix = format!("{name}=");
    pids.into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| marked(pid, &prefix, &accept))
        .collect()
}

/// The process `pid` if its initial environment sets the variable (`prefix` is `NAME=`) to a
/// value `accept` takes. Processes of other users cannot be read and are skipped.
fn marked(pid: u32, prefix: &str, accept: &impl Fn(&str) -> bool) -> Option<Found> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let value = environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| accept(v))?;
    let pid = i32::try_from(pid).ok()?;
    let (pgid, start_ticks) = stat(pid)?;
    Some(Found { process: ProcessRef { pid, start_ticks }, pgid, value })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A process started after the window opened is found by reading only the pids allocated
    /// since, and one started before it is not a candidate at all.
    #[test]
    #[allow(clippy::disallowed_methods)] // a plain test thread, no runtime to block
    fn a_pid_window_finds_what_started_after_it() {
        let spawn = |marker: &str| {
            // `sleep` itself: no second exec whose moment a read of its environment could hit.
            std::process::Command::new("sleep")
                .arg("30")
                .env("KILN_TEST_WINDOW", marker)
                .spawn()
                .expect("sh starts")
        };
        let before_marker = format!("before-{}", std::process::id());
        let mut before = spawn(&before_marker);
        let Some(window) = PidWindow::start() else {
            eprintln!("SKIP: /proc does not expose ns_last_pid here");
            let _ = before.kill();
            let _ = before.wait();
            return;
        };
        let marker = format!("after-{}", std::process::id());
        let mut after = spawn(&marker);
        let pids = window.pids_since().expect("few pids allocated since");
        assert!(pids.contains(&after.id()), "{pids:?} lacks {}", after.id());
        assert!(!pids.contains(&before.id()), "{pids:?} holds {}", before.id());
        // A process whose exec is still finishing shows an empty environment for a moment
        // (the spawner is released before the kernel has laid out the new one): look again.
        let eventually = |find: &dyn Fn() -> Vec<Found>| {
            for _ in 0..200 {
                let found = find();
                if !found.is_empty() {
                    return found;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Vec::new()
        };
        let found =
            eventually(&|| find_by_env_since("KILN_TEST_WINDOW", |v| v == marker, Some(window)));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].process.pid, i32::try_from(after.id()).expect("pid"));
        // Without a window, every process is read: the earlier one is found as well.
        let found =
            eventually(&|| find_by_env_since("KILN_TEST_WINDOW", |v| v == before_marker, None));
        assert_eq!(found.len(), 1, "{found:?}");
        for child in [&mut before, &mut after] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
