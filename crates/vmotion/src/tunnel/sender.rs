//! The source end of a tunnel: [`TunnelSender`] gets the key and negotiates, and
//! [`NegotiatedTunnel::run`] carries the hypervisor's connections, one data stream each,
//! then confirms the totals with the receiver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument as _;
use vmotion_proto::message::{Complete, Ready, StreamTotals};
use vmotion_proto::{
    AbortCode, EpochLimits, FrameType, MigrationId, MigrationKind, Negotiated, SenderConfig,
    SenderHandshake, SenderSession, VmPolicy, handshake_random,
};

use super::pump::Pumps;
use super::{DEFAULT_MAX_CONNECTIONS, MAX_ACCEPT_TIMEOUT, TunnelReport, await_peer_end};
use crate::connect::{
    Admission, HANDSHAKE_TIMEOUT, KeySource, NetOptions, QueuedFn, connect, handshake, resolve_key,
};
use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::error::MigrateError;
use crate::transport::{Accept, Conn, Endpoint};
use crate::wire::write_frame;

/// How long the receiver may take to confirm the tunnel's totals with `Ready` (and to
/// take each control frame).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3 * HANDSHAKE_TIMEOUT.as_secs());

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
    admission: Admission,
    on_queued: Option<QueuedFn>,
}

/// Builder of a [`TunnelSender`].
#[derive(Debug)]
pub struct TunnelSenderBuilder(TunnelSender);

impl TunnelSender {
    /// A tunnel for `vm_name`: opportunistic policy, no key (set one), at most
    /// [`DEFAULT_MAX_CONNECTIONS`] connections, QEMU given 2 minutes to connect, a
    /// [`DEFAULT_QUEUE_TIMEOUT`](crate::DEFAULT_QUEUE_TIMEOUT) for an admission slot at
    /// the key authority.
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
            admission: Admission::default(),
            on_queued: None,
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

    /// How long [`TunnelSender::negotiate`] waits for an admission slot while the key
    /// authority answers that its admission limits are reached; past it,
    /// [`MigrateError::QueueTimeout`]. Zero: do not wait.
    pub fn queue_timeout(mut self, t: Duration) -> Self {
        self.0.admission.queue_timeout = t;
        self
    }

    /// Calls `f` with the time waited, at least every second, while waiting for an
    /// admission slot.
    pub fn on_queued(mut self, f: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        self.0.on_queued = Some(QueuedFn(Arc::new(f)));
        self
    }

    /// Asks the key authority to abort this host's own earlier, still open migration of
    /// the VM (a sender that died before its switchover) instead of refusing with
    /// [`AuthorityError::VmInFlight`](crate::AuthorityError::VmInFlight).
    pub fn abort_stale(mut self, abort_stale: bool) -> Self {
        self.0.admission.abort_stale = abort_stale;
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
        let on_queued = self.on_queued.clone();
        let queued = move |waited: Duration| {
            if let Some(f) = &on_queued {
                (f.0)(waited);
            }
        };
        let keyed = resolve_key(self.key, &self.vm_name, None, self.admission, &queued).await?;
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
            device: Default::default(),
            limits: self.limits,
            random: handshake_random()
                .map_err(|_| MigrateError::Internal("no OS randomness".into()))?,
        };
        let record_aborted = async || {
            crate::claim::abort_record(arbiter.as_deref(), migration_id).await;
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

impl NegotiatedTunnel {
    /// What the two ends agreed on (mode, limits, the migration id).
    pub fn negotiated(&self) -> &Negotiated {
        self.session.negotiated()
    }

    /// The handle that records the hypervisor's verdict at the arbiter, for a caller that
    /// learns it (QEMU's `query-migrate`). The tunnel itself records nothing once
    /// negotiated: it carries bytes and cannot know where the VM runs. Until a verdict
    /// is recorded the key service holds the VM as in flight.
    pub fn verdict(&self) -> TunnelVerdict {
        TunnelVerdict {
            arbiter: self._arbiter.clone(),
            id: self.session.negotiated().migration_id,
        }
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
        async move {
            let mut carrier = Carrier::start(self)?;
            let carried = match carrier.carry(local, cancel).await {
                Ok(()) => carrier.confirm().await,
                Err(e) => Err(e),
            };
            if let Err(e) = &carried {
                carrier.abort(e).await;
            }
            carried
        }
        .instrument(span)
        .await
    }
}

/// Records a tunnelled migration's outcome as the hypervisor tells it
/// ([`NegotiatedTunnel::verdict`]). Without an arbiter (no key service) both are no-ops.
#[derive(Clone)]
pub struct TunnelVerdict {
    arbiter: Option<Arc<dyn vmotion_authority::Arbiter>>,
    id: MigrationId,
}

impl std::fmt::Debug for TunnelVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelVerdict")
            .field("id", &self.id)
            .field("arbiter", &self.arbiter.is_some())
            .finish()
    }
}

