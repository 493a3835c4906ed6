//! The source side: [`Sender`].
//!
//! - `mod.rs`: the API (builder, progress) and the migration's setup (keys, connections
//!   and the handshake come from [`crate::connect`], which the tunnel shares);
//! - `streams.rs`: the data streams (batching, sealing, pacing);
//! - `run.rs`: the engine's actions carried out, the switchover and the claim step.

mod run;
mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument as _;
use vmotion_authority::Arbiter;
use vmotion_engine::ConvergencePolicy;
use vmotion_mover::Source;
use vmotion_proto::{
    EpochLimits, MigrationId, SenderConfig, SenderHandshake, VmPolicy, handshake_random,
};

// Shared with the tunnel: setup in `crate::connect`, the abort record in `crate::claim`.
pub(crate) use crate::claim::abort_record;
pub(crate) use crate::connect::connect_within;
use crate::connect::{Admission, handshake, resolve_key};
pub(crate) use crate::connect::{KeySource, NetOptions};

use crate::error::MigrateError;
use crate::in_flight::InFlight;
use crate::report::MigrationReport;

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
///     .unwrap()
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
    arbiter: Option<Arc<dyn Arbiter>>,
    progress_timeout: Duration,
    claim_timeout: Duration,
    in_flight: InFlight,
    admission: Admission,
}

/// Where a migration is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for an admission slot at the key authority (its create answered busy):
    /// nothing is sent yet. `elapsed` is the time waited so far.
    Queued,
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

impl Progress {
    /// Waiting for admission, `waited` so far; nothing sent.
    fn queued(guest_bytes: u64, waited: Duration) -> Self {
        Self {
            stage: Stage::Queued,
            iteration: 0,
            bytes_sent: 0,
            guest_bytes,
            remaining_bytes: guest_bytes,
            dirty_rate_pages: 0.0,
            throughput: 0.0,
            throttle_percent: 0,
            elapsed: waited,
            eta: None,
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("vm_name", &self.vm_name)
            .field("policy", &self.policy)
            .field("key", &self.key)
            .field("streams", &self.streams)
            .field("arbiter", &self.arbiter.is_some())
            .finish_non_exhaustive()
    }
}

/// A progress callback.
#[derive(Clone)]
pub(crate) struct ProgressFn(Arc<dyn Fn(&Progress) + Send + Sync>);

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
    /// key (so plaintext), no arbiter, one data stream, the default convergence policy, a
    /// 10 s switchover timeout, a 10 s claim timeout, a 150 s progress timeout, 2 MiB
    /// chunks, 256 KiB batches, no bandwidth cap, an in-flight set of its own, a
    /// [`DEFAULT_QUEUE_TIMEOUT`](crate::DEFAULT_QUEUE_TIMEOUT) for an admission slot at
    /// the key authority, no stale migration aborted.
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
            arbiter: None,
            progress_timeout: crate::DEFAULT_PROGRESS_TIMEOUT,
            claim_timeout: Duration::from_secs(10),
            in_flight: InFlight::new(),
            admission: Admission::default(),
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

    /// The arbiter that records the switchover (commit, the destination's claim, a
    /// revert). With [`KeySource::Service`] the key service is the arbiter and this is not
    /// needed; with keys handed in, pass the orchestrator's. Without any, `Claimed` from
    /// the destination is the only proof it resumed, and without it the VM stays paused
    /// ([`MigrateError::OutcomeUnknown`]).
    pub fn arbiter(mut self, arbiter: Arc<dyn Arbiter>) -> Self {
        self.0.arbiter = Some(arbiter);
        self
    }

    /// How long the migration may go without progress (a data or control write taking no
    /// bytes, the receiver silent) before it aborts with the VM running here.
    pub fn progress_timeout(mut self, t: Duration) -> Self {
        self.0.progress_timeout = t;
        self
    }

    /// How long after `Commit` to wait for the destination's claim before trying to take
    /// the VM back at the arbiter.
    pub fn claim_timeout(mut self, t: Duration) -> Self {
        self.0.claim_timeout = t;
        self
    }

    /// The set of VMs in flight to check and join: share one among the senders of a
    /// program that must never migrate a VM twice at once.
    pub fn in_flight(mut self, set: InFlight) -> Self {
        self.0.in_flight = set;
        self
    }

    /// How long to wait for an admission slot while the key authority answers that its
    /// admission limits are reached (progress reports [`Stage::Queued`] meanwhile); past
    /// it the migration fails with [`MigrateError::QueueTimeout`], nothing sent. Zero:
    /// do not wait, fail at the first such answer.
    pub fn queue_timeout(mut self, t: Duration) -> Self {
        self.0.admission.queue_timeout = t;
        self
    }

