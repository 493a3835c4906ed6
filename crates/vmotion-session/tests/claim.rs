//! The claim step under every fault this harness can make: `Commit` or `Claimed` lost,
//! the connection cut or black-holed, the arbiter unreachable for a while or for good,
//! the destination crashing at every step (its state dropped, then restarted from the
//! copy it persisted before `Ready`), the source's resume failing. Both machines and an
//! in-memory compare-and-set arbiter run in simulated time, so each case takes
//! microseconds and all of them run in well under a second.
//!
//! The rule checked in every case: the VM never runs in two places; with an arbiter that
//! answers, it runs in exactly one; whatever happens, both sides end within a bounded
//! time; and what each side ends with agrees with the arbiter's record.

use std::collections::VecDeque;
use std::time::Duration;

use vmotion_session::{
    Answer, ClaimConfig, DestinationAction, DestinationClaim, DestinationOutcome, Record,
    SourceAction, SourceClaim, SourceOutcome, Transition,
};

/// The arbiter: one record, compare-and-set, unreachable for its first `outage` requests
/// (or for good).
struct Arbiter {
    record: Record,
    requests: usize,
    outage: usize,
}

impl Arbiter {
    fn serve(&mut self, t: Option<Transition>) -> Answer {
        self.requests += 1;
        if self.requests <= self.outage {
            return Answer::Unreachable("down".into());
        }
        if let Some(t) = t
            && let Some(next) = self.record.step(t)
        {
            self.record = next;
        }
        Answer::Record(self.record)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Frames arrive.
    Up,
    /// The frame is lost and the connection closes (both sides notice).
    Cut,
    /// The frame is lost and nothing closes: only deadlines end the wait.
    BlackHole,
}

/// Where the destination process dies (its machine dropped; it restarts from the copy it
/// persisted before `Ready` and settles with the arbiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Never,
    /// Before `Commit` arrives.
    BeforeCommit,
    /// Its claim reached the arbiter, the answer never reached it.
    AfterClaimSent,
    /// Its claim won; it died before sending `Claimed` and resuming.
    AfterClaimWon,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    arbiter: bool,
    commit_link: Link,
    claimed_link: Link,
    crash: Crash,
    /// The arbiter fails this many requests first (`usize::MAX`: never answers).
    outage: usize,
    source_resume_fails: bool,
    authenticated: bool,
}

#[derive(Debug, Default)]
struct Ended {
    source: Option<SourceOutcome>,
    destination: Option<DestinationOutcome>,
    /// The VM runs at the destination / at the source.
    runs_at_destination: bool,
    runs_at_source: bool,
    took: Duration,
}

fn config(c: &Case) -> ClaimConfig {
    ClaimConfig {
        arbiter: c.arbiter,
        peer_timeout: Duration::from_secs(10),
        settle_timeout: Duration::from_secs(30),
        retry_every: Duration::from_millis(250),
        authenticated: c.authenticated,
    }
}

