//! Garbage collection of images, terminated instance directories and exec repo copies.
//!
//! `collect_*` tests run `kiln::gc::collect` on a real store and real directories (images with
//! files, instance records, planted symlinks). The daemon test runs the real `kiln run` on a
//! real repository baked by the shipped `hooks/bake-dir`, with real instances behind the real
//! load balancer: after several rollouts only the kept images remain, terminated instance dirs
//! are gone, a rollback to a kept image works, and a removed image's cache entry is rebaked.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::gc::{Input, Kind};
use kiln::model::{ImageRef, Revision, RolloutId};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::store::{BakeRecord, Deployed, Store};
use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};

const WAIT: Duration = Duration::from_secs(90);

fn rev(n: u32) -> Revision {
    Revision(format!("{n:0>40}"))
}

/// A directory image `images/<name>` holding `size` bytes; returns its path (the image id).
fn image(data: &Path, name: &str, size: usize) -> PathBuf {
    let dir = data.join("images").join(name);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("run"), "#!/bin/sh\n").unwrap();
    std::fs::write(dir.join("sub/blob"), vec![b'x'; size]).unwrap();
    dir
}

fn rollout(fleet: &str, n: u32, state: RolloutState, image: Option<&Path>) -> Rollout {
    let now = kiln::model::now();
    let mut rollout = Rollout::new(
        Some(fleet.into()),
        rev(n),
        format!("change {n}"),
        "poll".into(),
        Origin::Commit,
        now,
    );
    rollout.state = state;
    rollout.plan = Plan::default();
    rollout.image = image.map(|p| ImageRef(p.display().to_string()));
    rollout.finished_at = state.is_terminal().then_some(now);
    rollout
}

fn bake(fleet: &str, key: &str, image: &Path, rollout: RolloutId) -> BakeRecord {
    BakeRecord {
        key: key.into(),
        fleet: fleet.into(),
        stage: "app".into(),
        image: ImageRef(image.display().to_string()),
        revision: rev(1),
        rollout,
        baked_at: kiln::model::now(),
        outputs: Default::default(),
    }
}

