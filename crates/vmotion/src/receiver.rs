//! The destination side: [`Receiver`].

use std::sync::Arc;
use std::time::Duration;

use crate::transport::{Accept, Conn, Endpoint, Peer, ReadHalf};
use tracing::Instrument as _;
use vmotion_keyservice::KeyServiceClient;
use vmotion_keyservice::api::Outcome as RecordedOutcome;
use vmotion_mover::{GuestMemory, VmControl};
use vmotion_proto::message::{
    Abort, Complete, DeviceStateChunk, Hello, MAX_DEVICE_STATE, Message, PagesView, Ready,
};
use vmotion_proto::{
    AbortCode, AlignedBuf, FrameType, KeyMaterial, MigrationId, Mode, Opener, PeerMisbehaved,
    ReceiverConfig, ReceiverHandshake, ReceiverNext, ReceiverSession, WireFrame, handshake_random,
};

use crate::error::MigrateError;
use crate::wire::{read_frame, read_open, write_frame};

/// Where an incoming guest goes: its memory and its control (device state, resume).
pub trait Sink: Send {
    /// Guest memory, shared with the stream tasks.
    fn memory(&self) -> Arc<dyn GuestMemory>;
    /// Loads the device state and resumes the VM on commit.
    fn control(&mut self) -> &mut dyn VmControl;
}

/// What a migration brings to this host: a guest into its sink, or a tunnel.
#[derive(Debug)]
pub enum Incoming<S> {
    /// A guest, committed here, with its sink.
    Vm(ReceiveReport, S),
    /// A tunnel that carried another hypervisor's migration to its destination here.
    Tunnel(crate::TunnelReport),
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

/// How a [`Receiver`] gets migration keys.
pub enum ReceiverKeys {
    /// Fetch by migration id from the key service (with this host's certificate).
    Service(Arc<KeyServiceClient>),
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
    /// How it ended here.
    pub outcome: ReceiveOutcome,
}

/// How a migration ended at the destination, when it did not abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveOutcome {
    /// Committed, and the VM runs here.
    Committed,
    /// Committed, but resuming the VM here failed (the reason): it is paused in the sink,
    /// which must not be discarded — it is the only copy that may run.
    CommittedNotResumed(String),
    /// `Ready` was sent but neither `Commit` nor `Abort` arrived, and the key service gave
    /// no answer (or there is none): the sink is returned **paused**. It must be kept until
    /// the outcome is settled — resumed if the source recorded "committed", discarded if
    /// not.
    Unknown,
}

/// Aborts the stream tasks when `receive` returns, whichever way: no task keeps writing
/// into the sink after an error.
/// Kept with their stream id: connections bind in any order (routed ones especially),
/// while `Complete` lists totals by stream id.
struct StreamTasks(
    Vec<(
        u16,
        tokio::task::JoinHandle<Result<StreamStats, MigrateError>>,
    )>,
);

impl Drop for StreamTasks {
    fn drop(&mut self) {
        for (_, t) in &self.0 {
            t.abort();
        }
    }
}

/// Which pages arrived at least once: checked before `Ready`, so a sender that skipped a
/// page cannot get a commit.
struct Received {
    words: Vec<std::sync::atomic::AtomicU64>,
    pages: u64,
}

impl Received {
    fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            pages,
        }
    }

    fn mark(&self, page: u64) {
        self.words[(page / 64) as usize]
            .fetch_or(1 << (page % 64), std::sync::atomic::Ordering::Relaxed);
    }

    fn missing(&self) -> u64 {
        let have: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(std::sync::atomic::Ordering::Relaxed).count_ones()))
            .sum();
        self.pages - have
    }
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
    timeout: Duration,
    on_resumed: Option<ResumedHook>,
    tunnel_target: Option<TunnelTarget>,
    plaintext_tunnels: bool,
}

/// Called once a committed VM runs here (network announcements, the orchestrator...).
type ResumedHook = Arc<dyn Fn(&ReceiveReport) + Send + Sync>;

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct StreamStats {
    pages: u64,
    frames: u64,
    bytes: u64,
}

