//! The source's migration after the handshake: the engine's actions carried out on the
//! data streams, the control connection and the VM; then the claim step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use vmotion_authority::{Arbiter, ArbiterError, Record, Transition};
use vmotion_engine::bitmap::{split_at_chunks, stream_for};
use vmotion_engine::{Action, ConvergencePolicy, EngineConfig, Outcome, PageRange, SenderEngine};
use vmotion_mover::{DirtyTracking, GuestMemory, Source};
use vmotion_proto::message::{
    Complete, DeviceStateChunk, IterationMarker, MarkerKind, Message, StreamTotals,
};
use vmotion_proto::{AbortCode, FrameType, MigrationId, Mode, PeerMisbehaved, SenderSession};
use vmotion_session::{ClaimConfig, SourceOutcome};

use super::streams::{Job, StreamConfig, Tasks, stream_task};
use super::{NetOptions, Progress, ProgressFn, Stage, abort_message, abort_record, connect_within};
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

/// Counted as the migration goes.
#[derive(Default)]
struct Totals {
    pages: u64,
    bytes: u64,
    device_state_len: u64,
    max_epoch: u32,
}

/// One migration at the source, established.
pub(super) struct Run<'a> {
    s: Settings,
    id: MigrationId,
    mode: Mode,
    source: &'a mut dyn Source,
    memory: Arc<dyn GuestMemory>,
    arbiter: Option<Arc<dyn Arbiter>>,
    out: ControlWriter,
    reader: ControlReader,
    streams: Vec<mpsc::Sender<Job>>,
    _tasks: Tasks,
    engine: SenderEngine,
    t0: Instant,
    started: Instant,
    setup: Duration,
    totals: Totals,
    /// `pause` was called (it may have stopped the VM partway even if it failed).
    paused: bool,
    ready_seen: bool,
    first_error: Option<MigrateError>,
}

/// A data stream's task ended early (its error went to the reader, or it was cut).
fn stream_ended() -> MigrateError {
    MigrateError::ConnectionClosed {
        during: "sending on a data stream",
    }
}

/// Keeps an error, letting the ones about the VM's state win: the caller must learn
/// that the VM is paused or failed to resume, whatever else went wrong.
fn keep(first: &mut Option<MigrateError>, e: MigrateError) {
    let critical = |e: &MigrateError| {
        matches!(
            e,
            MigrateError::OutcomeUnknown(_) | MigrateError::ResumeFailed(_)
        )
    };
    if first.is_none() || (critical(&e) && !first.as_ref().is_some_and(critical)) {
        *first = Some(e);
    }
}

impl<'a> Run<'a> {
    /// Opens the data streams of an established session and starts the engine. A failure
    /// here is reported to the receiver, with the receiver's own reason preferred when it
    /// refused (its pre-flight runs once the sender is authenticated).
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
        let (streams, tasks) = match open_streams(&mut session, to, &s, &memory, max_payload).await
        {
            Ok(x) => x,
            Err(e) => {
                let e = peer_reason(&mut reader, e).await;
                out.abort_for(&e, AbortCode::SourceFailed).await;
                return Err(e);
            }
        };
        let dirty_tracking = matches!(source.dirty_tracking(), DirtyTracking::Supported(_));
        let engine = SenderEngine::new(
            EngineConfig {
                guest_pages: memory.page_count(),
                page_size: memory.page_size(),
                policy: s.convergence,
                dirty_tracking,
                switchover_timeout: s.switchover_timeout,
                device_state_estimate: 64 * 1024,
            },
            Duration::ZERO,
        );
        Ok(Self {
            s,
            id,
            mode: negotiated.mode,
            source,
            memory,
            arbiter,
            out,
            reader,
            streams,
            _tasks: tasks,
            engine,
            t0: Instant::now(),
            started,
            setup: started.elapsed(),
            totals: Totals::default(),
            paused: false,
            ready_seen: false,
            first_error: None,
        })
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Runs the engine to its end, then the claim step.
    pub(super) async fn drive(mut self) -> Result<MigrationReport, MigrateError> {
        loop {
            // The receiver may end the migration at any time (an Abort, a lost control
            // connection): notice it between steps, not only while waiting.
            if !self.ready_seen
                && let Ok(event) = self.reader.events.try_recv()
            {
                let e = event.into_error("migrating (sender), before Complete");
                tracing::warn!(error = %e, "the receiver ended the migration");
                self.fail(e);
            }
            let Some(action) = self.engine.poll_action() else {
                break;
            };
            let stage = stage_of(&action, &self.engine);
            let result = match self.engine.switchover_deadline() {
                None => self.step(action).await,
                Some(d) => {
                    let at = tokio::time::Instant::from_std(self.t0 + d);
                    match tokio::time::timeout_at(at, self.step(action)).await {
                        Ok(r) => r,
                        Err(_) => {
                            let now = self.now();
                            self.engine.handle_tick(now);
                            Err(MigrateError::Timeout {
                                waiting_for: "the switchover to finish after the pause",
                                after: self.s.switchover_timeout,
                            })
                        }
                    }
                }
            };
            match result {
                Ok(()) => {
                    if let Some(stage) = stage {
                        self.report_progress(stage);
                    }
                }
                Err(e) => {
                    let e = peer_reason(&mut self.reader, e).await;
                    tracing::warn!(error = %e, "migration step failed");
                    self.fail(e);
                }
            }
        }
        self.conclude().await
    }

