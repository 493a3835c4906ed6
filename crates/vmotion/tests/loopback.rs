//! Migrations over real TCP on loopback, with the receiver in the same process: a running
//! synthetic guest (writer threads dirtying memory during pre-copy) moves into a blank
//! guest; after the commit the destination's memory is byte for byte the source's memory
//! at pause time.

use std::time::Duration;

use tokio::net::TcpListener;
use vmotion::{KeySource, MigrateError, ReceiveOutcome, Receiver, ReceiverKeys, Sender};
use vmotion_engine::ConvergencePolicy;
use vmotion_mover::synthetic::{Pattern, SyntheticConfig, SyntheticGuest};
use vmotion_proto::{
    EncryptionPolicy, EpochLimits, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, Mode,
    PlaintextReason, Refusal, VmPolicy,
};

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([7; 32]),
        nonce: MigrationNonce([9; 8]),
    }
}

const ID: MigrationId = MigrationId([0x5a; 16]);

fn guest(pages: u64, rate: f64) -> SyntheticGuest {
    SyntheticGuest::start(SyntheticConfig {
        pages,
        dirty_rate: rate,
        pattern: Pattern::Uniform,
        writers: 2,
        ..SyntheticConfig::default()
    })
}

struct Run {
    sender: Result<vmotion::MigrationReport, MigrateError>,
    receiver: Result<(vmotion::ReceiveReport, SyntheticGuest), MigrateError>,
    source: SyntheticGuest,
}

async fn run(sender: Sender, receiver: Receiver, mut source: SyntheticGuest) -> Run {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        receiver
            .receive(&listener, |hello| {
                Ok(SyntheticGuest::blank(
                    hello.guest_pages,
                    u64::from(hello.page_size),
                ))
            })
            .await
    });
    let sender = sender.migrate(addr, &mut source).await;
    let receiver = rx.await.unwrap();
    Run {
        sender,
        receiver,
        source,
    }
}

fn assert_same_memory(run: &Run) {
    let (report, dst) = run.receiver.as_ref().expect("received");
    assert_eq!(report.outcome, ReceiveOutcome::Committed);
    let (a, b) = (run.source.snapshot(), dst.snapshot());
    let differing = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differing, 0, "{differing} pages differ");
}

fn policy() -> ConvergencePolicy {
    ConvergencePolicy {
        max_downtime: Duration::from_millis(100),
        ..ConvergencePolicy::default()
    }
}

