//! Running the reconcile hook with the image id.
//!
//! The infra hook (typically `terraform apply`, see `hooks/reconcile-terraform`) runs in a clean
//! export of the commit with the fleet's image in `KILN_IMAGE` and every stage's image in
//! `KILN_IMAGE_<STAGE>`. Its outputs (`key=value` lines, or `terraform output -json` in
//! `$KILN_OUTPUT` or in `$KILN_OUTPUT_DIR/terraform-outputs.json`) are returned to the driver,
//! which stores them on the rollout. A failed reconcile is an error: the driver stops there and
//! the running fleet is left untouched.

use std::collections::BTreeMap;

use crate::hooks::contract as abi;
use crate::hooks::{HookError, HookSpec, output};
use crate::model::ImageRef;
use crate::pipeline::{self, StepContext, StepError, Workspace};
use crate::store::{EventKind, Level};

/// Runs `cx.fleet`'s reconcile hook with `image` (and the stage images) in its environment;
/// returns its outputs (`key=value` or `terraform output -json` shape, flattened). A fleet
/// without `infra` has nothing to reconcile and gets no outputs.
pub async fn reconcile_fleet(
    cx: &StepContext<'_>,
    image: &ImageRef,
    stage_images: &BTreeMap<String, ImageRef>,
) -> Result<BTreeMap<String, String>, StepError> {
    let Some(infra) = &cx.fleet.infra else {
        return Ok(BTreeMap::new());
    };
    let started = tokio::time::Instant::now();
    let fleet = &cx.fleet.name;
    let hook_path = infra.reconcile.clone();
    let exists =
        pipeline::git(cx, move |m, r| crate::source::git::file_mode(m, r, &hook_path)).await?;
    if exists.is_none() {
        return Err(StepError::Other(format!(
            "fleet `{fleet}`: reconcile hook `{}` does not exist at commit {}",
            infra.reconcile,
            cx.revision.short()
        )));
    }
    let key = pipeline::digest(&[
        b"kiln-reconcile-v1",
        fleet.as_bytes(),
        cx.rollout.to_string().as_bytes(),
        cx.revision.as_str().as_bytes(),
        image.as_str().as_bytes(),
    ]);
    cx.event_with(
        Level::Info,
        EventKind::ReconcileStart,
        format!("reconciling with {} (image {image})", infra.reconcile),
        Some(
            serde_json::json!({ "hook": infra.reconcile, "image": image, "stages": stage_images }),
        ),
    );

    let res = async {
        let state_dir = crate::fsutil::safe_join(&cx.data_dir.join("state"), fleet)
            .map_err(|e| StepError::Other(format!("state dir of fleet {fleet}: {e}")))?;
        tokio::fs::create_dir_all(&state_dir).await.map_err(|e| {
            StepError::Other(format!("failed to create {}: {e}", state_dir.display()))
        })?;
        let workspace = Workspace::export(cx, "reconcile").await?;
        let infra_path = infra.path.trim_end_matches('/').to_owned();
        let inputs = vec![
            (abi::KILN_COMMIT, cx.revision.to_string()),
            (abi::KILN_FLEET, fleet.clone()),
            (abi::KILN_ROLLOUT, cx.rollout.to_string()),
            (abi::KILN_WORK_TREE, workspace.tree.display().to_string()),
            (abi::KILN_INFRA_PATH, infra_path.clone()),
            (abi::KILN_STATE_DIR, state_dir.display().to_string()),
            (abi::KILN_IMAGE, image.to_string()),
            (abi::KILN_IDEMPOTENCY_KEY, key.clone()),
            (abi::KILN_MODE, "apply".to_owned()),
        ];
        let mut env = pipeline::hook_env(cx, inputs);
        env.extend(
            stage_images
                .iter()
                .map(|(stage, image)| (abi::stage_image_var(stage), image.to_string())),
        );
        let joined = |path: &str, what: &str| {
            crate::fsutil::safe_join(&workspace.tree, path)
                .map_err(|e| StepError::Other(format!("{what} of fleet {fleet}: {e}")))
        };
        let (program, infra_dir) =
            match (joined(&infra.reconcile, "reconcile hook"), joined(&infra_path, "infra path")) {
                (Ok(program), Ok(infra_dir)) => (program, infra_dir),
                (Err(error), _) | (_, Err(error)) => {
                    workspace.remove().await;
                    return Err(error);
                }
            };
        let spec = HookSpec {
            name: format!("reconcile {fleet} ({})", infra.reconcile),
            program,
            args: Vec::new(),
            workdir: workspace.tree.clone(),
            env,
            timeout: infra.timeout,
            stdin: None,
        };
        let res = async {
            let outcome = pipeline::run_hook(cx, &spec, &workspace.out).await?;
            // `terraform output -json` left in the output dir (or the infra dir) first; explicit
            // `$KILN_OUTPUT` lines override it.
            let mut outputs = BTreeMap::new();
            for file in [
                workspace.out.join(abi::TERRAFORM_OUTPUTS_FILE),
                infra_dir.join(abi::TERRAFORM_OUTPUTS_FILE),
            ] {
                let bytes = match output::read_hook_file(&file).await {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => continue,
                    Err(why) => {
                        return Err(HookError::BadOutput {
                            name: spec.name.clone(),
                            message: format!("left a {} that {why}", abi::TERRAFORM_OUTPUTS_FILE),
                        }
                        .into());
                    }
                };
                let flat = serde_json::from_slice(&bytes)
                    .ok()
                    .and_then(|value| output::flatten_terraform(&value))
                    .ok_or_else(|| HookError::BadOutput {
                        name: spec.name.clone(),
                        message: format!(
                            "wrote a {} that is not `terraform output -json`",
                            abi::TERRAFORM_OUTPUTS_FILE
                        ),
                    })?;
                outputs.extend(flat);
                break;
            }
            outputs.extend(outcome.outputs);
            Ok::<_, StepError>(outputs)
        }
        .await;
        workspace.remove().await;
        res
    }
    .await;

    let seconds = started.elapsed().as_secs_f64();
    cx.metrics.reconcile(fleet, seconds);
    match res {
        Ok(outputs) => {
            cx.event_with(
                Level::Info,
                EventKind::ReconcileDone,
                format!("reconciled in {seconds:.1}s ({} outputs)", outputs.len()),
                Some(serde_json::json!({ "outputs": outputs, "seconds": seconds })),
            );
            Ok(outputs)
        }
        Err(error) => {
            cx.event(Level::Error, EventKind::ReconcileFailed, crate::error::chain(&error));
            Err(error)
        }
    }
}

