//! End-to-end migration throughput on loopback, encrypted against plaintext in the same
//! run: an idle synthetic guest of random (non-zero) pages moves through the real driver
//! (`vmotion::Sender` → TCP → `vmotion::Receiver`) into a blank guest, sender and receiver
//! in this process, sharing the machine's two cores.
//!
//! Run: `cargo bench -p vmotion-benches --bench migration`
//! (`VMOTION_BENCH_MIB=N` sets the guest size, default 512; `VMOTION_BENCH_RUNS=N` the runs
//! per configuration, default 3).

use std::time::Instant;

use tokio::net::TcpListener;
use vmotion::{KeySource, Receiver, ReceiverKeys, Sender};
use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
use vmotion_proto::{
    EncryptionPolicy, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, VmPolicy,
};

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([7; 32]),
        nonce: MigrationNonce([1; 8]),
    }
}

async fn once(pages: u64, encrypted: bool, streams: u16, run: u32) -> f64 {
    let id = MigrationId([run as u8; 16]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keys = if encrypted {
        ReceiverKeys::Direct {
            migration_id: id,
            material: key(),
        }
    } else {
        ReceiverKeys::None
    };
    let rx = tokio::spawn(async move {
        Receiver::new(keys)
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
            .map(|_| ())
    });
    let mut guest = SyntheticGuest::start(SyntheticConfig {
        pages,
        zero_fraction: 0.0,
        seed: u64::from(run),
        ..SyntheticConfig::default()
    });
    let (policy, key_source) = if encrypted {
        (
            EncryptionPolicy::Required,
            KeySource::Direct {
                migration_id: id,
                material: key(),
            },
        )
    } else {
        (
            EncryptionPolicy::Disabled,
            KeySource::None { migration_id: id },
        )
    };
    let started = Instant::now();
    let report = Sender::builder(&format!("bench-{run}"))
        .policy(VmPolicy {
            encryption: policy,
            vm_encrypted: false,
        })
        .key(key_source)
        .streams(streams)
        .build()
        .migrate(addr, &mut guest)
        .await
        .expect("migration");
    let secs = started.elapsed().as_secs_f64();
    rx.await.unwrap().expect("received");
    assert!(report.bytes_sent >= pages * 4096);
    (pages * 4096) as f64 / secs / 1e9
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
    let mib = env("VMOTION_BENCH_MIB", if smoke { 16 } else { 512 });
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
}
