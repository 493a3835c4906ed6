//! `vmotion-recv`: the destination daemon. Listens for migrations, registers (and keeps
//! refreshing) this host's capabilities with the key service, takes several migrations
//! at once, writes each incoming guest to the chosen sink, and stops cleanly on SIGINT or
//! SIGTERM (migrations in progress are dropped, never marked done).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use vmotion::{Endpoint, Listener, ReceiveOutcome, ReceiveReport, Receiver, ReceiverKeys, Sink};
use vmotion_cli::qemu_destination::{self, QmpTemplate};
use vmotion_cli::shutdown_signal;
use vmotion_cli::sink_dir::{FileSink, SinkDir};
use vmotion_keyservice_client::KeyServiceClient;
use vmotion_keyservice_client::api::RegisterRequest;
use vmotion_mover::synthetic::SyntheticGuest;
use vmotion_mover::{GuestMemory, VmControl};
use vmotion_proto::DeviceModel;
use vmotion_proto::message::Hello;

/// vmotion's destination daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where to listen: HOST:PORT (port 0: any free port; the address is printed on
    /// stdout), or unix:PATH for migrations on this host (the socket file is removed
    /// at exit; a stale one from a crashed daemon is replaced).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: Endpoint,
    #[command(flatten)]
    keyservice: vmotion_cli::KeyServiceArgs,
    /// Refuse every migration that would be plaintext.
    #[arg(long)]
    require_encryption: bool,
    /// Register this host as unable to encrypt (and take plaintext migrations only), even
    /// with a key service.
    #[arg(long, conflicts_with = "require_encryption")]
    no_encryption: bool,
    /// Where incoming guests go.
    #[arg(long, value_enum, default_value_t = SinkKind::Synthetic)]
    sink: SinkKind,
    /// Folder for memory files (with `--sink memfile`): `VM.receiving/` while a guest
    /// arrives, `VM.unsettled/` while its claim is not settled, `VM.mem` and `VM.state`
    /// once it is claimed here (docs/cli.md).
    #[arg(long, default_value = "/dev/shm/vmotion")]
    sink_dir: PathBuf,
    /// List the unsettled guests in `--sink-dir` (VM, migration id, folder), then exit.
    #[arg(long)]
    status: bool,
    /// Largest guest accepted, in MiB (pre-flight: larger guests are refused).
    #[arg(long, default_value_t = 65536)]
    max_guest_mib: u64,
    /// Most data streams per migration.
    #[arg(long, default_value_t = 16)]
    max_streams: u16,
    /// Largest device state accepted, in MiB (a larger one is refused). With
    /// --max-streams × 2 MiB it bounds what one arriving migration holds beyond its guest.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_device_state_mib: u64,
    /// Seconds a migration may go without a page or control frame from its source before
    /// it is abandoned (the guest discarded; the source keeps the VM).
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(1..=86400))]
    progress_timeout: u64,
    /// Seconds to wait for each step of a source (the handshake, its data connections, the
    /// end of its streams after Complete, Commit after Ready).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    step_timeout: u64,
    /// Seconds the claim step keeps asking a key service that does not answer before the
    /// received guest is kept unsettled (paused).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    settle_timeout: u64,
    /// How often to refresh the registration, in seconds.
    #[arg(long, default_value_t = 20)]
    refresh_secs: u64,
    /// After a VM resumes here, announce its MAC addresses (RARP) and IPv4 addresses
    /// (gratuitous ARP) on this interface, from its policy file's `macs` and `ips`.
    #[arg(long, requires = "policy_dir")]
    announce_interface: Option<String>,
    /// Policy files, for the addresses to announce.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Take tunnelled migrations (`vmotion-send --tunnel`) and deliver each of their
    /// connections to the destination hypervisor's incoming address: unix:PATH or
    /// [tcp:]HOST:PORT, as given to QEMU's `-incoming` / `migrate-incoming`. `{vm}` in it
    /// is replaced by the VM's name (e.g. unix:/run/vmotion/{vm}.incoming), so one daemon
    /// serves every VM (unix paths only: in a TCP address a sender could pick the host or
    /// port). Without this flag tunnels are refused; tunnels must be encrypted unless
    /// `--allow-plaintext-tunnels`.
    #[arg(long)]
    tunnel: Option<String>,
    /// Also take tunnels that the negotiation makes plaintext. Such a tunnel is not
    /// authenticated: anyone who reaches this daemon could feed a waiting QEMU a migration
    /// stream of their own.
    #[arg(long, requires = "tunnel")]
    allow_plaintext_tunnels: bool,
    /// The destination QEMU of each tunnelled VM, reached over QMP: unix:PATH with {vm}
    /// (e.g. unix:/run/vmotion/{vm}.qmp). Once a tunnel is authenticated the daemon sets
    /// that QEMU's multifd to match the tunnel's connections and issues
    /// `migrate-incoming` itself (start QEMU with `-incoming defer`); after the tunnel
    /// closes it logs when the guest runs here (or that it does not within 30 s).
    #[arg(long, requires = "tunnel", value_name = "TEMPLATE")]
    qemu_qmp: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9700 (docs/operations.md lists them). Plain HTTP: keep it on a
    /// management network.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// The destination hypervisor's incoming address for VM `vm`, from the `--tunnel`
