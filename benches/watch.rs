//! Benchmark: push → recorded latency through the notify trigger, and the idle daemon's RSS.
//!
//! Runs the real `kiln run` on a real bare repository, pushes 50 commits with the `git` CLI
//! (spaced so each is measured alone) and, for each, measures from the moment the branch ref
//! changed on disk (the ref file's mtime, written by `git push`) to the moment kiln created the
//! log entry (`created_at`, written after the commit record was flushed). Then it reads the
//! daemon's VmRSS from /proc after it has been idle.
//!
//! `cargo bench --bench watch`

// The benchmark drives the real daemon synchronously, like the tests.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::daemon::Daemon;
use support::git::TestRepo;

const PUSHES: usize = 50;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() {
    let repo = TestRepo::new();
    repo.commit("first", &[("README", "0\n")]);
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1h"]);
    std::thread::sleep(Duration::from_secs(3));
    let idle_start = rss_kib(daemon.pid());

    let ref_file = repo.bare_path().join("refs/heads/main");
    let mut pushed: Vec<(String, chrono::DateTime<chrono::Utc>)> = Vec::new();
    for i in 0..PUSHES {
        let sha = repo.commit(&format!("push {i}"), &[("README", &format!("{i}\n"))]);
        let mtime: chrono::DateTime<chrono::Utc> =
            std::fs::metadata(&ref_file).and_then(|m| m.modified()).expect("ref mtime").into();
        pushed.push((sha, mtime));
        std::thread::sleep(Duration::from_millis(150));
    }
    let last = pushed.last().unwrap().0.clone();
    let log = daemon.wait_log("the last push", Duration::from_secs(30), |log| {
        log.iter().any(|e| e["commit"].as_str() == Some(&last))
    });
    let mut latencies: Vec<f64> = Vec::new();
    let mut missing = 0;
    for (sha, at) in &pushed {
        match log.iter().find(|e| e["commit"].as_str() == Some(sha)) {
            Some(entry) => {
                let created: chrono::DateTime<chrono::Utc> =
                    entry["created_at"].as_str().and_then(|s| s.parse().ok()).expect("created_at");
                latencies.push((created - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
            None => missing += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    std::thread::sleep(Duration::from_secs(3));
    let idle_after = rss_kib(daemon.pid());
    println!(
        "push → recorded over {} pushes (notify trigger, {} coalesced into a later fetch):",
        latencies.len(),
        missing
    );
    println!(
        "  p50 {:.1} ms   p95 {:.1} ms   max {:.1} ms",
        percentile(&latencies, 50.0),
        percentile(&latencies, 95.0),
        latencies.last().copied().unwrap_or(0.0)
    );
    println!(
        "idle daemon RSS: {:.1} MiB after start, {:.1} MiB after {PUSHES} pushes",
        idle_start as f64 / 1024.0,
        idle_after as f64 / 1024.0
    );
}
