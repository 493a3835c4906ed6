//! A whole migration in memory: the engine and both session machines, real sealed frames
//! (the protocol crate's record layer, keys from an in-memory handshake), a guest that
//! keeps writing at the source, an in-memory compare-and-set arbiter, and links with
//! simulated bandwidth and latency whose every frame passes a tamper hook (like rustls'
//! `transfer_altered`). Time is simulated: nothing sleeps, every run is the same.
//!
//! The harness checks after every step that the VM never runs in two places, and at the
//! end returns what each side concluded, where the VM runs, and the arbiter's record.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use vmotion_engine::bitmap::DirtyBitmap;
use vmotion_engine::{ConvergencePolicy, EngineConfig};
use vmotion_proto::message::{Abort, StreamTotals};
use vmotion_proto::testing::encrypted_pair;
use vmotion_proto::{Channel, EpochLimits, FrameType, Opener, PeerMisbehaved, Sealer, WireFrame};
use vmotion_session::{
    Answer, ClaimConfig, DestinationAction, DestinationClaim, DestinationConfig, DestinationEnd,
    DestinationOutcome, DestinationSession, DestinationStep, Record, SessionError, SourceConfig,
    SourceEnd, SourceOutcome, SourceSession, SourceStep, StreamStats, Transition,
};

pub(crate) const PAGE: u64 = 4096;
pub(crate) const PAGES: u64 = 512;
pub(crate) const STREAMS: u16 = 2;
/// Bytes per millisecond on each data link (1 GB/s).
const BANDWIDTH: u64 = 1_000_000;
const LATENCY: Duration = Duration::from_micros(100);
const ARBITER_LATENCY: Duration = Duration::from_millis(2);
/// A request to an arbiter that does not answer fails after this.
const ARBITER_TIMEOUT: Duration = Duration::from_millis(50);
const PAGES_PER_FRAME: usize = 32;
const DEVICE_STATE: usize = 10_000;
/// The guest writes this many pages every simulated millisecond while it runs.
const WRITES_PER_MS: u64 = 24;
const RESTART_AFTER: Duration = Duration::from_millis(30);
/// No case may take longer, simulated.
pub(crate) const BOUND: Duration = Duration::from_secs(60);

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One direction of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Wire {
    /// Source → destination control.
    Control,
    /// Destination → source control.
    Back,
    /// Source → destination data stream (1..).
    Data(u16),
}

/// What the tamper hook does with a frame in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Deliver,
    Drop,
    Duplicate,
    /// One bit of the payload flipped.
    Alter,
    /// Delivered this much later (past any deadline if large), after the frames behind it.
    Delay(Duration),
    /// The path stops forwarding every frame, in both directions, and closes nothing.
    BlackHole,
    /// The connection (this one, and the others of the migration) is reset.
    Cut,
}

/// Which side dies, and at which of its steps (each input handled is a step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crash {
    Never,
    Source(usize),
    Destination(usize),
}

/// Knobs of one case.
pub(crate) struct Case {
    /// Called with (wire, index of the frame among all frames sent so far, frame type).
    pub(crate) tamper: Box<dyn FnMut(Wire, usize, FrameType) -> Fate>,
    pub(crate) crash: Crash,
    /// The arbiter stops answering at this simulated time (and for good).
    pub(crate) arbiter_down_at: Option<Duration>,
    /// Answers to the arbiter's first `lose_answers` requests are lost (the step still
    /// takes effect).
    pub(crate) lose_answers_after: Option<Duration>,
    /// There is an arbiter at all.
    pub(crate) arbiter: bool,
    /// The arbiter refuses the source's commit for good (this host is no party to it).
    pub(crate) refuse_commit: bool,
    /// How long the arbiter takes to answer (2 ms unless set): slow answers cross the
    /// machines' deadlines.
    pub(crate) arbiter_latency: Option<Duration>,
    /// Local steps that fail: the destination cannot persist the guest; resuming the VM
    /// fails at the source or at the destination.
    pub(crate) fail_persist: bool,
    pub(crate) fail_source_resume: bool,
    pub(crate) fail_destination_resume: bool,
}

