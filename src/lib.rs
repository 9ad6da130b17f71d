//! kiln: a GitOps operator for immutable servers.
//!
//! A push to the watched branch is noticed ([`source`]), planned per fleet ([`planner`]), baked
//! into an image ([`bake`]), reconciled ([`reconcile`]) and rolled onto the fleet's instances
//! ([`rollout`]) through a [`provider`], with every step recorded in the [`store`]. The
//! [`server`] receives webhooks and serves the API the [`cli`] reads. See ARCHITECTURE.md.

/// `kiln --version`: the package version and the commit it was built from (`unknown` when built
/// outside a git checkout without `$KILN_COMMIT`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KILN_COMMIT"), ")");

pub mod cli;
pub mod client;
pub mod daemon;
pub mod drift;
pub mod error;
pub mod fsutil;
pub mod gc;
pub mod hooks;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod operator;
pub mod pipeline;
pub mod planner;
pub mod provider;
pub mod quickstart;
pub mod retry;
pub mod rollout;
pub mod server;
pub mod source;
pub mod store;
pub mod verify;
