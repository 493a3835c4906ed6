//! Where the key service keeps its state. Two stores apply the same rules
//! ([`rules`]): the journal (default; one process, an fsynced local journal) and etcd
//! (any number of replicas over one etcd cluster; `[store] kind = "etcd"`).

pub(crate) mod etcd;
pub(crate) mod journal;
pub mod kek;
pub(crate) mod rules;
pub(crate) mod state;

use std::time::{SystemTime, UNIX_EPOCH};

use vmotion_proto::MigrationId;
use zeroize::Zeroizing;

use crate::api::{ErrorCode, HostRecord, Outcome, OutcomeRecord, RegisterRequest};
use crate::config::{Config, StoreConfig};
use crate::server::ServeError;
pub use rules::Limits;
use rules::Refused;
pub(crate) use state::{Created, Fetched, NewMigration};

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A create as the server received it, before fresh material is drawn.
pub(crate) struct CreateRequest<'a> {
    pub(crate) caller: &'a str,
    pub(crate) vm: &'a str,
    pub(crate) destination: &'a str,
    pub(crate) request: Option<[u8; 16]>,
    pub(crate) abort_stale: bool,
}

/// The store the configuration names.
pub(crate) enum Store {
    Journal(Box<journal::JournalStore>),
    Etcd(Box<etcd::EtcdStore>),
}

impl Store {
    /// Opens (and for the journal, replays) the configured store.
    pub(crate) async fn open(config: &Config) -> Result<Self, ServeError> {
        match &config.store {
            StoreConfig::Journal { path } => {
                let store = journal::JournalStore::open(
                    path,
                    config.limits,
                    config.key_ttl,
                    config.registry_ttl,
                )?;
                Ok(Self::Journal(Box::new(store)))
            }
            StoreConfig::Etcd(etcd) => Ok(Self::Etcd(Box::new(
                etcd::EtcdStore::open(etcd, config.limits, config.key_ttl, config.registry_ttl)
                    .await?,
            ))),
        }
    }

    pub(crate) async fn register(
        &self,
        caller: &str,
        req: RegisterRequest,
    ) -> Result<HostRecord, Refused> {
        match self {
            Self::Journal(s) => Ok(s.register(caller, req)),
            Self::Etcd(s) => s.register(caller, req).await,
        }
    }

    pub(crate) async fn host(&self, host: &str) -> Result<Option<HostRecord>, Refused> {
        match self {
            Self::Journal(s) => Ok(s.host(host)),
            Self::Etcd(s) => s.host(host).await,
        }
    }

    /// Puts `host` in maintenance (`draining`) or takes it out, for `caller` (the host
    /// itself or one of `admins`).
    pub(crate) async fn set_draining(
        &self,
        caller: &str,
        admins: &[String],
        host: &str,
        draining: bool,
    ) -> Result<(), Refused> {
        rules::check_maintenance(caller, host, admins)?;
        match self {
            Self::Journal(s) => s.set_draining(host, draining).await,
            Self::Etcd(s) => s.set_draining(host, draining).await,
        }
    }

    /// Whether `host` is in maintenance.
    pub(crate) async fn is_draining(&self, host: &str) -> Result<bool, Refused> {
        match self {
            Self::Journal(s) => Ok(s.is_draining(host)),
            Self::Etcd(s) => s.is_draining(host).await,
        }
    }

    /// Creates a migration with fresh material from the OS CSPRNG.
    pub(crate) async fn create(
        &self,
        req: CreateRequest<'_>,
        rng: &ring::rand::SystemRandom,
    ) -> Result<Created, Refused> {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut nonce = [0u8; 8];
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(rng, &mut *key)
            .and_then(|()| ring::rand::SecureRandom::fill(rng, &mut nonce))
            .and_then(|()| ring::rand::SecureRandom::fill(rng, &mut id))
            .map_err(|_| Refused::new(ErrorCode::Internal, "the OS random generator failed"))?;
        let new = NewMigration {
            caller: req.caller,
            vm: req.vm,
            destination: req.destination,
            id: MigrationId(id),
            key,
            nonce,
            request: req.request,
            abort_stale: req.abort_stale,
        };
        match self {
            Self::Journal(s) => s.create(new).await,
            Self::Etcd(s) => s.create(new).await,
        }
    }

    pub(crate) async fn fetch_key(
        &self,
        caller: &str,
        id: MigrationId,
    ) -> Result<Fetched, Refused> {
        match self {
            Self::Journal(s) => s.fetch_key(caller, id),
            Self::Etcd(s) => s.fetch_key(caller, id).await,
        }
    }

    pub(crate) async fn record_outcome(
        &self,
        caller: &str,
        id: MigrationId,
        outcome: Outcome,
    ) -> Result<OutcomeRecord, Refused> {
        match self {
            Self::Journal(s) => s.record_outcome(caller, id, outcome).await,
            Self::Etcd(s) => s.record_outcome(caller, id, outcome).await,
        }
    }

    pub(crate) async fn outcome(
        &self,
        caller: &str,
        id: MigrationId,
    ) -> Result<OutcomeRecord, Refused> {
        match self {
            Self::Journal(s) => s.outcome(caller, id),
            Self::Etcd(s) => s.outcome(caller, id).await,
        }
    }

    /// Drops what expired (the etcd store's leases do this by themselves).
    pub(crate) fn sweep(&self) {
        match self {
            Self::Journal(s) => s.sweep(),
            Self::Etcd(_) => {}
        }
    }

    /// At shutdown: zeroizes every key this process holds and flushes; returns how many
    /// keys were held.
    pub(crate) async fn close(&self) -> usize {
        match self {
            Self::Journal(s) => {
                let held = s.drop_keys();
                s.flush().await;
                held
            }
            // Keys live sealed in etcd, under their leases; this process holds none.
            Self::Etcd(_) => 0,
        }
    }
}
