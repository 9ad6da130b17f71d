//! Issue 17: verbs with Argo Rollouts' meaning (abort, rollback, retry, deploy), retiring a
//! fleet (orphaned, `prune: true`, `kiln down`) and the CI gate (`kiln wait`, `show --follow`),
//! end to end through the real `kiln` daemon on a real git repository: directory images baked
//! by the shipped `hooks/bake-dir`, instances as real python processes behind the real `kiln lb`.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};

const WAIT: Duration = Duration::from_secs(90);

/// The app: `GET /` names its image (the basename of `$KILN_IMAGE`); `/healthz` answers 500 when
/// the image holds a file named `unhealthy`. It exits when its working directory disappears.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = os.path.basename(os.environ.get("KILN_IMAGE", "?"))
UNHEALTHY = os.path.exists(os.path.join(HERE, "unhealthy"))
WORK = os.getcwd()
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
            self.reply(500 if UNHEALTHY else 200, "health\n")
        else:
            self.reply(200, "image=%s\n" % IMAGE)
def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)
class Server(ThreadingHTTPServer):
    daemon_threads = True
threading.Thread(target=watchdog, daemon=True).start()
Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";

/// Fails (exit 1, not transient) while the file `$KILN_TEST_FAIL` exists: a cloud outage the
/// commit has nothing to do with. Otherwise the shipped `bake-dir`.
const BAKE: &str = "#!/bin/sh\nset -eu\nif [ -n \"${KILN_TEST_FAIL:-}\" ] && [ -e \"$KILN_TEST_FAIL\" ]; then\n  echo \"image service unavailable\" >&2\n  exit 1\nfi\nexec \"$KILN_WORK_TREE/hooks/bake-dir\"\n";

fn bake_dir_hook() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir");
    std::fs::read_to_string(&path).unwrap()
}

/// One fleet of `capacity` instances on the stage `<name>/`; `extra` is appended to its
/// `rollout:` section (indented 6).
fn fleet_yaml(name: &str, capacity: u32, extra: &str, prune: Option<bool>) -> String {
    let prune = prune.map(|p| format!("    prune: {p}\n")).unwrap_or_default();
    format!(
        "  - name: {name}
    paths: [{name}/, hooks/]
    image:
      stages:
        - {{ name: app, path: {name}, bake: hooks/bake }}
      timeout: 1m
{prune}    rollout:
      provider: local
      capacity: {capacity}
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 5s }}
      minHealthy: 0s
      drain: 200ms
      progressDeadline: 2m
      onFailure: rollback
      loadBalancer: {{ port: 0 }}
{extra}"
    )
}

const MANUAL_CANARY: &str = "      canary: { count: 1, manual: true }\n";

struct Fx {
    repo: TestRepo,
    daemon: Daemon,
    data: PathBuf,
}

/// Commits the manifest, hooks and an app stage per fleet, starts the daemon with
/// `$KILN_TEST_FAIL` passed to hooks, and waits until every fleet's first rollout succeeded.
fn start(test: &str, manifest: &str, fleets: &[&str]) -> Option<Fx> {
    if !require_git(test) || !have_python3() {
        return None;
    }
    let repo = TestRepo::new();
    let hook = bake_dir_hook();
    let mut paths = Vec::new();
    for fleet in fleets {
        paths.push((format!("{fleet}/run"), format!("{fleet}/app.py"), format!("{fleet}/v")));
    }
    let mut entries = vec![
        Entry::File("kiln.yaml", manifest),
        Entry::Exec("hooks/bake-dir", &hook),
        Entry::Exec("hooks/bake", BAKE),
    ];
    for (run, app, v) in &paths {
        entries.push(Entry::Exec(run, RUN));
        entries.push(Entry::File(app, APP));
        entries.push(Entry::File(v, "1"));
    }
    let sha = repo.commit_entries("first image", &entries);
    let data = repo.scratch("data");
    std::fs::create_dir_all(&data).unwrap();
    let fail = data.with_extension("fail");
    let fail = fail.to_string_lossy().into_owned();
    let daemon = Daemon::start_with_env(
        &repo.url(),
        &data,
        &["--poll", "1s", "--hook-env", "KILN_TEST_FAIL"],
        &[("KILN_TEST_FAIL", &fail)],
    );
    for fleet in fleets {
        let entry = wait_terminal(&daemon, &sha, fleet);
        assert_eq!(
            entry["state"],
            "succeeded",
            "first deploy of {fleet}: {entry}\n{}",
            daemon.logs()
        );
    }
    let data = std::fs::canonicalize(&data).unwrap();
    Some(Fx { repo, daemon, data })
}

