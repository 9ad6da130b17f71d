//! The HTTP surface (axum): webhook receivers, the JSON API under `/api/v1`, SSE, `/metrics`.
//! Handlers translate HTTP into calls on [`AppState`] and back; they never run hooks or
//! providers themselves.
//!
//! ```text
//! POST /hooks/{gitlab,github,gitea,generic}  ─▶ verify ─▶ dedup ─▶ match repo/ref ─▶ source.trigger()  (202)
//! GET  /api/v1/...                           ─▶ store / fleet view (read only)
//! POST /api/v1/fleets/{name}/{verb}, /trigger ─▶ bearer token or session + CSRF ─▶ operator command channel
//! GET  /metrics, /healthz, /                  ─▶ Prometheus text, liveness, dashboard
//! POST /login, /logout                        ─▶ dashboard session cookie (auth.rs, docs/dashboard.md)
//! ```
//!
//! The listener (`listen.rs`) is hyper's HTTP/1 connection builder in kiln's own accept loop:
//! header and body timeouts, a connection cap that sheds the oldest idle connection, and
//! request bodies read through `body.rs` (per-request cap, shared in-flight budget) only after
//! the headers have been authenticated. Bounds: [`ServerLimits`], docs/api.md.
//!
//! OWNER: server helper. `WebhookSecrets`, `ServerConfig`, `AppState`, `router` and `serve`
//! are the contract with the daemon. See docs/api.md for the wire format.

pub mod api;
mod auth;
pub mod body;
mod dashboard;
mod listen;
pub mod webhooks;

use std::sync::Arc;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::operator::OperatorHandle;

/// Default largest accepted request body: GitLab push payloads list up to 20 commits with their
/// file lists, and a big monorepo push can reach several megabytes, so leave ample room.
pub const DEFAULT_MAX_BODY: usize = 25 * 1024 * 1024;

/// How many webhook deliveries may be handled at once before new ones get 503. Handlers do
/// no I/O after reading the body, so this only bites under a flood.
pub const MAX_WEBHOOKS_IN_FLIGHT: usize = 1024;

/// Largest body of an API call (a rollback target): the API takes no bulk uploads.
pub const MAX_API_BODY: usize = 64 * 1024;

/// How many delivery ids are remembered to recognise replays.
pub const DEDUP_CAPACITY: usize = 10_000;

/// A secret read from a file or the environment; `Debug` never prints it.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// Compares `candidate` with the secret in constant time (for equal lengths). An empty
    /// secret never matches anything, so a blank file cannot open a receiver.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        !self.0.is_empty() && bool::from(self.0.as_bytes().ct_eq(candidate))
    }
}

/// Webhook secrets. A receiver whose secret is missing answers 401 saying how to configure it
/// (secure by default).
#[derive(Debug, Clone, Default)]
pub struct WebhookSecrets {
    /// GitLab `X-Gitlab-Token`.
    pub gitlab_token: Option<Secret>,
    /// GitLab signing secret (`webhook-signature` header).
    pub gitlab_signing: Option<Secret>,
    /// GitHub `X-Hub-Signature-256` secret.
    pub github: Option<Secret>,
    /// Gitea `X-Gitea-Signature` secret.
    pub gitea: Option<Secret>,
    /// Generic receiver HMAC secret (also used by `hooks/post-receive`).
    pub generic: Option<Secret>,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer token for mutating API calls. Empty refuses every mutating call.
    pub api_token: Secret,
    /// Webhook secrets.
    pub secrets: WebhookSecrets,
    /// Largest accepted request body in bytes (see [`DEFAULT_MAX_BODY`]).
    pub max_body: usize,
    /// Timeouts and caps of the listener.
    pub limits: ServerLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_token: Secret::default(),
            secrets: WebhookSecrets::default(),
            max_body: DEFAULT_MAX_BODY,
            limits: ServerLimits::default(),
        }
    }
}

/// Timeouts and caps that keep slow or idle clients from holding the daemon's memory and file
/// descriptors (docs/security.md).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// A connection waiting for a request, fresh or kept alive, must deliver the complete
    /// request head within this; otherwise it is closed. This is both the slow-header
    /// (slowloris) timeout and the idle keep-alive timeout.
    pub header_timeout: std::time::Duration,
    /// A request body must arrive whole within this (408 otherwise).
    pub body_timeout: std::time::Duration,
    /// Open connections at most; when full, a new connection closes the one idle longest,
    /// so `/healthz` gets through a flood of idle connections.
    pub max_connections: usize,
    /// Request body bytes held across all requests at once; past it, 503 + `Retry-After`.
    pub max_body_in_flight: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            max_connections: 512,
            max_body_in_flight: 64 * 1024 * 1024,
        }
    }
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The operator.
    pub operator: OperatorHandle,
    /// Settings.
    pub config: Arc<ServerConfig>,
}

