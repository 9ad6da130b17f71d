//! The daemon's event loop: source events, operator commands and timers in, one serial lane per
//! fleet out (newest commit wins).
//!
//! OWNER: lead. The handle and commands below are the contract the API codes against.

use tokio::sync::{mpsc, oneshot};

use crate::model::RolloutId;
use crate::source::SourceHandle;
use crate::store::Store;

/// An operator verb, as the CLI and API send it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum Command {
    /// Stop the fleet's running rollout at the next safe point.
    Pause {
        /// Fleet.
        fleet: String,
    },
    /// Continue a paused rollout (also promotes a manual canary).
    Resume {
        /// Fleet.
        fleet: String,
    },
    /// Stop the fleet's rollout for good at the next safe point.
    Abort {
        /// Fleet.
        fleet: String,
    },
    /// Put the fleet back on a previous image (the one before the current, or `to`'s).
    Rollback {
        /// Fleet.
        fleet: String,
        /// A commit (prefix) whose image to restore.
        #[serde(default)]
        to: Option<String>,
    },
}

impl Command {
    /// The fleet the verb applies to.
    pub fn fleet(&self) -> &str {
        match self {
            Command::Pause { fleet }
            | Command::Resume { fleet }
            | Command::Abort { fleet }
            | Command::Rollback { fleet, .. } => fleet,
        }
    }
}

/// Why a verb was refused (shown to the user as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct CommandError {
    /// HTTP-ish status: 404 unknown fleet/commit, 409 not applicable now, 500 internal.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

/// A verb plus where to send its answer.
#[derive(Debug)]
pub struct CommandRequest {
    /// The verb.
    pub command: Command,
    /// The rollout affected or created.
    pub reply: oneshot::Sender<Result<RolloutId, CommandError>>,
}

/// What the API holds to talk to the running operator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OperatorHandle {
    /// The store (read-only use by the API).
    pub store: Store,
    /// The watcher (webhooks trigger fetches through it).
    pub source: SourceHandle,
    /// Verbs.
    pub commands: mpsc::Sender<CommandRequest>,
}

impl OperatorHandle {
    /// Sends a verb and waits for its answer.
    pub async fn command(&self, command: Command) -> Result<RolloutId, CommandError> {
        let (reply, rx) = oneshot::channel();
        let gone = || CommandError { status: 503, message: "the operator is shutting down".into() };
        self.commands.send(CommandRequest { command, reply }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}
