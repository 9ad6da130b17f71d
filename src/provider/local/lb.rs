//! kiln's own load balancer process (`kiln lb`): an HTTP reverse proxy on hyper with an admin
//! endpoint to attach, detach and drain backends.
//!
//! ```text
//!  clients ──▶ 127.0.0.1:<port> ──round robin──▶ backend 127.0.0.1:a
//!                                             └─▶ backend 127.0.0.1:b   (draining: no new requests)
//!  kiln ──▶ 127.0.0.1:<admin port>  GET /healthz · GET /backends · PUT/DELETE /backends/{id}
//! ```
//!
//! The process outlives the daemon. Everything a restarted kiln (or a restarted LB) needs is in
//! the state directory: `lb.json` (pid, start time, ports; written once both ports are bound)
//! and `backends.json` (the attached set, rewritten atomically on every change). A request that
//! fails to reach a backend is retried on another one when that is safe (the connection was
//! refused, or the method is idempotent and the body was buffered), so a backend dying between
//! its health check and a request does not surface as a 502.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, put};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The file in the state dir naming the running LB process and its ports.
pub const STATE_FILE: &str = "lb.json";
/// The file in the state dir holding the attached backends.
pub const BACKENDS_FILE: &str = "backends.json";

/// Request bodies up to this size are buffered so the request can be retried on another
/// backend; larger (or unsized, chunked) bodies are streamed through once.
const MAX_BUFFERED_BODY: u64 = 1024 * 1024;
/// How many backends one request may try.
const MAX_ATTEMPTS: usize = 3;
/// A backend that refused a connection is skipped for this long (passive health checking), so
/// a dead backend costs one retry, not one per request.
const EJECT_FOR: Duration = Duration::from_secs(2);

/// Arguments of `kiln lb`.
#[derive(clap::Args, Debug, Clone)]
pub struct LbArgs {
    /// Directory holding the load balancer's state (`lb.json`, `backends.json`); the process
    /// exits when it disappears.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Port to serve traffic on, on 127.0.0.1 (0: pick a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of the admin endpoint, on 127.0.0.1 (0: pick a free one; it is written to `lb.json`).
    #[arg(long, default_value_t = 0)]
    pub admin_port: u16,
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
}

/// Body of `PUT /backends/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachRequest {
    /// `host:port` of the backend.
    pub address: String,
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
    serve(args, shutdown).await
}

