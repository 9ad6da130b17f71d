//! Running the reconcile hook with the image id.
//!
//! OWNER: hooks helper.

use std::collections::BTreeMap;

use crate::model::ImageRef;
use crate::pipeline::StepContext;

/// Runs `cx.fleet`'s reconcile hook with `image` (and the stage images) in its environment;
/// returns its outputs (`key=value` or `terraform output -json` shape, flattened).
pub async fn reconcile_fleet(
    cx: &StepContext<'_>,
    image: &ImageRef,
    stage_images: &BTreeMap<String, ImageRef>,
) -> Result<BTreeMap<String, String>, crate::pipeline::StepError> {
    let _ = (cx, image, stage_images);
    todo!("hooks helper")
}
