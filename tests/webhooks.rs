//! Webhook receivers, driven with the payloads GitLab, GitHub and Gitea document
//! (tests/fixtures/webhooks/, see SOURCE there). Most tests call the router in-process with
//! `oneshot`; the end-to-end ones use a real socket, a real `git daemon` remote and the real
//! source watcher, polling only every 60 s so that only the webhook can explain a fetch.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use kiln::operator::{CommandRequest, OperatorHandle};
use kiln::server::webhooks::{sign_hex, sign_standard_webhook};
use kiln::server::{AppState, Secret, ServerConfig, ServerLimits, WebhookSecrets, router};
use kiln::source::{SourceConfig, SourceEvent, SourceHandle};
use kiln::store::{CommitKind, Store};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::ServiceExt as _;

const GITLAB_TOKEN: &str = "gl-token-0123";
const GITLAB_SIGNING: &str = "whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdHRlc3Q=";
const GITHUB_SECRET: &str = "gh-secret-4567";
const GITEA_SECRET: &str = "gitea-secret-89";
const GENERIC_SECRET: &str = "generic-secret-ab";
/// What the in-process tests watch.
const WATCHED: &str = "https://git.example.com/team/infra.git";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhooks").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Points a documented payload at `url` (and its ref at `branch`): every URL field the payload
/// has, its repository name and path. Nothing else is touched.
fn retarget(mut payload: Value, url: &str, branch: &str) -> Value {
    let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url);
    let name = name.strip_suffix(".git").unwrap_or(name).to_owned();
    let path = kiln::server::webhooks::normalize_url(url).map(|(_, p)| p).unwrap_or(name.clone());
    for object in ["project", "repository"] {
        let Some(map) = payload.get_mut(object).and_then(Value::as_object_mut) else { continue };
        for (key, value) in map.iter_mut() {
            if !value.is_string() {
                continue;
            }
            match key.as_str() {
                "git_http_url" | "git_ssh_url" | "web_url" | "http_url" | "ssh_url" | "url"
                | "homepage" | "clone_url" | "html_url" | "git_url" => *value = json!(url),
                "name" => *value = json!(name),
                "full_name" | "path_with_namespace" => *value = json!(path),
                _ => {}
            }
        }
    }
    payload["ref"] = json!(format!("refs/heads/{branch}"));
    payload
}

fn secrets() -> WebhookSecrets {
    WebhookSecrets {
        gitlab_token: Some(Secret(GITLAB_TOKEN.into())),
        gitlab_signing: None,
        github: Some(Secret(GITHUB_SECRET.into())),
        gitea: Some(Secret(GITEA_SECRET.into())),
        generic: Some(Secret(GENERIC_SECRET.into())),
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    /// One router for the whole test, as the daemon has: the replay set lives in it.
    app: axum::Router,
    hints: mpsc::Receiver<String>,
    _commands: mpsc::Receiver<CommandRequest>,
}

fn operator(
    store_dir: &Path,
    source: SourceHandle,
) -> (OperatorHandle, mpsc::Receiver<CommandRequest>) {
    let (commands, rx) = mpsc::channel(8);
    let handle = OperatorHandle {
        store: Store::open(store_dir, 0).expect("store"),
        source,
        commands,
        fleets: Default::default(),
        metrics: Default::default(),
    };
    (handle, rx)
}

/// A router state over a detached source handle whose hints the test reads.
fn harness(secrets: WebhookSecrets) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let (source, hints) = SourceHandle::detached(SourceConfig {
        url: WATCHED.into(),
        branch: "main".into(),
        mirror: dir.path().join("mirror.git"),
        poll: Duration::from_secs(60),
    });
    let (operator, commands) = operator(dir.path(), source);
    let config = ServerConfig {
        api_token: Secret("api".into()),
        secrets,
        max_body: 25 << 20,
        ..ServerConfig::default()
    };
    let state = AppState { operator, config: Arc::new(config) };
    let app = router(state.clone());
    Harness { _dir: dir, state, app, hints, _commands: commands }
}

