//! Operator benchmark: how fast kiln acknowledges work when its providers are slow, and how its
//! cost grows with the number of fleets. Real `kiln run` daemon, real git pushes, the exec
//! provider backed by a small fake cloud (`tests/support/cloud.rs`: python with a per-call `DELAY`
//! for the slow scenario, POSIX sh for the many-fleet one; instances judged by its `health`
//! operation).
//!
//! Scenario `slow` (`OPERATOR_BENCH_DELAY`, default 30 s per provider call): fleet `slow` rolls
//! through that provider while fleet `fast` (same cloud, no delay) is pushed to repeatedly.
//! Printed: latency of `pause`/`resume`/`abort` against the slow fleet while its provider calls
//! are in flight (answered, p50/p99/max); push → rollout recorded for the fast fleet (from the
//! start of the push to the rollout record's `created_at`); the fast fleet's rollout duration with
//! the slow fleet busy vs. idle.
//!
//! Scenario `fleets` (`OPERATOR_BENCH_FLEETS`, default 1000): one manifest with N fleets.
//! Printed: `kiln validate` time, first push (all N fleets) → all rollouts recorded, a push
//! touching one fleet → its rollout recorded (p50/p99 over several pushes), then idle CPU and
//! RSS of the daemon over 60 s.
//!
//! Run: `cargo bench --bench operator` (both), or `OPERATOR_BENCH=slow|fleets`. Needs git and
//! python3.

// The driver side is synchronous: it blocks between polls of the daemon, never in a runtime.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, kiln};
use support::git::{Entry, TestRepo, require_git};

use support::cloud::{BAKE, CLOUD, CLOUD_SH, fleet_yaml};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(label: &str, mut values: Vec<f64>) {
    values.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{label}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        values.len(),
        percentile(&values, 0.5),
        percentile(&values, 0.99),
        values.last().copied().unwrap_or(f64::NAN)
    );
}

struct Api {
    base: String,
    token: String,
    data: std::path::PathBuf,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn new(daemon: &Daemon) -> Api {
        let base = daemon.api_url().expect("daemon API");
        let token = std::fs::read_to_string(daemon.data_dir.join("token")).expect("token");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .expect("http client");
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Api { base, token: token.trim().to_owned(), data: daemon.data_dir.clone(), http, rt }
    }

    fn get(&self, path: &str) -> Value {
        let request = self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.token);
        self.rt
            .block_on(async { request.send().await?.json::<Value>().await })
            .unwrap_or(Value::Null)
    }

    /// `kiln VERB FLEET` as a user runs it; returns its exit code and how long it took.
    fn verb(&self, fleet: &str, verb: &str) -> (i32, Duration) {
        let started = Instant::now();
        let (code, _, _) = kiln(&self.data, &[verb, fleet]);
        (code, started.elapsed())
    }

    /// Rollouts of `fleet` (or all) at commit `sha` (only fleet rollouts, not commit entries).
    fn rollouts_for(&self, sha: &str, fleet: Option<&str>) -> Vec<Value> {
        let query = fleet.map(|f| format!("&fleet={f}")).unwrap_or_default();
        let page = self.get(&format!("/api/v1/rollouts?limit=1000&commit={sha}{query}"));
        let items = match &page {
            Value::Array(items) => items.clone(),
            Value::Object(map) => {
                map.get("rollouts").and_then(|v| v.as_array()).cloned().unwrap_or_default()
            }
            _ => Vec::new(),
        };
        items.into_iter().filter(|r| !r["fleet"].is_null()).collect()
    }
}

fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn state_of(rollout: &Value) -> String {
    rollout["state"].as_str().unwrap_or("?").to_owned()
}

fn terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "rolled_back" | "superseded" | "aborted" | "skipped")
}

/// Pushes a change to `fleet` and returns (sha, push → recorded).
fn push_and_time(repo: &TestRepo, api: &Api, fleet: &str, n: usize) -> (String, Duration) {
    let content = format!("{n}\n");
    let path = format!("{fleet}/version");
    let sha = repo.commit_local(&format!("{fleet} v{n}"), &[Entry::File(&path, &content)]);
    let pushed_at = chrono::Utc::now();
    repo.push();
    let rollout = wait("the rollout record", Duration::from_secs(120), || {
        api.rollouts_for(&sha, Some(fleet)).into_iter().next()
    });
    (sha, recorded_after(&rollout, pushed_at))
}

