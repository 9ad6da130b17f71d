//! Webhook receivers: GitLab, GitHub, Gitea and a generic HMAC receiver (used by
//! `hooks/post-receive`).
//!
//! A delivery is only a hint. The handler authenticates it, drops replays, checks that it is
//! about the watched repository and branch, asks the source watcher for a fetch and answers 202
//! at once; kiln then reads git itself and never trusts the payload's commit list. Anything that
//! is well formed but not for kiln (another repo, another branch, a tag, an issue event) gets
//! 202 `{"status":"ignored"}`, because GitLab disables a hook for good after repeated 4xx.
//!
//! Order of checks: overload gate (503) → what the headers prove (401: receiver configured,
//! GitLab token, signature header present and well formed) → body, read only now (413 over
//! the cap, 503 + `Retry-After` past the shared body budget, 408 when it stalls) → signature
//! over the body (401) → event type → payload (400) → replay (200 duplicate) → repository →
//! ref → trigger (202).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::body::RETRY_AFTER_SECS;
use super::{Secret, Shared};

type HmacSha256 = Hmac<Sha256>;

/// How far a GitLab `webhook-timestamp` may be from our clock (Standard Webhooks' tolerance).
const SIGNATURE_TOLERANCE_SECS: i64 = 5 * 60;

/// The generic receiver's signature header: `sha256=<hex HMAC-SHA256 of the raw body>`.
pub const GENERIC_SIGNATURE_HEADER: &str = "x-kiln-signature";

/// The 40 zeros a push payload carries as `after` when the branch was deleted.
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Which kind of sender a receiver speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// `/hooks/gitlab`.
    GitLab,
    /// `/hooks/github`.
    GitHub,
    /// `/hooks/gitea`.
    Gitea,
    /// `/hooks/generic`.
    Generic,
}

impl Forge {
    /// The lowercase name used in paths, metrics and the trigger (`webhook:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Forge::GitLab => "gitlab",
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
            Forge::Generic => "generic",
        }
    }

    /// Headers that carry a delivery id stable across retries, in order of preference.
    /// (GitLab's `X-Gitlab-Webhook-UUID` names the hook, not the delivery, so it is not one.)
    fn delivery_headers(self) -> &'static [&'static str] {
        match self {
            Forge::GitLab => &["idempotency-key", "webhook-id", "x-gitlab-event-uuid"],
            Forge::GitHub => &["x-github-delivery"],
            Forge::Gitea => &["x-gitea-delivery", "x-forgejo-delivery"],
            Forge::Generic => &["idempotency-key", "x-kiln-delivery"],
        }
    }
}

/// A bounded set of recently seen delivery ids: the oldest is forgotten first.
#[derive(Debug)]
pub struct DeliveryLog {
    capacity: usize,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl DeliveryLog {
    /// A log remembering the last `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        DeliveryLog { capacity: capacity.max(1), seen: Mutex::new(Default::default()) }
    }

    /// Records `id`; false if it was already there (a replay).
    pub fn first_time(&self, id: &str) -> bool {
        let Ok(mut guard) = self.seen.lock() else {
            // A poisoned lock only means another handler panicked; accepting is the safe side.
            return true;
        };
        let (set, order) = &mut *guard;
        if set.contains(id) {
            return false;
        }
        if order.len() >= self.capacity {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        set.insert(id.to_owned());
        order.push_back(id.to_owned());
        true
    }
}

/// What a receiver answers, plus the metrics label.
struct Reply {
    status: StatusCode,
    result: &'static str,
    body: Value,
}

impl Reply {
    fn error(status: StatusCode, result: &'static str, message: impl Into<String>) -> Self {
        Reply { status, result, body: json!({ "error": message.into() }) }
    }

