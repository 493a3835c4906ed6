//! Why a session ended without the VM moving, as the session machines see it.

use std::time::Duration;

use vmotion_proto::{AbortCode, PeerMisbehaved};

/// Why a session failed. Each variant says only what its side can know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer ended the migration with a sealed `Abort`, and said why.
    #[error("the peer aborted with {code}: {message}")]
    PeerAborted {
        /// Its code.
        code: AbortCode,
        /// Its explanation.
        message: String,
    },
    /// The peer broke the protocol (a frame in the wrong state, totals that do not add
    /// up, pages missing...).
    #[error(transparent)]
    PeerMisbehaved(#[from] PeerMisbehaved),
    /// A deadline passed.
    #[error("no progress: waited {after:?} for {waiting_for}")]
    Timeout {
        /// What did not happen.
        waiting_for: &'static str,
        /// How long this side waited.
        after: Duration,
    },
    /// The control connection ended (closed, reset, failed to open a frame) without an
    /// `Abort`.
    #[error("the control connection ended while waiting for {waiting_for}: {reason}")]
    ControlLost {
        /// What this side waited for.
        waiting_for: &'static str,
        /// What the driver saw.
        reason: String,
    },
    /// The arbiter did not answer before the pause, so the VM was never paused.
    #[error("the arbiter does not answer, so the VM was not paused: {0}")]
    ArbiterUnavailable(String),
    /// The engine gave up (a convergence limit, the switchover timeout, the commit not
    /// recorded).
    #[error("{0}")]
    Engine(String),
    /// A step the driver carried out failed (the driver keeps its own, richer error).
    #[error("{message}")]
    Local {
        /// The code the peer is told.
        code: AbortCode,
        /// What failed.
        message: String,
    },
}

impl SessionError {
    /// The code that reports this error to the peer in an `Abort`, `default` where the
    /// error is this side's own.
    pub fn abort_code(&self, default: AbortCode) -> AbortCode {
        match self {
            Self::PeerAborted { .. } => AbortCode::PeerAborted,
            Self::PeerMisbehaved(p) => p.abort_code(),
            Self::Timeout { .. } => AbortCode::Timeout,
            Self::Local { code, .. } => *code,
            Self::ControlLost { .. } | Self::ArbiterUnavailable(_) | Self::Engine(_) => default,
        }
    }
}