    fn fail(&mut self, e: MigrateError) {
        let now = self.now();
        self.engine.handle_failure(now, e.to_string());
        keep(&mut self.first_error, e);
    }

    /// Carries out one engine action.
    async fn step(&mut self, action: Action) -> Result<(), MigrateError> {
        match action {
            Action::StartDirtyLog => {
                if let DirtyTracking::Supported(log) = self.source.dirty_tracking() {
                    log.start()?;
                }
            }
            Action::StopDirtyLog => {
                if let DirtyTracking::Supported(log) = self.source.dirty_tracking() {
                    log.stop()?;
                }
            }
            Action::FetchDirtyLog => {
                let DirtyTracking::Supported(log) = self.source.dirty_tracking() else {
                    return Err(MigrateError::Internal("the dirty log vanished".into()));
                };
                let dirty = log.fetch_and_clear()?;
                self.engine.handle_dirty_log(self.t0.elapsed(), &dirty)?;
            }
            Action::SendPages {
                iteration, ranges, ..
            } => self.send_pages(iteration, ranges).await?,
            Action::SetThrottle(p) => self.source.control().throttle(p)?,
            Action::Pause => self.pause().await?,
            // Resume only what was paused: an abort before the pause leaves a running VM.
            Action::Resume if self.paused => self
                .source
                .control()
                .resume()
                .map_err(|e| MigrateError::ResumeFailed(e.to_string()))?,
            Action::Resume => {}
            Action::SendDeviceState => self.send_device_state().await?,
            Action::SendComplete => self.complete().await?,
            Action::RecordOutcome(Outcome::Committed) => {
                let recorded = self.record_committed().await?;
                self.engine
                    .handle_outcome_recorded(self.t0.elapsed(), recorded)?;
            }
            Action::RecordOutcome(Outcome::Aborted) => {
                abort_record(self.arbiter.as_deref(), self.id).await;
            }
            Action::SendCommit => {
                // The commit point has passed: a lost Commit is settled by the claim step,
                // never a reason to resume here.
                let commit = vmotion_proto::message::Commit {
                    claim_at_arbiter: self.s.claim_at_arbiter,
                };
                match self.out.send(FrameType::Commit, commit.encode()).await {
                    Ok(()) => self.out.finish().await,
                    Err(e) => tracing::warn!(error = %e, "Commit not delivered"),
                }
            }
            Action::SendAbort(reason) => {
                let (code, message) = abort_message(&reason);
                self.out.abort(code, &message).await;
            }
        }
        Ok(())
    }

    /// One pre-copy iteration (or the final pass): pages split at chunk boundaries onto
    /// their streams, between two iteration markers. A word from the receiver (an
    /// `Abort`) ends the wait at once, however blocked a data write is.
    async fn send_pages(
        &mut self,
        iteration: u32,
        ranges: Vec<PageRange>,
    ) -> Result<(), MigrateError> {
        let marker = |kind, pages| IterationMarker {
            iteration,
            kind,
            pages,
        };
        self.out
            .send(
                FrameType::IterationMarker,
                marker(MarkerKind::Start, 0).encode(),
            )
            .await?;
        let n = self.s.streams;
        let mut per_stream = vec![Vec::new(); usize::from(n)];
        for r in ranges {
            for piece in split_at_chunks(r, self.s.chunk_pages) {
                let s = stream_for(piece.start, self.s.chunk_pages, n);
                per_stream[usize::from(s - 1)].push(piece);
            }
        }
        let streams = &self.streams;
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
        let (pages, bytes) = tokio::select! {
            r = work => r?,
            event = self.reader.next() => return Err(event.into_error("sending pages")),
        };
        self.totals.pages += pages;
        self.totals.bytes += bytes;
        self.out
            .send(
                FrameType::IterationMarker,
                marker(MarkerKind::End, pages).encode(),
            )
            .await?;
        self.engine
            .handle_pages_sent(self.t0.elapsed(), pages, bytes)?;
        Ok(())
    }

