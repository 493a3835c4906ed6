//! The source side: [`Sender`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::transport::{Conn, Endpoint, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use vmotion_engine::{
    AbortReason, Action, ConvergencePolicy, EngineConfig, Outcome, PageRange, SenderEngine,
    bitmap::{split_at_chunks, stream_for},
};
use vmotion_keyservice::KeyServiceClient;
use vmotion_keyservice::api::Outcome as RecordedOutcome;
use vmotion_mover::{DirtyTracking, GuestMemory, Source};
use vmotion_proto::message::{
    Abort, Complete, DeviceStateChunk, IterationMarker, MarkerKind, PagesBuilder, StreamTotals,
};
use vmotion_proto::{
    AbortCode, DestinationCapability, EpochLimits, FrameType, KeyMaterial, MigrationId,
    PeerMisbehaved, Sealer, SenderConfig, SenderHandshake, SenderNext, SenderSession, VmPolicy,
    WireFrame, handshake_random,
};

use crate::error::MigrateError;
use crate::report::MigrationReport;
use crate::wire::{read_frame, write_frame, write_parts};

/// Where the migration key comes from.
pub enum KeySource {
    /// The key service creates the migration (id, key, nonce) and says whether the
    /// destination can encrypt.
    Service {
        /// A client with this host's certificate.
        client: Arc<KeyServiceClient>,
        /// The destination host's identity at the key service.
        destination: String,
    },
    /// An orchestrator handed the key in, vouching that the destination holds it too.
    Direct {
        /// The migration id both ends use.
        migration_id: MigrationId,
        /// The key.
        material: KeyMaterial,
    },
    /// No key: the migration can only be plaintext (the policy must allow it).
    None {
        /// The migration id both ends use.
        migration_id: MigrationId,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service { destination, .. } => write!(f, "KeySource::Service({destination})"),
            Self::Direct { migration_id, .. } => write!(f, "KeySource::Direct({migration_id})"),
            Self::None { migration_id } => write!(f, "KeySource::None({migration_id})"),
        }
    }
}

/// Builds and runs the source side of one migration.
///
/// A whole encrypted migration on loopback: a synthetic guest with a writer thread moves
/// into a blank guest, with a key handed in by the caller (as an orchestrator would).
///
/// ```
/// use vmotion::{KeySource, Receiver, ReceiverKeys, Sender};
/// use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
/// use vmotion_proto::{
///     EncryptionPolicy, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, Mode, VmPolicy,
/// };
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let key = || KeyMaterial { key: MigrationKey::from_bytes([7; 32]), nonce: MigrationNonce([1; 8]) };
/// let id = MigrationId([9; 16]);
///
/// // Destination: one migration into a blank guest of the announced size.
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let addr = listener.local_addr().unwrap();
/// let receiver = tokio::spawn(async move {
///     Receiver::new(ReceiverKeys::Direct { migration_id: id, material: key() })
///         .receive(&listener, |hello| {
///             Ok(SyntheticGuest::blank(hello.guest_pages, u64::from(hello.page_size)))
///         })
///         .await
/// });
///
/// // Source: a running guest, required encryption, two data streams.
/// let mut guest = SyntheticGuest::start(SyntheticConfig { pages: 1024, dirty_rate: 5_000.0, ..Default::default() });
/// let report = Sender::builder("web-1")
///     .policy(VmPolicy { encryption: EncryptionPolicy::Required, vm_encrypted: false })
///     .key(KeySource::Direct { migration_id: id, material: key() })
///     .streams(2)
///     .build()
///     .migrate(addr, &mut guest)
///     .await
///     .unwrap();
/// assert!(matches!(report.mode, Mode::Encrypted(_)));
/// println!("{}", report.summary());
///
/// let (received, destination) = receiver.await.unwrap().unwrap();
/// assert_eq!(destination.snapshot(), guest.snapshot()); // the source stays paused
/// assert_eq!(received.vm_name, "web-1");
/// # });
/// ```
#[derive(Debug)]
pub struct Sender {
    vm_name: String,
    policy: VmPolicy,
    key: KeySource,
    streams: u16,
    convergence: ConvergencePolicy,
    switchover_timeout: Duration,
    limits: EpochLimits,
    chunk_pages: u64,
    batch_bytes: usize,
    max_bandwidth: Option<u64>,
    progress: Option<ProgressFn>,
    net: NetOptions,
}

/// How the sender's connections go out: from which local address, with which DSCP mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetOptions {
    /// Local address to send from (a dedicated migration network's address).
    pub bind: Option<std::net::IpAddr>,
    /// DSCP code point (0 to 63) marked on every migration packet, so the network can
    /// give migration traffic its own class (e.g. 10 = AF11, 46 = EF).
    pub dscp: Option<u8>,
}

/// Connects to `endpoint` as `net` says. A Unix socket has no local address or DSCP
/// mark: asking for either with one is an error, not silently ignored.
pub(crate) async fn connect(endpoint: &Endpoint, net: NetOptions) -> std::io::Result<Conn> {
    match endpoint {
        Endpoint::Tcp(addr) => connect_tcp(*addr, net).await.map(Conn::Tcp),
        Endpoint::Unix(path) => {
            if net.bind.is_some() || net.dscp.is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a bind address or DSCP mark applies to TCP, not to a Unix socket",
                ));
            }
            tokio::net::UnixStream::connect(path).await.map(Conn::Unix)
        }
    }
}

