//! The notification outbox: deliveries owed to notification sinks and forges.
//!
//! | tree          | key                 | value            |
//! |---------------|---------------------|------------------|
//! | `outbox`      | event seq ++ sink   | [`OutboxEntry`] (pending) |
//! | `outbox_dead` | event seq ++ sink   | [`OutboxEntry`] (dead-lettered, the last [`MAX_DEAD`]) |
//!
//! `meta` keys: `outbox.cursor` (the last event seq turned into entries), `outbox.delivered`
//! (a count), `outbox.instance` (this data dir's random id, part of every idempotency id).
//!
//! Entries for an event and the cursor past it are one transaction (flushed), so after a kill
//! an event is either fully turned into entries or not at all, and never twice: the key is
//! (event, sink), and an entry already there (pending) is kept as it is. A delivered entry is
//! removed (flushed) before the sink's next entry is tried.

use serde::{Deserialize, Serialize};
use sled::Transactional as _;

use super::{Result, Store, StoreError, abort};
use crate::model::{RolloutId, Timestamp};

/// Dead letters kept (the oldest are dropped past this).
pub const MAX_DEAD: usize = 1000;

const TREE: &str = "outbox";
const DEAD_TREE: &str = "outbox_dead";
const CURSOR: &str = "outbox.cursor";
const DELIVERED: &str = "outbox.delivered";
const INSTANCE: &str = "outbox.instance";

/// One delivery owed to one sink for one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The event it is about.
    pub seq: u64,
    /// The sink's name (`forge` for commit statuses).
    pub sink: String,
    /// The idempotency id, stable for (event, sink): `webhook-id`, the email's Message-ID.
    pub id: String,
    /// The sink's kind (`slack`, `gitlab`, ...), for display.
    pub kind: String,
    /// The rollout the event belongs to.
    pub rollout: RolloutId,
    /// Its fleet.
    #[serde(default)]
    pub fleet: Option<String>,
    /// What it says, in a few words (`rollout.failed`, `kiln/rollout failed`).
    pub topic: String,
    /// What to send (rendered when the entry was written; secrets are resolved at delivery).
    pub payload: serde_json::Value,
    /// When written.
    pub created_at: Timestamp,
    /// Failed attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this time (backoff).
    #[serde(default)]
    pub next_at: Option<Timestamp>,
    /// The last attempt's error.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    #[serde(default)]
    pub dead_at: Option<Timestamp>,
}

impl OutboxEntry {
    fn key(&self) -> Vec<u8> {
        let mut key = self.seq.to_be_bytes().to_vec();
        key.extend_from_slice(self.sink.as_bytes());
        key
    }
}

/// Counts for `kiln status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Entries waiting (or being retried).
    pub pending: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// Deliveries that succeeded, ever.
    pub delivered: u64,
    /// The last event seq turned into entries.
    pub cursor: u64,
}

impl Store {
    fn outbox_tree(&self, t: &super::Trees, name: &'static str) -> Result<sled::Tree> {
        t.db.open_tree(name).map_err(|e| self.db_err(e))
    }

    /// The last event seq the outbox has turned into entries (`None`: never started).
    pub fn outbox_cursor(&self) -> Result<Option<u64>> {
        self.get_meta(CURSOR)
    }

