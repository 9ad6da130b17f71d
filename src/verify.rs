//! Deploy only what trusted people signed.
//!
//! Before a pushed tip becomes rollouts, [`gate`] checks the signatures of the commits it
//! brings: with `mode: range` every commit reachable from the tip and not from the last
//! deployed commit (merges' second parents included; after a force push, everything since the
//! merge base), with `mode: head` the tip alone. One unsigned or untrusted commit blocks the
//! whole push: a commit-level `failed` record names each bad commit, its author and why
//! (unsigned, unknown key, bad signature, expired key, trust file changed by a signer not
//! allowed to), and no rollout is created, so the fleets are untouched. A signed commit on top
//! does not launder an unsigned one below it: the range starts at the last *deployed* commit
//! until something deploys.
//!
//! Where trust comes from (see docs/security.md):
//! - daemon flags (`kiln run --verify-mode … --verify-ssh-allowed-signers FILE
//!   --verify-gpg-keyring FILE`): files outside the repo; the repo cannot turn them off;
//! - otherwise `verify:` in `kiln.yaml` **at the last deployed commit**, with the trust files
//!   read from that commit. The commit being verified never vouches for itself: a change to
//!   the trust files takes effect once a commit carrying it was verified and deployed. The
//!   first deployment (nothing deployed yet) trusts the tip's own `verify:` (trust on first
//!   use); the daemon flags avoid that.
//!
//! The signatures are checked by `ssh-keygen -Y` and `gpg --verify` (`hooks::signers`); the
//! signature and the signed payload come from git (`source::git::signed_commits`). Results are
//! kept per (commit, trust files) for the process's life, so a range checked at one push is
//! not checked again at the next.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest as _, Sha256};

use crate::hooks::signers::{self, Checked, GpgHome, ScratchDir};
use crate::manifest::{VerifyMode, VerifyPolicy};
use crate::model::Revision;
use crate::rollout::state::{RolloutState, Verified};
use crate::source::git::{self, SignedCommit};
use crate::store::{CommitRecord, Level, Store, StoreError};

/// Largest trust file read (an allowed_signers file or a keyring).
const MAX_TRUST_FILE: u64 = 1024 * 1024;

/// Bad commits named one by one in the failed record's reason (all of them get an event).
const NAMED_IN_REASON: usize = 5;

/// Results kept in the process-wide cache before it is cleared.
const CACHE_LIMIT: usize = 200_000;

/// Signature checks run at once.
const PARALLEL: usize = 8;

/// `verify` settings given to the daemon on its command line: they apply whatever the repo
/// says, and the trust files live outside the repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPolicy {
    /// `head` or `range`.
    pub mode: VerifyMode,
    /// An OpenSSH `allowed_signers` file.
    pub ssh_allowed_signers: Option<PathBuf>,
    /// An OpenPGP keyring (every key in it is trusted).
    pub gpg_keyring: Option<PathBuf>,
}

/// Why one commit may not be deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No signature at all.
    Unsigned,
    /// Signed by a key that is not trusted (or in a format no trust file covers).
    UnknownKey(String),
    /// The signature does not match the commit.
    BadSignature(String),
    /// The key (or signature) has expired or was revoked.
    ExpiredKey(String),
    /// It changes a trust file and its signer is not one of `trustFilesChangedBy`.
    TrustChange {
        /// The trust files it changes.
        paths: Vec<String>,
        /// Who signed it.
        signer: String,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Unsigned => f.write_str("unsigned"),
            Reason::UnknownKey(why) => write!(f, "unknown key ({why})"),
            Reason::BadSignature(why) => write!(f, "bad signature ({why})"),
            Reason::ExpiredKey(why) => write!(f, "expired key ({why})"),
            Reason::TrustChange { paths, signer } => write!(
                f,
                "changes the trust file {} but its signer {signer} is not in trustFilesChangedBy",
                paths.join(", ")
            ),
        }
    }
}

