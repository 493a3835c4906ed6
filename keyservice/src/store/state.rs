//! The journal store's in-memory state: the host registry and the migrations, with their
//! keys in zeroizing types, the VMs in flight and the admission counts. Every operation is
//! a pure function of the state, the caller and `now`, so the rules are unit-tested
//! without sockets or clocks.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmotion_proto::{KeyMaterial, MigrationId, MigrationKey, MigrationNonce};

use super::rules::{
    self, InFlight, Limits, Refused, Step, holds_vm, outcome_step, parse_id, refuse,
};
use crate::api::{ErrorCode, HostRecord, Outcome, OutcomeRecord, RegisterRequest};

/// How long a migration's record (not its key) stays in memory for outcome queries.
pub(crate) const RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Most records held in memory (a few hundred bytes each); past it the oldest go first.
/// Their outcomes stay in the journal but are no longer served until the next restart.
pub(crate) const MAX_RECORDS: usize = 1_000_000;

/// Where a migration's key is in its life.
#[derive(Debug)]
enum KeyState {
    /// Waiting for the destination.
    Available(KeyMaterial),
    /// Handed to the destination (and zeroized here).
    Fetched,
    /// Expired before it was fetched (zeroized), or lost in a restart.
    Expired,
}

#[derive(Debug)]
struct Migration {
    source: String,
    destination: String,
    vm: String,
    key: KeyState,
    key_expires: Instant,
    outcome: OutcomeState,
    /// It holds its VM and counts against the limits (created, no outcome yet, not past
    /// `in_flight_ttl`).
    in_flight: bool,
    /// The source's request id, while a retry may still be answered with this migration.
    request: Option<[u8; 16]>,
}

/// Where a migration's outcome record is. A transition is visible to readers only once its
/// journal line is on disk: a destination must never see `committed` (nor a source
/// `claimed`) that a crash could undo. While one is in flight, readers still see the
/// previous state and every other write is refused as `unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct OutcomeState {
    /// The latest transition on disk, at this time (Unix ms); `None` is `null`.
    recorded: Option<(Outcome, u64)>,
    /// A transition accepted, its journal write in flight.
    pending: Option<Outcome>,
}

impl OutcomeState {
    fn current(self) -> Option<Outcome> {
        self.recorded.map(|(o, _)| o)
    }
}

#[derive(Debug)]
struct HostEntry {
    record: HostRecord,
    expires: Instant,
}

/// One line of the outcome journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum JournalEntry {
    /// A migration was created (no key material, ever).
    Created {
        migration_id: String,
        source: String,
        destination: String,
        vm: String,
        time_ms: u64,
    },
    /// Its outcome was recorded.
    Outcome {
        migration_id: String,
        outcome: Outcome,
        time_ms: u64,
    },
    /// A host went into maintenance (`draining`) or out of it.
    Maintenance {
        host: String,
        draining: bool,
        time_ms: u64,
    },
}

/// What `create` hands back. Holds the key: no `Debug`, zeroized on drop.
pub(crate) struct Created {
    pub(crate) id: MigrationId,
    pub(crate) key: [u8; 32],
    pub(crate) nonce: [u8; 8],
    pub(crate) destination: Option<HostRecord>,
    /// The line to journal; `None` for a retry of a create already journaled.
    pub(crate) journal: Option<JournalEntry>,
    /// In flight once this one is counted.
    pub(crate) in_flight: InFlight,
    /// When the key expires (Unix ms).
    pub(crate) expires_at_ms: u64,
}

/// What a `create` asks of the state.
pub(crate) struct NewMigration<'a> {
    pub(crate) caller: &'a str,
    pub(crate) vm: &'a str,
    pub(crate) destination: &'a str,
    /// Fresh id and material, used unless the request id names an earlier attempt.
    pub(crate) id: MigrationId,
    pub(crate) key: zeroize::Zeroizing<[u8; 32]>,
    pub(crate) nonce: [u8; 8],
    pub(crate) request: Option<[u8; 16]>,
    pub(crate) abort_stale: bool,
}

/// What the state decided for a `create`.
pub(crate) enum CreateStep {
    /// Created (or answered again, for a retry).
    Created(Created),
    /// `abort_stale`: the caller's own earlier migration of the VM, still at `null`, is
    /// now being aborted. Write the line durably, confirm it, then create again.
    AbortFirst {
        stale: MigrationId,
        journal: JournalEntry,
    },
}

impl Drop for Created {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// What `fetch_key` hands back.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) material: KeyMaterial,
    pub(crate) source: String,
    pub(crate) vm: String,
}

/// The whole state.
#[derive(Debug)]
pub(crate) struct State {
    hosts: HashMap<String, HostEntry>,
    migrations: HashMap<MigrationId, Migration>,
    /// Migrations in creation order, so a sweep touches only what expires: every key
    /// lives `key_ttl` and every record `RECORD_RETENTION`, so creation order is expiry
    /// order and the sweep never walks the whole map under the lock.
    by_age: VecDeque<(Instant, MigrationId)>,
    /// Migrations whose key may still be held, in creation (= expiry) order.
    keys_by_age: VecDeque<(Instant, MigrationId)>,
    /// Migrations that may be in flight, in creation (= `in_flight_ttl` expiry) order.
    in_flight_by_age: VecDeque<(Instant, MigrationId)>,
    /// The migration that holds each VM in flight.
    vms: HashMap<String, MigrationId>,
    /// Migrations in flight per source and per destination host.
    outbound: HashMap<String, usize>,
    inbound: HashMap<String, usize>,
    /// A source's request ids, to the migration each created.
    requests: HashMap<(String, [u8; 16]), MigrationId>,
    /// Hosts in maintenance: no migration is created to them.
    draining: std::collections::BTreeSet<String>,
    limits: Limits,
    key_ttl: Duration,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Limits::default(), Duration::from_secs(300))
    }
}

impl State {
    /// An empty state under these limits.
    pub(crate) fn new(limits: Limits, key_ttl: Duration) -> Self {
        Self {
            hosts: HashMap::new(),
            migrations: HashMap::new(),
            by_age: VecDeque::new(),
            keys_by_age: VecDeque::new(),
            in_flight_by_age: VecDeque::new(),
            vms: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            requests: HashMap::new(),
            draining: std::collections::BTreeSet::new(),
            limits,
            key_ttl,
        }
    }

