//! vmotion against QEMU's own TLS migration across the emulated long-distance link of
//! `vmotion_testbed::WanBed` (150 ms round trip, 1 Gbit/s, 0.1 % loss): a guest of
//! random memory that keeps rewriting part of it at a set rate, encrypted over 1, 4 and
//! 8 streams, then QEMU → QEMU with `tls-creds-x509` over the same link. Time, downtime,
//! converged or not (a run past the time limit is stopped and counts as not converging).
//!
//! vmotion moves the synthetic guest (`vmotion-send --synthetic-mib --dirty-rate`, uniform
//! random pages); QEMU moves the multiboot dirty guest (`vmotion_qemu::dirty_guest`,
//! rewriting half its memory). Both write at the same set rate.
//!
//! Run (root; the binaries are the release ones):
//! ```sh
//! cargo build --release -p vmotion-cli -p vmotion-keyservice -p vmotion-testbed --bins
//! cargo bench -p vmotion-benches --bench wan
//! ```
//! `VMOTION_BENCH_MIB` guest size (2048), `VMOTION_BENCH_DIRTY_MB` MB/s written (50),
//! `VMOTION_BENCH_TIMEOUT` seconds per migration (300), `VMOTION_BENCH_STREAMS` (1,4,8),
//! `VMOTION_BENCH_QEMU=0` skips QEMU.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmotion_benches::procs::{KeyService, Proc, bin, listening};
use vmotion_qemu::guest::DIRTY_REGION_MIN;
use vmotion_qemu::{Qemu, QemuConfig, dirty_guest, memfile};
use vmotion_testbed::{WanBed, WanLink};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One migration's figures.
#[derive(Debug)]
struct Outcome {
    converged: bool,
    secs: f64,
    downtime_ms: f64,
    passes: f64,
    /// vmotion: the pause's parts (final pages / device state / Ready wait / outcome
    /// record, ms).
    parts: String,
}

struct Wan {
    bed: WanBed,
    dir: tempfile::TempDir,
    ks: KeyService,
    mib: u64,
    dirty_mb: u64,
    timeout: Duration,
}

