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
}
