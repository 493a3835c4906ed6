//! `vmotion-send`: migrates one VM to a destination, as its policy file says.
//!
//! Exit codes (also in docs/cli.md):
//!
//! | code | meaning | where the VM is |
//! |---|---|---|
//! | 0 | committed (with `--tunnel`: the tunnel closed cleanly, every byte delivered) | running at the destination (with `--tunnel`: ask QEMU's `query-migrate`) |
//! | 1 | could not start (key service, sources, I/O before the migration) | untouched at the source |
//! | 2 | bad usage or a bad policy file | untouched at the source |
//! | 3 | refused before a page was sent: by policy or negotiation, the destination's pre-flight, or the key service (the VM has a migration in flight; the destination is draining; no admission slot within `--queue-timeout`) | running at the source |
//! | 4 | aborted (with `--qemu`: a convergence limit of the policy cancelled QEMU's migration) | running at the source |
//! | 5 | outcome unknown, or the resume failed (with `--qemu`: the QMP connection was lost mid-migration) | **paused** at the source: settle it first (with `--qemu`: ask QEMU's `query-migrate`) |
//! | 6 | `--qemu`: QEMU's migration failed (QEMU's error is quoted); `-- COMMAND`: the command failed | running at the source |
//! | 7 | `--qemu`: QEMU's migration was cancelled (SIGINT or SIGTERM: `migrate_cancel`) | running at the source |

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use vmotion::{
    AuthorityError, Endpoint, KeySource, MigrateError, MigrationReport, Sender, TunnelReport,
};
use vmotion_cli::qemu_source::{QemuOutcome, QemuSettings};
use vmotion_cli::shutdown_signal;
use vmotion_mover::Source;
use vmotion_mover::memfile::MemoryFile;
use vmotion_mover::synthetic::{Pattern, SyntheticConfig, SyntheticGuest};
use vmotion_proto::{MigrationId, Mode};

mod hypervisor;

/// Migrates one VM to a vmotion-recv, as the VM's policy file says.
/// How `vmotion-send` shows progress (`--progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ProgressFormat {
    /// A line rewritten in place on a terminal, log lines otherwise.
    Auto,
    /// One JSON object per line on stderr.
    Json,
}

impl ProgressFormat {
    fn display(self) -> vmotion_cli::ProgressDisplay {
        match self {
            Self::Auto => vmotion_cli::ProgressDisplay::new(),
            Self::Json => vmotion_cli::ProgressDisplay::json(),
        }
    }
}

