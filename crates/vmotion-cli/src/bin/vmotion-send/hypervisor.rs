//! The modes in which a hypervisor migrates and vmotion carries its stream: `--tunnel`
//! (the operator drives QEMU), `--tunnel ... -- COMMAND` (a command such as `virsh
//! migrate` drives it, and its exit status is the verdict) and `--qemu` (vmotion-send
//! drives QEMU over QMP). Each negotiates first: a refusal ends the run before anything
//! listens for the hypervisor.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vmotion::{
    Endpoint, KeySource, Listener, MigrateError, NegotiatedTunnel, TunnelReport, TunnelSender,
    TunnelVerdict,
};
use vmotion_cli::qemu_source::{QemuSettings, QemuSource};
use vmotion_proto::Mode;

use super::{
    ABORTED, Args, Done, NOT_STARTED, QEMU_CANCELLED, QEMU_FAILED, UNKNOWN, USAGE, exit_code,
    explain, queued_notice, shutdown_signal,
};

/// Tunnel mode: negotiate, then listen for QEMU and carry its connections.
pub(super) async fn run_tunnel(
    args: &Args,
    listen: &Endpoint,
    policy: vmotion_proto::VmPolicy,
    key: KeySource,
) -> Result<Done, (u8, String)> {
    if args.synthetic_mib.is_some() || args.kvm_mib.is_some() || args.memfile.is_some() {
        return Err((
            USAGE,
            "--tunnel carries QEMU's migration: name no other source".into(),
        ));
    }
    if !args.then_run.is_empty() {
        return run_command(args, listen, policy, key).await;
    }
    let tunnel = negotiate(args, listen, policy, key, args.max_connections).await?;
    let (local, _) = listen_for_qemu(listen, &tunnel).await?;
    tunnel
        .run(&local, shutdown_signal())
        .await
        .map(Done::Tunnelled)
        .map_err(|e| (exit_code(&e), e.to_string()))
}

/// Negotiates a tunnel for QEMU's `connections` to `listen`: a refusal ends here, before
/// anything listens.
async fn negotiate(
    args: &Args,
    listen: &Endpoint,
    policy: vmotion_proto::VmPolicy,
    key: KeySource,
    connections: u16,
) -> Result<NegotiatedTunnel, (u8, String)> {
    // What reaches this socket is QEMU's plaintext: never from another host.
    if let Endpoint::Tcp(a) = listen
        && !a.ip().is_loopback()
    {
        return Err((
            USAGE,
            format!(
                "--tunnel {a}: listen on a unix: path or a loopback address (QEMU's stream \
                 arrives there in clear)"
            ),
        ));
    }
    let negotiate = TunnelSender::builder(&args.vm)
        .policy(policy)
        .key(key)
        .max_connections(connections)
        .accept_timeout(Duration::from_secs(args.accept_timeout.max(1)))
        .queue_timeout(args.queue_timeout)
        .abort_stale(args.abort_stale)
        .on_queued(queued_notice())
        .network(vmotion::NetOptions {
            bind: args.bind,
            dscp: args.dscp,
        })
        .build()
        .map_err(|e| (USAGE, e.to_string()))?
        .negotiate(args.to.clone());
    // A signal during the negotiation ends it too (nothing listens for QEMU yet).
    let negotiated = tokio::select! {
        r = negotiate => r,
        () = shutdown_signal() => Err(MigrateError::TunnelFailed(
            "cancelled during the negotiation; nothing listened for QEMU".into(),
        )),
    };
    negotiated.map_err(|e| {
        let hint = match e {
            MigrateError::Refused(vmotion_proto::Refusal::TooManyStreams) => {
                " (the receiver takes fewer streams than --max-connections: lower it, or \
                     raise its --max-streams)"
            }
            _ => "",
        };
        (
            exit_code(&e),
            format!("{}{hint}", explain(&e, args.abort_stale)),
        )
    })
}

