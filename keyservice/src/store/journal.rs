//! The default store: the whole state in this process's memory, every record in an
//! append-only, fsynced journal replayed at start. One replica only.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmotion_proto::MigrationId;

use super::rules::{Limits, Refused};
use super::state::{CreateStep, Created, Fetched, JournalEntry, NewMigration, State};
use super::unix_ms;
use crate::api::{ErrorCode, HostRecord, Outcome, OutcomeRecord, RegisterRequest};
use crate::logfile::LogFile;
use crate::server::ServeError;

/// The journal store.
pub(crate) struct JournalStore {
    state: Mutex<State>,
    journal: LogFile,
    registry_ttl: Duration,
}

/// Reads the journal. A torn last line (a crash mid-write) is cut off; any other bad line
/// is an error naming it.
fn read_journal(path: &Path) -> Result<Vec<JournalEntry>, ServeError> {
    let err = |message: String| ServeError::Journal {
        path: path.to_owned(),
        message,
    };
    let lines =
        crate::logfile::read_repairing(path).map_err(|e| err(format!("cannot read: {e}")))?;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| err(format!("line {}: {e}", i + 1)))
        })
        .collect()
}

impl JournalStore {
    /// Replays `path` and opens it for appending.
    pub(crate) fn open(
        path: &Path,
        limits: Limits,
        key_ttl: Duration,
        registry_ttl: Duration,
    ) -> Result<Self, ServeError> {
        let mut state = State::new(limits, key_ttl);
        let restored = state.replay(read_journal(path)?, Instant::now(), unix_ms());
        tracing::info!(
            restored,
            in_flight = state.in_flight(),
            journal = %path.display(),
            "journal replayed"
        );
        let journal = LogFile::open(path, true).map_err(|e| ServeError::Journal {
            path: path.to_owned(),
            message: format!("cannot open for appending: {e}"),
        })?;
        Ok(Self {
            state: Mutex::new(state),
            journal,
            registry_ttl,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn register(&self, caller: &str, req: RegisterRequest) -> HostRecord {
        self.lock()
            .register(caller, req, Instant::now(), unix_ms(), self.registry_ttl)
    }

    pub(crate) fn host(&self, host: &str) -> Option<HostRecord> {
        self.lock().host(host, Instant::now())
    }

    pub(crate) async fn create(&self, new: NewMigration<'_>) -> Result<Created, Refused> {
        let mut new = new;
        // At most one stale migration stands in the way: after it is aborted the VM is
        // free, or another create took it (then that one's refusal is the answer).
        for _ in 0..2 {
            let again = NewMigration {
                key: new.key.clone(),
                ..new
            };
            let step = self.lock().create(again, Instant::now(), unix_ms())?;
            match step {
                CreateStep::Created(created) => {
                    // Not awaited: a crash before this line is on disk loses a migration
                    // that can then never be committed (recording its outcome fails), so
                    // the source keeps the VM.
                    if let Some(line) = &created.journal {
                        self.journal
                            .append(serde_json::to_string(line).expect("serializes"));
                    }
                    return Ok(created);
                }
                CreateStep::AbortFirst { stale, journal } => {
                    tracing::info!(%stale, vm = new.vm, "aborting the source's stale migration");
                    self.write_outcome(stale, &journal).await;
                    new.abort_stale = false;
                }
            }
        }
        Err(Refused::new(
            ErrorCode::Unavailable,
            "the VM was taken again while its stale migration was aborted; retry",
        ))
    }

    /// Puts `host` in maintenance or takes it out, durably: the answer waits for the
    /// journal line (none when nothing changed).
    pub(crate) async fn set_draining(&self, host: &str, draining: bool) -> Result<(), Refused> {
        let Some(line) = self.lock().set_draining(host, draining, unix_ms()) else {
            return Ok(());
        };
        let line = serde_json::to_string(&line).expect("serializes");
        if let Err(e) = self.journal.append_durable(line).await {
            self.lock().set_draining(host, !draining, unix_ms());
            return Err(Refused::new(
                ErrorCode::Internal,
                format!("the journal write failed: {e}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn is_draining(&self, host: &str) -> bool {
        self.lock().is_draining(host)
    }

    pub(crate) fn fetch_key(&self, caller: &str, id: MigrationId) -> Result<Fetched, Refused> {
        self.lock().fetch_key(caller, id, Instant::now())
    }

    pub(crate) async fn record_outcome(
        &self,
        caller: &str,
        id: MigrationId,
        outcome: Outcome,
    ) -> Result<OutcomeRecord, Refused> {
        let (record, journal) = self.lock().record_outcome(caller, id, outcome, unix_ms())?;
        let Some(entry) = journal else {
            return Ok(record); // a retry: the record on disk already says so
        };
        self.write_outcome(id, &entry)
            .await
            .ok_or_else(|| Refused::new(ErrorCode::Internal, "the migration vanished"))
    }

    /// Journals an accepted transition durably, then makes it visible. The answer waits
    /// for the fsync, and readers see the transition only after it: a recorded outcome
    /// survives any crash after the answer, and no host acts on one that could still
    /// vanish (a destination on `committed` or `claimed`, a source on `reverted`).
    async fn write_outcome(&self, id: MigrationId, entry: &JournalEntry) -> Option<OutcomeRecord> {
        let JournalEntry::Outcome { time_ms, .. } = entry else {
            unreachable!("only outcome lines are written here");
        };
        let line = serde_json::to_string(entry).expect("serializes");
        if let Err(e) = self.journal.append_durable(line).await {
            // The line may or may not be on disk: memory can no longer say which. Stop,
            // so the journal alone decides after a restart; the caller, without an answer,
            // reads the outcome back then.
            tracing::error!(error = %e, %id, "journal write failed; stopping");
            eprintln!(
                "vmotion-keyservice: the journal write failed ({e}); stopping so the journal stays the only truth"
            );
            std::process::abort();
        }
        self.lock().confirm_outcome(id, *time_ms)
    }

    pub(crate) fn outcome(&self, caller: &str, id: MigrationId) -> Result<OutcomeRecord, Refused> {
        self.lock().outcome(caller, id)
    }

    pub(crate) fn sweep(&self) {
        self.lock().expire(Instant::now());
    }

    /// Zeroizes every key held; returns how many.
    pub(crate) fn drop_keys(&self) -> usize {
        let mut state = self.lock();
        let held = state.keys_held();
        state.drop_all_keys();
        held
    }

    pub(crate) async fn flush(&self) {
        let _ = self.journal.flush().await;
    }
}