#[derive(Parser)]
#[command(version)]
// With keys, the key service must know where they are for.
#[command(group(clap::ArgGroup::new("with_keys").arg("keyservice").requires("destination")))]
struct Args {
    /// The VM: its policy is `POLICY_DIR/VM.toml` over `POLICY_DIR/defaults.toml`.
    #[arg(long)]
    vm: String,
    /// The destination's vmotion-recv address: HOST:PORT, or unix:PATH for a receiver on
    /// this host.
    #[arg(long)]
    to: Endpoint,
    /// Folder of policy files.
    #[arg(long, default_value = "policy")]
    policy_dir: PathBuf,
    #[command(flatten)]
    keyservice: vmotion_cli::KeyServiceArgs,
    /// The destination host's identity at the key service.
    #[arg(long)]
    destination: Option<String>,
    /// Data connections (overrides the policy's `streams`).
    #[arg(long)]
    streams: Option<u16>,
    /// Bandwidth cap, e.g. "500MB/s" or "unlimited" (overrides `max_bandwidth`).
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Longest acceptable pause in ms (overrides `max_downtime_ms`).
    #[arg(long)]
    max_downtime: Option<u64>,
    /// Source: a synthetic guest of this many MiB.
    #[arg(long, conflicts_with_all = ["memfile", "kvm_mib"])]
    synthetic_mib: Option<u64>,
    /// Source: a running KVM micro-VM of this many MiB (1 to 3072), booted here and
    /// migrated live; its workload writes `--dirty-rate` pages/s in `--pattern`.
    #[arg(long, conflicts_with = "memfile")]
    kvm_mib: Option<u64>,
    /// Pages per second the guest writes (0: an idle synthetic guest; an unpaced
    /// micro-VM).
    #[arg(long, default_value_t = 0.0)]
    dirty_rate: f64,
    /// Which pages it writes: uniform, sequential, or hot:N (the first N pages).
    #[arg(long, default_value = "uniform")]
    pattern: String,
    /// Source: guest memory in this file (cold migration: no dirty log).
    #[arg(long)]
    memfile: Option<PathBuf>,
    /// Tunnel mode: carry QEMU's own migration instead of moving a guest. After the
    /// negotiation (a refusal ends here, before anything listens), listen on unix:PATH
    /// or [tcp:]127.0.0.1:PORT for the source QEMU's outgoing migration connections
    /// (QMP `migrate` with that URI; multifd channels too) and carry each, both ways, to
    /// the `vmotion-recv --tunnel` at `--to`. "tunnel ready" on stderr says when QEMU may
    /// connect; the tunnel ends when all of QEMU's connections have closed.
    #[arg(long, conflicts_with_all = ["synthetic_mib", "kvm_mib", "memfile"])]
    tunnel: Option<Endpoint>,
    /// Migrate the QEMU VM whose QMP socket this is, in one command: check it can be
    /// migrated, set its migration capabilities and parameters from the VM's policy
    /// (`streams` → multifd channels, `max_bandwidth`, `max_downtime_ms` →
    /// downtime-limit, return path on), negotiate (a refusal ends here, before QEMU sends
    /// a byte), open the tunnel, start QEMU's `migrate`, show its progress and report
    /// QEMU's figures with the tunnel's. Exit 0 only when QEMU says `completed`. The
    /// tunnel listens on a private socket, or on `--tunnel` when given (for a QEMU that
    /// runs as another user).
    #[arg(long, value_name = "QMP_SOCKET", conflicts_with_all = ["synthetic_mib", "kvm_mib", "memfile"])]
    qemu: Option<PathBuf>,
    /// Tunnel mode: once the tunnel is ready, run this command (everything after `--`,
    /// e.g. `virsh migrate --live VM DEST --migrateuri unix://PATH`) to make the
    /// hypervisor migrate; its exit status is the verdict (0: the VM runs at the
    /// destination, recorded `committed`; else `aborted`, exit 6). It gets
    /// `VMOTION_MIGRATE_URI`; its output goes to stderr; SIGINT / SIGTERM are passed on.
    #[arg(last = true, requires = "tunnel", value_name = "COMMAND")]
    then_run: Vec<String>,
    /// Tunnel mode: most connections QEMU may open (1 + multifd channels).
    #[arg(long, default_value_t = vmotion::DEFAULT_MAX_CONNECTIONS, requires = "tunnel")]
    max_connections: u16,
    /// Tunnel mode: seconds to wait for QEMU's first connection.
    #[arg(long, default_value_t = 120, requires = "tunnel")]
    accept_timeout: u64,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// How progress is shown on stderr: `auto` (a line rewritten in place on a
    /// terminal, log lines otherwise) or `json` (one object per line, for programs such as
    /// vmotion-evacuate).
    #[arg(long, value_enum, default_value_t = ProgressFormat::Auto)]
    progress: ProgressFormat,
    /// Local address to send from (the migration network's address).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// DSCP code point (0-63) to mark migration traffic with, e.g. 10 (AF11) or 46 (EF).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=63))]
    dscp: Option<u8>,
    /// How long to wait for an admission slot when the key service answers that its
    /// limits on migrations in flight are reached (e.g. "90s", "10m"; 0: do not wait).
    /// Past it: exit 3, nothing sent.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// Abort this host's own earlier migration of the VM, if the key service still has
    /// it open, instead of being refused because the VM is in flight. Only for a source
    /// whose earlier vmotion-send died before its switchover: never while that sender may
    /// still run. The key service never aborts a migration past its commit, nor another
    /// host's.
    #[arg(long, requires = "keyservice")]
    abort_stale: bool,
}

