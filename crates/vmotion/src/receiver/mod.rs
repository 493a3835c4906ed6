//! The destination side: [`Receiver`].
//!
//! - `mod.rs`: the API, [`Receiver::serve`] and its routing, the handshake;
//! - `guest.rs`: one guest migration after the handshake: pre-flight, data streams, the
//!   control stream until `Complete`, verification, `Ready` and the claim step;
//! - `streams.rs`: data connections: binding, receiving pages, the received-pages map.

mod dropped;
mod guest;
mod streams;

pub use dropped::Dropped;
use dropped::DroppedCounts;

use std::sync::Arc;
use std::time::Duration;

use crate::transport::{Accept, Conn, Endpoint, Peer};
use tracing::Instrument as _;
use vmotion_authority::{Arbiter, Authority};
use vmotion_mover::Sink;
use vmotion_proto::message::Hello;
use vmotion_proto::{
    AbortCode, FrameType, HelloReceived, KeyMaterial, MigrationId, Mode, ReceiverConfig,
    ReceiverHandshake, ReceiverNext, ReceiverSession, WireFrame, handshake_random,
};
use vmotion_session::ClaimConfig;

// Where data connections come from, shared with the tunnel.
pub(crate) use crate::accept::DataSource;
use crate::accept::first_frame;
use crate::error::MigrateError;
use crate::in_flight::InFlight;
use crate::wire::{read_frame, write_frame};

/// What a migration brings to this host: a guest into its sink, or a tunnel.
#[derive(Debug)]
pub enum Incoming<S> {
    /// A guest, committed here, with its sink.
    Vm(ReceiveReport, S),
    /// A tunnel that carried another hypervisor's migration to its destination here.
    Tunnel(crate::TunnelReport),
}

/// One migration's end, as [`Receiver::serve`] reports it.
#[derive(Debug)]
pub struct Finished<S> {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM, as the sender's `Hello` named it.
    pub vm_name: String,
    /// What came of it.
    pub result: Result<Incoming<S>, MigrateError>,
    /// Whether the handshake completed (both ends agreed on the mode and, if encrypted,
    /// proved they hold the key) before it ended.
    pub handshake_completed: bool,
}

/// What pre-flight prepared for a migration: its sink, or for a tunnel the hypervisor's
/// incoming address.
pub(crate) enum Prepared<S> {
    Sink(S),
    Tunnel(Endpoint),
}

/// Picks the destination hypervisor's incoming address for a tunnel from its `Hello`
/// (the VM name), or refuses it.
type TunnelTarget = Arc<dyn Fn(&Hello) -> Result<Endpoint, String> + Send + Sync>;
/// See [`Receiver::prepare_tunnels`].
pub(crate) type TunnelPrepare = Arc<dyn Fn(&Hello) -> Result<(), String> + Send + Sync>;

/// How a [`Receiver`] gets migration keys.
pub enum ReceiverKeys {
    /// Fetch by migration id from the key authority (the key service, with this host's
    /// certificate), which is also the arbiter.
    Service(Arc<dyn Authority>),
    /// An orchestrator handed this key in for this migration id.
    Direct {
        /// The migration.
        migration_id: MigrationId,
        /// The key.
        material: KeyMaterial,
    },
    /// This host cannot encrypt.
    None,
}

/// What the destination saw.
#[derive(Debug, Clone)]
pub struct ReceiveReport {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm_name: String,
    /// Encrypted or plaintext.
    pub mode: Mode,
    /// Pages received (resends included).
    pub pages: u64,
    /// Payload bytes received on the data streams.
    pub bytes: u64,
    /// Device state length.
    pub device_state_len: u64,
    /// Pre-copy iterations the source ran, its stop-and-copy pass included (0 if its
    /// totals were never verified).
    pub iterations: u32,
    /// The most key epochs any data stream used (1 = no key update).
    pub epochs: u32,
    /// The downtime as seen here: from the arrival of the stop-and-copy pass's start
    /// marker (the source paused the guest just before sending it) to the guest resumed
    /// here. It leaves out one network delay, so the source's own figure is a little
    /// longer. `None` if the guest did not resume here.
    pub downtime: Option<Duration>,
    /// From the end of the handshake to the end of the migration here.
    pub elapsed: Duration,
    /// How it ended here.
    pub outcome: ReceiveOutcome,
}

