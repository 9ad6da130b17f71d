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

// --- security and robustness of `kiln lb` (issues 9 and 10) ---

use std::io::{Read as _, Write as _};

use kiln::provider::local::lb;

/// A backend in this process that answers every request with its request headers, one
/// `name: value` line each (repeated headers repeated), so a test sees what the LB forwarded.
async fn start_echo_backend() -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let address = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let mut text = String::new();
                    for (name, value) in req.headers() {
                        text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        text,
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// Serves an LB with `args` from this process; returns its state once it serves.
async fn in_process_lb(
    args: lb::LbArgs,
    stop: &tokio_util::sync::CancellationToken,
) -> lb::LbState {
    let dir = args.state_dir.clone();
    let stop = stop.clone();
    tokio::spawn(async move { lb::serve(args, stop).await.expect("in-process lb") });
    fleet::wait_for("the in-process LB to write lb.json", Duration::from_secs(10), || {
        let state = lb::read_state(&dir);
        async move { state }
    })
    .await
}

/// `PUT /backends/{id}` with `token` (None: no Authorization header); returns the status.
async fn attach_raw(admin_port: u16, token: Option<&str>, id: &str, address: &str) -> u16 {
    let mut request = http_client()
        .put(format!("http://127.0.0.1:{admin_port}/backends/{id}"))
        .json(&serde_json::json!({ "address": address }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("admin reachable").status().as_u16()
}

async fn backend_ids(admin_port: u16, token: &str) -> Vec<String> {
    let reply = http_client()
        .get(format!("http://127.0.0.1:{admin_port}/backends"))
        .bearer_auth(token)
        .send()
        .await
        .expect("admin reachable");
    assert_eq!(reply.status().as_u16(), 200);
    let views: Vec<lb::BackendView> = reply.json().await.expect("backend list");
    views.into_iter().map(|b| b.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_refuses_strangers_and_kiln_removes_unknown_backends() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = ImageRef(fleet::write_app_image(tmp.path(), "image-a").display().to_string());
    let fleet_dir = tmp.path().join("fleet");
    let provider = open(&fleet_dir).await;
    let url = format!("{}/", provider.endpoint().expect("endpoint"));
    let state = lb::read_state(&fleet_dir.join("lb")).expect("lb.json");
    let token = provider.admin_token().to_owned();
    // An attacker's backend: a real server on loopback answering "attacker".
    let attacker = start_echo_backend().await.to_string();

    let test = async {
        // The token file is the owner's alone.
        let mode = {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(fleet_dir.join("lb").join(lb::TOKEN_FILE))
                .expect("token")
                .permissions()
                .mode()
        };
        assert_eq!(mode & 0o777, 0o600, "admin-token mode {mode:o}");

        // Without the token, or with a wrong one, nothing is attached or listed.
        assert_eq!(attach_raw(state.admin_port, None, "web-0badbeef", &attacker).await, 401);
        assert_eq!(
            attach_raw(state.admin_port, Some("guess"), "web-0badbeef", &attacker).await,
            401
        );
        let wrong = "0".repeat(token.len());
        assert_eq!(
            attach_raw(state.admin_port, Some(&wrong), "web-0badbeef", &attacker).await,
            401
        );
        let listed = http_client()
            .get(format!("http://127.0.0.1:{}/backends", state.admin_port))
            .send()
            .await
            .expect("admin reachable");
        assert_eq!(listed.status().as_u16(), 401, "listing needs the token too");
        // With the token: only loopback addresses and kiln-shaped ids.
        assert_eq!(
            attach_raw(state.admin_port, Some(&token), "web-0badbeef", "10.1.2.3:80").await,
            400
        );
        assert_eq!(
            attach_raw(state.admin_port, Some(&token), "web-0badbeef", "[2001:db8::1]:80").await,
            400
        );
        assert_eq!(attach_raw(state.admin_port, Some(&token), "../evil", &attacker).await, 404);
        assert_eq!(attach_raw(state.admin_port, Some(&token), "evil", &attacker).await, 400);
        assert!(backend_ids(state.admin_port, &token).await.is_empty());

        // kiln's own instance is served.
        let instance = launch_healthy(&provider, &image, "k1").await;
        provider.attach(&instance.id).await.expect("attach");
        // A backend kiln does not know (a stale entry, or one attached by whoever had the
        // token) is accepted by the LB...
        assert_eq!(
            attach_raw(state.admin_port, Some(&token), "web-0badbeef", &attacker).await,
            200
        );
        let mut reached_attacker = false;
        for _ in 0..6 {
            let (_, body) = get(&http_client(), &url).await.expect("GET");
            reached_attacker |= body.contains("x-forwarded-for");
        }
        assert!(reached_attacker, "the injected backend got traffic before kiln reconciled");
        // ...and removed the next time kiln lists the fleet.
        let listed = provider.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].attached);
        assert_eq!(backend_ids(state.admin_port, &token).await, vec![instance.id.to_string()]);
        for _ in 0..6 {
            let (status, body) = get(&http_client(), &url).await.expect("GET");
            assert_eq!(status, 200);
            assert!(body.contains(instance.id.as_str()), "only kiln's instance answers: {body}");
        }
        // A known id at another address is foreign too.
        assert_eq!(
            attach_raw(state.admin_port, Some(&token), instance.id.as_str(), &attacker).await,
            200
        );
        let listed = provider.list().await.expect("list");
        assert!(!listed[0].attached, "the hijacked entry is gone");
        assert!(backend_ids(state.admin_port, &token).await.is_empty());
        provider.terminate(&instance.id).await.expect("terminate");
    };
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("admin test stuck");
    provider.stop_load_balancer().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_appends_the_peer_to_what_the_client_sent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    let state = in_process_lb(lb::LbArgs::new(tmp.path().join("lb")), &stop).await;
    let token = lb::ensure_admin_token(&tmp.path().join("lb")).expect("token");
    let backend = start_echo_backend().await;
    assert_eq!(
        attach_raw(state.admin_port, Some(&token), "web-00000001", &backend.to_string()).await,
        200
    );
    let url = format!("http://127.0.0.1:{}/", state.port);

    let reply = http_client()
        .get(&url)
        .header("x-forwarded-for", "203.0.113.9")
        .header("host", "shop.example")
        .send()
        .await
        .expect("GET");
    let body = reply.text().await.expect("body");
    let xff: Vec<&str> = body.lines().filter(|l| l.starts_with("x-forwarded-for:")).collect();
    assert_eq!(xff, ["x-forwarded-for: 203.0.113.9, 127.0.0.1"], "{body}");
    assert!(body.lines().any(|l| l == "x-forwarded-proto: http"), "{body}");
    assert!(body.lines().any(|l| l == "x-forwarded-host: shop.example"), "{body}");

    // Without one, the peer alone; a client's X-Forwarded-Proto is left as it is.
    let reply =
        http_client().get(&url).header("x-forwarded-proto", "https").send().await.expect("GET");
    let body = reply.text().await.expect("body");
    let xff: Vec<&str> = body.lines().filter(|l| l.starts_with("x-forwarded-for:")).collect();
    assert_eq!(xff, ["x-forwarded-for: 127.0.0.1"], "{body}");
    assert!(body.lines().any(|l| l == "x-forwarded-proto: https"), "{body}");
    stop.cancel();
}

/// Reads from `stream` until EOF or error; true if the peer closed within `limit` (a bound
/// against hanging, not a timing assertion).
fn closed_by_peer(stream: &mut std::net::TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    let deadline = std::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The slow clients run on a blocking thread and pace themselves with thread::sleep.
#[allow(clippy::disallowed_methods)]
async fn slow_heads_and_stalled_bodies_are_cut() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    let args = lb::LbArgs {
        header_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        ..lb::LbArgs::new(tmp.path().join("lb"))
    };
    let state = in_process_lb(args, &stop).await;
    let token = lb::ensure_admin_token(&tmp.path().join("lb")).expect("token");
    let backend = start_echo_backend().await;
    assert_eq!(
        attach_raw(state.admin_port, Some(&token), "web-00000001", &backend.to_string()).await,
        200
    );
    let port = state.port;

    tokio::task::spawn_blocking(move || {
        // Slowloris: a header line every 300 ms, never the blank line that ends the head.
        let mut loris = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        loris.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("write");
        let mut cut = false;
        for i in 0..100 {
            std::thread::sleep(Duration::from_millis(300));
            if loris.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).is_err() {
                cut = true;
                break;
            }
            if closed_by_peer(&mut loris, Duration::from_millis(1)) {
                cut = true;
                break;
            }
        }
        assert!(cut, "a request head trickling for 30 s was never cut");

        // An idle connection that never sends anything is closed too.
        let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        assert!(closed_by_peer(&mut idle, Duration::from_secs(20)), "idle connection kept");

        // A body declared as 1 GB that stalls after 10 bytes.
        let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stalled
            .write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n0123456789",
            )
            .expect("write");
        assert!(closed_by_peer(&mut stalled, Duration::from_secs(20)), "stalled body kept");
    })
    .await
    .expect("slow clients");

    // The LB still serves.
    let (status, _) = get(&http_client(), &format!("http://127.0.0.1:{port}/")).await.expect("GET");
    assert_eq!(status, 200);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_at_the_cap_make_room_for_a_new_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    let args = lb::LbArgs { max_connections: 8, ..lb::LbArgs::new(tmp.path().join("lb")) };
    let state = in_process_lb(args, &stop).await;
    let token = lb::ensure_admin_token(&tmp.path().join("lb")).expect("token");
    let backend = start_echo_backend().await;
    assert_eq!(
        attach_raw(state.admin_port, Some(&token), "web-00000001", &backend.to_string()).await,
        200
    );
    let port = state.port;

    // Fill the cap with idle connections (connected, silent), oldest first.
    let mut idle: Vec<std::net::TcpStream> = Vec::new();
    for _ in 0..8 {
        idle.push(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A real request still gets through, at once rather than after the idle ones time out.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        http_client().get(format!("http://127.0.0.1:{port}/")).send(),
    )
    .await
    .expect("the request waited behind idle connections")
    .expect("GET");
    assert_eq!(reply.status().as_u16(), 200);
    // Room was made by closing the oldest idle connection.
    let oldest_closed = tokio::task::spawn_blocking(move || {
        let closed = closed_by_peer(&mut idle[0], Duration::from_secs(2));
        (closed, idle)
    })
    .await
    .expect("check");
    assert!(oldest_closed.0, "the oldest idle connection was not shed");
    stop.cancel();
}

/// What the clients of the kill test saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Requests whose connection broke before the whole answer arrived and that were sent
    /// again, once, as RFC 9112 §9.3.1 lets a client do for an idempotent request.
    retried: AtomicU64,
    /// Connections refused: the LB's port was not listening.
    refused: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// One client: GETs `url` until `stop`, on keep-alive connections or one per request.
async fn client_loop(url: String, keep_alive: bool, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let new_client = || {
        if keep_alive {
            http_client()
        } else {
            reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().expect("client")
        }
    };
    let mut client = new_client();
    let send = |client: &reqwest::Client| {
        let mut request = client.get(&url).timeout(Duration::from_secs(10));
        if !keep_alive {
            request = request.header("connection", "close");
        }
        request.send()
    };
    // One attempt: Ok(body), or Err((refused, message)).
    let attempt = |client: reqwest::Client| {
        let sent = send(&client);
        async move {
            match sent.await {
                Ok(reply) if reply.status().is_success() => {
                    reply.text().await.map_err(|e| (false, format!("body: {e}")))
                }
                Ok(reply) => Err((false, format!("status {}", reply.status()))),
                Err(e) => {
                    Err((e.is_connect(), format!("request (keep-alive {keep_alive}): {e:?}")))
                }
            }
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let mut result = attempt(client.clone()).await;
        if let Err((refused, _)) = &result {
            if *refused {
                // Nothing listened: no client retries that transparently.
                tally.refused.fetch_add(1, Ordering::SeqCst);
            } else {
                // The connection broke before the whole answer arrived: a GET may be sent again
                // on a new connection (RFC 9112 §9.3.1), once. The pool's other idle
                // connections went to the same dead process, so they are dropped with it.
                tally.retried.fetch_add(1, Ordering::SeqCst);
                client = new_client();
                result = attempt(client.clone()).await;
            }
        }
        match result {
            Ok(_) => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err((_, e)) => {
                tally.failed.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut errors) = tally.errors.lock() {
                    errors.push(e);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_load_balancer_under_load_fails_no_request() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = ImageRef(fleet::write_app_image(tmp.path(), "image-a").display().to_string());
    let fleet_dir = tmp.path().join("fleet");
    let lb_dir = fleet_dir.join("lb");
    let provider = open(&fleet_dir).await;
    let url = format!("{}/", provider.endpoint().expect("endpoint"));

    let scenario = async {
        for key in ["a1", "a2"] {
            let instance = launch_healthy(&provider, &image, key).await;
            provider.attach(&instance.id).await.expect("attach");
        }
        // The LB runs with a standby holding its sockets.
        let first = fleet::wait_for("a standby", Duration::from_secs(20), || {
            let state = lb::read_state(&lb_dir).filter(|s| s.standby.is_some_and(|p| p.alive()));
            async move { state }
        })
        .await;

        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = [true, true, false, false]
            .into_iter()
            .map(|keep_alive| {
                tokio::spawn(client_loop(url.clone(), keep_alive, tally.clone(), stop.clone()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // kill -9 the serving process; its standby takes over on the same sockets.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first.process.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the LB");
        // Redundancy comes back by itself: a new serving process with a standby of its own.
        let second = fleet::wait_for("the standby to take over", Duration::from_secs(20), || {
            let state = lb::read_state(&lb_dir).filter(|s| {
                s.process != first.process
                    && s.process.alive()
                    && s.standby.is_some_and(|p| p.alive())
            });
            async move { state }
        })
        .await;
        assert_eq!(second.process, first.standby.expect("standby"), "the standby took over");
        assert_eq!(second.port, first.port);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // And again, now killing the standby first, then the server.
        let standby = second.standby.expect("standby");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(standby.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the standby");
        let third = fleet::wait_for("a new standby", Duration::from_secs(20), || {
            let state = lb::read_state(&lb_dir)
                .filter(|s| s.standby.is_some_and(|p| p != standby && p.alive()));
            async move { state }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(third.process.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the LB again");
        fleet::wait_for("the second takeover", Duration::from_secs(20), || {
            let state = lb::read_state(&lb_dir).filter(|s| {
                s.process != third.process
                    && s.process.alive()
                    && s.standby.is_some_and(|p| p.alive())
            });
            async move { state }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.expect("client");
        }
        // The provider adopts the new process.
        assert_eq!(provider.list().await.expect("list").iter().filter(|i| i.attached).count(), 2);
        tally
    };
    let tally =
        tokio::time::timeout(Duration::from_secs(120), scenario).await.expect("kill test stuck");
    let (ok, retried, refused, failed) = (
        tally.ok.load(Ordering::SeqCst),
        tally.retried.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
    );
    let errors: Vec<String> =
        tally.errors.lock().map(|e| e.iter().take(5).cloned().collect()).unwrap_or_default();
    eprintln!(
        "kill -9 under load: {ok} ok, {retried} retried once, {refused} refused, {failed} failed"
    );
    assert_eq!(refused, 0, "connections refused while the LB was killed");
    assert_eq!(
        failed,
        0,
        "requests failed: {errors:?}\nLB log:\n{}",
        std::fs::read_to_string(lb_dir.join("log")).unwrap_or_default()
    );
    assert!(ok > 100, "the load ran ({ok} requests)");
    for instance in provider.list().await.expect("list") {
        provider.terminate(&instance.id).await.expect("cleanup");
    }
    provider.stop_load_balancer().await;
    assert!(
        fleet::wait_for("the LB and its standby to stop", Duration::from_secs(10), || {
            let state = lb::read_state(&lb_dir);
            async move {
                state
                    .filter(|s| !s.process.alive() && !s.standby.is_some_and(|p| p.alive()))
                    .map(|_| true)
            }
        })
        .await
    );
}

async fn open_on(
    dir: &std::path::Path,
    port: u16,
) -> Result<LocalProvider, kiln::provider::ProviderError> {
    LocalProvider::open(LocalConfig {
        fleet: "web".to_owned(),
        dir: dir.to_owned(),
        lb_port: port,
        kiln_exe: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_change_moves_the_listener_and_a_busy_port_keeps_the_old_one() {
    if !fleet::have_python3() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = ImageRef(fleet::write_app_image(tmp.path(), "image-a").display().to_string());
    let fleet_dir = tmp.path().join("fleet");
    let old_port = free_port();
    let provider = open_on(&fleet_dir, old_port).await.expect("open");
    let test = async {
        let instance = launch_healthy(&provider, &image, "k1").await;
        provider.attach(&instance.id).await.expect("attach");
        let lb_pid = lb::read_state(&fleet_dir.join("lb")).expect("lb.json").process;

        // The new port is busy: an error naming it, and the fleet serves where it was.
        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind busy");
        let busy_port = busy.local_addr().expect("addr").port();
        let error = open_on(&fleet_dir, busy_port).await.expect_err("busy port");
        let message = error.to_string();
        assert!(
            message.contains(&busy_port.to_string()) && message.contains("still serving"),
            "{message}"
        );
        let (status, _) =
            get(&http_client(), &format!("http://127.0.0.1:{old_port}/")).await.expect("old port");
        assert_eq!(status, 200);
        assert_eq!(
            lb::read_state(&fleet_dir.join("lb")).expect("lb.json").process,
            lb_pid,
            "no restart"
        );
        drop(busy);

        // A free port: the listener moves while clients keep sending; no request finds neither
        // port serving.
        let new_port = free_port();
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .pool_max_idle_per_host(0)
                        .build()
                        .expect("client");
                    while !stop.load(Ordering::SeqCst) {
                        let mut ok = false;
                        for port in [old_port, new_port] {
                            let url = format!("http://127.0.0.1:{port}/");
                            if let Ok(reply) =
                                client.get(&url).timeout(Duration::from_secs(10)).send().await
                            {
                                ok = reply.status().is_success();
                                break;
                            }
                        }
                        if ok {
                            served.fetch_add(1, Ordering::SeqCst);
                        } else {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let moved = open_on(&fleet_dir, new_port).await.expect("move to a free port");
        assert_eq!(moved.endpoint().expect("endpoint"), format!("http://127.0.0.1:{new_port}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.expect("client");
        }
        assert_eq!(failures.load(Ordering::SeqCst), 0, "requests found no port serving");
        assert!(served.load(Ordering::SeqCst) > 10);
        let (status, body) =
            get(&http_client(), &format!("http://127.0.0.1:{new_port}/")).await.expect("new port");
        assert_eq!(status, 200);
        assert!(body.contains(instance.id.as_str()));
        fleet::wait_for("the old port to close", Duration::from_secs(10), || async {
            std::net::TcpStream::connect(("127.0.0.1", old_port)).is_err().then_some(())
        })
        .await;
        let state = lb::read_state(&fleet_dir.join("lb")).expect("lb.json");
        assert_eq!(state.port, new_port);
        assert_eq!(state.process, lb_pid, "the same process serves: moved, not restarted");
        moved.terminate(&instance.id).await.expect("terminate");
    };
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("port change stuck");
    provider.stop_load_balancer().await;
}

// --- weights, routes and the gray listener (issue 14) ---

/// A backend in this process answering every request with `name`.
async fn start_named_backend(name: &'static str) -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let address = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: hyper::Request<_>| async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(name),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// An admin call with a JSON body: the status.
async fn admin_json(
    admin_port: u16,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> u16 {
    http_client()
        .request(method, format!("http://127.0.0.1:{admin_port}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("admin reachable")
        .status()
        .as_u16()
}

/// `n` GETs to `url` over 4 keep-alive clients, with `headers`: how many bodies were each
/// name (a failed request counts as `failed`).
async fn tally(
    url: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> std::collections::BTreeMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.to_owned();
        let headers: Vec<(String, String)> =
            headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..n / 4 {
                let mut request = client.get(&url);
                for (k, v) in &headers {
                    request = request.header(k, v);
                }
                let name = match request.send().await {
                    Ok(reply) if reply.status().is_success() => {
                        reply.text().await.unwrap_or_else(|_| "failed".to_owned())
                    }
                    Ok(reply) => format!("status {}", reply.status().as_u16()),
                    Err(_) => "failed".to_owned(),
                };
                *seen.entry(name).or_default() += 1;
            }
            seen
        }));
    }
    let mut total = std::collections::BTreeMap::new();
    for task in tasks {
        for (name, count) in task.await.expect("client task") {
            *total.entry(name).or_default() += count;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_gives_the_new_image_its_share_and_the_gray_port_only_the_new_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    let state = in_process_lb(lb::LbArgs::new(tmp.path().join("lb")), &stop).await;
    let token = lb::ensure_admin_token(&tmp.path().join("lb")).expect("token");
    let main = format!("http://127.0.0.1:{}/", state.port);
    let put = reqwest::Method::PUT;

    // Three old instances, and the gray port.
    for (id, name) in [("web-0000000a", "old"), ("web-0000000b", "old"), ("web-0000000c", "old")] {
        let address = start_named_backend(name).await;
        let body = serde_json::json!({ "address": address.to_string(), "image": "/images/old" });
        assert_eq!(
            admin_json(state.admin_port, &token, put.clone(), &format!("/backends/{id}"), body)
                .await,
            200
        );
    }
    let gray_port = free_port();
    let body = serde_json::json!({ "port": gray_port });
    assert_eq!(admin_json(state.admin_port, &token, put.clone(), "/gray", body).await, 200);
    let gray = format!("http://127.0.0.1:{gray_port}/");
    let before = tally(&gray, 40, &[]).await;
    assert_eq!(
        before.get("old"),
        Some(&40),
        "between rollouts the gray port serves the fleet: {before:?}"
    );

    // A rollout routes: before its canary serves, the gray port answers 503, never the old image.
    let body = serde_json::json!({ "image": "/images/new", "percent": 10 });
    assert_eq!(admin_json(state.admin_port, &token, put.clone(), "/route", body).await, 200);
    let waiting = tally(&gray, 40, &[]).await;
    assert_eq!(waiting.get("status 503"), Some(&40), "{waiting:?}");
    let no_canary = tally(&main, 100, &[]).await;
    assert_eq!(no_canary.get("old"), Some(&100), "{no_canary:?}");

    // The canary (one instance against three) takes 10% of 10,000 requests.
    let address = start_named_backend("new").await;
    let body = serde_json::json!({ "address": address.to_string(), "image": "/images/new" });
    assert_eq!(
        admin_json(state.admin_port, &token, put.clone(), "/backends/web-0000000d", body).await,
        200
    );
    let split = tally(&main, 10_000, &[]).await;
    let new = split.get("new").copied().unwrap_or(0);
    eprintln!("10,000 requests: {split:?}");
    assert_eq!(
        new + split.get("old").copied().unwrap_or(0),
        10_000,
        "no request failed: {split:?}"
    );
    assert!((800..=1200).contains(&new), "the canary got {new} of 10,000 requests: {split:?}");
    let gray_split = tally(&gray, 200, &[]).await;
    assert_eq!(
        gray_split.get("new"),
        Some(&200),
        "the gray port serves only the new image: {gray_split:?}"
    );
    let pinned = tally(&main, 100, &[(lb::PIN_HEADER, "always")]).await;
    assert_eq!(pinned.get("new"), Some(&100), "{pinned:?}");
    let unpinned = tally(&main, 100, &[(lb::PIN_HEADER, "never")]).await;
    assert_eq!(unpinned.get("old"), Some(&100), "{unpinned:?}");

    // Weights: a backend of weight 300 beside one of 100 takes three in four requests.
    let body = serde_json::json!({ "address": address.to_string(), "image": "/images/new", "weight": 300 });
    assert_eq!(
        admin_json(state.admin_port, &token, put.clone(), "/backends/web-0000000d", body).await,
        200
    );
    let client = http_client();
    let delete = |id: &str| {
        client
            .delete(format!("http://127.0.0.1:{}/backends/{id}", state.admin_port))
            .bearer_auth(&token)
            .send()
    };
    delete("web-0000000a").await.expect("detach");
    delete("web-0000000b").await.expect("detach");
    assert_eq!(
        admin_json(
            state.admin_port,
            &token,
            reqwest::Method::DELETE,
            "/route",
            serde_json::json!({})
        )
        .await,
        200
    );
    let weighted = tally(&main, 400, &[]).await;
    assert_eq!(weighted.get("new"), Some(&300), "weights 300:100: {weighted:?}");
    let body = serde_json::json!({ "address": address.to_string(), "weight": 0 });
    assert_eq!(
        admin_json(state.admin_port, &token, put, "/backends/web-0000000d", body).await,
        400,
        "weight 0 is a detach"
    );
    stop.cancel();
}