    /// Asks the key authority to abort this host's own earlier migration of the VM if it
    /// is still open, instead of refusing with
    /// [`AuthorityError::VmInFlight`](crate::AuthorityError::VmInFlight). Only for a
    /// source whose earlier sender died before its switchover: the authority never aborts
    /// a migration past its commit, nor another host's.
    pub fn abort_stale(mut self, abort_stale: bool) -> Self {
        self.0.admission.abort_stale = abort_stale;
        self
    }

    /// The sender, or what is wrong with the options.
    pub fn build(self) -> Result<Sender, MigrateError> {
        let s = self.0;
        if s.streams == 0 || s.streams > vmotion_proto::message::MAX_STREAMS {
            return Err(MigrateError::InvalidOptions("streams must be 1 to 256"));
        }
        if s.max_bandwidth == Some(0) {
            return Err(MigrateError::InvalidOptions(
                "a bandwidth cap must be above 0",
            ));
        }
        if s.progress_timeout < Duration::from_millis(100) {
            return Err(MigrateError::InvalidOptions(
                "the progress timeout must be at least 100 ms",
            ));
        }
        if s.switchover_timeout.is_zero() || s.claim_timeout.is_zero() {
            return Err(MigrateError::InvalidOptions(
                "the switchover and claim timeouts must be above 0",
            ));
        }
        Ok(s)
    }
}

impl Sender {
    /// Migrates the VM in `source` to the receiver at `to` (a `SocketAddr`, or an
    /// [`Endpoint`](crate::Endpoint) for a Unix socket). Returns the report once the
    /// destination's claim on the VM is known (it runs there); on any error the error says
    /// where the VM is: running at the source (refused, aborted, reverted), or paused at
    /// the source with the outcome unknown.
    pub async fn migrate(
        self,
        to: impl Into<crate::Endpoint>,
        source: &mut dyn Source,
    ) -> Result<MigrationReport, MigrateError> {
        let started = Instant::now();
        let to = to.into();
        // Pre-flight: one migration of a VM at a time, through this in-flight set.
        let in_flight = self.in_flight.claim(&self.vm_name)?;
        let guest_bytes = source.memory().page_count() * source.memory().page_size();
        let progress = self.progress.clone();
        let queued = move |waited: Duration| {
            if let Some(p) = &progress {
                (p.0)(&Progress::queued(guest_bytes, waited));
            }
        };
        let keyed = resolve_key(
            self.key,
            &self.vm_name,
            self.arbiter.clone(),
            self.admission,
            &queued,
        )
        .await?;
        // Every log line from here on carries the migration id.
        let span = tracing::info_span!("migration", id = %keyed.id, vm = %self.vm_name);
        let settings = run::Settings {
            vm_name: self.vm_name.clone(),
            streams: self.streams,
            convergence: self.convergence,
            switchover_timeout: self.switchover_timeout,
            chunk_pages: self.chunk_pages,
            batch_bytes: self.batch_bytes,
            max_bandwidth: self.max_bandwidth,
            progress: self.progress.clone(),
            progress_timeout: self.progress_timeout,
            claim_timeout: self.claim_timeout,
            net: self.net,
            keyless: keyed.material.is_none(),
            claim_at_arbiter: keyed.arbiter.is_some()
                && keyed.destination != vmotion_proto::DestinationCapability::Unregistered,
        };
        let config = SenderConfig {
            migration_id: keyed.id,
            vm_name: self.vm_name,
            policy: self.policy.effective(),
            destination: keyed.destination,
            key: keyed.material,
            versions: vmotion_proto::frame::SUPPORTED_VERSIONS,
            page_size: u32::try_from(source.memory().page_size())
                .map_err(|_| MigrateError::InvalidOptions("page size too large"))?,
            guest_pages: source.memory().page_count(),
            streams: self.streams,
            kind: vmotion_proto::MigrationKind::Memory,
            device: source.device_model(),
            limits: self.limits,
            random: handshake_random()
                .map_err(|_| MigrateError::Internal("no OS randomness".into()))?,
        };
        let arbiter = keyed.arbiter;
        let id = keyed.id;
        async move {
            let result = async {
                // Refusals that need no connection happen here: not a byte reaches the
                // destination.
                let (expect_ack, hello) = SenderHandshake::start(config)?;
                let session = handshake(&to, settings.net, expect_ack, hello).await?;
                run::Run::start(session, &to, settings, source, arbiter.clone(), id, started).await
            }
            .await;
            let run = match result {
                Ok(run) => run,
                Err(e) => {
                    abort_record(arbiter.as_deref(), id).await;
                    return Err(e);
                }
            };
            let outcome = run.drive().await;
            if matches!(outcome, Err(MigrateError::OutcomeUnknown(_))) {
                // The VM stays paused and claimed: no second migration of it may start
                // until the operator has settled the outcome.
                in_flight.keep();
            }
            outcome
        }
        .instrument(span)
        .await
    }
}
