//! The destination's session after the handshake: the data streams bound within their
//! deadline, the control stream read to `Complete` (iteration markers, device-state
//! chunks in order and bounded), every stream's totals and every page checked, the guest
//! loaded and persisted, `Ready`, and the claim step ([`DestinationClaim`]).
//!
//! The driver runs the data streams itself (they write pages straight into the sink) and
//! reports to this machine what they did: each bind, each stream's end with its totals,
//! activity for the progress deadline, a failure. Everything else is decided here.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use vmotion_proto::message::{Abort, Complete, DeviceStateChunk, MAX_DEVICE_STATE, Message, Ready};
use vmotion_proto::{AbortCode, FrameType, PeerMisbehaved};

use crate::Transmit;
use crate::claim::{ClaimConfig, DestinationAction as ClaimAction, DestinationClaim};
use crate::error::SessionError;
use crate::record::Answer;

use crate::claim::DestinationOutcome;

/// What the destination session needs to know.
#[derive(Debug, Clone, Copy)]
pub struct DestinationConfig {
    /// Data streams the handshake agreed.
    pub streams: u16,
    /// Guest pages (from `Hello`): every one must arrive.
    pub guest_pages: u64,
    /// How long the streams may take to bind, and to end after `Complete`.
    pub step_timeout: Duration,
    /// The source silent (no page, no control frame) for this long ends the migration.
    pub progress_timeout: Duration,
    /// The claim step; its `arbiter` says whether this host has an arbiter.
    pub claim: ClaimConfig,
    /// The largest device state accepted (at most the protocol's `MAX_DEVICE_STATE`): a
    /// source that announces or sends more is refused, so what the destination buffers
    /// stays bounded by its own choice.
    pub max_device_state: u64,
}

/// What one data stream delivered, as its driver counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Pages written into the sink.
    pub pages: u64,
    /// Frames opened.
    pub frames: u64,
    /// Page bytes.
    pub bytes: u64,
    /// The key epoch the stream ended in (1 = its key was never updated).
    pub epochs: u32,
}

/// What the destination's driver must do next.
#[derive(Clone, PartialEq, Eq)]
pub enum DestinationStep {
    /// Count the guest pages no stream delivered; answer with
    /// [`DestinationSession::handle_missing`].
    CountMissing,
    /// Load this device state into the sink and persist the guest (memory and state,
    /// fsynced where the sink survives a restart); answer with
    /// [`DestinationSession::handle_persisted`].
    LoadAndPersist(Vec<u8>),
    /// Send a frame on the control connection.
    Transmit(Transmit),
    /// End the control connection with its `EndOfStream`.
    FinishControl,
    /// Read the record; answer with [`DestinationSession::handle_answer`].
    Read,
    /// Ask for a transition; answer with [`DestinationSession::handle_answer`].
    Ask(crate::Transition),
    /// Resume the guest here; answer with [`DestinationSession::handle_resumed`].
    Resume,
    /// Discard the received guest: nothing of it stays behind.
    Discard,
}

impl std::fmt::Debug for DestinationStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CountMissing => write!(f, "CountMissing"),
            Self::LoadAndPersist(s) => write!(f, "LoadAndPersist({} bytes)", s.len()),
            Self::Transmit(t) => write!(f, "Transmit({t:?})"),
            Self::FinishControl => write!(f, "FinishControl"),
            Self::Read => write!(f, "Read"),
            Self::Ask(t) => write!(f, "Ask({t:?})"),
            Self::Resume => write!(f, "Resume"),
            Self::Discard => write!(f, "Discard"),
        }
    }
}

/// What the machine waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// The data streams to bind, until `deadline`.
    Binding { deadline: Duration },
    /// Pages and control frames, until `Complete`.
    Receiving,
    /// Every data stream's end after `Complete`, until `deadline`.
    Draining {
        complete: Complete,
        deadline: Duration,
    },
    /// The count of pages that never arrived.
    CountingMissing { complete: Complete },
    /// The guest to be loaded and persisted.
    Persisting,
    /// `Ready` sent: the claim step.
    Claim,
    /// Ended.
    Done,
}