/// Listens on `listen` for QEMU and says so: the listener and the URI for QEMU's
/// `migrate`.
async fn listen_for_qemu(
    listen: &Endpoint,
    tunnel: &NegotiatedTunnel,
) -> Result<(Listener, String), (u8, String)> {
    let local = Listener::bind(listen)
        .await
        .map_err(|e| (NOT_STARTED, format!("listening for QEMU on {listen}: {e}")))?;
    let mode = match tunnel.negotiated().mode {
        Mode::Encrypted(_) => "encrypted".to_owned(),
        Mode::Plaintext(r) => format!("PLAINTEXT ({r})"),
    };
    let uri = local
        .local_endpoint()
        .map_or_else(|_| listen.to_string(), |e| qemu_uri(&e));
    eprintln!(
        "vmotion-send: tunnel ready ({mode}, migration {}): QEMU may now migrate to {uri}",
        tunnel.negotiated().migration_id,
    );
    Ok((local, uri))
}

/// The URI to give QEMU's `migrate` for `e`.
fn qemu_uri(e: &Endpoint) -> String {
    match e {
        Endpoint::Tcp(a) => format!("tcp:{a}"),
        Endpoint::Unix(_) => e.to_string(),
    }
}

/// A negotiated tunnel carrying the hypervisor's connections in the background, until
/// the hypervisor's verdict ends it ([`Carriage::finish`]).
struct Carriage {
    carrying: JoinHandle<Result<TunnelReport, MigrateError>>,
    stop: oneshot::Sender<()>,
    verdict: TunnelVerdict,
}