impl TunnelVerdict {
    /// The hypervisor completed its migration (the VM runs at the destination): records
    /// `committed`, which frees the VM for its next migration.
    pub async fn completed(&self) -> Result<(), vmotion_authority::ArbiterError> {
        self.record(vmotion_authority::Transition::Commit).await
    }

    /// The hypervisor's migration failed or was cancelled (the VM runs at the source):
    /// records `aborted`.
    pub async fn failed(&self) -> Result<(), vmotion_authority::ArbiterError> {
        self.record(vmotion_authority::Transition::Abort).await
    }

    async fn record(
        &self,
        t: vmotion_authority::Transition,
    ) -> Result<(), vmotion_authority::ArbiterError> {
        match &self.arbiter {
            Some(a) => crate::claim::record(a.as_ref(), self.id, Some(t))
                .await
                .map(drop),
            None => Ok(()),
        }
    }
}

/// A negotiated tunnel while it carries: the session that opens data streams, the
/// control connection both ways, and the pumps.
struct Carrier {
    session: SenderSession,
    negotiated: Negotiated,
    to: Endpoint,
    net: NetOptions,
    reader: ControlReader,
    writer: ControlWriter,
    pumps: Pumps,
    next_id: u16,
    first_at: Option<Instant>,
    /// When the last running connection closed (none runs since).
    idle_since: Option<tokio::time::Instant>,
    started: Instant,
    setup: Duration,
    accept_timeout: Duration,
    linger: Duration,
    /// Held to the end: the arbiter, and this VM's in-flight slot.
    _held: (
        Option<Arc<dyn vmotion_authority::Arbiter>>,
        crate::in_flight::InFlightGuard,
    ),
}

impl Carrier {
    fn start(t: NegotiatedTunnel) -> Result<Self, MigrateError> {
        let NegotiatedTunnel {
            mut session,
            control,
            to,
            net,
            _arbiter,
            _in_flight,
            started,
            setup,
            accept_timeout,
            linger,
            span: _,
        } = t;
        let negotiated = session.negotiated().clone();
        let (reader, writer) = super::control(control, session.take_control()?, CONFIRM_TIMEOUT);
        Ok(Self {
            session,
            negotiated,
            to,
            net,
            reader,
            writer,
            pumps: Pumps::default(),
            next_id: 1,
            first_at: None,
            idle_since: None,
            started,
            setup,
            accept_timeout,
            linger,
            _held: (_arbiter, _in_flight),
        })
    }

