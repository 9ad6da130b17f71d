//! Issue "Webhooks, the HTTP API and the operator verbs": a real `git push` into a bare repo
//! carrying kiln's `hooks/post-receive` leads to a rollout that kiln records.
//!
//! kiln watches the repo over `git://` with an hour-long poll, so neither polling nor the
//! notify watcher (local paths only) can explain the rollout: only the hook's delivery can.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::daemon::{Daemon, for_commit, kiln};
use support::git::{Entry, TestRepo, require_git};

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
        || std::process::Command::new(tool)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
}

const MANIFEST: &str = "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: app, path: image, bake: hooks/bake-dir }\n    rollout:\n      capacity: 1\n      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 30s }\n      drain: 200ms\n      loadBalancer: { port: 0 }\n";

#[test]
fn a_push_through_post_receive_leads_to_a_recorded_rollout() {
    let name = "a_push_through_post_receive_leads_to_a_recorded_rollout";
    if !require_git(name) {
        return;
    }
    if !(have("curl") && have("openssl") && have("python3")) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name}: curl, openssl and python3 are required under CI"
        );
        eprintln!("SKIP: {name}: curl, openssl or python3 is missing");
        return;
    }
    let repo = TestRepo::new();
    repo.commit("readme", &[("README", "infra\n")]);
    let server = repo.serve_git();

    let secrets = repo.scratch("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let secret = secrets.join("generic");
    std::fs::write(&secret, "s3cret-for-the-hook\n").unwrap();
    let data = repo.scratch("data");
    let daemon = Daemon::start(
        &server.url("repo.git"),
        &data,
        &["--poll", "1h", "--generic-secret-file", secret.to_str().unwrap()],
    );
    let api = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(data.join("daemon.json")).unwrap(),
    )
    .unwrap()["api"]
        .as_str()
        .unwrap()
        .to_owned();

    // Install the hook as a user would.
    let hook = repo.bare_path().join("hooks/post-receive");
    std::fs::write(&hook, repo_file("hooks/post-receive")).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    repo.git_bare(&["config", "kiln.url", &api]);
    repo.git_bare(&["config", "kiln.secretFile", secret.to_str().unwrap()]);

    let sha = repo.commit_entries(
        "deploy the app",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::Exec("hooks/bake-dir", &repo_file("hooks/bake-dir")),
            Entry::Exec("image/run", &repo_file("examples/demo-infra/image/base/run")),
            Entry::Exec("image/server.py", &repo_file("examples/demo-infra/image/base/server.py")),
        ],
    );
    let log = daemon.wait_log("the rollout of the pushed commit", Duration::from_secs(60), |log| {
        for_commit(log, &sha)
            .iter()
            .any(|e| e["state"].as_str().is_some_and(|s| s == "succeeded" || s == "failed"))
    });
    let entry = for_commit(&log, &sha)[0];
    assert_eq!(
        entry["trigger"], "webhook:generic",
        "only the hook's delivery explains it: {entry}"
    );
    assert_eq!(entry["fleet"], "web");
    assert_eq!(entry["state"], "succeeded", "{entry}\n{}", daemon.logs());

    // `kiln status` is the operator's view of the provider, refreshed continuously.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (code, out, err) = kiln(&data, &["status", "--json"]);
        assert!(code == 0 || code == 1, "kiln status failed: {err}");
        let status: serde_json::Value =
            serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
        if status[0]["instances"].as_array().is_some_and(|i| !i.is_empty()) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kiln status never showed the instance: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let instances = status[0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{status}");
    assert_eq!(instances[0]["image"], entry["image"]);
    // The view probes the health check of each running instance.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = kiln(&data, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if status[0]["instances"][0]["healthy"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the instance never showed healthy: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
