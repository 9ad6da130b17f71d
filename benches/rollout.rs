//! Rollout benchmark: a 20-instance fleet (maxSurge 5) rolled onto a new image by the real
//! `kiln run` daemon, under steady load through the real `kiln lb`.
//!
//! Printed figures:
//! - **wall**: from the rollout entering `rolling` to `succeeded` (event timestamps).
//! - **health waits**: for each batch, from its first launch to the moment its slowest instance
//!   had passed the policy's health check (`instance.healthy`, which kiln records once the
//!   `healthyThreshold` streak and `minHealthy` are behind it), summed over batches. This is the
//!   time the policy itself asks for; **overhead** = wall − health waits is kiln's own cost
//!   (launching, attaching, draining and terminating old instances, bookkeeping), target ≤ 5%.
//! - **floor**: the same sum with the apps' own readiness instead of kiln's observation (each
//!   app logs when it starts answering `/healthz` 200; + (healthyThreshold − 1) × interval +
//!   minHealthy): what an ideal prober could not beat. wall − floor includes probe granularity.
//! - requests served and failed by the steady load during the rollout (target 0 failed).
//!
//! Run with `cargo bench --bench rollout` (`ROLLOUT_BENCH_CAPACITY`, `ROLLOUT_BENCH_SURGE`
//! override the fleet size and surge). Needs git and python3.

// The driver side is synchronous: it blocks between polls of the daemon, never in a runtime.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::git::{Entry, TestRepo, require_git};

/// The app: answers `/` with its image; `/healthz` 503 for `healthy-after` seconds, then 200.
/// It prints `ready_at=<unix seconds>` when it turns healthy (the floor of the health wait).
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
def setting(name, default):
    try:
        with open(os.path.join(HERE, name)) as f:
            return f.read().strip()
    except OSError:
        return default

IMAGE = os.path.basename(os.environ.get("KILN_IMAGE", "?"))
READY = time.monotonic() + float(setting("healthy-after", "0"))
WORK = os.getcwd()
print("ready_at=%.6f" % (time.time() + READY - time.monotonic()), flush=True)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def reply(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/healthz":
            self.reply(200 if time.monotonic() >= READY else 503, "ok\n")
        else:
            self.reply(200, "image=%s\n" % IMAGE)

def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

threading.Thread(target=watchdog, daemon=True).start()
Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";

const INTERVAL_MS: u64 = 200;
const THRESHOLD: u64 = 2;
const MIN_HEALTHY_MS: u64 = 500;

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn manifest(capacity: u32, surge: u32) -> String {
    format!(
        "fleets:
  - name: web
    image:
      stages:
        - {{ name: base, path: image/base, bake: hooks/bake-dir }}
        - {{ name: app, path: image/app, from: base, bake: hooks/bake-dir }}
    rollout:
      capacity: {capacity}
      maxSurge: {surge}
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: {INTERVAL_MS}ms, healthyThreshold: {THRESHOLD}, timeout: 60s }}
      minHealthy: {MIN_HEALTHY_MS}ms
      drain: 2s
      progressDeadline: 5m
      loadBalancer: {{ port: 0 }}
"
    )
}

fn at(event: &Value) -> DateTime<Utc> {
    event["at"].as_str().and_then(|t| t.parse().ok()).expect("event timestamp")
}

fn secs(delta: chrono::TimeDelta) -> f64 {
    delta.num_microseconds().unwrap_or(0) as f64 / 1e6
}

fn wait_terminal(daemon: &Daemon, sha: &str, timeout: Duration) -> Value {
    let terminal = ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];
    let log = daemon.wait_log("the rollout to end", timeout, |log| {
        for_commit(log, sha).iter().any(|e| terminal.contains(&e["state"].as_str().unwrap_or("")))
    });
    for_commit(&log, sha)[0].clone()
}

fn fleet_endpoint(data: &Path, capacity: usize, image: &str) -> Option<String> {
    let (code, out, _) = kiln(data, &["status", "--json"]);
    if code != 0 {
        return None;
    }
    let fleets: Value = serde_json::from_str(&out).ok()?;
    let fleet = fleets.as_array()?.first()?;
    let running = fleet["instances"]
        .as_array()?
        .iter()
        .filter(|i| i["running"] == true && i["attached"] == true && i["image"] == image)
        .count();
    (running == capacity).then(|| fleet["endpoint"].as_str().map(str::to_owned)).flatten()
}

/// Each app's `ready_at` from its log, by instance id.
fn ready_times(data: &Path) -> BTreeMap<String, f64> {
    let mut ready = BTreeMap::new();
    let dir = data.join("fleets/web/instances");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path().join("log")).unwrap_or_default();
        if let Some(t) = log.lines().find_map(|l| l.strip_prefix("ready_at=")) {
            if let Ok(t) = t.trim().parse::<f64>() {
                ready.insert(entry.file_name().to_string_lossy().into_owned(), t);
            }
        }
    }
    ready
}

