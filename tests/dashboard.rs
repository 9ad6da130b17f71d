//! The dashboard's authentication over a real socket: the login cookie (HttpOnly,
//! SameSite=Strict, Secure behind HTTPS), the per-session CSRF token, the origin check and
//! logout; and the page escaping hostile fleet names, commit subjects and authors. The server
//! is kiln's own (`kiln::server::serve`) on 127.0.0.1 with a real store; verbs are answered by
//! the test on the operator's command channel. The browser test is `tests/dashboard_browser.rs`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use kiln::model::{ImageRef, Revision, RolloutId};
use kiln::operator::{Command, CommandRequest, FleetStatus, OperatorHandle};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::server::{AppState, Secret, ServerConfig, ServerLimits, WebhookSecrets};
use kiln::source::{SourceConfig, SourceHandle};
use kiln::store::{CommitKind, CommitRecord, Store};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, SET_COOKIE};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "dashboard-token-5eed";

struct Ui {
    _dir: tempfile::TempDir,
    base: String,
    store: Store,
    fleets: kiln::operator::FleetView,
    commands: Option<mpsc::Receiver<CommandRequest>>,
    _hints: mpsc::Receiver<String>,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Ui {
    let dir = tempfile::tempdir().unwrap();
    let (source, hints) = SourceHandle::detached(SourceConfig {
        url: "https://git.example.com/team/infra.git".into(),
        branch: "main".into(),
        mirror: dir.path().join("mirror.git"),
        poll: Duration::from_secs(60),
    });
    let store = Store::open(dir.path(), 0).unwrap();
    let (commands_tx, commands) = mpsc::channel(8);
    let fleets = kiln::operator::FleetView::default();
    let operator = OperatorHandle {
        store: store.clone(),
        source,
        commands: commands_tx,
        fleets: fleets.clone(),
        metrics: Default::default(),
    };
    let config = ServerConfig {
        api_token: Secret(TOKEN.into()),
        secrets: WebhookSecrets::default(),
        max_body: 1 << 20,
        limits: ServerLimits::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let state = AppState { operator, config: Arc::new(config) };
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Ui { _dir: dir, base, store, fleets, commands: Some(commands), _hints: hints, http, shutdown }
}

/// The `kiln_session=...` pair from a response's `Set-Cookie`, and the whole header.
fn session_cookie(headers: &HeaderMap) -> Option<(String, String)> {
    let header = headers.get(SET_COOKIE)?.to_str().ok()?.to_owned();
    let pair = header.split(';').next()?.trim().to_owned();
    Some((pair, header))
}

/// The CSRF token the page carries for its session.
fn csrf_of(page: &str) -> Option<String> {
    let start = page.find("<meta name=\"kiln-csrf\" content=\"")? + 32;
    let end = page[start..].find('"')? + start;
    Some(page[start..end].to_owned())
}

impl Ui {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn origin(&self) -> String {
        self.base.clone()
    }

    async fn login(&self, token: &str) -> reqwest::Response {
        self.http
            .post(self.url("/login"))
            .header("origin", self.origin())
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
    }

    /// Logs in; returns (cookie pair, CSRF token).
    async fn session(&self) -> (String, String) {
        let response = self.login(TOKEN).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let (cookie, _) = session_cookie(response.headers()).expect("a session cookie");
        let page = self.page(Some(&cookie)).await;
        (cookie, csrf_of(&page).expect("the page of a session carries its CSRF token"))
    }

    async fn page(&self, cookie: Option<&str>) -> String {
        let mut request = self.http.get(self.url("/"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    /// `POST /api/v1/fleets/web/pause` with the given cookie, CSRF header and Origin.
    async fn pause(&self, cookie: Option<&str>, csrf: Option<&str>, origin: Option<&str>) -> u16 {
        let mut request = self.http.post(self.url("/api/v1/fleets/web/pause"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(csrf) = csrf {
            request = request.header("x-kiln-csrf", csrf);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        response.status().as_u16()
    }

    /// The operator's command channel (taken once, so requests can borrow `self` beside it).
    fn commands(&mut self) -> mpsc::Receiver<CommandRequest> {
        self.commands.take().expect("commands taken once")
    }
}

fn no_verb_arrived(commands: &mut mpsc::Receiver<CommandRequest>, why: &str) {
    assert!(commands.try_recv().is_err(), "a verb reached the operator: {why}");
}

/// Answers the next verb on the command channel with rollout #7.
async fn answer_next(commands: &mut mpsc::Receiver<CommandRequest>) -> Command {
    let request = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("timed out waiting for a verb")
        .expect("command channel open");
    let _ = request.reply.send(Ok(RolloutId(7)));
    request.command
}

#[tokio::test]
async fn verbs_need_a_session_with_its_csrf_token_from_this_origin_and_logout_ends_it() {
    let mut ui = start().await;
    let mut commands = ui.commands();

    // Read-only without a login: the page has no verbs and no CSRF token; verbs are refused.
    let page = ui.page(None).await;
    assert!(page.contains("id=\"login\"") && !page.contains("data-verb"), "{page}");
    assert!(csrf_of(&page).is_none());
    assert_eq!(ui.pause(None, None, None).await, 401, "no cookie");
    assert_eq!(ui.pause(Some("kiln_session=forged"), Some("x"), None).await, 401, "unknown id");

    // A wrong token sets no cookie.
    let refused = ui.login("not-the-token").await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(session_cookie(refused.headers()).is_none());
    assert!(refused.text().await.unwrap().contains("wrong API token"));

    // The right one: an HttpOnly, SameSite=Strict cookie (not Secure over plain HTTP).
    let response = ui.login(TOKEN).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/");
    let (cookie, header) = session_cookie(response.headers()).unwrap();
    assert!(cookie.starts_with("kiln_session=") && cookie.len() > 40, "{header}");
    assert!(header.contains("; HttpOnly") && header.contains("; SameSite=Strict"), "{header}");
    assert!(header.contains("; Path=/") && !header.contains("Secure"), "{header}");
    let page = ui.page(Some(&cookie)).await;
    let csrf = csrf_of(&page).unwrap();
    assert!(page.contains("id=\"logout\""), "{page}");
    assert!(!page.contains(TOKEN), "the page never shows the API token");

    // The cookie alone, a wrong CSRF token, or another origin: refused, nothing reaches the
    // operator.
    assert_eq!(ui.pause(Some(&cookie), None, None).await, 403, "no CSRF token");
    assert_eq!(ui.pause(Some(&cookie), Some("0000"), None).await, 403, "wrong CSRF token");
    let wrong = format!("{}0", &csrf[..csrf.len() - 1]);
    assert_eq!(ui.pause(Some(&cookie), Some(&wrong), None).await, 403, "one digit off");
    let evil = Some("https://evil.example");
    assert_eq!(ui.pause(Some(&cookie), Some(&csrf), evil).await, 403, "cross-origin");
    assert_eq!(ui.pause(Some(&cookie), Some(&csrf), Some("null")).await, 403, "Origin: null");
    no_verb_arrived(&mut commands, "refused requests");

    // Cookie + CSRF token from the same origin: the verb reaches the operator.
    let origin = ui.origin();
    let call = ui.pause(Some(&cookie), Some(&csrf), Some(&origin));
    let (status, command) = tokio::join!(call, answer_next(&mut commands));
    assert_eq!(status, 202);
    assert_eq!(command, Command::Pause { fleet: "web".into() });

    // Logout needs the session's CSRF token too (no forced logout from elsewhere).
    let logout = |csrf: String| {
        ui.http
            .post(ui.url("/logout"))
            .header("cookie", &cookie)
            .header("origin", ui.origin())
            .form(&[("csrf", csrf)])
            .send()
    };
    assert_eq!(logout("nope".into()).await.unwrap().status(), StatusCode::FORBIDDEN);
    // Still logged in after the refused logout.
    let call = ui.pause(Some(&cookie), Some(&csrf), None);
    let (status, _) = tokio::join!(call, answer_next(&mut commands));
    assert_eq!(status, 202, "the session survives a refused logout");

    let out = logout(csrf.clone()).await.unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let (cleared, header) = session_cookie(out.headers()).unwrap();
    assert_eq!(cleared, "kiln_session=", "{header}");
    assert!(header.contains("Max-Age=0") && header.contains("HttpOnly"), "{header}");
    // The old cookie is dead on the server, whatever the browser keeps.
    assert_eq!(ui.pause(Some(&cookie), Some(&csrf), None).await, 401, "after logout");
    let page = ui.page(Some(&cookie)).await;
    assert!(csrf_of(&page).is_none() && page.contains("id=\"login\""), "{page}");
    no_verb_arrived(&mut commands, "after logout");
}

#[tokio::test]
async fn cross_origin_logins_and_token_calls_are_refused_and_https_cookies_are_secure() {
    let mut ui = start().await;
    let mut commands = ui.commands();
    let cross = ui
        .http
        .post(ui.url("/login"))
        .header("origin", "http://evil.example")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    assert!(session_cookie(cross.headers()).is_none());
    let site = ui
        .http
        .post(ui.url("/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(site.status(), StatusCode::FORBIDDEN);

    // Even the API token is refused from a browser page of another origin.
    let token_call = ui
        .http
        .post(ui.url("/api/v1/fleets/web/pause"))
        .bearer_auth(TOKEN)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(token_call.status(), StatusCode::FORBIDDEN);
    no_verb_arrived(&mut commands, "cross-origin");
    // The CLI's way (no Origin) still works.
    let call = ui.http.post(ui.url("/api/v1/fleets/web/resume")).bearer_auth(TOKEN).send();
    let (response, command) = tokio::join!(call, answer_next(&mut commands));
    assert_eq!(response.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(command, Command::Resume { fleet: "web".into() });

    // Behind a TLS proxy the cookie is Secure.
    let tls = ui
        .http
        .post(ui.url("/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(tls.status(), StatusCode::SEE_OTHER);
    let (_, header) = session_cookie(tls.headers()).unwrap();
    assert!(header.ends_with("; Secure"), "{header}");
}

const VECTORS: [&str; 5] = [
    "<script>alert('subject')</script>",
    "\"><img src=x onerror=alert(1)>",
    "'><svg/onload=alert(2)>",
    "</select></option><script>alert(3)</script>",
    "<a href=javascript:alert(4)>x</a>",
];

#[tokio::test]
async fn the_page_escapes_hostile_fleet_names_commit_subjects_and_authors() {
    let ui = start().await;
    let now = kiln::model::now();
    for (n, vector) in VECTORS.iter().enumerate() {
        let revision = Revision(format!("{n:0>40}"));
        ui.store
            .record_commit(&CommitRecord {
                revision: revision.clone(),
                parents: vec![],
                summary: (*vector).into(),
                author: format!("{vector} <x@example.com>"),
                committed_at: now,
                seen_at: now,
                kind: CommitKind::Push,
                trigger: "poll".into(),
                tip: true,
            })
            .unwrap();
        ui.store
            .create_rollout(Rollout {
                id: RolloutId(0),
                fleet: Some((*vector).into()),
                revision,
                summary: (*vector).into(),
                trigger: "poll".into(),
                origin: Origin::Commit,
                state: RolloutState::Succeeded,
                paused_from: None,
                plan: Plan::default(),
                image: Some(ImageRef((*vector).into())),
                stage_images: Default::default(),
                previous_image: None,
                outputs: Default::default(),
                reason: Some((*vector).into()),
                created_at: now,
                started_at: Some(now),
                finished_at: Some(now),
                not_before: None,
                attempt: 0,
                rolling: None,
                verified: None,
            })
            .unwrap();
    }
    *ui.fleets.write().unwrap() = VECTORS
        .iter()
        .map(|v| {
            let status = FleetStatus {
                name: (*v).into(),
                provider: "local".into(),
                endpoint: Some((*v).into()),
                ..FleetStatus::default()
            };
            ((*v).to_owned(), status)
        })
        .collect();
    let (cookie, _) = ui.session().await;
    let response = ui.http.get(ui.url("/")).header("cookie", &cookie).send().await.unwrap();
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let page = response.text().await.unwrap();
    let live = ui.http.get(ui.url("/ui/live")).header("cookie", &cookie).send().await.unwrap();
    let live = live.text().await.unwrap();
    for html in [&page, &live] {
        for vector in VECTORS {
            assert!(!html.contains(vector), "{vector} reached the page raw");
        }
        assert!(
            !html.contains("<img")
                && !html.contains("<svg")
                && !html.contains("<a href=javascript")
        );
        assert!(html.contains("&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt;"));
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt; &lt;x@example.com&gt;"),
            "author"
        );
        assert_eq!(html.matches("<script").count(), usize::from(html.contains("<!doctype")));
        assert!(html.contains("data-verb=\"deploy\""), "logged in: verbs offered");
    }
    // The assets are kiln's own, with their types.
    for (path, kind) in [("/ui/kiln.js", "text/javascript"), ("/ui/kiln.css", "text/css")] {
        let asset = ui.http.get(ui.url(path)).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK);
        assert!(asset.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }
}
