//! Tunnel mode: another hypervisor's own migration stream (QEMU's), carried opaque.
//!
//! The source hypervisor connects to a local listener ([`TunnelSender`]); each of its
//! connections (QEMU's main migration channel, then one per multifd channel) becomes one
//! data stream of a vmotion migration, sealed with that migration's keys in both
//! directions (QEMU's return path runs backwards on the main channel). At the destination
//! [`Receiver`](crate::Receiver) connects each stream to the destination hypervisor's
//! incoming address, in the order the streams bind. Policy, key service, negotiation and
//! downgrade rules are those of any migration: the `Hello` only says the migration is a
//! tunnel ([`MigrationKind::Tunnel`]).
//!
//! Both ends run the same pump per connection: bytes read from the local hypervisor go
//! out in `TunnelData` frames; a local end of file (or reset) goes out as
//! `TunnelShutdown` + `EndOfStream`, and the peer half-closes its own local connection.
//! The tunnel ends when every connection has closed in both directions: the sender then
//! sends `Complete` with the totals of every stream, the receiver checks them against what
//! it delivered and answers `Ready`, and the sender ends the control stream. Any failure
//! of the tunnel itself (the network, the peer, a forged or missing frame) drops every
//! local connection on both hosts, so neither hypervisor waits forever (TCP keepalive
//! notices a peer host that vanished; the receiver waits a bounded time for the first
//! stream). A hypervisor that closes its sending side is passed on as a close, and its
//! peer decides whether the stream was complete; one that stops taking bytes its peer
//! still sends fails the tunnel, as its peer's writes would fail on a direct connection.
//! Whether the hypervisor's migration succeeded is its own business (QEMU:
//! `query-migrate`); the tunnel reports what it carried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use vmotion_proto::message::{Abort, Complete, Message, Ready, StreamTotals};
use vmotion_proto::{
    AbortCode, AlignedBuf, Channel, EpochLimits, FrameType, MigrationId, MigrationKind, Mode,
    Negotiated, Opener, PeerMisbehaved, Sealer, SenderConfig, SenderHandshake, SenderSession,
    VmPolicy, WireFrame, handshake_random,
};

use crate::control::ABORT_SEND_TIMEOUT;
use crate::error::MigrateError;
use crate::sender::{HANDSHAKE_TIMEOUT, KeySource, NetOptions, connect, handshake, resolve_key};
use crate::transport::{Accept, Conn, Endpoint, ReadHalf, WriteHalf};
use crate::wire::{read_frame, read_open, write_frame, write_parts};

/// Largest `TunnelData` payload a pump sends: one read from the hypervisor's socket.
const CHUNK: usize = 1024 * 1024;

/// Send and receive buffer asked for on every socket a tunnel pumps through.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// How long a receiver waits for a tunnel's first connection after the handshake; a
/// sender's accept timeout may not be longer.
pub const MAX_ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Most connections a tunnel carries unless told otherwise: QEMU's main channel plus up
/// to 15 multifd channels.
pub const DEFAULT_MAX_CONNECTIONS: u16 = 16;

/// What a tunnel carried, as either end saw it.
#[derive(Debug, Clone)]
pub struct TunnelReport {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm_name: String,
    /// Encrypted, or plaintext with the reason.
    pub mode: Mode,
    /// Connections carried (QEMU: 1 + multifd channels).
    pub connections: u16,
    /// Hypervisor bytes carried from the source to the destination.
    pub bytes_to_destination: u64,
    /// Hypervisor bytes carried back (QEMU's return path).
    pub bytes_from_destination: u64,
    /// Most key epochs used on any stream direction (1 = no key update).
    pub epochs: u32,
    /// Key issuance and handshake (sender), or handshake (receiver).
    pub setup: Duration,
    /// From the first connection to the last close: how long the hypervisor streamed.
    pub carried: Duration,
}