/// template. The name was checked to be a plain name (no path separators).
fn tunnel_target(template: &str, vm: &str) -> Result<Endpoint, String> {
    template.replace("{vm}", vm).parse()
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SinkKind {
    /// In memory (a paused synthetic guest), for tests and demos.
    Synthetic,
    /// A memory file per guest in `--sink-dir`.
    Memfile,
    /// A KVM micro-VM per guest (`vmotion-send --kvm-mib`), running here after `Commit`
    /// until the daemon stops.
    Kvm,
}

enum AnySink {
    Synthetic(SyntheticGuest),
    File(FileSink),
    Kvm(vmotion_cli::KvmSink),
}

impl Sink for AnySink {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        match self {
            Self::Synthetic(g) => Sink::memory(g),
            Self::File(f) => Sink::memory(f),
            Self::Kvm(v) => v.memory(),
        }
    }
    fn control(&mut self) -> &mut dyn VmControl {
        match self {
            Self::Synthetic(g) => Sink::control(g),
            Self::File(f) => f.control(),
            Self::Kvm(v) => v.control(),
        }
    }
    fn persist(&mut self) -> Result<(), vmotion_mover::MoverError> {
        match self {
            Self::Synthetic(g) => Sink::persist(g),
            Self::File(f) => f.persist(),
            Self::Kvm(v) => v.persist(),
        }
    }
    fn discard(&mut self) -> Result<(), vmotion_mover::MoverError> {
        match self {
            Self::Synthetic(g) => Sink::discard(g),
            Self::File(f) => f.discard(),
            Self::Kvm(v) => v.discard(),
        }
    }
}

/// Prints the unsettled guests of the sink folder (`--status`).
fn status(dir: &std::path::Path) -> anyhow::Result<()> {
    let dir = SinkDir::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let unsettled = dir.unsettled()?;
    if unsettled.is_empty() {
        println!("no unsettled guests in {}", dir.root().display());
    }
    for u in unsettled {
        println!(
            "unsettled {} migration {} {}",
            u.vm,
            u.migration_id,
            u.path.display()
        );
    }
    Ok(())
}

