//! Signature verification benchmark: what it costs to verify a range of 1,000 signed commits
//! (issue 18; target ≤ 2 s).
//!
//! Builds a bare repository of one deployed commit and N = 1,000 commits on top of it, each
//! signed with an ed25519 SSH key through `git commit -S` (`gpg.format ssh`), then times
//! `kiln::verify::check` on the tip with the last deployed commit as the base, as the daemon
//! does before planning rollouts: the revwalk, signature extraction, and `ssh-keygen -Y
//! find-principals` + `-Y verify` per commit (run in parallel). A second check of the same
//! range (the daemon's next push before a deployment) hits the per-process cache.
//!
//! `cargo bench --bench verify` (`KILN_VERIFY_COMMITS=N` to change the range,
//! `KILN_VERIFY_FORMAT=gpg` to sign it with an OpenPGP key instead). Building the
//! range (1,000 `git commit -S`) takes a while and is not timed.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln::model::{Revision, RolloutId};
use kiln::store::{Deployed, Store};
use kiln::verify::{DaemonPolicy, Outcome};

/// The GnuPG home git signs with, in `KILN_VERIFY_FORMAT=gpg` runs.
static GNUPGHOME: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn git(dir: &Path, home: &Path, args: &[&str]) -> String {
    let mut command = Command::new("git");
    if let Some(gnupg) = GNUPGHOME.get() {
        command.env("GNUPGHOME", gnupg);
    }
    let out = command
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("GIT_AUTHOR_NAME", "Bench")
        .env("GIT_AUTHOR_EMAIL", "bench@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "Bench")
        .env("GIT_COMMITTER_EMAIL", "bench@kiln.invalid")
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn main() {
    for tool in ["git", "ssh-keygen"] {
        if Command::new(tool).arg("--version").output().is_err()
            && Command::new(tool).arg("-?").output().is_err()
        {
            println!("verify: SKIP, `{tool}` is not installed");
            return;
        }
    }
    let n: usize =
        std::env::var("KILN_VERIFY_COMMITS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    // `KILN_VERIFY_FORMAT=gpg`: the range is signed with an OpenPGP key instead (one
    // `gpg --verify` per commit; there is no in-process path for OpenPGP).
    let gpg = std::env::var("KILN_VERIFY_FORMAT").as_deref() == Ok("gpg");
    let (sign, allowed, keyring): (
        Vec<String>,
        Option<std::path::PathBuf>,
        Option<std::path::PathBuf>,
    ) = if gpg {
        let gnupg = dir.path().join("gnupg");
        std::fs::create_dir_all(&gnupg).unwrap();
        std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(&gnupg)
                .args(["--batch", "--no-tty"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "gpg {args:?}");
            out.stdout
        };
        run(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            "Bench <bench@kiln.test>",
            "ed25519",
            "sign",
            "never",
        ]);
        let keyring = dir.path().join("keyring.asc");
        std::fs::write(&keyring, run(&["--armor", "--export", "bench@kiln.test"])).unwrap();
        // git finds the key through GNUPGHOME (set for the commits below).
        let _ = GNUPGHOME.set(gnupg.clone());
        (
            vec![
                "-c".into(),
                "gpg.format=openpgp".into(),
                "-c".into(),
                "user.signingkey=bench@kiln.test".into(),
            ],
            None,
            Some(keyring),
        )
    } else {
        let key = dir.path().join("key");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench@kiln.test", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(status.success());
        let public = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
        let mut parts = public.split_whitespace();
        let allowed = dir.path().join("allowed_signers");
        std::fs::write(
            &allowed,
            format!("bench@kiln.test {} {}\n", parts.next().unwrap(), parts.next().unwrap()),
        )
        .unwrap();
        let signing = format!("user.signingkey={}", key.display());
        (vec!["-c".into(), "gpg.format=ssh".into(), "-c".into(), signing], Some(allowed), None)
    };

    git(&work, &home, &["init", "--quiet"]);
    let sign: Vec<&str> = sign.iter().map(String::as_str).collect();
    let commit = |message: &str| {
        let mut args: Vec<&str> = sign.to_vec();
        args.extend(["commit", "--quiet", "--allow-empty", "-S", "-m", message]);
        git(&work, &home, &args);
    };
    let started = Instant::now();
    commit("deployed");
    let base = git(&work, &home, &["rev-parse", "HEAD"]);
    for i in 0..n {
        commit(&format!("commit {i}"));
    }
    let tip = git(&work, &home, &["rev-parse", "HEAD"]);
    println!(
        "verify: built {n} signed commits in {:.1} s (not timed below)",
        started.elapsed().as_secs_f64()
    );

    let store = Store::open(&dir.path().join("store"), 0).unwrap();
    store
        .set_deployed(&Deployed {
            fleet: "web".into(),
            revision: Revision(base.clone()),
            image: kiln::model::ImageRef("img".into()),
            rollout: RolloutId(1),
            trees: Default::default(),
            at: kiln::model::now(),
        })
        .unwrap();
    let policy = DaemonPolicy {
        mode: kiln::manifest::VerifyMode::Range,
        ssh_allowed_signers: allowed,
        gpg_keyring: keyring,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mirror = work.join(".git");
    for round in ["first check", "again (cached)"] {
        let started = Instant::now();
        let outcome = runtime
            .block_on(kiln::verify::check(&store, &mirror, &Revision(tip.clone()), Some(&policy)))
            .unwrap();
        let took = started.elapsed();
        match outcome {
            Outcome::Passed(verified) => println!(
                "verify: {round}: {} commits ({}, range) in {:.3} s ({:.2} ms per commit)",
                verified.commits,
                if gpg { "gpg" } else { "ssh" },
                took.as_secs_f64(),
                took.as_secs_f64() * 1e3 / verified.commits.max(1) as f64
            ),
            other => println!("verify: {round}: unexpected outcome {other:?}"),
        }
    }
}
