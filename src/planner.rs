//! Deciding, per fleet, what a commit needs: bake? reconcile? roll? Or nothing.
//!
//! The planner compares git tree ids (cheap, exact) of everything that shapes a fleet (its
//! watched paths, each stage's directory and bake hook, the infra directory and reconcile hook)
//! at the new commit against the ones recorded when the fleet was last deployed. Equal ids mean
//! equal content, so an unrelated commit never rebakes and never rolls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::manifest::{self, Fleet, Manifest, ManifestError, RepoFiles};
use crate::model::Revision;
use crate::rollout::state::Plan;
use crate::source::git::{self, GitError};
use crate::store::Deployed;

/// A fleet and what to do for it at one commit.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    /// The fleet as the manifest at the commit describes it.
    pub fleet: Fleet,
    /// The decision.
    pub plan: Plan,
    /// Tree ids of everything that shapes the fleet at the commit (stored when deployed).
    pub trees: BTreeMap<String, String>,
}

impl FleetPlan {
    /// Whether anything needs doing.
    pub fn is_noop(&self) -> bool {
        self.plan.bake.is_empty() && !self.plan.reconcile && !self.plan.roll
    }
}

/// What a commit means for the fleets.
#[derive(Debug, Clone)]
pub enum CommitPlan {
    /// The commit has no `kiln.yaml`.
    NoManifest,
    /// The manifest is broken; nothing is deployed from this commit.
    Invalid(ManifestError),
    /// One plan per fleet in the manifest.
    Fleets(Vec<FleetPlan>),
}

/// Files as they are in a commit of the mirror.
struct CommitFiles<'a>(&'a git::CommitTree);

impl RepoFiles for CommitFiles<'_> {
    fn file(&self, path: &str) -> Option<bool> {
        self.0.file_mode(path).ok().flatten()
    }

    fn symlink(&self, path: &str) -> bool {
        self.0.symlink_in_path(path).unwrap_or(false)
    }

    fn read(&self, path: &str, max_bytes: u64) -> Result<Option<String>, String> {
        if self.0.symlink_in_path(path).map_err(|e| e.to_string())? {
            return Err("it is a symbolic link (or lies under one)".into());
        }
        match self.0.read_file_capped(path, max_bytes).map_err(|e| e.to_string())? {
            git::FileAt::Absent => Ok(None),
            git::FileAt::Symlink => Err("it is a symbolic link".into()),
            git::FileAt::TooLarge(size) => {
                Err(format!("it is {size} bytes, over the limit of {max_bytes} bytes"))
            }
            git::FileAt::Content(bytes) => {
                String::from_utf8(bytes).map(Some).map_err(|_| "it is not valid UTF-8".into())
            }
        }
    }
}

/// Reads and validates the manifest at a commit (blocking: git).
pub fn manifest_at(
    mirror: &Path,
    revision: &Revision,
) -> Result<Option<Result<Manifest, ManifestError>>, GitError> {
    manifest_in(&git::CommitTree::open(mirror, revision)?)
}

fn manifest_in(
    commit: &git::CommitTree,
) -> Result<Option<Result<Manifest, ManifestError>>, GitError> {
    let file = manifest::MANIFEST_FILE;
    // Checked in git before reading: a symlink is not followed, an oversized blob not loaded.
    let bytes = match commit.read_file_capped(file, manifest::MAX_MANIFEST_BYTES)? {
        git::FileAt::Absent => return Ok(None),
        git::FileAt::Symlink => return Ok(Some(Err(ManifestError::symlink(file)))),
        git::FileAt::TooLarge(size) => return Ok(Some(Err(ManifestError::too_large(file, size)))),
        git::FileAt::Content(bytes) => bytes,
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Some(Err(ManifestError::whole_file(file, "not valid UTF-8"))));
    };
    Ok(Some(manifest::load(&text, file, &CommitFiles(commit))))
}

/// A commit's valid manifest, parsed and validated once, with its fleets indexed by name.
#[derive(Debug)]
pub struct ManifestIndex {
    /// The commit it was read from.
    pub revision: Revision,
    manifest: Manifest,
    by_name: HashMap<String, usize>,
}

impl ManifestIndex {
    /// Indexes a manifest read at `revision`.
    pub fn new(revision: Revision, manifest: Manifest) -> ManifestIndex {
        let by_name =
            manifest.fleets.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
        ManifestIndex { revision, manifest, by_name }
    }

    /// The fleet named `name` (one hash lookup).
    pub fn fleet(&self, name: &str) -> Option<&Fleet> {
        self.by_name.get(name).and_then(|&i| self.manifest.fleets.get(i))
    }

    /// Every fleet, in file order.
    pub fn fleets(&self) -> &[Fleet] {
        &self.manifest.fleets
    }

    /// The whole manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// How many commits' manifests [`manifest_index_at`] keeps (the tip and the few before it that
/// rollouts still start from).
const CACHED_MANIFESTS: usize = 4;

/// Manifests by (mirror, commit), newest last. A commit's content never changes, so neither do
/// its manifest and the answers of its validation.
type ManifestCache = Mutex<VecDeque<(PathBuf, Revision, Arc<ManifestIndex>)>>;

fn cache() -> &'static ManifestCache {
    static CACHE: OnceLock<ManifestCache> = OnceLock::new();
    CACHE.get_or_init(ManifestCache::default)
}