impl Default for Case {
    fn default() -> Self {
        Self {
            tamper: Box::new(|_, _, _| Fate::Deliver),
            crash: Crash::Never,
            arbiter_down_at: None,
            lose_answers_after: None,
            arbiter: true,
            refuse_commit: false,
            arbiter_latency: None,
            fail_persist: false,
            fail_source_resume: false,
            fail_destination_resume: false,
        }
    }
}

/// How a case ended.
#[derive(Debug)]
pub(crate) struct Ending {
    pub(crate) source: Option<SourceEnd>,
    pub(crate) destination: Option<DestinationEnd>,
    /// The restarted destination's settlement, if it restarted.
    pub(crate) settled: Option<DestinationOutcome>,
    pub(crate) running_at_source: bool,
    pub(crate) running_at_destination: bool,
    /// The destination's guest memory equals the source's at the pause, and its device
    /// state too (checked when it runs).
    pub(crate) destination_exact: bool,
    /// The destination still holds a received copy (persisted and not discarded).
    pub(crate) destination_kept: bool,
    pub(crate) record: Record,
    pub(crate) ended_at: Duration,
    pub(crate) frames: usize,
    /// Steps each side took (source, destination): a crash can aim at each.
    pub(crate) steps: (usize, usize),
}

struct Packet {
    at: Duration,
    frame: Option<WireFrame>,
}

struct Link {
    wire: Wire,
    queue: VecDeque<Packet>,
    busy_until: Duration,
}

struct Vm {
    memory: Vec<u64>,
    running: bool,
    dirty: Option<DirtyBitmap>,
    lcg: u64,
    at_pause: Option<Vec<u64>>,
    state_at_pause: Option<Vec<u8>>,
    next_write: Duration,
}

struct Source {
    s: SourceSession,
    control: Channel,
    data: Vec<Sealer>,
}

struct Destination {
    s: DestinationSession,
    control: Opener,
    back: Sealer,
    data: Vec<Opener>,
    memory: Vec<u64>,
    received: Vec<bool>,
    stats: Vec<StreamStats>,
}

/// The destination's files: what survives a restart.
struct Disk {
    memory: Vec<u64>,
    state: Vec<u8>,
}

enum Event {
    SourceAnswer(Answer),
    SourceRefused(String),
    DestinationAnswer(Answer),
    RestartAnswer(Answer),
    PagesSent { pages: u64, bytes: u64 },
    StreamsEnded(Vec<StreamTotals>),
    Restart,
}

pub(crate) struct Pair {
    now: Duration,
    case: Case,
    vm: Vm,
    src: Option<Source>,
    dst: Option<Destination>,
    restarted: Option<DestinationClaim>,
    disk: Option<Disk>,
    dst_running: bool,
    dst_memory: Option<(Vec<u64>, Vec<u8>)>,
    record: Record,
    links: Vec<Link>,
    black_hole: bool,
    frames: usize,
    events: Vec<(Duration, u64, Event)>,
    seq: u64,
    steps: (usize, usize),
    claim: ClaimConfig,
}

pub(crate) fn claim_config(arbiter: bool) -> ClaimConfig {
    ClaimConfig {
        arbiter,
        peer_timeout: ms(1000),
        settle_timeout: ms(3000),
        retry_every: ms(50),
        authenticated: true,
    }
}

