//! An arbiter in this process's memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use vmotion_proto::MigrationId;

use crate::{Arbiter, ArbiterError, BoxFuture, Record, Transition};

/// Records in memory, for an orchestrator that runs both ends (and for tests): open a
/// record with [`open`](Self::open) before the migration starts.
#[derive(Debug, Default)]
pub struct MemoryArbiter {
    records: Mutex<HashMap<MigrationId, Record>>,
    unreachable: AtomicBool,
    /// Requests answered so far, and how many to answer before going silent.
    served: AtomicUsize,
    answer_limit: Option<usize>,
}

impl MemoryArbiter {
    /// No records.
    pub fn new() -> Self {
        Self::default()
    }

    /// An arbiter that answers its first `n` requests and none after: a record service
    /// that dies at a chosen step of the switchover.
    pub fn answering_only(n: usize) -> Self {
        Self {
            answer_limit: Some(n),
            ..Self::default()
        }
    }

    /// Opens the record of migration `id` (a second call changes nothing).
    pub fn open(&self, id: MigrationId) {
        self.lock().entry(id).or_insert(Record::Open);
    }

    /// The record of `id`, if there is one (for assertions; no fault applies).
    pub fn record(&self, id: MigrationId) -> Option<Record> {
        self.lock().get(&id).copied()
    }

    /// Stops (or resumes) answering: every request fails as unreachable, without effect.
    pub fn set_unreachable(&self, yes: bool) {
        self.unreachable.store(yes, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MigrationId, Record>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply(&self, id: MigrationId, t: Option<Transition>) -> Result<Record, ArbiterError> {
        let served = self.served.fetch_add(1, Ordering::SeqCst);
        if self.unreachable.load(Ordering::SeqCst) || self.answer_limit.is_some_and(|n| served >= n)
        {
            return Err(ArbiterError::Unreachable(
                "the in-memory arbiter is set unreachable".into(),
            ));
        }
        let mut records = self.lock();
        let Some(r) = records.get_mut(&id) else {
            return Err(ArbiterError::Refused(format!(
                "no record of migration {id}"
            )));
        };
        if let Some(next) = t.and_then(|t| r.step(t)) {
            *r = next;
        }
        Ok(*r)
    }
}

impl Arbiter for MemoryArbiter {
    fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        let r = self.apply(id, None);
        Box::pin(async move { r })
    }

    fn ask(&self, id: MigrationId, t: Transition) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        let r = self.apply(id, Some(t));
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_are_compare_and_set() {
        let a = MemoryArbiter::new();
        let id = MigrationId([1; 16]);
        assert!(matches!(a.read(id).await, Err(ArbiterError::Refused(_))));
        a.open(id);
        assert_eq!(
            a.ask(id, Transition::Claim).await,
            Ok(Record::Open),
            "not committed"
        );
        assert_eq!(a.ask(id, Transition::Commit).await, Ok(Record::Committed));
        assert_eq!(
            a.ask(id, Transition::Commit).await,
            Ok(Record::Committed),
            "a retry"
        );
        assert_eq!(a.ask(id, Transition::Claim).await, Ok(Record::Claimed));
        assert_eq!(
            a.ask(id, Transition::Revert).await,
            Ok(Record::Claimed),
            "lost the race"
        );
        a.set_unreachable(true);
        assert!(matches!(
            a.read(id).await,
            Err(ArbiterError::Unreachable(_))
        ));
        assert_eq!(a.record(id), Some(Record::Claimed));
    }
}
