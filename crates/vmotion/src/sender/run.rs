//! The source's migration after the handshake: [`SourceSession`] decides (the engine's
//! steps, the control frames, every check and deadline, the claim step); this file
//! carries out its steps on the data streams, the control connection, the VM and the
//! arbiter, and feeds it what they say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use vmotion_authority::{Arbiter, ArbiterError};
use vmotion_engine::{AbortReason, ConvergencePolicy, EngineConfig, PageRange};
use vmotion_mover::{DirtyTracking, GuestMemory, Source};
use vmotion_proto::message::{Abort, StreamTotals};
use vmotion_proto::{AbortCode, FrameType, MigrationId, Mode, SenderSession};
use vmotion_session::{
    Answer, ClaimConfig, SessionError, SourceConfig, SourceEnd, SourceOutcome, SourceSession,
    SourceStep,
};

use super::streams::{Job, StreamConfig, Tasks, stream_task};
use super::{NetOptions, Progress, ProgressFn, Stage, connect_within};
use crate::activity::Activity;
use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::error::MigrateError;
use crate::report::{ClaimEvidence, MigrationReport};
use crate::transport::{Conn, Endpoint};
use crate::wire::write_frame;

/// What the builder decided, for the run.
pub(super) struct Settings {
    pub(super) vm_name: String,
    pub(super) streams: u16,
    pub(super) convergence: ConvergencePolicy,
    pub(super) switchover_timeout: Duration,
    pub(super) chunk_pages: u64,
    pub(super) batch_bytes: usize,
    pub(super) max_bandwidth: Option<u64>,
    pub(super) progress: Option<ProgressFn>,
    pub(super) progress_timeout: Duration,
    pub(super) claim_timeout: Duration,
    pub(super) net: NetOptions,
    /// The destination claims the VM at the arbiter (it can reach it). False without an
    /// arbiter, or with a destination the key service does not know (it has none to claim
    /// at): then `Commit` decides and `Claimed` is the only proof.
    pub(super) claim_at_arbiter: bool,
    /// No key at all (`KeySource::None`), for the report.
    pub(super) keyless: bool,
}

/// One migration at the source, established.
pub(super) struct Run<'a> {
    s: Settings,
    id: MigrationId,
    mode: Mode,
    m: SourceSession,
    source: &'a mut dyn Source,
    memory: Arc<dyn GuestMemory>,
    arbiter: Option<Arc<dyn Arbiter>>,
    out: ControlWriter,
    reader: ControlReader,
    listening: bool,
    streams: Vec<mpsc::Sender<Job>>,
    activity: Arc<Activity>,
    _tasks: Tasks,
    t0: Instant,
    started: Instant,
    setup: Duration,
    claim_started: Option<Instant>,
    /// A local failure's own error (richer than the machine's sentence).
    local: Option<MigrateError>,
}

/// A data stream's task ended early (its error went to the reader, or it was cut).
fn stream_ended() -> MigrateError {
    MigrateError::ConnectionClosed {
        during: "sending on a data stream",
    }
}

