//! The commit exported for one hook run (a clean work tree and its output dir under
//! `<data dir>/work/`), and git reads off the async runtime.

use std::path::{Path, PathBuf};

use super::{StepContext, StepError};
use crate::model::Revision;

/// Runs a blocking `source::git` read on the blocking pool.
pub(crate) async fn git<T, F>(cx: &StepContext<'_>, read: F) -> Result<T, StepError>
where
    T: Send + 'static,
    F: FnOnce(&Path, &Revision) -> Result<T, crate::source::git::GitError> + Send + 'static,
{
    let mirror = cx.mirror.to_owned();
    let revision = cx.revision.clone();
    tokio::task::spawn_blocking(move || read(&mirror, &revision))
        .await
        .map_err(|e| StepError::Other(format!("git read task failed: {e}")))?
        .map_err(StepError::from)
}

/// A clean export of the commit for one hook run, and the hook's output directory next to it.
/// Never the daemon's own clone: a hook can scribble over its tree without consequence.
pub(crate) struct Workspace {
    /// `<data dir>/work/<rollout>-<name>`: the export, the hook's working directory.
    pub tree: PathBuf,
    /// `<data dir>/work/<rollout>-<name>.out`: `$KILN_OUTPUT_DIR`.
    pub out: PathBuf,
    /// The step's pipeline slot, held until the workspace is removed.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Workspace {
    /// Takes a pipeline slot (waiting, recorded, while all are in use), then exports
    /// `cx.revision` afresh (a leftover from a crashed run is removed first).
    pub async fn export(cx: &StepContext<'_>, name: &str) -> Result<Workspace, StepError> {
        let slot = match cx.slots.try_acquire() {
            Some(slot) => Some(slot),
            None => {
                let message = format!(
                    "{name}: waiting for a pipeline slot ({} steps run at once across fleets; `kiln run --jobs`)",
                    cx.slots.size()
                );
                tracing::info!(rollout = %cx.rollout, fleet = %cx.fleet.name, "{message}");
                if cx.rollout.0 != 0 {
                    cx.event(crate::store::Level::Info, crate::store::EventKind::Rollout, message);
                }
                tokio::select! {
                    slot = cx.slots.acquire() => slot,
                    () = cx.cancel.cancelled() => {
                        return Err(StepError::Hook(crate::hooks::HookError::Cancelled {
                            name: name.to_owned(),
                        }));
                    }
                }
            }
        };
        let work = cx.data_dir.join("work");
        // `name` comes from the manifest: joined so that it can never leave the work dir.
        let join = |file: String| {
            crate::fsutil::safe_join(&work, file)
                .map_err(|e| StepError::Other(format!("unsafe work dir name `{name}`: {e}")))
        };
        let tree = join(format!("{}-{name}", cx.rollout))?;
        let out = join(format!("{}-{name}.out", cx.rollout))?;
        let io =
            |action: String| move |e: std::io::Error| StepError::Other(format!("{action}: {e}"));
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(io(format!("failed to create {}", work.display())))?;
        remove_dir(&tree).await.map_err(io(format!("failed to remove {}", tree.display())))?;
        let dest = tree.clone();
        let exported =
            git(cx, move |mirror, revision| crate::source::git::export(mirror, revision, &dest))
                .await;
        let workspace = Workspace { tree, out, _slot: slot };
        if let Err(error) = exported {
            // A half-written export must not linger in the data dir.
            workspace.remove().await;
            return Err(error);
        }
        Ok(workspace)
    }

    /// Removes the export and the output directory; failures are logged, not fatal.
    pub async fn remove(self) {
        for dir in [&self.tree, &self.out] {
            if let Err(error) = remove_dir(dir).await {
                tracing::warn!(dir = %dir.display(), error = %error, "Could not remove a hook work tree.");
            }
        }
    }
}

async fn remove_dir(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
