//! Shared test support. Each file belongs to one area; dead code is allowed because every
//! test crate compiles all of them and uses some.
#![allow(dead_code)]
// Test support may unwrap (a failure is a test failure) and block: the tests are synchronous.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

pub mod cloud;
pub mod daemon;
pub mod disk;
pub mod fleet;
pub mod git;
pub mod hooks;
pub mod metrics;
