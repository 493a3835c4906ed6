//! `vmotion-evacuate`: empties this host, moving each of its VMs to one of the
//! destination hosts with `vmotion-send`.
//!
//! It drains this host at the key service first (no migration comes back to it), places
//! each VM ([`vmotion_cli::evacuate`]: the most free room, never a destination that
//! cannot encrypt for a VM that requires it), runs up to `--parallel` migrations at once
//! (the key service's admission limits queue the rest inside `vmotion-send`), tries a
//! failed VM again on another destination (at most `--retries` times, only when it is
//! known to still run here: exits 3, 4, 6 and 7 of vmotion-send), and ends with a table
//! per VM and whether the host is empty.
//!
//! Exit codes: 0 every VM moved, the host is empty; 1 some VM did not move (each says
//! why; those still run here); 2 bad usage; 5 some VM's outcome is unknown (it may be
//! paused here: settle it first).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use vmotion_cli::evacuate::board::Board;
use vmotion_cli::evacuate::{Destination, Placement};
use vmotion_cli::shutdown_signal;
use vmotion_proto::EncryptionPolicy;

/// Empties this host: moves each of its VMs to one of the destination hosts.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// This host's identity at the key service (drained first, so nothing comes back).
    #[arg(long)]
    host: Option<String>,
    /// A destination: NAME=ADDR[/CAPACITY] (its key-service identity, its vmotion-recv
    /// address, how many VMs it may take); repeat for each.
    #[arg(long = "to", value_name = "NAME=ADDR[/CAPACITY]", required = true)]
    destinations: Vec<String>,
    /// QEMU VMs: a glob of QMP sockets vmotion may use, one per VM, named VM.qmp or
    /// VM.vmotion.qmp (e.g. '/run/vmotion/*.vmotion.qmp').
    #[arg(long)]
    qemu: Vec<String>,
    /// Synthetic guests, for tests and demos: NAME:MIB; repeat for each.
    #[arg(long, value_name = "NAME:MIB")]
    synthetic: Vec<String>,
    /// An inventory file: one VM per line, `NAME qemu:QMP_SOCKET` or `NAME synthetic:MIB`
    /// (blank lines and `#` comments allowed).
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Folder of policy files.
    #[arg(long, default_value = "policy")]
    policy_dir: PathBuf,
    #[command(flatten)]
    keyservice: vmotion_cli::KeyServiceArgs,
    /// Migrations at once (the key service's admission limits may queue them further).
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// How many times a VM whose migration failed is tried again on another destination.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// On SIGINT / SIGTERM, also cancel the migrations in flight (they are passed the
    /// signal: each VM stays where its own migration leaves it). Without it they finish.
    #[arg(long)]
    cancel_in_flight: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// The vmotion-send to run (default: the one beside this program).
    #[arg(long)]
    send_bin: Option<PathBuf>,
}

/// A VM to move.
#[derive(Debug, Clone)]
struct Vm {
    name: String,
    /// vmotion-send's source flags.
    source: Vec<String>,
    requires_encryption: bool,
}

/// How one VM's evacuation ended.
#[derive(Debug, Clone)]
struct Moved {
    vm: String,
    destination: Option<String>,
    outcome: String,
    mode: Option<String>,
    seconds: f64,
    downtime_ms: Option<f64>,
    attempts: usize,
    exit: Option<i32>,
}

