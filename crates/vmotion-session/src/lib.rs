//! # vmotion-session: the migration session's decisions, without I/O
//!
//! The protocol crate (`vmotion-proto`) seals and parses frames and runs the handshake;
//! the engine (`vmotion-engine`) decides what to send and when to pause. This crate holds
//! the part of a session that decides **where the VM runs** when the switchover ends:
//! the *claim step* at the arbiter (the key service, or an orchestrator's own record).
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
mod record;

pub use claim::{
    ClaimConfig, DestinationAction, DestinationClaim, DestinationOutcome, SourceAction,
    SourceClaim, SourceOutcome,
};
pub use record::{Answer, Record, Transition};
