//! The per-connection pumps both ends of a tunnel run, and the set of them a tunnel
//! carries.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use vmotion_proto::{AlignedBuf, Channel, FrameType, Opener, PeerMisbehaved, Sealer};

use crate::control::{ControlEvent, ControlReader};
use crate::error::MigrateError;
use crate::transport::{Conn, ReadHalf, WriteHalf};
use crate::wire::{read_open, write_frame, write_parts};

/// Largest `TunnelData` payload a pump sends: one read from the hypervisor's socket.
const CHUNK: usize = 1024 * 1024;

/// Send and receive buffer asked for on every socket a tunnel pumps through.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// How long a stream the peer cut waits for the peer's `Abort`, which says why.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// How one carried connection ended, seen from one end.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PumpStats {
    /// `TunnelData` frames and payload bytes this end sent.
    pub(super) sent_frames: u64,
    pub(super) sent_bytes: u64,
    /// `TunnelData` frames and payload bytes this end received.
    pub(super) received_frames: u64,
    pub(super) received_bytes: u64,
    /// Most key epochs seen in either direction.
    pub(super) epochs: u32,
}

/// The pumps of a tunnel: those running, and the totals of those that ended cleanly.
#[derive(Default)]
pub(super) struct Pumps {
    running: JoinSet<(u16, Result<PumpStats, MigrateError>)>,
    done: Vec<(u16, PumpStats)>,
}

/// A pump that failed: the tunnel ends with it.
pub(super) struct PumpFailed {
    id: u16,
    error: MigrateError,
}

impl Pumps {
    /// Carries hypervisor connection `local` over data stream `id` (`remote`).
    pub(super) fn spawn(&mut self, id: u16, local: Conn, remote: Conn, channel: Channel) {
        self.running
            .spawn(async move { (id, pump(local, remote, channel).await) }.in_current_span());
    }

    /// Whether no pump runs.
    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// The next pump to end (`None` when none runs); a clean end is recorded and logged
    /// (bytes sent and received by this end).
    pub(super) async fn next_end(&mut self) -> Option<Result<(), PumpFailed>> {
        let joined = self.running.join_next().await?;
        Some(self.record(joined))
    }

    /// Waits for every running pump to end, within `timeout`.
    pub(super) async fn all_ended(&mut self, timeout: Duration) -> Result<(), MigrateError> {
        loop {
            let joined = tokio::time::timeout(timeout, self.running.join_next())
                .await
                .map_err(|_| MigrateError::TunnelFailed("a tunnel stream did not end".into()))?;
            match joined {
                None => return Ok(()),
                Some(joined) => self.record(joined).map_err(PumpFailed::into_error)?,
            }
        }
    }

    fn record(
        &mut self,
        joined: Result<(u16, Result<PumpStats, MigrateError>), tokio::task::JoinError>,
    ) -> Result<(), PumpFailed> {
        match joined {
            Ok((id, Ok(stats))) => {
                tracing::info!(
                    stream = id,
                    sent = stats.sent_bytes,
                    received = stats.received_bytes,
                    "connection closed"
                );
                self.done.push((id, stats));
                Ok(())
            }
            Ok((id, Err(error))) => Err(PumpFailed { id, error }),
            Err(e) => Err(PumpFailed {
                id: 0,
                error: MigrateError::TunnelFailed(format!("a tunnel task failed: {e}")),
            }),
        }
    }

    /// Drops every carried connection.
    pub(super) fn abort_all(&mut self) {
        self.running.abort_all();
    }

    /// The totals of the pumps that ended, in stream order.
    pub(super) fn done(&mut self) -> &[(u16, PumpStats)] {
        self.done.sort_by_key(|(id, _)| *id);
        &self.done
    }
}

impl PumpFailed {
    /// The error that ends the tunnel. A stream that was merely cut (the peer dropped it)
    /// is explained by the peer's `Abort`, when one arrives on `control` soon.
    pub(super) async fn explained(self, control: &mut ControlReader) -> MigrateError {
        if was_cut(&self.error)
            && let Ok(abort @ ControlEvent::Abort(_)) =
                tokio::time::timeout(ABORT_GRACE, control.next()).await
        {
            return abort.into_error("tunnel");
        }
        self.into_error()
    }

    fn into_error(self) -> MigrateError {
        match self.error {
            MigrateError::Io(io) => {
                MigrateError::TunnelFailed(format!("tunnel stream {}: network: {io}", self.id))
            }
            other => other,
        }
    }
}

/// A stream that merely ended early (the peer dropped it), as opposed to one that carried
/// something wrong.
fn was_cut(e: &MigrateError) -> bool {
    matches!(
        e,
        MigrateError::Io(_)
            | MigrateError::Protocol(vmotion_proto::Error::PeerMisbehaved(
                PeerMisbehaved::Truncated { .. }
            ))
    )
}

