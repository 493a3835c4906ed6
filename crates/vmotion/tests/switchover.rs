//! The switchover's claim step over real sockets, with an in-memory arbiter the test can
//! break at a chosen step: the destination claims before it resumes, a destination that
//! never claims costs the source a pause and a revert (not the VM), and an arbiter that
//! stops answering leaves both copies paused — never one running twice.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use vmotion::{
    Arbiter, ArbiterError, ClaimEvidence, KeySource, MemoryArbiter, MigrateError, ReceiveOutcome,
    Receiver, ReceiverKeys, Record, Sender, Transition,
};
use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
use vmotion_proto::{
    EncryptionPolicy, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, VmPolicy,
};

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([5; 32]),
        nonce: MigrationNonce([6; 8]),
    }
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::start(SyntheticConfig {
        pages: 2048,
        dirty_rate: 2_000.0,
        writers: 1,
        ..SyntheticConfig::default()
    })
}

/// An arbiter whose `claim` requests never reach it: a destination that dies (or is cut
/// off from the arbiter) after `Commit`, before its claim is recorded.
struct ClaimsNeverArrive(Arc<MemoryArbiter>);

impl Arbiter for ClaimsNeverArrive {
    fn read(&self, id: MigrationId) -> vmotion::BoxFuture<'_, Result<Record, ArbiterError>> {
        self.0.read(id)
    }

    fn ask(
        &self,
        id: MigrationId,
        t: Transition,
    ) -> vmotion::BoxFuture<'_, Result<Record, ArbiterError>> {
        if t == Transition::Claim {
            return Box::pin(std::future::pending());
        }
        self.0.ask(id, t)
    }
}

struct Run {
    sent: Result<vmotion::MigrationReport, MigrateError>,
    received: Result<(vmotion::ReceiveReport, SyntheticGuest), MigrateError>,
    source: SyntheticGuest,
}

async fn run(id: MigrationId, src: Arc<dyn Arbiter>, dst: Arc<dyn Arbiter>) -> Run {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new(ReceiverKeys::Direct {
        migration_id: id,
        material: key(),
    })
    .arbiter(dst)
    .timeout(Duration::from_secs(3))
    .settle_timeout(Duration::from_secs(2));
    let rx = tokio::spawn(async move {
        receiver
            .receive(&listener, |h| {
                Ok(SyntheticGuest::blank(h.guest_pages, u64::from(h.page_size)))
            })
            .await
    });
    let mut source = guest();
    let sent = Sender::builder("vm-claim")
        .policy(VmPolicy {
            encryption: EncryptionPolicy::Required,
            vm_encrypted: false,
        })
        .key(KeySource::Direct {
            migration_id: id,
            material: key(),
        })
        .arbiter(src)
        .claim_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
        .migrate(addr, &mut source)
        .await;
    Run {
        sent,
        received: rx.await.unwrap(),
        source,
    }
}

fn running(g: &SyntheticGuest) -> bool {
    let w = g.writes();
    std::thread::sleep(Duration::from_millis(40));
    g.writes() > w
}

/// Commit, claim, resume: the record ends `claimed`, the source says the arbiter knows,
/// and the destination holds the source's memory as it was at the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_claims_before_it_resumes() {
    let id = MigrationId([1; 16]);
    let arbiter = Arc::new(MemoryArbiter::new());
    arbiter.open(id);
    let r = run(id, arbiter.clone(), arbiter.clone()).await;
    let report = r.sent.expect("claimed");
    assert_eq!(report.claim, ClaimEvidence::Arbiter);
    let (rr, dst) = r.received.expect("received");
    assert_eq!(rr.outcome, ReceiveOutcome::Committed);
    assert_eq!(arbiter.record(id), Some(Record::Claimed));
    assert_eq!(dst.snapshot(), r.source.snapshot());
    assert!(!running(&r.source), "the source stays stopped for good");
}

/// The destination's claim never reaches the arbiter: after its claim deadline the
/// source reverts, wins, and runs the VM again; the destination's late claim loses and it
/// discards its copy. A short pause, never a lost VM, never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_never_claims_costs_a_pause_not_the_vm() {
    let id = MigrationId([2; 16]);
    let arbiter = Arc::new(MemoryArbiter::new());
    arbiter.open(id);
    let r = run(
        id,
        arbiter.clone(),
        Arc::new(ClaimsNeverArrive(arbiter.clone())),
    )
    .await;
    assert!(
        matches!(r.sent, Err(MigrateError::Reverted(_))),
        "{:?}",
        r.sent.err()
    );
    assert_eq!(arbiter.record(id), Some(Record::Reverted));
    assert!(running(&r.source), "the source runs the VM again");
    // Its claim never answered (the request hangs past its bound) and the settle window
    // closed: the copy stays paused and unsettled, never resumed.
    match r.received {
        Ok((rr, dst)) => {
            assert!(matches!(rr.outcome, ReceiveOutcome::Unsettled(_)), "{rr:?}");
            assert!(!running(&dst), "the destination copy never runs");
        }
        Err(e) => assert!(matches!(e, MigrateError::Discarded(_)), "{e}"),
    }
}

/// The arbiter answers the source's pre-pause check and nothing after: the commit can be
/// neither recorded nor read back, so the source stays paused (outcome unknown) and the
/// destination, with no Commit and no answer, keeps its copy paused and unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_leaves_both_copies_paused() {
    let id = MigrationId([3; 16]);
    let arbiter = Arc::new(MemoryArbiter::answering_only(1));
    arbiter.open(id);
    let r = run(id, arbiter.clone(), arbiter.clone()).await;
    assert!(
        matches!(r.sent, Err(MigrateError::OutcomeUnknown(_))),
        "{:?}",
        r.sent.err()
    );
    let (rr, dst) = r.received.expect("the destination keeps its copy");
    assert!(matches!(rr.outcome, ReceiveOutcome::Unsettled(_)), "{rr:?}");
    assert!(!running(&r.source), "the source stays paused");
    assert!(!running(&dst), "the destination was never resumed");
    assert_eq!(
        dst.snapshot(),
        r.source.snapshot(),
        "and holds the same memory"
    );
    assert_eq!(
        arbiter.record(id),
        Some(Record::Open),
        "nothing was recorded"
    );
}
