//! The dashboard at `/`: fleets with their instances and load balancer, recent rollouts, the
//! live timeline, and the operator's verbs (docs/dashboard.md).
//!
//! The page is rendered here, every value through [`escape`]. The script and stylesheet
//! (`dashboard/kiln.js`, `dashboard/kiln.css`) are embedded in the binary and served by kiln:
//! no framework, no CDN. The script follows `GET /api/v1/events/stream` (SSE) into the
//! timeline, re-reads the server-rendered fleet view (`GET /ui/live`) when something happens,
//! and sends verbs to `POST /api/v1/fleets/{fleet}/{verb}` after a confirmation, with the
//! session's CSRF token. Without a login the page is read-only (`auth.rs`). A Content Security
//! Policy allows only kiln's own script and style, so markup that slipped through could not run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::api::{CommitDto, EventDto, FleetDto, RolloutDto};
use super::{Shared, auth};
use crate::rollout::state::RolloutState;
use crate::store::RolloutFilter;

/// How many rollouts the page lists.
const RECENT: usize = 25;
/// How many commits the deploy menu offers.
const DEPLOY_CHOICES: usize = 20;
/// How many earlier rollouts the rollback menu offers per fleet.
const ROLLBACK_CHOICES: usize = 10;
/// How many successful rollouts (newest first) the rollback menus are chosen from.
const ROLLBACK_SCAN: usize = 5000;
/// How many events the timeline starts with.
const TIMELINE: u64 = 40;

const SCRIPT: &str = include_str!("dashboard/kiln.js");
const STYLE: &str = include_str!("dashboard/kiln.css");

/// Only kiln's own script, style and endpoints; no framing (the verbs are buttons).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(value: Option<&str>) -> String {
    value.map_or_else(|| "–".to_owned(), escape)
}

/// An image shown in a table cell: a directory image by its last path component (the whole
/// id is the cell's tooltip), anything else (an AMI id) as it is.
fn image_cell(image: Option<&str>) -> String {
    match image {
        Some(image) => {
            let tail = image.trim_end_matches('/').rsplit('/').next().unwrap_or(image);
            let tail = if tail.is_empty() { image } else { tail };
            format!("<code title=\"{}\">{}</code>", escape(image), escape(tail))
        }
        None => "–".to_owned(),
    }
}

fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}

/// The instances cell of a fleet: healthy ones out of all running ones, the unhealthy ones
/// named as such, and the capacity. A canary failing its checks beside three healthy old
/// instances reads `3/4 healthy, 1 unhealthy (capacity 3)`, never `3/3 healthy`.
fn instances_cell(fleet: &FleetDto) -> String {
    let count =
        |f: fn(&super::api::InstanceDto) -> bool| fleet.instances.iter().filter(|i| f(i)).count();
    let healthy = count(|i| i.healthy == Some(true));
    let unhealthy = count(|i| i.healthy == Some(false));
    let mut cell = format!("{healthy}/{} healthy", fleet.instances.len());
    if unhealthy > 0 {
        let _ = write!(cell, ", <span class=\"failed\">{unhealthy} unhealthy</span>");
    }
    let _ = write!(cell, " (capacity {})", fleet.capacity);
    cell
}

/// One fleet as the page shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct FleetView {
    pub(crate) fleet: FleetDto,
    /// The active rollout is paused at a manual canary gate (resume promotes).
    pub(crate) canary_waiting: bool,
    /// Earlier successful rollouts to roll back to, newest first, one per commit.
    pub(crate) rollback_targets: Vec<RolloutDto>,
}

/// What the fleet view shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    pub(crate) fleets: Vec<FleetView>,
    pub(crate) rollouts: Vec<RolloutDto>,
    /// Commits a deploy may choose, newest first.
    pub(crate) commits: Vec<CommitDto>,
    pub(crate) store_error: Option<String>,
}

