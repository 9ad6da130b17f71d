//! Notifications and forge commit statuses, delivered through a durable outbox.
//!
//! ```text
//!  store event feed ──▶ enqueue task: classify each event (message.rs), render it once, write
//!  (events_after)        one outbox entry per (event, sink) + the cursor, in one flushed write
//!                                 │ wake
//!                                 ▼
//!                        delivery task: per sink, its oldest entry, in its own task with a
//!                        deadline (sinks.rs, email.rs); delivered → removed (flushed) before
//!                        the sink's next; failed → retried with backoff (retry::nth_delay from
//!                        the persisted attempt count); dead-lettered after MAX_ATTEMPTS or at
//!                        once on a permanent error
//! ```
//!
//! Nothing here is on a rollout's path: the driver only appends events, which it does anyway,
//! so a slow or failing sink never slows a rollout. After a `kill -9` the cursor says which
//! events were turned into entries (never twice: one transaction), the entries say what is
//! still owed; a delivery that got through just before the kill and was not recorded yet is
//! sent again with the same idempotency id (`webhook-id`, Message-ID), so receivers can drop it.
//!
//! Which sinks an event goes to is read from `kiln.yaml` at the rollout's commit (or, when that
//! commit has no valid manifest, the last valid one seen, else the newest deployed commit's).

pub mod email;
pub mod message;
pub mod sinks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::manifest::{Forge, Manifest, NotifyEvent, Sink};
use crate::model::Revision;
use crate::store::{Event, EventKind, OutboxEntry, Store, StoreError};
use message::{classify, notice, statuses};
use sinks::{Failure, Payload, Sender};

/// Attempts before an entry is dead-lettered (about 40 minutes of backoff in all).
pub const MAX_ATTEMPTS: u32 = 10;

/// Backoff between attempts of one entry: 2 s doubling to 10 minutes (±20%).
pub const RETRY: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    initial: Duration::from_secs(2),
    max_interval: Duration::from_secs(600),
    max_elapsed: None,
};

/// One delivery's deadline (HTTP requests have their own 10 s; SMTP 20 s per command).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Deliveries in flight at once, over all sinks (each sink has at most one).
const MAX_IN_FLIGHT: usize = 16;

/// How many pending entries a delivery round looks at.
const SCAN: usize = 5000;

/// Daemon-side settings.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// The base URL links in messages and statuses point to (`--public-url`, default the API).
    pub public_url: String,
    /// The daemon's mirror (manifests are read from it).
    pub mirror: PathBuf,
}

/// Starts the enqueue and delivery tasks.
pub fn spawn(
    store: Store,
    config: NotifyConfig,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let wake = Arc::new(Notify::new());
    let mut enqueue = Enqueuer {
        store: store.clone(),
        config,
        wake: wake.clone(),
        manifests: HashMap::new(),
        last_good: None,
        instance: String::new(),
    };
    // The cursor is fixed before the operator records anything, so a first start on a data
    // dir misses none of its events (the task retries if the store is failing now).
    let start = enqueue.start().ok();
    vec![
        tokio::spawn(enqueue.run(start, shutdown.clone())),
        tokio::spawn(deliver_loop(store, wake, shutdown)),
    ]
}

/// Sinks and forge of one manifest.
#[derive(Debug, Default)]
struct Targets {
    global: Vec<Sink>,
    fleets: HashMap<String, Vec<Sink>>,
    forge: Option<Forge>,
}

impl Targets {
    fn of(manifest: &Manifest) -> Targets {
        Targets {
            global: manifest.notify.clone(),
            fleets: manifest
                .fleets
                .iter()
                .filter(|f| !f.notify.is_empty())
                .map(|f| (f.name.clone(), f.notify.clone()))
                .collect(),
            forge: manifest.forge.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.global.is_empty() && self.fleets.is_empty() && self.forge.is_none()
    }
}

/// Manifests kept by commit.
const KEPT_MANIFESTS: usize = 16;

struct Enqueuer {
    store: Store,
    config: NotifyConfig,
    wake: Arc<Notify>,
    manifests: HashMap<Revision, Option<Arc<Targets>>>,
    last_good: Option<Arc<Targets>>,
    instance: String,
}

/// Event kinds that may mean something to a sink or a forge (others are skipped unread).
fn relevant(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::State
            | EventKind::BakeFailed
            | EventKind::DriftInstance
            | EventKind::DriftBackend
            | EventKind::DriftInfra
    )
}