/// What the reconcile hook said in plan mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanOutcome {
    /// Exit 0: the infrastructure is what the commit describes.
    NoDrift,
    /// Exit [`abi::EXIT_DRIFT`]: it differs; `summary` is the hook's `summary=` output or the
    /// last lines it printed.
    Drift {
        /// What differs, in the hook's words.
        summary: String,
    },
}

/// How many output lines a plan run keeps for its summary.
const PLAN_TAIL: usize = 20;

/// Runs `cx.fleet`'s reconcile hook in plan mode (`KILN_MODE=plan`): it must change nothing and
/// exit 0 (no drift) or 2 (drift). `None` for a fleet without `infra`. The run's output is not
/// written to any rollout (`cx.rollout` only names its work dir); the caller records the
/// outcome. `cx.cancel` kills the hook; a later apply of the same fleet kills it too (both share
/// the step's run record).
pub async fn plan_fleet(
    cx: &StepContext<'_>,
    image: &ImageRef,
) -> Result<Option<PlanOutcome>, StepError> {
    let Some(infra) = &cx.fleet.infra else {
        return Ok(None);
    };
    let fleet = &cx.fleet.name;
    let hook_path = infra.reconcile.clone();
    let exists =
        pipeline::git(cx, move |m, r| crate::source::git::file_mode(m, r, &hook_path)).await?;
    if exists.is_none() {
        return Err(StepError::Other(format!(
            "fleet `{fleet}`: reconcile hook `{}` does not exist at commit {}",
            infra.reconcile,
            cx.revision.short()
        )));
    }
    let state_dir = crate::fsutil::safe_join(&cx.data_dir.join("state"), fleet)
        .map_err(|e| StepError::Other(format!("state dir of fleet {fleet}: {e}")))?;
    tokio::fs::create_dir_all(&state_dir)
        .await
        .map_err(|e| StepError::Other(format!("failed to create {}: {e}", state_dir.display())))?;
    let workspace = Workspace::export(cx, &format!("plan-{fleet}")).await?;
    let infra_path = infra.path.trim_end_matches('/').to_owned();
    let inputs = vec![
        (abi::KILN_COMMIT, cx.revision.to_string()),
        (abi::KILN_FLEET, fleet.clone()),
        (abi::KILN_WORK_TREE, workspace.tree.display().to_string()),
        (abi::KILN_INFRA_PATH, infra_path),
        (abi::KILN_STATE_DIR, state_dir.display().to_string()),
        (abi::KILN_IMAGE, image.to_string()),
        (abi::KILN_MODE, "plan".to_owned()),
    ];
    let env = pipeline::hook_env(cx, inputs);
    let program = match crate::fsutil::safe_join(&workspace.tree, &infra.reconcile) {
        Ok(program) => program,
        Err(e) => {
            workspace.remove().await;
            return Err(StepError::Other(format!("reconcile hook of fleet {fleet}: {e}")));
        }
    };
    // A hook written before plan mode existed ignores `KILN_MODE` and would apply: only a hook
    // that mentions `KILN_MODE` (a script, or a binary with the name in it) is run to plan.
    if !mentions_plan_mode(&program).await {
        workspace.remove().await;
        return Err(StepError::Other(format!(
            "fleet `{fleet}`: reconcile hook `{}` never mentions KILN_MODE, so it cannot be run in plan mode without applying; infra drift is not checked (see docs/hooks.md, plan mode)",
            infra.reconcile
        )));
    }
    let spec = HookSpec {
        // The same step as an apply (`reconcile <fleet>`): one run record, so an apply that
        // starts kills a plan still running, and the other way round never happens (drift is
        // only checked on an idle fleet).
        name: format!("reconcile {fleet} ({}, plan)", infra.reconcile),
        program,
        args: Vec::new(),
        workdir: workspace.tree.clone(),
        env,
        timeout: infra.timeout,
        stdin: None,
    };
    let tail = std::sync::Mutex::new(std::collections::VecDeque::with_capacity(PLAN_TAIL));
    let on_line = |_: crate::hooks::Stream, line: &str| {
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == PLAN_TAIL {
                tail.pop_front();
            }
            tail.push_back(crate::error::redact(line));
        }
    };
    let record = crate::hooks::run_record_path(cx.data_dir, &format!("reconcile {fleet}"));
    crate::hooks::kill_leftover(&record).await;
    let res = crate::hooks::run_with_retry_recorded(
        &spec,
        &workspace.out,
        Some(&record),
        &on_line,
        cx.cancel,
        &|_, _| {},
    )
    .await;
    let outcome = match res {
        Ok(_) => Ok(Some(PlanOutcome::NoDrift)),
        Err(HookError::Exited { code: abi::EXIT_DRIFT, .. }) => {
            let outputs = output::read_output_file(&workspace.out.join("output"))
                .await
                .ok()
                .and_then(|text| output::parse_outputs(&text).ok())
                .unwrap_or_default();
            let summary = match outputs.get(abi::OUTPUT_SUMMARY) {
                Some(summary) => crate::error::redact(summary),
                None => {
                    let lines: Vec<String> =
                        tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
                    lines.join("\n")
                }
            };
            Ok(Some(PlanOutcome::Drift { summary }))
        }
        Err(error) => Err(StepError::Hook(error)),
    };
    workspace.remove().await;
    outcome
}

/// Whether the hook file names `KILN_MODE` (read up to 4 MiB; an unreadable file does not).
async fn mentions_plan_mode(program: &std::path::Path) -> bool {
    use tokio::io::AsyncReadExt as _;
    const MAX: u64 = 4 << 20;
    let Ok(file) = tokio::fs::File::open(program).await else { return false };
    let mut bytes = Vec::new();
    if file.take(MAX).read_to_end(&mut bytes).await.is_err() {
        return false;
    }
    bytes.windows(b"KILN_MODE".len()).any(|w| w == b"KILN_MODE")
}
