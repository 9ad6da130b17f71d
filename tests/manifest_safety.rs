//! Issue 9, "names become paths" and "big or explosive manifests": a manifest is hostile input.
//!
//! `kiln validate` on a checkout and the real daemon on pushed commits refuse the same things,
//! with the same `kiln.yaml:LINE:COL` errors: names that would become paths outside the data
//! dir, `path:` values leaving the repo, a symlinked `kiln.yaml`, oversized files, alias bombs
//! and overlong lists. The daemon attack runs while a fleet is up, and checks nothing outside
//! the data dir (nor the data dir's own `fleets/`) is touched and the fleet keeps serving.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, free_port, require_git};

const WAIT: Duration = Duration::from_secs(60);

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The manifest with `stage` as its one stage line and `port` as the load balancer's port.
fn manifest(stage: &str, port: u16) -> String {
    format!(
        "fleets:
  - name: web
    image:
      stages:
        - {stage}
    rollout:
      capacity: 1
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 1, timeout: 30s }}
      drain: 200ms
      loadBalancer: {{ port: {port} }}
"
    )
}

const GOOD_STAGE: &str = "{ name: app, path: image, bake: hooks/bake }";

/// Builds a directory image from the commit's `image/` (a fresh one per run).
const BAKE: &str = r#"#!/bin/sh
set -eu
mkdir -p "$KILN_IMAGE_STORE"
dest="$KILN_IMAGE_STORE/app-$KILN_ROLLOUT-$(date +%s%N)"
cp -a "$KILN_WORK_TREE/$KILN_STAGE_PATH" "$dest"
echo "image=$dest" >> "$KILN_OUTPUT"
"#;

/// `paths: [*s, *s, …]` over a 64 KiB anchor: 2,000 aliases, 128 MiB once expanded.
fn alias_bomb(port: u16) -> String {
    let big = "x".repeat(64 * 1024);
    let aliases = vec!["*s"; 2000].join(", ");
    manifest(GOOD_STAGE, port)
        .replace("  - name: web\n", &format!("  - name: web\n    paths: [&s {big}, {aliases}]\n"))
}

/// A fleet with `n` watched paths.
fn long_list(n: usize, port: u16) -> String {
    let paths: Vec<String> = (0..n).map(|i| format!("p{i}/")).collect();
    manifest(GOOD_STAGE, port)
        .replace("  - name: web\n", &format!("  - name: web\n    paths: [{}]\n", paths.join(", ")))
}

/// A manifest just over the size limit (a long comment).
fn oversized(port: u16) -> String {
    let limit = usize::try_from(kiln::manifest::MAX_MANIFEST_BYTES).unwrap();
    format!("{}#{}\n", manifest(GOOD_STAGE, port), "x".repeat(limit))
}

/// `kiln validate DIR` → (exit code, stdout + stderr).
fn validate(dir: &Path) -> (i32, String) {
    let (code, out, err) = kiln(dir, &["validate", dir.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

#[test]
fn validate_refuses_a_symlinked_manifest_without_reading_it() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("outside/secret.yaml");
    // Valid YAML a parser would quote back in an error message.
    write(&secret, "fleets: TOP-SECRET-CONTENT\n", 0o600);
    let repo = tmp.path().join("repo");
    write(&repo.join("hooks/bake"), "#!/bin/sh\n", 0o755);
    std::os::unix::fs::symlink(&secret, repo.join("kiln.yaml")).unwrap();

    let (code, out) = validate(&repo);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("kiln.yaml:0:0: kiln.yaml is a symbolic link"), "{out}");
    assert!(!out.contains("TOP-SECRET"), "the target's content was printed: {out}");
    // Named directly, too.
    let (code, out, err) = kiln(&repo, &["validate", repo.join("kiln.yaml").to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("is a symbolic link") && !out.contains("TOP-SECRET"), "{out}{err}");
    assert!(!err.contains("TOP-SECRET"), "{err}");
}

#[test]
fn validate_refuses_symlinked_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write(&repo.join("kiln.yaml"), &manifest(GOOD_STAGE, 0), 0o644);
    write(&tmp.path().join("outside/bake"), "#!/bin/sh\n", 0o755);
    std::fs::create_dir_all(repo.join("hooks")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside/bake"), repo.join("hooks/bake")).unwrap();
    let (code, out) = validate(&repo);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("kiln.yaml:5:43: bake hook `hooks/bake` is a symbolic link"), "{out}");

    // A symlinked directory on the way is refused too.
    std::fs::remove_file(repo.join("hooks/bake")).unwrap();
    std::fs::remove_dir(repo.join("hooks")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside"), repo.join("hooks")).unwrap();
    let (code, out) = validate(&repo);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is a symbolic link (or lies under one)"), "{out}");
}

#[test]
fn validate_refuses_names_and_paths_that_leave_their_directory() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("hooks/bake"), "#!/bin/sh\n", 0o755);
    let stage = "{ name: \"/../../fleets\", path: ../../../etc, bake: hooks/bake }";
    write(&tmp.path().join("kiln.yaml"), &manifest(stage, 0), 0o644);
    let (code, out) = validate(tmp.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("kiln.yaml:5:20: stage name `/../../fleets` must be"), "{out}");
    assert!(out.contains("kiln.yaml:5:42: path `../../../etc` must be a relative path"), "{out}");
}