fn instance_record(data: &Path, fleet: &str, id: &str, image: &Path, state: &str) -> PathBuf {
    let dir = data.join("fleets").join(fleet).join("instances").join(id);
    std::fs::create_dir_all(dir.join("work")).unwrap();
    std::fs::write(dir.join("log"), "served 3 requests\n").unwrap();
    let record = serde_json::json!({
        "id": id, "image": image, "key": format!("key-{id}"), "port": 1,
        "state": state, "process": null, "launched_at": kiln::model::now(),
    });
    std::fs::write(dir.join("instance.json"), record.to_string()).unwrap();
    dir
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn collect_keeps_the_last_n_successes_and_everything_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), "do not delete").unwrap();
    let store = Store::open(&data, 0).unwrap();

    let base = image(&data, "web-base-1", 100);
    let app: Vec<PathBuf> =
        (1..=5).map(|n| image(&data, &format!("web-app-{n}"), 1000 * n)).collect();
    // A link inside an image about to go points outside the data dir: it must not be followed.
    std::os::unix::fs::symlink(&outside, app[1].join("escape")).unwrap();
    // A link planted in images/ itself, named by no record: left alone, target untouched.
    std::os::unix::fs::symlink(&outside, data.join("images/planted")).unwrap();
    let stray = image(&data, "hand-made", 10);
    let busy_old = image(&data, "api-app-0", 10);
    let busy_now = image(&data, "api-app-1", 10);

    // web: 1 ok, 2 ok, 3 failed, 4 ok, 5 ok (deployed); keep 2 → 4 and 5 (+ base).
    let mut ids = Vec::new();
    for (n, state) in [
        (1, RolloutState::Succeeded),
        (2, RolloutState::Succeeded),
        (3, RolloutState::Failed),
        (4, RolloutState::Succeeded),
        (5, RolloutState::Succeeded),
    ] {
        let mut r = rollout("web", n, state, Some(&app[n as usize - 1]));
        r.stage_images.insert("base".into(), ImageRef(base.display().to_string()));
        ids.push(store.create_rollout(r).unwrap().id);
    }
    store
        .set_deployed(&Deployed {
            fleet: "web".into(),
            revision: rev(5),
            image: ImageRef(app[4].display().to_string()),
            rollout: ids[4],
            trees: Default::default(),
            at: kiln::model::now(),
        })
        .unwrap();
    store.put_bake(&bake("web", "k2", &app[1], ids[1])).unwrap();
    store.put_bake(&bake("web", "k4", &app[3], ids[3])).unwrap();
    // api is busy (a rollout is rolling): nothing of it is touched, not even its old image.
    store.put_bake(&bake("api", "a0", &busy_old, ids[0])).unwrap();
    store.create_rollout(rollout("api", 7, RolloutState::Rolling, Some(&busy_now))).unwrap();

    // app-1 still runs on an instance; one instance is terminated; one is being launched.
    instance_record(&data, "web", "web-live", &app[0], "running");
    let dead = instance_record(&data, "web", "web-dead", &app[2], "terminated");
    instance_record(&data, "web", "web-new", &app[4], "launching");
    std::fs::create_dir_all(data.join("fleets/web/instances/web-empty")).unwrap();
    // Exec repo copies: the deployed revision, one an open provider uses, and a stale one.
    let provider = data.join("fleets/web/provider");
    for n in [5, 6, 9] {
        std::fs::create_dir_all(provider.join(rev(n).as_str()).join("hooks")).unwrap();
        std::fs::write(provider.join(rev(n).as_str()).join("kiln.yaml"), "fleets: []\n").unwrap();
    }

    let mut input = Input { keep_images: 2, in_use_known: false, ..Input::default() };
    input.repo_in_use.insert("web".into(), [rev(6).0].into());

    // A provider that could not be listed: no image goes, the rest does.
    let report = kiln::gc::collect(&store, &data, &input).unwrap();
    assert!(report.removed.iter().all(|r| r.kind != Kind::Image), "{report:#?}");
    assert!(!dead.exists(), "terminated instance dir removed");
    assert_eq!(names(&provider), set(&[rev(5).as_str(), rev(6).as_str()]));

    input.in_use_known = true;
    let report = kiln::gc::collect(&store, &data, &input).unwrap();
    let gone: BTreeSet<String> = report
        .removed
        .iter()
        .filter(|r| r.kind == Kind::Image)
        .map(|r| r.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(gone, set(&["web-app-2", "web-app-3"]), "{report:#?}");
    assert_eq!(
        names(&data.join("images")),
        set(&[
            "web-base-1",
            "web-app-1",
            "web-app-4",
            "web-app-5",
            "planted",
            "hand-made",
            "api-app-0",
            "api-app-1"
        ]),
    );
    assert!(stray.exists() && busy_old.exists() && busy_now.exists());
    assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "do not delete");
    assert!(data.join("images/planted").symlink_metadata().unwrap().file_type().is_symlink());
    let freed: u64 = report.removed.iter().map(|r| r.bytes).sum();
    assert!(freed >= 2000 + 3000, "counted the blobs, not the link target: {freed}");
    assert!(freed < 2000 + 3000 + 1000, "{freed}");
    assert_eq!(
        names(&data.join("fleets/web/instances")),
        set(&["web-live", "web-new", "web-empty"])
    );

    // The cache entry of the removed image is dropped; the kept one stays.
    let keys: BTreeSet<String> = store.bakes().unwrap().into_iter().map(|b| b.key).collect();
    assert_eq!(keys, set(&["k4", "a0"]));

    // Recorded as events on the fleet's newest rollout, and as the last run's summary.
    let events = store.events(ids[4], 0).unwrap();
    let removed: Vec<_> = events.iter().filter(|e| e.kind == "gc.removed").collect();
    assert!(removed.iter().any(|e| e.message.contains("web-app-2")), "{events:#?}");
    assert!(removed.iter().all(|e| e.data.as_ref().is_some_and(|d| d["bytes"].is_u64())));
    assert!(events.iter().any(|e| e.kind == "gc" && e.message.contains("2 image(s)")));
    let last: kiln::gc::Report = store.get_meta(kiln::gc::LAST_KEY).unwrap().unwrap();
    assert_eq!(last.removed.len(), report.removed.len());

    // Nothing left to do: a second run removes nothing and records nothing.
    let again = kiln::gc::collect(&store, &data, &input).unwrap();
    assert!(again.removed.is_empty(), "{again:#?}");

    // A run killed after dropping a cache entry and before deleting its image left the image
    // named by nothing but the pending list: the next run finishes it, re-checked.
    let orphan = image(&data, "web-app-orphan", 10);
    let kept = &app[4];
    let pending: Vec<kiln::gc::Removal> = [&orphan, kept]
        .iter()
        .map(|p| kiln::gc::Removal {
            fleet: "web".into(),
            kind: Kind::Image,
            path: (*p).clone(),
            bytes: 0,
        })
        .collect();
    store.set_meta(kiln::gc::PENDING_KEY, &pending).unwrap();
    let resumed = kiln::gc::collect(&store, &data, &input).unwrap();
    assert!(!orphan.exists(), "{resumed:#?}");
    assert!(kept.exists(), "a pending entry that is now retained is not deleted");
    assert!(store.get_meta::<Vec<kiln::gc::Removal>>(kiln::gc::PENDING_KEY).unwrap().is_none());
}