/// At start: removes partly received guests (none reached Ready, so no source committed
/// them) and unsettled folders whose guest is gone (filed or discarded when the daemon
/// stopped), and settles every unsettled one with the arbiter, logging what it did.
async fn settle_sink_dir(dir: SinkDir, receiver: Arc<Receiver>) {
    match dir.remove_partial() {
        Ok(vms) => {
            for vm in vms {
                tracing::info!(%vm, "removed a partly received guest (it never reached Ready)");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot clean the sink folder"),
    }
    match dir.remove_emptied() {
        Ok(vms) => {
            for vm in vms {
                tracing::info!(%vm, "removed an unsettled folder whose guest was already filed or discarded (the daemon had stopped in between)");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot clean the sink folder"),
    }
    let unsettled = match dir.unsettled() {
        Ok(u) => u,
        Err(e) => return tracing::error!(error = %e, "cannot list unsettled guests"),
    };
    for u in unsettled {
        tracing::warn!(vm = %u.vm, migration = %u.migration_id, path = %u.path.display(), "unsettled guest found: asking the arbiter");
        let mut sink = match dir.reopen(&u) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(vm = %u.vm, migration = %u.migration_id, error = %e, "cannot reopen the unsettled guest; left as it is");
                continue;
            }
        };
        match receiver.settle(u.migration_id, &mut sink).await {
            vmotion::DestinationOutcome::Resumed => {
                tracing::info!(vm = %u.vm, migration = %u.migration_id, file = %sink.claimed_memory().display(), "claimed at the arbiter: the guest is complete here")
            }
            vmotion::DestinationOutcome::Discarded(why) => {
                tracing::info!(vm = %u.vm, migration = %u.migration_id, %why, "discarded: the source keeps the VM")
            }
            vmotion::DestinationOutcome::Unsettled(why) => {
                tracing::warn!(vm = %u.vm, migration = %u.migration_id, %why, "still unsettled: kept")
            }
            vmotion::DestinationOutcome::ResumeFailed(why) => {
                tracing::error!(vm = %u.vm, migration = %u.migration_id, %why, "claimed, but filing the guest failed: kept")
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.status {
        return status(&args.sink_dir);
    }
    let client = args
        .keyservice
        .client()
        .context("key service client")?
        .map(Arc::new);
    let can_encrypt = !args.no_encryption;
    let keys = register(client.as_ref(), can_encrypt).await?;
    if let Some(c) = client.clone() {
        keep_registered(
            c,
            can_encrypt,
            Duration::from_secs(args.refresh_secs.max(1)),
        );
    }
    let receiver = Arc::new(receiver(&args, keys, client.as_ref())?);
    let listener = Listener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("listening on {}", listener.local_endpoint()?);
    let sinks = Sinks::open(&args, &receiver)?;
    let metrics = Arc::new(vmotion_cli::metrics::RecvMetrics::new());
    if let Some(addr) = args.metrics {
        serve_metrics(addr, metrics.clone(), receiver.clone()).await?;
    }
    // Micro-VMs committed here run until the daemon stops: held to the end of `run`.
    let running: Running = Arc::default();
    let arrivals = Arrivals {
        metrics,
        running: running.clone(),
        qemu_qmp: args
            .qemu_qmp
            .as_deref()
            .and_then(|t| QmpTemplate::parse(t).ok()),
        held: std::sync::Mutex::default(),
    };
    receiver
        .serve(
            listener,
            move |hello| sinks.make(hello),
            move |finished| arrivals.finished(finished),
            shutdown_signal(),
        )
        .await;
    tracing::info!("stopped");
    drop(running);
    Ok(())
}

/// Serves the metrics on `addr` (bound now, so a bad address fails the start).
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Arc<vmotion_cli::metrics::RecvMetrics>,
    receiver: Arc<Receiver>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    let render = Arc::new(move || {
        metrics.render(receiver.in_flight().len(), &receiver.dropped_connections())
    });
    tokio::spawn(vmotion_metrics::serve(listener, render));
    Ok(())
}

/// What this host registers at the key service.
fn registration(can_encrypt: bool) -> RegisterRequest {
    RegisterRequest {
        can_encrypt,
        protocol_versions: vmotion_proto::frame::SUPPORTED_VERSIONS.collect(),
        ciphers: vec![vmotion_keyservice_client::api::CIPHER_AES_256_GCM.into()],
    }
}

/// Registers this host with the key service, when there is one, and says where the keys
/// of its migrations come from.
async fn register(
    client: Option<&Arc<KeyServiceClient>>,
    can_encrypt: bool,
) -> anyhow::Result<ReceiverKeys> {
    let Some(c) = client else {
        tracing::warn!("no key service: this host cannot encrypt (plaintext migrations only)");
        return Ok(ReceiverKeys::None);
    };
    let record = c
        .register(&registration(can_encrypt))
        .await
        .context("registering with the key service")?;
    tracing::info!(host = %record.host, can_encrypt, "registered with the key service");
    Ok(if can_encrypt {
        ReceiverKeys::Service(c.clone())
    } else {
        ReceiverKeys::None
    })
}

/// Keeps the registration alive: renews it `every` so often, for as long as the daemon
/// runs.
fn keep_registered(c: Arc<KeyServiceClient>, can_encrypt: bool, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = c.register(&registration(can_encrypt)).await {
                tracing::warn!(error = %e, "registration refresh failed");
            }
        }
    });
}

/// The receiver the flags describe: its limits, its arbiter, tunnels and announcements.
fn receiver(
    args: &Args,
    keys: ReceiverKeys,
    client: Option<&Arc<KeyServiceClient>>,
) -> anyhow::Result<Receiver> {
    let mut receiver = Receiver::new(keys)
        .require_encryption(args.require_encryption)
        .max_streams(args.max_streams)
        .max_device_state(args.max_device_state_mib << 20)
        .progress_timeout(Duration::from_secs(args.progress_timeout))
        .timeout(Duration::from_secs(args.step_timeout))
        .settle_timeout(Duration::from_secs(args.settle_timeout));
    // The key service is the arbiter of every switchover here, encrypting or not: this
    // host claims each VM there before it resumes it.
    if let Some(c) = client {
        receiver = receiver.arbiter(c.clone());
    }
    if let Some(template) = args.tunnel.clone() {
        if let Some(qmp) = &args.qemu_qmp {
            let qmp = QmpTemplate::parse(qmp).map_err(|e| anyhow::anyhow!("--qemu-qmp: {e}"))?;
            receiver = prepare_qemus(receiver, template.clone(), qmp);
        }
        receiver = take_tunnels(receiver, template, args.allow_plaintext_tunnels)?;
    }
    if let (Some(interface), Some(dir)) = (args.announce_interface.clone(), args.policy_dir.clone())
    {
        receiver = receiver.on_resumed(announcer(interface, dir));
    }
    Ok(receiver)
}

/// `receiver`, taking tunnels to the address the `--tunnel` template names for each VM.
fn take_tunnels(
    receiver: Receiver,
    template: String,
    allow_plaintext: bool,
) -> anyhow::Result<Receiver> {
    // A bad template is a usage error now, not a refusal per migration later.
    tunnel_target(&template, "vm").map_err(|e| anyhow::anyhow!("--tunnel: {e}"))?;
    if template.contains("{vm}") && !template.starts_with("unix:") {
        anyhow::bail!(
            "--tunnel: {{vm}} may only stand in a unix: path (in a TCP address the sender \
             would choose where this host connects)"
        );
    }
    Ok(receiver
        .allow_plaintext_tunnels(allow_plaintext)
        .tunnel_to(move |hello| {
            if !vmotion_policy::valid_vm_name(&hello.vm_name) {
                return Err(format!(
                    "`{}` is not an acceptable VM name here",
                    hello.vm_name
                ));
            }
            tunnel_target(&template, &hello.vm_name)
        }))
}

/// `--qemu-qmp`: each tunnel's destination QEMU is made ready over QMP once the tunnel
/// is authenticated (multifd to match, `migrate-incoming` where the tunnel delivers).
fn prepare_qemus(receiver: Receiver, template: String, qmp: QmpTemplate) -> Receiver {
    receiver.prepare_tunnels(move |hello| {
        let incoming = tunnel_target(&template, &hello.vm_name)?;
        let uri = match &incoming {
            Endpoint::Tcp(a) => format!("tcp:{a}"),
            Endpoint::Unix(_) => incoming.to_string(),
        };
        qemu_destination::prepare(&qmp.path(&hello.vm_name), hello.streams, &uri)?;
        tracing::info!(migration = %hello.migration_id, vm = %hello.vm_name, %uri, connections = hello.streams, "destination QEMU waits for the migration");
        Ok(())
    })
}

/// The post-resume hook: announces the VM's addresses from its policy file in `dir` on
/// `interface`, from a thread of its own.
fn announcer(interface: String, dir: PathBuf) -> impl Fn(&ReceiveReport) + Send + Sync + 'static {
    move |report| {
        let policy = match vmotion_policy::load(&dir, &report.vm_name) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(migration = %report.migration_id, error = %e, "no addresses to announce");
                return;
            }
        };
        if policy.macs.is_empty() {
            return;
        }
        let what = vmotion_announce::Announcement {
            ips: policy.ips.iter().map(|ip| (policy.macs[0], *ip)).collect(),
            macs: policy.macs,
        };
        let (interface, id) = (interface.clone(), report.migration_id);
        std::thread::spawn(move || {
            match vmotion_announce::announce(
                &interface,
                &what,
                vmotion_announce::Schedule::default(),
            ) {
                Ok(n) => tracing::info!(migration = %id, frames = n, %interface, "announced"),
                Err(e) => tracing::warn!(migration = %id, error = %e, "announcement failed"),
            }
        });
    }
}