/// How the destination's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationEnd {
    /// The guest was verified and persisted and `Ready` went out; the claim step decided
    /// (what it decided).
    Settled(DestinationOutcome),
    /// The migration failed before `Ready` (why); the guest was discarded.
    Failed(SessionError),
}

/// The destination's side of one migration, after the handshake.
#[derive(Debug)]
pub struct DestinationSession {
    config: DestinationConfig,
    state: State,
    actions: VecDeque<DestinationStep>,
    claim: Option<DestinationClaim>,
    bound: u16,
    ended: BTreeMap<u16, StreamStats>,
    device_state: Vec<u8>,
    last_activity: Duration,
    verified: Option<Ready>,
    end: Option<DestinationEnd>,
    /// The latest iteration whose start marker arrived, and when.
    pass_started: Option<(u32, Duration)>,
    /// Iterations the source ran, once its `Complete` was verified.
    iterations: Option<u32>,
}

impl DestinationSession {
    /// A session whose handshake ended at `now`.
    pub fn new(now: Duration, config: DestinationConfig) -> Self {
        Self {
            state: State::Binding {
                deadline: now + config.step_timeout,
            },
            config,
            actions: VecDeque::new(),
            claim: None,
            bound: 0,
            ended: BTreeMap::new(),
            device_state: Vec::new(),
            last_activity: now,
            verified: None,
            end: None,
            pass_started: None,
            iterations: None,
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&DestinationEnd> {
        self.end.as_ref()
    }

    /// The pre-copy iterations the source ran (its stop-and-copy pass included), once
    /// its totals were verified.
    pub fn iterations(&self) -> Option<u32> {
        self.iterations
    }

    /// When the final (stop-and-copy) pass's start marker arrived here, on the clock
    /// this machine is driven with: the source paused the guest just before sending it.
    /// `None` before the totals were verified, or if that marker never came.
    pub fn final_pass_started(&self) -> Option<Duration> {
        let last = self.iterations?.checked_sub(1)?;
        self.pass_started
            .filter(|(iteration, _)| *iteration == last)
            .map(|(_, at)| at)
    }

    /// What `Ready` said, once the guest was verified: pages and device-state bytes.
    pub fn verified(&self) -> Option<&Ready> {
        self.verified.as_ref()
    }

    /// What each stream delivered, by stream id.
    pub fn streams(&self) -> &BTreeMap<u16, StreamStats> {
        &self.ended
    }

    /// What the machine waits for, for errors and logs.
    pub fn awaiting(&self) -> &'static str {
        match &self.state {
            State::Binding { .. } => "the data streams to bind",
            State::Receiving => "pages or control frames from the source",
            State::Draining { .. } => "a data stream's EndOfStream after Complete",
            State::CountingMissing { .. } => "the count of missing pages",
            State::Persisting => "the guest to be persisted",
            State::Claim => self
                .claim
                .as_ref()
                .map_or("the claim", DestinationClaim::waiting_for),
            State::Done => "nothing",
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<DestinationStep> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        let a = self.claim.as_mut()?.poll_action()?;
        Some(match a {
            ClaimAction::Read => DestinationStep::Read,
            ClaimAction::Ask(t) => DestinationStep::Ask(t),
            ClaimAction::SendClaimed => {
                self.actions.push_back(DestinationStep::FinishControl);
                DestinationStep::Transmit(Transmit {
                    frame_type: FrameType::Claimed,
                    payload: Vec::new(),
                })
            }
            ClaimAction::Resume => DestinationStep::Resume,
            ClaimAction::Discard => DestinationStep::Discard,
        })
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Binding { deadline } => {
                Some((*deadline).min(self.last_activity + self.config.progress_timeout))
            }
            State::Receiving => Some(self.last_activity + self.config.progress_timeout),
            State::Draining { deadline, .. } => Some(*deadline),
            State::Claim => self.claim.as_ref().and_then(DestinationClaim::poll_timeout),
            State::CountingMissing { .. } | State::Persisting | State::Done => None,
        }
    }

    /// The source was heard from at `at` (a page frame on a data stream).
    pub fn handle_activity(&mut self, at: Duration) {
        self.last_activity = self.last_activity.max(at);
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired.
    pub fn handle_timeout(&mut self, now: Duration) {
        let (waiting_for, after) = match &self.state {
            State::Binding { deadline } if now >= *deadline => {
                ("the data streams to bind", self.config.step_timeout)
            }
            State::Binding { .. } | State::Receiving
                if now >= self.last_activity + self.config.progress_timeout =>
            {
                (
                    "pages or control frames from the source",
                    self.config.progress_timeout,
                )
            }
            State::Draining { deadline, .. } if now >= *deadline => (
                "a data stream's EndOfStream after Complete",
                self.config.step_timeout,
            ),
            State::Claim => {
                if let Some(c) = self.claim.as_mut() {
                    c.handle_timeout(now);
                }
                return self.after_claim();
            }
            _ => return,
        };
        self.fail(SessionError::Timeout { waiting_for, after });
    }

    /// A data connection bound to stream `stream` (its `StreamBind` verified).
    pub fn handle_bound(&mut self, now: Duration, stream: u16) {
        self.handle_activity(now);
        if !matches!(self.state, State::Binding { .. }) {
            return;
        }
        // The protocol crate refuses a second bind of one stream; an id out of range is
        // refused here.
        if stream == 0 || stream > self.config.streams {
            let e = PeerMisbehaved::MalformedPayload {
                frame_type: FrameType::StreamBind,
                reason: "a stream id beyond the negotiated streams",
            };
            return self.fail(e.into());
        }
        self.bound = self.bound.saturating_add(1).min(self.config.streams);
        if self.bound == self.config.streams {
            self.state = State::Receiving;
        }
    }

    /// Stream `stream` ended with its authenticated `EndOfStream`, having delivered
    /// `stats`.
    pub fn handle_stream_ended(&mut self, now: Duration, stream: u16, stats: StreamStats) {
        self.handle_activity(now);
        if self.end.is_some() || stream == 0 || stream > self.config.streams {
            return;
        }
        self.ended.insert(stream, stats);
        self.drained();
    }

    /// A frame arrived on the control connection (an `Abort` goes to
    /// [`handle_peer_abort`](Self::handle_peer_abort)).
    pub fn handle_frame(&mut self, now: Duration, frame_type: FrameType, payload: &[u8]) {
        self.handle_activity(now);
        if self.state == State::Claim {
            let c = self.claim.as_mut().expect("a claim in the claim state");
            match (frame_type, vmotion_proto::message::Commit::decode(payload)) {
                (FrameType::Commit, Ok(commit)) => c.handle_commit(now, commit.claim_at_arbiter),
                // A malformed Commit, or any other frame, is no word at all: the arbiter
                // decides.
                _ => c.handle_control_lost(now),
            }
            return self.after_claim();
        }
        if self.end.is_some() {
            return;
        }
        let receiving = matches!(self.state, State::Binding { .. } | State::Receiving);
        let state = self.awaiting();
        let unexpected = PeerMisbehaved::UnexpectedFrame { state, frame_type };
        match Message::decode(frame_type, payload) {
            Err(e) => self.fail(e.into()),
            Ok(Message::IterationMarker(m)) if receiving => {
                if m.kind == vmotion_proto::message::MarkerKind::Start {
                    self.pass_started = Some((m.iteration, now));
                }
            }
            Ok(Message::DeviceState(c)) if receiving => {
                if let Err(e) = self.add_chunk(&c) {
                    self.fail(e.into());
                }
            }
            Ok(Message::Complete(c)) if self.state == State::Receiving => {
                self.state = State::Draining {
                    complete: c,
                    deadline: now + self.config.step_timeout,
                };
                self.drained();
            }
            Ok(_) => self.fail(unexpected.into()),
        }
    }

    /// The source's `Abort`.
    pub fn handle_peer_abort(&mut self, now: Duration, abort: &Abort) {
        if self.state == State::Claim {
            if let Some(c) = self.claim.as_mut() {
                c.handle_abort(&abort.message);
            }
            return self.after_claim();
        }
        self.handle_activity(now);
        self.fail(SessionError::PeerAborted {
            code: abort.code,
            message: abort.message.clone(),
        });
    }

    /// The control connection ended or failed (`reason`, as the driver saw it).
    pub fn handle_control_lost(&mut self, now: Duration, reason: &str) {
        if self.state == State::Claim {
            if let Some(c) = self.claim.as_mut() {
                c.handle_control_lost(now);
            }
            return self.after_claim();
        }
        let waiting_for = self.awaiting();
        self.fail(SessionError::ControlLost {
            waiting_for,
            reason: reason.to_owned(),
        });
    }

    /// Something the driver did failed (a data stream, the sink): `code` for the peer.
    pub fn handle_failure(&mut self, code: AbortCode, message: String) {
        if self.state == State::Claim {
            return;
        }
        self.fail(SessionError::Local { code, message });
    }

    /// A data stream broke the protocol (a forged, replayed or reordered frame, bytes
    /// after its end). After `Ready` the streams no longer matter.
    pub fn handle_stream_misbehaved(&mut self, e: PeerMisbehaved) {
        if self.state != State::Claim {
            self.fail(e.into());
        }
    }

    /// A frame from the source did not open or decode (forged, corrupted, replayed, out
    /// of order), on the control connection. After `Ready` a bad frame there is no word at
    /// all: the arbiter decides.
    pub fn handle_misbehaved(&mut self, now: Duration, e: PeerMisbehaved) {
        if self.state == State::Claim {
            if let Some(c) = self.claim.as_mut() {
                c.handle_control_lost(now);
            }
            return self.after_claim();
        }
        self.fail(e.into());
    }

    /// The count asked for by [`DestinationStep::CountMissing`].
    pub fn handle_missing(&mut self, now: Duration, missing: u64) {
        let State::CountingMissing { complete } = &self.state else {
            return;
        };
        if missing > 0 {
            return self.fail(PeerMisbehaved::PagesMissing { missing }.into());
        }
        let pages: u64 = self.ended.values().map(|s| s.pages).sum();
        let device_state_len = self.device_state.len() as u64;
        for (what, claimed, received) in [
            ("pages", complete.pages, pages),
            (
                "device state bytes",
                complete.device_state_len,
                device_state_len,
            ),
        ] {
            if claimed != received {
                return self.fail(totals(0, what, claimed, received).into());
            }
        }
        self.verified = Some(Ready {
            pages,
            device_state_len,
        });
        self.iterations = Some(complete.iterations);
        self.handle_activity(now);
        self.state = State::Persisting;
        let state = std::mem::take(&mut self.device_state);
        self.actions
            .push_back(DestinationStep::LoadAndPersist(state));
    }

    /// The guest was loaded and persisted (or not): `Ready` goes out and the claim step
    /// begins.
    pub fn handle_persisted(&mut self, now: Duration, result: Result<(), String>) {
        if self.state != State::Persisting {
            return;
        }
        if let Err(message) = result {
            return self.fail(SessionError::Local {
                code: AbortCode::DestinationFailed,
                message,
            });
        }
        let ready = self.verified.expect("verified before persisting");
        // A Ready that may not arrive is settled like any lost answer: the claim step
        // asks the arbiter.
        self.actions.push_back(DestinationStep::Transmit(Transmit {
            frame_type: FrameType::Ready,
            payload: ready.encode(),
        }));
        self.state = State::Claim;
        self.claim = Some(DestinationClaim::new(now, self.config.claim));
    }

    /// The arbiter answered the last [`DestinationStep::Read`] or
    /// [`DestinationStep::Ask`].
    pub fn handle_answer(&mut self, now: Duration, answer: Answer) {
        if let Some(c) = self.claim.as_mut() {
            c.handle_answer(now, answer);
            self.after_claim();
        }
    }

    /// The guest resumed here (or did not).
    pub fn handle_resumed(&mut self, result: Result<(), String>) {
        if let Some(c) = self.claim.as_mut() {
            c.handle_resumed(result);
            self.after_claim();
        }
    }

    fn add_chunk(&mut self, c: &DeviceStateChunk<'_>) -> Result<(), PeerMisbehaved> {
        // Chunks arrive in order on the control connection; the total is bounded, and
        // memory grows only with what actually arrived.
        let end = self.device_state.len() as u64 + c.data.len() as u64;
        if c.offset != self.device_state.len() as u64
            || c.total_len > MAX_DEVICE_STATE
            || end > c.total_len
        {
            return Err(PeerMisbehaved::MalformedPayload {
                frame_type: FrameType::DeviceState,
                reason: "device state chunk out of order or past its total",
            });
        }
        if c.total_len > self.config.max_device_state {
            return Err(PeerMisbehaved::MalformedPayload {
                frame_type: FrameType::DeviceState,
                reason: "device state larger than this destination accepts",
            });
        }
        self.device_state.extend_from_slice(c.data);
        Ok(())
    }

    /// After `Complete`: once every stream ended, their totals are checked.
    fn drained(&mut self) {
        let State::Draining { complete, .. } = &self.state else {
            return;
        };
        if self.ended.len() < usize::from(self.config.streams) {
            return;
        }
        let complete = complete.clone();
        let (claimed, have) = (complete.streams.len() as u64, self.ended.len() as u64);
        if claimed != have {
            return self.fail(totals(0, "streams", claimed, have).into());
        }
        for ((id, got), sent) in self.ended.iter().zip(&complete.streams) {
            for (what, c, r) in [
                ("frames", sent.frames, got.frames),
                ("bytes", sent.bytes, got.bytes),
            ] {
                if c != r {
                    return self.fail(totals(*id, what, c, r).into());
                }
            }
        }
        self.state = State::CountingMissing { complete };
        self.actions.push_back(DestinationStep::CountMissing);
    }

    fn after_claim(&mut self) {
        if let Some(o) = self.claim.as_ref().and_then(DestinationClaim::outcome) {
            self.end = Some(DestinationEnd::Settled(o.clone()));
            self.state = State::Done;
            self.actions.push_back(DestinationStep::FinishControl);
        }
    }

    /// Before `Ready`: the source is told why (unless it said so itself), the control
    /// stream ends, and the guest is discarded.
    fn fail(&mut self, e: SessionError) {
        if self.end.is_some() || self.state == State::Claim {
            return;
        }
        // Nothing queued for the migration (a count, a persist) is wanted any more.
        self.actions.clear();
        if !matches!(e, SessionError::PeerAborted { .. }) {
            let abort = Abort {
                code: e.abort_code(AbortCode::DestinationFailed),
                message: e.to_string(),
            };
            self.actions.push_back(DestinationStep::Transmit(Transmit {
                frame_type: FrameType::Abort,
                payload: abort.encode(),
            }));
        }
        self.actions.push_back(DestinationStep::FinishControl);
        self.actions.push_back(DestinationStep::Discard);
        self.state = State::Done;
        self.end = Some(DestinationEnd::Failed(e));
    }
}

fn totals(stream: u16, what: &'static str, claimed: u64, received: u64) -> PeerMisbehaved {
    PeerMisbehaved::TotalsMismatch {
        stream,
        what,
        claimed,
        received,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmotion_proto::message::DeviceStateChunk;

    fn session(max_device_state: u64) -> DestinationSession {
        let mut m = DestinationSession::new(
            Duration::ZERO,
            DestinationConfig {
                streams: 1,
                guest_pages: 4,
                step_timeout: Duration::from_secs(1),
                progress_timeout: Duration::from_secs(2),
                claim: ClaimConfig::default(),
                max_device_state,
            },
        );
        m.handle_bound(Duration::ZERO, 1);
        m
    }

    fn chunk(total_len: u64, data: &[u8]) -> Vec<u8> {
        DeviceStateChunk {
            offset: 0,
            total_len,
            data,
        }
        .encode()
    }

    /// A device state announced larger than this destination accepts ends the migration
    /// before a byte of it is kept; one within the limit is taken.
    #[test]
    fn device_state_past_the_destinations_limit_is_refused() {
        let mut m = session(100);
        m.handle_frame(
            Duration::ZERO,
            FrameType::DeviceState,
            &chunk(101, &[7; 10]),
        );
        assert!(
            matches!(m.outcome(), Some(DestinationEnd::Failed(_))),
            "{:?}",
            m.outcome()
        );
        assert!(m.device_state.is_empty());

        let mut m = session(100);
        m.handle_frame(
            Duration::ZERO,
            FrameType::DeviceState,
            &chunk(100, &[7; 10]),
        );
        assert_eq!(m.outcome(), None);
        assert_eq!(m.device_state.len(), 10);
    }
}
