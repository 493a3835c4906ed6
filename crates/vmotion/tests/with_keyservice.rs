//! Migrations through a key authority: the sender creates the migration (key, nonce, the
//! registry's word on the destination), the receiver fetches the key as the destination,
//! and the outcome is recorded before Commit.
//!
//! Most tests use the in-memory authority (`MemoryAuthority`: the key service's rules in
//! this process). Two run a real `vmotion-keyservice` process over mutual TLS, so the real
//! path stays covered: an encrypted migration, and the key service dying mid-migration.
//! Its binary must be built (`scripts/test.sh` builds every workspace binary before the
//! tests); it is looked up next to the test executable's folder.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use vmotion::{
    Authority, KeySource, MemoryAuthority, MigrateError, ReceiveOutcome, Receiver, ReceiverKeys,
    Record, Sender,
};
use vmotion_engine::ConvergencePolicy;
use vmotion_keyservice_client::api::{Outcome, RegisterRequest};
use vmotion_keyservice_client::{ClientIdentity, KeyServiceClient};
use vmotion_mover::synthetic::{Pattern, SyntheticConfig, SyntheticGuest};
use vmotion_proto::{EncryptionPolicy, Mode, PlaintextReason, Refusal, VmPolicy};

fn keyservice_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap(); // target/<profile>/deps
    let bin = dir.parent().unwrap().join("vmotion-keyservice");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p vmotion-keyservice` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

struct KeyService {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for KeyService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KeyService {
    fn start() -> Self {
        let bin = keyservice_binary();
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(&bin)
            .args(["pki", "init", "--out"])
            .arg(dir.path())
            .args(["--hosts", "src,dst"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let config = dir.path().join("keyservice.toml");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:7443", "127.0.0.1:0");
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned();
        Self {
            child,
            url: format!("https://{addr}"),
            dir,
        }
    }

    fn client(&self, host: &str) -> Arc<KeyServiceClient> {
        let p = |f: &str| -> PathBuf { Path::new(self.dir.path()).join(f) };
        Arc::new(
            KeyServiceClient::new(
                &self.url,
                &ClientIdentity {
                    ca: p("ca.pem"),
                    cert: p(&format!("hosts/{host}.pem")),
                    key: p(&format!("hosts/{host}-key.pem")),
                },
            )
            .unwrap(),
        )
    }
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::start(SyntheticConfig {
        pages: 8192,
        dirty_rate: 50_000.0,
        pattern: Pattern::Uniform,
        writers: 2,
        ..SyntheticConfig::default()
    })
}

/// The receiver reaches the authority as its arbiter (to claim the VM) whatever its
/// keys: a destination that cannot encrypt still claims before it resumes. `src` and
/// `dst` are the two hosts' clients of one authority.
async fn migrate(
    src: Arc<dyn Authority>,
    dst: Arc<dyn Authority>,
    policy: EncryptionPolicy,
    receiver_keys: ReceiverKeys,
    streams: u16,
) -> (
    Result<vmotion::MigrationReport, MigrateError>,
    Result<(vmotion::ReceiveReport, SyntheticGuest), MigrateError>,
    SyntheticGuest,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new(receiver_keys).arbiter(dst);
    let rx = tokio::spawn(async move {
        receiver
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
    });
    let mut source = guest();
    let sent = Sender::builder(&format!("vm-ks-{policy:?}-{streams}"))
        .policy(VmPolicy {
            encryption: policy,
            vm_encrypted: false,
        })
        .key(KeySource::Service {
            client: src,
            destination: "dst".into(),
        })
        .streams(streams)
        .convergence(ConvergencePolicy {
            max_downtime: Duration::from_millis(100),
            ..ConvergencePolicy::default()
        })
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    (sent, rx.await.unwrap(), source)
}

fn same_memory(a: &SyntheticGuest, b: &SyntheticGuest) -> bool {
    a.snapshot() == b.snapshot()
}

async fn register(ks: &KeyService, can_encrypt: bool) {
    ks.client("dst")
        .register(&RegisterRequest {
            can_encrypt,
            protocol_versions: vec![1],
            ciphers: vec!["aes-256-gcm".into()],
        })
        .await
        .unwrap();
}

/// An encrypted migration from `src` to `dst` (which the authority knows can encrypt):
/// committed, then claimed at the authority, and the key handed out once.
async fn encrypted_via(
    src: Arc<dyn Authority>,
    dst: Arc<dyn Authority>,
    streams: u16,
) -> vmotion::MigrationReport {
    let (sent, received, source) = migrate(
        src,
        dst.clone(),
        EncryptionPolicy::Required,
        ReceiverKeys::Service(dst.clone()),
        streams,
    )
    .await;
    let report = sent.expect("committed");
    assert!(matches!(report.mode, Mode::Encrypted(_)));
    let (rr, dst_guest) = received.expect("received");
    assert!(matches!(rr.mode, Mode::Encrypted(_)));
    assert_eq!(rr.outcome, ReceiveOutcome::Committed);
    assert!(
        same_memory(&source, &dst_guest),
        "destination memory differs from the source at pause"
    );
    assert_eq!(
        dst.read(report.migration_id).await,
        Ok(Record::Claimed),
        "claimed at the authority"
    );
    assert!(
        dst.fetch_key(report.migration_id).await.is_err(),
        "the key was handed out once"
    );
    report
}

async fn encrypted_via_key_service(streams: u16) {
    let ks = KeyService::start();
    register(&ks, true).await;
    let report = encrypted_via(ks.client("src"), ks.client("dst"), streams).await;
    // The outcome is on record, for either host to read: committed, then claimed by the
    // destination before it resumed.
    let o = ks.client("dst").outcome(report.migration_id).await.unwrap();
    assert_eq!(o.outcome, Some(Outcome::Claimed));
    // The key was handed out once: a second fetch is refused.
    assert!(
        ks.client("dst")
            .fetch_key(report.migration_id)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_one_stream_with_key_service() {
    encrypted_via_key_service(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_four_streams_with_an_authority() {
    let authority = MemoryAuthority::new();
    authority.register("dst", true);
    let report = encrypted_via(authority.client("src"), authority.client("dst"), 4).await;
    assert_eq!(authority.record(report.migration_id), Some(Record::Claimed));
}

/// Opportunistic policy, destination registered as unable to encrypt: plaintext, with the
/// reason in the report, over 1 and 4 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_downgrade_with_an_authority() {
    let authority = MemoryAuthority::new();
    authority.register("dst", false);
    for streams in [1, 4] {
        let (sent, received, source) = migrate(
            authority.client("src"),
            authority.client("dst"),
            EncryptionPolicy::Opportunistic,
            ReceiverKeys::None,
            streams,
        )
        .await;
        let report = sent.expect("committed");
        assert_eq!(
            report.mode,
            Mode::Plaintext(PlaintextReason::DestinationCannotEncrypt)
        );
        let (_, dst) = received.expect("received");
        assert!(same_memory(&source, &dst));
    }
}

/// Required policy, destination not registered: refused before connecting; the
/// authority records the migration as aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_policy_refused_for_an_unregistered_destination() {
    let authority = MemoryAuthority::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut source = guest();
    let r = Sender::builder("vm-ks-refused")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Service {
            client: authority.client("src"),
            destination: "dst".into(),
        })
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    assert!(
        matches!(
            r,
            Err(MigrateError::Refused(Refusal::PolicyRequiresEncryption))
        ),
        "{:?}",
        r.err()
    );
    let created = authority.migrations();
    assert_eq!(created.len(), 1);
    assert_eq!(authority.record(created[0]), Some(Record::Aborted));
    // Nothing connected to the destination.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), listener.accept())
            .await
            .is_err()
    );
}

/// The key service dies during pre-copy: before it pauses the VM the source checks that
/// the arbiter answers, finds it does not, and aborts with the VM still running — it never
/// stops a VM whose switchover it could not record. (Before the claim step the source
/// paused anyway and was left with the VM paused and the outcome unknown.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_key_service_is_found_before_the_pause() {
    let ks = KeyService::start();
    register(&ks, true).await;
    let pid = ks.child.id().to_string();
    unreachable_before_the_pause(ks.client("src"), ks.client("dst"), move || {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    })
    .await;
}

/// The same with the in-memory authority going silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_authority_is_found_before_the_pause() {
    let authority = MemoryAuthority::new();
    authority.register("dst", true);
    let (src, dst) = (authority.client("src"), authority.client("dst"));
    unreachable_before_the_pause(src, dst, move || authority.set_unreachable(true)).await;
}

/// The authority stops answering (`go_silent`) 0.5 s into pre-copy of an encrypted
/// migration from `src` to `dst`.
async fn unreachable_before_the_pause(
    src: Arc<dyn Authority>,
    dst: Arc<dyn Authority>,
    go_silent: impl FnOnce() + Send + 'static,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new(ReceiverKeys::Service(dst)).timeout(Duration::from_secs(2));
    let rx = tokio::spawn(async move {
        receiver
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
    });
    // 32 MiB at 20 MB/s: the switchover comes after about 1.7 s; the service dies at 0.5 s.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        go_silent();
    });
    let mut source = SyntheticGuest::start(SyntheticConfig {
        pages: 8192,
        zero_fraction: 0.0,
        dirty_rate: 1000.0,
        ..SyntheticConfig::default()
    });
    let sent = Sender::builder("vm-unknown")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Service {
            client: src,
            destination: "dst".into(),
        })
        .max_bandwidth(Some(20_000_000))
        .switchover_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    assert!(
        matches!(sent, Err(MigrateError::ArbiterUnavailable(_))),
        "{:?}",
        sent.err()
    );
    // The source runs: its writers keep writing.
    let w = source.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(source.writes() > w, "the source VM keeps running");
    // The destination was told and kept nothing.
    let received = rx.await.unwrap();
    assert!(
        matches!(received, Err(MigrateError::PeerAborted { ref message, .. }) if message.contains("arbiter")),
        "{:?}",
        received.err()
    );
}
