//! QEMU's own migration against QEMU through the vmotion tunnel, in one run: the same
//! guest (2 GiB of random data, destination preallocated) migrates QEMU-to-QEMU over a
//! Unix socket in plain text, with QEMU's TLS (`tls-creds-x509`, over loopback TCP),
//! with multifd (2 channels) + TLS, through a two-hop socat relay (the tunnel's extra
//! hops without sealing; skipped without socat), and through `vmotion-send --tunnel` /
//! `vmotion-recv --tunnel` with a live key service: plaintext (policy disabled), and
//! encrypted, single channel and multifd. Then the same with a guest that keeps rewriting 1 GiB of its memory at
//! 256 MiB/s: does the migration converge, and how long does it take.
//!
//! Throughput is QEMU's own: guest RAM / `total-time` from `query-migrate`. The modes run
//! round-robin, so the machine's noise spreads over all of them.
//!
//! Run (the tunnel uses the release binaries):
//! ```sh
//! cargo build --release -p vmotion-cli -p vmotion-keyservice --bins
//! cargo bench -p vmotion-benches --bench qemu_tunnel
//! ```
//! `VMOTION_BENCH_MIB` guest size (2048), `VMOTION_BENCH_RUNS` runs per cell (3),
//! `VMOTION_BENCH_DIRTY` MiB/s the dirtying guest writes (256; 0 skips that table),
//! `VMOTION_BENCH_TIMEOUT` seconds before a migration counts as not converging (40),
//! `VMOTION_BENCH_DOWNTIME_LIMIT` QEMU's `downtime-limit` in ms (300),
//! `VMOTION_BENCH_MODES` a comma-separated subset of plain, socat, tls, multifd-tls,
//! tunnel-plaintext, tunnel, tunnel-multifd.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use vmotion_benches::monotonic;
use vmotion_benches::procs::{KeyService, Proc, bin, listening};
use vmotion_qemu::guest::DIRTY_REGION_MIN;
use vmotion_qemu::{Qemu, QemuConfig, dirty_guest, idle_guest, memfile};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Socat,
    Tls,
    MultifdTls,
    TunnelPlaintext,
    Tunnel,
    TunnelMultifd,
}

impl Mode {
    const ALL: [Self; 7] = [
        Self::Plain,
        Self::Socat,
        Self::Tls,
        Self::MultifdTls,
        Self::TunnelPlaintext,
        Self::Tunnel,
        Self::TunnelMultifd,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Plain => "QEMU plain",
            Self::Socat => "QEMU plain via a two-hop socat relay",
            Self::Tls => "QEMU TLS",
            Self::MultifdTls => "QEMU multifd-2 + TLS",
            Self::TunnelPlaintext => "vmotion tunnel, plaintext (checksummed)",
            Self::Tunnel => "vmotion tunnel, encrypted",
            Self::TunnelMultifd => "vmotion tunnel, encrypted, multifd-2",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Socat => "socat",
            Self::Tls => "tls",
            Self::MultifdTls => "multifd-tls",
            Self::TunnelPlaintext => "tunnel-plaintext",
            Self::Tunnel => "tunnel",
            Self::TunnelMultifd => "tunnel-multifd",
        }
    }

    /// The modes `VMOTION_BENCH_MODES` names (comma-separated keys), or all.
    fn chosen() -> Vec<Self> {
        match std::env::var("VMOTION_BENCH_MODES") {
            Ok(list) => Self::ALL
                .into_iter()
                .filter(|m| list.split(',').any(|k| k.trim() == m.key()))
                .collect(),
            Err(_) => Self::ALL.to_vec(),
        }
        .into_iter()
        .filter(|m| {
            let have = *m != Self::Socat
                || Command::new("socat")
                    .arg("-V")
                    .output()
                    .is_ok_and(|o| o.status.success());
            if !have {
                eprintln!("no socat: the relay baseline is left out (apt-get install socat)");
            }
            have
        })
        .collect()
    }

    fn multifd(self) -> bool {
        matches!(self, Self::MultifdTls | Self::TunnelMultifd)
    }

    fn tls(self) -> bool {
        matches!(self, Self::Tls | Self::MultifdTls)
    }

    fn tunnel(self) -> bool {
        matches!(
            self,
            Self::Tunnel | Self::TunnelMultifd | Self::TunnelPlaintext
        )
    }

    /// The VM name (and so the policy file) of a tunnelled run.
    fn vm(self) -> &'static str {
        match self {
            Self::TunnelPlaintext => "bench-plain",
            _ => "bench-vm",
        }
    }
}

