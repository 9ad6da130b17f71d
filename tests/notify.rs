//! Issue 13 items 1-2: notification sinks and forge commit statuses, through the durable outbox,
//! against real receivers on 127.0.0.1 that check what each service documents:
//!
//! - Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//!   HMAC-SHA256(base64-decoded whsec_ secret, "id.timestamp.body")>`;
//! - Slack incoming webhook: JSON `text` + `blocks` (header, section with mrkdwn, context);
//! - WeCom group robot: `{"msgtype":"markdown","markdown":{"content"}}`, content ≤ 4096 bytes;
//! - DingTalk robot: `timestamp` (ms) and `sign` = urlencode(base64(HMAC-SHA256(secret,
//!   "timestamp\nsecret"))) query parameters, `msgtype: markdown` with `title` and `text`;
//! - Feishu/Lark bot: `timestamp` (s) and `sign` = base64(HMAC-SHA256 keyed "timestamp\nsecret"
//!   over nothing) in the body, `msg_type: text`;
//! - SMTP: an in-test server that requires STARTTLS (a self-signed certificate the sink trusts
//!   through `caFile`) and AUTH before MAIL;
//! - GitLab / GitHub / Gitea commit statuses: path, auth header and state vocabulary per API.
//!
//! Every receiver counts idempotency keys (`idempotency-key` header, the email's Message-ID):
//! the tests assert each message arrived exactly once.

// The tests block between polls of real processes; receivers run on their own runtime.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac as _};
use serde_json::Value;
use sha2::Sha256;
use support::daemon::{Daemon, for_commit, kiln};
use support::fleet::have_python3;
use support::git::{Entry, TestRepo, require_git};

const WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------------

/// How a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Checks the request and answers as the service does.
    Up,
    /// 503 (or SMTP 421): an outage, retried.
    Down,
    /// 404: the robot was deleted; never going to work.
    Gone,
    /// Accepts the connection and never answers.
    Hang,
}

/// One request a receiver accepted.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    query: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Checks a request per the service's documentation and returns its answer (status, body).
type Check = Arc<dyn Fn(&Received) -> Result<(u16, String), String> + Send + Sync>;

struct Inner {
    mode: Mutex<Mode>,
    accepted: Mutex<Vec<Received>>,
    rejected: Mutex<Vec<String>>,
    hung: AtomicUsize,
    check: Check,
}

/// An HTTP receiver on 127.0.0.1.
struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    fn start(rt: &tokio::runtime::Runtime, check: Check) -> Receiver {
        let inner = Arc::new(Inner {
            mode: Mutex::new(Mode::Up),
            accepted: Mutex::default(),
            rejected: Mutex::default(),
            hung: AtomicUsize::new(0),
            check,
        });
        let listener =
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(receive).with_state(inner.clone());
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, inner }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.inner.mode.lock().unwrap() = mode;
    }

    fn accepted(&self) -> Vec<Received> {
        self.inner.accepted.lock().unwrap().clone()
    }

    fn rejected(&self) -> Vec<String> {
        self.inner.rejected.lock().unwrap().clone()
    }

    fn hung(&self) -> usize {
        self.inner.hung.load(Ordering::SeqCst)
    }

    /// Every accepted request carried a distinct idempotency key: nothing arrived twice.
    fn assert_no_duplicates(&self, name: &str) {
        let keys: Vec<String> = self
            .accepted()
            .iter()
            .map(|r| r.headers.get("idempotency-key").cloned().unwrap_or_default())
            .collect();
        let distinct: BTreeSet<&String> = keys.iter().collect();
        assert!(keys.iter().all(|k| !k.is_empty()), "{name}: a request without idempotency-key");
        assert_eq!(distinct.len(), keys.len(), "{name} received a message twice: {keys:?}");
    }
}

