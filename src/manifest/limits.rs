//! How big a manifest may be, and the pass that enforces it before anything is built.
//!
//! A manifest comes from whoever can push. Without limits a 50 MB file (12 M `paths`) kept the
//! operator planning for minutes, and YAML aliases (`&a [*b, *b, …]` nested a few levels) grew a
//! 1 MB file to gigabytes once expanded. So, in order:
//!
//! 1. the file's size is checked before it is read (the daemon asks git for the blob's size
//!    first; `kiln validate` looks at the file's metadata): [`MAX_MANIFEST_BYTES`];
//! 2. a counting pass walks the document as serde_yaml replays it (aliases expanded) without
//!    building anything, and stops at [`MAX_NODES`] values or [`MAX_SCALAR_BYTES`] bytes of
//!    scalars. Aliases stay legal (anchors for a shared policy are fine), but what they expand to
//!    is bounded, and the pass fails before the expansion is ever materialised. serde_yaml's own
//!    repetition limit (100 alias replays per event) is far too loose to protect memory;
//! 3. [`validate`](super::validate) caps each list ([`MAX_FLEETS`], [`MAX_STAGES`],
//!    [`MAX_PATHS`], [`MAX_EXEC_ENV`]), which bounds the planner's git lookups per commit.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// The largest `kiln.yaml` read, in bytes (1 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// The most YAML values (scalars, sequences, mappings) the manifest may hold, aliases expanded.
pub const MAX_NODES: usize = 200_000;
/// The most bytes of scalar text the manifest may hold, aliases expanded (4 MiB).
pub const MAX_SCALAR_BYTES: usize = 4 * 1024 * 1024;
/// The most fleets in one manifest.
pub const MAX_FLEETS: usize = 5_000;
/// The most bake stages of one fleet.
pub const MAX_STAGES: usize = 20;
/// The most `paths` entries of one fleet.
pub const MAX_PATHS: usize = 100;
/// The most `rollout.exec.env` entries of one fleet.
pub const MAX_EXEC_ENV: usize = 100;

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exceeded {
    Nodes,
    ScalarBytes,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Nodes => write!(
                f,
                "the manifest expands to more than {MAX_NODES} YAML values (the limit; \
                 check for YAML aliases `*name` repeating large anchors)"
            ),
            Exceeded::ScalarBytes => write!(
                f,
                "the manifest expands to more than {MAX_SCALAR_BYTES} bytes of text (the limit; \
                 check for YAML aliases `*name` repeating large anchors)"
            ),
        }
    }
}

/// Counts what a deserializer produces, failing as soon as a budget runs out.
struct Budget {
    nodes: Cell<usize>,
    bytes: Cell<usize>,
    exceeded: Cell<Option<Exceeded>>,
}

impl Budget {
    fn node<E: de::Error>(&self, scalar_bytes: usize) -> Result<(), E> {
        let nodes = self.nodes.get() + 1;
        let bytes = self.bytes.get().saturating_add(scalar_bytes);
        self.nodes.set(nodes);
        self.bytes.set(bytes);
        let exceeded = if nodes > MAX_NODES {
            Some(Exceeded::Nodes)
        } else if bytes > MAX_SCALAR_BYTES {
            Some(Exceeded::ScalarBytes)
        } else {
            None
        };
        match exceeded {
            Some(which) => {
                self.exceeded.set(Some(which));
                Err(E::custom(which))
            }
            None => Ok(()),
        }
    }
}

/// Walks one value (and everything under it), counting.
#[derive(Clone, Copy)]
struct Count<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.node(1)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.0.node(8)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.node(8)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.node(8)
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.0.node(value.len())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.node(0)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.node(0)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.node(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.node(0)?;
        while map.next_entry_seed(self, self)?.is_some() {}
        Ok(())
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag is a scalar, the value anything.
        use serde::de::VariantAccess;
        self.0.node(0)?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

/// Walks `deserializer`'s document: `Some((which, error))` when a budget ran out (the error
/// carries serde_yaml's location), `None` when it fits, or is broken in a way the real parse
/// reports better.
pub(super) fn check<'de, D: Deserializer<'de>>(deserializer: D) -> Option<(Exceeded, D::Error)> {
    let budget = Budget { nodes: Cell::new(0), bytes: Cell::new(0), exceeded: Cell::new(None) };
    match Count(&budget).deserialize(deserializer) {
        Ok(()) => None,
        Err(error) => budget.exceeded.get().map(|which| (which, error)),
    }
}