impl TunnelReport {
    /// Source-to-destination throughput while the hypervisor streamed, in bytes/s.
    pub fn throughput(&self) -> f64 {
        self.bytes_to_destination as f64 / self.carried.as_secs_f64().max(1e-9)
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let mode = match self.mode {
            Mode::Encrypted(_) => "encrypted".to_owned(),
            Mode::Plaintext(r) => format!("PLAINTEXT ({r:?})"),
        };
        format!(
            "tunnel for {} closed: {mode}, {} connection(s), {:.1} MiB to the destination and \
             {:.1} KiB back in {:.2} s ({:.2} GB/s), {} key epoch(s)",
            self.vm_name,
            self.connections,
            self.bytes_to_destination as f64 / (1 << 20) as f64,
            self.bytes_from_destination as f64 / 1024.0,
            self.carried.as_secs_f64(),
            self.throughput() / 1e9,
            self.epochs,
        )
    }
}

/// Builds the source end of a tunnel.
///
/// ```no_run
/// # async fn f(client: std::sync::Arc<dyn vmotion::Authority>) -> Result<(), vmotion::MigrateError> {
/// use vmotion::{Endpoint, KeySource, Listener, TunnelSender};
/// let to: Endpoint = "198.51.100.7:7000".parse().unwrap();
/// // Negotiate first: a refused migration never opens the socket QEMU connects to.
/// let tunnel = TunnelSender::builder("web-1")
///     .key(KeySource::Service { client, destination: "dst.example".into() })
///     .build()?
///     .negotiate(to)
///     .await?;
/// let qemu = Listener::bind(&"unix:/run/vmotion/web-1.migrate".parse().unwrap()).await?;
/// // ... now QMP `migrate` with uri "unix:/run/vmotion/web-1.migrate" ...
/// let report = tunnel.run(&qemu, std::future::pending()).await?;
/// println!("{}", report.summary());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TunnelSender {
    vm_name: String,
    policy: VmPolicy,
    key: KeySource,
    max_connections: u16,
    limits: EpochLimits,
    net: NetOptions,
    accept_timeout: Duration,
    linger: Duration,
    in_flight: crate::InFlight,
}

/// Builder of a [`TunnelSender`].
#[derive(Debug)]
pub struct TunnelSenderBuilder(TunnelSender);

impl TunnelSender {
    /// A tunnel for `vm_name`: opportunistic policy, no key (set one), at most
    /// [`DEFAULT_MAX_CONNECTIONS`] connections, QEMU given 2 minutes to connect.
    pub fn builder(vm_name: &str) -> TunnelSenderBuilder {
        TunnelSenderBuilder(Self {
            vm_name: vm_name.to_owned(),
            policy: VmPolicy::default(),
            key: KeySource::None {
                migration_id: MigrationId([0; 16]),
            },
            max_connections: DEFAULT_MAX_CONNECTIONS,
            limits: EpochLimits::default(),
            net: NetOptions::default(),
            accept_timeout: Duration::from_secs(120),
            linger: Duration::from_millis(300),
            in_flight: crate::InFlight::new(),
        })
    }
}

impl TunnelSenderBuilder {
    /// The VM's policy.
    pub fn policy(mut self, policy: VmPolicy) -> Self {
        self.0.policy = policy;
        self
    }

    /// Where the key comes from.
    pub fn key(mut self, key: KeySource) -> Self {
        self.0.key = key;
        self
    }

    /// Most hypervisor connections carried (QEMU: 1 + multifd channels); a connection
    /// beyond it fails the tunnel.
    pub fn max_connections(mut self, n: u16) -> Self {
        self.0.max_connections = n;
        self
    }

    /// Key-update budgets (tests force many epochs with small ones).
    pub fn epoch_limits(mut self, l: EpochLimits) -> Self {
        self.0.limits = l;
        self
    }

    /// Local address and DSCP mark of the connections to the receiver.
    pub fn network(mut self, net: NetOptions) -> Self {
        self.0.net = net;
        self
    }

    /// How long [`NegotiatedTunnel::run`] waits for the hypervisor's first connection (at
    /// most [`MAX_ACCEPT_TIMEOUT`], which is how long a receiver waits for it).
    pub fn accept_timeout(mut self, t: Duration) -> Self {
        self.0.accept_timeout = t;
        self
    }