    /// Puts `host` in maintenance or takes it out; the journal line when it changed.
    pub(crate) fn set_draining(
        &mut self,
        host: &str,
        draining: bool,
        now_ms: u64,
    ) -> Option<JournalEntry> {
        let changed = if draining {
            self.draining.insert(host.to_owned())
        } else {
            self.draining.remove(host)
        };
        changed.then(|| JournalEntry::Maintenance {
            host: host.to_owned(),
            draining,
            time_ms: now_ms,
        })
    }

    /// Whether `host` is in maintenance.
    pub(crate) fn is_draining(&self, host: &str) -> bool {
        self.draining.contains(host)
    }

    /// Registers or refreshes `caller`'s capabilities.
    pub(crate) fn register(
        &mut self,
        caller: &str,
        req: RegisterRequest,
        now: Instant,
        now_ms: u64,
        ttl: Duration,
    ) -> HostRecord {
        let record = HostRecord {
            host: caller.to_owned(),
            can_encrypt: req.can_encrypt,
            protocol_versions: req.protocol_versions,
            ciphers: req.ciphers,
            expires_at_ms: now_ms + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        self.hosts.insert(
            caller.to_owned(),
            HostEntry {
                record: record.clone(),
                expires: now + ttl,
            },
        );
        record
    }

    /// A live registry entry.
    pub(crate) fn host(&self, host: &str, now: Instant) -> Option<HostRecord> {
        self.hosts
            .get(host)
            .filter(|e| e.expires > now)
            .map(|e| e.record.clone())
    }

    /// Creates a migration from `caller` (the source) with fresh key material, taking its
    /// VM's lock and an admission slot; or answers a retried request with the migration
    /// it created.
    pub(crate) fn create(
        &mut self,
        new: NewMigration<'_>,
        now: Instant,
        now_ms: u64,
    ) -> Result<CreateStep, Refused> {
        rules::check_create(new.caller, new.vm, new.destination)?;
        if let Some(rid) = new.request
            && let Some(&id) = self.requests.get(&(new.caller.to_owned(), rid))
        {
            return self
                .created_again(id, new.vm, new.destination, now)
                .map(CreateStep::Created);
        }
        if let Some(&holder) = self.vms.get(new.vm) {
            return self.stale_or_refused(&new, holder, now_ms);
        }
        if self.is_draining(new.destination) {
            return Err(rules::draining(new.destination));
        }
        let counted = self.in_flight_for(new.caller, new.destination);
        self.limits.admit(counted, new.caller, new.destination)?;
        if self.migrations.contains_key(&new.id) {
            // 2^-128 per pair; answered as an internal error rather than ever reused.
            return refuse(ErrorCode::Internal, "migration id collision; retry");
        }
        let NewMigration {
            caller,
            vm,
            destination,
            id,
            key,
            nonce,
            request,
            ..
        } = new;
        self.by_age.push_back((now, id));
        self.keys_by_age.push_back((now, id));
        self.in_flight_by_age.push_back((now, id));
        if let Some(rid) = request {
            self.requests.insert((caller.to_owned(), rid), id);
        }
        self.migrations.insert(
            id,
            Migration {
                source: caller.to_owned(),
                destination: destination.to_owned(),
                vm: vm.to_owned(),
                key: KeyState::Available(KeyMaterial {
                    key: MigrationKey::from_bytes(*key),
                    nonce: MigrationNonce(nonce),
                }),
                key_expires: now + self.key_ttl,
                outcome: OutcomeState::default(),
                in_flight: false,
                request,
            },
        );
        self.hold(id);
        Ok(CreateStep::Created(Created {
            id,
            key: *key,
            nonce,
            destination: self.host(destination, now),
            journal: Some(JournalEntry::Created {
                migration_id: id.to_string(),
                source: caller.to_owned(),
                destination: destination.to_owned(),
                vm: vm.to_owned(),
                time_ms: now_ms,
            }),
            in_flight: self.in_flight_for(caller, destination),
            expires_at_ms: now_ms + ms(self.key_ttl),
        }))
    }

    /// A retried create: the migration it made, with the same key while it waits.
    fn created_again(
        &self,
        id: MigrationId,
        vm: &str,
        destination: &str,
        now: Instant,
    ) -> Result<Created, Refused> {
        let Some(m) = self.migrations.get(&id) else {
            return refuse(
                ErrorCode::Expired,
                format!("migration {id} of this request is gone"),
            );
        };
        if m.vm != vm || m.destination != destination {
            return refuse(
                ErrorCode::BadRequest,
                format!(
                    "this request id already created migration {id}, of another VM or destination"
                ),
            );
        }
        let KeyState::Available(material) = &m.key else {
            return refuse(
                ErrorCode::Expired,
                format!("this request already created migration {id}, whose key is no longer held"),
            );
        };
        let now_ms_left = m.key_expires.saturating_duration_since(now);
        Ok(Created {
            id,
            key: *material.key.expose_secret(),
            nonce: material.nonce.0,
            destination: self.host(destination, now),
            journal: None,
            in_flight: self.in_flight_for(&m.source, destination),
            expires_at_ms: crate::store::unix_ms() + ms(now_ms_left),
        })
    }

    /// A create for a VM that `holder` holds: refused, or (`abort_stale`, the caller's own
    /// migration still at `null`) that migration aborted first.
    fn stale_or_refused(
        &mut self,
        new: &NewMigration<'_>,
        holder: MigrationId,
        now_ms: u64,
    ) -> Result<CreateStep, Refused> {
        let m = &self.migrations[&holder];
        let detail = format!(" (from {} to {})", m.source, m.destination);
        let stale = new.abort_stale && m.source == new.caller && m.outcome.current().is_none();
        if !stale || m.outcome.pending.is_some() {
            let hint = if new.abort_stale && m.source == new.caller {
                "; its outcome is being recorded, retry"
            } else {
                ""
            };
            return Err(rules::vm_in_flight(
                new.vm,
                holder,
                &format!("{detail}{hint}"),
            ));
        }
        let (_, journal) = self.record_outcome(new.caller, holder, Outcome::Aborted, now_ms)?;
        let journal = journal.expect("null → aborted is a transition");
        Ok(CreateStep::AbortFirst {
            stale: holder,
            journal,
        })
    }

    fn in_flight_for(&self, source: &str, destination: &str) -> InFlight {
        InFlight {
            source: self.outbound.get(source).copied().unwrap_or(0),
            destination: self.inbound.get(destination).copied().unwrap_or(0),
            cluster: self.vms.len(),
        }
    }

    /// Takes migration `id`'s VM lock and its slots.
    fn hold(&mut self, id: MigrationId) {
        let Some(m) = self.migrations.get_mut(&id) else {
            return;
        };
        if m.in_flight || self.vms.contains_key(&m.vm) {
            return;
        }
        m.in_flight = true;
        self.vms.insert(m.vm.clone(), id);
        *self.outbound.entry(m.source.clone()).or_default() += 1;
        *self.inbound.entry(m.destination.clone()).or_default() += 1;
    }

    /// Gives migration `id`'s VM lock and slots back.
    fn release(&mut self, id: MigrationId) {
        let Some(m) = self.migrations.get_mut(&id) else {
            return;
        };
        if !m.in_flight {
            return;
        }
        m.in_flight = false;
        if self.vms.get(&m.vm) == Some(&id) {
            self.vms.remove(&m.vm);
        }
        for (counts, host) in [
            (&mut self.outbound, &m.source),
            (&mut self.inbound, &m.destination),
        ] {
            if let Some(n) = counts.get_mut(host) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(host);
                }
            }
        }
    }

    /// Migrations in flight in the whole state.
    pub(crate) fn in_flight(&self) -> usize {
        self.vms.len()
    }

    /// Hands the key to the migration's destination, once. The service's copy is dropped
    /// (zeroized) as it is handed out.
    pub(crate) fn fetch_key(
        &mut self,
        caller: &str,
        id: MigrationId,
        now: Instant,
    ) -> Result<Fetched, Refused> {
        let Some(m) = self.migrations.get_mut(&id) else {
            return refuse(ErrorCode::NotFound, format!("no migration {id}"));
        };
        if m.destination != caller {
            // Same answer for the source and for third hosts, whatever the key's state:
            // nothing about the migration leaks to a host that has no business with it.
            return refuse(
                ErrorCode::Forbidden,
                format!("only migration {id}'s destination may fetch its key"),
            );
        }
        if let KeyState::Available(_) = m.key
            && m.key_expires <= now
        {
            m.key = KeyState::Expired;
        }
        match std::mem::replace(&mut m.key, KeyState::Fetched) {
            KeyState::Available(material) => Ok(Fetched {
                material,
                source: m.source.clone(),
                vm: m.vm.clone(),
            }),
            KeyState::Fetched => refuse(
                ErrorCode::AlreadyFetched,
                format!("the key of migration {id} was already fetched"),
            ),
            KeyState::Expired => {
                m.key = KeyState::Expired;
                refuse(
                    ErrorCode::Expired,
                    format!("the key of migration {id} expired"),
                )
            }
        }
    }

    /// Accepts one transition of the outcome record (see [`Outcome`] for the arrows and
    /// who may take each). Returns the journal line to write durably, then
    /// [`confirm_outcome`] before answering; `None` if the record already says `outcome`
    /// happened (an idempotent retry). A key still waiting for its destination is dropped:
    /// past any outcome, no one may fetch it any more.
    ///
    /// [`confirm_outcome`]: Self::confirm_outcome
    pub(crate) fn record_outcome(
        &mut self,
        caller: &str,
        id: MigrationId,
        outcome: Outcome,
        now_ms: u64,
    ) -> Result<(OutcomeRecord, Option<JournalEntry>), Refused> {
        let Some(m) = self.migrations.get_mut(&id) else {
            return refuse(ErrorCode::NotFound, format!("no migration {id}"));
        };
        let step = outcome_step(
            id,
            (&m.source, &m.destination),
            caller,
            m.outcome.current(),
            outcome,
        );
        // A refused caller learns nothing about the record, not even a write in flight.
        if let Err(Refused(ErrorCode::Forbidden, ..)) = step {
            return step.map(|_| unreachable!());
        }
        if m.outcome.pending.is_some() {
            return refuse(
                ErrorCode::Unavailable,
                format!("the outcome of migration {id} is being recorded; read it back"),
            );
        }
        if step? == Step::Retry {
            return Ok((record(id, m), None));
        }
        m.outcome.pending = Some(outcome);
        if matches!(m.key, KeyState::Available(_)) {
            m.key = KeyState::Expired;
        }
        let journal = JournalEntry::Outcome {
            migration_id: id.to_string(),
            outcome,
            time_ms: now_ms,
        };
        Ok((record(id, m), Some(journal)))
    }

    /// Makes a pending transition visible once its journal line is on disk.
    pub(crate) fn confirm_outcome(
        &mut self,
        id: MigrationId,
        time_ms: u64,
    ) -> Option<OutcomeRecord> {
        let m = self.migrations.get_mut(&id)?;
        if let Some(o) = m.outcome.pending.take() {
            m.outcome.recorded = Some((o, time_ms));
        }
        let record = record(id, m);
        if !holds_vm(record.outcome) {
            self.release(id);
        }
        Some(record)
    }

    /// Reads the outcome; the source and the destination may.
    pub(crate) fn outcome(&self, caller: &str, id: MigrationId) -> Result<OutcomeRecord, Refused> {
        let Some(m) = self.migrations.get(&id) else {
            return refuse(ErrorCode::NotFound, format!("no migration {id}"));
        };
        if m.source != caller && m.destination != caller {
            return refuse(
                ErrorCode::Forbidden,
                format!("only migration {id}'s source and destination may read its outcome"),
            );
        }
        Ok(record(id, m))
    }

    /// Zeroizes expired keys, forgets expired registrations and old records.
    pub(crate) fn expire(&mut self, now: Instant) {
        let key_ttl = self.key_ttl;
        self.hosts.retain(|_, h| h.expires > now);
        // Migrations past `in_flight_ttl` still at `null` free their VM and slots.
        while let Some(&(created, id)) = self.in_flight_by_age.front() {
            if now.saturating_duration_since(created) < self.limits.in_flight_ttl {
                break;
            }
            self.in_flight_by_age.pop_front();
            self.release(id);
        }
        // Records past retention (or past the cap) go entirely, their keys with them.
        while let Some(&(created, id)) = self.by_age.front() {
            if now.saturating_duration_since(created) < RECORD_RETENTION
                && self.by_age.len() <= MAX_RECORDS
            {
                break;
            }
            self.by_age.pop_front();
            self.release(id);
            if let Some(m) = self.migrations.remove(&id)
                && let Some(rid) = m.request
            {
                self.requests.remove(&(m.source, rid));
            }
        }
        // Keys past their TTL are zeroized, oldest first, touching only those.
        while let Some(&(created, id)) = self.keys_by_age.front() {
            if now.saturating_duration_since(created) < key_ttl {
                break;
            }
            self.keys_by_age.pop_front();
            let Some(m) = self.migrations.get_mut(&id) else {
                continue;
            };
            if matches!(m.key, KeyState::Available(_)) {
                m.key = KeyState::Expired;
            }
            // Past the key's life a retry could only be told `expired`: forget the id.
            if let Some(rid) = m.request.take() {
                self.requests.remove(&(m.source.clone(), rid));
            }
        }
    }

    /// Number of keys held.
    pub(crate) fn keys_held(&self) -> usize {
        self.migrations
            .values()
            .filter(|m| matches!(m.key, KeyState::Available(_)))
            .count()
    }

    /// Drops every key (zeroizing it): on shutdown.
    pub(crate) fn drop_all_keys(&mut self) {
        for m in self.migrations.values_mut() {
            if matches!(m.key, KeyState::Available(_)) {
                m.key = KeyState::Expired;
            }
        }
    }

    /// Rebuilds records (never keys) from the journal. Records older than the retention
    /// are skipped. Returns how many migrations were restored.
    pub(crate) fn replay(
        &mut self,
        entries: impl IntoIterator<Item = JournalEntry>,
        now: Instant,
        now_ms: u64,
    ) -> usize {
        let retention_ms = u64::try_from(RECORD_RETENTION.as_millis()).unwrap_or(u64::MAX);
        for e in entries {
            match e {
                JournalEntry::Created {
                    migration_id,
                    source,
                    destination,
                    vm,
                    time_ms,
                } => {
                    let age = now_ms.saturating_sub(time_ms);
                    let (Ok(id), true) = (parse_id(&migration_id), age < retention_ms) else {
                        continue;
                    };
                    let created = now.checked_sub(Duration::from_millis(age)).unwrap_or(now);
                    self.by_age.push_back((created, id));
                    self.migrations.insert(
                        id,
                        Migration {
                            source,
                            destination,
                            vm,
                            key: KeyState::Expired,
                            key_expires: now,
                            outcome: OutcomeState::default(),
                            in_flight: false,
                            request: None,
                        },
                    );
                    if Duration::from_millis(age) < self.limits.in_flight_ttl {
                        self.in_flight_by_age.push_back((created, id));
                        self.hold(id);
                    }
                }
                JournalEntry::Outcome {
                    migration_id,
                    outcome,
                    time_ms,
                } => self.replay_outcome(&migration_id, outcome, time_ms),
                JournalEntry::Maintenance { host, draining, .. } => {
                    self.set_draining(&host, draining, 0);
                }
            }
        }
        self.migrations.len()
    }

    /// Applies one outcome line with the rules it was answered under: a line that is no
    /// arrow from the replayed state (a second `committed`, `aborted` after `committed`)
    /// is ignored, so the first outcome still wins. Lines of unknown (or no longer
    /// retained) migrations are skipped.
    fn replay_outcome(&mut self, migration_id: &str, outcome: Outcome, time_ms: u64) {
        let Ok(id) = parse_id(migration_id) else {
            return;
        };
        let Some(m) = self.migrations.get_mut(&id) else {
            return;
        };
        let current = m.outcome.current();
        if rules::is_transition(current, outcome) {
            m.outcome.recorded = Some((outcome, time_ms));
            if !holds_vm(Some(outcome)) {
                self.release(id);
            }
        } else {
            tracing::warn!(
                %migration_id,
                recorded = current.map_or("null", Outcome::as_str),
                line = %outcome,
                "ignoring an outcome line that is no transition from the replayed state"
            );
        }
    }
}

