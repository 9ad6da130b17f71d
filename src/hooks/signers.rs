//! Checking commit signatures with the tools that own the formats: `ssh-keygen -Y` for SSH
//! signatures and `gpg --verify` for OpenPGP ones. This module runs those programs (it lives in
//! `hooks/`, the only module that spawns processes) and reads their answers: `ssh-keygen`'s exit
//! status and "Good signature" line, `gpg`'s machine-readable `--status-fd` lines. Trust is
//! always `ssh-keygen`'s verdict on the allowed_signers file; once it has accepted a key, the
//! key's further signatures in the same check are verified in-process by the RustCrypto
//! `ssh-key` crate (no hand-written cryptography), which turns a 1,000-commit range from a
//! thousand processes into a few.
//!
//! Every program runs with a cleared environment (the daemon's `PATH` only), stdin from the
//! signed payload or /dev/null, and a timeout; nothing it prints reaches a terminal unescaped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// How long one `ssh-keygen` or `gpg` run may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of a program's output kept for parsing and messages.
const OUTPUT_CAP: usize = 64 * 1024;

/// What checking one signature found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// A good signature by a trusted key.
    Good {
        /// Who the trust file says the key belongs to: the allowed-signers principal, or the
        /// OpenPGP key's user id.
        signer: String,
        /// The key: `SHA256:…` fingerprint (SSH) or the full OpenPGP fingerprint.
        key: String,
    },
    /// The signing key is not among the trusted ones.
    UnknownKey(String),
    /// The signature does not match the commit (or is malformed).
    BadSignature(String),
    /// The signature is good but the key (or the signature) has expired or was revoked.
    ExpiredKey(String),
}

