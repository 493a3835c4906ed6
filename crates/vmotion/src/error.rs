//! The driver's error type.

use std::time::Duration;

use vmotion_proto::{AbortCode, Refusal};

/// Why a migration did not end with the VM running at the destination.
///
/// Each variant says what is known about where the VM is; none claims more than the side
/// that reports it can know.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Negotiation refused the migration before any page was sent.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The destination's pre-flight refused the guest (no room, a sink that cannot take
    /// it, an unsettled copy of the same VM there...) before any page was sent.
    #[error("the destination refused the guest before any page was sent: {0}")]
    PreflightRefused(String),
    /// The peer ended the migration, with its reason.
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
    /// The peer closed the connection without a word.
    #[error("the peer closed the connection during {during}")]
    ConnectionClosed {
        /// What this side was doing.
        during: &'static str,
    },
    /// A deadline passed.
    #[error("no progress: waited {after:?} for {waiting_for}")]
    Timeout {
        /// What did not happen.
        waiting_for: &'static str,
        /// How long this side waited.
        after: Duration,
    },
    /// The receiver could not get this migration's key (the reason).
    #[error("no key for this migration: {0}")]
    NoKey(String),
    /// The key authority (the key service) failed or refused to create the migration
    /// (among its refusals: the VM already has a migration in flight,
    /// [`AuthorityError::VmInFlight`](vmotion_authority::AuthorityError::VmInFlight)).
    #[error("key service: {0}")]
    KeyService(#[from] vmotion_authority::AuthorityError),
    /// The key authority had no admission slot for the migration (its admission limits
    /// were reached) until the queue timeout passed: nothing was created or sent, the VM
    /// was not touched.
    #[error("{}", queue_message(*waited, *limit, message))]
    QueueTimeout {
        /// How long the source waited.
        waited: Duration,
        /// The queue timeout.
        limit: Duration,
        /// The authority's last refusal.
        message: String,
    },
    /// The arbiter did not answer before the pause, so the VM was never paused: without it
    /// no switchover could be recorded.
    #[error("the arbiter does not answer, so the VM was not paused: {0}")]
    ArbiterUnavailable(String),
    /// Pre-copy did not converge within a limit (which), and the policy says abort: the
    /// VM keeps running at the source.
    #[error("pre-copy did not converge within its {0} limit; the VM keeps running at the source")]
    DidNotConverge(String),
    /// The arbiter would not record the commit (its record says aborted, or it refused):
    /// the source resumed the VM.
    #[error("the arbiter did not record the commit; the VM runs at the source again")]
    CommitRefused,
    /// The mover failed.
    #[error("mover: {0}")]
    Mover(#[from] vmotion_mover::MoverError),
    /// A migration of this VM is already in flight (pre-flight refusal; nothing was
    /// sent and the VM is untouched).
    #[error("a migration of VM {0} is already in flight")]
    AlreadyInFlight(String),
    /// The destination did not claim the VM in time; the source won it back at the
    /// arbiter and resumed it. The VM runs at the source.
    #[error("the destination did not claim the VM; the source took it back and resumed it: {0}")]
    Reverted(String),
    /// The source keeps the VM; the copy received here was discarded.
    #[error("the source keeps the VM; the copy received here was discarded: {0}")]
    Discarded(String),
    /// Where the VM may run could not be settled: it is left **paused** at the source,
    /// and stays claimed in this process. Settle it at the arbiter first.
    #[error("outcome unknown, the VM is left paused at the source: {0}")]
    OutcomeUnknown(String),
    /// The migration aborted, or the source took the VM back, but resuming it at the
    /// source failed.
    #[error("the VM should run at the source again, but resuming it failed: {0}")]
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
    InvalidOptions(&'static str),
    /// A local failure that is not the peer's, the network's or the mover's (no OS
    /// randomness, a driver bug): the migration stops where it is safe.
    #[error("internal error: {0}")]
    Internal(String),
}

fn queue_message(waited: Duration, limit: Duration, message: &str) -> String {
    let waited = Duration::from_secs(waited.as_secs());
    if limit.is_zero() {
        format!(
            "the key service has no admission slot for this migration now, and the queue \
             timeout is 0 (do not wait): {message}"
        )
    } else {
        format!(
            "the key service gave this migration no admission slot within the queue timeout \
             (waited {waited:?} of {limit:?}): {message}"
        )
    }
}

impl MigrateError {
    /// The code that reports this error to the peer in an `Abort`.
    pub fn abort_code(&self, default: AbortCode) -> AbortCode {
        match self {
            Self::Protocol(p) => p.abort_code(),
            Self::Refused(r) => r.abort_code(),
            Self::Timeout { .. } => AbortCode::Timeout,
            Self::Internal(_) => AbortCode::InternalError,
            Self::PreflightRefused(_) | Self::AlreadyInFlight(_) => AbortCode::PreflightRefused,
            Self::NoKey(_) => AbortCode::KeyUnavailable,
            _ => default,
        }
    }

    /// Nothing was sent and the VM was never touched: a refusal before the first page
    /// (`vmotion-send` exit code 3).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Refused(_)
                | Self::PreflightRefused(_)
                | Self::QueueTimeout { .. }
                | Self::KeyService(
                    vmotion_authority::AuthorityError::VmInFlight { .. }
                        | vmotion_authority::AuthorityError::DestinationDraining(_)
                )
        )
    }
}

impl From<vmotion_proto::Error> for MigrateError {
    fn from(e: vmotion_proto::Error) -> Self {
        match e {
            vmotion_proto::Error::Refused(r) => Self::Refused(r),
            vmotion_proto::Error::PeerAborted { code, message } => {
                if code == AbortCode::PreflightRefused {
                    return Self::PreflightRefused(message);
                }
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

impl From<vmotion_engine::UnexpectedInput> for MigrateError {
    fn from(e: vmotion_engine::UnexpectedInput) -> Self {
        Self::Internal(e.to_string())
    }
}

/// A session machine's reason, as the driver's error.
pub(crate) fn from_session(e: vmotion_session::SessionError) -> MigrateError {
    use vmotion_session::SessionError as E;
    match e {
        E::PeerAborted { code, message } => {
            vmotion_proto::Error::PeerAborted { code, message }.into()
        }
        E::PeerMisbehaved(p) => p.into(),
        E::Timeout { waiting_for, after } => MigrateError::Timeout { waiting_for, after },
        E::ControlLost {
            waiting_for,
            reason,
        } => {
            tracing::debug!(%reason, "the control connection ended");
            MigrateError::ConnectionClosed {
                during: waiting_for,
            }
        }
        E::ArbiterUnavailable(why) => MigrateError::ArbiterUnavailable(why),
        E::Engine(why) | E::Local { message: why, .. } => MigrateError::Internal(why),
    }
}