fn record(id: MigrationId, m: &Migration) -> OutcomeRecord {
    OutcomeRecord {
        migration_id: id.to_string(),
        source: m.source.clone(),
        destination: m.destination.clone(),
        vm: m.vm.clone(),
        outcome: m.outcome.recorded.map(|(o, _)| o),
        recorded_at_ms: m.outcome.recorded.map(|(_, t)| t),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
impl State {
    /// `create` with the key's TTL given, as the tests below were written.
    #[allow(clippy::too_many_arguments)]
    fn create_test(
        &mut self,
        caller: &str,
        vm: &str,
        destination: &str,
        id: MigrationId,
        key: [u8; 32],
        nonce: [u8; 8],
        now: Instant,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Created, Refused> {
        self.key_ttl = ttl;
        let new = NewMigration {
            caller,
            vm,
            destination,
            id,
            key: zeroize::Zeroizing::new(key),
            nonce,
            request: None,
            abort_stale: false,
        };
        match self.create(new, now, now_ms)? {
            CreateStep::Created(c) => Ok(c),
            CreateStep::AbortFirst { .. } => panic!("no abort_stale here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn state_with_migration(now: Instant) -> (State, MigrationId) {
        let mut s = State::default();
        let id = MigrationId([1; 16]);
        s.create_test("src", "vm1", "dst", id, [7; 32], [8; 8], now, 0, TTL)
            .unwrap();
        (s, id)
    }

    #[test]
    fn only_the_destination_fetches_and_only_once() {
        let now = Instant::now();
        let (mut s, id) = state_with_migration(now);
        for caller in ["src", "third"] {
            assert_eq!(
                s.fetch_key(caller, id, now).unwrap_err().0,
                ErrorCode::Forbidden
            );
        }
        let f = s.fetch_key("dst", id, now).unwrap();
        assert_eq!(f.material.key.expose_secret(), &[7; 32]);
        assert_eq!(s.keys_held(), 0, "handed out for the last time: gone");
        assert_eq!(
            s.fetch_key("dst", id, now).unwrap_err().0,
            ErrorCode::AlreadyFetched
        );
        assert_eq!(
            s.fetch_key("dst", MigrationId([2; 16]), now).unwrap_err().0,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn keys_expire() {
        let now = Instant::now();
        let (mut s, id) = state_with_migration(now);
        assert_eq!(
            s.fetch_key("dst", id, now + TTL).unwrap_err().0,
            ErrorCode::Expired
        );
        // Still expired (not "already fetched") on a second try.
        assert_eq!(
            s.fetch_key("dst", id, now + TTL).unwrap_err().0,
            ErrorCode::Expired
        );
        let (mut s, _) = state_with_migration(now);
        s.expire(now + TTL - Duration::from_millis(1));
        assert_eq!(s.keys_held(), 1, "not yet");
        s.expire(now + TTL);
        assert_eq!(s.keys_held(), 0);
        // Records outlive keys, up to the retention.
        s.expire(now + RECORD_RETENTION - Duration::from_secs(1));
        assert!(s.outcome("src", MigrationId([1; 16])).is_ok());
        s.expire(now + RECORD_RETENTION);
        assert_eq!(
            s.outcome("src", MigrationId([1; 16])).unwrap_err().0,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn outcome_rules() {
        let now = Instant::now();
        let (mut s, id) = state_with_migration(now);
        assert_eq!(
            s.record_outcome("dst", id, Outcome::Committed, 5)
                .unwrap_err()
                .0,
            ErrorCode::Forbidden
        );
        let (rec, journal) = s.record_outcome("src", id, Outcome::Committed, 5).unwrap();
        assert!(journal.is_some());
        // Not visible, not repeatable, until it is on disk.
        assert_eq!(rec.outcome, None);
        assert_eq!(s.outcome("dst", id).unwrap().outcome, None);
        assert_eq!(
            s.record_outcome("src", id, Outcome::Committed, 5)
                .unwrap_err()
                .0,
            ErrorCode::Unavailable
        );
        let rec = s.confirm_outcome(id, 5).unwrap();
        assert_eq!(rec.outcome, Some(Outcome::Committed));
        let (_, again) = s.record_outcome("src", id, Outcome::Committed, 6).unwrap();
        assert!(again.is_none(), "idempotent");
        assert_eq!(
            s.record_outcome("src", id, Outcome::Aborted, 7)
                .unwrap_err()
                .0,
            ErrorCode::Conflict
        );
        assert_eq!(
            s.outcome("dst", id).unwrap().outcome,
            Some(Outcome::Committed)
        );
        assert_eq!(s.outcome("third", id).unwrap_err().0, ErrorCode::Forbidden);
    }

    #[test]
    fn replay_restores_records_but_never_keys() {
        let now = Instant::now();
        let entries = vec![
            JournalEntry::Created {
                migration_id: MigrationId([3; 16]).to_string(),
                source: "a".into(),
                destination: "b".into(),
                vm: "v".into(),
                time_ms: 1_000,
            },
            JournalEntry::Outcome {
                migration_id: MigrationId([3; 16]).to_string(),
                outcome: Outcome::Aborted,
                time_ms: 2_000,
            },
        ];
        let mut s = State::default();
        assert_eq!(s.replay(entries, now, 3_000), 1);
        let id = MigrationId([3; 16]);
        assert_eq!(s.outcome("b", id).unwrap().outcome, Some(Outcome::Aborted));
        assert_eq!(s.fetch_key("b", id, now).unwrap_err().0, ErrorCode::Expired);
    }

    #[test]
    fn registry_entries_expire() {
        let now = Instant::now();
        let mut s = State::default();
        let req = RegisterRequest {
            can_encrypt: true,
            protocol_versions: vec![1],
            ciphers: vec!["aes-256-gcm".into()],
        };
        s.register("dst", req, now, 0, TTL);
        assert!(s.host("dst", now).unwrap().encrypts());
        assert!(s.host("dst", now + TTL).is_none());
    }

    #[test]
    fn create_checks_its_inputs() {
        let now = Instant::now();
        let mut s = State::default();
        let mk = |s: &mut State, vm: &str, dst: &str| {
            s.create_test(
                "src",
                vm,
                dst,
                MigrationId([9; 16]),
                [0; 32],
                [0; 8],
                now,
                0,
                TTL,
            )
            .map(|_| ())
            .unwrap_err()
            .0
        };
        assert_eq!(mk(&mut s, "", "dst"), ErrorCode::BadRequest);
        for bad in ["../etc", "a/b", "a b", "a\nb", ".hidden", &"v".repeat(256)] {
            assert_eq!(mk(&mut s, bad, "dst"), ErrorCode::BadRequest, "{bad:?}");
        }
        assert_eq!(mk(&mut s, "vm", "bad host"), ErrorCode::BadRequest);
        assert_eq!(mk(&mut s, "vm", "src"), ErrorCode::BadRequest);
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn ids_must_be_canonical_ascii_hex() {
        assert!(parse_id(&"ab".repeat(16)).is_ok());
        for bad in [
            "a".to_string() + &"é".repeat(15) + "a",
            "€".repeat(10) + "aa",
            "é".repeat(16),
            "AB".repeat(16),
            "+f".repeat(16),
            "ab".repeat(15),
        ] {
            assert_eq!(
                parse_id(&bad).unwrap_err().0,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn an_outcome_drops_a_key_still_waiting() {
        let now = Instant::now();
        let mut s = State::default();
        let id = MigrationId([5; 16]);
        s.create_test(
            "src",
            "vm",
            "dst",
            id,
            [1; 32],
            [2; 8],
            now,
            0,
            Duration::from_secs(60),
        )
        .unwrap();
        s.record_outcome("src", id, Outcome::Aborted, 1).unwrap();
        assert_eq!(s.keys_held(), 0);
        assert_eq!(
            s.fetch_key("dst", id, now).unwrap_err().0,
            ErrorCode::Expired
        );
    }

    #[test]
    fn replay_keeps_the_first_outcome() {
        let now = Instant::now();
        let id = MigrationId([6; 16]);
        let mut s = State::default();
        s.replay(
            [
                JournalEntry::Created {
                    migration_id: id.to_string(),
                    source: "a".into(),
                    destination: "b".into(),
                    vm: "v".into(),
                    time_ms: 1,
                },
                JournalEntry::Outcome {
                    migration_id: id.to_string(),
                    outcome: Outcome::Committed,
                    time_ms: 2,
                },
                JournalEntry::Outcome {
                    migration_id: id.to_string(),
                    outcome: Outcome::Aborted,
                    time_ms: 3,
                },
            ],
            now,
            4,
        );
        assert_eq!(
            s.outcome("a", id).unwrap().outcome,
            Some(Outcome::Committed)
        );
    }
}

#[cfg(test)]
mod transition_tests {
    use super::*;

    const ID: MigrationId = MigrationId([4; 16]);
    const ALL: [Outcome; 4] = [
        Outcome::Committed,
        Outcome::Aborted,
        Outcome::Claimed,
        Outcome::Reverted,
    ];

    /// A migration src → dst whose record went through `path` (each step on disk).
    fn state_at(path: &[(&str, Outcome)]) -> State {
        let mut s = State::default();
        let now = Instant::now();
        s.create_test(
            "src",
            "vm",
            "dst",
            ID,
            [1; 32],
            [2; 8],
            now,
            0,
            Duration::from_secs(60),
        )
        .unwrap();
        for (i, &(caller, o)) in path.iter().enumerate() {
            let t = 10 * (i as u64 + 1);
            let (_, journal) = s.record_outcome(caller, ID, o, t).unwrap();
            assert!(journal.is_some(), "{caller} {o} is a transition");
            s.confirm_outcome(ID, t).unwrap();
        }
        s
    }

    /// Steps of a record: who recorded what.
    type Path = &'static [(&'static str, Outcome)];
    /// A record as a test sees it: the outcome and when it was recorded.
    type Seen = (Option<Outcome>, Option<u64>);

    /// The record's five states, each with a path that leads there.
    fn every_state() -> [(Option<Outcome>, Path); 5] {
        use Outcome::*;
        [
            (None, &[]),
            (Some(Committed), &[("src", Committed)]),
            (Some(Aborted), &[("dst", Aborted)]),
            (Some(Claimed), &[("src", Committed), ("dst", Claimed)]),
            (Some(Reverted), &[("src", Committed), ("src", Reverted)]),
        ]
    }

    fn current(s: &State) -> Option<Outcome> {
        s.outcome("src", ID).unwrap().outcome
    }

    #[test]
    fn every_arrow_by_its_party() {
        use Outcome::*;
        for path in [
            &[("src", Committed), ("dst", Claimed)][..],
            &[("src", Committed), ("src", Reverted)],
            &[("src", Aborted)],
            &[("dst", Aborted)],
        ] {
            let mut s = state_at(&path[..path.len() - 1]);
            let (caller, to) = path[path.len() - 1];
            let before = s.outcome("dst", ID).unwrap();
            let (rec, journal) = s.record_outcome(caller, ID, to, 99).unwrap();
            assert_eq!(
                journal,
                Some(JournalEntry::Outcome {
                    migration_id: ID.to_string(),
                    outcome: to,
                    time_ms: 99,
                })
            );
            // In flight: everyone still sees the state before it.
            assert_eq!(rec, before, "{caller} {to}");
            assert_eq!(s.outcome("dst", ID).unwrap(), before);
            let rec = s.confirm_outcome(ID, 99).unwrap();
            assert_eq!((rec.outcome, rec.recorded_at_ms), (Some(to), Some(99)));
            assert_eq!(s.outcome("src", ID).unwrap(), rec);
        }
    }

    /// Every (state, caller, outcome): written, answered as is, or refused with the
    /// right code; a refusal changes nothing.
    #[test]
    fn the_whole_rule_table() {
        use Outcome::*;
        let writes = [
            (None, "src", Committed),
            (None, "src", Aborted),
            (None, "dst", Aborted),
            (Some(Committed), "dst", Claimed),
            (Some(Committed), "src", Reverted),
        ];
        let retries = [
            (Some(Committed), "src", Committed),
            (Some(Claimed), "src", Committed),
            (Some(Reverted), "src", Committed),
            (Some(Aborted), "src", Aborted),
            (Some(Aborted), "dst", Aborted),
            (Some(Claimed), "dst", Claimed),
            (Some(Reverted), "src", Reverted),
        ];
        let forbidden = |caller: &str, to: Outcome| match caller {
            "src" => to == Claimed,
            "dst" => matches!(to, Committed | Reverted),
            _ => true,
        };
        for (state, path) in every_state() {
            for caller in ["src", "dst", "third"] {
                for to in ALL {
                    let mut s = state_at(path);
                    let before = s.outcome("src", ID).unwrap();
                    assert_eq!(before.outcome, state);
                    let case = format!("{state:?} --{caller}: {to}-->");
                    let got = s.record_outcome(caller, ID, to, 1_000);
                    if writes.contains(&(state, caller, to)) {
                        assert!(got.unwrap().1.is_some(), "{case} writes");
                        continue;
                    }
                    if retries.contains(&(state, caller, to)) {
                        let (rec, journal) = got.unwrap();
                        assert!(journal.is_none(), "{case} is a retry");
                        assert_eq!(rec, before, "{case} answers the record as it is");
                        continue;
                    }
                    let Refused(code, message, _) = got.unwrap_err();
                    if forbidden(caller, to) {
                        assert_eq!(code, ErrorCode::Forbidden, "{case}");
                    } else {
                        assert_eq!(code, ErrorCode::Conflict, "{case}");
                        let named = state.map_or("`null`".to_owned(), |o| format!("`{o}`"));
                        assert!(message.contains(&named), "{case}: {message}");
                    }
                    assert_eq!(s.outcome("src", ID).unwrap(), before, "{case}");
                }
            }
        }
    }

    #[test]
    fn at_most_one_of_claimed_and_reverted() {
        use Outcome::*;
        let mut s = state_at(&[("src", Committed), ("dst", Claimed)]);
        let e = s.record_outcome("src", ID, Reverted, 50).unwrap_err();
        assert_eq!(e.0, ErrorCode::Conflict);
        assert!(e.1.contains("already `claimed`"), "{}", e.1);
        let mut s = state_at(&[("src", Committed), ("src", Reverted)]);
        let e = s.record_outcome("dst", ID, Claimed, 50).unwrap_err();
        assert_eq!(e.0, ErrorCode::Conflict);
        assert!(e.1.contains("already `reverted`"), "{}", e.1);
        assert_eq!(current(&s), Some(Reverted));
    }

    #[test]
    fn a_transition_in_flight_makes_every_other_write_wait() {
        use Outcome::*;
        let mut s = state_at(&[("src", Committed)]);
        s.record_outcome("dst", ID, Claimed, 20).unwrap();
        for (caller, o) in [
            ("src", Reverted),
            ("dst", Claimed),
            ("src", Committed),
            ("dst", Aborted),
        ] {
            assert_eq!(
                s.record_outcome(caller, ID, o, 21).unwrap_err().0,
                ErrorCode::Unavailable,
                "{caller} {o}"
            );
        }
        // A refused caller still gets `forbidden`, not a hint that a write is in flight.
        assert_eq!(
            s.record_outcome("third", ID, Aborted, 21).unwrap_err().0,
            ErrorCode::Forbidden
        );
        assert_eq!(current(&s), Some(Committed), "not on disk yet");
        let rec = s.confirm_outcome(ID, 20).unwrap();
        assert_eq!((rec.outcome, rec.recorded_at_ms), (Some(Claimed), Some(20)));
        let (rec, journal) = s.record_outcome("dst", ID, Claimed, 30).unwrap();
        assert_eq!((rec.outcome, journal), (Some(Claimed), None));
        assert_eq!(rec.recorded_at_ms, Some(20), "a retry moves nothing");
    }

    #[test]
    fn a_destination_abort_drops_the_key_too() {
        let mut s = state_at(&[]);
        assert_eq!(s.keys_held(), 1);
        s.record_outcome("dst", ID, Outcome::Aborted, 5).unwrap();
        assert_eq!(s.keys_held(), 0);
        let mut s = state_at(&[]);
        s.record_outcome("src", ID, Outcome::Committed, 5).unwrap();
        assert_eq!(s.keys_held(), 0);
    }

    fn created(n: u8) -> String {
        format!(
            r#"{{"event":"created","migration_id":"{}","source":"a","destination":"b","vm":"v","time_ms":1}}"#,
            MigrationId([n; 16])
        )
    }

    fn outcome_line(n: u8, o: &str, t: u64) -> String {
        format!(
            r#"{{"event":"outcome","migration_id":"{}","outcome":"{o}","time_ms":{t}}}"#,
            MigrationId([n; 16])
        )
    }

    /// Replays journal text, as the server reads it, and returns each migration's record.
    fn replayed(lines: &[String]) -> (State, Vec<Seen>) {
        let entries: Vec<JournalEntry> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut s = State::default();
        s.replay(entries, Instant::now(), 100);
        let records = (1..=8)
            .map(|n| {
                s.outcome("a", MigrationId([n; 16]))
                    .map(|r| (r.outcome, r.recorded_at_ms))
                    .unwrap_or((None, None))
            })
            .collect();
        (s, records)
    }

    #[test]
    fn replay_applies_the_arrows_in_order() {
        use Outcome::*;
        let mut lines: Vec<String> = (1..=7).map(created).collect();
        lines.extend([
            outcome_line(1, "committed", 10),
            outcome_line(2, "committed", 11),
            outcome_line(1, "claimed", 12),  // 1: committed → claimed
            outcome_line(2, "reverted", 13), // 2: committed → reverted
            outcome_line(3, "committed", 14),
            outcome_line(3, "claimed", 15),
            outcome_line(3, "reverted", 16), // illegal: claimed stays
            outcome_line(4, "claimed", 17),  // illegal: from null
            outcome_line(5, "aborted", 18),
            outcome_line(5, "committed", 19), // illegal: aborted stays
            outcome_line(6, "committed", 20),
            outcome_line(6, "aborted", 21), // illegal: first outcome wins
            outcome_line(6, "committed", 22), // illegal: a second committed
            outcome_line(7, "reverted", 23), // illegal: from null
            outcome_line(7, "committed", 24),
            outcome_line(9, "committed", 25), // unknown migration: skipped
        ]);
        let (mut s, records) = replayed(&lines);
        assert_eq!(
            records,
            vec![
                (Some(Claimed), Some(12)),
                (Some(Reverted), Some(13)),
                (Some(Claimed), Some(15)),
                (None, None),
                (Some(Aborted), Some(18)),
                (Some(Committed), Some(20)),
                (Some(Committed), Some(24)),
                (None, None),
            ]
        );
        // The replayed record goes on under the same rules.
        let m7 = MigrationId([7; 16]);
        assert!(s.record_outcome("b", m7, Claimed, 30).unwrap().1.is_some());
        let m2 = MigrationId([2; 16]);
        assert_eq!(
            s.record_outcome("b", m2, Claimed, 30).unwrap_err().0,
            ErrorCode::Conflict
        );
    }

    #[test]
    fn an_old_journal_replays_unchanged() {
        use Outcome::*;
        let mut lines: Vec<String> = (1..=3).map(created).collect();
        lines.extend([
            outcome_line(1, "committed", 10),
            outcome_line(2, "aborted", 11),
            outcome_line(1, "aborted", 12),
        ]);
        let (_, records) = replayed(&lines);
        assert_eq!(
            &records[..3],
            &[
                (Some(Committed), Some(10)),
                (Some(Aborted), Some(11)),
                (None, None),
            ]
        );
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    const LIMITS: Limits = Limits {
        outbound_per_host: 2,
        inbound_per_host: 3,
        cluster: 4,
        in_flight_ttl: Duration::from_secs(3600),
    };

    fn new<'a>(caller: &'a str, vm: &'a str, dst: &'a str, n: u8) -> NewMigration<'a> {
        NewMigration {
            caller,
            vm,
            destination: dst,
            id: MigrationId([n; 16]),
            key: zeroize::Zeroizing::new([n; 32]),
            nonce: [n; 8],
            request: None,
            abort_stale: false,
        }
    }

    fn created(step: Result<CreateStep, Refused>) -> Created {
        match step.unwrap() {
            CreateStep::Created(c) => c,
            CreateStep::AbortFirst { .. } => panic!("expected a creation"),
        }
    }

    #[allow(clippy::needless_pass_by_value)] // takes what `create` returns, as is
    fn code(step: Result<CreateStep, Refused>) -> (ErrorCode, Hint) {
        match step {
            Err(Refused(code, _, hint)) => (code, hint),
            Ok(_) => panic!("expected a refusal"),
        }
    }

    use super::rules::Hint;

    /// Commits and claims migration `n` (src → its destination): its VM is free again.
    fn finish(s: &mut State, n: u8, dst: &str) {
        let id = MigrationId([n; 16]);
        s.record_outcome("src", id, Outcome::Committed, 1).unwrap();
        s.confirm_outcome(id, 1).unwrap();
        s.record_outcome(dst, id, Outcome::Claimed, 2).unwrap();
        s.confirm_outcome(id, 2).unwrap();
    }

    #[test]
    fn one_migration_per_vm_from_any_host_until_a_final_outcome() {
        let now = Instant::now();
        let mut s = State::new(Limits::default(), Duration::from_secs(60));
        created(s.create(new("src", "vm", "dst", 1), now, 0));
        for (caller, dst) in [("src", "dst"), ("other", "dst"), ("dst", "src")] {
            let (c, hint) = code(s.create(new(caller, "vm", dst, 2), now, 0));
            assert_eq!(c, ErrorCode::VmInFlight, "{caller}");
            assert_eq!(hint.migration_id, Some(MigrationId([1; 16])));
        }
        // Pending (not yet on disk) still holds it.
        let id = MigrationId([1; 16]);
        s.record_outcome("src", id, Outcome::Committed, 1).unwrap();
        assert_eq!(
            code(s.create(new("dst", "vm", "src", 2), now, 0)).0,
            ErrorCode::VmInFlight
        );
        // `committed` on disk: the data phase is over, the VM is at one known place.
        s.confirm_outcome(id, 1).unwrap();
        created(s.create(new("dst", "vm", "src", 2), now, 0));
        assert_eq!(s.in_flight(), 1);
    }

    #[test]
    fn admission_counts_per_source_destination_and_cluster() {
        let now = Instant::now();
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        created(s.create(new("src", "a", "d1", 1), now, 0));
        let c = created(s.create(new("src", "b", "d1", 2), now, 0));
        assert_eq!(
            c.in_flight,
            InFlight {
                source: 2,
                destination: 2,
                cluster: 2
            }
        );
        let (busy, hint) = code(s.create(new("src", "c", "d1", 3), now, 0));
        assert_eq!(busy, ErrorCode::Busy);
        assert!(hint.retry_after_ms.is_some());
        // Other sources: the destination takes a third, then is full.
        created(s.create(new("s2", "c", "d1", 3), now, 0));
        assert_eq!(
            code(s.create(new("s3", "d", "d1", 4), now, 0)).0,
            ErrorCode::Busy
        );
        // The cluster's fourth and last.
        created(s.create(new("s3", "d", "d2", 4), now, 0));
        assert_eq!(
            code(s.create(new("s4", "e", "d3", 5), now, 0)).0,
            ErrorCode::Busy
        );
        // An outcome frees all three counts.
        finish(&mut s, 1, "d1");
        let c = created(s.create(new("src", "e", "d1", 5), now, 0));
        assert_eq!(
            c.in_flight,
            InFlight {
                source: 2,
                destination: 3,
                cluster: 4
            }
        );
    }

    #[test]
    fn a_refused_create_changes_nothing() {
        let now = Instant::now();
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        created(s.create(new("src", "a", "d1", 1), now, 0));
        created(s.create(new("src", "b", "d1", 2), now, 0));
        for _ in 0..10 {
            code(s.create(new("src", "c", "d1", 3), now, 0));
            code(s.create(new("src", "a", "d1", 4), now, 0));
        }
        assert_eq!(s.in_flight(), 2);
        assert!(s.outcome("src", MigrationId([3; 16])).is_err());
    }

    #[test]
    fn in_flight_ttl_frees_the_vm_and_the_slot() {
        let now = Instant::now();
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        created(s.create(new("src", "a", "d1", 1), now, 0));
        s.expire(now + LIMITS.in_flight_ttl - Duration::from_millis(1));
        assert_eq!(s.in_flight(), 1);
        s.expire(now + LIMITS.in_flight_ttl);
        assert_eq!(s.in_flight(), 0);
        let later = now + LIMITS.in_flight_ttl;
        created(s.create(new("other", "a", "d1", 2), later, 0));
        // The freed migration's record still takes its steps.
        let id = MigrationId([1; 16]);
        assert!(
            s.record_outcome("src", id, Outcome::Aborted, 3)
                .unwrap()
                .1
                .is_some()
        );
    }

    #[test]
    fn a_retried_request_gets_the_same_migration_and_key() {
        let now = Instant::now();
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        let with_rid = |n: u8| NewMigration {
            request: Some([42; 16]),
            ..new("src", "a", "d1", n)
        };
        let first = created(s.create(with_rid(1), now, 0));
        assert!(first.journal.is_some());
        let again = created(s.create(with_rid(2), now, 0));
        assert_eq!(
            (again.id, again.key, again.nonce),
            (first.id, first.key, first.nonce)
        );
        assert!(again.journal.is_none(), "nothing new to journal");
        assert_eq!(s.in_flight(), 1);
        // Another source's same request id is another request.
        let theirs = NewMigration {
            request: Some([42; 16]),
            ..new("s2", "b", "d1", 3)
        };
        assert_eq!(created(s.create(theirs, now, 0)).id, MigrationId([3; 16]));
        // Once the key is handed out, a retry cannot get it again.
        s.fetch_key("d1", first.id, now).unwrap();
        assert_eq!(code(s.create(with_rid(4), now, 0)).0, ErrorCode::Expired);
        // The same id for a different VM is a client bug, refused.
        let other_vm = NewMigration {
            request: Some([42; 16]),
            ..new("src", "z", "d1", 5)
        };
        assert_eq!(code(s.create(other_vm, now, 0)).0, ErrorCode::BadRequest);
    }

    #[test]
    fn abort_stale_aborts_only_the_callers_own_null_migration() {
        let now = Instant::now();
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        created(s.create(new("src", "a", "d1", 1), now, 0));
        let stale = |caller, n| NewMigration {
            abort_stale: true,
            ..new(caller, "a", "d1", n)
        };
        // Another host may not.
        assert_eq!(
            code(s.create(stale("s2", 2), now, 0)).0,
            ErrorCode::VmInFlight
        );
        let CreateStep::AbortFirst {
            stale: old,
            journal,
        } = s.create(stale("src", 2), now, 5).unwrap()
        else {
            panic!("expected the stale migration to be aborted first");
        };
        assert_eq!(old, MigrationId([1; 16]));
        assert!(matches!(
            journal,
            JournalEntry::Outcome {
                outcome: Outcome::Aborted,
                ..
            }
        ));
        // Until the abort is on disk the VM stays held.
        assert_eq!(
            code(s.create(new("src", "a", "d1", 2), now, 0)).0,
            ErrorCode::VmInFlight
        );
        s.confirm_outcome(old, 5).unwrap();
        created(s.create(new("src", "a", "d1", 2), now, 0));
        // Past `null` it is never aborted: a committed migration no longer holds the VM,
        // and the next create leaves its record as it is.
        let id = MigrationId([2; 16]);
        s.record_outcome("src", id, Outcome::Committed, 6).unwrap();
        s.confirm_outcome(id, 6).unwrap();
        created(s.create(stale("src", 3), now, 0));
        assert_eq!(
            s.outcome("src", id).unwrap().outcome,
            Some(Outcome::Committed)
        );
    }

    #[test]
    fn replay_rebuilds_the_vms_in_flight() {
        let now = Instant::now();
        let line = |n: u8, vm: &str| JournalEntry::Created {
            migration_id: MigrationId([n; 16]).to_string(),
            source: "src".into(),
            destination: "dst".into(),
            vm: vm.into(),
            time_ms: 1_000,
        };
        let done = |n: u8, outcome| JournalEntry::Outcome {
            migration_id: MigrationId([n; 16]).to_string(),
            outcome,
            time_ms: 1_001,
        };
        let mut s = State::new(LIMITS, Duration::from_secs(60));
        s.replay(
            [
                line(1, "a"),
                line(2, "b"),
                done(2, Outcome::Committed),
                line(3, "c"),
                done(3, Outcome::Aborted),
            ],
            now,
            2_000,
        );
        assert_eq!(
            s.in_flight(),
            1,
            "a (null); b (committed) and c (aborted) are past it"
        );
        assert_eq!(
            code(s.create(new("x", "a", "y", 9), now, 0)).0,
            ErrorCode::VmInFlight
        );
        created(s.create(new("x", "b", "y", 9), now, 0));
        created(s.create(new("x", "c", "y", 10), now, 0));
    }
}
