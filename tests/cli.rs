//! The built `kiln` binary: exit codes, `validate` output, `log`/`show` offline from a store,
//! the daemon-needed errors, and `--help`. `cli::run` is also called in-process for the
//! renderings that need no process.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kiln::model::{ImageRef, Revision, RolloutId};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::server::api::RolloutDto;
use kiln::store::{EventKind, InstanceAction, Level, Store};

/// Runs the binary with `args` against `data_dir`, isolated from the caller's KILN_* variables.
fn kiln(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_DATA_DIR", data_dir)
        .env_remove("KILN_API")
        .env_remove("KILN_TOKEN")
        .env("NO_COLOR", "1")
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

const GOOD: &str = "\
fleets:
  - name: web
    paths: [image/]
    image:
      stages:
        - { name: app, path: image/app, bake: hooks/bake }
    rollout:
      provider: local
      capacity: 2
";

#[test]
fn validate_accepts_a_good_manifest() {
    let repo = tempfile::tempdir().expect("temp dir");
    write(&repo.path().join("kiln.yaml"), GOOD, 0o644);
    write(&repo.path().join("hooks/bake"), "#!/bin/sh\n", 0o755);
    write(&repo.path().join("image/app/file"), "x\n", 0o644);
    let (code, out, err) = kiln(repo.path(), &["validate", repo.path().to_str().unwrap()]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out.trim(), "kiln.yaml: ok (1 fleet)");
}

#[test]
fn validate_reports_problems_with_line_and_column() {
    let repo = tempfile::tempdir().expect("temp dir");
    // A typo'd field: serde rejects it with its position.
    let typo = GOOD.replace("capacity: 2", "capacty: 2");
    write(&repo.path().join("kiln.yaml"), &typo, 0o644);
    write(&repo.path().join("hooks/bake"), "#!/bin/sh\n", 0o755);
    // Problems go to stderr, as the README says; stdout stays empty.
    let (code, stdout, out) = kiln(repo.path(), &["validate", repo.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(stdout, "", "problems are printed on stderr");
    let first = out.lines().next().unwrap_or("");
    let parts: Vec<&str> = first.splitn(4, ':').collect();
    assert_eq!(parts[0], "kiln.yaml", "{out}");
    assert!(parts[1].parse::<usize>().unwrap_or(0) >= 9, "line of the typo in {first}");
    assert!(parts[2].parse::<usize>().unwrap_or(0) > 0, "column in {first}");
    assert!(first.contains("capacty"), "{first}");

    // A semantic problem: the bake hook is not in the repo.
    std::fs::write(repo.path().join("kiln.yaml"), GOOD).unwrap();
    std::fs::remove_file(repo.path().join("hooks/bake")).unwrap();
    let (code, _, out) = kiln(repo.path(), &["validate", repo.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    // `validate` reads a working tree, not a commit, and says so.
    assert!(
        out.lines().any(|l| l.starts_with("kiln.yaml:6:")
            && l.contains("hooks/bake")
            && l.contains("does not exist in the working tree")),
        "{out}"
    );

    let (code, _, err) = kiln(repo.path(), &["validate", "/nonexistent/kiln-repo"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("kiln: error: cannot read /nonexistent/kiln-repo/kiln.yaml"), "{err}");
}

fn rollout(fleet: &str, commit: &str, state: RolloutState) -> Rollout {
    let now = kiln::model::now();
    Rollout {
        id: RolloutId(0),
        fleet: Some(fleet.into()),
        revision: Revision(format!("{commit:0<40}")),
        summary: format!("change {commit}"),
        trigger: "poll".into(),
        origin: Origin::Commit,
        state,
        paused_from: None,
        plan: Plan::default(),
        image: Some(ImageRef(format!("img-{commit}"))),
        stage_images: Default::default(),
        previous_image: None,
        outputs: Default::default(),
        reason: (state == RolloutState::Failed).then(|| "health check failed".to_owned()),
        created_at: now,
        started_at: Some(now),
        finished_at: state.is_terminal().then_some(now),
        not_before: None,
        attempt: 0,
        rolling: None,
        verified: None,
    }
}

/// A data dir with a store holding three rollouts (the store is closed on return).
fn filled_data_dir() -> (tempfile::TempDir, Vec<RolloutId>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), 0).expect("store");
    let ids: Vec<RolloutId> = [
        ("web", "aa11", RolloutState::Succeeded),
        ("api", "bb22", RolloutState::Failed),
        ("web", "cc33", RolloutState::Rolling),
    ]
    .into_iter()
    .map(|(f, c, s)| store.create_rollout(rollout(f, c, s)).expect("create").id)
    .collect();
    store
        .append_event(
            ids[1],
            Level::Error,
            EventKind::Instance(InstanceAction::Unhealthy),
            "web-2 unhealthy after 30s",
            None,
        )
        .expect("event");
    store.flush().expect("flush");
    drop(store);
    (dir, ids)
}

#[test]
fn log_json_reads_the_store_when_no_daemon_runs() {
    let (dir, ids) = filled_data_dir();
    let (code, out, err) = kiln(dir.path(), &["log", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rollouts: Vec<RolloutDto> = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(
        rollouts.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[2].0, ids[1].0, ids[0].0]
    );
    assert_eq!(rollouts[1].state, RolloutState::Failed);
    assert_eq!(rollouts[1].reason.as_deref(), Some("health check failed"));

    let (code, out, _) = kiln(dir.path(), &["log", "--json", "--fleet", "web", "--limit", "1"]);
    assert_eq!(code, 0);
    let rollouts: Vec<RolloutDto> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(rollouts.len(), 1);
    assert_eq!(rollouts[0].commit, format!("{:0<40}", "cc33"));

    let (code, out, _) = kiln(dir.path(), &["log"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE"), "{out}");
    assert!(lines[1].contains(&format!("#{}", ids[2].0)) && lines[1].contains("rolling"), "{out}");
    assert!(lines[2].contains("cc33") || lines[2].contains("bb220000"), "{out}");

    let (code, out, _) = kiln(dir.path(), &["show", &ids[1].to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("failed") && out.contains("web-2 unhealthy after 30s"), "{out}");
    let (code, _, err) = kiln(dir.path(), &["show", "#999999"]);
    assert_eq!((code, err.trim()), (1, "kiln: no rollout #999999"));
    // A fleet kiln never heard of is named as such, not as one with no rollouts yet.
    let (code, _, err) = kiln(dir.path(), &["log", "--fleet", "nosuch"]);
    assert_eq!((code, err.trim()), (1, "kiln: no fleet `nosuch` (fleets: api, web)"));
}

#[test]
fn nothing_to_show_and_missing_daemon_have_clear_exits() {
    let empty = tempfile::tempdir().expect("temp dir");
    let (code, _, err) = kiln(empty.path(), &["log"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("kiln: error: no kiln daemon runs for"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    Store::open(empty.path(), 0).expect("store").flush().expect("flush");
    let (code, out, _) = kiln(empty.path(), &["log", "--json"]);
    assert_eq!((code, out.trim()), (1, "[]"));

    let (code, _, err) = kiln(empty.path(), &["pause", "web"]);
    assert_eq!(code, 2);
    assert!(err.contains("`kiln pause` needs a running daemon"), "{err}");

    // A daemon.json whose pid is alive but whose API does not answer.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let daemon = format!(r#"{{"pid": {}, "api": "http://127.0.0.1:{port}"}}"#, std::process::id());
    std::fs::write(empty.path().join("daemon.json"), daemon).unwrap();
    let (code, _, err) = kiln(empty.path(), &["status"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not reachable at http://127.0.0.1"), "{err}");
}

#[test]
fn help_lists_the_verbs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, out, _) = kiln(dir.path(), &["--help"]);
    assert_eq!(code, 0);
    for verb in [
        "run", "log", "show", "status", "validate", "pause", "resume", "abort", "rollback",
        "trigger",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(verb)),
            "{verb} missing from:\n{out}"
        );
    }
    assert!(!out.contains(" lb "), "lb is hidden");
    let (code, out, _) = kiln(dir.path(), &["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--github-secret-file") && out.contains("KILN_GITHUB_SECRET"), "{out}");
    let (code, _, err) = kiln(dir.path(), &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn run_renders_log_in_process() {
    use clap::Parser as _;
    let (dir, ids) = filled_data_dir();
    let cli = kiln::cli::Cli::try_parse_from([
        "kiln",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "log",
        "--fleet",
        "api",
    ])
    .expect("parse");
    let mut out = Vec::new();
    let code = kiln::cli::run(cli, &mut out).await.expect("run");
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains(&format!("#{}", ids[1].0)) && text.contains("(health check failed)"),
        "{text}"
    );
    assert!(!text.contains("\x1b["), "no colour unless asked");
}

/// A real API server on 127.0.0.1 over a store in `dir`; verbs are answered with rollout #42
/// and recorded in the returned channel.
async fn serve_api(
    dir: &Path,
) -> (
    String,
    Store,
    tokio_util::sync::CancellationToken,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use kiln::server::{AppState, Secret, ServerConfig};
    let (source, _hints) = kiln::source::SourceHandle::detached(kiln::source::SourceConfig {
        url: "/srv/git/infra.git".into(),
        branch: "main".into(),
        mirror: dir.join("mirror.git"),
        poll: std::time::Duration::from_secs(60),
    });
    let store = Store::open(dir, 0).expect("store");
    let (commands, mut rx) = tokio::sync::mpsc::channel::<kiln::operator::CommandRequest>(4);
    let operator = kiln::operator::OperatorHandle {
        store: store.clone(),
        source,
        commands,
        fleets: Default::default(),
        metrics: Default::default(),
    };
    let config = ServerConfig { api_token: Secret("cli-token".into()), ..ServerConfig::default() };
    let state = AppState { operator, config: std::sync::Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            let _ = seen_tx.send(format!("{:?}", request.command));
            let _ = request.reply.send(Ok(RolloutId(42)));
        }
    });
    (base, store, shutdown, seen)
}

async fn run_cli(args: &[&str]) -> (std::process::ExitCode, String) {
    use clap::Parser as _;
    let cli = kiln::cli::Cli::try_parse_from(args).expect("parse");
    let mut out = Vec::new();
    let code =
        tokio::time::timeout(std::time::Duration::from_secs(20), kiln::cli::run(cli, &mut out))
            .await
            .expect("the CLI command did not finish in 20 s")
            .expect("the CLI command failed");
    (code, String::from_utf8(out).expect("utf-8"))
}

#[tokio::test]
async fn show_follow_streams_until_the_rollout_ends_and_verbs_use_the_token_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (base, store, shutdown, mut seen) = serve_api(dir.path()).await;
    let data_dir = dir.path().to_str().expect("utf-8").to_owned();
    let id =
        store.create_rollout(rollout("web", "ff66", RolloutState::Rolling)).expect("create").id;
    store.append_event(id, Level::Info, EventKind::State, "rolling", None).expect("event");

    let writer = store.clone();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        writer
            .append_event(
                id,
                Level::Info,
                EventKind::Instance(InstanceAction::Attached),
                "web-9 attached",
                None,
            )
            .expect("event");
        let mut done = writer.rollout(id).expect("rollout");
        done.state = RolloutState::Succeeded;
        done.finished_at = Some(kiln::model::now());
        writer.put_rollout(&done).expect("put");
        writer.append_event(id, Level::Info, EventKind::State, "succeeded", None).expect("event");
    });
    let id_text = id.to_string();
    let args = ["kiln", "--data-dir", &data_dir, "--api", &base, "show", &id_text, "--follow"];
    let (code, out) = run_cli(&args).await;
    finisher.await.expect("finisher");
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert!(out.contains("rolling") && out.contains("web-9 attached"), "{out}");
    assert!(out.trim_end().ends_with(&format!("rollout #{id} ended: succeeded")), "{out}");

    // Verbs: without a token they fail clearly; with <data-dir>/token they reach the operator.
    let args = ["kiln", "--data-dir", &data_dir, "--api", &base, "pause", "web"];
    let cli = <kiln::cli::Cli as clap::Parser>::try_parse_from(args).expect("parse");
    let error = kiln::cli::run(cli, &mut Vec::new()).await.expect_err("no token");
    assert!(format!("{error:#}").contains("no API token"), "{error:#}");

    std::fs::write(dir.path().join("token"), "cli-token\n").expect("token");
    let args = ["kiln", "--data-dir", &data_dir, "--api", &base, "rollback", "web", "--to", "ff66"];
    let (code, out) = run_cli(&args).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert_eq!(out.trim(), "rollback web: accepted (rollout #42)");
    let verb = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv())
        .await
        .expect("timed out waiting for the verb on the command channel");
    assert_eq!(verb.as_deref(), Some(r#"Rollback { fleet: "web", to: Some("ff66") }"#));
    shutdown.cancel();
}

// ---------------------------------------------------------------------------------------------
// `kiln log --commits` on a real repository through the real daemon.
// ---------------------------------------------------------------------------------------------

mod support;

/// python3 stdlib: answers 200 everywhere; exits when its working directory disappears.
const TINY_APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
WORK = os.getcwd()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)
threading.Thread(target=watchdog, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

const TINY_MANIFEST: &str = "fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - { name: app, path: image/app, bake: hooks/bake-dir }
    rollout:
      provider: local
      capacity: 1
      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 20s }
      minHealthy: 100ms
      drain: 100ms
      loadBalancer: { port: 0 }
";

/// `kiln log --commits --json`, parsed.
fn commit_log(data: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = kiln(data, &["log", "--commits", "--json", "--limit", "100"]);
    assert!(code == 0 || code == 1, "kiln log --commits failed ({code}): {err}");
    serde_json::from_str(&out).unwrap_or_default()
}

/// Waits until `sha`'s entry has an outcome other than `pending`; returns it.
#[allow(clippy::disallowed_methods)] // A synchronous test polling a child process.
fn settled(daemon: &support::daemon::Daemon, sha: &str, kind: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let log = commit_log(&daemon.data_dir);
        let done = |e: &&serde_json::Value| {
            e["revision"] == sha
                && e["kind"] == kind
                && e["outcome"]["status"] != "pending"
                && e["outcome"]["rollouts"]
                    .as_array()
                    .is_none_or(|r| r.iter().all(|r| r["state"] != "pending" && !running(r)))
        };
        if let Some(entry) = log.iter().find(done) {
            return entry.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {sha}: {log:#?}\n{}",
            daemon.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn running(rollout: &serde_json::Value) -> bool {
    ["scheduled", "baking", "reconciling", "rolling", "paused"]
        .contains(&rollout["state"].as_str().unwrap_or(""))
}

#[test]
fn log_commits_lists_every_commit_with_what_became_of_it() {
    use support::git::{Entry, TestRepo};
    let test = "log_commits_lists_every_commit_with_what_became_of_it";
    if !support::git::require_git(test) || !support::fleet::have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let hook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir"))
            .expect("hooks/bake-dir");
    let deployed = repo.commit_entries(
        "deploy the app",
        &[
            Entry::File("kiln.yaml", TINY_MANIFEST),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/app/run", "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n"),
            Entry::File("image/app/app.py", TINY_APP),
        ],
    );
    let data = repo.scratch("data");
    let daemon = support::daemon::Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let entry = settled(&daemon, &deployed, "initial");
    assert_eq!(entry["outcome"]["status"], "rollouts", "{entry:#}");
    assert_eq!(entry["outcome"]["rollouts"][0]["state"], "succeeded", "{entry:#}");
    assert_eq!(entry["outcome"]["rollouts"][0]["fleet"], "web", "{entry:#}");

    let skipped = repo.commit("docs only", &[("README", "hello\n")]);
    let entry = settled(&daemon, &skipped, "push");
    assert_eq!(entry["outcome"]["status"], "skipped", "{entry:#}");
    assert!(entry["outcome"]["reason"].as_str().unwrap().contains("touches no fleet"), "{entry:#}");

    let broken = repo
        .commit("break the manifest", &[("kiln.yaml", "fleets:\n  - name: web\n    capacty: 2\n")]);
    let entry = settled(&daemon, &broken, "push");
    assert_eq!(entry["outcome"]["status"], "failed", "{entry:#}");
    assert!(entry["outcome"]["reason"].as_str().unwrap().contains("invalid manifest"), "{entry:#}");

    // Two commits in one push: only the tip is planned; the other is listed, and says why.
    let batched = repo.commit_local("first of two", &[Entry::File("README", "one\n")]);
    let tip = repo.commit_local("second of two", &[Entry::File("kiln.yaml", TINY_MANIFEST)]);
    repo.push();
    settled(&daemon, &tip, "push");
    let entry = settled(&daemon, &batched, "push");
    assert_eq!(entry["outcome"]["status"], "skipped", "{entry:#}");
    assert!(entry["outcome"]["reason"].as_str().unwrap().contains("not the tip"), "{entry:#}");

    repo.delete_branch();
    let deleted = settled(&daemon, &tip, "branch_deleted");
    assert_eq!(deleted["outcome"]["status"], "branch_deleted", "{deleted:#}");
    // The tip's own entry keeps its own outcome.
    let own = settled(&daemon, &tip, "push");
    assert_ne!(own["outcome"]["status"], "branch_deleted", "{own:#}");

    // `kiln log` lists rollouts only; `--commits` lists every commit, newest first.
    let log = commit_log(&data);
    let order: Vec<&str> = log.iter().map(|e| e["revision"].as_str().unwrap()).collect();
    let expected = [&tip, &tip, &batched, &broken, &skipped, &deployed].map(String::as_str);
    assert_eq!(order, expected, "{log:#?}");
    let (_, rollouts, _) = kiln(&data, &["log", "--json", "--limit", "100"]);
    assert!(!rollouts.contains(&batched), "the batched commit has no rollout");

    // The table, through the API and from the store once the daemon is gone.
    let (code, live, err) = kiln(&data, &["log", "--commits"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("kiln log --commits:\n{live}");
    drop(daemon);
    let (code, offline, err) = kiln(&data, &["log", "--commits", "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    for text in [&live, &offline] {
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("COMMIT") && lines[0].contains("OUTCOME"), "{text}");
        assert!(lines[1].starts_with(&tip[..8]) && lines[1].contains("branch deleted"), "{text}");
    }
    assert!(live.lines().any(|l| l.starts_with(&deployed[..8]) && l.contains("web #")), "{live}");
    assert!(
        live.lines().any(|l| l.contains("succeeded") && l.contains("deploy the app")),
        "{live}"
    );
    assert!(live.lines().any(|l| l.starts_with(&broken[..8]) && l.contains("failed")), "{live}");
    assert!(live.lines().any(|l| l.trim_start().starts_with("invalid manifest")), "{live}");
    assert_eq!(offline.lines().filter(|l| !l.starts_with(' ')).count(), 1 + 3, "{offline}");
}
