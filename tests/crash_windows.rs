//! Issue 10: windows where a crash of the daemon cost something, each hit on the real daemon.
//!
//! - Major 2: a daemon dying between starting an instance process and recording it orphaned
//!   the process and rolled back a good rollout. Here the daemon is made to die in exactly that
//!   window (the test-only `KILN_FAULT=launch-after-spawn` aborts it right after the spawn),
//!   and the restarted daemon must adopt the instance: the rollout succeeds, nothing is rolled
//!   back, the interrupted instance serves, and every instance process is one kiln knows.
//! - Minor: after a `kill -9`, the hook that was running kept running and the restarted daemon
//!   ran it again beside it. The restarted daemon must kill it (and what it started, even with
//!   `setsid`) before the step runs again.

// The test is synchronous: it blocks between polls of real processes, never in a runtime.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, for_commit, kill_leftovers, kiln, kiln_exe};
use support::fleet::{have_python3, write_app_image};
use support::git::{Entry, TestRepo, require_git};

const WAIT: Duration = Duration::from_secs(90);
const CAPACITY: usize = 2;

fn manifest(bake: &str) -> String {
    format!(
        "fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - {{ name: base, path: image/base, bake: {bake} }}
      timeout: 1m
    rollout:
      provider: local
      capacity: {CAPACITY}
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 2, timeout: 30s }}
      minHealthy: 200ms
      drain: 200ms
      progressDeadline: 2m
      onFailure: rollback
      loadBalancer: {{ port: 0 }}
"
    )
}

/// The app image of the test support (`app.py`, `run`) and the shipped `hooks/bake-dir`.
fn app_files(repo: &TestRepo) -> (String, String, String) {
    let template = write_app_image(&repo.scratch("template"), "app");
    let app = std::fs::read_to_string(template.join("app.py")).expect("app.py");
    let run = std::fs::read_to_string(template.join("run")).expect("run");
    let hook_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir");
    let hook = std::fs::read_to_string(hook_path).expect("hooks/bake-dir");
    (app, run, hook)
}

/// Waits until the fleet's rollout of `sha` is terminal; returns its `kiln log` entry.
fn wait_terminal(daemon: &Daemon, sha: &str) -> Value {
    let terminal = ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];
    let log = daemon.wait_log("the rollout to end", WAIT, |log| {
        for_commit(log, sha)
            .iter()
            .any(|e| e["fleet"] == "web" && terminal.contains(&e["state"].as_str().unwrap_or("")))
    });
    let entry = for_commit(&log, sha).into_iter().find(|e| e["fleet"] == "web").cloned();
    entry.expect("the fleet's rollout")
}

