//! Test support: hooks. Scripts written into temp dirs, a [`Harness`] holding what a
//! `StepContext` borrows (store, metrics, cancellation, data dir), and small waits.
//!
//! ```ignore
//! let h = Harness::new();
//! let fleet = fleet_from_yaml(YAML);
//! let revision = Revision::from(sha.as_str());
//! let baked = kiln::pipeline::bake::bake_fleet(&h.cx(&fleet, &revision, repo.bare_path())).await?;
//! assert!(h.kinds().contains(&"bake.done".to_owned()));
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::manifest::Fleet;
use kiln::metrics::Metrics;
use kiln::model::{Revision, RolloutId};
use kiln::pipeline::StepContext;
use kiln::store::{Event, Store};
use tokio_util::sync::CancellationToken;

/// The rollout id every harness context uses (events are read back by it).
pub const ROLLOUT: RolloutId = RolloutId(7);

/// Writes an executable file (mode 755) at `dir/name`, creating parents.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// The content of one of the repo's ready hooks (`hooks/<name>`), to commit into a test repo.
pub fn shipped_hook(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A fixture under `tests/fixtures/`.
pub fn fixture(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The first fleet of a kiln.yaml text (parsed, not validated against files).
pub fn fleet_from_yaml(yaml: &str) -> Fleet {
    let manifest = kiln::manifest::parse(yaml, "kiln.yaml").expect("manifest parses");
    manifest.fleets.into_iter().next().expect("one fleet")
}

/// Owns everything a `StepContext` borrows.
pub struct Harness {
    /// Keeps the data dir alive.
    pub dir: tempfile::TempDir,
    /// `<dir>/data`.
    pub data_dir: PathBuf,
    /// The store under the data dir.
    pub store: Store,
    /// Metrics observed by steps.
    pub metrics: Metrics,
    pub slots: kiln::pipeline::Slots,
    /// The cancellation token given to steps.
    pub cancel: CancellationToken,
    /// `--hook-env` pairs given to steps.
    pub hook_env: Vec<(String, String)>,
}

impl Harness {
    /// A fresh data dir and store.
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let store = Store::open(&data_dir, 0).expect("store opens");
        Harness {
            dir,
            data_dir,
            store,
            metrics: Metrics::default(),
            slots: kiln::pipeline::Slots::default(),
            cancel: CancellationToken::new(),
            hook_env: Vec::new(),
        }
    }

    /// A step context for `fleet` at `revision`, reading git from `mirror`, rollout [`ROLLOUT`].
    pub fn cx<'a>(
        &'a self,
        fleet: &'a Fleet,
        revision: &'a Revision,
        mirror: &'a Path,
    ) -> StepContext<'a> {
        StepContext {
            store: &self.store,
            rollout: ROLLOUT,
            fleet,
            revision,
            mirror,
            data_dir: &self.data_dir,
            cancel: &self.cancel,
            hook_env: &self.hook_env,
            metrics: &self.metrics,
            slots: &self.slots,
        }
    }

    /// Every event of [`ROLLOUT`], oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.store.events(ROLLOUT, 0).expect("events")
    }

    /// The kinds of [`ROLLOUT`]'s events, oldest first.
    pub fn kinds(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.kind.to_string()).collect()
    }

    /// Events of one kind.
    pub fn of_kind(&self, kind: &str) -> Vec<Event> {
        self.events().into_iter().filter(|e| e.kind == kind).collect()
    }

    /// What is left under `<data dir>/work` (hooks must clean up their work trees).
    pub fn work_leftovers(&self) -> Vec<String> {
        match std::fs::read_dir(self.data_dir.join("work")) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a live process (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    kiln::hooks::process::start_ticks(pid).is_some()
}

/// Whether the external program `name` is on PATH. When it is not, prints a loud SKIP line and
/// returns false, except under `CI=true`, where it panics: CI must never skip silently.
pub fn require_program(test: &str, name: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: `{name}` is not installed (required under CI)");
        }
        eprintln!("SKIP: {test}: `{name}` is not installed; install it to run this test");
    }
    found
}
