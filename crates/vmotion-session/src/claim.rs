//! The claim step: who wins the VM after `Commit`, for source and destination.
//!
//! A driver runs either machine the same way:
//!
//! 1. take every action from `poll_action` and carry it out; report each result with the
//!    matching `handle_*` call (an arbiter request's answer with `handle_answer`; a
//!    request must be bounded by the driver: a request that takes too long is answered
//!    [`Answer::Unreachable`]);
//! 2. arm a timer for `poll_timeout` and call `handle_timeout` when it fires;
//! 3. stop when `outcome` is `Some`.

use std::collections::VecDeque;
use std::time::Duration;

use crate::record::{Answer, Record, Transition};

/// The deadlines of the claim step, and whether there is an arbiter at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimConfig {
    /// An arbiter decides (the key service, or an orchestrator's record). Without one the
    /// wire decides: `Commit` is the destination's licence to resume, `Claimed` the
    /// source's proof that it did, and a lost answer leaves both copies paused — never
    /// one running twice.
    pub arbiter: bool,
    /// Source: how long after `Commit` it waits for `Claimed` before it tries to take the
    /// VM back. Destination: how long after `Ready` it waits for `Commit` (or `Abort`)
    /// before it asks the arbiter.
    pub peer_timeout: Duration,
    /// How long either side keeps asking an arbiter that does not answer before it gives
    /// up and leaves its copy paused.
    pub settle_timeout: Duration,
    /// Pause between two reads of the record, or two tries at an arbiter that did not
    /// answer.
    pub retry_every: Duration,
    /// Source: `Claimed` arrives authenticated (an encrypted migration), so with the
    /// arbiter unreachable it is proof enough. A plaintext `Claimed` could be forged by
    /// anyone on the path and is believed only once the arbiter confirms it.
    pub authenticated: bool,
}

impl Default for ClaimConfig {
    /// An arbiter, 10 s for the peer, 30 s to settle, 250 ms between tries.
    fn default() -> Self {
        Self {
            arbiter: true,
            peer_timeout: Duration::from_secs(10),
            settle_timeout: Duration::from_secs(30),
            retry_every: Duration::from_millis(250),
            authenticated: true,
        }
    }
}

/// A request to the arbiter, in flight or due at `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Read,
    Ask(Transition),
}

/// Why a side stopped asking the arbiter.
fn gave_up(config: &ClaimConfig, last_error: Option<&str>) -> String {
    match last_error {
        Some(e) => format!(
            "the arbiter gave no usable answer within {:?} (last error: {e})",
            config.settle_timeout
        ),
        None => format!(
            "the arbiter gave no usable answer within {:?}",
            config.settle_timeout
        ),
    }
}

/// When a request runs: `None` while one is in flight, else when the next one is due.
type Due = Option<Duration>;

// ---------------------------------------------------------------------------------------
// Source

/// What the source's driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// Read the migration's record; answer with [`SourceClaim::handle_answer`].
    Read,
    /// Ask the arbiter for this transition; answer with [`SourceClaim::handle_answer`].
    Ask(Transition),
    /// Resume the VM at the source; report with [`SourceClaim::handle_resumed`].
    Resume,
}

/// Where the VM is, as the source knows it at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceOutcome {
    /// The destination claimed the VM: it runs there, and the source stops for good.
    Claimed,
    /// No claim came; the source won the revert and resumed the VM.
    Reverted,
    /// The source won the revert but resuming the VM failed (the reason): it is paused
    /// at the source, and no other copy may run.
    RevertedNotResumed(String),
    /// Nothing is known (the reason): the VM stays **paused** at the source until the
    /// arbiter's record is settled.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceState {
    /// `Commit` sent; waiting for the destination's `Claimed` until `deadline`.
    ExpectClaimed { deadline: Duration },
    /// The connection closed before `Claimed`: reading the record until `deadline`,
    /// then revert.
    PollClaim { deadline: Duration, next: Due },
    /// `Claimed` arrived: confirming it with the arbiter.
    ConfirmClaim {
        deadline: Duration,
        give_up: Duration,
        next: Due,
    },
    /// Asking to revert until `give_up`.
    Reverting { give_up: Duration, next: Due },
    /// Reverted; resuming the VM.
    Resuming,
    /// Ended.
    Done(SourceOutcome),
}

