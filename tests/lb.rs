//! kiln's load balancer under load: clients hammer it while backends are attached, drained,
//! replaced and killed, and no request may fail.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln::model::ImageRef;
use kiln::provider::local::{LocalConfig, LocalProvider};
use kiln::provider::{Instance, Provider as _};
use support::fleet::{self, get, http_client, wait_healthy};

const CLIENTS: usize = 8;

async fn open(dir: &std::path::Path) -> LocalProvider {
    let config = LocalConfig {
        fleet: "web".to_owned(),
        dir: dir.to_owned(),
        lb_port: 0,
        kiln_exe: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    };
    LocalProvider::open(config).await.expect("open local provider")
}

async fn launch_healthy(provider: &LocalProvider, image: &ImageRef, key: &str) -> Instance {
    let instance = provider.launch(image, key).await.expect("launch");
    wait_healthy(&http_client(), instance.address.as_deref().expect("address")).await;
    instance
}

fn kill9(address: &str, pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("kill -9 the app on {address}: {e}"));
}

async fn pid_of(address: &str) -> i32 {
    let (_, body) = get(&http_client(), &format!("http://{address}/pid")).await.expect("pid");
    body.trim().parse().expect("pid number")
}

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    saw_a: AtomicU64,
    saw_b: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// Starts `CLIENTS` clients sending GETs to `url` until `stop` is set.
fn hammer(url: String, load: Arc<Load>, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|_| {
            let (url, load, stop) = (url.clone(), load.clone(), stop.clone());
            tokio::spawn(async move {
                let client = http_client();
                while !stop.load(Ordering::SeqCst) {
                    let res = client.get(&url).timeout(Duration::from_secs(10)).send().await;
                    let outcome = match res {
                        Ok(reply) if reply.status().is_success() => match reply.text().await {
                            Ok(body) => Ok(body),
                            Err(e) => Err(format!("body: {e}")),
                        },
                        Ok(reply) => Err(format!("status {}", reply.status())),
                        Err(e) => Err(format!("request: {e}")),
                    };
                    match outcome {
                        Ok(body) => {
                            load.ok.fetch_add(1, Ordering::SeqCst);
                            let counter =
                                if body.contains("image-a") { &load.saw_a } else { &load.saw_b };
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            load.failed.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut errors) = load.errors.lock() {
                                errors.push(e);
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_under_load_drops_no_request() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let image_a = ImageRef(fleet::write_app_image(tmp.path(), "image-a").display().to_string());
    let image_b = ImageRef(fleet::write_app_image(tmp.path(), "image-b").display().to_string());
    let provider = open(&tmp.path().join("fleet")).await;
    let url = format!("{}/", provider.endpoint().expect("endpoint"));

    let scenario = async {
        let mut old = Vec::new();
        for key in ["a1", "a2"] {
            let instance = launch_healthy(&provider, &image_a, key).await;
            provider.attach(&instance.id).await.expect("attach");
            old.push(instance);
        }
        let load = Arc::new(Load::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clients = hammer(url.clone(), load.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Replace each old instance, surge first: launch, attach, drain the old, terminate it.
        for (n, instance) in old.iter().enumerate() {
            let new = launch_healthy(&provider, &image_b, &format!("b{n}")).await;
            provider.attach(&new.id).await.expect("attach new");
            tokio::time::sleep(Duration::from_millis(200)).await;
            provider.detach(&instance.id, Duration::from_secs(5)).await.expect("drain old");
            provider.terminate(&instance.id).await.expect("terminate old");
        }

        // A backend dies abruptly while attached: its requests are retried elsewhere.
        let doomed = launch_healthy(&provider, &image_b, "doomed").await;
        provider.attach(&doomed.id).await.expect("attach doomed");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let address = doomed.address.clone().expect("address");
        kill9(&address, pid_of(&address).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Detaching a dead backend is fine too.
        provider.detach(&doomed.id, Duration::from_secs(1)).await.expect("detach dead");
        provider.terminate(&doomed.id).await.expect("terminate dead");
        tokio::time::sleep(Duration::from_millis(300)).await;

        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.expect("client task");
        }
        load
    };
    let load = tokio::time::timeout(Duration::from_secs(120), scenario)
        .await
        .expect("rollout scenario stuck");
    let (ok, failed) = (load.ok.load(Ordering::SeqCst), load.failed.load(Ordering::SeqCst));
    let errors = load
        .errors
        .lock()
        .map(|e| e.iter().take(5).cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    eprintln!("requests: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "dropped requests during the rollout: {errors:?}");
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert!(load.saw_a.load(Ordering::SeqCst) > 0 && load.saw_b.load(Ordering::SeqCst) > 0);

    for instance in provider.list().await.expect("list") {
        provider.terminate(&instance.id).await.expect("cleanup");
    }
    provider.stop_load_balancer().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_retried_on_another() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = ImageRef(fleet::write_app_image(tmp.path(), "image-a").display().to_string());
    let provider = open(&tmp.path().join("fleet")).await;
    let url = format!("{}/", provider.endpoint().expect("endpoint"));
    let client = http_client();

    let test = async {
        let survivor = launch_healthy(&provider, &image, "survivor").await;
        let victim = launch_healthy(&provider, &image, "victim").await;
        provider.attach(&survivor.id).await.expect("attach");
        provider.attach(&victim.id).await.expect("attach");
        // Warm the LB's connection pool to both backends, then kill one.
        for _ in 0..4 {
            assert_eq!(get(&client, &url).await.expect("GET").0, 200);
        }
        let address = victim.address.clone().expect("address");
        kill9(&address, pid_of(&address).await);
        for _ in 0..20 {
            let (status, body) = get(&client, &url).await.expect("GET after kill");
            assert_eq!(status, 200, "GET fails over to the surviving backend: {body}");
            assert!(body.contains(survivor.id.as_str()), "{body}");
        }
        // A POST with a small body is retried too when the connection is refused.
        let reply = client.post(&url).body("hello").send().await.expect("POST");
        assert_eq!(reply.status().as_u16(), 200);
        assert!(reply.text().await.expect("body").contains("posted 5 bytes"));

        provider.terminate(&victim.id).await.expect("terminate");
        provider.terminate(&survivor.id).await.expect("terminate");
        let (status, _) = get(&client, &url).await.expect("GET");
        assert_eq!(status, 503, "no backend left");
    };
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("failover test stuck");
    provider.stop_load_balancer().await;
}
