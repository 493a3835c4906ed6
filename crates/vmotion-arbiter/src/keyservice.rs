//! The key service as the arbiter: its outcome record.

use vmotion_keyservice::api::{ErrorCode, Outcome, OutcomeRecord};
use vmotion_keyservice::{ClientError, KeyServiceClient};
use vmotion_proto::MigrationId;

use crate::{Arbiter, ArbiterError, BoxFuture, Record, Transition};

fn outcome_of(t: Transition) -> Outcome {
    match t {
        Transition::Commit => Outcome::Committed,
        Transition::Claim => Outcome::Claimed,
        Transition::Revert => Outcome::Reverted,
        Transition::Abort => Outcome::Aborted,
    }
}

fn record_of(r: &OutcomeRecord) -> Record {
    match r.outcome {
        None => Record::Open,
        Some(Outcome::Committed) => Record::Committed,
        Some(Outcome::Claimed) => Record::Claimed,
        Some(Outcome::Reverted) => Record::Reverted,
        Some(Outcome::Aborted) => Record::Aborted,
    }
}

/// A refusal that retrying cannot change, or no answer at all.
fn classify(e: &ClientError) -> ArbiterError {
    match e.code() {
        Some(
            ErrorCode::Forbidden
            | ErrorCode::NotFound
            | ErrorCode::BadRequest
            | ErrorCode::Expired
            | ErrorCode::AlreadyFetched,
        ) => ArbiterError::Refused(e.to_string()),
        // Unavailable (being written), Internal (the journal write failed), Conflict
        // handled by the caller, and every transport error: nothing is known.
        _ => ArbiterError::Unreachable(e.to_string()),
    }
}

async fn read(c: &KeyServiceClient, id: MigrationId) -> Result<Record, ArbiterError> {
    c.outcome(id)
        .await
        .map(|r| record_of(&r))
        .map_err(|e| classify(&e))
}

impl Arbiter for KeyServiceClient {
    fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        Box::pin(read(self, id))
    }

    fn ask(&self, id: MigrationId, t: Transition) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        Box::pin(async move {
            match self.record_outcome(id, outcome_of(t)).await {
                Ok(r) => Ok(record_of(&r)),
                // The race was lost: the record says who won.
                Err(e) if e.code() == Some(ErrorCode::Conflict) => read(self, id).await,
                Err(e) => Err(classify(&e)),
            }
        })
    }
}
