//! Garbage collection of what rollouts leave on disk: baked images under `<data-dir>/images`,
//! the directories of terminated local instances (`<data-dir>/fleets/<fleet>/instances/<id>`) and
//! the exec provider's per-revision copies of the repo (`<data-dir>/fleets/<fleet>/provider/<rev>`).
//!
//! Retention keeps what a rollback may need:
//! - per fleet, the images of its newest `keep_images` distinct successful rollouts (with their
//!   stage images, so the bake cache can still layer onto a kept base);
//! - every image a fleet runs now (`deployed`), that an instance runs (on-disk instance records
//!   and the providers' own lists), and that a rollout not yet ended names (its image, stage
//!   images, previous image);
//! - everything named by a fleet whose lane is busy (a bake or a rollout runs or waits): GC never
//!   runs against a fleet with work in progress.
//!
//! Only images kiln knows (named by a bake record or a rollout of an idle fleet) are candidates;
//! anything else in `images/` (a bake's temp dir, a file put there by hand) is left alone. A
//! bake cache entry naming an image about to be deleted is dropped first, so a later bake with
//! that key bakes again instead of reusing a missing image.
//!
//! Deletion is crash-safe and symlink-safe: the list of what will go is recorded in the store
//! before anything is touched (a restart finishes it), every path is re-checked to be a direct
//! entry of `images/` or of a fleet's `instances/` / `provider/` inside the data dir (after
//! resolving the parents, so a symlinked `images/` leading elsewhere is refused), entries are
//! inspected with `symlink_metadata` and never followed (a symlink is unlinked, its target left
//! alone), and directories are removed with `std::fs::remove_dir_all`, which does not follow
//! links.
//!
//! Every removal is an event (`gc.removed`, with the path, kind and bytes) on the fleet's newest
//! rollout, so `kiln show` shows it; the last run's summary is `GET /api/v1/gc`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{ImageRef, RolloutId, Timestamp};
use crate::rollout::state::{Rollout, RolloutState};
use crate::store::{EventKind, Level, RolloutFilter, Store, StoreError};

/// Default of `kiln run --keep-images`.
pub const DEFAULT_KEEP_IMAGES: usize = 5;
/// How often the daemon collects when no rollout finished meanwhile.
pub const INTERVAL: Duration = Duration::from_secs(600);
/// At most this many removals per run; the rest goes in the next run (bounds the time the
/// operator waits for one run).
pub const MAX_REMOVALS: usize = 256;

/// The meta key of deletions decided but maybe not done (a crash mid-run).
pub const PENDING_KEY: &str = "gc.pending";
/// The meta key of the last run's summary.
pub const LAST_KEY: &str = "gc.last";
/// The meta key of the running totals.
pub const TOTALS_KEY: &str = "gc.totals";
/// Default of `kiln run --compact-after` and `kiln gc --compact-after`: finished rollouts older
/// than this keep their record and a summary of their events.
pub const DEFAULT_COMPACT_AFTER: &str = "90d";
/// At most this many rollouts are looked at per run (the rest in the next run).
pub const COMPACT_BUDGET: usize = 5000;

/// What is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An entry of `<data-dir>/images`.
    Image,
    /// A terminated local instance's directory.
    Instance,
    /// An exec provider's copy of the repo at one revision.
    RepoCopy,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Instance => "terminated instance dir",
            Kind::RepoCopy => "provider repo copy",
        }
    }
}

/// One thing GC removes (or removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// The fleet it belonged to.
    pub fleet: String,
    /// What it is.
    pub kind: Kind,
    /// Its path.
    pub path: PathBuf,
    /// Bytes freed (file sizes, links not followed); 0 until removed.
    #[serde(default)]
    pub bytes: u64,
}

/// What the operator knows that the store does not.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// How many distinct successful images to keep per fleet.
    pub keep_images: usize,
    /// Fleets with work running, queued or paused: nothing of theirs is touched.
    pub busy: BTreeSet<String>,
    /// Images instances run, as providers listed them (in addition to the on-disk records).
    pub in_use: BTreeSet<ImageRef>,
    /// Whether `in_use` is complete; when a provider could not be listed no image is removed.
    pub in_use_known: bool,
    /// Revisions whose repo copy an open provider uses, per fleet.
    pub repo_in_use: BTreeMap<String, BTreeSet<String>>,
    /// Event streams of rollouts that ended longer ago than this are compacted (`None`: never).
    pub compact_after: Option<Duration>,
}

