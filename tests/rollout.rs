//! The rollout engine against the real local provider: real instance processes, kiln's real
//! load balancer, real HTTP traffic through it while instances are replaced.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln::manifest::Fleet;
use kiln::metrics::Metrics;
use kiln::model::{ImageRef, Revision, RolloutId, SystemClock};
use kiln::provider::local::{LocalConfig, LocalProvider, lb};
use kiln::provider::{Provider as _, SharedProvider};
use kiln::rollout::driver::{Control, DriverEnv, drive};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::store::{InstanceAction, Store};
use support::fleet::{AppKind, get, have_python3, http_client, wait_for, write_app_image_kind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long any single rollout in these tests may take before the test fails.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

const MANIFEST: &str = r#"
fleets:
  - name: web
    image:
      stages:
        - { name: app, path: image/app, bake: hooks/bake }
    rollout:
      capacity: 3
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: { http: /healthz, interval: 200ms, healthyThreshold: 2, timeout: 15s }
      minHealthy: 200ms
      drain: 300ms
      onFailure: rollback
      loadBalancer: { port: 0 }
"#;

fn fleet() -> Fleet {
    let manifest = kiln::manifest::parse(MANIFEST, "kiln.yaml").expect("test manifest parses");
    manifest.fleets.into_iter().next().expect("one fleet")
}

/// Whether the kiln binary knows `kiln lb`; if not, the LB runs in a task of this process.
fn kiln_has_lb() -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["lb", "--help"])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--state-dir")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One test's world: temp dir, store, local provider, images.
struct World {
    _tmp: tempfile::TempDir,
    fleet_dir: PathBuf,
    port: u16,
    env: DriverEnv,
    fleet: Fleet,
    provider: Arc<LocalProvider>,
    in_process_lb: CancellationToken,
    images: PathBuf,
}

impl World {
    async fn new() -> World {
        World::with_fleet(fleet(), None).await
    }

    /// A world for `fleet`, with the store in `store_dir` (default: the data dir).
    async fn with_fleet(fleet: Fleet, store_dir: Option<&Path>) -> World {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let store = Store::open(store_dir.unwrap_or(&data), 0).expect("store opens");
        let env = DriverEnv {
            store,
            mirror: data.join("mirror.git"),
            data_dir: data.clone(),
            hook_env: Vec::new(),
            metrics: Arc::new(Metrics::default()),
            clock: Arc::new(SystemClock),
            slots: kiln::pipeline::Slots::default(),
        };
        let fleet_dir = data.join("fleets").join("web");
        let port = free_port();
        let in_process_lb = CancellationToken::new();
        let provider = Arc::new(open_local(&fleet_dir, port, &in_process_lb).await);
        let images = tmp.path().join("images");
        World { _tmp: tmp, fleet_dir, port, env, fleet, provider, in_process_lb, images }
    }

    fn image(&self, name: &str, kind: AppKind) -> ImageRef {
        ImageRef(write_app_image_kind(&self.images, name, kind).display().to_string())
    }

    fn shared(&self) -> SharedProvider {
        self.provider.clone()
    }

    /// Records a rollout onto `image` (already baked) from `previous`.
    fn rollout(&self, image: &ImageRef, previous: Option<&ImageRef>) -> RolloutId {
        let record = Rollout {
            id: RolloutId(0),
            fleet: Some("web".into()),
            revision: Revision("0123456789abcdef0123456789abcdef01234567".into()),
            summary: "test rollout".into(),
            trigger: "test".into(),
            origin: Origin::Commit,
            state: RolloutState::Pending,
            paused_from: None,
            plan: Plan { bake: vec![], reconcile: false, roll: true, reason: "test".into() },
            image: Some(image.clone()),
            stage_images: BTreeMap::new(),
            previous_image: previous.cloned(),
            outputs: BTreeMap::new(),
            reason: None,
            created_at: kiln::model::now(),
            started_at: None,
            finished_at: None,
            not_before: None,
            attempt: 0,
            rolling: None,
            verified: None,
        };
        self.env.store.create_rollout(record).expect("rollout recorded").id
    }

