//! Baking a fleet's image stages through their hooks, with the cache.
//!
//! OWNER: hooks helper.

use std::collections::BTreeMap;

use crate::model::ImageRef;
use crate::pipeline::StepContext;

/// The result of baking all of a fleet's stages.
#[derive(Debug, Clone)]
pub struct Baked {
    /// The fleet's image (the final stage's).
    pub image: ImageRef,
    /// Every stage's image.
    pub stage_images: BTreeMap<String, ImageRef>,
}

/// Bakes every stage of `cx.fleet` at `cx.revision` in dependency order; a stage whose cache key
/// is known is a hit and is not rebaked. Records events on `cx.rollout`.
pub async fn bake_fleet(cx: &StepContext<'_>) -> Result<Baked, crate::pipeline::StepError> {
    let _ = cx;
    todo!("hooks helper")
}
