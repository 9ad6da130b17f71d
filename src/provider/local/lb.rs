//! kiln's own load balancer process (`kiln lb`): an HTTP reverse proxy on hyper with an admin
//! endpoint to attach, detach and drain backends.
//!
//! ```text
//!  clients ──▶ 127.0.0.1:<port> ──round robin──▶ backend 127.0.0.1:a
//!                                             └─▶ backend 127.0.0.1:b   (draining: no new requests)
//!  kiln ──▶ 127.0.0.1:<admin port>  GET /healthz · GET /backends · PUT/DELETE /backends/{id}
//!                                     PUT /listener (move the traffic port)
//! ```
//!
//! The admin endpoint answers only requests carrying `Authorization: Bearer <token>`, the token
//! being the content of `admin-token` in the state dir (mode 0600, created by whichever of kiln
//! and the LB comes first), compared in constant time. It accepts only backends on loopback
//! addresses whose id has the shape of a kiln instance id; kiln removes any other backend it
//! finds (see `LocalProvider::list`).
//!
//! Every client connection is bounded: a request head must arrive within `--header-timeout`
//! (which is also how long an idle keep-alive connection is kept), a request body may pause for
//! at most `--body-timeout` between chunks, a backend gets `--backend-timeout` to start its
//! answer and between chunks of it, and past `--max-connections` the oldest idle connection is
//! closed to make room (a busy one never is).
//!
//! The process outlives the daemon. Everything a restarted kiln (or a restarted LB) needs is in
//! the state directory: `lb.json` (pid, start time, ports; written once both ports are bound)
//! and `backends.json` (the attached set, rewritten atomically on every change). A request that
//! fails to reach a backend is retried on another one when that is safe (the connection was
//! refused, or the method is idempotent and the body was buffered), so a backend dying between
//! its health check and a request does not surface as a 502.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path as UrlPath, Query, Request as AxumRequest, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::routing::{get, put};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod handover;

/// The file in the state dir naming the running LB process and its ports.
pub const STATE_FILE: &str = "lb.json";
/// The file in the state dir holding the attached backends.
pub const BACKENDS_FILE: &str = "backends.json";
/// The file in the state dir holding the admin endpoint's bearer token (mode 0600).
pub const TOKEN_FILE: &str = "admin-token";
/// The file in the state dir holding the rollout's route and the gray port.
pub const ROUTING_FILE: &str = "routing.json";
/// The request header that pins a client to one side of a rollout: `always` sends the request
/// to the new image's instances (when one serves), `never` to the others.
pub const PIN_HEADER: &str = "x-kiln-canary";
/// The weight of a backend attached without one.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The highest weight a backend may carry.
pub const MAX_WEIGHT: u32 = 10_000;

/// Request bodies up to this size are buffered so the request can be retried on another
/// backend; larger (or unsized, chunked) bodies are streamed through once.
const MAX_BUFFERED_BODY: u64 = 1024 * 1024;
/// How many backends one request may try.
const MAX_ATTEMPTS: usize = 3;
/// A backend that refused a connection is skipped for this long (passive health checking), so
/// a dead backend costs one retry, not one per request.
const EJECT_FOR: Duration = Duration::from_secs(2);

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::manifest::parse_duration(text)
}

/// Arguments of `kiln lb`.
#[derive(clap::Args, Debug, Clone)]
pub struct LbArgs {
    /// Directory holding the load balancer's state (`lb.json`, `backends.json`, `admin-token`);
    /// the process exits when it disappears.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Port to serve traffic on, on 127.0.0.1 (0: pick a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of the admin endpoint, on 127.0.0.1 (0: pick a free one; it is written to `lb.json`).
    #[arg(long, default_value_t = 0)]
    pub admin_port: u16,
    /// How long a client has to send a complete request head, counted from the connection's
    /// start or the end of its previous response (so also the idle keep-alive timeout).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// The longest pause allowed between two chunks of a request body.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// How long a backend may take to start answering, and the longest pause between two chunks
    /// of its answer (a long answer that keeps streaming is never cut).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// Client connections kept open at most; past it the oldest idle one is closed, and new
    /// connections wait in the kernel's backlog while every connection is busy.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Run as the standby of the LB serving in `--state-dir`: hold its sockets and take over
    /// if it dies (started by the LB itself).
    #[arg(long, hide = true)]
    pub standby: bool,
}

impl LbArgs {
    /// Arguments with the defaults of the command line (in-process use: tests, benchmarks).
    pub fn new(state_dir: PathBuf) -> LbArgs {
        LbArgs {
            state_dir,
            port: 0,
            admin_port: 0,
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            backend_timeout: Duration::from_secs(300),
            max_connections: 512,
            standby: false,
        }
    }

    /// The arguments a standby of this LB runs with.
    fn standby_args(&self) -> Vec<String> {
        vec![
            "lb".to_owned(),
            "--standby".to_owned(),
            "--state-dir".to_owned(),
            self.state_dir.display().to_string(),
            "--header-timeout".to_owned(),
            format!("{}ms", self.header_timeout.as_millis()),
            "--body-timeout".to_owned(),
            format!("{}ms", self.body_timeout.as_millis()),
            "--backend-timeout".to_owned(),
            format!("{}ms", self.backend_timeout.as_millis()),
            "--max-connections".to_owned(),
            self.max_connections.to_string(),
        ]
    }
}

/// What a running LB writes to `lb.json` once it is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbState {
    /// The LB's process (pid and start time).
    pub process: crate::hooks::process::ProcessRef,
    /// Traffic port on 127.0.0.1.
    pub port: u16,
    /// Admin port on 127.0.0.1.
    pub admin_port: u16,
    /// The standby holding the same sockets, ready to take over (see `handover`).
    #[serde(default)]
    pub standby: Option<crate::hooks::process::ProcessRef>,
    /// The gray listener's port on 127.0.0.1, when one serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_port: Option<u16>,
}