/// The outcome of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// When it ran.
    pub at: Option<Timestamp>,
    /// Successful images kept per fleet (`kiln run --keep-images`).
    #[serde(default)]
    pub keep_images: usize,
    /// What was removed.
    pub removed: Vec<Removal>,
    /// Bytes freed in total.
    pub bytes: u64,
    /// Bake cache entries dropped with their image.
    pub cache_dropped: usize,
    /// Images kept (known to kiln, still on disk).
    pub images_kept: usize,
    /// Whether more was due than one run removes (the next run continues).
    pub more: bool,
    /// What could not be removed, in words.
    pub errors: Vec<String>,
    /// Event streams compacted to summaries (`--compact-after`).
    #[serde(default)]
    pub compacted: crate::store::Compacted,
}

/// Running totals over every run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Runs.
    pub runs: u64,
    /// Entries removed.
    pub removed: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Events replaced by summaries.
    #[serde(default)]
    pub compacted_events: u64,
}

/// Errors of a run (the store; file errors are collected in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The store could not be read or written.
    #[error("garbage collection could not use the store")]
    Store(#[from] StoreError),
}

/// How long GC waits for a provider's list of instances.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// One run as the operator starts it: lists the open exec providers' instances (their images are
/// in use; a provider that cannot be listed keeps every image this time), then runs
/// [`collect`] off the async runtime. `providers` are (fleet, cache key, provider) as the
/// operator holds them (`exec:<revision>` names the repo copy in use). Returns `None` when the
/// run failed (logged).
pub async fn run(
    store: Store,
    data_dir: PathBuf,
    keep_images: usize,
    compact_after: Option<Duration>,
    busy: BTreeSet<String>,
    providers: Vec<(String, String, crate::provider::SharedProvider)>,
) -> Option<Report> {
    let mut input =
        Input { keep_images, busy, in_use_known: true, compact_after, ..Input::default() };
    for (fleet, key, provider) in providers {
        let Some(revision) = key.strip_prefix("exec:") else {
            // Local instances are read from their records on disk by `collect`.
            continue;
        };
        input.repo_in_use.entry(fleet.clone()).or_default().insert(revision.to_owned());
        match tokio::time::timeout(LIST_TIMEOUT, provider.list()).await {
            Ok(Ok(instances)) => input.in_use.extend(instances.into_iter().map(|i| i.image)),
            Ok(Err(error)) => {
                tracing::warn!(fleet, error = %crate::error::chain(&error), "GC keeps every image: the provider could not list its instances.");
                input.in_use_known = false;
            }
            Err(_) => {
                tracing::warn!(
                    fleet,
                    "GC keeps every image: the provider did not list its instances in time."
                );
                input.in_use_known = false;
            }
        }
    }
    let task = tokio::task::spawn_blocking(move || collect(&store, &data_dir, &input));
    match task.await {
        Ok(Ok(report)) => Some(report),
        Ok(Err(error)) => {
            tracing::error!(error = %crate::error::chain(&error), "Garbage collection failed.");
            None
        }
        Err(join) => {
            tracing::error!(error = %join, "Garbage collection crashed.");
            None
        }
    }
}

