//! End-to-end migration throughput on loopback, encrypted against plaintext in the same
//! run: an idle synthetic guest of random (non-zero) pages moves through the real driver
//! (`vmotion::Sender` → TCP → `vmotion::Receiver`) into a blank guest, sender and receiver
//! in this process, sharing the machine's two cores.
//!
//! A second table migrates running guests, encrypted over 2 streams, whose writers dirty
//! memory at a set rate (uniform random pages), with a 20 ms downtime target: measured
//! downtime, iterations, the highest throttle (0 = converged without throttling).
//!
//! Run: `cargo bench -p vmotion-benches --bench migration`
//! (`VMOTION_BENCH_MIB=N` sets the idle guest's size, default 2048; `VMOTION_BENCH_RUNS=N`
//! the runs per configuration, default 3; `VMOTION_BENCH_DIRTY_MIB=N` the running guest's
//! size, default 1024).

use std::time::Duration;

use tokio::net::TcpListener;
use vmotion::{MigrationReport, Receiver, Sender};
use vmotion_engine::ConvergencePolicy;
use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
use vmotion_proto::MigrationId;

async fn once(pages: u64, encrypted: bool, streams: u16, run: u32) -> f64 {
    let config = SyntheticConfig {
        pages,
        zero_fraction: 0.0,
        seed: u64::from(run),
        ..SyntheticConfig::default()
    };
    let report = migrate(config, encrypted, streams, run, None).await;
    let secs = report.total_time.as_secs_f64();
    assert!(report.bytes_sent >= pages * 4096);
    (pages * 4096) as f64 / secs / 1e9
}

/// One migration of a guest built from `config`, into a blank guest.
async fn migrate(
    config: SyntheticConfig,
    encrypted: bool,
    streams: u16,
    run: u32,
    max_downtime: Option<Duration>,
) -> MigrationReport {
    let id = MigrationId([run as u8; 16]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (keys, policy, key_source) = vmotion_benches::direct_keys(id, encrypted);
    let rx = tokio::spawn(async move {
        Receiver::new(keys)
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
            .map(|_| ())
    });
    let mut guest = SyntheticGuest::start(config);
    let mut builder = Sender::builder(&format!("bench-{run}"))
        .policy(policy)
        .key(key_source)
        .streams(streams);
    if let Some(d) = max_downtime {
        builder = builder.convergence(ConvergencePolicy {
            max_downtime: d,
            ..ConvergencePolicy::default()
        });
    }
    let report = builder
        .build()
        .unwrap()
        .migrate(addr, &mut guest)
        .await
        .expect("migration");
    rx.await.unwrap().expect("received");
    report
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("VMOTION_BENCH_MIB", if smoke { 16 } else { 2048 });
    let dirty_mib = env("VMOTION_BENCH_DIRTY_MIB", if smoke { 16 } else { 1024 });
    let runs = env("VMOTION_BENCH_RUNS", if smoke { 1 } else { 3 }) as u32;
    let pages = mib * 256;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "migration of an idle {mib} MiB guest of random pages, {runs} run(s) each, GB/s = guest bytes / total time"
    );
    println!(
        "| streams | plaintext GB/s (min / median / max) | encrypted GB/s (min / median / max) | encrypted / plaintext (medians) |"
    );
    println!("|---|---|---|---|");
    for streams in [1u16, 2] {
        let mut plain = Vec::new();
        let mut enc = Vec::new();
        // Interleave so both see the same machine conditions.
        for run in 0..runs {
            plain.push(rt.block_on(once(pages, false, streams, run * 2)));
            enc.push(rt.block_on(once(pages, true, streams, run * 2 + 1)));
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2], v[v.len() - 1])
        };
        let (p0, p1, p2) = stats(&mut plain);
        let (e0, e1, e2) = stats(&mut enc);
        println!(
            "| {streams} | {p0:.2} / {p1:.2} / {p2:.2} | {e0:.2} / {e1:.2} / {e2:.2} | {:.2} |",
            e1 / p1
        );
    }

    println!();
    println!(
        "running {dirty_mib} MiB guest, encrypted, 2 streams, uniform random writes, 20 ms downtime target, {runs} run(s) each"
    );
    println!(
        "| dirty rate set | distinct pages dirtied, pass 0 (median) | downtime ms (min / median / max) | iterations incl. full pass (median) | max throttle % | GB/s (median) |"
    );
    println!("|---|---|---|---|---|---|");
    for mb_per_s in [100.0f64, 268.4] {
        let (mut down, mut iters, mut throttle, mut speed, mut observed) =
            (vec![], vec![], 0u8, vec![], vec![]);
        for run in 0..runs {
            let config = SyntheticConfig {
                pages: dirty_mib * 256,
                zero_fraction: 0.0,
                seed: u64::from(run) + 100,
                dirty_rate: mb_per_s * 1e6 / 4096.0,
                writers: 1,
                ..SyntheticConfig::default()
            };
            let r = rt.block_on(migrate(
                config,
                true,
                2,
                100 + run,
                Some(Duration::from_millis(20)),
            ));
            down.push(
                r.engine
                    .downtime
                    .map(|d| d.total.as_secs_f64() * 1e3)
                    .unwrap_or(f64::NAN),
            );
            iters.push(r.engine.iterations.len() as f64);
            // What the writers achieved: distinct pages dirtied per second of pass 0.
            observed.push(r.engine.iterations[0].dirty_rate().unwrap_or(f64::NAN) * 4096.0 / 1e6);
            throttle = throttle.max(r.engine.max_throttle_percent);
            speed.push((dirty_mib << 20) as f64 / r.total_time.as_secs_f64() / 1e9);
        }
        for v in [&mut down, &mut iters, &mut speed, &mut observed] {
            v.sort_by(f64::total_cmp);
        }
        let m = |v: &Vec<f64>| v[v.len() / 2];
        println!(
            "| {mb_per_s:.0} MB/s | {:.0} MB/s | {:.1} / {:.1} / {:.1} | {:.0} | {throttle} | {:.2} |",
            m(&observed),
            down[0],
            m(&down),
            down[down.len() - 1],
            m(&iters),
            m(&speed)
        );
    }
}
