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

/// Where a migration's outcome is. An outcome is visible to readers only once its journal
/// line is on disk: a destination must never see `committed` that a crash could undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutcomeState {
    None,
    /// Accepted, journal write in flight.
    Pending(Outcome),
    /// On disk, at this time (Unix ms).
    Recorded(Outcome, u64),
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
        if vm.is_empty() || vm.len() > 255 {
            return refuse(ErrorCode::BadRequest, "the VM name must be 1 to 255 bytes");
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
                outcome: OutcomeState::None,
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

    /// Accepts the outcome; only the source may, and a recorded outcome never changes.
    /// Returns the journal line to write durably, then [`confirm_outcome`] before
    /// answering; `None` if this exact outcome is already on disk. A key still waiting for
    /// its destination is dropped: the migration is over either way.
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
        if m.source != caller {
            return refuse(
                ErrorCode::Forbidden,
                format!("only migration {id}'s source may record its outcome"),
            );
        }
        let journal = match m.outcome {
            OutcomeState::Recorded(o, _) if o == outcome => None,
            OutcomeState::Recorded(o, _) => {
                return refuse(
                    ErrorCode::Conflict,
                    format!("migration {id} is already recorded as {o:?}"),
                );
            }
            OutcomeState::Pending(_) => {
                return refuse(
                    ErrorCode::Unavailable,
                    format!("the outcome of migration {id} is being recorded; read it back"),
                );
            }
            OutcomeState::None => {
                m.outcome = OutcomeState::Pending(outcome);
                if matches!(m.key, KeyState::Available(_)) {
                    m.key = KeyState::Expired;
                }
                Some(JournalEntry::Outcome {
                    migration_id: id.to_string(),
                    outcome,
                    time_ms: now_ms,
                })
            }
        };
        Ok((record(id, m), journal))
    }

    /// Makes a pending outcome visible once its journal line is on disk.
    pub(crate) fn confirm_outcome(
        &mut self,
        id: MigrationId,
        time_ms: u64,
    ) -> Option<OutcomeRecord> {
        let m = self.migrations.get_mut(&id)?;
        if let OutcomeState::Pending(o) = m.outcome {
            m.outcome = OutcomeState::Recorded(o, time_ms);
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
                            outcome: OutcomeState::None,
                        },
                    );
                }
                JournalEntry::Outcome {
                    migration_id,
                    outcome,
                    time_ms,
                } => {
                    if let Some(m) = parse_id(&migration_id)
                        .ok()
                        .and_then(|id| self.migrations.get_mut(&id))
                    {
                        // First wins, as it did when it was answered.
                        if m.outcome == OutcomeState::None {
                            m.outcome = OutcomeState::Recorded(outcome, time_ms);
                        } else {
                            tracing::warn!(%migration_id, "ignoring a second outcome line");
                        }
                    }
                }
            }
        }
        self.migrations.len()
    }
}

fn record(id: MigrationId, m: &Migration) -> OutcomeRecord {
    OutcomeRecord {
        migration_id: id.to_string(),
        source: m.source.clone(),
        destination: m.destination.clone(),
        vm: m.vm.clone(),
        outcome: match m.outcome {
            OutcomeState::Recorded(o, _) => Some(o),
            OutcomeState::None | OutcomeState::Pending(_) => None,
        },
        recorded_at_ms: match m.outcome {
            OutcomeState::Recorded(_, t) => Some(t),
            OutcomeState::None | OutcomeState::Pending(_) => None,
        },
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
