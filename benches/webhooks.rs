//! Webhook throughput and latency against a real socket: `cargo bench --bench webhooks`.
//!
//! Starts the HTTP server on 127.0.0.1:0 in-process with a real source watcher on a local git
//! repository (poll 1 h, so every check during the run is caused by the deliveries), then sends
//! the documented GitLab push payload with 1,000 deliveries in flight at a time and reports:
//!
//! * POST → 202 latency p50 / p99 / max one delivery at a time (the service time), and under
//!   the burst (where it is mostly queueing: in-flight / throughput);
//! * accepted deliveries per second;
//! * how many remote checks (fetches) the burst caused: triggers coalesce in the source, so a
//!   burst of thousands of webhooks costs a handful of fetches, never one per delivery.
//!
//! Targets (release build): p50 ≤ 5 ms, ≥ 5,000 deliveries/s. Knobs: `KILN_BENCH_TOTAL`
//! (default 20,000) and `KILN_BENCH_CONCURRENCY` (default 1,000).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::operator::OperatorHandle;
use kiln::server::{AppState, Secret, ServerConfig, WebhookSecrets};
use kiln::source::{SourceConfig, SourceEvent, SourceHandle};
use kiln::store::Store;
use tokio::sync::mpsc;

const TOKEN: &str = "bench-token";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn git(dir: &Path, args: &[&str]) -> bool {
    Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@kiln.invalid")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A bare repository `infra.git` with one commit on `main`, or `None` without git.
fn make_repo(root: &Path) -> Option<String> {
    let bare = root.join("infra.git");
    let work = root.join("work");
    std::fs::create_dir_all(&work).ok()?;
    let ok = git(root, &["init", "--quiet", "--bare", "--initial-branch", "main", "infra.git"])
        && git(&work, &["init", "--quiet", "--initial-branch", "main"])
        && std::fs::write(work.join("kiln.yaml"), "fleets: []\n").is_ok()
        && git(&work, &["add", "kiln.yaml"])
        && git(&work, &["commit", "--quiet", "-m", "first"])
        && git(&work, &["push", "--quiet", bare.to_str()?, "HEAD:refs/heads/main"]);
    ok.then(|| bare.to_string_lossy().into_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let total = env_usize("KILN_BENCH_TOTAL", 20_000);
    let concurrency = env_usize("KILN_BENCH_CONCURRENCY", 1_000);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench(total, concurrency));
}

async fn bench(total: usize, concurrency: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (events_tx, mut events) = mpsc::channel::<SourceEvent>(64);
    let (source, watcher) = match make_repo(dir.path()) {
        Some(url) => {
            let config = SourceConfig {
                url,
                branch: "main".into(),
                mirror: dir.path().join("mirror.git"),
                poll: Duration::from_secs(3600),
            };
            (kiln::source::spawn(config, None, events_tx, shutdown.clone()), true)
        }
        None => {
            eprintln!("SKIP fetch counting: git is not installed; using a detached source");
            let (handle, mut hints) = SourceHandle::detached(SourceConfig {
                url: "/srv/git/infra.git".into(),
                branch: "main".into(),
                mirror: dir.path().join("mirror.git"),
                poll: Duration::from_secs(3600),
            });
            tokio::spawn(async move { while hints.recv().await.is_some() {} });
            (handle, false)
        }
    };
    if watcher {
        // The startup check: wait for it so it is not counted against the burst.
        let first = tokio::time::timeout(Duration::from_secs(30), events.recv()).await;
        assert!(first.is_ok(), "the source watcher did not report the initial commit in 30 s");
        tokio::spawn(async move { while events.recv().await.is_some() {} });
    }
    let url = source.config().url.clone();

    let (commands, _commands_rx) = mpsc::channel(1);
    let operator = OperatorHandle {
        store: Store::open(dir.path(), 0).expect("store"),
        source: source.clone(),
        commands,
        fleets: Default::default(),
        metrics: Default::default(),
    };
    let secrets = WebhookSecrets { gitlab_token: Some(Secret(TOKEN.into())), ..Default::default() };
    let config = ServerConfig {
        api_token: Secret("x".into()),
        secrets,
        max_body: kiln::server::DEFAULT_MAX_BODY,
        ..ServerConfig::default()
    };
    let state = AppState { operator, config: Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));

    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhooks/gitlab-push.json");
    let mut payload: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).expect("fixture")).expect("JSON");
    payload["ref"] = "refs/heads/main".into();
    payload["project"]["git_http_url"] = url.clone().into();
    payload["repository"]["name"] = "infra".into();
    let body = axum::body::Bytes::from(serde_json::to_vec(&payload).expect("JSON"));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let endpoint = format!("http://{addr}/hooks/gitlab");

    // Warm-up: open the connections.
    let warm = (0..concurrency.min(total)).map(|i| {
        let (client, endpoint, body) = (client.clone(), endpoint.clone(), body.clone());
        tokio::spawn(async move {
            client
                .post(&endpoint)
                .header("x-gitlab-event", "Push Hook")
                .header("x-gitlab-token", TOKEN)
                .header("idempotency-key", format!("warm-{i}"))
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    });
    for task in warm.collect::<Vec<_>>() {
        let _ = task.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let unloaded = run(&client, &endpoint, &body, 2_000, 1, "solo").await;
    let checks_before = source.checks();
    let loaded = run(&client, &endpoint, &body, total, concurrency, "burst").await;
    // Let the last coalesced check finish before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = source.checks() - checks_before;

    println!(
        "webhooks: real socket 127.0.0.1, documented GitLab push payload ({} bytes)",
        body.len()
    );
    println!(
        "  one at a time:    p50 {:.2?}  p99 {:.2?}  max {:.2?}  ({} deliveries)",
        unloaded.p50, unloaded.p99, unloaded.max, unloaded.accepted
    );
    println!(
        "  {concurrency} in flight:  {:.0} accepted deliveries/s ({} of {total} accepted, {:?} otherwise)",
        loaded.rate, loaded.accepted, loaded.other
    );
    println!(
        "                    p50 {:.2?}  p99 {:.2?}  max {:.2?}  (queueing: latency ≈ in-flight / throughput)",
        loaded.p50, loaded.p99, loaded.max
    );
    if watcher {
        println!(
            "  fetches caused:   {checks} remote checks for {} deliveries (coalesced)",
            loaded.accepted
        );
    }
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!(
        "  targets:          p50 ≤ 5 ms: {}; ≥ 5,000/s: {}",
        verdict(unloaded.p50 <= Duration::from_millis(5)),
        verdict(loaded.rate >= 5000.0)
    );
    shutdown.cancel();
}

/// What one phase measured.
struct Phase {
    accepted: usize,
    other: std::collections::BTreeMap<u16, usize>,
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// Sends `total` deliveries with at most `concurrency` in flight; ids are unique per phase.
async fn run(
    client: &reqwest::Client,
    endpoint: &str,
    body: &axum::body::Bytes,
    total: usize,
    concurrency: usize,
    phase: &str,
) -> Phase {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let (client, endpoint, body) = (client.clone(), endpoint.to_owned(), body.clone());
        let id = format!("{phase}-{i}");
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let res = client
                .post(&endpoint)
                .header("x-gitlab-event", "Push Hook")
                .header("x-gitlab-token", TOKEN)
                .header("idempotency-key", id)
                .body(body)
                .send()
                .await;
            let took = sent.elapsed();
            drop(permit);
            (res.map(|r| r.status().as_u16()).unwrap_or(0), took)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut accepted = 0usize;
    let mut other = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        let (status, took) = task.await.expect("task");
        latencies.push(took);
        if status == 202 {
            accepted += 1;
        } else {
            *other.entry(status).or_default() += 1;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Phase {
        accepted,
        other,
        rate: accepted as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: percentile(&latencies, 1.0),
    }
}