async fn connect_tcp(addr: SocketAddr, net: NetOptions) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(dscp) = net.dscp {
        let tos = u32::from(dscp.min(63)) << 2;
        match addr {
            SocketAddr::V4(_) => socket.set_tos_v4(tos)?,
            SocketAddr::V6(_) => socket.set_tclass_v6(tos)?,
        }
    }
    if let Some(ip) = net.bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    crate::transport::keepalive(&tcp);
    Ok(tcp)
}

/// Where a migration is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Pre-copy iterations, the VM running.
    PreCopy,
    /// The VM is paused; the last pages and the device state are going out.
    StopAndCopy,
    /// Waiting for Ready, recording the outcome.
    Switchover,
    /// Committed.
    Done,
}

/// A progress report, sent after every step of the migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Where the migration is.
    pub stage: Stage,
    /// The current (or last) iteration; 0 is the full pass.
    pub iteration: u32,
    /// Bytes put on the data connections so far.
    pub bytes_sent: u64,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Bytes still to send: what the last dirty log reported (all memory before the
    /// first pass ends).
    pub remaining_bytes: u64,
    /// Pages the guest dirtied per second during the last iteration.
    pub dirty_rate_pages: f64,
    /// Bytes per second the last iteration achieved.
    pub throughput: f64,
    /// The throttle in force, percent.
    pub throttle_percent: u8,
    /// Since the migration started.
    pub elapsed: Duration,
    /// Estimated time to the switchover, at the last measured throughput.
    pub eta: Option<Duration>,
}

/// A progress callback.
#[derive(Clone)]
struct ProgressFn(Arc<dyn Fn(&Progress) + Send + Sync>);

impl std::fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressFn")
    }
}

/// The [`Sender`] builder.
#[derive(Debug)]
pub struct SenderBuilder(Sender);

impl Sender {
    /// Starts building the migration of VM `vm_name`. Defaults: opportunistic policy, no
    /// key (so plaintext), one data stream, the default convergence policy, a 10 s
    /// switchover timeout, 2 MiB chunks, 256 KiB batches, no bandwidth cap.
    pub fn builder(vm_name: &str) -> SenderBuilder {
        SenderBuilder(Self {
            vm_name: vm_name.to_owned(),
            policy: VmPolicy::default(),
            key: KeySource::None {
                migration_id: MigrationId([0; 16]),
            },
            streams: 1,
            convergence: ConvergencePolicy::default(),
            switchover_timeout: Duration::from_secs(10),
            limits: EpochLimits::default(),
            chunk_pages: 512,
            batch_bytes: 256 * 1024,
            max_bandwidth: None,
            progress: None,
            net: NetOptions::default(),
        })
    }
}

impl SenderBuilder {
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
    /// Number of data connections (1 to 256).
    pub fn streams(mut self, streams: u16) -> Self {
        self.0.streams = streams;
        self
    }
    /// Convergence knobs.
    pub fn convergence(mut self, c: ConvergencePolicy) -> Self {
        self.0.convergence = c;
        self
    }
    /// Longest pause-to-Ready time before aborting.
    pub fn switchover_timeout(mut self, t: Duration) -> Self {
        self.0.switchover_timeout = t;
        self
    }
    /// Key-update budgets (small ones force many epochs, for tests).
    pub fn epoch_limits(mut self, l: EpochLimits) -> Self {
        self.0.limits = l;
        self
    }
    /// Pages per chunk: a chunk always travels on the same stream.
    pub fn chunk_pages(mut self, pages: u64) -> Self {
        self.0.chunk_pages = pages.max(1);
        self
    }
    /// Bandwidth cap, bytes per second, all streams together.
    pub fn max_bandwidth(mut self, bytes_per_second: Option<u64>) -> Self {
        self.0.max_bandwidth = bytes_per_second;
        self
    }
    /// Calls `f` after every step with where the migration is (phase, iteration, bytes
    /// sent and remaining, dirty rate, throughput, ETA). Keep it quick: it runs on the
    /// migration's task.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.0.progress = Some(ProgressFn(Arc::new(f)));
        self
    }

    /// The local address and DSCP mark of every migration connection.
    pub fn network(mut self, net: NetOptions) -> Self {
        self.0.net = net;
        self
    }

    /// The sender.
    pub fn build(self) -> Sender {
        self.0
    }
}

/// Connecting and each handshake read must finish within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An `Abort` is best effort: never wait longer than this to deliver one.
pub(crate) const ABORT_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Aborts the stream tasks when the migration ends, whichever way: none keeps a socket
/// or the guest memory after `migrate` returns.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Keeps an error, letting the ones about the VM's state win: the caller must learn
/// that the VM is paused or failed to resume, whatever else went wrong.
fn keep(first: &mut Option<MigrateError>, e: MigrateError) {
    let critical = matches!(
        e,
        MigrateError::OutcomeUnknown(_) | MigrateError::ResumeFailed(_)
    );
    let have_critical = matches!(
        first,
        Some(MigrateError::OutcomeUnknown(_) | MigrateError::ResumeFailed(_))
    );
    if first.is_none() || (critical && !have_critical) {
        *first = Some(e);
    }
}