impl Receiver {
    /// A receiver with the protocol's default limits. `can_encrypt` follows the keys.
    pub fn new(keys: ReceiverKeys) -> Self {
        let config = ReceiverConfig {
            can_encrypt: !matches!(keys, ReceiverKeys::None),
            ..ReceiverConfig::default()
        };
        Self {
            config,
            keys,
            timeout: Duration::from_secs(30),
            on_resumed: None,
            tunnel_target: None,
            plaintext_tunnels: false,
        }
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
    /// of the streams after Complete, Commit).
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
        let (control, hello) = self.accept_hello(listener).await?;
        let prepare = |h: &Hello| match h.kind {
            vmotion_proto::MigrationKind::Memory => make_sink(h).map(Prepared::Sink),
            vmotion_proto::MigrationKind::Tunnel => {
                Err("this receiver takes guests, not tunnels".to_owned())
            }
        };
        match self
            .migrate_in(control, hello, DataSource::Listener(listener), prepare)
            .await?
        {
            Incoming::Vm(r, s) => Ok((r, s)),
            Incoming::Tunnel(_) => Err(MigrateError::Options("a tunnel was taken".into())),
        }
    }

    /// Receives one tunnelled migration on `listener` and delivers its connections where
    /// [`tunnel_to`](Self::tunnel_to) says (a receiver without it refuses).
    pub async fn receive_tunnel(
        &self,
        listener: &impl Accept,
    ) -> Result<crate::TunnelReport, MigrateError> {
        let (control, hello) = self.accept_hello(listener).await?;
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
        match self
            .migrate_in(control, hello, DataSource::Listener(listener), prepare)
            .await?
        {
            Incoming::Tunnel(r) => Ok(r),
            Incoming::Vm(..) => Err(MigrateError::Options("a guest was taken".into())),
        }
    }