fn gather(shared: &Shared) -> View {
    let store = &shared.app.operator.store;
    let mut errors = Vec::new();
    let mut note = |error: crate::store::StoreError| errors.push(crate::error::chain(&error));
    let filter = RolloutFilter { limit: Some(RECENT), ..RolloutFilter::default() };
    let rollouts = store
        .rollouts(&filter)
        .map(|found| found.iter().map(RolloutDto::from_rollout).collect())
        .unwrap_or_else(|e| {
            note(e);
            Vec::new()
        });
    let commits = store
        .commits(DEPLOY_CHOICES)
        .map(|found| {
            found
                .iter()
                .filter(|c| c.kind != crate::store::CommitKind::BranchDeleted)
                .map(CommitDto::from)
                .collect()
        })
        .unwrap_or_else(|e| {
            note(e);
            Vec::new()
        });
    // Rollback choices for every fleet from one pass over the newest successful rollouts (not
    // one scan per fleet): up to ROLLBACK_CHOICES + 1 distinct commits each, the current one
    // dropped below.
    let mut earlier: BTreeMap<String, Vec<RolloutDto>> = BTreeMap::new();
    let succeeded = RolloutFilter {
        state: Some(RolloutState::Succeeded),
        limit: Some(ROLLBACK_SCAN),
        ..RolloutFilter::default()
    };
    match store.rollouts(&succeeded) {
        Ok(found) => {
            for rollout in &found {
                let Some(fleet) = rollout.fleet.as_ref() else { continue };
                let list = earlier.entry(fleet.clone()).or_default();
                if list.len() <= ROLLBACK_CHOICES
                    && !list.iter().any(|t| t.commit == rollout.revision.0)
                {
                    list.push(RolloutDto::from_rollout(rollout));
                }
            }
        }
        Err(error) => note(error),
    }
    let mut fleets = Vec::new();
    for status in shared.app.operator.fleet_status() {
        let fleet = FleetDto::from(&status);
        let canary_waiting = match (status.active_rollout, status.active_state) {
            (Some(id), Some(RolloutState::Paused)) => store
                .rollout(id)
                .ok()
                .and_then(|r| r.rolling)
                .is_some_and(|rolling| rolling.canary_hold && !rolling.canary_done),
            _ => false,
        };
        let mut rollback_targets = earlier.remove(&fleet.name).unwrap_or_default();
        rollback_targets.retain(|t| fleet.revision.as_deref() != Some(t.commit.as_str()));
        rollback_targets.truncate(ROLLBACK_CHOICES);
        fleets.push(FleetView { fleet, canary_waiting, rollback_targets });
    }
    View { fleets, rollouts, commits, store_error: (!errors.is_empty()).then(|| errors.join("; ")) }
}

/// A verb button: `data-verb` is what is posted, `data-confirm` what the dialog asks.
fn button(html: &mut String, fleet: &str, verb: &str, label: &str, class: &str, question: &str) {
    let _ = write!(
        html,
        "<button type=\"button\" class=\"{class}\" data-fleet=\"{}\" data-verb=\"{verb}\" data-confirm=\"{}\">{label}</button>",
        escape(fleet),
        escape(question),
    );
}