/// Pre-flight: builds the sink of each incoming guest, or refuses it.
struct Sinks {
    kind: SinkKind,
    /// The sink folder (`--sink memfile`).
    files: Option<SinkDir>,
    max_bytes: u64,
}

impl Sinks {
    /// The sinks the flags ask for. A sink folder is opened now, and its unsettled guests
    /// settled in the background.
    fn open(args: &Args, receiver: &Arc<Receiver>) -> anyhow::Result<Self> {
        let files = if args.sink == SinkKind::Memfile {
            let dir = SinkDir::open(&args.sink_dir)
                .with_context(|| format!("opening {}", args.sink_dir.display()))?;
            tokio::spawn(settle_sink_dir(dir.clone(), receiver.clone()));
            Some(dir)
        } else {
            None
        };
        Ok(Self {
            kind: args.sink,
            files,
            max_bytes: args.max_guest_mib << 20,
        })
    }

    fn make(&self, hello: &Hello) -> Result<AnySink, String> {
        let bytes = hello.guest_pages.saturating_mul(u64::from(hello.page_size));
        if bytes > self.max_bytes {
            return Err(format!(
                "the guest needs {} MiB; this host accepts at most {} MiB",
                bytes >> 20,
                self.max_bytes >> 20
            ));
        }
        // The name comes from the sender: it must not be able to name a path.
        if !vmotion_policy::valid_vm_name(&hello.vm_name) {
            return Err(format!(
                "`{}` is not an acceptable VM name here",
                hello.vm_name
            ));
        }
        match self.kind {
            SinkKind::Synthetic => Ok(AnySink::Synthetic(SyntheticGuest::blank(
                hello.guest_pages,
                u64::from(hello.page_size),
            ))),
            // VM.receiving/ while it arrives, VM.unsettled/ from Ready to the claim,
            // VM.mem once claimed: a guest is never taken for another.
            SinkKind::Memfile => self
                .files
                .as_ref()
                .ok_or_else(|| "no sink folder".to_owned())?
                .receive(
                    &hello.vm_name,
                    hello.migration_id,
                    hello.guest_pages,
                    u64::from(hello.page_size),
                )
                .map(AnySink::File),
            // A micro-VM runs only a micro-VM's device state: anything else the sender
            // names is refused here, before the source pauses (an older sender says
            // nothing, and loading the state decides).
            SinkKind::Kvm => match hello.device {
                DeviceModel::MicroVm | DeviceModel::Unspecified => {
                    vmotion_vmm::MicroVm::incoming(bytes)
                        .map(|vm| AnySink::Kvm(vmotion_cli::KvmSink(vm)))
                        .map_err(|e| e.to_string())
                }
                other => Err(format!(
                    "the kvm sink runs vmotion-vmm micro-VMs; this guest is {}",
                    other.name()
                )),
            },
        }
    }
}

