//! `vmotion-keyservice`: serve the key service, or make a development PKI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use vmotion_keyservice::{Config, Server, pki};

/// vmotion's key service: per-migration keys, host registry and outcome records over
/// mutual TLS.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTPS with mutual TLS until SIGINT or SIGTERM.
    Serve {
        /// The configuration file (TOML; see docs/keyservice-api.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Key-encryption keys for the etcd store.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Maintenance mode of a host, at a running key service: no migration is created to
    /// a draining host. Needs the host's own certificate, or an admin's (`admins`).
    Host {
        /// drain, undrain or status.
        #[arg(value_enum)]
        action: HostAction,
        /// The host.
        host: String,
        /// The key service: https://HOST:PORT, several comma-separated (replicas).
        #[arg(long)]
        keyservice: String,
        /// The CA that signed the key service's certificate.
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        /// This caller's client certificate (the host's own, or an admin's).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Its private key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HostAction {
    /// Put the host in maintenance: no migration is created to it from now on.
    Drain,
    /// Take it out of maintenance.
    Undrain,
    /// Say whether it is in maintenance.
    Status,
}

#[derive(Subcommand)]
enum KekCommand {
    /// Write a fresh 256-bit KEK (64 hex digits, mode 0600) into a new file. Give the same
    /// file to every replica (`[store] kek_file`); see docs/ha.md for rotating it.
    Generate {
        /// The file to create (never overwritten).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Write a CA, the service's certificate, one client certificate per host and a
    /// ready-to-use keyservice.toml into a folder.
    Init {
        /// Folder to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Host names to issue client certificates for, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// Extra DNS names or IP addresses for the service certificate (localhost,
        /// 127.0.0.1 and ::1 are always included), comma-separated.
        #[arg(long, value_delimiter = ',')]
        service_names: Vec<String>,
    },
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki {
            command:
                PkiCommand::Init {
                    out,
                    hosts,
                    service_names,
                },
        } => {
            let files = pki::init(&out, &hosts, &service_names)?;
            println!(
                "wrote a development PKI for {} into {}; serve it with\n  vmotion-keyservice serve --config {}",
                files.hosts.join(", "),
                files.dir.display(),
                files.config().display()
            );
            Ok(())
        }
        Command::Kek {
            command: KekCommand::Generate { file },
        } => {
            vmotion_keyservice::kek::generate(&file)
                .with_context(|| format!("writing {}", file.display()))?;
            println!("wrote a new KEK into {} (mode 0600)", file.display());
            Ok(())
        }
        Command::Host {
            action,
            host,
            keyservice,
            ca,
            cert,
            key,
        } => {
            let identity = vmotion_keyservice_client::ClientIdentity { ca, cert, key };
            let client = vmotion_keyservice_client::KeyServiceClient::new(&keyservice, &identity)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let m = runtime.block_on(async {
                match action {
                    HostAction::Drain => client.set_maintenance(&host, true).await,
                    HostAction::Undrain => client.set_maintenance(&host, false).await,
                    HostAction::Status => client.maintenance(&host).await,
                }
            })?;
            let state = if m.draining {
                "draining (in maintenance)"
            } else {
                "in service"
            };
            println!("{host}: {state}");
            Ok(())
        }
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async {
                let server = Server::bind(&config).await?;
                let addr = server.local_addr()?;
                // Scripts and tests read this line to learn the port (with port 0).
                println!("listening on {addr}");
                tracing::info!(%addr, "key service listening");
                server.run(shutdown_signal()).await;
                anyhow::Ok(())
            })
        }
    }
}

fn main() -> ExitCode {
    // Packaging: `--generate man|bash|zsh|fish` (scripts/dist.sh).
    if let Some(code) = vmotion_clidoc::generate_if_asked::<Cli>("vmotion-keyservice") {
        return code;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmotion-keyservice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
