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
//! | `event_seq` | seq                         | rollout id (the feed's index) |
//! | `instances` | fleet ++ 0 ++ seq           | [`InstanceEvent`]         |
//! | `bakes`     | cache key                   | [`BakeRecord`]            |
//! | `deployed`  | fleet                       | [`Deployed`]              |
//!
//! Every value is wrapped in a versioned envelope (`{"v":1,"r":...}`). Every write that
//! acknowledges a state change is flushed before it returns, so a `kill -9` right after never
//! loses it.
//!
//! Ids are dense and start at 1, one counter per record kind (`meta` keys `seq.commits`,
//! `seq.rollouts`, `seq.events`, `seq.instances`), bumped in the same transaction as the record
//! they number. A data dir written before the counters existed continues after its highest id.
//!
//! The event feed ([`Store::events_after`]) reads `event_seq` from a sequence number on, so a
//! consumer that resumes costs what it reads, not what the store holds. It never returns an
//! event beyond the highest one known flushed (see `Inner::durable_seq`): everything it shows
//! survives a crash, so a consumer never stores a sequence number that a restarted daemon
//! could hand out again.
//!
//! A failed write (a full disk) is not the end: sled refuses all further IO once it saw an IO
//! error, so the store marks itself failing (see [`Store::failure`], shown by `/healthz`),
//! and the next operation reopens the database, which recovers exactly what was flushed, as a
//! restart would. Callers retry with backoff; [`Store::heal`] probes a failing store.

mod codec;
mod compact;
mod index;
mod outbox;
mod records;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Serialize, de::DeserializeOwned};
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::broadcast;

pub use compact::{CURSOR_KEY as COMPACT_CURSOR_KEY, Compacted};
pub use outbox::{MAX_DEAD, OutboxEntry, OutboxStats};
pub use records::{
    BakeRecord, CommitKind, CommitRecord, Deployed, Event, EventKind, InstanceAction,
    InstanceEvent, Level, StateChange,
};

use crate::model::{Revision, RolloutId, Timestamp};
use crate::rollout::state::{Rollout, RolloutState};

/// The on-disk schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Test-only fault injection: while the file this environment variable names exists, every
/// store write fails as a full disk would (`No space left on device`). Used by the full-disk
/// tests where a small tmpfs cannot be mounted; unset, it costs nothing.
pub const WRITE_FAULT_ENV: &str = "KILN_TEST_STORE_WRITE_FAULT";

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
    /// Another process holds sled's lock on the database (another `kiln run` on this data dir).
    /// sled's own message is Rust debug text (`Os { code: 11, .. }`), so it is not the source.
    #[error("the data dir {dir} is in use by another kiln process (its database is locked)")]
    Locked {
        /// The data dir.
        dir: PathBuf,
    },
    /// A value failed to encode or decode.
    #[error("corrupt or unreadable record in tree `{tree}`")]
    Codec {
        /// The tree.
        tree: &'static str,
        /// The cause.
        #[source]
        source: codec::CodecError,
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
    /// The database is closed after a failure and could not be reopened yet.
    #[error("database in {path} is closed after a failure ({reason}); retrying")]
    Closed {
        /// The data dir.
        path: PathBuf,
        /// The last failure.
        reason: String,
    },
}

impl crate::error::Classify for StoreError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            // IO (a full disk, a lost lock) recovers: the store reopens itself.
            StoreError::Db { .. } | StoreError::Closed { .. } | StoreError::Locked { .. } => {
                crate::error::ErrorClass::Transient
            }
            _ => crate::error::ErrorClass::Stalled,
        }
    }
}

impl StoreError {
    /// True for failures of the database itself (IO), which a retry may cure, as opposed to a
    /// missing or unreadable record.
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Db { .. } | StoreError::Closed { .. })
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Why the store is failing, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreFailure {
    /// When the first failure of the current streak happened.
    pub since: Timestamp,
    /// The last error, with its causes (`database error in …: No space left on device`).
    pub error: String,
}

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

/// Record kinds with their own dense id counter.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Commits,
    Rollouts,
    Events,
    Instances,
}

impl Counter {
    const ALL: [Counter; 4] =
        [Counter::Commits, Counter::Rollouts, Counter::Events, Counter::Instances];

    /// The `meta` key holding the last id handed out.
    fn key(self) -> &'static str {
        match self {
            Counter::Commits => "seq.commits",
            Counter::Rollouts => "seq.rollouts",
            Counter::Events => "seq.events",
            Counter::Instances => "seq.instances",
        }
    }
}

/// The open database and its trees. Only the store holds these, so dropping them closes sled
/// (and releases its lock) for a reopen.
struct Trees {
    db: sled::Db,
    meta: sled::Tree,
    commits: sled::Tree,
    commit_ix: sled::Tree,
    rollouts: sled::Tree,
    events: sled::Tree,
    event_seq: sled::Tree,
    instances: sled::Tree,
    bakes: sled::Tree,
    deployed: sled::Tree,
    /// Indexes and counters over `rollouts` (see `index.rs`).
    rollout_ix: sled::Tree,
}

impl Trees {
    fn open(path: &Path) -> std::result::Result<Trees, sled::Error> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            // The working set is small (recent rollouts); a large page cache only costs RSS.
            .cache_capacity(8 * 1024 * 1024)
            .open()?;
        Ok(Trees {
            meta: db.open_tree("meta")?,
            commits: db.open_tree("commits")?,
            commit_ix: db.open_tree("commit_ix")?,
            rollouts: db.open_tree("rollouts")?,
            events: db.open_tree("events")?,
            event_seq: db.open_tree("event_seq")?,
            instances: db.open_tree("instances")?,
            bakes: db.open_tree("bakes")?,
            deployed: db.open_tree("deployed")?,
            rollout_ix: db.open_tree("rollout_ix")?,
            db,
        })
    }
}

struct Inner {
    /// The data dir (the database lives in `dir/db`).
    dir: PathBuf,
    retention: usize,
    feed: broadcast::Sender<Event>,
    /// The highest event sequence number known to be on disk: set after the flush that made
    /// it durable, before the event is published. Every lower number is durable too (its
    /// transaction committed before this one took its number, and a flush writes everything),
    /// so the feed reads up to here and never shows an event a crash could take back.
    durable_seq: AtomicU64,
    /// `None` while closed after a failed reopen.
    trees: RwLock<Option<Trees>>,
    /// Set by a failed operation: sled refuses all IO after an IO error, so the next operation
    /// reopens the database first.
    needs_reopen: AtomicBool,
    /// The current failure streak, cleared by the next successful write.
    failure: Mutex<Option<StoreFailure>>,
    /// Test-only switches that make writes fail (see [`WRITE_FAULT_ENV`]).
    fault_on: AtomicBool,
    fault_file: Option<PathBuf>,
}