/// A commit that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The commit.
    pub revision: Revision,
    /// Its author.
    pub author: String,
    /// Its first line.
    pub summary: String,
    /// Why it failed.
    pub reason: Reason,
}

/// A good signature by a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// `ssh` or `gpg`.
    pub method: &'static str,
    /// Principal or user id.
    pub signer: String,
    /// Key fingerprint.
    pub key: String,
}

impl Signer {
    fn label(&self) -> String {
        format!("{} {} {}", self.method, self.signer, self.key)
    }
}

/// What verifying a push found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No `verify:` policy applies: deploy as before.
    Off,
    /// Every commit is signed by a trusted key.
    Passed(Verified),
    /// These commits may not be deployed (oldest first).
    Blocked {
        /// How the range was chosen (for the record).
        scope: String,
        /// The bad commits.
        failures: Vec<Failure>,
    },
}

/// What the recorder does with the tip.
#[derive(Debug)]
pub enum Gate {
    /// Create its rollouts, with this verification result stored in them.
    Open(Option<Verified>),
    /// It was blocked (or could not be verified); a failed record says why. No rollouts.
    Closed,
}

/// Errors that stop a check.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The store failed (retried by the recorder).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Git failed reading the commits or the trust files.
    #[error(transparent)]
    Git(#[from] git::GitError),
    /// Anything else: a trust file missing, `ssh-keygen` or `gpg` not runnable.
    #[error("{0}")]
    Other(String),
}

/// The policy in force for one check, with the trust files' contents.
struct Policy {
    mode: VerifyMode,
    ssh: Option<Vec<u8>>,
    gpg: Option<Vec<u8>>,
    changers: Vec<String>,
    /// Repo paths whose change needs a signer in `changers`.
    watched: Vec<String>,
    /// `daemon flags` or `kiln.yaml at <commit>`.
    from: String,
}

/// The gate between a planned tip and its rollouts. Records a failed commit-level entry (with
/// one `verify` event per bad commit) when the push is blocked or cannot be verified; only a
/// store error is returned (the recorder retries the event).
pub async fn gate(
    store: &Store,
    mirror: &Path,
    tip: &CommitRecord,
    daemon: Option<&DaemonPolicy>,
    note: Option<&str>,
) -> Result<Gate, StoreError> {
    let with_note = |reason: String| match note {
        Some(note) => format!("{note}; {reason}"),
        None => reason,
    };
    match check(store, mirror, &tip.revision, daemon).await {
        Ok(Outcome::Off) => Ok(Gate::Open(None)),
        Ok(Outcome::Passed(verified)) => {
            tracing::info!(revision = %tip.revision.short(), commits = verified.commits, signer = %verified.signer, "Signatures verified.");
            Ok(Gate::Open(Some(verified)))
        }
        Ok(Outcome::Blocked { scope, failures }) => {
            let reason = with_note(blocked_reason(&scope, &failures));
            tracing::error!(revision = %tip.revision.short(), "{reason}");
            let rollout =
                crate::operator::record_commit_level(store, tip, RolloutState::Failed, reason)?;
            for failure in &failures {
                store.append_event(
                    rollout.id,
                    Level::Error,
                    crate::store::EventKind::Verify,
                    format!(
                        "{} by {} ({}): {}",
                        failure.revision.short(),
                        failure.author,
                        failure.summary,
                        failure.reason
                    ),
                    Some(serde_json::json!({
                        "commit": failure.revision.0,
                        "author": failure.author,
                        "reason": failure.reason.to_string(),
                    })),
                )?;
            }
            Ok(Gate::Closed)
        }
        Err(VerifyError::Store(error)) => Err(error),
        Err(error) => {
            let reason = with_note(format!(
                "could not verify signatures, nothing deployed: {}",
                crate::error::chain(&error)
            ));
            tracing::error!(revision = %tip.revision.short(), "{reason}");
            crate::operator::record_commit_level(store, tip, RolloutState::Failed, reason)?;
            Ok(Gate::Closed)
        }
    }
}