/// `msg_<data dir id>_<seq>_<sink>`, with only `[A-Za-z0-9_-]`.
fn idempotency_id(instance: &str, seq: u64, sink: &str) -> String {
    let sink: String =
        sink.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    format!("msg_{instance}_{seq}_{sink}")
}

impl Enqueuer {
    async fn run(mut self, started: Option<u64>, shutdown: CancellationToken) {
        let mut feed = self.store.subscribe();
        let mut failures = 0u32;
        let mut cursor = loop {
            if let Some(cursor) = started {
                break cursor;
            }
            match self.start() {
                Ok(cursor) => break cursor,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %crate::error::chain(&error), "Notifications cannot start yet.");
                    let wait = crate::retry::nth_delay(&RETRY, failures.min(6));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        failures = 0;
        loop {
            let page = match self.store.events_after(cursor, 200) {
                Ok(page) => page,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %crate::error::chain(&error), "Could not read the event feed for notifications.");
                    Vec::new()
                }
            };
            if let Some(last) = page.last().map(|e| e.seq) {
                let mut entries = Vec::new();
                for event in &page {
                    entries.extend(self.entries_for(event).await);
                }
                match self.store.outbox_enqueue(&entries, last) {
                    Ok(()) => {
                        failures = 0;
                        cursor = last;
                        if !entries.is_empty() {
                            self.wake.notify_one();
                        }
                        continue;
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(error = %crate::error::chain(&error), "Could not write notifications to the outbox; retrying.");
                    }
                }
            }
            let wait = if failures > 0 {
                crate::retry::nth_delay(&RETRY, failures.min(6))
            } else {
                Duration::from_secs(5)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = feed.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The cursor to start from: the stored one, or (first start on this data dir) the feed's
    /// current end, so history from before notifications existed is not announced.
    fn start(&mut self) -> Result<u64, StoreError> {
        self.instance = self.store.outbox_instance()?;
        match self.store.outbox_cursor()? {
            Some(cursor) => Ok(cursor),
            None => {
                let cursor = self.store.durable_seq();
                self.store.outbox_enqueue(&[], cursor)?;
                Ok(cursor)
            }
        }
    }

    /// The sinks and forge of `kiln.yaml` at `revision`.
    async fn targets(&mut self, revision: &Revision) -> Option<Arc<Targets>> {
        if let Some(found) = self.manifests.get(revision) {
            return found.clone().or_else(|| self.last_good.clone());
        }
        let mirror = self.config.mirror.clone();
        let rev = revision.clone();
        let read = tokio::task::spawn_blocking(move || {
            if rev.0.is_empty() {
                return None;
            }
            match crate::planner::manifest_index_at(&mirror, &rev) {
                Ok(Some(Ok(index))) => Some(Arc::new(Targets::of(index.manifest()))),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten();
        if self.manifests.len() >= KEPT_MANIFESTS {
            self.manifests.clear();
        }
        self.manifests.insert(revision.clone(), read.clone());
        if read.is_some() {
            self.last_good.clone_from(&read);
            return read;
        }
        if self.last_good.is_none() {
            // No valid manifest seen yet this run: the newest deployed commit's.
            let newest = self
                .store
                .deployed_all()
                .ok()
                .and_then(|all| all.into_iter().max_by_key(|d| d.at))
                .map(|d| d.revision)
                .filter(|r| r != revision);
            if let Some(newest) = newest {
                return Box::pin(self.targets(&newest)).await;
            }
        }
        self.last_good.clone()
    }

    /// The outbox entries `event` calls for.
    async fn entries_for(&mut self, event: &Event) -> Vec<OutboxEntry> {
        if !relevant(&event.kind) {
            return Vec::new();
        }
        let Ok(rollout) = self.store.rollout(event.rollout) else {
            return Vec::new();
        };
        let drift = matches!(
            event.kind,
            EventKind::DriftInstance | EventKind::DriftBackend | EventKind::DriftInfra
        );
        let first_drift = drift
            && self.store.events(rollout.id, 0).is_ok_and(|events| {
                events
                    .iter()
                    .find(|e| relevant(&e.kind) && e.kind != EventKind::State)
                    .map(|e| e.seq)
                    == Some(event.seq)
            });
        let kind = classify(event, &rollout, first_drift);
        let public_url = self.config.public_url.clone();
        let updates = statuses(event, &rollout, &public_url);
        if kind.is_none() && updates.is_empty() {
            return Vec::new();
        }
        let Some(targets) = self.targets(&rollout.revision).await else {
            return Vec::new();
        };
        if targets.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let now = crate::model::now();
        let mut push = |sink: String, kind: &str, topic: String, payload: Payload| {
            let Ok(payload) = serde_json::to_value(&payload) else { return };
            out.push(OutboxEntry {
                seq: event.seq,
                id: idempotency_id(&self.instance, event.seq, &sink),
                sink,
                kind: kind.to_owned(),
                rollout: rollout.id,
                fleet: rollout.fleet.clone(),
                topic,
                payload,
                created_at: now,
                attempts: 0,
                next_at: None,
                last_error: None,
                dead_at: None,
            });
        };
        if let Some(kind) = kind {
            let commit = self.store.commit(&rollout.revision).ok().flatten();
            let notice = notice(kind, event, &rollout, commit.as_ref(), &public_url);
            let fleet_sinks = rollout.fleet.as_ref().and_then(|f| targets.fleets.get(f));
            for sink in targets.global.iter().chain(fleet_sinks.into_iter().flatten()) {
                if sink.wants(kind) {
                    push(
                        sink.name.clone(),
                        sink.kind.as_str(),
                        kind.as_str().to_owned(),
                        Payload::Sink { sink: sink.clone(), notice: notice.clone() },
                    );
                }
            }
        }
        if let Some(forge) = &targets.forge {
            for status in updates {
                let topic = format!(
                    "{} {}",
                    status.context,
                    serde_json::to_value(status.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                );
                push(
                    format!("forge:{}", status.context),
                    forge.kind.as_str(),
                    topic,
                    Payload::Forge { forge: forge.clone(), status },
                );
            }
        }
        out
    }
}

/// Runs deliveries until shutdown: per sink its oldest pending entry, one at a time.
async fn deliver_loop(store: Store, wake: Arc<Notify>, shutdown: CancellationToken) {
    let sender = match Sender::new() {
        Ok(sender) => sender,
        Err(error) => {
            tracing::error!(error = %error.message(), "Notifications are off: no HTTP client.");
            return;
        }
    };
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut in_flight: HashSet<String> = HashSet::new();
    // Sinks tried since this daemon started: a restart tries each sink's head at once, whatever
    // its backoff said.
    let mut tried: HashSet<String> = HashSet::new();
    loop {
        let now = crate::model::now();
        let mut next_due: Option<crate::model::Timestamp> = None;
        match store.outbox_pending(SCAN) {
            Ok(pending) => {
                let mut heads: BTreeMap<String, OutboxEntry> = BTreeMap::new();
                for entry in pending {
                    heads.entry(entry.sink.clone()).or_insert(entry);
                }
                for (sink, entry) in heads {
                    if in_flight.contains(&sink) || in_flight.len() >= MAX_IN_FLIGHT {
                        continue;
                    }
                    let due = !tried.contains(&sink) || entry.next_at.is_none_or(|t| t <= now);
                    if !due {
                        next_due = next_due.min(entry.next_at).or(entry.next_at);
                        continue;
                    }
                    tried.insert(sink.clone());
                    in_flight.insert(sink.clone());
                    let (store, sender, done) = (store.clone(), sender.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        deliver_one(&store, &sender, entry).await;
                        let _ = done.send(sink);
                    });
                }
            }
            Err(error) => {
                tracing::warn!(error = %crate::error::chain(&error), "Could not read the outbox.");
                next_due = Some(now + chrono::Duration::seconds(2));
            }
        }
        let wait = next_due
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or(Duration::from_secs(30))
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            Some(sink) = done_rx.recv() => {
                in_flight.remove(&sink);
                while let Ok(sink) = done_rx.try_recv() {
                    in_flight.remove(&sink);
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One attempt at one entry, and its outcome recorded (flushed) before the sink's next entry.
async fn deliver_one(store: &Store, sender: &Sender, mut entry: OutboxEntry) {
    let outcome = match tokio::time::timeout(DELIVERY_TIMEOUT, sender.send(&entry)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Transient(format!(
            "no answer within {}",
            crate::manifest::format_duration(DELIVERY_TIMEOUT)
        ))),
    };
    let recorded = match outcome {
        Ok(()) => {
            tracing::info!(sink = %entry.sink, id = %entry.id, topic = %entry.topic, "Notification delivered.");
            store.outbox_delivered(&entry)
        }
        Err(failure) => {
            entry.attempts += 1;
            entry.last_error = Some(failure.message().to_owned());
            let give_up =
                matches!(failure, Failure::Permanent(_)) || entry.attempts >= MAX_ATTEMPTS;
            if give_up {
                entry.dead_at = Some(crate::model::now());
                tracing::warn!(sink = %entry.sink, id = %entry.id, attempts = entry.attempts, error = %failure.message(), "Notification dead-lettered.");
                store.outbox_dead_letter(&entry)
            } else {
                let wait = crate::retry::nth_delay(&RETRY, entry.attempts - 1);
                entry.next_at =
                    chrono::Duration::from_std(wait).ok().map(|wait| crate::model::now() + wait);
                tracing::warn!(sink = %entry.sink, id = %entry.id, attempts = entry.attempts, error = %failure.message(), "Notification failed; retrying.");
                store.outbox_retry(&entry)
            }
        }
    };
    if let Err(error) = recorded {
        tracing::warn!(sink = %entry.sink, error = %crate::error::chain(&error), "Could not record a notification's outcome; it will be tried again.");
    }
}

/// The outbox as `kiln status` and `GET /api/v1/notify` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxStatus {
    /// Entries waiting or being retried.
    pub pending: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// Deliveries that succeeded, ever.
    pub delivered: u64,
    /// Per sink with pending entries.
    pub sinks: Vec<SinkStatus>,
    /// The newest dead letters (at most 20).
    pub dead_letters: Vec<DeadLetter>,
}

/// One sink's backlog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkStatus {
    /// The sink (`forge:kiln/rollout` for a commit-status context).
    pub sink: String,
    /// Its kind.
    pub kind: String,
    /// Entries waiting.
    pub pending: u64,
    /// The oldest entry's failed attempts.
    pub attempts: u32,
    /// The oldest entry's last error.
    pub last_error: Option<String>,
    /// When the oldest entry is tried next.
    pub next_attempt: Option<crate::model::Timestamp>,
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The idempotency id.
    pub id: String,
    /// The sink.
    pub sink: String,
    /// Its kind.
    pub kind: String,
    /// What it said (`rollout.failed`).
    pub topic: String,
    /// The rollout.
    pub rollout: u64,
    /// Its fleet.
    pub fleet: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
    /// When it was given up.
    pub dead_at: Option<crate::model::Timestamp>,
}

/// Reads the outbox's state.
pub fn status(store: &Store) -> Result<OutboxStatus, StoreError> {
    let stats = store.outbox_stats()?;
    let mut sinks: BTreeMap<String, SinkStatus> = BTreeMap::new();
    for entry in store.outbox_pending(SCAN)? {
        let row = sinks.entry(entry.sink.clone()).or_insert_with(|| SinkStatus {
            sink: entry.sink.clone(),
            kind: entry.kind.clone(),
            pending: 0,
            attempts: entry.attempts,
            last_error: entry.last_error.clone(),
            next_attempt: entry.next_at,
        });
        row.pending += 1;
    }
    let dead_letters = store
        .outbox_dead(20)?
        .into_iter()
        .map(|e| DeadLetter {
            id: e.id,
            sink: e.sink,
            kind: e.kind,
            topic: e.topic,
            rollout: e.rollout.0,
            fleet: e.fleet,
            attempts: e.attempts,
            error: e.last_error,
            dead_at: e.dead_at,
        })
        .collect();
    Ok(OutboxStatus {
        pending: stats.pending,
        dead: stats.dead,
        delivered: stats.delivered,
        sinks: sinks.into_values().collect(),
        dead_letters,
    })
}

/// The notification kinds, for docs and `kiln validate` messages.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    NotifyEvent::ALL.iter().map(|k| k.as_str())
}