fn pattern(s: &str) -> Result<Pattern, String> {
    match s {
        "uniform" => Ok(Pattern::Uniform),
        "sequential" => Ok(Pattern::Sequential),
        _ => s
            .strip_prefix("hot:")
            .and_then(|n| n.parse().ok())
            .map(|pages| Pattern::HotSet { pages })
            .ok_or_else(|| format!("`{s}` is not a pattern (uniform, sequential, hot:N)")),
    }
}

/// Exit codes.
const COMMITTED: u8 = 0;
const NOT_STARTED: u8 = 1;
const USAGE: u8 = 2;
const REFUSED: u8 = 3;
const ABORTED: u8 = 4;
const UNKNOWN: u8 = 5;
const QEMU_FAILED: u8 = 6;
const QEMU_CANCELLED: u8 = 7;

fn exit_code(e: &MigrateError) -> u8 {
    use vmotion_proto::{Error, PeerMisbehaved};
    match e {
        MigrateError::Refused(_)
        | MigrateError::PreflightRefused(_)
        | MigrateError::AlreadyInFlight(_)
        | MigrateError::QueueTimeout { .. }
        | MigrateError::KeyService(
            AuthorityError::VmInFlight { .. } | AuthorityError::DestinationDraining(_),
        ) => REFUSED,
        // The negotiation itself was tampered with: refused before any page.
        MigrateError::Protocol(Error::PeerMisbehaved(
            PeerMisbehaved::DecisionMismatch { .. }
            | PeerMisbehaved::IllegalChoice { .. }
            | PeerMisbehaved::KeyConfirmationFailed,
        )) => REFUSED,
        MigrateError::OutcomeUnknown(_) | MigrateError::ResumeFailed(_) => UNKNOWN,
        MigrateError::KeyService(_) => NOT_STARTED,
        MigrateError::InvalidOptions(_) => USAGE,
        _ => ABORTED,
    }
}

/// `e`'s message, with what the operator can do about a key-service refusal.
fn explain(e: &MigrateError, abort_stale: bool) -> String {
    let hint = match e {
        MigrateError::KeyService(AuthorityError::VmInFlight { .. }) if abort_stale => {
            " (--abort-stale did not apply: that migration is another host's, or past its \
             switchover; it ends with its final outcome or its key's expiry)"
        }
        MigrateError::KeyService(AuthorityError::VmInFlight { .. }) => {
            " (if that is this host's own earlier migration of the VM and its vmotion-send \
             died before the switchover, run again with --abort-stale to abort it; never \
             while that sender may still be running)"
        }
        MigrateError::QueueTimeout { .. } => {
            " (the key service's limits on migrations in flight were reached: retry later, \
             or wait longer with --queue-timeout)"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

/// Tunnel mode has no progress line: says it is queued, then every 10 s.
fn queued_notice() -> impl Fn(Duration) + Send + Sync + 'static {
    let last = std::sync::Mutex::new(None::<u64>);
    move |waited| {
        let secs = waited.as_secs();
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|l| secs >= l + 10) {
            *last = Some(secs);
            eprintln!(
                "vmotion-send: {}",
                vmotion_cli::ProgressDisplay::queued_line(waited)
            );
        }
    }
}

fn report_json(r: &MigrationReport) -> serde_json::Value {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mode, reason) = vmotion_cli::mode_fields(r.mode);
    json!({
        "outcome": "committed",
        "migration_id": r.migration_id.to_string(),
        "vm": r.vm_name,
        "mode": mode,
        "plaintext_reason": reason,
        "no_key_service": r.keyless,
        "streams": r.streams,
        "bytes_sent": r.bytes_sent,
        "total_ms": ms(r.total_time),
        "throughput_bytes_per_sec": r.throughput(),
        "phases_ms": { "setup": ms(r.phases.setup), "precopy": ms(r.phases.precopy), "switchover": ms(r.phases.switchover), "claim": ms(r.phases.claim) },
        "downtime_ms": r.engine.downtime.map(|d| json!({
            "total": ms(d.total), "final_pages": ms(d.final_pages), "device_state": ms(d.device_state),
            "ready_wait": ms(d.ready_wait), "outcome_record": ms(d.outcome_record),
        })),
        "expected_downtime_ms": r.engine.expected_downtime.map(ms),
        "iterations": r.engine.iterations.iter().map(|it| json!({
            "iteration": it.iteration, "pages": it.pages, "bytes": it.bytes, "ms": ms(it.duration),
            "dirty_after": it.dirty_after, "dirty_rate_pages_per_sec": it.dirty_rate(), "throttle_percent": it.throttle_percent,
        })).collect::<Vec<_>>(),
        "max_throttle_percent": r.engine.max_throttle_percent,
        "key_epochs": r.epochs,
        "claim": r.claim.as_str(),
    })
}

