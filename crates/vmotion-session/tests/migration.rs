//! Whole migrations — the engine, both session machines, real sealed frames and a guest
//! that keeps writing — in memory with simulated time and bandwidth (`support`), under
//! every fault the harness can make: each frame dropped, duplicated, altered, delayed
//! past every deadline, its connection cut, or the path black-holed from it on; each side
//! crashing at each of its steps (the destination restarting from what it persisted);
//! the arbiter going silent or losing answers at each phase.
//!
//! The rule checked in every case: the VM never runs in two places (checked after every
//! step); each side ends within a bounded time; with an arbiter that answers, the VM runs
//! in exactly one place — at the destination byte for byte exactly when the arbiter's
//! record says `claimed`; and each side's account agrees with the record.

mod support;

use std::time::{Duration, Instant};

use support::{
    BOUND, Case, Crash, Ending, Fate, Pair, Wire, destination_error, ms, source_error,
    source_saw_claim,
};
use vmotion_proto::{AbortCode, FrameType, PeerMisbehaved};
use vmotion_session::{
    DestinationEnd, DestinationOutcome, Record, SessionError, SourceEnd, SourceOutcome,
};

fn run(case: Case) -> Ending {
    Pair::new(case).run()
}

/// What each side says agrees with where the VM is, whatever the arbiter did.
fn accounts_hold(e: &Ending, label: &str) {
    match &e.source {
        Some(SourceEnd::Aborted {
            resume_failed: None,
            ..
        })
        | Some(SourceEnd::Committed(SourceOutcome::Reverted)) => {
            assert!(
                e.running_at_source,
                "{label}: the source says it keeps the VM: {e:?}"
            )
        }
        Some(_) => assert!(
            !e.running_at_source,
            "{label}: the source says it is paused or gone: {e:?}"
        ),
        None => {}
    }
    match &e.destination {
        Some(DestinationEnd::Failed(_))
        | Some(DestinationEnd::Settled(DestinationOutcome::Discarded(_))) => {
            if e.settled.is_none() {
                assert!(
                    !e.destination_kept,
                    "{label}: a failed destination kept its copy: {e:?}"
                );
            }
            assert!(!e.running_at_destination, "{label}: {e:?}");
        }
        Some(DestinationEnd::Settled(DestinationOutcome::Unsettled(_))) => {
            assert!(
                e.destination_kept,
                "{label}: an unsettled copy must stay: {e:?}"
            );
            assert!(!e.running_at_destination, "{label}: {e:?}");
        }
        Some(DestinationEnd::Settled(DestinationOutcome::Resumed)) => {
            assert!(e.running_at_destination, "{label}: {e:?}")
        }
        _ => {}
    }
}

/// The rule, for a case whose arbiter answers in the end (or for a case without one).
fn check(e: &Ending, label: &str, source_alive: bool, arbiter: bool) {
    accounts_hold(e, label);
    assert!(e.ended_at <= BOUND, "{label}: ran until {:?}", e.ended_at);
    if source_alive {
        assert!(
            e.source.is_some(),
            "{label}: the source never concluded: {e:?}"
        );
    }
    if e.running_at_destination {
        assert!(
            e.destination_exact,
            "{label}: the destination runs a different guest"
        );
    }
    if !arbiter {
        // Without an arbiter a lost answer may leave both copies paused, never two running.
        return;
    }
    let claimed = e.record == Record::Claimed;
    assert_eq!(
        e.running_at_destination, claimed,
        "{label}: runs at the destination = {}, record = {:?}: {e:?}",
        e.running_at_destination, e.record
    );
    if source_alive && !claimed {
        assert!(
            e.running_at_source,
            "{label}: the VM runs nowhere (record {:?}): {e:?}",
            e.record
        );
    }
    if source_alive {
        assert_eq!(
            source_saw_claim(e),
            claimed,
            "{label}: the source's account: {e:?}"
        );
    }
}

#[test]
fn the_happy_path_moves_the_guest_byte_for_byte() {
    let e = run(Case::default());
    assert!(source_saw_claim(&e), "{e:?}");
    assert_eq!(
        e.destination,
        Some(DestinationEnd::Settled(DestinationOutcome::Resumed))
    );
    assert!(e.running_at_destination && !e.running_at_source);
    assert!(e.destination_exact, "the guest differs at the destination");
    assert_eq!(e.record, Record::Claimed);
    // Well within the bound: the deadlines were not what ended it.
    assert!(e.ended_at < ms(500), "took {:?}", e.ended_at);
    check(&e, "happy", true, true);
}

#[test]
fn without_an_arbiter_the_wire_decides() {
    let e = run(Case {
        arbiter: false,
        ..Case::default()
    });
    assert!(source_saw_claim(&e), "{e:?}");
    assert!(e.running_at_destination && e.destination_exact);
    assert_eq!(e.record, Record::Open, "nothing asked an arbiter");
}

/// How many frames the happy path sends, so every case below can aim at each.
fn frames_in_happy_path() -> usize {
    let n = run(Case::default()).frames;
    assert!(
        n > 20,
        "a migration of a few iterations sends more than {n} frames"
    );
    n
}