async fn post(
    app: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request =
        Request::builder().method("POST").uri(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("router answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn gitlab_body(branch: &str) -> Vec<u8> {
    serde_json::to_vec(&retarget(fixture("gitlab-push.json"), WATCHED, branch)).expect("json")
}

#[tokio::test]
async fn github_signed_push_is_accepted_and_triggers_a_fetch() {
    let mut h = harness(secrets());
    let body = serde_json::to_vec(&retarget(fixture("github-push.json"), WATCHED, "main")).unwrap();
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &body));
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ("x-hub-signature-256", signature.as_str()),
    ];
    let (status, reply) = post(&h.app, "/hooks/github", &headers, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "accepted");
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:github"));

    // GitHub's ping when the hook is created.
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec();
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &ping));
    let headers = [("x-github-event", "ping"), ("x-hub-signature-256", signature.as_str())];
    let (status, reply) = post(&h.app, "/hooks/github", &headers, ping).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::OK, json!("pong")));
}

#[tokio::test]
async fn gitea_signed_push_is_accepted() {
    let mut h = harness(secrets());
    let body = serde_json::to_vec(&retarget(fixture("gitea-push.json"), WATCHED, "main")).unwrap();
    let signature = sign_hex(GITEA_SECRET, &body);
    let headers = [
        ("x-gitea-event", "push"),
        ("x-gitea-delivery", "f6266f16-1bf3-46a5-9ea4-602e06ead473"),
        ("x-gitea-signature", signature.as_str()),
    ];
    let (status, reply) = post(&h.app, "/hooks/gitea", &headers, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:gitea"));
}

#[tokio::test]
async fn gitlab_signed_webhook_is_verified() {
    let mut secrets = secrets();
    secrets.gitlab_signing = Some(Secret(GITLAB_SIGNING.into()));
    let mut h = harness(secrets);
    let body = gitlab_body("main");
    let now = kiln::model::now().timestamp();
    let signature = sign_standard_webhook(GITLAB_SIGNING, "msg-1", now, &body);
    let now_text = now.to_string();
    let mut headers = vec![
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", GITLAB_TOKEN),
        ("webhook-id", "msg-1"),
        ("idempotency-key", "msg-1"),
        ("webhook-timestamp", now_text.as_str()),
        ("webhook-signature", signature.as_str()),
    ];
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:gitlab"));

    // Same delivery with a tampered body: the signature no longer holds.
    headers[3] = ("idempotency-key", "msg-2");
    let mut tampered = body;
    tampered.extend_from_slice(b"  ");
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, tampered).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
    assert!(h.hints.try_recv().is_err(), "a rejected delivery must not trigger a fetch");
}

