//! Retention of event streams. A rollout, its commit, image and outcome are kept forever; the
//! event stream of a rollout that ended longer ago than the retention age shrinks to its
//! `state` events, its errors and one summary event (`gc`, with the count of each kind it
//! replaced). The summary takes the sequence number of the first event it replaces, so the
//! feed keeps its order and hands out no new number.
//!
//! A cursor (`meta` [`CURSOR_KEY`]: the first rollout id not yet looked at) makes each run cost
//! what it compacts: rollouts are visited in id order, which is creation order, and a run stops
//! at the first rollout created after the cutoff. An old rollout that has not ended holds the
//! cursor (it is looked at again next time).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sled::Transactional as _;

use super::{Event, EventKind, Level, Result, Store, StoreError, Trees, seq_suffix};
use crate::model::{RolloutId, Timestamp};
use crate::rollout::state::Rollout;

/// The `meta` key of the compaction cursor.
pub const CURSOR_KEY: &str = "compact.cursor";

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compacted {
    /// Rollouts whose events were summarized.
    pub rollouts: u64,
    /// Events replaced by summaries.
    pub events: u64,
    /// Whether the run stopped at its budget with more due.
    pub more: bool,
}

/// True for the events a compacted stream keeps.
fn kept(event: &Event) -> bool {
    event.kind == EventKind::State || event.level == Level::Error || is_summary(event)
}

fn is_summary(event: &Event) -> bool {
    event.kind == EventKind::Gc && event.data.as_ref().is_some_and(|d| d.get("compacted").is_some())
}

impl Store {
    /// Compacts the event streams of rollouts that ended before `cutoff`, looking at `budget`
    /// rollouts at most (the rest is `more`). Each rollout is one transaction (flushed once at
    /// the end): a crash leaves every stream either whole or compacted.
    pub fn compact_events(&self, cutoff: Timestamp, budget: usize) -> Result<Compacted> {
        let mut out = Compacted::default();
        let start: u64 = self.get_meta(CURSOR_KEY)?.unwrap_or(1);
        let mut cursor = start;
        let mut scan = start;
        let mut held = false;
        let mut looked = 0;
        loop {
            if looked >= budget {
                out.more = true;
                break;
            }
            let next = self.with(|t| {
                let Some((key, value)) = t
                    .rollouts
                    .range(scan.to_be_bytes()..)
                    .next()
                    .transpose()
                    .map_err(|e| self.db_err(e))?
                else {
                    return Ok(None);
                };
                Ok(Some((seq_suffix(&key), Self::decode::<Rollout>("rollouts", &value)?)))
            })?;
            let Some((id, rollout)) = next else { break };
            if rollout.created_at >= cutoff {
                break;
            }
            looked += 1;
            scan = id + 1;
            let ended = rollout.finished_at.filter(|_| rollout.state.is_terminal());
            if ended.is_none_or(|at| at >= cutoff) {
                held = true;
                continue;
            }
            let removed = self.write(|t| self.compact_one(t, RolloutId(id)))?;
            if removed > 0 {
                out.rollouts += 1;
                out.events += removed;
            }
            if !held {
                cursor = id + 1;
            }
        }
        if out.rollouts > 0 {
            self.flush()?;
        }
        if cursor != start {
            self.set_meta(CURSOR_KEY, &cursor)?;
        }
        Ok(out)
    }

    /// Replaces the events of one rollout that a compacted stream does not keep by a summary.
    /// Returns how many events it replaced.
    fn compact_one(&self, t: &Trees, rollout: RolloutId) -> Result<u64> {
        let prefix = rollout.0.to_be_bytes();
        let mut dropped: Vec<(Vec<u8>, Event)> = Vec::new();
        for kv in t.events.scan_prefix(prefix) {
            let (key, value) = kv.map_err(|e| self.db_err(e))?;
            let event: Event = Self::decode("events", &value)?;
            if !kept(&event) {
                dropped.push((key.to_vec(), event));
            }
        }
        let (Some((first_key, first)), Some((_, last))) = (dropped.first(), dropped.last()) else {
            return Ok(0);
        };
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for (_, event) in &dropped {
            *kinds.entry(event.kind.as_str().to_owned()).or_default() += 1;
        }
        let n = dropped.len() as u64;
        let summary = Event {
            seq: first.seq,
            rollout,
            fleet: None,
            revision: None,
            at: first.at,
            level: Level::Info,
            kind: EventKind::Gc,
            change: None,
            message: format!(
                "history compacted: {n} event(s) from {} to {} summarized (state changes and errors kept)",
                first.at.format("%Y-%m-%d %H:%M:%S"),
                last.at.format("%Y-%m-%d %H:%M:%S"),
            ),
            data: Some(serde_json::json!({
                "compacted": n,
                "kinds": kinds,
                "from": first.at,
                "to": last.at,
            })),
        };
        let value = Self::encode_event(&summary)?;
        (&t.events, &t.event_seq)
            .transaction(|(events, event_seq)| {
                for (key, _) in &dropped[1..] {
                    events.remove(key.as_slice())?;
                    event_seq.remove(&seq_suffix(key).to_be_bytes())?;
                }
                events.insert(first_key.as_slice(), value.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| self.tx_err(e))?;
        Ok(n)
    }
}