    async fn drive(&self, id: RolloutId) -> RolloutState {
        let (_tx, rx) = watch::channel(Control::Run);
        let trees = BTreeMap::from([("image/".to_owned(), "tree".to_owned())]);
        let drive = drive(&self.env, &self.fleet, self.shared(), id, trees, rx);
        let state = tokio::time::timeout(ROLLOUT_TIMEOUT, drive)
            .await
            .unwrap_or_else(|_| panic!("rollout #{id} did not finish within {ROLLOUT_TIMEOUT:?}"))
            .expect("drive succeeds");
        if state == RolloutState::Failed {
            let reason = self.env.store.rollout(id).ok().and_then(|r| r.reason);
            eprintln!("rollout #{id} failed: {reason:?}");
        }
        state
    }

    /// Images of the running instances, and whether all are attached.
    async fn fleet_images(&self) -> (Vec<String>, bool) {
        let instances = self.provider.list().await.expect("list");
        let running: Vec<_> = instances.iter().filter(|i| i.running).collect();
        (running.iter().map(|i| i.image.0.clone()).collect(), running.iter().all(|i| i.attached))
    }

    fn lb_url(&self) -> String {
        self.provider.endpoint().unwrap_or_else(|| format!("http://127.0.0.1:{}", self.port))
    }

    async fn shutdown(&self) {
        for instance in self.provider.list().await.unwrap_or_default() {
            let _ = self.provider.terminate(&instance.id).await;
        }
        self.provider.stop_load_balancer().await;
        self.in_process_lb.cancel();
    }
}

/// Opens a local provider on `dir`, serving the LB in-process when the binary cannot yet.
async fn open_local(dir: &Path, port: u16, in_process: &CancellationToken) -> LocalProvider {
    std::fs::create_dir_all(dir).expect("fleet dir");
    if !kiln_has_lb() && lb::read_state(&dir.join("lb")).is_none() {
        eprintln!("NOTE: `kiln lb` is not wired into the CLI yet; serving the LB in-process");
        let args = lb::LbArgs { port, ..lb::LbArgs::new(dir.join("lb")) };
        let token = in_process.clone();
        tokio::spawn(async move { lb::serve(args, token).await.expect("in-process lb") });
        let lb_dir = dir.join("lb");
        wait_for("the in-process LB to write lb.json", Duration::from_secs(10), || {
            let state = lb::read_state(&lb_dir);
            async move { state.map(|_| ()) }
        })
        .await;
    }
    let config = LocalConfig {
        fleet: "web".to_owned(),
        dir: dir.to_owned(),
        lb_port: port,
        kiln_exe: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    };
    LocalProvider::open(config).await.expect("open local provider")
}

/// Sends requests through the load balancer until stopped; returns every (status, body), with
/// status 0 for a connection error.
struct Hammer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(u16, String)>>,
}

impl Hammer {
    fn start(url: String) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client = http_client();
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let answer = get(&client, &url).await.unwrap_or((0, String::new()));
                seen.push(answer);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        });
        Hammer { stop, task }
    }

    async fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the traffic task stops")
            .expect("the traffic task does not panic")
    }
}

fn failures(seen: &[(u16, String)]) -> Vec<&(u16, String)> {
    seen.iter().filter(|(status, _)| !(200..300).contains(status)).collect()
}

