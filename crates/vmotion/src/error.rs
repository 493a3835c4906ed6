//! The driver's error type.

use vmotion_proto::{AbortCode, Refusal};

/// Why a migration did not commit.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Negotiation refused the migration before any page was sent; the VM keeps running
    /// at the source.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The migration aborted after it started; the VM runs at the source.
    #[error("aborted, the VM keeps running at the source: {0}")]
    Aborted(String),
    /// The peer ended the migration.
    #[error("the peer aborted with {code}: {message}")]
    PeerAborted {
        /// Its code.
        code: AbortCode,
        /// Its explanation.
        message: String,
    },
    /// The protocol failed (tampering, corruption, a misbehaving peer).
    #[error(transparent)]
    Protocol(vmotion_proto::Error),
    /// The network failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The key service failed or refused.
    #[error("key service: {0}")]
    KeyService(#[from] vmotion_keyservice::ClientError),
    /// The mover failed.
    #[error("mover: {0}")]
    Mover(#[from] vmotion_mover::MoverError),
    /// A migration of this VM is already in flight (pre-flight refusal; nothing was
    /// sent and the VM is untouched).
    #[error("a migration of VM {0} is already in flight")]
    AlreadyInFlight(String),
    /// The outcome could be neither recorded nor read back: the VM is left **paused** at
    /// the source, and stays claimed in this process. Settle it at the key service first.
    #[error("outcome unknown, the VM is left paused at the source: {0}")]
    OutcomeUnknown(String),
    /// The migration aborted but the VM could not be resumed at the source.
    #[error("aborted, and resuming the VM at the source failed: {0}")]
    ResumeFailed(String),
    /// A tunnel failed: every hypervisor connection it carried was dropped on both hosts,
    /// so the hypervisor's own migration fails too — unless it had already completed (a
    /// hypervisor that does not wait for its destination's answer, such as QEMU without
    /// the `return-path` capability, may). The hypervisor says where the VM runs.
    #[error(
        "tunnel failed: {0} (the hypervisor's own migration fails with it unless it had \
         already completed: ask it where the VM runs, e.g. QEMU's query-migrate)"
    )]
    TunnelFailed(String),
    /// The builder was given an impossible combination.
    #[error("invalid options: {0}")]
    Options(String),
}

impl From<vmotion_proto::Error> for MigrateError {
    fn from(e: vmotion_proto::Error) -> Self {
        match e {
            vmotion_proto::Error::Refused(r) => Self::Refused(r),
            vmotion_proto::Error::PeerAborted { code, message } => {
                match Refusal::from_abort_code(code) {
                    Some(r) => Self::Refused(r),
                    None => Self::PeerAborted { code, message },
                }
            }
            other => Self::Protocol(other),
        }
    }
}

impl From<Box<vmotion_proto::HandshakeFailure>> for MigrateError {
    fn from(f: Box<vmotion_proto::HandshakeFailure>) -> Self {
        f.error.into()
    }
}

impl From<vmotion_proto::PeerMisbehaved> for MigrateError {
    fn from(e: vmotion_proto::PeerMisbehaved) -> Self {
        Self::Protocol(e.into())
    }
}

impl From<vmotion_proto::ApiMisuse> for MigrateError {
    fn from(e: vmotion_proto::ApiMisuse) -> Self {
        Self::Protocol(e.into())
    }
}