/// The source's side of the claim step, from the moment `Commit` went out.
#[derive(Debug)]
pub struct SourceClaim {
    config: ClaimConfig,
    state: SourceState,
    actions: VecDeque<SourceAction>,
    /// Why the arbiter last failed to answer, for the final reason.
    last_error: Option<String>,
}

impl SourceClaim {
    /// `Commit` was sent at `now`.
    pub fn new(now: Duration, config: ClaimConfig) -> Self {
        Self {
            state: SourceState::ExpectClaimed {
                deadline: now + config.peer_timeout,
            },
            config,
            actions: VecDeque::new(),
            last_error: None,
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout), if anything waits.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            SourceState::ExpectClaimed { deadline } => Some(*deadline),
            // A read in flight: its answer decides (past the deadline it starts the
            // revert); the driver bounds the request.
            SourceState::PollClaim { next: None, .. } => None,
            SourceState::PollClaim { deadline, next } => Some(next.unwrap_or(*deadline)),
            SourceState::ConfirmClaim { give_up, next, .. }
            | SourceState::Reverting { give_up, next } => Some(next.unwrap_or(*give_up)),
            SourceState::Resuming | SourceState::Done(_) => None,
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&SourceOutcome> {
        match &self.state {
            SourceState::Done(o) => Some(o),
            _ => None,
        }
    }

    /// What the machine waits for, for errors and logs.
    pub fn waiting_for(&self) -> &'static str {
        match self.state {
            SourceState::ExpectClaimed { .. } => "the destination's Claimed",
            SourceState::PollClaim { .. } => "the arbiter to record the destination's claim",
            SourceState::ConfirmClaim { .. } => "the arbiter to confirm the claim",
            SourceState::Reverting { .. } => "the arbiter to record the revert",
            SourceState::Resuming => "the VM to resume",
            SourceState::Done(_) => "nothing",
        }
    }

    /// The destination's `Claimed` frame arrived.
    pub fn handle_claimed(&mut self, now: Duration) {
        let deadline = match self.state {
            SourceState::ExpectClaimed { deadline } | SourceState::PollClaim { deadline, .. } => {
                deadline
            }
            // Reverting: the revert's answer says whether the claim won; later: moot.
            _ => return,
        };
        if !self.config.arbiter {
            self.state = SourceState::Done(SourceOutcome::Claimed);
            return;
        }
        self.state = SourceState::ConfirmClaim {
            deadline,
            give_up: now + self.config.settle_timeout,
            next: None,
        };
        self.actions.push_back(SourceAction::Read);
    }

    /// The control connection closed, or failed, after `Commit`.
    pub fn handle_control_lost(&mut self) {
        let SourceState::ExpectClaimed { deadline } = self.state else {
            return;
        };
        if self.config.arbiter {
            self.state = SourceState::PollClaim {
                deadline,
                next: None,
            };
            self.actions.push_back(SourceAction::Read);
        } else {
            self.finish_unknown(
                "the connection to the destination ended after Commit, before it said it \
                 claimed the VM, and there is no arbiter to ask",
            );
        }
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state.clone() {
            SourceState::ExpectClaimed { deadline } if now >= deadline => {
                if self.config.arbiter {
                    self.start_revert(now);
                } else {
                    self.finish_unknown(&format!(
                        "no Claimed from the destination within {:?} of Commit, and no \
                         arbiter to take the VM back",
                        self.config.peer_timeout
                    ));
                }
            }
            SourceState::PollClaim {
                deadline,
                next: Some(at),
            } if now >= at => {
                if now >= deadline {
                    self.start_revert(now);
                } else {
                    self.state = SourceState::PollClaim {
                        deadline,
                        next: None,
                    };
                    self.actions.push_back(SourceAction::Read);
                }
            }
            SourceState::ConfirmClaim { give_up, .. } | SourceState::Reverting { give_up, .. }
                if now >= give_up =>
            {
                self.finish_unknown(&gave_up(&self.config, self.last_error.as_deref()));
            }
            SourceState::ConfirmClaim {
                deadline,
                give_up,
                next: Some(at),
            } if now >= at => {
                self.state = SourceState::ConfirmClaim {
                    deadline,
                    give_up,
                    next: None,
                };
                self.actions.push_back(SourceAction::Read);
            }
            SourceState::Reverting {
                give_up,
                next: Some(at),
            } if now >= at => {
                self.state = SourceState::Reverting {
                    give_up,
                    next: None,
                };
                self.actions
                    .push_back(SourceAction::Ask(Transition::Revert));
            }
            _ => {}
        }
    }