fn actions(html: &mut String, index: usize, view: &FleetView, commits: &[CommitDto]) {
    let fleet = &view.fleet;
    let name = fleet.name.as_str();
    let state = fleet.active_state;
    let active = fleet.active_rollout.is_some() && state.is_some_and(|s| !s.is_terminal());
    let paused = state == Some(RolloutState::Paused);
    html.push_str("<div class=\"actions\">");
    if view.canary_waiting {
        button(
            html,
            name,
            "resume",
            "Promote canary",
            "promote primary",
            &format!(
                "Promote the canary of {name}: replace the remaining instances with the new image?"
            ),
        );
    } else if paused {
        button(
            html,
            name,
            "resume",
            "Resume",
            "resume primary",
            &format!("Resume the paused rollout of {name}?"),
        );
    }
    if active && !paused {
        button(
            html,
            name,
            "pause",
            "Pause",
            "pause",
            &format!("Pause the rollout of {name} at its next safe point?"),
        );
    }
    if active {
        button(
            html,
            name,
            "abort",
            "Abort",
            "abort danger",
            &format!("Abort the rollout of {name} and return every instance to the stable image?"),
        );
    }
    html.push_str("</div><div class=\"choose\">");
    let _ = write!(
        html,
        "<label>Deploy <select id=\"deploy-{index}\" aria-label=\"commit to deploy to {n}\">",
        n = escape(name)
    );
    if commits.is_empty() {
        html.push_str("<option value=\"\">no commits seen yet</option>");
    }
    for commit in commits {
        let _ = write!(
            html,
            "<option value=\"{}\">{} {} — {}</option>",
            escape(&commit.revision),
            escape(short(&commit.revision)),
            escape(&commit.summary),
            escape(&commit.author),
        );
    }
    html.push_str("</select></label>");
    let _ = write!(
        html,
        "<button type=\"button\" class=\"deploy\" data-fleet=\"{}\" data-verb=\"deploy\" data-select=\"deploy-{index}\" data-confirm=\"{}\">Deploy</button>",
        escape(name),
        escape(&format!("Deploy to {name} the commit")),
    );
    let _ = write!(
        html,
        "<label>Roll back to <select id=\"rollback-{index}\" aria-label=\"earlier rollout of {n}\">",
        n = escape(name)
    );
    if view.rollback_targets.is_empty() {
        html.push_str("<option value=\"\">no earlier successful rollout</option>");
    }
    for target in &view.rollback_targets {
        let _ = write!(
            html,
            "<option value=\"{}\">#{} {} {} ({})</option>",
            escape(&target.commit),
            target.id,
            escape(short(&target.commit)),
            escape(&target.summary),
            target.created_at.format("%Y-%m-%d %H:%M"),
        );
    }
    html.push_str("</select></label>");
    let _ = write!(
        html,
        "<button type=\"button\" class=\"rollback\" data-fleet=\"{}\" data-verb=\"rollback\" data-select=\"rollback-{index}\" data-confirm=\"{}\">Roll back</button>",
        escape(name),
        escape(&format!("Roll {name} back (fast path, no canary gate) to the image of rollout")),
    );
    html.push_str("</div>");
}

