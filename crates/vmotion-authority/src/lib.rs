//! # vmotion-authority: the keys, and who holds the VM
//!
//! The driver (`vmotion`) answers to one authority per migration — vCenter's role in
//! Encrypted vMotion — and names it only through the traits here:
//!
//! - [`KeyAuthority`]: at the source, creates a migration (a fresh id, key and nonce, and
//!   the host registry's word on whether the destination encrypts, DESIGN §2–3); at the
//!   destination, hands that migration's key out, once.
//! - [`Arbiter`]: the switchover's decisions that must happen exactly once — the source
//!   commits, the destination claims, the source reverts, either side aborts — as
//!   compare-and-set steps on one record per migration ([`Record`], [`Transition`];
//!   DESIGN §9). The driver feeds its answers to the session machines of
//!   `vmotion-session`, which decide.
//! - [`Authority`]: both at once, which is what `vmotion::KeySource::Service` and
//!   `vmotion::ReceiverKeys::Service` take: the authority that issued the key also keeps
//!   the record.
//!
//! Implementations:
//!
//! - `vmotion_keyservice_client::KeyServiceClient`: the key service over mutual TLS
//!   (`POST /v1/migrations`, `POST /v1/migrations/{id}/key`, `PUT`/`GET
//!   /v1/migrations/{id}/outcome`).
//! - [`MemoryAuthority`]: keys, a host registry and records in this process, one
//!   [`MemoryClient`] per host; for tests and for orchestrators that run both ends.
//! - [`MemoryArbiter`]: records only, for orchestrators that hand keys in directly. An
//!   orchestrator with a record of its own implements [`Arbiter`] over it.

#![forbid(unsafe_code)]

mod memory;
mod memory_authority;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use memory::MemoryArbiter;
pub use memory_authority::{MemoryAuthority, MemoryClient};
pub use vmotion_session::{Record, Transition};

use vmotion_proto::{DestinationCapability, KeyMaterial, MigrationId};

/// A boxed future, so that [`Arbiter`] and [`KeyAuthority`] can be used as trait objects.
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

/// Why a key authority gave no key. The message is the authority's own, whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// No answer (network, TLS, timeout, the service overloaded): a migration may or may
    /// not have been created; a retry, or another replica, may answer.
    #[error("{0}")]
    Unreachable(String),
    /// The authority refused, for a reason that will not change by retrying: this host
    /// is not the migration's destination, the key was already handed out or expired, no
    /// such migration, a request it cannot take (the destination is the caller itself).
    #[error("{0}")]
    Refused(String),
    /// An admission limit is reached (migrations in flight from this source, to the
    /// destination, or in the cluster): nothing was created. Ask again after
    /// `retry_after`; the driver does, within its queue timeout.
    #[error("{message}")]
    Busy {
        /// The authority's explanation.
        message: String,
        /// How long the authority asks the caller to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The destination is in maintenance (draining): the authority creates no migration
    /// to it. The message says which host.
    #[error("{0}")]
    DestinationDraining(String),
    /// The VM already has a migration in flight (from any host), so no second one is
    /// created. It ends with that migration's final outcome or its key's expiry; a source
    /// whose own earlier sender died before its switchover may ask with
    /// [`CreateOptions::abort_stale`].
    #[error("{}", in_flight_message(vm, *migration))]
    VmInFlight {
        /// The VM.
        vm: String,
        /// The migration holding it, if the authority named it.
        migration: Option<MigrationId>,
    },
}

fn in_flight_message(vm: &str, migration: Option<MigrationId>) -> String {
    let which = migration.map_or_else(|| "a migration".to_owned(), |id| format!("migration {id}"));
    format!(
        "VM `{vm}` already has {which} in flight: no second migration of it can start until \
         that one has an outcome (committed or aborted) or its in_flight_ttl at the key service passes"
    )
}

/// How a source asks for a migration ([`KeyAuthority::create_migration_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Abort this source's own earlier migration of the same VM if its record is still
    /// at `null` (a sender that died before its switchover) instead of being refused with
    /// [`AuthorityError::VmInFlight`]. Never touches a migration past `null`, nor
    /// another host's.
    pub abort_stale: bool,
    /// The request's id, where the caller keeps it itself (e.g. across its own restart):
    /// a create sent again with the same id by the same source answers the migration the
    /// first one created. `None`: a fresh id per call (reused on that call's retries).
    pub request_id: Option<[u8; 16]>,
}

impl CreateOptions {
    /// The options with this request id.
    pub fn request_id(mut self, id: [u8; 16]) -> Self {
        self.request_id = Some(id);
        self
    }

    /// The options with `abort_stale` set as given.
    pub fn abort_stale(mut self, abort_stale: bool) -> Self {
        self.abort_stale = abort_stale;
        self
    }
}

/// A migration as its source receives it from [`KeyAuthority::create_migration`].
#[derive(Debug)]
pub struct IssuedKey {
    /// The id both ends use.
    pub id: MigrationId,
    /// Key and nonce, fresh for this migration.
    pub material: KeyMaterial,
    /// What the authority's host registry says of the destination, for the policy
    /// decision (never the wire's word: DESIGN §3).
    pub destination: DestinationCapability,
}

/// A migration's key as its destination receives it from [`KeyAuthority::fetch_key`].
#[derive(Debug)]
pub struct FetchedKey {
    /// Key and nonce.
    pub material: KeyMaterial,
    /// The source host.
    pub source: String,
    /// The VM the migration was created for.
    pub vm: String,
}

/// Issues per-migration keys. Each implementation is one host's view: the caller's
/// identity (its certificate, its [`MemoryClient`]) says who is the source and who may
/// fetch.
pub trait KeyAuthority: Send + Sync {
    /// At the source: creates the migration of `vm` from this host to `destination`, with
    /// a fresh id, key and nonce and what the registry knows of the destination (an
    /// unregistered destination is [`DestinationCapability::Unregistered`], not an
    /// error). An authority with admission limits answers [`AuthorityError::Busy`] when
    /// one is reached, and [`AuthorityError::VmInFlight`] while the VM has a migration in
    /// flight.
    fn create_migration_with<'a>(
        &'a self,
        vm: &'a str,
        destination: &'a str,
        options: CreateOptions,
    ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>>;
    /// [`create_migration_with`](Self::create_migration_with) with the default options.
    fn create_migration<'a>(
        &'a self,
        vm: &'a str,
        destination: &'a str,
    ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>> {
        self.create_migration_with(vm, destination, CreateOptions::default())
    }
    /// At the destination: migration `id`'s key. Only its destination gets it, and only
    /// once.
    fn fetch_key(&self, id: MigrationId) -> BoxFuture<'_, Result<FetchedKey, AuthorityError>>;
}

/// A key authority that is also the arbiter of the migrations it creates.
pub trait Authority: KeyAuthority + Arbiter {}

impl<T: KeyAuthority + Arbiter + ?Sized> Authority for T {}