/// How a migration ended at the destination, when the source did not keep the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveOutcome {
    /// The claim won (at the arbiter; without one, `Commit` arrived) and the VM runs here.
    Committed,
    /// The claim won, but resuming the VM here failed (the reason): it is paused in the
    /// sink, which must not be discarded — it is the only copy that may run.
    CommittedNotResumed(String),
    /// `Ready` was sent but nothing settled where the VM runs (the reason: no `Commit`
    /// and an arbiter that did not answer, or none to ask): the sink is returned
    /// **paused**. It must be kept until the record is settled — resumed if the claim wins
    /// ([`Receiver::settle`]), discarded if the source kept the VM.
    Unsettled(String),
}

/// Builds and runs the destination side of one migration.
///
/// The receiver's view of a plaintext migration (the VM's policy disables encryption, so
/// no key is needed); see [`crate::Sender`] for an encrypted one.
///
/// ```
/// use vmotion::{KeySource, Receiver, ReceiverKeys, Sender};
/// use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
/// use vmotion_proto::{EncryptionPolicy, MigrationId, Mode, PlaintextReason, VmPolicy};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let addr = listener.local_addr().unwrap();
/// let source = tokio::spawn(async move {
///     let mut guest = SyntheticGuest::start(SyntheticConfig { pages: 512, ..Default::default() });
///     Sender::builder("batch-7")
///         .policy(VmPolicy { encryption: EncryptionPolicy::Disabled, vm_encrypted: false })
///         .key(KeySource::None { migration_id: MigrationId([3; 16]) })
///         .build()
///         .unwrap()
///         .migrate(addr, &mut guest)
///         .await
///         .map(|_| guest.snapshot())
/// });
///
/// // The sink is chosen from the sender's Hello: its size, page size and VM name.
/// let (report, sink) = Receiver::new(ReceiverKeys::None)
///     .receive(&listener, |hello| {
///         if hello.guest_pages > 1 << 20 {
///             return Err(format!("no room for {} pages", hello.guest_pages));
///         }
///         Ok(SyntheticGuest::blank(hello.guest_pages, u64::from(hello.page_size)))
///     })
///     .await
///     .unwrap();
/// assert_eq!(report.mode, Mode::Plaintext(PlaintextReason::PolicyDisabled));
/// assert_eq!(sink.snapshot(), source.await.unwrap().unwrap());
/// # });
/// ```
pub struct Receiver {
    config: ReceiverConfig,
    keys: ReceiverKeys,
    arbiter: Option<Arc<dyn Arbiter>>,
    timeout: Duration,
    progress_timeout: Duration,
    claim: ClaimConfig,
    incoming: InFlight,
    on_resumed: Option<ResumedHook>,
    tunnel_target: Option<TunnelTarget>,
    tunnel_prepare: Option<TunnelPrepare>,
    plaintext_tunnels: bool,
    dropped: Arc<DroppedCounts>,
    max_device_state: u64,
}

/// The largest device state a receiver accepts unless told otherwise: a KVM or QEMU
/// device state is kilobytes to a few MiB (QEMU's own travels through a tunnel, not here).
pub const DEFAULT_MAX_DEVICE_STATE: u64 = 32 << 20;

