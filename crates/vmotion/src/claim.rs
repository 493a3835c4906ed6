//! The driver's side of the arbiter: bounded requests, the abort record, and a restarted
//! destination settling a guest it kept (the claim step of a live migration runs inside
//! the session machines).

use std::time::{Duration, Instant};

use vmotion_authority::{Arbiter, ArbiterError, Record, Transition};
use vmotion_mover::Sink;
use vmotion_proto::MigrationId;
use vmotion_session::{
    Answer, ClaimConfig, DestinationAction, DestinationClaim, DestinationOutcome,
};

/// One request to the arbiter never takes longer: past it, the answer is "unreachable"
/// and the machine retries within its own deadline.
pub(crate) const ARBITER_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the arbiter (a read, or a transition), bounded.
pub(crate) async fn consult(
    arbiter: Option<&dyn Arbiter>,
    id: MigrationId,
    t: Option<Transition>,
) -> Answer {
    let Some(a) = arbiter else {
        return Answer::Unreachable("there is no arbiter".into());
    };
    match record(a, id, t).await {
        Ok(r) => Answer::Record(r),
        Err(e) => Answer::Unreachable(e.to_string()),
    }
}

/// Asks the arbiter for `t` (or reads the record), bounded: for the steps outside the
/// claim machines (commit, abort, the pre-pause check), which tell a refusal from no
/// answer.
pub(crate) async fn record(
    arbiter: &dyn Arbiter,
    id: MigrationId,
    t: Option<Transition>,
) -> Result<Record, ArbiterError> {
    let request = match t {
        None => arbiter.read(id),
        Some(t) => arbiter.ask(id, t),
    };
    tokio::time::timeout(ARBITER_REQUEST_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| {
            Err(ArbiterError::Unreachable(format!(
                "no answer within {ARBITER_REQUEST_TIMEOUT:?}"
            )))
        })
}

/// Records `aborted` (best effort): the migration ended before any commit.
pub(crate) async fn abort_record(arbiter: Option<&dyn Arbiter>, id: MigrationId) {
    if let Some(a) = arbiter
        && let Err(e) = record(a, id, Some(Transition::Abort)).await
    {
        tracing::warn!(error = %e, "could not record the abort");
    }
}

/// Sleeps until `origin + at`, or for ever when nothing is due.
async fn until(origin: Instant, at: Option<Duration>) {
    match at {
        Some(at) => tokio::time::sleep_until((origin + at).into()).await,
        None => std::future::pending().await,
    }
}

/// A restarted destination settles a guest it kept: claim at the arbiter and resume, or
/// discard; or nothing settled. (A live migration's claim step runs inside
/// [`vmotion_session::DestinationSession`], driven by `receiver/guest.rs`.)
pub(crate) async fn settle(
    cfg: ClaimConfig,
    arbiter: Option<&dyn Arbiter>,
    id: MigrationId,
    sink: &mut dyn Sink,
) -> DestinationOutcome {
    let origin = Instant::now();
    let now = || origin.elapsed();
    let mut m = DestinationClaim::settle(now(), cfg);
    loop {
        while let Some(action) = m.poll_action() {
            match action {
                DestinationAction::Read => m.handle_answer(now(), consult(arbiter, id, None).await),
                DestinationAction::Ask(t) => {
                    let answer = consult(arbiter, id, Some(t)).await;
                    tracing::info!(step = %t, ?answer, "arbiter");
                    m.handle_answer(now(), answer);
                }
                // No connection to say it on: the source reads the record.
                DestinationAction::SendClaimed => {}
                DestinationAction::Resume => {
                    let r = sink.control().resume().map_err(|e| e.to_string());
                    m.handle_resumed(r);
                }
                DestinationAction::Discard => discard(sink),
            }
        }
        if let Some(o) = m.outcome() {
            return o.clone();
        }
        match m.poll_timeout() {
            Some(due) => until(origin, Some(due)).await,
            None => {
                return DestinationOutcome::Unsettled(format!(
                    "nothing left to wait for while waiting for {}",
                    m.waiting_for()
                ));
            }
        }
        m.handle_timeout(now());
    }
}

/// The migration ended without this copy winning: nothing of it stays behind.
pub(crate) fn discard(sink: &mut dyn Sink) {
    if let Err(e) = sink.discard() {
        tracing::error!(error = %e, "could not discard the received guest");
    }
}