fn names(image: &ImageRef) -> String {
    format!("image={image} ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolls_a_fleet_onto_a_new_image_without_dropping_requests() {
    if !have_python3() {
        return;
    }
    let world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Healthy);

    // First deploy: an empty fleet gets `capacity` instances.
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![a.0.clone(); 3]);
    assert!(attached);
    let deployed = world.env.store.deployed("web").expect("read deployed").expect("deployed set");
    assert_eq!(deployed.image, a);

    // Roll to B while a client hammers the load balancer.
    let hammer = Hammer::start(world.lb_url());
    wait_for("traffic through the LB", Duration::from_secs(10), || async {
        get(&http_client(), &world.lb_url()).await.filter(|(s, _)| *s == 200).map(|_| ())
    })
    .await;
    let second = world.rollout(&b, Some(&a));
    let started = tokio::time::Instant::now();
    assert_eq!(world.drive(second).await, RolloutState::Succeeded);
    eprintln!(
        "rolled 3 instances A → B in {:?} (drain 300ms, 2 probes at 200ms)",
        started.elapsed()
    );
    // Keep the traffic going a moment after the switch, to see B answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = hammer.finish().await;
    assert!(seen.len() > 20, "too little traffic to judge: {}", seen.len());
    assert!(
        failures(&seen).is_empty(),
        "failed requests during the rollout: {:?}",
        failures(&seen)
    );
    let first_b = seen.iter().position(|(_, body)| body.contains(&names(&b)));
    let last_a = seen.iter().rposition(|(_, body)| body.contains(&names(&a)));
    assert!(seen.first().is_some_and(|(_, body)| body.contains(&names(&a))), "A answered first");
    assert!(seen.last().is_some_and(|(_, body)| body.contains(&names(&b))), "B answers last");
    assert!(first_b.is_some() && last_a.is_some(), "both images answered");

    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![b.0.clone(); 3]);
    assert!(attached);

    // The journal and the timeline tell the story.
    let journal = world.env.store.instance_journal("web").expect("journal");
    let count = |action: InstanceAction, image: &ImageRef| {
        journal
            .iter()
            .filter(|e| {
                e.action == action && e.image.as_ref() == Some(image) && e.rollout == Some(second)
            })
            .count()
    };
    assert_eq!(count(InstanceAction::Launched, &b), 3);
    assert_eq!(count(InstanceAction::Attached, &b), 3);
    assert_eq!(count(InstanceAction::Drained, &a), 3);
    assert_eq!(count(InstanceAction::Terminated, &a), 3);
    let events = world.env.store.events(second, 0).expect("events");
    assert!(events.iter().any(|e| e.kind == "instance.launched"));
    assert!(
        events.iter().any(|e| e.kind == "state" && e.message.starts_with("rolling → succeeded"))
    );

    // Re-running a converged rollout is a no-op.
    let again = world.rollout(&b, Some(&a));
    assert_eq!(world.drive(again).await, RolloutState::Succeeded);
    let journal = world.env.store.instance_journal("web").expect("journal");
    assert!(journal.iter().all(|e| e.rollout != Some(again)), "no instance touched");

    // An instance lost outside a rollout is replaced by a repair rollout onto the same image,
    // driven by the same machine as a deploy.
    let victim = world.provider.list().await.expect("list")[0].clone();
    world.provider.terminate(&victim.id).await.expect("terminate");
    let repair = world.rollout(&b, Some(&b));
    assert_eq!(world.drive(repair).await, RolloutState::Succeeded);
    let journal = world.env.store.instance_journal("web").expect("journal");
    let by_repair =
        |action| journal.iter().filter(|e| e.rollout == Some(repair) && e.action == action).count();
    assert_eq!(by_repair(InstanceAction::Launched), 1, "one replacement: {journal:?}");
    assert_eq!(by_repair(InstanceAction::Attached), 1);
    assert_eq!(by_repair(InstanceAction::Terminated), 0, "no healthy instance touched");
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![b.0.clone(); 3]);
    assert!(attached);
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_image_rolls_back_without_failed_requests() {
    if !have_python3() {
        return;
    }
    let world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Unhealthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);

    let hammer = Hammer::start(world.lb_url());
    let bad = world.rollout(&b, Some(&a));
    assert_eq!(world.drive(bad).await, RolloutState::RolledBack);
    let seen = hammer.finish().await;
    assert!(failures(&seen).is_empty(), "failed requests: {:?}", failures(&seen));
    assert!(seen.iter().all(|(_, body)| body.contains(&names(&a))), "only A ever answered");

    let record = world.env.store.rollout(bad).expect("rollout");
    let reason = record.reason.unwrap_or_default();
    assert!(reason.contains("GET /healthz on 127.0.0.1:"), "{reason}");
    assert!(reason.contains(": 500"), "{reason}");
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![a.0.clone(); 3]);
    assert!(attached);
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_the_driver_is_dropped_mid_rollout() {
    if !have_python3() {
        return;
    }
    let world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Healthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);

    // Watch the instance count the whole time.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let provider = world.shared();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while watching.load(Ordering::Relaxed) {
                if let Ok(list) = provider.list().await {
                    max = max.max(list.iter().filter(|i| i.running).count());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            max
        })
    };

    let id = world.rollout(&b, Some(&a));
    for cut in 0..2 {
        // Drop the driver once the rollout is visibly mid-way (a B instance launched).
        let (_tx, rx) = watch::channel(Control::Run);
        let env = world.env.clone();
        let fleet = world.fleet.clone();
        let provider = world.shared();
        let task =
            tokio::spawn(
                async move { drive(&env, &fleet, provider, id, BTreeMap::new(), rx).await },
            );
        let launched_before = cut + 1;
        wait_for("a B instance to launch", ROLLOUT_TIMEOUT, || async {
            let journal = world.env.store.instance_journal("web").expect("journal");
            let n = journal
                .iter()
                .filter(|e| e.rollout == Some(id) && e.action == InstanceAction::Launched)
                .count();
            (n >= launched_before).then_some(())
        })
        .await;
        task.abort();
        let _ = task.await;
    }
    // A "restarted daemon": a fresh provider on the same state, the same store.
    let reopened: SharedProvider =
        Arc::new(open_local(&world.fleet_dir, world.port, &world.in_process_lb).await);
    let (_tx, rx) = watch::channel(Control::Run);
    let state = tokio::time::timeout(
        ROLLOUT_TIMEOUT,
        drive(&world.env, &world.fleet, reopened.clone(), id, BTreeMap::new(), rx),
    )
    .await
    .expect("the resumed rollout finishes")
    .expect("drive succeeds");
    assert_eq!(state, RolloutState::Succeeded);
    watching.store(false, Ordering::Relaxed);
    let max = watcher.await.expect("watcher");
    assert!(max <= 4, "more than capacity + surge instances at once: {max}");

    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![b.0.clone(); 3]);
    assert!(attached);
    // No duplicate launch: exactly three B instances were ever created.
    let created_b = std::fs::read_dir(world.fleet_dir.join("instances"))
        .expect("instances dir")
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("instance.json"))
                .is_ok_and(|text| text.contains(&format!("\"image\": \"{b}\"")))
        })
        .count();
    assert_eq!(created_b, 3, "B instances ever created");
    world.shutdown().await;
}