fn tunnel_json(r: &TunnelReport) -> serde_json::Value {
    let (mode, reason) = vmotion_cli::mode_fields(r.mode);
    json!({
        "outcome": "tunnel closed",
        "migration_id": r.migration_id.to_string(),
        "vm": r.vm_name,
        "mode": mode,
        "plaintext_reason": reason,
        "connections": r.connections,
        "bytes_to_destination": r.bytes_to_destination,
        "bytes_from_destination": r.bytes_from_destination,
        "setup_ms": r.setup.as_secs_f64() * 1e3,
        "carried_ms": r.carried.as_secs_f64() * 1e3,
        "throughput_bytes_per_sec": r.throughput(),
        "key_epochs": r.epochs,
    })
}

/// What a run did.
enum Done {
    Migrated(Box<MigrationReport>),
    Tunnelled(TunnelReport),
    /// `--qemu`: QEMU completed; the tunnel's report, or why it did not end cleanly.
    Qemu(QemuOutcome, Result<TunnelReport, String>),
    /// `--tunnel ... -- COMMAND`: the command (shown) succeeded; the tunnel's report.
    Command(String, Result<TunnelReport, String>),
}

async fn run(args: Args) -> Result<Done, (u8, String)> {
    if matches!(args.to, Endpoint::Unix(_)) && (args.bind.is_some() || args.dscp.is_some()) {
        return Err((
            USAGE,
            "--bind and --dscp apply to TCP; --to names a Unix socket".into(),
        ));
    }
    let policy =
        vmotion_policy::load(&args.policy_dir, &args.vm).map_err(|e| (USAGE, e.to_string()))?;
    let max_bandwidth = match &args.max_bandwidth {
        Some(s) => vmotion_policy::parse_bandwidth_flag(s)
            .map_err(|e| (USAGE, format!("--max-bandwidth: {e}")))?,
        None => policy.max_bandwidth,
    };
    let mut convergence = policy.convergence;
    if let Some(ms) = args.max_downtime {
        if ms == 0 {
            return Err((USAGE, "--max-downtime must be above 0".into()));
        }
        convergence.max_downtime = Duration::from_millis(ms);
    }
    let client = args
        .keyservice
        .client()
        .map_err(|e| (NOT_STARTED, e.to_string()))?;
    let key = match (client, &args.destination) {
        (Some(client), Some(destination)) => KeySource::Service {
            client: Arc::new(client),
            destination: destination.clone(),
        },
        _ => {
            let mut id = [0u8; 16];
            let r = vmotion_proto::handshake_random()
                .map_err(|_| (NOT_STARTED, "no OS randomness".to_owned()))?;
            id.copy_from_slice(&r[..16]);
            KeySource::None {
                migration_id: MigrationId(id),
            }
        }
    };
    if let Some(qmp) = &args.qemu {
        let settings = QemuSettings {
            channels: args.streams.unwrap_or(policy.streams).max(1),
            max_bandwidth,
            convergence,
        };
        return hypervisor::run_qemu(&args, qmp, policy.vm_policy, key, settings).await;
    }
    if let Some(listen) = &args.tunnel {
        return hypervisor::run_tunnel(&args, listen, policy.vm_policy, key).await;
    }
    let mut source: Box<dyn Source> = match (&args.synthetic_mib, &args.memfile) {
        _ if args.kvm_mib.is_some() => {
            let vm = vmotion_vmm::MicroVm::start(vmotion_vmm::MicroVmConfig {
                memory_mib: args.kvm_mib.unwrap_or_default(),
                rate: args.dirty_rate,
                pattern: vmotion_cli::kvm_pattern(&args.pattern).map_err(|e| (USAGE, e))?,
                ..vmotion_vmm::MicroVmConfig::default()
            })
            .map_err(|e| match e {
                vmotion_vmm::VmmError::Config(_) => (USAGE, e.to_string()),
                _ => (NOT_STARTED, e.to_string()),
            })?;
            Box::new(vm)
        }
        (Some(mib), None) => Box::new(SyntheticGuest::start(SyntheticConfig {
            pages: mib * 256,
            dirty_rate: args.dirty_rate,
            pattern: pattern(&args.pattern).map_err(|e| (USAGE, e))?,
            writers: 2,
            ..SyntheticConfig::default()
        })),
        (None, Some(path)) => Box::new(
            MemoryFile::open(path, 4096)
                .map_err(|e| (NOT_STARTED, format!("{}: {e}", path.display())))?,
        ),
        _ => {
            return Err((
                USAGE,
                "name a source: --synthetic-mib N, --kvm-mib N, --memfile PATH, or --tunnel LISTEN"
                    .into(),
            ));
        }
    };
    let display = Arc::new(args.progress.display());
    let shown = display.clone();
    Sender::builder(&args.vm)
        .policy(policy.vm_policy)
        .key(key)
        .streams(args.streams.unwrap_or(policy.streams))
        .convergence(convergence)
        .switchover_timeout(policy.switchover_timeout)
        .claim_timeout(policy.claim_timeout)
        .progress_timeout(policy.progress_timeout)
        .max_bandwidth(max_bandwidth)
        .on_progress(move |p| shown.show(p))
        .network(vmotion::NetOptions {
            bind: args.bind,
            dscp: args.dscp,
        })
        .queue_timeout(args.queue_timeout)
        .abort_stale(args.abort_stale)
        .build()
        .map_err(|e| (USAGE, e.to_string()))?
        .migrate(args.to.clone(), &mut *source)
        .await
        .map(|r| Done::Migrated(Box::new(r)))
        .map_err(|e| (exit_code(&e), explain(&e, args.abort_stale)))
}

