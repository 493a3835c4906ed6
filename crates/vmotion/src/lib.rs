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
//! Keys come from the key service ([`KeySource::Service`], [`ReceiverKeys::Service`]) or
//! are handed in by an orchestrator ([`KeySource::Direct`], [`ReceiverKeys::Direct`]).
//!
//! [`Receiver::receive`] takes one migration; [`Receiver::serve`] takes several at once on
//! one listener, routing each data connection to its migration by the id it binds with.

#![forbid(unsafe_code)]

mod error;
mod receiver;
mod report;
mod sender;
mod transport;
mod tunnel;
mod wire;

pub use error::MigrateError;
pub use receiver::{Incoming, ReceiveOutcome, ReceiveReport, Receiver, ReceiverKeys, Sink};
pub use report::MigrationReport;
pub use report::Phases;
pub use sender::{KeySource, NetOptions, Progress, Sender, SenderBuilder, Stage};
pub use transport::{Accept, Conn, Endpoint, Listener, Peer};
pub use tunnel::{
    DEFAULT_MAX_CONNECTIONS, MAX_ACCEPT_TIMEOUT, NegotiatedTunnel, TunnelReport, TunnelSender,
    TunnelSenderBuilder,
};

/// The VMs this process is migrating out, or taking in: a second migration of the same
/// VM in the same direction is refused before it starts. (Out and in are kept apart: a
/// host may well send a VM to itself in tests and demos.)
pub(crate) struct InFlight {
    vm: String,
    set: &'static std::sync::Mutex<Vec<String>>,
}

pub(crate) static OUTGOING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
pub(crate) static INCOMING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl InFlight {
    pub(crate) fn claim(
        set: &'static std::sync::Mutex<Vec<String>>,
        vm: &str,
    ) -> Result<Self, MigrateError> {
        let mut list = set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.iter().any(|v| v == vm) {
            return Err(MigrateError::AlreadyInFlight(vm.to_owned()));
        }
        list.push(vm.to_owned());
        Ok(Self {
            vm: vm.to_owned(),
            set,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut list = self
            .set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.retain(|v| *v != self.vm);
    }
}
