//! The embedded database: the only module that imports `sled`.
//!
//! Trees (all keys big-endian so iteration order is chronological):
//!
//! | tree        | key                         | value                     |
//! |-------------|-----------------------------|---------------------------|
//! | `meta`      | name                        | JSON (schema version, source tip, ...) |
//! | `commits`   | seq                         | [`CommitRecord`]          |
//! | `commit_ix` | revision                    | seq                       |
//! | `rollouts`  | rollout id                  | [`Rollout`]               |
//! | `events`    | rollout id ++ seq           | [`Event`]                 |
//! | `instances` | fleet ++ 0 ++ seq           | [`InstanceEvent`]         |
//! | `bakes`     | cache key                   | [`BakeRecord`]            |
//! | `deployed`  | fleet                       | [`Deployed`]              |
//!
//! Every value is wrapped in a versioned envelope (`{"v":1,"r":...}`). Every write that
//! acknowledges a state change is flushed before it returns, so a `kill -9` right after never
//! loses it.

mod records;

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::broadcast;

pub use records::{
    BakeRecord, CommitKind, CommitRecord, Deployed, Event, InstanceAction, InstanceEvent, Level,
};

use crate::model::{Revision, RolloutId};
use crate::rollout::state::{Rollout, RolloutState};

/// The on-disk schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption) or another process holds the database.
    #[error("database error in {path}")]
    Db {
        /// The data dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// A value failed to encode or decode.
    #[error("corrupt or unreadable record in tree `{tree}`")]
    Codec {
        /// The tree.
        tree: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The database was written by a newer kiln.
    #[error(
        "database schema version {found} is newer than this kiln understands ({SCHEMA_VERSION}); upgrade kiln"
    )]
    NewerSchema {
        /// The version on disk.
        found: u32,
    },
    /// The record asked for does not exist.
    #[error("no {what} `{id}`")]
    NotFound {
        /// What kind of record.
        what: &'static str,
        /// Its id.
        id: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Filter for listing rollouts.
#[derive(Debug, Clone, Default)]
pub struct RolloutFilter {
    /// Only this fleet.
    pub fleet: Option<String>,
    /// Only commits starting with this prefix.
    pub commit: Option<String>,
    /// Only this state.
    pub state: Option<RolloutState>,
    /// Only ids below this (paging, newest first).
    pub before: Option<RolloutId>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// The store handle. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    commits: sled::Tree,
    commit_ix: sled::Tree,
    rollouts: sled::Tree,
    events: sled::Tree,
    instances: sled::Tree,
    bakes: sled::Tree,
    deployed: sled::Tree,
    retention: usize,
    feed: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    r: &'a T,
}

#[derive(serde::Deserialize)]
struct EnvelopeIn<T> {
    v: u32,
    r: T,
}

impl Store {
    /// Opens (or creates) the database under `dir/db`. `retention` is how many rollouts are
    /// kept; older ones and their events are pruned as new ones arrive (0 keeps everything).
    pub fn open(dir: &Path, retention: usize) -> Result<Store> {
        let path = dir.join("db");
        let db_err = |source| StoreError::Db { path: path.clone(), source };
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::LowSpace)
            // The working set is small (recent rollouts); a large page cache only costs RSS.
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(db_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let store = Store {
            meta: tree("meta")?,
            commits: tree("commits")?,
            commit_ix: tree("commit_ix")?,
            rollouts: tree("rollouts")?,
            events: tree("events")?,
            instances: tree("instances")?,
            bakes: tree("bakes")?,
            deployed: tree("deployed")?,
            db,
            path: dir.to_owned(),
            retention,
            feed: broadcast::channel(4096).0,
        };
        match store.get_meta::<u32>("schema_version")? {
            Some(found) if found > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found }),
            // Older versions would be migrated here, next to the types.
            Some(_) => {}
            None => {
                store.set_meta("schema_version", &SCHEMA_VERSION)?;
                store.flush()?;
            }
        }
        Ok(store)
    }

    /// The data dir this store lives in.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }

    fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(&EnvelopeOut { v: SCHEMA_VERSION, r: value })
            .map_err(|source| StoreError::Codec { tree, source })
    }

    fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
        let envelope: EnvelopeIn<T> =
            serde_json::from_slice(bytes).map_err(|source| StoreError::Codec { tree, source })?;
        if envelope.v > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { found: envelope.v });
        }
        Ok(envelope.r)
    }

    /// Makes everything written so far durable. Called before acknowledging a state change.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(|e| self.db_err(e))
    }

    /// A fresh store-wide monotonic id (crash-safe: never reused after a restart).
    pub fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map(|id| id + 1).map_err(|e| self.db_err(e))
    }

    // --- meta ---

    /// Reads a named value.
    pub fn get_meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        match self.meta.get(name).map_err(|e| self.db_err(e))? {
            Some(bytes) => Self::decode("meta", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Writes a named value (flushed).
    pub fn set_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        self.meta.insert(name, Self::encode("meta", value)?).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Removes a named value (flushed).
    pub fn remove_meta(&self, name: &str) -> Result<()> {
        self.meta.remove(name).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    // --- commits ---

    /// Records a commit unless it was seen before (same revision and kind). Returns whether it
    /// was new. Flushed.
    pub fn record_commit(&self, commit: &CommitRecord) -> Result<bool> {
        let ix_key = match &commit.kind {
            CommitKind::BranchDeleted => format!("deleted:{}", commit.revision),
            _ => commit.revision.0.clone(),
        };
        if self.commit_ix.contains_key(&ix_key).map_err(|e| self.db_err(e))? {
            return Ok(false);
        }
        let seq = self.next_id()?;
        self.commits
            .insert(seq.to_be_bytes(), Self::encode("commits", commit)?)
            .map_err(|e| self.db_err(e))?;
        self.commit_ix.insert(ix_key, &seq.to_be_bytes()).map_err(|e| self.db_err(e))?;
        self.flush()?;
        Ok(true)
    }

    /// The record of a commit, if seen.
    pub fn commit(&self, revision: &Revision) -> Result<Option<CommitRecord>> {
        let Some(seq) = self.commit_ix.get(&revision.0).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        match self.commits.get(seq).map_err(|e| self.db_err(e))? {
            Some(bytes) => Self::decode("commits", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Commits seen, newest first.
    pub fn commits(&self, limit: usize) -> Result<Vec<CommitRecord>> {
        self.commits
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.db_err(e))?;
                Self::decode("commits", &v)
            })
            .collect()
    }

    // --- rollouts ---

    /// Inserts or updates a rollout (flushed), pruning beyond the retention on insert.
    pub fn put_rollout(&self, rollout: &Rollout) -> Result<()> {
        let previous = self
            .rollouts
            .insert(rollout.id.0.to_be_bytes(), Self::encode("rollouts", rollout)?)
            .map_err(|e| self.db_err(e))?;
        if previous.is_none() {
            self.prune()?;
        }
        self.flush()
    }

    /// Creates a rollout with a fresh id from a template whose id is ignored.
    pub fn create_rollout(&self, mut rollout: Rollout) -> Result<Rollout> {
        rollout.id = RolloutId(self.next_id()?);
        self.put_rollout(&rollout)?;
        Ok(rollout)
    }

    /// One rollout.
    pub fn rollout(&self, id: RolloutId) -> Result<Rollout> {
        match self.rollouts.get(id.0.to_be_bytes()).map_err(|e| self.db_err(e))? {
            Some(bytes) => Self::decode("rollouts", &bytes),
            None => Err(StoreError::NotFound { what: "rollout", id: id.to_string() }),
        }
    }

    /// Rollouts matching `filter`, newest first.
    pub fn rollouts(&self, filter: &RolloutFilter) -> Result<Vec<Rollout>> {
        let upper = filter.before.map_or(u64::MAX, |id| id.0);
        let mut out = Vec::new();
        for kv in self.rollouts.range(..upper.to_be_bytes()).rev() {
            let (_, v) = kv.map_err(|e| self.db_err(e))?;
            let rollout: Rollout = Self::decode("rollouts", &v)?;
            if filter.fleet.as_ref().is_some_and(|f| rollout.fleet.as_ref() != Some(f))
                || filter.state.is_some_and(|s| rollout.state != s)
                || filter
                    .commit
                    .as_ref()
                    .is_some_and(|c| !rollout.revision.0.starts_with(c.as_str()))
            {
                continue;
            }
            out.push(rollout);
            if filter.limit.is_some_and(|limit| out.len() >= limit) {
                break;
            }
        }
        Ok(out)
    }

    /// Rollouts not yet in a terminal state, oldest first (what a restart resumes).
    pub fn active_rollouts(&self) -> Result<Vec<Rollout>> {
        let mut out = self
            .rollouts(&RolloutFilter::default())?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect::<Vec<_>>();
        out.reverse();
        Ok(out)
    }

    fn prune(&self) -> Result<()> {
        if self.retention == 0 || self.rollouts.len() <= self.retention {
            return Ok(());
        }
        let excess = self.rollouts.len() - self.retention;
        let mut removed = 0;
        for kv in self.rollouts.iter() {
            if removed >= excess {
                break;
            }
            let (key, v) = kv.map_err(|e| self.db_err(e))?;
            let rollout: Rollout = Self::decode("rollouts", &v)?;
            // Never prune history that is still in motion.
            if !rollout.state.is_terminal() {
                continue;
            }
            self.rollouts.remove(&key).map_err(|e| self.db_err(e))?;
            for ev in self.events.scan_prefix(&key) {
                let (ek, _) = ev.map_err(|e| self.db_err(e))?;
                self.events.remove(ek).map_err(|e| self.db_err(e))?;
            }
            removed += 1;
        }
        Ok(())
    }

    // --- events ---

    /// Appends an event to a rollout's timeline (flushed) and publishes it to followers.
    pub fn append_event(
        &self,
        rollout: RolloutId,
        level: Level,
        kind: &str,
        message: impl Into<String>,
        data: Option<serde_json::Value>,
    ) -> Result<Event> {
        let event = Event {
            seq: self.next_id()?,
            rollout,
            at: crate::model::now(),
            level,
            kind: kind.to_owned(),
            message: crate::error::redact(&message.into()),
            data,
        };
        self.insert_event(&event)?;
        self.flush()?;
        Ok(event)
    }

    /// Appends many events with one flush (hook output lines arrive in bursts).
    pub fn append_events(&self, events: &mut [Event]) -> Result<()> {
        for event in events.iter_mut() {
            event.seq = self.next_id()?;
            self.insert_event(event)?;
        }
        self.flush()
    }

    fn insert_event(&self, event: &Event) -> Result<()> {
        let mut key = event.rollout.0.to_be_bytes().to_vec();
        key.extend_from_slice(&event.seq.to_be_bytes());
        self.events.insert(key, Self::encode("events", event)?).map_err(|e| self.db_err(e))?;
        // Nobody following is fine.
        let _ = self.feed.send(event.clone());
        Ok(())
    }

    /// A rollout's events with `seq > after`, oldest first.
    pub fn events(&self, rollout: RolloutId, after: u64) -> Result<Vec<Event>> {
        let mut from = rollout.0.to_be_bytes().to_vec();
        from.extend_from_slice(&after.saturating_add(1).to_be_bytes());
        let mut to = rollout.0.to_be_bytes().to_vec();
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        self.events
            .range(from..=to)
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.db_err(e))?;
                Self::decode("events", &v)
            })
            .collect()
    }

    /// Live feed of every event appended from now on (for SSE followers).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.feed.subscribe()
    }

    // --- instances ---

    /// Appends to the per-instance journal (flushed).
    pub fn record_instance(&self, mut event: InstanceEvent) -> Result<InstanceEvent> {
        event.seq = self.next_id()?;
        let mut key = event.fleet.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&event.seq.to_be_bytes());
        self.instances
            .insert(key, Self::encode("instances", &event)?)
            .map_err(|e| self.db_err(e))?;
        self.flush()?;
        Ok(event)
    }

    /// A fleet's instance journal, oldest first.
    pub fn instance_journal(&self, fleet: &str) -> Result<Vec<InstanceEvent>> {
        let mut prefix = fleet.as_bytes().to_vec();
        prefix.push(0);
        self.instances
            .scan_prefix(prefix)
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.db_err(e))?;
                Self::decode("instances", &v)
            })
            .collect()
    }

    // --- bakes ---

    /// A cached bake.
    pub fn bake(&self, key: &str) -> Result<Option<BakeRecord>> {
        match self.bakes.get(key).map_err(|e| self.db_err(e))? {
            Some(bytes) => Self::decode("bakes", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Caches a bake (flushed).
    pub fn put_bake(&self, record: &BakeRecord) -> Result<()> {
        self.bakes
            .insert(record.key.as_bytes(), Self::encode("bakes", record)?)
            .map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Drops a cached bake (flushed): the next bake with this key bakes again. Garbage
    /// collection calls it before it deletes the image the entry names.
    pub fn remove_bake(&self, key: &str) -> Result<()> {
        self.bakes.remove(key.as_bytes()).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Every cached bake, in key order.
    pub fn bakes(&self) -> Result<Vec<BakeRecord>> {
        self.bakes
            .iter()
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.db_err(e))?;
                Self::decode("bakes", &v)
            })
            .collect()
    }

    // --- deployed ---

    /// What a fleet runs now.
    pub fn deployed(&self, fleet: &str) -> Result<Option<Deployed>> {
        match self.deployed.get(fleet).map_err(|e| self.db_err(e))? {
            Some(bytes) => Self::decode("deployed", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Records what a fleet runs now (flushed).
    pub fn set_deployed(&self, deployed: &Deployed) -> Result<()> {
        self.deployed
            .insert(deployed.fleet.as_bytes(), Self::encode("deployed", deployed)?)
            .map_err(|e| self.db_err(e))?;
        self.flush()
    }
}

#[cfg(test)]
mod tests;