fn vms(args: &Args) -> Result<Vec<Vm>, String> {
    let mut out = Vec::new();
    for pattern in &args.qemu {
        let paths = glob_sockets(pattern)?;
        for path in paths {
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            let name = file
                .trim_end_matches(".qmp")
                .trim_end_matches(".vmotion")
                .to_owned();
            out.push(Vm {
                name,
                source: vec!["--qemu".into(), path.display().to_string()],
                requires_encryption: false,
            });
        }
    }
    for s in &args.synthetic {
        let (name, mib) = s
            .split_once(':')
            .ok_or_else(|| format!("--synthetic `{s}`: NAME:MIB"))?;
        out.push(synthetic(name, mib).map_err(|e| format!("--synthetic `{s}`: {e}"))?);
    }
    if let Some(path) = &args.inventory {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.extend(inventory(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let mut names = std::collections::BTreeSet::new();
    if let Some(vm) = out.iter().find(|vm| !names.insert(vm.name.clone())) {
        return Err(format!("VM `{}` is named twice", vm.name));
    }
    for vm in &mut out {
        if !vmotion_policy::valid_vm_name(&vm.name) {
            return Err(format!("`{}` is not a VM name", vm.name));
        }
        let policy = vmotion_policy::load(&args.policy_dir, &vm.name).map_err(|e| e.to_string())?;
        vm.requires_encryption = policy.vm_policy.effective() == EncryptionPolicy::Required;
    }
    Ok(out)
}

fn synthetic(name: &str, mib: &str) -> Result<Vm, String> {
    mib.parse::<u64>()
        .map_err(|_| format!("`{mib}`: MIB is a number"))?;
    Ok(Vm {
        name: name.to_owned(),
        source: vec!["--synthetic-mib".into(), mib.to_owned()],
        requires_encryption: false,
    })
}

/// The VMs of an inventory file: `NAME qemu:QMP_SOCKET` or `NAME synthetic:MIB` per line.
fn inventory(text: &str) -> Result<Vec<Vm>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: &str| format!("line {}: {e}", n + 1);
        let mut words = line.split_whitespace();
        let (Some(name), Some(source), None) = (words.next(), words.next(), words.next()) else {
            return Err(at(
                "expected `NAME qemu:QMP_SOCKET` or `NAME synthetic:MIB`",
            ));
        };
        out.push(match source.split_once(':') {
            Some(("qemu", path)) if !path.is_empty() => Vm {
                name: name.to_owned(),
                source: vec!["--qemu".into(), path.to_owned()],
                requires_encryption: false,
            },
            Some(("synthetic", mib)) => synthetic(name, mib).map_err(|e| at(&e))?,
            _ => return Err(at(&format!("`{source}`: qemu:QMP_SOCKET or synthetic:MIB"))),
        });
    }
    Ok(out)
}

/// The sockets a glob names: `*` and `?` in the file name only.
fn glob_sockets(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let path = PathBuf::from(pattern);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let want = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| format!("`{pattern}`: no file name"))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| matches(want, n)))
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Whether `name` matches `pattern` (`*` any run, `?` any one character).
fn matches(pattern: &str, name: &str) -> bool {
    match (pattern.chars().next(), name.chars().next()) {
        (None, None) => true,
        (Some('*'), _) => {
            matches(&pattern[1..], name)
                || name
                    .chars()
                    .next()
                    .is_some_and(|c| matches(pattern, &name[c.len_utf8()..]))
        }
        (Some(p), Some(c)) if p == '?' || p == c => {
            matches(&pattern[p.len_utf8()..], &name[c.len_utf8()..])
        }
        _ => false,
    }
}

/// What the key service's registry says each destination can do.
async fn capabilities(args: &Args, destinations: &mut [Destination]) -> Result<(), String> {
    let Some(client) = args.keyservice.client().map_err(|e| e.to_string())? else {
        return Ok(()); // no keys: nothing can be encrypted
    };
    for d in destinations.iter_mut() {
        d.can_encrypt = client
            .host(&d.name)
            .await
            .map_err(|e| format!("the registry entry of {}: {e}", d.name))?
            .is_some_and(|h| h.encrypts());
    }
    if let Some(host) = &args.host {
        client
            .set_maintenance(host, true)
            .await
            .map_err(|e| format!("draining {host}: {e}"))?;
        eprintln!("vmotion-evacuate: {host} is draining: no migration is created to it");
    }
    Ok(())
}

/// What every migration of one evacuation shares.
struct Evacuation {
    args: Args,
    send_bin: PathBuf,
    placement: std::sync::Mutex<Placement>,
    /// Set at SIGINT / SIGTERM: no migration starts or is tried again from then on.
    stopping: AtomicBool,
    /// The vmotion-send processes running now, by pid.
    children: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    board: Board,
}