/// One backend as the admin endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    /// Instance id.
    pub id: String,
    /// `host:port` traffic goes to.
    pub address: String,
    /// Draining: no new requests, removed once those in flight finish.
    #[serde(default)]
    pub draining: bool,
    /// Requests in flight (responses still streaming included).
    #[serde(default)]
    pub in_flight: usize,
    /// Its share of requests relative to the others' (0 while draining).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The image it runs, when kiln said (routes of a rollout go by image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// Body of `PUT /backends/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachRequest {
    /// `host:port` of the backend.
    pub address: String,
    /// Its weight (1 to 10000, default 100): its share of requests relative to the others'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The image it runs (a rollout's route sends the new image's share by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// How a rollout routes traffic (`PUT /route`): backends on `image` are the new side; the
/// gray listener serves only them, and with `percent` they take that share of the main
/// listener's requests (the others the rest), whatever their count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRequest {
    /// The rollout's new image.
    pub image: String,
    /// The new side's share of requests, 1 to 99; none: its weighted round-robin share.
    #[serde(default)]
    pub percent: Option<u32>,
}

/// Body of `PUT /gray`: serve the gray listener on this port, or on none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrayRequest {
    /// The gray port on 127.0.0.1; none closes the gray listener.
    pub port: Option<u16>,
}

/// `routing.json`: what survives a restart of the LB besides its backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// The route of the rollout in progress.
    #[serde(default)]
    pub route: Option<RouteRequest>,
    /// The gray listener's port.
    #[serde(default)]
    pub gray_port: Option<u16>,
}

/// Body of `PUT /listener`: serve traffic on this port instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerRequest {
    /// The new traffic port on 127.0.0.1.
    pub port: u16,
}

/// Reply of `DELETE /backends/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachReply {
    /// Whether the backend was attached.
    pub removed: bool,
    /// Requests still in flight when the drain time ran out (0 after a clean drain).
    pub in_flight_left: usize,
}