/// Runs one case: `Ready` has just been answered with `Commit` (the source committed at
/// the arbiter before that, as the engine does).
fn run(c: Case) -> (Ended, Record) {
    let cfg = config(&c);
    let mut arbiter = Arbiter {
        record: if c.arbiter {
            Record::Committed
        } else {
            Record::Open
        },
        requests: 0,
        outage: c.outage,
    };
    let mut now = Duration::ZERO;
    let mut src = SourceClaim::new(now, cfg);
    let mut dst = Some(DestinationClaim::new(now, cfg));
    let mut ended = Ended::default();
    // Frames in flight to the destination / the source.
    let mut to_dst: VecDeque<&str> = VecDeque::new();
    let mut to_src: VecDeque<&str> = VecDeque::new();
    match c.commit_link {
        Link::Up => to_dst.push_back("commit"),
        Link::Cut => {
            to_dst.push_back("lost");
            to_src.push_back("lost");
        }
        Link::BlackHole => {}
    }
    let mut restarted = false;
    if c.crash == Crash::BeforeCommit {
        dst = None;
    }
    for _ in 0..10_000 {
        // A crashed destination restarts at once from its persisted copy.
        if dst.is_none() && !restarted {
            restarted = true;
            to_dst.clear();
            dst = Some(DestinationClaim::settle(now, cfg));
            // The source's connection died with the process.
            to_src.push_back("lost");
        }
        let d = dst.as_mut().expect("a destination");
        while let Some(f) = to_dst.pop_front() {
            match f {
                "commit" => d.handle_commit(now, c.arbiter),
                _ => d.handle_control_lost(now),
            }
        }
        while let Some(f) = to_src.pop_front() {
            match f {
                "claimed" => src.handle_claimed(now),
                _ => src.handle_control_lost(),
            }
        }
        let mut acted = false;
        while let Some(a) = d.poll_action() {
            acted = true;
            match a {
                DestinationAction::Ask(t) => {
                    let answer = arbiter.serve(Some(t));
                    if !restarted && c.crash == Crash::AfterClaimSent && t == Transition::Claim {
                        dst = None;
                        break;
                    }
                    if !restarted
                        && c.crash == Crash::AfterClaimWon
                        && answer == Answer::Record(Record::Claimed)
                    {
                        dst = None;
                        break;
                    }
                    d.handle_answer(now, answer);
                }
                DestinationAction::Read => {
                    let answer = arbiter.serve(None);
                    d.handle_answer(now, answer);
                }
                DestinationAction::SendClaimed => match c.claimed_link {
                    Link::Up if !restarted => to_src.push_back("claimed"),
                    Link::Cut if !restarted => to_src.push_back("lost"),
                    // A restarted destination has no connection to send it on.
                    _ => {}
                },
                DestinationAction::Resume => {
                    ended.runs_at_destination = true;
                    d.handle_resumed(Ok(()));
                }
                DestinationAction::Discard => {}
            }
        }
        if dst.is_none() {
            continue;
        }
        while let Some(a) = src.poll_action() {
            acted = true;
            match a {
                SourceAction::Ask(t) => {
                    let answer = arbiter.serve(Some(t));
                    src.handle_answer(now, answer);
                }
                SourceAction::Read => {
                    let answer = arbiter.serve(None);
                    src.handle_answer(now, answer);
                }
                SourceAction::Resume => {
                    if c.source_resume_fails {
                        src.handle_resumed(Err("resume failed".into()));
                    } else {
                        ended.runs_at_source = true;
                        src.handle_resumed(Ok(()));
                    }
                }
            }
        }
        let d = dst.as_ref().expect("a destination");
        if src.outcome().is_some() && d.outcome().is_some() {
            ended.source = src.outcome().cloned();
            ended.destination = d.outcome().cloned();
            ended.took = now;
            return (ended, arbiter.record);
        }
        if acted || !to_dst.is_empty() || !to_src.is_empty() {
            continue;
        }
        let next = [src.poll_timeout(), d.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| panic!("{c:?}: nothing to wait for, and not done"));
        now = now.max(next);
        src.handle_timeout(now);
        dst.as_mut().expect("a destination").handle_timeout(now);
    }
    panic!("{c:?}: did not end");
}