impl Evacuation {
    fn placement(&self) -> std::sync::MutexGuard<'_, Placement> {
        self.placement
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn children(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u32>> {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops: nothing new starts; with `--cancel-in-flight` the running vmotion-send are
    /// passed the interrupt.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.args.cancel_in_flight {
            for &pid in self.children().iter() {
                vmotion_cli::interrupt(pid);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// One migration of `vm` to `d` with vmotion-send; its exit code and JSON report.
async fn send(ev: &Evacuation, vm: &Vm, d: &Destination) -> (Option<i32>, Value) {
    let (args, send_bin) = (&ev.args, &ev.send_bin);
    let mut cmd = tokio::process::Command::new(send_bin);
    cmd.args([
        "--vm",
        &vm.name,
        "--to",
        &d.addr,
        "--destination",
        &d.name,
        "--json",
        "--progress",
        "json",
    ])
    .arg("--policy-dir")
    .arg(&args.policy_dir)
    .args(&vm.source)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    // A group of its own: a terminal's Ctrl-C reaches only this program, which lets the
    // migrations in flight finish unless --cancel-in-flight.
    .process_group(0)
    .kill_on_drop(false);
    let ks = &args.keyservice;
    if let (Some(url), Some(ca), Some(cert), Some(key)) =
        (&ks.keyservice, &ks.ca, &ks.cert, &ks.key)
    {
        cmd.args(["--keyservice", url])
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
    }
    let failed = |e: std::io::Error| {
        (
            None,
            json!({ "error": format!("running {}: {e}", send_bin.display()) }),
        )
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    let progress = child
        .stderr
        .take()
        .map(|stderr| follow(ev, &vm.name, stderr));
    let pid = child.id();
    if let Some(pid) = pid {
        ev.children().insert(pid);
        // A stop that came between the check before this migration and now.
        if ev.stopping() && ev.args.cancel_in_flight {
            vmotion_cli::interrupt(pid);
        }
    }
    let (output, last_words) = tokio::join!(child.wait_with_output(), async {
        match progress {
            Some(p) => p.await,
            None => String::new(),
        }
    });
    if let Some(pid) = pid {
        ev.children().remove(&pid);
    }
    match output {
        Ok(o) => {
            let mut report = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            if report["error"].is_null() && !last_words.is_empty() && !o.status.success() {
                report = json!({ "error": last_words });
            }
            (o.status.code(), report)
        }
        Err(e) => failed(e),
    }
}

/// Reads a `vmotion-send`'s stderr to its end: its JSON progress lines go to the board;
/// returns the last other line (its error, if it failed without a report).
async fn follow(ev: &Evacuation, vm: &str, stderr: tokio::process::ChildStderr) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    // Bounded: a line longer than this is cut, never buffered whole.
    const MAX_LINE: u64 = 16 * 1024;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut last = String::new();
    loop {
        let mut buf = Vec::new();
        let mut limited = (&mut reader).take(MAX_LINE);
        match limited.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return last,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v["progress"].is_object() => ev.board.progress(vm, &v["progress"]),
            _ if !line.is_empty() => last = line,
            _ => {}
        }
    }
}

/// Whether a failed migration left the VM running here, so it may go elsewhere: refused
/// (3), aborted (4), QEMU failed or cancelled (6, 7). Not 5 (unknown) nor 1/2.
fn retryable(exit: Option<i32>) -> bool {
    matches!(exit, Some(3 | 4 | 6 | 7))
}

/// Moves one VM: places it, sends it, tries elsewhere on a retryable failure.
async fn evacuate_one(ev: Arc<Evacuation>, vm: Vm) -> Moved {
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut last = Moved {
        vm: vm.name.clone(),
        destination: None,
        outcome: "not started".into(),
        mode: None,
        seconds: 0.0,
        downtime_ms: None,
        attempts: 0,
        exit: None,
    };
    while last.attempts <= ev.args.retries {
        let chosen = ev.placement().place(vm.requires_encryption, &failed);
        let i = match chosen {
            Ok(i) => i,
            Err(why) => {
                last.outcome = format!("not moved: {why}");
                ev.board.skipped();
                break;
            }
        };
        let d = ev.placement().destinations()[i].clone();
        ev.board
            .started(&vm.name, &format!("{} ({})", d.name, d.addr));
        last.attempts += 1;
        let (exit, report) = send(&ev, &vm, &d).await;
        last.destination = Some(d.name.clone());
        last.exit = exit;
        last.mode = report["mode"]
            .as_str()
            .or_else(|| report["tunnel"]["mode"].as_str())
            .map(str::to_owned);
        last.downtime_ms = report["downtime_ms"]["total"]
            .as_f64()
            .or_else(|| report["qemu"]["downtime_ms"].as_f64());
        if exit == Some(0) {
            last.outcome = "moved".into();
            ev.board
                .ended(&vm.name, true, true, &format!("moved to {}", d.name));
            break;
        }
        ev.placement().release(i);
        let why = report["error"].as_str().unwrap_or("no report").to_owned();
        last.outcome = format!("failed (exit {exit:?}): {why}");
        let again = retryable(exit) && !ev.stopping() && last.attempts <= ev.args.retries;
        let said = format!("on {}: {}", d.name, last.outcome);
        ev.board.ended(&vm.name, false, !again, &said);
        if !again {
            break;
        }
        failed.push(i);
    }
    last.seconds = started.elapsed().as_secs_f64();
    last
}

async fn run(args: Args) -> Result<Vec<Moved>, (u8, String)> {
    let mut destinations = args
        .destinations
        .iter()
        .map(|s| Destination::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (2, e))?;
    let vms = vms(&args).map_err(|e| (2, e))?;
    if vms.is_empty() {
        return Err((
            2,
            "no VM to move: name them with --qemu or --synthetic".into(),
        ));
    }
    capabilities(&args, &mut destinations)
        .await
        .map_err(|e| (1, e))?;
    let send_bin = match &args.send_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| (1, e.to_string()))?
            .with_file_name("vmotion-send"),
    };
    let slots = Arc::new(Semaphore::new(args.parallel.max(1)));
    let board = Board::new(vms.len());
    let ev = Arc::new(Evacuation {
        args,
        send_bin,
        placement: std::sync::Mutex::new(Placement::new(destinations)),
        stopping: AtomicBool::new(false),
        children: std::sync::Mutex::default(),
        board,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for vm in vms {
        let (ev, slots) = (ev.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            if ev.stopping() {
                ev.board.skipped();
                return not_started(&vm.name, "stopped by a signal before it started");
            }
            evacuate_one(ev, vm).await
        });
    }
    let mut results = Vec::new();
    let mut signalled = false;
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                Some(Ok(m)) => results.push(m),
                Some(Err(e)) => return Err((1, format!("a migration task failed: {e}"))),
                None => break,
            },
            () = shutdown_signal(), if !signalled => {
                signalled = true;
                let then = if ev.args.cancel_in_flight { "cancelling those in flight" } else { "those in flight finish" };
                ev.board.note(&format!("stopping: no new migration starts; {then}"));
                ev.stop();
            }
        }
    }
    ev.board.clear();
    results.sort_by(|a, b| a.vm.cmp(&b.vm));
    Ok(results)
}

