//! A key authority in this process's memory: the key service's rules without its
//! process, TLS or journal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmotion_proto::{
    DestinationCapability, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, handshake_random,
};

use crate::{
    Arbiter, ArbiterError, AuthorityError, BoxFuture, CreateOptions, FetchedKey, IssuedKey,
    KeyAuthority, MemoryArbiter, Record, Transition,
};

/// Keys, a host registry and the outcome records, in memory — the key service's rules
/// (a fresh random key and nonce per migration, the key handed out once and to the
/// destination only, the registry's word on the destination, each outcome step reserved
/// to its party) for tests and for an orchestrator that runs both ends.
///
/// Each host talks to it through its own [`MemoryClient`] ([`client`](Self::client)), as
/// each host talks to the key service with its own certificate. Clones share everything.
#[derive(Clone, Default)]
pub struct MemoryAuthority {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Host → can encrypt.
    hosts: Mutex<HashMap<String, bool>>,
    migrations: Mutex<HashMap<MigrationId, Migration>>,
    /// The outcome records, one per migration created.
    records: MemoryArbiter,
    unreachable: AtomicBool,
}

struct Migration {
    source: String,
    destination: String,
    vm: String,
    key: KeyState,
}

enum KeyState {
    Available(KeyMaterial),
    Fetched,
    /// Expired ([`MemoryAuthority::expire_key`]) or dropped past an outcome.
    Gone,
}

impl std::fmt::Debug for MemoryAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryAuthority")
            .field("hosts", &*lock(&self.shared.hosts))
            .field("migrations", &lock(&self.shared.migrations).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const SILENT: &str = "the in-memory authority is set unreachable";

impl MemoryAuthority {
    /// No hosts registered, no migrations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or re-registers) `host` in the registry, able to encrypt or not.
    pub fn register(&self, host: &str, can_encrypt: bool) {
        lock(&self.shared.hosts).insert(host.to_owned(), can_encrypt);
    }

    /// This authority as `host` sees it: what that host's key source, receiver keys or
    /// arbiter is given.
    pub fn client(&self, host: &str) -> Arc<MemoryClient> {
        Arc::new(MemoryClient {
            shared: self.shared.clone(),
            host: host.to_owned(),
        })
    }

    /// Stops (or resumes) answering: every request from every client fails as
    /// unreachable, without effect.
    pub fn set_unreachable(&self, yes: bool) {
        self.shared.unreachable.store(yes, Ordering::SeqCst);
    }

    /// Lets migration `id`'s key expire if it was not fetched yet: a fetch is refused.
    pub fn expire_key(&self, id: MigrationId) {
        if let Some(m) = lock(&self.shared.migrations).get_mut(&id)
            && matches!(m.key, KeyState::Available(_))
        {
            m.key = KeyState::Gone;
        }
    }

    /// The record of `id`, if the migration exists (for assertions; no fault applies).
    pub fn record(&self, id: MigrationId) -> Option<Record> {
        self.shared.records.record(id)
    }

    /// The migrations created so far, in no particular order.
    pub fn migrations(&self) -> Vec<MigrationId> {
        lock(&self.shared.migrations).keys().copied().collect()
    }
}

/// One host's handle on a [`MemoryAuthority`]: its [`KeyAuthority`] and [`Arbiter`], with
/// this host as the caller.
pub struct MemoryClient {
    shared: Arc<Shared>,
    host: String,
}

impl std::fmt::Debug for MemoryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryClient")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Which side of a migration a caller is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Party {
    Source,
    Destination,
}

fn refused(msg: String) -> AuthorityError {
    AuthorityError::Refused(msg)
}

impl MemoryClient {
    fn answering(&self) -> bool {
        !self.shared.unreachable.load(Ordering::SeqCst)
    }

    fn create(&self, vm: &str, destination: &str) -> Result<IssuedKey, AuthorityError> {
        if !self.answering() {
            return Err(AuthorityError::Unreachable(SILENT.into()));
        }
        if vm.is_empty() || destination.is_empty() {
            return Err(refused("the VM and the destination must be named".into()));
        }
        if destination == self.host {
            return Err(refused(
                "the destination is the caller itself; a migration needs two hosts".into(),
            ));
        }
        let no_randomness = || AuthorityError::Unreachable("no OS randomness".into());
        let random = handshake_random().map_err(|_| no_randomness())?;
        let (id, nonce) = random.split_at(16);
        let id = MigrationId(id.try_into().map_err(|_| no_randomness())?);
        let nonce = MigrationNonce(nonce[..8].try_into().map_err(|_| no_randomness())?);
        let key = MigrationKey::generate().map_err(|_| no_randomness())?;
        let copy = KeyMaterial {
            key: MigrationKey::from_bytes(*key.expose_secret()),
            nonce,
        };
        let mut migrations = lock(&self.shared.migrations);
        if migrations.contains_key(&id) {
            return Err(AuthorityError::Unreachable(
                "migration id collision; retry".into(),
            ));
        }
        migrations.insert(
            id,
            Migration {
                source: self.host.clone(),
                destination: destination.to_owned(),
                vm: vm.to_owned(),
                key: KeyState::Available(KeyMaterial { key, nonce }),
            },
        );
        self.shared.records.open(id);
        let destination = match lock(&self.shared.hosts).get(destination) {
            None => DestinationCapability::Unregistered,
            Some(true) => DestinationCapability::Encrypts,
            Some(false) => DestinationCapability::DoesNotEncrypt,
        };
        Ok(IssuedKey {
            id,
            material: copy,
            destination,
        })
    }