/// `--qemu`'s report: QEMU's figures beside the tunnel's.
fn print_qemu_report(qemu: &QemuOutcome, tunnel: &Result<TunnelReport, String>, json: bool) {
    print_hypervisor_report(("qemu", qemu.figures(), qemu.summary()), tunnel, json);
}

/// The report of `--tunnel ... -- COMMAND`: the command beside the tunnel's figures.
fn print_command_report(command: &str, tunnel: &Result<TunnelReport, String>, json: bool) {
    let line = format!("`{command}` succeeded");
    print_hypervisor_report(("command", json!(command), line), tunnel, json);
}

/// A report of a migration the hypervisor made: what it said (`(key, json, line)`)
/// beside the tunnel's figures.
fn print_hypervisor_report(
    (key, said, line): (&str, serde_json::Value, String),
    tunnel: &Result<TunnelReport, String>,
    json: bool,
) {
    if json {
        let t = match tunnel {
            Ok(r) => tunnel_json(r),
            Err(e) => json!({ "error": e }),
        };
        println!(
            "{}",
            json!({ "outcome": "completed", key: said, "tunnel": t })
        );
    } else {
        println!("{line}");
        match tunnel {
            Ok(r) => println!("{}", r.summary()),
            Err(e) => println!("tunnel: {e}"),
        }
    }
    match tunnel {
        Ok(r) => {
            if let Mode::Plaintext(reason) = r.mode
                && reason.is_downgrade()
            {
                eprintln!("vmotion-send: warning: QEMU's migration crossed in PLAINTEXT: {reason}");
            }
        }
        Err(e) => eprintln!(
            "vmotion-send: warning: the hypervisor completed, but the tunnel did not end \
             cleanly: {e}"
        ),
    }
}