/// Per-router runtime state that is not part of the daemon's contract: the replay set and the
/// overload gate. Built by [`router`], so each router (and each test) gets its own.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) app: AppState,
    pub(crate) deliveries: Arc<webhooks::DeliveryLog>,
    pub(crate) gate: Arc<tokio::sync::Semaphore>,
    pub(crate) bodies: body::BodyBudget,
    /// Dashboard login sessions (`auth.rs`).
    pub(crate) sessions: Arc<auth::Sessions>,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> axum::Router {
    let bodies = body::BodyBudget::new(state.config.limits.max_body_in_flight);
    let shared = Shared {
        app: state,
        deliveries: Arc::new(webhooks::DeliveryLog::new(DEDUP_CAPACITY)),
        gate: Arc::new(tokio::sync::Semaphore::new(MAX_WEBHOOKS_IN_FLIGHT)),
        bodies,
        sessions: Arc::new(auth::Sessions::default()),
    };
    axum::Router::new()
        .route("/", get(dashboard::page))
        .route("/login", post(dashboard::login))
        .route("/logout", post(dashboard::logout))
        .route("/ui/live", get(dashboard::live))
        .route("/ui/kiln.js", get(dashboard::script))
        .route("/ui/kiln.css", get(dashboard::style))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(api::metrics))
        .route("/hooks/gitlab", post(webhooks::gitlab))
        .route("/hooks/github", post(webhooks::github))
        .route("/hooks/gitea", post(webhooks::gitea))
        .route("/hooks/generic", post(webhooks::generic))
        .nest("/api/v1", api::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(shared)
}

/// `GET /healthz`: `200 ok` while the daemon works; `503` naming the reason while the store
/// cannot write (a full disk), so a supervisor or load balancer sees a daemon that is up but
/// unable to record anything.
async fn healthz(axum::extract::State(shared): axum::extract::State<Shared>) -> Response {
    match shared.app.operator.store.failure() {
        None => "ok\n".into_response(),
        Some(failure) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failing since {}: {}\n", failure.since, failure.error),
        )
            .into_response(),
    }
}

/// How long `/livez` waits for its store read.
const LIVEZ_STORE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /livez`: `200 ok` when the server answers and a read of the store completes within
/// 5 s; `503` naming the reason when the read hangs or fails outside a known store failure (a
/// wedged database: a restart is the cure). Unlike `/healthz` it stays `200` while the store is
/// failing (a full disk), which kiln survives by itself.
async fn livez(axum::extract::State(shared): axum::extract::State<Shared>) -> Response {
    let store = shared.app.operator.store.clone();
    let read = tokio::task::spawn_blocking(move || store.get_meta::<u32>("schema_version"));
    let problem = match tokio::time::timeout(LIVEZ_STORE_DEADLINE, read).await {
        Ok(Ok(Ok(_))) => return "ok\n".into_response(),
        // A failing store (a full disk) is a state kiln handles and leaves by itself, reads
        // included: alive, and `/healthz` says what fails.
        Ok(Ok(Err(_))) if shared.app.operator.store.failure().is_some() => {
            return "ok (the store is failing; see /healthz)\n".into_response();
        }
        Ok(Ok(Err(error))) => format!("store unreadable: {}", crate::error::chain(&error)),
        Ok(Err(error)) => format!("store read failed: {error}"),
        Err(_) => "store read took over 5s".to_owned(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response()
}

/// Serves `router(state)` on `listener` until `shutdown` fires, with the timeouts and caps of
/// `state.config.limits` (see [`ServerLimits`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.config.limits.clone();
    listen::serve(listener, router(state), limits, shutdown).await
}

/// An error answered as JSON `{"error": "..."}`. 5xx are logged once here; 4xx are the
/// client's business and are not.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// What went wrong, for the caller.
    pub message: String,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "API request failed.");
        }
        let mut response =
            (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, body::RETRY_AFTER_SECS.into());
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        let status = match error {
            crate::store::StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, crate::error::chain(&error))
    }
}
