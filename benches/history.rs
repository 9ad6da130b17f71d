//! History that costs nothing as it grows (issue 16): `cargo bench --bench history`.
//!
//! For each size (default 1,000 and 100,000 rollouts, `KILN_BENCH_ROLLOUTS=1000,100000`) a
//! fresh data dir is filled through kiln's own store API with one realistic finished rollout
//! (plan, images, rolling state with probes) and its events (`KILN_BENCH_EVENTS` each, default
//! 10: 1M events at 100k), copied, plus one commit record per 100 rollouts. Then the real
//! `kiln run` is started on it (a local bare repository, `fleets: []`) and measured:
//!
//! * push → commit recorded: `git push` to the bare repo returns → `GET /api/v1/commits?limit=1`
//!   names the new commit (the notify hint, fetch, record, plan), `KILN_BENCH_PUSHES` times;
//! * `GET /metrics`; `GET /api/v1/rollouts?limit=20` (the first page `kiln log` asks for);
//! * `kiln log` (first page) and `kiln show N` as processes, daemon running and stopped;
//! * daemon RSS two seconds after its API answers; store size on disk (allocated blocks).
//!
//! Then a first clone of a local repository of `KILN_BENCH_REPO_MB` (default 200, 0 skips;
//! 10,000 commits written with `git fast-import`) by kiln's mirror (`ensure_mirror` + `fetch`)
//! against `git clone --mirror`.
//!
//! Targets: push → recorded ≤ 20 ms p50 / 50 ms p99, /metrics ≤ 10 ms, log first page and show
//! ≤ 20 ms (running or stopped), RSS after start ≤ 40 MiB, local clone ≤ 1.5× git's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::model::{ImageRef, InstanceId, Revision, RolloutId};
use kiln::rollout::state::{Origin, Plan, Probe, Rolling, Rollout, RolloutState};
use kiln::store::{CommitKind, CommitRecord, Event, EventKind, Level, Store};

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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn git_out(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").current_dir(dir).args(args).output().expect("git");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository with `kiln.yaml` (`fleets: []`) on `main`, and a work tree pushing to it.
fn make_repo(root: &Path) -> (PathBuf, PathBuf) {
    let bare = root.join("infra.git");
    let work = root.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let ok = git(root, &["init", "--quiet", "--bare", "--initial-branch", "main", "infra.git"])
        && git(&work, &["init", "--quiet", "--initial-branch", "main"])
        && std::fs::write(work.join("kiln.yaml"), "fleets: []\n").is_ok()
        && git(&work, &["add", "kiln.yaml"])
        && git(&work, &["commit", "--quiet", "-m", "first"])
        && git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:refs/heads/main"]);
    assert!(ok, "could not create the bench repository (is git installed?)");
    (bare, work)
}

fn sample_rollout(i: usize, fleets: usize) -> Rollout {
    let t = kiln::model::now() - chrono::Duration::seconds(1_000_000 - i as i64 % 1_000_000);
    let instances: Vec<InstanceId> =
        (0..3).map(|n| InstanceId(format!("i-{:08x}{n}", i as u32))).collect();
    let probes = instances
        .iter()
        .map(|id| {
            let probe = Probe {
                since: t,
                ok_streak: 3,
                healthy_since: Some(t),
                last_at: Some(t),
                last_error: None,
            };
            (id.0.clone(), probe)
        })
        .collect();
    let image = ImageRef(format!("/var/lib/kiln/images/fleet-{}/app-{i:08}", i % fleets));
    Rollout {
        id: RolloutId(0),
        fleet: Some(format!("fleet-{}", i % fleets)),
        revision: Revision(format!("{:040x}", i as u128 * 0x9e37_79b9_7f4a_7c15)),
        summary: format!("Bump the app to build {i}"),
        trigger: "notify".into(),
        origin: Origin::Commit,
        state: RolloutState::Succeeded,
        paused_from: None,
        plan: Plan {
            bake: vec!["base".into(), "app".into()],
            reconcile: true,
            roll: true,
            reason: "app/ changed (tree 1a2b3c4 → 5d6e7f8)".into(),
        },
        image: Some(image.clone()),
        stage_images: [("base".to_owned(), image.clone()), ("app".to_owned(), image.clone())]
            .into(),
        previous_image: Some(ImageRef(format!("{}-prev", image.0))),
        outputs: [("lb_url".to_owned(), "http://127.0.0.1:8080".to_owned())].into(),
        reason: None,
        created_at: t,
        started_at: Some(t),
        finished_at: Some(t + chrono::Duration::seconds(42)),
        not_before: None,
        attempt: 0,
        rolling: Some(Rolling {
            done: instances.clone(),
            seen: instances.clone(),
            attached: instances,
            target: Some(image),
            next_slot: 3,
            canary_done: true,
            probes,
            last_progress: Some(t),
            ..Rolling::default()
        }),
        verified: None,
    }
}

fn sample_events(n: usize) -> Vec<Event> {
    let kinds = [
        (EventKind::Plan, "plan: bake base, app; reconcile; roll"),
        (EventKind::State, "pending → baking"),
        (EventKind::BakeStart, "bake app: ./images/app/bake.sh"),
        (EventKind::HookStdout, "==> app: Creating the image from the base layer"),
        (EventKind::BakeDone, "bake app done: /var/lib/kiln/images/app-1 (12.3 s)"),
        (EventKind::ReconcileStart, "reconcile: ./infra/apply.sh"),
        (EventKind::ReconcileDone, "reconcile done (4.1 s)"),
        (
            EventKind::Instance(kiln::store::InstanceAction::Launched),
            "launched i-0000001 on :41001",
        ),
        (EventKind::Instance(kiln::store::InstanceAction::Healthy), "i-0000001 healthy (3/3)"),
        (EventKind::State, "rolling → succeeded"),
    ];
    (0..n)
        .map(|i| {
            let (kind, message) = &kinds[i % kinds.len()];
            let data = (i % 3 == 0).then(|| serde_json::json!({"stage": "app", "seconds": 12.3}));
            Event::new(RolloutId(0), Level::Info, kind.clone(), *message, data)
        })
        .collect()
}

/// Fills `data` with `rollouts` rollouts and their events; returns the seconds it took.
fn fill(data: &Path, rollouts: usize, events: usize) -> f64 {
    let started = Instant::now();
    let store = Store::open(data, 0).expect("open the store");
    let fleets = 50;
    let template = sample_events(events);
    let mut i = 0;
    while i < rollouts {
        let n = 250.min(rollouts - i);
        let batch = (i..i + n).map(|k| (sample_rollout(k, fleets), template.clone())).collect();
        store.create_rollouts(batch).expect("fill");
        for k in (i..i + n).filter(|k| k % 100 == 0) {
            let r = sample_rollout(k, fleets);
            let commit = CommitRecord {
                revision: r.revision,
                parents: vec![],
                summary: r.summary,
                author: "bench <bench@kiln.invalid>".into(),
                committed_at: r.created_at,
                seen_at: r.created_at,
                kind: CommitKind::Push,
                trigger: "notify".into(),
                tip: true,
            };
            store.record_commit(&commit).expect("commit");
        }
        i += n;
    }
    started.elapsed().as_secs_f64()
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| allocated_bytes(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let at = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[at.min(samples.len() - 1)]
}

fn kiln(data: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_DATA_DIR", data)
        .env_remove("KILN_API")
        .output()
        .expect("run kiln");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// p50 of `n` timed runs of `kiln ARGS`, in ms.
fn time_kiln(data: &Path, args: &[&str], n: usize) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (ok, out) = kiln(data, args);
        assert!(ok, "kiln {args:?} failed: {out}");
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    percentile(&mut samples, 0.5)
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str) -> Option<String> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if !res.status().is_success() {
            return None;
        }
        res.text().await.ok()
    }

    /// p50 of `n` GETs, in ms.
    async fn time(&self, path: &str, n: usize) -> f64 {
        let mut samples = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            assert!(self.get(path).await.is_some(), "GET {path} failed");
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        percentile(&mut samples, 0.5)
    }
}