    /// The arbiter answered the last [`SourceAction::Read`] or [`SourceAction::Ask`].
    pub fn handle_answer(&mut self, now: Duration, answer: Answer) {
        let retry = now + self.config.retry_every;
        match (self.state.clone(), answer) {
            (SourceState::PollClaim { .. }, Answer::Record(Record::Claimed))
            | (SourceState::ConfirmClaim { .. }, Answer::Record(Record::Claimed))
            | (SourceState::Reverting { .. }, Answer::Record(Record::Claimed)) => {
                self.state = SourceState::Done(SourceOutcome::Claimed);
            }
            (
                SourceState::PollClaim { .. }
                | SourceState::ConfirmClaim { .. }
                | SourceState::Reverting { .. },
                Answer::Record(Record::Reverted),
            ) => {
                self.state = SourceState::Resuming;
                self.actions.push_back(SourceAction::Resume);
            }
            (
                SourceState::PollClaim { deadline, .. }
                | SourceState::ConfirmClaim { deadline, .. },
                Answer::Record(Record::Committed),
            ) => {
                // Not (yet) claimed; a `Claimed` frame the record does not back is not
                // believed. Keep reading until the deadline, then take the VM back.
                if now >= deadline {
                    self.start_revert(now);
                } else {
                    self.state = SourceState::PollClaim {
                        deadline,
                        next: Some(retry.min(deadline)),
                    };
                }
            }
            (SourceState::PollClaim { deadline, .. }, Answer::Unreachable(e)) => {
                self.last_error = Some(e);
                if now >= deadline {
                    self.start_revert(now);
                } else {
                    self.state = SourceState::PollClaim {
                        deadline,
                        next: Some(retry.min(deadline)),
                    };
                }
            }
            (
                SourceState::ConfirmClaim {
                    deadline, give_up, ..
                },
                Answer::Unreachable(e),
            ) => {
                self.last_error = Some(e);
                if self.config.authenticated {
                    // The destination sealed `Claimed` with this migration's keys: only
                    // it could have sent it, and it sends it only once its claim won.
                    self.state = SourceState::Done(SourceOutcome::Claimed);
                } else {
                    self.state = SourceState::ConfirmClaim {
                        deadline,
                        give_up,
                        next: Some(retry),
                    };
                }
            }
            (SourceState::Reverting { give_up, .. }, Answer::Unreachable(e)) => {
                self.last_error = Some(e);
                self.state = SourceState::Reverting {
                    give_up,
                    next: Some(retry),
                };
            }
            (SourceState::Reverting { give_up, .. }, Answer::Record(Record::Committed)) => {
                self.state = SourceState::Reverting {
                    give_up,
                    next: Some(retry),
                };
            }
            (
                SourceState::PollClaim { .. }
                | SourceState::ConfirmClaim { .. }
                | SourceState::Reverting { .. },
                Answer::Record(r @ (Record::Open | Record::Aborted)),
            ) => {
                self.finish_unknown(&format!(
                    "the arbiter's record says `{r}` although this source committed the \
                     migration: it is inconsistent; settle it by hand"
                ));
            }
            // No request in flight: a stray answer changes nothing.
            _ => {}
        }
    }

    /// The VM resumed at the source (or failed to).
    pub fn handle_resumed(&mut self, result: Result<(), String>) {
        if self.state == SourceState::Resuming {
            self.state = SourceState::Done(match result {
                Ok(()) => SourceOutcome::Reverted,
                Err(e) => SourceOutcome::RevertedNotResumed(e),
            });
        }
    }

    fn start_revert(&mut self, now: Duration) {
        self.state = SourceState::Reverting {
            give_up: now + self.config.settle_timeout,
            next: None,
        };
        self.actions
            .push_back(SourceAction::Ask(Transition::Revert));
    }

    fn finish_unknown(&mut self, why: &str) {
        self.actions.clear();
        self.state = SourceState::Done(SourceOutcome::Unknown(why.to_owned()));
    }
}

// ---------------------------------------------------------------------------------------
// Destination

