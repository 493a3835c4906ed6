//! # vmotion-session: the migration session's decisions, without I/O
//!
//! The protocol crate (`vmotion-proto`) seals and parses frames and runs the handshake;
//! the engine (`vmotion-engine`) decides what to send and when to pause. This crate holds
//! the rest of a session after the handshake — what goes on the control connection, what
//! each side checks, every deadline — and the part that decides **where the VM runs**
//! when the switchover ends: the *claim step* at the arbiter (the key service, or an
//! orchestrator's own record).
//!
//! - [`SourceSession`]: the engine's decisions as control frames and page batches per
//!   stream; the arbiter checked before the pause; the device state in chunks;
//!   `Complete` with its totals; `Ready` checked against them; the commit recorded;
//!   `Commit`; then [`SourceClaim`].
//! - [`DestinationSession`]: binds within their deadline; iteration markers and
//!   device-state chunks (in order, bounded) until `Complete`; every stream's totals and
//!   every page checked; the guest persisted; `Ready`; then [`DestinationClaim`].
//! - An unexpected frame is [`PeerMisbehaved::UnexpectedFrame`](vmotion_proto::PeerMisbehaved)
//!   naming the state and the frame; every failure is a [`SessionError`] that says only
//!   what its side knows, and reaches the peer as a sealed `Abort` with its code.
//!
//! `tests/migration.rs` runs whole migrations through both machines, the engine and a
//! guest that keeps writing, in memory with simulated time and bandwidth, under every
//! fault it can inject.
//!
//! ```text
//!  source                          arbiter                         destination
//!    │ pause, last pages, device state, Complete ───────────────────────▶ │ verify, persist
//!    │ ◀───────────────────────────────────────────────────────────────── │ Ready
//!    │ commit: created → committed ─▶ │                                    │
//!    │ Commit ──────────────────────────────────────────────────────────▶ │
//!    │                                │ ◀─ claim: committed → claimed ──── │
//!    │ ◀──────────────────────────────────────────────────────────────── │ Claimed, resume
//!    │ confirm (read: claimed) ─────▶ │                                    │
//!    │ stop for good                  │                                    │
//!
//!  no Claimed within the claim deadline:
//!    │ revert: committed → reverted ─▶ │   exactly one of claim / revert wins:
//!    │ won: resume at the source       │   the loser discards (destination) or
//!    │ lost (claimed): stop for good   │   stops for good (source)
//! ```
//!
//! Both machines follow the same shape (quinn's): every input is a `handle_*(now, …)`
//! call, every output is taken from [`poll_action`](SourceClaim::poll_action), and
//! [`poll_timeout`](SourceClaim::poll_timeout) says when the driver must call
//! `handle_timeout`. `now` is a [`Duration`](std::time::Duration) since any fixed origin;
//! there is no clock, no randomness and no I/O here, so every crash point and every lost
//! answer is tested in `tests/claim.rs` with simulated time.
//!
//! - [`SourceClaim`]: the source after it sent `Commit`.
//! - [`DestinationClaim`]: the destination after it sent `Ready` (and a restarted
//!   destination settling a guest it kept: [`DestinationClaim::settle`]).
//! - [`Record`], [`Transition`], [`Answer`]: the arbiter's record and the compare-and-set
//!   steps on it (DESIGN §9: `created → committed → claimed | reverted`,
//!   `created → aborted`).

#![forbid(unsafe_code)]

mod claim;
mod destination;
mod error;
mod record;
mod source;

pub use claim::{
    ClaimConfig, DestinationAction, DestinationClaim, DestinationOutcome, SourceAction,
    SourceClaim, SourceOutcome,
};
pub use destination::{
    DestinationConfig, DestinationEnd, DestinationSession, DestinationStep, StreamStats,
};
pub use error::SessionError;
pub use record::{Answer, Record, Transition};
pub use source::{
    COMMIT_ATTEMPTS, SentTotals, SourceConfig, SourceEnd, SourceSession, SourceStep, engine_reason,
};

use vmotion_proto::FrameType;

/// A frame for the control connection, for the driver to seal and send.
#[derive(Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Its type.
    pub frame_type: FrameType,
    /// Its payload, encoded.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Transmit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Transmit({:?}, {} bytes)",
            self.frame_type,
            self.payload.len()
        )
    }
}
