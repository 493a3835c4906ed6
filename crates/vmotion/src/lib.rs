//! # vmotion: encrypted live migration, the library
//!
//! [`Sender`] moves a VM from a [`vmotion_mover::Source`] to a [`Receiver`], which writes
//! it into a [`Sink`]: one control connection plus N data connections over TCP (or a Unix
//! socket, for migrations on one host: see [`Endpoint`]), every
//! frame sealed with per-migration keys (or checksummed, when policy and negotiation say
//! plaintext), pages batched with zero pages as flags and pinned to streams by chunk, the
//! pre-copy engine of `vmotion-engine` deciding iterations, throttling and the switchover,
//! and the three-phase switchover (Complete → Ready → outcome recorded → Commit) so the VM
//! never runs twice or nowhere.
//!
//! Keys come from a key authority ([`KeySource::Service`], [`ReceiverKeys::Service`]: an
//! [`Authority`], i.e. the key service's client `vmotion_keyservice_client::KeyServiceClient`
//! or, in one process, a [`MemoryAuthority`]'s [`MemoryClient`]) or are handed in by an
//! orchestrator ([`KeySource::Direct`], [`ReceiverKeys::Direct`]).
//!
//! [`Receiver::receive`] takes one migration; [`Receiver::serve`] takes several at once on
//! one listener, routing each data connection to its migration by the id it binds with.

#![forbid(unsafe_code)]

mod accept;
mod activity;
mod claim;
mod connect;
mod control;
mod error;
mod in_flight;
mod receiver;
mod report;
mod sender;
mod transport;
mod tunnel;
mod wire;

pub use connect::{DEFAULT_QUEUE_TIMEOUT, KeySource, NetOptions};
pub use error::MigrateError;
pub use in_flight::InFlight;
pub use receiver::{
    DEFAULT_MAX_DEVICE_STATE, Dropped, Finished, Incoming, ReceiveOutcome, ReceiveReport, Receiver,
    ReceiverKeys,
};
pub use report::{ClaimEvidence, MigrationReport, Phases};
pub use sender::{Progress, Sender, SenderBuilder, Stage};
pub use transport::{Accept, Conn, Endpoint, Listener, Peer};
pub use tunnel::{
    DEFAULT_MAX_CONNECTIONS, MAX_ACCEPT_TIMEOUT, NegotiatedTunnel, TunnelReport, TunnelSender,
    TunnelSenderBuilder, TunnelVerdict,
};
pub use vmotion_authority::{
    Arbiter, ArbiterError, Authority, AuthorityError, BoxFuture, CreateOptions, FetchedKey,
    IssuedKey, KeyAuthority, MemoryArbiter, MemoryAuthority, MemoryClient, Record, Transition,
};
pub use vmotion_mover::Sink;
pub use vmotion_session::DestinationOutcome;

/// How long a migration may go without progress before it is abandoned, by default: 150 s,
/// KubeVirt's `progressTimeout`. Dead peers are found far sooner by keepalive probes and
/// `TCP_USER_TIMEOUT`; this catches a peer that is alive but stuck.
pub const DEFAULT_PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);
