//! `vmotion-demo`: one encrypted live migration on this machine, end to end.
//!
//! Builds a development PKI in a temporary folder, starts the key service (mutual TLS) and
//! a receiver on loopback, migrates a running guest encrypted with a progress display,
//! checks it, prints the report and cleans up. The guest is a KVM micro-VM where
//! /dev/kvm can be opened (checked: its heartbeat continues exactly at the destination
//! and its own checksum of its memory there equals the source's at the pause), else a
//! synthetic guest (checked: every page equals the source's at the pause).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::net::TcpListener;
use vmotion::{KeySource, ReceiveOutcome, Receiver, ReceiverKeys, Sender};
use vmotion_engine::ConvergencePolicy;
use vmotion_keyservice::{Config, Server, pki};
use vmotion_keyservice_client::api::{Outcome, RegisterRequest};
use vmotion_keyservice_client::{ClientIdentity, KeyServiceClient};
use vmotion_mover::synthetic::{Pattern, SyntheticConfig, SyntheticGuest};
use vmotion_proto::{EncryptionPolicy, Mode, VmPolicy};

/// One encrypted live migration on this machine: key service, receiver, sender, check.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Pages the guest writes per second while it is migrated.
    #[arg(long, default_value_t = 20_000.0)]
    dirty_rate: f64,
    /// Data connections.
    #[arg(long, default_value_t = 2)]
    streams: u16,
    /// Longest acceptable pause, in milliseconds.
    #[arg(long, default_value_t = 300)]
    max_downtime_ms: u64,
    /// The guest: a KVM micro-VM, a synthetic guest, or auto (KVM where /dev/kvm opens).
    #[arg(long, value_enum, default_value_t = GuestKind::Auto)]
    guest: GuestKind,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GuestKind {
    Auto,
    Kvm,
    Synthetic,
}

enum DemoSink {
    Synthetic(SyntheticGuest),
    Kvm(vmotion_cli::KvmSink),
}

impl vmotion::Sink for DemoSink {
    fn memory(&self) -> Arc<dyn vmotion_mover::GuestMemory> {
        match self {
            Self::Synthetic(g) => vmotion::Sink::memory(g),
            Self::Kvm(v) => v.memory(),
        }
    }
    fn control(&mut self) -> &mut dyn vmotion_mover::VmControl {
        match self {
            Self::Synthetic(g) => vmotion::Sink::control(g),
            Self::Kvm(v) => v.control(),
        }
    }
    fn persist(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(()) // both live in this process
    }
    fn discard(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(()) // dropping frees them
    }
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let kvm = use_kvm(args.guest)?;
    let key_service = KeyService::start().await?;
    let src = key_service.client("src")?;
    let (addr, received) = start_receiver(key_service.client("dst")?, kvm).await?;
    let mut guest = start_guest(&args, kvm)?;
    let report = migrate(&args, src.clone(), addr, &mut *guest).await?;
    let (rr, destination) = received.await?.context("the receiver failed")?;
    println!("5. checks");
    if !matches!(report.mode, Mode::Encrypted(_)) || !matches!(rr.mode, Mode::Encrypted(_)) {
        bail!("the migration was not encrypted");
    }
    if rr.outcome != ReceiveOutcome::Committed {
        bail!("the destination did not commit: {:?}", rr.outcome);
    }
    verify(&*guest, &destination)?;
    let outcome = src.outcome(report.migration_id).await?;
    if outcome.outcome != Some(Outcome::Claimed) {
        bail!(
            "the key service does not record the destination's claim: {:?}",
            outcome.outcome
        );
    }
    println!(
        "   key service record: claimed by the destination; the source VM stays stopped for good"
    );
    print_report(&report);
    key_service.stop().await
}

/// Whether the guest is a KVM micro-VM (else a synthetic guest), as `--guest` asks and
/// /dev/kvm allows.
fn use_kvm(guest: GuestKind) -> anyhow::Result<bool> {
    Ok(match (guest, vmotion_vmm::kvm_available()) {
        (GuestKind::Synthetic, _) => false,
        (_, Ok(())) => true,
        (GuestKind::Kvm, Err(why)) => bail!("--guest kvm: {why}"),
        (GuestKind::Auto, Err(why)) => {
            println!("note: {why}; the demo uses a synthetic guest instead of a KVM micro-VM");
            false
        }
    })
}

