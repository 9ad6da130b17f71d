//! Issue 11, item 8: an exec provider's settings are checked before a rollout, not by its
//! scripts mid-rollout. `manifests/fleets/aws.yaml` validated "ok" while naming settings the
//! `aws-asg` scripts never read (a user got `setting 'asg' is required` at rollout time). Each
//! provider directory now declares what its scripts read (`settings.yaml`), and `kiln validate`
//! and the daemon's planning refuse a manifest that disagrees, with `kiln.yaml:LINE:COL`.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{Daemon, for_commit, kiln};
use support::git::{Entry, TestRepo, require_git};

/// A checkout with the repo's hooks (provider scripts and their `settings.yaml` included) and
/// `manifest` as its `kiln.yaml`.
fn checkout(manifest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks");
    let status =
        std::process::Command::new("cp").arg("-a").arg(&hooks).arg(dir.path()).status().unwrap();
    assert!(status.success());
    std::fs::write(dir.path().join("kiln.yaml"), manifest).unwrap();
    dir
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// `kiln validate DIR` → (exit code, stdout + stderr).
fn validate(dir: &Path) -> (i32, String) {
    let (code, out, err) = kiln(dir, &["validate", dir.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).unwrap()
}

#[test]
fn the_shipped_cloud_manifests_agree_with_their_provider_scripts() {
    for file in ["manifests/fleets/aws.yaml", "manifests/fleets/aliyun.yaml"] {
        let dir = checkout(&repo_file(file));
        let (code, out) = validate(dir.path());
        assert_eq!(code, 0, "{file}: {out}");
        assert!(out.contains("kiln.yaml: ok (1 fleet)"), "{file}: {out}");
    }
}

#[test]
fn validate_names_a_setting_the_scripts_do_not_read_with_its_line_and_column() {
    // The old aws.yaml's spelling: `ASG_NAME`, which the scripts never read.
    let text = repo_file("manifests/fleets/aws.yaml").replace("ASG: web-asg", "ASG_NAME: web-asg");
    let dir = checkout(&text);
    let (code, out) = validate(dir.path());
    assert_eq!(code, 2, "{out}");
    let line = line_of(&text, "ASG_NAME:");
    assert!(
        out.contains(&format!(
            "kiln.yaml:{line}:11: exec.env setting `ASG_NAME` is not read by the provider's \
             scripts (hooks/provider/aws-asg/settings.yaml declares: asg, launch_template, port, \
             region, target_group_arn)"
        )),
        "{out}"
    );
    let env_line = line_of(&text, "        env:");
    assert!(
        out.contains(&format!(
            "kiln.yaml:{env_line}:9: exec.env lacks setting `asg`, which \
             hooks/provider/aws-asg/settings.yaml requires"
        )),
        "{out}"
    );
    assert!(out.contains("kiln.yaml: 2 problems"), "{out}");
}

#[test]
fn validate_refuses_the_local_providers_settings_under_exec() {
    let text = repo_file("manifests/fleets/aws.yaml").replace(
        "      onFailure: rollback\n",
        "      onFailure: rollback\n      loadBalancer: { port: 8080 }\n",
    );
    let dir = checkout(&text);
    let (code, out) = validate(dir.path());
    assert_eq!(code, 2, "{out}");
    let line = line_of(&text, "loadBalancer:");
    assert!(
        out.contains(&format!(
            "kiln.yaml:{line}:7: fleets[0]: `loadBalancer` is a setting of the local provider; \
             this fleet's provider is `exec`"
        )),
        "{out}"
    );
}

#[test]
fn the_daemon_refuses_a_commit_with_a_wrong_provider_setting() {
    let name = "the_daemon_refuses_a_commit_with_a_wrong_provider_setting";
    if !require_git(name) {
        return;
    }
    let repo = TestRepo::new();
    let state = repo.scratch("provider-state");
    let manifest = format!(
        "fleets:
  - name: web
    image:
      stages:
        - {{ name: app, path: image, bake: hooks/bake }}
    rollout:
      provider: exec
      exec:
        list: hooks/provider/local-test/list
        launch: hooks/provider/local-test/launch
        attach: hooks/provider/local-test/attach
        detach: hooks/provider/local-test/detach
        terminate: hooks/provider/local-test/terminate
        env: {{ STATE_DIR: {} }}
",
        state.display()
    );
    let shipped = |op: &str| repo_file(&format!("hooks/provider/local-test/{op}"));
    let ops = ["list", "launch", "attach", "detach", "terminate", "provider.py"];
    let scripts: Vec<(String, String)> =
        ops.iter().map(|op| (format!("hooks/provider/local-test/{op}"), shipped(op))).collect();
    let settings = repo_file("hooks/provider/local-test/settings.yaml");
    let mut entries = vec![
        Entry::File("kiln.yaml", &manifest),
        Entry::Exec("hooks/bake", "#!/bin/sh\necho image=x >> \"$KILN_OUTPUT\"\n"),
        Entry::File("image/README", "an image\n"),
        Entry::File("hooks/provider/local-test/settings.yaml", &settings),
    ];
    entries.extend(scripts.iter().map(|(path, text)| Entry::Exec(path.as_str(), text.as_str())));
    let sha = repo.commit_entries("a wrong provider setting", &entries);

    let data = repo.scratch("data");
    let daemon = Daemon::start(&repo.url(), &data, &["--poll", "200ms"]);
    let log = daemon.wait_log(&format!("commit {sha} recorded"), Duration::from_secs(60), |log| {
        for_commit(log, &sha).iter().any(|e| e["state"] != "pending")
    });
    let entries = for_commit(&log, &sha);
    assert_eq!(entries.len(), 1, "one commit-level entry: {entries:#?}");
    assert_eq!(entries[0]["state"], "failed", "{entries:#?}");
    assert!(entries[0]["fleet"].is_null(), "no rollout of the fleet: {entries:#?}");
    let reason = entries[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("kiln.yaml:14:16: exec.env setting `STATE_DIR` is not read"),
        "{reason}"
    );
    assert!(
        reason.contains(
            "kiln.yaml:14:9: exec.env lacks setting `state`, which \
             hooks/provider/local-test/settings.yaml requires"
        ),
        "{reason}"
    );
}

/// Issue 11, item 7: the daemon looked each fleet up by parsing and validating the whole
/// manifest again (`planner::fleet_at`), 1,000 parses for 1,000 fleets. The manifest at a
/// commit is now parsed once, indexed by fleet name and kept.
#[test]
fn the_manifest_at_a_commit_is_parsed_once_and_indexed() {
    if !require_git("the_manifest_at_a_commit_is_parsed_once_and_indexed") {
        return;
    }
    let repo = TestRepo::new();
    let fleet = |name: &str| {
        format!(
            "  - name: {name}\n    image:\n      stages:\n        \
             - {{ name: app, path: image, bake: hooks/bake }}\n    rollout:\n      \
             loadBalancer: {{ port: 0 }}\n"
        )
    };
    let manifest: String =
        std::iter::once("fleets:\n".to_owned()).chain(["a", "b", "c"].map(fleet)).collect();
    let sha = repo.commit_entries(
        "three fleets",
        &[Entry::File("kiln.yaml", &manifest), Entry::Exec("hooks/bake", "#!/bin/sh\n")],
    );
    let mirror = repo.bare_path();
    let revision = kiln::model::Revision::from(sha.as_str());
    let index = kiln::planner::manifest_index_at(mirror, &revision).unwrap().unwrap().unwrap();
    assert_eq!(index.fleets().len(), 3);
    assert_eq!(index.fleet("b").map(|f| f.name.as_str()), Some("b"));
    assert!(index.fleet("d").is_none());
    let again = kiln::planner::manifest_index_at(mirror, &revision).unwrap().unwrap().unwrap();
    assert!(std::sync::Arc::ptr_eq(&index, &again), "the second lookup reuses the first parse");
    for name in ["a", "b", "c"] {
        let found = kiln::planner::fleet_at(mirror, &revision, name).unwrap();
        assert_eq!(found.as_ref(), index.fleet(name));
    }

    // An invalid manifest is an error, every time (nothing wrong is kept).
    let broken = repo.commit_entries("broken", &[Entry::File("kiln.yaml", "fleets: 3\n")]);
    let broken = kiln::model::Revision::from(broken.as_str());
    for _ in 0..2 {
        let error = kiln::planner::manifest_index_at(mirror, &broken).unwrap().unwrap();
        assert!(error.is_err());
    }
}