fn main() {
    if !require_git("rollout bench") || !support::fleet::have_python3() {
        return;
    }
    let capacity = env_u32("ROLLOUT_BENCH_CAPACITY", 20);
    let surge = env_u32("ROLLOUT_BENCH_SURGE", 5);
    let repo = TestRepo::new();
    let hook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir"))
            .expect("hooks/bake-dir");
    let manifest = manifest(capacity, surge);
    let first = repo.commit_entries(
        "first",
        &[
            Entry::File("kiln.yaml", &manifest),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/base/run", RUN),
            Entry::File("image/base/app.py", APP),
            Entry::File("image/app/healthy-after", "1"),
            Entry::File("image/app/message", "one"),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let data = std::fs::canonicalize(&data).expect("data dir");
    let entry = wait_terminal(&daemon, &first, Duration::from_secs(180));
    assert_eq!(entry["state"], "succeeded", "first deploy: {entry}");
    let v1 = entry["image"].as_str().expect("image").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let endpoint = loop {
        if let Some(endpoint) = fleet_endpoint(&data, capacity as usize, &v1) {
            break endpoint;
        }
        assert!(Instant::now() < deadline, "the first image never served:\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(200));
    };

    // Steady load: 4 clients, 5 ms apart, from their own runtime.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        let url = format!("{endpoint}/");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let client = support::fleet::http_client();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let (client, url, stop, ok, failed, errors) = (
                        client.clone(),
                        url.clone(),
                        stop.clone(),
                        ok.clone(),
                        failed.clone(),
                        errors.clone(),
                    );
                    tasks.spawn(async move {
                        while !stop.load(Ordering::SeqCst) {
                            match support::fleet::get(&client, &url).await {
                                Some((status, _)) if (200..300).contains(&status) => {
                                    ok.fetch_add(1, Ordering::SeqCst);
                                }
                                other => {
                                    failed.fetch_add(1, Ordering::SeqCst);
                                    let mut errors = errors.lock().expect("errors");
                                    if errors.len() < 5 {
                                        errors.push(format!("{other:?}"));
                                    }
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (ok_before, failed_before) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));

    let committed = Instant::now();
    let second = repo.commit("second", &[("image/app/message", "two")]);
    let entry = wait_terminal(&daemon, &second, Duration::from_secs(600));
    let end_to_end = committed.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    load.join().expect("load thread");
    assert_eq!(entry["state"], "succeeded", "{entry}\n{}", daemon.logs());
    let v2 = entry["image"].as_str().expect("image").to_owned();
    let id = entry["id"].as_u64().expect("id");
    let (code, out, err) = kiln(&data, &["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "kiln show: {err}");
    let shown: Value = serde_json::from_str(&out).expect("show json");
    let events = shown["events"].as_array().cloned().unwrap_or_default();

    let state_at = |to: &str| {
        events
            .iter()
            .find(|e| e["kind"] == "state" && e["data"]["to"] == to)
            .map(at)
            .unwrap_or_else(|| panic!("no transition to {to}: {events:#?}"))
    };
    let (rolling, succeeded) = (state_at("rolling"), state_at("succeeded"));
    if std::env::var("ROLLOUT_BENCH_TIMELINE").is_ok() {
        for e in &events {
            let t = secs(at(e) - rolling);
            println!(
                "  {t:>8.3}s {:<20} {}",
                e["kind"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            );
        }
    }
    let wall = secs(succeeded - rolling);

    // Batches: the `batch N` timeline entries split the launches.
    let batch_starts: Vec<DateTime<Utc>> = events
        .iter()
        .filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with("batch ")))
        .map(at)
        .collect();
    let new_events = |kind: &str| -> BTreeMap<String, DateTime<Utc>> {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["data"]["image"] == v2.as_str())
            .filter_map(|e| Some((e["data"]["instance"].as_str()?.to_owned(), at(e))))
            .collect()
    };
    let (launched, healthy) = (new_events("instance.launched"), new_events("instance.healthy"));
    let ready = ready_times(&data);
    let policy_tail =
        (THRESHOLD - 1) as f64 * INTERVAL_MS as f64 / 1e3 + MIN_HEALTHY_MS as f64 / 1e3;
    let mut health_waits = 0.0;
    let mut floor = 0.0;
    for (i, start) in batch_starts.iter().enumerate() {
        let end = batch_starts.get(i + 1).copied().unwrap_or(succeeded);
        let members: Vec<&String> =
            launched.iter().filter(|(_, t)| *t >= start && *t < &end).map(|(id, _)| id).collect();
        let Some(first_launch) = members.iter().map(|id| launched[*id]).min() else { continue };
        let slowest = members.iter().filter_map(|id| healthy.get(*id)).max().copied();
        let ready_last =
            members.iter().filter_map(|id| ready.get(*id)).fold(f64::MIN, |a, b| a.max(*b));
        let first_launch_unix = first_launch.timestamp_micros() as f64 / 1e6;
        let wait = slowest.map(|s| secs(s - first_launch)).unwrap_or(0.0);
        let ideal = (ready_last - first_launch_unix).max(0.0) + policy_tail;
        eprintln!(
            "batch {}: {} instance(s), health wait {wait:.3}s (floor {ideal:.3}s)",
            i + 1,
            members.len()
        );
        health_waits += wait;
        floor += ideal;
    }
    let served = ok.load(Ordering::SeqCst) - ok_before;
    let failed_n = failed.load(Ordering::SeqCst) - failed_before;
    println!("rollout of {capacity} instances, maxSurge {surge}, {} batches:", batch_starts.len());
    println!("  commit → succeeded        {:.3}s", end_to_end.as_secs_f64());
    println!("  wall (rolling)            {wall:.3}s");
    println!("  sum of health waits       {health_waits:.3}s");
    println!(
        "  kiln overhead             {:.3}s ({:.1}% of wall)",
        wall - health_waits,
        100.0 * (wall - health_waits) / wall
    );
    println!(
        "  floor (apps' readiness)   {floor:.3}s; wall − floor {:.3}s ({:.1}%)",
        wall - floor,
        100.0 * (wall - floor) / wall
    );
    println!("  requests served {served}, failed {failed_n}");
    if failed_n > 0 {
        println!("  first failures: {:?}", errors.lock().expect("errors"));
    }
    drop(daemon);
}