impl Fx {
    fn fail_file(&self) -> PathBuf {
        self.daemon.data_dir.with_extension("fail")
    }

    /// Commits a new version of fleet `web`'s app (`v` = `version`, and `unhealthy` if broken).
    fn commit_web(&self, version: &str, broken: bool) -> String {
        if broken {
            self.repo.commit(
                &format!("web {version} (broken)"),
                &[("web/v", version), ("web/unhealthy", "yes")],
            )
        } else if self.repo.work_path().join("web/unhealthy").exists() {
            self.repo.git(&["rm", "--quiet", "web/unhealthy"]);
            self.repo.commit(&format!("web {version}"), &[("web/v", version)])
        } else {
            self.repo.commit(&format!("web {version}"), &[("web/v", version)])
        }
    }
}

fn entry_of(log: &[Value], sha: &str, fleet: &str) -> Option<Value> {
    for_commit(log, sha)
        .into_iter()
        .find(|e| e["fleet"] == fleet && e["origin"] != "drift")
        .cloned()
}

const TERMINAL: [&str; 6] =
    ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];

fn is_terminal(entry: &Value) -> bool {
    TERMINAL.contains(&entry["state"].as_str().unwrap_or(""))
}

fn wait_terminal(daemon: &Daemon, sha: &str, fleet: &str) -> Value {
    let log = daemon.wait_log(&format!("the rollout of {sha} for {fleet} to end"), WAIT, |log| {
        entry_of(log, sha, fleet).is_some_and(|e| is_terminal(&e))
    });
    entry_of(&log, sha, fleet).unwrap()
}

/// The rollout `id` once it is terminal or paused.
fn wait_rollout(daemon: &Daemon, id: u64, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let log = daemon
        .wait_log(what, WAIT, |log| log.iter().any(|e| e["id"].as_u64() == Some(id) && cond(e)));
    log.into_iter().find(|e| e["id"].as_u64() == Some(id)).unwrap()
}

/// The id a verb printed (`... accepted (rollout #N)`).
fn accepted_id(out: &str) -> u64 {
    let start = out.find("rollout #").unwrap_or_else(|| panic!("no rollout id in {out:?}")) + 9;
    out[start..].trim_end_matches(|c: char| !c.is_ascii_digit()).parse().unwrap()
}

fn verb(fx: &Fx, args: &[&str]) -> u64 {
    let (code, out, err) = kiln(&fx.data, args);
    assert_eq!(code, 0, "kiln {args:?}: {out}{err}\n{}", fx.daemon.logs());
    accepted_id(&out)
}

fn status(data: &Path, fleet: &str) -> Option<Value> {
    let (code, out, _) = kiln(data, &["status", "--json"]);
    if code != 0 {
        return None;
    }
    let fleets: Value = serde_json::from_str(&out).ok()?;
    fleets.as_array()?.iter().find(|f| f["name"] == fleet).cloned()
}