impl<'a> Run<'a> {
    /// Opens the data streams of an established session and starts the machine. A
    /// failure here is reported to the receiver, with the receiver's own reason preferred
    /// when it refused (its pre-flight runs once the sender is authenticated).
    pub(super) async fn start(
        session: (SenderSession, Conn),
        to: &Endpoint,
        s: Settings,
        source: &'a mut dyn Source,
        arbiter: Option<Arc<dyn Arbiter>>,
        id: MigrationId,
        started: Instant,
    ) -> Result<Self, MigrateError> {
        let (mut session, conn) = session;
        let negotiated = session.negotiated().clone();
        tracing::info!(mode = ?negotiated.mode, streams = s.streams, "handshake done");
        let control = session.take_control()?;
        let (r, w) = conn.into_split();
        let mut out = ControlWriter::new(w, control.sealer, s.progress_timeout);
        let mut reader = ControlReader::spawn(r, control.opener);
        let memory = source.memory();
        let max_payload = (negotiated.max_payload as usize).min(s.batch_bytes + 64 * 1024);
        let activity = Arc::new(Activity::new());
        let opened = open_streams(&mut session, to, &s, &memory, max_payload, &activity).await;
        let (streams, tasks) = match opened {
            Ok(x) => x,
            Err(e) => {
                let e = peer_reason(&mut reader, e).await;
                out.abort_for(&e, AbortCode::SourceFailed).await;
                return Err(e);
            }
        };
        let encrypted = matches!(negotiated.mode, Mode::Encrypted(_));
        let cfg = machine_config(&s, &*memory, source, &out, arbiter.is_some(), encrypted);
        let m = SourceSession::new(Duration::ZERO, cfg);
        Ok(Self {
            id,
            mode: negotiated.mode,
            m,
            source,
            memory,
            arbiter,
            out,
            reader,
            listening: true,
            streams,
            activity,
            _tasks: tasks,
            t0: Instant::now(),
            started,
            setup: started.elapsed(),
            claim_started: None,
            local: None,
            s,
        })
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Runs the machine to its end.
    pub(super) async fn drive(mut self) -> Result<MigrationReport, MigrateError> {
        loop {
            while let Some(step) = self.m.poll_action() {
                let stage = stage_of(&step, &self.m);
                self.step(step).await;
                // Progress only for steps that went through.
                if let Some(stage) = stage
                    && !self.m.failed()
                {
                    self.report_progress(stage);
                }
            }
            if self.m.outcome().is_some() {
                break;
            }
            if self.m.poll_timeout().is_none() && !self.listening {
                let now = self.now();
                self.m.handle_control_lost(now, "nothing left to wait for");
                continue;
            }
            self.next_input().await;
        }
        self.out.finish().await;
        self.conclude()
    }

    /// Runs `work` while feeding the machine the control connection and its timer;
    /// gives up on `work` (drops it) as soon as the machine stops waiting for it.
    async fn with_inputs<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        let waiting = self.m.awaiting();
        loop {
            tokio::select! {
                r = &mut work => return Some(r),
                () = self.next_input() => {}
            }
            if self.m.awaiting() != waiting || self.m.outcome().is_some() {
                return None;
            }
        }
    }

