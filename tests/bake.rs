//! Bake and reconcile steps on real git repositories with real hook scripts: the cache, layered
//! stages, transient retries, output capping, the shipped wrappers (`hooks/bake-dir`,
//! `hooks/bake-packer` with a stand-in `packer`, `hooks/reconcile-terraform` with the real
//! `terraform`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use kiln::model::{ImageRef, Revision};
use kiln::pipeline::StepError;
use kiln::pipeline::bake::{BakeOptions, bake_fleet, bake_fleet_with, rebake_due};
use kiln::pipeline::reconcile::reconcile_fleet;
use support::git::{TestRepo, require_git};
use support::hooks::*;

const LAYERED: &str = r#"
fleets:
  - name: web
    image:
      stages:
        - { name: base, path: image/base, bake: hooks/bake-dir }
        - { name: app, path: image/app, from: base, bake: hooks/bake-dir }
      timeout: 60s
      rebake: 7d
"#;

/// A repo with the shipped `bake-dir` hook, a base stage with the `run` entry point and an app
/// stage layered on it.
fn layered_repo() -> (TestRepo, String) {
    let repo = TestRepo::new();
    repo.commit_exec("hooks", &[("hooks/bake-dir", &shipped_hook("bake-dir"))]);
    repo.commit_exec(
        "entry point",
        &[("image/base/run", "#!/bin/sh\nexec python3 -m http.server \"$PORT\"\n")],
    );
    let sha = repo.commit(
        "stages",
        &[("image/base/os-release", "base v1\n"), ("image/app/app.conf", "app v1\n")],
    );
    (repo, sha)
}

