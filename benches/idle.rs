//! Idle benchmark: what a deployed, idle kiln costs while nothing happens.
//!
//! Starts the real `kiln run` (release build) on a local repository holding the demo fleet
//! (`examples/demo-infra`, without its Terraform step: three instances of the demo app behind
//! `kiln lb`, all from the local provider, as `kiln quickstart` runs it), waits until the
//! rollout succeeded and every instance serves, lets it settle, then watches for a window:
//!
//! - CPU (utime + stime from `/proc/PID/stat`) of the daemon, `kiln lb` and each instance, as
//!   a percentage of one core, and their context switches per second (wake-ups: a hot loop
//!   shows there first);
//! - fetches of the remote during the window (`kiln_fetches_total` on `/metrics`; an idle
//!   daemon on a local repo should fetch 0 times: notify reports ref changes, and the poll of
//!   a local remote is a 5-minute safety net);
//! - the daemon's RSS.
//!
//! `cargo bench --bench idle` (`KILN_IDLE_SECS` sets the window, default 60). Needs git and
//! python3.

// The driver side is synchronous: it blocks between polls of the daemon, never in a runtime.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln, leftover_pids};
use support::git::{Entry, TestRepo, require_git};
use support::metrics;

/// CPU time (utime + stime, clock ticks) of a process, all threads included.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Voluntary + involuntary context switches of every thread of a process.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_owned()
}

/// The demo repository's files, with the load balancer on a free port, no Terraform step and a
/// short canary pause (setup time only; the idle window is what is measured).
fn demo_entries(root: &Path) -> Vec<(String, String, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mut text = std::fs::read_to_string(&path).unwrap();
            let exec = std::fs::metadata(&path).unwrap().permissions().mode() & 0o111 != 0;
            if rel == "kiln.yaml" {
                text = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("infra:"))
                    .collect::<Vec<_>>()
                    .join("\n");
                text = text
                    .replace("paths: [image/, infra/, hooks/]", "paths: [image/, hooks/]")
                    .replace("port: 8080", "port: 0")
                    .replace("pause: 5s", "pause: 1s");
                text.push('\n');
            }
            files.push((rel, text, exec));
        }
    }
    files
}

/// The fleet's instances, once `capacity` of them run, are attached and healthy.
fn serving(data: &Path) -> Option<usize> {
    let (code, out, _) = kiln(data, &["status", "--json"]);
    if code != 0 {
        return None;
    }
    let fleets: Value = serde_json::from_str(&out).ok()?;
    let fleet = fleets.as_array()?.first()?;
    let capacity = fleet["capacity"].as_u64()? as usize;
    let up = fleet["instances"]
        .as_array()?
        .iter()
        .filter(|i| i["running"] == true && i["attached"] == true && i["healthy"] == true)
        .count();
    (up == capacity).then_some(up)
}

struct Sample {
    ticks: u64,
    switches: u64,
}

fn sample(pid: u32) -> Sample {
    Sample { ticks: cpu_ticks(pid).unwrap_or(0), switches: switches(pid) }
}

fn main() {
    if !require_git("idle bench") || !support::fleet::have_python3() {
        return;
    }
    let window: u64 =
        std::env::var("KILN_IDLE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    // /proc counts CPU time in USER_HZ ticks (`getconf CLK_TCK`, 100 on Linux).
    let ticks_per_sec = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);

    let repo = TestRepo::new();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo-infra");
    let files = demo_entries(&demo);
    let entries: Vec<Entry<'_>> = files
        .iter()
        .map(
            |(path, text, exec)| {
                if *exec { Entry::Exec(path, text) } else { Entry::File(path, text) }
            },
        )
        .collect();
    let first = repo.commit_entries("demo", &entries);
    let data = repo.scratch("data");
    // No --poll: the default for a local path, as `kiln run` and `kiln quickstart` use it.
    let daemon = Daemon::start(&repo.url(), &data, &[]);
    let data = std::fs::canonicalize(&data).unwrap();
    let terminal = ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];
    let log = daemon.wait_log("the first rollout to end", Duration::from_secs(300), |log| {
        for_commit(log, &first)
            .iter()
            .any(|e| terminal.contains(&e["state"].as_str().unwrap_or("")))
    });
    let entry = for_commit(&log, &first)[0];
    assert_eq!(entry["state"], "succeeded", "{entry}\n{}", daemon.logs());
    let deadline = Instant::now() + Duration::from_secs(60);
    while serving(&data).is_none() {
        assert!(Instant::now() < deadline, "the fleet never served:\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Settle: the last probes and keepers of the rollout finish.
    std::thread::sleep(Duration::from_secs(5));

    let daemon_pid = u32::try_from(daemon.pid()).unwrap();
    let needle = data.to_string_lossy().into_owned();
    let mut procs: Vec<(String, u32)> = vec![("kiln run".to_owned(), daemon_pid)];
    for pid in leftover_pids(&needle) {
        if pid == daemon_pid {
            continue;
        }
        let cmd = cmdline(pid);
        let name = if cmd.contains(" lb ") || cmd.ends_with(" lb") {
            "kiln lb".to_owned()
        } else {
            format!("instance ({})", cmd.rsplit('/').next().unwrap_or(&cmd))
        };
        procs.push((name, pid));
    }

    let fetches_before = metrics::counter(&data, "kiln_fetches_total");
    let errors_before = metrics::counter(&data, "kiln_fetch_errors_total");
    let before: Vec<Sample> = procs.iter().map(|(_, pid)| sample(*pid)).collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(window));
    let after: Vec<Sample> = procs.iter().map(|(_, pid)| sample(*pid)).collect();
    let elapsed = started.elapsed().as_secs_f64();
    let fetches = metrics::counter(&data, "kiln_fetches_total") - fetches_before;
    let errors = metrics::counter(&data, "kiln_fetch_errors_total") - errors_before;

    println!("idle for {elapsed:.1} s after the first rollout (3 instances behind kiln lb):");
    println!("  {:<28} {:>8} {:>8} {:>14}", "process", "pid", "CPU %", "wake-ups/s");
    for (((name, pid), b), a) in procs.iter().zip(&before).zip(&after) {
        let cpu = (a.ticks.saturating_sub(b.ticks)) as f64 / ticks_per_sec / elapsed * 100.0;
        let wakeups = a.switches.saturating_sub(b.switches) as f64 / elapsed;
        println!("  {name:<28} {pid:>8} {cpu:>7.2}% {wakeups:>14.1}");
    }
    println!("  fetches of the remote during the window: {fetches} (failed: {errors})");
    println!("  kiln run RSS: {:.1} MiB", rss_kib(daemon_pid) as f64 / 1024.0);
    drop(daemon);
}