fn not_started(vm: &str, why: &str) -> Moved {
    Moved {
        vm: vm.to_owned(),
        destination: None,
        outcome: format!("not moved: {why}"),
        mode: None,
        seconds: 0.0,
        downtime_ms: None,
        attempts: 0,
        exit: None,
    }
}

fn print(results: &[Moved], json: bool) {
    let empty = results.iter().all(|m| m.outcome == "moved");
    if json {
        let vms: Vec<Value> = results
            .iter()
            .map(|m| {
                json!({
                    "vm": m.vm, "destination": m.destination, "outcome": m.outcome,
                    "mode": m.mode, "seconds": m.seconds, "downtime_ms": m.downtime_ms,
                    "attempts": m.attempts, "exit_code": m.exit,
                })
            })
            .collect();
        println!("{}", json!({ "host_empty": empty, "vms": vms }));
        return;
    }
    println!(
        "{:<20} {:<14} {:<10} {:>8} {:>12} {:>8}  outcome",
        "vm", "destination", "mode", "time s", "downtime ms", "attempts"
    );
    for m in results {
        println!(
            "{:<20} {:<14} {:<10} {:>8.1} {:>12} {:>8}  {}",
            m.vm,
            m.destination.as_deref().unwrap_or("-"),
            m.mode.as_deref().unwrap_or("-"),
            m.seconds,
            m.downtime_ms
                .map_or_else(|| "-".into(), |d| format!("{d:.1}")),
            m.attempts,
            m.outcome
        );
    }
    let moved = results.iter().filter(|m| m.outcome == "moved").count();
    println!(
        "{moved} of {} VMs moved; this host is {}",
        results.len(),
        if empty {
            "empty"
        } else {
            "NOT empty (the VMs not moved still run here)"
        }
    );
}

fn main() -> ExitCode {
    if let Some(code) = vmotion_clidoc::generate_if_asked::<Args>("vmotion-evacuate") {
        return code;
    }
    vmotion_cli::init_logging("warn");
    let args = Args::parse();
    let json = args.json;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmotion-evacuate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(results) => {
            print(&results, json);
            if results.iter().any(|m| m.exit == Some(5)) {
                ExitCode::from(5)
            } else if results.iter().all(|m| m.outcome == "moved") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err((code, e)) => {
            eprintln!("vmotion-evacuate: {e}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inventory_names_qemu_and_synthetic_vms() {
        let vms = inventory(
            "# this host\nweb-1 qemu:/run/vmotion/web-1.qmp\n\n  db synthetic:64  # test\n",
        )
        .unwrap();
        let got: Vec<(&str, Vec<&str>)> = vms
            .iter()
            .map(|v| {
                (
                    v.name.as_str(),
                    v.source.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("web-1", vec!["--qemu", "/run/vmotion/web-1.qmp"]),
                ("db", vec!["--synthetic-mib", "64"]),
            ]
        );
        for bad in [
            "web-1",
            "web-1 qemu:",
            "web-1 kvm:4",
            "db synthetic:x",
            "a b c",
        ] {
            let e = inventory(bad).map(|_| ()).unwrap_err();
            assert!(e.starts_with("line 1: "), "{bad}: {e}");
        }
    }

    #[test]
    fn globs_match_the_file_name() {
        assert!(matches("*.vmotion.qmp", "web-1.vmotion.qmp"));
        assert!(matches("web-?.qmp", "web-2.qmp"));
        assert!(!matches("*.qmp", "web-1.qmp.old"));
        assert!(matches("*", ""));
    }
}