/// The micro-VMs running here.
type Running = Arc<std::sync::Mutex<Vec<Arc<vmotion_cli::KvmSink>>>>;

/// Logs, from a thread of its own, when the destination QEMU at `qmp` runs the guest
/// that just arrived through a tunnel (or that it does not within 30 s).
fn watch_qemu(qmp: PathBuf, id: vmotion_proto::MigrationId, vm: String) {
    std::thread::spawn(move || {
        match qemu_destination::wait_running(&qmp, Duration::from_secs(30)) {
            Ok(after) => {
                tracing::info!(migration = %id, %vm, after_ms = after.as_millis(), "guest running here (QEMU)")
            }
            Err(e) => {
                tracing::warn!(migration = %id, %vm, error = %e, "the destination QEMU does not run the guest")
            }
        }
    });
}

/// What the daemon keeps of the migrations it received.
struct Arrivals {
    metrics: Arc<vmotion_cli::metrics::RecvMetrics>,
    running: Running,
    /// `--qemu-qmp`: where each tunnelled VM's destination QEMU is watched.
    qemu_qmp: Option<QmpTemplate>,
    /// Guests whose claim did not settle: perhaps the only copy allowed to run.
    held: std::sync::Mutex<Vec<AnySink>>,
}

impl Arrivals {
    /// Logs how a migration ended, and keeps what must outlive it.
    fn finished(&self, f: vmotion::Finished<AnySink>) {
        self.metrics.finished(&f);
        match f.result {
            Ok(vmotion::Incoming::Tunnel(report)) => {
                tracing::info!(
                    migration = %report.migration_id,
                    vm = %report.vm_name,
                    mode = ?report.mode,
                    connections = report.connections,
                    bytes_to_destination = report.bytes_to_destination,
                    bytes_from_destination = report.bytes_from_destination,
                    epochs = report.epochs,
                    "tunnel closed"
                );
                if let Some(qmp) = &self.qemu_qmp {
                    watch_qemu(
                        qmp.path(&report.vm_name),
                        report.migration_id,
                        report.vm_name,
                    );
                }
            }
            Ok(vmotion::Incoming::Vm(report, sink)) => self.received(report, sink),
            Err(e) => {
                tracing::warn!(migration = %f.migration_id, vm = %f.vm_name, error = %e, "migration not received")
            }
        }
    }

