//! Identifier newtypes and the clock.
//!
//! Every identifier that crosses a module boundary is a newtype with `Display`, so a function
//! taking a revision, an image and an instance cannot have its arguments swapped silently.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Wall-clock UTC time. Persisted, so it survives restarts (unlike `tokio::time::Instant`).
pub type Timestamp = chrono::DateTime<chrono::Utc>;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

string_id!(
    /// A git commit id (40 hex digits).
    Revision
);
string_id!(
    /// A machine image id as reported by a bake hook (an AMI id, a directory path, ...).
    ImageRef
);
string_id!(
    /// A provider's instance id.
    InstanceId
);

impl Revision {
    /// The abbreviated form shown in tables (first 8 characters).
    pub fn short(&self) -> &str {
        self.0.get(..8).unwrap_or(&self.0)
    }
}

/// A rollout's id: monotonic, so ordering by id is ordering by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RolloutId(pub u64);

impl fmt::Display for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for RolloutId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim_start_matches('#').parse().map(RolloutId)
    }
}

/// Where wall-clock time comes from. Pure logic takes `now` as a parameter instead.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one sanctioned read of the system clock.
    fn now(&self) -> Timestamp {
        chrono::Utc::now()
    }
}

/// The current time from the system clock; for code at the edges (CLI rendering, records).
pub fn now() -> Timestamp {
    SystemClock.now()
}
