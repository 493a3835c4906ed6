//! The source's session after the handshake: the engine's decisions turned into control
//! frames, page batches per data stream, the check of the arbiter before the pause, the
//! device state in chunks, `Complete` with its totals, `Ready` checked against them, the
//! commit at the arbiter, `Commit`, and the claim step ([`SourceClaim`]).
//!
//! A driver runs it like the claim machines: carry out every [`SourceStep`] from
//! [`SourceSession::poll_action`] and report its result with the matching `handle_*`;
//! feed every control event (`handle_frame`, `handle_peer_abort`, `handle_control_lost`);
//! arm a timer for [`SourceSession::poll_timeout`]; stop at
//! [`SourceSession::outcome`]. When the machine stops waiting for an action the driver
//! is carrying out ([`SourceSession::awaiting`] changes), the driver drops it: a late
//! answer is ignored.

use std::collections::VecDeque;
use std::time::Duration;

use vmotion_engine::SenderEngine;
use vmotion_engine::bitmap::{DirtyBitmap, split_at_chunks, stream_for};
use vmotion_engine::{AbortReason, Action, EngineConfig, EngineReport, Outcome, PageRange};
use vmotion_proto::message::{
    Abort, Commit, Complete, DeviceStateChunk, IterationMarker, MarkerKind, Message, StreamTotals,
};
use vmotion_proto::{AbortCode, FrameType, PeerMisbehaved};

use crate::Transmit;
use crate::claim::{ClaimConfig, SourceAction as ClaimAction, SourceClaim, SourceOutcome};
use crate::error::SessionError;
use crate::record::{Answer, Record, Transition};

/// How many times the commit is asked for (with a growing pause) before the outcome is
/// called unknown.
pub const COMMIT_ATTEMPTS: u32 = 6;

/// What the source session needs to know.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The engine's configuration.
    pub engine: EngineConfig,
    /// Data streams (1..).
    pub streams: u16,
    /// Pages per chunk: a chunk always goes on the same stream.
    pub chunk_pages: u64,
    /// Largest device-state slice in one `DeviceState` frame.
    pub device_state_chunk: usize,
    /// No progress on the wire for this long ends the migration.
    pub progress_timeout: Duration,
    /// An arbiter keeps the record: it must answer before the pause, and the commit and
    /// the abort are recorded there.
    pub arbiter: bool,
    /// The claim step; its `arbiter` says whether the destination claims at the arbiter.
    pub claim: ClaimConfig,
}

/// What the source's driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStep {
    /// Start the dirty log.
    StartDirtyLog,
    /// Stop the dirty log.
    StopDirtyLog,
    /// Fetch and clear the dirty log; answer with [`SourceSession::handle_dirty_log`].
    FetchDirtyLog,
    /// Throttle the guest.
    SetThrottle(u8),
    /// Send these pages, `per_stream[i]` on stream `i + 1`; answer with
    /// [`SourceSession::handle_pages_sent`].
    SendPages {
        /// The iteration (0 = the first full pass).
        iteration: u32,
        /// The pages of each stream.
        per_stream: Vec<Vec<PageRange>>,
    },
    /// Pause the VM; answer with [`SourceSession::handle_paused`].
    Pause,
    /// Save the device state; answer with [`SourceSession::handle_device_state`].
    SaveDeviceState,
    /// End every data stream (its `EndOfStream`); answer with
    /// [`SourceSession::handle_streams_ended`].
    EndStreams,
    /// Resume the VM at the source; answer with [`SourceSession::handle_resumed`].
    Resume,
    /// Read the record; answer with [`SourceSession::handle_answer`].
    Read,
    /// Ask for a transition; answer with [`SourceSession::handle_answer`].
    Ask(Transition),
    /// Ask for a transition, best effort: no answer is expected.
    Notify(Transition),
    /// Send a frame on the control connection; a failure is
    /// [`SourceSession::handle_control_lost`].
    Transmit(Transmit),
    /// End the control connection with its `EndOfStream`.
    FinishControl,
}

