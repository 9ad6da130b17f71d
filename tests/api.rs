//! The JSON API over a real socket: rollouts created in a real store, verbs answered by the
//! test on the operator's command channel, SSE read with reqwest. The listener's timeouts and
//! connection cap are driven with raw sockets (a few, with small limits), and the real `kiln`
//! binary is checked for the process hardening of `kiln run`.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln::model::{ImageRef, InstanceId, Revision, RolloutId};
use kiln::operator::{
    Command, CommandError, CommandRequest, FleetStatus, InstanceStatus, OperatorHandle,
};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::server::api::{FleetDto, FleetInstances, RolloutDto, RolloutPage};
use kiln::server::{AppState, Secret, ServerConfig, ServerLimits, WebhookSecrets};
use kiln::source::{SourceConfig, SourceHandle};
use kiln::store::{EventKind, InstanceAction, InstanceEvent, Level, Store};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "api-token-f00d";

struct Api {
    _dir: tempfile::TempDir,
    base: String,
    store: Store,
    fleets: kiln::operator::FleetView,
    commands: mpsc::Receiver<CommandRequest>,
    hints: mpsc::Receiver<String>,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Api {
    start_with(ServerLimits::default()).await
}

async fn start_with(limits: ServerLimits) -> Api {
    let dir = tempfile::tempdir().expect("temp dir");
    let (source, hints) = SourceHandle::detached(SourceConfig {
        url: "https://git.example.com/team/infra.git".into(),
        branch: "main".into(),
        mirror: dir.path().join("mirror.git"),
        poll: Duration::from_secs(60),
    });
    let store = Store::open(dir.path(), 0).expect("store");
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
        limits,
    };
    let state = AppState { operator, config: Arc::new(config) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    tokio::spawn(kiln::server::serve(listener, state, shutdown.clone()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
    Api { _dir: dir, base, store, fleets, commands, hints, http, shutdown }
}

fn rollout(fleet: &str, commit: &str, state: RolloutState) -> Rollout {
    let now = kiln::model::now();
    Rollout {
        id: RolloutId(0),
        fleet: Some(fleet.into()),
        revision: Revision(format!("{commit:0<40}")),
        summary: format!("commit {commit}"),
        trigger: "webhook:gitlab".into(),
        origin: Origin::Commit,
        state,
        paused_from: None,
        plan: Plan {
            bake: vec!["app".into()],
            reconcile: true,
            roll: true,
            reason: "image/ changed".into(),
        },
        image: Some(ImageRef(format!("img-{commit}"))),
        stage_images: Default::default(),
        previous_image: None,
        outputs: Default::default(),
        reason: None,
        created_at: now,
        started_at: Some(now),
        finished_at: state.is_terminal().then_some(now),
        not_before: None,
        attempt: 0,
        rolling: None,
        verified: None,
    }
}

/// Five rollouts, oldest first: web a1 succeeded, api b2 failed, web c3 succeeded,
/// api d4 succeeded, web e5 rolling.
fn fill(store: &Store) -> Vec<RolloutId> {
    [
        ("web", "a1", RolloutState::Succeeded),
        ("api", "b2", RolloutState::Failed),
        ("web", "c3", RolloutState::Succeeded),
        ("api", "d4", RolloutState::Succeeded),
        ("web", "e5", RolloutState::Rolling),
    ]
    .into_iter()
    .map(|(fleet, commit, state)| {
        store.create_rollout(rollout(fleet, commit, state)).expect("create").id
    })
    .collect()
}

impl Api {
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let response = self.http.get(format!("{}{path}", self.base)).send().await.expect("GET");
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.json().await.expect("JSON")
    }
}

#[tokio::test]
async fn rollouts_list_pages_and_filters_newest_first() {
    let api = start().await;
    let ids = fill(&api.store);

    let page: RolloutPage = api.get("/api/v1/rollouts?limit=2").await;
    let got: Vec<u64> = page.rollouts.iter().map(|r| r.id).collect();
    assert_eq!(got, vec![ids[4].0, ids[3].0]);
    assert_eq!(page.next_before, Some(ids[3].0));
    let page: RolloutPage = api.get(&format!("/api/v1/rollouts?limit=2&before={}", ids[3].0)).await;
    assert_eq!(page.rollouts.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[2].0, ids[1].0]);

    let web: RolloutPage = api.get("/api/v1/rollouts?fleet=web").await;
    assert_eq!(web.rollouts.len(), 3);
    assert!(web.rollouts.iter().all(|r| r.fleet.as_deref() == Some("web")));
    assert_eq!(web.next_before, None);

    let failed: RolloutPage = api.get("/api/v1/rollouts?state=failed").await;
    assert_eq!(failed.rollouts.len(), 1);
    assert_eq!(failed.rollouts[0].commit, format!("{:0<40}", "b2"));
    let by_commit: RolloutPage = api.get("/api/v1/rollouts?commit=c3").await;
    assert_eq!(by_commit.rollouts.len(), 1);
    assert_eq!(by_commit.rollouts[0].state, RolloutState::Succeeded);

    let response =
        api.http.get(format!("{}/api/v1/rollouts?state=nope", api.base)).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].as_str().unwrap_or("").contains("nope"), "{error}");
}