    /// Carries the hypervisor's connections until all have closed and none followed
    /// within the linger time.
    async fn carry(
        &mut self,
        local: &impl Accept,
        cancel: impl Future<Output = ()>,
    ) -> Result<(), MigrateError> {
        let accept_deadline = tokio::time::Instant::now() + self.accept_timeout;
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        tokio::pin!(cancel);
        loop {
            let linger_at = self.idle_since.map_or_else(far, |t| t + self.linger);
            tokio::select! {
                () = &mut cancel => {
                    return Err(MigrateError::TunnelFailed("the tunnel was cancelled".into()));
                }
                () = tokio::time::sleep_until(accept_deadline), if self.first_at.is_none() => {
                    return Err(MigrateError::TunnelFailed(format!(
                        "the hypervisor did not connect within {:?}",
                        self.accept_timeout
                    )));
                }
                () = tokio::time::sleep_until(linger_at), if self.idle_since.is_some() => {
                    return Ok(());
                }
                accepted = local.accept_conn() => self.open(accepted?.0).await?,
                Some(ended) = self.pumps.next_end() => match ended {
                    Ok(()) if self.pumps.is_empty() => {
                        self.idle_since = Some(tokio::time::Instant::now());
                    }
                    Ok(()) => {}
                    // A stream the receiver dropped: its Abort says why.
                    Err(failed) => return Err(failed.explained(&mut self.reader).await),
                },
                event = self.reader.next() => {
                    return Err(event.into_error("tunnel (sender), before Complete"));
                }
            }
        }
    }

    /// Opens the next data stream to the receiver for the hypervisor's new connection
    /// `conn`, and pumps it.
    async fn open(&mut self, conn: Conn) -> Result<(), MigrateError> {
        if self.next_id > self.negotiated.streams {
            return Err(MigrateError::TunnelFailed(format!(
                "the hypervisor opened more than {} connections (raise the tunnel's maximum)",
                self.negotiated.streams
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.first_at.get_or_insert_with(Instant::now);
        self.idle_since = None;
        let (bind, channel) = self.session.open_data_stream(id)?;
        let mut remote = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&self.to, self.net))
            .await
            .map_err(|_| {
                MigrateError::TunnelFailed("connecting a tunnel stream timed out".into())
            })??;
        write_frame(&mut remote, &bind).await?;
        tracing::info!(stream = id, "carrying a hypervisor connection");
        self.pumps.spawn(id, conn, remote, channel);
        Ok(())
    }

    /// Every connection closed: `Complete` with each stream's totals, the receiver's
    /// `Ready`, then the end of the control stream both ways.
    async fn confirm(&mut self) -> Result<TunnelReport, MigrateError> {
        // Up to the last close, not the linger after it.
        let carried = match (self.first_at, self.idle_since) {
            (Some(first), Some(idle)) => idle.into_std().saturating_duration_since(first),
            (Some(first), None) => first.elapsed(),
            _ => Duration::ZERO,
        };
        let streams = self.pumps.done().iter();
        let complete = Complete {
            iterations: 0,
            pages: 0,
            device_state_len: 0,
            streams: streams
                .map(|(_, s)| StreamTotals {
                    frames: s.sent_frames,
                    bytes: s.sent_bytes,
                })
                .collect(),
        };
        self.writer
            .send(FrameType::Complete, complete.encode()?)
            .await?;
        let answer = tokio::time::timeout(CONFIRM_TIMEOUT, self.reader.next())
            .await
            .map_err(|_| {
                MigrateError::TunnelFailed(
                    "the receiver did not confirm the tunnel's totals".into(),
                )
            })?;
        match answer {
            ControlEvent::Frame(FrameType::Ready, payload) => {
                Ready::decode(&payload)?;
            }
            other => return Err(other.into_error("tunnel (sender), after Complete")),
        }
        self.writer.finish().await;
        await_peer_end(
            &mut self.reader,
            HANDSHAKE_TIMEOUT,
            "tunnel (sender), after Ready",
        )
        .await;
        let report = TunnelReport::new(
            &self.negotiated,
            self.pumps.done(),
            self.setup,
            carried,
            true,
        );
        tracing::info!(total = ?self.started.elapsed(), "{}", report.summary());
        Ok(report)
    }

    /// Tells the receiver, which drops its hypervisor's connections, and drops ours.
    async fn abort(&mut self, e: &MigrateError) {
        self.writer.abort_for(e, AbortCode::SourceFailed).await;
        self.pumps.abort_all();
        tracing::warn!(error = %e, "tunnel aborted");
    }
}