impl Wan {
    /// vmotion, encrypted, over `streams` streams.
    fn vmotion(&self, streams: u16) -> Outcome {
        let sinks = tempfile::tempdir_in("/dev/shm").unwrap();
        let mut recv = self.bed.command('b', bin("vmotion-recv"));
        recv.args(["--listen", &format!("{}:0", self.bed.wan_ip('b'))])
            .args(["--sink", "memfile", "--max-streams", "8", "--sink-dir"])
            .arg(sinks.path())
            .args(self.ks.identity("dst"))
            .stderr(Stdio::null());
        let (_recv, addr) = listening(&mut recv);
        let pages_per_sec = (self.dirty_mb as f64 * 1e6 / 4096.0).round();
        let mut send = self.bed.command('a', bin("vmotion-send"));
        send.args(["--vm", "wan-vm", "--to", &addr, "--policy-dir"])
            .arg(self.dir.path().join("policy"))
            .args(self.ks.identity("src"))
            .args(["--destination", "dst", "--json", "--abort-stale"])
            .args(["--synthetic-mib", &self.mib.to_string()])
            .args(["--dirty-rate", &pages_per_sec.to_string()])
            .args(["--streams", &streams.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let child = Proc(send.spawn().unwrap());
        let Some(out) = wait(child, self.timeout) else {
            return not_converged(self.timeout);
        };
        let r: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        if r["outcome"] != "committed" {
            eprintln!("vmotion {streams} stream(s): {r}");
            return not_converged(self.timeout);
        }
        Outcome {
            converged: true,
            secs: r["total_ms"].as_f64().unwrap_or(f64::NAN) / 1e3,
            downtime_ms: r["downtime_ms"]["total"].as_f64().unwrap_or(f64::NAN),
            passes: r["iterations"]
                .as_array()
                .map_or(f64::NAN, |i| i.len() as f64),
            parts: [
                "final_pages",
                "device_state",
                "ready_wait",
                "outcome_record",
            ]
            .map(|k| format!("{:.0}", r["downtime_ms"][k].as_f64().unwrap_or(f64::NAN)))
            .join(" / "),
        }
    }

    /// QEMU → QEMU over TLS on the same link.
    fn qemu_tls(&self) -> Outcome {
        let run = self.dir.path();
        let mem = tempfile::tempdir_in("/dev/shm").unwrap();
        let (src_mem, dst_mem) = (mem.path().join("src.mem"), mem.path().join("dst.mem"));
        memfile::fill_random(&src_mem, self.mib << 20, 11).unwrap();
        memfile::create_zeroed(&dst_mem, self.mib << 20).unwrap();
        let region = u32::try_from((self.mib << 20) / 2).unwrap_or(!0xfff);
        let rate = u32::try_from(self.dirty_mb * 1_000_000).unwrap_or(u32::MAX);
        let kernel = run.join("guest.bin");
        std::fs::write(&kernel, dirty_guest(DIRTY_REGION_MIN, region, rate)).unwrap();
        let tls = run.join("tls");
        let creds = |end: &str| {
            let verify = if end == "server" {
                ",verify-peer=on"
            } else {
                ""
            };
            vec![
                "-object".to_owned(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint={end}{verify}",
                    tls.display()
                ),
            ]
        };
        let mut src_cfg = QemuConfig::new("src", run, self.mib, &src_mem, &kernel);
        src_cfg.netns = Some(self.bed.ns('a'));
        src_cfg.extra_args = creds("client");
        let mut dst_cfg = QemuConfig::new("dst", run, self.mib, &dst_mem, &kernel);
        dst_cfg.netns = Some(self.bed.ns('b'));
        dst_cfg.extra_args = creds("server");
        dst_cfg.incoming = Some("defer".into());
        dst_cfg.prealloc = true;
        let mut src = Qemu::spawn(src_cfg).unwrap();
        let mut dst = Qemu::spawn(dst_cfg).unwrap();
        for q in [&mut src, &mut dst] {
            let params = json!({ "tls-creds": "tls0", "max-bandwidth": 100u64 << 30, "downtime-limit": 300 });
            q.qmp().set_parameters(params).unwrap();
        }
        src.wait_started(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let uri = format!("tcp:{}:4444", self.bed.wan_ip('b'));
        dst.qmp().migrate_incoming(&uri).unwrap();
        src.qmp().migrate(&uri).unwrap();
        match src.qmp().wait_migration(self.timeout) {
            Ok(r) if r["status"] == "completed" => Outcome {
                converged: true,
                secs: r["total-time"].as_f64().unwrap_or(f64::NAN) / 1e3,
                downtime_ms: r["downtime"].as_f64().unwrap_or(f64::NAN),
                passes: r["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
                parts: "-".into(),
            },
            other => {
                eprintln!("QEMU TLS: {other:?}");
                let _ = src.qmp().execute("migrate_cancel", None);
                not_converged(self.timeout)
            }
        }
    }
}

fn not_converged(limit: Duration) -> Outcome {
    Outcome {
        converged: false,
        secs: limit.as_secs_f64(),
        downtime_ms: f64::NAN,
        passes: f64::NAN,
        parts: "-".into(),
    }
}

/// The child's stdout once it exits within `limit`; `None` (and the child killed, by
/// SIGINT first so it cancels cleanly) past it.
fn wait(mut child: Proc, limit: Duration) -> Option<Vec<u8>> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.0.try_wait() {
            let mut out = Vec::new();
            use std::io::Read as _;
            child.0.stdout.take()?.read_to_end(&mut out).ok()?;
            return Some(out);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(5));
    None
}

fn row(name: &str, o: &Outcome) {
    println!(
        "| {name} | {} | {:.1} | {:.0} | {} | {:.0} |",
        if o.converged { "yes" } else { "no" },
        o.secs,
        o.downtime_ms,
        o.parts,
        o.passes
    );
}

fn main() {
    // `cargo test --benches` (no `--bench`) and test discovery (`--list`): minutes of
    // WAN migrations are a benchmark, not a smoke pass.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(why) = vmotion_testbed::wan_available() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bed = WanBed::new(WanLink::long_distance(), &bin("vmotion-wan")).unwrap();
    let ks = KeyService::start_at(dir.path(), &bed.management_ip());
    std::fs::create_dir(dir.path().join("policy")).unwrap();
    std::fs::write(
        dir.path().join("policy/wan-vm.toml"),
        "encryption = \"required\"\n",
    )
    .unwrap();
    vmotion_qemu::write_tls_creds(
        &dir.path().join("tls"),
        &["localhost", bed.wan_ip('b').as_str()],
    )
    .unwrap();
    let wan = Wan {
        bed,
        dir,
        ks,
        mib: env("VMOTION_BENCH_MIB", 2048),
        dirty_mb: env("VMOTION_BENCH_DIRTY_MB", 50),
        timeout: Duration::from_secs(env("VMOTION_BENCH_TIMEOUT", 300)),
    };
    let streams: Vec<u16> = std::env::var("VMOTION_BENCH_STREAMS")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "{} MiB guest rewriting at {} MB/s across 150 ms RTT, 1 Gbit/s, 0.1 % loss (user-space emulated link), limit {} s",
        wan.mib,
        wan.dirty_mb,
        wan.timeout.as_secs()
    );
    println!(
        "| migration | converged | time s | downtime ms | final pages / device state / Ready wait / outcome record ms | passes |"
    );
    println!("|---|---|---|---|---|---|");
    for s in streams {
        let o = wan.vmotion(s);
        row(&format!("vmotion encrypted, {s} stream(s)"), &o);
    }
    if env("VMOTION_BENCH_QEMU", 1) != 0 && vmotion_qemu::qemu_binary().is_some() {
        row("QEMU TLS", &wan.qemu_tls());
    }
}