async fn encrypted(streams: u16) {
    let sender = Sender::builder(&format!("vm-enc-{streams}"))
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Direct {
            migration_id: ID,
            material: key(),
        })
        .streams(streams)
        .convergence(policy())
        .build()
        .unwrap();
    let receiver = Receiver::new(ReceiverKeys::Direct {
        migration_id: ID,
        material: key(),
    });
    let run = run(sender, receiver, guest(8192, 50_000.0)).await;
    let report = run.sender.as_ref().expect("committed");
    assert!(matches!(report.mode, Mode::Encrypted(_)));
    // The writers dirtied pages while iteration 0 ran, so the dirty log was exercised.
    assert!(
        report.engine.iterations[0].dirty_after > 0,
        "{:?}",
        report.engine.iterations
    );
    assert!(report.engine.downtime.is_some());
    assert!(run.source.writes() > 0);
    assert_same_memory(&run);
    let (rr, dst) = run.receiver.as_ref().unwrap();
    assert!(matches!(rr.mode, Mode::Encrypted(_)));
    assert!(dst.loaded_device_state().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_one_stream() {
    encrypted(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_four_streams() {
    encrypted(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_by_policy() {
    let sender = Sender::builder("vm-plain")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Disabled,
            vm_encrypted: false,
        })
        .key(KeySource::None { migration_id: ID })
        .streams(4)
        .convergence(policy())
        .build()
        .unwrap();
    let run = run(
        sender,
        Receiver::new(ReceiverKeys::None),
        guest(4096, 10_000.0),
    )
    .await;
    let report = run.sender.as_ref().expect("committed");
    assert_eq!(
        report.mode,
        Mode::Plaintext(PlaintextReason::PolicyDisabled)
    );
    assert_same_memory(&run);
}

/// Small key-update budgets: the stream crosses many epochs and still arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_key_epochs() {
    let sender = Sender::builder("vm-epochs")
        .key(KeySource::Direct {
            migration_id: ID,
            material: key(),
        })
        .epoch_limits(EpochLimits::new(4, 1 << 20).unwrap())
        .convergence(policy())
        .build()
        .unwrap();
    let receiver = Receiver::new(ReceiverKeys::Direct {
        migration_id: ID,
        material: key(),
    });
    let run = run(sender, receiver, guest(4096, 5_000.0)).await;
    let report = run.sender.as_ref().expect("committed");
    assert!(report.epochs > 10, "{} epochs", report.epochs);
    assert_same_memory(&run);
}

/// A required policy against a receiver that cannot encrypt is refused before a page;
/// the source VM is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_policy_without_an_encrypting_receiver_is_refused() {
    let sender = Sender::builder("vm-req")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Direct {
            migration_id: ID,
            material: key(),
        })
        .build()
        .unwrap();
    // The orchestrator vouched the destination encrypts, but it has no key: a
    // registry/wire contradiction, refused as a downgrade.
    let run = run(
        sender,
        Receiver::new(ReceiverKeys::None),
        guest(1024, 1_000.0),
    )
    .await;
    assert!(
        matches!(
            run.sender,
            Err(MigrateError::Refused(Refusal::DowngradeDetected))
        ),
        "{:?}",
        run.sender.as_ref().err()
    );
    let w = run.source.writes();
    std::thread::sleep(Duration::from_millis(30));
    assert!(run.source.writes() > w, "the source VM keeps running");
}

/// A sink too small for the guest is refused by the receiver's pre-flight; the sender is
/// told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_a_sink_without_room() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::None)
            .receive(&listener, |_| Ok(SyntheticGuest::blank(16, 4096)))
            .await
            .map(|_| ())
    });
    let mut source = guest(1024, 0.0);
    let r = Sender::builder("vm-big")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Disabled,
            vm_encrypted: false,
        })
        .key(KeySource::None { migration_id: ID })
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    // A refusal before any page (vmotion-send: exit 3), with the receiver's reason.
    match r {
        Err(MigrateError::PreflightRefused(message)) => {
            assert!(message.contains("1024"), "{message}")
        }
        other => panic!("{:?}", other.err()),
    }
    assert!(rx.await.unwrap().is_err());
}

/// Pre-flight: a second migration of a VM already in flight is refused at once, before a
/// connection is made; the first one completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_migration_of_the_same_vm_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::None)
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
            .map(|_| ())
    });
    let in_flight = vmotion::InFlight::new();
    let plain = || {
        Sender::builder("vm-twice")
            .policy(VmPolicy {
                encryption: EncryptionPolicy::Disabled,
                vm_encrypted: false,
            })
            .key(KeySource::None { migration_id: ID })
            // One in-flight set for both: the senders of one program.
            .in_flight(in_flight.clone())
            .build()
            .unwrap()
    };
    let mut first_guest = guest(4096, 1_000.0);
    let mut second_guest = guest(64, 0.0);
    let first = plain().migrate(addr, &mut first_guest);
    let second = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        plain().migrate(addr, &mut second_guest).await
    };
    let (first, second) = tokio::join!(first, second);
    assert!(
        matches!(second, Err(MigrateError::AlreadyInFlight(ref vm)) if vm == "vm-twice"),
        "{:?}",
        second.err()
    );
    assert!(first.is_ok(), "{:?}", first.err());
    rx.await.unwrap().unwrap();
}

