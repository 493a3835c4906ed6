//! The key service as the driver sees it: a [`KeyAuthority`] (create a migration, fetch
//! its key) and an [`Arbiter`] (its outcome record).

use vmotion_authority::{
    Arbiter, ArbiterError, AuthorityError, BoxFuture, CreateOptions, FetchedKey, IssuedKey,
    KeyAuthority, Record, Transition,
};
use vmotion_proto::MigrationId;

use crate::api::{ErrorCode, Outcome, OutcomeRecord};
use crate::{ClientError, KeyServiceClient};

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

/// Whether the service refused for a reason that retrying cannot change. Unavailable
/// (being written), Internal (the journal write failed), Conflict (handled by the
/// arbiter's caller) and every transport error are not: nothing is known.
fn is_final_refusal(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::Forbidden
                | ErrorCode::NotFound
                | ErrorCode::BadRequest
                | ErrorCode::Expired
                | ErrorCode::AlreadyFetched,
        )
    )
}

fn arbiter_error(e: &ClientError) -> ArbiterError {
    if is_final_refusal(e) {
        ArbiterError::Refused(e.to_string())
    } else {
        ArbiterError::Unreachable(e.to_string())
    }
}

/// The whole message stays the client's: `vmotion-send` prints it as before.
fn authority_error(e: &ClientError) -> AuthorityError {
    if is_final_refusal(e) {
        AuthorityError::Refused(e.to_string())
    } else {
        AuthorityError::Unreachable(e.to_string())
    }
}

/// A create's refusal: `busy` and `vm_in_flight` keep their own variants, so the driver
/// can wait its turn, and name the migration holding the VM, without reading messages.
fn create_error(e: ClientError, vm: &str) -> AuthorityError {
    match e {
        ClientError::Refused {
            code: ErrorCode::Busy,
            message,
            retry_after,
            ..
        } => AuthorityError::Busy {
            message,
            retry_after,
        },
        ClientError::Refused {
            code: ErrorCode::HostDraining,
            message,
            ..
        } => AuthorityError::DestinationDraining(message),
        ClientError::Refused {
            code: ErrorCode::VmInFlight,
            migration_id,
            ..
        } => AuthorityError::VmInFlight {
            vm: vm.to_owned(),
            migration: migration_id,
        },
        other => authority_error(&other),
    }
}

async fn read(c: &KeyServiceClient, id: MigrationId) -> Result<Record, ArbiterError> {
    c.outcome(id)
        .await
        .map(|r| record_of(&r))
        .map_err(|e| arbiter_error(&e))
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
                Err(e) => Err(arbiter_error(&e)),
            }
        })
    }
}

impl KeyAuthority for KeyServiceClient {
    fn create_migration_with<'a>(
        &'a self,
        vm: &'a str,
        destination: &'a str,
        options: CreateOptions,
    ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>> {
        Box::pin(async move {
            let issued = Self::create_migration_with(self, vm, destination, options)
                .await
                .map_err(|e| create_error(e, vm))?;
            Ok(IssuedKey {
                id: issued.id,
                destination: issued.destination_capability(),
                material: issued.material,
            })
        })
    }

    fn fetch_key(&self, id: MigrationId) -> BoxFuture<'_, Result<FetchedKey, AuthorityError>> {
        Box::pin(async move {
            Self::fetch_key(self, id)
                .await
                .map_err(|e| authority_error(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vmotion_proto::MigrationId;

    use super::*;

    fn refused(code: ErrorCode) -> ClientError {
        ClientError::Refused {
            status: code.status(),
            code,
            message: "the service's words".into(),
            migration_id: Some(MigrationId([0xab; 16])),
            retry_after: Some(Duration::from_millis(1500)),
        }
    }

    #[test]
    fn busy_and_vm_in_flight_keep_their_meaning() {
        assert_eq!(
            create_error(refused(ErrorCode::Busy), "web-1"),
            AuthorityError::Busy {
                message: "the service's words".into(),
                retry_after: Some(Duration::from_millis(1500)),
            }
        );
        let in_flight = create_error(refused(ErrorCode::VmInFlight), "web-1");
        assert_eq!(
            in_flight,
            AuthorityError::VmInFlight {
                vm: "web-1".into(),
                migration: Some(MigrationId([0xab; 16])),
            }
        );
        let shown = in_flight.to_string();
        assert!(
            shown.contains("web-1") && shown.contains(&"ab".repeat(16)),
            "{shown}"
        );
        assert!(matches!(
            create_error(refused(ErrorCode::Forbidden), "web-1"),
            AuthorityError::Refused(_)
        ));
        assert!(matches!(
            create_error(refused(ErrorCode::Unavailable), "web-1"),
            AuthorityError::Unreachable(_)
        ));
    }
}