#[tokio::test]
async fn layered_bake_then_cache_hits_then_only_the_changed_stage() {
    if !require_git("layered_bake_then_cache_hits_then_only_the_changed_stage") {
        return;
    }
    let (repo, sha1) = layered_repo();
    let fleet = fleet_from_yaml(LAYERED);
    let h = Harness::new();

    // 1. First commit: both stages bake, in order, app on top of base.
    let rev1 = Revision::from(sha1.as_str());
    let baked = bake_fleet(&h.cx(&fleet, &rev1, repo.bare_path())).await.expect("bake succeeds");
    let base = baked.stage_images["base"].clone();
    let app = baked.image.clone();
    assert_eq!(baked.stage_images["app"], app);
    let app_dir = std::path::Path::new(app.as_str());
    assert!(app_dir.starts_with(h.data_dir.join("images")), "{app}");
    assert_eq!(std::fs::read_to_string(app_dir.join("os-release")).unwrap(), "base v1\n");
    assert_eq!(std::fs::read_to_string(app_dir.join("app.conf")).unwrap(), "app v1\n");
    assert!(std::path::Path::new(base.as_str()).join("run").exists());
    let starts: Vec<_> =
        h.of_kind("bake.start").into_iter().map(|e| e.data.unwrap()["stage"].clone()).collect();
    assert_eq!(starts, ["base", "app"]);
    assert_eq!(h.of_kind("bake.done").len(), 2);
    assert!(h.of_kind("hook.stdout").iter().any(|e| e.message.contains("layering onto")));
    assert!(h.work_leftovers().is_empty(), "work trees left: {:?}", h.work_leftovers());
    let records = h.store.bakes().unwrap();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.revision == rev1 && r.fleet == "web"));

    // 2. A commit elsewhere in the repo: both stages are cache hits, nothing runs.
    let sha2 = repo.commit("docs", &[("README.md", "unrelated\n")]);
    let rev2 = Revision::from(sha2.as_str());
    let before = h.events().len();
    let again = bake_fleet(&h.cx(&fleet, &rev2, repo.bare_path())).await.expect("cached bake");
    assert_eq!(again.image, app);
    assert_eq!(again.stage_images["base"], base);
    let new: Vec<String> = h.events()[before..].iter().map(|e| e.kind.to_string()).collect();
    assert_eq!(new, ["bake.cached", "bake.cached"], "no hook ran");

    // 3. The app stage changes: base is a hit, only app rebakes, on the cached base.
    let sha3 = repo.commit("app v2", &[("image/app/app.conf", "app v2\n")]);
    let rev3 = Revision::from(sha3.as_str());
    let before = h.events().len();
    let third = bake_fleet(&h.cx(&fleet, &rev3, repo.bare_path())).await.expect("app rebakes");
    let new = &h.events()[before..];
    let cached: Vec<_> = new
        .iter()
        .filter(|e| e.kind == "bake.cached")
        .map(|e| e.data.clone().unwrap()["stage"].clone())
        .collect();
    let started: Vec<_> = new
        .iter()
        .filter(|e| e.kind == "bake.start")
        .map(|e| e.data.clone().unwrap()["stage"].clone())
        .collect();
    assert_eq!(cached, ["base"]);
    assert_eq!(started, ["app"]);
    assert_eq!(third.stage_images["base"], base);
    assert_ne!(third.image, app);
    let new_app = std::path::Path::new(third.image.as_str());
    assert_eq!(std::fs::read_to_string(new_app.join("app.conf")).unwrap(), "app v2\n");
    assert_eq!(std::fs::read_to_string(new_app.join("os-release")).unwrap(), "base v1\n");
    // The old image is untouched (instances may still run from it).
    assert_eq!(std::fs::read_to_string(app_dir.join("app.conf")).unwrap(), "app v1\n");

    // 4. Scheduled rebake: due only once the final image is older than `rebake: 7d`.
    let now = kiln::model::now();
    assert!(!rebake_due(&h.store, &fleet, now));
    assert!(rebake_due(&h.store, &fleet, now + chrono::Duration::days(8)));
    let before = h.events().len();
    let forced =
        bake_fleet_with(&h.cx(&fleet, &rev3, repo.bare_path()), BakeOptions { force: true })
            .await
            .expect("forced rebake");
    let started = h.events()[before..].iter().filter(|e| e.kind == "bake.start").count();
    assert_eq!(started, 2, "a forced rebake ignores the cache");
    // A rebake gets a key of its own: bake-dir builds a new directory image (a rebuild picks
    // up what changed outside the repo) and leaves the one instances run from untouched.
    assert_ne!(forced.image, third.image);
    assert_eq!(std::fs::read_to_string(new_app.join("app.conf")).unwrap(), "app v2\n");
    let rebuilt = std::path::Path::new(forced.image.as_str());
    assert_eq!(std::fs::read_to_string(rebuilt.join("app.conf")).unwrap(), "app v2\n");
    assert!(!rebake_due(&h.store, &fleet, kiln::model::now() + chrono::Duration::days(6)));
}

#[tokio::test]
async fn a_changed_hook_invalidates_the_cache() {
    if !require_git("a_changed_hook_invalidates_the_cache") {
        return;
    }
    let repo = TestRepo::new();
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: only, path: image, bake: hooks/bake }\n",
    );
    repo.commit("image", &[("image/file", "x\n")]);
    let sha1 = repo
        .commit_exec("hook", &[("hooks/bake", "#!/bin/sh\necho image=one >> \"$KILN_OUTPUT\"\n")]);
    let sha2 = repo.commit_exec(
        "hook v2",
        &[("hooks/bake", "#!/bin/sh\necho image=two >> \"$KILN_OUTPUT\"\n")],
    );
    let h = Harness::new();
    let (r1, r2) = (Revision::from(sha1.as_str()), Revision::from(sha2.as_str()));
    assert_eq!(
        bake_fleet(&h.cx(&fleet, &r1, repo.bare_path())).await.unwrap().image,
        ImageRef::from("one")
    );
    assert_eq!(
        bake_fleet(&h.cx(&fleet, &r2, repo.bare_path())).await.unwrap().image,
        ImageRef::from("two")
    );
}