    fn fetch(&self, id: MigrationId) -> Result<FetchedKey, AuthorityError> {
        if !self.answering() {
            return Err(AuthorityError::Unreachable(SILENT.into()));
        }
        let mut migrations = lock(&self.shared.migrations);
        let Some(m) = migrations.get_mut(&id) else {
            return Err(refused(format!("no migration {id}")));
        };
        if m.destination != self.host {
            return Err(refused(format!(
                "only migration {id}'s destination may fetch its key"
            )));
        }
        match std::mem::replace(&mut m.key, KeyState::Fetched) {
            KeyState::Available(material) => Ok(FetchedKey {
                material,
                source: m.source.clone(),
                vm: m.vm.clone(),
            }),
            KeyState::Fetched => Err(refused(format!(
                "the key of migration {id} was already fetched"
            ))),
            KeyState::Gone => {
                m.key = KeyState::Gone;
                Err(refused(format!("the key of migration {id} expired")))
            }
        }
    }

    /// The caller's side of migration `id`, if it may take step `t` (or read, `None`).
    fn party(&self, id: MigrationId, t: Option<Transition>) -> Result<(), ArbiterError> {
        if !self.answering() {
            return Err(ArbiterError::Unreachable(SILENT.into()));
        }
        let migrations = lock(&self.shared.migrations);
        let Some(m) = migrations.get(&id) else {
            return Err(ArbiterError::Refused(format!("no migration {id}")));
        };
        let party = if m.source == self.host {
            Party::Source
        } else if m.destination == self.host {
            Party::Destination
        } else {
            return Err(ArbiterError::Refused(format!(
                "{} is not a party to migration {id}",
                self.host
            )));
        };
        let allowed = match t {
            None | Some(Transition::Abort) => true,
            Some(Transition::Commit | Transition::Revert) => party == Party::Source,
            Some(Transition::Claim) => party == Party::Destination,
        };
        if allowed {
            Ok(())
        } else {
            Err(ArbiterError::Refused(format!(
                "{} may not take {t:?} on migration {id}",
                self.host
            )))
        }
    }
}

impl KeyAuthority for MemoryClient {
    /// The memory authority has no admission limits and no in-flight check of its own
    /// (callers keep one with `vmotion::InFlight`), so `abort_stale` has nothing to abort.
    fn create_migration_with<'a>(
        &'a self,
        vm: &'a str,
        destination: &'a str,
        _options: CreateOptions,
    ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>> {
        let r = self.create(vm, destination);
        Box::pin(async move { r })
    }

    fn fetch_key(&self, id: MigrationId) -> BoxFuture<'_, Result<FetchedKey, AuthorityError>> {
        let r = self.fetch(id);
        Box::pin(async move { r })
    }
}

