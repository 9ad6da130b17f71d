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

/// Issue 15: a scheduled rebake with the shipped `hooks/bake-dir` (which names its image by
/// `KILN_IDEMPOTENCY_KEY`) builds a new directory image and replaces every instance. Before, the
/// rebake passed the cache key again, bake-dir reused its directory, and 0 instances moved.
#[test]
fn a_scheduled_rebake_of_a_bake_dir_fleet_replaces_every_instance() {
    let name = "a_scheduled_rebake_of_a_bake_dir_fleet_replaces_every_instance";
    if !require_git(name) || !python(name) {
        return;
    }
    let manifest = MANIFEST
        .replace("bake: hooks/bake", "bake: hooks/bake-dir")
        .replace("rebake: 3s", "rebake: 4s")
        .replace("capacity: 1", "capacity: 2");
    let repo = TestRepo::new();
    let sha = repo.commit_entries(
        "app",
        &[
            Entry::File("kiln.yaml", &manifest),
            Entry::Exec("hooks/bake-dir", &repo_file("hooks/bake-dir")),
            Entry::Exec("image/run", &repo_file("examples/demo-infra/image/base/run")),
            Entry::Exec("image/server.py", &repo_file("examples/demo-infra/image/base/server.py")),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1h"]);
    let log = daemon.wait_log("a scheduled rebake to succeed", Duration::from_secs(90), |log| {
        log.iter().any(|e| e["origin"] == "rebake" && e["state"] == "succeeded")
    });
    let rebake = log.iter().find(|e| e["origin"] == "rebake" && e["state"] == "succeeded").unwrap();
    let first = log.iter().find(|e| e["origin"] == "commit" && e["fleet"] == "web").unwrap();
    assert_eq!(rebake["commit"], sha.as_str());
    let (old, new) = (first["image"].as_str().unwrap(), rebake["image"].as_str().unwrap());
    assert_ne!(new, old, "bake-dir built a new directory image");
    assert!(Path::new(new).join("run").is_file(), "{new} is a directory image");

    let id = rebake["id"].as_u64().unwrap().to_string();
    let (code, out, err) = kiln(&data, &["show", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    let events = shown["events"].as_array().unwrap();
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(count("instance.attached"), 2, "both instances replaced: {shown:#}");
    assert_eq!(count("instance.terminated"), 2, "both old instances gone: {shown:#}");
    assert!(
        !events.iter().any(|e| e["data"]["unchanged"] == true),
        "no same-image warning for a real rebuild: {shown:#}"
    );
}

/// A rebake whose hook reports the image it reported before (it ignores both the fresh key
/// and `KILN_REBAKE`) is recorded as such, visibly, instead of silently deploying nothing.
#[test]
fn a_rebake_that_returns_the_same_image_says_so() {
    let name = "a_rebake_that_returns_the_same_image_says_so";
    if !require_git(name) || !python(name) {
        return;
    }
    // Copies the stage once to a fixed place and reports it every time; records what it saw.
    const SAME: &str = r#"#!/bin/sh
set -eu
dest="$KILN_IMAGE_STORE/fixed"
[ -d "$dest" ] || cp -a "$KILN_WORK_TREE/image" "$dest"
echo "${KILN_REBAKE:-0} $KILN_IDEMPOTENCY_KEY" >> "$KILN_IMAGE_STORE/seen"
echo "image=$dest" >> "$KILN_OUTPUT"
"#;
    let repo = TestRepo::new();
    repo.commit_entries(
        "app",
        &[
            Entry::File("kiln.yaml", MANIFEST),
            Entry::Exec("hooks/bake", SAME),
            Entry::Exec("image/run", &repo_file("examples/demo-infra/image/base/run")),
            Entry::Exec("image/server.py", &repo_file("examples/demo-infra/image/base/server.py")),
        ],
    );
    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "1h"]);
    let log = daemon.wait_log("a scheduled rebake to end", Duration::from_secs(90), |log| {
        log.iter().any(|e| {
            e["origin"] == "rebake" && matches!(e["state"].as_str(), Some("succeeded" | "failed"))
        })
    });
    let rebake = log.iter().find(|e| e["origin"] == "rebake").unwrap();
    let id = rebake["id"].as_u64().unwrap().to_string();
    let (code, out, err) = kiln(&data, &["show", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the rebake produced the same image"), "{out}");
    // The hook was told: the first bake with the cache key, the rebake with KILN_REBAKE=1 and
    // another key.
    let seen = std::fs::read_to_string(data.join("images/seen")).unwrap();
    let lines: Vec<(&str, &str)> =
        seen.lines().filter_map(|l| l.split_once(' ')).collect::<Vec<_>>();
    assert!(lines.len() >= 2, "{seen}");
    assert_eq!(lines[0].0, "0", "{seen}");
    assert_eq!(lines[1].0, "1", "{seen}");
    assert_ne!(lines[0].1, lines[1].1, "a rebake gets a key of its own: {seen}");
}

fn python(name: &str) -> bool {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name}: python3 is required under CI"
        );
        eprintln!("SKIP: {name}: python3 is missing");
    }
    found
}
