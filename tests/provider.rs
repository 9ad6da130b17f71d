//! One contract suite for every provider, run against the local provider and the exec provider
//! (`hooks/provider/local-test`), on real processes and real HTTP.

mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kiln::model::{ImageRef, InstanceId};
use kiln::provider::exec::ExecProvider;
use kiln::provider::local::lb::{self, BackendView};
use kiln::provider::local::{LocalConfig, LocalProvider};
use kiln::provider::{Provider as _, ProviderError, SharedProvider};
use support::fleet::{self, get, http_client, wait_for, wait_healthy};
use tokio_util::sync::CancellationToken;

type Reopen = Box<dyn Fn() -> Pin<Box<dyn Future<Output = SharedProvider> + Send>> + Send + Sync>;

/// What the suite drives.
struct Subject {
    provider: SharedProvider,
    /// A fresh provider on the same state, as after a daemon restart.
    reopen: Reopen,
    /// The load balancer in front of the fleet: (traffic URL, admin URL, admin token).
    lb: (String, String, String),
}

/// Whether the kiln binary knows `kiln lb` (the CLI wires it); if not, the LB runs in-process.
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

/// Opens a local provider on `dir`. When the binary cannot run `kiln lb` yet, the LB is served
/// from a task of this test process first, and `open` adopts it.
async fn open_local(dir: &Path, port: u16, in_process: &CancellationToken) -> LocalProvider {
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

async fn backends(admin: &str, token: &str) -> Vec<BackendView> {
    let client = http_client();
    let reply = client
        .get(format!("{admin}/backends"))
        .bearer_auth(token)
        .send()
        .await
        .expect("admin reachable");
    reply.json().await.expect("backend list")
}

async fn pid_of(address: &str) -> i32 {
    let (_, body) =
        get(&http_client(), &format!("http://{address}/pid")).await.expect("pid answer");
    body.trim().parse().expect("pid")
}

/// The contract every provider meets.
async fn contract(subject: Subject, image_a: &ImageRef, image_b: &ImageRef) {
    let Subject { provider, reopen, lb: (lb_url, admin, token) } = subject;
    let client = http_client();
    assert!(provider.list().await.expect("list").is_empty(), "a new fleet has no instances");

    // Same key twice: one instance.
    let first = provider.launch(image_a, "key-1").await.expect("launch a");
    let again = provider.launch(image_a, "key-1").await.expect("launch a again");
    assert_eq!(first.id, again.id, "a repeated launch key returns the first instance");
    assert_eq!(provider.list().await.expect("list").len(), 1);
    let address_a = first.address.clone().expect("an address");
    wait_healthy(&client, &address_a).await;
    let (_, body) = get(&client, &format!("http://{address_a}/")).await.expect("GET /");
    assert!(body.contains(image_a.as_str()), "the instance names its image: {body}");
    assert!(body.contains(first.id.as_str()), "the instance names its id: {body}");

    let second = provider.launch(image_b, "key-2").await.expect("launch b");
    assert_ne!(first.id, second.id);
    let address_b = second.address.clone().expect("an address");
    wait_healthy(&client, &address_b).await;

    // No backend yet: the LB answers 503.
    let (status, _) = get(&client, &format!("{lb_url}/")).await.expect("LB reachable");
    assert_eq!(status, 503, "an empty LB answers 503");

    // Attach both (twice: idempotent): both serve through the LB.
    for id in [&first.id, &second.id, &first.id] {
        provider.attach(id).await.expect("attach");
    }
    let listed = provider.list().await.expect("list");
    assert!(
        listed.iter().all(|i| i.attached && i.running),
        "both attached and running: {listed:?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let (status, body) = get(&client, &format!("{lb_url}/")).await.expect("GET via LB");
        assert_eq!(status, 200);
        seen.insert(if body.contains(image_a.as_str()) { "a" } else { "b" });
    }
    assert_eq!(seen.len(), 2, "the LB spreads requests over both backends");

    // Detach with drain: requests in flight on the detached backend finish first.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = format!("{lb_url}/slow?ms=1500");
        slow.push(tokio::spawn(async move {
            let reply = client.get(url).timeout(Duration::from_secs(20)).send().await;
            let reply = reply.expect("slow request");
            let backend = reply
                .headers()
                .get("x-kiln-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let status = reply.status().as_u16();
            let _ = reply.text().await;
            (status, backend, tokio::time::Instant::now())
        }));
    }
    let first_id = first.id.to_string();
    wait_for("a slow request in flight on the first instance", Duration::from_secs(10), || {
        let admin = admin.clone();
        let token = token.clone();
        let first_id = first_id.clone();
        async move {
            backends(&admin, &token)
                .await
                .iter()
                .any(|b| b.id == first_id && b.in_flight > 0)
                .then_some(())
        }
    })
    .await;
    provider.detach(&first.id, Duration::from_secs(10)).await.expect("detach");
    let detached_at = tokio::time::Instant::now();
    let mut drained = 0;
    for task in slow {
        let (status, backend, done) = task.await.expect("slow task");
        assert_eq!(status, 200, "no in-flight request fails during a drain");
        if backend == first_id {
            drained += 1;
            assert!(
                done <= detached_at + Duration::from_millis(100),
                "detach returned before its in-flight request finished"
            );
        }
    }
    assert!(drained > 0, "a request was drained from the first instance");
    assert!(
        backends(&admin, &token).await.iter().all(|b| b.id != first_id),
        "detached backend left the LB"
    );
    let listed = provider.list().await.expect("list");
    let a = listed.iter().find(|i| i.id == first.id).expect("first still listed");
    assert!(!a.attached && a.running, "detached but running: {a:?}");
    for _ in 0..6 {
        let (status, body) = get(&client, &format!("{lb_url}/")).await.expect("GET via LB");
        assert_eq!(status, 200);
        assert!(body.contains(image_b.as_str()), "only the attached instance serves: {body}");
    }

    // Terminate: gone from the list, process (and group) dead; twice is fine.
    let pid_a = pid_of(&address_a).await;
    provider.terminate(&first.id).await.expect("terminate");
    provider.terminate(&first.id).await.expect("terminate twice");
    assert!(!fleet::pid_alive(pid_a), "terminated instance's process is gone");
    assert!(!fleet::group_alive(pid_a), "terminated instance's process group is gone");
    let listed = provider.list().await.expect("list");
    assert!(
        listed.iter().all(|i| i.id != first.id),
        "terminated instance left the list: {listed:?}"
    );
    provider
        .terminate(&InstanceId::from("never-existed"))
        .await
        .expect("unknown id is already gone");

    // A restarted daemon re-adopts what is running.
    drop(provider);
    let provider = reopen().await;
    let listed = provider.list().await.expect("list after reopen");
    assert_eq!(listed.len(), 1, "re-adopted: {listed:?}");
    assert!(listed[0].id == second.id && listed[0].running && listed[0].attached, "{listed:?}");
    assert_eq!(provider.launch(image_b, "key-2").await.expect("relaunch").id, second.id);
    let (status, _) = get(&client, &format!("{lb_url}/")).await.expect("GET via LB");
    assert_eq!(status, 200);

    // A dead instance is reported as not running.
    let pid_b = pid_of(&address_b).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_b), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
    let provider_ref = &provider;
    let second_id = second.id.clone();
    wait_for("the killed instance to be reported not running", Duration::from_secs(10), || {
        let second_id = second_id.clone();
        async move {
            let listed = provider_ref.list().await.expect("list");
            listed.iter().any(|i| i.id == second_id && !i.running).then_some(())
        }
    })
    .await;
    provider.terminate(&second.id).await.expect("terminate dead");
    assert!(provider.list().await.expect("list").is_empty());
}

