//! Capacity that lives with autoscalers, against the real daemon: a fleet on the exec provider
//! backed by a fake cloud autoscaling group (`tests/autoscale/cloud.py`: a JSON state file over
//! the shipped `local-test` provider's real instance processes, health-checked over real HTTP).
//!
//! 1. The group owns the desired count. A rollout starts; mid-rollout the group scales out
//!    behind kiln's back (two instances on the old image, as its launch template names). The
//!    rollout ends with the raised count, all on the new image, and the journal shows kiln
//!    terminated only old instances it had replaced, never one to shrink the fleet.
//! 2. `capacity: {min: 2, max: 6}` and no desired count: a fleet running 4 rolls to 4.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, for_commit};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};

// Generous: every provider call starts a python interpreter, slow on a busy machine.
const WAIT: Duration = Duration::from_secs(300);

/// The instance app: `/healthz` answers 200, `/` names the image. It exits when its working
/// directory disappears, so a test's temp dir never leaves it running.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
WORK = os.getcwd()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = ("image=%s\n" % os.environ.get("KILN_IMAGE", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)
threading.Thread(target=watchdog, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

const RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";

/// Copies the image directory to a fresh directory per bake.
const BAKE: &str = r#"#!/bin/sh
set -eu
dest="$KILN_IMAGE_STORE/app-$KILN_IDEMPOTENCY_KEY"
rm -rf "$dest.tmp"; cp -a "$KILN_WORK_TREE/image" "$dest.tmp"; rm -rf "$dest"; mv "$dest.tmp" "$dest"
echo "image=$dest" >> "$KILN_OUTPUT"
"#;

const OPS: [&str; 5] = ["list", "launch", "attach", "detach", "terminate"];

/// The manifest: the exec provider on the fake cloud, one replacement at a time, each new
/// instance healthy for 2 s before it serves (so the rollout takes several seconds).
fn manifest(capacity: &str, state: &Path) -> String {
    let exec: String = OPS.iter().map(|op| format!("        {op}: hooks/cloud/{op}\n")).collect();
    format!(
        "fleets:
  - name: web
    image:
      stages:
        - {{ name: app, path: image, bake: hooks/bake }}
    rollout:
      provider: exec
      exec:
{exec}        env: {{ state: {} }}
      capacity: {capacity}
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 2, timeout: 30s }}
      minHealthy: 2s
      drain: 100ms
",
        state.display()
    )
}

/// A repo holding the manifest, the app image, the bake hook and the fake cloud.
fn cloud_repo(repo: &TestRepo, capacity: &str, state: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let manifest = manifest(capacity, state);
    let cloud = read("tests/autoscale/cloud.py");
    let provider = read("hooks/provider/local-test/provider.py");
    let wrappers: Vec<(String, String)> = OPS
        .iter()
        .map(|op| {
            let script = format!("#!/bin/sh\nexec python3 \"$(dirname \"$0\")/cloud.py\" {op}\n");
            (format!("hooks/cloud/{op}"), script)
        })
        .collect();
    let mut entries = vec![
        Entry::File("kiln.yaml", &manifest),
        Entry::Exec("hooks/bake", BAKE),
        Entry::Exec("image/run", RUN),
        Entry::File("image/app.py", APP),
        Entry::File("image/version.txt", "v1\n"),
        Entry::Exec("hooks/cloud/cloud.py", &cloud),
        Entry::Exec("hooks/provider/local-test/provider.py", &provider),
    ];
    entries.extend(wrappers.iter().map(|(path, text)| Entry::Exec(path, text)));
    repo.commit_entries("v1", &entries)
}

/// The fake cloud's state dir, with its group record.
fn cloud_state(data: &Path, desired: Option<u32>) -> PathBuf {
    let state = data.join("cloud");
    std::fs::create_dir_all(&state).unwrap();
    let group = serde_json::json!({ "desired": desired, "template": null });
    std::fs::write(state.join("group.json"), group.to_string()).unwrap();
    state
}

