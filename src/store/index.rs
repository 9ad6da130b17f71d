//! The `rollout_ix` tree: secondary indexes and counters over `rollouts`, written in the same
//! transaction as the rollout they describe, so no read path scans history.
//!
//! | key                                  | value        | answers                              |
//! |--------------------------------------|--------------|--------------------------------------|
//! | `f` fleet `\0` id                    | empty        | a fleet's rollouts, newest first     |
//! | `g` fleet `\0` state `\0` id         | empty        | a fleet's rollouts in a state        |
//! | `s` state `\0` id                    | empty        | rollouts in a state (active ones)    |
//! | `r` revision `\0` id                 | empty        | a commit's rollouts (prefix match)   |
//! | `#` state                            | u64 (BE)     | how many rollouts are in the state   |
//! | `D`                                  | fleet        | the fleet deployed last ([`LATEST_DEPLOYED`]) |
//!
//! Ids are big-endian, so each range lists rollouts in creation order, which is also time
//! order (ids are dense and increasing). Commit-level records (no fleet) have no `f`/`g` keys.

use sled::transaction::TransactionalTree;

use crate::rollout::state::{Rollout, RolloutState};

/// The key naming the fleet whose deployment is the newest.
pub const LATEST_DEPLOYED: &[u8] = b"D";

/// The `meta` key recording that `rollout_ix` is complete for this schema.
pub const INDEXED: &str = "ix.rollouts";

fn with_id(mut key: Vec<u8>, id: u64) -> Vec<u8> {
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// `tag` ++ parts joined by `\0` ++ `\0`: the prefix of every key under these parts.
pub fn prefix(tag: u8, parts: &[&str]) -> Vec<u8> {
    let mut key = vec![tag];
    for part in parts {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key
}

/// The count key of a state.
pub fn count_key(state: RolloutState) -> Vec<u8> {
    let mut key = vec![b'#'];
    key.extend_from_slice(state.as_str().as_bytes());
    key
}

/// Every index key of a rollout.
pub fn keys(r: &Rollout) -> Vec<Vec<u8>> {
    let id = r.id.0;
    let state = r.state.as_str();
    let mut out = vec![
        with_id(prefix(b's', &[state]), id),
        with_id(prefix(b'r', &[r.revision.as_str()]), id),
    ];
    if let Some(fleet) = r.fleet.as_deref() {
        out.push(with_id(prefix(b'f', &[fleet]), id));
        out.push(with_id(prefix(b'g', &[fleet, state]), id));
    }
    out
}

/// The id at the end of an index key.
pub fn id_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map_or(0, u64::from_be_bytes)
}

fn read_count(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes)
}

/// Moves the index from `old` (the stored record, if any) to `new` (`None`: removed), inside the
/// transaction that writes the rollout.
pub fn update(
    ix: &TransactionalTree,
    old: Option<&Rollout>,
    new: Option<&Rollout>,
) -> Result<(), sled::transaction::UnabortableTransactionError> {
    let old_keys = old.map(keys).unwrap_or_default();
    let new_keys = new.map(keys).unwrap_or_default();
    for key in &old_keys {
        if !new_keys.contains(key) {
            ix.remove(key.as_slice())?;
        }
    }
    for key in &new_keys {
        if !old_keys.contains(key) {
            ix.insert(key.as_slice(), &[][..])?;
        }
    }
    let (from, to) = (old.map(|r| r.state), new.map(|r| r.state));
    if from != to {
        if let Some(state) = from {
            let key = count_key(state);
            let n = read_count(ix.get(&key)?.as_deref()).saturating_sub(1);
            ix.insert(key, &n.to_be_bytes())?;
        }
        if let Some(state) = to {
            let key = count_key(state);
            let n = read_count(ix.get(&key)?.as_deref()) + 1;
            ix.insert(key, &n.to_be_bytes())?;
        }
    }
    Ok(())
}

/// Ids under `prefix` below `before`, newest first.
pub fn ids_rev(
    tree: &sled::Tree,
    prefix: Vec<u8>,
    before: u64,
) -> impl Iterator<Item = sled::Result<u64>> + use<> {
    let to = with_id(prefix.clone(), before);
    tree.range(prefix..to).rev().map(|kv| kv.map(|(k, _)| id_of(&k)))
}

/// The count of rollouts per state, read from the counters.
pub fn counts(tree: &sled::Tree) -> sled::Result<Vec<(RolloutState, u64)>> {
    crate::rollout::state::ALL_STATES
        .iter()
        .map(|&state| Ok((state, read_count(tree.get(count_key(state))?.as_deref()))))
        .collect()
}

/// Rebuilds the whole index from `rollouts` (a data dir written before it existed, or one
/// whose rebuild a crash interrupted: [`INDEXED`] is set only after this completes).
pub fn rebuild(
    ix: &sled::Tree,
    rollouts: &sled::Tree,
    decode: impl Fn(&[u8]) -> Option<Rollout>,
) -> sled::Result<()> {
    ix.clear()?;
    let mut counts = std::collections::HashMap::<RolloutState, u64>::new();
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    for kv in rollouts.iter() {
        let (_, v) = kv?;
        let Some(rollout) = decode(&v) else { continue };
        for key in keys(&rollout) {
            batch.insert(key, &[][..]);
        }
        *counts.entry(rollout.state).or_default() += 1;
        pending += 1;
        if pending >= 4096 {
            ix.apply_batch(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    for (state, n) in counts {
        batch.insert(count_key(state), &n.to_be_bytes());
    }
    ix.apply_batch(batch)
}
