//! # vmotion-engine: the pre-copy migration engine, without I/O
//!
//! The engine decides *what* to send and *when* to switch over; the driver (`vmotion`)
//! moves the bytes. It takes time, bandwidth measurements and dirty bitmaps as inputs and
//! returns [`Action`]s, so every path — convergence, auto-converge, limits, the three-phase
//! switchover and every failure before and after the commit point — is tested with a
//! simulated guest and simulated time (`tests/simulate.rs`).
//!
//! - [`bitmap`]: dirty bitmaps, the page ranges they become, chunks pinned to streams.
//! - [`convergence`]: the pure convergence judgement.
//! - [`engine`]: the source-side state machine ([`SenderEngine`]).
//!
//! The three-phase switchover (DESIGN §5): the source pauses, sends the last pages, the
//! device state and `Complete`; the destination verifies and answers `Ready`; the source
//! records `committed` (durably, with the key service), sends `Commit` and never runs the
//! VM again. Any failure before the record resumes the source; none after it does.

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod convergence;
pub mod engine;

pub use bitmap::{DirtyBitmap, PageRange};
pub use convergence::{AutoConverge, ConvergencePolicy, IterationStats, Limit, OnLimit, Verdict};
pub use engine::{
    AbortReason, Action, Downtime, EngineConfig, EngineReport, Outcome, SenderEngine,
    UnexpectedInput,
};