    /// How long the tunnel waits for another connection once all have closed, before it
    /// ends.
    pub fn linger(mut self, t: Duration) -> Self {
        self.0.linger = t;
        self
    }

    /// The set of VMs in flight to check and join (see [`crate::InFlight`]).
    pub fn in_flight(mut self, set: crate::InFlight) -> Self {
        self.0.in_flight = set;
        self
    }

    /// The sender, or what is wrong with the options.
    pub fn build(self) -> Result<TunnelSender, MigrateError> {
        let t = self.0;
        if t.max_connections == 0 || t.max_connections > vmotion_proto::message::MAX_STREAMS {
            return Err(MigrateError::InvalidOptions(
                "a tunnel carries 1 to 256 connections",
            ));
        }
        if t.accept_timeout > MAX_ACCEPT_TIMEOUT || t.accept_timeout.is_zero() {
            return Err(MigrateError::InvalidOptions(
                "the accept timeout must be above 0 and at most 600 s (the receiver waits no longer)",
            ));
        }
        Ok(t)
    }
}

impl TunnelSender {
    /// Gets the key, applies the policy and negotiates with the receiver at `to`. A
    /// refusal (a `Required` VM whose destination cannot encrypt, a receiver that takes
    /// no tunnels) comes back here, before anything listens for the hypervisor: its
    /// migration then fails at connect and the VM keeps running at the source.
    pub async fn negotiate(
        self,
        to: impl Into<Endpoint>,
    ) -> Result<NegotiatedTunnel, MigrateError> {
        let started = Instant::now();
        let to = to.into();
        let in_flight = self.in_flight.claim(&self.vm_name)?;
        let keyed = resolve_key(self.key, &self.vm_name, None).await?;
        let (migration_id, material, destination, arbiter) =
            (keyed.id, keyed.material, keyed.destination, keyed.arbiter);
        let span = tracing::info_span!("tunnel", id = %migration_id, vm = %self.vm_name);
        let config = SenderConfig {
            migration_id,
            vm_name: self.vm_name.clone(),
            policy: self.policy.effective(),
            destination,
            key: material,
            versions: vmotion_proto::frame::SUPPORTED_VERSIONS,
            page_size: 4096,
            guest_pages: 0,
            streams: self.max_connections,
            kind: MigrationKind::Tunnel,
            limits: self.limits,
            random: handshake_random()
                .map_err(|_| MigrateError::Internal("no OS randomness".into()))?,
        };
        let record_aborted = async || {
            crate::sender::abort_record(arbiter.as_deref(), migration_id).await;
        };
        let (expect_ack, hello) = match SenderHandshake::start(config) {
            Ok(x) => x,
            Err(e) => {
                record_aborted().await;
                return Err(e.into());
            }
        };
        let (session, control) = match handshake(&to, self.net, expect_ack, hello)
            .instrument(span.clone())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                record_aborted().await;
                return Err(e);
            }
        };
        tracing::info!(parent: &span, mode = ?session.negotiated().mode, "tunnel negotiated");
        Ok(NegotiatedTunnel {
            session,
            control,
            to,
            net: self.net,
            _arbiter: arbiter,
            _in_flight: in_flight,
            started,
            setup: started.elapsed(),
            accept_timeout: self.accept_timeout,
            linger: self.linger,
            span,
        })
    }
}

/// A tunnel the receiver accepted, ready to carry the hypervisor's connections.
pub struct NegotiatedTunnel {
    session: SenderSession,
    control: Conn,
    to: Endpoint,
    net: NetOptions,
    _arbiter: Option<Arc<dyn vmotion_authority::Arbiter>>,
    _in_flight: crate::in_flight::InFlightGuard,
    started: Instant,
    setup: Duration,
    accept_timeout: Duration,
    linger: Duration,
    span: tracing::Span,
}