/// Runs the fake cloud's `cloud.py ARGS` from the work tree; returns its stdout as JSON.
fn cloud(repo: &TestRepo, state: &Path, args: &[&str]) -> Value {
    let out = std::process::Command::new("python3")
        .arg(repo.work_path().join("hooks/cloud/cloud.py"))
        .args(args)
        .env("KILN_PROVIDER_STATE", state)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cloud.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("cloud.py {args:?}: {e}: {stdout}"))
}

/// Points the group's launch template at `image`.
fn set_template(state: &Path, image: &str) {
    let path = state.join("group.json");
    let mut group: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    group["template"] = Value::from(image);
    let tmp = state.join("group.json.tmp");
    std::fs::write(&tmp, group.to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn api_get(data: &Path, path: &str) -> Value {
    use std::io::{Read as _, Write as _};
    let info: Value =
        serde_json::from_slice(&std::fs::read(data.join("daemon.json")).unwrap()).unwrap();
    let base = info["api"].as_str().unwrap().trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&base).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {base}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn fleet_entry(log: &[Value], sha: &str) -> Option<Value> {
    for_commit(log, sha).into_iter().find(|e| e["fleet"] == "web").cloned()
}

/// Waits until the rollout of `sha` is terminal; returns its log entry.
fn wait_done(daemon: &Daemon, sha: &str) -> Value {
    let terminal = ["succeeded", "failed", "rolled_back", "superseded", "aborted"];
    let log = daemon.wait_log(&format!("the rollout of {sha} to end"), WAIT, |log| {
        fleet_entry(log, sha).is_some_and(|e| terminal.iter().any(|s| e["state"] == *s))
    });
    let entry = fleet_entry(&log, sha).unwrap();
    assert_eq!(entry["state"], "succeeded", "{entry:#}\ndaemon:\n{}", daemon.logs());
    entry
}

/// The instance journal entries of `rollout` with `action`.
fn journal<'a>(journal: &'a [Value], rollout: u64, action: &str) -> Vec<&'a Value> {
    journal.iter().filter(|e| e["rollout"] == rollout && e["action"] == action).collect()
}

/// What the cloud runs now: (running instances, their images, reported desired).
fn fleet(repo: &TestRepo, state: &Path) -> (Vec<Value>, BTreeSet<String>, Value) {
    let listed = cloud(repo, state, &["list"]);
    let running: Vec<Value> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["running"] == true)
        .cloned()
        .collect();
    let images = running.iter().map(|i| i["image"].as_str().unwrap().to_owned()).collect();
    (running, images, listed["desired"].clone())
}

/// Checks the journal of the rollout `id` from `old` to `new`: `replaced` old instances were
/// terminated, each as `replaced` and on the old image; as many new ones were launched; no
/// instance on the new image was terminated.
fn check_journal(data: &Path, id: u64, old: &str, new: &str, replaced: usize) -> Vec<String> {
    let fleet = api_get(data, "/api/v1/fleets/web/instances");
    let entries = fleet["journal"].as_array().unwrap();
    let terminated = journal(entries, id, "terminated");
    for entry in &terminated {
        assert_eq!(entry["image"], old, "only old instances are terminated: {entry:#}");
        assert_eq!(entry["reason"], "replaced", "terminated to replace it, never to shrink");
    }
    assert_eq!(terminated.len(), replaced, "{terminated:#?}");
    let launched = journal(entries, id, "launched");
    assert_eq!(launched.len(), replaced, "one launch per replacement: {launched:#?}");
    assert!(launched.iter().all(|e| e["image"] == new), "{launched:#?}");
    let new_terminated: Vec<&Value> =
        entries.iter().filter(|e| e["action"] == "terminated" && e["image"] == new).collect();
    assert!(new_terminated.is_empty(), "a new instance was terminated: {new_terminated:#?}");
    terminated.iter().map(|e| e["instance"].as_str().unwrap().to_owned()).collect()
}

fn ready(test: &str) -> bool {
    require_git(test) && have_python3()
}