    /// One migration's control connection from `listener`, and its first frame.
    async fn accept_hello(
        &self,
        listener: &impl Accept,
    ) -> Result<(Conn, WireFrame), MigrateError> {
        let (mut control, _) = listener.accept_conn().await?;
        let hello = tokio::time::timeout(self.timeout, read_frame(&mut control, 4096))
            .await
            .map_err(|_| {
                MigrateError::Aborted("the sender went silent during the handshake".into())
            })??
            .ok_or_else(|| MigrateError::Aborted("the sender closed the connection".into()))?;
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
        D: Fn(Result<Incoming<S>, MigrateError>) + Send + Sync + 'static,
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
        done: impl FnOnce(Result<Incoming<S>, MigrateError>),
    ) {
        let first =
            match tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tcp, 4096)).await {
                Ok(Ok(Some(f))) => f,
                _ => {
                    tracing::warn!(%peer, "dropping a connection without a first frame");
                    return;
                }
            };
        match FrameType::from_u8(first.header[3]) {
            Some(FrameType::Hello) => {
                let Ok(h) = Hello::decode(&first.payload) else {
                    tracing::warn!(%peer, "dropping a malformed Hello");
                    return;
                };
                let id = h.migration_id;
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                {
                    let mut r = routes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if r.contains_key(&id) {
                        tracing::warn!(%peer, migration = %id, "a migration with this id is already in progress");
                        return;
                    }
                    r.insert(id, tx);
                }
                let prepare = |h: &Hello| match h.kind {
                    vmotion_proto::MigrationKind::Memory => make_sink(h).map(Prepared::Sink),
                    vmotion_proto::MigrationKind::Tunnel => {
                        self.tunnel_endpoint(h).map(Prepared::Tunnel)
                    }
                };
                let result = self
                    .migrate_in(
                        tcp,
                        first,
                        DataSource::<crate::Listener>::Routed(rx),
                        prepare,
                    )
                    .await;
                routes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                done(result);
            }
            Some(FrameType::StreamBind) => {
                let Ok(bind) = ReceiverSession::peek_stream_bind(&first) else {
                    tracing::warn!(%peer, "dropping a malformed stream bind");
                    return;
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
                        tracing::warn!(%peer, migration = %bind.migration_id, "dropping a stream bind for no migration in progress")
                    }
                }
            }
            _ => {
                tracing::warn!(%peer, "dropping a connection that starts with neither Hello nor StreamBind")
            }
        }
    }

    /// One migration, its control connection accepted and its `Hello` read.
    async fn migrate_in<S: Sink>(
        &self,
        mut control: Conn,
        hello: WireFrame,
        mut data: DataSource<'_, impl Accept>,
        prepare: impl FnOnce(&Hello) -> Result<Prepared<S>, String>,
    ) -> Result<Incoming<S>, MigrateError> {
        let started = std::time::Instant::now();
        let timed_out =
            || MigrateError::Aborted("the sender went silent during the handshake".into());
        let random =
            handshake_random().map_err(|_| MigrateError::Options("no OS randomness".into()))?;
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
        let migration_id = hello.migration_id;
        let span = tracing::info_span!("migration", id = %migration_id, vm = %hello.vm_name);
        async move {
        let _in_flight = match crate::InFlight::claim(&crate::INCOMING, &hello.vm_name) {
            Ok(g) => g,
            Err(e) => {
                let abort = received.reject(AbortCode::DestinationFailed, &e.to_string())?;
                let _ = write_frame(&mut control, &abort).await;
                return Err(e);
            }
        };

        // Pre-flight for a tunnel: it must have a target. A guest's sink is made only
        // once the handshake has authenticated the sender (below): making one may
        // overwrite what a sink holds (a memory file), which an unauthenticated `Hello`
        // must not be able to do.
        let mut prepare = Some(prepare);
        let tunnel = match hello.kind {
            vmotion_proto::MigrationKind::Memory => None,
            vmotion_proto::MigrationKind::Tunnel => {
                let prepared = prepare.take().map(|p| p(&hello));
                Some(match prepared {
                    Some(Ok(Prepared::Tunnel(t))) => Ok(t),
                    Some(Ok(Prepared::Sink(_))) => Err("a sink for a tunnel".to_owned()),
                    Some(Err(reason)) => Err(reason),
                    None => Err("no pre-flight".to_owned()),
                })
            }
        };
        // A tunnel feeds a hypervisor that waits for its guest: unauthenticated bytes
        // must not reach it unless this host says so.
        if matches!(tunnel, Some(Ok(_)))
            && !self.plaintext_tunnels
            && matches!(received.decision(), vmotion_proto::Decision::Plaintext(_))
        {
            let reason = "this host takes tunnels encrypted only (this one would be plaintext)";
            let abort = received.reject(AbortCode::ReceiverRequiresEncryption, reason)?;
            let _ = write_frame(&mut control, &abort).await;
            return Err(MigrateError::Refused(
                vmotion_proto::Refusal::ReceiverRequiresEncryption,
            ));
        }
        let tunnel = match tunnel {
            Some(Err(reason)) => {
                let abort = received.reject(AbortCode::DestinationFailed, &reason)?;
                let _ = write_frame(&mut control, &abort).await;
                return Err(MigrateError::Aborted(format!(
                    "pre-flight refused: {reason}"
                )));
            }
            Some(Ok(t)) => Some(t),
            None => None,
        };

        let key = if received.needs_key() {
            let fetched = match &self.keys {
                // The key names the VM it was issued for: a sender cannot use one VM's
                // migration to deliver another (a tunnel's VM name picks its target).
                ReceiverKeys::Service(c) => match c.fetch_key(migration_id).await {
                    Ok(k) if k.vm == hello.vm_name => Ok(k.material),
                    Ok(k) => Err(format!(
                        "the key service issued this migration for VM `{}`, not `{}`",
                        k.vm, hello.vm_name
                    )),
                    Err(e) => Err(e.to_string()),
                },
                ReceiverKeys::Direct {
                    migration_id: id,
                    material,
                } if *id == migration_id => Ok(KeyMaterial {
                    key: vmotion_proto::MigrationKey::from_bytes(*material.key.expose_secret()),
                    nonce: material.nonce,
                }),
                _ => Err("no key for this migration".to_owned()),
            };
            match fetched {
                Ok(k) => Some(k),
                Err(reason) => {
                    let abort = received.reject(AbortCode::KeyUnavailable, &reason)?;
                    let _ = write_frame(&mut control, &abort).await;
                    return Err(MigrateError::Aborted(format!("no key: {reason}")));
                }
            }
        } else {
            None
        };
        let (next, frames) = received.accept(key)?;
        for f in &frames {
            write_frame(&mut control, f).await?;
        }
        let mut session: ReceiverSession = match next {
            ReceiverNext::Refused(r) => return Err(MigrateError::Refused(r)),
            ReceiverNext::Established(s) => s,
            ReceiverNext::ExpectKeyConfirm(state) => {
                let kc = tokio::time::timeout(self.timeout, read_frame(&mut control, 4096))
                    .await
                    .map_err(|_| timed_out())??
                    .ok_or_else(|| {
                        MigrateError::Aborted("the sender closed the connection".into())
                    })?;
                match state.handle(kc) {
                    Ok(s) => s,
                    Err(f) => {
                        if let Some(a) = &f.abort {
                            let _ = write_frame(&mut control, a).await;
                        }
                        return Err(f.into());
                    }
                }
            }
        };
        let negotiated = session.negotiated().clone();
        tracing::info!(migration = %migration_id, mode = ?negotiated.mode, "handshake done");
        if let Some(target) = tunnel {
            return crate::tunnel::receive_tunnel(
                session,
                control,
                data,
                target,
                self.timeout,
                started.elapsed(),
            )
            .await
            .map(Incoming::Tunnel);
        }

        // Pre-flight, now that the sender is who it claims (or the migration is plaintext,
        // which this host accepted): the sink must take this guest. A refusal goes back
        // as a sealed Abort.
        let ctrl = session.take_control()?;
        let (mut opener, mut sealer) = (ctrl.opener, ctrl.sealer);
        let sink = match prepare.take().map(|p| p(&hello)) {
            Some(Ok(Prepared::Sink(s))) => {
                let m = s.memory();
                if m.page_size() != u64::from(hello.page_size)
                    || m.page_count() < hello.guest_pages
                {
                    Err(format!(
                        "the sink has {} pages of {} bytes; the guest needs {} of {}",
                        m.page_count(),
                        m.page_size(),
                        hello.guest_pages,
                        hello.page_size
                    ))
                } else {
                    Ok(s)
                }
            }
            Some(Ok(Prepared::Tunnel(_))) => Err("a tunnel target for a guest".to_owned()),
            Some(Err(reason)) => Err(reason),
            None => Err("no pre-flight".to_owned()),
        };
        let mut sink = match sink {
            Ok(s) => s,
            Err(reason) => {
                let abort = Abort {
                    code: AbortCode::DestinationFailed,
                    message: reason.clone(),
                }
                .encode();
                if let Ok(f) = sealer.seal(FrameType::Abort, abort) {
                    let _ = write_frame(&mut control, &f).await;
                }
                return Err(MigrateError::Aborted(format!(
                    "pre-flight refused: {reason}"
                )));
            }
        };

        // Data connections: each binds itself with its first frame.
        let memory = sink.memory();
        let mut tasks = StreamTasks(Vec::new());
        let received_pages = Arc::new(Received::new(hello.guest_pages));
        // A stream that fails reports here at once, so the receiver aborts the migration
        // then rather than at Complete.
        let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<(AbortCode, String)>(4);
        // All data connections must bind within one deadline; strangers that connect in
        // the meantime are dropped after a short wait, and only a few are tolerated.
        let bind_deadline = tokio::time::Instant::now() + self.timeout;
        let mut strangers = 0;
        while tasks.0.len() < usize::from(negotiated.streams) {
            let (tcp, first, peer) = data.next(bind_deadline).await?;
            let per_bind = bind_deadline.min(tokio::time::Instant::now() + Duration::from_secs(5));
            match tokio::time::timeout_at(per_bind, bind_stream(tcp, first, &mut session)).await {
                Ok(Ok((r, opener))) => {
                    let stream_id = opener.stream();
                    let memory = memory.clone();
                    let fail_tx = fail_tx.clone();
                    let guest_pages = hello.guest_pages;
                    let received_pages = received_pages.clone();
                    tasks.0.push((
                        stream_id,
                        tokio::spawn(async move {
                            let r = receive_stream(r, opener, memory, guest_pages, &received_pages)
                                .await;
                            if let Err(e) = &r {
                                let code = match e {
                                    MigrateError::Protocol(p) => p.abort_code(),
                                    _ => AbortCode::DestinationFailed,
                                };
                                let _ = fail_tx.send((code, e.to_string())).await;
                            }
                            r
                        }),
                    ));
                }
                other => {
                    strangers += 1;
                    match other {
                        Err(_) => {
                            tracing::warn!(%peer, "dropping a connection that sent no stream bind")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "dropping a connection that did not bind")
                        }
                        Ok(Ok(_)) => unreachable!(),
                    }
                    if strangers > 16 {
                        return Err(MigrateError::Aborted(
                            "too many connections that did not bind".into(),
                        ));
                    }
                }
            }
        }

        let (mut control_r, mut control_w) = control.into_split();
        let mut device_state: Vec<u8> = Vec::new();
        let max = opener.max_payload();
        let complete: Complete = loop {
            let next = tokio::select! {
                f = read_frame(&mut control_r, max) => f,
                Some((code, message)) = fail_rx.recv() => {
                    let abort = Abort { code, message: message.clone() }.encode();
                    if let Ok(f) = sealer.seal(FrameType::Abort, abort) {
                        let _ = write_frame(&mut control_w, &f).await;
                    }
                    return Err(MigrateError::Aborted(format!("a data stream failed: {message}")));
                }
            };
            let mut f = next?
                .ok_or_else(|| MigrateError::Aborted("the sender closed the connection".into()))?;
            let h = opener.open(&mut f)?;
            match Message::decode(h.frame_type, &f.payload)? {
                Message::IterationMarker(m) => tracing::debug!(?m, "iteration"),
                Message::DeviceState(c) => add_chunk(&mut device_state, &c)?,
                Message::Complete(c) => break c,
                Message::Abort(a) => {
                    return Err(MigrateError::PeerAborted {
                        code: a.code,
                        message: a.message,
                    });
                }
                other => {
                    return Err(PeerMisbehaved::UnexpectedFrame {
                        state: "receiving a migration",
                        frame_type: other.frame_type(),
                    }
                    .into());
                }
            }
        };

        // Verify everything before Ready: every stream ended with the totals Complete
        // claims, and the device state is whole.
        let verified: Result<(u64, u64), MigrateError> = async {
            if complete.streams.len() != tasks.0.len() {
                return Err(MigrateError::Aborted(
                    "Complete names another number of streams".into(),
                ));
            }
            let (mut pages, mut bytes) = (0, 0);
            tasks.0.sort_by_key(|(id, _)| *id);
            for (i, ((id, task), claimed)) in tasks.0.iter_mut().zip(&complete.streams).enumerate()
            {
                debug_assert_eq!(usize::from(*id), i + 1, "streams 1..=n, each bound once");
                let stats = tokio::time::timeout(self.timeout, task)
                    .await
                    .map_err(|_| MigrateError::Aborted("a data stream did not end".into()))?
                    .map_err(|e| MigrateError::Aborted(format!("a stream task failed: {e}")))??;
                for (what, c, r) in [
                    ("frames", claimed.frames, stats.frames),
                    ("bytes", claimed.bytes, stats.bytes),
                ] {
                    if c != r {
                        return Err(PeerMisbehaved::TotalsMismatch {
                            stream: u16::try_from(i + 1).unwrap_or(u16::MAX),
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
            let missing = received_pages.missing();
            if missing > 0 {
                return Err(MigrateError::Aborted(format!(
                    "{missing} pages of the guest never arrived"
                )));
            }
            if pages != complete.pages || device_state.len() as u64 != complete.device_state_len {
                return Err(MigrateError::Aborted(
                    "Complete's totals do not match what arrived".into(),
                ));
            }
            sink.control().load_device_state(&device_state)?;
            Ok((pages, bytes))
        }
        .await;
        let (pages, bytes) = match verified {
            Ok(x) => x,
            Err(e) => {
                let code = match &e {
                    MigrateError::Protocol(p) => p.abort_code(),
                    _ => AbortCode::DestinationFailed,
                };
                if let Ok(f) = sealer.seal(
                    FrameType::Abort,
                    Abort {
                        code,
                        message: e.to_string(),
                    }
                    .encode(),
                ) {
                    let _ = write_frame(&mut control_w, &f).await;
                }
                return Err(e);
            }
        };
        let ready = Ready {
            pages,
            device_state_len: device_state.len() as u64,
        };
        let f = sealer.seal(FrameType::Ready, ready.encode())?;
        write_frame(&mut control_w, &f).await?;

        // Commit, or Abort; a lost connection is settled by the key service's record.
        let decided = match tokio::time::timeout(
            self.timeout,
            read_frame(&mut control_r, opener.max_payload()),
        )
        .await
        {
            Ok(Ok(Some(mut f))) => match opener.open(&mut f) {
                Ok(h) if h.frame_type == FrameType::Commit => Some(true),
                Ok(h) if h.frame_type == FrameType::Abort => Some(false),
                _ => None,
            },
            _ => None,
        };
        let committed = match decided {
            Some(c) => Some(c),
            None => self.outcome_from_service(migration_id).await,
        };
        let outcome = match committed {
            Some(false) => {
                return Err(MigrateError::Aborted(
                    "the source kept the VM; the received guest is discarded".into(),
                ));
            }
            None => {
                tracing::warn!(migration = %migration_id, "outcome unknown: the received VM stays paused");
                ReceiveOutcome::Unknown
            }
            Some(true) => match sink.control().resume() {
                Ok(()) => {
                    if let Some(hook) = &self.on_resumed {
                        hook(&ReceiveReport {
                            migration_id,
                            vm_name: hello.vm_name.clone(),
                            mode: negotiated.mode,
                            pages,
                            bytes,
                            device_state_len: device_state.len() as u64,
                            outcome: ReceiveOutcome::Committed,
                        });
                    }
                    ReceiveOutcome::Committed
                }
                Err(e) => ReceiveOutcome::CommittedNotResumed(e.to_string()),
            },
        };
        Ok(Incoming::Vm(
            ReceiveReport {
                migration_id,
                vm_name: hello.vm_name.clone(),
                mode: negotiated.mode,
                pages,
                bytes,
                device_state_len: device_state.len() as u64,
                outcome,
            },
            sink,
        ))
        }
        .instrument(span)
        .await
    }

    /// After `Ready`, with no `Commit` or `Abort` heard: the key service's record decides.
    /// `None` when there is no key service or it gives no answer.
    async fn outcome_from_service(&self, id: MigrationId) -> Option<bool> {
        let ReceiverKeys::Service(c) = &self.keys else {
            return None;
        };
        for _ in 0..10 {
            if let Ok(r) = c.outcome(id).await {
                match r.outcome {
                    Some(RecordedOutcome::Committed) => return Some(true),
                    Some(RecordedOutcome::Aborted) => return Some(false),
                    None => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None
    }
}

/// The routing table of [`Receiver::serve`]: migration id → where its data connections go.
type Routes = Arc<
    std::sync::Mutex<
        std::collections::HashMap<MigrationId, tokio::sync::mpsc::Sender<(Conn, WireFrame, Peer)>>,
    >,
>;

/// Where a migration's data connections come from.
pub(crate) enum DataSource<'a, L> {
    /// Accepted from the listener (one migration per `receive`).
    Listener(&'a L),
    /// Routed here by [`Receiver::serve`], their first frame already read.
    Routed(tokio::sync::mpsc::Receiver<(Conn, WireFrame, Peer)>),
}

impl<L: Accept> DataSource<'_, L> {
    pub(crate) async fn next(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<(Conn, Option<WireFrame>, Peer), MigrateError> {
        let late = || MigrateError::Aborted("the data connections did not arrive".into());
        match self {
            Self::Listener(l) => {
                let (tcp, peer) = tokio::time::timeout_at(deadline, l.accept_conn())
                    .await
                    .map_err(|_| late())??;
                Ok((tcp, None, peer))
            }
            Self::Routed(rx) => {
                let (tcp, first, peer) = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .map_err(|_| late())?
                    .ok_or_else(late)?;
                Ok((tcp, Some(first), peer))
            }
        }
    }
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
            .ok_or_else(|| MigrateError::Aborted("closed before binding".into()))?,
    };
    let (_stream, channel) = session.accept_data_stream(bind)?;
    let (r, _w) = tcp.into_split();
    Ok((r, channel.opener))
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

/// One data stream: opens frames and writes their pages into the sink.
async fn receive_stream(
    mut r: ReadHalf,
    mut opener: Opener,
    memory: Arc<dyn GuestMemory>,
    guest_pages: u64,
    received: &Received,
) -> Result<StreamStats, MigrateError> {
    let mut buf = AlignedBuf::page_aligned(opener.max_payload() as usize);
    let zero = vec![0u8; memory.page_size() as usize];
    let mut stats = StreamStats {
        pages: 0,
        frames: 0,
        bytes: 0,
    };
    while let Some(h) = read_open(&mut r, &mut opener, &mut buf).await? {
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
                    if e.index >= guest_pages {
                        return Err(PeerMisbehaved::MalformedPayload {
                            frame_type: FrameType::Pages,
                            reason: "page index past the end of guest memory",
                        }
                        .into());
                    }
                    memory.write_pages(e.index, e.data.unwrap_or(&zero))?;
                    received.mark(e.index);
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
    opener.finish()?;
    Ok(stats)
}

impl Sink for vmotion_mover::synthetic::SyntheticGuest {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Arc::new(self.memory_handle())
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }
}

impl Sink for vmotion_mover::memfile::MemoryFile {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        vmotion_mover::Source::memory(self)
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }
}