/// Runs the load balancer until `shutdown` fires or its state dir is removed (in-process use,
/// e.g. tests and benchmarks).
pub async fn serve(args: LbArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = args.state_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("failed to create the state dir {}", dir.display()))?;
    let backends = load_backends(&dir)?;
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("failed to listen on 127.0.0.1:{}", args.port))?;
    let admin = TcpListener::bind(("127.0.0.1", args.admin_port))
        .await
        .with_context(|| format!("failed to listen on 127.0.0.1:{} (admin)", args.admin_port))?;
    let port = listener.local_addr()?.port();
    let admin_port = admin.local_addr()?.port();

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let lb = Arc::new(Lb {
        backends: RwLock::new(backends.into_iter().map(Backend::new).map(Arc::new).collect()),
        next: AtomicUsize::new(0),
        dir: dir.clone(),
        persist_lock: tokio::sync::Mutex::new(()),
        client,
    });

    let pid = i32::try_from(std::process::id()).context("pid out of range")?;
    let start_ticks =
        crate::hooks::process::start_ticks(pid).context("cannot read own start time")?;
    let state = LbState {
        process: crate::hooks::process::ProcessRef { pid, start_ticks },
        port,
        admin_port,
    };
    super::write_json_atomic(&dir.join(STATE_FILE), &state)
        .with_context(|| format!("failed to write {}", dir.join(STATE_FILE).display()))?;
    tracing::info!(port, admin_port, "Load balancer serving.");

    let router = axum::Router::new()
        .route("/healthz", get(admin_health))
        .route("/backends", get(admin_list))
        .route("/backends/{id}", put(admin_attach).delete(admin_detach))
        .with_state(AdminState { lb: lb.clone(), state });
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

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let lb = lb.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| proxy(lb.clone(), peer, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    Ok(())
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

struct Lb {
    backends: RwLock<Vec<Arc<Backend>>>,
    next: AtomicUsize,
    dir: PathBuf,
    /// Serialises rewrites of `backends.json` so the last change always wins on disk.
    persist_lock: tokio::sync::Mutex<()>,
    client: Client<HttpConnector, ProxyBody>,
}

struct Backend {
    id: String,
    address: String,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    ejected_until: Mutex<Option<tokio::time::Instant>>,
}

impl Backend {
    fn new(view: BackendView) -> Backend {
        Backend {
            id: view.id,
            address: view.address,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    fn view(&self) -> BackendView {
        BackendView {
            id: self.id.clone(),
            address: self.address.clone(),
            draining: self.draining.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
        }
    }

    fn ejected(&self) -> bool {
        match self.ejected_until.lock() {
            Ok(until) => until.is_some_and(|t| tokio::time::Instant::now() < t),
            Err(_) => false,
        }
    }

    fn eject(&self, healthy: bool) {
        if let Ok(mut until) = self.ejected_until.lock() {
            *until = (!healthy).then(|| tokio::time::Instant::now() + EJECT_FOR);
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

/// A backend's response body, holding the in-flight count until it is fully sent.
struct Tracked {
    inner: Incoming,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Lb {
    /// The next backend in round-robin order that is attached, not draining and not in `tried`;
    /// an ejected one only when nothing else is left.
    fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let backends = self.backends.read().ok()?;
        let active: Vec<&Arc<Backend>> = backends
            .iter()
            .filter(|b| !b.draining.load(Ordering::SeqCst))
            .filter(|b| !tried.iter().any(|t| Arc::ptr_eq(t, b)))
            .collect();
        if active.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..active.len() {
            let candidate = active[(start + i) % active.len()];
            if !candidate.ejected() {
                return Some(candidate.clone());
            }
            fallback.get_or_insert(candidate);
        }
        fallback.cloned()
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
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(value) = HeaderValue::from_str(&peer.ip().to_string()) {
        parts.headers.append("x-forwarded-for", value);
    }
    let path = parts.uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());

    // A small body is buffered so the request can be sent again; a large one goes once.
    let buffered = body.size_hint().upper().is_some_and(|n| n <= MAX_BUFFERED_BODY);
    let (mut streaming, bytes) = if buffered {
        match body.collect().await {
            Ok(collected) => (None, collected.to_bytes()),
            Err(_) => return Ok(local_reply(StatusCode::BAD_REQUEST, "request body failed")),
        }
    } else {
        (Some(body), Bytes::new())
    };

    let mut tried: Vec<Arc<Backend>> = Vec::new();
    while tried.len() < MAX_ATTEMPTS {
        let Some(backend) = lb.pick(&tried) else {
            break;
        };
        tried.push(backend.clone());
        let guard = InFlight::new(backend.clone());
        let body: ProxyBody = match streaming.take() {
            Some(body) => body.boxed(),
            None => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
        };
        let uri = match format!("http://{}{}", backend.address, path).parse::<hyper::Uri>() {
            Ok(uri) => uri,
            Err(_) => continue,
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = parts.headers.clone();
        match lb.client.request(request).await {
            Ok(response) => {
                backend.eject(true);
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                if let Ok(value) = HeaderValue::from_str(&backend.id) {
                    head.headers.insert("x-kiln-backend", value);
                }
                let body = Tracked { inner: body, _guard: guard }.boxed();
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
    if tried.is_empty() {
        Ok(local_reply(StatusCode::SERVICE_UNAVAILABLE, "no backend attached"))
    } else {
        Ok(local_reply(StatusCode::BAD_GATEWAY, "no backend answered"))
    }
}

#[derive(Clone)]
struct AdminState {
    lb: Arc<Lb>,
    state: LbState,
}

type AdminError = (StatusCode, String);

async fn admin_health(State(admin): State<AdminState>) -> axum::Json<LbState> {
    axum::Json(admin.state)
}

async fn admin_list(State(admin): State<AdminState>) -> axum::Json<Vec<BackendView>> {
    axum::Json(admin.lb.snapshot())
}

async fn admin_attach(
    State(admin): State<AdminState>,
    UrlPath(id): UrlPath<String>,
    axum::Json(attach): axum::Json<AttachRequest>,
) -> Result<axum::Json<BackendView>, AdminError> {
    if attach.address.parse::<SocketAddr>().is_err() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("address `{}` is not an ip:port", attach.address),
        ));
    }
    let view = {
        let mut backends = admin
            .lb
            .backends
            .write()
            .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "lock poisoned".to_owned()))?;
        match backends.iter().position(|b| b.id == id) {
            Some(i) if backends[i].address == attach.address => {
                backends[i].draining.store(false, Ordering::SeqCst);
                backends[i].view()
            }
            found => {
                let backend = Arc::new(Backend::new(BackendView {
                    id: id.clone(),
                    address: attach.address.clone(),
                    draining: false,
                    in_flight: 0,
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
    admin.lb.persist().await.map_err(persist_failed)?;
    tracing::info!(backend = %id, address = %view.address, "Backend attached.");
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
    // Out of rotation (and off disk) first, then wait for what is in flight.
    backend.draining.store(true, Ordering::SeqCst);
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
    fn state_and_backend_files_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(read_state(tmp.path()).is_none());
        assert!(load_backends(tmp.path()).expect("no file is empty").is_empty());
        let backends = vec![BackendView {
            id: "web-1".to_owned(),
            address: "127.0.0.1:8080".to_owned(),
            draining: false,
            in_flight: 0,
        }];
        super::super::write_json_atomic(&tmp.path().join(BACKENDS_FILE), &backends).expect("write");
        assert_eq!(load_backends(tmp.path()).expect("load"), backends);
        std::fs::write(tmp.path().join(BACKENDS_FILE), "junk").expect("write junk");
        let error = load_backends(tmp.path()).expect_err("junk is an error");
        assert!(format!("{error:#}").contains("backends.json"), "{error:#}");
    }
}
