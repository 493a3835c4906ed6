//! The rules every store applies the same way: what a refusal carries, who may move a
//! migration's outcome record along which arrow, what a valid `create` is, and the
//! admission limits. Pure functions, so the journal store and the etcd store cannot drift
//! apart.

use std::time::Duration;

use vmotion_proto::MigrationId;

use crate::api::{ErrorCode, Outcome};

/// A refused request: the code, a sentence, and what the error body adds for some codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) ErrorCode, pub(crate) String, pub(crate) Hint);

/// The structured part of a refusal (`migration_id` for `vm_in_flight`, `retry_after_ms`
/// for `busy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hint {
    pub(crate) migration_id: Option<MigrationId>,
    pub(crate) retry_after_ms: Option<u64>,
}

impl Refused {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(code, message.into(), Hint::default())
    }
}

pub(crate) fn refuse<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused::new(code, msg))
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
pub(crate) fn is_transition(from: Option<Outcome>, to: Outcome) -> bool {
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

/// Whether a record at `outcome` still holds its VM and its admission slots: only at
/// `null`. From its first outcome on (`committed` or `aborted`) the migration's data phase
/// is over and the VM is at one known place (paused at the source until the claim, or
/// running there again); what follows is decided by the outcome rules alone, and a host
/// whose destination never reports back (a plaintext destination without the key
/// service) frees the VM as soon as it commits.
pub(crate) fn holds_vm(outcome: Option<Outcome>) -> bool {
    outcome.is_none()
}

fn forbidden(id: MigrationId, to: Outcome) -> Refused {
    let who = match to {
        Outcome::Committed | Outcome::Reverted => "source",
        Outcome::Claimed => "destination",
        Outcome::Aborted => "source or destination",
    };
    Refused::new(
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
    Refused::new(ErrorCode::Conflict, message)
}

/// What a store does with an outcome request, once it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The record already says so: answer it as it is.
    Retry,
    /// Write this transition.
    Write,
}

/// The outcome rule: `caller` asks migration `id` (from `source` to `destination`, its
/// record at `current`) to record `to`. The caller's right is checked before the record's
/// state, so a refused caller learns nothing about it.
pub(crate) fn outcome_step(
    id: MigrationId,
    (source, destination): (&str, &str),
    caller: &str,
    current: Option<Outcome>,
    to: Outcome,
) -> Result<Step, Refused> {
    let party = if caller == source {
        Some(Party::Source)
    } else if caller == destination {
        Some(Party::Destination)
    } else {
        None
    };
    if !party.is_some_and(|p| may_record(p, to)) {
        return Err(forbidden(id, to));
    }
    if already_recorded(current, to) {
        return Ok(Step::Retry);
    }
    if !is_transition(current, to) {
        return Err(conflict(id, current, to));
    }
    Ok(Step::Write)
}

/// Checks a `create`'s names: the VM's reaches policy files, sink folders and logs on
/// every host, so it must be a plain name there, and so here too.
pub(crate) fn check_create(caller: &str, vm: &str, destination: &str) -> Result<(), Refused> {
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
    Ok(())
}

/// The refusal of a create to a host in maintenance.
pub(crate) fn draining(host: &str) -> Refused {
    Refused::new(
        ErrorCode::HostDraining,
        format!(
            "host {host} is in maintenance (draining): no migration is created to it; \
             choose another destination"
        ),
    )
}

/// Whether `caller` may put `host` in maintenance: the host itself, or an admin.
pub(crate) fn check_maintenance(
    caller: &str,
    host: &str,
    admins: &[String],
) -> Result<(), Refused> {
    if caller == host || admins.iter().any(|a| a == caller) {
        return Ok(());
    }
    refuse(
        ErrorCode::Forbidden,
        format!("only {host} itself or an admin of the key service may put it in maintenance"),
    )
}

/// A request id: 32 lowercase hex digits, as a migration id is.
pub(crate) fn parse_request_id(s: &str) -> Result<[u8; 16], Refused> {
    parse_id(s).map(|id| id.0).map_err(|_| {
        Refused::new(
            ErrorCode::BadRequest,
            "a request id is 32 lowercase hex digits",
        )
    })
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

/// Most migrations in flight at once (0: no limit), and how long one holds its VM and
/// its slot while its outcome is `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From one source host.
    pub outbound_per_host: usize,
    /// To one destination host.
    pub inbound_per_host: usize,
    /// In the whole cluster (every replica of the service).
    pub cluster: usize,
    /// A migration whose outcome is still `null` (no `committed`, no `aborted`) stops
    /// holding its VM and its slot this long after its creation.
    pub in_flight_ttl: Duration,
}

impl Default for Limits {
    /// KubeVirt's defaults: 2 outbound per node, 5 per cluster; inbound as outbound.
    fn default() -> Self {
        Self {
            outbound_per_host: 2,
            inbound_per_host: 2,
            cluster: 5,
            in_flight_ttl: Duration::from_secs(3600),
        }
    }
}

/// How many migrations are in flight, counted where a `create` is decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct InFlight {
    /// From the source.
    pub(crate) source: usize,
    /// To the destination.
    pub(crate) destination: usize,
    /// In the cluster.
    pub(crate) cluster: usize,
}

