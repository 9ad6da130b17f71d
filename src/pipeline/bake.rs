//! Baking a fleet's image stages through their hooks, with the cache.
//!
//! Stages bake in dependency order (`from:`), each in a clean export of the commit. A stage's
//! cache key is a hash of its inputs: the git tree id of its directory, its parent stage's image
//! id and the bake hook's own content (plus the fleet and stage names, which the hook sees). A
//! key already in the store is a hit: the stage is not rebaked and its cached image is used, so
//! a commit that only touches the app stage rebakes the app on the cached base, and a commit
//! elsewhere in the repo rebakes nothing.

use std::collections::BTreeMap;
use std::path::Path;

use crate::hooks::contract as abi;
use crate::hooks::{HookError, HookOutcome, HookSpec, packer};
use crate::manifest::{Fleet, Stage};
use crate::model::{ImageRef, Timestamp};
use crate::pipeline::{self, StepContext, StepError, Workspace};
use crate::store::{BakeRecord, EventKind, Level, Store};

/// The result of baking all of a fleet's stages.
#[derive(Debug, Clone)]
pub struct Baked {
    /// The fleet's image (the final stage's).
    pub image: ImageRef,
    /// Every stage's image.
    pub stage_images: BTreeMap<String, ImageRef>,
}

/// How to bake.
#[derive(Debug, Clone, Copy, Default)]
pub struct BakeOptions {
    /// Ignore the cache and bake every stage (scheduled rebakes pick up security updates this
    /// way); the new images replace the cached ones.
    pub force: bool,
}

/// Bakes every stage of `cx.fleet` at `cx.revision` in dependency order; a stage whose cache key
/// is known is a hit and is not rebaked. Records events on `cx.rollout`.
pub async fn bake_fleet(cx: &StepContext<'_>) -> Result<Baked, StepError> {
    bake_fleet_with(cx, BakeOptions::default()).await
}

/// [`bake_fleet`] with options (e.g. `force` for a scheduled rebake).
pub async fn bake_fleet_with(
    cx: &StepContext<'_>,
    options: BakeOptions,
) -> Result<Baked, StepError> {
    let fleet = cx.fleet;
    let final_stage = fleet
        .final_stage()
        .ok_or_else(|| StepError::Other(format!("fleet `{}` has no image stages", fleet.name)))?;
    let mut stage_images: BTreeMap<String, ImageRef> = BTreeMap::new();
    for stage in fleet.stages_in_order() {
        let parent = match &stage.from {
            Some(parent) => Some(stage_images.get(parent).cloned().ok_or_else(|| {
                StepError::Other(format!(
                    "stage `{}` of fleet `{}` builds from `{parent}`, which is not a stage",
                    stage.name, fleet.name
                ))
            })?),
            None => None,
        };
        let image = bake_stage(cx, stage, parent.as_ref(), options).await?;
        stage_images.insert(stage.name.clone(), image);
    }
    let image = stage_images.get(&final_stage.name).cloned().ok_or_else(|| {
        StepError::Other(format!("fleet `{}`: final stage was not baked", fleet.name))
    })?;
    Ok(Baked { image, stage_images })
}

/// The cache key of a stage: sha256 over the fleet and stage names, the git tree id of the
/// stage's directory, the parent stage's image id (empty for a root stage) and the bake hook's
/// content.
pub fn cache_key(
    fleet: &str,
    stage: &str,
    tree_id: &str,
    parent: Option<&ImageRef>,
    hook: &[u8],
) -> String {
    pipeline::digest(&[
        b"kiln-bake-v1",
        fleet.as_bytes(),
        stage.as_bytes(),
        tree_id.as_bytes(),
        parent.map_or(&b""[..], |p| p.as_str().as_bytes()),
        hook,
    ])
}

/// Whether `fleet` is due a scheduled rebake at `now`: it has `image.rebake` set and its final
/// image (the deployed one if it was baked here, else the newest bake of the final stage) was
/// baked longer ago than that. Nothing baked yet means not due (the next commit bakes).
pub fn rebake_due(store: &Store, fleet: &Fleet, now: Timestamp) -> bool {
    let (Some(interval), Some(final_stage)) = (fleet.image.rebake, fleet.final_stage()) else {
        return false;
    };
    let bakes = match store.bakes() {
        Ok(bakes) => bakes,
        Err(error) => {
            tracing::warn!(fleet = %fleet.name, error = %crate::error::chain(&error), "Could not read the bake cache.");
            return false;
        }
    };
    let finals: Vec<&BakeRecord> =
        bakes.iter().filter(|b| b.fleet == fleet.name && b.stage == final_stage.name).collect();
    let deployed = store.deployed(&fleet.name).ok().flatten();
    let newest = |records: &mut dyn Iterator<Item = &&BakeRecord>| {
        records.max_by_key(|b| b.baked_at).map(|b| b.baked_at)
    };
    let baked_at = deployed
        .and_then(|d| newest(&mut finals.iter().filter(|b| b.image == d.image)))
        .or_else(|| newest(&mut finals.iter()));
    baked_at
        .is_some_and(|at| now.signed_duration_since(at).to_std().is_ok_and(|age| age >= interval))
}