/// Called once a committed VM runs here (network announcements, the orchestrator...).
type ResumedHook = Arc<dyn Fn(&ReceiveReport) + Send + Sync>;

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver with the protocol's default limits. `can_encrypt` follows the keys.
    pub fn new(keys: ReceiverKeys) -> Self {
        let config = ReceiverConfig {
            can_encrypt: !matches!(keys, ReceiverKeys::None),
            ..ReceiverConfig::default()
        };
        let arbiter = match &keys {
            ReceiverKeys::Service(c) => Some(c.clone() as Arc<dyn Arbiter>),
            _ => None,
        };
        Self {
            config,
            keys,
            arbiter,
            timeout: Duration::from_secs(30),
            progress_timeout: crate::DEFAULT_PROGRESS_TIMEOUT,
            claim: ClaimConfig {
                arbiter: false,
                ..ClaimConfig::default()
            },
            incoming: InFlight::new(),
            on_resumed: None,
            tunnel_target: None,
            tunnel_prepare: None,
            plaintext_tunnels: false,
            dropped: Arc::default(),
            max_device_state: DEFAULT_MAX_DEVICE_STATE,
        }
    }

    /// The arbiter that decides, after `Commit`, whether this host may resume the VM (its
    /// claim). With keys from the key service the service is the arbiter; with keys handed
    /// in, pass the orchestrator's. Without one, `Commit` alone licenses the resume, and a
    /// lost `Commit` leaves the received guest paused and unsettled.
    pub fn arbiter(mut self, arbiter: Arc<dyn Arbiter>) -> Self {
        self.arbiter = Some(arbiter);
        self
    }

    /// How long a migration may go without a page or control frame from the source
    /// before it is abandoned (default 150 s, as KubeVirt's progress timeout; dead peers
    /// are found sooner by keepalive probes and `TCP_USER_TIMEOUT`).
    pub fn progress_timeout(mut self, t: Duration) -> Self {
        self.progress_timeout = t.max(Duration::from_millis(100));
        self
    }

    /// How long the claim step keeps asking an arbiter that does not answer before the
    /// received guest is returned unsettled (default 30 s).
    pub fn settle_timeout(mut self, t: Duration) -> Self {
        self.claim.settle_timeout = t;
        self
    }

    /// The VMs this receiver is taking in now.
    pub fn in_flight(&self) -> Vec<String> {
        self.incoming.list()
    }

    /// Connections [`serve`](Self::serve) dropped before any migration began, by reason.
    pub fn dropped_connections(&self) -> Vec<(Dropped, u64)> {
        self.dropped.snapshot()
    }

    /// A post-resume hook: called right after a committed VM is resumed here — the place
    /// for the network announcements of a vMotion's last step (`vmotion-announce`), which
    /// a mover may replace with its own. Keep it quick or hand the work to a thread.
    pub fn on_resumed(mut self, f: impl Fn(&ReceiveReport) + Send + Sync + 'static) -> Self {
        self.on_resumed = Some(Arc::new(f));
        self
    }

    /// Takes tunnelled migrations ([`crate::TunnelSender`]): `target` names, from the
    /// sender's `Hello` (its VM name), the address where the destination hypervisor waits
    /// for its incoming migration (QEMU's `-incoming`), or refuses the tunnel with a
    /// reason the sender gets. Without this, every tunnel is refused.
    pub fn tunnel_to(
        mut self,
        target: impl Fn(&Hello) -> Result<Endpoint, String> + Send + Sync + 'static,
    ) -> Self {
        self.tunnel_target = Some(Arc::new(target));
        self
    }

    /// Runs `prepare` for each tunnel once its handshake is authenticated, before any of
    /// its connections is delivered: e.g. to make the destination hypervisor listen
    /// (QEMU's `migrate-incoming` over QMP). It runs on a blocking thread; an `Err`
    /// aborts the tunnel with that reason, which the sender gets.
    pub fn prepare_tunnels(
        mut self,
        prepare: impl Fn(&Hello) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.tunnel_prepare = Some(Arc::new(prepare));
        self
    }

    /// Also take tunnels the negotiation makes plaintext. Off by default: a plaintext
    /// tunnel is not authenticated, so anyone who reaches this receiver could feed a
    /// waiting destination hypervisor a migration stream of their own.
    pub fn allow_plaintext_tunnels(mut self, yes: bool) -> Self {
        self.plaintext_tunnels = yes;
        self
    }

    /// Refuse every migration that would be plaintext.
    pub fn require_encryption(mut self, yes: bool) -> Self {
        self.config.require_encryption = yes;
        self
    }

    /// How long to wait for each step of the peer (handshake, data connections, the end
    /// of the streams after Complete, `Commit` after `Ready`).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Most data streams a sender may open (each costs one receive buffer of the
    /// negotiated maximum payload).
    pub fn max_streams(mut self, n: u16) -> Self {
        self.config.max_streams = n;
        self
    }

    /// Largest device state accepted, in bytes (default 32 MiB, at most the protocol's
    /// 1 GiB). With [`max_streams`](Self::max_streams) × the largest payload, it bounds
    /// what one arriving migration holds beyond the guest's own memory.
    pub fn max_device_state(mut self, bytes: u64) -> Self {
        self.max_device_state = bytes.min(vmotion_proto::message::MAX_DEVICE_STATE);
        self
    }

    /// Largest frame payload accepted (at least 64 KiB + 64 bytes, at most 2 MiB): the
    /// size of each stream's receive buffer.
    pub fn max_payload(mut self, bytes: u32) -> Self {
        self.config.max_payload = bytes;
        self
    }

    /// Receives one migration on `listener` (a `TcpListener`, `UnixListener` or
    /// [`Listener`](crate::Listener)): the control connection, then its data
    /// connections. `make_sink` sees the sender's `Hello` and builds the sink, or refuses
    /// (pre-flight: no room, unacceptable configuration) with a reason the sender gets.
    /// Returns the sink, resumed, once the VM is committed here.
    pub async fn receive<S: Sink>(
        &self,
        listener: &impl Accept,
        make_sink: impl FnOnce(&Hello) -> Result<S, String>,
    ) -> Result<(ReceiveReport, S), MigrateError> {
        let prepare = |h: &Hello| match h.kind {
            vmotion_proto::MigrationKind::Memory => make_sink(h).map(Prepared::Sink),
            vmotion_proto::MigrationKind::Tunnel => {
                Err("this receiver takes guests, not tunnels".to_owned())
            }
        };
        match self.accept_one(listener, prepare).await? {
            Incoming::Vm(r, s) => Ok((r, s)),
            Incoming::Tunnel(_) => Err(MigrateError::Internal("a tunnel was taken".into())),
        }
    }

    /// Receives one tunnelled migration on `listener` and delivers its connections where
    /// [`tunnel_to`](Self::tunnel_to) says (a receiver without it refuses).
    pub async fn receive_tunnel(
        &self,
        listener: &impl Accept,
    ) -> Result<crate::TunnelReport, MigrateError> {
        let prepare =
            |h: &Hello| -> Result<Prepared<vmotion_mover::synthetic::SyntheticGuest>, String> {
                match h.kind {
                    vmotion_proto::MigrationKind::Tunnel => {
                        self.tunnel_endpoint(h).map(Prepared::Tunnel)
                    }
                    vmotion_proto::MigrationKind::Memory => {
                        Err("this receiver takes tunnels, not guests".to_owned())
                    }
                }
            };
        match self.accept_one(listener, prepare).await? {
            Incoming::Tunnel(r) => Ok(r),
            Incoming::Vm(..) => Err(MigrateError::Internal("a guest was taken".into())),
        }
    }

    /// One migration accepted on `listener` and received.
    async fn accept_one<S: Sink>(
        &self,
        listener: &impl Accept,
        prepare: impl FnOnce(&Hello) -> Result<Prepared<S>, String>,
    ) -> Result<Incoming<S>, MigrateError> {
        let (control, hello) = self.accept_hello(listener).await?;
        let data = DataSource::Listener(listener);
        self.migrate_in(control, hello, data, prepare, &mut false)
            .await
    }

    /// One migration's control connection from `listener`, and its first frame.
    async fn accept_hello(
        &self,
        listener: &impl Accept,
    ) -> Result<(Conn, WireFrame), MigrateError> {
        let (mut control, _) = listener.accept_conn().await?;
        let hello = tokio::time::timeout(self.timeout, read_frame(&mut control, 4096))
            .await
            .map_err(|_| MigrateError::Timeout {
                waiting_for: "the sender's Hello",
                after: self.timeout,
            })??
            .ok_or(MigrateError::ConnectionClosed {
                during: "the handshake",
            })?;
        Ok((control, hello))
    }

    fn tunnel_endpoint(&self, h: &Hello) -> Result<Endpoint, String> {
        match &self.tunnel_target {
            Some(t) => t(h),
            None => Err("this receiver takes no tunnelled migrations".to_owned()),
        }
    }

    /// Serves migrations until `shutdown` completes: several at once on one listener,
    /// each connection routed by its first frame — a `Hello` starts a migration, a
    /// `StreamBind` joins the migration it names, anything else is dropped. `make_sink`
    /// builds each guest migration's sink (or refuses it); tunnels go where
    /// [`tunnel_to`](Self::tunnel_to) says; `done` gets every migration's result.
    /// At shutdown, migrations still in progress are dropped, never marked done; a
    /// sender then aborts and keeps its VM.
    pub async fn serve<S, F, D>(
        self: Arc<Self>,
        listener: impl Accept,
        make_sink: F,
        done: D,
        shutdown: impl Future<Output = ()>,
    ) where
        S: Sink + 'static,
        F: Fn(&Hello) -> Result<S, String> + Send + Sync + 'static,
        D: Fn(Finished<S>) + Send + Sync + 'static,
    {
        let routes: Routes = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let make_sink = Arc::new(make_sink);
        let done = Arc::new(done);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept_conn() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // Reap finished migrations so the set does not grow.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let (this, routes, make_sink, done) = (
                self.clone(),
                routes.clone(),
                make_sink.clone(),
                done.clone(),
            );
            tasks.spawn(async move {
                this.route(
                    tcp,
                    peer,
                    routes,
                    move |h| (make_sink)(h),
                    move |r| (done)(r),
                )
                .await;
            });
        }
        // Dropping the set aborts every migration still in progress.
        tasks.abort_all();
    }

    /// Classifies one connection by its first frame.
    async fn route<S: Sink>(
        &self,
        mut tcp: Conn,
        peer: Peer,
        routes: Routes,
        make_sink: impl FnOnce(&Hello) -> Result<S, String>,
        done: impl FnOnce(Finished<S>),
    ) {
        let Some(first) = first_frame(&mut tcp).await else {
            tracing::warn!(%peer, "dropping a connection without a first frame");
            return self.dropped.count(Dropped::NoFirstFrame);
        };
        match FrameType::from_u8(first.header[3]) {
            Some(FrameType::Hello) => {
                let Ok(h) = Hello::decode(&first.payload) else {
                    tracing::warn!(%peer, "dropping a malformed Hello");
                    return self.dropped.count(Dropped::MalformedHello);
                };
                let id = h.migration_id;
                let vm_name = h.vm_name.clone();
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                {
                    let mut r = routes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if r.contains_key(&id) {
                        tracing::warn!(%peer, migration = %id, "a migration with this id is already in progress");
                        return self.dropped.count(Dropped::DuplicateMigration);
                    }
                    r.insert(id, tx);
                }
                let prepare = |h: &Hello| match h.kind {
                    vmotion_proto::MigrationKind::Memory => make_sink(h).map(Prepared::Sink),
                    vmotion_proto::MigrationKind::Tunnel => {
                        self.tunnel_endpoint(h).map(Prepared::Tunnel)
                    }
                };
                let mut handshake_completed = false;
                let result = self
                    .migrate_in(
                        tcp,
                        first,
                        DataSource::<crate::Listener>::Routed(rx),
                        prepare,
                        &mut handshake_completed,
                    )
                    .await;
                routes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                done(Finished {
                    migration_id: id,
                    vm_name,
                    result,
                    handshake_completed,
                });
            }
            Some(FrameType::StreamBind) => {
                let Ok(bind) = ReceiverSession::peek_stream_bind(&first) else {
                    tracing::warn!(%peer, "dropping a malformed stream bind");
                    return self.dropped.count(Dropped::MalformedStreamBind);
                };
                let tx = routes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&bind.migration_id)
                    .cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.send((tcp, first, peer)).await;
                    }
                    None => {
                        tracing::warn!(%peer, migration = %bind.migration_id, "dropping a stream bind for no migration in progress");
                        self.dropped.count(Dropped::UnknownStreamBind);
                    }
                }
            }
            _ => {
                tracing::warn!(%peer, "dropping a connection that starts with neither Hello nor StreamBind");
                self.dropped.count(Dropped::NotAMigration);
            }
        }
    }

    /// One migration, its control connection accepted and its `Hello` read: the
    /// handshake, then a guest ([`guest`]) or a tunnel ([`crate::tunnel`]).
    async fn migrate_in<S: Sink>(
        &self,
        mut control: Conn,
        hello: WireFrame,
        data: DataSource<'_, impl Accept>,
        prepare: impl FnOnce(&Hello) -> Result<Prepared<S>, String>,
        handshake_completed: &mut bool,
    ) -> Result<Incoming<S>, MigrateError> {
        let started = std::time::Instant::now();
        let random =
            handshake_random().map_err(|_| MigrateError::Internal("no OS randomness".into()))?;
        let received = match ReceiverHandshake::start(self.config.clone(), random).handle(hello) {
            Ok(r) => r,
            Err(f) => {
                if let Some(a) = &f.abort {
                    let _ = write_frame(&mut control, a).await;
                }
                return Err(f.into());
            }
        };
        let hello = received.hello().clone();
        let span = tracing::info_span!("migration", id = %hello.migration_id, vm = %hello.vm_name);
        async move {
            let _in_flight = match self.incoming.claim(&hello.vm_name) {
                Ok(g) => g,
                Err(e) => {
                    return reject(&mut control, received, AbortCode::PreflightRefused, e).await;
                }
            };
            let mut prepare = Some(prepare);
            let tunnel = match hello.kind {
                vmotion_proto::MigrationKind::Memory => None,
                vmotion_proto::MigrationKind::Tunnel => {
                    let p = prepare.take().map(|p| p(&hello));
                    match self.tunnel_preflight(p, &received) {
                        Ok(t) => Some(t),
                        Err((code, e)) => return reject(&mut control, received, code, e).await,
                    }
                }
            };
            let key = match self.key_for(&hello, &received).await {
                Ok(k) => k,
                Err(e) => {
                    return reject(&mut control, received, AbortCode::KeyUnavailable, e).await;
                }
            };
            let session = self.finish_handshake(&mut control, received, key).await?;
            tracing::info!(mode = ?session.negotiated().mode, "handshake done");
            *handshake_completed = true;
            if let Some(target) = tunnel {
                let prepare = self.tunnel_prepare.clone().map(|p| (p, hello.clone()));
                return crate::tunnel::receive_tunnel(
                    session,
                    control,
                    data,
                    (target, prepare),
                    self.timeout,
                    started.elapsed(),
                )
                .await
                .map(Incoming::Tunnel);
            }
            let prepare = prepare
                .take()
                .ok_or_else(|| MigrateError::Internal("no pre-flight".into()))?;
            self.receive_guest(session, control, data, &hello, prepare)
                .await
                .map(|(report, sink)| Incoming::Vm(report, sink))
        }
        .instrument(span)
        .await
    }

    /// Pre-flight for a tunnel: it must have a target, and a plaintext one must be
    /// allowed here (a tunnel feeds a hypervisor that waits for its guest: unauthenticated
    /// bytes must not reach it unless this host says so).
    fn tunnel_preflight<S>(
        &self,
        prepared: Option<Result<Prepared<S>, String>>,
        received: &HelloReceived,
    ) -> Result<Endpoint, (AbortCode, MigrateError)> {
        let target = match prepared {
            Some(Ok(Prepared::Tunnel(t))) => t,
            Some(Ok(Prepared::Sink(_))) => {
                return Err((
                    AbortCode::InternalError,
                    MigrateError::Internal("a sink for a tunnel".into()),
                ));
            }
            Some(Err(reason)) => {
                return Err((
                    AbortCode::PreflightRefused,
                    MigrateError::PreflightRefused(reason),
                ));
            }
            None => {
                return Err((
                    AbortCode::InternalError,
                    MigrateError::Internal("no pre-flight".into()),
                ));
            }
        };
        if !self.plaintext_tunnels
            && matches!(received.decision(), vmotion_proto::Decision::Plaintext(_))
        {
            return Err((
                AbortCode::ReceiverRequiresEncryption,
                MigrateError::Refused(vmotion_proto::Refusal::ReceiverRequiresEncryption),
            ));
        }
        Ok(target)
    }

    /// The migration key, when the negotiation needs one. The key names the VM it was
    /// issued for: a sender cannot use one VM's migration to deliver another (a tunnel's
    /// VM name picks its target).
    async fn key_for(
        &self,
        hello: &Hello,
        received: &HelloReceived,
    ) -> Result<Option<KeyMaterial>, MigrateError> {
        if !received.needs_key() {
            return Ok(None);
        }
        let no_key = MigrateError::NoKey;
        match &self.keys {
            ReceiverKeys::Service(c) => match c.fetch_key(hello.migration_id).await {
                Ok(k) if k.vm == hello.vm_name => Ok(Some(k.material)),
                Ok(k) => Err(no_key(format!(
                    "the key service issued this migration for VM `{}`, not `{}`",
                    k.vm, hello.vm_name
                ))),
                Err(e) => Err(no_key(format!("no key for this migration: {e}"))),
            },
            ReceiverKeys::Direct {
                migration_id,
                material,
            } if *migration_id == hello.migration_id => Ok(Some(KeyMaterial {
                key: vmotion_proto::MigrationKey::from_bytes(*material.key.expose_secret()),
                nonce: material.nonce,
            })),
            _ => Err(no_key("no key for this migration".to_owned())),
        }
    }

    /// Answers the `Hello` and, when encrypted, checks the sender's key confirmation.
    async fn finish_handshake(
        &self,
        control: &mut Conn,
        received: HelloReceived,
        key: Option<KeyMaterial>,
    ) -> Result<ReceiverSession, MigrateError> {
        let (next, frames) = received.accept(key)?;
        for f in &frames {
            write_frame(control, f).await?;
        }
        match next {
            ReceiverNext::Refused(r) => Err(MigrateError::Refused(r)),
            ReceiverNext::Established(s) => Ok(s),
            ReceiverNext::ExpectKeyConfirm(state) => {
                let kc = tokio::time::timeout(self.timeout, read_frame(control, 4096))
                    .await
                    .map_err(|_| MigrateError::Timeout {
                        waiting_for: "the sender's key confirmation",
                        after: self.timeout,
                    })??
                    .ok_or(MigrateError::ConnectionClosed {
                        during: "the handshake",
                    })?;
                match state.handle(kc) {
                    Ok(s) => Ok(s),
                    Err(f) => {
                        if let Some(a) = &f.abort {
                            let _ = write_frame(control, a).await;
                        }
                        Err(f.into())
                    }
                }
            }
        }
    }

    /// A restarted destination holds a verified guest (persisted before its `Ready`) whose
    /// claim never settled: asks the arbiter, then resumes the sink (the claim won) or
    /// discards it (the source kept the VM). Without an arbiter, or with one that does not
    /// answer within the settle timeout, the sink is left as it is: `Unsettled`.
    pub async fn settle(
        &self,
        migration_id: MigrationId,
        sink: &mut dyn Sink,
    ) -> vmotion_session::DestinationOutcome {
        let cfg = ClaimConfig {
            arbiter: self.arbiter.is_some(),
            ..self.claim
        };
        crate::claim::settle(cfg, self.arbiter.as_deref(), migration_id, sink).await
    }
}

/// Refuses a migration whose `Hello` was read: the answer carries the code and the reason
/// (a plain `HelloAck` refusal: no keys exist yet to seal an `Abort` with).
async fn reject<T>(
    control: &mut Conn,
    received: HelloReceived,
    code: AbortCode,
    e: MigrateError,
) -> Result<T, MigrateError> {
    let frame = received.reject(code, &e.to_string())?;
    let _ = tokio::time::timeout(
        crate::control::ABORT_SEND_TIMEOUT,
        write_frame(control, &frame),
    )
    .await;
    Err(e)
}

/// The routing table of [`Receiver::serve`]: migration id → where its data connections go.
type Routes = Arc<
    std::sync::Mutex<
        std::collections::HashMap<MigrationId, tokio::sync::mpsc::Sender<(Conn, WireFrame, Peer)>>,
    >,
>;