/// Reads `lb.json` in `state_dir`, if there is a readable one.
pub fn read_state(state_dir: &Path) -> Option<LbState> {
    let text = std::fs::read(state_dir.join(STATE_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The admin token in `state_dir/admin-token`, created (32 random bytes, hex, mode 0600) if
/// there is none. A token file others may read has its mode fixed, loudly.
pub fn ensure_admin_token(state_dir: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = state_dir.join(TOKEN_FILE);
    for _ in 0..3 {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mode = std::fs::metadata(&path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "The admin token file was readable by others; setting its mode to 0600.");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
                let token = text.trim().to_owned();
                if token.len() < 32 {
                    return Err(std::io::Error::other(format!(
                        "{} holds no usable token (remove it to have a new one made)",
                        path.display()
                    )));
                }
                return Ok(token);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
        let token = hex::encode(bytes);
        // Written whole under a temporary name, then linked into place: a concurrent reader
        // never sees a half-written token, and of two writers racing, the first link wins.
        let tmp = state_dir.join(format!(".{TOKEN_FILE}.tmp-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
        drop(file);
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(token),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::other(format!("cannot settle on a token in {}", path.display())))
}

/// Whether `id` has the shape of a kiln instance id (`<fleet>-<8 hex digits>`, the fleet a
/// name of letters, digits, `.`, `_` and `-`).
pub fn valid_backend_id(id: &str) -> bool {
    let Some((fleet, suffix)) = id.rsplit_once('-') else {
        return false;
    };
    !fleet.is_empty()
        && fleet.len() <= 128
        && fleet.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && fleet.as_bytes()[0].is_ascii_alphanumeric()
        && suffix.len() == 8
        && suffix.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Runs the load balancer until SIGTERM/SIGINT or until its state dir is removed.
pub async fn run(args: LbArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to install the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        on_signal.cancel();
    });
    let exe = std::env::current_exe().ok();
    if args.standby {
        let dir = args.state_dir.clone();
        let waiting = shutdown.clone();
        let wake = tokio::task::spawn_blocking(move || handover::wait(&dir, &waiting))
            .await
            .context("standby wait failed")?
            .with_context(|| {
                format!(
                    "cannot fetch the sockets from {}",
                    args.state_dir.join(handover::SOCKET_FILE).display()
                )
            })?;
        let handover::Wake::Promote(sockets) = wake else {
            return Ok(());
        };
        tracing::warn!(dir = %args.state_dir.display(), "The serving load balancer died; the standby takes over.");
        let (listener, admin) =
            sockets.into_listeners().context("cannot use the handed-over sockets")?;
        return serve_on(args, listener, admin, shutdown, exe).await;
    }
    let (listener, admin) = bind(&args).await?;
    serve_on(args, listener, admin, shutdown, exe).await
}

/// Runs the load balancer until `shutdown` fires or its state dir is removed (in-process use,
/// e.g. tests and benchmarks; without a standby process).
pub async fn serve(args: LbArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (listener, admin) = bind(&args).await?;
    serve_on(args, listener, admin, shutdown, None).await
}

async fn bind(args: &LbArgs) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("failed to listen on 127.0.0.1:{}", args.port))?;
    let admin = TcpListener::bind(("127.0.0.1", args.admin_port))
        .await
        .with_context(|| format!("failed to listen on 127.0.0.1:{} (admin)", args.admin_port))?;
    Ok((listener, admin))
}

/// Serves on bound listeners; with `standby_exe`, keeps a standby process (`handover`).
async fn serve_on(
    args: LbArgs,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: CancellationToken,
    standby_exe: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = args.state_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("failed to create the state dir {}", dir.display()))?;
    let token = ensure_admin_token(&dir)
        .with_context(|| format!("failed to read or create {}", dir.join(TOKEN_FILE).display()))?;
    let backends = load_backends(&dir)?;
    let port = listener.local_addr()?.port();
    let admin_port = admin.local_addr()?.port();

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let routing = load_routing(&dir)?;
    let lb = Arc::new(Lb {
        backends: RwLock::new(backends.into_iter().map(Backend::new).map(Arc::new).collect()),
        table: RwLock::new(Arc::new(Table::default())),
        route: Mutex::new(routing.route.clone()),
        gray: Mutex::new(None),
        dir: dir.clone(),
        persist_lock: tokio::sync::Mutex::new(()),
        client,
        conns: Conns::new(args.max_connections),
        body_timeout: args.body_timeout,
        backend_timeout: args.backend_timeout,
    });
    lb.rebuild();

    let pid = i32::try_from(std::process::id()).context("pid out of range")?;
    let start_ticks =
        crate::hooks::process::start_ticks(pid).context("cannot read own start time")?;
    let state = LbState {
        process: crate::hooks::process::ProcessRef { pid, start_ticks },
        port,
        admin_port,
        standby: None,
        gray_port: None,
    };
    super::write_json_atomic(&dir.join(STATE_FILE), &state)
        .with_context(|| format!("failed to write {}", dir.join(STATE_FILE).display()))?;
    tracing::info!(port, admin_port, "Load balancer serving.");
    let shared_state = Arc::new(Mutex::new(state));

    let keeper = match &standby_exe {
        Some(exe) => {
            let keeper = Arc::new(handover::Keeper {
                sockets: Mutex::new(
                    handover::Sockets::dup(&listener, &admin)
                        .context("cannot duplicate the listening sockets")?,
                ),
                changed: tokio::sync::Notify::new(),
            });
            let on_standby = {
                let (state, dir) = (shared_state.clone(), dir.clone());
                move |standby| {
                    let Ok(mut state) = state.lock() else { return };
                    state.standby = standby;
                    if let Err(error) = super::write_json_atomic(&dir.join(STATE_FILE), &*state) {
                        tracing::warn!(%error, "Cannot record the standby in lb.json.");
                    }
                }
            };
            let task = tokio::spawn(handover::keep_standby(
                dir.clone(),
                exe.clone(),
                args.standby_args(),
                keeper.clone(),
                shutdown.clone(),
                on_standby,
            ));
            Some((keeper, task))
        }
        None => None,
    };

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(args.header_timeout);
    let http = Arc::new(http);

    let (move_tx, mut move_rx) = tokio::sync::mpsc::channel::<MoveListener>(1);
    let admin_state = AdminState {
        lb: lb.clone(),
        state: shared_state,
        token: Arc::new(token),
        move_tx,
        http: http.clone(),
        shutdown: shutdown.clone(),
    };
    if let Some(port) = routing.gray_port {
        // A gray port that cannot be bound again (taken meanwhile) is logged; kiln asks again.
        if let Err((_, error)) = admin_state.set_gray(Some(port)).await {
            tracing::error!(port, %error, "Cannot serve the gray listener.");
        }
    }
    let router = axum::Router::new()
        .route("/healthz", get(admin_health))
        .route("/backends", get(admin_list))
        .route("/backends/{id}", put(admin_attach).delete(admin_detach))
        .route("/listener", put(admin_listener))
        .route("/route", put(admin_route).delete(admin_unroute))
        .route("/gray", put(admin_gray))
        .route_layer(axum::middleware::from_fn_with_state(admin_state.clone(), admin_auth))
        .with_state(admin_state);
    let admin_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(admin, router)
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "Admin endpoint failed.");
        }
    });

    // The LB must not outlive its fleet's state (a deleted data dir, a test's temp dir).
    let watchdog = shutdown.clone();
    let watched = dir.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = watchdog.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !watched.join(STATE_FILE).exists() {
                tracing::warn!(dir = %watched.display(), "State dir gone; stopping.");
                watchdog.cancel();
                return;
            }
        }
    });

    let mut listener = listener;
    loop {
        // At the cap, make room by closing the oldest idle connection; while every connection
        // is busy, new ones wait in the kernel's backlog instead of costing a descriptor.
        while lb.conns.len() >= lb.conns.max {
            let freed = lb.conns.freed.notified();
            lb.conns.shed_oldest_idle();
            tokio::select! {
                _ = shutdown.cancelled() => return stop_standby(keeper).await,
                _ = freed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            moved = move_rx.recv() => {
                let Some(moved) = moved else { continue };
                // The standby gets the new socket first, so it drops its copy of the old one.
                if let Some((keeper, _)) = &keeper {
                    match moved.listener.as_fd_dup() {
                        Ok(traffic) => {
                            if let Ok(mut sockets) = keeper.sockets.lock() {
                                sockets.traffic = traffic;
                            }
                            keeper.changed.notify_one();
                        }
                        Err(error) => tracing::warn!(%error, "Cannot hand the new socket to the standby."),
                    }
                }
                // Connections already queued on the old port are taken before it closes.
                while let Ok(Ok((stream, peer))) =
                    tokio::time::timeout(Duration::ZERO, listener.accept()).await
                {
                    spawn_connection(&lb, &http, &shutdown, stream, peer, Entry::Main);
                }
                let old = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                listener = moved.listener;
                tracing::info!(old, port = moved.port, "Traffic listener moved.");
                let _ = moved.done.send(());
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: free one and back off instead of
                    // spinning on an accept that fails at once.
                    tracing::warn!(%error, "Accept failed.");
                    lb.conns.shed_oldest_idle();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spawn_connection(&lb, &http, &shutdown, stream, peer, Entry::Main);
    }
    stop_standby(keeper).await
}

/// Waits (briefly) for the standby keeper to tell the standby to quit.
async fn stop_standby(
    keeper: Option<(Arc<handover::Keeper>, tokio::task::JoinHandle<()>)>,
) -> anyhow::Result<()> {
    if let Some((_, task)) = keeper {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    Ok(())
}

trait DupFd {
    fn as_fd_dup(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl DupFd for TcpListener {
    fn as_fd_dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.as_fd().try_clone_to_owned()
    }
}

/// A request from the admin endpoint to move the traffic listener; `done` fires once the
/// accept loop serves `listener` and the old one is closed.
struct MoveListener {
    listener: TcpListener,
    port: u16,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Accepts on the gray listener until `stop` (a new gray port, none, or shutdown).
async fn serve_gray(
    lb: Arc<Lb>,
    http: Arc<hyper::server::conn::http1::Builder>,
    shutdown: CancellationToken,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        if lb.conns.len() >= lb.conns.max {
            lb.conns.shed_oldest_idle();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            continue;
        }
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                spawn_connection(&lb, &http, &shutdown, stream, peer, Entry::Gray)
            }
            Err(error) => {
                tracing::warn!(%error, "Accept failed (gray listener).");
                lb.conns.shed_oldest_idle();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// The traffic port.
    Main,
    /// The gray port: only the new image's instances while a rollout routes.
    Gray,
}

fn spawn_connection(
    lb: &Arc<Lb>,
    http: &Arc<hyper::server::conn::http1::Builder>,
    shutdown: &CancellationToken,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    entry: Entry,
) {
    let _ = stream.set_nodelay(true);
    let (id, conn) = lb.conns.add();
    let (lb, http, shutdown) = (lb.clone(), http.clone(), shutdown.clone());
    tokio::spawn(async move {
        let service_lb = lb.clone();
        let service_conn = conn.clone();
        let service = hyper::service::service_fn(move |req| {
            proxy(service_lb.clone(), peer, entry, Active::new(service_conn.clone()), req)
        });
        let served = http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(served);
        let mut closing = false;
        loop {
            tokio::select! {
                _ = served.as_mut() => break,
                _ = conn.shed.cancelled(), if !closing => {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
                _ = shutdown.cancelled(), if !closing => {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
            }
        }
        lb.conns.remove(id);
    });
}

/// The open client connections, for the connection cap.
struct Conns {
    max: usize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    freed: tokio::sync::Notify,
    epoch: tokio::time::Instant,
}

/// One client connection: requests in flight on it, when it was last active, and the signal
/// that closes it once idle.
struct Conn {
    in_flight: AtomicUsize,
    last_active_ms: AtomicU64,
    shed: CancellationToken,
    epoch: tokio::time::Instant,
}

impl Conn {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }
}

/// Counts a request against its connection until its response is sent (or dropped).
struct Active(Arc<Conn>);

impl Active {
    fn new(conn: Arc<Conn>) -> Active {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        conn.touch();
        Active(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conns {
    fn new(max: usize) -> Conns {
        Conns {
            max: max.max(1),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            freed: tokio::sync::Notify::new(),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn len(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            shed: CancellationToken::new(),
            epoch: self.epoch,
        });
        conn.touch();
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, conn.clone());
        }
        (id, conn)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
        self.freed.notify_waiters();
    }

    /// Asks the least recently active idle connection (no request in flight, not already
    /// closing) to close. Returns whether there was one.
    fn shed_oldest_idle(&self) -> bool {
        let Ok(open) = self.open.lock() else { return false };
        let oldest = open
            .values()
            .filter(|c| c.in_flight.load(Ordering::SeqCst) == 0 && !c.shed.is_cancelled())
            .min_by_key(|c| c.last_active_ms.load(Ordering::Relaxed));
        match oldest {
            Some(conn) => {
                conn.shed.cancel();
                true
            }
            None => false,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

struct Lb {
    /// Every attached backend, draining ones included (the admin endpoint's view).
    backends: RwLock<Vec<Arc<Backend>>>,
    /// What requests pick from, rebuilt from `backends` and `route` on every change.
    table: RwLock<Arc<Table>>,
    /// The rollout's route (`PUT /route`).
    route: Mutex<Option<RouteRequest>>,
    /// The gray listener: its port and the token that stops it.
    gray: Mutex<Option<(u16, CancellationToken)>>,
    dir: PathBuf,
    /// Serialises rewrites of `backends.json` so the last change always wins on disk.
    persist_lock: tokio::sync::Mutex<()>,
    client: Client<HttpConnector, ProxyBody>,
    conns: Conns,
    /// The longest pause between two chunks of a request body.
    body_timeout: Duration,
    /// How long a backend may take to start answering, and between chunks of its answer.
    backend_timeout: Duration,
}

struct Backend {
    id: String,
    address: String,
    /// `http://<address>` parsed once: the scheme and authority of every request to it.
    authority: Option<hyper::http::uri::Authority>,
    /// The id as a header value (`x-kiln-backend`), made once.
    id_header: Option<HeaderValue>,
    weight: u32,
    image: Option<String>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds since [`epoch`] until which the backend is skipped; 0: not ejected.
    ejected_until: AtomicU64,
}

/// The instant ejection times count from.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Backend {
    fn new(view: BackendView) -> Backend {
        Backend {
            authority: view.address.parse().ok(),
            id_header: HeaderValue::from_str(&view.id).ok(),
            id: view.id,
            address: view.address,
            weight: view.weight.clamp(1, MAX_WEIGHT),
            image: view.image,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    fn view(&self) -> BackendView {
        let draining = self.draining.load(Ordering::SeqCst);
        BackendView {
            id: self.id.clone(),
            address: self.address.clone(),
            draining,
            in_flight: self.in_flight.load(Ordering::SeqCst),
            weight: if draining { 0 } else { self.weight },
            image: self.image.clone(),
        }
    }

    fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    fn eject(&self, healthy: bool) {
        if healthy {
            // The common case reads only: no cache line bounces between workers.
            if self.ejected_until.load(Ordering::Relaxed) != 0 {
                self.ejected_until.store(0, Ordering::Relaxed);
            }
        } else {
            let ms = u64::try_from(EJECT_FOR.as_millis()).unwrap_or(u64::MAX);
            self.ejected_until.store(now_ms().saturating_add(ms), Ordering::Relaxed);
        }
    }
}

/// Backends in the order requests take them: each appears `weight` times (weights divided by
/// their greatest common divisor, at most [`WHEEL_MAX`] slots), spread out as nginx's smooth
/// weighted round robin does, so equal weights are plain round robin.
#[derive(Default)]
struct Wheel {
    slots: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

/// The most slots a wheel has (weights are scaled down beyond it).
const WHEEL_MAX: u64 = 4096;

impl Wheel {
    fn new(backends: &[Arc<Backend>]) -> Wheel {
        fn gcd(a: u64, b: u64) -> u64 {
            if b == 0 { a } else { gcd(b, a % b) }
        }
        let mut weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight.max(1))).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let total: u64 = weights.iter().sum();
        if total > WHEEL_MAX {
            weights.iter_mut().for_each(|w| *w = (*w * WHEEL_MAX / total).max(1));
        }
        let total: i64 = weights.iter().map(|w| i64::try_from(*w).unwrap_or(1)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut slots = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += i64::try_from(*w).unwrap_or(1);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            slots.push(backends[best].clone());
        }
        Wheel { slots, next: AtomicUsize::new(0) }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The next backend not in `tried`, preferring one that is not ejected; with whether the
    /// one returned is ejected.
    fn pick(&self, tried: &[Arc<Backend>]) -> Option<(&Arc<Backend>, bool)> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let candidate = &self.slots[(start + i) % n];
            if tried.iter().any(|t| Arc::ptr_eq(t, candidate)) {
                continue;
            }
            if !candidate.ejected() {
                return Some((candidate, false));
            }
            fallback.get_or_insert(candidate);
        }
        fallback.map(|c| (c, true))
    }
}

/// The routing table: every serving backend, and, while a rollout routes, its two sides.
#[derive(Default)]
struct Table {
    all: Wheel,
    /// Backends on the route's image.
    new: Wheel,
    /// The others.
    old: Wheel,
    /// Whether a route is set (the gray listener serves only `new`).
    routed: bool,
    /// The new side's share of the main listener's requests.
    percent: Option<u32>,
    /// Counts main-listener requests for the split.
    split: AtomicU64,
}

/// Which side a request asked for with [`PIN_HEADER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    None,
    New,
    Old,
}

impl Table {
    /// The backend for a request (not one of `tried`), or why there is none.
    fn pick(&self, entry: Entry, pin: Pin, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let wheel = match (entry, pin) {
            // The gray listener never reaches the old side while a rollout routes.
            (Entry::Gray, _) if self.routed => &self.new,
            (_, Pin::New) if !self.new.is_empty() => &self.new,
            (_, Pin::Old) if !self.old.is_empty() => &self.old,
            (Entry::Gray, _) => &self.all,
            (Entry::Main, _) => match self.percent {
                Some(p) if !self.new.is_empty() && !self.old.is_empty() => {
                    // Request n goes to the new side when n·p/100 crosses an integer: exactly
                    // p of every 100, evenly spread.
                    let n = self.split.fetch_add(1, Ordering::Relaxed);
                    let p = u64::from(p);
                    if (n + 1) * p / 100 != n * p / 100 { &self.new } else { &self.old }
                }
                _ => &self.all,
            },
        };
        match wheel.pick(tried) {
            Some((backend, false)) => Some(backend.clone()),
            // The chosen side has nothing healthy left: the main listener may go anywhere.
            found if entry == Entry::Main && !std::ptr::eq(wheel, &self.all) => {
                match self.all.pick(tried) {
                    Some((backend, false)) => Some(backend.clone()),
                    _ => found.map(|(b, _)| b.clone()),
                }
            }
            found => found.map(|(b, _)| b.clone()),
        }
    }
}

/// Counts a request against its backend until the response body is done (or dropped).
struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(backend: Arc<Backend>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend's response body, holding the in-flight counts (the backend's, the client
/// connection's) until it is fully sent.
struct Tracked {
    inner: Timed<Incoming>,
    _guard: InFlight,
    _active: Active,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that fails when its source pauses longer than `timeout` between two frames (a
/// stalled upload, a wedged backend), instead of holding the connection forever.
struct Timed<B> {
    inner: B,
    timeout: Duration,
    /// Armed when the source first makes us wait (most bodies never do: no timer at all).
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    what: &'static str,
}

impl<B> Timed<B> {
    fn new(inner: B, timeout: Duration, what: &'static str) -> Timed<B> {
        Timed { inner, timeout, deadline: None, what }
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // The next wait starts counting at its first Pending.
                self.deadline = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match {
                let timeout = self.timeout;
                self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
            }
            .as_mut()
            .poll(cx)
            {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "{} paused longer than {:?}",
                    self.what, self.timeout
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Lb {
    /// The table requests pick from (one reference count, no lock held while proxying).
    fn table(&self) -> Option<Arc<Table>> {
        self.table.read().ok().map(|t| t.clone())
    }

    /// Rebuilds the table from the attached, non-draining backends and the route.
    fn rebuild(&self) {
        let Ok(backends) = self.backends.read() else { return };
        let serving: Vec<Arc<Backend>> =
            backends.iter().filter(|b| !b.draining.load(Ordering::SeqCst)).cloned().collect();
        drop(backends);
        let route = self.route.lock().ok().and_then(|r| r.clone());
        let (new, old): (Vec<_>, Vec<_>) = match &route {
            Some(route) => {
                serving.iter().cloned().partition(|b| b.image.as_deref() == Some(&route.image))
            }
            None => (Vec::new(), serving.clone()),
        };
        let table = Table {
            all: Wheel::new(&serving),
            new: Wheel::new(&new),
            old: Wheel::new(&old),
            routed: route.is_some(),
            percent: route.and_then(|r| r.percent),
            split: AtomicU64::new(0),
        };
        if let Ok(mut slot) = self.table.write() {
            *slot = Arc::new(table);
        }
    }

    fn routing(&self) -> Routing {
        Routing {
            route: self.route.lock().ok().and_then(|r| r.clone()),
            gray_port: self.gray.lock().ok().and_then(|g| g.as_ref().map(|g| g.0)),
        }
    }

    /// Writes the route and the gray port to `routing.json`.
    async fn persist_routing(&self) -> std::io::Result<()> {
        let _guard = self.persist_lock.lock().await;
        let routing = self.routing();
        let path = self.dir.join(ROUTING_FILE);
        tokio::task::spawn_blocking(move || super::write_json_atomic(&path, &routing))
            .await
            .map_err(std::io::Error::other)?
    }

    fn snapshot(&self) -> Vec<BackendView> {
        match self.backends.read() {
            Ok(backends) => backends.iter().map(|b| b.view()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Writes the attached (non-draining) set to `backends.json`.
    async fn persist(&self) -> std::io::Result<()> {
        let _guard = self.persist_lock.lock().await;
        let attached: Vec<BackendView> = self
            .snapshot()
            .into_iter()
            .filter(|b| !b.draining)
            .map(|b| BackendView { in_flight: 0, ..b })
            .collect();
        let path = self.dir.join(BACKENDS_FILE);
        tokio::task::spawn_blocking(move || super::write_json_atomic(&path, &attached))
            .await
            .map_err(std::io::Error::other)?
    }
}

fn load_routing(dir: &Path) -> anyhow::Result<Routing> {
    let path = dir.join(ROUTING_FILE);
    match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a routing file", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Routing::default()),
        Err(error) => Err(error).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn load_backends(dir: &Path) -> anyhow::Result<Vec<BackendView>> {
    let path = dir.join(BACKENDS_FILE);
    match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a backend list", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("failed to read {}", path.display())),
    }
}

/// Headers that describe one hop's connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Sets the forwarding headers: the peer's address is appended to a client-supplied
/// `X-Forwarded-For` (`client-supplied, peer`, one header line, so a backend reading the last
/// entry gets the address kiln saw); `X-Forwarded-Proto` and `X-Forwarded-Host` are set when
/// absent (a TLS terminator in front may have set them).
fn set_forwarded(headers: &mut HeaderMap, peer: SocketAddr) {
    let xff = HeaderName::from_static("x-forwarded-for");
    if !headers.contains_key(&xff) {
        // The common case: one value, no list to rebuild.
        if let Ok(value) = HeaderValue::try_from(peer.ip().to_string()) {
            headers.insert(xff, value);
        }
    } else {
        append_forwarded(headers, xff, peer);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !headers.contains_key("x-forwarded-host") {
        if let Some(host) = headers.get(hyper::header::HOST).cloned() {
            headers.insert("x-forwarded-host", host);
        }
    }
}

/// Appends the peer to the `X-Forwarded-For` values the client sent, as one header.
fn append_forwarded(headers: &mut HeaderMap, xff: HeaderName, peer: SocketAddr) {
    let mut chain: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(peer.ip().to_string());
    let value = HeaderValue::from_str(&chain.join(", "))
        .or_else(|_| HeaderValue::from_str(&peer.ip().to_string()));
    headers.remove(&xff);
    if let Ok(value) = value {
        headers.insert(xff, value);
    }
}

fn local_reply(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n"))).map_err(|never| match never {}).boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

async fn proxy(
    lb: Arc<Lb>,
    peer: SocketAddr,
    entry: Entry,
    active: Active,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    strip_hop_by_hop(&mut parts.headers);
    set_forwarded(&mut parts.headers, peer);
    let pin = match parts.headers.get(PIN_HEADER).map(|v| v.as_bytes()) {
        Some(b"always") => Pin::New,
        Some(b"never") => Pin::Old,
        _ => Pin::None,
    };
    let body = Timed::new(body, lb.body_timeout, "the request body");
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let Some(table) = lb.table() else {
        return Ok(local_reply(StatusCode::INTERNAL_SERVER_ERROR, "routing table unavailable"));
    };

    // A small body is buffered so the request can be sent again; a large one goes once.
    let buffered = body.size_hint().upper().is_some_and(|n| n <= MAX_BUFFERED_BODY);
    let (mut streaming, bytes) = if body.is_end_stream() {
        // No body at all (most GETs): nothing to read or buffer.
        (None, Bytes::new())
    } else if buffered {
        match body.collect().await {
            Ok(collected) => (None, collected.to_bytes()),
            Err(error) => {
                let status = if error.to_string().contains("paused longer") {
                    StatusCode::REQUEST_TIMEOUT
                } else {
                    StatusCode::BAD_REQUEST
                };
                return Ok(local_reply(status, "request body failed"));
            }
        }
    } else {
        (Some(body), Bytes::new())
    };

    let mut tried: Vec<Arc<Backend>> = Vec::with_capacity(MAX_ATTEMPTS);
    while tried.len() < MAX_ATTEMPTS {
        let Some(backend) = table.pick(entry, pin, &tried) else {
            break;
        };
        tried.push(backend.clone());
        let guard = InFlight::new(backend.clone());
        let body: ProxyBody = match streaming.take() {
            Some(body) => body.boxed(),
            None => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
        };
        let Some(authority) = backend.authority.clone() else { continue };
        let uri = match hyper::Uri::builder()
            .scheme(hyper::http::uri::Scheme::HTTP)
            .authority(authority)
            .path_and_query(path.clone())
            .build()
        {
            Ok(uri) => uri,
            Err(_) => continue,
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        // Only a buffered request can be sent again: the last copy of the headers goes as is.
        *request.headers_mut() = if buffered && tried.len() < MAX_ATTEMPTS {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let answer = match tokio::time::timeout(lb.backend_timeout, lb.client.request(request))
            .await
        {
            Ok(answer) => answer,
            Err(_) => {
                tracing::warn!(backend = %backend.id, timeout = ?lb.backend_timeout, "Backend did not answer in time.");
                return Ok(local_reply(StatusCode::GATEWAY_TIMEOUT, "backend timed out"));
            }
        };
        match answer {
            Ok(response) => {
                backend.eject(true);
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                if let Some(value) = backend.id_header.clone() {
                    head.headers.insert("x-kiln-backend", value);
                }
                let body = Tracked {
                    inner: Timed::new(body, lb.backend_timeout, "the backend's answer"),
                    _guard: guard,
                    _active: active,
                }
                .boxed();
                return Ok(Response::from_parts(head, body));
            }
            Err(error) => {
                let refused = error.is_connect();
                if refused {
                    backend.eject(false);
                }
                tracing::debug!(backend = %backend.id, error = %crate::error::chain(&error), "Backend request failed.");
                // Nothing reached the backend after a refused connection, so any buffered
                // request may go elsewhere; otherwise only idempotent ones may be repeated.
                let retry = buffered && (refused || idempotent);
                if !retry {
                    return Ok(local_reply(StatusCode::BAD_GATEWAY, "backend failed"));
                }
            }
        }
    }
    if tried.is_empty() && entry == Entry::Gray && table.routed {
        Ok(local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "gray port: no instance on the rollout's new image serves yet",
        ))
    } else if tried.is_empty() {
        Ok(local_reply(StatusCode::SERVICE_UNAVAILABLE, "no backend attached"))
    } else {
        Ok(local_reply(StatusCode::BAD_GATEWAY, "no backend answered"))
    }
}

#[derive(Clone)]
struct AdminState {
    lb: Arc<Lb>,
    state: Arc<Mutex<LbState>>,
    token: Arc<String>,
    move_tx: tokio::sync::mpsc::Sender<MoveListener>,
    http: Arc<hyper::server::conn::http1::Builder>,
    shutdown: CancellationToken,
}

impl AdminState {
    fn current(&self) -> Result<LbState, AdminError> {
        self.state.lock().map(|s| *s).map_err(|_| lock_poisoned())
    }

    /// Serves the gray listener on `port` (bound before the old one closes), or on none.
    async fn set_gray(&self, port: Option<u16>) -> Result<LbState, AdminError> {
        let current = self.lb.gray.lock().map_err(|_| lock_poisoned())?.as_ref().map(|g| g.0);
        if current != port || port.is_none() {
            let started = match port {
                Some(port) => {
                    let listener =
                        TcpListener::bind(("127.0.0.1", port)).await.map_err(|error| {
                            (
                                StatusCode::CONFLICT,
                                format!("cannot listen on 127.0.0.1:{port} (gray port): {error}"),
                            )
                        })?;
                    let stop = self.shutdown.child_token();
                    tokio::spawn(serve_gray(
                        self.lb.clone(),
                        self.http.clone(),
                        self.shutdown.clone(),
                        listener,
                        stop.clone(),
                    ));
                    Some((port, stop))
                }
                None => None,
            };
            let old =
                std::mem::replace(&mut *self.lb.gray.lock().map_err(|_| lock_poisoned())?, started);
            if let Some((_, stop)) = old {
                stop.cancel();
            }
            tracing::info!(?port, "Gray listener set.");
        }
        self.lb.persist_routing().await.map_err(routing_failed)?;
        let mut state = self.state.lock().map_err(|_| lock_poisoned())?;
        if state.gray_port != port {
            state.gray_port = port;
            super::write_json_atomic(&self.lb.dir.join(STATE_FILE), &*state).map_err(|e| {
                (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to write {STATE_FILE}: {e}"))
            })?;
        }
        Ok(*state)
    }
}

async fn admin_gray(
    State(admin): State<AdminState>,
    axum::Json(request): axum::Json<GrayRequest>,
) -> Result<axum::Json<LbState>, AdminError> {
    let traffic = admin.current()?.port;
    if request.port.is_some_and(|p| p == 0 || p == traffic) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("the gray port must be a port of its own (traffic is on {traffic})"),
        ));
    }
    admin.set_gray(request.port).await.map(axum::Json)
}

async fn admin_route(
    State(admin): State<AdminState>,
    axum::Json(route): axum::Json<RouteRequest>,
) -> Result<axum::Json<Routing>, AdminError> {
    if route.percent.is_some_and(|p| !(1..=99).contains(&p)) || route.image.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            "a route needs an image and a percent from 1 to 99 (or none)".to_owned(),
        ));
    }
    *admin.lb.route.lock().map_err(|_| lock_poisoned())? = Some(route.clone());
    admin.lb.rebuild();
    admin.lb.persist_routing().await.map_err(routing_failed)?;
    tracing::info!(image = %route.image, percent = ?route.percent, "Route set.");
    Ok(axum::Json(admin.lb.routing()))
}

async fn admin_unroute(State(admin): State<AdminState>) -> Result<axum::Json<Routing>, AdminError> {
    let had = admin.lb.route.lock().map_err(|_| lock_poisoned())?.take();
    admin.lb.rebuild();
    admin.lb.persist_routing().await.map_err(routing_failed)?;
    if had.is_some() {
        tracing::info!("Route cleared.");
    }
    Ok(axum::Json(admin.lb.routing()))
}

fn routing_failed(error: std::io::Error) -> AdminError {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to write {ROUTING_FILE}: {error}"))
}

type AdminError = (StatusCode, String);

fn lock_poisoned() -> AdminError {
    (StatusCode::INTERNAL_SERVER_ERROR, "lock poisoned".to_owned())
}

/// Lets a request through only with `Authorization: Bearer <admin token>` (constant time).
async fn admin_auth(
    State(admin): State<AdminState>,
    request: AxumRequest,
    next: Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use subtle::ConstantTimeEq as _;
    let presented = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(admin.token.as_bytes())) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            format!(
                "the admin endpoint needs `Authorization: Bearer` with the token in {TOKEN_FILE}\n"
            ),
        )
            .into_response()
    }
}

async fn admin_health(State(admin): State<AdminState>) -> Result<axum::Json<LbState>, AdminError> {
    Ok(axum::Json(admin.current()?))
}

/// Moves the traffic listener to another port: the new one is bound first (an error, e.g.
/// the port is busy, leaves the old one serving), then the accept loop switches over, takes
/// what is queued on the old port and closes it. Connections open on the old port finish.
async fn admin_listener(
    State(admin): State<AdminState>,
    axum::Json(request): axum::Json<ListenerRequest>,
) -> Result<axum::Json<LbState>, AdminError> {
    let current = admin.current()?;
    if request.port == current.port {
        return Ok(axum::Json(current));
    }
    let listener = TcpListener::bind(("127.0.0.1", request.port)).await.map_err(|error| {
        tracing::error!(port = request.port, %error, serving = current.port, "Cannot move the traffic listener.");
        (
            StatusCode::CONFLICT,
            format!(
                "cannot listen on 127.0.0.1:{}: {error}; still serving on 127.0.0.1:{}",
                request.port, current.port
            ),
        )
    })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(request.port);
    let (done, moved) = tokio::sync::oneshot::channel();
    admin
        .move_tx
        .send(MoveListener { listener, port, done })
        .await
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned()))?;
    moved.await.map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned()))?;
    // Written under the lock, so a concurrent update (a new standby) is never overwritten
    // with a stale copy.
    let mut state = admin.state.lock().map_err(|_| lock_poisoned())?;
    state.port = port;
    super::write_json_atomic(&admin.lb.dir.join(STATE_FILE), &*state).map_err(|e| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to write {STATE_FILE}: {e}"))
    })?;
    Ok(axum::Json(*state))
}

async fn admin_list(State(admin): State<AdminState>) -> axum::Json<Vec<BackendView>> {
    axum::Json(admin.lb.snapshot())
}

async fn admin_attach(
    State(admin): State<AdminState>,
    UrlPath(id): UrlPath<String>,
    axum::Json(attach): axum::Json<AttachRequest>,
) -> Result<axum::Json<BackendView>, AdminError> {
    if !valid_backend_id(&id) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("backend id `{id}` is not a kiln instance id (<fleet>-<8 hex digits>)"),
        ));
    }
    match attach.address.parse::<SocketAddr>() {
        Ok(address) if address.ip().is_loopback() && address.port() != 0 => {}
        Ok(_) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "address `{}` is not on a loopback interface: kiln lb serves only local instances",
                    attach.address
                ),
            ));
        }
        Err(_) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("address `{}` is not an ip:port", attach.address),
            ));
        }
    }
    let weight = attach.weight.unwrap_or(DEFAULT_WEIGHT);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("weight {weight} is not between 1 and {MAX_WEIGHT} (detach to drain)"),
        ));
    }
    let view = {
        let mut backends = admin
            .lb
            .backends
            .write()
            .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "lock poisoned".to_owned()))?;
        match backends.iter().position(|b| b.id == id) {
            Some(i)
                if backends[i].address == attach.address
                    && backends[i].weight == weight
                    && backends[i].image == attach.image =>
            {
                backends[i].draining.store(false, Ordering::SeqCst);
                backends[i].view()
            }
            found => {
                let backend = Arc::new(Backend::new(BackendView {
                    id: id.clone(),
                    address: attach.address.clone(),
                    draining: false,
                    in_flight: 0,
                    weight,
                    image: attach.image.clone(),
                }));
                let view = backend.view();
                match found {
                    Some(i) => backends[i] = backend,
                    None => backends.push(backend),
                }
                view
            }
        }
    };
    admin.lb.rebuild();
    admin.lb.persist().await.map_err(persist_failed)?;
    tracing::info!(backend = %id, address = %view.address, weight, "Backend attached.");
    Ok(axum::Json(view))
}