    /// A guest received here: an unsettled one is held (paused), a committed micro-VM
    /// kept running.
    fn received(&self, report: ReceiveReport, sink: AnySink) {
        if let AnySink::File(file) = &sink {
            match &report.outcome {
                ReceiveOutcome::Committed => {
                    tracing::info!(migration = %report.migration_id, vm = %report.vm_name, file = %file.claimed_memory().display(), "guest complete here")
                }
                _ => {
                    tracing::warn!(migration = %report.migration_id, vm = %report.vm_name, path = %file.path().display(), "kept with its device state: the claim is not settled")
                }
            }
        }
        tracing::info!(
            migration = %report.migration_id,
            vm = %report.vm_name,
            mode = ?report.mode,
            outcome = ?report.outcome,
            pages = report.pages,
            "migration received"
        );
        if report.outcome != ReceiveOutcome::Committed {
            // It may be the only copy allowed to run: keep it (paused) until the daemon
            // stops; never drop it.
            tracing::warn!(
                migration = %report.migration_id,
                vm = %report.vm_name,
                outcome = ?report.outcome,
                "the received guest is kept PAUSED here: settle the outcome at the key service (GET /v1/migrations/ID/outcome)"
            );
            self.held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(sink);
        } else if let AnySink::Kvm(vm) = sink {
            self.keep_running(vm, report.vm_name);
        }
    }

    /// A committed micro-VM runs until the daemon stops; whether it runs is logged from a
    /// thread, not the async worker.
    fn keep_running(&self, vm: vmotion_cli::KvmSink, name: String) {
        let vm = Arc::new(vm);
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(vm.clone());
        std::thread::spawn(move || {
            let alive = vm.0.wait_beats(1, Duration::from_secs(5));
            tracing::info!(
                vm = %name,
                first_heartbeat = ?vm.0.first_heartbeat(),
                alive,
                failure = ?vm.0.failure(),
                "micro-VM running here"
            );
        });
    }
}

fn main() -> ExitCode {
    // Packaging: `--generate man|bash|zsh|fish` (scripts/dist.sh).
    if let Some(code) = vmotion_clidoc::generate_if_asked::<Args>("vmotion-recv") {
        return code;
    }
    vmotion_cli::init_logging("info");
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmotion-recv: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmotion-recv: {e:#}");
            ExitCode::FAILURE
        }
    }
}