impl Pair {
    pub(crate) fn new(case: Case) -> Self {
        let (mut sender, mut receiver) = encrypted_pair(EpochLimits::default());
        let src_control = sender.take_control().expect("control");
        let dst_control = receiver.take_control().expect("control");
        let mut data = Vec::new();
        let mut openers = Vec::new();
        for id in 1..=STREAMS {
            let (bind, ch) = sender.open_data_stream(id).expect("open");
            let (_, r) = receiver.accept_data_stream(bind).expect("bind");
            data.push(ch.sealer);
            openers.push(r.opener);
        }
        let claim = claim_config(case.arbiter);
        let source = SourceSession::new(
            Duration::ZERO,
            SourceConfig {
                engine: EngineConfig {
                    guest_pages: PAGES,
                    page_size: PAGE,
                    policy: ConvergencePolicy {
                        max_downtime: ms(5),
                        ..ConvergencePolicy::default()
                    },
                    dirty_tracking: true,
                    switchover_timeout: ms(1000),
                    device_state_estimate: DEVICE_STATE as u64,
                },
                streams: STREAMS,
                chunk_pages: 64,
                device_state_chunk: 4000,
                progress_timeout: ms(2000),
                arbiter: case.arbiter,
                claim,
            },
        );
        let destination = DestinationSession::new(
            Duration::ZERO,
            DestinationConfig {
                streams: STREAMS,
                guest_pages: PAGES,
                step_timeout: ms(1000),
                progress_timeout: ms(2000),
                claim,
                max_device_state: vmotion_proto::message::MAX_DEVICE_STATE,
            },
        );
        let mut links = vec![Wire::Control, Wire::Back];
        links.extend((1..=STREAMS).map(Wire::Data));
        let mut pair = Self {
            now: Duration::ZERO,
            case,
            vm: Vm {
                memory: (0..PAGES).map(|p| p * 1000).collect(),
                running: true,
                dirty: None,
                lcg: 0x2545_f491_4f6c_dd1d,
                at_pause: None,
                state_at_pause: None,
                next_write: ms(1),
            },
            src: Some(Source {
                s: source,
                control: src_control,
                data,
            }),
            dst: Some(Destination {
                s: destination,
                control: dst_control.opener,
                back: dst_control.sealer,
                data: openers,
                memory: vec![0; PAGES as usize],
                received: vec![false; PAGES as usize],
                stats: vec![StreamStats::default(); usize::from(STREAMS)],
            }),
            restarted: None,
            disk: None,
            dst_running: false,
            dst_memory: None,
            record: Record::Open,
            links: links
                .into_iter()
                .map(|wire| Link {
                    wire,
                    queue: VecDeque::new(),
                    busy_until: Duration::ZERO,
                })
                .collect(),
            black_hole: false,
            frames: 0,
            events: Vec::new(),
            seq: 0,
            steps: (0, 0),
            claim,
        };
        if let Some(d) = pair.dst.as_mut() {
            for id in 1..=STREAMS {
                d.s.handle_bound(LATENCY, id);
            }
        }
        pair
    }