/// The failed record's reason: how many commits failed, the first few named.
pub fn blocked_reason(scope: &str, failures: &[Failure]) -> String {
    let mut named: Vec<String> = failures
        .iter()
        .take(NAMED_IN_REASON)
        .map(|f| format!("{} by {}: {}", f.revision.short(), f.author, f.reason))
        .collect();
    if failures.len() > NAMED_IN_REASON {
        named.push(format!("and {} more", failures.len() - NAMED_IN_REASON));
    }
    format!(
        "signature verification failed ({scope}), nothing deployed: {} untrusted commit{}: {}",
        failures.len(),
        if failures.len() == 1 { "" } else { "s" },
        named.join("; ")
    )
}

/// The last deployed commit: the newest `deployed` record of any fleet.
fn last_deployed(store: &Store) -> Result<Option<Revision>, StoreError> {
    Ok(store.latest_deployed()?.map(|d| d.revision))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VerifyError> + Send + 'static,
) -> Result<T, VerifyError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VerifyError::Other(format!("verification task failed: {e}")))?
}

/// The `verify:` section of the manifest at `revision` (`None` without one, or without a
/// valid manifest).
fn policy_at(mirror: &Path, revision: &Revision) -> Result<Option<VerifyPolicy>, VerifyError> {
    Ok(match crate::planner::manifest_index_at(mirror, revision)? {
        Some(Ok(index)) => index.manifest().verify.clone(),
        _ => None,
    })
}

/// A trust file at a commit.
fn file_at(mirror: &Path, revision: &Revision, path: &str) -> Result<Vec<u8>, VerifyError> {
    match git::CommitTree::open(mirror, revision)?.read_file_capped(path, MAX_TRUST_FILE)? {
        git::FileAt::Content(bytes) => Ok(bytes),
        git::FileAt::Absent => Err(VerifyError::Other(format!(
            "the trust file {path} is missing at {}",
            revision.short()
        ))),
        git::FileAt::Symlink => Err(VerifyError::Other(format!(
            "the trust file {path} is a symbolic link at {}",
            revision.short()
        ))),
        git::FileAt::TooLarge(size) => Err(VerifyError::Other(format!(
            "the trust file {path} is {size} bytes at {}, over {MAX_TRUST_FILE}",
            revision.short()
        ))),
    }
}

/// The policy for a push to `tip`, given the last deployed commit.
fn policy(
    mirror: &Path,
    tip: &Revision,
    base: Option<&Revision>,
    daemon: Option<&DaemonPolicy>,
) -> Result<Option<Policy>, VerifyError> {
    if let Some(daemon) = daemon {
        let read = |path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, VerifyError> {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| {
                        VerifyError::Other(format!("could not read {}: {e}", p.display()))
                    })
                })
                .transpose()
        };
        return Ok(Some(Policy {
            mode: daemon.mode,
            ssh: read(&daemon.ssh_allowed_signers)?,
            gpg: read(&daemon.gpg_keyring)?,
            changers: Vec::new(),
            watched: Vec::new(),
            from: "daemon flags".into(),
        }));
    }
    // Trust is anchored at the last deployed commit; only the first deployment has nothing
    // but the tip to go by.
    let anchor = base.unwrap_or(tip);
    let Some(spec) = policy_at(mirror, anchor)? else { return Ok(None) };
    let read = |path: &Option<String>| -> Result<Option<Vec<u8>>, VerifyError> {
        path.as_ref().map(|p| file_at(mirror, anchor, p)).transpose()
    };
    let mut watched: BTreeSet<String> =
        [&spec.ssh_allowed_signers, &spec.gpg_keyring].into_iter().flatten().cloned().collect();
    if base.is_some() {
        let at_tip = policy_at(mirror, tip)?;
        if let Some(next) = &at_tip {
            watched.extend(
                [&next.ssh_allowed_signers, &next.gpg_keyring].into_iter().flatten().cloned(),
            );
        }
        // The push changes the policy itself: every commit touching the manifest counts as
        // changing trust.
        if at_tip.as_ref() != Some(&spec) {
            watched.insert(crate::manifest::MANIFEST_FILE.to_owned());
        }
    }
    Ok(Some(Policy {
        mode: spec.mode,
        ssh: read(&spec.ssh_allowed_signers)?,
        gpg: read(&spec.gpg_keyring)?,
        changers: spec.trust_files_changed_by.clone(),
        watched: watched.into_iter().collect(),
        from: format!("kiln.yaml at {}", anchor.short()),
    }))
}