    fn ignored(reason: impl Into<String>) -> Self {
        Reply {
            status: StatusCode::ACCEPTED,
            result: "ignored",
            body: json!({ "status": "ignored", "reason": reason.into() }),
        }
    }
}

/// `POST /hooks/gitlab`.
pub(crate) async fn gitlab(State(shared): State<Shared>, request: Request) -> Response {
    receive(&shared, Forge::GitLab, request).await
}

/// `POST /hooks/github`.
pub(crate) async fn github(State(shared): State<Shared>, request: Request) -> Response {
    receive(&shared, Forge::GitHub, request).await
}

/// `POST /hooks/gitea`.
pub(crate) async fn gitea(State(shared): State<Shared>, request: Request) -> Response {
    receive(&shared, Forge::Gitea, request).await
}

/// `POST /hooks/generic`.
pub(crate) async fn generic(State(shared): State<Shared>, request: Request) -> Response {
    receive(&shared, Forge::Generic, request).await
}

async fn receive(shared: &Shared, forge: Forge, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let reply = handle(shared, forge, &parts.headers, body).await;
    let metrics = &shared.app.operator.metrics;
    metrics.webhook(forge.name(), reply.result);
    let reason = reply.body.get("reason").or_else(|| reply.body.get("error"));
    let reason = reason.and_then(Value::as_str).unwrap_or("");
    tracing::info!(
        source = forge.name(),
        result = reply.result,
        status = reply.status.as_u16(),
        reason,
        "Webhook delivery answered."
    );
    let mut response = (reply.status, Json(reply.body)).into_response();
    if reply.status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(RETRY_AFTER, RETRY_AFTER_SECS.into());
    }
    response
}

async fn handle(shared: &Shared, forge: Forge, headers: &HeaderMap, body: Body) -> Reply {
    // Held until the reply is built; a flood gets a retryable 503 instead of a queue.
    let Ok(_permit) = shared.gate.try_acquire() else {
        return Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many webhook deliveries in flight; retry later",
        );
    };
    let config = &shared.app.config;
    // Everything the headers can prove wrong is refused before a byte of the body is read.
    if let Err(message) = authenticate_headers(forge, &config.secrets, headers) {
        return Reply::error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    }
    let body = match shared
        .bodies
        .read(headers, body, config.max_body, config.limits.body_timeout)
        .await
    {
        Ok(body) => body,
        Err(error) => return Reply::error(error.status(), error.result(), error.to_string()),
    };
    if let Err(message) = authenticate(forge, &config.secrets, headers, &body.bytes) {
        return Reply::error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    }

    match event_kind(forge, headers) {
        Ok(EventKind::Push) => {}
        Ok(EventKind::Ping) => {
            return Reply {
                status: StatusCode::OK,
                result: "pong",
                body: json!({"status": "pong"}),
            };
        }
        Ok(EventKind::Other(event)) => {
            return Reply::ignored(format!("event `{event}` is not a push"));
        }
        Err(message) => return Reply::error(StatusCode::BAD_REQUEST, "bad_request", message),
    }

    let content_type = header(headers, "content-type");
    let hint = match parse_push(forge, content_type, &body.bytes) {
        Ok(hint) => hint,
        Err(message) => return Reply::error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    drop(body);

    if let Some(id) = delivery_id(forge, headers) {
        if !shared.deliveries.first_time(&format!("{}:{id}", forge.name())) {
            return Reply {
                status: StatusCode::OK,
                result: "duplicate",
                body: json!({ "status": "duplicate", "delivery": id }),
            };
        }
    }

    let source = shared.app.operator.source.config();
    if let Err(reason) = hint.matches_repo(&source.url) {
        return Reply::ignored(reason);
    }
    let watched_ref = format!("refs/heads/{}", source.branch);
    match &hint.git_ref {
        Some(git_ref) if *git_ref != watched_ref => {
            return Reply::ignored(format!(
                "ref `{git_ref}` is not the watched branch `{watched_ref}`"
            ));
        }
        // A push payload always names its ref; only the generic receiver may omit it.
        None if forge != Forge::Generic => {
            return Reply::ignored("payload names no ref");
        }
        _ => {}
    }

    let deleted = hint.deleted;
    shared.app.operator.source.trigger(&format!("webhook:{}", forge.name()));
    Reply {
        status: StatusCode::ACCEPTED,
        result: "accepted",
        body: json!({ "status": "accepted", "branch_deleted": deleted }),
    }
}

