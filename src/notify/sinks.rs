//! Sending one outbox entry: the body each service documents, its signature, and what its
//! answer means (delivered, worth retrying, or never going to work).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::message::{Notice, StatusState, StatusUpdate};
use crate::manifest::{Forge, ForgeKind, SecretRef, Sink, SinkKind};
use crate::store::OutboxEntry;

/// What an outbox entry carries: a notice for a sink, or a commit status for the forge. The
/// sink's settings travel with it (references to secrets only), so a delivery never needs the
/// manifest again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "snake_case")]
// Built once per entry and serialized at once: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Payload {
    /// A notification.
    Sink {
        /// The sink as configured.
        sink: Sink,
        /// The message.
        notice: Notice,
    },
    /// A commit status.
    Forge {
        /// The forge as configured.
        forge: Forge,
        /// The status.
        status: StatusUpdate,
    },
}

/// Why a delivery did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another attempt later (timeout, 5xx, 429, a robot's rate limit).
    Transient(String),
    /// Will not work however often it is tried (401, 404, a malformed secret): dead-lettered
    /// at once.
    Permanent(String),
}

impl Failure {
    /// The reason, in words.
    pub fn message(&self) -> &str {
        match self {
            Failure::Transient(m) | Failure::Permanent(m) => m,
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> HmacSha256 {
    panic!("HMAC-SHA256 accepts keys of every length")
}

/// `webhook-signature` per the Standard Webhooks spec: `v1,` + base64 HMAC-SHA256 over
/// `id.timestamp.body`, keyed with the base64 part of a `whsec_` secret.
pub fn standard_webhook_signature(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, Failure> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = B64.decode(encoded.trim()).map_err(|_| {
        Failure::Permanent("the webhook secret is not `whsec_` followed by base64".into())
    })?;
    let prefix = format!("{id}.{timestamp}.");
    Ok(format!("v1,{}", B64.encode(hmac(&key, &[prefix.as_bytes(), body]))))
}

/// DingTalk's `sign`: base64 HMAC-SHA256 keyed with the secret over `timestamp\nsecret`
/// (timestamp in milliseconds), URL-encoded as a query parameter by the caller.
pub fn dingtalk_sign(secret: &str, timestamp_ms: i64) -> String {
    let text = format!("{timestamp_ms}\n{secret}");
    B64.encode(hmac(secret.as_bytes(), &[text.as_bytes()]))
}

/// Feishu/Lark's `sign`: base64 HMAC-SHA256 keyed with `timestamp\nsecret` (seconds) over an
/// empty message.
pub fn feishu_sign(secret: &str, timestamp: i64) -> String {
    let key = format!("{timestamp}\n{secret}");
    B64.encode(hmac(key.as_bytes(), &[]))
}

/// Reads a secret from the daemon's environment or a file on its host.
pub async fn resolve(secret: &SecretRef) -> Result<String, Failure> {
    match secret {
        SecretRef::Env(name) => std::env::var(name).map_err(|_| {
            Failure::Transient(format!("environment variable {name} is not set in kiln run"))
        }),
        SecretRef::File(path) => match tokio::fs::read_to_string(path).await {
            Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_owned()),
            Err(e) => Err(Failure::Transient(format!("cannot read {path}: {e}"))),
        },
    }
}

/// A reqwest error without the URL (chat robots carry their token in it).
fn http_error(error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        let cause = std::error::Error::source(&error).map(|s| format!(": {s}")).unwrap_or_default();
        format!("could not connect{cause}")
    } else {
        crate::error::chain(&error)
    };
    Failure::Transient(crate::error::redact(&what))
}

/// What an HTTP answer means: 2xx delivered (the body is returned), 408/425/429/5xx retried,
/// other codes permanent.
async fn answer(response: reqwest::Response) -> Result<String, Failure> {
    let status = response.status();
    let mut body = response.text().await.unwrap_or_default();
    if body.len() > 300 {
        let mut cut = 300;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    if status.is_success() {
        return Ok(body);
    }
    let message = format!("HTTP {status}: {}", body.trim());
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Err(Failure::Transient(message)),
        _ => Err(Failure::Permanent(message)),
    }
}

/// A chat robot's JSON answer: `errcode` (WeCom, DingTalk) or `code`/`StatusCode` (Feishu)
/// must be 0.
fn robot_ok(kind: SinkKind, body: &str) -> Result<(), Failure> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return Err(Failure::Transient(format!(
            "{} answered something else than JSON",
            kind.as_str()
        )));
    };
    let code = ["errcode", "code", "StatusCode"].iter().find_map(|k| value.get(*k)?.as_i64());
    match code {
        Some(0) => Ok(()),
        Some(code) => {
            let msg = ["errmsg", "msg", "StatusMessage"]
                .iter()
                .find_map(|k| value.get(*k)?.as_str())
                .unwrap_or("");
            Err(Failure::Transient(format!("{} error {code}: {msg}", kind.as_str())))
        }
        None => {
            Err(Failure::Transient(format!("{} answered without a result code", kind.as_str())))
        }
    }
}