#[tokio::test]
async fn one_rollout_carries_its_events_and_unknown_ids_are_404() {
    let api = start().await;
    let ids = fill(&api.store);
    api.store.append_event(ids[2], Level::Info, EventKind::State, "baking", None).unwrap();
    api.store
        .append_event(ids[2], Level::Warn, EventKind::HookStderr, "deprecated flag", None)
        .unwrap();

    let dto: RolloutDto = api.get(&format!("/api/v1/rollouts/{}", ids[2].0)).await;
    assert_eq!(dto.id, ids[2].0);
    assert_eq!(dto.image.as_deref(), Some("img-c3"));
    assert!(dto.started_at.is_some() && dto.finished_at.is_some());
    let events = dto.events.expect("events in the one-rollout view");
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["state", "hook.stderr"]
    );
    assert_eq!(events[1].level, "warn");

    let response =
        api.http.get(format!("{}/api/v1/rollouts/999999", api.base)).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].is_string());
}

/// Reads SSE frames until `want` matches one (event name, data), with a deadline.
async fn next_frame(
    response: &mut reqwest::Response,
    buffer: &mut String,
    what: &str,
) -> (String, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            return (name, data);
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for SSE {what}"))
            .expect("stream")
            .unwrap_or_else(|| panic!("stream ended while waiting for {what}"));
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn sse_follow_sends_history_then_live_events_then_end() {
    let api = start().await;
    let ids = fill(&api.store);
    let id = ids[4]; // rolling
    api.store.append_event(id, Level::Info, EventKind::State, "rolling", None).unwrap();

    let mut response = api
        .http
        .get(format!("{}/api/v1/rollouts/{}/events", api.base, id.0))
        .send()
        .await
        .expect("GET events");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut buffer = String::new();
    let (name, data) = next_frame(&mut response, &mut buffer, "the stored event").await;
    assert_eq!(name, "event");
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["message"], "rolling");

    // Another rollout's event is not ours; ours arrives live.
    api.store.append_event(ids[0], Level::Info, EventKind::State, "other rollout", None).unwrap();
    api.store
        .append_event(
            id,
            Level::Info,
            EventKind::Instance(InstanceAction::Launched),
            "web-7 launched",
            None,
        )
        .unwrap();
    let (_, data) = next_frame(&mut response, &mut buffer, "the live event").await;
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["message"], "web-7 launched");

    let mut done = api.store.rollout(id).unwrap();
    done.state = RolloutState::Succeeded;
    done.finished_at = Some(kiln::model::now());
    api.store.put_rollout(&done).unwrap();
    api.store.append_event(id, Level::Info, EventKind::State, "succeeded", None).unwrap();
    let (_, data) = next_frame(&mut response, &mut buffer, "the final event").await;
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["message"], "succeeded");
    let (name, data) = next_frame(&mut response, &mut buffer, "the end of the stream").await;
    assert_eq!(name, "end");
    assert_eq!(serde_json::from_str::<RolloutDto>(&data).unwrap().state, RolloutState::Succeeded);
}

/// Answers the next verb on the command channel with `answer`, returning the verb.
async fn answer_next(
    commands: &mut mpsc::Receiver<CommandRequest>,
    answer: Result<RolloutId, CommandError>,
) -> Command {
    let request = tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("timed out waiting for a verb on the command channel")
        .expect("command channel open");
    let _ = request.reply.send(answer);
    request.command
}