fn fault_at(target: usize, fate: Fate) -> Case {
    Case {
        tamper: Box::new(move |_, i, _| if i == target { fate } else { Fate::Deliver }),
        ..Case::default()
    }
}

#[test]
fn every_frame_dropped_duplicated_altered_delayed_or_cut() {
    let started = Instant::now();
    let n = frames_in_happy_path();
    let fates = [
        Fate::Drop,
        Fate::Duplicate,
        Fate::Alter,
        Fate::Delay(Duration::from_secs(20)),
        Fate::Cut,
    ];
    let mut cases = 0;
    for fate in fates {
        for i in 0..n + 2 {
            let e = run(fault_at(i, fate));
            check(&e, &format!("{fate:?} at frame {i}"), true, true);
            cases += 1;
        }
    }
    eprintln!("{cases} cases in {:?}", started.elapsed());
}

#[test]
fn a_black_hole_at_every_frame_ends_on_deadlines() {
    let n = frames_in_happy_path();
    for i in 0..n + 2 {
        let e = run(fault_at(i, Fate::BlackHole));
        let label = format!("black hole from frame {i}");
        check(&e, &label, true, true);
        // Nothing closes in a black hole: only a deadline can have ended a failed side.
        if let Some(err) = source_error(&e) {
            assert!(
                matches!(err, SessionError::Timeout { .. }),
                "{label}: the source's reason: {err}"
            );
        }
        if let Some(err) = destination_error(&e) {
            assert!(
                matches!(err, SessionError::Timeout { .. }),
                "{label}: the destination's reason: {err}"
            );
        }
    }
}

#[test]
fn each_side_crashing_at_each_step() {
    let (source_steps, destination_steps) = run(Case::default()).steps;
    assert!(source_steps > 20 && destination_steps > 20);
    for k in 1..=source_steps.max(destination_steps) + 1 {
        let e = run(Case {
            crash: Crash::Destination(k),
            ..Case::default()
        });
        check(&e, &format!("destination dies at step {k}"), true, true);
        let e = run(Case {
            crash: Crash::Source(k),
            ..Case::default()
        });
        check(&e, &format!("source dies at step {k}"), false, true);
        // A dead source can never have let its copy run twice; with a claim recorded the
        // destination runs, otherwise it must have discarded or kept its copy paused.
        if e.record != Record::Claimed {
            assert!(!e.running_at_destination, "source dies at {k}: {e:?}");
        }
    }
}

#[test]
fn the_arbiter_going_silent_or_losing_answers_at_each_phase() {
    for t in (0..400).step_by(3) {
        for lose in [false, true] {
            let at = Some(ms(t));
            let case = Case {
                arbiter_down_at: if lose { None } else { at },
                lose_answers_after: if lose { at } else { None },
                ..Case::default()
            };
            let e = run(case);
            let label = format!(
                "arbiter {} from {t} ms",
                if lose { "loses answers" } else { "down" }
            );
            // The arbiter may never answer again: the VM may be left paused, but never
            // runs twice, and both sides end in bounded time.
            assert!(e.source.is_some(), "{label}: {e:?}");
            if e.running_at_destination {
                assert!(e.destination_exact, "{label}");
                assert_eq!(e.record, Record::Claimed, "{label}");
            }
            if matches!(
                e.source,
                Some(SourceEnd::Committed(SourceOutcome::Reverted))
            ) {
                assert_eq!(e.record, Record::Reverted, "{label}");
                assert!(e.running_at_source, "{label}");
            }
            if !lose && t == 0 {
                // Down before the pause: the source never paused.
                assert!(
                    matches!(source_error(&e), Some(SessionError::ArbiterUnavailable(_))),
                    "{label}: {e:?}"
                );
                assert!(e.running_at_source);
            }
        }
    }
}

#[test]
fn without_an_arbiter_no_fault_runs_the_vm_twice() {
    let n = frames_in_happy_path();
    for fate in [Fate::Drop, Fate::Alter, Fate::Cut, Fate::BlackHole] {
        for i in 0..n + 2 {
            let e = run(Case {
                arbiter: false,
                ..fault_at(i, fate)
            });
            check(&e, &format!("no arbiter, {fate:?} at {i}"), true, false);
        }
    }
}

/// The first frame of `frame_type` on `wire`.
fn first_of(wire: Wire, frame_type: FrameType, fate: Fate) -> Case {
    let mut done = false;
    Case {
        tamper: Box::new(move |w, _, t| {
            if !done && w == wire && t == frame_type {
                done = true;
                fate
            } else {
                Fate::Deliver
            }
        }),
        ..Case::default()
    }
}

#[test]
fn a_forged_page_frame_is_named_on_both_sides() {
    let e = run(first_of(Wire::Data(1), FrameType::Pages, Fate::Alter));
    assert!(
        matches!(
            destination_error(&e),
            Some(SessionError::PeerMisbehaved(
                PeerMisbehaved::AuthenticationFailed { .. }
            ))
        ),
        "{e:?}"
    );
    assert!(
        matches!(
            source_error(&e),
            Some(SessionError::PeerAborted {
                code: AbortCode::BadRecordMac,
                ..
            })
        ),
        "the source learns the destination's reason: {e:?}"
    );
    assert!(e.running_at_source && !e.running_at_destination);
}