#[tokio::test]
async fn transient_exit_is_retried_and_recorded() {
    if !require_git("transient_exit_is_retried_and_recorded") {
        return;
    }
    let repo = TestRepo::new();
    let h = Harness::new();
    let counter = h.dir.path().join("attempts");
    let hook = format!(
        "#!/bin/bash\nn=$(( $(cat {c} 2>/dev/null || echo 0) + 1 ))\necho $n > {c}\n\
         if [ $n -eq 1 ]; then echo 'mirror busy' >&2; exit 75; fi\necho image=img-ok >> \"$KILN_OUTPUT\"\n",
        c = counter.display()
    );
    repo.commit("image", &[("image/file", "x\n")]);
    let sha = repo.commit_exec("hook", &[("hooks/bake", &hook)]);
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: only, path: image, bake: hooks/bake }\n      timeout: 60s\n",
    );
    let rev = Revision::from(sha.as_str());
    let baked =
        bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect("second attempt succeeds");
    assert_eq!(baked.image, ImageRef::from("img-ok"));
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "2");
    let retries = h.of_kind("hook.retry");
    assert_eq!(retries.len(), 1);
    assert!(retries[0].message.contains("exited with status 75"), "{}", retries[0].message);
    assert!(h.of_kind("hook.stderr").iter().any(|e| e.message == "mirror busy"));
}

#[tokio::test]
async fn ten_megabytes_of_output_leave_bounded_events() {
    if !require_git("ten_megabytes_of_output_leave_bounded_events") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("image", &[("image/file", "x\n")]);
    let sha = repo.commit_exec(
        "hook",
        &[(
            "hooks/bake",
            "#!/bin/bash\nset -euo pipefail\nhead -c 10000000 /dev/zero | tr '\\0' 'x' | fold -w 99\necho image=noisy >> \"$KILN_OUTPUT\"\n",
        )],
    );
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: only, path: image, bake: hooks/bake }\n      timeout: 120s\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let baked =
        bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect("the noisy bake completes");
    assert_eq!(baked.image, ImageRef::from("noisy"));
    let output: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| e.kind == "hook.stdout" || e.kind == "hook.stderr")
        .collect();
    let stored: usize = output.iter().map(|e| e.message.len() + 1).sum();
    assert!(stored <= kiln::hooks::OUTPUT_CAP, "{stored} bytes of output stored");
    assert!(output.len() <= kiln::hooks::OUTPUT_CAP / 100 + 1, "{} output events", output.len());
    assert_eq!(h.of_kind("hook.truncated").len(), 1, "one truncation event");
    assert_eq!(h.of_kind("bake.done").len(), 1);
}

#[tokio::test]
async fn no_image_id_is_a_clear_error_naming_the_hook() {
    if !require_git("no_image_id_is_a_clear_error_naming_the_hook") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("image", &[("image/file", "x\n")]);
    let sha = repo.commit_exec("hook", &[("hooks/bake", "#!/bin/sh\necho 'built something'\n")]);
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let err = bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect_err("no image id");
    let text = kiln::error::chain(&err);
    assert!(matches!(err, StepError::Hook(kiln::hooks::HookError::BadOutput { .. })), "{err:?}");
    assert!(text.contains("hook `bake web/base (hooks/bake)` reported no image id"), "{text}");
    assert_eq!(h.of_kind("bake.failed").len(), 1);
    assert!(h.store.bakes().unwrap().is_empty(), "a failed bake is not cached");
    assert!(h.work_leftovers().is_empty(), "work trees left: {:?}", h.work_leftovers());
}

