//! One guest migration at the destination, after the handshake: pre-flight (the sink),
//! the data streams, the control stream until `Complete`, verification and persistence,
//! `Ready`, and the claim step that decides whether the guest runs here.

use std::sync::Arc;

use tokio::sync::mpsc;
use vmotion_mover::Sink;
use vmotion_proto::message::{Complete, DeviceStateChunk, Hello, MAX_DEVICE_STATE, Message, Ready};
use vmotion_proto::{AbortCode, FrameType, PeerMisbehaved, ReceiverSession};
use vmotion_session::{ClaimConfig, DestinationOutcome};

use super::streams::{Activity, Received, StreamContext, StreamTasks, bind_all, run_stream};
use super::{DataSource, Prepared, ReceiveOutcome, ReceiveReport, Receiver};
use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::error::MigrateError;
use crate::transport::{Accept, Conn};

/// What arrived and was verified.
struct Verified {
    pages: u64,
    bytes: u64,
    device_state_len: u64,
}

const BEFORE_COMPLETE: &str = "receiving a migration, before Complete";

impl Receiver {
    /// Pre-flight, now that the sender is who it claims (or the migration is plaintext,
    /// which this host accepted): the sink must take this guest. Then everything up to
    /// `Ready`, and the claim step. A refusal or failure goes back as a sealed `Abort`, and
    /// a sink that was made is discarded (nothing left behind).
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
        let mut unverified = match make_sink(prepare, hello) {
            Ok(s) => Unverified(Some(s)),
            Err(reason) => {
                out.abort(AbortCode::PreflightRefused, &reason).await;
                return Err(MigrateError::PreflightRefused(reason));
            }
        };
        let mut reader = ControlReader::spawn(r, ctrl.opener);
        let verified = self
            .transfer(
                &mut session,
                &mut data,
                &mut reader,
                hello,
                unverified.sink(),
            )
            .await;
        let v = match verified {
            Ok(v) => v,
            Err(e) => {
                out.abort_for(&e, AbortCode::DestinationFailed).await;
                return Err(e); // `unverified` discards the sink
            }
        };
        // Verified and persisted: from here the copy may be the only one allowed to run,
        // and nothing but the claim step may discard it.
        let mut sink = unverified.keep();
        let ready = Ready {
            pages: v.pages,
            device_state_len: v.device_state_len,
        };
        // A Ready that may not have arrived is settled like any lost answer: the claim
        // step asks the arbiter.
        if let Err(e) = out.send(FrameType::Ready, ready.encode()).await {
            tracing::warn!(error = %e, "Ready may not have reached the source");
        }
        let cfg = ClaimConfig {
            arbiter: self.arbiter.is_some(),
            peer_timeout: self.timeout,
            authenticated: matches!(mode, vmotion_proto::Mode::Encrypted(_)),
            ..self.claim
        };
        let outcome = crate::claim::destination(
            crate::claim::DestinationStart::AfterReady,
            cfg,
            self.arbiter.as_deref(),
            hello.migration_id,
            Some((&mut reader, &mut out)),
            &mut sink,
        )
        .await;
        let report = |outcome| ReceiveReport {
            migration_id: hello.migration_id,
            vm_name: hello.vm_name.clone(),
            mode,
            pages: v.pages,
            bytes: v.bytes,
            device_state_len: v.device_state_len,
            outcome,
        };
        let outcome = match outcome {
            DestinationOutcome::Resumed => {
                let r = report(ReceiveOutcome::Committed);
                if let Some(hook) = &self.on_resumed {
                    hook(&r);
                }
                return Ok((r, sink));
            }
            DestinationOutcome::ResumeFailed(e) => ReceiveOutcome::CommittedNotResumed(e),
            DestinationOutcome::Discarded(why) => return Err(MigrateError::Discarded(why)),
            DestinationOutcome::Unsettled(why) => {
                tracing::warn!(reason = %why, "the received guest stays PAUSED and unsettled here");
                ReceiveOutcome::Unsettled(why)
            }
        };
        Ok((report(outcome), sink))
    }

    /// Data streams bound and received, the control stream read to `Complete`, every
    /// total checked, the device state loaded and the guest persisted.
    async fn transfer<S: Sink>(
        &self,
        session: &mut ReceiverSession,
        data: &mut DataSource<'_, impl Accept>,
        reader: &mut ControlReader,
        hello: &Hello,
        sink: &mut S,
    ) -> Result<Verified, MigrateError> {
        let n = session.negotiated().streams;
        let bound = bind_all(data, session, n, self.timeout).await?;
        let (failures, mut failed) = mpsc::channel(usize::from(n).max(1));
        let ctx = Arc::new(StreamContext {
            memory: sink.memory(),
            guest_pages: hello.guest_pages,
            received: Arc::new(Received::new(hello.guest_pages)),
            activity: Arc::new(Activity::new()),
            failures,
        });
        let mut tasks = StreamTasks(
            bound
                .into_iter()
                .map(|(r, opener)| {
                    let id = opener.stream();
                    (id, tokio::spawn(run_stream(r, opener, ctx.clone())))
                })
                .collect(),
        );
        let (complete, device_state) = self.until_complete(reader, &mut failed, &ctx).await?;
        let (pages, bytes) = self
            .verify(&mut tasks, &mut failed, &complete, &ctx.received)
            .await?;
        check_total("pages", complete.pages, pages)?;
        check_total(
            "device state bytes",
            complete.device_state_len,
            device_state.len() as u64,
        )?;
        sink.control().load_device_state(&device_state)?;
        sink.persist()?;
        Ok(Verified {
            pages,
            bytes,
            device_state_len: device_state.len() as u64,
        })
    }

    /// Reads the control stream until `Complete`, collecting the device state; a failing
    /// data stream or a source silent for the progress timeout ends it.
    async fn until_complete(
        &self,
        reader: &mut ControlReader,
        failed: &mut mpsc::Receiver<MigrateError>,
        ctx: &StreamContext,
    ) -> Result<(Complete, Vec<u8>), MigrateError> {
        let mut device_state = Vec::new();
        loop {
            let deadline = ctx.activity.last() + self.progress_timeout;
            tokio::select! {
                event = reader.next() => {
                    ctx.activity.touch();
                    let ControlEvent::Frame(t, payload) = event else {
                        return Err(event.into_error(BEFORE_COMPLETE));
                    };
                    match Message::decode(t, &payload)? {
                        Message::IterationMarker(m) => tracing::debug!(?m, "iteration"),
                        Message::DeviceState(c) => add_chunk(&mut device_state, &c)?,
                        Message::Complete(c) => return Ok((c, device_state)),
                        other => {
                            return Err(PeerMisbehaved::UnexpectedFrame {
                                state: BEFORE_COMPLETE,
                                frame_type: other.frame_type(),
                            }
                            .into());
                        }
                    }
                }
                Some(e) = failed.recv() => return Err(e),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if ctx.activity.last().elapsed() >= self.progress_timeout {
                        return Err(MigrateError::Timeout {
                            waiting_for: "pages or control frames from the source",
                            after: self.progress_timeout,
                        });
                    }
                }
            }
        }
    }

    /// Every stream ended with the totals `Complete` claims, and every page arrived.
    async fn verify(
        &self,
        tasks: &mut StreamTasks,
        failed: &mut mpsc::Receiver<MigrateError>,
        complete: &Complete,
        received: &Received,
    ) -> Result<(u64, u64), MigrateError> {
        check_total(
            "streams",
            complete.streams.len() as u64,
            tasks.0.len() as u64,
        )?;
        tasks.0.sort_by_key(|(id, _)| *id);
        let (mut pages, mut bytes) = (0, 0);
        for (i, ((_, task), claimed)) in tasks.0.iter_mut().zip(&complete.streams).enumerate() {
            let stream = u16::try_from(i + 1).unwrap_or(u16::MAX);
            let stats = match tokio::time::timeout(self.timeout, task).await {
                Err(_) => {
                    return Err(MigrateError::Timeout {
                        waiting_for: "a data stream's EndOfStream after Complete",
                        after: self.timeout,
                    });
                }
                Ok(Err(e)) => return Err(MigrateError::Internal(format!("a stream task: {e}"))),
                Ok(Ok(Some(stats))) => stats,
                Ok(Ok(None)) => {
                    return Err(failed.try_recv().unwrap_or(MigrateError::Internal(
                        "a data stream failed without a reason".into(),
                    )));
                }
            };
            for (what, c, r) in [
                ("frames", claimed.frames, stats.frames),
                ("bytes", claimed.bytes, stats.bytes),
            ] {
                if c != r {
                    return Err(PeerMisbehaved::TotalsMismatch {
                        stream,
                        what,
                        claimed: c,
                        received: r,
                    }
                    .into());
                }
            }
            pages += stats.pages;
            bytes += stats.bytes;
        }
        let missing = received.missing();
        if missing > 0 {
            return Err(PeerMisbehaved::PagesMissing { missing }.into());
        }
        Ok((pages, bytes))
    }
}