enum EventKind {
    Push,
    Ping,
    Other(String),
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn event_kind(forge: Forge, headers: &HeaderMap) -> Result<EventKind, String> {
    let (name, pushes): (&str, &[&str]) = match forge {
        Forge::GitLab => ("x-gitlab-event", &["Push Hook", "Tag Push Hook"]),
        Forge::GitHub => ("x-github-event", &["push"]),
        Forge::Gitea => ("x-gitea-event", &["push"]),
        Forge::Generic => return Ok(EventKind::Push),
    };
    let event = header(headers, name)
        .or_else(|| (forge == Forge::Gitea).then(|| header(headers, "x-forgejo-event")).flatten())
        .ok_or_else(|| format!("missing {name} header"))?;
    if pushes.contains(&event) {
        Ok(EventKind::Push)
    } else if forge == Forge::GitHub && event == "ping" {
        Ok(EventKind::Ping)
    } else {
        Ok(EventKind::Other(event.to_owned()))
    }
}

fn delivery_id(forge: Forge, headers: &HeaderMap) -> Option<String> {
    forge.delivery_headers().iter().find_map(|name| header(headers, name)).map(str::to_owned)
}

/// Checks the delivery's credentials against the configured secret. The error says what is
/// wrong (never the secret) and, when the receiver is not configured, how to configure it.
fn authenticate(
    forge: Forge,
    secrets: &super::WebhookSecrets,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    match forge {
        Forge::GitLab => {
            if secrets.gitlab_token.is_none() && secrets.gitlab_signing.is_none() {
                return Err(not_configured(
                    "gitlab",
                    "KILN_GITLAB_TOKEN or --gitlab-token-file (and/or KILN_GITLAB_SIGNING_SECRET or --gitlab-signing-secret-file)",
                ));
            }
            if let Some(token) = &secrets.gitlab_token {
                let sent = header(headers, "x-gitlab-token").ok_or("missing X-Gitlab-Token")?;
                if !token.matches(sent.as_bytes()) {
                    return Err("wrong X-Gitlab-Token".into());
                }
            }
            if let Some(signing) = &secrets.gitlab_signing {
                verify_standard_webhook(signing, headers, body, crate::model::now().timestamp())?;
            }
            Ok(())
        }
        Forge::GitHub => {
            let secret = secrets.github.as_ref().ok_or_else(|| {
                not_configured("github", "KILN_GITHUB_SECRET or --github-secret-file")
            })?;
            let sent = header(headers, "x-hub-signature-256")
                .ok_or("missing X-Hub-Signature-256 (set a secret on the GitHub webhook)")?;
            let hex =
                sent.strip_prefix("sha256=").ok_or("X-Hub-Signature-256 must be sha256=<hex>")?;
            verify_hex(secret, hex, body, "X-Hub-Signature-256")
        }
        Forge::Gitea => {
            let secret = secrets.gitea.as_ref().ok_or_else(|| {
                not_configured("gitea", "KILN_GITEA_SECRET or --gitea-secret-file")
            })?;
            let sent = header(headers, "x-gitea-signature")
                .or_else(|| header(headers, "x-forgejo-signature"))
                .ok_or("missing X-Gitea-Signature (set a secret on the Gitea webhook)")?;
            verify_hex(secret, sent, body, "X-Gitea-Signature")
        }
        Forge::Generic => {
            let secret = secrets.generic.as_ref().ok_or_else(|| {
                not_configured("generic", "KILN_GENERIC_SECRET or --generic-secret-file")
            })?;
            let sent = header(headers, GENERIC_SIGNATURE_HEADER)
                .ok_or("missing X-Kiln-Signature: sha256=<hex HMAC-SHA256 of the body>")?;
            let hex =
                sent.strip_prefix("sha256=").ok_or("X-Kiln-Signature must be sha256=<hex>")?;
            verify_hex(secret, hex, body, "X-Kiln-Signature")
        }
    }
}

/// The part of [`authenticate`] that needs no body, run before the body is read: the receiver
/// has a secret, GitLab's plain token matches, and the signature headers are present and well
/// formed (a signature that cannot be valid is refused without reading what it signs).
fn authenticate_headers(
    forge: Forge,
    secrets: &super::WebhookSecrets,
    headers: &HeaderMap,
) -> Result<(), String> {
    /// An HMAC-SHA256 in hex: 64 hex digits.
    fn hex_digest(sent: &str, name: &str) -> Result<(), String> {
        if sent.len() == 64 && sent.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!("{name} is not a hex HMAC-SHA256"))
        }
    }
    match forge {
        Forge::GitLab => {
            if secrets.gitlab_token.is_none() && secrets.gitlab_signing.is_none() {
                return authenticate(forge, secrets, headers, b"");
            }
            if let Some(token) = &secrets.gitlab_token {
                let sent = header(headers, "x-gitlab-token").ok_or("missing X-Gitlab-Token")?;
                if !token.matches(sent.as_bytes()) {
                    return Err("wrong X-Gitlab-Token".into());
                }
            }
            if let Some(signing) = &secrets.gitlab_signing {
                if signing.0.is_empty() {
                    return Err("webhook-signature cannot match an empty signing secret".into());
                }
                header(headers, "webhook-id").ok_or("missing webhook-id header")?;
                let ts = header(headers, "webhook-timestamp")
                    .ok_or("missing webhook-timestamp header")?;
                header(headers, "webhook-signature").ok_or("missing webhook-signature")?;
                let ts: i64 = ts.parse().map_err(|_| "webhook-timestamp is not Unix seconds")?;
                if (crate::model::now().timestamp() - ts).abs() > SIGNATURE_TOLERANCE_SECS {
                    return Err("webhook-timestamp is more than 5 minutes from kiln's clock".into());
                }
            }
            Ok(())
        }
        Forge::GitHub => {
            let secret = secrets.github.as_ref().ok_or_else(|| {
                not_configured("github", "KILN_GITHUB_SECRET or --github-secret-file")
            })?;
            if secret.0.is_empty() {
                return Err("X-Hub-Signature-256 cannot match an empty secret".into());
            }
            let sent = header(headers, "x-hub-signature-256")
                .ok_or("missing X-Hub-Signature-256 (set a secret on the GitHub webhook)")?;
            let hex =
                sent.strip_prefix("sha256=").ok_or("X-Hub-Signature-256 must be sha256=<hex>")?;
            hex_digest(hex, "X-Hub-Signature-256")
        }
        Forge::Gitea => {
            let secret = secrets.gitea.as_ref().ok_or_else(|| {
                not_configured("gitea", "KILN_GITEA_SECRET or --gitea-secret-file")
            })?;
            if secret.0.is_empty() {
                return Err("X-Gitea-Signature cannot match an empty secret".into());
            }
            let sent = header(headers, "x-gitea-signature")
                .or_else(|| header(headers, "x-forgejo-signature"))
                .ok_or("missing X-Gitea-Signature (set a secret on the Gitea webhook)")?;
            hex_digest(sent, "X-Gitea-Signature")
        }
        Forge::Generic => {
            let secret = secrets.generic.as_ref().ok_or_else(|| {
                not_configured("generic", "KILN_GENERIC_SECRET or --generic-secret-file")
            })?;
            if secret.0.is_empty() {
                return Err("X-Kiln-Signature cannot match an empty secret".into());
            }
            let sent = header(headers, GENERIC_SIGNATURE_HEADER)
                .ok_or("missing X-Kiln-Signature: sha256=<hex HMAC-SHA256 of the body>")?;
            let hex =
                sent.strip_prefix("sha256=").ok_or("X-Kiln-Signature must be sha256=<hex>")?;
            hex_digest(hex, "X-Kiln-Signature")
        }
    }
}