#[tokio::test]
async fn wrong_or_missing_secrets_are_401() {
    let mut h = harness(secrets());
    let headers = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "not-the-token")];
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, gitlab_body("main")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply["error"], "wrong X-Gitlab-Token");

    let body = gitlab_body("main");
    let bad = format!("sha256={}", sign_hex("another-secret", &body));
    let headers = [("x-github-event", "push"), ("x-hub-signature-256", bad.as_str())];
    let (status, _) = post(&h.app, "/hooks/github", &headers, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A receiver without a configured secret refuses everything and says how to configure it.
    let mut none = harness(WebhookSecrets::default());
    let headers = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", GITLAB_TOKEN)];
    let (status, reply) = post(&none.app, "/hooks/gitlab", &headers, gitlab_body("main")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(reply["error"].as_str().unwrap_or("").contains("KILN_GITLAB_TOKEN"), "{reply}");
    assert!(h.hints.try_recv().is_err() && none.hints.try_recv().is_err());

    let text = h.state.operator.metrics.render(&Default::default());
    assert!(
        text.contains(r#"kiln_webhook_deliveries_total{source="gitlab",result="unauthorized"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_replayed_delivery_is_acknowledged_and_ignored() {
    let mut h = harness(secrets());
    let headers = [
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", GITLAB_TOKEN),
        ("idempotency-key", "a1b2c3d4-replay"),
    ];
    let (status, _) = post(&h.app, "/hooks/gitlab", &headers, gitlab_body("main")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:gitlab"));
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, gitlab_body("main")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["status"], "duplicate");
    assert!(h.hints.try_recv().is_err(), "a replay must not trigger another fetch");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_and_junk_is_400() {
    let mut h = harness(secrets());
    let headers = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", GITLAB_TOKEN)];
    let huge = vec![b' '; 30 << 20];
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");

    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, b"{\"ref\": ".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"].as_str().unwrap_or("").contains("not valid JSON"), "{reply}");
    assert!(h.hints.try_recv().is_err());
}

#[tokio::test]
async fn other_repos_branches_tags_and_events_are_202_ignored() {
    let mut h = harness(secrets());
    let auth = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", GITLAB_TOKEN)];

    let other =
        retarget(fixture("gitlab-push.json"), "https://git.example.com/team/other.git", "main");
    let (status, reply) =
        post(&h.app, "/hooks/gitlab", &auth, serde_json::to_vec(&other).unwrap()).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::ACCEPTED, json!("ignored")));
    assert!(reply["reason"].as_str().unwrap_or("").contains("not the watched one"), "{reply}");

    let (status, reply) = post(&h.app, "/hooks/gitlab", &auth, gitlab_body("feature")).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::ACCEPTED, json!("ignored")));

    // The documented tag push, as is apart from the repository.
    let mut tag = retarget(fixture("gitlab-tag-push.json"), WATCHED, "main");
    tag["ref"] = fixture("gitlab-tag-push.json")["ref"].clone();
    let headers = [("x-gitlab-event", "Tag Push Hook"), ("x-gitlab-token", GITLAB_TOKEN)];
    let (status, reply) =
        post(&h.app, "/hooks/gitlab", &headers, serde_json::to_vec(&tag).unwrap()).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::ACCEPTED, json!("ignored")));

    let headers = [("x-gitlab-event", "Issue Hook"), ("x-gitlab-token", GITLAB_TOKEN)];
    let (status, reply) = post(&h.app, "/hooks/gitlab", &headers, b"{}".to_vec()).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::ACCEPTED, json!("ignored")));
    assert!(h.hints.try_recv().is_err(), "nothing here is for kiln");
}