/// Carries one hypervisor connection (`local`) over one data stream (`remote`), both
/// directions, until both have ended. Symmetric: the sender and the receiver run it.
async fn pump(local: Conn, remote: Conn, channel: Channel) -> Result<PumpStats, MigrateError> {
    tune(&local);
    remote_tune(&remote);
    let (lr, lw) = local.into_split();
    let (rr, rw) = remote.into_split();
    let ((sent_frames, sent_bytes, up_epoch), down) = tokio::try_join!(
        outbound(lr, rw, channel.sealer),
        inbound(rr, lw, channel.opener)
    )?;
    Ok(PumpStats {
        sent_frames,
        sent_bytes,
        received_frames: down.0,
        received_bytes: down.1,
        epochs: up_epoch.max(down.2),
    })
}

/// The connection to the peer keeps the kernel's buffer autotuning: buffers set by hand
/// lock the window, and across 150 ms of round trip that held QEMU's single channel to
/// 1 MB/s (tests/wan_qemu.rs); on loopback they made no difference measured
/// (docs/performance.md). It probes the peer and bounds its unsent tail
/// (`transport::keepalive`).
pub(super) fn remote_tune(c: &Conn) {
    match c {
        Conn::Tcp(t) => crate::transport::keepalive(t),
        Conn::Unix(_) => tune(c),
    }
}

/// Deep socket buffers on the hypervisor's side of a relay: fewer wake-ups per byte
/// (measured in docs/performance.md; the kernel caps them at `net.core.[rw]mem_max`).
pub(super) fn tune(c: &Conn) {
    let s = match c {
        Conn::Tcp(s) => socket2::SockRef::from(s),
        Conn::Unix(s) => socket2::SockRef::from(s),
    };
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    if let Conn::Tcp(t) = c {
        crate::transport::keepalive(t);
    }
}

/// Whether an I/O error means the local hypervisor closed its end (abruptly).
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | NotConnected
    )
}

/// Local hypervisor → peer: `TunnelData` frames, then `TunnelShutdown` and `EndOfStream`
/// at the hypervisor's end of file. Returns frames, bytes and the last epoch.
async fn outbound(
    mut lr: ReadHalf,
    mut rw: WriteHalf,
    mut sealer: Sealer,
) -> Result<(u64, u64, u32), MigrateError> {
    let chunk = CHUNK.min(sealer.max_payload() as usize);
    let mut buf = AlignedBuf::page_aligned(chunk);
    let (mut frames, mut bytes) = (0u64, 0u64);
    loop {
        let n = match lr.read(buf.resize(chunk)).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if closed_by_peer(&e) => {
                tracing::debug!(error = %e, "the local hypervisor reset its connection");
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let payload = &mut buf.as_mut_slice()[..n];
        let (header, trailer) = sealer.seal_in_place(FrameType::TunnelData, payload)?;
        write_parts(&mut rw, &header, payload, &trailer).await?;
        frames += 1;
        bytes += n as u64;
    }
    let shutdown = sealer.seal(FrameType::TunnelShutdown, Vec::new())?;
    write_frame(&mut rw, &shutdown).await?;
    let epoch = sealer.epoch();
    let eos = sealer.seal_end_of_stream()?;
    write_frame(&mut rw, &eos).await?;
    rw.shutdown().await?;
    Ok((frames, bytes, epoch + 1))
}

/// Peer → local hypervisor. Returns frames, bytes and the last epoch.
///
/// A hypervisor that stops taking bytes the peer still sends (it closed, or died) fails
/// the tunnel: the peer's hypervisor must see its connection fail, as it would on a
/// direct one, not carry on writing into a void.
async fn inbound(
    mut rr: ReadHalf,
    mut lw: WriteHalf,
    mut opener: Opener,
) -> Result<(u64, u64, u32), MigrateError> {
    let mut buf = AlignedBuf::page_aligned(opener.max_payload() as usize);
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut shut = false;
    while let Some(h) = read_open(&mut rr, &mut opener, &mut buf).await? {
        match h.frame_type {
            FrameType::TunnelData if !shut => {
                frames += 1;
                bytes += u64::from(h.payload_len);
                if let Err(e) = lw.write_all(buf.as_slice()).await {
                    return Err(MigrateError::TunnelFailed(format!(
                        "the local hypervisor stopped taking the bytes its peer sends ({e})"
                    )));
                }
            }
            FrameType::TunnelShutdown if !shut => {
                shut = true;
                // A hypervisor that already closed for good has nothing to half-close.
                let _ = lw.shutdown().await;
            }
            FrameType::EndOfStream if shut => break,
            other => {
                return Err(PeerMisbehaved::UnexpectedFrame {
                    state: if shut {
                        "tunnel stream after TunnelShutdown"
                    } else {
                        "tunnel stream"
                    },
                    frame_type: other,
                }
                .into());
            }
        }
    }
    // A stream cut before its EndOfStream is truncation, not an end.
    opener.finish()?;
    Ok((frames, bytes, opener.epoch() + 1))
}