fn images(dir: &Path) -> (ImageRef, ImageRef) {
    let a = fleet::write_app_image(dir, "image-a");
    let b = fleet::write_app_image(dir, "image-b");
    (ImageRef(a.display().to_string()), ImageRef(b.display().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_provider_meets_the_contract() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (image_a, image_b) = images(tmp.path());
    let dir = tmp.path().join("fleet");
    let port = free_port();
    let in_process = CancellationToken::new();
    let provider = Arc::new(open_local(&dir, port, &in_process).await);
    let endpoint = provider.endpoint().expect("an endpoint");
    assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
    let admin = provider.admin_endpoint().await.expect("admin");
    let admin_token = provider.admin_token().to_owned();
    let reopen_dir = dir.clone();
    let reopen_token = in_process.clone();
    let subject = Subject {
        provider: provider.clone(),
        reopen: Box::new(move || {
            let dir = reopen_dir.clone();
            let token = reopen_token.clone();
            Box::pin(
                async move { Arc::new(open_local(&dir, port, &token).await) as SharedProvider },
            )
        }),
        lb: (endpoint, admin, admin_token),
    };
    tokio::time::timeout(Duration::from_secs(120), contract(subject, &image_a, &image_b))
        .await
        .expect("contract suite stuck");
    provider.stop_load_balancer().await;
    in_process.cancel();
}

fn exec_spec(env: &[(&str, String)]) -> kiln::manifest::ExecProvider {
    let yaml = r#"
list: hooks/provider/local-test/list
launch: hooks/provider/local-test/launch
attach: hooks/provider/local-test/attach
detach: hooks/provider/local-test/detach
terminate: hooks/provider/local-test/terminate
health: hooks/provider/local-test/health
timeout: 60s
"#;
    let mut spec: kiln::manifest::ExecProvider = serde_yaml::from_str(yaml).expect("exec spec");
    spec.env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    spec
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_provider_meets_the_contract() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (image_a, image_b) = images(tmp.path());
    // kiln's own LB fronts the exec fleet: the local-test scripts drive its admin endpoint.
    let in_process = CancellationToken::new();
    let lb_owner = open_local(&tmp.path().join("lb-fleet"), free_port(), &in_process).await;
    let admin = lb_owner.admin_endpoint().await.expect("admin");
    let endpoint = lb_owner.endpoint().expect("endpoint");
    let state = tmp.path().join("exec-state");
    let work = tmp.path().join("exec-work");
    let admin_token = lb_owner.admin_token().to_owned();
    let token_file = tmp.path().join("lb-fleet").join("lb").join(lb::TOKEN_FILE);
    let spec = exec_spec(&[
        ("state", state.display().to_string()),
        ("lb_admin", admin.clone()),
        ("lb_token_file", token_file.display().to_string()),
    ]);
    let provider: SharedProvider =
        Arc::new(ExecProvider::new("web", &spec, repo_dir(), work.clone()));
    let subject = Subject {
        provider,
        reopen: Box::new(move || {
            let spec = spec.clone();
            let work = work.clone();
            Box::pin(async move {
                Arc::new(ExecProvider::new("web", &spec, repo_dir(), work)) as SharedProvider
            })
        }),
        lb: (endpoint, admin, admin_token),
    };
    tokio::time::timeout(Duration::from_secs(120), contract(subject, &image_a, &image_b))
        .await
        .expect("contract suite stuck");
    lb_owner.stop_load_balancer().await;
    in_process.cancel();
}

#[tokio::test]
async fn exec_provider_rejects_junk_and_classifies_exits() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state").display().to_string();
    let image = ImageRef(fleet::write_app_image(tmp.path(), "image").display().to_string());
    let provider = |extra: (&str, &str)| {
        let spec = exec_spec(&[("state", state.clone()), (extra.0, extra.1.to_owned())]);
        ExecProvider::new("web", &spec, repo_dir(), tmp.path().join("work"))
    };

    let junk = provider(("junk", "list")).list().await.expect_err("junk list reply");
    let message = junk.to_string();
    assert!(matches!(junk, ProviderError::Failed { .. }), "{junk:?}");
    assert!(
        message.contains("hooks/provider/local-test/list") && message.contains("junk"),
        "{message}"
    );

    let junk = provider(("junk", "launch")).launch(&image, "k").await.expect_err("junk launch");
    assert!(junk.to_string().contains("hooks/provider/local-test/launch"), "{junk}");
    let junk =
        provider(("junk", "attach")).attach(&InstanceId::from("x")).await.expect_err("junk ack");
    assert!(junk.to_string().contains("not json"), "the error quotes the reply: {junk}");

    let transient = provider(("fail", "launch:75")).launch(&image, "k").await.expect_err("exit 75");
    assert!(matches!(transient, ProviderError::Transient { .. }), "{transient:?}");
    let failed = provider(("fail", "terminate:3"))
        .terminate(&InstanceId::from("x"))
        .await
        .expect_err("exit 3");
    assert!(matches!(failed, ProviderError::Failed { .. }), "{failed:?}");
    assert!(failed.to_string().contains("failing on purpose"), "carries stderr: {failed}");

    let mut spec = exec_spec(&[("state", state.clone())]);
    spec.list = "hooks/provider/local-test/nope".to_owned();
    let missing = ExecProvider::new("web", &spec, repo_dir(), tmp.path().join("work")).list().await;
    assert!(missing.expect_err("missing script").to_string().contains("does not exist"));
    spec.list = "../outside".to_owned();
    let outside = ExecProvider::new("web", &spec, repo_dir(), tmp.path().join("work")).list().await;
    assert!(outside.expect_err("escaping path").to_string().contains("inside the repo"));

    // Without a knob the same scripts answer properly.
    assert!(provider(("junk", "none")).list().await.expect("empty list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_provider_refuses_bad_images_and_keeps_lb_state() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fleet");
    let in_process = CancellationToken::new();
    let provider = open_local(&dir, free_port(), &in_process).await;

    let missing = provider.launch(&ImageRef::from("/no/such/image"), "k").await;
    assert!(missing.expect_err("no image").to_string().contains("no executable `run`"));
    let relative = provider.launch(&ImageRef::from("image"), "k").await;
    assert!(relative.expect_err("relative image").to_string().contains("absolute"));
    let unknown = provider.attach(&InstanceId::from("web-nope")).await;
    assert!(matches!(unknown, Err(ProviderError::NotFound(_))), "{unknown:?}");

    // The LB port picked for `lb_port: 0` is remembered.
    let config = |port| LocalConfig {
        fleet: "web".to_owned(),
        dir: tmp.path().join("zero"),
        lb_port: port,
        kiln_exe: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    };
    if kiln_has_lb() {
        let zero = LocalProvider::open(config(0)).await.expect("open with port 0");
        let endpoint = zero.endpoint();
        let again = LocalProvider::open(config(0)).await.expect("reopen with port 0");
        assert_eq!(endpoint, again.endpoint(), "the picked LB port is stable");

        // A restarted LB process serves the backends attached before.
        let image = ImageRef(fleet::write_app_image(tmp.path(), "image").display().to_string());
        let instance = again.launch(&image, "k").await.expect("launch");
        wait_healthy(&http_client(), instance.address.as_deref().expect("address")).await;
        again.attach(&instance.id).await.expect("attach");
        again.stop_load_balancer().await;
        let reopened = LocalProvider::open(config(0)).await.expect("reopen restarts the LB");
        let url = format!("{}/", reopened.endpoint().expect("endpoint"));
        let (status, body) = get(&http_client(), &url).await.expect("LB back");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(instance.id.as_str()));
        reopened.terminate(&instance.id).await.expect("terminate");
        reopened.stop_load_balancer().await;
    } else {
        eprintln!("SKIP (partly): `kiln lb` not wired into the CLI; LB restart not tested");
    }
    provider.stop_load_balancer().await;
    in_process.cancel();
}

/// Environment variable that turns [`interrupted_launch_child`] into the crashing daemon of
/// [`a_launch_interrupted_after_spawning_is_adopted_not_repeated`]: the fleet dir to launch in.
const CRASH_CHILD_DIR: &str = "KILN_TEST_CRASH_CHILD_DIR";

/// Live group leaders carrying a local instance's marker under `fleet_dir`.
fn instance_processes(fleet_dir: &Path) -> Vec<kiln::hooks::process::Found> {
    let root = std::fs::canonicalize(fleet_dir.join("instances")).expect("instances dir");
    let prefix = format!("{}/", root.display());
    kiln::hooks::process::find_by_env(kiln::provider::local::INSTANCE_MARKER, |v| {
        v.starts_with(&prefix)
    })
    .into_iter()
    .filter(|f| f.is_group_leader())
    .collect()
}

/// Not a test on its own: run by the test below as a separate process with `KILN_FAULT` set, it
/// opens the provider and launches, and the provider aborts right after spawning the instance,
/// before recording it (the window a `kill -9` of the daemon hit). Without the variable it does
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_launch_child() {
    let Ok(dir) = std::env::var(CRASH_CHILD_DIR) else { return };
    let dir = PathBuf::from(dir);
    let image = ImageRef(fleet::write_app_image(&dir, "image").display().to_string());
    let provider = open_local(&dir.join("fleet"), free_port(), &CancellationToken::new()).await;
    let _ = provider.launch(&image, "key-1").await;
    panic!("KILN_FAULT=launch-after-spawn did not abort the launch");
}

/// Issue 10 major 2: a daemon dying after the instance process started but before its record
/// said `running` left a process kiln treated as dead (rollback) and never stopped. After such a
/// crash, a reopened provider adopts the process: listed running, the same instance for the same
/// key, one process, and `terminate` stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_interrupted_after_spawning_is_adopted_not_repeated() {
    if !fleet::have_python3() || !kiln_has_lb() {
        eprintln!("SKIP: needs python3 and `kiln lb`");
        assert!(std::env::var("CI").is_err(), "python3 and `kiln lb` are required under CI");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _cleanup = KillLeftovers(tmp.path().to_owned());
    let fleet_dir = tmp.path().join("fleet");
    let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "interrupted_launch_child", "--nocapture", "--test-threads", "1"])
        .env(CRASH_CHILD_DIR, tmp.path())
        .env("KILN_FAULT", "launch-after-spawn")
        .output()
        .expect("run the crashing child");
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success(), "the child must die in the launch: {stderr}");
    let before = instance_processes(&fleet_dir);
    assert_eq!(before.len(), 1, "one instance process started before the crash: {stderr}");
    let records: Vec<serde_json::Value> = std::fs::read_dir(fleet_dir.join("instances"))
        .expect("instances")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("instance.json")).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["state"], "launching", "crashed before recording the process");

    // The restart: the provider is opened again on the same state.
    let provider = open_local(&fleet_dir, free_port(), &CancellationToken::new()).await;
    let listed = provider.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].running, "the interrupted launch is adopted as running: {listed:?}");
    assert_eq!(listed[0].launch_key.as_deref(), Some("key-1"));
    let image = std::fs::canonicalize(tmp.path().join("image")).expect("image");
    let image = ImageRef(image.display().to_string());
    let again = provider.launch(&image, "key-1").await.expect("launch with the same key");
    assert_eq!(again.id, listed[0].id, "the same key names the same instance");
    let address = again.address.clone().expect("address");
    wait_healthy(&http_client(), &address).await;
    assert_eq!(pid_of(&address).await, before[0].process.pid, "the adopted process serves");
    assert_eq!(instance_processes(&fleet_dir), before, "no second process was started");

    provider.terminate(&again.id).await.expect("terminate");
    assert!(instance_processes(&fleet_dir).is_empty(), "terminate stopped the adopted process");
    assert!(provider.list().await.expect("list").is_empty());
    provider.stop_load_balancer().await;
}

