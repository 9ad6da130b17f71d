//! What bake and reconcile share: a clean work tree per hook run, hook output turned into
//! rollout events in batches, and git reads off the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::{HookError, HookOutcome, HookSpec, Stream, TRUNCATED_NOTICE};
use crate::model::Revision;
use crate::pipeline::{StepContext, StepError};
use crate::store::{Event, EventKind, Level};

/// Output lines buffered before a forced write; a timer also writes every [`FLUSH_EVERY`].
const BATCH: usize = 512;
/// How often buffered output lines are written while a hook runs.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

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
}

impl Workspace {
    /// Exports `cx.revision` afresh (a leftover from a crashed run is removed first).
    pub async fn export(cx: &StepContext<'_>, name: &str) -> Result<Workspace, StepError> {
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
        let workspace = Workspace { tree, out };
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

/// Turns captured lines into `hook.stdout` / `hook.stderr` events (and the truncation notice into
/// one `hook.truncated` event), written in batches with one flush each.
pub(crate) struct EventSink<'c, 'a> {
    cx: &'c StepContext<'a>,
    pending: Mutex<Vec<Event>>,
}

impl<'c, 'a> EventSink<'c, 'a> {
    pub fn new(cx: &'c StepContext<'a>) -> Self {
        EventSink { cx, pending: Mutex::new(Vec::new()) }
    }

    pub fn line(&self, stream: Stream, line: &str) {
        let (kind, level) = match stream {
            _ if line == TRUNCATED_NOTICE => (EventKind::HookTruncated, Level::Warn),
            Stream::Stdout => (EventKind::HookStdout, Level::Info),
            Stream::Stderr => (EventKind::HookStderr, Level::Info),
        };
        let event = Event::new(self.cx.rollout, level, kind, crate::error::redact(line), None);
        let full = match self.pending.lock() {
            Ok(mut pending) => {
                pending.push(event);
                pending.len() >= BATCH
            }
            Err(_) => false,
        };
        if full {
            self.flush();
        }
    }

    pub fn flush(&self) {
        let mut batch = match self.pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.cx.store.append_events(&mut batch) {
            tracing::warn!(rollout = %self.cx.rollout, error = %crate::error::chain(&error), "Could not record hook output.");
        }
    }
}

/// Runs a hook for a step: retried on exit 75 (each retry is a `hook.retry` event), output into
/// the rollout's events, cancelled by `cx.cancel`.
pub(crate) async fn run_hook(
    cx: &StepContext<'_>,
    spec: &HookSpec,
    out_dir: &Path,
) -> Result<HookOutcome, HookError> {
    let sink = EventSink::new(cx);
    let on_line = |stream: Stream, line: &str| sink.line(stream, line);
    let on_retry = |error: &HookError, wait: Duration| {
        sink.flush();
        cx.event(
            Level::Warn,
            EventKind::HookRetry,
            format!("{error}; retrying in {:.1}s", wait.as_secs_f64()),
        );
    };
    // One record per fleet and step (the name without the hook path): a run a dead daemon left
    // behind is killed before this one starts, so two runs of one step never overlap.
    let step = spec.name.split(" (").next().unwrap_or(&spec.name);
    let record = super::run_record_path(cx.data_dir, step);
    let leftovers = super::kill_leftover(&record).await;
    if leftovers > 0 {
        cx.event(
            Level::Warn,
            EventKind::HookLeftover,
            format!("killed {leftovers} process(es) of an earlier run of `{step}` left running by a daemon that died"),
        );
    }
    let run = super::run_with_retry_recorded(
        spec,
        out_dir,
        Some(&record),
        &on_line,
        cx.cancel,
        &on_retry,
    );
    let mut run = std::pin::pin!(run);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    let res = loop {
        tokio::select! {
            res = &mut run => break res,
            _ = tick.tick() => sink.flush(),
        }
    };
    sink.flush();
    res
}

/// The process environment for a step's hook: the operator's `--hook-env` pairs, then the
/// `KILN_*` inputs (which win over an allowed variable of the same name).
pub(crate) fn hook_env(cx: &StepContext<'_>, inputs: Vec<(&str, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = cx.hook_env.to_vec();
    env.extend(inputs.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env
}

/// `sha256` over length-prefixed parts, hex: unambiguous however the parts are split.
pub(crate) fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}