/// A sink before its guest is verified and persisted: discarded when dropped (a failure,
/// or the daemon stopping mid-migration), so nothing half-received is left behind.
struct Unverified<S: Sink>(Option<S>);

impl<S: Sink> Unverified<S> {
    fn sink(&mut self) -> &mut S {
        self.0.as_mut().expect("a sink until it is kept")
    }

    fn keep(mut self) -> S {
        self.0.take().expect("a sink until it is kept")
    }
}

impl<S: Sink> Drop for Unverified<S> {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
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

/// The migration ended without this copy winning: nothing of it stays behind.
pub(crate) fn discard(sink: &mut dyn Sink) {
    if let Err(e) = sink.discard() {
        tracing::error!(error = %e, "could not discard the received guest");
    }
}

/// A total in `Complete` (stream 0, the control stream) against what arrived.
fn check_total(what: &'static str, claimed: u64, received: u64) -> Result<(), MigrateError> {
    if claimed == received {
        return Ok(());
    }
    Err(PeerMisbehaved::TotalsMismatch {
        stream: 0,
        what,
        claimed,
        received,
    }
    .into())
}

fn add_chunk(state: &mut Vec<u8>, c: &DeviceStateChunk<'_>) -> Result<(), MigrateError> {
    // Chunks arrive in order on the control connection; the total is bounded by the
    // decoder (MAX_DEVICE_STATE), and memory grows only with what actually arrived.
    if c.offset != state.len() as u64 || c.total_len > MAX_DEVICE_STATE {
        return Err(PeerMisbehaved::MalformedPayload {
            frame_type: FrameType::DeviceState,
            reason: "device state chunk out of order",
        }
        .into());
    }
    state.extend_from_slice(c.data);
    Ok(())
}
