//! Validation benchmark: what it costs to parse and validate a `kiln.yaml` of many fleets.
//!
//! Generates a checkout (hooks, an exec provider directory with its `settings.yaml`, and a
//! manifest of N exec-provider fleets sharing one provider section through a YAML anchor, as a
//! repo of many fleets would write it) for N = 100, 1,000 and 3,000, and prints for each:
//!
//! - parse + validate in process (`manifest::load` with the checkout's files: what
//!   `kiln validate` does after reading the file, and what the daemon does per commit);
//! - parse alone;
//! - the `kiln validate DIR` command (the real binary, process start included).
//!
//! Validation must be linear in the fleet count: the ms-per-fleet column stays flat.
//!
//! Then, in a git repository of the same checkout (one directory per fleet, every fleet
//! deployed), the daemon's planning of a commit that touches one fleet: read the manifest at
//! the commit, compare each fleet's trees with what it runs, decide (`planner::plan_commit`,
//! what a push costs before its rollout is recorded).
//!
//! `cargo bench --bench validate` (`KILN_VALIDATE_ROUNDS` rounds per size, default 5; the
//! median is printed).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::manifest::{self, DirFiles};

const SIZES: [usize; 3] = [100, 1_000, 3_000];

const PROVIDER_OPS: [&str; 6] = ["list", "launch", "attach", "detach", "terminate", "health"];

/// A checkout with the hooks every generated fleet names.
fn write_checkout(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let exec = |path: &Path| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    exec(&dir.join("hooks/bake"));
    exec(&dir.join("hooks/reconcile"));
    for op in PROVIDER_OPS {
        exec(&dir.join("hooks/provider/sim").join(op));
    }
    std::fs::write(
        dir.join("hooks/provider/sim/settings.yaml"),
        "settings:\n  state: { required: true, description: the state directory }\n  \
         region: { description: where instances run }\n",
    )
    .unwrap();
}

