//! # vmotion-arbiter: who holds the VM
//!
//! The switchover's decisions that must happen exactly once — the source commits, the
//! destination claims, the source reverts, either side aborts — are compare-and-set
//! steps on one record per migration ([`Record`], [`Transition`]; DESIGN §9). The driver
//! (`vmotion`) asks an [`Arbiter`] for them and feeds the answers to the session machines
//! of `vmotion-session`, which decide.
//!
//! - [`KeyServiceClient`](vmotion_keyservice::KeyServiceClient) is an arbiter: the key
//!   service keeps the record (`PUT`/`GET /v1/migrations/{id}/outcome`).
//! - [`MemoryArbiter`] keeps records in this process: for orchestrators that hand keys in
//!   directly and run both ends, and for tests (it can be told to stop answering).
//! - An orchestrator with a record of its own implements [`Arbiter`] over it.

#![forbid(unsafe_code)]

mod keyservice;
mod memory;

use std::future::Future;
use std::pin::Pin;

pub use memory::MemoryArbiter;
pub use vmotion_session::{Record, Transition};

use vmotion_proto::MigrationId;

/// A boxed future, so that [`Arbiter`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an arbiter gave no record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArbiterError {
    /// No answer (network, timeout, the service busy or shutting down): the request may or
    /// may not have taken effect; read the record back.
    #[error("the arbiter did not answer: {0}")]
    Unreachable(String),
    /// The arbiter refused the request for a reason that will not change by retrying
    /// (this host is not a party to the migration, no such migration): it took no effect.
    #[error("the arbiter refused: {0}")]
    Refused(String),
}

/// Keeps the record of each migration and applies compare-and-set steps to it.
///
/// Both calls answer with the record **as it stands after the request**, whether the
/// requested step won or lost the race: a lost race ([`Record::step`] is `None` from the
/// current record) is not an error. Implementations must make a step durable before they
/// answer with its result.
pub trait Arbiter: Send + Sync {
    /// The migration's record.
    fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>>;
    /// Applies `t` if it is legal from the current record; answers with the record after.
    fn ask(&self, id: MigrationId, t: Transition) -> BoxFuture<'_, Result<Record, ArbiterError>>;
}