/// Work for one data stream.
enum Job {
    Pages {
        ranges: Vec<PageRange>,
        done: oneshot::Sender<Result<(u64, u64), MigrateError>>,
    },
    End {
        done: oneshot::Sender<Result<(StreamTotals, u32), MigrateError>>,
    },
}

struct StreamConfig {
    page_size: usize,
    max_payload: usize,
    bytes_per_second: Option<f64>,
}

/// One data stream: reads pages from guest memory straight into batches, seals them and
/// writes them, in the order the jobs come (so a page's later copy follows its earlier
/// one on the same connection).
async fn stream_task(
    mut w: WriteHalf,
    mut sealer: Sealer,
    memory: Arc<dyn GuestMemory>,
    mut jobs: mpsc::Receiver<Job>,
    cfg: StreamConfig,
) {
    let mut builder = PagesBuilder::new(cfg.page_size, cfg.max_payload);
    let mut pacer = Pacer {
        origin: Instant::now(),
        sent: 0,
    };
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Pages { ranges, done } => {
                let r = send_pages(
                    &mut w,
                    &mut sealer,
                    &*memory,
                    &mut builder,
                    &ranges,
                    &cfg,
                    &mut pacer,
                )
                .await;
                let _ = done.send(r);
            }
            Job::End { done } => {
                let totals = StreamTotals {
                    frames: sealer.frames_sealed(),
                    bytes: sealer.bytes_sealed(),
                };
                let epoch = sealer.epoch();
                let r = async {
                    let eos = sealer.seal_end_of_stream()?;
                    write_frame(&mut w, &eos).await?;
                    w.shutdown().await?;
                    Ok((totals, epoch))
                }
                .await;
                let _ = done.send(r);
                return;
            }
        }
    }
}

/// Paces a stream to its share of the bandwidth cap.
struct Pacer {
    /// Where the schedule starts.
    origin: Instant,
    /// Bytes sent since `origin`.
    sent: u64,
}

/// Idle time earns at most this much credit: a stream that waited (between iterations,
/// or while zero pages cost nothing) may burst this long above the cap, no longer — else
/// one fast pass would make the engine believe the link is faster than the cap.
const PACING_BURST: Duration = Duration::from_millis(20);