/// Issue 9: files a hook leaves for kiln to parse are read with a bound, like `$KILN_OUTPUT`: a
/// Packer manifest past `HOOK_FILE_CAP` is an error naming the limit, not read whole.
#[tokio::test]
async fn an_oversized_packer_manifest_is_refused_naming_the_limit() {
    if !require_git("an_oversized_packer_manifest_is_refused_naming_the_limit") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("image", &[("image/file", "x\n")]);
    // 17 MiB of JSON whitespace after a valid-looking start: parsing it would need it whole.
    let hook = "#!/bin/sh\n{ printf '{\"builds\": ['; head -c 17825792 /dev/zero | tr '\\0' ' '; printf ']}'; } > big-manifest.json\necho 'manifest=big-manifest.json' > \"$KILN_OUTPUT\"\n";
    let sha = repo.commit_exec("hook", &[("hooks/bake", hook)]);
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let err = bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect_err("too big");
    let text = kiln::error::chain(&err);
    assert!(matches!(err, StepError::Hook(kiln::hooks::HookError::BadOutput { .. })), "{err:?}");
    let limit = kiln::hooks::contract::HOOK_FILE_CAP;
    assert!(
        text.contains("named a Packer manifest `big-manifest.json` that is 17825806 bytes")
            && text.contains(&format!("more than the limit of {limit} bytes")),
        "{text}"
    );
    assert!(h.store.bakes().unwrap().is_empty(), "a failed bake is not cached");
}

#[tokio::test]
async fn a_failing_hook_fails_the_bake_with_its_stderr() {
    if !require_git("a_failing_hook_fails_the_bake_with_its_stderr") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("image", &[("image/file", "x\n")]);
    let sha = repo.commit_exec(
        "hook",
        &[("hooks/bake", "#!/bin/sh\necho 'provisioner failed' >&2\nexit 2\n")],
    );
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let err = bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect_err("exit 2");
    let text = kiln::error::chain(&err);
    assert!(text.contains("exited with status 2: provisioner failed"), "{text}");
}

/// The shipped `hooks/bake-packer` wrapper, driven by a stand-in `packer` on PATH that replays
/// real machine-readable output (the multi-region fixture).
#[tokio::test]
async fn bake_packer_wrapper_reports_the_artifact() {
    if !require_git("bake_packer_wrapper_reports_the_artifact") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit_exec("hook", &[("hooks/bake-packer", &shipped_hook("bake-packer"))]);
    let sha = repo.commit("template", &[("image/base/ami.pkr.hcl", "# a template\n")]);
    let mut h = Harness::new();
    let bin = h.dir.path().join("fakebin");
    let replay = h.dir.path().join("packer-output.txt");
    std::fs::write(&replay, fixture("packer/multi-region.txt")).unwrap();
    let calls = h.dir.path().join("packer-calls");
    write_script(
        &bin,
        "packer",
        &format!(
            "#!/bin/bash\necho \"$*\" >> {calls}\nif [ \"$1\" = build ]; then cat {replay}; fi\n",
            calls = calls.display(),
            replay = replay.display()
        ),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    h.hook_env.push(("PATH".to_owned(), path));
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image/base, bake: hooks/bake-packer }\n",
    );
    let rev = Revision::from(sha.as_str());
    let baked = bake_fleet(&h.cx(&fleet, &rev, repo.bare_path())).await.expect("packer bake");
    assert_eq!(
        baked.image,
        ImageRef::from("us-east-1:ami-dc4410b6,us-west-1:ami-e098f380,us-west-2:ami-8c8f90ed")
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        ["init image/base", "build -machine-readable image/base"]
    );
}

// --- reconcile ---

