//! Shared test support. Each file belongs to one area; `#![allow(dead_code)]` because every
//! test crate compiles all of them and uses some.
#![allow(dead_code)]

pub mod daemon;
pub mod fleet;
pub mod git;
pub mod hooks;