#[tokio::test]
async fn verbs_need_the_token_and_reach_the_operator() {
    let mut api = start().await;
    let url = format!("{}/api/v1/fleets/web/pause", api.base);

    let response = api.http.post(&url).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    let response = api.http.post(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(api.commands.try_recv().is_err(), "no verb without the token");

    let call = api.http.post(&url).bearer_auth(TOKEN).send();
    let (response, command) = tokio::join!(call, answer_next(&mut api.commands, Ok(RolloutId(7))));
    assert_eq!(command, Command::Pause { fleet: "web".into() });
    let response = response.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    assert_eq!(response.json::<Value>().await.unwrap()["rollout"], 7);

    let call = api
        .http
        .post(format!("{}/api/v1/fleets/web/rollback", api.base))
        .bearer_auth(TOKEN)
        .json(&json!({"to": "c3"}))
        .send();
    let refused = Err(CommandError { status: 409, message: "no image for commit c3".into() });
    let (response, command) = tokio::join!(call, answer_next(&mut api.commands, refused));
    assert_eq!(command, Command::Rollback { fleet: "web".into(), to: Some("c3".into()) });
    let response = response.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CONFLICT);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "no image for commit c3");

    let response = api
        .http
        .post(format!("{}/api/v1/trigger", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    assert_eq!(api.hints.try_recv().ok().as_deref(), Some("api"));
}

#[tokio::test]
async fn fleets_instances_metrics_health_and_dashboard() {
    let api = start().await;
    let ids = fill(&api.store);
    let instance = InstanceStatus {
        id: InstanceId("web-1".into()),
        image: ImageRef("img-c3".into()),
        address: Some("127.0.0.1:4001".into()),
        running: true,
        attached: true,
        healthy: Some(true),
    };
    let web = FleetStatus {
        name: "web".into(),
        provider: "local".into(),
        capacity: 1,
        instances: vec![instance],
        active_rollout: Some(ids[4]),
        active_state: Some(RolloutState::Rolling),
        ..FleetStatus::default()
    };
    *api.fleets.write().unwrap() = [("web".to_owned(), web)].into_iter().collect();
    api.store
        .record_instance(InstanceEvent {
            seq: 0,
            fleet: "web".into(),
            instance: InstanceId("web-1".into()),
            image: Some(ImageRef("img-c3".into())),
            rollout: Some(ids[2]),
            action: InstanceAction::Launched,
            at: kiln::model::now(),
            reason: None,
        })
        .unwrap();

    let fleets: Vec<FleetDto> = api.get("/api/v1/fleets").await;
    assert_eq!(fleets.len(), 1);
    assert_eq!(fleets[0].instances[0].id, "web-1");
    let instances: FleetInstances = api.get("/api/v1/fleets/web/instances").await;
    assert_eq!(instances.journal.len(), 1);
    assert_eq!(instances.journal[0].action, "launched");
    let missing =
        api.http.get(format!("{}/api/v1/fleets/nope/instances", api.base)).send().await.unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);

    let metrics = api.http.get(format!("{}/metrics", api.base)).send().await.unwrap();
    assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    assert!(text.contains("kiln_rollouts{state=\"succeeded\"} 3"), "{text}");
    assert!(text.contains("kiln_rollouts{state=\"failed\"} 1"), "{text}");
    assert!(text.contains("kiln_rollouts{state=\"aborted\"} 0"), "{text}");

    let health = api.http.get(format!("{}/healthz", api.base)).send().await.unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let page = api.http.get(format!("{}/", api.base)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("<h2>Fleets</h2>") && page.contains("web") && page.contains("img-c3"));
    assert!(page.contains(&format!("#{}", ids[4].0)));
}

/// A raw connection to the test server, for what reqwest cannot do (trickle, stall, idle).
async fn connect(api: &Api) -> tokio::net::TcpStream {
    let addr = api.base.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

/// Reads a response head; `None` when the server closed the connection first (or `secs`
/// passed). Returns the status and the head's text.
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
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            return Some((status, head));
        }
    }
}

/// Whether the server closes `stream` within `secs` (EOF or reset on read, after reading
/// whatever it answered first).
async fn closed_within(stream: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn small_limits() -> ServerLimits {
    ServerLimits {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        max_connections: 4,
        max_body_in_flight: 1 << 20,
    }
}

#[tokio::test]
async fn slow_headers_are_disconnected() {
    use tokio::io::AsyncWriteExt as _;
    let api = start_with(small_limits()).await;
    let mut stream = connect(&api).await;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n").await.expect("write");
    // Trickle one header line every 100 ms for up to 15 s (30 times the header timeout): a
    // server without a header timeout keeps reading forever.
    let mut cut = false;
    for i in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await.is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut stream, 0).await {
            cut = true;
            break;
        }
    }
    assert!(cut || closed_within(&mut stream, 1).await, "a slowloris client was kept");
    // The server is fine for everyone else.
    let health = api.http.get(format!("{}/healthz", api.base)).send().await.expect("healthz");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let api = start_with(small_limits()).await;
    let mut stream = connect(&api).await;
    assert!(closed_within(&mut stream, 15).await, "an idle connection was kept open");
    // Also after a request: an idle kept-alive connection is closed.
    use tokio::io::AsyncWriteExt as _;
    let mut stream = connect(&api).await;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n").await.expect("write");
    assert_eq!(read_head(&mut stream, 10).await.map(|(s, _)| s), Some(200));
    assert!(closed_within(&mut stream, 15).await, "an idle keep-alive connection was kept");
}