#[tokio::test]
async fn reconcile_passes_images_and_returns_outputs() {
    if !require_git("reconcile_passes_images_and_returns_outputs") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("infra", &[("infra/main.txt", "x\n")]);
    let sha = repo.commit_exec(
        "hook",
        &[(
            "hooks/reconcile",
            "#!/bin/sh\nset -eu\necho \"applying $KILN_IMAGE\"\n\
             echo \"image=$KILN_IMAGE\" >> \"$KILN_OUTPUT\"\n\
             echo \"base=$KILN_IMAGE_BASE\" >> \"$KILN_OUTPUT\"\n\
             echo \"lb=http://127.0.0.1:8080\" >> \"$KILN_OUTPUT\"\n",
        )],
    );
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n        - { name: app, path: image, from: base, bake: hooks/bake }\n    infra: { path: infra/, reconcile: hooks/reconcile, timeout: 30s }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let stages = BTreeMap::from([
        ("base".to_owned(), ImageRef::from("img-base")),
        ("app".to_owned(), ImageRef::from("img-app")),
    ]);
    let outputs =
        reconcile_fleet(&h.cx(&fleet, &rev, repo.bare_path()), &ImageRef::from("img-app"), &stages)
            .await
            .expect("reconcile succeeds");
    assert_eq!(outputs["image"], "img-app");
    assert_eq!(outputs["base"], "img-base");
    assert_eq!(outputs["lb"], "http://127.0.0.1:8080");
    assert_eq!(h.of_kind("reconcile.done").len(), 1);
    assert!(h.of_kind("hook.stdout").iter().any(|e| e.message == "applying img-app"));
    assert!(h.work_leftovers().is_empty());
}

#[tokio::test]
async fn a_failed_reconcile_is_an_error() {
    if !require_git("a_failed_reconcile_is_an_error") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit("infra", &[("infra/main.txt", "x\n")]);
    let sha = repo.commit_exec(
        "hook",
        &[("hooks/reconcile", "#!/bin/sh\necho 'quota exceeded' >&2\nexit 1\n")],
    );
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n    infra: { path: infra/, reconcile: hooks/reconcile }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let err = reconcile_fleet(
        &h.cx(&fleet, &rev, repo.bare_path()),
        &ImageRef::from("i"),
        &BTreeMap::new(),
    )
    .await
    .expect_err("reconcile fails");
    assert!(
        kiln::error::chain(&err).contains(
            "hook `reconcile web (hooks/reconcile)` exited with status 1: quota exceeded"
        )
    );
    assert_eq!(h.of_kind("reconcile.failed").len(), 1);
}

