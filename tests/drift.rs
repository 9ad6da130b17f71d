//! Drift, inspected and reported (issue 11, item 5), through the real daemon: `kiln drift`
//! finds infra drift with the real `terraform` (state changed behind kiln's back) and repairs
//! it with `drift.mode: repair`; a killed instance is reported and, with `repair`, a `repair`
//! rollout shows in `kiln log`; a backend added to the load balancer behind kiln's back is
//! reported.

// The tests are synchronous: they block between polls of real processes, never in a runtime.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::provider::local::lb;
use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};
use support::hooks::require_program;

const WAIT: Duration = Duration::from_secs(120);

/// The app: answers every GET (`/healthz` included); exits when its work dir goes.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
WORK = os.getcwd()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
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

/// A Terraform configuration with only the built-in `terraform_data` (no provider download):
/// it "manages" a file (written by a provisioner when the resource is created or replaced).
fn main_tf(managed: &Path) -> String {
    format!(
        r#"variable "image_id" {{
  type = string
}}

locals {{
  content = "managed-v1"
}}

resource "terraform_data" "managed" {{
  input            = local.content
  triggers_replace = [local.content]
  provisioner "local-exec" {{
    command = "printf '%s' '${{self.input}}' > '{path}'"
  }}
}}
"#,
        path = managed.display()
    )
}

fn manifest(mode: &str, infra: bool) -> String {
    manifest_every("1h", mode, infra)
}

fn manifest_every(interval: &str, mode: &str, infra: bool) -> String {
    let infra = if infra {
        "    infra: { path: infra/, reconcile: hooks/reconcile-terraform, timeout: 5m }\n"
    } else {
        ""
    };
    format!(
        "fleets:
  - name: web
    paths: [image/, hooks/, infra/]
    image:
      stages:
        - {{ name: app, path: image/app, bake: hooks/bake-dir }}
      timeout: 1m
{infra}    rollout:
      provider: local
      capacity: 2
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 30s }}
      minHealthy: 100ms
      drain: 100ms
      loadBalancer: {{ port: 0 }}
    drift: {{ interval: {interval}, mode: {mode} }}
"
    )
}

fn shipped(hook: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks").join(hook);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

struct Fixture {
    repo: TestRepo,
    daemon: Daemon,
    data: PathBuf,
}

/// Commits the fleet (with the Terraform infra when `managed` is given), starts the daemon and
/// waits for the first rollout to succeed.
fn deploy(managed: Option<&Path>) -> Fixture {
    deploy_every("1h", managed)
}

/// [`deploy`] with `drift.interval` set.
fn deploy_every(interval: &str, managed: Option<&Path>) -> Fixture {
    let repo = TestRepo::new();
    let bake = shipped("bake-dir");
    let reconcile = shipped("reconcile-terraform");
    let tf = managed.map(main_tf).unwrap_or_default();
    let kiln_yaml = manifest_every(interval, "report", managed.is_some());
    let mut entries = vec![
        Entry::File("kiln.yaml", &kiln_yaml),
        Entry::Exec("hooks/bake-dir", &bake),
        Entry::Exec("image/app/run", RUN),
        Entry::File("image/app/app.py", APP),
    ];
    if managed.is_some() {
        entries.push(Entry::Exec("hooks/reconcile-terraform", &reconcile));
        entries.push(Entry::File("infra/main.tf", &tf));
    }
    let first = repo.commit_entries("first", &entries);
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    daemon.wait_log("the first rollout", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| e["state"] == "succeeded")
    });
    Fixture { repo, daemon, data }
}

impl Fixture {
    /// `kiln drift web`: (exit code, stdout).
    fn drift(&self) -> (i32, String) {
        let (code, out, err) = kiln(&self.data, &["drift", "web", "--timeout", "10m"]);
        assert!(code == 0 || code == 2, "kiln drift failed ({code}): {out}{err}");
        (code, out)
    }

    /// `kiln drift web --json`: the report.
    fn drift_json(&self) -> (i32, Value) {
        let (code, out, err) = kiln(&self.data, &["drift", "web", "--json", "--timeout", "10m"]);
        assert!(code == 0 || code == 2, "kiln drift failed ({code}): {out}{err}");
        let reports: Value = serde_json::from_str(&out).expect("kiln drift --json");
        (code, reports[0].clone())
    }

