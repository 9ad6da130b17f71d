//! Planning a push against the commit planned before it: only what changed between the two is
//! looked at (git compares the trees), in a real repository.

mod support;

use kiln::model::{Revision, RolloutId};
use kiln::planner::{CommitPlan, FleetPlans, plan_commit};
use kiln::store::Deployed;
use support::git::{Entry, TestRepo, require_git};

fn manifest(fleets: &[&str]) -> String {
    let mut text = String::from("fleets:\n");
    for name in fleets {
        text.push_str(&format!(
            "  - name: {name}\n    paths: [{name}/]\n    image:\n      stages:\n        \
             - {{ name: app, path: {name}/, bake: hooks/bake }}\n    rollout:\n      \
             loadBalancer: {{ port: 0 }}\n"
        ));
    }
    text
}

fn plans(repo: &TestRepo, sha: &str, since: Option<&str>, deployed: &[Deployed]) -> FleetPlans {
    let since = since.map(|s| Revision(s.to_owned()));
    let lookup = |fleet: &str| deployed.iter().find(|d| d.fleet == fleet).cloned();
    match plan_commit(repo.work_path(), &Revision(sha.to_owned()), since.as_ref(), &lookup) {
        Ok(CommitPlan::Fleets(plans)) => plans,
        other => panic!("expected fleet plans at {sha}: {other:?}"),
    }
}

fn names(plans: &FleetPlans) -> Vec<&str> {
    plans.plans.iter().map(|p| p.fleet.name.as_str()).collect()
}

/// Everything deployed as planned at `plans`.
fn deploy(sha: &str, plans: &FleetPlans) -> Vec<Deployed> {
    plans
        .plans
        .iter()
        .map(|p| Deployed {
            fleet: p.fleet.name.clone(),
            revision: Revision(sha.to_owned()),
            image: "img".into(),
            rollout: RolloutId(1),
            trees: p.trees.clone(),
            at: kiln::model::now(),
        })
        .collect()
}

#[test]
fn a_push_is_planned_for_the_fleets_it_touches_only() {
    if !require_git("planner test") {
        return;
    }
    let repo = TestRepo::new();
    let first = repo.commit_local(
        "three fleets",
        &[
            Entry::File("kiln.yaml", &manifest(&["a", "b", "c"])),
            Entry::Exec("hooks/bake", "#!/bin/sh\n"),
            Entry::File("a/v", "0\n"),
            Entry::File("b/v", "0\n"),
            Entry::File("c/v", "0\n"),
        ],
    );
    let all = plans(&repo, &first, None, &[]);
    assert_eq!(names(&all), ["a", "b", "c"]);
    assert!(all.manifest_changed);
    let deployed = deploy(&first, &all);

    // One fleet's files: that fleet alone is planned, and the manifest is the same.
    let second = repo.commit_local("b v1", &[Entry::File("b/v", "1\n")]);
    let one = plans(&repo, &second, Some(&first), &deployed);
    assert_eq!(names(&one), ["b"]);
    assert_eq!(one.plans[0].plan.bake, ["app"]);
    assert!(!one.manifest_changed);
    assert_eq!(one.index.fleets().len(), 3);
    // Planned afresh, the same commit plans every fleet (the others as no-ops).
    let fresh = plans(&repo, &second, None, &deployed);
    assert_eq!(names(&fresh), ["a", "b", "c"]);
    assert!(fresh.plans.iter().filter(|p| p.fleet.name != "b").all(|p| p.is_noop()));

    // A file no fleet tracks: nothing is planned.
    let third = repo.commit_local("readme", &[Entry::File("README.md", "hi\n")]);
    assert!(names(&plans(&repo, &third, Some(&second), &deployed)).is_empty());

    // A hook every fleet bakes with: every fleet.
    let fourth = repo.commit_local("hook", &[Entry::Exec("hooks/bake", "#!/bin/sh\n# v2\n")]);
    assert_eq!(names(&plans(&repo, &fourth, Some(&third), &deployed)), ["a", "b", "c"]);

    // The manifest: a new fleet and a changed entry are planned, an untouched entry is not.
    let mut text = manifest(&["a", "b", "c", "d"]);
    text = text.replacen("paths: [c/]", "paths: [c/, shared/]", 1);
    let fifth = repo.commit_local(
        "d, and c watches shared/",
        &[Entry::File("kiln.yaml", &text), Entry::File("d/v", "0\n")],
    );
    let changed = plans(&repo, &fifth, Some(&fourth), &deployed);
    assert_eq!(names(&changed), ["c", "d"]);
    assert!(changed.manifest_changed);

    // A `since` the mirror does not have: every fleet, as without one.
    let gone = "0123456789abcdef0123456789abcdef01234567";
    assert_eq!(names(&plans(&repo, &fifth, Some(gone), &deployed)), ["a", "b", "c", "d"]);
}

#[test]
fn a_hook_changed_under_a_valid_manifest_is_validated_again() {
    if !require_git("planner test") {
        return;
    }
    let repo = TestRepo::new();
    let first = repo.commit_local(
        "one fleet",
        &[
            Entry::File("kiln.yaml", &manifest(&["a"])),
            Entry::Exec("hooks/bake", "#!/bin/sh\n"),
            Entry::File("a/v", "0\n"),
        ],
    );
    plans(&repo, &first, None, &[]);
    // The manifest is unchanged, but the hook it names is no longer executable: the earlier
    // validation does not stand for this commit.
    let second =
        repo.commit_local("hook not executable", &[Entry::File("hooks/bake", "#!/bin/sh\n")]);
    let since = Revision(first.clone());
    match plan_commit(repo.work_path(), &Revision(second), Some(&since), &|_| None) {
        Ok(CommitPlan::Invalid(error)) => {
            assert!(error.to_string().contains("hooks/bake"), "{error}");
        }
        other => panic!("expected the manifest to be invalid: {other:?}"),
    }
}