/// What the machine waits for from the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Nothing: the engine decides the next step.
    Engine,
    DirtyLog,
    PagesSent {
        iteration: u32,
    },
    ArbiterBeforePause,
    Paused,
    DeviceState,
    StreamsEnded,
    Ready,
    Commit {
        attempt: u32,
        next: Option<Duration>,
    },
    Claim,
    Resumed,
    Done,
}

/// How the source's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEnd {
    /// `Commit` went out; the claim step says where the VM is.
    Committed(SourceOutcome),
    /// The migration aborted before the commit (the reason); the VM runs at the source
    /// (or was never paused), unless `resume_failed`.
    Aborted {
        /// Why.
        error: SessionError,
        /// Resuming the paused VM failed (the reason).
        resume_failed: Option<String>,
    },
    /// The commit could be neither recorded nor read back: the VM stays paused.
    CommitUnknown(String),
}

/// What was sent, for `Complete` and the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SentTotals {
    /// Pages sent, every pass.
    pub pages: u64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Device state bytes.
    pub device_state_len: u64,
    /// The highest key epoch a stream reached.
    pub max_epoch: u32,
}

/// The source's side of one migration, after the handshake.
#[derive(Debug)]
pub struct SourceSession {
    config: SourceConfig,
    engine: SenderEngine,
    waiting: Waiting,
    actions: VecDeque<SourceStep>,
    claim: Option<SourceClaim>,
    totals: SentTotals,
    paused: bool,
    last_activity: Duration,
    /// The latest `now` any input carried: when an action is queued.
    clock: Duration,
    first_error: Option<SessionError>,
    resume_failed: Option<String>,
    end: Option<SourceEnd>,
}

impl SourceSession {
    /// A session whose handshake ended at `now`.
    pub fn new(now: Duration, config: SourceConfig) -> Self {
        Self {
            engine: SenderEngine::new(config.engine.clone(), now),
            config,
            waiting: Waiting::Engine,
            actions: VecDeque::new(),
            claim: None,
            totals: SentTotals::default(),
            paused: false,
            last_activity: now,
            clock: now,
            first_error: None,
            resume_failed: None,
            end: None,
        }
    }

    /// The engine's report (iterations, downtime).
    pub fn report(&self) -> &EngineReport {
        self.engine.report()
    }

    /// The engine, for progress displays.
    pub fn engine(&self) -> &SenderEngine {
        &self.engine
    }

    /// What was sent so far.
    pub fn totals(&self) -> SentTotals {
        self.totals
    }

    /// How the session ended, once it has.
    pub fn outcome(&self) -> Option<&SourceEnd> {
        self.end.as_ref()
    }

    /// The VM was paused (and not resumed since).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Something failed: the session is aborting (or its commit's answer decides).
    pub fn failed(&self) -> bool {
        self.first_error.is_some()
    }

    /// The hard deadline of the switchover (from the pause to `Ready`), if it runs: a
    /// driver bounds every step it carries out meanwhile, control writes included, by it.
    pub fn switchover_deadline(&self) -> Option<Duration> {
        self.engine.switchover_deadline()
    }