/// Drives `id` in a task and sends `control` once the rollout has launched its first instance;
/// returns the state the driver stopped in.
async fn drive_and_send(world: &World, id: RolloutId, control: Control) -> RolloutState {
    let (tx, rx) = watch::channel(Control::Run);
    let env = world.env.clone();
    let fleet = world.fleet.clone();
    let provider = world.shared();
    let task =
        tokio::spawn(async move { drive(&env, &fleet, provider, id, BTreeMap::new(), rx).await });
    wait_for("the rollout to launch an instance", ROLLOUT_TIMEOUT, || async {
        let journal = world.env.store.instance_journal("web").expect("journal");
        journal
            .iter()
            .any(|e| e.rollout == Some(id) && e.action == InstanceAction::Launched)
            .then_some(())
    })
    .await;
    tx.send(control).expect("the driver listens");
    tokio::time::timeout(ROLLOUT_TIMEOUT, task)
        .await
        .expect("the driver stops at a safe point")
        .expect("the driver task does not panic")
        .expect("drive succeeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_supersede_stop_at_safe_points() {
    if !have_python3() {
        return;
    }
    let world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Healthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);

    // Pause mid-rollout: the replacement in flight finishes, nothing is left half done.
    let id = world.rollout(&b, Some(&a));
    assert_eq!(drive_and_send(&world, id, Control::Pause).await, RolloutState::Paused);
    let record = world.env.store.rollout(id).expect("rollout");
    assert_eq!(record.paused_from, Some(RolloutState::Rolling));
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images.len(), 3, "capacity kept while paused: {images:?}");
    assert!(attached, "no instance left out of the LB");
    // Driving a paused rollout with Run resumes it.
    assert_eq!(world.drive(id).await, RolloutState::Succeeded);
    assert_eq!(world.fleet_images().await.0, vec![b.0.clone(); 3]);

    // Superseded while rolling back to A: ends after the replacement in flight.
    let back = world.rollout(&a, Some(&b));
    let state = drive_and_send(&world, back, Control::Supersede(RolloutId(999))).await;
    assert_eq!(state, RolloutState::Superseded);
    let record = world.env.store.rollout(back).expect("rollout");
    let reason = record.reason.unwrap_or_default();
    assert!(reason.contains("superseded by rollout #999"), "{reason}");
    assert!(reason.contains("fleet left as is"), "{reason}");
    assert!(record.finished_at.is_some());
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images.len(), 3, "{images:?}");
    assert!(attached);
    world.shutdown().await;
}

