//! Benchmarks live in `benches/benches/`; results and the commands that reproduce them are
//! in `docs/performance.md`. This library holds what several of them share.

pub mod procs;

use vmotion::{KeySource, ReceiverKeys};
use vmotion_proto::{
    EncryptionPolicy, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, VmPolicy,
};

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([7; 32]),
        nonce: MigrationNonce([1; 8]),
    }
}

/// The receiver's keys, the sender's policy and its key source for migration `id`: a
/// fixed key handed to both sides (no key service in the measurement) when `encrypted`,
/// else plaintext by policy.
pub fn direct_keys(id: MigrationId, encrypted: bool) -> (ReceiverKeys, VmPolicy, KeySource) {
    let policy = |encryption| VmPolicy {
        encryption,
        vm_encrypted: false,
    };
    if encrypted {
        (
            ReceiverKeys::Direct {
                migration_id: id,
                material: key(),
            },
            policy(EncryptionPolicy::Required),
            KeySource::Direct {
                migration_id: id,
                material: key(),
            },
        )
    } else {
        (
            ReceiverKeys::None,
            policy(EncryptionPolicy::Disabled),
            KeySource::None { migration_id: id },
        )
    }
}

/// How a harness-less benchmark was started: `cargo bench` passes `--bench` (a full run);
/// `cargo test --benches` does not (a short smoke pass, so the harness stays exercised).
/// Returns whether this is a smoke pass and the seconds per level (`VMOTION_BENCH_SECS`,
/// default 1 for smoke, 5 otherwise).
pub fn run_mode() -> (bool, u64) {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs = std::env::var("VMOTION_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 1 } else { 5 });
    (smoke, secs)
}

/// CLOCK_MONOTONIC now, in seconds: the time base of `perf record -k CLOCK_MONOTONIC`, so
/// a bench can print the window of what it timed for `perf report --time START,END`.
pub fn monotonic() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}