#[tokio::test]
async fn a_stalled_body_is_cut_with_408() {
    use tokio::io::AsyncWriteExt as _;
    let api = start_with(small_limits()).await;
    let mut stream = connect(&api).await;
    // An authorised verb whose body never finishes arriving.
    let head = format!(
        "POST /api/v1/fleets/web/rollback HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer \
         {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"to\":"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = read_head(&mut stream, 15).await;
    assert_eq!(answer.as_ref().map(|(s, _)| *s), Some(408), "{answer:?}");
    assert!(closed_within(&mut stream, 15).await, "the stalled connection was kept");
}

#[tokio::test]
async fn verbs_refuse_a_missing_token_before_reading_the_body() {
    use tokio::io::AsyncWriteExt as _;
    let api = start().await;
    let mut stream = connect(&api).await;
    // Declares 512 MiB and sends none of it: the answer must not wait for the body.
    let head = "POST /api/v1/fleets/web/pause HTTP/1.1\r\nHost: kiln\r\nContent-Length: \
                536870912\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = read_head(&mut stream, 15).await;
    assert_eq!(answer.as_ref().map(|(s, _)| *s), Some(401), "{answer:?}");
    // With the token, an oversized body is refused by its declared length, unread.
    let mut stream = connect(&api).await;
    let head = format!(
        "POST /api/v1/fleets/web/rollback HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer \
         {TOKEN}\r\nContent-Length: 536870912\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = read_head(&mut stream, 15).await;
    assert_eq!(answer.as_ref().map(|(s, _)| *s), Some(413), "{answer:?}");
}

#[tokio::test]
async fn a_full_connection_table_sheds_the_oldest_idle_connection_for_healthz() {
    let limits = ServerLimits { header_timeout: Duration::from_secs(60), ..small_limits() };
    let api = start_with(limits.clone()).await;
    let mut idle = Vec::new();
    for _ in 0..limits.max_connections {
        idle.push(connect(&api).await);
        // Accepted in order, so the first is the oldest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new client gets through: the cap closes the connection idle longest.
    let health = api.http.get(format!("{}/healthz", api.base)).send().await.expect("healthz");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    assert!(closed_within(&mut idle[0], 10).await, "the oldest idle connection was not shed");
    assert!(!closed_within(&mut idle[limits.max_connections - 1], 0).await);
}

/// `kiln run` as the real binary, under an open-file limit of `nofile_soft:nofile_hard`
/// (through `prlimit`), as the user `nobody` when the test runs as root so that "another
/// process of the same user" is not root (root reads every `/proc/<pid>/environ`).
struct RealDaemon {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    api: String,
    uid: Option<u32>,
}

impl Drop for RealDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRET_MARKER: &str = "gh-secret-in-the-environment-5e1f";

// A synchronous helper of synchronous tests: no tokio worker to block.
#[allow(clippy::disallowed_methods)]
fn real_daemon(nofile: &str) -> Option<RealDaemon> {
    use std::os::unix::process::CommandExt as _;
    if std::process::Command::new("prlimit").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "prlimit (util-linux) is needed in CI");
        eprintln!("SKIP: prlimit is not installed");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // `/proc/self` belongs to the process's effective user.
    let root =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc")) == 0;
    let uid = root.then_some(65534u32);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    // Something that looks like a repository (`kiln run` refuses a path with none at start);
    // its fetches fail, which this test does not mind.
    let repo = dir.path().join("infra.git");
    std::fs::create_dir(&repo).expect("repo dir");
    std::fs::write(repo.join("HEAD"), "ref: refs/heads/main\n").expect("HEAD");
    if let Some(uid) = uid {
        for path in [dir.path(), data.as_path(), repo.as_path()] {
            std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
        }
    }
    // The build dir may not be reachable for `nobody`: run a link (or copy) of the binary.
    let exe = match uid {
        Some(_) => {
            let exe = dir.path().join("kiln");
            if std::fs::hard_link(support::daemon::kiln_exe(), &exe).is_err() {
                std::fs::copy(support::daemon::kiln_exe(), &exe).expect("copy kiln");
            }
            exe
        }
        None => PathBuf::from(support::daemon::kiln_exe()),
    };
    let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
    let mut command = std::process::Command::new("prlimit");
    command
        .arg(format!("--nofile={nofile}"))
        .arg(&exe)
        .args(["run", "--listen", "127.0.0.1:0", "--repo"])
        .arg(&repo)
        .arg("--data-dir")
        .arg(&data)
        .env("KILN_GITHUB_SECRET", SECRET_MARKER)
        .env_remove("KILN_API")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command.spawn().expect("start kiln run");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        if let Ok(text) = std::fs::read_to_string(data.join("daemon.json")) {
            if let Ok(info) = serde_json::from_str::<Value>(&text) {
                break info;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
            panic!("kiln run exited with {status}:\n{log}");
        }
        assert!(std::time::Instant::now() < deadline, "kiln run did not start in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let api = info["api"].as_str().expect("api").to_owned();
    Some(RealDaemon { _dir: dir, child, api, uid })
}

#[test]
fn kiln_run_hides_its_environment_and_raises_its_open_file_limit() {
    use std::os::unix::process::CommandExt as _;
    let Some(daemon) = real_daemon("256:4096") else { return };
    let pid = daemon.child.id();
    // `prlimit` execs kiln, so the child's pid is the daemon's.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("nofile line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "soft limit not raised to the hard one: {line}");

    // Another process of the daemon's user (what a hook is) cannot read its environment.
    let mut reader = std::process::Command::new("cat");
    reader.arg(format!("/proc/{pid}/environ"));
    if let Some(uid) = daemon.uid {
        reader.uid(uid).gid(uid);
    }
    let out = reader.output().expect("run cat");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(SECRET_MARKER), "a same-user process read the daemon's secrets");
    assert!(!out.status.success(), "reading /proc/{pid}/environ should be refused");
}

#[test]
fn kiln_run_answers_healthz_through_a_flood_of_idle_connections() {
    // 64 descriptors: the cap (three quarters) is 48; 100 idle connections would exhaust the
    // descriptors of a daemon without one, and it would stop accepting.
    let Some(daemon) = real_daemon("64:64") else { return };
    let addr = daemon.api.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..100 {
        match std::net::TcpStream::connect(&addr) {
            Ok(stream) => idle.push(stream),
            Err(error) => panic!("connect: {error}"),
        }
    }
    let health = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    })
    .join()
    .expect("healthz thread");
    let answer = health.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "healthz did not answer: {answer:?}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_misses_nothing_while_many_writers_append() {
    // Writers publish after their flush, so two of them can publish out of seq order; a
    // stream that forwarded the published events (and skipped those at or below the last it
    // sent) would lose one. The stream reads from the store in seq order instead.
    const WRITERS: u64 = 6;
    const EACH: u64 = 60;
    let api = start().await;
    let ids = fill(&api.store);
    let mut response = api
        .http
        .get(format!("{}/api/v1/events/stream?after=0", api.base))
        .send()
        .await
        .expect("GET stream");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            let store = api.store.clone();
            let id = ids[n as usize % ids.len()];
            std::thread::spawn(move || {
                for i in 0..EACH {
                    store
                        .append_event(id, Level::Info, EventKind::Rollout, format!("{n}/{i}"), None)
                        .expect("append");
                }
            })
        })
        .collect();
    let mut buffer = String::new();
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < WRITERS * EACH {
        let (name, data) = next_frame(&mut response, &mut buffer, "the next event").await;
        assert_eq!(name, "event");
        let event: Value = serde_json::from_str(&data).expect("JSON");
        seqs.push(event["seq"].as_u64().expect("seq"));
    }
    for writer in writers {
        writer.join().expect("writer");
    }
    assert_eq!(seqs, (1..=WRITERS * EACH).collect::<Vec<_>>(), "every event once, in order");
    let page: Value = api.get("/api/v1/events?after=100&limit=5").await;
    let seqs: Vec<u64> =
        page["events"].as_array().unwrap().iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, [101, 102, 103, 104, 105]);
    assert_eq!(page["next_after"], 105);
    assert_eq!(page["latest"], WRITERS * EACH);
}
