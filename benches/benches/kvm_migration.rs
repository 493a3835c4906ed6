//! Live migration of a real KVM micro-VM (`vmotion-vmm`) on loopback, encrypted against
//! plaintext in the same run: a guest whose memory is filled with pseudo-random data and
//! whose vCPU keeps writing pages at a set rate moves into a fresh micro-VM, 2 streams.
//! Reports total time, downtime and pre-copy passes. Skips, saying why, without /dev/kvm.
//!
//! Run: `cargo bench -p vmotion-benches --bench kvm_migration`
//! (`VMOTION_BENCH_MIB=N` guest size, default 1024; `VMOTION_BENCH_RUNS=N` runs per cell,
//! default 4; `VMOTION_BENCH_RATE=N` guest writes per second, default 25600 = 100 MB/s;
//! `VMOTION_BENCH_MAX_DOWNTIME_MS=N` the downtime target, default the policy's).
//! The downtime is broken into its parts (medians): the final pass's pages, the device
//! state, the wait for `Ready` and the outcome record.

use std::sync::Arc;

use vmotion::{MigrationReport, Receiver, Sender, Sink};
use vmotion_mover::{GuestMemory, VmControl};
use vmotion_proto::MigrationId;
use vmotion_vmm::{MicroVm, MicroVmConfig};

struct VmSink(MicroVm);

impl Sink for VmSink {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Arc::new(self.0.memory_handle())
    }

    fn control(&mut self) -> &mut dyn VmControl {
        &mut self.0
    }

    fn persist(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(())
    }

    fn discard(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(())
    }
}

async fn once(
    mib: u64,
    rate: f64,
    encrypted: bool,
    run: u32,
    max_downtime: Option<std::time::Duration>,
) -> MigrationReport {
    let mut src = MicroVm::start(MicroVmConfig {
        memory_mib: mib,
        rate,
        seed: run + 1,
        prefill: true,
        ..MicroVmConfig::default()
    })
    .expect("micro-VM");
    assert!(src.wait_beats(10, std::time::Duration::from_secs(10)));
    let id = MigrationId([run as u8; 16]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (keys, policy, key_source) = vmotion_benches::direct_keys(id, encrypted);
    let rx = tokio::spawn(async move {
        Receiver::new(keys)
            .receive(&listener, |h| {
                MicroVm::incoming(h.guest_pages * u64::from(h.page_size))
                    .map(VmSink)
                    .map_err(|e| e.to_string())
            })
            .await
    });
    let mut sender = Sender::builder(&format!("kvm-bench-{run}"))
        .policy(policy)
        .key(key_source)
        .streams(2);
    if let Some(d) = max_downtime {
        sender = sender.convergence(vmotion_engine::ConvergencePolicy {
            max_downtime: d,
            ..vmotion_engine::ConvergencePolicy::default()
        });
    }
    let report = sender
        .build()
        .unwrap()
        .migrate(addr, &mut src)
        .await
        .expect("migration");
    let (_, dst) = rx.await.unwrap().expect("received");
    let before = dst.0.heartbeat();
    assert!(
        dst.0.wait_beats(2, std::time::Duration::from_secs(10)) && dst.0.heartbeat() > before,
        "the guest runs at the destination"
    );
    report
}

fn main() {
    if let Err(why) = vmotion_vmm::kvm_available() {
        println!("skipped: {why}");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("VMOTION_BENCH_MIB", if smoke { 32 } else { 1024 });
    let runs = env("VMOTION_BENCH_RUNS", if smoke { 1 } else { 4 }) as u32;
    let rate = env("VMOTION_BENCH_RATE", 25_600) as f64;
    let max_downtime = std::env::var("VMOTION_BENCH_MAX_DOWNTIME_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "KVM micro-VM, {mib} MiB of pseudo-random data, vCPU writing {rate:.0} pages/s, 2 streams, {runs} run(s) each, downtime target {}",
        max_downtime.map_or_else(|| "the policy's".to_owned(), |d| format!("{d:?}"))
    );
    println!(
        "| mode | total s (min / median / max) | downtime ms (min / median / max) | final pages / device state / Ready wait / outcome record ms (medians) | passes (median) | GB/s (median) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut cells: [Vec<MigrationReport>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        // Alternate which goes first: the first of a pair runs right after the previous
        // pair's guests were torn down, and on this machine that order shows.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let r = once(mib, rate, i == 1, run * 2 + i as u32, max_downtime);
            cells[i].push(rt.block_on(r));
        }
    }
    for (i, name) in ["plaintext", "encrypted"].into_iter().enumerate() {
        let mut total: Vec<f64> = cells[i]
            .iter()
            .map(|r| r.total_time.as_secs_f64())
            .collect();
        let mut down: Vec<f64> = cells[i]
            .iter()
            .map(|r| {
                r.engine
                    .downtime
                    .map_or(f64::NAN, |d| d.total.as_secs_f64() * 1e3)
            })
            .collect();
        let mut passes: Vec<f64> = cells[i]
            .iter()
            .map(|r| r.engine.iterations.len() as f64)
            .collect();
        for v in [&mut total, &mut down, &mut passes] {
            v.sort_by(f64::total_cmp);
        }
        let m = |v: &Vec<f64>| v[v.len() / 2];
        let part = |f: fn(&vmotion_engine::Downtime) -> std::time::Duration| {
            let mut v: Vec<f64> = cells[i]
                .iter()
                .filter_map(|r| r.engine.downtime.as_ref().map(|d| f(d).as_secs_f64() * 1e3))
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        println!(
            "| {name} | {:.2} / {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {:.0} | {:.2} |",
            total[0],
            m(&total),
            total[total.len() - 1],
            down[0],
            m(&down),
            down[down.len() - 1],
            part(|d| d.final_pages),
            part(|d| d.device_state),
            part(|d| d.ready_wait),
            part(|d| d.outcome_record),
            m(&passes),
            (mib << 20) as f64 / m(&total) / 1e9
        );
    }
}
