//! The etcd store against a real etcd cluster (Debian's `etcd-server`, three members on
//! loopback) and several real `vmotion-keyservice` replicas over real mutual TLS. Each
//! test skips, saying why, where no `etcd` is installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use vmotion_keyservice_client::api::{ErrorCode, Outcome, RegisterRequest};
use vmotion_keyservice_client::{ClientError, ClientIdentity, CreateOptions, KeyServiceClient};
use vmotion_testbed::EtcdCluster;

const BIN: &str = env!("CARGO_BIN_EXE_vmotion-keyservice");

/// A PKI, a KEK and the etcd cluster the replicas share.
struct Bed {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    /// `[store]` lines for TLS to etcd, when its members require it.
    tls: String,
}

/// A running replica.
struct Replica {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Bed {
    /// `None` (with the reason printed) where etcd is not installed.
    fn start(members: usize) -> Option<Self> {
        Self::start_with(members, false)
    }

    /// With etcd serving clients over mutual TLS only: its members use the PKI's service
    /// certificate, the replicas present host `etcd-client`'s.
    fn start_with(members: usize, tls: bool) -> Option<Self> {
        if let Err(why) = vmotion_testbed::etcd_available() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let hosts = "src,dst,third,etcd-client";
        vmotion_testbed::keyservice_pki(Path::new(BIN), dir.path(), hosts).unwrap();
        let d = dir.path();
        let (etcd, tls) = if tls {
            let files = [
                d.join("ca.pem"),
                d.join("keyservice.pem"),
                d.join("keyservice-key.pem"),
            ];
            let lines = "ca = \"ca.pem\"\ncert = \"hosts/etcd-client.pem\"\n\
                         key = \"hosts/etcd-client-key.pem\"\n";
            (
                EtcdCluster::start_tls(members, files).unwrap(),
                lines.to_owned(),
            )
        } else {
            (EtcdCluster::start(members).unwrap(), String::new())
        };
        Some(Self { dir, etcd, tls })
    }

    /// A replica named `name` with these `[limits]` lines.
    fn replica(&self, name: &str, limits: &str) -> Replica {
        let endpoints = self
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\n\
                 key = \"keyservice-key.pem\"\naudit_log = \"{name}/audit.jsonl\"\n\
                 key_ttl = \"60s\"\n\
                 [store]\nkind = \"etcd\"\nendpoints = [{endpoints}]\nkek_file = \"kek\"\n\
                 request_timeout = \"2s\"\n{}[limits]\n{limits}\n",
                self.tls
            ),
        )
        .unwrap();
        Replica::spawn(self.dir.path(), &config, name)
    }

    fn client(&self, replica: &Replica, host: &str) -> KeyServiceClient {
        let d = self.dir.path();
        KeyServiceClient::new(
            &format!("https://{}", replica.addr),
            &ClientIdentity {
                ca: d.join("ca.pem"),
                cert: d.join("hosts").join(format!("{host}.pem")),
                key: d.join("hosts").join(format!("{host}-key.pem")),
            },
        )
        .unwrap()
    }
}

const UNLIMITED: &str = "outbound_per_host = 0\ninbound_per_host = 0\ncluster = 0";