/// Instance records on disk: (id, state).
fn records(instances: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(instances) else { return Vec::new() };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let record: Value =
                serde_json::from_slice(&std::fs::read(e.path().join("instance.json")).ok()?)
                    .ok()?;
            Some((record["id"].as_str()?.to_owned(), record["state"].as_str()?.to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// Instance ids of live processes (group leaders) carrying a local instance's marker under
/// `instances`, one entry per process.
fn instance_processes(instances: &Path) -> Vec<String> {
    instance_pids(instances).into_iter().map(|(id, _)| id).collect()
}

/// (instance id, pid) of live processes (group leaders) carrying a local instance's marker.
fn instance_pids(instances: &Path) -> Vec<(String, i32)> {
    let Ok(root) = std::fs::canonicalize(instances) else { return Vec::new() };
    let prefix = format!("{}/", root.display());
    let mut ids: Vec<(String, i32)> =
        kiln::hooks::process::find_by_env(kiln::provider::local::INSTANCE_MARKER, |v| {
            v.starts_with(&prefix)
        })
        .into_iter()
        .filter(|f| f.is_group_leader())
        .map(|f| (f.value[prefix.len()..].to_owned(), f.process.pid))
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_daemon_dying_right_after_spawning_an_instance_adopts_it_on_restart() {
    let test = "a_daemon_dying_right_after_spawning_an_instance_adopts_it_on_restart";
    if !require_git(test) || !have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let (app, run, hook) = app_files(&repo);
    let manifest = manifest("hooks/bake-dir");
    let sha = repo.commit_entries(
        "first image",
        &[
            Entry::File("kiln.yaml", &manifest),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/base/run", &run),
            Entry::File("image/base/app.py", &app),
        ],
    );
    let data = repo.scratch("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let instances = data.join("fleets/web/instances");

    // The daemon, told to die right after its first instance process starts.
    let log = data.with_extension("faulty.log");
    let mut faulty = Command::new(kiln_exe())
        .args(["run", "--repo", &repo.url(), "--data-dir"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--poll", "1s"])
        .env("KILN_FAULT", "launch-after-spawn")
        .env("KILN_LOG", "kiln=debug,info")
        .env_remove("KILN_API")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("log"))
        .spawn()
        .expect("start kiln run");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = faulty.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = faulty.kill();
            kill_leftovers(&data);
            panic!("the fault did not fire: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "the daemon aborted in the launch");
    let orphan = records(&instances);
    let processes = instance_pids(&instances);
    let cleanup = scopeguard(&data);
    assert_eq!(orphan.len(), 1, "one launch was under way: {orphan:?}");
    assert_eq!(orphan[0].1, "launching", "the crash came before the record said running");
    assert_eq!(processes.len(), 1, "its process runs, unknown to the record: {processes:?}");
    assert_eq!(processes[0].0, orphan[0].0);
    let orphan_pid = processes[0].1;

    // The restart.
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let terminal = ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];
    let log = daemon.wait_log("the first rollout to end", WAIT, |log| {
        for_commit(log, &sha)
            .iter()
            .any(|e| e["fleet"] == "web" && terminal.contains(&e["state"].as_str().unwrap_or("")))
    });
    let entry = for_commit(&log, &sha).into_iter().find(|e| e["fleet"] == "web").cloned();
    let entry = entry.expect("the fleet's rollout");
    assert_eq!(entry["state"], "succeeded", "{entry}\n{}", daemon.logs());
    assert!(log.iter().all(|e| e["state"] != "rolled_back"), "nothing was rolled back: {log:?}");

    // Every instance process is one kiln lists as running, the interrupted one among them, and
    // it was never started twice.
    let (code, out, err) = kiln(&data, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("status JSON");
    let listed: BTreeSet<String> = status
        .as_array()
        .and_then(|fleets| fleets.iter().find(|f| f["name"] == "web"))
        .and_then(|fleet| fleet["instances"].as_array())
        .map(|a| {
            a.iter()
                .filter(|i| i["running"] == true)
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed.len(), CAPACITY, "{status:#}");
    assert!(listed.contains(&orphan[0].0), "the interrupted instance was adopted: {status:#}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = instance_processes(&instances);
        let unique: BTreeSet<String> = running.iter().cloned().collect();
        if unique == listed && running.len() == listed.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance processes {running:?} differ from the instances kiln lists {listed:?}\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        instance_pids(&instances).contains(&(orphan[0].0.clone(), orphan_pid)),
        "the process started before the crash is the one serving (adopted, not replaced)"
    );
    let all = records(&instances);
    assert_eq!(all.len(), CAPACITY, "no instance was launched again or replaced: {all:?}");
    drop(daemon);
    drop(cleanup);
}

/// A bake hook that records every run's pid in `runs` and, on a first run, notes whether an
/// earlier run is still alive (`overlap`), starts a `setsid` child (pid in `escaped`) and hangs;
/// later runs bake with the shipped `hooks/bake-dir`.
const HANGING_BAKE: &str = r#"#!/bin/bash
set -u
runs="$TEST_HOOK_FILES/runs"
for pid in $(cat "$runs" 2>/dev/null); do
  # Alive and not a zombie (an unreaped corpse is not a run).
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  if [ -n "$state" ] && [ "$state" != Z ]; then echo "run $$ started while $pid runs" >> "$TEST_HOOK_FILES/overlap"; fi
done
first=0
[ -s "$runs" ] || first=1
echo $$ >> "$runs"
if [ $first = 1 ]; then
  setsid sh -c "echo \$\$ > '$TEST_HOOK_FILES/escaped'; exec sleep 1000" </dev/null >/dev/null 2>&1 &
  sleep 1000
fi
exec "$KILN_WORK_TREE/hooks/bake-dir"
"#;

fn pid_alive(pid: i32) -> bool {
    kiln::hooks::process::start_ticks(pid).is_some()
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_hook_left_running_by_a_killed_daemon_is_killed_before_it_runs_again() {
    let test = "a_hook_left_running_by_a_killed_daemon_is_killed_before_it_runs_again";
    if !require_git(test) || !have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let (app, run, hook) = app_files(&repo);
    let manifest = manifest("hooks/bake");
    let sha = repo.commit_entries(
        "first image",
        &[
            Entry::File("kiln.yaml", &manifest),
            Entry::Exec("hooks/bake", HANGING_BAKE),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/base/run", &run),
            Entry::File("image/base/app.py", &app),
        ],
    );
    let data = repo.scratch("data");
    let files = repo.scratch("hook-files");
    std::fs::create_dir_all(&files).expect("hook files dir");
    let cleanup = scopeguard(&data);
    let files_arg = files.display().to_string();
    // `--hook-env` passes the test's directory for the hook's notes through the clean env.
    let mut daemon = Daemon::start_with_env(
        &repo.url(),
        &data,
        &["--poll", "1s", "--hook-env", "TEST_HOOK_FILES"],
        &[("TEST_HOOK_FILES", &files_arg)],
    );
    let deadline = Instant::now() + WAIT;
    while read_pids(&files.join("runs")).is_empty() || read_pids(&files.join("escaped")).is_empty()
    {
        assert!(Instant::now() < deadline, "the hook did not start\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.kill9();
    let first = read_pids(&files.join("runs"))[0];
    let escaped = read_pids(&files.join("escaped"))[0];
    assert!(pid_alive(first) && pid_alive(escaped), "the hook outlives the killed daemon");

    daemon.start_again();
    let entry = wait_terminal(&daemon, &sha);
    assert_eq!(entry["state"], "succeeded", "{entry}\n{}", daemon.logs());
    let runs = read_pids(&files.join("runs"));
    assert_eq!(runs.len(), 2, "the hook ran again once: {runs:?}");
    let overlap = std::fs::read_to_string(files.join("overlap")).unwrap_or_default();
    assert!(overlap.is_empty(), "two runs of the stage overlapped: {overlap}");
    assert!(!pid_alive(first), "the first run was killed");
    assert!(!pid_alive(escaped), "its setsid child was killed too");
    drop(daemon);
    drop(cleanup);
}

/// Kills what a test left under `dir` when dropped (also on a failed assertion).
struct Cleanup<'a>(&'a Path);

fn scopeguard(dir: &Path) -> Cleanup<'_> {
    Cleanup(dir)
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        kill_leftovers(self.0);
    }
}