fn every_case() -> Vec<Case> {
    let mut cases = Vec::new();
    for arbiter in [true, false] {
        for commit_link in [Link::Up, Link::Cut, Link::BlackHole] {
            for claimed_link in [Link::Up, Link::Cut, Link::BlackHole] {
                for crash in [
                    Crash::Never,
                    Crash::BeforeCommit,
                    Crash::AfterClaimSent,
                    Crash::AfterClaimWon,
                ] {
                    for outage in [0, 1, 3, 40, usize::MAX] {
                        for source_resume_fails in [false, true] {
                            for authenticated in [true, false] {
                                cases.push(Case {
                                    arbiter,
                                    commit_link,
                                    claimed_link,
                                    crash,
                                    outage,
                                    source_resume_fails,
                                    authenticated,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    cases
}

#[test]
fn the_vm_never_runs_twice_and_both_sides_always_end() {
    let cases = every_case();
    assert!(cases.len() > 1000, "{} cases", cases.len());
    for c in cases {
        let (e, record) = run(c);
        assert!(
            !(e.runs_at_source && e.runs_at_destination),
            "{c:?}: ran twice: {e:?}"
        );
        // Bounded: the peer deadline plus two settle windows at most.
        assert!(
            e.took <= Duration::from_secs(80),
            "{c:?}: took {:?}",
            e.took
        );
        // What each side ends with agrees with the record.
        if c.arbiter {
            match record {
                Record::Claimed => assert!(
                    !e.runs_at_source
                        && matches!(
                            e.destination,
                            Some(DestinationOutcome::Resumed | DestinationOutcome::Unsettled(_))
                        ),
                    "{c:?}: claimed, but {e:?}"
                ),
                Record::Reverted => assert!(
                    !e.runs_at_destination
                        && !matches!(e.destination, Some(DestinationOutcome::Resumed)),
                    "{c:?}: reverted, but {e:?}"
                ),
                Record::Committed => assert!(
                    !e.runs_at_source && !e.runs_at_destination,
                    "{c:?}: nothing settled, yet something runs: {e:?}"
                ),
                other => panic!("{c:?}: the record cannot end {other}"),
            }
            if e.runs_at_destination {
                assert_eq!(record, Record::Claimed, "{c:?}");
            }
            if e.runs_at_source {
                assert_eq!(record, Record::Reverted, "{c:?}");
            }
        }
    }
}

/// With an arbiter that answers (after a short outage at most), the VM always ends up
/// running in exactly one place, whatever the links and the destination's crash did —
/// the claim step turns "a destination died after Ready" into a short pause.
#[test]
fn an_answering_arbiter_always_places_the_vm_exactly_once() {
    for c in every_case() {
        if !c.arbiter || c.outage > 3 || c.source_resume_fails {
            continue;
        }
        let (e, record) = run(c);
        assert!(
            e.runs_at_source ^ e.runs_at_destination,
            "{c:?}: runs at source {}, at destination {} (record {record}): {e:?}",
            e.runs_at_source,
            e.runs_at_destination
        );
    }
}

/// The happy path: Commit and Claimed arrive, the destination claims and resumes, the
/// source confirms and stops — at once, with no deadline spent.
#[test]
fn happy_path_claims_without_waiting() {
    let (e, record) = run(Case {
        arbiter: true,
        commit_link: Link::Up,
        claimed_link: Link::Up,
        crash: Crash::Never,
        outage: 0,
        source_resume_fails: false,
        authenticated: true,
    });
    assert_eq!(record, Record::Claimed);
    assert_eq!(e.source, Some(SourceOutcome::Claimed));
    assert_eq!(e.destination, Some(DestinationOutcome::Resumed));
    assert_eq!(e.took, Duration::ZERO);
}

/// `Commit` vanishes into a black hole and the destination says nothing: the source takes
/// the VM back at its claim deadline; when the destination finally hears `Commit`, its
/// claim loses and it discards its copy.
#[test]
fn a_silent_destination_costs_a_pause_not_the_vm() {
    let cfg = ClaimConfig::default();
    let mut src = SourceClaim::new(Duration::ZERO, cfg);
    let mut record = Record::Committed;
    assert_eq!(src.poll_action(), None, "it waits for Claimed first");
    assert_eq!(src.poll_timeout(), Some(cfg.peer_timeout));
    src.handle_timeout(cfg.peer_timeout);
    assert_eq!(
        src.poll_action(),
        Some(SourceAction::Ask(Transition::Revert))
    );
    record = record.step(Transition::Revert).unwrap();
    src.handle_answer(cfg.peer_timeout, Answer::Record(record));
    assert_eq!(src.poll_action(), Some(SourceAction::Resume));
    src.handle_resumed(Ok(()));
    assert_eq!(src.outcome(), Some(&SourceOutcome::Reverted));

    // The destination wakes up late and hears Commit: its claim loses; it discards.
    let mut dst = DestinationClaim::new(Duration::ZERO, cfg);
    dst.handle_commit(Duration::from_secs(11), true);
    assert_eq!(
        dst.poll_action(),
        Some(DestinationAction::Ask(Transition::Claim))
    );
    assert_eq!(record.step(Transition::Claim), None, "the claim loses");
    dst.handle_answer(Duration::from_secs(11), Answer::Record(record));
    assert_eq!(dst.poll_action(), Some(DestinationAction::Discard));
    assert!(matches!(
        dst.outcome(),
        Some(DestinationOutcome::Discarded(m)) if m.contains("reverted")
    ));
}

/// A plaintext `Claimed` (anyone on the path could forge it) is not believed unless the
/// record backs it: with the record still `committed`, the source reverts at its deadline.
#[test]
fn a_forged_claimed_is_not_believed() {
    let cfg = ClaimConfig {
        authenticated: false,
        ..ClaimConfig::default()
    };
    let mut src = SourceClaim::new(Duration::ZERO, cfg);
    src.handle_claimed(Duration::from_millis(1));
    assert_eq!(src.poll_action(), Some(SourceAction::Read));
    src.handle_answer(Duration::from_millis(2), Answer::Record(Record::Committed));
    assert_eq!(src.outcome(), None, "not claimed yet");
    let mut t = Duration::from_millis(2);
    while src.outcome().is_none() {
        t = src.poll_timeout().expect("a deadline");
        src.handle_timeout(t);
        while let Some(a) = src.poll_action() {
            let r = match a {
                SourceAction::Read => Record::Committed,
                SourceAction::Ask(Transition::Revert) => Record::Reverted,
                SourceAction::Ask(other) => panic!("{other:?}"),
                SourceAction::Resume => {
                    src.handle_resumed(Ok(()));
                    continue;
                }
            };
            src.handle_answer(t, Answer::Record(r));
        }
    }
    assert_eq!(src.outcome(), Some(&SourceOutcome::Reverted));
    assert!(
        t >= cfg.peer_timeout,
        "reverted only at the deadline: {t:?}"
    );
}

/// A restarted destination whose record was never committed aborts it, so the source's
/// late commit fails and it resumes: nothing waits on a dead peer.
#[test]
fn a_restarted_destination_aborts_an_open_record() {
    let cfg = ClaimConfig::default();
    let mut dst = DestinationClaim::settle(Duration::ZERO, cfg);
    assert_eq!(dst.poll_action(), Some(DestinationAction::Read));
    dst.handle_answer(Duration::ZERO, Answer::Record(Record::Open));
    assert_eq!(
        dst.poll_action(),
        Some(DestinationAction::Ask(Transition::Abort))
    );
    dst.handle_answer(Duration::ZERO, Answer::Record(Record::Aborted));
    assert_eq!(dst.poll_action(), Some(DestinationAction::Discard));
    assert_eq!(Record::Aborted.step(Transition::Commit), None);
}

/// The two ends disagree about the arbiter: a destination without one that hears a
/// `Commit` made at an arbiter must not resume (it cannot claim), so the source's revert
/// at its deadline is safe; one with an arbiter that hears a `Commit` from a source
/// without one resumes on it (no record of the migration exists to claim).
#[test]
fn a_destination_never_resumes_on_a_commit_it_cannot_claim() {
    let no_arbiter = ClaimConfig {
        arbiter: false,
        ..ClaimConfig::default()
    };
    let mut dst = DestinationClaim::new(Duration::ZERO, no_arbiter);
    dst.handle_commit(Duration::ZERO, true);
    assert_eq!(dst.poll_action(), None, "no resume");
    assert!(matches!(
        dst.outcome(),
        Some(DestinationOutcome::Unsettled(_))
    ));

    let mut dst = DestinationClaim::new(Duration::ZERO, ClaimConfig::default());
    dst.handle_commit(Duration::ZERO, false);
    assert_eq!(dst.poll_action(), Some(DestinationAction::SendClaimed));
    assert_eq!(dst.poll_action(), Some(DestinationAction::Resume));

    let mut dst = DestinationClaim::new(Duration::ZERO, ClaimConfig::default());
    dst.handle_commit(Duration::ZERO, true);
    assert_eq!(
        dst.poll_action(),
        Some(DestinationAction::Ask(Transition::Claim))
    );
}