/// The store handle. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.dir).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    r: &'a T,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

fn abort(error: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(error)
}

/// Hands out the next id of `counter` inside a transaction that also writes the record.
fn next_in(meta: &TransactionalTree, counter: Counter) -> TxResult<u64> {
    let last = match meta.get(counter.key())? {
        Some(bytes) => Store::decode::<u64>("meta", &bytes).map_err(abort)?,
        None => 0,
    };
    let next = last + 1;
    meta.insert(counter.key(), Store::encode("meta", &next).map_err(abort)?)?;
    Ok(next)
}

/// The sequence number at the end of a key (`… ++ seq`, big-endian).
fn seq_suffix(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map_or(0, u64::from_be_bytes)
}

fn instance_key(event: &InstanceEvent) -> Vec<u8> {
    let mut key = event.fleet.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&event.seq.to_be_bytes());
    key
}

fn event_key(event: &Event) -> Vec<u8> {
    let mut key = event.rollout.0.to_be_bytes().to_vec();
    key.extend_from_slice(&event.seq.to_be_bytes());
    key
}

/// The `meta` key set once `event_seq` indexes every event (a data dir written before the
/// index existed is indexed at open).
const EVENT_SEQ_INDEXED: &str = "ix.event_seq";

/// Largest page of [`Store::events_after`].
pub const MAX_FEED_PAGE: usize = 1000;