/// Runs one collection over `data_dir`: finishes deletions a crash interrupted, decides what
/// goes, records it, drops the bake cache entries of doomed images, deletes, and records events
/// and the summary. Blocking (file system): call it from `spawn_blocking`.
pub fn collect(store: &Store, data_dir: &Path, input: &Input) -> Result<Report, GcError> {
    let mut report = Report {
        at: Some(crate::model::now()),
        keep_images: input.keep_images,
        ..Report::default()
    };
    let roots = Roots::new(data_dir);
    compact(store, input, &mut report)?;

    let decision = plan(store, &roots, input, &mut report)?;
    let mut todo = decision.removals;
    // A previous run that died mid-way may have dropped an image's cache entry and not deleted
    // it; if nothing names that image any more only its pending entry remembers it. Finish
    // those, re-checked under today's rules; everything else was just decided again.
    let pending: Vec<Removal> = store.get_meta(PENDING_KEY)?.unwrap_or_default();
    let had_pending = !pending.is_empty();
    for removal in pending {
        let image = ImageRef(removal.path.to_string_lossy().into_owned());
        let orphan = removal.kind == Kind::Image
            && input.in_use_known
            && !decision.known.contains(&image)
            && !decision.keep.contains(&image)
            && !decision.busy.contains(&removal.fleet);
        if orphan && !todo.iter().any(|t| t.path == removal.path) {
            todo.push(removal);
        }
    }
    if todo.len() > MAX_REMOVALS {
        todo.truncate(MAX_REMOVALS);
        report.more = true;
    }
    if todo.is_empty() {
        if had_pending {
            store.remove_meta(PENDING_KEY)?;
        }
        if report.compacted.rollouts > 0 {
            record(store, &report)?;
        }
        return Ok(report);
    }
    store.set_meta(PENDING_KEY, &todo)?;

    // Cache entries first: a crash after this leaves an image nobody names, never a cache hit
    // on a missing image.
    let doomed: BTreeSet<String> = todo
        .iter()
        .filter(|r| r.kind == Kind::Image)
        .map(|r| r.path.to_string_lossy().into_owned())
        .collect();
    for record in store.bakes()? {
        if doomed.contains(record.image.as_str()) {
            store.remove_bake(&record.key)?;
            report.cache_dropped += 1;
        }
    }

    for mut removal in todo {
        match roots.remove(removal.kind, &removal.fleet, &removal.path) {
            Ok(Some(bytes)) => {
                removal.bytes = bytes;
                report.bytes += bytes;
                report.removed.push(removal);
            }
            Ok(None) => {} // Already gone.
            Err(why) => report.errors.push(format!("{}: {why}", removal.path.display())),
        }
    }
    store.remove_meta(PENDING_KEY)?;
    record(store, &report)?;
    Ok(report)
}

/// Decides what goes (nothing is touched).
fn plan(
    store: &Store,
    roots: &Roots,
    input: &Input,
    report: &mut Report,
) -> Result<Decision, GcError> {
    // From the indexes: the unfinished rollouts and the fleets; each fleet's history is read a
    // page at a time below, so a run holds a page of rollouts, not the whole history.
    let active = store.active_rollouts()?;
    let bakes = store.bakes()?;
    let mut fleets: BTreeSet<String> = store.rollout_fleets()?.into_iter().collect();
    fleets.extend(bakes.iter().map(|b| b.fleet.clone()));
    fleets.extend(roots.fleet_dirs());
    let busy = |fleet: &str| {
        input.busy.contains(fleet) || active.iter().any(|r| r.fleet.as_deref() == Some(fleet))
    };

    // --- images ---
    let mut keep: BTreeSet<ImageRef> = input.in_use.clone();
    keep.extend(roots.instance_images());
    let mut known: BTreeMap<ImageRef, String> = BTreeMap::new();
    for fleet in &fleets {
        if let Some(deployed) = store.deployed(fleet)? {
            keep.insert(deployed.image);
        }
        let mut kept_successes = 0;
        let mut seen = BTreeSet::new();
        let mut before = None;
        loop {
            const PAGE: usize = 500;
            let page = store.rollouts(&RolloutFilter {
                fleet: Some(fleet.clone()),
                before,
                limit: Some(PAGE),
                ..RolloutFilter::default()
            })?;
            before = page.last().map(|r| r.id);
            let last_page = page.len() < PAGE;
            for rollout in &page {
                let names = rollout_images(rollout);
                if busy(fleet) || !rollout.state.is_terminal() {
                    // Its previous image too: an automatic rollback returns to it.
                    keep.extend(names.iter().cloned());
                } else if rollout.state == RolloutState::Succeeded {
                    if let Some(image) = &rollout.image {
                        if kept_successes < input.keep_images || seen.contains(image) {
                            if seen.insert(image.clone()) {
                                kept_successes += 1;
                            }
                            // The image and its stages (a later bake layers onto a cached base),
                            // not the image it replaced: that one is kept only if it is itself
                            // among the last successes.
                            keep.insert(image.clone());
                            keep.extend(rollout.stage_images.values().cloned());
                        }
                    }
                }
                for name in names {
                    known.entry(name).or_insert_with(|| fleet.clone());
                }
            }
            if last_page {
                break;
            }
        }
    }
    for bake in &bakes {
        if busy(&bake.fleet) {
            keep.insert(bake.image.clone());
        }
        known.entry(bake.image.clone()).or_insert_with(|| bake.fleet.clone());
    }
    let mut out = Vec::new();
    for (image, fleet) in &known {
        let Some(path) = roots.image_path(image) else { continue };
        if std::fs::symlink_metadata(&path).is_err() {
            continue; // Gone already (or never a path).
        }
        if keep.contains(image) || !input.in_use_known {
            report.images_kept += 1;
            continue;
        }
        out.push(Removal { fleet: fleet.clone(), kind: Kind::Image, path, bytes: 0 });
    }

    // --- per-fleet directories ---
    for fleet in &fleets {
        if busy(fleet) {
            continue;
        }
        for path in roots.terminated_instances(fleet) {
            out.push(Removal { fleet: fleet.clone(), kind: Kind::Instance, path, bytes: 0 });
        }
        let mut revisions: BTreeSet<String> =
            input.repo_in_use.get(fleet).cloned().unwrap_or_default();
        if let Some(deployed) = store.deployed(fleet)? {
            revisions.insert(deployed.revision.0);
        }
        for path in roots.repo_copies(fleet) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| !revisions.contains(&n)) {
                out.push(Removal { fleet: fleet.clone(), kind: Kind::RepoCopy, path, bytes: 0 });
            }
        }
    }
    let busy_now = fleets.iter().filter(|f| busy(f)).cloned().collect();
    Ok(Decision { removals: out, keep, known: known.into_keys().collect(), busy: busy_now })
}