/// The fleets and recent rollouts (`GET /ui/live`, and the middle of `/`). With `operate`,
/// each fleet gets its verbs.
pub(crate) fn render_live(view: &View, operate: bool) -> String {
    let mut html = String::new();
    html.push_str("<section id=\"fleets\"><h2>Fleets</h2>");
    if view.fleets.is_empty() {
        html.push_str("<p class=\"empty\">no fleets yet</p>");
    }
    for (index, item) in view.fleets.iter().enumerate() {
        let fleet = &item.fleet;
        let _ = write!(
            html,
            "<article class=\"fleet\" data-fleet=\"{}\"><h3>{}{}</h3><dl>",
            escape(&fleet.name),
            escape(&fleet.name),
            if fleet.orphaned { " <span class=\"failed\">orphaned</span>" } else { "" },
        );
        let active = match (fleet.active_rollout, fleet.active_state) {
            (Some(id), Some(state)) => {
                let gate = if item.canary_waiting {
                    " <span class=\"canary\">canary waiting for promotion</span>"
                } else {
                    ""
                };
                format!(
                    "<a href=\"/api/v1/rollouts/{id}\">#{id}</a> <span class=\"state {state}\">{state}</span>{gate}"
                )
            }
            (Some(id), None) => format!("#{id}"),
            _ => "–".to_owned(),
        };
        let attached = fleet.instances.iter().filter(|i| i.attached).count();
        let lb = match fleet.endpoint.as_deref() {
            Some(endpoint) => format!(
                "<code>{}</code>, {attached} of {} instance(s) in it",
                escape(endpoint),
                fleet.instances.len()
            ),
            None => format!("–, {attached} of {} instance(s) attached", fleet.instances.len()),
        };
        let _ = write!(
            html,
            "<dt>provider</dt><dd>{}</dd><dt>commit</dt><dd><code>{}</code></dd><dt>image</dt><dd><code>{}</code></dd>\
             <dt>instances</dt><dd>{}</dd><dt>load balancer</dt><dd>{lb}</dd><dt>rollout</dt><dd class=\"active\">{active}</dd></dl>",
            escape(&fleet.provider),
            opt(fleet.revision.as_deref().map(short)),
            opt(fleet.image.as_deref()),
            instances_cell(fleet),
        );
        html.push_str(
            "<div class=\"scroll\"><table class=\"instances\"><tr><th>instance</th><th>image</th><th>address</th><th>running</th><th>in LB</th><th>health</th></tr>",
        );
        for instance in &fleet.instances {
            let health = match instance.healthy {
                Some(true) => "<span class=\"succeeded\">healthy</span>",
                Some(false) => "<span class=\"failed\">unhealthy</span>",
                None => "–",
            };
            let _ = write!(
                html,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{health}</td></tr>",
                escape(&instance.id),
                image_cell(Some(&instance.image)),
                opt(instance.address.as_deref()),
                if instance.running { "yes" } else { "no" },
                if instance.attached { "yes" } else { "no" },
            );
        }
        if fleet.instances.is_empty() {
            html.push_str("<tr><td colspan=\"6\">no instances</td></tr>");
        }
        html.push_str("</table></div>");
        if operate {
            actions(&mut html, index, item, &view.commits);
        }
        html.push_str("</article>");
    }
    html.push_str("</section><section id=\"rollouts\"><h2>Recent rollouts</h2><div class=\"scroll\"><table><tr><th>id</th><th>state</th><th>fleet</th><th>origin</th><th>commit</th><th>image</th><th>created (UTC)</th><th>summary</th><th>reason</th></tr>");
    for rollout in &view.rollouts {
        let _ = write!(
            html,
            "<tr id=\"rollout-{id}\"><td><a href=\"/api/v1/rollouts/{id}\">#{id}</a></td><td class=\"state {state}\">{state}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            opt(rollout.fleet.as_deref()),
            escape(&rollout.origin),
            escape(short(&rollout.commit)),
            image_cell(rollout.image.as_deref()),
            rollout.created_at.format("%Y-%m-%d %H:%M:%S"),
            escape(&rollout.summary),
            opt(rollout.reason.as_deref()),
            id = rollout.id,
            state = rollout.state,
        );
    }
    if let Some(error) = &view.store_error {
        let _ = write!(
            html,
            "<tr><td colspan=\"9\">cannot read the store: {}</td></tr>",
            escape(error)
        );
    } else if view.rollouts.is_empty() {
        html.push_str("<tr><td colspan=\"9\">no rollouts yet</td></tr>");
    }
    html.push_str("</table></div></section>");
    html
}

/// One timeline entry (the script renders live ones the same way, with `textContent`).
fn timeline_item(html: &mut String, event: &EventDto) {
    let _ = write!(
        html,
        "<li class=\"level-{}\"><time>{}</time> <a href=\"/api/v1/rollouts/{id}\">#{id}</a> {}<code>{}</code> {}</li>",
        escape(&event.level),
        event.at.format("%H:%M:%S"),
        event.fleet.as_deref().map(|f| format!("<b>{}</b> ", escape(f))).unwrap_or_default(),
        escape(&event.kind),
        escape(&event.message),
        id = event.rollout,
    );
}

/// Everything the whole page needs besides the fleet view.
pub(crate) struct PageParts<'a> {
    pub(crate) url: &'a str,
    pub(crate) branch: &'a str,
    /// The session's CSRF token, when logged in.
    pub(crate) csrf: Option<&'a str>,
    /// Timeline events, oldest first.
    pub(crate) events: &'a [EventDto],
    pub(crate) login_error: Option<&'a str>,
}

