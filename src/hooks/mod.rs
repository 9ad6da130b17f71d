//! Running the repo's hooks: the only code that spawns processes.
//!
//! OWNER: hooks helper. The signatures below are the contract other modules code against;
//! bodies are filled in by the owner.

pub mod contract;
pub mod packer;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{Classify, ErrorClass};

/// Which stream a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One hook invocation.
#[derive(Debug, Clone)]
pub struct HookSpec {
    /// Display name for logs and errors, e.g. `bake web/app`.
    pub name: String,
    /// The executable (absolute path).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory (a clean export of the commit).
    pub workdir: PathBuf,
    /// `KILN_*` inputs; the allow-listed daemon environment is added by the runner.
    pub env: Vec<(String, String)>,
    /// Kill the process group after this long.
    pub timeout: Duration,
}

/// What a successful hook produced.
#[derive(Debug, Clone, Default)]
pub struct HookOutcome {
    /// `key=value` lines from `$KILN_OUTPUT` (plus parsed Packer / Terraform output).
    pub outputs: BTreeMap<String, String>,
    /// Lines captured (stdout + stderr).
    pub lines: u64,
    /// Whether capture hit the size cap.
    pub truncated: bool,
    /// Wall time.
    pub elapsed: Duration,
    /// Captured stdout (capped), for parsers that read it (Packer `-machine-readable`).
    pub stdout: String,
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The executable could not be started.
    #[error("failed to start hook `{name}` ({program})")]
    Spawn {
        /// Hook name.
        name: String,
        /// Program path.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Ran past its timeout; its whole process group was killed.
    #[error("hook `{name}` timed out after {}", crate::manifest::format_duration(*timeout))]
    TimedOut {
        /// Hook name.
        name: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Exited non-zero (75 = transient).
    #[error("hook `{name}` exited with status {code}{}", if stderr_tail.is_empty() { String::new() } else { format!(": {stderr_tail}") })]
    Exited {
        /// Hook name.
        name: String,
        /// Exit code (or 128+signal).
        code: i32,
        /// Last stderr lines.
        stderr_tail: String,
    },
    /// Succeeded but its output is unusable (e.g. no image id).
    #[error("hook `{name}` {message}")]
    BadOutput {
        /// Hook name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Cancelled because a newer commit superseded the run.
    #[error("hook `{name}` cancelled")]
    Cancelled {
        /// Hook name.
        name: String,
    },
}

impl Classify for HookError {
    fn class(&self) -> ErrorClass {
        match self {
            HookError::Exited { code: contract::EXIT_TRANSIENT, .. } => ErrorClass::Transient,
            _ => ErrorClass::Stalled,
        }
    }
}

/// Receives captured output lines as they arrive.
pub type LineSink<'a> = &'a (dyn Fn(Stream, &str) + Send + Sync);

/// Runs a hook once: clean environment (allow-list + `spec.env` + `KILN_OUTPUT`), own process
/// group, output streamed to `sink` line by line and capped, killed (TERM, grace, KILL) at its
/// timeout or when `cancel` fires.
pub async fn run(
    spec: &HookSpec,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    let _ = (spec, sink, cancel);
    todo!("hooks helper")
}

/// [`run`], retrying exit 75 with backoff (bounded by `spec.timeout` overall).
pub async fn run_with_retry(
    spec: &HookSpec,
    sink: LineSink<'_>,
    cancel: &CancellationToken,
) -> Result<HookOutcome, HookError> {
    let _ = (spec, sink, cancel);
    todo!("hooks helper")
}
