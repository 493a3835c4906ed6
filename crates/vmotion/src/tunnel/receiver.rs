//! The destination end of a tunnel, after [`Receiver`](crate::Receiver)'s handshake:
//! binds each data stream as it arrives, delivers it to the destination hypervisor, and
//! ends when the sender's `Complete` totals match what was delivered.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use vmotion_proto::message::{Complete, Hello, Ready};
use vmotion_proto::{AbortCode, Channel, FrameType, ReceiverSession, WireFrame};

use super::pump::Pumps;
use super::{MAX_ACCEPT_TIMEOUT, TunnelReport, await_peer_end};
use crate::accept::{DataSource, first_frame};
use crate::connect::{HANDSHAKE_TIMEOUT, NetOptions, connect};
use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::error::MigrateError;
use crate::receiver::TunnelPrepare;
use crate::transport::{Accept, Conn, Endpoint, Peer};

/// Most connections whose bind is read aside at once; the next one waits in the listen
/// queue meanwhile (never dropped: it may be one of the hypervisor's).
const MAX_BINDING: usize = 16;

/// The receiving end of a tunnel, after the handshake: binds each data stream as it
/// arrives, connects it to `target`, and ends when the sender's `Complete` totals match
/// what was delivered. `timeout` bounds each wait for the sender after `Complete`.
pub(crate) async fn receive_tunnel(
    session: ReceiverSession,
    control: Conn,
    data: DataSource<'_, impl Accept>,
    (target, prepare): (Endpoint, Option<(TunnelPrepare, Hello)>),
    timeout: Duration,
    setup: Duration,
) -> Result<TunnelReport, MigrateError> {
    let negotiated = session.negotiated().clone();
    let mut d = Delivery::start(session, control, data, target, timeout)?;
    let verified = async {
        if let Some((prepare, hello)) = prepare {
            prepared(prepare, hello).await?;
        }
        let complete = d.until_complete().await?;
        d.verify(&complete).await
    }
    .await;
    let carried = d.first_at.map(|t| t.elapsed()).unwrap_or_default();
    if let Err(e) = verified {
        d.pumps.abort_all();
        d.writer.abort_for(&e, AbortCode::DestinationFailed).await;
        tracing::warn!(error = %e, "tunnel aborted");
        return Err(e);
    }
    let ready = Ready {
        pages: 0,
        device_state_len: 0,
    };
    d.writer.send(FrameType::Ready, ready.encode()).await?;
    d.writer.finish().await;
    await_peer_end(&mut d.reader, timeout, "tunnel (receiver), after Ready").await;
    let report = TunnelReport::new(&negotiated, d.pumps.done(), setup, carried, false);
    tracing::info!("{}", report.summary());
    Ok(report)
}

/// Runs the receiver's preparation of the destination hypervisor on a blocking thread.
async fn prepared(prepare: TunnelPrepare, hello: Hello) -> Result<(), MigrateError> {
    tokio::task::spawn_blocking(move || prepare(&hello))
        .await
        .map_err(|e| MigrateError::Internal(format!("the tunnel's preparation failed: {e}")))?
        .map_err(|e| {
            MigrateError::TunnelFailed(format!("preparing the destination hypervisor: {e}"))
        })
}

/// A tunnel being delivered here: its session (which binds data streams), where they
/// come from and go to, the control connection both ways, and the pumps.
struct Delivery<'a, L> {
    session: ReceiverSession,
    data: DataSource<'a, L>,
    target: Endpoint,
    timeout: Duration,
    reader: ControlReader,
    writer: ControlWriter,
    pumps: Pumps,
    /// Connections whose bind is read aside, so that a silent stranger cannot hold up the
    /// tunnel's streams and control messages.
    binding: JoinSet<(Conn, Option<WireFrame>, Peer)>,
    bound: u16,
    first_at: Option<Instant>,
}

impl<'a, L: Accept> Delivery<'a, L> {
    fn start(
        mut session: ReceiverSession,
        control: Conn,
        data: DataSource<'a, L>,
        target: Endpoint,
        timeout: Duration,
    ) -> Result<Self, MigrateError> {
        let (reader, writer) = super::control(control, session.take_control()?, timeout);
        Ok(Self {
            session,
            data,
            target,
            timeout,
            reader,
            writer,
            pumps: Pumps::default(),
            binding: JoinSet::new(),
            bound: 0,
            first_at: None,
        })
    }

