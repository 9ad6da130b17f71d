//! The JSON API over a real socket: rollouts created in a real store, verbs answered by the
//! test on the operator's command channel, SSE read with reqwest.

use std::sync::Arc;
use std::time::Duration;

use kiln::model::{ImageRef, InstanceId, Revision, RolloutId};
use kiln::operator::{
    Command, CommandError, CommandRequest, FleetStatus, InstanceStatus, OperatorHandle,
};
use kiln::rollout::state::{Origin, Plan, Rollout, RolloutState};
use kiln::server::api::{FleetDto, FleetInstances, RolloutDto, RolloutPage};
use kiln::server::{AppState, Secret, ServerConfig, WebhookSecrets};
use kiln::source::{SourceConfig, SourceHandle};
use kiln::store::{InstanceAction, InstanceEvent, Level, Store};
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
    api.store.append_event(ids[2], Level::Info, "state", "baking", None).unwrap();
    api.store.append_event(ids[2], Level::Warn, "hook.stderr", "deprecated flag", None).unwrap();

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
    api.store.append_event(id, Level::Info, "state", "rolling", None).unwrap();

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
    api.store.append_event(ids[0], Level::Info, "state", "other rollout", None).unwrap();
    api.store.append_event(id, Level::Info, "instance.launched", "web-7 launched", None).unwrap();
    let (_, data) = next_frame(&mut response, &mut buffer, "the live event").await;
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["message"], "web-7 launched");

    let mut done = api.store.rollout(id).unwrap();
    done.state = RolloutState::Succeeded;
    done.finished_at = Some(kiln::model::now());
    api.store.put_rollout(&done).unwrap();
    api.store.append_event(id, Level::Info, "state", "succeeded", None).unwrap();
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
    *api.fleets.write().unwrap() = vec![FleetStatus {
        name: "web".into(),
        provider: "local".into(),
        capacity: 1,
        instances: vec![instance],
        active_rollout: Some(ids[4]),
        active_state: Some(RolloutState::Rolling),
        ..FleetStatus::default()
    }];
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