impl std::fmt::Debug for NegotiatedTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NegotiatedTunnel")
            .field("negotiated", self.session.negotiated())
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// How one carried connection ended, seen from one end.
#[derive(Debug, Default, Clone, Copy)]
struct PumpStats {
    /// `TunnelData` frames and payload bytes this end sent.
    sent_frames: u64,
    sent_bytes: u64,
    /// `TunnelData` frames and payload bytes this end received.
    received_frames: u64,
    received_bytes: u64,
    /// Most key epochs seen in either direction.
    epochs: u32,
}

impl NegotiatedTunnel {
    /// What the two ends agreed on (mode, limits, the migration id).
    pub fn negotiated(&self) -> &Negotiated {
        self.session.negotiated()
    }

    /// Carries every connection the hypervisor makes to `local` until all have closed in
    /// both directions (or `cancel` completes, which aborts the tunnel). Returns what was
    /// carried; on any error every local and remote connection is dropped.
    pub async fn run(
        self,
        local: &impl Accept,
        cancel: impl Future<Output = ()>,
    ) -> Result<TunnelReport, MigrateError> {
        let span = self.span.clone();
        let Self {
            mut session,
            control: control_conn,
            to,
            net,
            started,
            setup,
            accept_timeout,
            linger,
            ..
        } = self;
        async move {
            let negotiated = session.negotiated().clone();
            let control = session.take_control()?;
            tune(&control_conn);
            let (control_r, mut control_w) = control_conn.into_split();
            let mut sealer = control.sealer;
            let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel(2);
            let reader = tokio::spawn(control_reader(control_r, control.opener, ctl_tx));
            let _reader = AbortOnDrop(reader);

            let mut streams: JoinSet<(u16, Result<PumpStats, MigrateError>)> = JoinSet::new();
            let mut done: Vec<(u16, PumpStats)> = Vec::new();
            let mut next_id: u16 = 1;
            let mut first_at: Option<Instant> = None;
            let mut idle_since: Option<tokio::time::Instant> = None;
            let accept_deadline = tokio::time::Instant::now() + accept_timeout;
            let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
            tokio::pin!(cancel);
            let carried: Result<(), MigrateError> = loop {
                let linger_at = idle_since.map_or_else(far, |t| t + linger);
                tokio::select! {
                    () = &mut cancel => break Err(MigrateError::TunnelFailed("the tunnel was cancelled".into())),
                    () = tokio::time::sleep_until(accept_deadline), if first_at.is_none() => {
                        break Err(MigrateError::TunnelFailed(format!(
                            "the hypervisor did not connect within {accept_timeout:?}"
                        )));
                    }
                    () = tokio::time::sleep_until(linger_at), if idle_since.is_some() => break Ok(()),
                    accepted = local.accept_conn() => {
                        let (conn, _) = match accepted {
                            Ok(c) => c,
                            Err(e) => break Err(e.into()),
                        };
                        if next_id > negotiated.streams {
                            break Err(MigrateError::TunnelFailed(format!(
                                "the hypervisor opened more than {} connections (raise the tunnel's maximum)",
                                negotiated.streams
                            )));
                        }
                        let id = next_id;
                        next_id += 1;
                        first_at.get_or_insert_with(Instant::now);
                        idle_since = None;
                        let remote = match open_stream(&mut session, &to, net, id).await {
                            Ok(r) => r,
                            Err(e) => break Err(e),
                        };
                        tracing::info!(stream = id, "carrying a hypervisor connection");
                        streams.spawn(
                            async move { (id, pump(conn, remote.0, remote.1).await) }
                                .in_current_span(),
                        );
                    }
                    Some(joined) = streams.join_next() => {
                        match joined {
                            Ok((id, Ok(stats))) => {
                                tracing::info!(stream = id, sent = stats.sent_bytes, received = stats.received_bytes, "connection closed");
                                done.push((id, stats));
                                if streams.is_empty() {
                                    idle_since = Some(tokio::time::Instant::now());
                                }
                            }
                            Ok((id, Err(e))) => {
                                // A stream the receiver dropped: its Abort says why.
                                if was_cut(&e)
                                    && let Ok(Some(Err(why @ MigrateError::PeerAborted { .. }))) =
                                        tokio::time::timeout(Duration::from_millis(200), ctl_rx.recv()).await
                                {
                                    break Err(why);
                                }
                                break Err(stream_failed(id, e));
                            }
                            Err(e) => break Err(MigrateError::TunnelFailed(format!("a tunnel task failed: {e}"))),
                        }
                    }
                    msg = ctl_rx.recv() => break Err(match msg {
                        Some(Err(e)) => e,
                        Some(Ok(_ready)) => PeerMisbehaved::UnexpectedFrame {
                            state: "tunnel (sender), before Complete",
                            frame_type: FrameType::Ready,
                        }.into(),
                        None => MigrateError::TunnelFailed("the receiver's control connection ended".into()),
                    }),
                }
            };
            // Up to the last close, not the linger after it.
            let carried_for = match (first_at, idle_since) {
                (Some(first), Some(idle)) => idle.into_std().saturating_duration_since(first),
                (Some(first), None) => first.elapsed(),
                _ => Duration::ZERO,
            };
            if let Err(e) = carried {
                // Tell the receiver, which drops its hypervisor's connections, and drop
                // ours.
                let (code, message) = (e.abort_code(AbortCode::SourceFailed), e.to_string());
                if let Ok(f) = sealer.seal(FrameType::Abort, Abort { code, message }.encode()) {
                    let _ = tokio::time::timeout(ABORT_SEND_TIMEOUT, write_frame(&mut control_w, &f))
                        .await;
                }
                streams.abort_all();
                tracing::warn!(error = %e, "tunnel aborted");
                return Err(e);
            }
            done.sort_by_key(|(id, _)| *id);
            let complete = Complete {
                iterations: 0,
                pages: 0,
                device_state_len: 0,
                streams: done
                    .iter()
                    .map(|(_, s)| StreamTotals {
                        frames: s.sent_frames,
                        bytes: s.sent_bytes,
                    })
                    .collect(),
            };
            let f = sealer.seal(FrameType::Complete, complete.encode()?)?;
            write_frame(&mut control_w, &f).await?;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, ctl_rx.recv()).await {
                Ok(Some(Ok(_ready))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => {
                    return Err(MigrateError::TunnelFailed(
                        "the receiver closed the tunnel before confirming it".into(),
                    ));
                }
                Err(_) => {
                    return Err(MigrateError::TunnelFailed(
                        "the receiver did not confirm the tunnel's totals".into(),
                    ));
                }
            }
            let eos = sealer.seal_end_of_stream()?;
            write_frame(&mut control_w, &eos).await?;
            let _ = control_w.shutdown().await;
            let report = report(&negotiated, &done, setup, carried_for, true);
            tracing::info!(total = ?started.elapsed(), "{}", report.summary());
            Ok(report)
        }
        .instrument(span)
        .await
    }
}