/// Kills every process left under a test's temp dir when the test ends, even by a panic.
struct KillLeftovers(PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        support::daemon::kill_leftovers(&self.0);
    }
}

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// Issue 11: 20 MB of log in 6 minutes at 100 idle fleets, every `list` and `health` call of the
/// exec provider logging its start, its end and its reply at INFO. Routine calls log at DEBUG.
#[tokio::test(flavor = "current_thread")]
async fn exec_provider_calls_log_at_debug_not_info() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = exec_spec(&[("state", tmp.path().join("state").display().to_string())]);
    let provider = ExecProvider::new("web", &spec, repo_dir(), tmp.path().join("work"));
    let calls_logged_at = |level: tracing::Level| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(captured.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    };

    let (info, guard) = calls_logged_at(tracing::Level::INFO);
    for _ in 0..3 {
        provider.list().await.expect("list");
        provider.health(&InstanceId::from("i-1")).await.expect("health");
    }
    drop(guard);
    assert_eq!(info.text(), "", "routine provider calls log nothing at INFO");

    // The same calls do log, at DEBUG (so the assertion above could see them).
    let (debug, guard) = calls_logged_at(tracing::Level::DEBUG);
    provider.list().await.expect("list");
    drop(guard);
    let text = debug.text();
    assert!(text.contains("DEBUG") && text.contains("Hook started"), "{text}");
    assert!(text.contains("provider list"), "{text}");
}