#[tokio::test]
async fn generic_receiver_accepts_a_signed_hint() {
    let mut h = harness(secrets());
    let body = br#"{"ref":"refs/heads/main","repository":"/srv/git/infra.git"}"#.to_vec();
    let signature = format!("sha256={}", sign_hex(GENERIC_SECRET, &body));
    let headers = [("x-kiln-signature", signature.as_str())];
    let (status, reply) = post(&h.app, "/hooks/generic", &headers, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:generic"));
}

/// Waits for the first source event `pick` accepts, failing after `secs` with `what`.
async fn wait_for<T>(
    events: &mut mpsc::Receiver<SourceEvent>,
    secs: u64,
    what: &str,
    mut pick: impl FnMut(&SourceEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out after {secs}s waiting for {what}"))
            .unwrap_or_else(|| panic!("the source watcher stopped while waiting for {what}"));
        if let Some(found) = pick(&event) {
            return found;
        }
    }
}

#[tokio::test]
async fn gitlab_push_over_a_socket_fetches_records_and_survives_branch_deletion() {
    if !support::git::require_git(
        "gitlab_push_over_a_socket_fetches_records_and_survives_branch_deletion",
    ) {
        return;
    }
    let repo = support::git::TestRepo::new();
    let first = repo.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    let daemon = repo.serve_git();
    let url = daemon.url("repo.git");

    let dir = tempfile::tempdir().expect("temp dir");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (events_tx, mut events) = mpsc::channel(16);
    let source = kiln::source::spawn(
        SourceConfig {
            url: url.clone(),
            branch: "main".into(),
            mirror: dir.path().join("mirror.git"),
            // Long enough that only the webhook can explain a fetch within the test.
            poll: Duration::from_secs(60),
        },
        None,
        events_tx,
        shutdown.clone(),
    );
    wait_for(&mut events, 30, "the initial commit", |e| match e {
        SourceEvent::Commits(c) if c.last().is_some_and(|r| r.revision.0 == first) => Some(()),
        _ => None,
    })
    .await;

    let (operator, _commands) = operator(dir.path(), source);
    let config = ServerConfig {
        api_token: Secret("api".into()),
        secrets: secrets(),
        max_body: 25 << 20,
        ..ServerConfig::default()
    };
    let state = AppState { operator, config: Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));
    let client = reqwest::Client::new();

    let second = repo.commit("second", &[("README", "hello\n")]);
    let body = serde_json::to_vec(&retarget(fixture("gitlab-push.json"), &url, "main")).unwrap();
    let started = std::time::Instant::now();
    let response = client
        .post(format!("http://{addr}/hooks/gitlab"))
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-token", GITLAB_TOKEN)
        .header("idempotency-key", "delivery-1")
        .body(body.clone())
        .send()
        .await
        .expect("POST /hooks/gitlab");
    let answered_in = started.elapsed();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    eprintln!("webhook answered in {answered_in:?}");
    let tip =
        wait_for(
            &mut events,
            30,
            "the pushed commit, fetched because of the webhook",
            |e| match e {
                SourceEvent::Commits(c) => c.last().cloned(),
                _ => None,
            },
        )
        .await;
    assert_eq!(tip.revision.0, second);
    assert_eq!(tip.trigger, "webhook:gitlab");
    assert_eq!(tip.kind, CommitKind::Push);

    // A branch deletion: accepted, fetched, reported; nothing is torn down by the server.
    repo.delete_branch();
    let mut deleted = retarget(fixture("gitlab-push.json"), &url, "main");
    deleted["before"] = json!(second);
    deleted["after"] = json!("0000000000000000000000000000000000000000");
    let response = client
        .post(format!("http://{addr}/hooks/gitlab"))
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-token", GITLAB_TOKEN)
        .header("idempotency-key", "delivery-2")
        .body(serde_json::to_vec(&deleted).unwrap())
        .send()
        .await
        .expect("POST deletion");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let reply: Value = response.json().await.expect("json");
    assert_eq!(reply["branch_deleted"], true);
    let last = wait_for(&mut events, 30, "the branch deletion", |e| match e {
        SourceEvent::BranchDeleted(record) => Some(record.clone()),
        _ => None,
    })
    .await;
    assert_eq!(last.revision.0, second);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops on shutdown")
        .expect("server task")
        .expect("server result");
}

/// Runs `hooks/post-receive` in a bare repository as git would (ref updates on stdin).
fn run_post_receive(bare: &Path, stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/post-receive");
    let mut child = std::process::Command::new("sh")
        .arg(&script)
        .current_dir(bare)
        .env("GIT_DIR", bare)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn post-receive");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("post-receive runs")
}