/// Verifies the push of `tip` (see the module docs). The last deployed commit comes from the
/// store.
pub async fn check(
    store: &Store,
    mirror: &Path,
    tip: &Revision,
    daemon: Option<&DaemonPolicy>,
) -> Result<Outcome, VerifyError> {
    let base = last_deployed(store)?;
    let mirror = mirror.to_owned();
    let daemon = daemon.cloned();
    let tip = tip.clone();
    let (policy, commits, since) = blocking(move || {
        if let Some(base) = &base {
            if !git::has_commit(&mirror, base)? {
                // Without it there is no trust anchor and no range: fail closed, unless
                // nothing asks for verification at all.
                if daemon.is_none() && policy_at(&mirror, &tip)?.is_none() {
                    return Ok((None, Vec::new(), None));
                }
                return Err(VerifyError::Other(format!(
                    "the last deployed commit {} is not in the mirror",
                    base.short()
                )));
            }
        }
        let Some(policy) = policy(&mirror, &tip, base.as_ref(), daemon.as_ref())? else {
            return Ok((None, Vec::new(), None));
        };
        let since = match policy.mode {
            VerifyMode::Range => base.filter(|b| b != &tip),
            VerifyMode::Head => None,
        };
        let mut commits = git::signed_commits(&mirror, &tip, since.as_ref(), &policy.watched)?;
        if commits.is_empty() {
            // The tip is the deployed commit or an ancestor of it (a reset): check it alone.
            commits = git::signed_commits(&mirror, &tip, None, &policy.watched)?;
        }
        Ok((Some(policy), commits, since))
    })
    .await?;
    let Some(policy) = policy else { return Ok(Outcome::Off) };
    verify_commits(&policy, commits, since).await
}

/// The trust files on disk for the tools, and the key of their contents for the cache.
struct Trust {
    scratch: ScratchDir,
    ssh: Option<PathBuf>,
    gpg: Option<GpgHome>,
    digest: String,
    principals: signers::Principals,
}