fn not_configured(receiver: &str, how: &str) -> String {
    format!(
        "the {receiver} webhook receiver has no secret configured; set {how} when starting kiln"
    )
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail; an empty MAC would only reject.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

/// The hex HMAC-SHA256 of `body` under `secret`, as GitHub, Gitea and the generic receiver
/// send it (also used by tests and the benchmark to sign deliveries).
pub fn sign_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = mac(secret.as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn verify_hex(secret: &Secret, sent_hex: &str, body: &[u8], name: &str) -> Result<(), String> {
    if secret.0.is_empty() {
        return Err(format!("{name} cannot match an empty secret"));
    }
    let sent = hex::decode(sent_hex).map_err(|_| format!("{name} is not hex"))?;
    let mut mac = mac(secret.0.as_bytes());
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&sent).map_err(|_| format!("wrong {name}"))
}

/// The HMAC key of a Standard Webhooks secret: `whsec_<base64>` decodes to the key bytes;
/// anything else is used as is.
fn standard_webhook_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Signs a delivery the way GitLab's signing token does (Standard Webhooks): returns the
/// `webhook-signature` value `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign_standard_webhook(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac(&standard_webhook_key(secret));
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// GitLab's signed webhooks follow the Standard Webhooks scheme: `webhook-id`,
/// `webhook-timestamp` (Unix seconds) and `webhook-signature` (space-separated `v1,<base64>`
/// entries); the timestamp must be within five minutes of `now` so a captured delivery cannot
/// be replayed later.
fn verify_standard_webhook(
    secret: &Secret,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), String> {
    if secret.0.is_empty() {
        return Err("webhook-signature cannot match an empty signing secret".into());
    }
    let id = header(headers, "webhook-id").ok_or("missing webhook-id header")?;
    let ts_text = header(headers, "webhook-timestamp").ok_or("missing webhook-timestamp header")?;
    let signatures = header(headers, "webhook-signature").ok_or("missing webhook-signature")?;
    let ts: i64 = ts_text.parse().map_err(|_| "webhook-timestamp is not Unix seconds")?;
    if (now - ts).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err("webhook-timestamp is more than 5 minutes from kiln's clock".into());
    }
    let key = standard_webhook_key(&secret.0);
    for entry in signatures.split_whitespace() {
        let Some(b64) = entry.strip_prefix("v1,") else { continue };
        let Ok(sent) = base64::engine::general_purpose::STANDARD.decode(b64) else { continue };
        let mut mac = mac(&key);
        mac.update(format!("{id}.{ts_text}.").as_bytes());
        mac.update(body);
        if mac.verify_slice(&sent).is_ok() {
            return Ok(());
        }
    }
    Err("wrong webhook-signature".into())
}