    /// Binds and delivers data streams as they arrive, until the sender's `Complete`.
    async fn until_complete(&mut self) -> Result<Complete, MigrateError> {
        // The sender waits at most this long for its hypervisor's first connection; a
        // sender that went silent must not hold this VM's slot for ever.
        let first_deadline = tokio::time::Instant::now() + MAX_ACCEPT_TIMEOUT + HANDSHAKE_TIMEOUT;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let deadline = if self.bound == 0 { first_deadline } else { far };
            let bound = tokio::select! {
                next = self.data.next(deadline, MAX_ACCEPT_TIMEOUT), if self.binding.len() < MAX_BINDING => {
                    self.arrived(next?)
                }
                Some(Ok((conn, bind, peer))) = self.binding.join_next() => {
                    self.bind(conn, bind, &peer)
                }
                Some(ended) = self.pumps.next_end() => match ended {
                    Ok(()) => None,
                    // A stream cut because the sender gave up: its Abort explains why.
                    Err(failed) => return Err(failed.explained(&mut self.reader).await),
                },
                event = self.reader.next() => return complete(event),
            };
            if let Some((id, conn, channel)) = bound {
                self.deliver(id, conn, channel).await?;
            }
        }
    }

    /// A new data connection: bound now when it came with its first frame (routed here),
    /// else its bind is read aside.
    fn arrived(
        &mut self,
        (mut conn, first, peer): (Conn, Option<WireFrame>, Peer),
    ) -> Option<(u16, Conn, Channel)> {
        if first.is_some() {
            return self.bind(conn, first, &peer);
        }
        self.binding.spawn(async move {
            let bind = first_frame(&mut conn).await;
            (conn, bind, peer)
        });
        None
    }

    /// Binds a data connection to the tunnel's session: its stream id and channel, or
    /// `None` (logged) for a connection that did not bind — a stranger is dropped, not a
    /// failure.
    fn bind(
        &mut self,
        conn: Conn,
        bind: Option<WireFrame>,
        peer: &Peer,
    ) -> Option<(u16, Conn, Channel)> {
        let Some(frame) = bind else {
            tracing::warn!(%peer, "dropping a connection that sent no stream bind");
            return None;
        };
        match self.session.accept_data_stream(frame) {
            Ok((id, channel)) => Some((id, conn, channel)),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "dropping a connection that did not bind");
                None
            }
        }
    }

    /// Connects bound stream `id` to the destination hypervisor and pumps it.
    async fn deliver(&mut self, id: u16, conn: Conn, channel: Channel) -> Result<(), MigrateError> {
        self.bound += 1;
        self.first_at.get_or_insert_with(Instant::now);
        let target = &self.target;
        let local = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(target, NetOptions::default()))
            .await
            .map_err(|_| {
                MigrateError::TunnelFailed(format!(
                    "connecting to the hypervisor at {target} timed out"
                ))
            })?
            .map_err(|e| {
                MigrateError::TunnelFailed(format!("connecting to the hypervisor at {target}: {e}"))
            })?;
        tracing::info!(stream = id, %target, "delivering a tunnelled connection");
        self.pumps.spawn(id, local, conn, channel);
        Ok(())
    }

    /// Every stream must have ended, with the totals the sender claims: streams 1..=n,
    /// each with the totals `Complete` lists for it.
    async fn verify(&mut self, complete: &Complete) -> Result<(), MigrateError> {
        if usize::from(self.bound) != complete.streams.len() {
            return Err(MigrateError::TunnelFailed(format!(
                "the sender carried {} connections, {} arrived here",
                complete.streams.len(),
                self.bound
            )));
        }
        self.pumps.all_ended(self.timeout).await?;
        let done = self.pumps.done();
        for (i, ((id, got), claimed)) in done.iter().zip(&complete.streams).enumerate() {
            if usize::from(*id) != i + 1
                || (got.received_frames, got.received_bytes) != (claimed.frames, claimed.bytes)
            {
                return Err(MigrateError::TunnelFailed(format!(
                    "Complete's totals for stream {} do not match what the tunnel delivered",
                    i + 1
                )));
            }
        }
        Ok(())
    }
}

/// The sender's `Complete`, or the error that ends the tunnel before it.
fn complete(event: ControlEvent) -> Result<Complete, MigrateError> {
    match event {
        ControlEvent::Frame(FrameType::Complete, payload) => Ok(Complete::decode(&payload)?),
        other => Err(other.into_error("tunnel (receiver), before Complete")),
    }
}