/// Opens data stream `id` to the receiver.
async fn open_stream(
    session: &mut SenderSession,
    to: &Endpoint,
    net: NetOptions,
    id: u16,
) -> Result<(Conn, Channel), MigrateError> {
    let (bind, channel) = session.open_data_stream(id)?;
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(to, net))
        .await
        .map_err(|_| MigrateError::TunnelFailed("connecting a tunnel stream timed out".into()))??;
    write_frame(&mut conn, &bind).await?;
    Ok((conn, channel))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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

fn stream_failed(id: u16, e: MigrateError) -> MigrateError {
    match e {
        MigrateError::Io(io) => {
            MigrateError::TunnelFailed(format!("tunnel stream {id}: network: {io}"))
        }
        other => other,
    }
}

fn report(
    negotiated: &Negotiated,
    done: &[(u16, PumpStats)],
    setup: Duration,
    carried: Duration,
    sender: bool,
) -> TunnelReport {
    let sent: u64 = done.iter().map(|(_, s)| s.sent_bytes).sum();
    let received: u64 = done.iter().map(|(_, s)| s.received_bytes).sum();
    let (to, from) = if sender {
        (sent, received)
    } else {
        (received, sent)
    };
    TunnelReport {
        migration_id: negotiated.migration_id,
        vm_name: negotiated.vm_name.clone(),
        mode: negotiated.mode,
        connections: u16::try_from(done.len()).unwrap_or(u16::MAX),
        bytes_to_destination: to,
        bytes_from_destination: from,
        epochs: done.iter().map(|(_, s)| s.epochs).max().unwrap_or(1),
        setup,
        carried,
    }
}