    /// This data dir's id for idempotency ids, created on first use (flushed).
    pub fn outbox_instance(&self) -> Result<String> {
        if let Some(id) = self.get_meta::<String>(INSTANCE)? {
            return Ok(id);
        }
        let id = format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff);
        self.set_meta(INSTANCE, &id)?;
        Ok(id)
    }

    /// Writes `entries` (those not already pending) and moves the cursor to `cursor`, in one
    /// transaction (flushed).
    pub fn outbox_enqueue(&self, entries: &[OutboxEntry], cursor: u64) -> Result<()> {
        let encoded: Vec<(Vec<u8>, Vec<u8>)> =
            entries.iter().map(|e| Ok((e.key(), Self::encode(TREE, e)?))).collect::<Result<_>>()?;
        let cursor = Self::encode("meta", &cursor)?;
        self.write(|t| {
            let outbox = self.outbox_tree(t, TREE)?;
            (&t.meta, &outbox)
                .transaction(|(meta, outbox)| {
                    for (key, value) in &encoded {
                        if outbox.get(key)?.is_none() {
                            outbox.insert(key.as_slice(), value.as_slice())?;
                        }
                    }
                    meta.insert(CURSOR, cursor.as_slice())?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Pending entries in event order, at most `limit`.
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.with(|t| {
            let outbox = self.outbox_tree(t, TREE)?;
            outbox
                .iter()
                .values()
                .take(limit)
                .map(|v| Self::decode(TREE, &v.map_err(|e| self.db_err(e))?))
                .collect()
        })
    }

    /// Records a failed attempt of a pending entry (flushed). An entry no longer pending (it
    /// was delivered or dead-lettered meanwhile) is left alone.
    pub fn outbox_retry(&self, entry: &OutboxEntry) -> Result<()> {
        let value = Self::encode(TREE, entry)?;
        let key = entry.key();
        self.write(|t| {
            let outbox = self.outbox_tree(t, TREE)?;
            outbox
                .transaction(|outbox| {
                    if outbox.get(&key)?.is_some() {
                        outbox.insert(key.as_slice(), value.as_slice())?;
                    }
                    Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Records a delivery: the entry leaves the outbox and the delivered count grows, in one
    /// transaction (flushed).
    pub fn outbox_delivered(&self, entry: &OutboxEntry) -> Result<()> {
        let key = entry.key();
        self.write(|t| {
            let outbox = self.outbox_tree(t, TREE)?;
            (&t.meta, &outbox)
                .transaction(|(meta, outbox)| {
                    if outbox.remove(key.as_slice())?.is_some() {
                        let count = match meta.get(DELIVERED)? {
                            Some(bytes) => Self::decode::<u64>("meta", &bytes).map_err(abort)?,
                            None => 0,
                        };
                        let count = Self::encode("meta", &(count + 1)).map_err(abort)?;
                        meta.insert(DELIVERED, count)?;
                    }
                    Ok(())
                })
                .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Moves an entry from the outbox to the dead letters (one transaction, flushed), dropping
    /// the oldest dead letters past [`MAX_DEAD`].
    pub fn outbox_dead_letter(&self, entry: &OutboxEntry) -> Result<()> {
        let key = entry.key();
        let value = Self::encode(DEAD_TREE, entry)?;
        self.write(|t| {
            let outbox = self.outbox_tree(t, TREE)?;
            let dead = self.outbox_tree(t, DEAD_TREE)?;
            (&outbox, &dead)
                .transaction(|(outbox, dead)| {
                    outbox.remove(key.as_slice())?;
                    dead.insert(key.as_slice(), value.as_slice())?;
                    Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| self.tx_err(e))?;
            while dead.len() > MAX_DEAD {
                match dead.pop_min().map_err(|e| self.db_err(e))? {
                    Some(_) => {}
                    None => break,
                }
            }
            self.flush_trees(t)
        })
    }

    /// Dead letters, newest first, at most `limit`.
    pub fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.with(|t| {
            let dead = self.outbox_tree(t, DEAD_TREE)?;
            dead.iter()
                .rev()
                .take(limit)
                .map(|kv| Self::decode(DEAD_TREE, &kv.map_err(|e| self.db_err(e))?.1))
                .collect()
        })
    }

    /// Pending and dead counts, deliveries so far and the cursor.
    pub fn outbox_stats(&self) -> Result<OutboxStats> {
        let (pending, dead) = self.with(|t| {
            let count = |tree: sled::Tree| u64::try_from(tree.len()).unwrap_or(u64::MAX);
            Ok((count(self.outbox_tree(t, TREE)?), count(self.outbox_tree(t, DEAD_TREE)?)))
        })?;
        Ok(OutboxStats {
            pending,
            dead,
            delivered: self.get_meta(DELIVERED)?.unwrap_or(0),
            cursor: self.outbox_cursor()?.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, sink: &str) -> OutboxEntry {
        OutboxEntry {
            seq,
            sink: sink.into(),
            id: format!("msg_{seq}_{sink}"),
            kind: "webhook".into(),
            rollout: RolloutId(1),
            fleet: Some("web".into()),
            topic: "rollout.failed".into(),
            payload: serde_json::json!({"n": seq}),
            created_at: crate::model::now(),
            attempts: 0,
            next_at: None,
            last_error: None,
            dead_at: None,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_an_event_is_never_enqueued_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path(), 0).expect("open");
            assert_eq!(store.outbox_cursor().expect("cursor"), None);
            store.outbox_enqueue(&[entry(3, "a"), entry(3, "b")], 3).expect("enqueue");
            let mut tried = entry(3, "a");
            tried.attempts = 2;
            tried.last_error = Some("503".into());
            store.outbox_retry(&tried).expect("retry");
            store.outbox_delivered(&entry(3, "b")).expect("delivered");
        }
        // What a kill -9 leaves: everything above was flushed.
        let store = Store::open(dir.path(), 0).expect("reopen");
        assert_eq!(store.outbox_cursor().expect("cursor"), Some(3));
        let pending = store.outbox_pending(10).expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].sink.as_str(), pending[0].attempts), ("a", 2));
        // The same event again (a replay of the feed) keeps the pending entry's attempts and
        // does not bring back the delivered one... as long as the cursor says so; the caller
        // only enqueues events after the cursor, and a pending duplicate is not overwritten.
        store.outbox_enqueue(&[entry(3, "a")], 3).expect("enqueue again");
        assert_eq!(store.outbox_pending(10).expect("pending")[0].attempts, 2);
        let stats = store.outbox_stats().expect("stats");
        assert_eq!((stats.pending, stats.dead, stats.delivered, stats.cursor), (1, 0, 1, 3));
        // Dead-lettering moves it.
        store.outbox_dead_letter(&pending[0]).expect("dead");
        assert!(store.outbox_pending(10).expect("pending").is_empty());
        assert_eq!(store.outbox_dead(10).expect("dead")[0].sink, "a");
        let stats = store.outbox_stats().expect("stats");
        assert_eq!((stats.pending, stats.dead), (0, 1));
        // A retry recorded after the entry left is not resurrected.
        store.outbox_retry(&pending[0]).expect("late retry");
        assert!(store.outbox_pending(10).expect("pending").is_empty());
    }

    #[test]
    fn pending_entries_come_in_event_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 0).expect("open");
        store.outbox_enqueue(&[entry(300, "a")], 300).expect("enqueue");
        store.outbox_enqueue(&[entry(2, "a"), entry(40, "b")], 300).expect("enqueue");
        let seqs: Vec<u64> =
            store.outbox_pending(10).expect("pending").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 40, 300]);
        let id = store.outbox_instance().expect("instance");
        assert_eq!(store.outbox_instance().expect("instance"), id, "stable");
    }
}