/// Slack mrkdwn escaping (`&`, `<`, `>`).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The Slack incoming-webhook body: `text` (the notification's fallback) and `blocks`.
pub fn slack_body(notice: &Notice) -> serde_json::Value {
    let mut lines = vec![format!(
        "*commit* `{}` {}{}",
        notice.short,
        slack_escape(&notice.subject),
        notice.author.as_deref().map(|a| format!(" by {}", slack_escape(a))).unwrap_or_default()
    )];
    if let Some(step) = &notice.failed_step {
        lines.push(format!("*failed step:* {}", slack_escape(step)));
    }
    if let Some(reason) = &notice.reason {
        lines.push(format!("*reason:* {}", slack_escape(reason)));
    }
    if let Some(image) = &notice.image {
        lines.push(format!("*image:* `{}`", slack_escape(image)));
    }
    if let Some(duration) = &notice.duration {
        lines.push(format!("*duration:* {duration}"));
    }
    serde_json::json!({
        "text": notice.title,
        "blocks": [
            { "type": "header", "text": { "type": "plain_text", "text": notice.title } },
            { "type": "section", "text": { "type": "mrkdwn", "text": lines.join("\n") } },
            { "type": "context", "elements": [ { "type": "mrkdwn",
                "text": format!("<{}|rollout #{}> · {}", notice.link, notice.rollout, notice.event.as_str()) } ] }
        ]
    })
}

/// WeCom's markdown content is limited to 4096 bytes.
fn cap_bytes(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Sends entries. One per daemon; cheap to clone.
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
}

