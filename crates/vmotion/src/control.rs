//! The control connection of an established session, sealed both ways: the one place
//! that sends control frames and `Abort`s, the one reader that opens what the peer sends,
//! and the authenticated `EndOfStream` that ends each direction (protocol.md §6.5).

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use vmotion_proto::message::Abort;
use vmotion_proto::{AbortCode, FrameType, Opener, PeerMisbehaved, Sealer};

use crate::error::MigrateError;
use crate::transport::{ReadHalf, WriteHalf};
use crate::wire::{read_frame, write_frame};

/// An `Abort` is best effort: never wait longer than this to deliver one.
pub(crate) const ABORT_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// After the peer's `EndOfStream`, how long to wait for its connection to close (anything
/// else arriving is a protocol error).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// This side's half of the control connection: seals and writes.
pub(crate) struct ControlWriter {
    w: WriteHalf,
    sealer: Sealer,
    /// Every write must finish within this (a peer that stopped reading fails it).
    write_timeout: Duration,
    ended: bool,
}

impl ControlWriter {
    pub(crate) fn new(w: WriteHalf, sealer: Sealer, write_timeout: Duration) -> Self {
        Self {
            w,
            sealer,
            write_timeout,
            ended: false,
        }
    }

    /// Largest payload a frame may carry.
    pub(crate) fn max_payload(&self) -> u32 {
        self.sealer.max_payload()
    }

    /// Seals and writes one frame, within the write deadline.
    pub(crate) async fn send(
        &mut self,
        frame_type: FrameType,
        payload: Vec<u8>,
    ) -> Result<(), MigrateError> {
        let f = self.sealer.seal(frame_type, payload)?;
        match tokio::time::timeout(self.write_timeout, write_frame(&mut self.w, &f)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(MigrateError::Timeout {
                waiting_for: "the peer to take a control frame",
                after: self.write_timeout,
            }),
        }
    }

    /// The one way to tell the peer the migration is over: a sealed `Abort` with its code
    /// and reason, best effort and bounded, then the end of this direction.
    pub(crate) async fn abort(&mut self, code: AbortCode, message: &str) {
        if self.ended {
            return;
        }
        let payload = Abort {
            code,
            message: message.to_owned(),
        }
        .encode();
        if let Ok(f) = self.sealer.seal(FrameType::Abort, payload) {
            let _ = tokio::time::timeout(ABORT_SEND_TIMEOUT, write_frame(&mut self.w, &f)).await;
        }
        self.finish_within(ABORT_SEND_TIMEOUT).await;
    }

    /// Sends the `Abort` that fits `e`, unless `e` is the peer's own abort.
    pub(crate) async fn abort_for(&mut self, e: &MigrateError, default: AbortCode) {
        if !matches!(e, MigrateError::PeerAborted { .. }) {
            self.abort(e.abort_code(default), &e.to_string()).await;
        }
    }

    /// Ends this direction cleanly: the authenticated `EndOfStream`, then a half-close.
    pub(crate) async fn finish(&mut self) {
        self.finish_within(self.write_timeout.min(Duration::from_secs(5)))
            .await;
    }

    async fn finish_within(&mut self, limit: Duration) {
        if self.ended {
            return;
        }
        self.ended = true;
        let end = async {
            let f = self.sealer.seal_end_of_stream()?;
            write_frame(&mut self.w, &f).await?;
            self.w.shutdown().await?;
            Ok::<(), MigrateError>(())
        };
        let _ = tokio::time::timeout(limit, end).await;
    }
}

/// What the peer said on the control connection.
#[derive(Debug)]
pub(crate) enum ControlEvent {
    /// An opened frame other than `Abort` or `EndOfStream`: its type and payload.
    Frame(FrameType, Vec<u8>),
    /// The peer aborted, with its code and reason.
    Abort(Abort),
    /// The peer ended its direction with `EndOfStream` and closed.
    Closed,
    /// The connection failed, was cut without `EndOfStream`, or carried a bad frame.
    Failed(MigrateError),
}

impl ControlEvent {
    /// The event as the error that ends a migration, when it ends one.
    pub(crate) fn into_error(self, state: &'static str) -> MigrateError {
        match self {
            Self::Frame(frame_type, _) => {
                PeerMisbehaved::UnexpectedFrame { state, frame_type }.into()
            }
            // Through the protocol error: a refusal's or pre-flight's code says so.
            Self::Abort(a) => vmotion_proto::Error::PeerAborted {
                code: a.code,
                message: a.message,
            }
            .into(),
            Self::Closed => MigrateError::ConnectionClosed { during: state },
            Self::Failed(e) => e,
        }
    }
}

