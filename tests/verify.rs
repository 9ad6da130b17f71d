//! Issue 18: deploy only commits signed by trusted keys. Real `ssh-keygen` and `gpg` keys sign
//! real commits (`git commit -S` with `gpg.format ssh` / `openpgp`) in real repositories, and
//! the real daemon verifies every commit since the last deployed one before creating a
//! rollout. The fleet lives on the exec provider's POSIX sh cloud (`tests/support/cloud.rs`),
//! so a deployment takes a few hook runs and no instance processes.

// Synchronous tests driving child processes: blocking sleeps between polls are the point.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::cloud::{BAKE, CLOUD_SH, fleet_yaml};
use support::daemon::{Daemon, for_commit, kiln};
use support::git::{BRANCH, TestRepo, git_command, require_git};
use support::hooks::require_program;

/// Generous deadline for what a loaded 2-core machine does in a few seconds.
const WAIT: Duration = Duration::from_secs(90);

const ALLOWED: &str = ".kiln/allowed_signers";
const KEYRING: &str = ".kiln/keyring.asc";

/// How a commit is signed.
enum Sign<'a> {
    None,
    Ssh(&'a SshKey),
    Gpg(&'a GpgKey),
}

/// An ed25519 key made by `ssh-keygen`, and its `allowed_signers` line.
struct SshKey {
    private: PathBuf,
    line: String,
}

impl SshKey {
    fn new(dir: &Path, principal: &str) -> SshKey {
        let private = dir.join(principal.replace(['@', '.'], "_"));
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", principal, "-f"])
            .arg(&private)
            .status()
            .unwrap();
        assert!(status.success(), "ssh-keygen failed");
        let public = std::fs::read_to_string(format!("{}.pub", private.display())).unwrap();
        let mut parts = public.split_whitespace();
        let line = format!("{principal} {} {}\n", parts.next().unwrap(), parts.next().unwrap());
        SshKey { private, line }
    }
}

/// An OpenPGP key made by `gpg` in its own home, and its armored public key.
struct GpgKey {
    home: PathBuf,
    fingerprint: String,
    armored: String,
}

impl GpgKey {
    fn new(dir: &Path, uid: &str) -> GpgKey {
        let home = dir.join("gnupg");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let gpg = |args: &[&str]| {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--no-tty"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "gpg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        gpg(&["--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"]);
        let listing = gpg(&["--with-colons", "--list-keys", uid]);
        let fingerprint = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:").map(|r| r.trim_matches(':').to_owned()))
            .unwrap();
        let armored = gpg(&["--armor", "--export", &fingerprint]);
        GpgKey { home, fingerprint, armored }
    }
}

impl Drop for GpgKey {
    fn drop(&mut self) {
        // Signing started an agent for this home; stop it.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "all"])
            .status();
    }
}

/// A repository whose `kiln.yaml` verifies signatures, a data dir and the keys.
struct Fixture {
    repo: TestRepo,
    data: PathBuf,
    keys: PathBuf,
    state: String,
}

impl Fixture {
    /// `None` (after a loud SKIP, or a panic under `CI=true`) when a tool is missing.
    fn new(test: &str, gpg: bool) -> Option<Fixture> {
        if !require_git(test) || !require_program(test, "ssh-keygen") {
            return None;
        }
        if gpg && !require_program(test, "gpg") {
            return None;
        }
        let repo = TestRepo::new();
        let data = repo.scratch("data");
        let keys = repo.scratch("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let state = data.with_extension("cloud");
        std::fs::create_dir_all(&state).unwrap();
        let state = state.display().to_string();
        Some(Fixture { repo, data, keys, state })
    }

    fn manifest(&self, verify: &str) -> String {
        format!("verify:\n{verify}fleets:\n{}", fleet_yaml("web", 1, 0.0, &self.state))
    }

    /// The files of the first commit: the manifest, the cloud, the bake hook, the trust files.
    fn first_files(
        &self,
        verify: &str,
        allowed: &str,
        keyring: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut files = vec![
            ("kiln.yaml".to_owned(), self.manifest(verify)),
            ("hooks/cloud".to_owned(), CLOUD_SH.to_owned()),
            ("hooks/bake".to_owned(), BAKE.to_owned()),
            ("web/version".to_owned(), "1\n".to_owned()),
            (ALLOWED.to_owned(), allowed.to_owned()),
        ];
        if let Some(keyring) = keyring {
            files.push((KEYRING.to_owned(), keyring.to_owned()));
        }
        files
    }

    /// Writes `files` (those under `hooks/` executable), commits them signed as `sign` says,
    /// without pushing. Returns the commit.
    fn commit(&self, sign: Sign<'_>, message: &str, files: &[(&str, &str)]) -> String {
        let work = self.repo.work_path();
        for (path, content) in files {
            let full = work.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, content).unwrap();
            let mode = if path.starts_with("hooks/") { 0o755 } else { 0o644 };
            std::fs::set_permissions(&full, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
        }
        self.repo.git(&["add", "--all"]);
        let mut git = git_command(&self.keys);
        git.current_dir(work);
        match sign {
            Sign::None => {}
            Sign::Ssh(key) => {
                git.args(["-c", "gpg.format=ssh", "-c"])
                    .arg(format!("user.signingkey={}", key.private.display()));
            }
            Sign::Gpg(key) => {
                git.env("GNUPGHOME", &key.home)
                    .args(["-c", "gpg.format=openpgp", "-c"])
                    .arg(format!("user.signingkey={}", key.fingerprint));
            }
        }
        git.args(["commit", "--quiet", "--allow-empty", "-m", message]);
        if !matches!(sign, Sign::None) {
            git.arg("-S");
        }
        let out = git.output().unwrap();
        assert!(out.status.success(), "git commit: {}", String::from_utf8_lossy(&out.stderr));
        self.repo.head()
    }

    fn start(&self) -> Daemon {
        Daemon::start(&self.repo.url(), &self.data, &["--poll", "1s"])
    }
}

fn fleet_entry(log: &[Value], sha: &str) -> Option<Value> {
    for_commit(log, sha).into_iter().find(|e| e["fleet"] == "web").cloned()
}

fn wait_fleet(daemon: &Daemon, sha: &str, state: &str) -> Value {
    let log = daemon.wait_log(&format!("{sha} {state}"), WAIT, |log| {
        fleet_entry(log, sha).is_some_and(|e| e["state"] == state)
    });
    fleet_entry(&log, sha).unwrap()
}

/// The commit-level `failed` record of `sha`.
fn wait_blocked(daemon: &Daemon, sha: &str) -> Value {
    let log = daemon.wait_log(&format!("{sha} blocked"), WAIT, |log| {
        for_commit(log, sha).iter().any(|e| e["fleet"].is_null() && e["state"] == "failed")
    });
    let entry = for_commit(&log, sha)
        .into_iter()
        .find(|e| e["fleet"].is_null() && e["state"] == "failed")
        .cloned()
        .unwrap();
    assert!(fleet_entry(&log, sha).is_none(), "a blocked commit got a rollout: {log:#?}");
    entry
}

fn show(data: &Path, id: &Value) -> Value {
    let (code, out, err) = kiln(data, &["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn short(sha: &str) -> &str {
    &sha[..8]
}

/// The images the cloud runs for fleet `web` (what "fleet untouched" means).
fn running_images(state: &str) -> Vec<String> {
    let dir = Path::new(state).join("web");
    let mut images: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .map(|e| {
                    let v: Value =
                        serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
                    v["image"].as_str().unwrap().to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    images.sort();
    images
}

const RANGE: &str = "  mode: range\n  sshAllowedSigners: .kiln/allowed_signers\n";

#[test]
fn trusted_ranges_deploy_and_one_unsigned_commit_blocks_until_it_is_gone() {
    let test = "trusted_ranges_deploy_and_one_unsigned_commit_blocks_until_it_is_gone";
    let Some(fx) = Fixture::new(test, false) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let files = fx.first_files(RANGE, &alice.line, None);
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let v1 = fx.commit(Sign::Ssh(&alice), "v1", &files);
    fx.repo.push();
    let daemon = fx.start();
    let first = wait_fleet(&daemon, &v1, "succeeded");
    let shown = show(&fx.data, &first["id"]);
    assert_eq!(shown["verified"]["method"], "ssh", "{shown:#}");
    assert_eq!(shown["verified"]["signer"], "alice@kiln.test", "{shown:#}");
    assert!(shown["verified"]["key"].as_str().unwrap().starts_with("SHA256:"), "{shown:#}");

    // Three signed commits in one push: all verified, deployed.
    fx.commit(Sign::Ssh(&alice), "a", &[("web/a", "a")]);
    fx.commit(Sign::Ssh(&alice), "b", &[("web/b", "b")]);
    let v2 = fx.commit(Sign::Ssh(&alice), "v2", &[("web/version", "2\n")]);
    fx.repo.push();
    let second = wait_fleet(&daemon, &v2, "succeeded");
    let shown = show(&fx.data, &second["id"]);
    assert_eq!(shown["verified"]["commits"], 3, "{shown:#}");
    assert_eq!(shown["verified"]["since"], v1.as_str(), "{shown:#}");
    let (code, text, err) = kiln(&fx.data, &["log"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("v2 [verified: ssh alice@kiln.test]"), "{text}");
    let (code, text, err) = kiln(&fx.data, &["show", &second["id"].to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("verified:  signed by alice@kiln.test (ssh key SHA256:"), "{text}");
    let deployed = running_images(&fx.state);

    // Signed, unsigned, signed: blocked, naming the unsigned commit and its author.
    fx.commit(Sign::Ssh(&alice), "c", &[("web/c", "c")]);
    let unsigned = fx.commit(Sign::None, "sneaky", &[("web/d", "d")]);
    let v3 = fx.commit(Sign::Ssh(&alice), "v3", &[("web/version", "3\n")]);
    fx.repo.push();
    let blocked = wait_blocked(&daemon, &v3);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(
        reason
            .contains(&format!("{} by Kiln Test <test@kiln.invalid>: unsigned", short(&unsigned))),
        "{reason}"
    );
    assert!(reason.contains("1 untrusted commit:"), "{reason}");
    let shown = show(&fx.data, &blocked["id"]);
    let events = shown["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == "verify" && e["data"]["commit"] == unsigned.as_str()),
        "{shown:#}"
    );
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");

    // A signed commit on top does not launder the unsigned one below it.
    let v4 = fx.commit(Sign::Ssh(&alice), "v4", &[("web/version", "4\n")]);
    fx.repo.push();
    let blocked = wait_blocked(&daemon, &v4);
    assert!(blocked["reason"].as_str().unwrap().contains(short(&unsigned)), "{blocked:#}");
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");
}

#[test]
fn a_force_push_rewriting_history_with_unsigned_commits_is_blocked() {
    let test = "a_force_push_rewriting_history_with_unsigned_commits_is_blocked";
    let Some(fx) = Fixture::new(test, false) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let files = fx.first_files(RANGE, &alice.line, None);
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let v1 = fx.commit(Sign::Ssh(&alice), "v1", &files);
    fx.repo.push();
    let daemon = fx.start();
    wait_fleet(&daemon, &v1, "succeeded");
    let v2 = fx.commit(Sign::Ssh(&alice), "v2", &[("web/version", "2\n")]);
    fx.repo.push();
    wait_fleet(&daemon, &v2, "succeeded");
    let deployed = running_images(&fx.state);

    // History rewritten from v1: an unsigned commit, then a signed tip, force-pushed.
    fx.repo.git(&["reset", "--quiet", "--hard", &v1]);
    let unsigned = fx.commit(Sign::None, "rewrite", &[("web/version", "evil\n")]);
    let tip = fx.commit(Sign::Ssh(&alice), "looks fine", &[("web/x", "x")]);
    fx.repo.force_push();
    let blocked = wait_blocked(&daemon, &tip);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(reason.contains(short(&unsigned)), "{reason}");
    assert!(reason.contains("unsigned"), "{reason}");
    assert!(reason.contains("force-push"), "{reason}");
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");
    assert_eq!(fx.repo.remote_head().as_deref(), Some(tip.as_str()), "{BRANCH} moved");
}

#[test]
fn a_trust_file_changed_by_an_untrusted_commit_is_blocked() {
    let test = "a_trust_file_changed_by_an_untrusted_commit_is_blocked";
    let Some(fx) = Fixture::new(test, false) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let bob = SshKey::new(&fx.keys, "bob@kiln.test");
    let mallory = SshKey::new(&fx.keys, "mallory@kiln.test");
    let verify = format!("{RANGE}  trustFilesChangedBy: [alice@kiln.test]\n");
    let trusted = format!("{}{}", alice.line, bob.line);
    let files = fx.first_files(&verify, &trusted, None);
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let v1 = fx.commit(Sign::Ssh(&alice), "v1", &files);
    fx.repo.push();
    let daemon = fx.start();
    wait_fleet(&daemon, &v1, "succeeded");
    let deployed = running_images(&fx.state);

    // Mallory adds her own key and signs with it: the commit being verified does not vouch
    // for itself (trust comes from the deployed commit), so her key is unknown.
    let with_mallory = format!("{trusted}{}", mallory.line);
    let evil = fx.commit(
        Sign::Ssh(&mallory),
        "add a key",
        &[(ALLOWED, &with_mallory), ("web/version", "evil\n")],
    );
    fx.repo.push();
    let blocked = wait_blocked(&daemon, &evil);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(reason.contains(short(&evil)), "{reason}");
    assert!(reason.contains("unknown key"), "{reason}");
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");

    // Back to v1; Bob is trusted but may not change the trust file.
    fx.repo.git(&["reset", "--quiet", "--hard", &v1]);
    let bobs = fx.commit(Sign::Ssh(&bob), "bob adds mallory", &[(ALLOWED, &with_mallory)]);
    let tip = fx.commit(Sign::Ssh(&bob), "v2", &[("web/version", "2\n")]);
    fx.repo.force_push();
    let blocked = wait_blocked(&daemon, &tip);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "{} by Kiln Test <test@kiln.invalid>: changes the trust file {ALLOWED} but its signer \
             bob@kiln.test",
            short(&bobs)
        )),
        "{reason}"
    );
    assert!(reason.contains("1 untrusted commit:"), "{reason}");
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");

    // Alice may: her change deploys.
    fx.repo.git(&["reset", "--quiet", "--hard", &v1]);
    let tip = fx.commit(
        Sign::Ssh(&alice),
        "alice adds carol",
        &[
            (ALLOWED, &format!("{trusted}{}", mallory.line.replace("mallory", "carol"))),
            ("web/version", "3\n"),
        ],
    );
    fx.repo.force_push();
    wait_fleet(&daemon, &tip, "succeeded");
}

#[test]
fn gpg_and_ssh_signed_commits_in_one_range_are_both_verified() {
    let test = "gpg_and_ssh_signed_commits_in_one_range_are_both_verified";
    let Some(fx) = Fixture::new(test, true) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let gpg_dir = fx.repo.scratch("gpg");
    std::fs::create_dir_all(&gpg_dir).unwrap();
    let bob = GpgKey::new(&gpg_dir, "Bob <bob@kiln.test>");
    let verify = format!("{RANGE}  gpgKeyring: {KEYRING}\n");
    let files = fx.first_files(&verify, &alice.line, Some(&bob.armored));
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let v1 = fx.commit(Sign::Gpg(&bob), "v1", &files);
    fx.repo.push();
    let daemon = fx.start();
    let first = wait_fleet(&daemon, &v1, "succeeded");
    let shown = show(&fx.data, &first["id"]);
    assert_eq!(shown["verified"]["method"], "gpg", "{shown:#}");
    assert_eq!(shown["verified"]["key"], bob.fingerprint.as_str(), "{shown:#}");

    fx.commit(Sign::Gpg(&bob), "gpg", &[("web/a", "a")]);
    let v2 = fx.commit(Sign::Ssh(&alice), "ssh", &[("web/version", "2\n")]);
    fx.repo.push();
    let second = wait_fleet(&daemon, &v2, "succeeded");
    let shown = show(&fx.data, &second["id"]);
    let signers: Vec<&str> = shown["verified"]["signers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(signers.len(), 2, "{shown:#}");
    assert!(
        signers[0].starts_with(&format!("gpg Bob <bob@kiln.test> {}", bob.fingerprint)),
        "{signers:?}"
    );
    assert!(signers[1].starts_with("ssh alice@kiln.test SHA256:"), "{signers:?}");

    // A GPG-signed commit by a key not in the keyring: unknown key.
    let eve_dir = fx.repo.scratch("gpg-eve");
    std::fs::create_dir_all(&eve_dir).unwrap();
    let eve = GpgKey::new(&eve_dir, "Eve <eve@kiln.test>");
    let v3 = fx.commit(Sign::Gpg(&eve), "eve", &[("web/version", "3\n")]);
    fx.repo.push();
    let blocked = wait_blocked(&daemon, &v3);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(reason.contains("unknown key"), "{reason}");
    assert!(reason.contains(short(&v3)), "{reason}");
}

#[test]
fn daemon_flags_verify_a_repo_that_does_not_ask_for_it() {
    let test = "daemon_flags_verify_a_repo_that_does_not_ask_for_it";
    let Some(fx) = Fixture::new(test, false) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let mallory = SshKey::new(&fx.keys, "mallory@kiln.test");
    // The trust file lives outside the repo; the repo's kiln.yaml has no `verify:` and even
    // ships an allowed_signers naming mallory, which must not count.
    let outside = fx.keys.join("allowed_signers");
    std::fs::write(&outside, &alice.line).unwrap();
    let manifest = format!("fleets:\n{}", fleet_yaml("web", 1, 0.0, &fx.state));
    let v1 = fx.commit(
        Sign::Ssh(&alice),
        "v1",
        &[
            ("kiln.yaml", &manifest),
            ("hooks/cloud", CLOUD_SH),
            ("hooks/bake", BAKE),
            ("web/version", "1\n"),
            (ALLOWED, &mallory.line),
        ],
    );
    fx.repo.push();
    let daemon = Daemon::start(
        &fx.repo.url(),
        &fx.data,
        &[
            "--poll",
            "1s",
            "--verify-mode",
            "range",
            "--verify-ssh-allowed-signers",
            outside.to_str().unwrap(),
        ],
    );
    let first = wait_fleet(&daemon, &v1, "succeeded");
    let shown = show(&fx.data, &first["id"]);
    assert_eq!(shown["verified"]["policy"], "daemon flags", "{shown:#}");
    let deployed = running_images(&fx.state);

    let evil = fx.commit(Sign::Ssh(&mallory), "v2", &[("web/version", "2\n")]);
    fx.repo.push();
    let blocked = wait_blocked(&daemon, &evil);
    let reason = blocked["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("{} by Kiln Test", short(&evil))), "{reason}");
    assert!(reason.contains("unknown key"), "{reason}");
    assert!(reason.contains("trust from daemon flags"), "{reason}");
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");
}

/// In `head` mode a blocked push is not forgotten: the next push, signed, is planned against
/// the last push that was applied, so the blocked push's change to the fleet deploys with it
/// even though the new commit itself touches no fleet.
#[test]
fn a_blocked_push_is_planned_again_with_the_next_one() {
    let test = "a_blocked_push_is_planned_again_with_the_next_one";
    let Some(fx) = Fixture::new(test, false) else { return };
    let alice = SshKey::new(&fx.keys, "alice@kiln.test");
    let head = "  mode: head\n  sshAllowedSigners: .kiln/allowed_signers\n";
    let files = fx.first_files(head, &alice.line, None);
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let v1 = fx.commit(Sign::Ssh(&alice), "v1", &files);
    fx.repo.push();
    let daemon = fx.start();
    wait_fleet(&daemon, &v1, "succeeded");
    let deployed = running_images(&fx.state);

    // An unsigned tip changing the fleet: blocked, nothing moves.
    let unsigned = fx.commit(Sign::None, "v2 unsigned", &[("web/version", "2\n")]);
    fx.repo.push();
    wait_blocked(&daemon, &unsigned);
    assert_eq!(running_images(&fx.state), deployed, "the fleet was touched");

    // A signed tip that touches no fleet: the change below it is planned with it and deploys.
    let readme = fx.commit(Sign::Ssh(&alice), "readme", &[("README.md", "hello\n")]);
    fx.repo.push();
    let rolled = wait_fleet(&daemon, &readme, "succeeded");
    assert!(rolled["plan"]["bake"].as_array().is_some_and(|b| !b.is_empty()), "{rolled:#}");
    assert_ne!(running_images(&fx.state), deployed, "the fleet kept the old image");
}