/// A memory file has no dirty log: it migrates cold (paused first, one pass) into a memory
/// file at the destination, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_file_migrates_cold() {
    use vmotion_mover::GuestMemory;
    use vmotion_mover::memfile::MemoryFile;
    let dir = tempfile::tempdir().unwrap();
    let mut src = MemoryFile::create(&dir.path().join("src.mem"), 2048, 4096).unwrap();
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    for p in (0..2048).step_by(3) {
        src.write_pages(p, &page).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst_path = dir.path().join("dst.mem");
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::Direct {
            migration_id: ID,
            material: key(),
        })
        .receive(&listener, move |h| {
            MemoryFile::create(&dst_path, h.guest_pages, u64::from(h.page_size))
                .map_err(|e| e.to_string())
        })
        .await
    });
    let report = Sender::builder("vm-file")
        .key(KeySource::Direct {
            migration_id: ID,
            material: key(),
        })
        .streams(2)
        .build()
        .unwrap()
        .migrate(addr, &mut src)
        .await
        .unwrap();
    assert!(
        report.engine.iterations.is_empty(),
        "no pre-copy iteration without a dirty log"
    );
    assert!(report.engine.final_pass.is_some());
    rx.await.unwrap().unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("src.mem")).unwrap(),
        std::fs::read(dir.path().join("dst.mem")).unwrap()
    );
}

/// The bandwidth cap holds: 8 MiB of random pages at 20 MB/s cannot take less than about
/// 0.4 s (a lower bound only — a slow machine makes it longer, never shorter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_holds() {
    let source = SyntheticGuest::start(SyntheticConfig {
        pages: 2048,
        zero_fraction: 0.0,
        ..SyntheticConfig::default()
    });
    let sender = Sender::builder("vm-capped")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Disabled,
            vm_encrypted: false,
        })
        .key(KeySource::None { migration_id: ID })
        .streams(2)
        .max_bandwidth(Some(20_000_000))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let run = run(sender, Receiver::new(ReceiverKeys::None), source).await;
    let elapsed = started.elapsed();
    let report = run.sender.as_ref().expect("committed");
    assert!(report.bytes_sent >= 2048 * 4096);
    let floor = Duration::from_secs_f64(report.bytes_sent as f64 / 20_000_000.0 * 0.95);
    assert!(
        elapsed >= floor,
        "{elapsed:?} for {} bytes at 20 MB/s",
        report.bytes_sent
    );
    assert_same_memory(&run);
}

/// A destination whose memory fails mid-pre-copy aborts at once; the sender learns why
/// and its VM never stopped running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_aborts_and_the_source_keeps_running() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use vmotion_mover::{GuestMemory, MoverError, VmControl};

    struct Failing {
        inner: vmotion_mover::synthetic::SyntheticMemory,
        left: AtomicI64,
    }
    impl GuestMemory for Failing {
        fn page_size(&self) -> u64 {
            self.inner.page_size()
        }
        fn page_count(&self) -> u64 {
            self.inner.page_count()
        }
        fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError> {
            self.inner.read_pages(first, out)
        }
        fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError> {
            if self.left.fetch_sub(1, Ordering::Relaxed) <= 0 {
                return Err(MoverError::Io(std::io::Error::other("disk full")));
            }
            self.inner.write_pages(first, data)
        }
    }
    struct FailingSink(SyntheticGuest, Arc<Failing>);
    impl vmotion::Sink for FailingSink {
        fn memory(&self) -> Arc<dyn GuestMemory> {
            self.1.clone()
        }
        fn control(&mut self) -> &mut dyn VmControl {
            &mut self.0
        }

        fn persist(&mut self) -> Result<(), MoverError> {
            Ok(())
        }

        fn discard(&mut self) -> Result<(), MoverError> {
            Ok(())
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::None)
            .receive(&listener, |h| {
                let g = SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size));
                let m = Arc::new(Failing {
                    inner: g.memory_handle(),
                    left: AtomicI64::new(1000),
                });
                Ok(FailingSink(g, m))
            })
            .await
            .map(|_| ())
    });
    let mut source = guest(8192, 5_000.0);
    let r = Sender::builder("vm-doomed")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Disabled,
            vm_encrypted: false,
        })
        .key(KeySource::None { migration_id: ID })
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    match &r {
        Err(MigrateError::PeerAborted { message, .. }) => {
            assert!(message.contains("disk full"), "{message}")
        }
        other => panic!("{:?}", other.as_ref().err()),
    }
    assert!(rx.await.unwrap().is_err());
    let w = source.writes();
    std::thread::sleep(Duration::from_millis(30));
    assert!(source.writes() > w, "the source VM is running");
}