fn main() -> ExitCode {
    // Packaging: `--generate man|bash|zsh|fish` (scripts/dist.sh).
    if let Some(code) = vmotion_clidoc::generate_if_asked::<Args>("vmotion-send") {
        return code;
    }
    vmotion_cli::init_logging("warn");
    let args = Args::parse();
    let json = args.json;
    // Without a key service this host has no keys at all: that, not the destination, is
    // why a migration is plaintext or refused.
    let keyless = args.keyservice.keyservice.is_none();
    let tunnel = args.tunnel.is_some() || args.qemu.is_some();
    let command = !args.then_run.is_empty();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmotion-send: cannot start the runtime: {e}");
            return ExitCode::from(NOT_STARTED);
        }
    };
    match rt.block_on(run(args)) {
        Ok(Done::Tunnelled(report)) => {
            if json {
                println!("{}", tunnel_json(&report));
            } else {
                println!("{}", report.summary());
            }
            if let Mode::Plaintext(reason) = report.mode
                && reason.is_downgrade()
            {
                eprintln!("vmotion-send: warning: QEMU's migration crossed in PLAINTEXT: {reason}");
            }
            ExitCode::from(COMMITTED)
        }
        Ok(Done::Qemu(qemu, tunnel)) => {
            print_qemu_report(&qemu, &tunnel, json);
            ExitCode::from(COMMITTED)
        }
        Ok(Done::Command(command, tunnel)) => {
            print_command_report(&command, &tunnel, json);
            ExitCode::from(COMMITTED)
        }
        Ok(Done::Migrated(report)) => {
            if json {
                println!("{}", report_json(&report));
            } else {
                println!("{}", report.summary());
            }
            // On stderr whatever the output format: a downgrade is never silent.
            if let Mode::Plaintext(reason) = report.mode
                && reason.is_downgrade()
            {
                if report.keyless {
                    eprintln!(
                        "vmotion-send: warning: migrated in PLAINTEXT: this host has no key \
                         service (--keyservice), so there was no key to encrypt with"
                    );
                } else {
                    eprintln!("vmotion-send: warning: migrated in PLAINTEXT: {reason}");
                }
            }
            ExitCode::from(COMMITTED)
        }
        Err((code, mut message)) => {
            if keyless && code == REFUSED && message.contains("requires encryption") {
                message.push_str(
                    " (this host has no key service, --keyservice: without one no migration \
                     can be encrypted, whatever the destination can do)",
                );
            }
            let what = match code {
                REFUSED if tunnel => "tunnel refused, nothing listened for QEMU",
                QEMU_FAILED if command => {
                    "the migration command failed: the hypervisor says the VM did not move \
                     (recorded aborted); check where it runs before starting it anywhere"
                }
                QEMU_FAILED => "QEMU's migration failed, the VM keeps running at the source",
                QEMU_CANCELLED => "QEMU's migration cancelled, the VM keeps running at the source",
                REFUSED => "refused, the VM keeps running at the source",
                ABORTED if tunnel => "tunnel failed, QEMU's connections were dropped on both hosts",
                ABORTED => "aborted, the VM keeps running at the source",
                UNKNOWN => "OUTCOME UNKNOWN, the VM is PAUSED at the source",
                USAGE => "bad usage or policy, nothing was sent",
                _ => "could not start, the VM is untouched",
            };
            if json {
                println!(
                    "{}",
                    json!({ "outcome": what, "error": message, "exit_code": code })
                );
            }
            eprintln!("vmotion-send: {what}: {message}");
            ExitCode::from(code)
        }
    }
}
