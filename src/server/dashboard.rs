//! The dashboard at `/`: one server-rendered HTML page listing fleets and recent rollouts. No
//! JavaScript; it refreshes itself every 10 seconds with a meta tag.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;

use super::Shared;
use super::api::{FleetDto, RolloutDto};
use crate::store::RolloutFilter;

/// How many rollouts the page lists.
const RECENT: usize = 25;

fn escape(text: &str) -> String {
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

pub(crate) async fn page(State(shared): State<Shared>) -> Html<String> {
    let fleets: Vec<FleetDto> =
        shared.app.operator.fleet_status().iter().map(FleetDto::from).collect();
    let filter = RolloutFilter { limit: Some(RECENT), ..RolloutFilter::default() };
    let (rollouts, store_error) = match shared.app.operator.store.rollouts(&filter) {
        Ok(found) => (found.iter().map(RolloutDto::from_rollout).collect::<Vec<_>>(), None),
        Err(error) => (Vec::new(), Some(crate::error::chain(&error))),
    };
    let source = shared.app.operator.source.config();

    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>kiln</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}}\
         .succeeded{{color:#080}}.failed,.rolled_back,.aborted{{color:#b00}}.rolling,.baking,.reconciling{{color:#06c}}\
         code{{font-size:90%}}</style></head><body><h1>kiln</h1><p>Watching <code>{}</code> branch <code>{}</code>.</p>",
        escape(&crate::error::redact(&source.url)),
        escape(&source.branch)
    );
    html.push_str("<h2>Fleets</h2><table><tr><th>fleet</th><th>provider</th><th>commit</th><th>image</th><th>instances</th><th>active rollout</th><th>endpoint</th></tr>");
    for fleet in &fleets {
        let active = match (fleet.active_rollout, fleet.active_state) {
            (Some(id), Some(state)) => format!("#{id} <span class=\"{state}\">{state}</span>"),
            (Some(id), None) => format!("#{id}"),
            _ => "–".to_owned(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&fleet.name),
            escape(&fleet.provider),
            opt(fleet.revision.as_deref().map(|r| r.get(..8).unwrap_or(r))),
            opt(fleet.image.as_deref()),
            instances_cell(fleet),
            active,
            opt(fleet.endpoint.as_deref()),
        );
    }
    if fleets.is_empty() {
        html.push_str("<tr><td colspan=\"7\">no fleets yet</td></tr>");
    }
    html.push_str("</table><h2>Recent rollouts</h2><table><tr><th>id</th><th>state</th><th>fleet</th><th>commit</th><th>image</th><th>created</th><th>summary</th><th>reason</th></tr>");
    for rollout in &rollouts {
        let _ = write!(
            html,
            "<tr><td><a href=\"/api/v1/rollouts/{id}\">#{id}</a></td><td class=\"{state}\">{state}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            opt(rollout.fleet.as_deref()),
            escape(rollout.commit.get(..8).unwrap_or(&rollout.commit)),
            opt(rollout.image.as_deref()),
            rollout.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
            escape(&rollout.summary),
            opt(rollout.reason.as_deref()),
            id = rollout.id,
            state = rollout.state,
        );
    }
    if let Some(error) = store_error {
        let _ = write!(
            html,
            "<tr><td colspan=\"8\">cannot read the store: {}</td></tr>",
            escape(&error)
        );
    } else if rollouts.is_empty() {
        html.push_str("<tr><td colspan=\"8\">no rollouts yet</td></tr>");
    }
    html.push_str("</table><p><a href=\"/metrics\">metrics</a> · <a href=\"/api/v1/fleets\">API</a></p></body></html>");
    Html(html)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::api::InstanceDto;

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
}