impl Arbiter for MemoryClient {
    fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        Box::pin(async move {
            self.party(id, None)?;
            self.shared.records.read(id).await
        })
    }

    fn ask(&self, id: MigrationId, t: Transition) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        Box::pin(async move {
            self.party(id, Some(t))?;
            let r = self.shared.records.ask(id, t).await?;
            // Past any outcome no one may fetch the key any more (as at the key service).
            if r != Record::Open
                && let Some(m) = lock(&self.shared.migrations).get_mut(&id)
                && matches!(m.key, KeyState::Available(_))
            {
                m.key = KeyState::Gone;
            }
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `r` is a refusal whose message names `needle`.
    #[track_caller]
    fn assert_refused<T: std::fmt::Debug>(r: Result<T, AuthorityError>, needle: &str) {
        match r {
            Err(AuthorityError::Refused(m)) if m.contains(needle) => {}
            other => panic!("expected a refusal naming `{needle}`, got {other:?}"),
        }
    }

    fn encrypting_pair() -> (MemoryAuthority, Arc<MemoryClient>, Arc<MemoryClient>) {
        let a = MemoryAuthority::new();
        a.register("dst", true);
        (a.clone(), a.client("src"), a.client("dst"))
    }

    #[tokio::test]
    async fn the_destination_fetches_the_issued_key_once() {
        let (a, src, dst) = encrypting_pair();
        let issued = src.create_migration("vm-1", "dst").await.unwrap();
        assert_eq!(issued.destination, DestinationCapability::Encrypts);
        let fetched = dst.fetch_key(issued.id).await.unwrap();
        assert_eq!(
            fetched.material.key.expose_secret(),
            issued.material.key.expose_secret()
        );
        assert_eq!(fetched.material.nonce, issued.material.nonce);
        assert_eq!(
            (fetched.source.as_str(), fetched.vm.as_str()),
            ("src", "vm-1")
        );
        assert_refused(dst.fetch_key(issued.id).await, "already fetched");
        assert_eq!(a.record(issued.id), Some(Record::Open));
        assert!(
            !format!("{fetched:?}{issued:?}")
                .contains(&format!("{:?}", issued.material.key.expose_secret()))
        );
    }

    #[tokio::test]
    async fn every_migration_gets_a_fresh_id_key_and_nonce() {
        let (a, src, _) = encrypting_pair();
        let one = src.create_migration("vm-1", "dst").await.unwrap();
        let two = src.create_migration("vm-1", "dst").await.unwrap();
        assert_ne!(one.id, two.id);
        assert_ne!(
            one.material.key.expose_secret(),
            two.material.key.expose_secret()
        );
        assert_ne!(one.material.nonce, two.material.nonce);
        assert_eq!(a.migrations().len(), 2);
    }

    #[tokio::test]
    async fn the_registry_says_whether_the_destination_encrypts() {
        let (a, src, _) = encrypting_pair();
        let unknown = src.create_migration("vm-1", "elsewhere").await.unwrap();
        assert_eq!(
            unknown.destination,
            DestinationCapability::Unregistered,
            "an unknown destination gets a key, and the policy decides"
        );
        a.register("dst", false);
        let plain = src.create_migration("vm-1", "dst").await.unwrap();
        assert_eq!(plain.destination, DestinationCapability::DoesNotEncrypt);
    }

    #[tokio::test]
    async fn only_the_destination_gets_the_key() {
        let (a, src, dst) = encrypting_pair();
        let issued = src.create_migration("vm-1", "dst").await.unwrap();
        for other in [src.clone(), a.client("third")] {
            assert_refused(other.fetch_key(issued.id).await, "only migration");
        }
        assert_refused(dst.fetch_key(MigrationId([7; 16])).await, "no migration");
        assert!(
            dst.fetch_key(issued.id).await.is_ok(),
            "refusals took nothing"
        );
    }

    #[tokio::test]
    async fn a_migration_needs_two_hosts_and_names() {
        let (_, src, _) = encrypting_pair();
        for (vm, destination, why) in [
            ("vm-1", "src", "two hosts"),
            ("", "dst", "must be named"),
            ("vm-1", "", "must be named"),
        ] {
            assert_refused(src.create_migration(vm, destination).await, why);
        }
    }

    #[tokio::test]
    async fn expired_and_settled_keys_are_not_handed_out() {
        let (a, src, dst) = encrypting_pair();
        let expired = src.create_migration("vm-1", "dst").await.unwrap();
        a.expire_key(expired.id);
        assert_refused(dst.fetch_key(expired.id).await, "expired");
        let aborted = src.create_migration("vm-1", "dst").await.unwrap();
        assert_eq!(
            src.ask(aborted.id, Transition::Abort).await,
            Ok(Record::Aborted)
        );
        assert!(
            dst.fetch_key(aborted.id).await.is_err(),
            "past an outcome the key is gone"
        );
    }

    #[tokio::test]
    async fn each_step_is_reserved_to_its_party() {
        let (a, src, dst) = encrypting_pair();
        let id = src.create_migration("vm-1", "dst").await.unwrap().id;
        let third = a.client("third");
        assert!(matches!(
            third.read(id).await,
            Err(ArbiterError::Refused(_))
        ));
        assert!(matches!(
            dst.ask(id, Transition::Commit).await,
            Err(ArbiterError::Refused(_))
        ));
        assert_eq!(
            a.record(id),
            Some(Record::Open),
            "a refusal takes no effect"
        );
        assert_eq!(src.ask(id, Transition::Commit).await, Ok(Record::Committed));
        assert!(matches!(
            src.ask(id, Transition::Claim).await,
            Err(ArbiterError::Refused(_))
        ));
        assert!(matches!(
            dst.ask(id, Transition::Revert).await,
            Err(ArbiterError::Refused(_))
        ));
        assert_eq!(dst.ask(id, Transition::Claim).await, Ok(Record::Claimed));
        assert_eq!(
            src.ask(id, Transition::Revert).await,
            Ok(Record::Claimed),
            "the revert lost the race"
        );
        assert_eq!(src.read(id).await, Ok(Record::Claimed));
    }

    #[tokio::test]
    async fn a_silent_authority_answers_nothing_and_changes_nothing() {
        let (a, src, dst) = encrypting_pair();
        let id = src.create_migration("vm-1", "dst").await.unwrap().id;
        a.set_unreachable(true);
        assert!(matches!(
            src.create_migration("vm-2", "dst").await,
            Err(AuthorityError::Unreachable(_))
        ));
        assert!(matches!(
            dst.fetch_key(id).await,
            Err(AuthorityError::Unreachable(_))
        ));
        assert!(matches!(
            src.ask(id, Transition::Commit).await,
            Err(ArbiterError::Unreachable(_))
        ));
        assert_eq!(a.migrations(), vec![id]);
        assert_eq!(a.record(id), Some(Record::Open));
        a.set_unreachable(false);
        assert!(dst.fetch_key(id).await.is_ok(), "the key waited");
    }
}