/// Reads the receiver's control frames: `Ready` (the tunnel's totals confirmed), an
/// `Abort`, or a failure. Anything else fails the tunnel.
async fn control_reader(
    mut r: ReadHalf,
    mut opener: Opener,
    tx: tokio::sync::mpsc::Sender<Result<Ready, MigrateError>>,
) {
    loop {
        let item = async {
            let mut f = read_frame(&mut r, opener.max_payload())
                .await?
                .ok_or_else(|| {
                    MigrateError::TunnelFailed("the receiver closed the control connection".into())
                })?;
            let h = opener.open(&mut f)?;
            match Message::decode(h.frame_type, &f.payload)? {
                Message::Ready(r) => Ok(r),
                Message::Abort(a) => Err(MigrateError::PeerAborted {
                    code: a.code,
                    message: a.message,
                }),
                other => Err(PeerMisbehaved::UnexpectedFrame {
                    state: "tunnel (sender)",
                    frame_type: other.frame_type(),
                }
                .into()),
            }
        }
        .await;
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Carries one hypervisor connection (`local`) over one data stream (`remote`), both
/// directions, until both have ended. Symmetric: the sender and the receiver run it.
async fn pump(local: Conn, remote: Conn, channel: Channel) -> Result<PumpStats, MigrateError> {
    tune(&local);
    tune(&remote);
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

/// Deep socket buffers: fewer wake-ups per byte on the relay's two hops (measured in
/// docs/performance.md; the kernel caps them at net.core.[rw]mem_max). (TCP connections
/// to and from the peer also probe it: `transport::keepalive`.)
fn tune(c: &Conn) {
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

/// The receiving end of a tunnel, after the handshake: binds each data stream as it
/// arrives, connects it to `target`, and ends when the sender's `Complete` totals match
/// what was delivered.
pub(crate) async fn receive_tunnel(
    mut session: vmotion_proto::ReceiverSession,
    control: Conn,
    mut data: crate::receiver::DataSource<'_, impl Accept>,
    target: Endpoint,
    timeout: Duration,
    setup: Duration,
) -> Result<TunnelReport, MigrateError> {
    let negotiated = session.negotiated().clone();
    let ctrl = session.take_control()?;
    let mut sealer = ctrl.sealer;
    tune(&control);
    let (control_r, mut control_w) = control.into_split();
    // The control stream is read by a task of its own: a frame is never half-read by a
    // `select!` branch that loses the race.
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel(2);
    let _reader = AbortOnDrop(tokio::spawn(
        receiver_control(control_r, ctrl.opener, ctl_tx).in_current_span(),
    ));
    let mut streams: JoinSet<(u16, Result<PumpStats, MigrateError>)> = JoinSet::new();
    let mut done: Vec<(u16, PumpStats)> = Vec::new();
    let mut bound = 0u16;
    let mut binding: JoinSet<(Conn, Result<WireFrame, ()>, crate::transport::Peer)> =
        JoinSet::new();
    let mut first_at: Option<Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    // The sender waits at most this long for its hypervisor's first connection; a sender
    // that went silent must not hold this VM's slot for ever.
    let first_deadline = tokio::time::Instant::now() + MAX_ACCEPT_TIMEOUT + HANDSHAKE_TIMEOUT;
    let result: Result<Complete, MigrateError> = async {
        loop {
            let joined = tokio::select! {
                // Binds are read aside, so a silent stranger cannot hold up the streams
                // and control messages of the tunnel; at most 16 at a time, and the next
                // connection waits in the listen queue meanwhile (never dropped: it may
                // be one of the hypervisor's).
                next = data.next(if bound == 0 { first_deadline } else { far }, MAX_ACCEPT_TIMEOUT), if binding.len() < 16 => {
                    let (mut conn, first, peer) = next?;
                    match first {
                        Some(f) => bind_stream(&mut session, conn, Ok(f), &peer)?,
                        None => {
                            binding.spawn(async move {
                                let f = match tokio::time::timeout(Duration::from_secs(5), read_frame(&mut conn, 4096)).await {
                                    Ok(Ok(Some(f))) => Ok(f),
                                    _ => Err(()),
                                };
                                (conn, f, peer)
                            });
                            None
                        }
                    }
                }
                Some(Ok((conn, f, peer))) = binding.join_next() => bind_stream(&mut session, conn, f, &peer)?,
                Some(joined) = streams.join_next() => match joined {
                    Ok((id, Ok(stats))) => {
                        tracing::info!(stream = id, delivered = stats.received_bytes, returned = stats.sent_bytes, "connection closed");
                        done.push((id, stats));
                        None
                    }
                    Ok((id, Err(e))) => {
                        // A stream cut because the sender gave up: its Abort explains why.
                        if was_cut(&e)
                            && let Ok(Some(Err(why @ MigrateError::PeerAborted { .. }))) =
                                tokio::time::timeout(Duration::from_millis(200), ctl_rx.recv()).await
                        {
                            return Err(why);
                        }
                        return Err(stream_failed(id, e));
                    }
                    Err(e) => return Err(MigrateError::TunnelFailed(format!("a tunnel task failed: {e}"))),
                },
                msg = ctl_rx.recv() => match msg {
                    Some(Ok(ControlIn::Complete(c))) => return Ok(c),
                    Some(Ok(ControlIn::End)) => return Err(PeerMisbehaved::UnexpectedFrame {
                        state: "tunnel (receiver), before Complete",
                        frame_type: FrameType::EndOfStream,
                    }.into()),
                    Some(Err(e)) => return Err(e),
                    None => return Err(MigrateError::TunnelFailed("the sender's control stream ended".into())),
                }
            };
            // A bound stream: deliver it to the hypervisor.
            let Some((id, conn, channel)) = joined else {
                continue;
            };
            bound += 1;
            first_at.get_or_insert_with(Instant::now);
            let local = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&target, NetOptions::default()))
                .await
                .map_err(|_| MigrateError::TunnelFailed(format!("connecting to the hypervisor at {target} timed out")))?
                .map_err(|e| MigrateError::TunnelFailed(format!("connecting to the hypervisor at {target}: {e}")))?;
            tracing::info!(stream = id, %target, "delivering a tunnelled connection");
            streams.spawn(async move { (id, pump(local, conn, channel).await) }.in_current_span());
        }
    }
    .await;
    // Every stream must have ended, with the totals the sender claims.
    let verified = match result {
        Ok(complete) => {
            async {
                if usize::from(bound) != complete.streams.len() {
                    return Err(MigrateError::TunnelFailed(format!(
                        "the sender carried {} connections, {bound} arrived here",
                        complete.streams.len()
                    )));
                }
                while let Some(joined) = tokio::time::timeout(timeout, streams.join_next())
                    .await
                    .map_err(|_| MigrateError::TunnelFailed("a tunnel stream did not end".into()))?
                {
                    match joined {
                        Ok((id, Ok(stats))) => done.push((id, stats)),
                        Ok((id, Err(e))) => return Err(stream_failed(id, e)),
                        Err(e) => {
                            return Err(MigrateError::TunnelFailed(format!(
                                "a tunnel task failed: {e}"
                            )));
                        }
                    }
                }
                // Streams 1..=n, each with the totals Complete lists for it.
                done.sort_by_key(|(id, _)| *id);
                for (i, ((id, got), claimed)) in done.iter().zip(&complete.streams).enumerate() {
                    if usize::from(*id) != i + 1
                        || (got.received_frames, got.received_bytes)
                            != (claimed.frames, claimed.bytes)
                    {
                        return Err(MigrateError::TunnelFailed(format!(
                            "Complete's totals for stream {} do not match what the tunnel delivered",
                            i + 1
                        )));
                    }
                }
                Ok(())
            }
            .await
        }
        Err(e) => Err(e),
    };
    let carried = first_at.map(|t| t.elapsed()).unwrap_or_default();
    if let Err(e) = verified {
        streams.abort_all();
        let code = e.abort_code(AbortCode::DestinationFailed);
        if let Ok(f) = sealer.seal(
            FrameType::Abort,
            Abort {
                code,
                message: e.to_string(),
            }
            .encode(),
        ) {
            let _ = tokio::time::timeout(ABORT_SEND_TIMEOUT, write_frame(&mut control_w, &f)).await;
        }
        tracing::warn!(error = %e, "tunnel aborted");
        return Err(e);
    }
    let f = sealer.seal(
        FrameType::Ready,
        Ready {
            pages: 0,
            device_state_len: 0,
        }
        .encode(),
    )?;
    write_frame(&mut control_w, &f).await?;
    // The sender ends its control stream: anything else there is an error (logged: every
    // byte was delivered and confirmed by now).
    match tokio::time::timeout(timeout, ctl_rx.recv()).await {
        Ok(Some(Ok(ControlIn::End))) => {}
        Ok(Some(Ok(ControlIn::Complete(_)))) => {
            tracing::warn!("a second Complete from the sender after Ready")
        }
        Ok(Some(Err(e))) => {
            tracing::warn!(error = %e, "the sender's control stream failed after Ready")
        }
        Ok(None) | Err(_) => {
            tracing::warn!("the sender did not end its control stream after Ready")
        }
    }
    let report = report(&negotiated, &done, setup, carried, false);
    tracing::info!("{}", report.summary());
    Ok(report)
}

/// Binds a data connection to the tunnel's session: its stream id and channel, or `None`
/// (logged) for a connection that did not bind — a stranger is dropped, not a failure.
fn bind_stream(
    session: &mut vmotion_proto::ReceiverSession,
    conn: Conn,
    bind: Result<WireFrame, ()>,
    peer: &crate::transport::Peer,
) -> Result<Option<(u16, Conn, Channel)>, MigrateError> {
    let Ok(frame) = bind else {
        tracing::warn!(%peer, "dropping a connection that sent no stream bind");
        return Ok(None);
    };
    match session.accept_data_stream(frame) {
        Ok((id, channel)) => Ok(Some((id, conn, channel))),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "dropping a connection that did not bind");
            Ok(None)
        }
    }
}