async fn bake_stage(
    cx: &StepContext<'_>,
    stage: &Stage,
    parent: Option<&ImageRef>,
    options: BakeOptions,
) -> Result<ImageRef, StepError> {
    let started = tokio::time::Instant::now();
    let fleet = &cx.fleet.name;
    let path = stage.path.trim_end_matches('/').to_owned();
    let lookup = path.clone();
    let tree_id = pipeline::git(cx, move |m, r| crate::source::git::tree_id(m, r, &lookup))
        .await?
        .ok_or_else(|| {
            StepError::Other(format!(
                "stage `{}` of fleet `{fleet}`: path `{}` does not exist at commit {}",
                stage.name,
                stage.path,
                cx.revision.short()
            ))
        })?;
    let hook_path = stage.bake.clone();
    let hook = pipeline::git(cx, move |m, r| crate::source::git::read_file(m, r, &hook_path))
        .await?
        .ok_or_else(|| {
            StepError::Other(format!(
                "stage `{}` of fleet `{fleet}`: bake hook `{}` does not exist at commit {}",
                stage.name,
                stage.bake,
                cx.revision.short()
            ))
        })?;
    let key = cache_key(fleet, &stage.name, &tree_id, parent, &hook);
    // A scheduled rebake has the inputs of a cached bake and must still build anew: the hook
    // gets a key of its own (stable for this rollout's retries and resumes), and the image it
    // had before, to tell a real rebuild from a hook that returned its earlier output.
    let (hook_key, before) = if options.force {
        let epoch = cx.rollout.to_string();
        let hook_key = pipeline::digest(&[b"kiln-rebake-v1", key.as_bytes(), epoch.as_bytes()]);
        (hook_key, cx.store.bake(&key)?.map(|b| b.image))
    } else {
        (key.clone(), None)
    };

    if !options.force {
        if let Some(hit) = cx.store.bake(&key)? {
            cx.event_with(
                Level::Info,
                EventKind::BakeCached,
                format!(
                    "stage {}: cache hit, image {} (baked from {})",
                    stage.name,
                    hit.image,
                    hit.revision.short()
                ),
                Some(serde_json::json!({
                    "stage": stage.name, "key": key, "image": hit.image,
                    "revision": hit.revision, "baked_at": hit.baked_at,
                })),
            );
            cx.metrics.bake(fleet, started.elapsed().as_secs_f64());
            return Ok(hit.image);
        }
    }

    cx.event_with(
        Level::Info,
        EventKind::BakeStart,
        format!("stage {}: baking with {}", stage.name, stage.bake),
        Some(serde_json::json!({
            "stage": stage.name, "key": key, "tree": tree_id, "parent": parent,
            "hook": stage.bake, "forced": options.force,
        })),
    );
    let res = async {
        let workspace = Workspace::export(cx, &stage.name).await?;
        let res =
            run_bake_hook(cx, stage, parent, &tree_id, &hook_key, options.force, &workspace).await;
        workspace.remove().await;
        res
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    cx.metrics.bake(fleet, seconds);
    match res {
        Ok((image, outputs)) => {
            if before.as_ref() == Some(&image) {
                cx.event_with(
                    Level::Warn,
                    EventKind::BakeDone,
                    format!(
                        "stage {}: the rebake produced the same image {image} as before: the \
                         hook returned its earlier output, so nothing new will be deployed \
                         (a rebake gets a fresh KILN_IDEMPOTENCY_KEY and KILN_REBAKE=1; see \
                         docs/hooks.md)",
                        stage.name
                    ),
                    Some(serde_json::json!({
                        "stage": stage.name, "key": key, "image": image, "unchanged": true,
                    })),
                );
            }
            cx.store.put_bake(&BakeRecord {
                key: key.clone(),
                fleet: fleet.clone(),
                stage: stage.name.clone(),
                image: image.clone(),
                revision: cx.revision.clone(),
                rollout: cx.rollout,
                baked_at: crate::model::now(),
                outputs,
            })?;
            cx.event_with(
                Level::Info,
                EventKind::BakeDone,
                format!("stage {}: image {image} in {seconds:.1}s", stage.name),
                Some(serde_json::json!({
                    "stage": stage.name, "key": key, "image": image, "seconds": seconds,
                })),
            );
            Ok(image)
        }
        Err(error) => {
            cx.event_with(
                Level::Error,
                EventKind::BakeFailed,
                format!("stage {}: {}", stage.name, crate::error::chain(&error)),
                Some(serde_json::json!({ "stage": stage.name, "key": key })),
            );
            Err(error)
        }
    }
}

async fn run_bake_hook(
    cx: &StepContext<'_>,
    stage: &Stage,
    parent: Option<&ImageRef>,
    tree_id: &str,
    key: &str,
    rebake: bool,
    workspace: &Workspace,
) -> Result<(ImageRef, BTreeMap<String, String>), StepError> {
    let image_store = cx.data_dir.join("images");
    tokio::fs::create_dir_all(&image_store).await.map_err(|e| {
        StepError::Other(format!("failed to create {}: {e}", image_store.display()))
    })?;
    let mut inputs = vec![
        (abi::KILN_COMMIT, cx.revision.to_string()),
        (abi::KILN_FLEET, cx.fleet.name.clone()),
        (abi::KILN_ROLLOUT, cx.rollout.to_string()),
        (abi::KILN_STAGE, stage.name.clone()),
        (abi::KILN_STAGE_PATH, stage.path.trim_end_matches('/').to_owned()),
        (abi::KILN_TREE_ID, tree_id.to_owned()),
        (abi::KILN_WORK_TREE, workspace.tree.display().to_string()),
        (abi::KILN_IMAGE_STORE, image_store.display().to_string()),
        (abi::KILN_IDEMPOTENCY_KEY, key.to_owned()),
    ];
    if let Some(parent) = parent {
        inputs.push((abi::KILN_PARENT_IMAGE, parent.to_string()));
    }
    if rebake {
        inputs.push((abi::KILN_REBAKE, "1".to_owned()));
    }
    let program = crate::fsutil::safe_join(&workspace.tree, &stage.bake)
        .map_err(|e| StepError::Other(format!("bake hook of stage {}: {e}", stage.name)))?;
    let spec = HookSpec {
        name: format!("bake {}/{} ({})", cx.fleet.name, stage.name, stage.bake),
        program,
        args: Vec::new(),
        workdir: workspace.tree.clone(),
        env: pipeline::hook_env(cx, inputs),
        timeout: cx.fleet.image.timeout,
        stdin: None,
    };
    let outcome = pipeline::run_hook(cx, &spec, &workspace.out).await?;
    let image = image_id(&spec.name, &outcome, &workspace.tree).await?;
    let mut outputs = outcome.outputs;
    outputs.insert(abi::OUTPUT_IMAGE.to_owned(), image.to_string());
    Ok((image, outputs))
}

/// Where a bake hook's image id comes from, first match wins: `image=` in `$KILN_OUTPUT`; the
/// Packer manifest it names with `manifest=`; Packer `-machine-readable` artifact lines on its
/// stdout; a `packer-manifest.json` at the work tree root.
async fn image_id(name: &str, outcome: &HookOutcome, tree: &Path) -> Result<ImageRef, HookError> {
    let bad = |message: String| HookError::BadOutput { name: name.to_owned(), message };
    if let Some(image) = outcome.outputs.get(abi::OUTPUT_IMAGE) {
        let image = image.trim();
        if image.is_empty() {
            return Err(bad("wrote an empty `image=` to $KILN_OUTPUT".to_owned()));
        }
        return Ok(ImageRef::from(image));
    }
    if let Some(manifest) = outcome.outputs.get(abi::OUTPUT_MANIFEST) {
        let path = crate::fsutil::safe_join(tree, manifest.trim())
            .map_err(|e| bad(format!("named a Packer manifest outside the work tree ({e})")))?;
        let bytes = match crate::hooks::output::read_hook_file(&path).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(bad(format!(
                    "named a Packer manifest `{manifest}` that does not exist"
                )));
            }
            Err(why) => {
                return Err(bad(format!("named a Packer manifest `{manifest}` that {why}")));
            }
        };
        return packer::manifest_artifact_id(&bytes)
            .map(ImageRef::from)
            .map_err(|why| bad(format!("named a Packer manifest `{manifest}` that {why}")));
    }
    if let Some(id) = packer::parse(&outcome.stdout).image_id() {
        return Ok(ImageRef::from(id));
    }
    let manifest = tree.join(abi::PACKER_MANIFEST_FILE);
    match crate::hooks::output::read_hook_file(&manifest).await {
        Ok(None) => {}
        Ok(Some(bytes)) => {
            return packer::manifest_artifact_id(&bytes)
                .map(ImageRef::from)
                .map_err(|why| bad(format!("left a {} that {why}", abi::PACKER_MANIFEST_FILE)));
        }
        Err(why) => return Err(bad(format!("left a {} that {why}", abi::PACKER_MANIFEST_FILE))),
    }
    Err(bad(format!(
        "reported no image id: write `image=<id>` to $KILN_OUTPUT, print Packer \
         `-machine-readable` artifact lines, or leave a {} in the work tree",
        abi::PACKER_MANIFEST_FILE
    )))
}