/// Where a full-disk test keeps its store: a small tmpfs that is really filled, or (when this
/// process may not mount one) a temp dir with kiln's injected write fault.
enum Disk {
    Tmpfs(support::disk::SmallDisk),
    Injected(tempfile::TempDir),
}

impl Disk {
    fn new() -> Disk {
        match support::disk::SmallDisk::mount(8) {
            Ok(disk) => Disk::Tmpfs(disk),
            Err(why) => {
                eprintln!("NOTE: cannot mount a tmpfs ({why}); injecting the store fault instead");
                Disk::Injected(tempfile::tempdir().expect("temp dir"))
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            Disk::Tmpfs(disk) => disk.path(),
            Disk::Injected(dir) => dir.path(),
        }
    }

    fn fill(&self, store: &Store) {
        match self {
            Disk::Tmpfs(disk) => {
                let filled = disk.fill();
                assert!(disk.is_full(), "the disk is full after {filled} bytes of filler");
            }
            Disk::Injected(_) => store.inject_write_fault(true),
        }
    }

    fn free(&self, store: &Store) {
        match self {
            Disk::Tmpfs(disk) => disk.free(),
            Disk::Injected(_) => store.inject_write_fault(false),
        }
    }
}

/// Issue 10: on a full disk the store's error stuck after space was freed (sled refuses all IO
/// once it saw an IO error). A failed write is reported (`Store::failure`, what `/healthz`
/// shows) and the store works again once space returns, keeping everything written before.
#[test]
fn a_store_on_a_full_disk_reports_the_failure_and_recovers() {
    let disk = Disk::new();
    let store = Store::open(disk.path(), 0).expect("store opens on the small disk");
    let record = |n: usize| Rollout {
        summary: "x".repeat(4096),
        ..Rollout::new(
            Some("web".into()),
            Revision(format!("{n:040}")),
            String::new(),
            "test".into(),
            Origin::Commit,
            kiln::model::now(),
        )
    };
    let before: Vec<RolloutId> =
        (0..3).map(|n| store.create_rollout(record(n)).expect("write before full").id).collect();
    disk.fill(&store);
    let mut error = None;
    for n in 3..2000 {
        if let Err(e) = store.create_rollout(record(n)) {
            error = Some(e);
            break;
        }
    }
    let error = error.expect("a write fails on a full disk");
    eprintln!("write on the full disk: {}", kiln::error::chain(&error));
    let failure = store.failure().expect("the store reports the failure");
    assert!(failure.error.contains("No space left on device"), "{failure:?}");
    // Still failing while the disk is full.
    assert!(store.heal().is_err());
    assert!(store.failure().is_some());

    disk.free(&store);
    // The daemon heals on every tick; sled's flusher thread lets go of the old handle's file
    // lock a moment after it is dropped, so the first reopen may still find it held.
    let mut healed = store.heal();
    for _ in 0..100 {
        if healed.is_ok() {
            break;
        }
        #[allow(clippy::disallowed_methods)] // A plain test thread, no runtime to block.
        std::thread::sleep(std::time::Duration::from_millis(50));
        healed = store.heal();
    }
    healed.expect("the store writes again once space is back");
    assert!(store.failure().is_none());
    let after = store.create_rollout(record(9999)).expect("a write after recovery").id;
    drop(store);
    let store = Store::open(disk.path(), 0).expect("reopens");
    for id in before.iter().chain([&after]) {
        store.rollout(*id).unwrap_or_else(|e| panic!("rollout #{id} kept: {e}"));
    }
}

/// Drives `id` in a task; returns its handle.
fn spawn_drive(
    world: &World,
    id: RolloutId,
    rx: watch::Receiver<Control>,
) -> tokio::task::JoinHandle<Result<RolloutState, kiln::rollout::driver::DriveError>> {
    let env = world.env.clone();
    let fleet = world.fleet.clone();
    let provider = world.shared();
    tokio::spawn(async move { drive(&env, &fleet, provider, id, BTreeMap::new(), rx).await })
}

/// Journal entries of `rollout` with `action`.
fn journaled(
    world: &World,
    rollout: RolloutId,
    action: InstanceAction,
) -> Vec<kiln::store::InstanceEvent> {
    let journal = world.env.store.instance_journal("web").expect("journal");
    journal.into_iter().filter(|e| e.rollout == Some(rollout) && e.action == action).collect()
}

/// Issue 10: once the store hit "No space left on device" mid-rollout, the driver stopped for
/// good and the rollout stayed `rolling` forever. Now the driver retries with backoff, the
/// store reports the failure meanwhile, and the rollout completes once space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumes_after_the_store_fails_mid_way() {
    if !have_python3() {
        return;
    }
    let disk = Disk::new();
    let world = World::with_fleet(fleet(), Some(disk.path())).await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Healthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);

    let id = world.rollout(&b, Some(&a));
    let (_tx, rx) = watch::channel(Control::Run);
    let task = spawn_drive(&world, id, rx);
    wait_for("a B instance to launch", ROLLOUT_TIMEOUT, || async {
        (!journaled(&world, id, InstanceAction::Launched).is_empty()).then_some(())
    })
    .await;
    disk.fill(&world.env.store);
    let failure = wait_for("the store to report the failure", ROLLOUT_TIMEOUT, || async {
        world.env.store.failure()
    })
    .await;
    eprintln!("store failing: {failure:?}");
    // Nothing moves while the store cannot record it: the driver keeps retrying.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "the driver gave up on a failing store: {:?}", task.await);
    assert!(world.env.store.failure().is_some(), "still failing while the disk is full");
    disk.free(&world.env.store);

    let state = tokio::time::timeout(ROLLOUT_TIMEOUT, task)
        .await
        .expect("the rollout finishes once the store works again")
        .expect("the driver task does not panic")
        .expect("drive succeeds");
    assert_eq!(state, RolloutState::Succeeded);
    assert!(world.env.store.failure().is_none(), "the failure cleared");
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![b.0.clone(); 3]);
    assert!(attached);
    let deployed = world.env.store.deployed("web").expect("read").expect("deployed");
    assert_eq!(deployed.rollout, id, "the deployment was recorded");
    // Exactly one launch per slot: no side effect was repeated without its record.
    let launched: std::collections::BTreeSet<String> =
        journaled(&world, id, InstanceAction::Launched)
            .iter()
            .map(|e| e.instance.0.clone())
            .collect();
    assert_eq!(launched.len(), 3, "{launched:?}");
    world.shutdown().await;
}

