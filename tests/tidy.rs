//! Tidy: the boundaries ARCHITECTURE.md states, checked on the source text (the rust-analyzer
//! way). Each rule names the sentence of ARCHITECTURE.md it enforces; a rule whose sentence is
//! gone from the document fails too, so the document and the code move together.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `src/`, as (path relative to the crate root, code without comments).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    files.sort();
    assert!(files.len() > 20, "found the sources");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read source");
            let rel = path.strip_prefix(root()).expect("under root").display().to_string();
            (rel, strip_comments(&text))
        })
        .collect()
}

/// Drops `//` comments (doc comments included) so prose may name what code must not use.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                return "";
            }
            // A trailing comment, unless the `//` is inside a string (a URL): good enough here.
            match line.find(" // ") {
                Some(at) if !line[..at].contains('"') => &line[..at],
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code of a file without its `#[cfg(test)] mod tests` (decision purity applies to the
/// functions, not to the tests that drive them).
fn without_tests(code: &str) -> &str {
    match code.find("#[cfg(test)]") {
        Some(at) => &code[..at],
        None => code,
    }
}

fn architecture() -> String {
    std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md")
}

struct Rule {
    /// The sentence of ARCHITECTURE.md this rule enforces.
    states: &'static str,
    /// Code that only the allowed files may contain.
    needle: &'static str,
    /// Path prefixes allowed to contain it.
    allowed: &'static [&'static str],
}

const RULES: &[Rule] = &[
    Rule {
        states: "the only module that imports `sled`",
        needle: "sled::",
        allowed: &["src/store/"],
    },
    Rule {
        states: "`source/git.rs` is the only module that imports `git2`",
        needle: "git2::",
        allowed: &["src/source/git.rs"],
    },
    Rule {
        states: "the only module that imports `serde_yaml`",
        needle: "serde_yaml::",
        allowed: &["src/manifest/"],
    },
    Rule {
        states: "the one module that imports `backoff`",
        needle: "backoff::",
        allowed: &["src/retry.rs"],
    },
    Rule {
        states: "`hooks/` is the only module that spawns processes",
        needle: "Command::new(",
        allowed: &["src/hooks/"],
    },
];

#[test]
fn module_boundaries_hold() {
    let doc = architecture();
    let sources = sources();
    let mut broken = Vec::new();
    for rule in RULES {
        assert!(doc.contains(rule.states), "ARCHITECTURE.md no longer says: {}", rule.states);
        for (path, code) in &sources {
            if code.contains(rule.needle) && !rule.allowed.iter().any(|a| path.starts_with(a)) {
                broken.push(format!("{path} uses `{}` ({})", rule.needle, rule.states));
            }
        }
    }
    assert!(broken.is_empty(), "boundaries crossed:\n{}", broken.join("\n"));
}

#[test]
fn decision_functions_do_no_io_and_read_no_clock() {
    let doc = architecture();
    assert!(doc.contains("`step` does no IO, takes `now` as a parameter and never fails"));
    assert!(doc.contains("`decide` does no IO and reads no clock"));
    let forbidden = [
        "now()",
        "Instant::",
        "SystemTime",
        "tokio::",
        ".await",
        "std::fs",
        "Store",
        "reqwest",
        "std::process",
        "std::net",
    ];
    let mut broken = Vec::new();
    for (path, code) in sources() {
        let pure = path == "src/rollout/step.rs" || path == "src/operator/decide.rs";
        if !pure {
            continue;
        }
        for needle in forbidden {
            if without_tests(&code).contains(needle) {
                broken.push(format!("{path} contains `{needle}`"));
            }
        }
    }
    assert!(broken.is_empty(), "decision functions must stay pure:\n{}", broken.join("\n"));
}

#[test]
fn the_operator_loop_does_not_wait_on_providers_hooks_or_git() {
    // The router's loop only moves messages; every provider call, hook run, git read and
    // garbage collection happens in a fleet's tasks, the recorder or a spawned task.
    let doc = architecture();
    assert!(doc.contains("nothing on the router's loop waits on a provider, a hook or git"));
    let code = std::fs::read_to_string(root().join("src/operator/mod.rs")).expect("operator");
    let code = strip_comments(&code);
    for needle in ["provider::open(", ".list()", "drive(", "spawn_blocking(move || planner::plan"] {
        assert!(!code.contains(needle), "src/operator/mod.rs calls `{needle}` on the router");
    }
}