#[test]
fn validate_enforces_the_size_alias_and_list_limits() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("hooks/bake"), "#!/bin/sh\n", 0o755);
    let kiln_yaml = tmp.path().join("kiln.yaml");
    for (text, expected) in [
        (oversized(0), "kiln.yaml:0:0: kiln.yaml is ".to_owned()),
        (alias_bomb(0), format!("more than {} bytes of text", kiln::manifest::MAX_SCALAR_BYTES)),
        (
            long_list(kiln::manifest::MAX_PATHS + 1, 0),
            format!("over the limit of {} (MAX_PATHS)", kiln::manifest::MAX_PATHS),
        ),
    ] {
        write(&kiln_yaml, &text, 0o644);
        let (code, out) = validate(tmp.path());
        assert_eq!(code, 2, "{out}");
        assert!(out.contains(&expected), "expected {expected:?} in {out}");
        assert!(out.len() < 4096, "a short error, not the content: {} bytes", out.len());
    }
}

/// `GET /` through the load balancer → the status code.
fn serves(port: u16) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until `sha` is recorded and returns its entries.
fn recorded(daemon: &Daemon, sha: &str) -> Vec<Value> {
    let log = daemon.wait_log(&format!("commit {sha} recorded"), WAIT, |log| {
        for_commit(log, sha).iter().any(|e| e["state"] != "pending" && e["state"] != "baking")
    });
    for_commit(&log, sha).into_iter().cloned().collect()
}