    /// What the machine waits for, for errors, logs and for the driver to tell whether
    /// an action it is carrying out is still wanted.
    pub fn awaiting(&self) -> &'static str {
        match self.waiting {
            Waiting::Engine => "the next step",
            Waiting::DirtyLog => "the dirty log",
            Waiting::PagesSent { .. } => "the data streams to take the pages",
            Waiting::ArbiterBeforePause => "the arbiter to answer before the pause",
            Waiting::Paused => "the VM to pause",
            Waiting::DeviceState => "the device state",
            Waiting::StreamsEnded => "the data streams to end",
            Waiting::Ready => "Ready",
            Waiting::Commit { .. } => "the arbiter to record the commit",
            Waiting::Claim => self
                .claim
                .as_ref()
                .map_or("the claim", SourceClaim::waiting_for),
            Waiting::Resumed => "the VM to resume",
            Waiting::Done => "nothing",
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SourceStep> {
        loop {
            if let Some(a) = self.actions.pop_front() {
                return Some(a);
            }
            // After Commit the engine still has its last words (stop the dirty log).
            if matches!(self.waiting, Waiting::Engine | Waiting::Claim) {
                if let Some(a) = self.engine.poll_action() {
                    self.translate(a);
                    continue;
                }
                if self.waiting == Waiting::Engine {
                    self.conclude();
                    continue;
                }
            }
            let a = self.claim.as_mut()?.poll_action()?;
            return Some(match a {
                ClaimAction::Read => SourceStep::Read,
                ClaimAction::Ask(t) => SourceStep::Ask(t),
                ClaimAction::Resume => SourceStep::Resume,
            });
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Duration> {
        if let Some(c) = &self.claim {
            return c.poll_timeout();
        }
        let progress = matches!(
            self.waiting,
            Waiting::PagesSent { .. } | Waiting::StreamsEnded | Waiting::Ready
        )
        .then_some(self.last_activity + self.config.progress_timeout);
        let retry = match self.waiting {
            Waiting::Commit { next, .. } => next,
            _ => None,
        };
        [progress, retry, self.engine.switchover_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The wire made progress at `at` (a data stream wrote, the peer sent a frame).
    pub fn handle_activity(&mut self, at: Duration) {
        self.last_activity = self.last_activity.max(at);
        self.clock = self.clock.max(at);
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.clock = self.clock.max(now);
        if let Some(c) = self.claim.as_mut() {
            c.handle_timeout(now);
            self.after_claim();
            return;
        }
        if let Waiting::Commit {
            attempt,
            next: Some(at),
        } = self.waiting
            && now >= at
        {
            self.waiting = Waiting::Commit {
                attempt,
                next: None,
            };
            self.actions.push_back(SourceStep::Ask(Transition::Commit));
            return;
        }
        if self.engine.switchover_deadline().is_some_and(|d| now >= d)
            && !matches!(self.waiting, Waiting::Commit { .. })
        {
            self.engine.handle_tick(now);
            if self.engine.outcome().is_some() {
                keep(
                    &mut self.first_error,
                    SessionError::Timeout {
                        waiting_for: "the switchover to finish after the pause",
                        after: self.config.engine.switchover_timeout,
                    },
                );
                self.waiting = Waiting::Engine;
                return;
            }
        }
        let progress = matches!(
            self.waiting,
            Waiting::PagesSent { .. } | Waiting::StreamsEnded | Waiting::Ready
        );
        if progress && now >= self.last_activity + self.config.progress_timeout {
            let waiting_for = self.awaiting();
            self.fail(
                now,
                SessionError::Timeout {
                    waiting_for,
                    after: self.config.progress_timeout,
                },
            );
        }
    }

    /// The dirty log the last [`SourceStep::FetchDirtyLog`] fetched.
    pub fn handle_dirty_log(&mut self, now: Duration, dirty: &DirtyBitmap) {
        self.clock = self.clock.max(now);
        if self.waiting != Waiting::DirtyLog {
            return;
        }
        self.waiting = Waiting::Engine;
        if let Err(e) = self.engine.handle_dirty_log(now, dirty) {
            self.fail_local(now, AbortCode::SourceFailed, e.to_string());
        }
    }

    /// The pages of the last [`SourceStep::SendPages`] are on the wire.
    pub fn handle_pages_sent(&mut self, now: Duration, pages: u64, bytes: u64) {
        self.clock = self.clock.max(now);
        let Waiting::PagesSent { iteration } = self.waiting else {
            return;
        };
        self.handle_activity(now);
        self.totals.pages += pages;
        self.totals.bytes += bytes;
        self.transmit(
            FrameType::IterationMarker,
            IterationMarker {
                iteration,
                kind: MarkerKind::End,
                pages,
            }
            .encode(),
        );
        self.waiting = Waiting::Engine;
        if let Err(e) = self.engine.handle_pages_sent(now, pages, bytes) {
            self.fail_local(now, AbortCode::InternalError, e.to_string());
        }
    }

    /// The VM is paused.
    pub fn handle_paused(&mut self, now: Duration) {
        self.clock = self.clock.max(now);
        if self.waiting != Waiting::Paused {
            return;
        }
        self.waiting = Waiting::Engine;
        if let Err(e) = self.engine.handle_paused(now) {
            self.fail_local(now, AbortCode::InternalError, e.to_string());
        }
    }

    /// The device state, saved: it goes out in chunks.
    pub fn handle_device_state(&mut self, now: Duration, state: &[u8]) {
        self.clock = self.clock.max(now);
        if self.waiting != Waiting::DeviceState {
            return;
        }
        let total_len = state.len() as u64;
        let chunk = self.config.device_state_chunk.max(1);
        let mut offset = 0;
        loop {
            let end = (offset + chunk).min(state.len());
            let c = DeviceStateChunk {
                offset: offset as u64,
                total_len,
                data: &state[offset..end],
            };
            self.transmit(FrameType::DeviceState, c.encode());
            offset = end;
            if offset >= state.len() {
                break;
            }
        }
        self.totals.device_state_len = total_len;
        self.waiting = Waiting::Engine;
        if let Err(e) = self.engine.handle_device_state_sent(now, total_len) {
            self.fail_local(now, AbortCode::InternalError, e.to_string());
        }
    }

    /// Every data stream ended, with these totals (in stream order) and the highest key
    /// epoch any reached: `Complete` goes out, and the session waits for `Ready`.
    pub fn handle_streams_ended(&mut self, now: Duration, streams: Vec<StreamTotals>, epoch: u32) {
        self.clock = self.clock.max(now);
        if self.waiting != Waiting::StreamsEnded {
            return;
        }
        self.handle_activity(now);
        self.totals.max_epoch = epoch;
        let complete = Complete {
            iterations: u32::try_from(self.engine.report().iterations.len() + 1)
                .unwrap_or(u32::MAX),
            pages: self.totals.pages,
            device_state_len: self.totals.device_state_len,
            streams,
        };
        match complete.encode() {
            Ok(payload) => {
                self.transmit(FrameType::Complete, payload);
                self.waiting = Waiting::Ready;
            }
            Err(e) => self.fail_local(now, AbortCode::InternalError, e.to_string()),
        }
    }

    /// A frame arrived on the control connection (an `Abort` goes to
    /// [`handle_peer_abort`](Self::handle_peer_abort)).
    pub fn handle_frame(&mut self, now: Duration, frame_type: FrameType, payload: &[u8]) {
        self.clock = self.clock.max(now);
        self.handle_activity(now);
        if let Some(c) = self.claim.as_mut() {
            if frame_type == FrameType::Claimed {
                c.handle_claimed(now);
            } else {
                c.handle_control_lost();
            }
            self.after_claim();
            return;
        }
        if self.end.is_some() {
            return;
        }
        let state = self.awaiting();
        let ready = match Message::decode(frame_type, payload) {
            Ok(Message::Ready(r)) if self.waiting == Waiting::Ready => r,
            Ok(_) => {
                let e = PeerMisbehaved::UnexpectedFrame { state, frame_type };
                return self.fail(now, e.into());
            }
            Err(e) => return self.fail(now, e.into()),
        };
        for (what, claimed, sent) in [
            ("pages", ready.pages, self.totals.pages),
            (
                "device state bytes",
                ready.device_state_len,
                self.totals.device_state_len,
            ),
        ] {
            if claimed != sent {
                let e = PeerMisbehaved::TotalsMismatch {
                    stream: 0,
                    what,
                    claimed,
                    received: sent,
                };
                return self.fail(now, e.into());
            }
        }
        self.waiting = Waiting::Engine;
        if let Err(e) = self.engine.handle_ready(now) {
            self.fail_local(now, AbortCode::InternalError, e.to_string());
        }
    }

    /// A frame from the destination did not open or decode (forged, corrupted, replayed,
    /// out of order).
    pub fn handle_misbehaved(&mut self, now: Duration, e: PeerMisbehaved) {
        self.clock = self.clock.max(now);
        if let Some(c) = self.claim.as_mut() {
            c.handle_control_lost();
            return self.after_claim();
        }
        self.fail(now, e.into());
    }

    /// The destination's `Abort`.
    pub fn handle_peer_abort(&mut self, now: Duration, abort: &Abort) {
        self.clock = self.clock.max(now);
        if let Some(c) = self.claim.as_mut() {
            c.handle_control_lost();
            self.after_claim();
            return;
        }
        let e = SessionError::PeerAborted {
            code: abort.code,
            message: abort.message.clone(),
        };
        self.fail(now, e);
    }

    /// The control connection ended or failed (`reason`, as the driver saw it).
    pub fn handle_control_lost(&mut self, now: Duration, reason: &str) {
        self.clock = self.clock.max(now);
        if let Some(c) = self.claim.as_mut() {
            c.handle_control_lost();
            self.after_claim();
            return;
        }
        let waiting_for = self.awaiting();
        self.fail(
            now,
            SessionError::ControlLost {
                waiting_for,
                reason: reason.to_owned(),
            },
        );
    }

    /// A step the driver carried out failed (`code` for the peer, `message` for both).
    pub fn handle_failure(&mut self, now: Duration, code: AbortCode, message: String) {
        self.clock = self.clock.max(now);
        self.fail_local(now, code, message);
    }

    /// The arbiter answered the last [`SourceStep::Read`] or [`SourceStep::Ask`].
    pub fn handle_answer(&mut self, now: Duration, answer: Answer) {
        self.clock = self.clock.max(now);
        if let Some(c) = self.claim.as_mut() {
            c.handle_answer(now, answer);
            self.after_claim();
            return;
        }
        self.handle_activity(now);
        match self.waiting {
            Waiting::ArbiterBeforePause => match answer {
                Answer::Record(Record::Open) => {
                    self.waiting = Waiting::Paused;
                    self.paused = true;
                    self.actions.push_back(SourceStep::Pause);
                }
                Answer::Record(r) => self.fail(
                    now,
                    SessionError::ArbiterUnavailable(format!(
                        "its record of this migration already says `{r}`"
                    )),
                ),
                Answer::Unreachable(e) => self.fail(now, SessionError::ArbiterUnavailable(e)),
            },
            Waiting::Commit { attempt, .. } => self.commit_answer(now, attempt, &answer),
            _ => {}
        }
    }

    /// The arbiter refused the last request for good (this host is no party to the
    /// migration, no such migration): the step took no effect and never will. A refused
    /// commit aborts the migration (the source keeps the VM); anything else is treated as
    /// no answer.
    pub fn handle_refused(&mut self, now: Duration, why: String) {
        self.clock = self.clock.max(now);
        if self.claim.is_none() && matches!(self.waiting, Waiting::Commit { .. }) {
            self.waiting = Waiting::Engine;
            self.first_error = Some(SessionError::Engine(format!(
                "the arbiter refused the commit: {why}"
            )));
            if let Err(e) = self.engine.handle_outcome_recorded(now, false) {
                self.fail_local(now, AbortCode::InternalError, e.to_string());
            }
            return;
        }
        self.handle_answer(now, Answer::Unreachable(why));
    }

    /// The VM resumed (or did not).
    pub fn handle_resumed(&mut self, result: Result<(), String>) {
        if let Some(c) = self.claim.as_mut() {
            c.handle_resumed(result);
            self.after_claim();
            return;
        }
        if self.waiting != Waiting::Resumed {
            return;
        }
        self.paused = result.is_err();
        self.resume_failed = result.err();
        self.waiting = Waiting::Engine;
    }

    fn commit_answer(&mut self, now: Duration, attempt: u32, answer: &Answer) {
        let recorded = match answer {
            Answer::Record(Record::Committed | Record::Claimed | Record::Reverted) => Some(true),
            Answer::Record(Record::Aborted) => Some(false),
            Answer::Record(Record::Open) | Answer::Unreachable(_) => None,
        };
        match recorded {
            Some(r) => {
                if !r {
                    // The record decides: whatever else went wrong meanwhile (the
                    // destination giving up and closing) is not why this aborts.
                    self.first_error = Some(SessionError::Engine(
                        "the arbiter's record of this migration says `aborted`: the commit \
                         did not take, the source keeps the VM"
                            .into(),
                    ));
                }
                self.waiting = Waiting::Engine;
                if let Err(e) = self.engine.handle_outcome_recorded(now, r) {
                    self.fail_local(now, AbortCode::InternalError, e.to_string());
                }
            }
            None if attempt >= COMMIT_ATTEMPTS => {
                self.waiting = Waiting::Done;
                self.end = Some(SourceEnd::CommitUnknown(format!(
                    "the commit could be neither recorded nor read back after {attempt} tries"
                )));
            }
            None => {
                self.waiting = Waiting::Commit {
                    attempt: attempt + 1,
                    next: Some(now + Duration::from_millis(250) * attempt),
                };
            }
        }
    }

    /// One engine action, as the session's own.
    fn translate(&mut self, action: Action) {
        let a = match action {
            Action::StartDirtyLog => SourceStep::StartDirtyLog,
            Action::StopDirtyLog => SourceStep::StopDirtyLog,
            Action::SetThrottle(p) => SourceStep::SetThrottle(p),
            Action::FetchDirtyLog => {
                self.waiting = Waiting::DirtyLog;
                SourceStep::FetchDirtyLog
            }
            Action::SendPages {
                iteration, ranges, ..
            } => return self.send_pages(iteration, ranges),
            Action::Pause if self.config.arbiter => {
                self.waiting = Waiting::ArbiterBeforePause;
                SourceStep::Read
            }
            Action::Pause => {
                self.waiting = Waiting::Paused;
                self.paused = true;
                SourceStep::Pause
            }
            Action::SendDeviceState => {
                self.waiting = Waiting::DeviceState;
                SourceStep::SaveDeviceState
            }
            Action::SendComplete => {
                self.waiting = Waiting::StreamsEnded;
                SourceStep::EndStreams
            }
            Action::RecordOutcome(Outcome::Committed) if self.config.arbiter => {
                self.waiting = Waiting::Commit {
                    attempt: 1,
                    next: None,
                };
                SourceStep::Ask(Transition::Commit)
            }
            Action::RecordOutcome(Outcome::Committed) => {
                // No arbiter: the commit is this side's word alone.
                let _ = self.engine.handle_outcome_recorded(self.clock, true);
                return;
            }
            Action::RecordOutcome(Outcome::Aborted) if self.config.arbiter => {
                SourceStep::Notify(Transition::Abort)
            }
            Action::RecordOutcome(Outcome::Aborted) => return,
            Action::SendCommit => return self.send_commit(),
            Action::SendAbort(reason) => return self.send_abort(&reason),
            Action::Resume if self.paused => {
                self.waiting = Waiting::Resumed;
                SourceStep::Resume
            }
            Action::Resume => return,
        };
        self.actions.push_back(a);
    }

    fn send_pages(&mut self, iteration: u32, ranges: Vec<PageRange>) {
        let n = self.config.streams.max(1);
        let mut per_stream = vec![Vec::new(); usize::from(n)];
        for r in ranges {
            for piece in split_at_chunks(r, self.config.chunk_pages) {
                let s = stream_for(piece.start, self.config.chunk_pages, n);
                per_stream[usize::from(s - 1)].push(piece);
            }
        }
        self.transmit(
            FrameType::IterationMarker,
            IterationMarker {
                iteration,
                kind: MarkerKind::Start,
                pages: 0,
            }
            .encode(),
        );
        self.waiting = Waiting::PagesSent { iteration };
        self.actions.push_back(SourceStep::SendPages {
            iteration,
            per_stream,
        });
    }

    fn send_commit(&mut self) {
        // The commit point has passed: a lost Commit is settled by the claim step, never
        // a reason to resume here.
        let commit = Commit {
            claim_at_arbiter: self.config.claim.arbiter,
        };
        self.transmit(FrameType::Commit, commit.encode());
        self.actions.push_back(SourceStep::FinishControl);
        self.waiting = Waiting::Claim;
        // The claim machine's clock starts when Commit is queued; the driver sends it at
        // once.
        self.claim = Some(SourceClaim::new(self.clock, self.config.claim));
    }

    fn send_abort(&mut self, reason: &AbortReason) {
        let error = self
            .first_error
            .clone()
            .unwrap_or_else(|| SessionError::Engine(engine_reason(reason)));
        keep(&mut self.first_error, error.clone());
        // The peer's own Abort is not echoed back; everything else is explained.
        if !matches!(error, SessionError::PeerAborted { .. }) {
            let code = match (&error, reason) {
                (SessionError::Engine(_), AbortReason::Limit(_)) => AbortCode::LimitExceeded,
                (SessionError::Engine(_), AbortReason::SwitchoverTimeout) => AbortCode::Timeout,
                _ => error.abort_code(AbortCode::SourceFailed),
            };
            let abort = Abort {
                code,
                message: error.to_string(),
            };
            self.transmit(FrameType::Abort, abort.encode());
        }
        self.actions.push_back(SourceStep::FinishControl);
    }

    fn transmit(&mut self, frame_type: FrameType, payload: Vec<u8>) {
        self.actions.push_back(SourceStep::Transmit(Transmit {
            frame_type,
            payload,
        }));
    }

    fn fail(&mut self, now: Duration, e: SessionError) {
        if self.end.is_some() || self.claim.is_some() {
            return;
        }
        let reason = e.to_string();
        keep(&mut self.first_error, e);
        if matches!(self.waiting, Waiting::Commit { .. }) {
            // The commit may land: only its answer decides.
            return;
        }
        if self.engine.outcome().is_none() {
            // What was queued for the migration (a marker and its pages, the rest of the
            // device state) is void: the engine's abort, resuming a paused VM first,
            // comes next.
            self.actions.clear();
        }
        self.waiting = Waiting::Engine;
        self.engine.handle_failure(now, reason);
    }

    fn fail_local(&mut self, now: Duration, code: AbortCode, message: String) {
        self.fail(now, SessionError::Local { code, message });
    }

    fn after_claim(&mut self) {
        if let Some(o) = self.claim.as_ref().and_then(SourceClaim::outcome) {
            self.paused = matches!(
                o,
                SourceOutcome::RevertedNotResumed(_) | SourceOutcome::Unknown(_)
            );
            self.end = Some(SourceEnd::Committed(o.clone()));
            self.waiting = Waiting::Done;
        }
    }

    /// The engine has nothing more to do: the session ends (or waits for the claim).
    fn conclude(&mut self) {
        if self.claim.is_some() || self.end.is_some() {
            return;
        }
        self.waiting = Waiting::Done;
        let error = self.first_error.clone().unwrap_or_else(|| {
            SessionError::Engine(self.engine.report().abort_reason.as_ref().map_or_else(
                || "the engine ended without an outcome".into(),
                engine_reason,
            ))
        });
        self.end = Some(SourceEnd::Aborted {
            error,
            resume_failed: self.resume_failed.clone(),
        });
    }
}

/// Keeps the first error.
fn keep(first: &mut Option<SessionError>, e: SessionError) {
    if first.is_none() {
        *first = Some(e);
    }
}

/// A sentence for an abort the engine decided itself.
pub fn engine_reason(reason: &AbortReason) -> String {
    match reason {
        AbortReason::Limit(l) => format!("pre-copy did not converge ({l:?} limit)"),
        AbortReason::SwitchoverTimeout => "no Ready within the switchover timeout".into(),
        AbortReason::OutcomeNotRecorded => "the arbiter did not record the commit".into(),
        AbortReason::Failure(m) => m.clone(),
    }
}
