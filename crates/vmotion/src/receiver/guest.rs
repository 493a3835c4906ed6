//! One guest migration at the destination, after the handshake: pre-flight (the sink),
//! the data streams bound, then [`DestinationSession`] decides everything else — the
//! control stream until `Complete`, every total and every page checked, the guest
//! persisted, `Ready`, and the claim step. This file only carries out its steps and
//! feeds it what the connections, the stream tasks and the timers say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use vmotion_mover::Sink;
use vmotion_proto::message::{Abort, Hello};
use vmotion_proto::{AbortCode, FrameType, MigrationId, ReceiverSession};
use vmotion_session::{
    ClaimConfig, DestinationConfig, DestinationEnd, DestinationOutcome, DestinationSession,
    DestinationStep, StreamStats,
};

use super::streams::{Activity, Received, StreamContext, bind_all, run_stream};
use super::{DataSource, Prepared, ReceiveOutcome, ReceiveReport, Receiver};
use crate::claim::discard;
use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::error::MigrateError;
use crate::transport::{Accept, Conn};

impl Receiver {
    /// Pre-flight, now that the sender is who it claims (or the migration is plaintext,
    /// which this host accepted): the sink must take this guest. Then the data streams
    /// are bound and the session machine runs to its end. A refusal or failure goes back
    /// as a sealed `Abort`, and a sink that was made is discarded (nothing left behind).
    pub(super) async fn receive_guest<S: Sink>(
        &self,
        mut session: ReceiverSession,
        control: Conn,
        mut data: DataSource<'_, impl Accept>,
        hello: &Hello,
        prepare: impl FnOnce(&Hello) -> Result<Prepared<S>, String>,
    ) -> Result<(ReceiveReport, S), MigrateError> {
        let mode = session.negotiated().mode;
        let ctrl = session.take_control()?;
        let (r, w) = control.into_split();
        let mut out = ControlWriter::new(w, ctrl.sealer, self.progress_timeout);
        let sink = match make_sink(prepare, hello) {
            Ok(s) => Held::new(s),
            Err(reason) => {
                out.abort(AbortCode::PreflightRefused, &reason).await;
                return Err(MigrateError::PreflightRefused(reason));
            }
        };
        let reader = ControlReader::spawn(r, ctrl.opener);
        let n = session.negotiated().streams;
        let bound = match bind_all(&mut data, &mut session, n, self.timeout).await {
            Ok(b) => b,
            Err(e) => {
                out.abort_for(&e, AbortCode::DestinationFailed).await;
                return Err(e); // `sink` is discarded
            }
        };
        let config = DestinationConfig {
            streams: n,
            guest_pages: hello.guest_pages,
            step_timeout: self.timeout,
            progress_timeout: self.progress_timeout,
            claim: ClaimConfig {
                arbiter: self.arbiter.is_some(),
                peer_timeout: self.timeout,
                authenticated: matches!(mode, vmotion_proto::Mode::Encrypted(_)),
                ..self.claim
            },
            max_device_state: self.max_device_state,
        };
        let mut run = Arrival::start(self, hello, config, sink, reader, out, bound);
        run.drive().await;
        let elapsed = run.now();
        let report = |run: &Arrival<'_, S>, outcome| {
            let m = &run.m;
            ReceiveReport {
                migration_id: hello.migration_id,
                vm_name: hello.vm_name.clone(),
                mode,
                pages: m.verified().map_or(0, |v| v.pages),
                bytes: m.streams().values().map(|s| s.bytes).sum(),
                device_state_len: m.verified().map_or(0, |v| v.device_state_len),
                iterations: m.iterations().unwrap_or(0),
                epochs: m.streams().values().map(|s| s.epochs).max().unwrap_or(1),
                downtime: m
                    .final_pass_started()
                    .zip(run.resumed_at)
                    .and_then(|(paused, resumed)| resumed.checked_sub(paused)),
                elapsed,
                outcome,
            }
        };
        let outcome = match run.m.outcome().cloned() {
            Some(DestinationEnd::Settled(DestinationOutcome::Resumed)) => {
                let r = report(&run, ReceiveOutcome::Committed);
                if let Some(hook) = &self.on_resumed {
                    hook(&r);
                }
                return Ok((r, run.sink.take()));
            }
            Some(DestinationEnd::Settled(DestinationOutcome::ResumeFailed(e))) => {
                ReceiveOutcome::CommittedNotResumed(e)
            }
            Some(DestinationEnd::Settled(DestinationOutcome::Discarded(why))) => {
                return Err(MigrateError::Discarded(why));
            }
            Some(DestinationEnd::Settled(DestinationOutcome::Unsettled(why))) => {
                tracing::warn!(reason = %why, "the received guest stays PAUSED and unsettled here");
                ReceiveOutcome::Unsettled(why)
            }
            Some(DestinationEnd::Failed(e)) => {
                // Before `Ready` the source can never commit, so `aborted` is safe here; it
                // frees the VM at the key service at once instead of at its expiry.
                crate::claim::abort_record(self.arbiter.as_deref(), hello.migration_id).await;
                return Err(run.error(e));
            }
            None => return Err(MigrateError::Internal("the session ended undecided".into())),
        };
        let r = report(&run, outcome);
        Ok((r, run.sink.take()))
    }
}