/// What [`plan`] decided, and what it decided from.
struct Decision {
    removals: Vec<Removal>,
    /// Images retained.
    keep: BTreeSet<ImageRef>,
    /// Images some record names.
    known: BTreeSet<ImageRef>,
    /// Fleets with work in progress.
    busy: BTreeSet<String>,
}

/// Every image a rollout names.
fn rollout_images(rollout: &Rollout) -> Vec<ImageRef> {
    let mut names: Vec<ImageRef> = rollout.image.iter().cloned().collect();
    names.extend(rollout.stage_images.values().cloned());
    names.extend(rollout.previous_image.iter().cloned());
    names
}

/// Appends one event per removal (and a summary) to each fleet's newest rollout, and updates
/// the summary and totals in the store.
fn record(store: &Store, report: &Report) -> Result<(), GcError> {
    let mut by_fleet: BTreeMap<&str, Vec<&Removal>> = BTreeMap::new();
    for removal in &report.removed {
        by_fleet.entry(removal.fleet.as_str()).or_default().push(removal);
    }
    for (fleet, removals) in by_fleet {
        let newest = store.rollouts(&RolloutFilter {
            fleet: Some(fleet.to_owned()),
            limit: Some(1),
            ..RolloutFilter::default()
        })?;
        let bytes: u64 = removals.iter().map(|r| r.bytes).sum();
        tracing::info!(fleet, removed = removals.len(), bytes, "Garbage collected.");
        let Some(rollout) = newest.first().map(|r| r.id) else { continue };
        for removal in &removals {
            event(store, rollout, removal)?;
        }
        let count = |kind| removals.iter().filter(|r| r.kind == kind).count();
        store.append_event(
            rollout,
            Level::Info,
            EventKind::Gc,
            format!(
                "garbage collected {} image(s), {} instance dir(s), {} repo copy(ies): {} freed",
                count(Kind::Image),
                count(Kind::Instance),
                count(Kind::RepoCopy),
                human_bytes(bytes)
            ),
            Some(serde_json::json!({ "removed": removals.len(), "bytes": bytes })),
        )?;
    }
    let mut totals: Totals = store.get_meta(TOTALS_KEY)?.unwrap_or_default();
    totals.runs += 1;
    totals.removed += report.removed.len() as u64;
    totals.bytes += report.bytes;
    totals.compacted_events += report.compacted.events;
    store.set_meta(TOTALS_KEY, &totals)?;
    store.set_meta(LAST_KEY, report)?;
    Ok(())
}

/// Compacts the event streams of rollouts that ended before `now - input.compact_after` (see
/// `store/compact.rs`): the history keeps every rollout, its commit, image and outcome, and
/// stops growing by the events of old ones.
fn compact(store: &Store, input: &Input, report: &mut Report) -> Result<(), GcError> {
    let Some(age) = input.compact_after else { return Ok(()) };
    let Ok(age) = chrono::Duration::from_std(age) else { return Ok(()) };
    let Some(cutoff) = crate::model::now().checked_sub_signed(age) else { return Ok(()) };
    report.compacted = store.compact_events(cutoff, COMPACT_BUDGET)?;
    report.more |= report.compacted.more;
    if report.compacted.rollouts > 0 {
        tracing::info!(
            rollouts = report.compacted.rollouts,
            events = report.compacted.events,
            "Compacted the event streams of old rollouts."
        );
    }
    Ok(())
}