#[tokio::test]
async fn post_receive_hook_pings_the_generic_receiver_and_is_harmless_when_kiln_is_down() {
    let have = |tool: &str| {
        std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
            || std::process::Command::new(tool)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
    };
    if !(have("curl") && have("openssl") && support::git::require_git("post_receive_hook")) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("post_receive_hook: curl and openssl are required under CI");
        }
        eprintln!("SKIP: post_receive_hook: curl or openssl is missing");
        return;
    }
    let repo = support::git::TestRepo::new();
    let sha = repo.commit("first", &[("kiln.yaml", "fleets: []\n")]);
    let bare = repo.bare_path().to_path_buf();

    let dir = tempfile::tempdir().expect("temp dir");
    let (source, mut hints) = SourceHandle::detached(SourceConfig {
        url: repo.url(),
        branch: "main".into(),
        mirror: dir.path().join("mirror.git"),
        poll: Duration::from_secs(60),
    });
    let (operator, _commands) = operator(dir.path(), source);
    let config = ServerConfig {
        api_token: Secret("api".into()),
        secrets: secrets(),
        max_body: 25 << 20,
        ..ServerConfig::default()
    };
    let state = AppState { operator, config: Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));

    let secret_file = dir.path().join("generic.secret");
    std::fs::write(&secret_file, format!("{GENERIC_SECRET}\n")).expect("secret file");
    repo.git_bare(&["config", "kiln.url", &format!("http://{addr}")]);
    repo.git_bare(&["config", "kiln.secretFile", secret_file.to_str().expect("utf-8")]);

    let zero = "0000000000000000000000000000000000000000";
    let line = format!("{zero} {sha} refs/heads/main\n");
    let out = tokio::task::spawn_blocking({
        let bare = bare.clone();
        let line = line.clone();
        move || run_post_receive(&bare, &line)
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "post-receive failed: {stderr}");
    let hint = tokio::time::timeout(Duration::from_secs(10), hints.recv())
        .await
        .expect("timed out waiting for the hook's delivery to trigger a fetch");
    assert_eq!(hint.as_deref(), Some("webhook:generic"), "hook said: {stderr}");

    // kiln down: the push must still succeed, with a note on stderr.
    shutdown.cancel();
    repo.git_bare(&[
        "config",
        "kiln.url",
        &format!("http://127.0.0.1:{}", support::git::free_port()),
    ]);
    let out =
        tokio::task::spawn_blocking(move || run_post_receive(&bare, &line)).await.expect("join");
    assert!(out.status.success(), "post-receive must exit 0 when kiln is down");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kiln"), "expected a note on stderr, got: {stderr}");
}

/// A webhook server on a real socket with `limits` (for what only a socket shows: what is
/// read, and when).
async fn serve_real(
    secrets: WebhookSecrets,
    max_body: usize,
    limits: ServerLimits,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, Harness) {
    let h = harness(secrets);
    let config = ServerConfig { max_body, limits, ..ServerConfig::clone(&h.state.config) };
    let state = AppState { operator: h.state.operator.clone(), config: Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));
    (addr, shutdown, h)
}

/// Reads a response from a raw connection: status and text (head and, as far as
/// `Content-Length` says, body), `None` if the server closed the connection or `secs` passed
/// before the head.
async fn read_head(stream: &mut tokio::net::TcpStream, secs: u64) -> Option<(u16, String)> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return None,
        };
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            return Some((status, String::from_utf8_lossy(&buf).into_owned()));
        }
    }
}

/// Sends a request head (plus `body`, maybe only its start) and returns the open stream.
async fn send_head(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    length: usize,
    body: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    stream
}

