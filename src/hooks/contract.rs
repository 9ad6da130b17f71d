//! The hook ABI: environment variable names, files and exit codes (documented in docs/hooks.md).
//!
//! A hook is any executable in the watched repo. kiln runs it in a clean export of the commit
//! with an environment built from scratch: the [`BASE_ENV`] names copied from the daemon, the
//! names the operator allowed with `--hook-env`, and the `KILN_*` inputs below. Nothing else of
//! the daemon's environment (tokens, webhook secrets, cloud credentials) reaches a hook.

/// Exit code meaning "transient, retry me" (sysexits EX_TEMPFAIL).
pub const EXIT_TRANSIENT: i32 = 75;

/// The daemon variables every hook gets (when the daemon has them): enough to find programs,
/// a home directory, a locale and a temp dir. Everything else must be allowed explicitly.
pub const BASE_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];

/// `PATH` given to a hook when the daemon itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The commit being deployed (40 hex digits).
pub const KILN_COMMIT: &str = "KILN_COMMIT";
/// The fleet's name.
pub const KILN_FLEET: &str = "KILN_FLEET";
/// The rollout id (decimal).
pub const KILN_ROLLOUT: &str = "KILN_ROLLOUT";
/// Absolute path of the clean export of the commit; also the hook's working directory.
pub const KILN_WORK_TREE: &str = "KILN_WORK_TREE";
/// Bake: the stage's name.
pub const KILN_STAGE: &str = "KILN_STAGE";
/// Bake: the stage's directory, relative to the work tree (as written in kiln.yaml).
pub const KILN_STAGE_PATH: &str = "KILN_STAGE_PATH";
/// Bake: the git tree id of the stage's directory at the commit.
pub const KILN_TREE_ID: &str = "KILN_TREE_ID";
/// Bake: the image id of the stage this one is built `from` (absent for a root stage).
pub const KILN_PARENT_IMAGE: &str = "KILN_PARENT_IMAGE";
/// Bake: `<data dir>/images`, where directory images for the local provider live.
pub const KILN_IMAGE_STORE: &str = "KILN_IMAGE_STORE";
/// Reconcile: the fleet's image id (the final stage's).
pub const KILN_IMAGE: &str = "KILN_IMAGE";
/// Reconcile: prefix of one variable per stage image, e.g. `KILN_IMAGE_BASE`; see
/// [`stage_image_var`].
pub const KILN_IMAGE_PREFIX: &str = "KILN_IMAGE_";
/// Reconcile: the infra directory, relative to the work tree.
pub const KILN_INFRA_PATH: &str = "KILN_INFRA_PATH";
/// Reconcile: a directory that persists across runs for this fleet (`<data dir>/state/<fleet>`),
/// e.g. for Terraform's local state.
pub const KILN_STATE_DIR: &str = "KILN_STATE_DIR";
/// A key that is the same for every attempt of the same operation (retries, a resumed rollout
/// after a restart) and differs otherwise: bake = the cache key, or for a scheduled rebake a
/// hash of the cache key and the rebake's rollout (a rebake must build anew); reconcile = a hash
/// of fleet, rollout, commit and image. Use it to make side effects idempotent.
pub const KILN_IDEMPOTENCY_KEY: &str = "KILN_IDEMPOTENCY_KEY";
/// Bake: `1` when the bake is a scheduled rebake (the inputs did not change; the image should be
/// rebuilt anyway, e.g. to pick up security updates), absent otherwise.
pub const KILN_REBAKE: &str = "KILN_REBAKE";
/// Reconcile: `apply` (a rollout; also when absent) or `plan` (a drift check: change nothing,
/// exit 0 = no drift, [`EXIT_DRIFT`] = drift, anything else = the check failed).
pub const KILN_MODE: &str = "KILN_MODE";
/// Reconcile in plan mode: the infrastructure differs from what the commit describes.
pub const EXIT_DRIFT: i32 = 2;
/// Reconcile in plan mode: the `$KILN_OUTPUT` key whose value summarises the drift.
pub const OUTPUT_SUMMARY: &str = "summary";

/// Path of an empty file the hook writes its outputs to, as `key=value` lines.
pub const KILN_OUTPUT: &str = "KILN_OUTPUT";
/// A private, empty directory for output files (e.g. `terraform-outputs.json`).
pub const KILN_OUTPUT_DIR: &str = "KILN_OUTPUT_DIR";

/// A value unique to one hook run, set in its environment so that everything the run started
/// (even what left its process group with `setsid`) can be found and killed when it ends, times
/// out, or its daemon died mid-run. A process meant to outlive the hook must not inherit it.
pub const KILN_HOOK_RUN: &str = "KILN_HOOK_RUN";

/// Most bytes of `$KILN_OUTPUT` kiln reads: a larger file fails the hook with a clear error.
pub const OUTPUT_FILE_CAP: u64 = 1024 * 1024;
/// The most kiln reads of any other file a hook leaves for it to parse (a Packer manifest,
/// `terraform output -json`): larger files are an error naming this limit, never read whole.
pub const HOOK_FILE_CAP: u64 = 16 * 1024 * 1024;

/// Output key: the image id a bake produced.
pub const OUTPUT_IMAGE: &str = "image";
/// Output key: path (relative to the work tree, or absolute) of a Packer manifest file.
pub const OUTPUT_MANIFEST: &str = "manifest";
/// File name of a Packer manifest post-processor output looked for at the work tree root.
pub const PACKER_MANIFEST_FILE: &str = "packer-manifest.json";
/// File name of `terraform output -json` looked for in `$KILN_OUTPUT_DIR` (and the work tree's
/// infra directory).
pub const TERRAFORM_OUTPUTS_FILE: &str = "terraform-outputs.json";

/// The per-stage image variable for `stage`: `KILN_IMAGE_` + the name upper-cased with every
/// character outside `[A-Z0-9]` replaced by `_` (`app-base` → `KILN_IMAGE_APP_BASE`).
pub fn stage_image_var(stage: &str) -> String {
    let mut name = String::from(KILN_IMAGE_PREFIX);
    name.extend(
        stage.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }),
    );
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_image_var_is_a_valid_name() {
        assert_eq!(stage_image_var("app-base"), "KILN_IMAGE_APP_BASE");
        assert_eq!(stage_image_var("base"), "KILN_IMAGE_BASE");
    }
}
