//! The service's in-memory state: the host registry and the migrations, with their keys
//! in zeroizing types. Every operation is a pure function of the state, the caller and
//! `now`, so the authorization rules are unit-tested without sockets or clocks.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmotion_proto::{KeyMaterial, MigrationId, MigrationKey, MigrationNonce};

use crate::api::{ErrorCode, HostRecord, Outcome, OutcomeRecord, RegisterRequest};

/// How long a migration's record (not its key) stays in memory for outcome queries.
pub(crate) const RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Most records held in memory (a few hundred bytes each); past it the oldest go first.
/// Their outcomes stay in the journal but are no longer served until the next restart.
pub(crate) const MAX_RECORDS: usize = 1_000_000;

/// A refused request: the code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) ErrorCode, pub(crate) String);

fn refuse<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(code, msg.into()))
}

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

/// Who is asking, relative to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Party {
    Source,
    Destination,
}

/// Whether `party` may ever record `to`, whatever the record's state.
fn may_record(party: Party, to: Outcome) -> bool {
    match to {
        Outcome::Committed | Outcome::Reverted => party == Party::Source,
        Outcome::Claimed => party == Party::Destination,
        Outcome::Aborted => true,
    }
}

/// Whether `from` → `to` is one arrow of the record's state machine:
/// `null` → `committed` | `aborted`, `committed` → `claimed` | `reverted`.
fn is_transition(from: Option<Outcome>, to: Outcome) -> bool {
    matches!(
        (from, to),
        (None, Outcome::Committed | Outcome::Aborted)
            | (
                Some(Outcome::Committed),
                Outcome::Claimed | Outcome::Reverted
            )
    )
}

/// Whether a record at `current` already says that `to` happened, so a retry of `to`
/// (after a lost answer) is answered with the record as it is. `claimed` and `reverted`
/// each imply `committed`.
fn already_recorded(current: Option<Outcome>, to: Outcome) -> bool {
    current == Some(to)
        || (to == Outcome::Committed
            && matches!(current, Some(Outcome::Claimed | Outcome::Reverted)))
}

fn forbidden(id: MigrationId, to: Outcome) -> Refused {
    let who = match to {
        Outcome::Committed | Outcome::Reverted => "source",
        Outcome::Claimed => "destination",
        Outcome::Aborted => "source or destination",
    };
    Refused(
        ErrorCode::Forbidden,
        format!("only migration {id}'s {who} may record `{to}`"),
    )
}

fn conflict(id: MigrationId, current: Option<Outcome>, to: Outcome) -> Refused {
    let message = match current {
        Some(c) => {
            format!("the outcome of migration {id} is already `{c}`; it cannot become `{to}`")
        }
        None => format!(
            "the outcome of migration {id} is still `null`; `{to}` can only follow `committed`"
        ),
    };
    Refused(ErrorCode::Conflict, message)
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
}

/// What `create` hands back. Holds the key: no `Debug`, zeroized on drop.
pub(crate) struct Created {
    pub(crate) key: [u8; 32],
    pub(crate) nonce: [u8; 8],
    pub(crate) destination: Option<HostRecord>,
    pub(crate) journal: JournalEntry,
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
#[derive(Debug, Default)]
pub(crate) struct State {
    hosts: HashMap<String, HostEntry>,
    migrations: HashMap<MigrationId, Migration>,
    /// Migrations in creation order, so a sweep touches only what expires: every key
    /// lives `key_ttl` and every record `RECORD_RETENTION`, so creation order is expiry
    /// order and the sweep never walks the whole map under the lock.
    by_age: VecDeque<(Instant, MigrationId)>,
    /// Migrations whose key may still be held, in creation (= expiry) order.
    keys_by_age: VecDeque<(Instant, MigrationId)>,
}

pub(crate) fn parse_id(s: &str) -> Result<MigrationId, Refused> {
    let mut id = [0u8; 16];
    // Checked byte by byte before any slicing: a path may hold any UTF-8, and only the
    // canonical lowercase form is accepted, so the audit log has one spelling per id.
    if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return refuse(
            ErrorCode::BadRequest,
            "a migration id is 32 lowercase hex digits",
        );
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .or_else(|_| refuse(ErrorCode::BadRequest, "a migration id is 32 hex digits"))?;
    }
    Ok(MigrationId(id))
}

impl State {
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