    fn status(&self) -> String {
        let (code, out, err) = kiln(&self.data, &["status"]);
        assert_eq!(code, 0, "kiln status: {err}");
        out
    }

    fn show(&self, id: u64) -> Value {
        let (code, out, err) = kiln(&self.data, &["show", &id.to_string(), "--json"]);
        assert_eq!(code, 0, "kiln show: {err}");
        serde_json::from_str(&out).expect("kiln show --json")
    }

    /// Switches the fleet to `drift.mode: repair` (kiln.yaml is outside the fleet's paths: no
    /// rollout) and waits until the daemon has planned that commit.
    fn switch_to_repair(&self, infra: bool) {
        let sha = self.repo.commit("drift: repair", &[("kiln.yaml", &manifest("repair", infra))]);
        self.daemon.wait_log("the mode change to be planned", WAIT, |log| {
            !for_commit(log, &sha).is_empty()
        });
    }

    fn wait_repair(&self) -> Value {
        let log = self.daemon.wait_log("a repair rollout to succeed", WAIT, |log| {
            log.iter().any(|e| e["origin"] == "repair" && e["state"] == "succeeded")
        });
        log.into_iter().find(|e| e["origin"] == "repair").expect("repair rollout")
    }
}

fn kinds(report: &Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .map(|f| f.iter().map(|f| f["kind"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

fn event_kinds(rollout: &Value) -> Vec<String> {
    rollout["events"]
        .as_array()
        .map(|e| e.iter().map(|e| e["kind"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn infra_changed_behind_kilns_back_is_reported_and_repaired_with_terraform() {
    const TEST: &str = "infra_changed_behind_kilns_back_is_reported_and_repaired_with_terraform";
    if !require_git(TEST) || !have_python3() || !require_program(TEST, "terraform") {
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let managed = scratch.path().join("managed.txt");
    let fx = deploy(Some(&managed));
    assert_eq!(std::fs::read_to_string(&managed).expect("managed file"), "managed-v1");

    // In sync: no drift (the plan hook exits 0).
    let (code, report) = fx.drift_json();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(kinds(&report), Vec::<String>::new(), "{report:#}");
    assert!(report["errors"].as_array().is_some_and(Vec::is_empty), "{report:#}");

    // Behind kiln's back: the file goes and the recorded state no longer matches the config.
    std::fs::remove_file(&managed).expect("remove managed file");
    let state = fx.data.join("state/web/terraform.tfstate");
    let text = std::fs::read_to_string(&state).expect("terraform state");
    assert!(text.contains("managed-v1"), "{text}");
    std::fs::write(&state, text.replace("managed-v1", "tampered")).expect("edit state");

    let (code, out) = fx.drift();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("infra: infrastructure differs from the commit"), "{out}");
    assert!(out.contains("Plan: 1 to add, 0 to change, 1 to destroy"), "{out}");
    let status = fx.status();
    assert!(status.contains("drift:     1 finding(s)"), "{status}");
    assert!(status.contains("infra: infrastructure differs"), "{status}");
    // The findings are events on a `drift` record in the log.
    let log = fx.daemon.log();
    let record = log.iter().find(|e| e["origin"] == "drift").expect("a drift record in the log");
    assert_eq!(record["fleet"], "web");
    let shown = fx.show(record["id"].as_u64().expect("id"));
    assert!(event_kinds(&shown).contains(&"drift.infra".to_owned()), "{shown:#}");
    // Report mode changes nothing.
    assert!(!managed.exists());
    assert!(!log.iter().any(|e| e["origin"] == "repair"), "report mode repaired");

    // Repair mode: the drift is reconciled (terraform apply) and the file is back.
    fx.switch_to_repair(true);
    let (code, out) = fx.drift();
    assert_eq!(code, 2, "{out}");
    let repair = fx.wait_repair();
    assert_eq!(repair["plan"]["reconcile"], true, "{repair:#}");
    assert!(repair["plan"]["bake"].as_array().is_some_and(Vec::is_empty), "{repair:#}");
    assert_eq!(std::fs::read_to_string(&managed).expect("managed file restored"), "managed-v1");
    let (code, report) = fx.drift_json();
    assert_eq!(code, 0, "drift left after the repair: {report:#}");
}

/// The pid of a running instance of fleet `web`.
fn an_instance(data: &Path) -> (String, i32) {
    let dir = data.join("fleets/web/instances");
    for entry in std::fs::read_dir(&dir).expect("instances dir").flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("instance.json")) else {
            continue;
        };
        let record: Value = serde_json::from_str(&text).expect("instance.json");
        if record["state"] == "running" {
            if let Some(pid) = record["process"]["pid"].as_i64().filter(|pid| alive(*pid as i32)) {
                return (record["id"].as_str().expect("id").to_owned(), pid as i32);
            }
        }
    }
    panic!("no running instance in {}", dir.display());
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// `kill -9`, then waits until the process is gone (a zombie not reaped yet still looks alive
/// to a pid + start time check).
fn kill9(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 the instance");
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "instance process {pid} never went away");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_instance_is_reported_and_repaired_by_a_repair_rollout() {
    const TEST: &str = "a_killed_instance_is_reported_and_repaired_by_a_repair_rollout";
    if !require_git(TEST) || !have_python3() {
        return;
    }
    let fx = deploy(None);
    let (code, report) = fx.drift_json();
    assert_eq!(code, 0, "{report:#}");

    let (id, pid) = an_instance(&fx.data);
    kill9(pid);
    // Seen dead by the check, or replaced by the daemon first and read from the journal: the
    // finding names the instance either way.
    let (code, report) = fx.drift_json();
    assert_eq!(code, 2, "{report:#}");
    let found = report["findings"].as_array().expect("findings");
    assert!(
        found.iter().any(|f| f["kind"] == "not_running" && f["subject"] == id.as_str()),
        "{report:#}"
    );
    let record = report["record"].as_u64().expect("a drift record");
    assert!(event_kinds(&fx.show(record)).contains(&"drift.instance".to_owned()));
    assert!(fx.status().contains(&id), "kiln status names the dead instance");

    fx.switch_to_repair(false);
    let (id, pid) = an_instance(&fx.data);
    kill9(pid);
    let (code, report) = fx.drift_json();
    assert_eq!(code, 2, "{report:#}");
    assert!(report["findings"].to_string().contains(&id), "{report:#}");
    let repair = fx.wait_repair();
    assert_eq!(repair["plan"]["roll"], true, "{repair:#}");
    assert_eq!(repair["plan"]["reconcile"], false, "{repair:#}");
    let (code, out) = fx.drift();
    assert_eq!(code, 0, "drift left after the repair: {out}");
}

/// A raw admin call to the load balancer: (status, body).
fn admin(state: &lb::LbState, token: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", state.admin_port)).expect("admin port");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn a_backend_added_behind_kilns_back_is_reported() {
    if !require_git("a_backend_added_behind_kilns_back_is_reported") || !have_python3() {
        return;
    }
    let fx = deploy(None);
    let dir = fx.data.join("fleets/web/lb");
    let state = lb::read_state(&dir).expect("lb.json");
    let token = std::fs::read_to_string(dir.join(lb::TOKEN_FILE)).expect("admin-token");
    let stranger = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = stranger.local_addr().expect("addr").port();
    let attach = format!("{{\"address\":\"127.0.0.1:{port}\"}}");
    let (status, body) = admin(&state, token.trim(), "PUT", "/backends/web-0badbeef", &attach);
    assert_eq!(status, 200, "{body}");

    let (code, out) = fx.drift();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("backend: load balancer backend web-0badbeef"), "{out}");
    assert!(out.contains(&format!("127.0.0.1:{port} was not attached by kiln")), "{out}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = admin(&state, token.trim(), "GET", "/backends", "");
        if !body.contains("web-0badbeef") {
            break;
        }
        assert!(Instant::now() < deadline, "the foreign backend stays: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = fx.status();
    assert!(status.contains("web-0badbeef"), "{status}");
}

/// An app image kiln did not bake: a directory with an executable `run`.
fn foreign_image(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let image = dir.join("intruder-image");
    std::fs::create_dir_all(&image).expect("image dir");
    std::fs::write(image.join("app.py"), APP).expect("app.py");
    std::fs::write(image.join("run"), RUN).expect("run");
    std::fs::set_permissions(image.join("run"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    image.canonicalize().expect("canonical")
}

#[test]
fn an_off_image_instance_is_reported_and_replaced_by_a_repair_rollout() {
    const TEST: &str = "an_off_image_instance_is_reported_and_replaced_by_a_repair_rollout";
    if !require_git(TEST) || !have_python3() {
        return;
    }
    use kiln::provider::Provider as _;
    let fx = deploy(None);
    // Behind kiln's back: an instance on another image, launched through the fleet's provider
    // state by another process (as a cloud console would), so kiln's journal never saw it.
    let image = foreign_image(&fx.repo.scratch("foreign"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let intruder = runtime.block_on(async {
        let provider =
            kiln::provider::local::LocalProvider::open(kiln::provider::local::LocalConfig {
                fleet: "web".into(),
                dir: fx.data.join("fleets/web"),
                lb_port: 0,
                kiln_exe: PathBuf::from(support::daemon::kiln_exe()),
            })
            .await
            .expect("open the fleet's local provider");
        let image = kiln::model::ImageRef(image.display().to_string());
        provider.launch(&image, "behind-kilns-back").await.expect("launch").id.to_string()
    });

    let (code, report) = fx.drift_json();
    assert_eq!(code, 2, "{report:#}");
    let found = report["findings"].as_array().expect("findings");
    let about = |kind: &str| found.iter().any(|f| f["kind"] == kind && f["subject"] == intruder);
    assert!(about("off_image"), "{report:#}");
    assert!(about("unknown"), "{report:#}");
    assert!(report["findings"].to_string().contains("intruder-image"), "{report:#}");

    fx.switch_to_repair(false);
    let (code, report) = fx.drift_json();
    assert_eq!(code, 2, "{report:#}");
    let repair = fx.wait_repair();
    assert_eq!(repair["plan"]["roll"], true, "{repair:#}");
    let (code, report) = fx.drift_json();
    assert_eq!(code, 0, "drift left after the repair: {report:#}");
    assert!(!report.to_string().contains(&intruder), "{report:#}");
}

/// A raw call to the daemon's API: the status.
fn api_post(api: &str, path: &str) -> u16 {
    let addr = api.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("api");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read");
    reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn asking_for_a_drift_check_needs_the_token_and_a_known_fleet() {
    if !require_git("asking_for_a_drift_check_needs_the_token_and_a_known_fleet") || !have_python3()
    {
        return;
    }
    let fx = deploy(None);
    let api = fx.daemon.api_url().expect("api url");
    assert_eq!(api_post(&api, "/api/v1/fleets/web/drift"), 401, "no token");
    let (code, _, err) = kiln(&fx.data, &["drift", "nosuch"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no fleet `nosuch`"), "{err}");
}

#[test]
fn drift_is_checked_every_interval_without_being_asked() {
    if !require_git("drift_is_checked_every_interval_without_being_asked") || !have_python3() {
        return;
    }
    let fx = deploy_every("1s", None);
    let dir = fx.data.join("fleets/web/lb");
    let state = lb::read_state(&dir).expect("lb.json");
    let token = std::fs::read_to_string(dir.join(lb::TOKEN_FILE)).expect("admin-token");
    let stranger = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = stranger.local_addr().expect("addr").port();
    let attach = format!("{{\"address\":\"127.0.0.1:{port}\"}}");
    let (status, body) = admin(&state, token.trim(), "PUT", "/backends/web-0badbeef", &attach);
    assert_eq!(status, 200, "{body}");
    // A record about the backend (a check that failed on a loaded machine is a record too,
    // with a `drift.error` event, but not this one).
    let about_backend =
        |e: &Value| e["origin"] == "drift" && e["reason"].to_string().contains("web-0badbeef");
    let log = fx.daemon.wait_log("a periodic drift record", WAIT, |log| {
        log.iter().any(|e| about_backend(e) && e["trigger"] == "interval")
    });
    let record = log.iter().find(|e| about_backend(e)).expect("drift record");
    let shown = fx.show(record["id"].as_u64().expect("id"));
    assert!(event_kinds(&shown).contains(&"drift.backend".to_owned()), "{shown:#}");
    assert!(shown.to_string().contains("web-0badbeef"), "{shown:#}");
    // The backend is gone, so the next periodic check is clean (and adds no record).
    let deadline = Instant::now() + WAIT;
    loop {
        let status = fx.status();
        if status.contains("drift:     none") {
            break;
        }
        assert!(Instant::now() < deadline, "drift never cleared: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = fx.daemon.log().iter().filter(|e| about_backend(e)).count();
    assert_eq!(records, 1, "one record for one finding");
}