/// Per-request deadline of HTTP sinks and forges.
pub const HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Sender {
    /// A sender with its HTTP client (TLS: rustls with the Mozilla roots; no redirects are
    /// followed, so a token never travels to another host).
    pub fn new() -> Result<Sender, Failure> {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Permanent(crate::error::chain(&e)))?;
        Ok(Sender { http })
    }

    /// A POST carrying the entry's idempotency id (`idempotency-key`), so a receiver can drop
    /// a delivery it has seen (one sent again after a crash between its success and its record).
    fn post(&self, url: &str, id: &str) -> reqwest::RequestBuilder {
        self.http.post(url).header("idempotency-key", id)
    }

    /// Delivers one entry.
    pub async fn send(&self, entry: &OutboxEntry) -> Result<(), Failure> {
        let payload: Payload = serde_json::from_value(entry.payload.clone()).map_err(|e| {
            Failure::Permanent(format!("the entry cannot be read by this kiln: {e}"))
        })?;
        match payload {
            Payload::Sink { sink, notice } => self.notify(entry, &sink, &notice).await,
            Payload::Forge { forge, status } => self.status(entry, &forge, &status).await,
        }
    }

    async fn url(sink: &Sink) -> Result<String, Failure> {
        match sink.url_source() {
            Some(Ok(url)) => Ok(url),
            Some(Err(secret)) => resolve(&secret).await.map(|u| u.trim().to_owned()),
            None => Err(Failure::Permanent("the sink has no URL".into())),
        }
    }

    async fn notify(
        &self,
        entry: &OutboxEntry,
        sink: &Sink,
        notice: &Notice,
    ) -> Result<(), Failure> {
        if sink.kind == SinkKind::Email {
            return super::email::send(entry, sink, notice).await;
        }
        let url = Self::url(sink).await?;
        let secret = match sink.secret() {
            Some(secret) => Some(resolve(&secret).await?),
            None => None,
        };
        let now = crate::model::now();
        match sink.kind {
            SinkKind::Webhook => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "type": notice.event.as_str(),
                    "timestamp": notice.at,
                    "data": notice,
                }))
                .map_err(|e| Failure::Permanent(e.to_string()))?;
                let ts = now.timestamp();
                let secret = secret
                    .ok_or_else(|| Failure::Permanent("the webhook sink has no secret".into()))?;
                let signature = standard_webhook_signature(&secret, &entry.id, ts, &body)?;
                let response = self
                    .post(&url, &entry.id)
                    .header("content-type", "application/json")
                    .header("webhook-id", &entry.id)
                    .header("webhook-timestamp", ts.to_string())
                    .header("webhook-signature", signature)
                    .body(body)
                    .send()
                    .await
                    .map_err(http_error)?;
                answer(response).await.map(drop)
            }
            SinkKind::Slack => {
                let response = self
                    .post(&url, &entry.id)
                    .json(&slack_body(notice))
                    .send()
                    .await
                    .map_err(http_error)?;
                answer(response).await.map(drop)
            }
            SinkKind::Wecom => {
                let body = serde_json::json!({
                    "msgtype": "markdown",
                    "markdown": { "content": cap_bytes(notice.markdown(""), 4096) },
                });
                let response =
                    self.post(&url, &entry.id).json(&body).send().await.map_err(http_error)?;
                robot_ok(sink.kind, &answer(response).await?)
            }
            SinkKind::Dingtalk => {
                let url = match &secret {
                    Some(secret) => {
                        let ts = now.timestamp_millis();
                        let sign: String =
                            form_urlencoded::byte_serialize(dingtalk_sign(secret, ts).as_bytes())
                                .collect();
                        let sep = if url.contains('?') { '&' } else { '?' };
                        format!("{url}{sep}timestamp={ts}&sign={sign}")
                    }
                    None => url,
                };
                let body = serde_json::json!({
                    "msgtype": "markdown",
                    "markdown": { "title": notice.title, "text": notice.markdown("#### ") },
                });
                let response =
                    self.post(&url, &entry.id).json(&body).send().await.map_err(http_error)?;
                robot_ok(sink.kind, &answer(response).await?)
            }
            SinkKind::Feishu => {
                let mut body = serde_json::json!({
                    "msg_type": "text",
                    "content": { "text": notice.text() },
                });
                if let Some(secret) = &secret {
                    let ts = now.timestamp();
                    body["timestamp"] = ts.to_string().into();
                    body["sign"] = feishu_sign(secret, ts).into();
                }
                let response =
                    self.post(&url, &entry.id).json(&body).send().await.map_err(http_error)?;
                robot_ok(sink.kind, &answer(response).await?)
            }
            SinkKind::Email => Ok(()),
        }
    }

    async fn status(
        &self,
        entry: &OutboxEntry,
        forge: &Forge,
        status: &StatusUpdate,
    ) -> Result<(), Failure> {
        let token = match forge.token() {
            Some(secret) => resolve(&secret).await?,
            None => return Err(Failure::Permanent("the forge has no token".into())),
        };
        let base = forge.url.trim_end_matches('/');
        let request = match forge.kind {
            ForgeKind::Gitlab => {
                let project: String =
                    form_urlencoded::byte_serialize(forge.project.as_bytes()).collect();
                let state = match status.state {
                    StatusState::Pending => "pending",
                    StatusState::Running => "running",
                    StatusState::Success => "success",
                    StatusState::Failed => "failed",
                    StatusState::Canceled => "canceled",
                };
                self.post(
                    &format!("{base}/api/v4/projects/{project}/statuses/{}", status.sha),
                    &entry.id,
                )
                .header("PRIVATE-TOKEN", token)
                .json(&serde_json::json!({
                    "state": state,
                    "name": status.context,
                    "target_url": status.target_url,
                    "description": status.description,
                }))
            }
            ForgeKind::Github | ForgeKind::Gitea => {
                let state = match status.state {
                    StatusState::Pending | StatusState::Running => "pending",
                    StatusState::Success => "success",
                    StatusState::Failed => "failure",
                    StatusState::Canceled => "error",
                };
                let body = serde_json::json!({
                    "state": state,
                    "context": status.context,
                    "target_url": status.target_url,
                    "description": status.description,
                });
                if forge.kind == ForgeKind::Github {
                    self.post(
                        &format!("{base}/repos/{}/statuses/{}", forge.project, status.sha),
                        &entry.id,
                    )
                    .bearer_auth(token)
                    .header("accept", "application/vnd.github+json")
                    .header("x-github-api-version", "2022-11-28")
                    .json(&body)
                } else {
                    self.post(
                        &format!("{base}/api/v1/repos/{}/statuses/{}", forge.project, status.sha),
                        &entry.id,
                    )
                    .header("authorization", format!("token {token}"))
                    .json(&body)
                }
            }
        };
        match answer(request.send().await.map_err(http_error)?).await {
            Ok(_) => Ok(()),
            // GitLab refuses to "move" a status to the state it has (a retried delivery whose
            // first attempt got through): it is there, which is what was wanted.
            Err(Failure::Permanent(m))
                if forge.kind == ForgeKind::Gitlab && m.contains("Cannot transition status") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_documented_schemes() {
        // Standard Webhooks: the spec's example secret, id and timestamp; the expected value is
        // computed independently here (key = base64-decoded secret, content id.ts.body).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig =
            standard_webhook_signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
                .expect("sign");
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(matches!(
            standard_webhook_signature("whsec_***", "id", 1, b""),
            Err(Failure::Permanent(_))
        ));
        // DingTalk and Feishu: recomputed with the documented key/message roles swapped would
        // differ; check the roles.
        let ding = dingtalk_sign("SECabc", 1_700_000_000_000);
        let expect = B64.encode(hmac(b"SECabc", &[b"1700000000000\nSECabc"]));
        assert_eq!(ding, expect);
        let feishu = feishu_sign("s3cret", 1_700_000_000);
        assert_eq!(feishu, B64.encode(hmac(b"1700000000\ns3cret", &[])));
        assert_ne!(feishu, B64.encode(hmac(b"s3cret", &[b"1700000000\ns3cret"])));
    }

    #[test]
    fn robot_answers_are_read() {
        assert_eq!(robot_ok(SinkKind::Wecom, r#"{"errcode":0,"errmsg":"ok"}"#), Ok(()));
        assert!(
            robot_ok(SinkKind::Dingtalk, r#"{"errcode":310000,"errmsg":"sign not match"}"#)
                .is_err_and(|e| e.message().contains("310000"))
        );
        assert_eq!(robot_ok(SinkKind::Feishu, r#"{"code":0,"msg":"success"}"#), Ok(()));
        assert!(robot_ok(SinkKind::Feishu, "<html>").is_err());
    }
}