/// From the moment the push started to the rollout record's `created_at` (same clock), so the
/// benchmark's own polling of the API does not count.
fn recorded_after(rollout: &Value, pushed_at: chrono::DateTime<chrono::Utc>) -> Duration {
    rollout["created_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|at| (at.with_timezone(&chrono::Utc) - pushed_at).to_std().ok())
        .unwrap_or_default()
}

fn rollout_duration(api: &Api, sha: &str, fleet: &str) -> Duration {
    wait("the rollout to finish", Duration::from_secs(600), || {
        let rollouts = api.rollouts_for(sha, Some(fleet));
        let r = rollouts.first()?;
        if !terminal(&state_of(r)) {
            return None;
        }
        let at = |k: &str| r[k].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let (start, end) = (at("created_at")?, at("finished_at")?);
        Some((end - start).to_std().unwrap_or_default())
    })
}

fn slow(repo: &TestRepo, data: &std::path::Path) {
    let delay: f64 =
        std::env::var("OPERATOR_BENCH_DELAY").ok().and_then(|d| d.parse().ok()).unwrap_or(30.0);
    let state = data.with_extension("cloud");
    std::fs::create_dir_all(&state).expect("cloud state dir");
    let state = state.display().to_string();
    let manifest = |slow_delay: f64| {
        format!(
            "fleets:\n{}{}",
            fleet_yaml("slow", 2, slow_delay, &state),
            fleet_yaml("fast", 2, 0.0, &state)
        )
    };
    let first = repo.commit_entries(
        "fleets",
        &[
            Entry::File("kiln.yaml", &manifest(0.0)),
            Entry::Exec("hooks/cloud", CLOUD),
            Entry::Exec("hooks/bake", BAKE),
            Entry::File("slow/version", "0\n"),
            Entry::File("fast/version", "0\n"),
        ],
    );
    let daemon = Daemon::start(&repo.url(), data, &["--poll", "1h"]);
    let api = Api::new(&daemon);
    // The first deployment of both fleets, on a quick cloud.
    let baseline = rollout_duration(&api, &first, "fast");
    println!("slow: fast fleet's first rollout: {:.2} s", baseline.as_secs_f64());
    rollout_duration(&api, &first, "slow");

    // The slow fleet's cloud turns slow: every call takes `delay`.
    println!("slow: provider delay {delay} s per call from now on");
    let sha = repo.commit_local(
        "slow cloud",
        &[Entry::File("kiln.yaml", &manifest(delay)), Entry::File("slow/version", "1\n")],
    );
    let pushed_at = chrono::Utc::now();
    repo.push();
    let rollout = wait("the slow rollout record", Duration::from_secs(120), || {
        api.rollouts_for(&sha, Some("slow")).into_iter().next()
    });
    let slow_recorded = recorded_after(&rollout, pushed_at);
    let slow_sha = sha;
    println!(
        "slow: push → slow fleet's rollout recorded: {:.1} ms",
        slow_recorded.as_secs_f64() * 1e3
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut verbs = Vec::new();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new(); // verb + exit code
    for i in 0..20 {
        let verb = if i % 2 == 0 { "pause" } else { "resume" };
        let (status, took) = api.verb("slow", verb);
        *statuses.entry(format!("{verb} {status}")).or_default() += 1;
        verbs.push(took.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Meanwhile the fast fleet is pushed to: recorded and rolled as if the slow one were idle.
    let mut recorded = Vec::new();
    let mut durations = Vec::new();
    // Each push also gives the slow fleet (behind the tip) a rollout superseding the last one.
    let mut last = slow_sha.clone();
    for n in 1..=10 {
        let (sha, took) = push_and_time(repo, &api, "fast", n);
        recorded.push(took.as_secs_f64() * 1e3);
        durations.push(rollout_duration(&api, &sha, "fast").as_secs_f64());
        last = sha;
    }
    let (status, took) = api.verb("slow", "abort");
    *statuses.entry(format!("abort {status}")).or_default() += 1;
    verbs.push(took.as_secs_f64() * 1e3);
    summary("slow: verbs against the slow fleet answered", verbs);
    println!("slow: verb answers: {statuses:?}");
    summary("slow: push → fast fleet's rollout recorded (slow fleet busy)", recorded);
    durations.sort_by(|a, b| a.total_cmp(b));
    println!(
        "slow: fast fleet's rollout with the slow fleet busy: p50 {:.2} s, max {:.2} s",
        percentile(&durations, 0.5),
        durations.last().copied().unwrap_or(f64::NAN)
    );
    let aborted_at = Instant::now();
    let ended = wait("the slow rollout to end", Duration::from_secs(3600), || {
        api.rollouts_for(&last, Some("slow")).first().map(state_of).filter(|s| terminal(s))
    });
    println!(
        "slow: abort took effect after {:.1} s (next safe point: the provider call in flight), state {ended}",
        aborted_at.elapsed().as_secs_f64()
    );
    drop(daemon);
}

fn fleets(repo: &TestRepo, data: &std::path::Path) {
    let n: usize =
        std::env::var("OPERATOR_BENCH_FLEETS").ok().and_then(|d| d.parse().ok()).unwrap_or(1000);
    let state = data.with_extension("cloud");
    std::fs::create_dir_all(&state).expect("cloud state dir");
    let state = state.display().to_string();
    let mut manifest = String::from("fleets:\n");
    let mut files = Vec::new();
    for i in 0..n {
        manifest.push_str(&fleet_yaml(&format!("f{i}"), 2, 0.0, &state));
        files.push((format!("f{i}/version"), "0\n".to_owned()));
    }
    let mut entries = vec![
        Entry::File("kiln.yaml", &manifest),
        Entry::Exec("hooks/cloud", CLOUD_SH),
        Entry::Exec("hooks/bake", BAKE),
    ];
    entries.extend(files.iter().map(|(p, c)| Entry::File(p, c)));
    let first = repo.commit_local(&format!("{n} fleets"), &entries);

    let started = Instant::now();
    let (code, out, err) = kiln(data, &["validate", &repo.work_path().display().to_string()]);
    let validate = started.elapsed();
    if code == 0 {
        println!("fleets: kiln validate at {n} fleets: {:.1} ms", validate.as_secs_f64() * 1e3);
    } else {
        println!("fleets: kiln validate failed ({code}): {out}{err}");
    }

    let daemon = Daemon::start(&repo.url(), data, &["--poll", "1h"]);
    let api = Api::new(&daemon);
    let pushed_at = chrono::Utc::now();
    repo.push();
    let all = wait("all rollouts recorded", Duration::from_secs(600), || {
        let all = api.rollouts_for(&first, None);
        (all.len() >= n).then_some(all)
    });
    let last = all.iter().map(|r| recorded_after(r, pushed_at)).max().unwrap_or_default();
    println!(
        "fleets: push touching all {n} fleets → all {n} rollouts recorded (last created_at − push start): {:.2} s",
        last.as_secs_f64()
    );
    let started = Instant::now();
    wait("all first rollouts finished", Duration::from_secs(3600), || {
        let all = api.rollouts_for(&first, None);
        (all.len() >= n && all.iter().all(|r| terminal(&state_of(r)))).then_some(())
    });
    let mut states = std::collections::BTreeMap::<String, usize>::new();
    for r in api.rollouts_for(&first, None) {
        *states.entry(state_of(&r)).or_default() += 1;
    }
    println!(
        "fleets: … and all finished after another {:.1} s: {states:?}",
        started.elapsed().as_secs_f64()
    );

    let mut recorded = Vec::new();
    for k in 1..=10 {
        let fleet = format!("f{}", (k * 97) % n);
        let (_, took) = push_and_time(repo, &api, &fleet, k);
        recorded.push(took.as_secs_f64() * 1e3);
    }
    summary(&format!("fleets: push touching one of {n} fleets → its rollout recorded"), recorded);

    // Idle: let the last rollouts finish, then measure.
    std::thread::sleep(Duration::from_secs(20));
    let pid = daemon.pid();
    let ticks = |pid: i32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let before = ticks(pid).unwrap_or(0);
    let window = Duration::from_secs(60);
    std::thread::sleep(window);
    let after = ticks(pid).unwrap_or(0);
    let cpu = (after - before) as f64 / 100.0 / window.as_secs_f64() * 100.0;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN);
    println!(
        "fleets: idle at {n} fleets over {}s: {cpu:.2}% of a core, RSS {:.1} MiB",
        window.as_secs(),
        rss / 1024.0
    );
    drop(daemon);
}

fn main() {
    if !require_git("operator bench") || !support::fleet::have_python3() {
        return;
    }
    let which = std::env::var("OPERATOR_BENCH").unwrap_or_default();
    if which.is_empty() || which == "slow" {
        let repo = TestRepo::new();
        let data = repo.scratch("data-slow");
        slow(&repo, &data);
    }
    if which.is_empty() || which == "fleets" {
        let repo = TestRepo::new();
        let data = repo.scratch("data-fleets");
        fleets(&repo, &data);
    }
}