/// How long a `busy` caller is told to wait.
pub(crate) const BUSY_RETRY_AFTER: Duration = Duration::from_millis(500);

impl Limits {
    /// Whether every limit is off (0), so a create needs no count of what is in flight.
    pub(crate) fn counts_nothing(&self) -> bool {
        self.outbound_per_host == 0 && self.inbound_per_host == 0 && self.cluster == 0
    }

    /// Refuses a create that would go over a limit, given what is in flight before it.
    pub(crate) fn admit(
        &self,
        now: InFlight,
        source: &str,
        destination: &str,
    ) -> Result<(), Refused> {
        let over = |limit: usize, n: usize| limit != 0 && n >= limit;
        let why = if over(self.outbound_per_host, now.source) {
            format!(
                "{source} already has {} migrations in flight (the limit per source host)",
                now.source
            )
        } else if over(self.inbound_per_host, now.destination) {
            format!(
                "{destination} already receives {} migrations (the limit per destination host)",
                now.destination
            )
        } else if over(self.cluster, now.cluster) {
            format!(
                "the cluster already has {} migrations in flight (the cluster's limit)",
                now.cluster
            )
        } else {
            return Ok(());
        };
        Err(Refused(
            ErrorCode::Busy,
            format!(
                "busy: {why}; retry after {} ms",
                BUSY_RETRY_AFTER.as_millis()
            ),
            Hint {
                migration_id: None,
                retry_after_ms: Some(BUSY_RETRY_AFTER.as_millis() as u64),
            },
        ))
    }
}

/// The refusal of a create for a VM that `holder` is migrating.
pub(crate) fn vm_in_flight(vm: &str, holder: MigrationId, detail: &str) -> Refused {
    Refused(
        ErrorCode::VmInFlight,
        format!("VM {vm} is already being migrated by migration {holder}{detail}"),
        Hint {
            migration_id: Some(holder),
            retry_after_ms: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_names_the_limit_it_hit() {
        let l = Limits::default();
        let at = |source, destination, cluster| InFlight {
            source,
            destination,
            cluster,
        };
        assert!(l.admit(at(1, 1, 4), "a", "b").is_ok());
        for (n, needle) in [
            (at(2, 0, 2), "per source host"),
            (at(0, 2, 2), "per destination host"),
            (at(1, 1, 5), "cluster's limit"),
        ] {
            let e = l.admit(n, "a", "b").unwrap_err();
            assert_eq!(e.0, ErrorCode::Busy);
            assert!(e.1.contains(needle), "{}", e.1);
            assert_eq!(e.2.retry_after_ms, Some(500));
        }
        let unlimited = Limits {
            outbound_per_host: 0,
            inbound_per_host: 0,
            cluster: 0,
            ..l
        };
        assert!(unlimited.admit(at(1000, 1000, 1000), "a", "b").is_ok());
    }
}