/// One listener, several migrations at once: `serve` routes each data connection to its
/// migration by the id in its bind; a stranger that connects with garbage is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_several_migrations_at_once() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    type Arrived = Vec<(String, Vec<u8>, ReceiveOutcome)>;
    let results: Arc<Mutex<Arrived>> = Arc::default();
    let seen = results.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver = Arc::new(Receiver::new(ReceiverKeys::Direct {
        migration_id: ID,
        material: key(),
    }));
    let server = tokio::spawn(receiver.serve(
        listener,
        |h| Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size))),
        move |vmotion::Finished { result: r, .. }| {
            let Ok(vmotion::Incoming::Vm(report, sink)) = r else {
                panic!("not a received guest: {r:?}");
            };
            seen.lock()
                .unwrap()
                .push((report.vm_name.clone(), sink.snapshot(), report.outcome));
        },
        async {
            let _ = stopped.await;
        },
    ));
    // A stranger first.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(&[0xde; 64]).await.unwrap();

    let migrate = |name: &'static str, id: MigrationId| async move {
        let mut g = guest(4096, 10_000.0);
        let key_source = if id == ID {
            KeySource::Direct {
                migration_id: id,
                material: key(),
            }
        } else {
            KeySource::None { migration_id: id }
        };
        let policy = if id == ID {
            EncryptionPolicy::Required
        } else {
            EncryptionPolicy::Disabled
        };
        let report = Sender::builder(name)
            .policy(VmPolicy {
                encryption: policy,
                vm_encrypted: false,
            })
            .key(key_source)
            .streams(2)
            .build()
            .unwrap()
            .migrate(addr, &mut g)
            .await
            .expect("committed");
        (name, g.snapshot(), report)
    };
    let (a, b) = tokio::join!(
        migrate("vm-a", ID),
        migrate("vm-b", MigrationId([0x77; 16]))
    );
    assert!(matches!(a.2.mode, Mode::Encrypted(_)));
    assert_eq!(b.2.mode, Mode::Plaintext(PlaintextReason::PolicyDisabled));
    // Both arrived, each into its own sink, byte for byte.
    for _ in 0..100 {
        if results.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = results.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    for (name, memory, _) in [&a, &b].map(|(n, m, r)| (*n, m.clone(), r.clone())) {
        let (_, sink_memory, outcome) = got.iter().find(|(vm, _, _)| vm == name).unwrap();
        assert_eq!(*outcome, ReceiveOutcome::Committed);
        assert!(*sink_memory == memory, "{name} differs");
    }
    let _ = stop.send(());
    server.await.unwrap();
}

/// The sink is made only after the handshake authenticated the sender: a `Hello` from
/// someone without the key (here: another key for the same migration id) never gets to
/// create or overwrite one (a memory file sink truncates its file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sink_is_made_for_a_sender_without_the_key() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let made = std::sync::Arc::new(AtomicBool::new(false));
    let seen = made.clone();
    let rx = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::Direct {
            migration_id: ID,
            material: key(),
        })
        .require_encryption(true)
        .receive(&listener, |h| {
            seen.store(true, Ordering::SeqCst);
            Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
        })
        .await
        .map(|_| ())
    });
    let mut source = guest(256, 0.0);
    let forged = KeyMaterial {
        key: MigrationKey::from_bytes([8; 32]),
        nonce: MigrationNonce([9; 8]),
    };
    let r = Sender::builder("vm-x")
        .key(KeySource::Direct {
            migration_id: ID,
            material: forged,
        })
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    assert!(r.is_err(), "the key confirmation fails");
    assert!(rx.await.unwrap().is_err());
    assert!(!made.load(Ordering::SeqCst), "no sink was made");
}