    /// Runs the case to its end (both sides concluded, or nothing left to happen), and
    /// checks the rules on the way.
    pub(crate) fn run(mut self) -> Ending {
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            assert!(
                rounds < 200_000,
                "no progress at {:?}: source waits for {:?} (timer {:?}), destination for {:?} (timer {:?})",
                self.now,
                self.src.as_ref().map(|s| s.s.awaiting()),
                self.src.as_ref().map(|s| s.s.poll_timeout()),
                self.dst.as_ref().map(|d| d.s.awaiting()),
                self.dst.as_ref().map(|d| d.s.poll_timeout()),
            );
            self.drain();
            assert!(
                !(self.vm.running && self.dst_running),
                "the VM runs in two places at {:?}",
                self.now
            );
            if self.finished() {
                break;
            }
            let Some(next) = self.next_time() else { break };
            assert!(next <= BOUND, "still running at {next:?}");
            self.now = self.now.max(next);
            self.fire();
        }
        let exact = match (&self.dst_memory, &self.vm.at_pause, &self.vm.state_at_pause) {
            (Some((m, s)), Some(p), Some(ps)) => m == p && s == ps,
            _ => false,
        };
        Ending {
            source: self.src.as_ref().and_then(|s| s.s.outcome().cloned()),
            destination: self.dst.as_ref().and_then(|d| d.s.outcome().cloned()),
            settled: self.restarted.as_ref().and_then(|r| r.outcome().cloned()),
            running_at_source: self.vm.running,
            running_at_destination: self.dst_running,
            destination_exact: exact,
            destination_kept: self.disk.is_some(),
            record: self.record,
            ended_at: self.now,
            frames: self.frames,
            steps: self.steps,
        }
    }

    fn finished(&self) -> bool {
        let src = self.src.as_ref().is_none_or(|s| s.s.outcome().is_some());
        let dst = self.dst.as_ref().is_none_or(|d| d.s.outcome().is_some());
        let restart = self
            .restarted
            .as_ref()
            .is_none_or(|r| r.outcome().is_some());
        let pending_restart = self.events.iter().any(|e| matches!(e.2, Event::Restart));
        src && dst && restart && !pending_restart
    }

    fn next_time(&self) -> Option<Duration> {
        let mut t: Vec<Duration> = Vec::new();
        t.extend(self.events.iter().map(|e| e.0));
        t.extend(
            self.links
                .iter()
                .filter_map(|l| l.queue.front().map(|p| p.at)),
        );
        if let Some(s) = &self.src {
            t.extend(s.s.poll_timeout());
        }
        if let Some(d) = &self.dst {
            t.extend(d.s.poll_timeout());
        }
        if let Some(r) = &self.restarted {
            t.extend(r.poll_timeout());
        }
        let live = self.src.as_ref().is_some_and(|s| s.s.outcome().is_none());
        if self.vm.running && live {
            t.push(self.vm.next_write);
        }
        t.into_iter().min()
    }

    fn schedule(&mut self, at: Duration, e: Event) {
        self.seq += 1;
        self.events.push((at, self.seq, e));
    }

    /// Everything due now: events, arrivals, timers, the guest's writes.
    fn fire(&mut self) {
        let now = self.now;
        if self.vm.running && self.vm.next_write <= now {
            self.guest_writes();
        }
        self.events.sort_by_key(|e| (e.0, e.1));
        while let Some(i) = self.events.iter().position(|e| e.0 <= now) {
            let (_, _, e) = self.events.remove(i);
            self.event(e);
            self.drain();
        }
        for i in 0..self.links.len() {
            while self.links[i].queue.front().is_some_and(|p| p.at <= now) {
                let p = self.links[i].queue.pop_front().expect("a packet");
                let wire = self.links[i].wire;
                self.arrive(wire, p.frame);
                self.drain();
            }
        }
        if let Some(s) = self.src.as_mut()
            && s.s.poll_timeout().is_some_and(|t| t <= now)
        {
            self.steps.0 += 1;
            s.s.handle_timeout(now);
        }
        if let Some(d) = self.dst.as_mut()
            && d.s.poll_timeout().is_some_and(|t| t <= now)
        {
            self.steps.1 += 1;
            d.s.handle_timeout(now);
        }
        if let Some(r) = self.restarted.as_mut()
            && r.poll_timeout().is_some_and(|t| t <= now)
        {
            r.handle_timeout(now);
        }
        self.check_crash();
    }

    fn guest_writes(&mut self) {
        for _ in 0..WRITES_PER_MS {
            self.vm.lcg = self
                .vm
                .lcg
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let page = (self.vm.lcg >> 33) % PAGES;
            self.vm.memory[page as usize] += 1;
            if let Some(d) = self.vm.dirty.as_mut() {
                d.set(page);
            }
        }
        self.vm.next_write = self.now + ms(1);
    }

    fn check_crash(&mut self) {
        match self.case.crash {
            Crash::Source(k) if self.steps.0 >= k && self.src.is_some() => {
                self.src = None;
                self.cut_all();
            }
            Crash::Destination(k) if self.steps.1 >= k && self.dst.is_some() => {
                self.dst = None;
                self.cut_all();
                if self.disk.is_some() {
                    self.schedule(self.now + RESTART_AFTER, Event::Restart);
                }
            }
            _ => {}
        }
    }

    /// A process died: its connections close (after the latency) for the other side.
    fn cut_all(&mut self) {
        let at = self.now + LATENCY;
        for l in &mut self.links {
            l.queue.clear();
            if !self.black_hole {
                l.queue.push_back(Packet { at, frame: None });
            }
        }
    }

    /// Takes every step both machines want now.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            if let Some(a) = self.src.as_mut().and_then(|s| s.s.poll_action()) {
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!("{:?} source {a:?}", self.now);
                }
                self.source_step(a);
                any = true;
            }
            if let Some(a) = self.dst.as_mut().and_then(|d| d.s.poll_action()) {
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!("{:?} destination {a:?}", self.now);
                }
                self.destination_step(a);
                any = true;
            }
            if let Some(a) = self
                .restarted
                .as_mut()
                .and_then(DestinationClaim::poll_action)
            {
                self.restart_step(a);
                any = true;
            }
            self.check_crash();
            if !any {
                return;
            }
        }
    }

    fn arbiter(&mut self, t: Option<Transition>) -> (Duration, Answer) {
        let down = self.case.arbiter_down_at.is_some_and(|d| self.now >= d);
        if !self.case.arbiter || down {
            return (
                self.now + ARBITER_TIMEOUT,
                Answer::Unreachable("no answer".into()),
            );
        }
        if let Some(t) = t
            && let Some(next) = self.record.step(t)
        {
            self.record = next;
        }
        if self.case.lose_answers_after.is_some_and(|d| self.now >= d) {
            return (
                self.now + ARBITER_TIMEOUT,
                Answer::Unreachable("the answer was lost".into()),
            );
        }
        let latency = self.case.arbiter_latency.unwrap_or(ARBITER_LATENCY);
        (self.now + latency, Answer::Record(self.record))
    }

    fn source_step(&mut self, a: SourceStep) {
        let now = self.now;
        self.steps.0 += 1;
        let src = self.src.as_mut().expect("a source");
        match a {
            SourceStep::StartDirtyLog => self.vm.dirty = Some(DirtyBitmap::new(PAGES)),
            SourceStep::StopDirtyLog => self.vm.dirty = None,
            SourceStep::FetchDirtyLog => {
                let log = self
                    .vm
                    .dirty
                    .replace(DirtyBitmap::new(PAGES))
                    .unwrap_or_else(|| DirtyBitmap::all(PAGES));
                src.s.handle_dirty_log(now, &log);
            }
            SourceStep::SetThrottle(_) => {}
            SourceStep::SendPages { per_stream, .. } => self.send_pages(&per_stream),
            SourceStep::Pause => {
                self.vm.running = false;
                self.vm.at_pause = Some(self.vm.memory.clone());
                src.s.handle_paused(now);
            }
            SourceStep::SaveDeviceState => {
                let state = device_state(&self.vm.memory);
                self.vm.state_at_pause = Some(state.clone());
                src.s.handle_device_state(now, &state);
            }
            SourceStep::EndStreams => self.end_streams(),
            SourceStep::Resume if self.case.fail_source_resume => {
                src.s.handle_resumed(Err("the VMM would not resume".into()));
            }
            SourceStep::Resume => {
                self.vm.running = true;
                self.vm.next_write = now + ms(1);
                src.s.handle_resumed(Ok(()));
            }
            SourceStep::Read => {
                let (at, answer) = self.arbiter(None);
                self.schedule(at, Event::SourceAnswer(answer));
            }
            SourceStep::Ask(Transition::Commit) if self.case.refuse_commit => {
                let at = self.now + ARBITER_LATENCY;
                self.schedule(at, Event::SourceRefused("not a party".into()));
            }
            SourceStep::Ask(t) => {
                let (at, answer) = self.arbiter(Some(t));
                self.schedule(at, Event::SourceAnswer(answer));
            }
            SourceStep::Notify(t) => {
                let _ = self.arbiter(Some(t));
            }
            SourceStep::Transmit(t) => {
                let f = src
                    .control
                    .sealer
                    .seal(t.frame_type, t.payload)
                    .expect("seal");
                self.send(Wire::Control, f, 0);
            }
            SourceStep::FinishControl => {
                if let Ok(f) = src.control.sealer.seal_end_of_stream() {
                    self.send(Wire::Control, f, 0);
                }
            }
        }
    }

    fn send_pages(&mut self, per_stream: &[Vec<vmotion_engine::PageRange>]) {
        let src = self.src.as_mut().expect("a source");
        let mut frames = Vec::new();
        let (mut pages, mut bytes) = (0, 0);
        for (i, ranges) in per_stream.iter().enumerate() {
            let list: Vec<u64> = ranges.iter().flat_map(|r| r.start..r.end()).collect();
            for batch in list.chunks(PAGES_PER_FRAME) {
                let mut payload = Vec::with_capacity(batch.len() * 16);
                for &p in batch {
                    payload.extend_from_slice(&p.to_le_bytes());
                    payload.extend_from_slice(&self.vm.memory[p as usize].to_le_bytes());
                }
                let f = src.data[i].seal(FrameType::Pages, payload).expect("seal");
                frames.push((i, f, batch.len() as u64));
                pages += batch.len() as u64;
                bytes += batch.len() as u64 * PAGE;
            }
        }
        let mut done = self.now;
        let mut stalled = false;
        for (i, f, n) in frames {
            let wire = Wire::Data(u16::try_from(i + 1).expect("stream id"));
            match self.send(wire, f, n * PAGE) {
                Some(at) => done = done.max(at),
                None => stalled = true,
            }
        }
        if !stalled {
            self.schedule(done, Event::PagesSent { pages, bytes });
        }
    }

    fn end_streams(&mut self) {
        let src = self.src.as_mut().expect("a source");
        let mut totals = Vec::new();
        let mut ends = Vec::new();
        for (i, sealer) in src.data.iter_mut().enumerate() {
            totals.push(StreamTotals {
                frames: sealer.frames_sealed(),
                bytes: sealer.bytes_sealed(),
            });
            ends.push((i, sealer.seal_end_of_stream().expect("seal")));
        }
        let mut done = self.now;
        let mut stalled = false;
        for (i, f) in ends {
            match self.send(Wire::Data(u16::try_from(i + 1).expect("id")), f, 0) {
                Some(at) => done = done.max(at),
                None => stalled = true,
            }
        }
        if !stalled {
            self.schedule(done, Event::StreamsEnded(totals));
        }
    }

    /// Puts a frame on a wire through the tamper hook: when the sender is done with it, or
    /// `None` when the write never completes (a black hole).
    fn send(&mut self, wire: Wire, mut f: WireFrame, weight: u64) -> Option<Duration> {
        let index = self.frames;
        self.frames += 1;
        let frame_type = vmotion_proto::testing::header_of(&f).frame_type;
        let fate = if self.black_hole {
            Fate::BlackHole
        } else {
            (self.case.tamper)(wire, index, frame_type)
        };
        let link = self
            .links
            .iter_mut()
            .find(|l| l.wire == wire)
            .expect("a link");
        let cost = Duration::from_micros(weight.max(64) * 1000 / BANDWIDTH);
        link.busy_until = link.busy_until.max(self.now) + cost;
        let at = link.busy_until + LATENCY;
        let sent = Some(link.busy_until);
        match fate {
            Fate::Deliver => link.queue.push_back(Packet { at, frame: Some(f) }),
            Fate::Drop => {}
            Fate::Duplicate => {
                link.queue.push_back(Packet {
                    at,
                    frame: Some(f.clone()),
                });
                link.queue.push_back(Packet { at, frame: Some(f) });
            }
            Fate::Alter => {
                if let Some(b) = f.payload.first_mut() {
                    *b ^= 1;
                } else if let Some(b) = f.trailer.first_mut() {
                    *b ^= 1;
                }
                link.queue.push_back(Packet { at, frame: Some(f) });
            }
            Fate::Delay(d) => {
                // Behind it, everything on this wire waits too (one TCP connection).
                link.busy_until += d;
                link.queue.push_back(Packet {
                    at: at + d,
                    frame: Some(f),
                });
            }
            Fate::BlackHole => {
                self.black_hole = true;
                for l in &mut self.links {
                    l.queue.clear();
                }
                return None;
            }
            Fate::Cut => {
                self.cut_all();
                return sent;
            }
        }
        sent
    }

    fn event(&mut self, e: Event) {
        let now = self.now;
        match e {
            Event::SourceAnswer(a) => {
                if let Some(s) = self.src.as_mut() {
                    self.steps.0 += 1;
                    s.s.handle_answer(now, a);
                }
            }
            Event::SourceRefused(why) => {
                if let Some(s) = self.src.as_mut() {
                    self.steps.0 += 1;
                    s.s.handle_refused(now, why);
                }
            }
            Event::DestinationAnswer(a) => {
                if let Some(d) = self.dst.as_mut() {
                    self.steps.1 += 1;
                    d.s.handle_answer(now, a);
                }
            }
            Event::RestartAnswer(a) => {
                if let Some(r) = self.restarted.as_mut() {
                    r.handle_answer(now, a);
                }
            }
            Event::PagesSent { pages, bytes } => {
                if let Some(s) = self.src.as_mut() {
                    self.steps.0 += 1;
                    s.s.handle_pages_sent(now, pages, bytes);
                }
            }
            Event::StreamsEnded(totals) => {
                if let Some(s) = self.src.as_mut() {
                    self.steps.0 += 1;
                    s.s.handle_streams_ended(now, totals, 0);
                }
            }
            Event::Restart => {
                self.restarted = Some(DestinationClaim::settle(now, self.claim));
            }
        }
    }

    /// A frame (or the connection's end) arrives.
    fn arrive(&mut self, wire: Wire, frame: Option<WireFrame>) {
        match wire {
            Wire::Back => self.arrive_at_source(frame),
            Wire::Control => self.arrive_control(frame),
            Wire::Data(id) => self.arrive_data(id, frame),
        }
    }

    fn arrive_at_source(&mut self, frame: Option<WireFrame>) {
        let now = self.now;
        let Some(src) = self.src.as_mut() else { return };
        self.steps.0 += 1;
        let Some(mut f) = frame else {
            return src.s.handle_control_lost(now, "the connection was reset");
        };
        match src.control.opener.open(&mut f) {
            Err(e) => {
                if let Some(e) = misbehaved(e) {
                    src.s.handle_misbehaved(now, e);
                }
            }
            Ok(h) if h.frame_type == FrameType::EndOfStream => {
                src.s
                    .handle_control_lost(now, "the destination ended the control stream");
            }
            Ok(h) if h.frame_type == FrameType::Abort => match Abort::decode(&f.payload) {
                Ok(a) => src.s.handle_peer_abort(now, &a),
                Err(e) => src.s.handle_misbehaved(now, e),
            },
            Ok(h) => src.s.handle_frame(now, h.frame_type, &f.payload),
        }
    }

    fn arrive_control(&mut self, frame: Option<WireFrame>) {
        let now = self.now;
        let Some(dst) = self.dst.as_mut() else { return };
        self.steps.1 += 1;
        let Some(mut f) = frame else {
            return dst.s.handle_control_lost(now, "the connection was reset");
        };
        match dst.control.open(&mut f) {
            Err(e) => {
                if let Some(e) = misbehaved(e) {
                    dst.s.handle_misbehaved(now, e);
                }
            }
            Ok(h) if h.frame_type == FrameType::EndOfStream => {
                dst.s
                    .handle_control_lost(now, "the source ended the control stream");
            }
            Ok(h) if h.frame_type == FrameType::Abort => match Abort::decode(&f.payload) {
                Ok(a) => dst.s.handle_peer_abort(now, &a),
                Err(e) => dst.s.handle_misbehaved(now, e),
            },
            Ok(h) => dst.s.handle_frame(now, h.frame_type, &f.payload),
        }
    }

    fn arrive_data(&mut self, id: u16, frame: Option<WireFrame>) {
        let now = self.now;
        let Some(dst) = self.dst.as_mut() else { return };
        self.steps.1 += 1;
        let i = usize::from(id - 1);
        let Some(mut f) = frame else {
            return dst.s.handle_failure(
                vmotion_proto::AbortCode::Truncated,
                format!("data stream {id} was reset"),
            );
        };
        let h = match dst.data[i].open(&mut f) {
            Ok(h) => h,
            Err(e) => {
                if let Some(e) = misbehaved(e) {
                    dst.s.handle_stream_misbehaved(e);
                }
                return;
            }
        };
        if h.frame_type == FrameType::EndOfStream {
            return dst.s.handle_stream_ended(now, id, dst.stats[i]);
        }
        for rec in f.payload.chunks_exact(16) {
            let page = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let value = u64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            dst.memory[page as usize] = value;
            dst.received[page as usize] = true;
            dst.stats[i].pages += 1;
        }
        dst.stats[i].frames += 1;
        dst.stats[i].bytes += f.payload.len() as u64;
        dst.s.handle_activity(now);
    }

    fn destination_step(&mut self, a: DestinationStep) {
        let now = self.now;
        self.steps.1 += 1;
        let dst = self.dst.as_mut().expect("a destination");
        match a {
            DestinationStep::CountMissing => {
                let missing = dst.received.iter().filter(|r| !**r).count() as u64;
                dst.s.handle_missing(now, missing);
            }
            DestinationStep::LoadAndPersist(_) if self.case.fail_persist => {
                dst.s
                    .handle_persisted(now, Err("no space left on device".into()));
            }
            DestinationStep::LoadAndPersist(state) => {
                self.disk = Some(Disk {
                    memory: dst.memory.clone(),
                    state,
                });
                dst.s.handle_persisted(now, Ok(()));
            }
            DestinationStep::Transmit(t) => {
                let f = dst.back.seal(t.frame_type, t.payload).expect("seal");
                self.send(Wire::Back, f, 0);
            }
            DestinationStep::FinishControl => {
                if let Ok(f) = dst.back.seal_end_of_stream() {
                    self.send(Wire::Back, f, 0);
                }
            }
            DestinationStep::Read => {
                let (at, answer) = self.arbiter(None);
                self.schedule(at, Event::DestinationAnswer(answer));
            }
            DestinationStep::Ask(t) => {
                let (at, answer) = self.arbiter(Some(t));
                self.schedule(at, Event::DestinationAnswer(answer));
            }
            DestinationStep::Resume if self.case.fail_destination_resume => {
                dst.s.handle_resumed(Err("the VMM would not resume".into()));
            }
            DestinationStep::Resume => {
                self.resume_destination();
                let dst = self.dst.as_mut().expect("a destination");
                dst.s.handle_resumed(Ok(()));
            }
            DestinationStep::Discard => self.disk = None,
        }
    }

    fn restart_step(&mut self, a: DestinationAction) {
        let now = self.now;
        match a {
            DestinationAction::Read => {
                let (at, answer) = self.arbiter(None);
                self.schedule(at, Event::RestartAnswer(answer));
            }
            DestinationAction::Ask(t) => {
                let (at, answer) = self.arbiter(Some(t));
                self.schedule(at, Event::RestartAnswer(answer));
            }
            DestinationAction::SendClaimed => {}
            DestinationAction::Resume => {
                self.resume_destination();
                let r = self.restarted.as_mut().expect("restarted");
                r.handle_resumed(Ok(()));
            }
            DestinationAction::Discard => self.disk = None,
        }
        let _ = now;
    }

    fn resume_destination(&mut self) {
        let disk = self.disk.as_ref().expect("a persisted guest to resume");
        self.dst_memory = Some((disk.memory.clone(), disk.state.clone()));
        self.dst_running = true;
    }
}