/// What the receiver reads on a tunnel's control stream after the handshake.
enum ControlIn {
    /// The sender's totals: every connection has closed.
    Complete(Complete),
    /// The sender's authenticated end of the control stream (after `Ready`).
    End,
}

/// Reads the sender's control frames until the stream ends or fails; an `Abort` arrives
/// as `PeerAborted`.
async fn receiver_control(
    mut r: ReadHalf,
    mut opener: Opener,
    tx: tokio::sync::mpsc::Sender<Result<ControlIn, MigrateError>>,
) {
    loop {
        let item = async {
            let mut f = read_frame(&mut r, opener.max_payload())
                .await?
                .ok_or_else(|| {
                    MigrateError::TunnelFailed("the sender closed the control connection".into())
                })?;
            let h = opener.open(&mut f)?;
            match Message::decode(h.frame_type, &f.payload)? {
                Message::Complete(c) => Ok(ControlIn::Complete(c)),
                Message::EndOfStream(_) => {
                    opener.finish()?;
                    Ok(ControlIn::End)
                }
                Message::Abort(a) => Err(MigrateError::PeerAborted {
                    code: a.code,
                    message: a.message,
                }),
                other => Err(PeerMisbehaved::UnexpectedFrame {
                    state: "tunnel (receiver)",
                    frame_type: other.frame_type(),
                }
                .into()),
            }
        }
        .await;
        let last = !matches!(item, Ok(ControlIn::Complete(_)));
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}