impl Pacer {
    /// Counts `n` bytes sent and returns how long to wait to stay under `rate`.
    fn after(&mut self, n: u64, rate: f64) -> Option<Duration> {
        let schedule = |p: &Self| Duration::from_secs_f64(p.sent as f64 / rate);
        let elapsed = self.origin.elapsed();
        if elapsed.saturating_sub(schedule(self)) > PACING_BURST {
            let now = Instant::now();
            self.origin = now.checked_sub(PACING_BURST).unwrap_or(now);
            self.sent = 0;
        }
        self.sent += n;
        schedule(self).checked_sub(self.origin.elapsed())
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_pages(
    w: &mut WriteHalf,
    sealer: &mut Sealer,
    memory: &dyn GuestMemory,
    builder: &mut PagesBuilder,
    ranges: &[PageRange],
    cfg: &StreamConfig,
    pacer: &mut Pacer,
) -> Result<(u64, u64), MigrateError> {
    let mut pages = 0u64;
    let mut bytes = 0u64;
    async fn flush(
        w: &mut WriteHalf,
        sealer: &mut Sealer,
        builder: &mut PagesBuilder,
        cfg: &StreamConfig,
        pacer: &mut Pacer,
    ) -> Result<u64, MigrateError> {
        if builder.is_empty() {
            return Ok(0);
        }
        let payload = builder.finish();
        let (h, t) = sealer.seal_in_place(FrameType::Pages, payload)?;
        write_parts(w, &h, payload, &t).await?;
        let n = (payload.len() + 40) as u64;
        if let Some(wait) = cfg.bytes_per_second.and_then(|rate| pacer.after(n, rate)) {
            tokio::time::sleep(wait).await;
        }
        Ok(n)
    }
    for r in ranges {
        for page in r.start..r.end() {
            loop {
                let added = builder.push_with(page, |dst| memory.read_pages(page, dst))?;
                if added {
                    break;
                }
                bytes += flush(w, sealer, builder, cfg, pacer).await?;
            }
            pages += 1;
        }
    }
    bytes += flush(w, sealer, builder, cfg, pacer).await?;
    Ok((pages, bytes))
}

/// Messages from the receiver on the control connection.
enum FromReceiver {
    Ready,
    Abort(Abort),
    Failed(MigrateError),
}

async fn control_reader(
    mut r: ReadHalf,
    mut opener: vmotion_proto::Opener,
    tx: mpsc::Sender<FromReceiver>,
) {
    loop {
        let msg = match read_frame(&mut r, opener.max_payload()).await {
            Ok(None) => {
                FromReceiver::Failed(MigrateError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            }
            Err(e) => FromReceiver::Failed(e),
            Ok(Some(mut f)) => match opener.open(&mut f) {
                Err(e) => FromReceiver::Failed(e.into()),
                Ok(h) => match h.frame_type {
                    FrameType::Ready => FromReceiver::Ready,
                    FrameType::Abort => match Abort::decode(&f.payload) {
                        Ok(a) => FromReceiver::Abort(a),
                        Err(e) => FromReceiver::Failed(e.into()),
                    },
                    other => FromReceiver::Failed(
                        PeerMisbehaved::UnexpectedFrame {
                            state: "migrating (sender)",
                            frame_type: other,
                        }
                        .into(),
                    ),
                },
            },
        };
        let end = !matches!(msg, FromReceiver::Ready);
        if tx.send(msg).await.is_err() || end {
            return;
        }
    }
}

impl Sender {
    /// Migrates the VM in `source` to the receiver at `to` (a `SocketAddr`, or an
    /// [`Endpoint`] for a Unix socket). Returns the report when the
    /// VM runs at the destination; on any error the VM runs at the source (the error says
    /// whether it was refused, aborted, or failed).
    pub async fn migrate(
        self,
        to: impl Into<Endpoint>,
        source: &mut dyn Source,
    ) -> Result<MigrationReport, MigrateError> {
        let started = Instant::now();
        let to = to.into();
        if self.streams == 0 || self.streams > vmotion_proto::message::MAX_STREAMS {
            return Err(MigrateError::Options("streams must be 1 to 256".into()));
        }
        if self.max_bandwidth == Some(0) {
            return Err(MigrateError::Options(
                "a bandwidth cap must be above 0".into(),
            ));
        }
        // Pre-flight: one migration of a VM at a time, from this process.
        let in_flight = crate::InFlight::claim(&crate::OUTGOING, &self.vm_name)?;
        let memory = source.memory();
        let (migration_id, material, destination, service) =
            resolve_key(self.key, &self.vm_name).await?;
        // Every log line from here on carries the migration id.
        let span = tracing::info_span!("migration", id = %migration_id, vm = %self.vm_name);
        async move {
        let record_aborted = async |service: &Option<Arc<KeyServiceClient>>| {
            if let Some(c) = service {
                let _ = c
                    .record_outcome(migration_id, RecordedOutcome::Aborted)
                    .await;
            }
        };
        let config = SenderConfig {
            migration_id,
            vm_name: self.vm_name.clone(),
            policy: self.policy.effective(),
            destination,
            key: material,
            versions: vmotion_proto::frame::SUPPORTED_VERSIONS,
            page_size: u32::try_from(memory.page_size())
                .map_err(|_| MigrateError::Options("page size too large".into()))?,
            guest_pages: memory.page_count(),
            streams: self.streams,
            kind: vmotion_proto::MigrationKind::Memory,
            limits: self.limits,
            random: handshake_random()
                .map_err(|_| MigrateError::Options("no OS randomness".into()))?,
        };
        // Refusals that need no connection happen here: not a byte reaches the destination.
        let (expect_ack, hello) = match SenderHandshake::start(config) {
            Ok(x) => x,
            Err(e) => {
                record_aborted(&service).await;
                return Err(e.into());
            }
        };
        let mut session = match handshake(&to, self.net, expect_ack, hello).await {
            Ok(s) => s,
            Err(e) => {
                record_aborted(&service).await;
                return Err(e);
            }
        };
        let negotiated = session.0.negotiated().clone();
        tracing::info!(migration = %migration_id, mode = ?negotiated.mode, streams = self.streams, "handshake done");

        let mut control = session.0.take_control()?;
        let (mut control_r, mut control_w) = session.1.into_split();
        let mut sealer = control.sealer;

        // Data connections. A failure here still tells the receiver and the key service.
        let page_size = memory.page_size() as usize;
        let max_payload = (negotiated.max_payload as usize).min(self.batch_bytes + 64 * 1024);
        let mut streams = Vec::new();
        let mut tasks = Tasks(Vec::new());
        let opened: Result<(), MigrateError> = async {
            for s in 1..=self.streams {
                let (bind, channel) = session.0.open_data_stream(s)?;
                let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&to, self.net))
                    .await
                    .map_err(|_| {
                        MigrateError::Aborted("connecting a data stream timed out".into())
                    })??;
                let (_r, mut w) = conn.into_split();
                write_frame(&mut w, &bind).await?;
                let (tx, rx) = mpsc::channel(2);
                let cfg = StreamConfig {
                    page_size,
                    max_payload,
                    bytes_per_second: self
                        .max_bandwidth
                        .map(|b| b as f64 / f64::from(self.streams)),
                };
                tasks.0.push(tokio::spawn(stream_task(
                    w,
                    channel.sealer,
                    memory.clone(),
                    rx,
                    cfg,
                )));
                streams.push(tx);
            }
            Ok(())
        }
        .await;
        if let Err(e) = opened {
            // A receiver that refused after the handshake (its pre-flight runs once the
            // sender is authenticated) has said why on the control connection.
            let e = match tokio::time::timeout(
                Duration::from_millis(500),
                read_frame(&mut control_r, control.opener.max_payload()),
            )
            .await
            {
                Ok(Ok(Some(mut f))) => match control.opener.open(&mut f) {
                    Ok(h) if h.frame_type == FrameType::Abort => {
                        match Abort::decode(&f.payload) {
                            Ok(a) => MigrateError::PeerAborted {
                                code: a.code,
                                message: a.message,
                            },
                            Err(_) => e,
                        }
                    }
                    _ => e,
                },
                _ => e,
            };
            let (code, message) = (AbortCode::SourceFailed, e.to_string());
            if let Ok(f) = sealer.seal(FrameType::Abort, Abort { code, message }.encode()) {
                let _ =
                    tokio::time::timeout(ABORT_SEND_TIMEOUT, write_frame(&mut control_w, &f)).await;
            }
            record_aborted(&service).await;
            return Err(e);
        }
        let (from_rx_tx, mut from_rx) = mpsc::channel(4);
        tasks.0.push(tokio::spawn(control_reader(
            control_r,
            control.opener,
            from_rx_tx,
        )));

        let setup = started.elapsed();
        let dirty_tracking = matches!(source.dirty_tracking(), DirtyTracking::Supported(_));
        let t0 = Instant::now();
        let now = || t0.elapsed();
        let mut engine = SenderEngine::new(
            EngineConfig {
                guest_pages: memory.page_count(),
                page_size: memory.page_size(),
                policy: self.convergence,
                dirty_tracking,
                switchover_timeout: self.switchover_timeout,
                device_state_estimate: 64 * 1024,
            },
            now(),
        );
        let mut first_error: Option<MigrateError> = None;
        let mut pages_total = 0u64;
        let mut bytes_total = 0u64;
        let mut device_state_len = 0u64;
        let mut max_epoch = 0u32;
        let mut ready_seen = false;
        let mut commit_delivered = false;
        let chunk_pages = self.chunk_pages;
        let n_streams = self.streams;

        loop {
            // The receiver may end the migration at any time (an Abort, a lost control
            // connection): notice it between steps, not only when waiting for Ready.
            if let Ok(msg) = from_rx.try_recv()
                && !ready_seen
            {
                let e = match msg {
                    FromReceiver::Abort(a) => MigrateError::PeerAborted {
                        code: a.code,
                        message: a.message,
                    },
                    FromReceiver::Failed(e) => e,
                    FromReceiver::Ready => MigrateError::Protocol(
                        PeerMisbehaved::UnexpectedFrame {
                            state: "migrating (sender), before Complete",
                            frame_type: FrameType::Ready,
                        }
                        .into(),
                    ),
                };
                tracing::warn!(error = %e, "the receiver ended the migration");
                engine.handle_failure(now(), e.to_string());
                keep(&mut first_error, e);
            }
            let Some(action) = engine.poll_action() else {
                break;
            };
            // Progress after each step that changes what a person would want to see: a
            // pre-copy dirty log (what is left), the pause, the device state, the
            // switchover, the commit.
            let stage = match &action {
                Action::FetchDirtyLog if engine.switchover_deadline().is_none() => {
                    Some(Stage::PreCopy)
                }
                Action::Pause | Action::SendDeviceState => Some(Stage::StopAndCopy),
                Action::SendComplete | Action::RecordOutcome(Outcome::Committed) => {
                    Some(Stage::Switchover)
                }
                Action::SendCommit => Some(Stage::Done),
                _ => None,
            };
            // Once the VM is paused every step runs against the switchover deadline.
            let deadline = engine.switchover_deadline();
            let step = async {
                match action {
                    Action::StartDirtyLog => {
                        if let DirtyTracking::Supported(log) = source.dirty_tracking() {
                            log.start()?;
                        }
                    }
                    Action::StopDirtyLog => {
                        if let DirtyTracking::Supported(log) = source.dirty_tracking() {
                            log.stop()?;
                        }
                    }
                    Action::FetchDirtyLog => {
                        let DirtyTracking::Supported(log) = source.dirty_tracking() else {
                            return Err(MigrateError::Options("dirty log vanished".into()));
                        };
                        let dirty = log.fetch_and_clear()?;
                        engine
                            .handle_dirty_log(now(), &dirty)
                            .map_err(|e| MigrateError::Options(e.to_string()))?;
                    }
                    Action::SendPages {
                        iteration, ranges, ..
                    } => {
                        let marker = IterationMarker {
                            iteration,
                            kind: MarkerKind::Start,
                            pages: 0,
                        };
                        let f = sealer.seal(FrameType::IterationMarker, marker.encode())?;
                        write_frame(&mut control_w, &f).await?;
                        // Chunks pinned to streams.
                        let mut per_stream = vec![Vec::new(); usize::from(n_streams)];
                        for r in ranges {
                            for piece in split_at_chunks(r, chunk_pages) {
                                let s = stream_for(piece.start, chunk_pages, n_streams);
                                per_stream[usize::from(s - 1)].push(piece);
                            }
                        }
                        let mut waits = Vec::new();
                        for (tx, ranges) in streams.iter().zip(per_stream) {
                            let (done, wait) = oneshot::channel();
                            tx.send(Job::Pages { ranges, done })
                                .await
                                .map_err(|_| MigrateError::Aborted("a data stream ended".into()))?;
                            waits.push(wait);
                        }
                        let (mut pages, mut bytes) = (0, 0);
                        for w in waits {
                            let (p, b) = w.await.map_err(|_| {
                                MigrateError::Aborted("a data stream ended".into())
                            })??;
                            pages += p;
                            bytes += b;
                        }
                        pages_total += pages;
                        bytes_total += bytes;
                        let marker = IterationMarker {
                            iteration,
                            kind: MarkerKind::End,
                            pages,
                        };
                        let f = sealer.seal(FrameType::IterationMarker, marker.encode())?;
                        write_frame(&mut control_w, &f).await?;
                        engine
                            .handle_pages_sent(now(), pages, bytes)
                            .map_err(|e| MigrateError::Options(e.to_string()))?;
                    }
                    Action::SetThrottle(p) => source.control().throttle(p)?,
                    Action::Pause => {
                        source.control().pause()?;
                        engine
                            .handle_paused(now())
                            .map_err(|e| MigrateError::Options(e.to_string()))?;
                    }
                    Action::Resume => source
                        .control()
                        .resume()
                        .map_err(|e| MigrateError::ResumeFailed(e.to_string()))?,
                    Action::SendDeviceState => {
                        let state = source.control().save_device_state()?;
                        let chunk = sealer.max_payload() as usize - 16;
                        let total_len = state.len() as u64;
                        let mut offset = 0usize;
                        loop {
                            let end = (offset + chunk).min(state.len());
                            let c = DeviceStateChunk {
                                offset: offset as u64,
                                total_len,
                                data: &state[offset..end],
                            };
                            let f = sealer.seal(FrameType::DeviceState, c.encode())?;
                            write_frame(&mut control_w, &f).await?;
                            offset = end;
                            if offset >= state.len() {
                                break;
                            }
                        }
                        device_state_len = total_len;
                        engine
                            .handle_device_state_sent(now(), total_len)
                            .map_err(|e| MigrateError::Options(e.to_string()))?;
                    }
                    Action::SendComplete => {
                        let mut totals = Vec::new();
                        for tx in &streams {
                            let (done, wait) = oneshot::channel();
                            tx.send(Job::End { done })
                                .await
                                .map_err(|_| MigrateError::Aborted("a data stream ended".into()))?;
                            let (t, epoch) = wait.await.map_err(|_| {
                                MigrateError::Aborted("a data stream ended".into())
                            })??;
                            max_epoch = max_epoch.max(epoch);
                            totals.push(t);
                        }
                        let complete = Complete {
                            iterations: u32::try_from(engine.report().iterations.len() + 1)
                                .unwrap_or(u32::MAX),
                            pages: pages_total,
                            device_state_len,
                            streams: totals,
                        };
                        let f = sealer.seal(FrameType::Complete, complete.encode()?)?;
                        write_frame(&mut control_w, &f).await?;
                        // The outer switchover deadline bounds this wait.
                        match from_rx.recv().await {
                            Some(FromReceiver::Ready) => {
                                ready_seen = true;
                                engine
                                    .handle_ready(now())
                                    .map_err(|e| MigrateError::Options(e.to_string()))?;
                            }
                            Some(FromReceiver::Abort(a)) => {
                                return Err(MigrateError::PeerAborted {
                                    code: a.code,
                                    message: a.message,
                                });
                            }
                            Some(FromReceiver::Failed(e)) => return Err(e),
                            None => {
                                return Err(MigrateError::Aborted(
                                    "the control connection closed".into(),
                                ));
                            }
                        }
                    }
                    Action::RecordOutcome(Outcome::Committed) => {
                        let recorded = match &service {
                            None => true,
                            Some(c) => record_committed(c, migration_id).await?,
                        };
                        engine
                            .handle_outcome_recorded(now(), recorded)
                            .map_err(|e| MigrateError::Options(e.to_string()))?;
                    }
                    Action::RecordOutcome(Outcome::Aborted) => record_aborted(&service).await,
                    Action::SendCommit => {
                        let f = sealer.seal(FrameType::Commit, Vec::new())?;
                        // The commit point has passed: a lost Commit is the destination's to
                        // resolve with the key service, never a reason to resume here.
                        match tokio::time::timeout(
                            ABORT_SEND_TIMEOUT * 5,
                            write_frame(&mut control_w, &f),
                        )
                        .await
                        {
                            Ok(Ok(())) => commit_delivered = true,
                            _ => tracing::warn!(
                                "Commit not delivered; the destination must ask the key service"
                            ),
                        }
                    }
                    Action::SendAbort(reason) => {
                        let (code, message) = abort_message(&reason);
                        if let Ok(f) =
                            sealer.seal(FrameType::Abort, Abort { code, message }.encode())
                        {
                            let _ = tokio::time::timeout(
                                ABORT_SEND_TIMEOUT,
                                write_frame(&mut control_w, &f),
                            )
                            .await;
                        }
                    }
                }
                Ok(())
            };
            let step: Result<(), MigrateError> = match deadline {
                None => step.await,
                Some(d) => {
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(t0 + d), step)
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            engine.handle_tick(now());
                            Err(MigrateError::Aborted(format!(
                                "the switchover did not finish within {:?} of the pause",
                                self.switchover_timeout
                            )))
                        }
                    }
                }
            };
            if let (Ok(()), Some(stage), Some(progress)) = (&step, stage, &self.progress) {
                let r = engine.report();
                let last = r.iterations.last();
                let guest_bytes = memory.page_count() * memory.page_size();
                let remaining_bytes = match last {
                    Some(it) if it.dirty_after > 0 || r.iterations.len() > 1 => {
                        it.dirty_after * memory.page_size()
                    }
                    Some(_) => 0,
                    None => guest_bytes.saturating_sub(bytes_total),
                };
                let throughput = last.and_then(|it| it.bandwidth()).unwrap_or(0.0);
                (progress.0)(&Progress {
                    stage,
                    iteration: u32::try_from(r.iterations.len()).unwrap_or(u32::MAX),
                    bytes_sent: bytes_total,
                    guest_bytes,
                    remaining_bytes: if stage == Stage::Done {
                        0
                    } else {
                        remaining_bytes
                    },
                    dirty_rate_pages: last.and_then(|it| it.dirty_rate()).unwrap_or(0.0),
                    throughput,
                    throttle_percent: engine.throttle_percent(),
                    elapsed: started.elapsed(),
                    eta: (throughput > 0.0)
                        .then(|| Duration::from_secs_f64(remaining_bytes as f64 / throughput)),
                });
            }
            if let Err(mut e) = step {
                // A broken connection usually means the receiver aborted: prefer its
                // reason, if it arrives promptly, to "broken pipe".
                if matches!(e, MigrateError::Io(_))
                    && let Ok(Some(FromReceiver::Abort(a))) =
                        tokio::time::timeout(Duration::from_millis(500), from_rx.recv()).await
                {
                    e = MigrateError::PeerAborted {
                        code: a.code,
                        message: a.message,
                    };
                }
                tracing::warn!(error = %e, "migration step failed");
                engine.handle_failure(now(), e.to_string());
                keep(&mut first_error, e);
            }
        }
        let _ = control_w.shutdown().await;
        let report = engine.report().clone();
        match engine.outcome() {
            Some(Outcome::Committed) => Ok(MigrationReport::new(
                migration_id,
                &self.vm_name,
                negotiated.mode,
                self.streams,
                report,
                bytes_total,
                max_epoch,
                started.elapsed(),
                setup,
                commit_delivered,
            )),
            _ => {
                if matches!(first_error, Some(MigrateError::OutcomeUnknown(_))) {
                    // The VM stays paused and claimed: no second migration of it may start
                    // until the operator has settled the outcome (and restarted).
                    std::mem::forget(in_flight);
                }
                Err(first_error.unwrap_or_else(|| {
                    MigrateError::Aborted(
                        report
                            .abort_reason
                            .map_or_else(|| "aborted".to_owned(), |r| format!("{r:?}")),
                    )
                }))
            }
        }
        }
        .instrument(span)
        .await
    }
}