pub(crate) fn render_page(view: &View, parts: &PageParts<'_>) -> String {
    let mut html = String::new();
    html.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>kiln</title><link rel=\"stylesheet\" href=\"/ui/kiln.css\">\
         <script src=\"/ui/kiln.js\" defer></script>\
         <noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>",
    );
    if let Some(csrf) = parts.csrf {
        let _ = write!(html, "<meta name=\"kiln-csrf\" content=\"{}\">", escape(csrf));
    }
    let _ = write!(
        html,
        "</head><body><header><h1>kiln</h1><p class=\"source\">Watching <code>{}</code> branch <code>{}</code>.</p><div id=\"auth\">",
        escape(&crate::error::redact(parts.url)),
        escape(parts.branch),
    );
    match parts.csrf {
        Some(csrf) => {
            let _ = write!(
                html,
                "<form id=\"logout\" method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <span class=\"who\">operating</span> <button type=\"submit\">Log out</button></form>",
                escape(csrf)
            );
        }
        None => {
            html.push_str(
                "<form id=\"login\" method=\"post\" action=\"/login\"><label>API token \
                 <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label> \
                 <button type=\"submit\">Log in</button></form>\
                 <p class=\"hint\">Read-only. Log in with the API token (<code>&lt;data-dir&gt;/token</code>) to operate.</p>",
            );
        }
    }
    if let Some(error) = parts.login_error {
        let _ = write!(html, "<p class=\"flash bad\" id=\"login-error\">{}</p>", escape(error));
    }
    html.push_str(
        "</div></header><p id=\"flash\" class=\"flash\" role=\"status\" aria-live=\"polite\"></p><main><div id=\"live\">",
    );
    html.push_str(&render_live(view, parts.csrf.is_some()));
    let after = parts.events.last().map_or(0, |e| e.seq);
    let _ = write!(
        html,
        "</div><section id=\"timeline-section\"><h2>Live timeline (UTC) <span id=\"stream-state\">connecting…</span></h2>\
         <ol id=\"timeline\" data-after=\"{after}\">"
    );
    for event in parts.events.iter().rev() {
        timeline_item(&mut html, event);
    }
    html.push_str(
        "</ol></section></main>\
         <dialog id=\"confirm\"><form method=\"dialog\"><p id=\"confirm-text\"></p>\
         <div class=\"buttons\"><button value=\"cancel\" id=\"confirm-no\">Cancel</button> \
         <button value=\"ok\" id=\"confirm-yes\" class=\"primary\">Confirm</button></div></form></dialog>\
         <footer><a href=\"/metrics\">metrics</a> · <a href=\"/api/v1/fleets\">API</a> · \
         <a href=\"/api/v1/events\">events</a></footer></body></html>",
    );
    html
}

/// An HTML answer with the page's security headers.
fn html_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure_headers(headers);
    response
}

fn secure_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn full_page(
    shared: &Shared,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let view = gather(shared);
    let store = &shared.app.operator.store;
    let latest = store.durable_seq();
    let events: Vec<EventDto> = store
        .events_after(latest.saturating_sub(TIMELINE), TIMELINE as usize)
        .map(|found| found.iter().map(EventDto::from).collect())
        .unwrap_or_default();
    let session = auth::session(shared, headers);
    let source = shared.app.operator.source.config();
    let parts = PageParts {
        url: &source.url,
        branch: &source.branch,
        csrf: session.as_ref().map(|(_, csrf)| csrf.as_str()),
        events: &events,
        login_error: error,
    };
    html_response(status, render_page(&view, &parts))
}

/// Runs `render` (store reads) on the blocking pool.
async fn blocking(render: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(render).await.unwrap_or_else(|error| {
        super::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("dashboard: {error}"))
            .into_response()
    })
}

/// `GET /`.
pub(crate) async fn page(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    blocking(move || full_page(&shared, &headers, StatusCode::OK, None)).await
}

/// `GET /ui/live`: the fleet view alone, for the script to swap in.
pub(crate) async fn live(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    blocking(move || {
        let operate = auth::session(&shared, &headers).is_some();
        html_response(StatusCode::OK, render_live(&gather(&shared), operate))
    })
    .await
}

/// `GET /ui/kiln.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/kiln.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    let mut response = text.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Largest login or logout form.
const MAX_FORM: usize = 4096;