/// One arriving guest: the machine, and what carries out its steps.
struct Arrival<'a, S: Sink> {
    m: DestinationSession,
    origin: Instant,
    id: MigrationId,
    receiver: &'a Receiver,
    sink: Held<S>,
    reader: ControlReader,
    listening: bool,
    out: ControlWriter,
    ctx: Arc<StreamContext>,
    tasks: JoinSet<(u16, Option<StreamStats>)>,
    failed: mpsc::Receiver<MigrateError>,
    /// A local failure's own error (richer than the machine's sentence).
    local: Option<MigrateError>,
    /// When the guest resumed here.
    resumed_at: Option<Duration>,
}

impl<'a, S: Sink> Arrival<'a, S> {
    fn start(
        receiver: &'a Receiver,
        hello: &Hello,
        config: DestinationConfig,
        mut sink: Held<S>,
        reader: ControlReader,
        out: ControlWriter,
        bound: Vec<(crate::transport::ReadHalf, vmotion_proto::Opener)>,
    ) -> Self {
        let (failures, failed) = mpsc::channel(usize::from(config.streams).max(1));
        let ctx = Arc::new(StreamContext {
            memory: sink.get().memory(),
            guest_pages: hello.guest_pages,
            received: Arc::new(Received::new(hello.guest_pages)),
            activity: Arc::new(Activity::new()),
            failures,
        });
        let origin = Instant::now();
        let mut m = DestinationSession::new(Duration::ZERO, config);
        let mut tasks = JoinSet::new();
        for (r, opener) in bound {
            let id = opener.stream();
            m.handle_bound(origin.elapsed(), id);
            let ctx = ctx.clone();
            tasks.spawn(async move { (id, run_stream(r, opener, ctx).await) });
        }
        Self {
            m,
            origin,
            id: hello.migration_id,
            receiver,
            sink,
            reader,
            listening: true,
            out,
            ctx,
            tasks,
            failed,
            local: None,
            resumed_at: None,
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs the machine to its end.
    async fn drive(&mut self) {
        loop {
            while let Some(step) = self.m.poll_action() {
                self.step(step).await;
            }
            if self.m.outcome().is_some() {
                return;
            }
            let due = self.m.poll_timeout();
            if due.is_none() && !self.listening && self.tasks.is_empty() {
                // Nothing can move the machine any more; its own steps are synchronous.
                let now = self.now();
                self.m.handle_control_lost(now, "nothing left to wait for");
                continue;
            }
            self.wait(due).await;
        }
    }

    /// Waits for the next input: the control stream, a stream task, a timer.
    async fn wait(&mut self, due: Option<Duration>) {
        let origin = self.origin;
        let timer = async move {
            match due {
                Some(at) => tokio::time::sleep_until((origin + at).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = self.reader.next(), if self.listening => self.control(event),
            Some(e) = self.failed.recv() => self.stream_failed(e).await,
            Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                let now = self.now();
                match joined {
                    Ok((id, Some(stats))) => self.m.handle_stream_ended(now, id, stats),
                    // Failed: its error arrives on `failed`.
                    Ok((_, None)) => {}
                    Err(e) => {
                        let e = MigrateError::Internal(format!("a stream task: {e}"));
                        self.m.handle_failure(AbortCode::InternalError, e.to_string());
                        self.local.get_or_insert(e);
                    }
                }
            }
            () = timer => {
                let last = self.ctx.activity.last().saturating_duration_since(self.origin);
                self.m.handle_activity(last);
                let now = self.now();
                self.m.handle_timeout(now);
            }
        }
    }

    fn control(&mut self, event: ControlEvent) {
        let now = self.now();
        self.ctx.activity.touch();
        crate::control::feed(&mut self.m, now, event, &mut self.listening);
    }

    /// A data stream failed. One cut short is often the source giving up: its `Abort`,
    /// sent before it closed the streams, may be just behind on the control connection,
    /// and its reason is the better one.
    async fn stream_failed(&mut self, e: MigrateError) {
        let origin = self.origin;
        let network = crate::control::is_network(&e);
        let (reader, listening, m) = (&mut self.reader, &mut self.listening, &mut self.m);
        if crate::control::peer_abort_behind(reader, listening, network, m, || origin.elapsed())
            .await
        {
            return;
        }
        match e {
            MigrateError::Protocol(vmotion_proto::Error::PeerMisbehaved(p)) => {
                self.m.handle_stream_misbehaved(p);
            }
            other => {
                let code = other.abort_code(AbortCode::DestinationFailed);
                self.m.handle_failure(code, other.to_string());
                self.local.get_or_insert(other);
            }
        }
    }

    /// Carries out one step of the machine.
    async fn step(&mut self, step: DestinationStep) {
        match step {
            DestinationStep::CountMissing => {
                let missing = self.ctx.received.missing();
                let now = self.now();
                self.m.handle_missing(now, missing);
            }
            DestinationStep::LoadAndPersist(state) => {
                let sink = self.sink.get();
                let r = sink
                    .control()
                    .load_device_state(&state)
                    .and_then(|()| sink.persist());
                let now = self.now();
                match r {
                    // Verified and persisted: from here the copy may be the only one
                    // allowed to run, and only the claim step may discard it.
                    Ok(()) => {
                        self.sink.keep();
                        self.m.handle_persisted(now, Ok(()));
                    }
                    Err(e) => {
                        self.m.handle_persisted(now, Err(e.to_string()));
                        self.local.get_or_insert(e.into());
                    }
                }
            }
            DestinationStep::Transmit(t) => self.transmit(t.frame_type, t.payload).await,
            DestinationStep::FinishControl => self.out.finish().await,
            DestinationStep::Read | DestinationStep::Ask(_) => {
                let t = match step {
                    DestinationStep::Ask(t) => Some(t),
                    _ => None,
                };
                let arbiter = self.receiver.arbiter.as_deref();
                let answer = crate::claim::consult(arbiter, self.id, t).await;
                if let Some(t) = t {
                    tracing::info!(step = %t, ?answer, "arbiter");
                }
                let now = self.now();
                self.m.handle_answer(now, answer);
            }
            DestinationStep::Resume => {
                let r = self
                    .sink
                    .get()
                    .control()
                    .resume()
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    self.resumed_at = Some(self.now());
                }
                self.m.handle_resumed(r);
            }
            DestinationStep::Discard => self.sink.discard(),
        }
    }

    /// Sends a control frame; an `Abort` within its short deadline. A frame that does not
    /// go out is a lost control connection to the machine.
    async fn transmit(&mut self, frame_type: FrameType, payload: Vec<u8>) {
        if frame_type == FrameType::Abort {
            if let Ok(a) = Abort::decode(&payload) {
                self.out.abort(a.code, &a.message).await;
            }
            return;
        }
        if let Err(e) = self.out.send(frame_type, payload).await {
            tracing::warn!(frame = ?frame_type, error = %e, "a control frame did not reach the source");
            let now = self.now();
            self.m.handle_control_lost(now, &e.to_string());
        }
    }

    /// The error for a failed session: this side's own, where it was a local failure.
    fn error(&mut self, e: vmotion_session::SessionError) -> MigrateError {
        match (&e, self.local.take()) {
            (vmotion_session::SessionError::Local { .. }, Some(local)) => local,
            _ => crate::error::from_session(e),
        }
    }
}

/// The sink: discarded when dropped until the guest was verified and persisted (a
/// failure, or the daemon stopping mid-migration), so nothing half-received is left
/// behind; after that only the claim step's `Discard` removes it.
struct Held<S: Sink> {
    sink: Option<S>,
    kept: bool,
}

impl<S: Sink> Held<S> {
    fn new(s: S) -> Self {
        Self {
            sink: Some(s),
            kept: false,
        }
    }

    fn get(&mut self) -> &mut S {
        self.sink.as_mut().expect("a sink until it is taken")
    }

    fn keep(&mut self) {
        self.kept = true;
    }

    fn discard(&mut self) {
        if let Some(s) = &mut self.sink {
            discard(s);
        }
        self.kept = true;
    }

    fn take(&mut self) -> S {
        self.kept = true;
        self.sink.take().expect("a sink until it is taken")
    }
}

impl<S: Sink> Drop for Held<S> {
    fn drop(&mut self) {
        if !self.kept
            && let Some(s) = &mut self.sink
        {
            discard(s);
        }
    }
}

/// The sink for this guest, or the pre-flight's reason to refuse it.
fn make_sink<S: Sink>(
    prepare: impl FnOnce(&Hello) -> Result<Prepared<S>, String>,
    hello: &Hello,
) -> Result<S, String> {
    let s = match prepare(hello)? {
        Prepared::Sink(s) => s,
        Prepared::Tunnel(_) => return Err("a tunnel target for a guest".to_owned()),
    };
    let m = s.memory();
    if m.page_size() != u64::from(hello.page_size) || m.page_count() < hello.guest_pages {
        return Err(format!(
            "the sink has {} pages of {} bytes; the guest needs {} of {}",
            m.page_count(),
            m.page_size(),
            hello.guest_pages,
            hello.page_size
        ));
    }
    Ok(s)
}