/// The kept index of the manifest at (`mirror`, `revision`), if any.
fn cached(mirror: &Path, revision: &Revision) -> Option<Arc<ManifestIndex>> {
    let cache = cache().lock().ok()?;
    cache.iter().find(|(m, r, _)| m == mirror && r == revision).map(|(.., index)| index.clone())
}

/// The valid manifest at a commit, indexed (blocking: git). Read, parsed and validated once per
/// commit (the last [`CACHED_MANIFESTS`] are kept), so looking up each of 1,000 fleets costs
/// one parse, not 1,000. `Ok(None)`: no manifest; `Ok(Some(Err(_)))`: it is invalid (not
/// cached, so the error is always the fresh one).
pub fn manifest_index_at(
    mirror: &Path,
    revision: &Revision,
) -> Result<Option<Result<Arc<ManifestIndex>, ManifestError>>, GitError> {
    if let Some(index) = cached(mirror, revision) {
        return Ok(Some(Ok(index)));
    }
    index_in(mirror, revision, &git::CommitTree::open(mirror, revision)?)
}

/// [`manifest_index_at`] with the commit open already.
fn index_in(
    mirror: &Path,
    revision: &Revision,
    commit: &git::CommitTree,
) -> Result<Option<Result<Arc<ManifestIndex>, ManifestError>>, GitError> {
    if let Some(index) = cached(mirror, revision) {
        return Ok(Some(Ok(index)));
    }
    let manifest = match manifest_in(commit)? {
        None => return Ok(None),
        Some(Err(error)) => return Ok(Some(Err(error))),
        Some(Ok(manifest)) => manifest,
    };
    let index = Arc::new(ManifestIndex::new(revision.clone(), manifest));
    if let Ok(mut cache) = cache().lock() {
        if !cache.iter().any(|(m, r, _)| m == mirror && r == revision) {
            cache.push_back((mirror.to_owned(), revision.clone(), index.clone()));
            while cache.len() > CACHED_MANIFESTS {
                cache.pop_front();
            }
        }
    }
    Ok(Some(Ok(index)))
}

/// The fleet named `name` in the manifest at a commit (blocking: git). Through
/// [`manifest_index_at`]: one parse per commit however many fleets are looked up.
pub fn fleet_at(mirror: &Path, revision: &Revision, name: &str) -> Result<Option<Fleet>, GitError> {
    Ok(match manifest_index_at(mirror, revision)? {
        Some(Ok(index)) => index.fleet(name).cloned(),
        _ => None,
    })
}

/// Tree ids of everything that shapes `fleet` at `revision`, keyed `path:<p>`, `stage:<name>`,
/// `bake:<name>`, `infra`, `reconcile`. Absent paths map to `-`.
pub fn fleet_trees(
    mirror: &Path,
    revision: &Revision,
    fleet: &Fleet,
) -> Result<BTreeMap<String, String>, GitError> {
    trees_in(&git::CommitTree::open(mirror, revision)?, fleet)
}

fn trees_in(commit: &git::CommitTree, fleet: &Fleet) -> Result<BTreeMap<String, String>, GitError> {
    let id = |path: &str| -> Result<String, GitError> {
        let clean = path.trim_start_matches("./").trim_end_matches('/');
        Ok(commit.tree_id(clean)?.unwrap_or_else(|| "-".into()))
    };
    let mut trees = BTreeMap::new();
    for path in fleet.watched_paths() {
        trees.insert(format!("path:{path}"), id(&path)?);
    }
    for stage in &fleet.image.stages {
        trees.insert(format!("stage:{}", stage.name), id(&stage.path)?);
        trees.insert(format!("bake:{}", stage.name), id(&stage.bake)?);
    }
    if let Some(infra) = &fleet.infra {
        trees.insert("infra".into(), id(&infra.path)?);
        trees.insert("reconcile".into(), id(&infra.reconcile)?);
    }
    Ok(trees)
}

