//! How values are laid out on disk.
//!
//! Schema 2 stores each record as one version byte ([`FORMAT_V2`]) followed by the record's
//! JSON (no envelope), LZ4-compressed against a fixed dictionary of the field names and values
//! kiln writes ([`DICT`]). Records are small (an event is ~250 bytes of JSON), so plain
//! compression finds little to reuse inside one record; against the dictionary most field names
//! and common values become 2-byte back references. JSON stays the model, so every serde shape
//! (internally tagged enums, `serde_json::Value` data, defaults for fields added later) reads as
//! before, and the API's JSON is unchanged.
//!
//! Schema 1 values (`{"v":1,"r":…}`, first byte `{`) still decode, so a store is readable while
//! it is being migrated. `meta` values stay JSON envelopes (tiny, and an older kiln reads the
//! `schema_version` and stops with a clear error instead of failing to decode it).
//!
//! **The dictionary is part of the format**: changing one byte of it makes every stored record
//! unreadable. A new dictionary needs a new version byte (and keeps this one for reading).

use serde::{Serialize, de::DeserializeOwned};

/// The first byte of a schema-2 record.
pub const FORMAT_V2: u8 = 2;

/// The largest record a stored size header may announce (a corrupt header must not allocate
/// gigabytes).
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// Shared prefix for compression. Frozen: see the module docs.
pub const DICT: &[u8] = concat!(
    r#"{"fleet":"","revision":"","image":null,"rollout":null,"action":"launched","at":"2026-01-01T00:00:00.000000000Z","reason":null}"#,
    r#"{"seq":1,"rollout":1,"at":"2026-01-01T00:00:00.000000000Z","level":"info","kind":"state","change":{"from":"pending","to":"baking"},"message":"","data":{"from":"pending","to":"baking"}}"#,
    r#"{"level":"warn","kind":"hook.stderr","message":"","level":"error","kind":"hook.stdout","message":""}"#,
    r#""kind":"bake.start","kind":"bake.done","kind":"bake.cached","kind":"reconcile.start","kind":"reconcile.done","kind":"instance.launched","kind":"instance.healthy","kind":"instance.attached","kind":"instance.drained","kind":"instance.terminated","kind":"plan","kind":"rollout","#,
    r#""data":{"stage":"","image":"","instance":"","seconds":0.0,"exit":0,"outputs":{}}"#,
    r#""to":"reconciling","to":"rolling","to":"succeeded","to":"failed","to":"superseded","to":"skipped","to":"rolled_back","to":"aborted","#,
    r#"{"key":"","fleet":"","stage":"","image":"","revision":"","rollout":1,"baked_at":"2026-01-01T00:00:00Z","outputs":{}}"#,
    r#"{"fleet":"","revision":"","image":"","rollout":1,"trees":{},"at":"2026-01-01T00:00:00Z"}"#,
    r#"{"revision":"","parents":[""],"summary":"","author":" <>","committed_at":"2026-01-01T00:00:00Z","seen_at":"2026-01-01T00:00:00.000000000Z","kind":{"kind":"push"},"trigger":"poll","tip":true}"#,
    r#""rolling":{"todo":[],"launched":[],"done":[],"seen":[],"target":"","rollback":false,"failure":null,"aborting":false,"ending":null,"intent":null,"next_slot":0,"batch_left":0,"batch":0,"canary_done":true,"canary_hold":false,"probes":{},"attached":[],"last_progress":"2026-01-01T00:00:00.000000000Z","failed":{}},"#,
    r#"{"since":"2026-01-01T00:00:00.000000000Z","ok_streak":0,"healthy_since":null,"last_at":null,"last_error":null}"#,
    r#"{"id":1,"fleet":"","revision":"","summary":"","trigger":"poll","origin":{"kind":"commit"},"state":"succeeded","paused_from":null,"plan":{"bake":["app"],"reconcile":true,"roll":true,"reason":""},"image":"","stage_images":{"app":""},"previous_image":null,"outputs":{},"reason":null,"created_at":"2026-01-01T00:00:00.000000000Z","started_at":"2026-01-01T00:00:00.000000000Z","finished_at":"2026-01-01T00:00:00.000000000Z","not_before":null,"attempt":0,"rolling":null,"verified":null}"#,
)
.as_bytes();

/// Why a value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The JSON inside was not the expected shape.
    #[error("bad record")]
    Json(#[from] serde_json::Error),
    /// The compressed bytes were damaged.
    #[error("damaged compressed record: {0}")]
    Compressed(String),
    /// Written by a newer kiln (its version byte or envelope version).
    #[error("record format {0} is newer than this kiln understands")]
    Newer(u32),
}

/// Encodes a record in the current format.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(value)?;
    let compressed = lz4_flex::block::compress_prepend_size_with_dict(&json, DICT);
    let mut out = Vec::with_capacity(1 + compressed.len());
    out.push(FORMAT_V2);
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// The JSON text of a stored record in any format this build reads (schema 1's envelope is
/// returned whole; see [`decode`]).
fn json_of(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CodecError> {
    match bytes.first() {
        Some(&FORMAT_V2) => {
            let body = &bytes[1..];
            let size = body
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(usize::MAX, |b| u32::from_le_bytes(b) as usize);
            if size > MAX_RECORD {
                return Err(CodecError::Compressed(format!("size header {size} out of range")));
            }
            lz4_flex::block::decompress_size_prepended_with_dict(body, DICT)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| CodecError::Compressed(e.to_string()))
        }
        Some(b'{') | None => Ok(std::borrow::Cow::Borrowed(bytes)),
        Some(&other) => Err(CodecError::Newer(u32::from(other))),
    }
}

#[derive(serde::Deserialize)]
struct EnvelopeIn<T> {
    v: u32,
    r: T,
}

/// Decodes a record stored in the current format or schema 1's JSON envelope.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.first() == Some(&FORMAT_V2) {
        return Ok(serde_json::from_slice(&json_of(bytes)?)?);
    }
    let json = json_of(bytes)?;
    let envelope: EnvelopeIn<T> = serde_json::from_slice(&json)?;
    if envelope.v > super::SCHEMA_VERSION {
        return Err(CodecError::Newer(envelope.v));
    }
    Ok(envelope.r)
}

/// True when `bytes` is in the current format (the migration re-encodes the rest).
pub fn is_current(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT_V2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_schema_1() {
        let value = serde_json::json!({"seq": 7, "message": "hello", "data": {"a": [1, 2]}});
        let bytes = encode(&value).unwrap();
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(decode::<serde_json::Value>(&bytes).unwrap(), value);
        let v1 = br#"{"v":1,"r":{"seq":7}}"#;
        assert_eq!(decode::<serde_json::Value>(v1).unwrap(), serde_json::json!({"seq": 7}));
    }

    #[test]
    fn refuses_newer_and_damaged_records() {
        assert!(matches!(decode::<serde_json::Value>(&[9, 1, 2]), Err(CodecError::Newer(9))));
        assert!(matches!(
            decode::<serde_json::Value>(br#"{"v":99,"r":1}"#),
            Err(CodecError::Newer(99))
        ));
        let mut bytes = encode(&serde_json::json!({"message": "x".repeat(100)})).unwrap();
        bytes[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode::<serde_json::Value>(&bytes), Err(CodecError::Compressed(_))));
        bytes.truncate(8);
        bytes[1..5].copy_from_slice(&100u32.to_le_bytes());
        assert!(decode::<serde_json::Value>(&bytes).is_err());
    }
}