/// The key service of the demo, with a development PKI in a temporary folder.
struct KeyService {
    dir: tempfile::TempDir,
    files: pki::PkiFiles,
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

impl KeyService {
    /// Steps 1 and 2: the PKI for hosts `src` and `dst`, and the service on loopback.
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary folder")?;
        println!(
            "1. development PKI for hosts src and dst in {}",
            dir.path().display()
        );
        let files = pki::init(dir.path(), &["src".into(), "dst".into()], &[])?;
        let mut config = Config::load(&files.config())?;
        config.listen = "127.0.0.1:0".parse()?;
        let server = Server::bind(&config).await?;
        let url = format!("https://{}", server.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        println!("2. key service (mutual TLS 1.3) on {url}");
        Ok(Self {
            dir,
            files,
            url,
            stop,
            running,
        })
    }

    /// A client with host `host`'s certificate.
    fn client(&self, host: &str) -> anyhow::Result<Arc<KeyServiceClient>> {
        let identity = ClientIdentity {
            ca: self.files.ca(),
            cert: self.files.host_cert(host),
            key: self.files.host_key(host),
        };
        Ok(Arc::new(KeyServiceClient::new(&self.url, &identity)?))
    }

    /// Step 7: stops the service and removes the folder.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.running.await?;
        println!("7. cleaned up {}", self.dir.path().display());
        Ok(())
    }
}

/// Step 3: host `dst` registers as able to encrypt, and its receiver takes one migration
/// on loopback.
async fn start_receiver(
    dst: Arc<KeyServiceClient>,
    kvm: bool,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(vmotion::ReceiveReport, DemoSink), vmotion::MigrateError>>,
)> {
    dst.register(&RegisterRequest {
        can_encrypt: true,
        protocol_versions: vec![1],
        ciphers: vec!["aes-256-gcm".into()],
    })
    .await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = Receiver::new(ReceiverKeys::Service(dst));
    let received = tokio::spawn(async move {
        receiver
            .receive(&listener, |hello| {
                println!(
                    "   receiver: migration {} of {} ({} pages), sink ready",
                    hello.migration_id, hello.vm_name, hello.guest_pages
                );
                demo_sink(hello, kvm)
            })
            .await
    });
    println!("3. receiver (host dst, registered as able to encrypt) on {addr}");
    Ok((addr, received))
}

/// The destination of the guest `hello` announces.
fn demo_sink(hello: &vmotion_proto::message::Hello, kvm: bool) -> Result<DemoSink, String> {
    if !kvm {
        return Ok(DemoSink::Synthetic(SyntheticGuest::blank(
            hello.guest_pages,
            u64::from(hello.page_size),
        )));
    }
    let vm = vmotion_vmm::MicroVm::incoming(hello.guest_pages * u64::from(hello.page_size))
        .map_err(|e| e.to_string())?;
    // Its first act when it resumes: checksum the memory it woke up with.
    vm.checksum_on_resume();
    Ok(DemoSink::Kvm(vmotion_cli::KvmSink(vm)))
}

/// Step 4: the running guest to migrate.
fn start_guest(args: &Args, kvm: bool) -> anyhow::Result<Box<dyn vmotion_mover::Source>> {
    if kvm {
        let vm = vmotion_vmm::MicroVm::start(vmotion_vmm::MicroVmConfig {
            memory_mib: args.size_mib,
            rate: args.dirty_rate,
            ..vmotion_vmm::MicroVmConfig::default()
        })?;
        println!(
            "4. running KVM micro-VM: {} MiB, one vCPU writing {:.0} pages/s with a heartbeat; migrating it encrypted over {} stream(s)",
            args.size_mib, args.dirty_rate, args.streams
        );
        return Ok(Box::new(vm));
    }
    println!(
        "4. running synthetic guest: {} MiB, 2 writer threads dirtying {:.0} pages/s; migrating it encrypted over {} stream(s)",
        args.size_mib, args.dirty_rate, args.streams
    );
    Ok(Box::new(SyntheticGuest::start(SyntheticConfig {
        pages: args.size_mib * 256,
        dirty_rate: args.dirty_rate,
        pattern: Pattern::Uniform,
        writers: 2,
        ..SyntheticConfig::default()
    })))
}