/// Decides for one fleet from its trees at the commit and what it runs now (pure).
pub fn decide(
    fleet: &Fleet,
    trees: &BTreeMap<String, String>,
    deployed: Option<&Deployed>,
) -> Plan {
    let all_stages = || fleet.image.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let Some(deployed) = deployed else {
        return Plan {
            bake: all_stages(),
            reconcile: fleet.infra.is_some(),
            roll: true,
            reason: "first deployment of this fleet".into(),
        };
    };
    let changed = |key: &str| trees.get(key) != deployed.trees.get(key);
    let changed_paths: Vec<&str> = trees
        .keys()
        .filter(|k| k.starts_with("path:") && changed(k))
        .map(|k| &k["path:".len()..])
        .collect();
    // Stages whose own inputs changed, then everything layered on them.
    let mut bake: Vec<String> = Vec::new();
    for stage in fleet.stages_in_order() {
        let own =
            changed(&format!("stage:{}", stage.name)) || changed(&format!("bake:{}", stage.name));
        let parent = stage.from.as_ref().is_some_and(|p| bake.contains(p));
        if own || parent {
            bake.push(stage.name.clone());
        }
    }
    let infra_changed = fleet.infra.is_some() && (changed("infra") || changed("reconcile"));
    if changed_paths.is_empty() && bake.is_empty() && !infra_changed {
        return Plan {
            reason: format!("no changes under {}", fleet.watched_paths().join(", ")),
            ..Plan::default()
        };
    }
    let mut why = Vec::new();
    if !bake.is_empty() {
        why.push(format!("stages changed: {}", bake.join(", ")));
    }
    if infra_changed {
        why.push("infra changed".to_owned());
    }
    if bake.is_empty() && !infra_changed {
        why.push(format!("paths changed: {}", changed_paths.join(", ")));
    }
    Plan {
        roll: !bake.is_empty(),
        reconcile: fleet.infra.is_some() && (infra_changed || !bake.is_empty()),
        bake,
        reason: why.join("; "),
    }
}

/// Plans a commit for every fleet (blocking: git). `deployed` answers what a fleet runs now.
pub fn plan_commit(
    mirror: &Path,
    revision: &Revision,
    deployed: &dyn Fn(&str) -> Option<Deployed>,
) -> Result<CommitPlan, GitError> {
    let commit = git::CommitTree::open(mirror, revision)?;
    // Indexed and kept: the rollouts this plan starts look their fleets up without a parse.
    let index = match index_in(mirror, revision, &commit)? {
        None => return Ok(CommitPlan::NoManifest),
        Some(Err(error)) => return Ok(CommitPlan::Invalid(error)),
        Some(Ok(index)) => index,
    };
    let mut plans = Vec::new();
    for fleet in index.fleets() {
        let trees = trees_in(&commit, fleet)?;
        let plan = decide(fleet, &trees, deployed(&fleet.name).as_ref());
        plans.push(FleetPlan { fleet: fleet.clone(), plan, trees });
    }
    Ok(CommitPlan::Fleets(plans))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        manifest::parse(
            "fleets:\n  - name: web\n    paths: [image/, infra/]\n    image:\n      stages:\n        - { name: base, path: image/base, bake: hooks/bake }\n        - { name: app, path: image/app, from: base, bake: hooks/bake }\n    infra: { path: infra/, reconcile: hooks/reconcile }\n",
            "kiln.yaml",
        )
        .unwrap()
        .fleets
        .remove(0)
    }

    fn trees(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut base: BTreeMap<String, String> = [
            ("path:image/", "i1"),
            ("path:infra/", "f1"),
            ("stage:base", "b1"),
            ("stage:app", "a1"),
            ("bake:base", "h1"),
            ("bake:app", "h1"),
            ("infra", "f1"),
            ("reconcile", "r1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            base.insert(k.to_string(), v.to_string());
        }
        base
    }

    fn deployed(trees: BTreeMap<String, String>) -> Deployed {
        Deployed {
            fleet: "web".into(),
            revision: "r".into(),
            image: "img".into(),
            rollout: crate::model::RolloutId(1),
            trees,
            at: crate::model::now(),
        }
    }

    #[test]
    fn first_deployment_does_everything() {
        let plan = decide(&fleet(), &trees(&[]), None);
        assert_eq!(plan.bake, ["base", "app"]);
        assert!(plan.reconcile && plan.roll);
    }

    #[test]
    fn unrelated_commit_is_a_noop() {
        let plan = decide(&fleet(), &trees(&[]), Some(&deployed(trees(&[]))));
        assert_eq!(
            plan,
            Plan { reason: "no changes under image/, infra/".into(), ..Plan::default() }
        );
    }

    #[test]
    fn app_change_rebakes_only_app() {
        let now = trees(&[("path:image/", "i2"), ("stage:app", "a2")]);
        let plan = decide(&fleet(), &now, Some(&deployed(trees(&[]))));
        assert_eq!(plan.bake, ["app"]);
        assert!(plan.roll && plan.reconcile);
    }

    #[test]
    fn base_change_rebakes_the_layers_above() {
        let now = trees(&[("path:image/", "i2"), ("stage:base", "b2")]);
        assert_eq!(decide(&fleet(), &now, Some(&deployed(trees(&[])))).bake, ["base", "app"]);
    }

    #[test]
    fn infra_only_change_reconciles_without_rolling() {
        let now = trees(&[("path:infra/", "f2"), ("infra", "f2")]);
        let plan = decide(&fleet(), &now, Some(&deployed(trees(&[]))));
        assert!(plan.bake.is_empty() && plan.reconcile && !plan.roll);
        assert_eq!(plan.reason, "infra changed");
    }

    #[test]
    fn hook_change_rebakes() {
        let now = trees(&[("bake:app", "h2")]);
        assert_eq!(decide(&fleet(), &now, Some(&deployed(trees(&[])))).bake, ["app"]);
    }
}