/// Issue 10: an instance that failed its health checks was journaled `terminated: replaced`
/// and counted in `kiln_instances_replaced_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_its_checks_is_journaled_unhealthy_and_counted_failed() {
    if !have_python3() {
        return;
    }
    let world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Unhealthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);
    let metrics_before = world.env.metrics.render(&BTreeMap::new());
    let bad = world.rollout(&b, Some(&a));
    assert_eq!(world.drive(bad).await, RolloutState::RolledBack);

    let unhealthy = journaled(&world, bad, InstanceAction::Unhealthy);
    assert!(!unhealthy.is_empty(), "a failed instance is journaled unhealthy");
    for entry in &unhealthy {
        assert_eq!(entry.image.as_ref(), Some(&b));
        let reason = entry.reason.clone().unwrap_or_default();
        assert!(reason.starts_with("GET /healthz on 127.0.0.1:"), "the failed probe: {reason}");
        assert!(reason.ends_with(": 500"), "with its status: {reason}");
    }
    let terminated = journaled(&world, bad, InstanceAction::Terminated);
    for entry in terminated.iter().filter(|e| e.image.as_ref() == Some(&b)) {
        assert_eq!(entry.reason.as_deref(), Some("unhealthy"), "{entry:?}");
    }
    let metrics = world.env.metrics.render(&BTreeMap::new());
    let value = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        value(&metrics, "kiln_instances_failed_total"),
        unhealthy.len() as u64,
        "every failed instance counted"
    );
    assert_eq!(
        value(&metrics, "kiln_instances_replaced_total"),
        value(&metrics_before, "kiln_instances_replaced_total"),
        "no instance was replaced: the old ones never left"
    );
    world.shutdown().await;
}