#[derive(Default)]
struct Row {
    rollouts: usize,
    events: usize,
    fill_s: f64,
    store_mib: f64,
    start_ms: f64,
    rss_mib: f64,
    push_p50: f64,
    push_p99: f64,
    metrics_ms: f64,
    page_api_ms: f64,
    log_running_ms: f64,
    show_running_ms: f64,
    log_stopped_ms: f64,
    show_stopped_ms: f64,
}

fn start_daemon(repo: &Path, data: &Path) -> Child {
    let log = std::fs::File::create(data.with_extension("log")).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--repo", repo.to_str().expect("utf-8"), "--data-dir"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--poll", "1h"])
        .env("KILN_LOG", "warn")
        .env_remove("KILN_API")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kiln run")
}

async fn measure(rollouts: usize, events: usize, pushes: usize) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bare, work) = make_repo(dir.path());
    let data = dir.path().join("data");
    let mut row = Row { rollouts, events: rollouts * events, ..Row::default() };
    eprintln!("filling {rollouts} rollouts, {} events ...", row.events);
    row.fill_s = fill(&data, rollouts, events);
    row.store_mib = allocated_bytes(&data.join("db")) as f64 / 1048576.0;

    let started = Instant::now();
    let mut child = start_daemon(&bare, &data);
    let deadline = Instant::now() + Duration::from_secs(600);
    let api = loop {
        assert!(Instant::now() < deadline, "the daemon did not answer");
        if let (Ok(info), Ok(token)) = (
            std::fs::read_to_string(data.join("daemon.json")),
            std::fs::read_to_string(data.join("token")),
        ) {
            let info: serde_json::Value = serde_json::from_str(&info).unwrap_or_default();
            if let Some(base) = info["api"].as_str() {
                let api = Api {
                    base: base.to_owned(),
                    token: token.trim().to_owned(),
                    http: reqwest::Client::new(),
                };
                if api.get("/api/v1/rollouts?limit=1").await.is_some() {
                    break api;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    row.start_ms = started.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    row.rss_mib = rss_kib(child.id()) as f64 / 1024.0;

    let mut samples = Vec::new();
    for n in 0..pushes {
        std::fs::write(work.join("notes.txt"), format!("push {n}\n")).expect("write");
        assert!(
            git(&work, &["add", "notes.txt"])
                && git(&work, &["commit", "--quiet", "-m", &format!("note {n}")])
        );
        let revision = git_out(&work, &["rev-parse", "HEAD"]);
        assert!(git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:main"]));
        let t = Instant::now();
        loop {
            let body = api.get("/api/v1/commits?limit=1").await.unwrap_or_default();
            if body.contains(&revision) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "push {n} was never recorded");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    row.push_p50 = percentile(&mut samples, 0.5);
    row.push_p99 = percentile(&mut samples, 0.99);
    row.metrics_ms = api.time("/metrics", 20).await;
    row.page_api_ms = api.time("/api/v1/rollouts?limit=20", 20).await;
    let show = (rollouts / 2).max(1).to_string();
    row.log_running_ms = time_kiln(&data, &["log"], 10);
    row.show_running_ms = time_kiln(&data, &["show", &show], 10);

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    row.log_stopped_ms = time_kiln(&data, &["log"], 10);
    row.show_stopped_ms = time_kiln(&data, &["show", &show], 10);
    row
}

/// A local repository of about `mb` MiB in 10,000 commits (incompressible blobs).
fn big_repo(root: &Path, mb: usize) -> PathBuf {
    let repo = root.join("big.git");
    assert!(git(root, &["init", "--quiet", "--bare", "--initial-branch", "main", "big.git"]));
    let commits = 10_000;
    let blob = mb * 1024 * 1024 / commits;
    let mut stream = Vec::with_capacity(mb * 1024 * 1024 + commits * 200);
    let mut rng = fastrand::Rng::with_seed(16);
    for n in 0..commits {
        let data: Vec<u8> = (0..blob).map(|_| rng.alphanumeric() as u8).collect();
        stream.extend_from_slice(b"commit refs/heads/main\n");
        stream.extend_from_slice(
            format!("committer bench <b@kiln.invalid> {} +0000\n", 1_700_000_000 + n).as_bytes(),
        );
        let message = format!("commit {n}\n");
        stream.extend_from_slice(format!("data {}\n{message}", message.len()).as_bytes());
        if n == 0 {
            stream.extend_from_slice(b"M 644 inline kiln.yaml\ndata 11\nfleets: []\n\n");
        }
        stream.extend_from_slice(format!("M 644 inline data/{:03}/{n}.txt\n", n % 500).as_bytes());
        stream.extend_from_slice(format!("data {}\n", data.len()).as_bytes());
        stream.extend_from_slice(&data);
        stream.extend_from_slice(b"\n\n");
    }
    let mut child = Command::new("git")
        .current_dir(&repo)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&stream).expect("feed fast-import");
    }
    assert!(child.wait().expect("fast-import").success());
    // One pack, as a served repository has after its gc.
    assert!(git(&repo, &["repack", "-a", "-d", "--quiet"]));
    repo
}

fn clone_comparison(mb: usize) -> Option<(f64, f64, f64)> {
    if mb == 0 {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    eprintln!("writing a {mb} MiB repository of 10,000 commits ...");
    let repo = big_repo(dir.path(), mb);
    let size = allocated_bytes(&repo) as f64 / 1048576.0;
    let url = repo.to_str().expect("utf-8");
    let t = Instant::now();
    assert!(git(dir.path(), &["clone", "--quiet", "--mirror", url, "git-mirror.git"]));
    let git_s = t.elapsed().as_secs_f64();
    let mirror = dir.path().join("kiln-mirror.git");
    let t = Instant::now();
    kiln::source::git::ensure_mirror(&mirror, url, "main").expect("ensure_mirror");
    let tip = kiln::source::git::fetch(&mirror, "main").expect("first fetch");
    let kiln_s = t.elapsed().as_secs_f64();
    assert!(tip.is_some(), "the first fetch found main");
    Some((size, git_s, kiln_s))
}

fn main() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("history bench: git is not installed; skipped");
        return;
    }
    let sizes: Vec<usize> = std::env::var("KILN_BENCH_ROLLOUTS")
        .unwrap_or_else(|_| "1000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let events = env_usize("KILN_BENCH_EVENTS", 10);
    let pushes = env_usize("KILN_BENCH_PUSHES", 30);
    let repo_mb = env_usize("KILN_BENCH_REPO_MB", 200);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let rows: Vec<Row> =
        sizes.iter().map(|&n| runtime.block_on(measure(n, events, pushes))).collect();

    let line = |name: &str, target: &str, f: &dyn Fn(&Row) -> String| {
        let cells: Vec<String> = rows.iter().map(|r| format!("{:>12}", f(r))).collect();
        println!("{name:<34}{}  {target}", cells.join(""));
    };
    println!();
    line("rollouts", "target", &|r| r.rollouts.to_string());
    line("events", "", &|r| r.events.to_string());
    line("fill through the store API (s)", "", &|r| format!("{:.1}", r.fill_s));
    line("store size (MiB)", "", &|r| format!("{:.1}", r.store_mib));
    line("daemon start → API answers (ms)", "", &|r| format!("{:.0}", r.start_ms));
    line("daemon RSS after start (MiB)", "≤ 40", &|r| format!("{:.1}", r.rss_mib));
    line("push → recorded p50 (ms)", "≤ 20", &|r| format!("{:.1}", r.push_p50));
    line("push → recorded p99 (ms)", "≤ 50", &|r| format!("{:.1}", r.push_p99));
    line("GET /metrics (ms)", "≤ 10", &|r| format!("{:.2}", r.metrics_ms));
    line("GET /rollouts?limit=20 (ms)", "", &|r| format!("{:.2}", r.page_api_ms));
    line("kiln log, daemon running (ms)", "≤ 20", &|r| format!("{:.1}", r.log_running_ms));
    line("kiln log, daemon stopped (ms)", "≤ 20", &|r| format!("{:.1}", r.log_stopped_ms));
    line("kiln show N, running (ms)", "≤ 20", &|r| format!("{:.1}", r.show_running_ms));
    line("kiln show N, stopped (ms)", "≤ 20", &|r| format!("{:.1}", r.show_stopped_ms));
    if let Some((size, git_s, kiln_s)) = clone_comparison(repo_mb) {
        println!();
        println!("first clone of a local {size:.0} MiB repository (10,000 commits):");
        println!("  git clone --mirror   {git_s:>8.2} s");
        println!(
            "  kiln first fetch     {kiln_s:>8.2} s   ({:.2}× git; target ≤ 1.5×)",
            kiln_s / git_s
        );
    }
}