    /// Creates a migration from `caller` (the source) with fresh key material.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
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
        let mut key = zeroize::Zeroizing::new(key);
        // The name reaches policy files, sink folders and logs on every host: it must be
        // a plain name there, so it is one here too.
        if !vmotion_policy::valid_vm_name(vm) {
            return refuse(
                ErrorCode::BadRequest,
                "the VM name must be 1 to 255 letters, digits, '.', '_' or '-', not starting \
                 with '.'",
            );
        }
        if !crate::pki::valid_host_name(destination) {
            return refuse(
                ErrorCode::BadRequest,
                "the destination is not a valid host name",
            );
        }
        if destination == caller {
            return refuse(
                ErrorCode::BadRequest,
                "the destination is the caller itself; a migration needs two hosts",
            );
        }
        if self.migrations.contains_key(&id) {
            // 2^-128 per pair; answered as an internal error rather than ever reused.
            return refuse(ErrorCode::Internal, "migration id collision; retry");
        }
        self.by_age.push_back((now, id));
        self.keys_by_age.push_back((now, id));
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
                key_expires: now + ttl,
                outcome: OutcomeState::default(),
            },
        );
        let created = Created {
            key: *key,
            nonce,
            destination: self.host(destination, now),
            journal: JournalEntry::Created {
                migration_id: id.to_string(),
                source: caller.to_owned(),
                destination: destination.to_owned(),
                vm: vm.to_owned(),
                time_ms: now_ms,
            },
        };
        zeroize::Zeroize::zeroize(&mut *key);
        Ok(created)
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
        let party = if caller == m.source {
            Some(Party::Source)
        } else if caller == m.destination {
            Some(Party::Destination)
        } else {
            None
        };
        // Checked before the record's state, so a refused caller learns nothing about it.
        if !party.is_some_and(|p| may_record(p, outcome)) {
            return Err(forbidden(id, outcome));
        }
        if m.outcome.pending.is_some() {
            return refuse(
                ErrorCode::Unavailable,
                format!("the outcome of migration {id} is being recorded; read it back"),
            );
        }
        let current = m.outcome.current();
        if already_recorded(current, outcome) {
            return Ok((record(id, m), None));
        }
        if !is_transition(current, outcome) {
            return Err(conflict(id, current, outcome));
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
        Some(record(id, m))
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
    pub(crate) fn expire(&mut self, now: Instant, key_ttl: Duration) {
        self.hosts.retain(|_, h| h.expires > now);
        // Records past retention (or past the cap) go entirely, their keys with them.
        while let Some(&(created, id)) = self.by_age.front() {
            if now.saturating_duration_since(created) < RECORD_RETENTION
                && self.by_age.len() <= MAX_RECORDS
            {
                break;
            }
            self.by_age.pop_front();
            self.migrations.remove(&id);
        }
        // Keys past their TTL are zeroized, oldest first, touching only those.
        while let Some(&(created, id)) = self.keys_by_age.front() {
            if now.saturating_duration_since(created) < key_ttl {
                break;
            }
            self.keys_by_age.pop_front();
            if let Some(m) = self.migrations.get_mut(&id)
                && matches!(m.key, KeyState::Available(_))
            {
                m.key = KeyState::Expired;
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
                        },
                    );
                }
                JournalEntry::Outcome {
                    migration_id,
                    outcome,
                    time_ms,
                } => self.replay_outcome(&migration_id, outcome, time_ms),
            }
        }
        self.migrations.len()
    }

    /// Applies one outcome line with the rules it was answered under: a line that is no
    /// arrow from the replayed state (a second `committed`, `aborted` after `committed`)
    /// is ignored, so the first outcome still wins. Lines of unknown (or no longer
    /// retained) migrations are skipped.
    fn replay_outcome(&mut self, migration_id: &str, outcome: Outcome, time_ms: u64) {
        let Some(m) = parse_id(migration_id)
            .ok()
            .and_then(|id| self.migrations.get_mut(&id))
        else {
            return;
        };
        let current = m.outcome.current();
        if is_transition(current, outcome) {
            m.outcome.recorded = Some((outcome, time_ms));
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

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn state_with_migration(now: Instant) -> (State, MigrationId) {
        let mut s = State::default();
        let id = MigrationId([1; 16]);
        s.create("src", "vm1", "dst", id, [7; 32], [8; 8], now, 0, TTL)
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
        s.expire(now + TTL - Duration::from_millis(1), TTL);
        assert_eq!(s.keys_held(), 1, "not yet");
        s.expire(now + TTL, TTL);
        assert_eq!(s.keys_held(), 0);
        // Records outlive keys, up to the retention.
        s.expire(now + RECORD_RETENTION - Duration::from_secs(1), TTL);
        assert!(s.outcome("src", MigrationId([1; 16])).is_ok());
        s.expire(now + RECORD_RETENTION, TTL);
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
            s.create(
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
        s.create(
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
        s.create(
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
                    let Refused(code, message) = got.unwrap_err();
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