/// Issue 9: `abort` was ignored while a new instance waited out a long `minHealthy`; the
/// rollout ran on to its progress deadline. Verbs act at the next step: the unproven instance
/// is terminated, the fleet is back on the stable image and the rollout ends `aborted`, long
/// before minHealthy (10 min) is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_a_long_min_healthy_ends_the_rollout_promptly() {
    if !have_python3() {
        return;
    }
    let long = MANIFEST
        .replace("minHealthy: 200ms", "minHealthy: 10m")
        .replace("onFailure: rollback", "onFailure: rollback\n      progressDeadline: 30m");
    let manifest = kiln::manifest::parse(&long, "kiln.yaml").expect("test manifest parses");
    let slow = manifest.fleets.into_iter().next().expect("one fleet");
    assert_eq!(slow.rollout.min_healthy, Duration::from_secs(600));
    // The first deploy (onto an empty fleet) uses the quick policy.
    let mut world = World::new().await;
    let a = world.image("a", AppKind::Healthy);
    let b = world.image("b", AppKind::Healthy);
    let first = world.rollout(&a, None);
    assert_eq!(world.drive(first).await, RolloutState::Succeeded);
    world.fleet = slow;

    let id = world.rollout(&b, Some(&a));
    let (tx, rx) = watch::channel(Control::Run);
    let task = spawn_drive(&world, id, rx);
    wait_for(
        "a new instance to pass its checks and wait out minHealthy",
        ROLLOUT_TIMEOUT,
        || async {
            let rollout = world.env.store.rollout(id).expect("rollout");
            let rolling = rollout.rolling?;
            rolling.probes.values().any(|p| p.healthy_since.is_some()).then_some(())
        },
    )
    .await;
    tx.send(Control::Abort).expect("the driver listens");
    let state = tokio::time::timeout(ROLLOUT_TIMEOUT, task)
        .await
        .expect("the abort ends the rollout without waiting out minHealthy (10m)")
        .expect("the driver task does not panic")
        .expect("drive succeeds");
    assert_eq!(state, RolloutState::Aborted);
    let record = world.env.store.rollout(id).expect("rollout");
    let reason = record.reason.unwrap_or_default();
    assert!(reason.contains("aborted by operator"), "{reason}");
    // Issue 17: an abort returns the fleet to the stable image (here: it never left it).
    assert!(reason.contains("back on the stable image"), "{reason}");
    assert!(journaled(&world, id, InstanceAction::Attached).is_empty(), "nothing attached");
    let terminated = journaled(&world, id, InstanceAction::Terminated);
    assert_eq!(terminated.len(), 1, "the unproven instance was terminated: {terminated:?}");
    assert_eq!(terminated[0].image.as_ref(), Some(&b));
    let (images, attached) = world.fleet_images().await;
    assert_eq!(images, vec![a.0.clone(); 3], "the fleet is left on A");
    assert!(attached);
    world.shutdown().await;
}