/// The migration id, key, the authority's word on the destination, and the key service
/// (to record the outcome with), from a [`KeySource`].
pub(crate) async fn resolve_key(
    key: KeySource,
    vm_name: &str,
) -> Result<
    (
        MigrationId,
        Option<KeyMaterial>,
        DestinationCapability,
        Option<Arc<KeyServiceClient>>,
    ),
    MigrateError,
> {
    Ok(match key {
        KeySource::Service {
            client,
            destination,
        } => {
            let issued = client.create_migration(vm_name, &destination).await?;
            let cap = issued.destination_capability();
            (issued.id, Some(issued.material), cap, Some(client))
        }
        KeySource::Direct {
            migration_id,
            material,
        } => (
            migration_id,
            Some(material),
            DestinationCapability::Encrypts,
            None,
        ),
        KeySource::None { migration_id } => (
            migration_id,
            None,
            DestinationCapability::DoesNotEncrypt,
            None,
        ),
    })
}

/// The handshake on a fresh control connection.
pub(crate) async fn handshake(
    to: &Endpoint,
    net: NetOptions,
    expect_ack: vmotion_proto::ExpectHelloAck,
    hello: WireFrame,
) -> Result<(SenderSession, Conn), MigrateError> {
    let timed_out = || MigrateError::Aborted("the receiver did not answer the handshake".into());
    let mut tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(to, net))
        .await
        .map_err(|_| timed_out())??;
    write_frame(&mut tcp, &hello).await?;
    let ack = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut tcp, 4096))
        .await
        .map_err(|_| timed_out())??
        .ok_or_else(|| MigrateError::Aborted("the receiver closed the connection".into()))?;
    let next = match expect_ack.handle(ack) {
        Ok(n) => n,
        Err(f) => {
            if let Some(abort) = &f.abort {
                let _ = write_frame(&mut tcp, abort).await;
            }
            return Err(f.into());
        }
    };
    match next {
        SenderNext::Established(s) => Ok((s, tcp)),
        SenderNext::ExpectKeyConfirm(state) => {
            let kc = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut tcp, 4096))
                .await
                .map_err(|_| timed_out())??
                .ok_or_else(|| {
                    MigrateError::Aborted("the receiver closed the connection".into())
                })?;
            match state.handle(kc) {
                Ok((s, my_kc)) => {
                    write_frame(&mut tcp, &my_kc).await?;
                    Ok((s, tcp))
                }
                Err(f) => {
                    if let Some(abort) = &f.abort {
                        let _ = write_frame(&mut tcp, abort).await;
                    }
                    Err(f.into())
                }
            }
        }
    }
}

