//! A key authority over its admission limits answers `busy`: the sender waits its turn
//! (progress says so) and then migrates, or gives up at its queue timeout with nothing
//! created or sent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use vmotion::{
    Arbiter, ArbiterError, AuthorityError, BoxFuture, CreateOptions, FetchedKey, IssuedKey,
    KeyAuthority, KeySource, MemoryAuthority, MemoryClient, MigrateError, Receiver, ReceiverKeys,
    Record, Sender, Stage, Transition,
};
use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
use vmotion_proto::{EncryptionPolicy, MigrationId, Mode, VmPolicy};

/// The source's client of a memory authority whose creates answer `busy` (asking for
/// 100 ms) while `busy` is above zero.
struct Admitting {
    inner: Arc<MemoryClient>,
    busy: AtomicU32,
}

impl KeyAuthority for Admitting {
    fn create_migration_with<'a>(
        &'a self,
        vm: &'a str,
        destination: &'a str,
        options: CreateOptions,
    ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>> {
        let was = self
            .busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if was.is_ok() {
            return Box::pin(async {
                Err(AuthorityError::Busy {
                    message: "1 migration in flight to dst, its limit".into(),
                    retry_after: Some(Duration::from_millis(100)),
                })
            });
        }
        self.inner.create_migration_with(vm, destination, options)
    }

    fn fetch_key(&self, id: MigrationId) -> BoxFuture<'_, Result<FetchedKey, AuthorityError>> {
        self.inner.fetch_key(id)
    }
}

impl Arbiter for Admitting {
    fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        self.inner.read(id)
    }

    fn ask(&self, id: MigrationId, t: Transition) -> BoxFuture<'_, Result<Record, ArbiterError>> {
        self.inner.ask(id, t)
    }
}

fn required() -> VmPolicy {
    VmPolicy {
        encryption: EncryptionPolicy::Required,
        vm_encrypted: false,
    }
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::start(SyntheticConfig {
        pages: 1024,
        dirty_rate: 1000.0,
        ..SyntheticConfig::default()
    })
}

/// Busy for the first three creates: the sender reports `Queued` (and nothing else)
/// while it waits, then one migration is created and runs to its claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_authority_queues_the_sender_until_a_slot_frees() {
    let authority = MemoryAuthority::new();
    authority.register("dst", true);
    let src = Arc::new(Admitting {
        inner: authority.client("src"),
        busy: AtomicU32::new(3),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = authority.client("dst");
    let receiver = Receiver::new(ReceiverKeys::Service(dst.clone())).arbiter(dst);
    let rx = tokio::spawn(async move {
        receiver
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
    });
    let stages = Arc::new(Mutex::new(Vec::new()));
    let seen = stages.clone();
    let mut source = guest();
    let report = Sender::builder("vm-queued")
        .policy(required())
        .key(KeySource::Service {
            client: src.clone(),
            destination: "dst".into(),
        })
        .queue_timeout(Duration::from_secs(30))
        .on_progress(move |p| seen.lock().unwrap().push((p.stage, p.bytes_sent)))
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await
        .expect("migrated once admitted");
    assert!(matches!(report.mode, Mode::Encrypted(_)));
    rx.await.unwrap().expect("received");
    assert_eq!(src.busy.load(Ordering::SeqCst), 0, "asked until admitted");
    assert_eq!(
        authority.migrations(),
        [report.migration_id],
        "created once"
    );
    let stages = stages.lock().unwrap();
    let queued = stages
        .iter()
        .take_while(|(s, _)| *s == Stage::Queued)
        .count();
    assert!(queued >= 3, "{stages:?}");
    assert!(
        stages[..queued].iter().all(|(_, sent)| *sent == 0),
        "nothing sent while queued"
    );
    assert!(
        stages[queued..].iter().all(|(s, _)| *s != Stage::Queued),
        "{stages:?}"
    );
    assert_eq!(stages.last().map(|(s, _)| *s), Some(Stage::Done));
}

/// Busy for longer than the queue timeout: the sender gives up with `QueueTimeout`, a
/// refusal; nothing was created and the receiver never heard of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_timeout_nothing_is_created_or_sent() {
    let authority = MemoryAuthority::new();
    authority.register("dst", true);
    let src = Arc::new(Admitting {
        inner: authority.client("src"),
        busy: AtomicU32::new(u32::MAX),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut source = guest();
    let r = Sender::builder("vm-never-admitted")
        .policy(required())
        .key(KeySource::Service {
            client: src,
            destination: "dst".into(),
        })
        .queue_timeout(Duration::from_millis(350))
        .build()
        .unwrap()
        .migrate(listener.local_addr().unwrap(), &mut source)
        .await;
    let e = r.expect_err("no slot");
    assert!(matches!(e, MigrateError::QueueTimeout { .. }), "{e}");
    assert!(e.is_refusal());
    assert!(e.to_string().contains("its limit"), "{e}");
    assert!(authority.migrations().is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), listener.accept())
            .await
            .is_err(),
        "nothing connected to the destination"
    );
}