#[derive(Debug, Deserialize)]
struct DetachQuery {
    #[serde(default)]
    drain_ms: u64,
}

async fn admin_detach(
    State(admin): State<AdminState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<DetachQuery>,
) -> Result<axum::Json<DetachReply>, AdminError> {
    let found = admin
        .lb
        .backends
        .read()
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "lock poisoned".to_owned()))?
        .iter()
        .find(|b| b.id == id)
        .cloned();
    let Some(backend) = found else {
        return Ok(axum::Json(DetachReply { removed: false, in_flight_left: 0 }));
    };
    // Out of rotation (weight 0, and off disk) first, then wait for what is in flight.
    backend.draining.store(true, Ordering::SeqCst);
    admin.lb.rebuild();
    admin.lb.persist().await.map_err(persist_failed)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(query.drain_ms);
    while backend.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_flight_left = backend.in_flight.load(Ordering::SeqCst);
    {
        let mut backends = admin
            .lb
            .backends
            .write()
            .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "lock poisoned".to_owned()))?;
        // A re-attach during the drain wins: only remove this very backend, still draining.
        backends.retain(|b| !(Arc::ptr_eq(b, &backend) && b.draining.load(Ordering::SeqCst)));
    }
    admin.lb.rebuild();
    tracing::info!(backend = %id, in_flight_left, "Backend detached.");
    Ok(axum::Json(DetachReply { removed: true, in_flight_left }))
}

