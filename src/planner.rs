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
    /// The fleets the commit may change, planned.
    Fleets(FleetPlans),
}

/// The plans of a commit with a valid manifest.
#[derive(Debug, Clone)]
pub struct FleetPlans {
    /// The manifest at the commit.
    pub index: Arc<ManifestIndex>,
    /// One plan per fleet the commit may change: every fleet, or, planned against an earlier
    /// planned commit, the fleets new since, whose manifest entry changed, or whose tracked
    /// paths (see [`tracked_paths`]) changed. The others' plans are what they were.
    pub plans: Vec<FleetPlan>,
    /// Whether the fleets in the manifest may differ from the earlier commit's (always true
    /// for a full plan).
    pub manifest_changed: bool,
}

/// Files as they are in a commit of the mirror; every path validation looks at is noted (a later
/// commit that changed none of them, nor the manifest, validates the same).
struct CommitFiles<'a> {
    commit: &'a git::CommitTree,
    consulted: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<'a> CommitFiles<'a> {
    fn new(commit: &'a git::CommitTree) -> Self {
        CommitFiles { commit, consulted: Default::default() }
    }

    fn note(&self, path: &str) {
        self.consulted.borrow_mut().insert(clean(path).to_owned());
    }
}

impl RepoFiles for CommitFiles<'_> {
    fn file(&self, path: &str) -> Option<bool> {
        self.note(path);
        self.commit.file_mode(path).ok().flatten()
    }

    fn symlink(&self, path: &str) -> bool {
        self.note(path);
        self.commit.symlink_in_path(path).unwrap_or(false)
    }

    fn read(&self, path: &str, max_bytes: u64) -> Result<Option<String>, String> {
        self.note(path);
        if self.commit.symlink_in_path(path).map_err(|e| e.to_string())? {
            return Err("it is a symbolic link (or lies under one)".into());
        }
        match self.commit.read_file_capped(path, max_bytes).map_err(|e| e.to_string())? {
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
    Ok(manifest_in(&git::CommitTree::open(mirror, revision)?)?.0)
}

/// The manifest at the commit, and the repo paths its validation looked at (the manifest
/// included, sorted).
#[allow(clippy::type_complexity)]
fn manifest_in(
    commit: &git::CommitTree,
) -> Result<(Option<Result<Manifest, ManifestError>>, Vec<String>), GitError> {
    let files = CommitFiles::new(commit);
    files.note(manifest::MANIFEST_FILE);
    let loaded = load_in(commit, &files)?;
    Ok((loaded, files.consulted.into_inner().into_iter().collect()))
}

fn load_in(
    commit: &git::CommitTree,
    files: &CommitFiles<'_>,
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
    Ok(Some(manifest::load(&text, file, files)))
}

/// A commit's valid manifest, parsed and validated once, with its fleets indexed by name.
#[derive(Debug)]
pub struct ManifestIndex {
    /// The commit it was first read from (later commits that changed neither the manifest nor
    /// a file its validation looked at share it).
    pub revision: Revision,
    manifest: Manifest,
    by_name: HashMap<String, usize>,
    /// The repo paths validation looked at, sorted.
    consulted: Vec<String>,
}

impl ManifestIndex {
    /// Indexes a manifest read at `revision`, whose validation looked at `consulted`.
    pub fn new(revision: Revision, manifest: Manifest, consulted: Vec<String>) -> ManifestIndex {
        let by_name =
            manifest.fleets.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
        ManifestIndex { revision, manifest, by_name, consulted }
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
    let (manifest, consulted) = match manifest_in(commit)? {
        (None, _) => return Ok(None),
        (Some(Err(error)), _) => return Ok(Some(Err(error))),
        (Some(Ok(manifest)), consulted) => (manifest, consulted),
    };
    let index = Arc::new(ManifestIndex::new(revision.clone(), manifest, consulted));
    keep(mirror, revision, &index);
    Ok(Some(Ok(index)))
}

/// Keeps `index` as the manifest at (`mirror`, `revision`).
fn keep(mirror: &Path, revision: &Revision, index: &Arc<ManifestIndex>) {
    if let Ok(mut cache) = cache().lock() {
        if !cache.iter().any(|(m, r, _)| m == mirror && r == revision) {
            cache.push_back((mirror.to_owned(), revision.clone(), index.clone()));
            while cache.len() > CACHED_MANIFESTS {
                cache.pop_front();
            }
        }
    }
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
    let mut trees = BTreeMap::new();
    for (key, path) in tracked_paths(fleet) {
        let id = commit.tree_id(clean(&path))?.unwrap_or_else(|| "-".into());
        trees.insert(key, id);
    }
    Ok(trees)
}

/// Everything that shapes a fleet, keyed as its trees are (`path:<p>`, `stage:<name>`,
/// `bake:<name>`, `infra`, `reconcile`): a commit that changes none of these paths, nor the
/// fleet's manifest entry, cannot change what the fleet needs.
pub fn tracked_paths(fleet: &Fleet) -> Vec<(String, String)> {
    let mut paths = Vec::new();
    for path in fleet.watched_paths() {
        paths.push((format!("path:{path}"), path));
    }
    for stage in &fleet.image.stages {
        paths.push((format!("stage:{}", stage.name), stage.path.clone()));
        paths.push((format!("bake:{}", stage.name), stage.bake.clone()));
    }
    if let Some(infra) = &fleet.infra {
        paths.push(("infra".into(), infra.path.clone()));
        paths.push(("reconcile".into(), infra.reconcile.clone()));
    }
    paths
}

/// `./image/base/` → `image/base`; `.`, `./` and `/` → `""` (the root).
fn clean(path: &str) -> &str {
    let path = path.trim_start_matches("./").trim_matches('/');
    if path == "." { "" } else { path }
}

/// Whether a change to the (sorted) `changed` file paths touches `path` (a file or a directory
/// of the repo): the path itself changed, something below it did, or one of its parents did
/// (it became a file or a link). The root is touched by any change.
pub fn touched(changed: &[String], path: &str) -> bool {
    let path = clean(path);
    if path.is_empty() {
        return !changed.is_empty();
    }
    let has = |p: &str| changed.binary_search_by(|c| c.as_str().cmp(p)).is_ok();
    let below = format!("{path}/");
    let first_below = changed.partition_point(|c| c.as_str() < below.as_str());
    if has(path) || changed.get(first_below).is_some_and(|c| c.starts_with(&below)) {
        return true;
    }
    path.match_indices('/').any(|(i, _)| has(&path[..i]))
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

/// Plans a commit (blocking: git). `deployed` answers what a fleet runs now.
///
/// With `since`, an earlier commit that was planned, only what changed between the two is
/// planned: git compares the trees (skipping identical subtrees), and a fleet whose manifest
/// entry and tracked paths are all unchanged keeps the plan it had, so a push touching one
/// fleet of a thousand costs one fleet's plan. The manifest is validated again only when it or
/// a file its validation looked at changed. Without `since` (or when it is gone from the
/// mirror, or its manifest was not valid), every fleet is planned.
pub fn plan_commit(
    mirror: &Path,
    revision: &Revision,
    since: Option<&Revision>,
    deployed: &dyn Fn(&str) -> Option<Deployed>,
) -> Result<CommitPlan, GitError> {
    let commit = git::CommitTree::open(mirror, revision)?;
    let earlier = match since.filter(|since| *since != revision) {
        Some(since) => {
            match (manifest_index_at(mirror, since), git::changed_paths(mirror, since, revision)) {
                (Ok(Some(Ok(index))), Ok(Some(changed))) => Some((index, changed)),
                _ => None,
            }
        }
        None => None,
    };
    // The earlier manifest stands for this commit's when neither it nor anything its validation
    // read changed: no second parse and validation of a thousand fleets.
    if let Some((index, changed)) = &earlier {
        if !index.consulted.iter().any(|path| touched(changed, path)) {
            keep(mirror, revision, index);
        }
    }
    // Indexed and kept: the rollouts this plan starts look their fleets up without a parse.
    let index = match index_in(mirror, revision, &commit)? {
        None => return Ok(CommitPlan::NoManifest),
        Some(Err(error)) => return Ok(CommitPlan::Invalid(error)),
        Some(Ok(index)) => index,
    };
    let mut plans = Vec::new();
    let mut manifest_changed = true;
    for fleet in index.fleets() {
        if let Some((before, changed)) = &earlier {
            let same_entry = before.fleet(&fleet.name).is_some_and(|b| b == fleet);
            if same_entry && !tracked_paths(fleet).iter().any(|(_, path)| touched(changed, path)) {
                continue;
            }
        }
        let trees = trees_in(&commit, fleet)?;
        let plan = decide(fleet, &trees, deployed(&fleet.name).as_ref());
        plans.push(FleetPlan { fleet: fleet.clone(), plan, trees });
    }
    if let Some((before, _)) = &earlier {
        manifest_changed = !Arc::ptr_eq(before, &index) && before.fleets() != index.fleets();
    }
    Ok(CommitPlan::Fleets(FleetPlans { index, plans, manifest_changed }))
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
    fn a_path_is_touched_by_itself_what_lies_below_and_its_parents() {
        let changed: Vec<String> = ["f1-x/a", "f1/version", "hooks", "infra/main.tf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(touched(&changed, "f1/"));
        assert!(touched(&changed, "./f1"));
        assert!(touched(&changed, "f1/version"));
        assert!(!touched(&changed, "f1/other"));
        assert!(!touched(&changed, "f"));
        assert!(!touched(&changed, "f2/"));
        // `f1-x/a` sorts between `f1` and `f1/`: still found, and not taken for `f1`'s.
        assert!(touched(&changed, "f1-x"));
        assert!(!touched(&["f1-x/a".to_owned()], "f1"));
        // A parent that changed (became a file, a link) touches everything below it.
        assert!(touched(&changed, "hooks/bake"));
        assert!(touched(&changed, "infra"));
        assert!(!touched(&changed, "image/base"));
        // The root is touched by any change, and nothing by none.
        assert!(touched(&changed, "."));
        assert!(!touched(&[], "."));
        assert!(!touched(&[], "f1"));
    }

    #[test]
    fn hook_change_rebakes() {
        let now = trees(&[("bake:app", "h2")]);
        assert_eq!(decide(&fleet(), &now, Some(&deployed(trees(&[])))).bake, ["app"]);
    }
}