/// What a push payload says about where the push happened, collected leniently across forges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PushHint {
    /// `ref` (`refs/heads/main`).
    pub git_ref: Option<String>,
    /// `after`: the new tip.
    pub after: Option<String>,
    /// Whether the push deleted the branch (`deleted: true` or `after` all zeros).
    pub deleted: bool,
    /// Every repository URL or path the payload names.
    pub urls: Vec<String>,
    /// Repository names and paths (`name`, `full_name`, `path_with_namespace`).
    pub names: Vec<String>,
}

/// Reads a delivery's body as `forge` sends it: a JSON object, or for GitHub a form
/// (`application/x-www-form-urlencoded`) whose `payload` field is that JSON; the generic
/// receiver also takes an empty body. The error says what is wrong with it.
pub fn parse_push(
    forge: Forge,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<PushHint, String> {
    let is_form = content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    let form_payload;
    let json: &[u8] = if is_form && forge == Forge::GitHub {
        form_payload = form_urlencoded::parse(body)
            .find(|(key, _)| key == "payload")
            .map(|(_, value)| value.into_owned())
            .ok_or("form delivery has no `payload` field")?;
        form_payload.as_bytes()
    } else if is_form {
        return Err(format!(
            "the {} receiver takes `application/json` deliveries; set the webhook's content type to JSON",
            forge.name()
        ));
    } else {
        body
    };
    if forge == Forge::Generic && json.iter().all(u8::is_ascii_whitespace) {
        // The generic receiver accepts an empty body as "something changed, go look".
        return Ok(PushHint::default());
    }
    match serde_json::from_slice(json) {
        Ok(value @ Value::Object(_)) => Ok(PushHint::from_payload(&value)),
        Ok(_) => Err("payload is not a JSON object".into()),
        Err(error) => Err(format!("payload is not valid JSON: {error}")),
    }
}

impl PushHint {
    fn from_payload(payload: &Value) -> PushHint {
        let text = |pointer: &str| payload.pointer(pointer).and_then(Value::as_str);
        let mut hint = PushHint {
            git_ref: text("/ref").map(str::to_owned),
            after: text("/after").map(str::to_owned),
            deleted: payload.get("deleted").and_then(Value::as_bool).unwrap_or(false),
            ..PushHint::default()
        };
        for pointer in [
            // GitLab
            "/project/git_http_url",
            "/project/git_ssh_url",
            "/project/web_url",
            "/project/http_url",
            "/project/ssh_url",
            "/repository/git_http_url",
            "/repository/git_ssh_url",
            "/repository/homepage",
            // GitHub, Gitea (and GitLab's `repository.url`)
            "/repository/url",
            "/repository/clone_url",
            "/repository/ssh_url",
            "/repository/html_url",
            "/repository/git_url",
            // Generic: `{"repository": "<url or path>"}`
            "/repository",
        ] {
            if let Some(url) = text(pointer) {
                hint.urls.push(url.to_owned());
            }
        }
        for pointer in ["/repository/name", "/project/path", "/repository/full_name"] {
            if let Some(name) = text(pointer) {
                hint.names.push(name.to_owned());
            }
        }
        if let Some(path) = text("/project/path_with_namespace") {
            hint.names.push(path.to_owned());
        }
        hint.deleted |= hint.after.as_deref() == Some(ZERO_SHA);
        hint
    }

    /// Whether the payload is about the watched repository (see [`repo_matches`]).
    pub fn matches_repo(&self, watched: &str) -> Result<(), String> {
        if self.urls.is_empty() && self.names.is_empty() {
            // Nothing to compare (a bare generic ping): the fetch decides.
            return Ok(());
        }
        if repo_matches(watched, &self.urls, &self.names) {
            Ok(())
        } else {
            let shown = self.urls.first().or(self.names.first()).map_or("", String::as_str);
            Err(format!(
                "repository `{}` is not the watched one `{}`",
                crate::error::redact(shown),
                crate::error::redact(watched)
            ))
        }
    }
}

/// A remote URL reduced to what identifies a repository: lowercase host (no user, no port)
/// and path without slashes at the ends or a trailing `.git`. `None` for a local path.
pub fn normalize_url(url: &str) -> Option<(String, String)> {
    let url = url.trim();
    let (authority, path) = if let Some((scheme, rest)) = url.split_once("://") {
        if scheme.eq_ignore_ascii_case("file") {
            return None;
        }
        rest.split_once('/').unwrap_or((rest, ""))
    } else {
        // scp-like `user@host:group/repo.git`: a colon before any slash.
        let colon = url.find(':')?;
        if url[..colon].contains('/') || url.starts_with('/') || url.starts_with('.') {
            return None;
        }
        (&url[..colon], &url[colon + 1..])
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.split(':').next().unwrap_or(host),
    };
    let path = path.split(['?', '#']).next().unwrap_or(path).trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path).trim_end_matches('/');
    if host.is_empty() {
        return None;
    }
    Some((host.to_ascii_lowercase(), path.to_ascii_lowercase()))
}