/// Compaction alone, for `kiln gc` on a stopped daemon's data dir: runs it until nothing more
/// is due and records the run like the daemon's (`GET /api/v1/gc`, totals).
pub fn compact_only(store: &Store, compact_after: Duration) -> Result<Report, GcError> {
    let input = Input { compact_after: Some(compact_after), ..Input::default() };
    let mut report = Report { at: Some(crate::model::now()), ..Report::default() };
    loop {
        let mut run = Report::default();
        compact(store, &input, &mut run)?;
        report.compacted.rollouts += run.compacted.rollouts;
        report.compacted.events += run.compacted.events;
        if !run.compacted.more {
            break;
        }
    }
    record(store, &report)?;
    Ok(report)
}

fn event(store: &Store, rollout: RolloutId, removal: &Removal) -> Result<(), StoreError> {
    store.append_event(
        rollout,
        Level::Info,
        EventKind::GcRemoved,
        format!(
            "removed {} {} ({})",
            removal.kind.noun(),
            removal.path.display(),
            human_bytes(removal.bytes)
        ),
        Some(serde_json::json!({
            "kind": removal.kind, "path": removal.path, "bytes": removal.bytes,
        })),
    )?;
    Ok(())
}

/// `512 B`, `12.3 KiB`, `4.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Display only: the precision lost converting to f64 is irrelevant here.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The directories GC works in, resolved once, and the checks every path passes.
struct Roots {
    /// The data dir, as given (image ids carry this spelling).
    data_dir: PathBuf,
    /// The data dir with symlinks resolved (`None` if it does not exist).
    real: Option<PathBuf>,
}

impl Roots {
    fn new(data_dir: &Path) -> Roots {
        Roots { data_dir: data_dir.to_owned(), real: std::fs::canonicalize(data_dir).ok() }
    }

    fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    fn fleet_dir(&self, fleet: &str) -> Option<PathBuf> {
        single_component(fleet).then(|| self.data_dir.join("fleets").join(fleet))
    }

    /// Names of the directories under `fleets/`.
    fn fleet_dirs(&self) -> Vec<String> {
        list(&self.data_dir.join("fleets"))
            .into_iter()
            .filter(|(_, meta)| meta.is_dir())
            .filter_map(|(path, _)| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// The path of an image id naming a direct entry of `images/`, else `None` (an AMI id, a
    /// path elsewhere, anything with `..`).
    fn image_path(&self, image: &ImageRef) -> Option<PathBuf> {
        let path = Path::new(image.as_str());
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return None;
        }
        let name = path.file_name()?.to_str()?;
        if !single_component(name) {
            return None;
        }
        let parent = path.parent()?;
        let images = self.images_dir();
        let same = parent == images
            || match (std::fs::canonicalize(parent), std::fs::canonicalize(&images)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
        same.then(|| path.to_owned())
    }

    /// Images named by instance records that are not terminated, in every fleet.
    fn instance_images(&self) -> BTreeSet<ImageRef> {
        let mut images = BTreeSet::new();
        for fleet in self.fleet_dirs() {
            let Some(dir) = self.fleet_dir(&fleet) else { continue };
            for (path, meta) in list(&dir.join("instances")) {
                if !meta.is_dir() {
                    continue;
                }
                match read_instance(&path) {
                    Some(record) if record.terminated_and_dead() => {}
                    Some(record) => {
                        if let Some(image) = record.image {
                            images.insert(ImageRef(image));
                        }
                    }
                    // Being created, or unreadable: its image is unknown, and it may be any.
                    None => {}
                }
            }
        }
        images
    }

    /// Directories of instances whose record says terminated and whose process is gone.
    fn terminated_instances(&self, fleet: &str) -> Vec<PathBuf> {
        let Some(dir) = self.fleet_dir(fleet) else { return Vec::new() };
        list(&dir.join("instances"))
            .into_iter()
            .filter(|(path, meta)| {
                meta.is_dir() && read_instance(path).is_some_and(|r| r.terminated_and_dead())
            })
            .map(|(path, _)| path)
            .collect()
    }

    /// The exec provider's repo copies of a fleet (directories named like a commit id).
    fn repo_copies(&self, fleet: &str) -> Vec<PathBuf> {
        let Some(dir) = self.fleet_dir(fleet) else { return Vec::new() };
        list(&dir.join("provider"))
            .into_iter()
            .filter(|(path, meta)| {
                meta.is_dir()
                    && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        (n.len() == 40 || n.len() == 64) && n.bytes().all(|b| b.is_ascii_hexdigit())
                    })
            })
            .map(|(path, _)| path)
            .collect()
    }