/// A manifest of `fleets` fleets.
fn manifest(fleets: usize) -> String {
    let mut text = String::from("fleets:\n");
    for i in 0..fleets {
        let name = format!("fleet-{i:04}");
        text.push_str(&format!(
            "  - name: {name}\n    paths: [fleets/{name}/]\n    image:\n      stages:\n        \
             - {{ name: base, path: image/base, bake: hooks/bake }}\n        \
             - {{ name: app, path: fleets/{name}/app, from: base, bake: hooks/bake }}\n"
        ));
        if i == 0 {
            text.push_str(
                "    rollout: &policy\n      provider: exec\n      exec:\n        \
                 list: hooks/provider/sim/list\n        launch: hooks/provider/sim/launch\n        \
                 attach: hooks/provider/sim/attach\n        detach: hooks/provider/sim/detach\n        \
                 terminate: hooks/provider/sim/terminate\n        health: hooks/provider/sim/health\n        \
                 env: { STATE: /var/lib/sim, REGION: here }\n      capacity: 2\n",
            );
        } else {
            text.push_str("    rollout: *policy\n");
        }
    }
    text
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn head(dir: &Path) -> kiln::model::Revision {
    let out = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(dir).output().unwrap();
    kiln::model::Revision(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Planning a commit that touches one fleet, every fleet deployed: median of `rounds` commits.
fn plan_one(fleets: usize, rounds: usize) -> (Duration, Duration) {
    use kiln::planner::{CommitPlan, plan_commit};
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    write_checkout(repo);
    std::fs::write(repo.join("kiln.yaml"), manifest(fleets)).unwrap();
    std::fs::create_dir_all(repo.join("image/base")).unwrap();
    std::fs::write(repo.join("image/base/Dockerfile"), "FROM scratch\n").unwrap();
    for i in 0..fleets {
        let app = repo.join(format!("fleets/fleet-{i:04}/app"));
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(app.join("version"), "0\n").unwrap();
    }
    git(repo, &["init", "-q", "-b", "main"]);
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-q", "-m", "fleets"]);
    let first = head(repo);
    let Ok(CommitPlan::Fleets(plans)) = plan_commit(repo, &first, None, &|_| None) else {
        panic!("the first commit plans");
    };
    let deployed: std::collections::HashMap<String, kiln::store::Deployed> = plans
        .plans
        .into_iter()
        .map(|p| {
            let name = p.fleet.name.clone();
            let deployed = kiln::store::Deployed {
                fleet: name.clone(),
                revision: first.clone(),
                image: "img".into(),
                rollout: kiln::model::RolloutId(1),
                trees: p.trees,
                at: kiln::model::now(),
            };
            (name, deployed)
        })
        .collect();
    let lookup = |fleet: &str| deployed.get(fleet).cloned();
    let (mut full, mut incremental) = (Vec::new(), Vec::new());
    let mut previous = first.clone();
    for round in 0..rounds {
        let fleet = format!("fleet-{:04}", (round * 97) % fleets);
        std::fs::write(
            repo.join(format!("fleets/{fleet}/app/version")),
            format!("{}\n", round + 1),
        )
        .unwrap();
        git(repo, &["commit", "-q", "-am", &format!("{fleet} v{round}")]);
        let revision = head(repo);
        // Incremental first (as the daemon plans a push), then afresh (as after a force push);
        // the manifest cache is keyed by commit, so the second reuses the first's parse.
        for (samples, since) in [(&mut incremental, Some(&previous)), (&mut full, None)] {
            let started = Instant::now();
            let plan = plan_commit(repo, &revision, since, &lookup).unwrap();
            samples.push(started.elapsed());
            let CommitPlan::Fleets(plans) = plan else { panic!("plans") };
            let busy: Vec<_> = plans.plans.iter().filter(|p| !p.is_noop()).collect();
            assert!(busy.iter().any(|p| p.fleet.name == fleet), "{fleet} rolls");
            // Incremental: that fleet alone (the fleets of earlier rounds are left as they
            // were planned then; planned afresh, they differ from `deployed` too).
            if since.is_some() {
                assert_eq!(plans.plans.len(), 1, "one fleet planned");
            }
        }
        previous = revision;
    }
    (median(incremental), median(full))
}

fn main() {
    let rounds: usize =
        std::env::var("KILN_VALIDATE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let exe = env!("CARGO_BIN_EXE_kiln");
    println!(
        "{:>7} {:>9} {:>12} {:>10} {:>14} {:>16}",
        "fleets", "bytes", "load ms", "parse ms", "ms per fleet", "kiln validate ms"
    );
    for fleets in SIZES {
        let dir = tempfile::tempdir().unwrap();
        write_checkout(dir.path());
        let text = manifest(fleets);
        std::fs::write(dir.path().join("kiln.yaml"), &text).unwrap();
        let files = DirFiles(dir.path());

        let mut load = Vec::new();
        let mut parse = Vec::new();
        let mut command = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let loaded = manifest::load(&text, "kiln.yaml", &files);
            load.push(started.elapsed());
            let loaded = loaded.unwrap_or_else(|e| panic!("{fleets} fleets: {e}"));
            assert_eq!(loaded.fleets.len(), fleets);

            let started = Instant::now();
            manifest::parse(&text, "kiln.yaml").unwrap();
            parse.push(started.elapsed());

            let started = Instant::now();
            let output = Command::new(exe).arg("validate").arg(dir.path()).output().unwrap();
            command.push(started.elapsed());
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
        }
        let load = median(load);
        println!(
            "{fleets:>7} {:>9} {:>12.2} {:>10.2} {:>14.4} {:>16.2}",
            text.len(),
            ms(load),
            ms(median(parse)),
            ms(load) / fleets as f64,
            ms(median(command)),
        );
    }
    println!();
    println!(
        "{:>7} {:>30} {:>30}",
        "fleets", "plan a one-fleet push ms", "every fleet (manifest cached) ms"
    );
    for fleets in SIZES {
        let (incremental, full) = plan_one(fleets, rounds);
        println!("{fleets:>7} {:>30.2} {:>30.2}", ms(incremental), ms(full));
    }
}