/// The last path component of a URL or path, without `.git`.
fn repo_name(location: &str) -> &str {
    let trimmed = location.trim().trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next().unwrap_or(trimmed);
    last.strip_suffix(".git").unwrap_or(last)
}

/// The repository matching rule (documented in docs/api.md):
///
/// * a remote watched URL matches when one of the payload's URLs normalises
///   ([`normalize_url`]) to the same host and path (the scheme does not matter: the https and
///   ssh URLs of one project are the same repository), or when the payload's
///   `full_name`/`path_with_namespace` equals the watched path, or when the payload names a
///   local path (the git server's own view, as `hooks/post-receive` sends it) whose last
///   component without `.git` equals the watched path's last component;
/// * a local path (or `file://`) source matches when its last component without `.git` equals
///   the repository name in the payload (`repository.name`, GitLab `project.path`) or the last
///   component of one of the payload's URLs.
pub fn repo_matches(watched: &str, urls: &[String], names: &[String]) -> bool {
    match normalize_url(watched) {
        Some((host, path)) => {
            let last = repo_name(&path);
            urls.iter().any(|url| match normalize_url(url) {
                Some((h, p)) => h == host && p == path,
                // A path on the git server itself (what `hooks/post-receive` sends).
                None => repo_name(url).eq_ignore_ascii_case(last),
            }) || names.iter().any(|name| name.trim_matches('/').eq_ignore_ascii_case(&path))
        }
        None => {
            let local = repo_name(watched.strip_prefix("file://").unwrap_or(watched));
            !local.is_empty()
                && (names.iter().any(|name| repo_name(name) == local)
                    || urls.iter().any(|url| repo_name(url) == local))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_normalise_across_schemes() {
        let https = normalize_url("https://gitlab.example.com/Group/Infra.git");
        assert_eq!(https, Some(("gitlab.example.com".into(), "group/infra".into())));
        assert_eq!(normalize_url("git@gitlab.example.com:group/infra.git"), https);
        assert_eq!(normalize_url("ssh://git@gitlab.example.com:2222/group/infra"), https);
        assert_eq!(normalize_url("http://oauth2:tok@gitlab.example.com/group/infra/"), https);
        assert_eq!(normalize_url("/srv/git/infra.git"), None);
        assert_eq!(normalize_url("file:///srv/git/infra.git"), None);
        assert_eq!(normalize_url("./infra"), None);
    }

    #[test]
    fn local_paths_match_by_name() {
        let urls = vec!["https://example.com/team/infra.git".to_owned()];
        assert!(repo_matches("/srv/git/infra.git", &urls, &[]));
        assert!(repo_matches("/srv/git/infra", &[], &["infra".into()]));
        assert!(!repo_matches("/srv/git/other.git", &urls, &["infra".into()]));
        assert!(repo_matches("https://example.com/team/infra", &urls, &[]));
        assert!(!repo_matches("https://example.com/team/infra2", &urls, &[]));
        assert!(repo_matches("git://host/team/infra.git", &["/srv/git/infra.git".into()], &[]));
        assert!(!repo_matches("git://host/team/infra.git", &["/srv/git/other.git".into()], &[]));
    }

    #[test]
    fn delivery_log_forgets_the_oldest() {
        let log = DeliveryLog::new(2);
        assert!(log.first_time("a"));
        assert!(!log.first_time("a"));
        assert!(log.first_time("b"));
        assert!(log.first_time("c"));
        assert!(log.first_time("a"), "a was evicted by c");
    }

    #[test]
    fn standard_webhook_signatures_verify() {
        let secret = Secret("whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=".into());
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign_standard_webhook(&secret.0, "msg_1", 1_700_000_000, body);
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", "1700000000".parse().unwrap());
        headers.insert("webhook-signature", format!("v1,bm9wZQ== {sig}").parse().unwrap());
        assert_eq!(verify_standard_webhook(&secret, &headers, body, 1_700_000_100), Ok(()));
        assert!(verify_standard_webhook(&secret, &headers, body, 1_700_001_000).is_err());
        assert!(verify_standard_webhook(&secret, &headers, b"{}", 1_700_000_100).is_err());
    }
}