impl Store {
    /// Opens (or creates) the database under `dir/db`. `retention` is how many rollouts are
    /// kept; older ones and their events are pruned as new ones arrive (0 keeps everything).
    pub fn open(dir: &Path, retention: usize) -> Result<Store> {
        let path = dir.join("db");
        let trees = Trees::open(&path).map_err(|source| match &source {
            // sled reports its lock as an `Other` IO error with this text (sled 0.34 config.rs).
            sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock on") => {
                StoreError::Locked { dir: dir.to_owned() }
            }
            _ => StoreError::Db { path: path.clone(), source },
        })?;
        let fault_file = std::env::var_os(WRITE_FAULT_ENV).map(PathBuf::from);
        let store = Store {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                retention,
                feed: broadcast::channel(4096).0,
                durable_seq: AtomicU64::new(0),
                trees: RwLock::new(Some(trees)),
                needs_reopen: AtomicBool::new(false),
                failure: Mutex::new(None),
                fault_on: AtomicBool::new(false),
                fault_file,
            }),
        };
        let found = store.get_meta::<u32>("schema_version")?;
        if let Some(found) = found.filter(|v| *v > SCHEMA_VERSION) {
            return Err(StoreError::NewerSchema { found });
        }
        store.init_counters()?;
        store.index_events()?;
        if let Some(old) = found.filter(|v| *v < SCHEMA_VERSION) {
            store.migrate(old)?;
        }
        store.index_rollouts()?;
        if found != Some(SCHEMA_VERSION) {
            // Last: a crash before this runs the (idempotent) migration again.
            store.set_meta("schema_version", &SCHEMA_VERSION)?;
        }
        store.inner.durable_seq.store(store.stored_event_seq()?, Ordering::SeqCst);
        Ok(store)
    }

    /// The last event sequence number handed out (what is on disk at open).
    fn stored_event_seq(&self) -> Result<u64> {
        Ok(self.get_meta::<u64>(Counter::Events.key())?.unwrap_or(0))
    }

    /// Moves a data dir written by schema `from` to this build's schema. Idempotent, so a crash
    /// part-way only means it runs again at the next open (`schema_version` is written last).
    ///
    /// 1 → 2: every record is re-encoded from its JSON envelope to the compact format
    /// (`codec.rs`), events without the fleet and commit they repeat from their rollout; the
    /// rollout indexes are built afterwards by [`Store::index_rollouts`].
    fn migrate(&self, from: u32) -> Result<()> {
        tracing::info!(from, to = SCHEMA_VERSION, dir = %self.inner.dir.display(), "Migrating the store.");
        self.write(|t| {
            let trees: [(&'static str, &sled::Tree); 6] = [
                ("commits", &t.commits),
                ("rollouts", &t.rollouts),
                ("events", &t.events),
                ("instances", &t.instances),
                ("bakes", &t.bakes),
                ("deployed", &t.deployed),
            ];
            for (name, tree) in trees {
                let mut batch = sled::Batch::default();
                let mut pending = 0;
                for kv in tree.iter() {
                    let (key, value) = kv.map_err(|e| self.db_err(e))?;
                    if codec::is_current(&value) {
                        continue;
                    }
                    let record: serde_json::Value = Self::decode(name, &value)?;
                    let encoded = if name == "events" {
                        let mut record = record;
                        if let Some(map) = record.as_object_mut() {
                            map.remove("fleet");
                            map.remove("revision");
                        }
                        Self::encode(name, &record)?
                    } else {
                        Self::encode(name, &record)?
                    };
                    batch.insert(key, encoded);
                    pending += 1;
                    if pending >= 4096 {
                        tree.apply_batch(std::mem::take(&mut batch)).map_err(|e| self.db_err(e))?;
                        pending = 0;
                    }
                }
                tree.apply_batch(batch).map_err(|e| self.db_err(e))?;
            }
            t.meta.remove(index::INDEXED).map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Builds the rollout indexes and counters of a data dir written before they existed, or
    /// whose build a crash interrupted (the `ix.rollouts` flag is set only once complete).
    fn index_rollouts(&self) -> Result<()> {
        if self.get_meta::<bool>(index::INDEXED)?.unwrap_or(false) {
            return Ok(());
        }
        self.write(|t| {
            index::rebuild(&t.rollout_ix, &t.rollouts, |v| Self::decode("rollouts", v).ok())
                .map_err(|e| self.db_err(e))?;
            self.index_latest_deployed(t)?;
            t.meta
                .insert(index::INDEXED, Self::encode("meta", &true)?)
                .map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Builds the `event_seq` index of a data dir written before it existed (once).
    fn index_events(&self) -> Result<()> {
        if self.get_meta::<bool>(EVENT_SEQ_INDEXED)?.unwrap_or(false) {
            return Ok(());
        }
        self.write(|t| {
            for kv in t.events.iter().keys() {
                let key = kv.map_err(|e| self.db_err(e))?;
                if key.len() != 16 {
                    continue;
                }
                t.event_seq.insert(&key[8..], &key[..8]).map_err(|e| self.db_err(e))?;
            }
            t.meta
                .insert(EVENT_SEQ_INDEXED, Self::encode("meta", &true)?)
                .map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Starts the id counters of a data dir written before they existed after its highest id.
    fn init_counters(&self) -> Result<()> {
        self.write(|t| {
            let mut missing = false;
            for counter in Counter::ALL {
                if t.meta.contains_key(counter.key()).map_err(|e| self.db_err(e))? {
                    continue;
                }
                missing = true;
                let keys = |tree: &sled::Tree| -> Result<u64> {
                    let mut highest = 0;
                    for key in tree.iter().keys() {
                        highest = highest.max(seq_suffix(&key.map_err(|e| self.db_err(e))?));
                    }
                    Ok(highest)
                };
                let last = |tree: &sled::Tree| -> Result<u64> {
                    Ok(tree.last().map_err(|e| self.db_err(e))?.map_or(0, |(k, _)| seq_suffix(&k)))
                };
                let highest = match counter {
                    Counter::Commits => last(&t.commits)?,
                    Counter::Rollouts => last(&t.rollouts)?,
                    Counter::Events => keys(&t.events)?,
                    Counter::Instances => keys(&t.instances)?,
                };
                t.meta
                    .insert(counter.key(), Self::encode("meta", &highest)?)
                    .map_err(|e| self.db_err(e))?;
            }
            if missing { self.flush_trees(t) } else { Ok(()) }
        })
    }

    /// The data dir this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db { path: self.inner.dir.clone(), source }
    }

    fn tx_err(&self, error: TransactionError<StoreError>) -> StoreError {
        match error {
            TransactionError::Abort(error) => error,
            TransactionError::Storage(source) => self.db_err(source),
        }
    }

    /// Encodes a value of `tree`: records in the compact format (`codec.rs`), `meta` values as
    /// JSON envelopes (an older kiln reads `schema_version` from them and stops cleanly).
    fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
        let encoded = if tree == "meta" {
            serde_json::to_vec(&EnvelopeOut { v: SCHEMA_VERSION, r: value })
        } else {
            codec::encode(value)
        };
        encoded.map_err(|source| StoreError::Codec { tree, source: source.into() })
    }

    /// An event as stored: without its fleet and commit, which are its rollout's (filled in
    /// on read, see [`Store::decode_event`]).
    fn encode_event(event: &Event) -> Result<Vec<u8>> {
        if event.fleet.is_none() && event.revision.is_none() {
            return Self::encode("events", event);
        }
        let mut bare = event.clone();
        bare.fleet = None;
        bare.revision = None;
        Self::encode("events", &bare)
    }

    fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
        codec::decode(bytes).map_err(|source| match source {
            codec::CodecError::Newer(found) => StoreError::NewerSchema { found },
            source => StoreError::Codec { tree, source },
        })
    }

    // --- failure handling ---

    /// Why the store is failing, or `None` when its last write succeeded.
    pub fn failure(&self) -> Option<StoreFailure> {
        self.inner.failure.lock().map(|f| f.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Tries a write when the store is failing (a flushed probe in `meta`); a success clears the
    /// failure. Called periodically so the store recovers even when nothing else writes.
    pub fn heal(&self) -> Result<()> {
        if self.failure().is_none() {
            return Ok(());
        }
        self.set_meta("store.probe", &crate::model::now())
    }

    /// Makes every write fail (or not) as a full disk would. For tests of the recovery path.
    #[doc(hidden)]
    pub fn inject_write_fault(&self, on: bool) {
        self.inner.fault_on.store(on, Ordering::SeqCst);
    }

    fn injected_fault(&self) -> Option<StoreError> {
        let on = self.inner.fault_on.load(Ordering::SeqCst)
            || self.inner.fault_file.as_deref().is_some_and(Path::exists);
        on.then(|| {
            let io = std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected fault)",
            );
            self.db_err(sled::Error::Io(io))
        })
    }

    fn record_failure(&self, error: &StoreError) {
        let text = crate::error::chain(error);
        let mut failure = self.inner.failure.lock().unwrap_or_else(|e| e.into_inner());
        let first = failure.is_none();
        let since = failure.as_ref().map_or_else(crate::model::now, |f| f.since);
        *failure = Some(StoreFailure { since, error: text.clone() });
        drop(failure);
        if first {
            tracing::error!(error = %text, "Store write failed; retrying until it works again.");
        }
    }

    fn clear_failure(&self) {
        let mut failure = self.inner.failure.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = failure.take() {
            tracing::info!(since = %old.since, "Store writes work again.");
        }
    }

    /// Drops the database and opens it again (what a restart does): sled recovers everything
    /// flushed and forgets the error that stopped it.
    fn reopen(&self) -> Result<()> {
        let mut trees = self.inner.trees.write().unwrap_or_else(|e| e.into_inner());
        if !self.inner.needs_reopen.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Close first: sled holds an exclusive lock on its files until every handle is gone.
        *trees = None;
        let path = self.inner.dir.join("db");
        match Trees::open(&path) {
            Ok(opened) => {
                // What survived is durable now (a restart would show it too).
                if let Ok(Some(bytes)) = opened.meta.get(Counter::Events.key()) {
                    if let Ok(seq) = Self::decode::<u64>("meta", &bytes) {
                        self.inner.durable_seq.fetch_max(seq, Ordering::SeqCst);
                    }
                }
                *trees = Some(opened);
                self.inner.needs_reopen.store(false, Ordering::SeqCst);
                tracing::warn!(path = %path.display(), "Reopened the store after a failure.");
                Ok(())
            }
            Err(source) => Err(self.db_err(source)),
        }
    }

    /// Runs `op` on the open trees, reopening them first after a failure.
    fn with<T>(&self, op: impl FnOnce(&Trees) -> Result<T>) -> Result<T> {
        if self.inner.needs_reopen.load(Ordering::SeqCst) {
            if let Err(error) = self.reopen() {
                self.record_failure(&error);
                return Err(error);
            }
        }
        let res = {
            let guard = self.inner.trees.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(trees) => op(trees),
                None => Err(StoreError::Closed {
                    path: self.inner.dir.clone(),
                    reason: self.failure().map(|f| f.error).unwrap_or_default(),
                }),
            }
        };
        if let Err(error) = &res {
            if error.is_io() {
                self.inner.needs_reopen.store(true, Ordering::SeqCst);
                self.record_failure(error);
            }
        }
        res
    }

    /// [`with`](Self::with) for an operation that writes (and flushes): refused by an injected
    /// fault, and a success ends a failure streak.
    fn write<T>(&self, op: impl FnOnce(&Trees) -> Result<T>) -> Result<T> {
        if let Some(error) = self.injected_fault() {
            self.inner.needs_reopen.store(true, Ordering::SeqCst);
            self.record_failure(&error);
            return Err(error);
        }
        let res = self.with(op)?;
        self.clear_failure();
        Ok(res)
    }

    fn flush_trees(&self, t: &Trees) -> Result<()> {
        t.db.flush().map(drop).map_err(|e| self.db_err(e))
    }

    /// Makes everything written so far durable. Called before acknowledging a state change.
    pub fn flush(&self) -> Result<()> {
        self.write(|t| self.flush_trees(t))
    }

    // --- meta ---

    /// Reads a named value.
    pub fn get_meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let bytes = self.with(|t| t.meta.get(name).map_err(|e| self.db_err(e)))?;
        bytes.map(|b| Self::decode("meta", &b)).transpose()
    }

    /// Writes a named value (flushed).
    pub fn set_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let bytes = Self::encode("meta", value)?;
        self.write(|t| {
            t.meta.insert(name, bytes).map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Removes a named value (flushed).
    pub fn remove_meta(&self, name: &str) -> Result<()> {
        self.write(|t| {
            t.meta.remove(name).map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    // --- commits ---

    /// Records a commit unless it was seen before (same revision and kind). Returns whether it
    /// was new. Flushed.
    pub fn record_commit(&self, commit: &CommitRecord) -> Result<bool> {
        let ix_key = match &commit.kind {
            CommitKind::BranchDeleted => format!("deleted:{}", commit.revision),
            _ => commit.revision.0.clone(),
        };
        let value = Self::encode("commits", commit)?;
        self.write(|t| {
            let new = (&t.meta, &t.commits, &t.commit_ix)
                .transaction(|(meta, commits, commit_ix)| {
                    if commit_ix.get(ix_key.as_bytes())?.is_some() {
                        return Ok(false);
                    }
                    let seq = next_in(meta, Counter::Commits)?;
                    commits.insert(&seq.to_be_bytes(), value.clone())?;
                    commit_ix.insert(ix_key.as_bytes(), &seq.to_be_bytes())?;
                    Ok(true)
                })
                .map_err(|e| self.tx_err(e))?;
            if new {
                self.flush_trees(t)?;
            }
            Ok(new)
        })
    }

    /// The record of a commit, if seen.
    pub fn commit(&self, revision: &Revision) -> Result<Option<CommitRecord>> {
        let bytes = self.with(|t| {
            let Some(seq) = t.commit_ix.get(&revision.0).map_err(|e| self.db_err(e))? else {
                return Ok(None);
            };
            t.commits.get(seq).map_err(|e| self.db_err(e))
        })?;
        bytes.map(|b| Self::decode("commits", &b)).transpose()
    }

    /// Commits seen, newest first.
    pub fn commits(&self, limit: usize) -> Result<Vec<CommitRecord>> {
        self.with(|t| {
            t.commits
                .iter()
                .rev()
                .take(limit)
                .map(|kv| {
                    let (_, v) = kv.map_err(|e| self.db_err(e))?;
                    Self::decode("commits", &v)
                })
                .collect()
        })
    }

    // --- rollouts ---

    /// Inserts or updates a rollout (flushed), pruning beyond the retention on insert.
    pub fn put_rollout(&self, rollout: &Rollout) -> Result<()> {
        let value = Self::encode("rollouts", rollout)?;
        self.write(|t| {
            let created = (&t.rollouts, &t.rollout_ix)
                .transaction(|(rollouts, ix)| Self::put_rollout_in(rollouts, ix, rollout, &value))
                .map_err(|e| self.tx_err(e))?;
            if created {
                self.prune(t)?;
            }
            self.flush_trees(t)
        })
    }

    /// Writes a rollout record (`value`, its encoding) inside a transaction and moves its index
    /// entries and state counters with it. Returns whether the rollout is new.
    fn put_rollout_in(
        rollouts: &TransactionalTree,
        ix: &TransactionalTree,
        record: &Rollout,
        value: &[u8],
    ) -> TxResult<bool> {
        let previous = rollouts.insert(&record.id.0.to_be_bytes(), value)?;
        let old = match previous {
            Some(bytes) => Some(Self::decode::<Rollout>("rollouts", &bytes).map_err(abort)?),
            None => None,
        };
        index::update(ix, old.as_ref(), Some(record))?;
        Ok(old.is_none())
    }

    /// Creates a rollout with a fresh id (the next of the rollout counter) from a template
    /// whose id is ignored.
    pub fn create_rollout(&self, mut rollout: Rollout) -> Result<Rollout> {
        let created = self.write(|t| {
            let created = (&t.meta, &t.rollouts, &t.rollout_ix)
                .transaction(|(meta, rollouts, ix)| {
                    let mut record = rollout.clone();
                    record.id = RolloutId(next_in(meta, Counter::Rollouts)?);
                    let value = Self::encode("rollouts", &record).map_err(abort)?;
                    Self::put_rollout_in(rollouts, ix, &record, &value)?;
                    Ok(record)
                })
                .map_err(|e| self.tx_err(e))?;
            self.prune(t)?;
            self.flush_trees(t)?;
            Ok(created)
        })?;
        rollout.id = created.id;
        Ok(rollout)
    }

    /// Creates several rollouts, each with its first timeline events, in one transaction and one
    /// flush (a push that touches a thousand fleets is one write, not three thousand). Returns
    /// the rollouts with their ids; events are published to followers.
    pub fn create_rollouts(&self, batch: Vec<(Rollout, Vec<Event>)>) -> Result<Vec<Rollout>> {
        let batch: Vec<(Rollout, Vec<Event>)> = batch
            .into_iter()
            .map(|(rollout, events)| {
                let events = events
                    .into_iter()
                    .map(|mut e| {
                        e.message = crate::error::redact(&e.message);
                        e.fleet = rollout.fleet.clone();
                        e.revision = Some(rollout.revision.clone());
                        e
                    })
                    .collect();
                (rollout, events)
            })
            .collect();
        let (created, published) = self.write(|t| {
            let written = (&t.meta, &t.rollouts, &t.events, &t.event_seq, &t.rollout_ix)
                .transaction(|(meta, rollouts, tree, event_seq, ix)| {
                    let mut created = Vec::with_capacity(batch.len());
                    let mut published = Vec::new();
                    for (rollout, events) in &batch {
                        let mut record = rollout.clone();
                        record.id = RolloutId(next_in(meta, Counter::Rollouts)?);
                        let value = Self::encode("rollouts", &record).map_err(abort)?;
                        Self::put_rollout_in(rollouts, ix, &record, &value)?;
                        for event in events {
                            let mut event = event.clone();
                            event.rollout = record.id;
                            event.seq = next_in(meta, Counter::Events)?;
                            let bytes = Self::encode_event(&event).map_err(abort)?;
                            tree.insert(event_key(&event), bytes)?;
                            event_seq
                                .insert(&event.seq.to_be_bytes(), &event.rollout.0.to_be_bytes())?;
                            published.push(event);
                        }
                        created.push(record);
                    }
                    Ok((created, published))
                })
                .map_err(|e| self.tx_err(e))?;
            self.prune(t)?;
            self.flush_trees(t)?;
            Ok(written)
        })?;
        self.publish(&published);
        Ok(created)
    }

    /// Writes a rollout together with instance journal entries and timeline events, in one
    /// transaction (flushed): after a crash either all of them are on disk or none is. Returns
    /// the journal entries and events with their sequence numbers; events are published to
    /// followers.
    pub fn record_step(
        &self,
        rollout: &Rollout,
        journal: Vec<InstanceEvent>,
        events: Vec<Event>,
    ) -> Result<(Vec<InstanceEvent>, Vec<Event>)> {
        let value = Self::encode("rollouts", rollout)?;
        let events: Vec<Event> = events
            .into_iter()
            .map(|mut e| {
                e.message = crate::error::redact(&e.message);
                e.fleet = rollout.fleet.clone();
                e.revision = Some(rollout.revision.clone());
                e
            })
            .collect();
        let written = self.write(|t| {
            let written =
                (&t.meta, &t.rollouts, &t.instances, &t.events, &t.event_seq, &t.rollout_ix)
                    .transaction(|(meta, rollouts, instances, events_tree, event_seq, ix)| {
                        Self::put_rollout_in(rollouts, ix, rollout, &value)?;
                        let mut journal = journal.clone();
                        for entry in &mut journal {
                            entry.seq = next_in(meta, Counter::Instances)?;
                            let bytes = Self::encode("instances", entry).map_err(abort)?;
                            instances.insert(instance_key(entry), bytes)?;
                        }
                        let mut events = events.clone();
                        for event in &mut events {
                            event.seq = next_in(meta, Counter::Events)?;
                            let bytes = Self::encode_event(event).map_err(abort)?;
                            events_tree.insert(event_key(event), bytes)?;
                            event_seq
                                .insert(&event.seq.to_be_bytes(), &event.rollout.0.to_be_bytes())?;
                        }
                        Ok((journal, events))
                    })
                    .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)?;
            Ok(written)
        })?;
        self.publish(&written.1);
        Ok(written)
    }

    /// One rollout.
    pub fn rollout(&self, id: RolloutId) -> Result<Rollout> {
        match self.with(|t| t.rollouts.get(id.0.to_be_bytes()).map_err(|e| self.db_err(e)))? {
            Some(bytes) => Self::decode("rollouts", &bytes),
            None => Err(StoreError::NotFound { what: "rollout", id: id.to_string() }),
        }
    }

    /// Rollouts matching `filter`, newest first. Reads through the narrowest index the filter
    /// allows (fleet and state, fleet, commit, state), so a page costs what it returns.
    pub fn rollouts(&self, filter: &RolloutFilter) -> Result<Vec<Rollout>> {
        let before = filter.before.map_or(u64::MAX, |id| id.0);
        let limit = filter.limit.unwrap_or(usize::MAX);
        let matches = |rollout: &Rollout| {
            !(filter.fleet.as_ref().is_some_and(|f| rollout.fleet.as_ref() != Some(f))
                || filter.state.is_some_and(|s| rollout.state != s)
                || filter
                    .commit
                    .as_ref()
                    .is_some_and(|c| !rollout.revision.0.starts_with(c.as_str())))
        };
        self.with(|t| {
            let ids: Box<dyn Iterator<Item = sled::Result<u64>>> =
                match (&filter.fleet, filter.state, &filter.commit) {
                    (Some(fleet), Some(state), _) => Box::new(index::ids_rev(
                        &t.rollout_ix,
                        index::prefix(b'g', &[fleet, state.as_str()]),
                        before,
                    )),
                    (Some(fleet), None, _) => Box::new(index::ids_rev(
                        &t.rollout_ix,
                        index::prefix(b'f', &[fleet]),
                        before,
                    )),
                    (None, _, Some(commit)) => {
                        // A prefix may match several commits: merge their ids, newest first.
                        let mut key = vec![b'r'];
                        key.extend_from_slice(commit.as_bytes());
                        let mut ids = Vec::new();
                        for k in t.rollout_ix.scan_prefix(key).keys() {
                            let id = index::id_of(&k.map_err(|e| self.db_err(e))?);
                            if id < before {
                                ids.push(id);
                            }
                        }
                        ids.sort_unstable_by(|a, b| b.cmp(a));
                        Box::new(ids.into_iter().map(Ok))
                    }
                    (None, Some(state), None) => Box::new(index::ids_rev(
                        &t.rollout_ix,
                        index::prefix(b's', &[state.as_str()]),
                        before,
                    )),
                    (None, None, None) => {
                        let mut out = Vec::new();
                        for kv in t.rollouts.range(..before.to_be_bytes()).rev() {
                            if out.len() >= limit {
                                break;
                            }
                            let (_, v) = kv.map_err(|e| self.db_err(e))?;
                            out.push(Self::decode("rollouts", &v)?);
                        }
                        return Ok(out);
                    }
                };
            let mut out = Vec::new();
            for id in ids {
                if out.len() >= limit {
                    break;
                }
                let id = id.map_err(|e| self.db_err(e))?;
                // An index entry without its record would be a bug; skip it rather than fail
                // every listing.
                let Some(bytes) = t.rollouts.get(id.to_be_bytes()).map_err(|e| self.db_err(e))?
                else {
                    continue;
                };
                let rollout: Rollout = Self::decode("rollouts", &bytes)?;
                if matches(&rollout) {
                    out.push(rollout);
                }
            }
            Ok(out)
        })
    }

    /// Rollouts not yet in a terminal state, oldest first (what a restart resumes). Reads the
    /// state index: the cost follows the unfinished rollouts, not the history.
    pub fn active_rollouts(&self) -> Result<Vec<Rollout>> {
        let mut out = Vec::new();
        for state in crate::rollout::state::ALL_STATES.into_iter().filter(|s| !s.is_terminal()) {
            out.extend(
                self.rollouts(&RolloutFilter { state: Some(state), ..RolloutFilter::default() })?,
            );
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// How many rollouts are in each state (every state listed), from the counters kept on
    /// write: O(states), whatever the history.
    pub fn rollout_counts(&self) -> Result<Vec<(RolloutState, u64)>> {
        self.with(|t| index::counts(&t.rollout_ix).map_err(|e| self.db_err(e)))
    }

    /// The fleets that have rollouts, by name (O(fleets): one seek per fleet).
    pub fn rollout_fleets(&self) -> Result<Vec<String>> {
        self.with(|t| {
            let mut names = Vec::new();
            let mut from = vec![b'f'];
            loop {
                let Some((key, _)) = t
                    .rollout_ix
                    .range(from.clone()..)
                    .next()
                    .transpose()
                    .map_err(|e| self.db_err(e))?
                else {
                    break;
                };
                if key.first() != Some(&b'f') {
                    break;
                }
                let Some(end) = key.iter().skip(1).position(|b| *b == 0) else { break };
                let name = &key[1..=end];
                names.push(String::from_utf8_lossy(name).into_owned());
                // Past every key of this fleet: `f` name `\x01`.
                from = vec![b'f'];
                from.extend_from_slice(name);
                from.push(1);
            }
            Ok(names)
        })
    }

    /// Removes the oldest finished rollouts (and their events) beyond the retention, one
    /// transaction each so the index and counters move with them.
    fn prune(&self, t: &Trees) -> Result<()> {
        let retention = self.inner.retention;
        if retention == 0 {
            return Ok(());
        }
        let total: u64 =
            index::counts(&t.rollout_ix).map_err(|e| self.db_err(e))?.iter().map(|(_, n)| n).sum();
        let Some(mut excess) = usize::try_from(total).ok().and_then(|n| n.checked_sub(retention))
        else {
            return Ok(());
        };
        let mut cursor = 0u64;
        while excess > 0 {
            let Some((key, v)) = t
                .rollouts
                .range(cursor.to_be_bytes()..)
                .next()
                .transpose()
                .map_err(|e| self.db_err(e))?
            else {
                break;
            };
            cursor = seq_suffix(&key).saturating_add(1);
            let rollout: Rollout = Self::decode("rollouts", &v)?;
            // Never prune history that is still in motion.
            if !rollout.state.is_terminal() {
                continue;
            }
            let mut event_keys = Vec::new();
            for ev in t.events.scan_prefix(&key).keys() {
                event_keys.push(ev.map_err(|e| self.db_err(e))?);
            }
            (&t.rollouts, &t.rollout_ix, &t.events, &t.event_seq)
                .transaction(|(rollouts, ix, events, event_seq)| {
                    rollouts.remove(&key)?;
                    index::update(ix, Some(&rollout), None)?;
                    for ek in &event_keys {
                        events.remove(ek)?;
                        event_seq.remove(&seq_suffix(ek).to_be_bytes())?;
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| self.tx_err(e))?;
            excess -= 1;
        }
        Ok(())
    }

    // --- events ---

    /// Appends an event to a rollout's timeline (flushed) and publishes it to followers.
    pub fn append_event(
        &self,
        rollout: RolloutId,
        level: Level,
        kind: EventKind,
        message: impl Into<String>,
        data: Option<serde_json::Value>,
    ) -> Result<Event> {
        let mut events = [Event::new(rollout, level, kind, message, data)];
        self.append_events(&mut events)?;
        let [event] = events;
        Ok(event)
    }

    /// Appends a `state` event recording that `rollout` moved `from` → `to` (flushed): the
    /// change is in typed fields ([`Event::change`]) and, as before, in `data`. Every place a
    /// rollout's state changes records it through here (the driver's `commit`, the operator's
    /// supersede/abort, commit-level records, which are created in their final state and so
    /// move from `pending`).
    pub fn append_state_change(
        &self,
        rollout: RolloutId,
        level: Level,
        from: RolloutState,
        to: RolloutState,
        message: impl Into<String>,
    ) -> Result<Event> {
        let data = serde_json::json!({ "from": from, "to": to });
        let mut event = Event::new(rollout, level, EventKind::State, message, Some(data));
        event.change = Some(StateChange { from, to });
        let mut events = [event];
        self.append_events(&mut events)?;
        let [event] = events;
        Ok(event)
    }

    /// Writes `rollout` (whose state moved `from` → `rollout.state`) together with the `state`
    /// event recording it, in one transaction (flushed): a kill never leaves a state change
    /// without its event, so a feed consumer sees every change.
    pub fn put_rollout_with_change(
        &self,
        rollout: &Rollout,
        from: RolloutState,
        level: Level,
        message: impl Into<String>,
    ) -> Result<Event> {
        let to = rollout.state;
        let data = serde_json::json!({ "from": from, "to": to });
        let mut event = Event::new(rollout.id, level, EventKind::State, message, Some(data));
        event.change = Some(StateChange { from, to });
        let (_, mut events) = self.record_step(rollout, Vec::new(), vec![event])?;
        events
            .pop()
            .ok_or_else(|| StoreError::NotFound { what: "event", id: "just written".into() })
    }

    /// Appends many events in one transaction and one flush (hook output lines arrive in
    /// bursts); assigns their sequence numbers and fills in each one's fleet and commit from
    /// its rollout.
    pub fn append_events(&self, events: &mut [Event]) -> Result<()> {
        for event in events.iter_mut() {
            event.message = crate::error::redact(&event.message);
        }
        let numbered = self.write(|t| {
            let numbered = (&t.meta, &t.rollouts, &t.events, &t.event_seq)
                .transaction(|(meta, rollouts, tree, event_seq)| {
                    let mut numbered = events.to_vec();
                    let mut owner: Option<(RolloutId, Option<String>, Option<Revision>)> = None;
                    for event in &mut numbered {
                        if owner.as_ref().is_none_or(|(id, _, _)| *id != event.rollout) {
                            let found = match rollouts.get(event.rollout.0.to_be_bytes())? {
                                Some(bytes) => {
                                    let r: Rollout =
                                        Self::decode("rollouts", &bytes).map_err(abort)?;
                                    (r.fleet, Some(r.revision))
                                }
                                None => (None, None),
                            };
                            owner = Some((event.rollout, found.0, found.1));
                        }
                        if let Some((_, fleet, revision)) = &owner {
                            event.fleet.clone_from(fleet);
                            event.revision.clone_from(revision);
                        }
                        event.seq = next_in(meta, Counter::Events)?;
                        let bytes = Self::encode_event(event).map_err(abort)?;
                        tree.insert(event_key(event), bytes)?;
                        event_seq
                            .insert(&event.seq.to_be_bytes(), &event.rollout.0.to_be_bytes())?;
                    }
                    Ok(numbered)
                })
                .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)?;
            Ok(numbered)
        })?;
        self.publish(&numbered);
        for (event, numbered) in events.iter_mut().zip(numbered) {
            *event = numbered;
        }
        Ok(())
    }

    /// Marks freshly flushed events durable and sends them to followers.
    fn publish(&self, events: &[Event]) {
        if let Some(high) = events.iter().map(|e| e.seq).max() {
            self.inner.durable_seq.fetch_max(high, Ordering::SeqCst);
        }
        for event in events {
            // Nobody following is fine.
            let _ = self.inner.feed.send(event.clone());
        }
    }

    /// Decodes a stored event, filling in what an older record lacks (its typed state change;
    /// its fleet and commit, looked up through `owner`).
    fn decode_event(
        &self,
        t: &Trees,
        bytes: &[u8],
        owner: &mut Option<(RolloutId, Option<String>, Option<Revision>)>,
    ) -> Result<Event> {
        let mut event = Self::decode::<Event>("events", bytes)?.upgrade();
        if event.revision.is_none() {
            if owner.as_ref().is_none_or(|(id, _, _)| *id != event.rollout) {
                let found = match t.rollouts.get(event.rollout.0.to_be_bytes()) {
                    Ok(Some(bytes)) => Self::decode::<Rollout>("rollouts", &bytes)
                        .map_or((None, None), |r| (r.fleet, Some(r.revision))),
                    Ok(None) => (None, None),
                    Err(e) => return Err(self.db_err(e)),
                };
                *owner = Some((event.rollout, found.0, found.1));
            }
            if let Some((_, fleet, revision)) = owner {
                event.fleet.clone_from(fleet);
                event.revision.clone_from(revision);
            }
        }
        Ok(event)
    }

    /// A rollout's events with `seq > after`, oldest first.
    pub fn events(&self, rollout: RolloutId, after: u64) -> Result<Vec<Event>> {
        let mut from = rollout.0.to_be_bytes().to_vec();
        from.extend_from_slice(&after.saturating_add(1).to_be_bytes());
        let mut to = rollout.0.to_be_bytes().to_vec();
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        self.with(|t| {
            let mut owner = None;
            t.events
                .range(from..=to)
                .map(|kv| {
                    let (_, v) = kv.map_err(|e| self.db_err(e))?;
                    self.decode_event(t, &v, &mut owner)
                })
                .collect()
        })
    }

    /// The feed: every rollout's events with `seq > after`, ascending, at most `limit` (capped
    /// at [`MAX_FEED_PAGE`]), and only events known durable. Reads the `event_seq` index from
    /// `after` on, so the cost is that of the page, not of the history. Sequence numbers
    /// increase but may have gaps where history was pruned (retention).
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let limit = limit.min(MAX_FEED_PAGE);
        let durable = self.durable_seq();
        if after >= durable || limit == 0 {
            return Ok(Vec::new());
        }
        let from = after.saturating_add(1).to_be_bytes();
        let to = durable.to_be_bytes();
        self.with(|t| {
            let mut out = Vec::with_capacity(limit.min(64));
            let mut owner = None;
            for kv in t.event_seq.range(from..=to) {
                if out.len() >= limit {
                    break;
                }
                let (seq, rollout) = kv.map_err(|e| self.db_err(e))?;
                let mut key = rollout.to_vec();
                key.extend_from_slice(&seq);
                // Pruned between the two reads: skip it, as if read a moment later.
                let Some(bytes) = t.events.get(&key).map_err(|e| self.db_err(e))? else {
                    continue;
                };
                out.push(self.decode_event(t, &bytes, &mut owner)?);
            }
            Ok(out)
        })
    }

    /// The highest event sequence number the feed shows (known flushed).
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable_seq.load(Ordering::SeqCst)
    }

    /// Live feed of every event appended from now on (for SSE followers).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.feed.subscribe()
    }

    // --- instances ---

    /// Appends to the per-instance journal (flushed).
    pub fn record_instance(&self, event: InstanceEvent) -> Result<InstanceEvent> {
        let mut written = self.record_instances(vec![event])?;
        written.pop().ok_or_else(|| StoreError::NotFound {
            what: "journal entry",
            id: "just written".into(),
        })
    }

    /// Appends several entries to the per-instance journal in one transaction (flushed): all of
    /// them are recorded or none is.
    pub fn record_instances(&self, entries: Vec<InstanceEvent>) -> Result<Vec<InstanceEvent>> {
        self.write(|t| {
            let written = (&t.meta, &t.instances)
                .transaction(|(meta, instances)| {
                    let mut entries = entries.clone();
                    for entry in &mut entries {
                        entry.seq = next_in(meta, Counter::Instances)?;
                        let bytes = Self::encode("instances", entry).map_err(abort)?;
                        instances.insert(instance_key(entry), bytes)?;
                    }
                    Ok(entries)
                })
                .map_err(|e| self.tx_err(e))?;
            self.flush_trees(t)?;
            Ok(written)
        })
    }

    /// A fleet's instance journal, oldest first.
    pub fn instance_journal(&self, fleet: &str) -> Result<Vec<InstanceEvent>> {
        let mut prefix = fleet.as_bytes().to_vec();
        prefix.push(0);
        self.with(|t| {
            t.instances
                .scan_prefix(prefix)
                .map(|kv| {
                    let (_, v) = kv.map_err(|e| self.db_err(e))?;
                    Self::decode("instances", &v)
                })
                .collect()
        })
    }

    // --- bakes ---

    /// A cached bake.
    pub fn bake(&self, key: &str) -> Result<Option<BakeRecord>> {
        let bytes = self.with(|t| t.bakes.get(key).map_err(|e| self.db_err(e)))?;
        bytes.map(|b| Self::decode("bakes", &b)).transpose()
    }

    /// Caches a bake (flushed).
    pub fn put_bake(&self, record: &BakeRecord) -> Result<()> {
        let value = Self::encode("bakes", record)?;
        self.write(|t| {
            t.bakes.insert(record.key.as_bytes(), value).map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Drops a cached bake (flushed): the next bake with this key bakes again. Garbage
    /// collection calls it before it deletes the image the entry names.
    pub fn remove_bake(&self, key: &str) -> Result<()> {
        self.write(|t| {
            t.bakes.remove(key.as_bytes()).map_err(|e| self.db_err(e))?;
            self.flush_trees(t)
        })
    }

    /// Every cached bake, in key order.
    pub fn bakes(&self) -> Result<Vec<BakeRecord>> {
        self.with(|t| {
            t.bakes
                .iter()
                .map(|kv| {
                    let (_, v) = kv.map_err(|e| self.db_err(e))?;
                    Self::decode("bakes", &v)
                })
                .collect()
        })
    }

    // --- deployed ---

    /// What a fleet runs now.
    pub fn deployed(&self, fleet: &str) -> Result<Option<Deployed>> {
        let bytes = self.with(|t| t.deployed.get(fleet).map_err(|e| self.db_err(e)))?;
        bytes.map(|b| Self::decode("deployed", &b)).transpose()
    }

    /// Forgets what a fleet runs (it was pruned: nothing runs), flushed.
    pub fn clear_deployed(&self, fleet: &str) -> Result<()> {
        self.write(|t| {
            t.deployed.remove(fleet.as_bytes()).map_err(|e| self.db_err(e))?;
            let latest = t.rollout_ix.get(index::LATEST_DEPLOYED).map_err(|e| self.db_err(e))?;
            if latest.as_deref() == Some(fleet.as_bytes()) {
                // The newest deployment went away: find the next newest (O(fleets), rare).
                self.index_latest_deployed(t)?;
            }
            self.flush_trees(t)
        })
    }

    /// Sets the `latest deployed` pointer from a scan of `deployed` (O(fleets)).
    fn index_latest_deployed(&self, t: &Trees) -> Result<()> {
        let mut newest: Option<Deployed> = None;
        for kv in t.deployed.iter() {
            let (_, v) = kv.map_err(|e| self.db_err(e))?;
            let d: Deployed = Self::decode("deployed", &v)?;
            if newest.as_ref().is_none_or(|n| d.at > n.at) {
                newest = Some(d);
            }
        }
        match newest {
            Some(d) => t.rollout_ix.insert(index::LATEST_DEPLOYED, d.fleet.as_bytes()),
            None => t.rollout_ix.remove(index::LATEST_DEPLOYED),
        }
        .map(drop)
        .map_err(|e| self.db_err(e))
    }

    /// The newest deployment of any fleet (what the signature gate verifies from): one read.
    pub fn latest_deployed(&self) -> Result<Option<Deployed>> {
        let bytes = self.with(|t| {
            let Some(fleet) =
                t.rollout_ix.get(index::LATEST_DEPLOYED).map_err(|e| self.db_err(e))?
            else {
                return Ok(None);
            };
            t.deployed.get(fleet).map_err(|e| self.db_err(e))
        })?;
        bytes.map(|b| Self::decode("deployed", &b)).transpose()
    }

    /// Every fleet with a deployed record, by name.
    pub fn deployed_fleets(&self) -> Result<Vec<String>> {
        self.with(|t| {
            let mut names = Vec::new();
            for kv in t.deployed.iter() {
                let (key, _) = kv.map_err(|e| self.db_err(e))?;
                names.push(String::from_utf8_lossy(&key).into_owned());
            }
            Ok(names)
        })
    }

    /// What every fleet runs now, in fleet order.
    pub fn deployed_all(&self) -> Result<Vec<Deployed>> {
        self.with(|t| {
            t.deployed
                .iter()
                .map(|kv| {
                    let (_, v) = kv.map_err(|e| self.db_err(e))?;
                    Self::decode("deployed", &v)
                })
                .collect()
        })
    }

    /// Records what a fleet runs now (flushed).
    pub fn set_deployed(&self, deployed: &Deployed) -> Result<()> {
        let value = Self::encode("deployed", deployed)?;
        self.write(|t| {
            let rescan = (&t.deployed, &t.rollout_ix)
                .transaction(|(tree, ix)| {
                    let latest = match ix.get(index::LATEST_DEPLOYED)? {
                        Some(fleet) => match tree.get(&fleet)? {
                            Some(bytes) => {
                                Some(Self::decode::<Deployed>("deployed", &bytes).map_err(abort)?)
                            }
                            None => None,
                        },
                        None => None,
                    };
                    tree.insert(deployed.fleet.as_bytes(), value.as_slice())?;
                    match latest {
                        Some(l) if deployed.at < l.at => {
                            // This fleet was the newest and moved back in time: rescan.
                            Ok(l.fleet == deployed.fleet)
                        }
                        _ => {
                            ix.insert(index::LATEST_DEPLOYED, deployed.fleet.as_bytes())?;
                            Ok(false)
                        }
                    }
                })
                .map_err(|e| self.tx_err(e))?;
            if rescan {
                self.index_latest_deployed(t)?;
            }
            self.flush_trees(t)
        })
    }
}

#[cfg(test)]
mod tests;