impl Carriage {
    /// Negotiates, listens and starts carrying: the carriage and the URI for QEMU.
    async fn start(
        args: &Args,
        listen: &Endpoint,
        policy: vmotion_proto::VmPolicy,
        key: KeySource,
        connections: u16,
    ) -> Result<(Self, String), (u8, String)> {
        let tunnel = negotiate(args, listen, policy, key, connections).await?;
        let (local, uri) = listen_for_qemu(listen, &tunnel).await?;
        let verdict = tunnel.verdict();
        let (stop, stopped) = oneshot::channel::<()>();
        let carrying = tokio::spawn(async move {
            tunnel
                .run(&local, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok((
            Self {
                carrying,
                stop,
                verdict,
            },
            uri,
        ))
    }

    /// Ends the tunnel after the hypervisor's migration ended, and records its verdict
    /// at the key service (which frees the VM there for its next migration). A completed
    /// migration closes the hypervisor's connections and the tunnel with them (waited
    /// for up to 30 s); after a failure the connections may linger, so the tunnel is
    /// stopped after 2 s.
    async fn finish(self, completed: bool) -> Result<TunnelReport, String> {
        let Self {
            mut carrying,
            stop,
            verdict,
        } = self;
        let grace = Duration::from_secs(if completed { 30 } else { 2 });
        let joined = match tokio::time::timeout(grace, &mut carrying).await {
            Ok(j) => j,
            Err(_) => {
                let _ = stop.send(());
                carrying.await
            }
        };
        let recorded = if completed {
            verdict.completed().await
        } else {
            verdict.failed().await
        };
        if let Err(e) = recorded {
            eprintln!(
                "vmotion-send: warning: could not record the hypervisor's verdict at the key \
                 service ({e}): the VM stays held there as in flight until its \
                 in_flight_ttl, or --abort-stale"
            );
        }
        match joined {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the tunnel's task failed: {e}")),
        }
    }

    /// Stops the tunnel without a verdict (nothing here knows it).
    fn abandon(self) {
        let _ = self.stop.send(());
    }
}

/// QEMU's connections arrive on `--tunnel`, or on a socket in a private folder (kept by
/// the caller for as long as the migration runs).
fn listen_address(args: &Args) -> Result<(Endpoint, Option<tempfile::TempDir>), (u8, String)> {
    if let Some(listen) = &args.tunnel {
        return Ok((listen.clone(), None));
    }
    let private = tempfile::Builder::new()
        .prefix("vmotion-send-")
        .tempdir()
        .map_err(|e| {
            (
                NOT_STARTED,
                format!("a folder for the tunnel's socket: {e}"),
            )
        })?;
    let listen = Endpoint::Unix(private.path().join("migrate.sock"));
    Ok((listen, Some(private)))
}

/// `--qemu`: one command migrates a running QEMU through the tunnel (see the flag).
pub(super) async fn run_qemu(
    args: &Args,
    qmp_path: &std::path::Path,
    policy: vmotion_proto::VmPolicy,
    key: KeySource,
    settings: QemuSettings,
) -> Result<Done, (u8, String)> {
    let path = qmp_path.to_owned();
    let mut qemu = blocking(move || {
        let mut q = QemuSource::connect(&path)?;
        q.configure(&settings)?;
        Ok(q)
    })
    .await
    .map_err(|e| (NOT_STARTED, e))?;
    let (listen, _private) = listen_address(args)?;
    let (carriage, uri) =
        Carriage::start(args, &listen, policy, key, settings.connections()).await?;
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_signal = cancel.clone();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!("vmotion-send: cancelling QEMU's migration (migrate_cancel)");
        on_signal.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let display = Arc::new(args.progress.display());
    let followed = blocking(move || {
        qemu.migrate(&uri)?;
        qemu.follow(&settings.convergence, &cancel, &|p| display.show(p))
    })
    .await;
    signals.abort();
    let outcome = match followed {
        Ok(o) => o,
        Err(e) => {
            carriage.abandon();
            return Err((
                UNKNOWN,
                format!("lost QEMU's migration: {e}; ask QEMU (query-migrate) how it ended"),
            ));
        }
    };
    let completed = outcome.status == "completed";
    let tunnel = carriage.finish(completed).await;
    if completed {
        return Ok(Done::Qemu(outcome, tunnel));
    }
    // After migrate_cancel, "failed" is the cancel too (its I/O error won).
    let code = match (outcome.cancel_sent, &outcome.limit) {
        (true, Some(_)) => ABORTED,
        (true, None) => QEMU_CANCELLED,
        (false, _) => QEMU_FAILED,
    };
    let why = outcome
        .limit
        .as_deref()
        .or(outcome.error())
        .unwrap_or("QEMU gave no reason")
        .to_owned();
    let tunnel = tunnel
        .err()
        .map_or_else(String::new, |e| format!("; the tunnel: {e}"));
    Err((
        code,
        format!("QEMU's migration {}: {why}{tunnel}", outcome.status),
    ))
}

/// `--tunnel LISTEN -- COMMAND...`: once the tunnel is ready, runs COMMAND (e.g. `virsh
/// migrate --live ... --migrateuri unix://LISTEN`), with `VMOTION_MIGRATE_URI` set to
/// the URI QEMU must migrate to; its exit status is the hypervisor's verdict. SIGINT and
/// SIGTERM are passed on to it (virsh then aborts its migration job).
async fn run_command(
    args: &Args,
    listen: &Endpoint,
    policy: vmotion_proto::VmPolicy,
    key: KeySource,
) -> Result<Done, (u8, String)> {
    let (carriage, uri) = Carriage::start(args, listen, policy, key, args.max_connections).await?;
    let shown = args.then_run.join(" ");
    let mut child = match tokio::process::Command::new(&args.then_run[0])
        .args(&args.then_run[1..])
        .env("VMOTION_MIGRATE_URI", &uri)
        .stdin(Stdio::null())
        // Its output goes to stderr: stdout is the report's.
        .stdout(std::io::stderr())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            carriage.abandon();
            return Err((NOT_STARTED, format!("running `{shown}`: {e}")));
        }
    };
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            () = shutdown_signal() => pass_interrupt(&child),
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            carriage.abandon();
            return Err((UNKNOWN, format!("waiting for `{shown}`: {e}")));
        }
    };
    let tunnel = carriage.finish(status.success()).await;
    if status.success() {
        return Ok(Done::Command(shown, tunnel));
    }
    let tunnel = tunnel
        .err()
        .map_or_else(String::new, |e| format!("; the tunnel: {e}"));
    Err((
        QEMU_FAILED,
        format!("`{shown}` {status}: the hypervisor's migration failed{tunnel}"),
    ))
}

/// Passes SIGINT on to `child`.
fn pass_interrupt(child: &tokio::process::Child) {
    eprintln!("vmotion-send: passing the interrupt on to the command");
    if let Some(pid) = child.id() {
        vmotion_cli::interrupt(pid);
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the QMP thread failed: {e}")))
}