#[test]
fn a_running_daemon_refuses_hostile_manifests_and_keeps_serving() {
    let name = "a_running_daemon_refuses_hostile_manifests_and_keeps_serving";
    if !require_git(name) || !have_python3() {
        return;
    }
    let repo = TestRepo::new();
    let port = free_port();
    let good = manifest(GOOD_STAGE, port);
    let first = repo.commit_entries(
        "a fleet",
        &[
            Entry::File("kiln.yaml", &good),
            Entry::Exec("hooks/bake", BAKE),
            Entry::Exec("image/run", &repo_file("examples/demo-infra/image/base/run")),
            Entry::Exec("image/server.py", &repo_file("examples/demo-infra/image/base/server.py")),
        ],
    );
    let data = repo.scratch("data");
    // Outside the data dir, where `work/<id>-/../../../victim` resolves.
    let victim = repo.scratch("victim");
    write(&victim.join("keep"), "sentinel\n", 0o644);
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "200ms"]);
    daemon.wait_log("the first rollout to succeed", WAIT, |log| {
        for_commit(log, &first).iter().any(|e| e["state"] == "succeeded")
    });
    assert_eq!(serves(port), Some(200), "the fleet serves before the attack");
    let fleets = data.join("fleets");
    let fleet_files = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into()).collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let before = fleet_files(&fleets.join("web"));
    assert!(!before.is_empty(), "the local provider keeps its state in {}", fleets.display());

    // Each attack is a stage added next to the good one, so a bake would run for it.
    let with_stage = |stage: &str| {
        good.replace(
            &format!("        - {GOOD_STAGE}\n"),
            &format!("        - {GOOD_STAGE}\n        - {stage}\n"),
        )
    };
    let attacks: Vec<(String, Vec<Entry<'_>>, String)> = vec![
        (
            "a stage named /../../fleets".into(),
            vec![],
            with_stage("{ name: \"/../../fleets\", path: image, bake: hooks/bake }"),
        ),
        (
            "a stage named /../../../victim".into(),
            vec![],
            with_stage("{ name: \"/../../../victim\", path: image, bake: hooks/bake }"),
        ),
        (
            "a stage path ../../../etc".into(),
            vec![],
            with_stage("{ name: etc, path: ../../../etc, bake: hooks/bake }"),
        ),
        (
            "a bake hook symlinked out of the repo".into(),
            vec![Entry::Symlink("hooks/evil", "/bin/sh")],
            with_stage("{ name: evil, path: image, bake: hooks/evil }"),
        ),
    ];
    let expected = [
        "kiln.yaml:6:20: stage name `/../../fleets` must be",
        "kiln.yaml:6:20: stage name `/../../../victim` must be",
        "kiln.yaml:6:30: path `../../../etc` must be a relative path inside the repo",
        "kiln.yaml:6:44: bake hook `hooks/evil` is a symbolic link",
    ];
    for ((what, extra, text), expected) in attacks.iter().zip(expected) {
        let mut entries = vec![Entry::File("kiln.yaml", text)];
        entries.extend(extra.iter().cloned());
        let sha = repo.commit_entries(what, &entries);
        let entries = recorded(&daemon, &sha);
        assert_eq!(entries.len(), 1, "{what}: one commit-level entry: {entries:#?}");
        assert_eq!(entries[0]["state"], "failed", "{what}: {entries:#?}");
        assert!(entries[0]["fleet"].is_null(), "{what}: no rollout of a fleet: {entries:#?}");
        let reason = entries[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(expected), "{what}: {reason}");
        assert_eq!(fleet_files(&fleets.join("web")), before, "{what}: <data>/fleets/web intact");
        assert!(victim.join("keep").is_file(), "{what}: the directory outside the data dir");
        assert_eq!(serves(port), Some(200), "{what}: the fleet still serves");
    }

    // The same limits through the daemon's planning path: symlinked, oversized, explosive and
    // overlong manifests are recorded failed, and the fleet is left as it is.
    let secret = repo.scratch("secret.yaml");
    write(&secret, "fleets: TOP-SECRET-CONTENT\n", 0o600);
    let secret = secret.to_string_lossy().into_owned();
    let bomb = alias_bomb(port);
    let big = oversized(port);
    let long = long_list(kiln::manifest::MAX_PATHS + 1, port);
    let limits: Vec<(&str, Entry<'_>, String)> = vec![
        (
            "a symlinked kiln.yaml",
            Entry::Symlink("kiln.yaml", &secret),
            "kiln.yaml:0:0: kiln.yaml is a symbolic link; it must be a regular file".into(),
        ),
        (
            "an oversized kiln.yaml",
            Entry::File("kiln.yaml", &big),
            format!("over the limit of {} bytes", kiln::manifest::MAX_MANIFEST_BYTES),
        ),
        (
            "an alias bomb",
            Entry::File("kiln.yaml", &bomb),
            format!("more than {} bytes of text", kiln::manifest::MAX_SCALAR_BYTES),
        ),
        (
            "an overlong list",
            Entry::File("kiln.yaml", &long),
            format!("over the limit of {} (MAX_PATHS)", kiln::manifest::MAX_PATHS),
        ),
    ];
    for (what, entry, expected) in limits {
        let sha = repo.commit_entries(what, &[entry]);
        let entries = recorded(&daemon, &sha);
        assert_eq!(entries.len(), 1, "{what}: {entries:#?}");
        assert_eq!(entries[0]["state"], "failed", "{what}: {entries:#?}");
        let reason = entries[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&expected), "{what}: expected {expected:?} in {reason}");
        assert!(!reason.contains("TOP-SECRET"), "{what}: {reason}");
        assert!(reason.len() < 4096, "{what}: a short reason, not the content");
        assert_eq!(serves(port), Some(200), "{what}: the fleet still serves");
    }
    assert_eq!(fleet_files(&fleets.join("web")), before, "<data>/fleets/web intact");
    assert!(victim.join("keep").is_file());
}