#[test]
fn collect_refuses_an_image_store_that_leads_outside_the_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let elsewhere = tmp.path().join("elsewhere");
    let victim = image(&elsewhere, "web-app-1", 10);
    std::fs::create_dir_all(&data).unwrap();
    // `<data>/images` is a symlink to a directory outside the data dir.
    std::os::unix::fs::symlink(elsewhere.join("images"), data.join("images")).unwrap();
    let store = Store::open(&data, 0).unwrap();
    let named = data.join("images/web-app-1");
    let old =
        store.create_rollout(rollout("web", 1, RolloutState::Succeeded, Some(&named))).unwrap();
    store.put_bake(&bake("web", "k1", &named, old.id)).unwrap();
    for n in 2..=4 {
        let other = data.join(format!("images/none-{n}"));
        store.create_rollout(rollout("web", n, RolloutState::Succeeded, Some(&other))).unwrap();
    }
    let input = Input { keep_images: 1, in_use_known: true, ..Input::default() };
    let report = kiln::gc::collect(&store, &data, &input).unwrap();
    assert!(victim.join("sub/blob").exists(), "nothing outside the data dir is removed");
    assert!(report.removed.is_empty(), "{report:#?}");
    assert!(report.errors.iter().any(|e| e.contains("outside the data dir")), "{report:#?}");
}

// ---------------------------------------------------------------------------------------------
// The real daemon.
// ---------------------------------------------------------------------------------------------

/// python3 stdlib: answers 200 everywhere; exits when its working directory disappears.
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
const MANIFEST: &str = "fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - { name: base, path: image/base, bake: hooks/bake-dir }
        - { name: app, path: image/app, from: base, bake: hooks/bake-dir }
      timeout: 1m
    rollout:
      provider: local
      capacity: 1
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 20s }
      minHealthy: 100ms
      drain: 100ms
      onFailure: rollback
      loadBalancer: { port: 0 }
";

fn bake_dir_hook() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir")).unwrap()
}

fn fleet_entry(log: &[Value], sha: &str) -> Option<Value> {
    for_commit(log, sha).into_iter().find(|e| e["fleet"] == "web").cloned()
}