    /// Pauses the VM — only once the arbiter has answered: a source that cannot record
    /// the switchover must not stop the VM for one.
    async fn pause(&mut self) -> Result<(), MigrateError> {
        if let Some(a) = &self.arbiter {
            match crate::claim::record(&**a, self.id, None).await {
                Ok(Record::Open) => {}
                Ok(r) => {
                    return Err(MigrateError::ArbiterUnavailable(format!(
                        "its record of this migration already says `{r}`"
                    )));
                }
                Err(e) => return Err(MigrateError::ArbiterUnavailable(e.to_string())),
            }
        }
        self.paused = true;
        self.source.control().pause()?;
        self.engine.handle_paused(self.t0.elapsed())?;
        Ok(())
    }

    /// Saves the device state and sends it in chunks on the control connection.
    async fn send_device_state(&mut self) -> Result<(), MigrateError> {
        let state = self.source.control().save_device_state()?;
        let chunk = self.out.max_payload() as usize - 16;
        let total_len = state.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + chunk).min(state.len());
            let c = DeviceStateChunk {
                offset: offset as u64,
                total_len,
                data: &state[offset..end],
            };
            self.out.send(FrameType::DeviceState, c.encode()).await?;
            offset = end;
            if offset >= state.len() {
                break;
            }
        }
        self.totals.device_state_len = total_len;
        self.engine
            .handle_device_state_sent(self.t0.elapsed(), total_len)?;
        Ok(())
    }

    /// Ends every data stream, sends `Complete` with their totals and waits for `Ready`
    /// (the switchover deadline bounds the wait).
    async fn complete(&mut self) -> Result<(), MigrateError> {
        let streams = &self.streams;
        let ends = async move {
            let mut totals: Vec<StreamTotals> = Vec::new();
            let mut max_epoch = 0;
            for tx in streams {
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
        let (totals, max_epoch) = tokio::select! {
            r = ends => r?,
            event = self.reader.next() => return Err(event.into_error("ending the data streams")),
        };
        self.totals.max_epoch = max_epoch;
        let complete = Complete {
            iterations: u32::try_from(self.engine.report().iterations.len() + 1)
                .unwrap_or(u32::MAX),
            pages: self.totals.pages,
            device_state_len: self.totals.device_state_len,
            streams: totals,
        };
        self.out
            .send(FrameType::Complete, complete.encode()?)
            .await?;
        let payload = match self.reader.next().await {
            ControlEvent::Frame(FrameType::Ready, p) => p,
            // Not Ready: whatever came (an Abort, a close) ends the migration.
            other => return Err(other.into_error("waiting for Ready")),
        };
        let Message::Ready(ready) = Message::decode(FrameType::Ready, &payload)? else {
            return Err(MigrateError::Internal(
                "Ready decoded as another message".into(),
            ));
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
                return Err(PeerMisbehaved::TotalsMismatch {
                    stream: 0,
                    what,
                    claimed,
                    received: sent,
                }
                .into());
            }
        }
        self.ready_seen = true;
        self.engine.handle_ready(self.t0.elapsed())?;
        Ok(())
    }

    /// Records `committed`: `Ok(true)` once it is on record, `Ok(false)` only when it
    /// definitely is not (recorded as aborted — by a destination that gave up — or
    /// refused). A lost answer is *unknown*: the step is retried (it is idempotent) and
    /// read back; if it stays unknown the VM is left paused — resuming could run it twice.
    async fn record_committed(&mut self) -> Result<bool, MigrateError> {
        let Some(a) = self.arbiter.clone() else {
            return Ok(true);
        };
        for attempt in 1..=6u32 {
            match crate::claim::record(&*a, self.id, Some(Transition::Commit)).await {
                Ok(Record::Committed | Record::Claimed | Record::Reverted) => return Ok(true),
                Ok(Record::Aborted) => return Ok(false),
                Ok(Record::Open) => tracing::warn!(attempt, "the commit did not take; retrying"),
                Err(ArbiterError::Refused(e)) => {
                    tracing::warn!(error = %e, "the arbiter refused the commit");
                    return Ok(false);
                }
                Err(ArbiterError::Unreachable(e)) => {
                    tracing::warn!(error = %e, attempt, "the commit is unanswered")
                }
            }
            tokio::time::sleep(Duration::from_millis(250) * attempt).await;
        }
        Err(MigrateError::OutcomeUnknown(format!(
            "the commit of migration {id} could be neither recorded nor read back; the VM is \
             left PAUSED at the source. Read `GET /v1/migrations/{id}/outcome` at the key \
             service: resume the source only after recording `aborted` there",
            id = self.id
        )))
    }

    /// The end: an aborted migration's error, or the claim step after a commit.
    async fn conclude(mut self) -> Result<MigrationReport, MigrateError> {
        let report = self.engine.report().clone();
        if self.engine.outcome() != Some(Outcome::Committed) {
            self.out.finish().await;
            return Err(self
                .first_error
                .take()
                .unwrap_or_else(|| engine_abort(report.abort_reason.as_ref())));
        }
        let cfg = ClaimConfig {
            arbiter: self.s.claim_at_arbiter,
            peer_timeout: self.s.claim_timeout,
            authenticated: matches!(self.mode, Mode::Encrypted(_)),
            ..ClaimConfig::default()
        };
        let claim_started = Instant::now();
        let outcome = crate::claim::source(
            cfg,
            self.arbiter.as_deref(),
            self.id,
            &mut self.reader,
            self.source.control(),
        )
        .in_current_span()
        .await;
        self.out.finish().await;
        let evidence = if self.s.claim_at_arbiter {
            ClaimEvidence::Arbiter
        } else {
            ClaimEvidence::Destination
        };
        match outcome {
            SourceOutcome::Claimed => {
                self.report_progress(Stage::Done);
                let mut done = MigrationReport::new(
                    self.id,
                    &self.s.vm_name,
                    self.mode,
                    self.s.streams,
                    report,
                    self.totals.bytes,
                    self.totals.max_epoch,
                    self.started.elapsed(),
                    self.setup,
                    (evidence, claim_started.elapsed()),
                );
                done.keyless = self.s.keyless;
                Ok(done)
            }
            SourceOutcome::Reverted => Err(MigrateError::Reverted(format!(
                "no claim from the destination within {:?} of Commit",
                self.s.claim_timeout
            ))),
            SourceOutcome::RevertedNotResumed(e) => Err(MigrateError::ResumeFailed(e)),
            SourceOutcome::Unknown(why) => Err(MigrateError::OutcomeUnknown(format!(
                "{why}; the VM is left PAUSED at the source: it runs at the destination if \
                 the arbiter's record of migration {} says `claimed`, and may be resumed \
                 here only once it says `reverted`",
                self.id
            ))),
        }
    }

    /// Progress after each step that changes what a person would want to see.
    fn report_progress(&self, stage: Stage) {
        let Some(progress) = &self.s.progress else {
            return;
        };
        let r = self.engine.report();
        let last = r.iterations.last();
        let page = self.memory.page_size();
        let guest_bytes = self.memory.page_count() * page;
        let remaining_bytes = match (stage, last) {
            (Stage::Done, _) => 0,
            (_, Some(it)) if it.dirty_after > 0 || r.iterations.len() > 1 => it.dirty_after * page,
            (_, Some(_)) => 0,
            (_, None) => guest_bytes.saturating_sub(self.totals.bytes),
        };
        let throughput = last.and_then(|it| it.bandwidth()).unwrap_or(0.0);
        (progress.0)(&Progress {
            stage,
            iteration: u32::try_from(r.iterations.len()).unwrap_or(u32::MAX),
            bytes_sent: self.totals.bytes,
            guest_bytes,
            remaining_bytes,
            dirty_rate_pages: last.and_then(|it| it.dirty_rate()).unwrap_or(0.0),
            throughput,
            throttle_percent: self.engine.throttle_percent(),
            elapsed: self.started.elapsed(),
            eta: (throughput > 0.0)
                .then(|| Duration::from_secs_f64(remaining_bytes as f64 / throughput)),
        });
    }
}

