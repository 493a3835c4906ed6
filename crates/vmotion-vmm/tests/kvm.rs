//! The micro-VM on real KVM: dirty tracking proven page for page, and live migrations
//! through vmotion (encrypted, loopback TCP) of a running guest. Skips, saying why, where
//! /dev/kvm cannot be opened.

use std::time::Duration;

use vmotion::{KeySource, Receiver, ReceiverKeys, Sender, Sink};
use vmotion_mover::{DirtyLog, GuestMemory, VmControl};
use vmotion_proto::{
    EncryptionPolicy, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, Mode, VmPolicy,
};
use vmotion_vmm::{MicroVm, MicroVmConfig, Pattern};

fn kvm_or_skip() -> bool {
    match vmotion_vmm::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

const FIRST_DATA_PAGE: u64 = 16;

fn lcg(x: u32) -> u32 {
    x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223)
}

/// The pages the guest program writes for writes `from+1 ..= to` (its counter), as the
/// program computes them.
fn expected_pages(cfg: &MicroVmConfig, data_pages: u64, from: u32, to: u32) -> Vec<u64> {
    let mut state = cfg.seed;
    let mut pages = Vec::new();
    for n in 1..=to {
        let v = match cfg.pattern {
            Pattern::Sequential => {
                state = state.wrapping_add(1);
                state
            }
            _ => {
                state = lcg(state);
                state >> 8
            }
        };
        if n > from {
            pages.push(u64::from(v) % data_pages + FIRST_DATA_PAGE);
        }
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

fn dirty_pages_between_pauses(cfg: MicroVmConfig, data_pages: u64) {
    let mut vm = MicroVm::start(cfg).unwrap();
    assert!(
        vm.wait_beats(5, Duration::from_secs(10)),
        "{:?}",
        vm.failure()
    );
    vm.pause().unwrap();
    vm.start().unwrap(); // forget everything logged so far
    let from = vm.heartbeat();
    vm.resume().unwrap();
    let beats = vm.beats();
    assert!(vm.wait_beats(beats + 20, Duration::from_secs(10)));
    vm.pause().unwrap();
    let to = vm.heartbeat();
    let log = vm.fetch_and_clear().unwrap();
    let logged: Vec<u64> = (0..log.pages()).filter(|&p| log.is_set(p)).collect();
    let expected = expected_pages(&cfg, data_pages, from, to);
    assert!(to > from, "the guest ran between the pauses");
    assert_eq!(logged, expected, "writes {from}..{to}");
    // And nothing while paused.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.fetch_and_clear().unwrap().count(), 0);
    assert_eq!(vm.heartbeat(), to);
}

#[test]
fn the_dirty_log_holds_exactly_the_pages_the_guest_wrote() {
    if !kvm_or_skip() {
        return;
    }
    for pattern in [Pattern::Sequential, Pattern::Random] {
        let cfg = MicroVmConfig {
            memory_mib: 64,
            rate: 20_000.0,
            pattern,
            batch: 16,
            seed: 7,
            prefill: false,
        };
        dirty_pages_between_pauses(cfg, 64 * 256 - FIRST_DATA_PAGE);
    }
}

/// A destination micro-VM as the receiver's sink.
struct VmSink(MicroVm);

impl Sink for VmSink {
    fn memory(&self) -> std::sync::Arc<dyn GuestMemory> {
        std::sync::Arc::new(self.0.memory_handle())
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

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([0x42; 32]),
        nonce: MigrationNonce([9; 8]),
    }
}

/// Migrates a running micro-VM encrypted; checks the heartbeat continues exactly and the
/// guest's own checksum of the memory it woke up with equals the source's at the pause.
async fn migrate_running(
    cfg: MicroVmConfig,
    cap: Option<u64>,
    max_downtime: Duration,
) -> vmotion::MigrationReport {
    let mut src = MicroVm::start(cfg).unwrap();
    assert!(src.wait_beats(20, Duration::from_secs(10)));
    let id = MigrationId([0x33; 16]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::Direct {
            migration_id: id,
            material: key(),
        })
        .receive(&listener, |h| {
            let vm = MicroVm::incoming(h.guest_pages * u64::from(h.page_size))
                .map_err(|e| e.to_string())?;
            vm.checksum_on_resume();
            Ok(VmSink(vm))
        })
        .await
    });
    let report = Sender::builder("micro-vm")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Direct {
            migration_id: id,
            material: key(),
        })
        .streams(2)
        .max_bandwidth(cap)
        .convergence(vmotion_engine::ConvergencePolicy {
            max_downtime,
            ..Default::default()
        })
        .build()
        .unwrap()
        .migrate(addr, &mut src)
        .await
        .expect("migration");
    let (_, dst) = rx.await.unwrap().expect("received");
    let dst = dst.0;
    assert!(
        matches!(report.mode, Mode::Encrypted { .. }),
        "{:?}",
        report.mode
    );

    // The source stays paused: its counter no longer moves.
    assert!(src.is_paused());
    let stopped_at = src.heartbeat();
    let at_pause = src.host_checksum();
    let every_byte_at_pause = src.memory_digest();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        src.heartbeat(),
        stopped_at,
        "the source VM never runs again"
    );

    // The guest's first act at the destination: checksum what it woke up with.
    eprintln!(
        "total {:?} phases {:?} iterations {} throttle {} downtime {:?}",
        report.total_time,
        report.phases,
        report.engine.iterations.len(),
        report.engine.max_throttle_percent,
        report.engine.downtime.map(|d| d.total)
    );
    let sum = dst
        .wait_checksum(Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "no checksum from the destination guest: failure {:?}, beats {}, paused {}",
                dst.failure(),
                dst.beats(),
                dst.is_paused()
            )
        });
    assert_eq!(sum, at_pause, "the guest's own checksum of its memory");
    assert_eq!(
        dst.memory_digest_at_resume(),
        Some(every_byte_at_pause),
        "every byte of memory the guest resumed with is the source's at the pause"
    );
    assert!(
        dst.wait_beats(3, Duration::from_secs(10)),
        "{:?}",
        dst.failure()
    );
    assert_eq!(
        dst.first_heartbeat(),
        Some(stopped_at + cfg.batch),
        "the counter continues: the next batch after the source's last"
    );
    assert!(dst.heartbeat() > stopped_at + cfg.batch);
    drop(src);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_micro_vm_migrates_encrypted_and_continues() {
    if !kvm_or_skip() {
        return;
    }
    let report = migrate_running(
        MicroVmConfig {
            memory_mib: 256,
            rate: 50_000.0,
            pattern: Pattern::Random,
            batch: 64,
            seed: 3,
            prefill: true,
        },
        None,
        Duration::from_millis(300),
    )
    .await;
    // The guest wrote during the full pass, and those pages went again.
    let dirtied = report.engine.iterations[0].dirty_after;
    assert!(dirtied > 100, "{:?}", report.engine.iterations);
    assert!(report.engine.downtime.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaced_guest_is_throttled_until_it_converges() {
    if !kvm_or_skip() {
        return;
    }
    // The guest as fast as it goes over a 32 MiB hot set, the link capped at 50 MB/s and
    // 100 ms of downtime allowed: each pass leaves the hot set dirty again (32 MiB take
    // far more than 100 ms even at the link's short bursts above the cap) until the vCPU
    // is throttled.
    let report = migrate_running(
        MicroVmConfig {
            memory_mib: 256,
            rate: 0.0,
            pattern: Pattern::HotSet { pages: 8192 },
            batch: 64,
            seed: 5,
            prefill: false,
        },
        Some(50_000_000),
        Duration::from_millis(100),
    )
    .await;
    assert!(
        report.engine.max_throttle_percent > 0,
        "auto-converge throttled the vCPU: {:?}",
        report.engine.iterations
    );
}

/// A guest that stops exiting (here: its program overwritten with `jmp $`) is still
/// paused on request, and the VM is still torn down: the vCPU is kicked out of KVM_RUN.
#[test]
fn a_guest_that_never_exits_is_paused_and_dropped() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = MicroVm::start(MicroVmConfig {
        memory_mib: 16,
        rate: 0.0,
        pattern: Pattern::Sequential,
        batch: 16,
        seed: 1,
        prefill: false,
    })
    .unwrap();
    assert!(vm.wait_beats(3, Duration::from_secs(10)));
    // The loop's first instruction becomes `jmp $`: the guest spins there next time round.
    let mut page = vec![0u8; 4096];
    vm.memory_handle().read_pages(1, &mut page).unwrap();
    page[..2].copy_from_slice(&[0xeb, 0xfe]);
    vm.memory_handle().write_pages(1, &page).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let beats = vm.beats();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.beats(), beats, "the guest spins without exits");
    let started = std::time::Instant::now();
    vm.pause().expect("paused by a kick");
    assert!(started.elapsed() < Duration::from_secs(5));
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let started = std::time::Instant::now();
    drop(vm);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "dropped while spinning"
    );
}