impl Trust {
    async fn new(policy: &Policy) -> Result<Trust, VerifyError> {
        let scratch = ScratchDir::new("kiln-verify")
            .map_err(|e| VerifyError::Other(format!("could not create a scratch dir: {e}")))?;
        let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, VerifyError> {
            let path = scratch.path().join(name);
            std::fs::write(&path, bytes).map_err(|e| {
                VerifyError::Other(format!("could not write {}: {e}", path.display()))
            })?;
            Ok(path)
        };
        let ssh = policy.ssh.as_deref().map(|bytes| write("allowed_signers", bytes)).transpose()?;
        let gpg = match policy.gpg.as_deref() {
            Some(bytes) => {
                let keyring = write("keyring", bytes)?;
                Some(GpgHome::new(&keyring).await.map_err(VerifyError::Other)?)
            }
            None => None,
        };
        let mut hash = Sha256::new();
        for part in [policy.ssh.as_deref(), policy.gpg.as_deref()] {
            let part = part.unwrap_or_default();
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let digest = hex::encode(hash.finalize());
        Ok(Trust { scratch, ssh, gpg, digest, principals: Default::default() })
    }

    /// Checks one commit's signature (`Err`: a tool could not be run).
    async fn check(&self, commit: &SignedCommit) -> Result<Result<Signer, Reason>, String> {
        let Some((signature, payload)) = &commit.signature else {
            return Ok(Err(Reason::Unsigned));
        };
        let text = String::from_utf8_lossy(signature);
        let text = text.trim_start();
        let (method, checked) = if text.starts_with("-----BEGIN SSH SIGNATURE-----") {
            let Some(allowed) = &self.ssh else {
                return Ok(Err(Reason::UnknownKey(
                    "an SSH signature, and no sshAllowedSigners is trusted".into(),
                )));
            };
            let checked = signers::check_ssh(
                allowed,
                &self.principals,
                signature,
                payload,
                self.scratch.path(),
            );
            ("ssh", checked.await?)
        } else if text.starts_with("-----BEGIN PGP SIGNATURE-----") {
            let Some(home) = &self.gpg else {
                return Ok(Err(Reason::UnknownKey(
                    "an OpenPGP signature, and no gpgKeyring is trusted".into(),
                )));
            };
            ("gpg", home.check(signature, payload, self.scratch.path()).await?)
        } else {
            return Ok(Err(Reason::UnknownKey("a signature format kiln does not check".into())));
        };
        Ok(match checked {
            Checked::Good { signer, key } => Ok(Signer { method, signer, key }),
            Checked::UnknownKey(why) => Err(Reason::UnknownKey(why)),
            Checked::BadSignature(why) => Err(Reason::BadSignature(why)),
            Checked::ExpiredKey(why) => Err(Reason::ExpiredKey(why)),
        })
    }
}

type Cache = Mutex<HashMap<(String, Revision), Result<Signer, Reason>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// Checks every commit (in parallel, cached per trust files) and applies the
/// `trustFilesChangedBy` rule.
async fn verify_commits(
    policy: &Policy,
    commits: Vec<SignedCommit>,
    since: Option<Revision>,
) -> Result<Outcome, VerifyError> {
    let scope = match &since {
        Some(base) => format!(
            "{} commits since the deployed {}, trust from {}",
            commits.len(),
            base.short(),
            policy.from
        ),
        None => format!("the tip alone, trust from {}", policy.from),
    };
    let trust = Arc::new(Trust::new(policy).await?);
    let mut results: Vec<Option<Result<Signer, Reason>>> = vec![None; commits.len()];
    let mut todo = Vec::new();
    if let Ok(cache) = cache().lock() {
        for (i, commit) in commits.iter().enumerate() {
            match cache.get(&(trust.digest.clone(), commit.revision.clone())) {
                Some(result) => results[i] = Some(result.clone()),
                None => todo.push(i),
            }
        }
    } else {
        todo.extend(0..commits.len());
    }
    let commits = Arc::new(commits);
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for i in todo {
        let (trust, commits, slots) = (trust.clone(), commits.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            (i, trust.check(&commits[i]).await)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, result) =
            joined.map_err(|e| VerifyError::Other(format!("verification task failed: {e}")))?;
        let result = result.map_err(VerifyError::Other)?;
        if let Ok(mut cache) = cache().lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert((trust.digest.clone(), commits[i].revision.clone()), result.clone());
        }
        results[i] = Some(result);
    }
    let mut failures = Vec::new();
    let mut signers = BTreeSet::new();
    let mut tip_signer = None;
    for (commit, result) in commits.iter().zip(results) {
        let result = result.unwrap_or(Err(Reason::BadSignature("not checked".into())));
        let result = result.and_then(|signer| match trust_change(policy, commit, &signer) {
            Some(reason) => Err(reason),
            None => Ok(signer),
        });
        match result {
            Ok(signer) => {
                signers.insert(signer.label());
                tip_signer = Some(signer);
            }
            Err(reason) => {
                tip_signer = None;
                failures.push(Failure {
                    revision: commit.revision.clone(),
                    author: commit.author.clone(),
                    summary: commit.summary.clone(),
                    reason,
                });
            }
        }
    }
    if !failures.is_empty() {
        return Ok(Outcome::Blocked { scope, failures });
    }
    let Some(tip) = tip_signer else {
        return Err(VerifyError::Other("no commit to verify".into()));
    };
    Ok(Outcome::Passed(Verified {
        mode: policy.mode.as_str().to_owned(),
        policy: policy.from.clone(),
        since,
        commits: commits.len(),
        method: tip.method.to_owned(),
        signer: tip.signer,
        key: tip.key,
        signers: signers.into_iter().collect(),
    }))
}

