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
use crate::store::Level;

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
        "reconcile.start",
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
                "reconcile.done",
                format!("reconciled in {seconds:.1}s ({} outputs)", outputs.len()),
                Some(serde_json::json!({ "outputs": outputs, "seconds": seconds })),
            );
            Ok(outputs)
        }
        Err(error) => {
            cx.event(Level::Error, "reconcile.failed", crate::error::chain(&error));
            Err(error)
        }
    }
}