#[test]
fn a_scale_out_mid_rollout_ends_with_the_raised_count_on_the_new_image() {
    if !ready("a_scale_out_mid_rollout_ends_with_the_raised_count_on_the_new_image") {
        return;
    }
    let repo = TestRepo::new();
    let data = repo.scratch("data");
    let state = cloud_state(&data, Some(3));
    let v1 = cloud_repo(&repo, "3", &state);
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    let first = wait_done(&daemon, &v1);
    let image1 = first["image"].as_str().unwrap().to_owned();
    let (running, images, desired) = fleet(&repo, &state);
    assert_eq!((running.len(), desired), (3, Value::from(3)), "{running:#?}");
    assert_eq!(images, BTreeSet::from([image1.clone()]));
    // The group's launch template names the deployed image (kiln's reconcile would update it
    // with the new image later; here it stays on the old one, the harder case).
    set_template(&state, &image1);

    let v2 = repo.commit("v2", &[("image/version.txt", "v2\n")]);
    // Mid-rollout: once the first instance on the new image is launched.
    let deadline = Instant::now() + WAIT;
    let id = loop {
        let log = daemon.log();
        let entry = fleet_entry(&log, &v2);
        if let Some(id) = entry.as_ref().and_then(|e| e["id"].as_u64()) {
            let fleet = api_get(&data, "/api/v1/fleets/web/instances");
            if !journal(fleet["journal"].as_array().unwrap(), id, "launched").is_empty() {
                break id;
            }
        }
        assert!(Instant::now() < deadline, "v2 never launched an instance: {entry:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let scaled = cloud(&repo, &state, &["scale", "2"]);
    let log = daemon.log();
    let entry = fleet_entry(&log, &v2).unwrap();
    assert_eq!(entry["state"], "rolling", "the scale-out happened mid-rollout: {entry:#}");

    let second = wait_done(&daemon, &v2);
    let image2 = second["image"].as_str().unwrap().to_owned();
    assert_ne!(image1, image2);
    let (running, images, desired) = fleet(&repo, &state);
    assert_eq!(desired, Value::from(5));
    assert_eq!(running.len(), 5, "the raised count, not the manifest's 3: {running:#?}");
    assert_eq!(images, BTreeSet::from([image2.clone()]), "all on the new image");
    assert!(running.iter().all(|i| i["attached"] == true), "all in service: {running:#?}");
    // Every old instance, the autoscaler's two included, was replaced; nothing else terminated.
    let terminated = check_journal(&data, id, &image1, &image2, 5);
    for added in scaled.as_array().unwrap() {
        assert!(terminated.iter().any(|t| t == added.as_str().unwrap()), "{added} replaced");
    }
}

#[test]
fn a_range_without_a_desired_count_keeps_what_runs() {
    if !ready("a_range_without_a_desired_count_keeps_what_runs") {
        return;
    }
    let repo = TestRepo::new();
    let data = repo.scratch("data");
    let state = cloud_state(&data, None);
    let v1 = cloud_repo(&repo, "{ min: 2, max: 6 }", &state);
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s"]);
    // An empty fleet starts at the minimum.
    let first = wait_done(&daemon, &v1);
    let image1 = first["image"].as_str().unwrap().to_owned();
    let (running, _, desired) = fleet(&repo, &state);
    assert_eq!((running.len(), desired), (2, Value::Null), "{running:#?}");
    // Someone scales the fleet to 4 (no desired count is reported).
    set_template(&state, &image1);
    cloud(&repo, &state, &["scale", "2"]);

    let v2 = repo.commit("v2", &[("image/version.txt", "v2\n")]);
    let second = wait_done(&daemon, &v2);
    let image2 = second["image"].as_str().unwrap().to_owned();
    let (running, images, _) = fleet(&repo, &state);
    assert_eq!(running.len(), 4, "the fleet keeps its 4 instances: {running:#?}");
    assert_eq!(images, BTreeSet::from([image2.clone()]), "all on the new image");
    check_journal(&data, second["id"].as_u64().unwrap(), &image1, &image2, 4);
}
