//! # vmotion: encrypted live migration, the library
//!
//! [`Sender`] moves a VM from a [`vmotion_mover::Source`] to a [`Receiver`], which writes
//! it into a [`Sink`]: one control connection plus N data connections over TCP, every
//! frame sealed with per-migration keys (or checksummed, when policy and negotiation say
//! plaintext), pages batched with zero pages as flags and pinned to streams by chunk, the
//! pre-copy engine of `vmotion-engine` deciding iterations, throttling and the switchover,
//! and the three-phase switchover (Complete → Ready → outcome recorded → Commit) so the VM
//! never runs twice or nowhere.
//!
//! Keys come from the key service ([`KeySource::Service`], [`ReceiverKeys::Service`]) or
//! are handed in by an orchestrator ([`KeySource::Direct`], [`ReceiverKeys::Direct`]).
//!
//! Status: the first version of the driver. Receivers take one migration per call; the
//! CLI issue adds the daemon that serves several at once.

#![forbid(unsafe_code)]

mod error;
mod receiver;
mod report;
mod sender;
mod wire;

pub use error::MigrateError;
pub use receiver::{ReceiveReport, Receiver, ReceiverKeys, Sink};
pub use report::MigrationReport;
pub use sender::{KeySource, Sender, SenderBuilder};
