//! Issue 11: one reconciler per fleet. A provider whose calls take many seconds must not delay
//! a verb, a push or another fleet: verbs are answered while the slow call is in flight and take
//! effect at the next safe point, and the other fleet rolls as if nothing were slow.
//!
//! The provider is the exec provider on a fake cloud (`support::cloud`) whose calls sleep
//! `DELAY` seconds behind a marker file, so the tests see *that* a call is in flight instead of
//! timing anything.

// The test side is synchronous: it blocks between polls of the daemon, never in a runtime.
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cloud::{BAKE, CLOUD, call_in_flight, fleet_yaml};
use support::daemon::{Daemon, for_commit, kiln};
use support::git::{Entry, TestRepo, require_git};

const WAIT: Duration = Duration::from_secs(120);
/// Seconds every call of the slow fleet's provider takes once it is made slow.
const SLOW: f64 = 15.0;

fn manifest(state: &Path, slow_delay: f64) -> String {
    let state = state.display().to_string();
    format!(
        "fleets:\n{}{}",
        fleet_yaml("slow", 1, slow_delay, &state),
        fleet_yaml("fast", 1, 0.0, &state)
    )
}

fn entry(log: &[Value], sha: &str, fleet: &str) -> Option<Value> {
    for_commit(log, sha).into_iter().find(|e| e["fleet"] == fleet).cloned()
}

fn state(log: &[Value], sha: &str, fleet: &str) -> String {
    entry(log, sha, fleet).and_then(|e| e["state"].as_str().map(str::to_owned)).unwrap_or_default()
}

fn wait_state(daemon: &Daemon, sha: &str, fleet: &str, want: &str) -> Vec<Value> {
    daemon.wait_log(&format!("{fleet} at {sha} {want}"), WAIT, |log| state(log, sha, fleet) == want)
}

#[test]
fn a_slow_provider_delays_neither_verbs_nor_another_fleet() {
    if !require_git("a_slow_provider_delays_neither_verbs_nor_another_fleet")
        || !support::fleet::have_python3()
    {
        return;
    }
    let repo = TestRepo::new();
    let cloud = repo.scratch("cloud");
    std::fs::create_dir_all(&cloud).expect("cloud dir");
    let first = repo.commit_entries(
        "two fleets",
        &[
            Entry::File("kiln.yaml", &manifest(&cloud, 0.0)),
            Entry::Exec("hooks/cloud", CLOUD),
            Entry::Exec("hooks/bake", BAKE),
            Entry::File("slow/version", "1\n"),
            Entry::File("fast/version", "1\n"),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    wait_state(&daemon, &first, "slow", "succeeded");
    wait_state(&daemon, &first, "fast", "succeeded");

    // The slow fleet's provider turns slow with its next rollout.
    let slow_commit = repo.commit_entries(
        "slow fleet v2 on a slow cloud",
        &[Entry::File("kiln.yaml", &manifest(&cloud, SLOW)), Entry::File("slow/version", "2\n")],
    );
    let deadline = Instant::now() + WAIT;
    while !call_in_flight(&cloud, "slow") {
        assert!(
            Instant::now() < deadline,
            "the slow fleet never called its provider\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Pause is answered while the provider call is still sleeping, and takes effect at the
    // next safe point (after the call in flight returns).
    let (code, out, err) = kiln(&data, &["pause", "slow"]);
    assert_eq!(code, 0, "pause answered: {out}{err}");
    assert!(call_in_flight(&cloud, "slow"), "pause waited for the slow provider call");
    wait_state(&daemon, &slow_commit, "slow", "paused");

    // A push touching only the other fleet: it rolls while the slow fleet's provider is slow,
    // and the slow fleet's paused rollout stays as it is (nothing it tracks changed).
    let fast_commit = repo.commit("fast fleet v2", &[("fast/version", "2\n")]);
    let log = daemon.wait_log("the fast fleet's rollout to end", WAIT, |log| {
        matches!(state(log, &fast_commit, "fast").as_str(), "succeeded" | "failed" | "rolled_back")
    });
    assert_eq!(state(&log, &fast_commit, "fast"), "succeeded", "{log:#?}");
    assert_eq!(state(&log, &slow_commit, "slow"), "paused", "{log:#?}\n{}", daemon.logs());
    assert!(entry(&log, &fast_commit, "slow").is_none(), "an unrelated push replanned slow");

    // Resumed, the slow rollout calls its slow provider again; the fast fleet rolls meanwhile.
    let (code, out, err) = kiln(&data, &["resume", "slow"]);
    assert_eq!(code, 0, "resume answered: {out}{err}");
    let fast_again = repo.commit("fast fleet v3", &[("fast/version", "3\n")]);
    let deadline = Instant::now() + WAIT;
    while !call_in_flight(&cloud, "slow") {
        assert!(
            Instant::now() < deadline,
            "the resumed slow rollout never called\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.wait_log("the fast fleet's second rollout to end", WAIT, |log| {
        matches!(state(log, &fast_again, "fast").as_str(), "succeeded" | "failed" | "rolled_back")
    });
    assert_eq!(state(&log, &fast_again, "fast"), "succeeded", "{log:#?}");
    assert!(
        call_in_flight(&cloud, "slow"),
        "the fast fleet's rollout finished only after the slow fleet's provider call"
    );

    // Abort is answered while a call is in flight too, and ends the rollout at the next safe
    // point.
    let (code, out, err) = kiln(&data, &["abort", "slow"]);
    assert_eq!(code, 0, "abort answered: {out}{err}");
    assert!(call_in_flight(&cloud, "slow"), "abort waited for the slow provider call");
    let log = wait_state(&daemon, &slow_commit, "slow", "aborted");
    let aborted = entry(&log, &slow_commit, "slow").expect("entry");
    assert!(aborted["reason"].as_str().unwrap_or("").contains("aborted"), "{aborted}");
}