/// The stage a person sees after `action`.
fn stage_of(action: &Action, engine: &SenderEngine) -> Option<Stage> {
    match action {
        Action::FetchDirtyLog if engine.switchover_deadline().is_none() => Some(Stage::PreCopy),
        Action::Pause | Action::SendDeviceState => Some(Stage::StopAndCopy),
        Action::SendComplete | Action::RecordOutcome(Outcome::Committed) => Some(Stage::Switchover),
        _ => None,
    }
}

/// The error for an abort the engine decided itself.
fn engine_abort(reason: Option<&vmotion_engine::AbortReason>) -> MigrateError {
    use vmotion_engine::AbortReason;
    match reason {
        Some(AbortReason::Limit(l)) => MigrateError::DidNotConverge(format!("{l:?}")),
        Some(AbortReason::SwitchoverTimeout) => MigrateError::Timeout {
            waiting_for: "Ready within the switchover timeout",
            after: Duration::ZERO,
        },
        Some(AbortReason::OutcomeNotRecorded) => MigrateError::CommitRefused,
        Some(AbortReason::Failure(m)) => MigrateError::Internal(m.clone()),
        None => MigrateError::Internal("the engine ended without an outcome".into()),
    }
}

/// A step failed on the network: if the receiver said why (an `Abort` arriving at once),
/// its reason is the better error.
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
        };
        tasks.0.push(tokio::spawn(
            stream_task(w, channel.sealer, memory.clone(), rx, cfg).in_current_span(),
        ));
        streams.push(tx);
    }
    Ok((streams, tasks))
}