fn wait_state(daemon: &Daemon, sha: &str, state: &str) -> Value {
    let log = daemon.wait_log(&format!("{sha} {state}"), WAIT, |log| {
        fleet_entry(log, sha).is_some_and(|e| e["state"] == state)
    });
    fleet_entry(&log, sha).unwrap()
}

fn show(data: &Path, id: u64) -> Value {
    let (code, out, err) = kiln(data, &["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn kinds(rollout: &Value) -> Vec<String> {
    rollout["events"]
        .as_array()
        .map(|events| events.iter().map(|e| e["kind"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

/// `GET path` on the daemon's API (found through `daemon.json`), as JSON.
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

/// Bytes under `path`, links not followed.
fn du(path: &Path) -> u64 {
    let Ok(meta) = path.symlink_metadata() else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).unwrap().flatten().map(|e| du(&e.path())).sum()
}

fn wait_until(what: &str, cond: impl Fn() -> bool, daemon: &Daemon, seen: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; saw {}\n{}",
            seen(),
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_keeps_n_images_removes_dead_instances_and_rollback_still_works() {
    let test = "the_daemon_keeps_n_images_removes_dead_instances_and_rollback_still_works";
    if !require_git(test) || !have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let hook = bake_dir_hook();
    // 256 KiB of content in the base stage, copied into every app image (as a real image is).
    let blob = "x".repeat(256 * 1024);
    let first = repo.commit_entries(
        "v1",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::File("image/base/blob", &blob),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/base/run", RUN),
            Entry::File("image/base/app.py", APP),
            Entry::File("image/app/message.txt", "v1\n"),
        ],
    );
    let data = repo.scratch("data");
    let outside = repo.scratch("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep me").unwrap();
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s", "--keep-images", "2"]);
    let v1 = wait_state(&daemon, &first, "succeeded");
    let v1_image = PathBuf::from(v1["image"].as_str().unwrap());
    // A symlink inside the first image, pointing outside the data dir.
    std::os::unix::fs::symlink(&outside, v1_image.join("escape")).unwrap();

    let mut shas = vec![first];
    let mut entries = vec![v1];
    for n in 2..=5 {
        let sha = repo.commit(&format!("v{n}"), &[("image/app/message.txt", &format!("v{n}\n"))]);
        entries.push(wait_state(&daemon, &sha, "succeeded"));
        shas.push(sha);
    }
    let image_of = |i: usize| entries[i]["image"].as_str().unwrap().to_owned();
    let images = data.join("images");
    let instances = data.join("fleets/web/instances");
    // Kept: the last two successful app images and their base; v1..v3's app images go.
    let base = entries[4]["stage_images"]["base"].as_str().unwrap().to_owned();
    let expected: BTreeSet<String> = [image_of(3), image_of(4), base.clone()]
        .iter()
        .map(|p| Path::new(p).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let listing = |dir: &Path| format!("{:?}", names(dir));
    wait_until(
        "GC to leave the kept images only",
        || names(&images) == expected,
        &daemon,
        || format!("{} (expected {expected:?})", listing(&images)),
    );
    assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep me");
    // One instance serves; the four it replaced are gone with their directories.
    wait_until(
        "terminated instance dirs to go",
        || names(&instances).len() == 1,
        &daemon,
        || listing(&instances),
    );

    // Every removal is an event with its size, on the fleet's newest rollout at the time.
    let mut removed = Vec::new();
    let mut freed = 0;
    for entry in &entries {
        let rollout = show(&data, entry["id"].as_u64().unwrap());
        for event in rollout["events"].as_array().unwrap() {
            if event["kind"] == "gc.removed" {
                freed += event["data"]["bytes"].as_u64().unwrap();
                removed.push(event["data"]["path"].as_str().unwrap().to_owned());
            }
        }
    }
    for gone in [image_of(0), image_of(1), image_of(2)] {
        assert!(removed.contains(&gone), "no gc.removed event for {gone}: {removed:?}");
    }
    let after = du(&images) + du(&data.join("fleets"));
    eprintln!(
        "disk: images + fleets before GC {} bytes, after {} bytes ({} freed in {} removals)",
        after + freed,
        after,
        freed,
        removed.len()
    );

    // The last run's summary over the API.
    let gc = api_get(&data, "/api/v1/gc");
    assert!(gc["totals"]["bytes"].as_u64().unwrap() >= freed, "{gc:#}");
    assert_eq!(gc["last"]["keep_images"], 2, "{gc:#}");

    // A rollback to a kept image works.
    let (code, out, err) = kiln(&data, &["rollback", "web", "--to", &shas[3]]);
    assert_eq!(code, 0, "{out}{err}");
    let log = daemon.wait_log("the rollback to succeed", WAIT, |log| {
        log.iter().any(|e| e["origin"] == "rollback" && e["state"] == "succeeded")
    });
    let rollback = log.iter().find(|e| e["origin"] == "rollback").unwrap();
    assert_eq!(rollback["image"].as_str().unwrap(), image_of(3));

    // v1's app image is gone and so is its cache entry: the same content is baked again.
    let again = repo.commit("back to v1", &[("image/app/message.txt", "v1\n")]);
    let entry = wait_state(&daemon, &again, "succeeded");
    let rollout = show(&data, entry["id"].as_u64().unwrap());
    let kinds = kinds(&rollout);
    assert!(kinds.iter().any(|k| k == "bake.start"), "app rebaked: {kinds:?}");
    assert!(Path::new(entry["image"].as_str().unwrap()).join("run").exists());
    assert!(images.join(Path::new(&base).file_name().unwrap()).exists(), "base kept");
}

#[test]
fn the_daemon_removes_exec_repo_copies_of_old_revisions() {
    let test = "the_daemon_removes_exec_repo_copies_of_old_revisions";
    if !require_git(test) || !have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let data = repo.scratch("data");
    std::fs::create_dir_all(&data).unwrap();
    // The provider's own state lives in the data dir, so the test's cleanup finds its processes.
    let state = data.join("exec-state");
    let ops = ["list", "launch", "attach", "detach", "terminate"];
    let exec: String =
        ops.iter().map(|op| format!("        {op}: hooks/provider/local-test/{op}\n")).collect();
    let manifest = MANIFEST
        .replace(
            "      provider: local\n",
            &format!(
                "      provider: exec\n      exec:\n{exec}        env: {{ state: {} }}\n",
                state.display()
            ),
        )
        .replace("      loadBalancer: { port: 0 }\n", "");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/provider/local-test");
    let scripts: Vec<(String, String)> = std::fs::read_dir(&shipped)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (
                format!("hooks/provider/local-test/{name}"),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    let hook = bake_dir_hook();
    let mut entries = vec![
        Entry::File("kiln.yaml", &manifest),
        Entry::Exec("hooks/bake-dir", &hook),
        Entry::Exec("image/base/run", RUN),
        Entry::File("image/base/app.py", APP),
        Entry::File("image/app/message.txt", "v1\n"),
    ];
    entries.extend(scripts.iter().map(|(path, text)| Entry::Exec(path, text)));
    let mut shas = vec![repo.commit_entries("v1", &entries)];
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1s", "--keep-images", "2"]);
    wait_state(&daemon, &shas[0], "succeeded");
    for n in 2..=4 {
        let sha = repo.commit(&format!("v{n}"), &[("image/app/message.txt", &format!("v{n}\n"))]);
        // Each rollout runs the provider from a copy of the repo at its own revision, made
        // after the previous rollout's GC: proof that GC left the copy in use alone.
        wait_state(&daemon, &sha, "succeeded");
        shas.push(sha);
    }
    let copies = data.join("fleets/web/provider");
    let last = set(&[shas[3].as_str()]);
    wait_until(
        "GC to leave the deployed revision's copy only",
        || names(&copies) == last,
        &daemon,
        || format!("{:?}", names(&copies)),
    );
}

/// Writes an old finished rollout with `n` hook lines and a young one into a fresh store at
/// `data`; returns their ids.
fn old_and_young(data: &Path, n: usize) -> (RolloutId, RolloutId) {
    use kiln::store::{Event, EventKind, Level};
    let store = Store::open(data, 0).unwrap();
    let long_ago = kiln::model::now() - chrono::Duration::days(60);
    let mut ids = Vec::new();
    for (i, at) in [long_ago, kiln::model::now()].into_iter().enumerate() {
        let mut r = rollout("web", i as u32 + 1, RolloutState::Succeeded, None);
        r.image = Some(ImageRef(format!("img-{i}")));
        r.created_at = at;
        r.finished_at = Some(at);
        let events = (0..n)
            .map(|k| {
                Event::new(
                    RolloutId(0),
                    Level::Info,
                    EventKind::HookStdout,
                    format!("line {k}"),
                    None,
                )
            })
            .collect();
        let created = store.create_rollouts(vec![(r, events)]).unwrap().remove(0);
        store
            .put_rollout_with_change(&created, RolloutState::Pending, Level::Info, "done")
            .unwrap();
        ids.push(created.id);
    }
    (ids[0], ids[1])
}

#[test]
fn kiln_gc_compacts_old_event_streams_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (old, young) = old_and_young(&data, 40);

    let (code, out, err) = kiln(&data, &["gc", "--compact-after", "30d"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("compacted the events of 1 rollout(s): 40 event(s)"), "{out}");

    let store = Store::open(&data, 0).unwrap();
    let kinds = |id| -> Vec<String> {
        store.events(id, 0).unwrap().iter().map(|e| e.kind.to_string()).collect()
    };
    assert_eq!(kinds(old), ["gc", "state"], "the summary and the state change");
    assert_eq!(kinds(young).len(), 41, "a young rollout keeps every event");
    let kept = store.rollout(old).unwrap();
    assert_eq!(kept.image, Some(ImageRef("img-0".into())), "the rollout itself stays");
    assert_eq!(kept.state, RolloutState::Succeeded);
    let last: kiln::gc::Report = store.get_meta(kiln::gc::LAST_KEY).unwrap().unwrap();
    assert_eq!((last.compacted.rollouts, last.compacted.events), (1, 40));
    let totals: kiln::gc::Totals = store.get_meta(kiln::gc::TOTALS_KEY).unwrap().unwrap();
    assert_eq!(totals.compacted_events, 40);
    drop(store);

    // Nothing more is due.
    let (code, out, _) = kiln(&data, &["gc", "--compact-after", "30d"]);
    assert_eq!(code, 0);
    assert!(out.contains("of 0 rollout(s)"), "{out}");
}

#[test]
fn the_daemon_compacts_old_event_streams_by_itself() {
    if !require_git("the_daemon_compacts_old_event_streams_by_itself") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("empty manifest", &[("kiln.yaml", "fleets: []\n")]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (old, _) = old_and_young(&data, 10);
    let daemon = Daemon::start(&repo.url(), &data, &["--compact-after", "30d"]);
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = support::metrics::get(&data, "/api/v1/gc");
        let gc: Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && gc["totals"]["compacted_events"] == 10 {
            assert_eq!(gc["last"]["compacted"]["rollouts"], 1, "{gc}");
            break;
        }
        assert!(Instant::now() < deadline, "never compacted: {body}\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, body) = support::metrics::get(&data, &format!("/api/v1/rollouts/{}", old.0));
    let shown: Value = serde_json::from_str(&body).unwrap();
    let kinds: Vec<&str> =
        shown["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["gc", "state"], "{shown}");
}