async fn read_form(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<(String, String)>, Response> {
    let held = shared
        .bodies
        .read(headers, body, MAX_FORM, shared.app.config.limits.body_timeout)
        .await
        .map_err(|error| super::ApiError::new(error.status(), error.to_string()).into_response())?;
    Ok(form_urlencoded::parse(&held.bytes).into_owned().collect())
}

fn redirect_home(cookie: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(cookie) {
        headers.insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /login` (form `token=<API token>`): a session cookie and back to `/`; a wrong token
/// gets the page again with 401. The form is the credential, so it is read (4 KiB at most)
/// after the origin check.
pub(crate) async fn login(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(error) = auth::same_origin(&headers) {
        return error.into_response();
    }
    let form = match read_form(&shared, &headers, body).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    let token = &shared.app.config.api_token;
    if token.0.is_empty() {
        return full_page(
            &shared,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some("this kiln has no API token configured; the dashboard is read-only"),
        );
    }
    let sent = form.iter().find(|(k, _)| k == "token").map_or("", |(_, v)| v.trim());
    if !token.matches(sent.as_bytes()) {
        tracing::warn!("Dashboard login refused: wrong API token.");
        return full_page(&shared, &headers, StatusCode::UNAUTHORIZED, Some("wrong API token"));
    }
    match shared.sessions.create() {
        Ok((id, _)) => {
            tracing::info!("Dashboard login.");
            redirect_home(&auth::set_cookie(&id, &headers))
        }
        Err(error) => super::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot make a session id: {error}"),
        )
        .into_response(),
    }
}

/// `POST /logout` (form `csrf=<token>`, or the `X-Kiln-CSRF` header): ends the session and
/// clears the cookie. A live session with a wrong CSRF token gets 403 (no forced logouts).
pub(crate) async fn logout(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(error) = auth::same_origin(&headers) {
        return error.into_response();
    }
    let form = match read_form(&shared, &headers, body).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    if let Some((id, csrf)) = auth::session(&shared, &headers) {
        let sent = form
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_bytes().to_vec())
            .or_else(|| headers.get(auth::CSRF_HEADER).map(|v| v.as_bytes().to_vec()))
            .unwrap_or_default();
        if !auth::csrf_matches(&csrf, &sent) {
            return super::ApiError::new(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token; reload the dashboard",
            )
            .into_response();
        }
        shared.sessions.remove(&id);
        tracing::info!("Dashboard logout.");
    }
    redirect_home(&auth::clear_cookie(&headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::api::{InstanceDto, PlanDto};

    fn instance(id: &str, image: &str, healthy: Option<bool>) -> InstanceDto {
        InstanceDto {
            id: id.into(),
            image: image.into(),
            address: None,
            running: true,
            attached: healthy == Some(true),
            healthy,
        }
    }

    #[test]
    fn a_failing_canary_is_never_shown_as_all_healthy() {
        let mut fleet = FleetDto { name: "web".into(), capacity: 3, ..FleetDto::default() };
        fleet.instances = vec![
            instance("i-1", "v1", Some(true)),
            instance("i-2", "v1", Some(true)),
            instance("i-3", "v1", Some(true)),
            instance("i-4", "v2", Some(false)),
        ];
        let cell = instances_cell(&fleet);
        assert!(!cell.contains("3/3 healthy"), "{cell}");
        assert!(cell.starts_with("3/4 healthy") && cell.contains("1 unhealthy"), "{cell}");
        assert!(cell.ends_with("(capacity 3)"), "{cell}");
        fleet.instances.truncate(3);
        assert_eq!(instances_cell(&fleet), "3/3 healthy (capacity 3)");
    }

    /// Markup an attacker would like to run, as text, in attributes, and breaking out of both.
    const VECTORS: [&str; 8] = [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(2)>",
        "\"><svg onload=alert(3)>",
        "'><iframe src=javascript:alert(4)>",
        "</textarea><script>alert(5)</script>",
        "javascript:alert(6)//",
        "<a href=\"x\" onclick=\"alert(7)\">x</a>",
        "</option></select><button data-verb=\"abort\">x</button>",
    ];

    fn rollout(id: u64, fleet: &str, summary: &str) -> RolloutDto {
        RolloutDto {
            id,
            fleet: Some(fleet.into()),
            commit: format!("{summary}{:040}", 0),
            summary: summary.into(),
            trigger: summary.into(),
            origin: "commit".into(),
            state: RolloutState::Succeeded,
            reason: Some(summary.into()),
            image: Some(summary.into()),
            previous_image: None,
            stage_images: Default::default(),
            plan: PlanDto::default(),
            outputs: Default::default(),
            progress: None,
            created_at: crate::model::now(),
            started_at: None,
            finished_at: None,
            events: None,
            verified: None,
        }
    }

    fn hostile_view(vector: &str) -> View {
        let mut fleet = FleetDto {
            name: vector.into(),
            provider: vector.into(),
            revision: Some(vector.into()),
            image: Some(vector.into()),
            endpoint: Some(vector.into()),
            active_rollout: Some(3),
            active_state: Some(RolloutState::Paused),
            ..FleetDto::default()
        };
        fleet.instances = vec![InstanceDto {
            id: vector.into(),
            image: vector.into(),
            address: Some(vector.into()),
            running: true,
            attached: true,
            healthy: Some(true),
        }];
        let commit = CommitDto {
            revision: vector.into(),
            parents: vec![],
            summary: vector.into(),
            author: format!("{vector} <{vector}@example.com>"),
            committed_at: crate::model::now(),
            seen_at: crate::model::now(),
            kind: "push".into(),
            overwrote: None,
            trigger: vector.into(),
            tip: true,
            outcome: None,
        };
        View {
            fleets: vec![FleetView {
                fleet,
                canary_waiting: true,
                rollback_targets: vec![rollout(1, vector, vector)],
            }],
            rollouts: vec![rollout(2, vector, vector)],
            commits: vec![commit],
            store_error: Some(vector.into()),
        }
    }

    /// No vector reaches the page as markup: every `<` of theirs is `&lt;`, every quote is
    /// an entity, so no tag or attribute of theirs exists.
    #[test]
    fn every_xss_vector_in_fleet_names_commit_subjects_and_authors_is_escaped() {
        for vector in VECTORS {
            let view = hostile_view(vector);
            let event = EventDto {
                seq: 9,
                rollout: 3,
                fleet: Some(vector.into()),
                commit: Some(vector.into()),
                at: crate::model::now(),
                level: vector.into(),
                kind: vector.into(),
                change: None,
                message: vector.into(),
                data: None,
            };
            let parts = PageParts {
                url: vector,
                branch: vector,
                csrf: Some(vector),
                events: std::slice::from_ref(&event),
                login_error: Some(vector),
            };
            for html in [render_page(&view, &parts), render_live(&view, true)] {
                let escaped = escape(vector);
                assert!(html.contains(&escaped), "{vector} not shown escaped");
                if escaped != vector {
                    assert!(!html.contains(vector), "{vector} reached the page raw:\n{html}");
                }
                assert!(!html.contains("href=\"javascript"), "{vector}");
                for bad in ["<script>alert", "<img", "<svg", "<iframe", "onclick=\""] {
                    assert!(!html.contains(bad), "{bad} in the page for {vector}");
                }
                // Only kiln's own buttons (3 verbs + deploy + rollback per fleet).
                assert_eq!(html.matches("<button type=\"button\"").count(), 4, "{vector}");
                assert_eq!(
                    html.matches("<script").count(),
                    usize::from(html.contains("<!doctype"))
                );
            }
        }
    }

    #[test]
    fn verbs_are_offered_only_to_a_logged_in_operator_and_fit_the_state() {
        let mut view = hostile_view("web");
        let read_only = render_live(&view, false);
        assert!(!read_only.contains("data-verb"), "{read_only}");
        let html = render_live(&view, true);
        assert!(html.contains("Promote canary") && html.contains("data-verb=\"abort\""));
        assert!(!html.contains("data-verb=\"pause\""), "a paused rollout cannot be paused");
        view.fleets[0].canary_waiting = false;
        let html = render_live(&view, true);
        assert!(html.contains(">Resume<") && !html.contains("Promote canary"));
        view.fleets[0].fleet.active_state = Some(RolloutState::Rolling);
        let html = render_live(&view, true);
        assert!(html.contains("data-verb=\"pause\"") && !html.contains(">Resume<"));
        view.fleets[0].fleet.active_rollout = None;
        view.fleets[0].fleet.active_state = None;
        let html = render_live(&view, true);
        assert!(!html.contains("data-verb=\"pause\"") && !html.contains("data-verb=\"abort\""));
        assert!(html.contains("data-verb=\"deploy\"") && html.contains("data-verb=\"rollback\""));
    }
}