    /// Waits for one input — a control event or the machine's timer — and feeds it.
    async fn next_input(&mut self) {
        let due = self.m.poll_timeout();
        let t0 = self.t0;
        let timer = async move {
            match due {
                Some(at) => tokio::time::sleep_until((t0 + at).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = self.reader.next(), if self.listening => self.control(event),
            () = timer => {
                let last = self.activity.last().saturating_duration_since(self.t0);
                self.m.handle_activity(last);
                let now = self.now();
                self.m.handle_timeout(now);
            }
        }
    }

    fn control(&mut self, event: ControlEvent) {
        let now = self.now();
        crate::control::feed(&mut self.m, now, event, &mut self.listening);
    }

    /// A step failed here. A failure on the network is often the receiver giving up: if
    /// its `Abort` arrives at once, its reason is the better one.
    async fn failed(&mut self, e: MigrateError) {
        let t0 = self.t0;
        let network = crate::control::is_network(&e);
        let (reader, listening, m) = (&mut self.reader, &mut self.listening, &mut self.m);
        if crate::control::peer_abort_behind(reader, listening, network, m, || t0.elapsed()).await {
            return;
        }
        tracing::warn!(error = %e, "migration step failed");
        let now = self.now();
        self.m
            .handle_failure(now, e.abort_code(AbortCode::SourceFailed), e.to_string());
        self.local.get_or_insert(e);
    }

    /// Carries out one step of the machine.
    async fn step(&mut self, step: SourceStep) {
        let now = self.now();
        match step {
            SourceStep::StartDirtyLog | SourceStep::StopDirtyLog | SourceStep::FetchDirtyLog => {
                self.dirty_log(&step)
            }
            SourceStep::SetThrottle(p) => {
                if let Err(e) = self.source.control().throttle(p) {
                    self.failed(e.into()).await;
                }
            }
            SourceStep::SendPages { per_stream, .. } => self.send_pages(per_stream).await,
            SourceStep::Pause => match self.source.control().pause() {
                Ok(()) => self.m.handle_paused(now),
                Err(e) => self.failed(e.into()).await,
            },
            SourceStep::SaveDeviceState => match self.source.control().save_device_state() {
                Ok(state) => self.m.handle_device_state(now, &state),
                Err(e) => self.failed(e.into()).await,
            },
            SourceStep::EndStreams => self.end_streams().await,
            SourceStep::Resume => {
                let r = self.source.control().resume().map_err(|e| e.to_string());
                self.m.handle_resumed(r);
            }
            SourceStep::Read => self.ask(None).await,
            SourceStep::Ask(t) => self.ask(Some(t)).await,
            SourceStep::Notify(t) => {
                let a = self.arbiter.clone();
                if let Some(a) = a
                    && let Err(e) = crate::claim::record(&*a, self.id, Some(t)).await
                {
                    tracing::warn!(step = %t, error = %e, "could not record");
                }
            }
            SourceStep::Transmit(t) => self.transmit(t.frame_type, t.payload).await,
            SourceStep::FinishControl => self.out.finish().await,
        }
    }

    fn dirty_log(&mut self, step: &SourceStep) {
        let now = self.now();
        let DirtyTracking::Supported(log) = self.source.dirty_tracking() else {
            if matches!(step, SourceStep::FetchDirtyLog) {
                self.m.handle_failure(
                    now,
                    AbortCode::InternalError,
                    "the dirty log vanished".into(),
                );
            }
            return;
        };
        let r = match step {
            SourceStep::StartDirtyLog => log.start(),
            SourceStep::StopDirtyLog => log.stop(),
            _ => match log.fetch_and_clear() {
                Ok(dirty) => {
                    self.m.handle_dirty_log(now, &dirty);
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            self.m
                .handle_failure(now, AbortCode::SourceFailed, e.to_string());
            self.local.get_or_insert(e.into());
        }
    }

    /// Asks the arbiter (bounded); the answer goes to the machine. A refusal (the step
    /// took no effect and never will) is told apart from no answer.
    async fn ask(&mut self, t: Option<vmotion_session::Transition>) {
        let (a, id) = (self.arbiter.clone(), self.id);
        let request = async move {
            match a {
                Some(a) => crate::claim::record(&*a, id, t).await,
                None => Err(ArbiterError::Unreachable("there is no arbiter".into())),
            }
        };
        let Some(answer) = self.with_inputs(request).await else {
            return;
        };
        if let Some(t) = t {
            tracing::info!(step = %t, ?answer, "arbiter");
        }
        let now = self.now();
        match answer {
            Ok(r) => self.m.handle_answer(now, Answer::Record(r)),
            Err(ArbiterError::Refused(why)) => self.m.handle_refused(now, why),
            Err(e) => self
                .m
                .handle_answer(now, Answer::Unreachable(e.to_string())),
        }
    }

    /// Sends a control frame; an `Abort` within its short deadline. `Commit` starts the
    /// claim step's clock. After the pause a write is bounded by the switchover deadline
    /// too (a black-holed control path must not keep the VM paused longer); a write that
    /// fails is often the destination giving up, and its `Abort` says why.
    async fn transmit(&mut self, frame_type: FrameType, payload: Vec<u8>) {
        if frame_type == FrameType::Abort {
            if let Ok(a) = Abort::decode(&payload) {
                self.out.abort(a.code, &a.message).await;
            }
            return;
        }
        if frame_type == FrameType::Commit {
            self.claim_started = Some(Instant::now());
        }
        let deadline = self.m.switchover_deadline();
        let write = self.out.send(frame_type, payload);
        let result = match deadline {
            Some(d) => tokio::time::timeout_at((self.t0 + d).into(), write).await,
            None => Ok(write.await),
        };
        let now = self.now();
        match result {
            Ok(Ok(())) => {}
            // The switchover deadline passed mid-write: the machine aborts.
            Err(_) => self.m.handle_timeout(now),
            Ok(Err(e)) => {
                tracing::warn!(frame = ?frame_type, error = %e, "a control frame did not reach the destination");
                let t0 = self.t0;
                let network = crate::control::is_network(&e);
                let (reader, listening, m) = (&mut self.reader, &mut self.listening, &mut self.m);
                if !crate::control::peer_abort_behind(reader, listening, network, m, || {
                    t0.elapsed()
                })
                .await
                {
                    self.m.handle_control_lost(now, &e.to_string());
                }
            }
        }
    }

    /// One batch of pages, each stream's share on its stream. A word from the receiver
    /// (an `Abort`) ends the wait at once, however blocked a data write is.
    async fn send_pages(&mut self, per_stream: Vec<Vec<PageRange>>) {
        let streams = self.streams.clone();
        let work = async move {
            let mut waits = Vec::new();
            for (tx, ranges) in streams.iter().zip(per_stream) {
                let (done, wait) = oneshot::channel();
                tx.send(Job::Pages { ranges, done })
                    .await
                    .map_err(|_| stream_ended())?;
                waits.push(wait);
            }
            let (mut pages, mut bytes) = (0, 0);
            for w in waits {
                let (p, b) = w.await.map_err(|_| stream_ended())??;
                pages += p;
                bytes += b;
            }
            Ok::<_, MigrateError>((pages, bytes))
        };
        match self.with_inputs(work).await {
            Some(Ok((pages, bytes))) => {
                let now = self.now();
                self.m.handle_pages_sent(now, pages, bytes);
            }
            Some(Err(e)) => self.failed(e).await,
            None => {}
        }
    }

    /// Ends every data stream with its `EndOfStream`; their totals go into `Complete`.
    async fn end_streams(&mut self) {
        let streams = self.streams.clone();
        let work = async move {
            let mut totals: Vec<StreamTotals> = Vec::new();
            let mut max_epoch = 0;
            for tx in &streams {
                let (done, wait) = oneshot::channel();
                tx.send(Job::End { done })
                    .await
                    .map_err(|_| stream_ended())?;
                let (t, epoch) = wait.await.map_err(|_| stream_ended())??;
                max_epoch = max_epoch.max(epoch);
                totals.push(t);
            }
            Ok::<_, MigrateError>((totals, max_epoch))
        };
        match self.with_inputs(work).await {
            Some(Ok((totals, epoch))) => {
                let now = self.now();
                self.m.handle_streams_ended(now, totals, epoch);
            }
            Some(Err(e)) => self.failed(e).await,
            None => {}
        }
    }

    /// The machine's end, as the caller's result.
    fn conclude(mut self) -> Result<MigrationReport, MigrateError> {
        let end = self.m.outcome().cloned();
        match end {
            Some(SourceEnd::Committed(SourceOutcome::Claimed)) => {
                self.report_progress(Stage::Done);
                Ok(self.report())
            }
            Some(SourceEnd::Committed(SourceOutcome::Reverted)) => {
                Err(MigrateError::Reverted(format!(
                    "no claim from the destination within {:?} of Commit",
                    self.s.claim_timeout
                )))
            }
            Some(SourceEnd::Committed(SourceOutcome::RevertedNotResumed(e))) => {
                Err(MigrateError::ResumeFailed(e))
            }
            Some(SourceEnd::Committed(SourceOutcome::Unknown(why))) => {
                Err(MigrateError::OutcomeUnknown(format!(
                    "{why}; the VM is left PAUSED at the source: it runs at the destination \
                     if the arbiter's record of migration {} says `claimed`, and may be \
                     resumed here only once it says `reverted`",
                    self.id
                )))
            }
            Some(SourceEnd::CommitUnknown(_)) => Err(MigrateError::OutcomeUnknown(format!(
                "the commit of migration {id} could be neither recorded nor read back; the VM \
                 is left PAUSED at the source. Read `GET /v1/migrations/{id}/outcome` at the \
                 key service: resume the source only after recording `aborted` there",
                id = self.id
            ))),
            Some(SourceEnd::Aborted {
                resume_failed: Some(e),
                ..
            }) => Err(MigrateError::ResumeFailed(e)),
            Some(SourceEnd::Aborted { error, .. }) => Err(self.abort_error(error)),
            None => Err(MigrateError::Internal("the session ended undecided".into())),
        }
    }

    /// Why an aborted migration aborted: this side's own error for a local failure, the
    /// engine's limit for its own decisions, else the machine's reason.
    fn abort_error(&mut self, error: SessionError) -> MigrateError {
        match (error, self.local.take()) {
            (SessionError::Local { .. }, Some(local)) => local,
            (SessionError::Engine(why), _) => {
                engine_abort(self.m.report().abort_reason.as_ref(), why)
            }
            (other, _) => crate::error::from_session(other),
        }
    }

    fn report(&self) -> MigrationReport {
        let evidence = if self.s.claim_at_arbiter {
            ClaimEvidence::Arbiter
        } else {
            ClaimEvidence::Destination
        };
        let totals = self.m.totals();
        let claim = self.claim_started.map(|t| t.elapsed()).unwrap_or_default();
        let mut done = MigrationReport::new(
            self.id,
            &self.s.vm_name,
            self.mode,
            self.s.streams,
            self.m.report().clone(),
            totals.bytes,
            totals.max_epoch,
            self.started.elapsed(),
            self.setup,
            (evidence, claim),
        );
        done.keyless = self.s.keyless;
        done
    }

    /// Progress after each step that changes what a person would want to see.
    fn report_progress(&self, stage: Stage) {
        let Some(progress) = &self.s.progress else {
            return;
        };
        let engine = self.m.engine();
        let r = engine.report();
        let last = r.iterations.last();
        let page = self.memory.page_size();
        let guest_bytes = self.memory.page_count() * page;
        let sent = self.m.totals().bytes;
        let remaining_bytes = match (stage, last) {
            (Stage::Done, _) => 0,
            (_, Some(it)) if it.dirty_after > 0 || r.iterations.len() > 1 => it.dirty_after * page,
            (_, Some(_)) => 0,
            (_, None) => guest_bytes.saturating_sub(sent),
        };
        let throughput = last.and_then(|it| it.bandwidth()).unwrap_or(0.0);
        (progress.0)(&Progress {
            stage,
            iteration: u32::try_from(r.iterations.len()).unwrap_or(u32::MAX),
            bytes_sent: sent,
            guest_bytes,
            remaining_bytes,
            dirty_rate_pages: last.and_then(|it| it.dirty_rate()).unwrap_or(0.0),
            throughput,
            throttle_percent: engine.throttle_percent(),
            elapsed: self.started.elapsed(),
            eta: (throughput > 0.0)
                .then(|| Duration::from_secs_f64(remaining_bytes as f64 / throughput)),
        });
    }
}

/// The session machine's configuration, from the builder's settings.
fn machine_config(
    s: &Settings,
    memory: &dyn GuestMemory,
    source: &mut dyn Source,
    out: &ControlWriter,
    arbiter: bool,
    encrypted: bool,
) -> SourceConfig {
    SourceConfig {
        engine: EngineConfig {
            guest_pages: memory.page_count(),
            page_size: memory.page_size(),
            policy: s.convergence,
            dirty_tracking: matches!(source.dirty_tracking(), DirtyTracking::Supported(_)),
            switchover_timeout: s.switchover_timeout,
            device_state_estimate: 64 * 1024,
        },
        streams: s.streams,
        chunk_pages: s.chunk_pages,
        device_state_chunk: out.max_payload() as usize - 16,
        progress_timeout: s.progress_timeout,
        arbiter,
        claim: ClaimConfig {
            arbiter: s.claim_at_arbiter,
            peer_timeout: s.claim_timeout,
            authenticated: encrypted,
            ..ClaimConfig::default()
        },
    }
}

/// The stage a person sees after `step`.
fn stage_of(step: &SourceStep, m: &SourceSession) -> Option<Stage> {
    match step {
        SourceStep::FetchDirtyLog if !m.paused() => Some(Stage::PreCopy),
        SourceStep::Pause | SourceStep::SaveDeviceState => Some(Stage::StopAndCopy),
        SourceStep::EndStreams => Some(Stage::Switchover),
        _ => None,
    }
}

/// The error for an abort the engine decided itself.
fn engine_abort(reason: Option<&AbortReason>, why: String) -> MigrateError {
    match reason {
        Some(AbortReason::Limit(l)) => MigrateError::DidNotConverge(format!("{l:?}")),
        Some(AbortReason::SwitchoverTimeout) => MigrateError::Timeout {
            waiting_for: "Ready within the switchover timeout",
            after: Duration::ZERO,
        },
        Some(AbortReason::OutcomeNotRecorded) => MigrateError::CommitRefused,
        Some(AbortReason::Failure(m)) => MigrateError::Internal(m.clone()),
        None => MigrateError::Internal(why),
    }
}

/// A step failed on the network before the machine ran: if the receiver said why (an
/// `Abort` arriving at once), its reason is the better error.
async fn peer_reason(reader: &mut ControlReader, e: MigrateError) -> MigrateError {
    if !matches!(
        e,
        MigrateError::Io(_) | MigrateError::ConnectionClosed { .. } | MigrateError::Timeout { .. }
    ) {
        return e;
    }
    match tokio::time::timeout(Duration::from_millis(500), reader.next()).await {
        Ok(event @ ControlEvent::Abort(_)) => event.into_error("migrating"),
        _ => e,
    }
}

/// One TCP (or Unix) connection per data stream, each bound by its `StreamBind`, each
/// with its task.
async fn open_streams(
    session: &mut SenderSession,
    to: &Endpoint,
    s: &Settings,
    memory: &Arc<dyn GuestMemory>,
    max_payload: usize,
    activity: &Arc<Activity>,
) -> Result<(Vec<mpsc::Sender<Job>>, Tasks), MigrateError> {
    let mut streams = Vec::new();
    let mut tasks = Tasks(Vec::new());
    for id in 1..=s.streams {
        let (bind, channel) = session.open_data_stream(id)?;
        let conn = connect_within(to, s.net, "a data connection").await?;
        let (_r, mut w) = conn.into_split();
        write_frame(&mut w, &bind).await?;
        let (tx, rx) = mpsc::channel(2);
        let cfg = StreamConfig {
            page_size: memory.page_size() as usize,
            max_payload,
            bytes_per_second: s.max_bandwidth.map(|b| b as f64 / f64::from(s.streams)),
            write_timeout: s.progress_timeout,
            activity: activity.clone(),
        };
        tasks.0.push(tokio::spawn(
            stream_task(w, channel.sealer, memory.clone(), rx, cfg).in_current_span(),
        ));
        streams.push(tx);
    }
    Ok((streams, tasks))
}