/// The shipped `hooks/reconcile-terraform` with the real `terraform` binary on a configuration
/// that needs no provider download (`terraform_data` is built in).
#[tokio::test]
async fn reconcile_terraform_wrapper_applies_and_returns_outputs() {
    const TEST: &str = "reconcile_terraform_wrapper_applies_and_returns_outputs";
    if !require_git(TEST) || !require_program(TEST, "terraform") {
        return;
    }
    let repo = TestRepo::new();
    repo.commit_exec(
        "hook",
        &[("hooks/reconcile-terraform", &shipped_hook("reconcile-terraform"))],
    );
    let sha = repo.commit("infra", &[("infra/main.tf", &fixture("terraform/main.tf"))]);
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n    infra: { path: infra/, reconcile: hooks/reconcile-terraform, timeout: 120s }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let cx = h.cx(&fleet, &rev, repo.bare_path());
    let none = BTreeMap::new();

    let outputs = reconcile_fleet(&cx, &ImageRef::from("img-1"), &none).await.expect("first apply");
    assert_eq!(outputs["image_id"], "img-1");
    assert_eq!(outputs["listener_ports"], "[80,443]");
    assert_eq!(outputs["fleet"], r#"{"image":"img-1","name":"web"}"#);
    assert_eq!(outputs["admin_token"], "(sensitive)");
    assert!(
        h.data_dir.join("state/web/terraform.tfstate").exists(),
        "state kept in KILN_STATE_DIR"
    );

    // Same image again: the saved state says nothing changes, apply is skipped.
    let before = h.events().len();
    let outputs = reconcile_fleet(&cx, &ImageRef::from("img-1"), &none).await.expect("no-op apply");
    assert_eq!(outputs["image_id"], "img-1");
    assert!(
        h.events()[before..].iter().any(|e| e.message.contains("reconcile-terraform: no changes"))
    );

    // A new image is applied.
    let outputs =
        reconcile_fleet(&cx, &ImageRef::from("img-2"), &none).await.expect("second apply");
    assert_eq!(outputs["image_id"], "img-2");
    assert!(h.work_leftovers().is_empty());
}

#[tokio::test]
async fn cancelling_a_bake_stops_the_hook() {
    if !require_git("cancelling_a_bake_stops_the_hook") {
        return;
    }
    let repo = TestRepo::new();
    let h = Harness::new();
    let pidfile = h.dir.path().join("hook.pid");
    repo.commit("image", &[("image/file", "x\n")]);
    let sha = repo.commit_exec(
        "hook",
        &[(
            "hooks/bake",
            &format!("#!/bin/bash\nsleep 1000 &\necho $! > {}\nwait\n", pidfile.display()),
        )],
    );
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: only, path: image, bake: hooks/bake }\n",
    );
    let rev = Revision::from(sha.as_str());
    let cx = h.cx(&fleet, &rev, repo.bare_path());
    let trigger = async {
        wait_until_async("the bake hook to start", Duration::from_secs(30), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        h.cancel.cancel();
    };
    let (res, ()) = tokio::join!(bake_fleet(&cx), trigger);
    assert!(
        matches!(res, Err(StepError::Hook(kiln::hooks::HookError::Cancelled { .. }))),
        "{res:?}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_until_async("the hook's child to be killed", Duration::from_secs(10), || !alive(pid))
        .await;
    assert!(h.work_leftovers().is_empty());
}

/// A reconcile hook that never mentions `KILN_MODE` predates plan mode and would apply when a
/// drift check runs it: kiln refuses to run it in plan mode and says why; one that reads
/// `KILN_MODE` is run and its exit 2 is drift.
#[tokio::test]
async fn a_hook_without_plan_mode_is_never_run_to_plan() {
    if !require_git("a_hook_without_plan_mode_is_never_run_to_plan") {
        return;
    }
    let repo = TestRepo::new();
    let marker = repo.scratch("applied");
    repo.commit("infra", &[("infra/main.txt", "x\n")]);
    let old_hook = format!("#!/bin/sh\ntouch '{}'\n", marker.display());
    let sha = repo.commit_exec("old hook", &[("hooks/reconcile", &old_hook)]);
    let fleet = fleet_from_yaml(
        "fleets:\n  - name: web\n    image:\n      stages:\n        - { name: base, path: image, bake: hooks/bake }\n    infra: { path: infra/, reconcile: hooks/reconcile }\n",
    );
    let h = Harness::new();
    let rev = Revision::from(sha.as_str());
    let cx = h.cx(&fleet, &rev, repo.bare_path());
    let err = kiln::pipeline::reconcile::plan_fleet(&cx, &ImageRef::from("i"))
        .await
        .expect_err("an old hook is not run to plan");
    let text = err.to_string();
    assert!(text.contains("KILN_MODE") && text.contains("hooks/reconcile"), "{text}");
    assert!(!marker.exists(), "the hook ran (and would have applied)");

    let planning = "#!/bin/sh\nif [ \"$KILN_MODE\" = plan ]; then echo 'summary=1 to change' >> \"$KILN_OUTPUT\"; exit 2; fi\nexit 1\n";
    let sha = repo.commit_exec("plan-aware hook", &[("hooks/reconcile", planning)]);
    let rev = Revision::from(sha.as_str());
    let cx = h.cx(&fleet, &rev, repo.bare_path());
    let outcome = kiln::pipeline::reconcile::plan_fleet(&cx, &ImageRef::from("i")).await;
    let outcome = outcome.expect("a plan-aware hook plans").expect("the fleet has infra");
    assert!(format!("{outcome:?}").contains("1 to change"), "{outcome:?}");
}