impl Replica {
    fn spawn(dir: &Path, config: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let log = std::fs::File::create(dir.join(name).join("stderr.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "debug");
        let (child, addr) = vmotion_testbed::spawn_listening(&mut cmd, log.into()).unwrap();
        Self {
            child,
            addr,
            dir: dir.join(name),
        }
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn code(e: &ClientError) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("not a refusal: {e}"))
}

fn encrypting() -> RegisterRequest {
    RegisterRequest {
        can_encrypt: true,
        protocol_versions: vec![1],
        ciphers: vec!["aes-256-gcm".into()],
    }
}

/// One migration's whole life, each step through another replica; the record is the same
/// on both afterwards.
#[tokio::test]
async fn any_replica_answers_any_request() {
    let Some(bed) = Bed::start(3) else { return };
    let (a, b) = (bed.replica("a", UNLIMITED), bed.replica("b", UNLIMITED));
    let (src_a, dst_b) = (bed.client(&a, "src"), bed.client(&b, "dst"));
    let (src_b, dst_a) = (bed.client(&b, "src"), bed.client(&a, "dst"));
    dst_b.register(&encrypting()).await.unwrap();
    assert!(src_a.host("dst").await.unwrap().unwrap().encrypts());
    let issued = src_a.create_migration("vm-1", "dst").await.unwrap();
    assert!(issued.destination.as_ref().unwrap().encrypts());
    let fetched = dst_b.fetch_key(issued.id).await.unwrap();
    assert_eq!(
        fetched.material.key.expose_secret(),
        issued.material.key.expose_secret()
    );
    assert_eq!(fetched.material.nonce.0, issued.material.nonce.0);
    assert_eq!(
        (fetched.source.as_str(), fetched.vm.as_str()),
        ("src", "vm-1")
    );
    assert_eq!(
        code(&dst_a.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::AlreadyFetched
    );
    assert_eq!(
        code(&src_b.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    src_b
        .record_outcome(issued.id, Outcome::Committed)
        .await
        .unwrap();
    // A second, different outcome from the other replica is refused and audited there.
    let e = src_a
        .record_outcome(issued.id, Outcome::Aborted)
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::Conflict);
    // The audit log is written in batches, just after the answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.audit().contains("\"result\":\"conflict\"") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        a.audit().contains("\"result\":\"conflict\""),
        "{}",
        a.audit()
    );
    let claimed = dst_a
        .record_outcome(issued.id, Outcome::Claimed)
        .await
        .unwrap();
    assert_eq!(claimed.outcome, Some(Outcome::Claimed));
    assert_eq!(src_b.outcome(issued.id).await.unwrap(), claimed);
    assert_eq!(dst_b.outcome(issued.id).await.unwrap(), claimed);
    // A retried step answers the record as it is, through either replica.
    assert_eq!(
        dst_b
            .record_outcome(issued.id, Outcome::Claimed)
            .await
            .unwrap(),
        claimed
    );
    assert_eq!(
        src_a
            .record_outcome(issued.id, Outcome::Committed)
            .await
            .unwrap(),
        claimed
    );
}

/// etcd that serves clients over mutual TLS only: replicas with the client certificate
/// work; one without TLS settings is refused by etcd and answers `unavailable`.
#[tokio::test]
async fn client_tls_to_etcd() {
    let Some(mut bed) = Bed::start_with(1, true) else {
        return;
    };
    assert!(bed.etcd.endpoints()[0].starts_with("https://"));
    let a = bed.replica("a", UNLIMITED);
    let (src, dst) = (bed.client(&a, "src"), bed.client(&a, "dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    dst.fetch_key(issued.id).await.unwrap();
    src.record_outcome(issued.id, Outcome::Aborted)
        .await
        .unwrap();
    bed.tls.clear();
    let plain = bed.replica("plain", UNLIMITED);
    let e = bed
        .client(&plain, "src")
        .create_migration("vm-2", "dst")
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::Unavailable, "{e}");
}

/// A create sent again with the same request id, through the other replica (its first
/// answer lost): the same migration and the same key, nothing created twice; once the key
/// is fetched, a late retry cannot get it again.
#[tokio::test]
async fn a_retried_create_through_another_replica_creates_nothing_twice() {
    let Some(bed) = Bed::start(3) else { return };
    let (a, b) = (bed.replica("a", UNLIMITED), bed.replica("b", UNLIMITED));
    let (via_a, via_b) = (bed.client(&a, "src"), bed.client(&b, "src"));
    let options = CreateOptions::default().request_id([7; 16]);
    let first = via_a
        .create_migration_with("vm-r", "dst", options)
        .await
        .unwrap();
    let again = via_b
        .create_migration_with("vm-r", "dst", options)
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(
        again.material.key.expose_secret(),
        first.material.key.expose_secret()
    );
    assert_eq!(again.material.nonce.0, first.material.nonce.0);
    // Exactly one migration of the VM: a create with a new request id is refused.
    let e = via_b.create_migration("vm-r", "dst").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::VmInFlight, "{e}");
    bed.client(&b, "dst").fetch_key(first.id).await.unwrap();
    let late = via_a
        .create_migration_with("vm-r", "dst", options)
        .await
        .unwrap_err();
    assert_eq!(code(&late), ErrorCode::Expired, "{late}");
}

/// A key written without its destination's name beside it (as a replica older than the
/// one-transaction fetch writes it, during a rolling upgrade) is still handed out once,
/// to its destination only.
#[tokio::test]
async fn a_key_without_its_destination_name_is_still_fetched_once() {
    let Some(bed) = Bed::start(1) else { return };
    let a = bed.replica("a", UNLIMITED);
    let issued = bed
        .client(&a, "src")
        .create_migration("vm-old", "dst")
        .await
        .unwrap();
    let mut etcd = etcd_client::Client::connect(bed.etcd.endpoints(), None)
        .await
        .unwrap();
    let dest = format!("/vmotion/dest/{}", issued.id);
    assert_eq!(etcd.delete(dest, None).await.unwrap().deleted(), 1);
    let e = bed
        .client(&a, "third")
        .fetch_key(issued.id)
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::Forbidden, "{e}");
    let dst = bed.client(&a, "dst");
    let fetched = dst.fetch_key(issued.id).await.unwrap();
    assert_eq!(
        fetched.material.key.expose_secret(),
        issued.material.key.expose_secret()
    );
    let again = dst.fetch_key(issued.id).await.unwrap_err();
    assert_eq!(code(&again), ErrorCode::AlreadyFetched, "{again}");
}

/// The same VM from two hosts at once, through two replicas: one proceeds, the other is
/// refused `vm_in_flight` naming the first; a final outcome frees the VM cluster-wide.
#[tokio::test]
async fn one_migration_of_a_vm_at_a_time_cluster_wide() {
    let Some(bed) = Bed::start(3) else { return };
    let (a, b) = (bed.replica("a", UNLIMITED), bed.replica("b", UNLIMITED));
    for round in 0..5 {
        let vm = format!("vm-{round}");
        let (src, third) = (bed.client(&a, "src"), bed.client(&b, "third"));
        let (one, two) = tokio::join!(
            src.create_migration(&vm, "dst"),
            third.create_migration(&vm, "dst")
        );
        let (won, lost) = match (one, two) {
            (Ok(w), Err(l)) => ((w, &src), l),
            (Err(l), Ok(w)) => ((w, &third), l),
            (Ok(_), Ok(_)) => panic!("round {round}: both hosts got a migration of {vm}"),
            (Err(x), Err(y)) => panic!("round {round}: both refused: {x}; {y}"),
        };
        assert_eq!(code(&lost), ErrorCode::VmInFlight, "{lost}");
        assert!(lost.to_string().contains(&won.0.id.to_string()), "{lost}");
        won.1
            .record_outcome(won.0.id, Outcome::Aborted)
            .await
            .unwrap();
        let again = bed.client(&b, "dst").create_migration(&vm, "src").await;
        assert!(
            again.is_ok(),
            "round {round}: the VM is free after `aborted`: {again:?}"
        );
    }
}

/// Admission counted in etcd: concurrent creates through two replicas never take more
/// than the limit, and a final outcome gives a slot back.
#[tokio::test]
async fn admission_limits_hold_across_replicas() {
    let Some(bed) = Bed::start(3) else { return };
    let limits = "outbound_per_host = 2\ninbound_per_host = 0\ncluster = 3";
    let (a, b) = (bed.replica("a", limits), bed.replica("b", limits));
    let via_a = std::sync::Arc::new(bed.client(&a, "src"));
    let via_b = std::sync::Arc::new(bed.client(&b, "src"));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let client = if i % 2 == 0 {
                via_a.clone()
            } else {
                via_b.clone()
            };
            tokio::spawn(async move { client.create_migration(&format!("vm-{i}"), "dst").await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 2, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(code(r), ErrorCode::Busy, "{r}");
    }
    // Another source still fits under the cluster's 3, then the cluster is full.
    let third = bed.client(&a, "third");
    let t = third.create_migration("vm-t", "dst").await.unwrap();
    assert_eq!(
        code(&third.create_migration("vm-u", "dst").await.unwrap_err()),
        ErrorCode::Busy
    );
    third.record_outcome(t.id, Outcome::Aborted).await.unwrap();
    via_b
        .record_outcome(won[0].id, Outcome::Aborted)
        .await
        .unwrap();
    via_a.create_migration("vm-again", "dst").await.unwrap();
    // Every create the service answered `ok` says what it counted, never over a limit.
    for line in a.audit().lines().chain(b.audit().lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["action"] == "create_migration" && v["result"] == "ok" {
            assert!(v["in_flight"]["source"].as_u64().unwrap() <= 2, "{line}");
            assert!(v["in_flight"]["cluster"].as_u64().unwrap() <= 3, "{line}");
        }
    }
}

/// One member down: nothing lost, nothing refused. Two down (no quorum): every request
/// fails closed with `unavailable`, no key and no outcome; quorum back: service resumes
/// by itself, and what was recorded before is still there.
#[tokio::test]
async fn quorum_loss_fails_closed_and_service_resumes() {
    let Some(mut bed) = Bed::start(3) else { return };
    let a = bed.replica("a", UNLIMITED);
    let (src, dst) = (bed.client(&a, "src"), bed.client(&a, "dst"));
    let first = src.create_migration("vm-1", "dst").await.unwrap();
    bed.etcd.kill(0);
    let second = src.create_migration("vm-2", "dst").await.unwrap();
    dst.fetch_key(first.id).await.unwrap();
    src.record_outcome(first.id, Outcome::Committed)
        .await
        .unwrap();
    bed.etcd.kill(1);
    let started = Instant::now();
    for (what, r) in [
        (
            "create",
            src.create_migration("vm-3", "dst").await.map(|_| ()),
        ),
        ("fetch", dst.fetch_key(second.id).await.map(|_| ())),
        (
            "outcome",
            dst.record_outcome(first.id, Outcome::Claimed)
                .await
                .map(|_| ()),
        ),
        ("read", dst.outcome(first.id).await.map(|_| ())),
    ] {
        let e = r.expect_err(what);
        assert_eq!(code(&e), ErrorCode::Unavailable, "{what}: {e}");
        assert!(e.to_string().contains("etcd"), "{what}: {e}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "fails closed within its deadlines"
    );
    bed.etcd.restart(0).unwrap();
    bed.etcd.wait_healthy(Duration::from_secs(30)).unwrap();
    // Back by itself: the same replica process, no restart.
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        match dst.record_outcome(first.id, Outcome::Claimed).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(code(&e), ErrorCode::Unavailable, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("not back after quorum returned: {e}"),
        }
    };
    assert_eq!(record.outcome, Some(Outcome::Claimed));
    // The key that waited through the outage is still there, once.
    dst.fetch_key(second.id).await.unwrap();
    assert_eq!(
        code(&dst.fetch_key(second.id).await.unwrap_err()),
        ErrorCode::AlreadyFetched
    );
}

/// Keys reach etcd only sealed: no member's data directory, no audit log and no replica
/// log holds a key or nonce as raw bytes, hex or base64, although etcd holds the
/// migrations (their ids are found there).
#[tokio::test]
async fn no_key_or_nonce_bytes_in_etcd_or_any_log() {
    let Some(mut bed) = Bed::start(3) else { return };
    let a = bed.replica("a", UNLIMITED);
    let (src, dst) = (bed.client(&a, "src"), bed.client(&a, "dst"));
    let mut secrets = Vec::new();
    let mut ids = Vec::new();
    for i in 0..12 {
        let issued = src
            .create_migration(&format!("vm-{i}"), "dst")
            .await
            .unwrap();
        if i % 2 == 0 {
            dst.fetch_key(issued.id).await.unwrap();
        }
        secrets.push(issued.material.key.expose_secret().to_vec());
        secrets.push(issued.material.nonce.0.to_vec());
        ids.push(issued.id);
    }
    drop(a);
    for i in 0..bed.etcd.len() {
        bed.etcd.kill(i); // everything etcd wrote is on disk
    }
    let files = walk(bed.etcd.dir())
        .into_iter()
        .chain(walk(&bed.dir.path().join("a")))
        .collect::<Vec<_>>();
    let mut ids_seen = 0;
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        // etcd preallocates its WAL segments with zeros: search what was written.
        let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        bytes.truncate(used);
        let text = String::from_utf8_lossy(&bytes);
        for s in &secrets {
            let forms = [
                hex::encode(s),
                hex::encode_upper(s),
                base64::engine::general_purpose::STANDARD.encode(s),
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(s),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s),
            ];
            for form in &forms {
                assert!(!text.contains(form.as_str()), "{form} in {}", f.display());
            }
            if s.len() == 32 {
                assert!(
                    !bytes.windows(32).any(|w| w == &s[..]),
                    "raw key in {}",
                    f.display()
                );
            }
        }
        if f.starts_with(bed.etcd.dir()) {
            ids_seen += ids
                .iter()
                .filter(|id| text.contains(&id.to_string()))
                .count();
        }
    }
    assert!(
        ids_seen >= ids.len(),
        "the search did not look where etcd keeps the migrations"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Maintenance across replicas: a host drained through one replica gets no migration
/// through the other (`host_draining`, in the create's transaction, also when the first
/// read was the member's own copy), until undrained.
#[tokio::test]
async fn a_host_drained_through_one_replica_gets_no_migration_through_the_other() {
    let Some(bed) = Bed::start(3) else { return };
    let (a, b) = (bed.replica("a", UNLIMITED), bed.replica("b", UNLIMITED));
    assert!(
        bed.client(&a, "dst")
            .set_maintenance("dst", true)
            .await
            .unwrap()
            .draining
    );
    let src_b = bed.client(&b, "src");
    assert!(src_b.maintenance("dst").await.unwrap().draining);
    let e = src_b.create_migration("vm-m", "dst").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::HostDraining, "{e}");
    // With a limit on, the create reads first: the same answer.
    let limited = bed.replica(
        "c",
        "outbound_per_host = 2\ninbound_per_host = 2\ncluster = 5",
    );
    let e = bed
        .client(&limited, "src")
        .create_migration("vm-m", "dst")
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::HostDraining, "{e}");
    bed.client(&b, "dst")
        .set_maintenance("dst", false)
        .await
        .unwrap();
    bed.client(&a, "src")
        .create_migration("vm-m", "dst")
        .await
        .unwrap();
}