/// The device state: a digest of the memory at the pause, and padding.
fn device_state(memory: &[u64]) -> Vec<u8> {
    let sum: u64 = memory
        .iter()
        .fold(0, |a, v| a.wrapping_mul(31).wrapping_add(*v));
    let mut s = sum.to_le_bytes().to_vec();
    s.resize(DEVICE_STATE, 0xab);
    s
}

/// Why a frame did not open; `None` for a connection whose reader already gave up on it
/// (a real driver stops reading there).
fn misbehaved(e: vmotion_proto::Error) -> Option<PeerMisbehaved> {
    match e {
        vmotion_proto::Error::PeerMisbehaved(p) => Some(p),
        vmotion_proto::Error::ApiMisuse(_) => None,
        other => panic!("opening a frame failed with {other}"),
    }
}

/// The source's error, if it aborted.
pub(crate) fn source_error(e: &Ending) -> Option<&SessionError> {
    match &e.source {
        Some(SourceEnd::Aborted { error, .. }) => Some(error),
        _ => None,
    }
}

/// The destination's error, if it failed before `Ready`.
pub(crate) fn destination_error(e: &Ending) -> Option<&SessionError> {
    match &e.destination {
        Some(DestinationEnd::Failed(error)) => Some(error),
        _ => None,
    }
}

/// The source ended knowing the destination claimed the VM.
pub(crate) fn source_saw_claim(e: &Ending) -> bool {
    matches!(e.source, Some(SourceEnd::Committed(SourceOutcome::Claimed)))
}