#[tokio::test]
async fn unauthenticated_deliveries_are_refused_before_their_body_is_read() {
    // Every receiver but the generic one has a secret.
    let secrets = WebhookSecrets { generic: None, ..secrets() };
    let (addr, shutdown, mut h) = serve_real(secrets, 25 << 20, ServerLimits::default()).await;
    let malformed = "sha256=not-hex";
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (
            "/hooks/gitlab",
            &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
            "wrong X-Gitlab-Token",
        ),
        ("/hooks/gitlab", &[("X-Gitlab-Event", "Push Hook")], "missing X-Gitlab-Token"),
        ("/hooks/github", &[("X-GitHub-Event", "push")], "missing X-Hub-Signature-256"),
        (
            "/hooks/github",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", malformed)],
            "not a hex",
        ),
        ("/hooks/gitea", &[("X-Gitea-Event", "push"), ("X-Gitea-Signature", "abc")], "not a hex"),
        ("/hooks/generic", &[("X-Kiln-Signature", "sha256=00")], "no secret configured"),
    ];
    for (path, headers, why) in cases {
        // 24 MiB declared, none of it sent: an answer can only come before the body is read.
        let mut stream = send_head(addr, path, headers, 24 << 20, b"").await;
        let answer = read_head(&mut stream, 15).await;
        let (status, head) = answer.unwrap_or_else(|| panic!("{path} {headers:?}: no answer"));
        assert_eq!(status, 401, "{path} {headers:?}: {head}");
        assert!(head.contains(why), "{path} {headers:?}: {head}");
    }
    assert!(h.hints.try_recv().is_err());
    let text = h.state.operator.metrics.render(&Default::default());
    assert!(text.contains(r#"result="unauthorized"} 2"#), "{text}");
    shutdown.cancel();
}

#[tokio::test]
async fn body_bytes_in_flight_are_bounded_across_deliveries() {
    let limits = ServerLimits { max_body_in_flight: 1 << 20, ..ServerLimits::default() };
    let (addr, shutdown, mut h) = serve_real(secrets(), 1 << 20, limits).await;
    // Well-formed signatures (so the body must be read to check them), wrong ones.
    let zeros = format!("sha256={}", "0".repeat(64));
    let headers = [("X-GitHub-Event", "push"), ("X-Hub-Signature-256", zeros.as_str())];
    // The first delivery declares 800 KiB, sends 1 KiB and holds the rest back.
    let first = send_head(addr, "/hooks/github", &headers, 800 << 10, &[b' '; 1024]).await;
    // The second would take the bytes in flight past 1 MiB: refused at once, retryable.
    let mut second = send_head(addr, "/hooks/github", &headers, 800 << 10, b"").await;
    let (status, head) = read_head(&mut second, 15).await.expect("an answer before the body");
    assert_eq!(status, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert!(head.contains("too many request bodies in flight"), "{head}");
    // Once the first is gone, its bytes are back: a whole delivery is read (and fails its
    // signature, which is all a delivery with a made-up signature can get).
    drop(first);
    let body = vec![b' '; 800 << 10];
    let mut status = 0;
    for _ in 0..100 {
        let mut third = send_head(addr, "/hooks/github", &headers, body.len(), &body).await;
        status = read_head(&mut third, 15).await.map_or(0, |(s, _)| s);
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 401, "the budget was not returned after the first delivery closed");
    assert!(h.hints.try_recv().is_err());
    shutdown.cancel();
}

/// `payload=<url-encoded JSON>`, as GitHub sends a delivery with content type `form`.
fn github_form(payload: &Value) -> Vec<u8> {
    let json = serde_json::to_string(payload).expect("json");
    form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &json)
        .finish()
        .into_bytes()
}

async fn post_form(
    app: &axum::Router,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method("POST")
        .uri("/hooks/github")
        .header("content-type", "application/x-www-form-urlencoded");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("answer");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn github_form_deliveries_are_read_from_their_payload_field() {
    let mut h = harness(secrets());
    let body = github_form(&retarget(fixture("github-push.json"), WATCHED, "main"));
    assert!(body.starts_with(b"payload=%7B%22"), "{}", String::from_utf8_lossy(&body[..20]));
    // GitHub signs the form body exactly as sent.
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &body));
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ("x-hub-signature-256", signature.as_str()),
    ];
    let (status, reply) = post_form(&h.app, &headers, body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "accepted");
    assert_eq!(h.hints.try_recv().ok().as_deref(), Some("webhook:github"));

    // Another branch in a form is ignored like its JSON twin; a signature over the JSON
    // inside instead of the form body is wrong.
    let other = github_form(&retarget(fixture("github-push.json"), WATCHED, "feature"));
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &other));
    let headers = [("x-github-event", "push"), ("x-hub-signature-256", signature.as_str())];
    let (status, reply) = post_form(&h.app, &headers, other).await;
    assert_eq!((status, reply["status"].clone()), (StatusCode::ACCEPTED, json!("ignored")));
    let json = serde_json::to_vec(&retarget(fixture("github-push.json"), WATCHED, "main")).unwrap();
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &json));
    let headers = [("x-github-event", "push"), ("x-hub-signature-256", signature.as_str())];
    let (status, _) = post_form(&h.app, &headers, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A form without `payload` says so.
    let junk = b"foo=bar".to_vec();
    let signature = format!("sha256={}", sign_hex(GITHUB_SECRET, &junk));
    let headers = [("x-github-event", "push"), ("x-hub-signature-256", signature.as_str())];
    let (status, reply) = post_form(&h.app, &headers, junk).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"].as_str().unwrap_or("").contains("payload"), "{reply}");
    assert!(h.hints.try_recv().is_err());
}