/// Records `committed`: `Ok(true)` once it is on record, `Ok(false)` only when it
/// definitely is not (recorded as aborted, or refused). A lost answer, a timeout or an
/// outcome still being written is *unknown*: the record is retried (it is idempotent) and
/// read back; if it stays unknown the VM is left paused — resuming could run it twice.
async fn record_committed(c: &KeyServiceClient, id: MigrationId) -> Result<bool, MigrateError> {
    use vmotion_keyservice::api::ErrorCode;
    for attempt in 1..=6u32 {
        match c.record_outcome(id, RecordedOutcome::Committed).await {
            Ok(r) if r.outcome == Some(RecordedOutcome::Committed) => return Ok(true),
            Ok(_) => {}
            Err(e) => match e.code() {
                Some(ErrorCode::Conflict) => return Ok(false), // on record as aborted
                Some(ErrorCode::Forbidden | ErrorCode::NotFound | ErrorCode::BadRequest) => {
                    return Ok(false);
                }
                _ => tracing::warn!(error = %e, attempt, "outcome record unanswered"),
            },
        }
        if let Ok(r) = c.outcome(id).await {
            match r.outcome {
                Some(RecordedOutcome::Committed) => return Ok(true),
                Some(RecordedOutcome::Aborted) => return Ok(false),
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(250) * attempt).await;
    }
    Err(MigrateError::OutcomeUnknown(format!(
        "the outcome of migration {id} could be neither recorded nor read back; the VM is \
         left PAUSED at the source. Read `GET /v1/migrations/{id}/outcome` at the key service: \
         resume the source only if it says aborted (or nothing after the key service is back)"
    )))
}

fn abort_message(reason: &AbortReason) -> (AbortCode, String) {
    match reason {
        AbortReason::Limit(l) => (
            AbortCode::LimitExceeded,
            format!("pre-copy did not converge ({l:?} limit)"),
        ),
        AbortReason::SwitchoverTimeout => (
            AbortCode::Timeout,
            "no Ready within the switchover timeout".into(),
        ),
        AbortReason::OutcomeNotRecorded => (
            AbortCode::SourceFailed,
            "the outcome could not be recorded".into(),
        ),
        AbortReason::Failure(m) => (AbortCode::SourceFailed, m.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that sat idle gets a short burst, not the whole idle time as credit:
    /// otherwise a pass after a quiet one runs far above the cap and the engine believes
    /// the link is faster than it is.
    #[test]
    fn idle_time_earns_only_a_short_burst() {
        let rate = 1_000_000.0; // 1 MB/s
        let mut p = Pacer {
            origin: Instant::now(),
            sent: 0,
        };
        std::thread::sleep(Duration::from_millis(200));
        // 100 ms worth at once after 200 ms idle: only PACING_BURST of it is free.
        let wait = p.after(100_000, rate).expect("must wait");
        assert!(
            wait >= Duration::from_millis(60) && wait <= Duration::from_millis(81),
            "{wait:?}"
        );
        // Ahead of the schedule nothing is reset: the next bytes wait too.
        assert!(p.after(10_000, rate).is_some());
    }

    /// The connection leaves from the bound address with the DSCP mark in its TOS byte,
    /// and both ends probe a silent peer.
    #[tokio::test]
    async fn connections_carry_the_bind_address_and_dscp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let net = NetOptions {
            bind: Some("127.0.0.2".parse().unwrap()),
            dscp: Some(46),
        };
        let tcp = connect_tcp(addr, net).await.unwrap();
        assert_eq!(tcp.local_addr().unwrap().ip(), net.bind.unwrap());
        let (accepted, peer) = crate::Accept::accept_conn(&listener).await.unwrap();
        let crate::Peer::Tcp(peer) = peer else {
            panic!("a TCP peer")
        };
        assert_eq!(
            peer.ip(),
            net.bind.unwrap(),
            "the receiver sees the migration address"
        );
        let Conn::Tcp(accepted) = accepted else {
            panic!("a TCP connection")
        };
        for s in [&tcp, &accepted] {
            let s = socket2::SockRef::from(s);
            assert!(s.keepalive().unwrap(), "keepalive on");
            assert_eq!(
                s.tcp_keepalive_time().unwrap(),
                Duration::from_secs(10),
                "first probe after 10 s idle"
            );
        }
        let tos = tokio::net::TcpSocket::from_std_stream(tcp.into_std().unwrap())
            .tos_v4()
            .unwrap();
        assert_eq!(tos, 46 << 2, "EF marked");
    }
}