struct Bench {
    dir: tempfile::TempDir,
    mem: tempfile::TempDir,
    mib: u64,
    timeout: Duration,
    ks: KeyService,
    recv: Proc,
    recv_addr: String,
}

/// What one migration did.
#[derive(Debug, Clone)]
struct Outcome {
    converged: bool,
    total_ms: f64,
    downtime_ms: f64,
    gbps: f64,
    transferred_mb: f64,
    /// What the dirtying guest actually wrote during the migration, MiB/s (it shares the
    /// two cores with both QEMUs and the tunnel, so it may fall short of its pace).
    guest_mibps: f64,
}

impl Bench {
    fn new(mib: u64, timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mem = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        vmotion_qemu::write_tls_creds(&dir.path().join("tls"), &["localhost", "127.0.0.1"])
            .unwrap();
        std::fs::create_dir(dir.path().join("policy")).unwrap();
        std::fs::write(
            dir.path().join("policy/bench-vm.toml"),
            "encryption = \"required\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("policy/bench-plain.toml"),
            "encryption = \"disabled\"\n",
        )
        .unwrap();
        let ks = KeyService::start(dir.path());
        let incoming = dir.path().join("{vm}.incoming");
        let (recv, recv_addr) = listening(
            Command::new(bin("vmotion-recv"))
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--allow-plaintext-tunnels",
                    "--tunnel",
                ])
                .arg(format!("unix:{}", incoming.display()))
                .args(ks.identity("dst"))
                .stderr(Stdio::null()),
        );
        memfile::fill_random(&mem.path().join("src.mem"), mib << 20, 11).unwrap();
        Self {
            dir,
            mem,
            mib,
            timeout,
            ks,
            recv,
            recv_addr,
        }
    }

    fn once(&self, mode: Mode, kernel: &[u8]) -> Outcome {
        let run = self.dir.path();
        let kernel_path = run.join("guest.bin");
        std::fs::write(&kernel_path, kernel).unwrap();
        let dst_mem = self.mem.path().join("dst.mem");
        let _ = std::fs::remove_file(&dst_mem);
        memfile::create_zeroed(&dst_mem, self.mib << 20).unwrap();
        let tls = run.join("tls");
        let mut src_cfg = QemuConfig::new(
            "src",
            run,
            self.mib,
            self.mem.path().join("src.mem"),
            &kernel_path,
        );
        let mut dst_cfg = QemuConfig::new("dst", run, self.mib, &dst_mem, &kernel_path);
        dst_cfg.incoming = Some("defer".into());
        dst_cfg.prealloc = true;
        if mode.tls() {
            src_cfg.extra_args = vec![
                "-object".into(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    tls.display()
                ),
            ];
            dst_cfg.extra_args = vec![
                "-object".into(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                    tls.display()
                ),
            ];
        }
        // The source's memory file is reused: clear the guest's "started" word and counter
        // from the last run, or waiting for the guest would return while it still boots.
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(self.mem.path().join("src.mem"))
                .unwrap();
            f.seek(SeekFrom::Start(vmotion_qemu::guest::STARTED_ADDR))
                .unwrap();
            f.write_all(&[0; 8]).unwrap();
        }
        let mut src = Qemu::spawn(src_cfg).unwrap();
        let mut dst = Qemu::spawn(dst_cfg).unwrap();
        for q in [&mut src, &mut dst] {
            if mode.multifd() {
                q.qmp().set_capabilities(&[("multifd", true)]).unwrap();
                q.qmp()
                    .set_parameters(json!({ "multifd-channels": 2 }))
                    .unwrap();
            }
            if mode.tls() {
                q.qmp()
                    .set_parameters(json!({ "tls-creds": "tls0" }))
                    .unwrap();
            }
            q.qmp()
                .set_parameters(json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": env("VMOTION_BENCH_DOWNTIME_LIMIT", 300) }))
                .unwrap();
        }
        src.wait_started(Duration::from_secs(60)).unwrap();
        // Let a dirtying guest reach its pace before the migration starts.
        std::thread::sleep(Duration::from_millis(500));

        let (dst_uri, src_uri, _relay) = if mode.tls() {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let uri = format!("tcp:127.0.0.1:{port}");
            (uri.clone(), uri, Vec::new())
        } else if mode.tunnel() {
            let listen = run.join("tunnel.sock");
            let tunnel = self.tunnel(mode.vm(), &listen);
            (
                format!(
                    "unix:{}",
                    run.join(format!("{}.incoming", mode.vm())).display()
                ),
                format!("unix:{}", listen.display()),
                vec![tunnel],
            )
        } else if mode == Mode::Socat {
            let (out, inc) = (run.join("relay-out.sock"), run.join("relay-in.sock"));
            (
                format!("unix:{}", inc.display()),
                format!("unix:{}", out.display()),
                socat_relay(&out, &inc),
            )
        } else {
            let uri = format!("unix:{}", run.join("direct.sock").display());
            (uri.clone(), uri, Vec::new())
        };
        dst.qmp().migrate_incoming(&dst_uri).unwrap();
        let src_mem = self.mem.path().join("src.mem");
        let before = vmotion_qemu::guest::progress(&src_mem).unwrap();
        let started = std::time::Instant::now();
        let window_start = monotonic();
        src.qmp().migrate(&src_uri).unwrap();
        let r: Value = match src.qmp().wait_migration(self.timeout) {
            Ok(r) => r,
            Err(_) => {
                let r = src.qmp().query_migrate().unwrap();
                let wrote = guest_rate(&src_mem, before, started);
                let _ = src.qmp().execute("migrate_cancel", None);
                return Outcome {
                    converged: false,
                    total_ms: self.timeout.as_secs_f64() * 1e3,
                    downtime_ms: f64::NAN,
                    gbps: f64::NAN,
                    transferred_mb: r["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1e6,
                    guest_mibps: wrote,
                };
            }
        };
        assert_eq!(r["status"], "completed", "{mode:?}: {r}");
        // The source is paused for good now: its counter is final.
        let wrote = guest_rate(&src_mem, before, started);
        // For `perf record -k CLOCK_MONOTONIC` then `perf report --time START,END`.
        eprintln!(
            "window {}: {window_start:.6},{:.6}",
            mode.name(),
            monotonic()
        );
        dst.qmp()
            .wait_status("running", Duration::from_secs(10))
            .unwrap();
        let total_ms = r["total-time"].as_f64().unwrap();
        Outcome {
            converged: true,
            total_ms,
            downtime_ms: r["downtime"].as_f64().unwrap_or(f64::NAN),
            gbps: r["ram"]["total"].as_f64().unwrap() / total_ms / 1e6,
            transferred_mb: r["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1e6,
            guest_mibps: wrote,
        }
    }

    /// `vmotion-send --tunnel`, ready for QEMU.
    fn tunnel(&self, vm: &str, listen: &Path) -> Proc {
        let mut child = Command::new(bin("vmotion-send"))
            .args(["--vm", vm, "--to", &self.recv_addr, "--policy-dir"])
            .arg(self.dir.path().join("policy"))
            .args(self.ks.identity("src"))
            // A plain tunnel cannot know QEMU's verdict, so the key service holds the VM
            // as in flight after each run: the next run takes it over.
            .args(["--destination", "dst", "--abort-stale", "--tunnel"])
            .arg(format!("unix:{}", listen.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        loop {
            let mut line = String::new();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "vmotion-send ended before it was ready"
            );
            if line.contains("tunnel ready (") {
                break;
            }
        }
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
        });
        Proc(child)
    }
}