#[test]
fn a_lost_control_frame_is_a_sequence_error_reported_back() {
    let e = run(first_of(
        Wire::Control,
        FrameType::IterationMarker,
        Fate::Drop,
    ));
    assert!(
        matches!(
            destination_error(&e),
            Some(SessionError::PeerMisbehaved(
                PeerMisbehaved::FrameOutOfOrder { .. }
            ))
        ),
        "{e:?}"
    );
    assert!(
        matches!(
            source_error(&e),
            Some(SessionError::PeerAborted {
                code: AbortCode::SequenceError,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn a_lost_ready_is_settled_by_the_arbiter() {
    let e = run(first_of(Wire::Back, FrameType::Ready, Fate::Drop));
    // The source never saw Ready: it aborts before the commit, the destination learns
    // the abort (its Abort arrives out of order, or the arbiter says aborted) and
    // discards; the VM runs at the source.
    assert!(e.running_at_source && !e.running_at_destination, "{e:?}");
    assert_ne!(e.record, Record::Claimed);
    check(&e, "Ready lost", true, true);
}

#[test]
fn a_lost_commit_is_claimed_at_the_arbiter() {
    let e = run(first_of(Wire::Control, FrameType::Commit, Fate::Drop));
    assert!(e.running_at_destination && e.destination_exact, "{e:?}");
    assert_eq!(e.record, Record::Claimed);
    assert!(source_saw_claim(&e), "{e:?}");
}

#[test]
fn the_destination_dying_after_ready_restarts_and_claims() {
    // Find the step at which the destination sent Ready, then die right after it.
    for k in 1..=run(Case::default()).steps.1 {
        let e = run(Case {
            crash: Crash::Destination(k),
            ..Case::default()
        });
        if e.settled == Some(DestinationOutcome::Resumed) {
            assert!(e.running_at_destination && e.destination_exact, "{e:?}");
            assert!(source_saw_claim(&e), "{e:?}");
            return;
        }
    }
    panic!("no crash point left a persisted guest that the restarted destination claimed");
}

#[test]
fn a_refused_commit_resumes_the_source() {
    let e = run(Case {
        refuse_commit: true,
        ..Case::default()
    });
    assert!(
        matches!(source_error(&e), Some(SessionError::Engine(why)) if why.contains("refused")),
        "{e:?}"
    );
    assert!(e.running_at_source && !e.running_at_destination, "{e:?}");
    assert_ne!(e.record, Record::Claimed);
    check(&e, "commit refused", true, true);
}

#[test]
fn a_slow_arbiter_crossing_every_deadline() {
    for latency in [100, 900, 1100, 2500, 4000] {
        for fate in [Fate::Deliver, Fate::Cut] {
            let n = frames_in_happy_path();
            for i in (0..n + 2).step_by(7) {
                let e = run(Case {
                    arbiter_latency: Some(ms(latency)),
                    ..fault_at(i, fate)
                });
                check(
                    &e,
                    &format!("arbiter takes {latency} ms, {fate:?} at frame {i}"),
                    true,
                    true,
                );
            }
        }
    }
}

#[test]
fn a_destination_that_cannot_persist_discards_and_the_source_keeps_the_vm() {
    let e = run(Case {
        fail_persist: true,
        ..Case::default()
    });
    assert!(
        matches!(destination_error(&e), Some(SessionError::Local { code: AbortCode::DestinationFailed, message }) if message.contains("no space")),
        "{e:?}"
    );
    assert!(
        matches!(source_error(&e), Some(SessionError::PeerAborted { message, .. }) if message.contains("no space")),
        "the source learns why: {e:?}"
    );
    check(&e, "persist fails", true, true);
}

#[test]
fn resume_failures_are_reported_and_never_run_the_vm_twice() {
    // The destination cannot resume: its claim won, so the source stays stopped; the VM
    // runs nowhere and both say so.
    let e = run(Case {
        fail_destination_resume: true,
        ..Case::default()
    });
    assert!(
        matches!(
            e.destination,
            Some(DestinationEnd::Settled(DestinationOutcome::ResumeFailed(_)))
        ),
        "{e:?}"
    );
    assert!(!e.running_at_source && !e.running_at_destination);
    assert_eq!(e.record, Record::Claimed);
    // The source cannot resume after an abort: it says so instead of claiming the VM runs.
    let e = run(Case {
        fail_source_resume: true,
        ..first_of(Wire::Back, FrameType::Ready, Fate::Drop)
    });
    assert!(
        matches!(
            e.source,
            Some(SourceEnd::Aborted {
                resume_failed: Some(_),
                ..
            })
        ),
        "{e:?}"
    );
    assert!(!e.running_at_source && !e.running_at_destination);
    accounts_hold(&e, "source resume fails");
}