fn persist_failed(error: std::io::Error) -> AdminError {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to write {BACKENDS_FILE}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_with_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-request-id"]);
    }

    #[test]
    fn backend_ids_have_the_shape_of_instance_ids() {
        for good in ["web-0a1b2c3d", "my-fleet-deadbeef", "a.b_c-00000000"] {
            assert!(valid_backend_id(good), "{good}");
        }
        for bad in [
            "",
            "web",
            "web-",
            "-deadbeef",
            "web-xyz12345",
            "web-deadbeef0",
            "../x-deadbeef",
            "we b-deadbeef",
        ] {
            assert!(!valid_backend_id(bad), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_append_the_peer() {
        let peer: SocketAddr = "127.0.0.7:5555".parse().expect("addr");
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1, 10.0.0.1"));
        headers.insert("host", HeaderValue::from_static("shop.example"));
        set_forwarded(&mut headers, peer);
        let xff: Vec<&str> =
            headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        assert_eq!(xff, ["203.0.113.9, 198.51.100.1, 10.0.0.1, 127.0.0.7"]);
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn admin_token_is_created_private_and_a_readable_one_is_fixed() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = ensure_admin_token(tmp.path()).expect("create");
        assert_eq!(token.len(), 64);
        let path = tmp.path().join(TOKEN_FILE);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(ensure_admin_token(tmp.path()).expect("read"), token, "stable");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(ensure_admin_token(tmp.path()).expect("read"), token);
        assert_eq!(mode(&path), 0o600, "mode fixed");
        std::fs::write(&path, "short").expect("write");
        let error = ensure_admin_token(tmp.path()).expect_err("junk token");
        assert!(error.to_string().contains("admin-token"), "{error}");
    }

    #[test]
    fn state_and_backend_files_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(read_state(tmp.path()).is_none());
        assert!(load_backends(tmp.path()).expect("no file is empty").is_empty());
        let backends = vec![BackendView {
            id: "web-1".to_owned(),
            address: "127.0.0.1:8080".to_owned(),
            draining: false,
            in_flight: 0,
            weight: DEFAULT_WEIGHT,
            image: Some("/images/a".to_owned()),
        }];
        super::super::write_json_atomic(&tmp.path().join(BACKENDS_FILE), &backends).expect("write");
        assert_eq!(load_backends(tmp.path()).expect("load"), backends);
        std::fs::write(tmp.path().join(BACKENDS_FILE), "junk").expect("write junk");
        let error = load_backends(tmp.path()).expect_err("junk is an error");
        assert!(format!("{error:#}").contains("backends.json"), "{error:#}");
    }
}