/// MiB/s the dirtying guest wrote since `before` (its page-write counter) at `since`.
fn guest_rate(src_mem: &Path, before: u32, since: std::time::Instant) -> f64 {
    let now = vmotion_qemu::guest::progress(src_mem).unwrap_or(before);
    f64::from(now.wrapping_sub(before)) * 4096.0
        / f64::from(1 << 20)
        / since.elapsed().as_secs_f64()
}

/// Two socat processes relaying QEMU's migration: Unix socket → loopback TCP → Unix
/// socket, 1 MiB buffers (the two extra hops of the tunnel, without sealing).
fn socat_relay(out: &Path, inc: &Path) -> Vec<Proc> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawn = |a: String, b: String| {
        Proc(
            Command::new("socat")
                .args(["-b", "1048576", &a, &b])
                .stderr(Stdio::null())
                .spawn()
                .expect("socat (apt-get install socat)"),
        )
    };
    let second = spawn(
        format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
        format!("UNIX-CONNECT:{}", inc.display()),
    );
    let first = spawn(
        format!("UNIX-LISTEN:{}", out.display()),
        format!("TCP:127.0.0.1:{port}"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !out.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    vec![first, second]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// A ratio of medians; "n/a" where a mode was not run or did not converge.
struct Ratio(f64);

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_finite() {
            write!(f, "{:.2}", self.0)
        } else {
            f.write_str("n/a")
        }
    }
}