/// The migration itself, encrypted as the policy requires, with a progress display.
async fn migrate(
    args: &Args,
    src: Arc<KeyServiceClient>,
    to: std::net::SocketAddr,
    guest: &mut dyn vmotion_mover::Source,
) -> anyhow::Result<vmotion::MigrationReport> {
    let display = Arc::new(vmotion_cli::ProgressDisplay::new());
    Sender::builder("demo-vm")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Service {
            client: src,
            destination: "dst".into(),
        })
        .streams(args.streams)
        .convergence(ConvergencePolicy {
            max_downtime: Duration::from_millis(args.max_downtime_ms),
            ..ConvergencePolicy::default()
        })
        .on_progress(move |p| display.show(p))
        .build()?
        .migrate(to, guest)
        .await
        .context("the migration failed; the VM keeps running at the source")
}

/// Step 6: the report, with the downtime in its parts.
fn print_report(report: &vmotion::MigrationReport) {
    println!("6. report\n{}", report.summary());
    if let Some(d) = report.engine.downtime {
        println!(
            "   downtime {:.1} ms = final pages {:.1} + device state {:.1} + Ready {:.1} + outcome record {:.1}",
            d.total.as_secs_f64() * 1e3,
            d.final_pages.as_secs_f64() * 1e3,
            d.device_state.as_secs_f64() * 1e3,
            d.ready_wait.as_secs_f64() * 1e3,
            d.outcome_record.as_secs_f64() * 1e3
        );
    }
}

/// The destination holds the source's guest as it was at the pause.
fn verify(source: &dyn vmotion_mover::Source, destination: &DemoSink) -> anyhow::Result<()> {
    match destination {
        DemoSink::Synthetic(dst) => {
            let memory = source.memory();
            let mut a = vec![0u8; (memory.page_count() * memory.page_size()) as usize];
            memory.read_pages(0, &mut a)?;
            let b = dst.snapshot();
            let differing = a
                .chunks(4096)
                .zip(b.chunks(4096))
                .filter(|(x, y)| x != y)
                .count();
            if differing != 0 {
                bail!("{differing} pages differ between source and destination");
            }
            println!(
                "   verified: the destination's {} pages equal the source's at pause time",
                memory.page_count()
            );
        }
        DemoSink::Kvm(dst) => {
            let dst = &dst.0;
            let memory = source.memory();
            // The source is paused for good: its memory is as it was at the pause.
            let mut data = vec![0u8; (memory.page_count() * memory.page_size()) as usize];
            memory.read_pages(0, &mut data)?;
            let at_pause = vmotion_vmm::guest::checksum_of_guest(&data);
            let theirs = dst
                .wait_checksum(Duration::from_secs(30))
                .context("the destination guest reported no checksum")?;
            if theirs != at_pause {
                bail!("the guest's checksum {theirs:#x} differs from the source's {at_pause:#x}");
            }
            if !dst.wait_beats(2, Duration::from_secs(10)) {
                bail!("the destination guest does not run: {:?}", dst.failure());
            }
            println!(
                "   verified: the guest runs at the destination (heartbeat {} and counting), and its own checksum of its memory ({theirs:#010x}) equals the source's at the pause",
                dst.heartbeat()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Packaging: `--generate man|bash|zsh|fish` (scripts/dist.sh).
    if let Some(code) = vmotion_clidoc::generate_if_asked::<Args>("vmotion-demo") {
        return code;
    }
    vmotion_cli::init_logging("warn");
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmotion-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => {
            println!("demo complete: one encrypted live migration, verified");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmotion-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
