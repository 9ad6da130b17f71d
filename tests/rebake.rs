//! Issue "Bake images and reconcile infrastructure through hooks": `image.rebake` rebakes on a
//! schedule without a commit, skipping the cache, and rolls the fleet through the real daemon.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{Daemon, kiln};
use support::git::{Entry, TestRepo, require_git};

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

const MANIFEST: &str = "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: app, path: image, bake: hooks/bake }\n      rebake: 3s\n    rollout:\n      capacity: 1\n      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 30s }\n      drain: 200ms\n      loadBalancer: { port: 0 }\n";

/// A bake hook that counts its runs and builds a fresh directory image each time (as a Packer
/// build of the same template makes a new AMI with today's security updates).
const BAKE: &str = r#"#!/bin/sh
set -eu
n=$(cat "$KILN_IMAGE_STORE/runs" 2>/dev/null || echo 0); n=$((n + 1))
mkdir -p "$KILN_IMAGE_STORE"; echo "$n" > "$KILN_IMAGE_STORE/runs"
dest="$KILN_IMAGE_STORE/app-$n"; rm -rf "$dest"; cp -a "$KILN_WORK_TREE/image" "$dest"
echo "image=$dest" >> "$KILN_OUTPUT"
"#;

#[test]
fn a_scheduled_rebake_bakes_without_the_cache_and_rolls() {
    let name = "a_scheduled_rebake_bakes_without_the_cache_and_rolls";
    if !require_git(name) {
        return;
    }
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !python {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name}: python3 is required under CI"
        );
        eprintln!("SKIP: {name}: python3 is missing");
        return;
    }
    let repo = TestRepo::new();
    let sha = repo.commit_entries(
        "app",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::Exec("hooks/bake", BAKE),
            Entry::Exec("image/run", &repo_file("examples/demo-infra/image/base/run")),
            Entry::Exec("image/server.py", &repo_file("examples/demo-infra/image/base/server.py")),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1h"]);
    let log = daemon.wait_log("a scheduled rebake to succeed", Duration::from_secs(60), |log| {
        log.iter().any(|e| e["trigger"] == "schedule" && e["state"] == "succeeded")
    });
    let rebake =
        log.iter().find(|e| e["trigger"] == "schedule" && e["state"] == "succeeded").unwrap();
    let first = log.iter().find(|e| e["trigger"] != "schedule" && e["fleet"] == "web").unwrap();
    assert_eq!(rebake["commit"], sha.as_str(), "rebuilt from the deployed commit, no new commit");
    assert_eq!(rebake["origin"], "rebake");
    assert_ne!(rebake["image"], first["image"], "a new image, not the cached one");
    assert_eq!(rebake["previous_image"], first["image"]);

    let id = rebake["id"].as_u64().unwrap().to_string();
    let (code, out, err) = kiln(&data, &["show", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> =
        shown["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"bake.start") && !kinds.contains(&"bake.cached"),
        "the cache was skipped: {kinds:?}"
    );
    assert!(kinds.contains(&"instance.attached"), "the fleet rolled onto it: {kinds:?}");
}