    /// Where `kind` entries of `fleet` must live.
    fn parent_of(&self, kind: Kind, fleet: &str) -> Option<PathBuf> {
        match kind {
            Kind::Image => Some(self.images_dir()),
            Kind::Instance => self.fleet_dir(fleet).map(|d| d.join("instances")),
            Kind::RepoCopy => self.fleet_dir(fleet).map(|d| d.join("provider")),
        }
    }

    /// Removes `path` after checking it is a direct entry of the directory its kind lives in,
    /// that this directory resolves to inside the data dir, and without following a link.
    /// `Ok(None)` when it is already gone; else the bytes freed.
    fn remove(&self, kind: Kind, fleet: &str, path: &Path) -> Result<Option<u64>, String> {
        let parent = self.parent_of(kind, fleet).ok_or("bad fleet name")?;
        let name = path.file_name().and_then(|n| n.to_str()).ok_or("no file name")?;
        let real_parent = match std::fs::canonicalize(&parent) {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        // The path may spell the directory differently (a symlinked data dir): compare both.
        let given = path.parent().ok_or("no parent")?;
        let same = given == parent || std::fs::canonicalize(given).is_ok_and(|g| g == real_parent);
        if !single_component(name) || !same {
            return Err(format!("refused: not an entry of {}", parent.display()));
        }
        let inside = self.real.as_ref().is_some_and(|root| real_parent.starts_with(root));
        if !inside {
            return Err(format!("refused: {} leads outside the data dir", parent.display()));
        }
        let target = real_parent.join(name);
        let meta = match std::fs::symlink_metadata(&target) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let bytes = size(&target, &meta);
        let res = if meta.is_dir() {
            std::fs::remove_dir_all(&target)
        } else {
            // A file or a symlink: the link itself goes, never its target.
            std::fs::remove_file(&target)
        };
        match res {
            Ok(()) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Whether `name` is one plain path component (no `/`, not `.`/`..`, not hidden).
fn single_component(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.') && name != ".."
}

/// Entries of `dir` with their own (not followed) metadata; empty when unreadable.
fn list(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            std::fs::symlink_metadata(&path).ok().map(|m| (path, m))
        })
        .collect()
}

/// Bytes under `path` (files' lengths; links counted as themselves, never followed).
fn size(path: &Path, meta: &std::fs::Metadata) -> u64 {
    if !meta.is_dir() {
        return meta.len();
    }
    list(path).iter().map(|(child, meta)| size(child, meta)).sum()
}

/// The parts of a local instance record GC reads (parsed loosely, so it survives the record
/// growing fields).
#[derive(Debug, Deserialize)]
struct InstanceView {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    process: Option<crate::hooks::process::ProcessRef>,
}

impl InstanceView {
    fn terminated_and_dead(&self) -> bool {
        self.state.as_deref() == Some("terminated") && !self.process.is_some_and(|p| p.alive())
    }
}

fn read_instance(dir: &Path) -> Option<InstanceView> {
    let file = dir.join("instance.json");
    let meta = std::fs::symlink_metadata(&file).ok()?;
    if !meta.is_file() {
        return None;
    }
    serde_json::from_slice(&std::fs::read(&file).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 + 1), "5.0 MiB");
    }

    #[test]
    fn image_paths_must_be_direct_entries_of_the_image_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("images")).expect("mkdir");
        let roots = Roots::new(dir.path());
        let images = dir.path().join("images");
        let ok = ImageRef(images.join("web-app-1").display().to_string());
        assert!(roots.image_path(&ok).is_some());
        for bad in [
            "ami-123".to_owned(),
            images.join("a/b").display().to_string(),
            images.join("../db").display().to_string(),
            images.join(".tmp").display().to_string(),
            dir.path().join("db").display().to_string(),
        ] {
            assert!(roots.image_path(&ImageRef(bad.clone())).is_none(), "{bad}");
        }
    }
}
