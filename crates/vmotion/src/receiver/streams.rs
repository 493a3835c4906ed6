//! Data connections at the destination: binding each to the session, writing its pages
//! into the sink, the map of pages received, and the activity clock the progress deadline
//! reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use vmotion_mover::GuestMemory;
use vmotion_proto::message::PagesView;
use vmotion_proto::{AlignedBuf, FrameType, Opener, PeerMisbehaved, ReceiverSession, WireFrame};
use vmotion_session::StreamStats;

use super::DataSource;
pub(super) use crate::activity::Activity;
use crate::error::MigrateError;
use crate::transport::{Accept, Conn, ReadHalf};
use crate::wire::{read_frame, read_open};

/// Which pages arrived at least once: checked before `Ready`, so a sender that skipped a
/// page cannot get a commit.
pub(super) struct Received {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl Received {
    pub(super) fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    fn mark(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    pub(super) fn missing(&self) -> u64 {
        let have: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        self.pages - have
    }
}

/// What every stream task shares.
pub(super) struct StreamContext {
    pub(super) memory: Arc<dyn GuestMemory>,
    pub(super) guest_pages: u64,
    pub(super) received: Arc<Received>,
    pub(super) activity: Arc<Activity>,
    /// A failing stream reports here at once, so the migration aborts then rather than at
    /// `Complete`.
    pub(super) failures: mpsc::Sender<MigrateError>,
}

/// Binds the `n` data connections of the session within `timeout`. Strangers that
/// connect meanwhile are dropped after a short wait, and only a few are tolerated.
pub(super) async fn bind_all(
    data: &mut DataSource<'_, impl Accept>,
    session: &mut ReceiverSession,
    n: u16,
    timeout: Duration,
) -> Result<Vec<(ReadHalf, Opener)>, MigrateError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bound = Vec::new();
    let mut strangers = 0;
    while bound.len() < usize::from(n) {
        let (tcp, first, peer) = data.next(deadline, timeout).await?;
        let per_bind = deadline.min(tokio::time::Instant::now() + Duration::from_secs(5));
        match tokio::time::timeout_at(per_bind, bind_stream(tcp, first, session)).await {
            Ok(Ok(b)) => {
                bound.push(b);
                continue;
            }
            Err(_) => tracing::warn!(%peer, "dropping a connection that sent no stream bind"),
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "dropping a connection that did not bind")
            }
        }
        strangers += 1;
        if strangers > 16 {
            return Err(MigrateError::Protocol(
                PeerMisbehaved::StreamBindFailed { stream: 0 }.into(),
            ));
        }
    }
    Ok(bound)
}

async fn bind_stream(
    mut tcp: Conn,
    first: Option<WireFrame>,
    session: &mut ReceiverSession,
) -> Result<(ReadHalf, Opener), MigrateError> {
    let bind = match first {
        Some(f) => f,
        None => read_frame(&mut tcp, 4096)
            .await?
            .ok_or(MigrateError::ConnectionClosed {
                during: "binding a data stream",
            })?,
    };
    let (_stream, channel) = session.accept_data_stream(bind)?;
    let (r, _w) = tcp.into_split();
    Ok((r, channel.opener))
}

/// Runs one data stream to its end; a failure is reported to `ctx.failures` and the task
/// ends with `None`.
pub(super) async fn run_stream(
    r: ReadHalf,
    opener: Opener,
    ctx: Arc<StreamContext>,
) -> Option<StreamStats> {
    match receive_stream(r, opener, &ctx).await {
        Ok(stats) => Some(stats),
        Err(e) => {
            let _ = ctx.failures.try_send(e);
            None
        }
    }
}

/// Opens frames and writes their pages into the sink until the authenticated
/// `EndOfStream`.
async fn receive_stream(
    mut r: ReadHalf,
    mut opener: Opener,
    ctx: &StreamContext,
) -> Result<StreamStats, MigrateError> {
    let memory = &*ctx.memory;
    let mut buf = AlignedBuf::page_aligned(opener.max_payload() as usize);
    let zero = vec![0u8; memory.page_size() as usize];
    let mut stats = StreamStats {
        pages: 0,
        frames: 0,
        bytes: 0,
        epochs: 1,
    };
    while let Some(h) = read_open(&mut r, &mut opener, &mut buf).await? {
        ctx.activity.touch();
        match h.frame_type {
            FrameType::Pages => {
                let view = PagesView::decode(buf.as_slice())?;
                if view.page_size() as u64 != memory.page_size() {
                    return Err(PeerMisbehaved::MalformedPayload {
                        frame_type: FrameType::Pages,
                        reason: "page size differs from the negotiated one",
                    }
                    .into());
                }
                for e in view.iter() {
                    if e.index >= ctx.guest_pages {
                        return Err(PeerMisbehaved::MalformedPayload {
                            frame_type: FrameType::Pages,
                            reason: "page index past the end of guest memory",
                        }
                        .into());
                    }
                    memory.write_pages(e.index, e.data.unwrap_or(&zero))?;
                    ctx.received.mark(e.index);
                }
                stats.pages += view.len() as u64;
                stats.frames += 1;
                stats.bytes += u64::from(h.payload_len);
            }
            // The opener checked its totals; nothing may follow it.
            FrameType::EndOfStream => break,
            other => {
                return Err(PeerMisbehaved::UnexpectedFrame {
                    state: "receiving pages",
                    frame_type: other,
                }
                .into());
            }
        }
    }
    stats.epochs = opener.epoch().saturating_add(1);
    opener.finish()?;
    Ok(stats)
}
