//! Records the commit kiln is built from, for `kiln --version`: `$KILN_COMMIT` when set (the
//! Dockerfile passes it, as the build context has no `.git`), else `git rev-parse` of the
//! checkout, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// Watches `file` for changes; a missing file is not watched (cargo would rerun every build).
fn watch(file: String) {
    if std::path::Path::new(&file).exists() {
        println!("cargo:rerun-if-changed={file}");
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_COMMIT");
    let commit = match std::env::var("KILN_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs.
            for path in ["HEAD", "packed-refs"] {
                if let Some(file) = git(&["rev-parse", "--git-path", path]) {
                    watch(file);
                }
            }
            if let Some(file) = git(&["symbolic-ref", "-q", "HEAD"])
                .and_then(|branch| git(&["rev-parse", "--git-path", &branch]))
            {
                watch(file);
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=KILN_COMMIT={commit}");
}