async fn receive(
    axum::extract::State(inner): axum::extract::State<Arc<Inner>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    let mode = *inner.mode.lock().unwrap();
    match mode {
        Mode::Down => return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance".into()),
        Mode::Gone => return (StatusCode::NOT_FOUND, "no_service".into()),
        Mode::Hang => {
            inner.hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        Mode::Up => {}
    }
    let received = Received {
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: body.to_vec(),
    };
    match (inner.check)(&received) {
        Ok((status, answer)) => {
            inner.accepted.lock().unwrap().push(received);
            (StatusCode::from_u16(status).unwrap(), answer)
        }
        Err(why) => {
            inner.rejected.lock().unwrap().push(why.clone());
            (StatusCode::BAD_REQUEST, why)
        }
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Standard Webhooks: verify the signature over the raw body; the body is
/// `{type, timestamp, data}`.
fn check_webhook(secret: &str) -> Check {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    Arc::new(move |r| {
        let id = r.headers.get("webhook-id").ok_or("no webhook-id")?;
        let ts = r.headers.get("webhook-timestamp").ok_or("no webhook-timestamp")?;
        let sig = r.headers.get("webhook-signature").ok_or("no webhook-signature")?;
        let ts_n: i64 = ts.parse().map_err(|_| "webhook-timestamp is not integer seconds")?;
        if (now_secs() - ts_n).abs() > 300 {
            return Err("webhook-timestamp outside the 5 minute tolerance".into());
        }
        let mut signed = format!("{id}.{ts}.").into_bytes();
        signed.extend_from_slice(&r.body);
        let want = format!("v1,{}", B64.encode(hmac_sha256(&key, &signed)));
        if !sig.split(' ').any(|s| s == want) {
            return Err(format!("bad webhook-signature {sig}"));
        }
        if r.headers.get("idempotency-key") != Some(id) {
            return Err("webhook-id is not the idempotency key".into());
        }
        let body = r.json();
        if !body["type"].is_string() || !body["timestamp"].is_string() || !body["data"].is_object()
        {
            return Err(format!("body is not {{type, timestamp, data}}: {body}"));
        }
        Ok((204, String::new()))
    })
}

/// Slack incoming webhook: `text` plus Block Kit `blocks`; answers `ok`.
fn check_slack() -> Check {
    Arc::new(|r| {
        let body = r.json();
        let text = body["text"].as_str().ok_or("no text")?;
        let blocks = body["blocks"].as_array().ok_or("no blocks")?;
        if text.is_empty() || blocks.is_empty() {
            return Err("empty text or blocks".into());
        }
        for block in blocks {
            match block["type"].as_str() {
                Some("header") if block["text"]["type"] == "plain_text" => {}
                Some("section") if block["text"]["type"] == "mrkdwn" => {}
                Some("context") if block["elements"].is_array() => {}
                _ => return Err(format!("not a valid block: {block}")),
            }
        }
        Ok((200, "ok".into()))
    })
}

/// WeCom group robot: markdown message, content at most 4096 bytes, `key` in the URL.
fn check_wecom() -> Check {
    Arc::new(|r| {
        if query_param(&r.query, "key").as_deref() != Some("wecom-key") {
            return Err("no robot key".into());
        }
        let body = r.json();
        let content = body["markdown"]["content"].as_str().ok_or("no markdown.content")?;
        if body["msgtype"] != "markdown" || content.len() > 4096 {
            return Err(format!("not a WeCom markdown message: {body}"));
        }
        Ok((200, r#"{"errcode":0,"errmsg":"ok"}"#.into()))
    })
}

/// DingTalk robot with signing: `timestamp` (ms, within an hour) and `sign` query parameters.
fn check_dingtalk(secret: &'static str) -> Check {
    Arc::new(move |r| {
        let ts = query_param(&r.query, "timestamp").ok_or("no timestamp")?;
        let sign = query_param(&r.query, "sign").ok_or("no sign")?;
        let ms: i64 = ts.parse().map_err(|_| "timestamp is not milliseconds")?;
        if (now_secs() * 1000 - ms).abs() > 3_600_000 {
            return Err("timestamp more than an hour off".into());
        }
        let want = B64.encode(hmac_sha256(secret.as_bytes(), format!("{ts}\n{secret}").as_bytes()));
        if sign != want {
            return Err(format!("sign mismatch: {sign} != {want}"));
        }
        let body = r.json();
        if body["msgtype"] != "markdown"
            || !body["markdown"]["title"].is_string()
            || !body["markdown"]["text"].is_string()
        {
            return Err(format!("not a DingTalk markdown message: {body}"));
        }
        Ok((200, r#"{"errcode":0,"errmsg":"ok"}"#.into()))
    })
}

/// Feishu/Lark bot with signature verification: `timestamp` and `sign` in the body.
fn check_feishu(secret: &'static str) -> Check {
    Arc::new(move |r| {
        let body = r.json();
        let ts = body["timestamp"].as_str().ok_or("no timestamp string")?;
        let sign = body["sign"].as_str().ok_or("no sign")?;
        let secs: i64 = ts.parse().map_err(|_| "timestamp is not seconds")?;
        if (now_secs() - secs).abs() > 3600 {
            return Err("timestamp more than an hour off".into());
        }
        let want = B64.encode(hmac_sha256(format!("{ts}\n{secret}").as_bytes(), b""));
        if sign != want {
            return Err(format!("sign mismatch: {sign} != {want}"));
        }
        if body["msg_type"] != "text" || !body["content"]["text"].is_string() {
            return Err(format!("not a Feishu text message: {body}"));
        }
        Ok((200, r#"{"code":0,"data":{},"msg":"success"}"#.into()))
    })
}

/// A forge's commit status API.
fn check_forge(kind: &'static str, token: &'static str, project: &'static str) -> Check {
    Arc::new(move |r| {
        let (prefix, auth, states, name_field): (String, Option<&String>, &[&str], &str) =
            match kind {
                "gitlab" => (
                    format!("/api/v4/projects/{}/statuses/", project.replace('/', "%2F")),
                    r.headers.get("private-token"),
                    &["pending", "running", "success", "failed", "canceled"],
                    "name",
                ),
                "github" => (
                    format!("/repos/{project}/statuses/"),
                    r.headers.get("authorization"),
                    &["error", "failure", "pending", "success"],
                    "context",
                ),
                _ => (
                    format!("/api/v1/repos/{project}/statuses/"),
                    r.headers.get("authorization"),
                    &["pending", "success", "error", "failure", "warning"],
                    "context",
                ),
            };
        let want_auth = match kind {
            "gitlab" => token.to_owned(),
            "github" => format!("Bearer {token}"),
            _ => format!("token {token}"),
        };
        if auth != Some(&want_auth) {
            return Err(format!("{kind}: bad credentials {auth:?}"));
        }
        let sha = r.path.strip_prefix(&prefix).ok_or(format!("{kind}: bad path {}", r.path))?;
        if sha.len() != 40 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{kind}: `{sha}` is not a commit id"));
        }
        let body = r.json();
        let state = body["state"].as_str().unwrap_or_default();
        if !states.contains(&state) {
            return Err(format!("{kind}: state `{state}` is not in the API's vocabulary"));
        }
        let name = body[name_field].as_str().unwrap_or_default();
        if !name.starts_with("kiln/") {
            return Err(format!("{kind}: {name_field} `{name}`"));
        }
        let url = body["target_url"].as_str().unwrap_or_default();
        let description = body["description"].as_str().unwrap_or_default();
        if !url.starts_with("http") || description.chars().count() > 140 {
            return Err(format!("{kind}: target_url or description: {body}"));
        }
        Ok((201, serde_json::json!({"id": 1, "status": state}).to_string()))
    })
}

// ---------------------------------------------------------------------------------------------
// SMTP receiver: STARTTLS required, AUTH PLAIN/LOGIN, one message per connection.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Mail {
    tls: bool,
    user: String,
    from: String,
    to: Vec<String>,
    data: String,
}

impl Mail {
    fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.data
            .lines()
            .take_while(|l| !l.is_empty())
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    }

    fn body(&self) -> String {
        self.data.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }
}

struct SmtpServer {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    mails: Arc<Mutex<Vec<Mail>>>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp").join(name)
}

impl SmtpServer {
    fn start(rt: &tokio::runtime::Runtime, user: &'static str, password: &'static str) -> Self {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = vec![CertificateDer::from_pem_file(fixture("cert.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(fixture("key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Up));
        let mails = Arc::new(Mutex::new(Vec::new()));
        let (m, ms) = (mode.clone(), mails.clone());
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, mode, mails) = (acceptor.clone(), *m.lock().unwrap(), ms.clone());
                tokio::spawn(async move {
                    if let Some(mail) = smtp_session(stream, acceptor, mode, user, password).await {
                        mails.lock().unwrap().push(mail);
                    }
                });
            }
        });
        SmtpServer { port, mode, mails }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

enum Step {
    Continue,
    StartTls,
    Done,
}

struct Session {
    mail: Mail,
    authed: bool,
    in_data: bool,
    auth_login: Option<u8>,
    user: &'static str,
    password: &'static str,
    complete: bool,
}

impl Session {
    /// One line from the client → the reply (may be empty) and what to do next.
    fn line(&mut self, line: &str) -> (String, Step) {
        if self.in_data {
            if line == "." {
                self.in_data = false;
                self.complete = true;
                return ("250 2.0.0 queued\r\n".into(), Step::Continue);
            }
            let line = line.strip_prefix('.').unwrap_or(line);
            self.mail.data.push_str(line);
            self.mail.data.push_str("\r\n");
            return (String::new(), Step::Continue);
        }
        if let Some(stage) = self.auth_login {
            let decoded =
                String::from_utf8(B64.decode(line.trim()).unwrap_or_default()).unwrap_or_default();
            if stage == 0 {
                self.mail.user = decoded;
                self.auth_login = Some(1);
                return ("334 UGFzc3dvcmQ6\r\n".into(), Step::Continue);
            }
            self.auth_login = None;
            return self.login(decoded.as_str());
        }
        let upper = line.to_ascii_uppercase();
        let tls = self.mail.tls;
        if upper.starts_with("EHLO") {
            let extra = if tls { "250-AUTH PLAIN LOGIN\r\n" } else { "250-STARTTLS\r\n" };
            (format!("250-localhost\r\n{extra}250 8BITMIME\r\n"), Step::Continue)
        } else if upper.starts_with("STARTTLS") {
            ("220 2.0.0 ready to start TLS\r\n".into(), Step::StartTls)
        } else if upper.starts_with("AUTH PLAIN") {
            let arg = line[10..].trim();
            let decoded = B64.decode(arg).unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            self.mail.user = parts.get(1).cloned().unwrap_or_default();
            let password = parts.get(2).cloned().unwrap_or_default();
            self.login(&password)
        } else if upper.starts_with("AUTH LOGIN") {
            self.auth_login = Some(0);
            ("334 VXNlcm5hbWU6\r\n".into(), Step::Continue)
        } else if upper.starts_with("MAIL FROM:") {
            if !tls {
                return (
                    "530 5.7.0 Must issue a STARTTLS command first\r\n".into(),
                    Step::Continue,
                );
            }
            if !self.authed {
                return ("530 5.7.0 Authentication required\r\n".into(), Step::Continue);
            }
            self.mail.from = line[10..].split_whitespace().next().unwrap_or("").to_owned();
            ("250 2.1.0 ok\r\n".into(), Step::Continue)
        } else if upper.starts_with("RCPT TO:") {
            self.mail.to.push(line[8..].trim().to_owned());
            ("250 2.1.5 ok\r\n".into(), Step::Continue)
        } else if upper == "DATA" {
            self.in_data = true;
            ("354 end data with <CR><LF>.<CR><LF>\r\n".into(), Step::Continue)
        } else if upper == "QUIT" {
            ("221 2.0.0 bye\r\n".into(), Step::Done)
        } else if upper == "RSET" || upper == "NOOP" {
            ("250 2.0.0 ok\r\n".into(), Step::Continue)
        } else {
            ("502 5.5.2 command not recognized\r\n".into(), Step::Continue)
        }
    }

    fn login(&mut self, password: &str) -> (String, Step) {
        if self.mail.user == self.user && password == self.password {
            self.authed = true;
            ("235 2.7.0 authenticated\r\n".into(), Step::Continue)
        } else {
            ("535 5.7.8 bad credentials\r\n".into(), Step::Continue)
        }
    }
}

/// Serves one SMTP connection: plain until STARTTLS, then TLS. Returns the message, if one
/// was accepted.
async fn smtp_session(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    mode: Mode,
    user: &'static str,
    password: &'static str,
) -> Option<Mail> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let mut reader = BufReader::new(stream);
    if mode != Mode::Up {
        let _ = reader.get_mut().write_all(b"421 4.3.2 service not available, try later\r\n").await;
        return None;
    }
    reader.get_mut().write_all(b"220 localhost ESMTP kiln-test\r\n").await.ok()?;
    let mut session = Session {
        mail: Mail::default(),
        authed: false,
        in_data: false,
        auth_login: None,
        user,
        password,
        complete: false,
    };
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let (reply, step) = session.line(line.trim_end_matches(['\r', '\n']));
        reader.get_mut().write_all(reply.as_bytes()).await.ok()?;
        match step {
            Step::Continue => {}
            Step::Done => return None,
            Step::StartTls => break,
        }
    }
    let tls = acceptor.accept(reader.into_inner()).await.ok()?;
    session.mail.tls = true;
    let mut reader = BufReader::new(tls);
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            break;
        }
        let (reply, step) = session.line(line.trim_end_matches(['\r', '\n']));
        if !reply.is_empty() {
            reader.get_mut().write_all(reply.as_bytes()).await.ok()?;
            reader.get_mut().flush().await.ok()?;
        }
        if matches!(step, Step::Done) {
            break;
        }
    }
    session.complete.then_some(session.mail)
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

/// The app: `/healthz` answers 200, or 500 when the image holds a file named `unhealthy`. It
/// exits when its working directory disappears.
const APP: &str = r#"
import os, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
HERE = os.path.dirname(os.path.abspath(__file__))
UNHEALTHY = os.path.exists(os.path.join(HERE, "unhealthy"))
WORK = os.getcwd()
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        code = 500 if (self.path == "/healthz" and UNHEALTHY) else 200
        body = b"ok\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
def watchdog():
    while os.path.isdir(WORK):
        time.sleep(1)
    os._exit(0)
threading.Thread(target=watchdog, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

const RUN: &str = "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/app.py\"\n";

fn bake_dir_hook() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/bake-dir")).unwrap()
}

fn manifest(notify: &str, fleet_notify: &str, forge: &str) -> String {
    format!(
        "{notify}{forge}fleets:
  - name: web
    paths: [image/, hooks/]
    image:
      stages:
        - {{ name: base, path: image/base, bake: hooks/bake-dir }}
        - {{ name: app, path: image/app, from: base, bake: hooks/bake-dir }}
      timeout: 1m
    rollout:
      provider: local
      capacity: 1
      maxSurge: 1
      maxUnavailable: 0
      healthCheck: {{ http: /healthz, interval: 200ms, healthyThreshold: 2, timeout: 6s }}
      drain: 200ms
      onFailure: rollback
      loadBalancer: {{ port: 0 }}
{fleet_notify}"
    )
}

fn first_commit(repo: &TestRepo, kiln_yaml: &str) -> String {
    let hook = bake_dir_hook();
    repo.commit_entries(
        "first image",
        &[
            Entry::File("kiln.yaml", kiln_yaml),
            Entry::Exec("hooks/bake-dir", &hook),
            Entry::Exec("image/base/run", RUN),
            Entry::File("image/base/app.py", APP),
            Entry::File("image/app/message.txt", "one"),
        ],
    )
}

const TERMINAL: [&str; 6] =
    ["succeeded", "failed", "rolled_back", "superseded", "aborted", "skipped"];

fn fleet_entry(log: &[Value], sha: &str) -> Option<Value> {
    for_commit(log, sha).into_iter().find(|e| e["fleet"] == "web").cloned()
}

fn wait_state(daemon: &Daemon, sha: &str, states: &[&str]) -> Value {
    let log = daemon.wait_log(&format!("{sha} in {states:?}"), WAIT, |log| {
        fleet_entry(log, sha).is_some_and(|e| states.contains(&e["state"].as_str().unwrap_or("")))
    });
    fleet_entry(&log, sha).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// `GET /api/v1/notify` of the running daemon.
fn outbox(rt: &tokio::runtime::Runtime, daemon: &Daemon) -> Value {
    let url = format!("{}/api/v1/notify", daemon.api_url().expect("daemon.json"));
    rt.block_on(async {
        let response = reqwest::get(&url).await.expect("GET /notify");
        response.json::<Value>().await.expect("JSON")
    })
}

fn wait_until(what: &str, daemon: &Daemon, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const DING_SECRET: &str = "SECdingtalk-test-secret";
const FEISHU_SECRET: &str = "feishu-test-secret";
const GITLAB_TOKEN: &str = "glpat-test-token";

#[test]
fn a_broken_image_fails_the_commit_status_and_tells_every_sink_once_across_a_kill_9() {
    let test = "a_broken_image_fails_the_commit_status_and_tells_every_sink_once_across_a_kill_9";
    if !require_git(test) || !have_python3() {
        return;
    }
    let rt = runtime();
    let webhook = Receiver::start(&rt, check_webhook(WHSEC));
    let slack = Receiver::start(&rt, check_slack());
    let wecom = Receiver::start(&rt, check_wecom());
    let ding = Receiver::start(&rt, check_dingtalk(DING_SECRET));
    let feishu = Receiver::start(&rt, check_feishu(FEISHU_SECRET));
    let gitlab = Receiver::start(&rt, check_forge("gitlab", GITLAB_TOKEN, "ops/infra"));
    let smtp = SmtpServer::start(&rt, "kiln", "mail-password");
    let receivers: [(&str, &Receiver); 6] = [
        ("webhook", &webhook),
        ("slack", &slack),
        ("wecom", &wecom),
        ("dingtalk", &ding),
        ("feishu", &feishu),
        ("gitlab", &gitlab),
    ];
    // Everything is down until the daemon has been killed mid-rollout: every delivery before
    // the kill fails, so each message arrives from what the outbox kept (or what the restarted
    // daemon recorded), and none can have been delivered and then forgotten.
    for (_, r) in &receivers {
        r.set(Mode::Down);
    }
    smtp.set(Mode::Down);

    let repo = TestRepo::new();
    let secrets = repo.scratch("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let feishu_file = secrets.join("feishu");
    std::fs::write(&feishu_file, format!("{FEISHU_SECRET}\n")).unwrap();
    let notify = format!(
        "notify:
  - {{ name: hooks, kind: webhook, url: \"{webhook}\", secretEnv: T_WHSEC }}
  - {{ name: team-slack, kind: slack, urlEnv: T_SLACK_URL }}
  - {{ name: ops-wecom, kind: wecom, urlEnv: T_WECOM_URL }}
  - {{ name: ops-mail, kind: email, from: kiln@example.com, to: [ops@example.com],
       smtp: {{ host: 127.0.0.1, port: {smtp_port}, username: kiln, passwordEnv: T_SMTP_PASSWORD, caFile: \"{ca}\" }} }}
",
        webhook = webhook.url("/kiln"),
        smtp_port = smtp.port,
        ca = fixture("cert.pem").display(),
    );
    let fleet_notify = format!(
        "    notify:
      - {{ name: web-ding, kind: dingtalk, urlEnv: T_DING_URL, secretEnv: T_DING_SECRET }}
      - {{ name: web-feishu, kind: feishu, urlEnv: T_FEISHU_URL, secretFile: \"{}\" }}
",
        feishu_file.display()
    );
    let forge = format!(
        "forge: {{ kind: gitlab, url: \"{}\", project: ops/infra, tokenEnv: T_GITLAB_TOKEN }}\n",
        gitlab.url("")
    );
    let kiln_yaml = manifest(&notify, &fleet_notify, &forge);
    let v1 = first_commit(&repo, &kiln_yaml);
    let data = repo.scratch("data");
    let env = [
        ("T_WHSEC", WHSEC.to_owned()),
        ("T_SLACK_URL", slack.url("/services/T000/B000/XXXX")),
        ("T_WECOM_URL", wecom.url("/cgi-bin/webhook/send?key=wecom-key")),
        ("T_DING_URL", ding.url("/robot/send?access_token=ding-token")),
        ("T_DING_SECRET", DING_SECRET.to_owned()),
        ("T_FEISHU_URL", feishu.url("/open-apis/bot/v2/hook/feishu-hook")),
        ("T_SMTP_PASSWORD", "mail-password".to_owned()),
        ("T_GITLAB_TOKEN", GITLAB_TOKEN.to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start_with_env(
        &repo.url(),
        &data,
        &["--poll", "1s", "--public-url", "https://kiln.example.com/"],
        &env,
    );
    let first = wait_state(&daemon, &v1, &TERMINAL);
    assert_eq!(first["state"], "succeeded", "{first}\n{}", daemon.logs());
    let first_id = first["id"].as_u64().unwrap();

    // A broken image: its health check answers 500, so the rollout rolls back.
    let v2 = repo.commit("broken image", &[("image/app/unhealthy", "yes")]);
    let rolling = wait_state(&daemon, &v2, &["rolling"]);
    let broken_id = rolling["id"].as_u64().unwrap();
    let pending = outbox(&rt, &daemon)["pending"].as_u64().unwrap_or(0);
    assert!(pending > 0, "deliveries are owed while every receiver is down");
    daemon.kill9();
    for (_, r) in &receivers {
        r.set(Mode::Up);
    }
    smtp.set(Mode::Up);
    daemon.start_again();

    let last = wait_state(&daemon, &v2, &TERMINAL);
    assert_eq!(last["state"], "rolled_back", "{last}\n{}", daemon.logs());
    // Everything owed arrives: four notices per chat sink, four mails, the failed status.
    wait_until("every message to arrive", &daemon, || {
        receivers[..5].iter().all(|(_, r)| r.accepted().len() >= 4)
            && smtp.mails().len() >= 4
            && gitlab.accepted().iter().any(|r| {
                r.path.ends_with(&v2)
                    && r.json()["name"] == "kiln/rollout"
                    && r.json()["state"] == "failed"
            })
    });
    wait_until("the outbox to drain", &daemon, || outbox(&rt, &daemon)["pending"] == 0);
    let status = outbox(&rt, &daemon);
    assert_eq!(status["dead"], 0, "nothing dead-lettered: {status}");

    for (name, r) in &receivers {
        assert!(r.rejected().is_empty(), "{name} rejected requests: {:?}", r.rejected());
        r.assert_no_duplicates(name);
    }

    // The forge: per commit and context, the states in order, each once.
    let mut seen: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in gitlab.accepted() {
        let sha = r.path.rsplit('/').next().unwrap().to_owned();
        let body = r.json();
        seen.entry((sha, body["name"].as_str().unwrap().to_owned()))
            .or_default()
            .push(body["state"].as_str().unwrap().to_owned());
        assert_eq!(
            body["target_url"].as_str().unwrap().trim_end_matches(char::is_numeric),
            "https://kiln.example.com/#rollout-"
        );
    }
    let get = |sha: &str, context: &str| seen.get(&(sha.to_owned(), context.to_owned())).cloned();
    assert_eq!(get(&v1, "kiln/rollout").unwrap(), ["running", "success"], "{seen:?}");
    assert_eq!(get(&v2, "kiln/rollout").unwrap(), ["running", "failed"], "{seen:?}");
    assert_eq!(get(&v2, "kiln/bake").unwrap(), ["running", "success"], "{seen:?}");

    // Every chat sink: exactly the four notices, once each, the last naming the failed step.
    let want: BTreeSet<String> = [
        format!("web: rollout #{first_id} started"),
        format!("web: rollout #{first_id} succeeded"),
        format!("web: rollout #{broken_id} started"),
        format!("web: rollout #{broken_id} rolled back"),
    ]
    .into();
    let titles = |r: &Receiver, title: fn(&Value) -> String| -> Vec<String> {
        r.accepted().iter().map(|m| title(&m.json())).collect()
    };
    let got: [(&str, Vec<String>); 5] = [
        ("webhook", titles(&webhook, |b| b["data"]["title"].as_str().unwrap_or("").to_owned())),
        ("slack", titles(&slack, |b| b["text"].as_str().unwrap_or("").to_owned())),
        (
            "wecom",
            titles(&wecom, |b| {
                b["markdown"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            }),
        ),
        ("dingtalk", titles(&ding, |b| b["markdown"]["title"].as_str().unwrap_or("").to_owned())),
        (
            "feishu",
            titles(&feishu, |b| {
                b["content"]["text"].as_str().unwrap_or("").lines().next().unwrap_or("").to_owned()
            }),
        ),
    ];
    for (name, titles) in &got {
        let set: BTreeSet<String> = titles.iter().cloned().collect();
        assert_eq!(titles.len(), 4, "{name}: {titles:?}");
        assert_eq!(set, want, "{name}: {titles:?}");
    }
    let rolled_back = format!("web: rollout #{broken_id} rolled back");
    let slack_msg = slack
        .accepted()
        .into_iter()
        .map(|r| r.json())
        .find(|b| b["text"] == rolled_back.as_str())
        .unwrap();
    let slack_text = slack_msg.to_string();
    assert!(slack_text.contains("failed step:* rolling: health check"), "{slack_text}");
    assert!(slack_text.contains("GET /healthz"), "the reason names the check: {slack_text}");
    assert!(slack_text.contains(&v2[..8]) && slack_text.contains("broken image"), "{slack_text}");
    let wecom_msg = wecom
        .accepted()
        .into_iter()
        .map(|r| r.json()["markdown"]["content"].as_str().unwrap_or("").to_owned())
        .find(|c| c.starts_with(&rolled_back))
        .unwrap();
    assert!(wecom_msg.contains("failed step: **rolling: health check**"), "{wecom_msg}");
    assert!(wecom_msg.contains(&format!("https://kiln.example.com/#rollout-{broken_id}")));

    // Email: the four messages over STARTTLS with AUTH, Message-IDs distinct.
    let mails = smtp.mails();
    assert_eq!(mails.len(), 4, "{mails:?}");
    assert!(mails.iter().all(|m| m.tls && m.user == "kiln"), "STARTTLS and AUTH: {mails:?}");
    let ids: BTreeSet<String> = mails.iter().filter_map(|m| m.header("Message-ID")).collect();
    assert_eq!(ids.len(), 4, "distinct Message-IDs: {mails:?}");
    let mail = mails.iter().find(|m| m.header("Subject").as_deref() == Some(&rolled_back)).unwrap();
    assert!(mail.to.iter().any(|t| t.contains("ops@example.com")), "{mail:?}");
    assert!(mail.body().contains("failed step: rolling: health check"), "{}", mail.body());
}

#[test]
fn a_hanging_sink_does_not_hold_up_the_rollout_and_a_refusing_one_is_dead_lettered() {
    let test = "a_hanging_sink_does_not_hold_up_the_rollout_and_a_refusing_one_is_dead_lettered";
    if !require_git(test) || !have_python3() {
        return;
    }
    let rt = runtime();
    let hang = Receiver::start(&rt, check_webhook(WHSEC));
    hang.set(Mode::Hang);
    let gone = Receiver::start(&rt, check_slack());
    gone.set(Mode::Gone);
    let chat = Receiver::start(&rt, check_wecom());
    let notify = format!(
        "notify:
  - {{ name: stuck, kind: webhook, url: \"{}\", secretEnv: T_WHSEC }}
  - {{ name: deleted-robot, kind: slack, urlEnv: T_SLACK_URL, events: [rollout.succeeded] }}
  - {{ name: ops-wecom, kind: wecom, urlEnv: T_WECOM_URL }}
",
        hang.url("/hook")
    );
    let repo = TestRepo::new();
    let sha = first_commit(&repo, &manifest(&notify, "", ""));
    let data = repo.scratch("data");
    let slack_url = gone.url("/services/T/B/X");
    let wecom_url = chat.url("/cgi-bin/webhook/send?key=wecom-key");
    let daemon = Daemon::start_with_env(
        &repo.url(),
        &data,
        &["--poll", "1s"],
        &[("T_WHSEC", WHSEC), ("T_SLACK_URL", &slack_url), ("T_WECOM_URL", &wecom_url)],
    );
    let done = wait_state(&daemon, &sha, &TERMINAL);
    assert_eq!(done["state"], "succeeded", "{done}\n{}", daemon.logs());
    let id = done["id"].as_u64().unwrap();
    wait_until("the wecom robot to hear of the success", &daemon, || {
        chat.accepted().iter().any(|r| {
            r.json()["markdown"]["content"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("web: rollout #{id} succeeded")))
        })
    });
    // The stuck webhook got its first request and has answered nothing: the rollout finished
    // while that delivery hung.
    assert!(hang.hung() >= 1, "the hanging sink was tried");
    assert!(hang.accepted().is_empty());
    chat.assert_no_duplicates("wecom");

    // The deleted robot answered 404: dead-lettered at once, shown by `kiln status`.
    wait_until("a dead letter", &daemon, || outbox(&rt, &daemon)["dead"].as_u64() == Some(1));
    let (code, out, err) = kiln(&data, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dead-lettered"), "{out}");
    let dead_line = out.lines().find(|l| l.contains("DEAD")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        dead_line.contains("deleted-robot (slack)")
            && dead_line.contains("rollout.succeeded")
            && dead_line.contains(&format!("#{id}"))
            && dead_line.contains("404"),
        "{dead_line}"
    );
    let pending_line =
        out.lines().find(|l| l.contains("pending  stuck")).unwrap_or_else(|| panic!("{out}"));
    assert!(pending_line.contains("(webhook)"), "{pending_line}");
    // The API says the same.
    let status = outbox(&rt, &daemon);
    assert_eq!(status["dead_letters"][0]["sink"], "deleted-robot", "{status}");
    assert!(status["sinks"].as_array().unwrap().iter().any(|s| s["sink"] == "stuck"), "{status}");
}

#[test]
fn github_and_gitea_statuses_follow_their_documented_apis() {
    use kiln::manifest::{Forge, ForgeKind};
    use kiln::notify::message::{StatusState, StatusUpdate};
    use kiln::notify::sinks::{Failure, Payload, Sender};
    let rt = runtime();
    let github = Receiver::start(&rt, check_forge("github", "gh-token", "ops/infra"));
    let gitea = Receiver::start(&rt, check_forge("gitea", "gitea-token", "ops/infra"));
    // Tokens from files on the daemon's host (`tokenFile`), trailing newline or not.
    let token_dir = tempfile::tempdir().unwrap();
    std::fs::write(token_dir.path().join("gh"), "gh-token\n").unwrap();
    std::fs::write(token_dir.path().join("gitea"), "gitea-token").unwrap();
    let sender = Sender::new().unwrap();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let cases = [(ForgeKind::Github, &github, "gh"), (ForgeKind::Gitea, &gitea, "gitea")];
    for (kind, receiver, file) in cases {
        let forge = Forge {
            kind,
            url: receiver.url(""),
            project: "ops/infra".into(),
            token_env: None,
            token_file: Some(token_dir.path().join(file).display().to_string()),
        };
        for (i, state) in [StatusState::Running, StatusState::Failed, StatusState::Canceled]
            .into_iter()
            .enumerate()
        {
            let status = StatusUpdate {
                sha: sha.into(),
                context: "kiln/rollout".into(),
                state,
                description: "web: rolled back".into(),
                target_url: "https://kiln.example.com/#rollout-3".into(),
            };
            let payload =
                serde_json::to_value(Payload::Forge { forge: forge.clone(), status }).unwrap();
            let entry = kiln::store::OutboxEntry {
                seq: i as u64 + 1,
                sink: "forge:kiln/rollout".into(),
                id: format!("msg_test_{i}"),
                kind: kind.as_str().into(),
                rollout: kiln::model::RolloutId(3),
                fleet: Some("web".into()),
                topic: "kiln/rollout".into(),
                payload,
                created_at: kiln::model::now(),
                attempts: 0,
                next_at: None,
                last_error: None,
                dead_at: None,
            };
            rt.block_on(sender.send(&entry)).unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
        }
        assert!(receiver.rejected().is_empty(), "{kind:?}: {:?}", receiver.rejected());
        let states: Vec<String> = receiver
            .accepted()
            .iter()
            .map(|r| r.json()["state"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(states, ["pending", "failure", "error"], "{kind:?}");
        receiver.assert_no_duplicates(kind.as_str());
    }
    // A wrong token is refused by the forge (401 here: 400 from the checker) and is permanent.
    let forge = Forge {
        kind: ForgeKind::Github,
        url: github.url(""),
        project: "ops/infra".into(),
        token_env: None,
        token_file: Some(token_dir.path().join("gitea").display().to_string()),
    };
    let status = StatusUpdate {
        sha: sha.into(),
        context: "kiln/bake".into(),
        state: StatusState::Success,
        description: "ok".into(),
        target_url: "https://kiln.example.com/#rollout-3".into(),
    };
    let entry = kiln::store::OutboxEntry {
        seq: 9,
        sink: "forge:kiln/bake".into(),
        id: "msg_test_9".into(),
        kind: "github".into(),
        rollout: kiln::model::RolloutId(3),
        fleet: None,
        topic: "kiln/bake".into(),
        payload: serde_json::to_value(Payload::Forge { forge, status }).unwrap(),
        created_at: kiln::model::now(),
        attempts: 0,
        next_at: None,
        last_error: None,
        dead_at: None,
    };
    assert!(matches!(rt.block_on(sender.send(&entry)), Err(Failure::Permanent(_))));
}

#[test]
fn secrets_in_the_repo_are_refused_with_their_location() {
    let yaml = manifest(
        "notify:
  - { name: chat, kind: slack, url: \"https://hooks.slack.com/services/T/B/secret\" }
  - { name: hooks, kind: webhook, url: \"https://example.com/h\" }
  - { name: mail, kind: email, smtp: { host: smtp.example.com, passwordFile: relative/pw }, from: k@example.com, to: [a@example.com] }
",
        "",
        "forge: { kind: github, url: \"https://api.github.com\", project: ops }\n",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kiln.yaml"), &yaml).unwrap();
    let (code, out, err) = kiln(dir.path(), &["validate", dir.path().to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    let text = format!("{out}{err}");
    for (needle, line) in [
        ("a slack URL carries the robot's token", 2),
        ("needs its secret from the daemon's host", 3),
        ("passwordFile `relative/pw` must be an absolute path", 4),
        ("forge.project `ops` must be `owner/repo`", 5),
        ("forge needs its token", 5),
    ] {
        let found =
            text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {text}"));
        assert!(found.contains(&format!("kiln.yaml:{line}:")), "{needle} at line {line}: {found}");
    }
}