fn table(title: &str, results: &[(Mode, Vec<Outcome>)]) {
    println!("\n### {title}\n");
    println!(
        "| mode | converged | GB/s min / median / max | total s (median) | downtime ms (median) | MB sent (median) | guest wrote MiB/s (median) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let median_gbps = |m: Mode| {
        results
            .iter()
            .find(|(x, _)| *x == m)
            .map(|(_, o)| stats(&o.iter().map(|o| o.gbps).collect::<Vec<_>>()).1)
            .unwrap_or(f64::NAN)
    };
    for (mode, outs) in results {
        let converged = outs.iter().filter(|o| o.converged).count();
        let (lo, med, hi) = stats(&outs.iter().map(|o| o.gbps).collect::<Vec<_>>());
        let total = stats(
            &outs
                .iter()
                .filter(|o| o.converged)
                .map(|o| o.total_ms)
                .collect::<Vec<_>>(),
        )
        .1;
        let down = stats(&outs.iter().map(|o| o.downtime_ms).collect::<Vec<_>>()).1;
        let sent = stats(&outs.iter().map(|o| o.transferred_mb).collect::<Vec<_>>()).1;
        let wrote = stats(&outs.iter().map(|o| o.guest_mibps).collect::<Vec<_>>()).1;
        println!(
            "| {} | {converged} of {} | {lo:.2} / {med:.2} / {hi:.2} | {:.2} | {down:.0} | {sent:.0} | {wrote:.0} |",
            mode.name(),
            outs.len(),
            total / 1e3,
        );
    }
    let ratio = |a: Mode, b: Mode| Ratio(median_gbps(a) / median_gbps(b));
    println!();
    println!(
        "- socat relay / QEMU plain = {}; tunnel / socat relay = {}; tunnel encrypted / tunnel plaintext = {}",
        ratio(Mode::Socat, Mode::Plain),
        ratio(Mode::Tunnel, Mode::Socat),
        ratio(Mode::Tunnel, Mode::TunnelPlaintext),
    );
    println!();
    println!(
        "- tunnel / QEMU TLS = {}; tunnel multifd / QEMU multifd + TLS = {}; best tunnel / QEMU TLS = {}",
        ratio(Mode::Tunnel, Mode::Tls),
        ratio(Mode::TunnelMultifd, Mode::MultifdTls),
        Ratio(
            median_gbps(Mode::Tunnel).max(median_gbps(Mode::TunnelMultifd))
                / median_gbps(Mode::Tls)
        ),
    );
    println!(
        "- tunnel / QEMU plain = {}; tunnel multifd / QEMU plain = {}",
        ratio(Mode::Tunnel, Mode::Plain),
        ratio(Mode::TunnelMultifd, Mode::Plain),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let Some(qemu) = vmotion_qemu::qemu_binary() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed (.ci/run installs it)");
        return;
    };
    let mib = env("VMOTION_BENCH_MIB", 2048);
    let runs = env("VMOTION_BENCH_RUNS", 3);
    let dirty = env("VMOTION_BENCH_DIRTY", 256);
    let timeout = Duration::from_secs(env("VMOTION_BENCH_TIMEOUT", 40));
    println!(
        "QEMU {} ({:?}), guest {mib} MiB, {runs} runs per cell",
        qemu.display(),
        vmotion_qemu::Accel::detect()
    );
    let bench = Bench::new(mib, timeout);

    let mut idle: Vec<(Mode, Vec<Outcome>)> = Mode::chosen()
        .into_iter()
        .map(|m| (m, Vec::new()))
        .collect();
    for run in 0..runs {
        for (mode, outs) in &mut idle {
            let o = bench.once(*mode, &idle_guest());
            eprintln!("idle run {run}: {}: {o:?}", mode.name());
            outs.push(o);
        }
    }
    table(
        &format!("{mib} MiB random guest, idle, destination preallocated"),
        &idle,
    );

    if dirty > 0 {
        let region = u32::try_from((mib << 20) / 2).unwrap_or(!0xfff);
        let image = dirty_guest(
            DIRTY_REGION_MIN,
            region,
            u32::try_from(dirty << 20).unwrap(),
        );
        let mut busy: Vec<(Mode, Vec<Outcome>)> = Mode::chosen()
            .into_iter()
            .map(|m| (m, Vec::new()))
            .collect();
        for run in 0..runs {
            for (mode, outs) in &mut busy {
                let o = bench.once(*mode, &image);
                eprintln!("dirty run {run}: {}: {o:?}", mode.name());
                outs.push(o);
            }
        }
        table(
            &format!(
                "{mib} MiB random guest rewriting {} MiB at {dirty} MiB/s (not converged = still running after {} s)",
                region >> 20,
                timeout.as_secs()
            ),
            &busy,
        );
    }
    drop(bench.recv);
}