/// Reads and opens the peer's control frames on a task of its own, so that waiting for
/// them never competes with a timer or a write (reads are not cancel-safe). Ends after
/// the first `Abort`, `EndOfStream` or failure. Dropping the handle stops it.
pub(crate) struct ControlReader {
    pub(crate) events: mpsc::Receiver<ControlEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ControlReader {
    pub(crate) fn spawn(r: ReadHalf, opener: Opener) -> Self {
        let (tx, events) = mpsc::channel(4);
        let task = tokio::spawn(read_control(r, opener, tx));
        Self { events, task }
    }

    /// The next event; a reader that already ended yields `Failed` (connection gone).
    pub(crate) async fn next(&mut self) -> ControlEvent {
        self.events
            .recv()
            .await
            .unwrap_or(ControlEvent::Failed(MigrateError::ConnectionClosed {
                during: "the migration (the control reader ended)",
            }))
    }
}

async fn read_control(mut r: ReadHalf, mut opener: Opener, tx: mpsc::Sender<ControlEvent>) {
    loop {
        let event = match read_frame(&mut r, opener.max_payload()).await {
            // Closed without its EndOfStream: the peer died, or the path was cut.
            Ok(None) => ControlEvent::Failed(MigrateError::ConnectionClosed {
                during: "the migration (the control connection ended without its EndOfStream)",
            }),
            Err(e) => ControlEvent::Failed(e),
            Ok(Some(mut f)) => match opener.open(&mut f) {
                Err(e) => ControlEvent::Failed(e.into()),
                Ok(h) => match h.frame_type {
                    FrameType::EndOfStream => closed_after_end(&mut r, &opener).await,
                    FrameType::Abort => match Abort::decode(&f.payload) {
                        Ok(a) => ControlEvent::Abort(a),
                        Err(e) => ControlEvent::Failed(e.into()),
                    },
                    t => ControlEvent::Frame(t, f.payload),
                },
            },
        };
        let last = !matches!(event, ControlEvent::Frame(..));
        if tx.send(event).await.is_err() || last {
            return;
        }
    }
}

/// After the peer's `EndOfStream`: nothing may follow it. A clean close (or no close
/// within [`CLOSE_WAIT`]) is `Closed`; another frame is the peer's error.
async fn closed_after_end(r: &mut ReadHalf, opener: &Opener) -> ControlEvent {
    match tokio::time::timeout(CLOSE_WAIT, read_frame(r, opener.max_payload())).await {
        Ok(Ok(Some(_))) => ControlEvent::Failed(PeerMisbehaved::FrameAfterEnd { stream: 0 }.into()),
        // A header cut short after the end, or a reset: bytes followed the last frame.
        Ok(Err(e)) => ControlEvent::Failed(e),
        Ok(Ok(None)) | Err(_) => ControlEvent::Closed,
    }
}

/// What a session machine takes from the control connection (both
/// `vmotion_session::SourceSession` and `DestinationSession`).
pub(crate) trait ControlInput {
    fn frame(&mut self, now: Duration, frame_type: FrameType, payload: &[u8]);
    fn peer_abort(&mut self, now: Duration, abort: &Abort);
    fn lost(&mut self, now: Duration, reason: &str);
    fn misbehaved(&mut self, now: Duration, e: PeerMisbehaved);
}

macro_rules! control_input {
    ($t:ty) => {
        impl ControlInput for $t {
            fn frame(&mut self, now: Duration, frame_type: FrameType, payload: &[u8]) {
                self.handle_frame(now, frame_type, payload);
            }
            fn peer_abort(&mut self, now: Duration, abort: &Abort) {
                self.handle_peer_abort(now, abort);
            }
            fn lost(&mut self, now: Duration, reason: &str) {
                self.handle_control_lost(now, reason);
            }
            fn misbehaved(&mut self, now: Duration, e: PeerMisbehaved) {
                self.handle_misbehaved(now, e);
            }
        }
    };
}
control_input!(vmotion_session::SourceSession);
control_input!(vmotion_session::DestinationSession);

/// Feeds one control event to a session machine. After the connection's end (or a
/// failure) nothing more comes: `listening` goes false.
pub(crate) fn feed(
    m: &mut impl ControlInput,
    now: Duration,
    event: ControlEvent,
    listening: &mut bool,
) {
    match event {
        ControlEvent::Frame(t, payload) => m.frame(now, t, &payload),
        ControlEvent::Abort(a) => m.peer_abort(now, &a),
        ControlEvent::Closed => {
            *listening = false;
            m.lost(now, "the peer ended the control stream");
        }
        ControlEvent::Failed(e) => {
            *listening = false;
            match e {
                MigrateError::Protocol(vmotion_proto::Error::PeerMisbehaved(p)) => {
                    m.misbehaved(now, p);
                }
                other => m.lost(now, &other.to_string()),
            }
        }
    }
}

/// How long a side whose connection just broke waits for the peer's `Abort`, which may
/// be just behind on the control connection and says why.
const ABORT_BEHIND: Duration = Duration::from_millis(500);

/// After a failure that looks like the peer giving up (`network`): the next control
/// event if one comes at once. `Some(true)` when it was the peer's `Abort`.
pub(crate) async fn peer_abort_behind(
    reader: &mut ControlReader,
    listening: &mut bool,
    network: bool,
    m: &mut impl ControlInput,
    now: impl Fn() -> Duration,
) -> bool {
    if !network || !*listening {
        return false;
    }
    match tokio::time::timeout(ABORT_BEHIND, reader.next()).await {
        Ok(event) => {
            let aborted = matches!(event, ControlEvent::Abort(_));
            feed(m, now(), event, listening);
            aborted
        }
        Err(_) => false,
    }
}

/// A failure of the network kind (reset, closed, a stalled write): often the peer
/// giving up.
pub(crate) fn is_network(e: &MigrateError) -> bool {
    matches!(
        e,
        MigrateError::Io(_)
            | MigrateError::ConnectionClosed { .. }
            | MigrateError::Timeout { .. }
            | MigrateError::Protocol(vmotion_proto::Error::PeerMisbehaved(
                PeerMisbehaved::Truncated { .. }
            ))
    )
}