fn wait_status(fx: &Fx, fleet: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut last = Value::Null;
    loop {
        if let Some(s) = status(&fx.data, fleet) {
            if cond(&s) {
                return s;
            }
            last = s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nlast: {last:#}\n{}",
            fx.daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Exactly `n` instances run, all attached, all on `image`.
fn all_on(fleet: &Value, image: &str, n: usize) -> bool {
    let Some(instances) = fleet["instances"].as_array() else { return false };
    let running: Vec<&Value> = instances.iter().filter(|i| i["running"] == true).collect();
    running.len() == n && running.iter().all(|i| i["image"] == image && i["attached"] == true)
}

/// `GET /` through the load balancer, `count` times: the images that answered.
fn answers(endpoint: &str, count: usize) -> Vec<String> {
    let addr = endpoint.trim_start_matches("http://");
    let mut seen = Vec::new();
    for _ in 0..count {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(addr) else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(stream, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        if let Some(pos) = text.find("image=") {
            seen.push(text[pos + 6..].trim().to_owned());
        }
    }
    seen
}

fn basename(image: &str) -> String {
    Path::new(image).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Processes whose command line or environment mentions `needle` (the fleet's dir).
fn processes_under(dir: &Path) -> Vec<u32> {
    support::daemon::leftover_pids(&dir.to_string_lossy())
}

#[test]
fn abort_mid_canary_returns_every_instance_and_the_load_balancer_to_the_stable_image() {
    let test = "abort_mid_canary_returns_every_instance_and_the_load_balancer_to_the_stable_image";
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 3, MANUAL_CANARY, None));
    let Some(fx) = start(test, &manifest, &["web"]) else { return };
    let v1 = wait_status(&fx, "web", "v1 everywhere", |s| {
        s["image"].is_string() && all_on(s, s["image"].as_str().unwrap(), 3)
    });
    let v1_image = v1["image"].as_str().unwrap().to_owned();
    let endpoint = v1["endpoint"].as_str().unwrap().to_owned();

    let sha = fx.commit_web("2", false);
    let log = fx.daemon.wait_log("the canary to pause", WAIT, |log| {
        entry_of(log, &sha, "web").is_some_and(|e| e["state"] == "paused")
    });
    let paused = entry_of(&log, &sha, "web").unwrap();
    let v2_image = paused["image"].as_str().unwrap().to_owned();
    let canary = wait_status(&fx, "web", "the canary serving", |s| {
        s["instances"].as_array().is_some_and(|i| {
            i.iter().any(|i| i["image"] == v2_image.as_str() && i["attached"] == true)
        })
    });
    eprintln!("canary: {canary:#}");

    let id = verb(&fx, &["abort", "web"]);
    assert_eq!(Some(id), paused["id"].as_u64());
    let ended = wait_rollout(&fx.daemon, id, "the abort to end", is_terminal);
    assert_eq!(ended["state"], "aborted", "{ended}\n{}", fx.daemon.logs());
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("back on the stable image"), "{reason}");
    let fleet = wait_status(&fx, "web", "every instance back on v1", |s| all_on(s, &v1_image, 3));
    assert_eq!(fleet["image"], v1_image.as_str(), "the deployed image is still v1");
    let seen = answers(&endpoint, 20);
    assert_eq!(seen.len(), 20, "every request answered: {seen:?}");
    assert!(
        seen.iter().all(|i| *i == basename(&v1_image)),
        "only the stable image serves: {seen:?}"
    );
    // The canary instance was drained (detached) before it was terminated.
    let (_, out, _) = kiln(&fx.data, &["show", &id.to_string(), "--json"]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<String> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["image"] == v2_image.as_str())
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect();
    let detached = kinds.iter().position(|k| k == "instance.drained");
    let terminated = kinds.iter().rposition(|k| k == "instance.terminated");
    assert!(detached.is_some() && terminated.is_some() && detached < terminated, "{kinds:?}");
}

#[test]
fn rollback_after_a_rollback_goes_to_the_last_successful_image_without_the_manual_canary() {
    let test =
        "rollback_after_a_rollback_goes_to_the_last_successful_image_without_the_manual_canary";
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 2, MANUAL_CANARY, None));
    let Some(fx) = start(test, &manifest, &["web"]) else { return };
    let v1 = wait_status(&fx, "web", "v1", |s| s["image"].is_string())["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut images = vec![v1];
    for version in ["2", "3"] {
        let sha = fx.commit_web(version, false);
        let log = fx.daemon.wait_log("the canary to pause", WAIT, |log| {
            entry_of(log, &sha, "web").is_some_and(|e| e["state"] == "paused")
        });
        let id = entry_of(&log, &sha, "web").unwrap()["id"].as_u64().unwrap();
        verb(&fx, &["resume", "web"]);
        let done = wait_rollout(&fx.daemon, id, "the promoted rollout to end", is_terminal);
        assert_eq!(done["state"], "succeeded", "{done}");
        images.push(done["image"].as_str().unwrap().to_owned());
    }
    // First rollback: v3 → v2, no pause at the manual canary.
    let id = verb(&fx, &["rollback", "web"]);
    let done = wait_rollout(&fx.daemon, id, "the rollback to end or pause", |e| {
        is_terminal(e) || e["state"] == "paused"
    });
    assert_eq!(done["state"], "succeeded", "the rollback skips the canary gate: {done}");
    assert_eq!(done["image"], images[1].as_str());
    assert_eq!(done["origin"], "rollback");
    wait_status(&fx, "web", "every instance on v2", |s| all_on(s, &images[1], 2));
    // Second rollback: one good release further back (v1), not the v3 just rolled back from.
    let id = verb(&fx, &["rollback", "web"]);
    let done = wait_rollout(&fx.daemon, id, "the second rollback to end or pause", |e| {
        is_terminal(e) || e["state"] == "paused"
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["image"], images[0].as_str(), "back to v1, not to v3: {done}");
    wait_status(&fx, "web", "every instance on v1", |s| all_on(s, &images[0], 2));
    // Nothing older left: refused, saying so.
    let (code, out, err) = kiln(&fx.data, &["rollback", "web"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("no earlier image"), "{err}");
}

#[test]
fn retry_reruns_a_rollout_that_failed_for_an_environmental_reason() {
    let test = "retry_reruns_a_rollout_that_failed_for_an_environmental_reason";
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 2, "", None));
    let Some(fx) = start(test, &manifest, &["web"]) else { return };
    // Nothing failed yet: refused with the reason.
    let (code, _, err) = kiln(&fx.data, &["retry", "web"]);
    assert_ne!(code, 0);
    assert!(err.contains("succeeded") && err.contains("retry re-runs"), "{err}");

    std::fs::write(fx.fail_file(), "down").unwrap();
    let sha = fx.commit_web("2", false);
    let failed = wait_terminal(&fx.daemon, &sha, "web");
    assert_eq!(failed["state"], "failed", "{failed}");
    std::fs::remove_file(fx.fail_file()).unwrap();

    let id = verb(&fx, &["retry", "web"]);
    assert!(id > failed["id"].as_u64().unwrap(), "a new rollout");
    let done = wait_rollout(&fx.daemon, id, "the retry to end", is_terminal);
    assert_eq!(done["state"], "succeeded", "{done}\n{}", fx.daemon.logs());
    assert_eq!(done["origin"], "retry");
    assert_eq!(done["commit"], sha.as_str(), "the same commit");
    let image = done["image"].as_str().unwrap().to_owned();
    wait_status(&fx, "web", "every instance on the retried image", |s| all_on(s, &image, 2));
}

#[test]
fn deploy_commit_deploys_a_commit_of_the_branch_and_refuses_any_other() {
    let test = "deploy_commit_deploys_a_commit_of_the_branch_and_refuses_any_other";
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 2, "", None));
    let Some(fx) = start(test, &manifest, &["web"]) else { return };
    let first = fx.repo.head();
    let v1 = wait_status(&fx, "web", "v1", |s| s["image"].is_string())["image"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = fx.commit_web("2", false);
    let v2 = wait_terminal(&fx.daemon, &second, "web");
    assert_eq!(v2["state"], "succeeded");

    let id = verb(&fx, &["deploy", "web", &first[..10]]);
    let done = wait_rollout(&fx.daemon, id, "the deploy to end", is_terminal);
    assert_eq!(done["state"], "succeeded", "{done}\n{}", fx.daemon.logs());
    assert_eq!(done["origin"], "deploy");
    assert_eq!(done["commit"], first.as_str());
    assert_eq!(done["image"], v1.as_str(), "the bake cache gives the commit's image back");
    wait_status(&fx, "web", "every instance on v1", |s| all_on(s, &v1, 2));

    // Not a commit id, unknown, and off the branch's history after a force push: refused.
    let (code, _, err) = kiln(&fx.data, &["deploy", "web", "main~1"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a commit id"), "{err}");
    let (code, _, err) = kiln(&fx.data, &["deploy", "web", "0123456789abcdef"]);
    assert_ne!(code, 0);
    assert!(err.contains("no commit `0123456789abcdef`"), "{err}");
    fx.repo.force_push_reset(1);
    // Once kiln has seen the rewritten branch, the dropped commit is refused.
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out, err) = kiln(&fx.data, &["deploy", "web", &second]);
        if err.contains("not on the history of branch") {
            assert_ne!(code, 0);
            break;
        }
        assert!(code == 0 || err.contains("is still"), "unexpected answer: {out}{err}");
        assert!(Instant::now() < deadline, "the dropped commit was never refused: {out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_fleet_removed_from_kiln_yaml_is_orphaned_pruned_or_taken_down_and_recorded() {
    let test = "a_fleet_removed_from_kiln_yaml_is_orphaned_pruned_or_taken_down_and_recorded";
    let manifest = format!(
        "fleets:\n{}{}{}",
        fleet_yaml("web", 1, "", None),
        fleet_yaml("old", 2, "", Some(true)),
        fleet_yaml("kept", 1, "", None),
    );
    let Some(fx) = start(test, &manifest, &["web", "old", "kept"]) else { return };
    for fleet in ["old", "kept"] {
        wait_status(&fx, fleet, "instances running", |s| {
            s["instances"].as_array().is_some_and(|i| !i.is_empty()) && s["endpoint"].is_string()
        });
    }
    let old_dir = fx.data.join("fleets/old");
    let kept_dir = fx.data.join("fleets/kept");
    assert!(!processes_under(&old_dir).is_empty(), "old runs instances and a load balancer");

    // Both removed in one commit: `old` says prune: true, `kept` does not.
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 1, "", None));
    let sha = fx.repo.commit("retire old and kept", &[("kiln.yaml", &manifest)]);
    let log = fx.daemon.wait_log("old to be pruned", WAIT, |log| {
        log.iter().any(|e| e["fleet"] == "old" && e["origin"] == "prune" && is_terminal(e))
    });
    let pruned = log.iter().find(|e| e["fleet"] == "old" && e["origin"] == "prune").unwrap();
    assert_eq!(pruned["state"], "succeeded", "{pruned}\n{}", fx.daemon.logs());
    let orphaned = log.iter().find(|e| e["fleet"] == "old" && e["commit"] == sha.as_str()).unwrap();
    assert!(orphaned["reason"].as_str().unwrap_or("").contains("orphaned"), "{orphaned}");
    let deadline = Instant::now() + WAIT;
    while !processes_under(&old_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "old's processes still run: {:?}",
            processes_under(&old_dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(status(&fx.data, "old").is_none(), "a pruned fleet leaves kiln status");

    // `kept` is orphaned, still running, and shown as such.
    let kept = wait_status(&fx, "kept", "kept orphaned", |s| s["orphaned"] == true);
    assert!(!processes_under(&kept_dir).is_empty(), "an orphaned fleet is left running");
    let (_, text, _) = kiln(&fx.data, &["status"]);
    assert!(text.contains("ORPHANED") && text.contains("kiln down kept"), "{text}");
    assert!(kept["instances"].as_array().is_some_and(|i| !i.is_empty()));
    // `kiln down` refuses a fleet still in kiln.yaml, and retires the orphan.
    let (code, _, err) = kiln(&fx.data, &["down", "web"]);
    assert_ne!(code, 0);
    assert!(err.contains("still in kiln.yaml"), "{err}");
    let id = verb(&fx, &["down", "kept"]);
    let done = wait_rollout(&fx.daemon, id, "kept to be taken down", is_terminal);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["origin"], "prune");
    let deadline = Instant::now() + WAIT;
    while !processes_under(&kept_dir).is_empty() {
        assert!(Instant::now() < deadline, "kept's processes still run");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `web` was never touched.
    assert!(status(&fx.data, "web").is_some_and(|s| s["orphaned"] != true));
}

#[test]
fn kiln_wait_fails_a_ci_script_on_a_broken_image_and_passes_on_a_good_one() {
    let test = "kiln_wait_fails_a_ci_script_on_a_broken_image_and_passes_on_a_good_one";
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 2, "", None));
    let Some(fx) = start(test, &manifest, &["web"]) else { return };
    let broken = fx.commit_web("2", true);
    let (code, out, err) =
        kiln(&fx.data, &["wait", "--commit", &broken, "--fleet", "web", "--timeout", "2m"]);
    assert_eq!(code, 1, "a rolled-back rollout fails the gate: {out}{err}");
    assert!(out.contains("rolled_back"), "{out}");
    let id =
        entry_of(&fx.daemon.log(), &broken, "web").unwrap()["id"].as_u64().unwrap().to_string();
    let (code, out, _) = kiln(&fx.data, &["show", &id, "--follow"]);
    assert_eq!(code, 1, "show --follow fails the gate too: {out}");
    let (code, _, _) = kiln(&fx.data, &["wait", &id]);
    assert_eq!(code, 1);

    let good = fx.commit_web("3", false);
    let (code, out, err) = kiln(&fx.data, &["wait", "--commit", &good[..12], "--timeout", "2m"]);
    assert_eq!(code, 0, "a succeeded rollout passes: {out}{err}");
    let id = entry_of(&fx.daemon.log(), &good, "web").unwrap()["id"].as_u64().unwrap().to_string();
    let (code, out, _) = kiln(&fx.data, &["show", &id, "--follow"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, _) = kiln(&fx.data, &["wait", &id]);
    assert_eq!(code, 0);

    // A commit kiln never sees: the timeout ends the wait, non-zero, naming what it waited for.
    let (code, _, err) = kiln(&fx.data, &["wait", "--commit", "0123456789abc", "--timeout", "1s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("timed out") && err.contains("0123456789abc"), "{err}");
}