/// A private temporary directory (0700), removed when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates one under the system's temp dir.
    pub fn new(prefix: &str) -> std::io::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short: gpg puts its socket paths under the home it is given.
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{n}-{:x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(ScratchDir(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished program said.
struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `program args` with a cleared environment (plus `env`), `stdin` written to it, and the
/// module's timeout. An error means it could not be run at all (missing, timed out).
async fn run(
    program: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &Path)],
    stdin: Option<&[u8]>,
) -> Result<Ran, String> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(super::base_env().into_iter().filter(|(k, _)| k == "PATH"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("could not run `{program}`: {e}"))?;
    let input = child.stdin.take();
    let payload = stdin.map(<[u8]>::to_vec);
    let work = async move {
        if let (Some(mut pipe), Some(payload)) = (input, payload) {
            // A program that exits without reading it all closes the pipe: not an error here,
            // its exit status says what happened.
            let _ = pipe.write_all(&payload).await;
            drop(pipe);
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("`{program}` did not finish within {}s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("`{program}` failed: {e}"))?;
    let text = |bytes: &[u8]| -> String {
        String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_CAP)]).into_owned()
    };
    Ok(Ran {
        success: output.status.success(),
        stdout: text(&output.stdout),
        stderr: text(&output.stderr),
    })
}

/// The last non-empty line of `text`, trimmed (the reason a program gives for failing).
fn last_line(text: &str) -> String {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_owned()
}

/// What one check learned per signing key (the public key's wire bytes) for one
/// allowed_signers file. A key is *vouched for* once `ssh-keygen -Y verify -n git` accepted a
/// signature by it: the file allows it for that principal and namespace now. Later signatures
/// by the same key are checked in-process (`ssh-key`, RustCrypto), which costs microseconds
/// instead of a process. A key `find-principals` refused stays refused. The map lives for one
/// check, so a changed trust file is never answered from it.
#[derive(Default)]
pub struct Principals {
    keys: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Mutex<KeyState>>>>,
}

/// What is known of one signing key.
#[derive(Default, Clone)]
enum KeyState {
    #[default]
    Unseen,
    /// `find-principals` named this principal; no signature by the key was accepted yet.
    Principal(String),
    /// `ssh-keygen -Y verify` accepted a signature by the key: `(principal, fingerprint)`.
    Vouched(String, String),
    /// `find-principals` found no principal (unknown or expired key): every signature by the
    /// key gets this answer.
    Refused(Checked),
}

impl Principals {
    fn slot(&self, key: &[u8]) -> Arc<tokio::sync::Mutex<KeyState>> {
        match self.keys.lock() {
            Ok(mut keys) => keys.entry(key.to_vec()).or_default().clone(),
            // A poisoned map only costs the fast path.
            Err(_) => Arc::default(),
        }
    }
}

/// The public key inside an armored SSH signature (`SSHSIG` blob: magic, version, then the
/// public key as an SSH string), or `None` if it is not one. Only a lookup key for
/// [`Principals`]: `ssh-keygen -Y verify` checks the signature and that the principal may use
/// this key, so a wrong answer here can only fail a check, never pass one.
pub fn ssh_signature_key(armored: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = std::str::from_utf8(armored).ok()?;
    let body: String =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
    let blob = base64::engine::general_purpose::STANDARD.decode(body).ok()?;
    let rest = blob.strip_prefix(b"SSHSIG")?;
    let rest = rest.get(4..)?; // version
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    rest.get(4..4 + len).map(<[u8]>::to_vec)
}

/// Checks `sig` over `payload` in-process for the `git` namespace, by the key it carries
/// (which the caller has matched to a vouched-for key): `true` only for a valid signature.
/// Certificates and algorithms `ssh-key` does not know fail here, and the caller asks
/// `ssh-keygen` instead.
fn ssh_signature_valid(sig: &[u8], payload: &[u8]) -> bool {
    let Ok(parsed) = ssh_key::SshSig::from_pem(sig) else { return false };
    let key = ssh_key::PublicKey::from(parsed.public_key().clone());
    key.verify("git", payload, &parsed).is_ok()
}

/// Checks an SSH signature (`sig`, the armored `SSHSIG`) over `payload` against the
/// `allowed_signers` file, as git does: `ssh-keygen -Y find-principals` names the principals
/// the signing key is allowed for, then `ssh-keygen -Y verify -n git` checks the signature for
/// the first of them. Once that accepted one signature by a key, the key's later signatures in
/// this check are verified in-process (see [`Principals`]); one that fails there is handed to
/// `ssh-keygen` again, for its verdict and message. `scratch` holds the signature file while
/// it is checked. An `Err` means `ssh-keygen` could not be run.
pub async fn check_ssh(
    allowed_signers: &Path,
    principals: &Principals,
    sig: &[u8],
    payload: &[u8],
    scratch: &Path,
) -> Result<Checked, String> {
    let Some(key) = ssh_signature_key(sig) else {
        let file = SigFile::new(scratch, sig)?;
        return match find_principal(allowed_signers, &file.0).await? {
            Ok(principal) => verify_ssh_file(allowed_signers, &principal, &file.0, payload).await,
            Err(refused) => Ok(refused),
        };
    };
    // Signatures by one key wait while the first is put to `ssh-keygen`, so a range signed
    // by one key costs one pair of runs, not a pair per task in flight.
    let slot = principals.slot(&key);
    let mut state = slot.lock().await;
    match state.clone() {
        KeyState::Vouched(signer, fingerprint) => {
            drop(state);
            if ssh_signature_valid(sig, payload) {
                return Ok(Checked::Good { signer, key: fingerprint });
            }
            let file = SigFile::new(scratch, sig)?;
            verify_ssh_file(allowed_signers, &signer, &file.0, payload).await
        }
        KeyState::Refused(answer) => Ok(answer),
        KeyState::Principal(principal) => {
            drop(state);
            let file = SigFile::new(scratch, sig)?;
            let result = verify_ssh_file(allowed_signers, &principal, &file.0, payload).await;
            if let Ok(Checked::Good { signer, key: fingerprint }) = &result {
                *slot.lock().await = KeyState::Vouched(signer.clone(), fingerprint.clone());
            }
            result
        }
        KeyState::Unseen => {
            let file = SigFile::new(scratch, sig)?;
            let principal = match find_principal(allowed_signers, &file.0).await? {
                Ok(principal) => principal,
                Err(refused) => {
                    // Only a well-formed signature's refusal is about the key itself.
                    if ssh_key::SshSig::from_pem(sig).is_ok() {
                        *state = KeyState::Refused(refused.clone());
                    }
                    return Ok(refused);
                }
            };
            let result = verify_ssh_file(allowed_signers, &principal, &file.0, payload).await;
            *state = match &result {
                Ok(Checked::Good { signer, key: fingerprint }) => {
                    KeyState::Vouched(signer.clone(), fingerprint.clone())
                }
                _ => KeyState::Principal(principal),
            };
            result
        }
    }
}

/// A signature written to the scratch dir for `ssh-keygen`, removed when dropped.
struct SigFile(PathBuf);

impl SigFile {
    fn new(scratch: &Path, sig: &[u8]) -> Result<SigFile, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = scratch.join(format!("sig-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, sig)
            .map_err(|e| format!("could not write {}: {e}", path.display()))?;
        Ok(SigFile(path))
    }
}

impl Drop for SigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The first principal `ssh-keygen -Y find-principals` names for the signature's key, or the
/// answer for a key the file does not allow (unknown, or outside its validity).
async fn find_principal(
    allowed_signers: &Path,
    sig_file: &Path,
) -> Result<Result<String, Checked>, String> {
    let find = run(
        "ssh-keygen",
        &[
            "-Y".as_ref(),
            "find-principals".as_ref(),
            "-f".as_ref(),
            allowed_signers.as_os_str(),
            "-s".as_ref(),
            sig_file.as_os_str(),
        ],
        &[],
        None,
    )
    .await?;
    let principal = find.stdout.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned);
    if let Some(principal) = principal.filter(|_| find.success) {
        return Ok(Ok(principal));
    }
    let why = last_line(&find.stderr);
    Ok(Err(if why.contains("not valid") || why.contains("expired") {
        Checked::ExpiredKey(why)
    } else {
        Checked::UnknownKey(if why.is_empty() {
            "no principal in the allowed signers".into()
        } else {
            why
        })
    }))
}

async fn verify_ssh_file(
    allowed_signers: &Path,
    principal: &str,
    sig_file: &Path,
    payload: &[u8],
) -> Result<Checked, String> {
    let verify = run(
        "ssh-keygen",
        &[
            "-Y".as_ref(),
            "verify".as_ref(),
            "-n".as_ref(),
            "git".as_ref(),
            "-f".as_ref(),
            allowed_signers.as_os_str(),
            "-I".as_ref(),
            principal.as_ref(),
            "-s".as_ref(),
            sig_file.as_os_str(),
        ],
        &[],
        Some(payload),
    )
    .await?;
    if !verify.success {
        let why = format!("{} {}", last_line(&verify.stdout), last_line(&verify.stderr));
        let why = why.trim().to_owned();
        return Ok(if why.contains("expired") || why.contains("not yet valid") {
            Checked::ExpiredKey(why)
        } else {
            Checked::BadSignature(why)
        });
    }
    Ok(match good_ssh(&verify.stdout) {
        Some((signer, key)) => Checked::Good { signer, key },
        None => Checked::BadSignature(format!(
            "ssh-keygen accepted the signature but printed no \"Good\" line: {}",
            last_line(&verify.stdout)
        )),
    })
}

/// `(principal, SHA256 fingerprint)` from `ssh-keygen -Y verify`'s
/// `Good "git" signature for P with ED25519 key SHA256:…` line.
pub fn good_ssh(stdout: &str) -> Option<(String, String)> {
    let line = stdout.lines().find(|l| l.starts_with("Good \"git\" signature for "))?;
    let rest = &line["Good \"git\" signature for ".len()..];
    let at = rest.rfind(" with ")?;
    let signer = rest[..at].to_owned();
    let key = rest[at..].split_whitespace().last()?.to_owned();
    Some((signer, key))
}

/// A GnuPG home holding only the trusted keys: `keyring` (armored or binary public keys) is
/// imported into a fresh private home, so the daemon's own keyrings never count. Every `gpg`
/// run has `--no-autostart`: checking public signatures needs no agent, and none is left
/// behind when the home is removed.
pub struct GpgHome {
    dir: ScratchDir,
}

impl GpgHome {
    /// Imports `keyring` into a fresh home. An `Err` names what failed.
    pub async fn new(keyring: &Path) -> Result<GpgHome, String> {
        let dir = ScratchDir::new("kiln-gpg")
            .map_err(|e| format!("could not create a GnuPG home: {e}"))?;
        let ran = run(
            "gpg",
            &[
                "--batch".as_ref(),
                "--no-tty".as_ref(),
                "--no-autostart".as_ref(),
                "--homedir".as_ref(),
                dir.path().as_os_str(),
                "--import".as_ref(),
                keyring.as_os_str(),
            ],
            &[],
            None,
        )
        .await?;
        if !ran.success {
            return Err(format!(
                "gpg could not import the trusted keyring: {}",
                last_line(&ran.stderr)
            ));
        }
        Ok(GpgHome { dir })
    }

    /// Checks an OpenPGP signature over `payload` with `gpg --verify --status-fd 1`. Every key
    /// in the home is trusted (`--trust-model always`: the keyring is the trust list). An
    /// `Err` means gpg could not be run.
    pub async fn check(
        &self,
        sig: &[u8],
        payload: &[u8],
        scratch: &Path,
    ) -> Result<Checked, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let sig_file = scratch.join(format!("gpgsig-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&sig_file, sig)
            .map_err(|e| format!("could not write {}: {e}", sig_file.display()))?;
        let ran = run(
            "gpg",
            &[
                "--batch".as_ref(),
                "--no-tty".as_ref(),
                "--no-autostart".as_ref(),
                "--homedir".as_ref(),
                self.dir.path().as_os_str(),
                "--trust-model".as_ref(),
                "always".as_ref(),
                "--no-auto-key-retrieve".as_ref(),
                "--status-fd".as_ref(),
                "1".as_ref(),
                "--verify".as_ref(),
                sig_file.as_os_str(),
                "-".as_ref(),
            ],
            &[],
            Some(payload),
        )
        .await;
        let _ = std::fs::remove_file(&sig_file);
        Ok(gpg_status(&ran?.stdout))
    }
}

/// Reads `gpg --status-fd` lines (see GnuPG's doc/DETAILS): a good signature needs `GOODSIG`
/// and `VALIDSIG` and none of the bad news (`BADSIG`, `EXPKEYSIG`, `EXPSIG`, `REVKEYSIG`,
/// `ERRSIG`/`NO_PUBKEY`).
pub fn gpg_status(status: &str) -> Checked {
    let mut good_uid = None;
    let mut fingerprint = None;
    let mut bad = None;
    let mut expired = None;
    let mut unknown = None;
    for line in status.lines() {
        let Some(line) = line.strip_prefix("[GNUPG:] ") else { continue };
        let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
        let key_id = rest.split_whitespace().next().unwrap_or("").to_owned();
        let uid = rest.split_once(' ').map(|(_, uid)| uid.to_owned()).unwrap_or_default();
        match keyword {
            "GOODSIG" => good_uid = Some(uid),
            "VALIDSIG" => fingerprint = Some(key_id),
            "BADSIG" => bad = Some(format!("bad signature by key {key_id} ({uid})")),
            "EXPKEYSIG" => expired = Some(format!("key {key_id} ({uid}) has expired")),
            "EXPSIG" => expired = Some(format!("the signature by key {key_id} has expired")),
            "REVKEYSIG" => expired = Some(format!("key {key_id} ({uid}) was revoked")),
            "NO_PUBKEY" => {
                unknown = Some(format!("OpenPGP key {key_id} is not in the trusted keyring"))
            }
            "ERRSIG" if unknown.is_none() => {
                // ERRSIG <keyid> <pkalgo> <hashalgo> <sig_class> <time> <rc> <fpr>: rc 9 is a
                // missing key (NO_PUBKEY follows), anything else a signature gpg cannot check.
                let fields: Vec<&str> = rest.split_whitespace().collect();
                if fields.get(5) == Some(&"9") {
                    unknown = Some(format!("OpenPGP key {key_id} is not in the trusted keyring"));
                } else {
                    bad =
                        bad.or(Some(format!("gpg could not check the signature by key {key_id}")));
                }
            }
            _ => {}
        }
    }
    if let Some(why) = bad {
        return Checked::BadSignature(why);
    }
    if let Some(why) = expired {
        return Checked::ExpiredKey(why);
    }
    if let Some(why) = unknown {
        return Checked::UnknownKey(why);
    }
    match (good_uid, fingerprint) {
        (Some(signer), Some(key)) => Checked::Good { signer, key },
        _ => Checked::BadSignature("gpg reported no good signature".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_good_ssh_line_names_principal_and_key() {
        let line = "Good \"git\" signature for alice@example.com with ED25519 key SHA256:abc+/=\n";
        assert_eq!(good_ssh(line), Some(("alice@example.com".into(), "SHA256:abc+/=".into())));
        assert_eq!(good_ssh("Could not verify signature.\n"), None);
        // Another namespace's line is not a git signature.
        assert_eq!(good_ssh("Good \"file\" signature for a with RSA key SHA256:x\n"), None);
    }

    #[test]
    fn the_public_key_is_read_from_an_sshsig_blob() {
        use base64::Engine as _;
        let mut blob = b"SSHSIG".to_vec();
        blob.extend(1u32.to_be_bytes());
        blob.extend(5u32.to_be_bytes());
        blob.extend(b"KEY42");
        blob.extend(3u32.to_be_bytes());
        blob.extend(b"git");
        let body = base64::engine::general_purpose::STANDARD.encode(&blob);
        let armored = format!(
            "-----BEGIN SSH SIGNATURE-----\n{}\n{}\n-----END SSH SIGNATURE-----\n",
            &body[..10],
            &body[10..]
        );
        assert_eq!(ssh_signature_key(armored.as_bytes()), Some(b"KEY42".to_vec()));
        // Truncated, wrong magic, not base64: no key (the caller asks ssh-keygen instead).
        let short = base64::engine::general_purpose::STANDARD.encode(&blob[..14]);
        assert_eq!(ssh_signature_key(short.as_bytes()), None);
        let other = base64::engine::general_purpose::STANDARD.encode(b"NOTSIG\0\0\0\x01");
        assert_eq!(ssh_signature_key(other.as_bytes()), None);
        assert_eq!(ssh_signature_key(b"-----BEGIN SSH SIGNATURE-----\n!!!\n"), None);
    }

    /// Signs `payload` with `key` as git does (`ssh-keygen -Y sign -n git`).
    fn ssh_sign(key: &Path, payload: &[u8]) -> Vec<u8> {
        let dir = key.parent().unwrap_or(Path::new("."));
        let file = dir.join(format!("payload-{}", fastrand::u64(..)));
        std::fs::write(&file, payload).expect("write payload");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", "git", "-f"])
            .arg(key)
            .arg(&file)
            .stderr(Stdio::null())
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success(), "ssh-keygen -Y sign failed");
        std::fs::read(format!("{}.sig", file.display())).expect("read signature")
    }

    fn ssh_key(dir: &Path, name: &str) -> (PathBuf, String) {
        let private = dir.join(name);
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private)
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        let public = std::fs::read_to_string(format!("{}.pub", private.display())).expect("pub");
        let mut parts = public.split_whitespace();
        let line = format!(
            "{name}@kiln.test {} {}\n",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        (private, line)
    }

    /// The in-process path after `ssh-keygen` vouched for a key: good signatures by the key are
    /// good, a good signature moved onto another payload (a replayed commit signature) or made
    /// for another namespace is not, and a key the file does not name is refused every time.
    #[tokio::test]
    async fn a_vouched_key_s_signatures_are_still_each_checked() {
        if std::process::Command::new("ssh-keygen").arg("-?").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "ssh-keygen is required under CI");
            eprintln!("SKIP: ssh-keygen is not installed");
            return;
        }
        let dir = ScratchDir::new("kiln-signers-test").expect("scratch");
        let (alice, line) = ssh_key(dir.path(), "alice");
        let (mallory, _) = ssh_key(dir.path(), "mallory");
        let allowed = dir.path().join("allowed_signers");
        std::fs::write(&allowed, line).expect("write allowed_signers");
        let principals = Principals::default();
        let check = |sig: Vec<u8>, payload: &'static [u8]| {
            let (allowed, principals, scratch) = (&allowed, &principals, dir.path());
            async move { check_ssh(allowed, principals, &sig, payload, scratch).await }
        };

        let first = check(ssh_sign(&alice, b"tree 1\n"), b"tree 1\n").await.expect("runs");
        let Checked::Good { signer, key } = first else { panic!("{first:?}") };
        assert_eq!(signer, "alice@kiln.test");
        assert!(key.starts_with("SHA256:"), "{key}");
        // Vouched now: the next signatures by alice take the in-process path.
        assert!(matches!(
            principals
                .slot(&ssh_signature_key(&ssh_sign(&alice, b"x")).expect("key"))
                .lock()
                .await
                .clone(),
            KeyState::Vouched(..)
        ));
        let second = check(ssh_sign(&alice, b"tree 2\n"), b"tree 2\n").await.expect("runs");
        assert_eq!(second, Checked::Good { signer: signer.clone(), key: key.clone() });
        // Alice's good signature replayed onto another commit's payload.
        let replayed = check(ssh_sign(&alice, b"tree 2\n"), b"tree 3\n").await.expect("runs");
        assert!(matches!(replayed, Checked::BadSignature(_)), "{replayed:?}");
        // Mallory is not in the file, first time and (answered from the map) second time.
        for payload in [&b"tree 4\n"[..], b"tree 5\n"] {
            let sig = ssh_sign(&mallory, payload);
            let answer = check_ssh(&allowed, &principals, &sig, payload, dir.path()).await;
            assert!(matches!(answer, Ok(Checked::UnknownKey(_))), "{answer:?}");
        }
        // A signature for another namespace by the vouched key is not a git signature.
        let file = dir.path().join("other");
        std::fs::write(&file, b"tree 6\n").expect("write");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", "file", "-f"])
            .arg(&alice)
            .arg(&file)
            .stderr(Stdio::null())
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        let sig = std::fs::read(format!("{}.sig", file.display())).expect("sig");
        assert!(!ssh_signature_valid(&sig, b"tree 6\n"));
        let answer = check_ssh(&allowed, &principals, &sig, b"tree 6\n", dir.path()).await;
        assert!(matches!(answer, Ok(Checked::BadSignature(_))), "{answer:?}");
    }

    #[test]
    fn gpg_status_lines_are_classified() {
        let good = "[GNUPG:] NEWSIG\n[GNUPG:] KEY_CONSIDERED ABCD 0\n[GNUPG:] SIG_ID x 2024 1\n\
                    [GNUPG:] GOODSIG 1122334455667788 Alice <a@x>\n\
                    [GNUPG:] VALIDSIG AAAABBBBCCCCDDDD1122334455667788 2024-01-01 1 0 4 0 22 8 00 AAAABBBBCCCCDDDD1122334455667788\n";
        assert_eq!(
            gpg_status(good),
            Checked::Good {
                signer: "Alice <a@x>".into(),
                key: "AAAABBBBCCCCDDDD1122334455667788".into()
            }
        );
        let bad = "[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 1122334455667788 Alice <a@x>\n";
        assert!(matches!(gpg_status(bad), Checked::BadSignature(_)));
        let expired = "[GNUPG:] EXPKEYSIG 1122334455667788 Alice <a@x>\n\
                       [GNUPG:] VALIDSIG AAAA 2024-01-01 1 0 4 0 22 8 00 AAAA\n";
        assert!(matches!(gpg_status(expired), Checked::ExpiredKey(_)));
        let unknown = "[GNUPG:] ERRSIG 1122334455667788 22 8 00 1700000000 9 -\n\
                       [GNUPG:] NO_PUBKEY 1122334455667788\n";
        assert!(matches!(gpg_status(unknown), Checked::UnknownKey(_)));
        // GOODSIG alone (no VALIDSIG) is not enough.
        assert!(matches!(gpg_status("[GNUPG:] GOODSIG 11 A\n"), Checked::BadSignature(_)));
        // Lines that are not status lines (a hostile uid cannot forge one mid-line) are ignored.
        assert!(matches!(gpg_status("GOODSIG x\nVALIDSIG y\n"), Checked::BadSignature(_)));
    }
}