/// The `trustFilesChangedBy` rule for one well-signed commit (pure): a commit that changes a
/// watched file must be signed by a listed principal, user id or key fingerprint.
fn trust_change(policy: &Policy, commit: &SignedCommit, signer: &Signer) -> Option<Reason> {
    if policy.changers.is_empty() || commit.changed.is_empty() {
        return None;
    }
    let allowed = policy.changers.iter().any(|who| {
        who == &signer.signer || who.eq_ignore_ascii_case(&signer.key) || who == &signer.label()
    });
    (!allowed).then(|| Reason::TrustChange {
        paths: commit.changed.clone(),
        signer: format!("{} ({} {})", signer.signer, signer.method, signer.key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(changers: &[&str]) -> Policy {
        Policy {
            mode: VerifyMode::Range,
            ssh: None,
            gpg: None,
            changers: changers.iter().map(|s| s.to_string()).collect(),
            watched: vec![".kiln/allowed_signers".into()],
            from: "test".into(),
        }
    }

    fn commit(changed: &[&str]) -> SignedCommit {
        SignedCommit {
            revision: Revision("a".repeat(40)),
            author: "A <a@x>".into(),
            summary: "s".into(),
            signature: None,
            changed: changed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn signer(name: &str) -> Signer {
        Signer { method: "ssh", signer: name.into(), key: "SHA256:k".into() }
    }

    #[test]
    fn only_listed_signers_change_trust_files() {
        let changed = commit(&[".kiln/allowed_signers"]);
        assert_eq!(trust_change(&policy(&["admin@x"]), &changed, &signer("admin@x")), None);
        assert!(matches!(
            trust_change(&policy(&["admin@x"]), &changed, &signer("dev@x")),
            Some(Reason::TrustChange { .. })
        ));
        // By key fingerprint too.
        assert_eq!(trust_change(&policy(&["sha256:K"]), &changed, &signer("dev@x")), None);
        // No list: any trusted signer may; no change: nothing to check.
        assert_eq!(trust_change(&policy(&[]), &changed, &signer("dev@x")), None);
        assert_eq!(trust_change(&policy(&["admin@x"]), &commit(&[]), &signer("dev@x")), None);
    }

    #[test]
    fn the_reason_names_each_bad_commit_and_counts_the_rest() {
        let failures: Vec<Failure> = (0..7)
            .map(|i| Failure {
                revision: Revision(format!("{i}").repeat(40)),
                author: format!("Dev {i} <d{i}@x>"),
                summary: "s".into(),
                reason: if i == 0 { Reason::Unsigned } else { Reason::UnknownKey("k".into()) },
            })
            .collect();
        let reason = blocked_reason("3 commits since the deployed abc", &failures);
        assert!(reason.contains("7 untrusted commits"), "{reason}");
        assert!(reason.contains("00000000 by Dev 0 <d0@x>: unsigned"), "{reason}");
        assert!(reason.contains("and 2 more"), "{reason}");
        assert!(!reason.contains("Dev 6"), "{reason}");
        let one = blocked_reason("the tip alone", &failures[..1]);
        assert!(one.contains("1 untrusted commit:"), "{one}");
    }
}