/// What the destination's driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationAction {
    /// Read the migration's record; answer with [`DestinationClaim::handle_answer`].
    Read,
    /// Ask the arbiter for this transition; answer with [`DestinationClaim::handle_answer`].
    Ask(Transition),
    /// Tell the source (best effort) that the claim won: send `Claimed`.
    SendClaimed,
    /// Resume the VM here; report with [`DestinationClaim::handle_resumed`].
    Resume,
    /// Discard the received copy: the source keeps the VM.
    Discard,
}

/// How the switchover ended at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationOutcome {
    /// The claim won and the VM runs here.
    Resumed,
    /// The claim won but resuming failed (the reason): the copy here is the only one that
    /// may run; keep it.
    ResumeFailed(String),
    /// The source keeps the VM (the reason); the copy here was discarded.
    Discarded(String),
    /// Nothing is known (the reason): keep the copy here **paused** until the record is
    /// settled.
    Unsettled(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DestinationState {
    /// `Ready` sent; waiting for `Commit` or `Abort` until `deadline`.
    ExpectCommit { deadline: Duration },
    /// Asking the arbiter (`request`, in flight or due at `next`) until `give_up`.
    Consulting {
        request: Request,
        give_up: Duration,
        next: Due,
    },
    /// The claim won; resuming.
    Resuming,
    /// Ended.
    Done(DestinationOutcome),
}

/// The destination's side of the claim step, from the moment `Ready` went out.
#[derive(Debug)]
pub struct DestinationClaim {
    config: ClaimConfig,
    state: DestinationState,
    actions: VecDeque<DestinationAction>,
    /// Why the arbiter last failed to answer, for the final reason.
    last_error: Option<String>,
}

impl DestinationClaim {
    /// `Ready` was sent at `now`.
    pub fn new(now: Duration, config: ClaimConfig) -> Self {
        Self {
            state: DestinationState::ExpectCommit {
                deadline: now + config.peer_timeout,
            },
            config,
            actions: VecDeque::new(),
            last_error: None,
        }
    }

    /// A destination that restarted and holds a verified copy it never settled: the
    /// arbiter's record decides whether it resumes or discards it. Without an arbiter
    /// nothing can settle it ([`DestinationOutcome::Unsettled`]).
    pub fn settle(now: Duration, config: ClaimConfig) -> Self {
        let mut m = Self {
            state: DestinationState::Done(DestinationOutcome::Unsettled(String::new())),
            config,
            actions: VecDeque::new(),
            last_error: None,
        };
        if config.arbiter {
            m.consult(now, Request::Read, now + config.settle_timeout);
        } else {
            m.finish(DestinationOutcome::Unsettled(
                "there is no arbiter to settle it with".into(),
            ));
        }
        m
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<DestinationAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout), if anything waits.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            DestinationState::ExpectCommit { deadline } => Some(*deadline),
            DestinationState::Consulting { give_up, next, .. } => Some(next.unwrap_or(*give_up)),
            DestinationState::Resuming | DestinationState::Done(_) => None,
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&DestinationOutcome> {
        match &self.state {
            DestinationState::Done(o) => Some(o),
            _ => None,
        }
    }

    /// What the machine waits for, for errors and logs.
    pub fn waiting_for(&self) -> &'static str {
        match self.state {
            DestinationState::ExpectCommit { .. } => "Commit or Abort from the source",
            DestinationState::Consulting { .. } => "the arbiter's record",
            DestinationState::Resuming => "the VM to resume",
            DestinationState::Done(_) => "nothing",
        }
    }

    /// The source's `Commit` arrived; `claim_at_arbiter` is its flag: the source
    /// committed at an arbiter, so the VM is won there.
    ///
    /// With the flag, the destination claims at its arbiter before it resumes; without an
    /// arbiter it cannot claim, and keeps its copy paused (the source takes the VM back
    /// at its claim deadline). Without the flag the source has no arbiter (a sender
    /// without a key service): this `Commit` is the decision, and the destination resumes
    /// on it even if it has an arbiter of its own, where no record of this migration
    /// exists.
    pub fn handle_commit(&mut self, now: Duration, claim_at_arbiter: bool) {
        if !matches!(self.state, DestinationState::ExpectCommit { .. }) {
            return;
        }
        if claim_at_arbiter && self.config.arbiter {
            self.consult(
                now,
                Request::Ask(Transition::Claim),
                now + self.config.settle_timeout,
            );
        } else if claim_at_arbiter {
            self.finish(DestinationOutcome::Unsettled(
                "the source committed at an arbiter this host cannot reach, so it cannot \
                 claim the VM (configure the same arbiter on both hosts)"
                    .into(),
            ));
        } else {
            self.win();
        }
    }

    /// The source's `Abort` arrived (its reason).
    pub fn handle_abort(&mut self, reason: &str) {
        if matches!(self.state, DestinationState::ExpectCommit { .. }) {
            self.actions.push_back(DestinationAction::Discard);
            self.finish(DestinationOutcome::Discarded(format!(
                "the source aborted: {reason}"
            )));
        }
    }

    /// The control connection closed or failed before `Commit` or `Abort`.
    pub fn handle_control_lost(&mut self, now: Duration) {
        if matches!(self.state, DestinationState::ExpectCommit { .. }) {
            self.no_word_from_the_source(now, "the connection to the source ended after Ready");
        }
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state.clone() {
            DestinationState::ExpectCommit { deadline } if now >= deadline => {
                let why = format!(
                    "no Commit or Abort within {:?} of Ready",
                    self.config.peer_timeout
                );
                self.no_word_from_the_source(now, &why);
            }
            DestinationState::Consulting { give_up, .. } if now >= give_up => {
                self.finish(DestinationOutcome::Unsettled(gave_up(
                    &self.config,
                    self.last_error.as_deref(),
                )));
            }
            DestinationState::Consulting {
                request,
                give_up,
                next: Some(at),
            } if now >= at => self.consult(now, request, give_up),
            _ => {}
        }
    }

    /// The arbiter answered the last [`DestinationAction::Read`] or [`DestinationAction::Ask`].
    pub fn handle_answer(&mut self, now: Duration, answer: Answer) {
        let DestinationState::Consulting {
            request, give_up, ..
        } = self.state
        else {
            return;
        };
        match answer {
            Answer::Record(Record::Claimed) => self.win(),
            Answer::Record(r @ (Record::Reverted | Record::Aborted)) => {
                self.actions.push_back(DestinationAction::Discard);
                self.finish(DestinationOutcome::Discarded(format!(
                    "the arbiter's record says `{r}`: the source keeps the VM"
                )));
            }
            // Committed: the claim is ours to try. Open: the source never committed;
            // aborting settles it (the source's commit then fails and it resumes).
            Answer::Record(Record::Committed) => {
                self.consult(now, Request::Ask(Transition::Claim), give_up)
            }
            Answer::Record(Record::Open) => {
                self.consult(now, Request::Ask(Transition::Abort), give_up)
            }
            Answer::Unreachable(e) => {
                self.last_error = Some(e);
                self.state = DestinationState::Consulting {
                    request,
                    give_up,
                    next: Some(now + self.config.retry_every),
                };
            }
        }
    }

    /// The VM resumed here (or failed to).
    pub fn handle_resumed(&mut self, result: Result<(), String>) {
        if self.state == DestinationState::Resuming {
            self.finish(match result {
                Ok(()) => DestinationOutcome::Resumed,
                Err(e) => DestinationOutcome::ResumeFailed(e),
            });
        }
    }

    fn no_word_from_the_source(&mut self, now: Duration, why: &str) {
        if self.config.arbiter {
            self.consult(now, Request::Read, now + self.config.settle_timeout);
        } else {
            self.finish(DestinationOutcome::Unsettled(format!(
                "{why}, and there is no arbiter to ask"
            )));
        }
    }

    fn consult(&mut self, now: Duration, request: Request, give_up: Duration) {
        if now >= give_up {
            self.finish(DestinationOutcome::Unsettled(gave_up(
                &self.config,
                self.last_error.as_deref(),
            )));
            return;
        }
        self.state = DestinationState::Consulting {
            request,
            give_up,
            next: None,
        };
        self.actions.push_back(match request {
            Request::Read => DestinationAction::Read,
            Request::Ask(t) => DestinationAction::Ask(t),
        });
    }

    /// The destination may run the VM: tell the source first (it waits on it), then
    /// resume.
    fn win(&mut self) {
        self.state = DestinationState::Resuming;
        self.actions.push_back(DestinationAction::SendClaimed);
        self.actions.push_back(DestinationAction::Resume);
    }

    fn finish(&mut self, outcome: DestinationOutcome) {
        self.state = DestinationState::Done(outcome);
    }
}
