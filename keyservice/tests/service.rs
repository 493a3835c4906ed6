//! Integration tests against the real `vmotion-keyservice` binary over real mutual TLS on
//! loopback: each test makes a dev PKI with the binary, starts `serve` on a free port and
//! talks to it with the client library (and, for the attacks, with hand-built TLS).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmotion_keyservice_client::api::{ErrorCode, Outcome, RegisterRequest};
use vmotion_keyservice_client::{ClientError, ClientIdentity, KeyServiceClient};
use vmotion_proto::{DestinationCapability, MigrationId};

const BIN: &str = env!("CARGO_BIN_EXE_vmotion-keyservice");

/// Runs `cmd`, which must succeed; its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pki(dir: &Path, hosts: &str) {
    run_ok(
        Command::new(BIN)
            .args(["pki", "init", "--out"])
            .arg(dir)
            .args(["--hosts", hosts]),
    );
}

/// A running service process.
struct Service {
    child: Child,
    addr: String,
    dir: PathBuf,
    config: PathBuf,
}

impl Service {
    fn start_with(dir: &Path, key_ttl: &str, registry_ttl: &str) -> Self {
        let config = dir.join("test.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\nkey = \"keyservice-key.pem\"\n\
                 journal = \"state/journal.jsonl\"\naudit_log = \"state/audit.jsonl\"\n\
                 key_ttl = \"{key_ttl}\"\nregistry_ttl = \"{registry_ttl}\"\n\
                 [limits]\noutbound_per_host = 0\ninbound_per_host = 0\ncluster = 0\n"
            ),
        )
        .unwrap();
        Self::spawn(dir, config)
    }

    fn spawn(dir: &Path, config: PathBuf) -> Self {
        let mut child = Command::new(BIN)
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
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            addr,
            dir: dir.to_owned(),
            config,
        }
    }

    fn start(dir: &Path) -> Self {
        Self::start_with(dir, "5m", "60s")
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn client(&self, host: &str) -> KeyServiceClient {
        self.client_from(&self.dir, host)
    }

    /// A client whose certificate comes from the PKI in `pki_dir` (the service's own CA is
    /// always the one trusted for the server).
    fn client_from(&self, pki_dir: &Path, host: &str) -> KeyServiceClient {
        KeyServiceClient::new(
            &self.url(),
            &ClientIdentity {
                ca: self.dir.join("ca.pem"),
                cert: pki_dir.join("hosts").join(format!("{host}.pem")),
                key: pki_dir.join("hosts").join(format!("{host}-key.pem")),
            },
        )
        .unwrap()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup() -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst,third");
    let service = Service::start(dir.path());
    (dir, service)
}

fn encrypting() -> RegisterRequest {
    RegisterRequest {
        can_encrypt: true,
        protocol_versions: vec![1],
        ciphers: vec!["aes-256-gcm".into()],
    }
}

fn code(e: &ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("expected a refusal from the service, got {e}"))
}

#[tokio::test]
async fn happy_path() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let rec = dst.register(&encrypting()).await.unwrap();
    assert_eq!(rec.host, "dst", "identity comes from the certificate");
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    assert_eq!(
        issued.destination_capability(),
        DestinationCapability::Encrypts
    );
    let fetched = dst.fetch_key(issued.id).await.unwrap();
    assert_eq!(
        fetched.material.key.expose_secret(),
        issued.material.key.expose_secret()
    );
    assert_eq!(fetched.material.nonce, issued.material.nonce);
    assert_eq!(
        (fetched.source.as_str(), fetched.vm.as_str()),
        ("src", "vm-1")
    );
    let o = dst.outcome(issued.id).await.unwrap();
    assert_eq!(o.outcome, None);
    let o = src
        .record_outcome(issued.id, Outcome::Committed)
        .await
        .unwrap();
    assert_eq!(o.outcome, Some(Outcome::Committed));
    let o = dst.outcome(issued.id).await.unwrap();
    assert_eq!(
        (o.outcome, o.source.as_str(), o.destination.as_str()),
        (Some(Outcome::Committed), "src", "dst")
    );
    // Host names have one spelling: "DST" is the registered "dst".
    let upper = src.create_migration("vm-2", "DST").await.unwrap();
    assert_eq!(
        upper.destination_capability(),
        DestinationCapability::Encrypts
    );
    // Two migrations never share key material.
    let other = src.create_migration("vm-3", "dst").await.unwrap();
    assert_ne!(other.id, issued.id);
    assert_ne!(
        other.material.key.expose_secret(),
        issued.material.key.expose_secret()
    );
    assert_ne!(other.material.nonce, issued.material.nonce);
}

/// A VM name is a plain name on every host (policy files, sink folders, logs): a name that
/// could climb out of a folder, or split a log line, gets no key.
#[tokio::test]
async fn vm_names_that_are_not_plain_names_get_no_key() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    dst.register(&encrypting()).await.unwrap();
    for bad in ["../etc", "a/b", "web 1", "web\n1", ".hidden"] {
        let e = src.create_migration(bad, "dst").await.unwrap_err();
        assert_eq!(code(&e), ErrorCode::BadRequest, "{bad:?}: {e}");
        assert!(e.to_string().contains("VM name"), "{bad:?}: {e}");
    }
    src.create_migration("web-1.prod_a", "dst").await.unwrap();
}

#[tokio::test]
async fn authorization_matrix() {
    let (dir, svc) = setup();
    let (src, dst, third) = (svc.client("src"), svc.client("dst"), svc.client("third"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();

    // The source itself, and a third host, may not fetch the key.
    assert_eq!(
        code(&src.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&third.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    // Nor read the outcome (third host). Each step of the record is reserved: the
    // destination may not record `committed` or `reverted`, the source not `claimed`, a
    // third host nothing, whatever the record's state.
    assert_eq!(
        code(&third.outcome(issued.id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            &dst.record_outcome(issued.id, Outcome::Committed)
                .await
                .unwrap_err()
        ),
        ErrorCode::Forbidden
    );
    for (client, outcome) in [
        (&dst, Outcome::Reverted),
        (&src, Outcome::Claimed),
        (&third, Outcome::Aborted),
        (&third, Outcome::Committed),
        (&third, Outcome::Claimed),
    ] {
        assert_eq!(
            code(&client.record_outcome(issued.id, outcome).await.unwrap_err()),
            ErrorCode::Forbidden,
            "{outcome}"
        );
    }
    // Unknown id.
    assert_eq!(
        code(&dst.fetch_key(MigrationId([0xee; 16])).await.unwrap_err()),
        ErrorCode::NotFound
    );
    // The destination fetches once; the second fetch is refused.
    dst.fetch_key(issued.id).await.unwrap();
    assert_eq!(
        code(&dst.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::AlreadyFetched
    );
    // The third host still gets "forbidden", not the key's state.
    assert_eq!(
        code(&third.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    // A recorded outcome never changes.
    src.record_outcome(issued.id, Outcome::Aborted)
        .await
        .unwrap();
    assert_eq!(
        code(
            &src.record_outcome(issued.id, Outcome::Committed)
                .await
                .unwrap_err()
        ),
        ErrorCode::Conflict
    );

    // A certificate from another CA, even for a known host name, gets no service at all.
    let other = tempfile::tempdir().unwrap();
    pki(other.path(), "src,dst");
    let impostor = svc.client_from(other.path(), "dst");
    let err = impostor.fetch_key(issued.id).await.unwrap_err();
    assert!(
        err.code().is_none(),
        "no API answer for a foreign certificate: {err}"
    );

    // No client certificate at all: the TLS session never carries a request.
    let mut roots = rustls::RootCertStore::empty();
    for c in vmotion_keyservice::tls::load_certs(&dir.path().join("ca.pem"), "ca").unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&svc.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let answer = async {
        let mut tls = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await?;
        tls.write_all(
            format!(
                "POST /v1/migrations/{}/key HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
                issued.id
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    match answer {
        Err(_) => {}
        Ok(buf) => assert!(
            buf.is_empty(),
            "got an answer without a certificate: {}",
            String::from_utf8_lossy(&buf)
        ),
    }

    // Every refusal above is in the audit log, with the caller's identity.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = svc.audit();
    for (field, value, and_field, and_value) in [
        ("caller", "src", "action", "fetch_key"),
        ("caller", "third", "action", "fetch_key"),
        ("action", "fetch_key", "result", "forbidden"),
        ("action", "fetch_key", "result", "already_fetched"),
        ("action", "fetch_key", "result", "not_found"),
        ("action", "record_outcome", "result", "conflict"),
        ("action", "tls_handshake", "result", "refused"),
    ] {
        assert!(
            audit_lines(&audit)
                .iter()
                .any(|v| v[field] == value && v[and_field] == and_value),
            "{field}={value} with {and_field}={and_value} missing from the audit log:\n{audit}"
        );
    }
    // Every line names the peer's address.
    assert!(audit_lines(&audit).iter().all(|v| {
        v["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    }));
}

#[tokio::test]
async fn expired_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst");
    let svc = Service::start_with(dir.path(), "1s", "60s");
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        code(&dst.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Expired
    );
    assert_eq!(
        code(&dst.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Expired
    );
    // The record itself outlives the key: the outcome can still be recorded and read.
    src.record_outcome(issued.id, Outcome::Aborted)
        .await
        .unwrap();
    assert_eq!(
        dst.outcome(issued.id).await.unwrap().outcome,
        Some(Outcome::Aborted)
    );
}

#[tokio::test]
async fn registry_entries_expire_unless_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst");
    let svc = Service::start_with(dir.path(), "5m", "1s");
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    assert!(src.host("dst").await.unwrap().is_none());
    assert_eq!(
        src.create_migration("vm", "dst")
            .await
            .unwrap()
            .destination_capability(),
        DestinationCapability::Unregistered
    );
    dst.register(&RegisterRequest {
        can_encrypt: false,
        ..encrypting()
    })
    .await
    .unwrap();
    assert_eq!(
        src.create_migration("vm-2", "dst")
            .await
            .unwrap()
            .destination_capability(),
        DestinationCapability::DoesNotEncrypt
    );
    dst.register(&encrypting()).await.unwrap();
    assert!(src.host("dst").await.unwrap().unwrap().encrypts());
    // Refreshing keeps it alive past the first TTL.
    tokio::time::sleep(Duration::from_millis(700)).await;
    dst.register(&encrypting()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        src.host("dst").await.unwrap().is_some(),
        "refreshed 0.7 s ago"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(src.host("dst").await.unwrap().is_none(), "expired");
    assert_eq!(
        src.create_migration("vm-3", "dst")
            .await
            .unwrap()
            .destination_capability(),
        DestinationCapability::Unregistered
    );
}

#[tokio::test]
async fn outcomes_survive_a_crash_and_keys_do_not() {
    let (dir, mut svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let committed = src.create_migration("vm-a", "dst").await.unwrap();
    let pending = src.create_migration("vm-b", "dst").await.unwrap();
    src.record_outcome(committed.id, Outcome::Committed)
        .await
        .unwrap();
    // SIGKILL: no chance to flush anything that was not already on disk.
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    let config = svc.config.clone();
    drop(svc);
    // A crash mid-write leaves a torn last line: the service cuts it and starts, and
    // starts again after appending to the repaired file.
    let journal = dir.path().join("state/journal.jsonl");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.extend_from_slice(b"{\"event\":\"outcome\",\"migr");
    std::fs::write(&journal, bytes).unwrap();
    let mut svc = Service::spawn(dir.path(), config.clone());
    svc.client("src")
        .create_migration("vm-c", "dst")
        .await
        .unwrap();
    assert!(svc.terminate().success());
    drop(svc);
    let svc = Service::spawn(dir.path(), config);
    let (src, dst2) = (svc.client("src"), svc.client("dst"));
    drop(dst);
    let o = dst2.outcome(committed.id).await.unwrap();
    assert_eq!(
        (o.outcome, o.vm.as_str()),
        (Some(Outcome::Committed), "vm-a")
    );
    // The pending migration is known (its creation was journaled) but its key is gone.
    assert_eq!(dst2.outcome(pending.id).await.unwrap().outcome, None);
    assert_eq!(
        code(&dst2.fetch_key(pending.id).await.unwrap_err()),
        ErrorCode::Expired
    );
    // Its outcome can still be recorded after the restart.
    src.record_outcome(pending.id, Outcome::Aborted)
        .await
        .unwrap();
}

/// A refusal that must be a lost race: `conflict`, with the recorded outcome named.
fn assert_conflict(e: &ClientError, recorded: &str) {
    assert_eq!(code(e), ErrorCode::Conflict, "{e}");
    assert!(
        e.to_string().contains(&format!("already `{recorded}`")),
        "the refusal names the recorded outcome: {e}"
    );
}

/// Checks the audit log has `caller`'s refused `record_outcome` whose detail names
/// `needle`.
async fn audited_conflict(svc: &Service, caller: &str, needle: &str) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = svc.audit();
    assert!(
        audit_lines(&audit).iter().any(|v| {
            v["caller"] == caller
                && v["action"] == "record_outcome"
                && v["result"] == "conflict"
                && v["detail"].as_str().is_some_and(|d| d.contains(needle))
        }),
        "{caller}'s refused record_outcome ({needle}) missing from the audit log:\n{audit}"
    );
}

#[tokio::test]
async fn destination_claims_and_the_source_cannot_revert() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    dst.fetch_key(issued.id).await.unwrap();
    // Not yet committed: nothing to claim.
    let e = dst
        .record_outcome(issued.id, Outcome::Claimed)
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::Conflict);
    assert!(e.to_string().contains("`null`"), "{e}");
    let committed = src
        .record_outcome(issued.id, Outcome::Committed)
        .await
        .unwrap();
    let claimed = dst
        .record_outcome(issued.id, Outcome::Claimed)
        .await
        .unwrap();
    assert_eq!(claimed.outcome, Some(Outcome::Claimed));
    assert!(claimed.recorded_at_ms >= committed.recorded_at_ms);
    assert_conflict(
        &src.record_outcome(issued.id, Outcome::Reverted)
            .await
            .unwrap_err(),
        "claimed",
    );
    assert_conflict(
        &dst.record_outcome(issued.id, Outcome::Aborted)
            .await
            .unwrap_err(),
        "claimed",
    );
    // Retries after a lost answer get the record as it is.
    for (client, outcome) in [(&src, Outcome::Committed), (&dst, Outcome::Claimed)] {
        assert_eq!(
            client.record_outcome(issued.id, outcome).await.unwrap(),
            claimed
        );
    }
    assert_eq!(src.outcome(issued.id).await.unwrap(), claimed);
    assert_eq!(dst.outcome(issued.id).await.unwrap(), claimed);
    audited_conflict(&svc, "src", "`reverted`").await;
}

#[tokio::test]
async fn source_reverts_and_the_destination_cannot_claim() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    src.record_outcome(issued.id, Outcome::Committed)
        .await
        .unwrap();
    let reverted = src
        .record_outcome(issued.id, Outcome::Reverted)
        .await
        .unwrap();
    assert_eq!(reverted.outcome, Some(Outcome::Reverted));
    assert_conflict(
        &dst.record_outcome(issued.id, Outcome::Claimed)
            .await
            .unwrap_err(),
        "reverted",
    );
    assert_eq!(dst.outcome(issued.id).await.unwrap(), reverted);
    for outcome in [Outcome::Reverted, Outcome::Committed] {
        assert_eq!(
            src.record_outcome(issued.id, outcome).await.unwrap(),
            reverted
        );
    }
    audited_conflict(&svc, "dst", "`claimed`").await;
}

/// Both ends race for a committed VM: exactly one step is recorded, the other is refused.
#[tokio::test]
async fn a_simultaneous_claim_and_revert_has_one_winner() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    for _ in 0..5 {
        let issued = src.create_migration("vm-1", "dst").await.unwrap();
        src.record_outcome(issued.id, Outcome::Committed)
            .await
            .unwrap();
        let (revert, claim) = tokio::join!(
            src.record_outcome(issued.id, Outcome::Reverted),
            dst.record_outcome(issued.id, Outcome::Claimed)
        );
        let (won, lost) = match (revert, claim) {
            (Ok(r), Err(e)) | (Err(e), Ok(r)) => (r, e),
            other => panic!("exactly one step wins: {other:?}"),
        };
        // The loser hit the write in flight (`unavailable`) or the recorded winner.
        assert!(
            matches!(code(&lost), ErrorCode::Conflict | ErrorCode::Unavailable),
            "{lost}"
        );
        assert_eq!(dst.outcome(issued.id).await.unwrap(), won);
        let lost_step = if won.outcome == Some(Outcome::Claimed) {
            src.record_outcome(issued.id, Outcome::Reverted).await
        } else {
            dst.record_outcome(issued.id, Outcome::Claimed).await
        };
        assert_conflict(&lost_step.unwrap_err(), won.outcome.unwrap().as_str());
    }
}

/// A destination whose source went silent after `Ready` settles the migration as
/// `aborted`; the source's late `committed` is refused.
#[tokio::test]
async fn destination_aborts_and_the_source_cannot_commit() {
    let (_dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    let aborted = dst
        .record_outcome(issued.id, Outcome::Aborted)
        .await
        .unwrap();
    assert_eq!(aborted.outcome, Some(Outcome::Aborted));
    assert_conflict(
        &src.record_outcome(issued.id, Outcome::Committed)
            .await
            .unwrap_err(),
        "aborted",
    );
    assert_conflict(
        &dst.record_outcome(issued.id, Outcome::Claimed)
            .await
            .unwrap_err(),
        "aborted",
    );
    // Either end may repeat `aborted`; the key that was waiting is gone.
    for client in [&src, &dst] {
        assert_eq!(
            client
                .record_outcome(issued.id, Outcome::Aborted)
                .await
                .unwrap(),
            aborted
        );
    }
    assert_eq!(
        code(&dst.fetch_key(issued.id).await.unwrap_err()),
        ErrorCode::Expired
    );
    assert_eq!(src.outcome(issued.id).await.unwrap(), aborted);
    audited_conflict(&svc, "src", "`committed`").await;
}

/// `claimed` and `reverted` come back from the journal after a crash, with their times,
/// and the replayed records take further steps under the same rules.
#[tokio::test]
async fn claims_and_reverts_survive_a_restart() {
    let (dir, mut svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    // One after the other: a VM has one migration in flight at a time, and `claimed` and
    // `reverted` end theirs.
    let mut ids = Vec::new();
    let mut records = Vec::new();
    for end in [Some(Outcome::Claimed), Some(Outcome::Reverted), None] {
        let issued = src.create_migration("vm-1", "dst").await.unwrap();
        let mut record = src
            .record_outcome(issued.id, Outcome::Committed)
            .await
            .unwrap();
        if let Some(end) = end {
            let by = if end == Outcome::Claimed { &dst } else { &src };
            record = by.record_outcome(issued.id, end).await.unwrap();
        }
        ids.push(issued.id);
        records.push(record);
    }
    let (claimed, reverted, committed) =
        (records[0].clone(), records[1].clone(), records[2].clone());
    // SIGKILL: only what was fsynced before each answer comes back.
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    let config = svc.config.clone();
    drop(svc);
    let journal = std::fs::read_to_string(dir.path().join("state/journal.jsonl")).unwrap();
    for (id, outcome) in [(ids[0], "claimed"), (ids[1], "reverted")] {
        assert!(
            journal.lines().any(|l| l.contains(&id.to_string())
                && l.contains(&format!("\"outcome\":\"{outcome}\""))),
            "{outcome} line missing:\n{journal}"
        );
    }
    let svc = Service::spawn(dir.path(), config);
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    assert_eq!(dst.outcome(ids[0]).await.unwrap(), claimed);
    assert_eq!(dst.outcome(ids[1]).await.unwrap(), reverted);
    assert_eq!(dst.outcome(ids[2]).await.unwrap(), committed);
    assert_conflict(
        &src.record_outcome(ids[0], Outcome::Reverted)
            .await
            .unwrap_err(),
        "claimed",
    );
    assert_conflict(
        &dst.record_outcome(ids[1], Outcome::Claimed)
            .await
            .unwrap_err(),
        "reverted",
    );
    let late = dst.record_outcome(ids[2], Outcome::Claimed).await.unwrap();
    assert_eq!(late.outcome, Some(Outcome::Claimed));
}

/// A client that goes away while its step is being written (a destination killed
/// mid-claim: a reset, or a close without TLS close_notify) does not leave the record
/// stuck: the step completes, and the retry gets the record as it is, not `unavailable`
/// for ever. (Before request handlers ran on tasks of their own, hyper dropped the
/// handler of a closed connection between marking the step pending and confirming it.)
#[tokio::test]
async fn a_step_whose_client_vanished_still_completes() {
    let (dir, svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let config = Arc::new(
        vmotion_keyservice_client::tls::client_config(&ClientIdentity {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("hosts/dst.pem"),
            key: dir.path().join("hosts/dst-key.pem"),
        })
        .unwrap(),
    );
    for round in 0..100 {
        let issued = src.create_migration("vm-1", "dst").await.unwrap();
        src.record_outcome(issued.id, Outcome::Committed)
            .await
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(&svc.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let body = r#"{"outcome":"claimed"}"#;
        tls.write_all(
            format!(
                "PUT /v1/migrations/{}/outcome HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                issued.id,
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        tls.flush().await.unwrap();
        // Gone at once, without reading the answer: every other round with a reset.
        if round % 2 == 0 {
            tls.get_ref().0.set_zero_linger().unwrap();
        }
        drop(tls);
        let mut answer = None;
        for _ in 0..40 {
            match dst.record_outcome(issued.id, Outcome::Claimed).await {
                Ok(r) => {
                    answer = Some(r);
                    break;
                }
                Err(e) => {
                    assert_eq!(code(&e), ErrorCode::Unavailable, "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let answer = answer.expect("the step stayed `being recorded` for 2 s");
        assert_eq!(answer.outcome, Some(Outcome::Claimed));
        assert_conflict(
            &src.record_outcome(issued.id, Outcome::Reverted)
                .await
                .unwrap_err(),
            "claimed",
        );
    }
}

/// The audit log records every action, and no file the service writes holds key bytes
/// (searched as hex and as base64).
#[tokio::test]
async fn audit_log_has_every_action_and_no_key_material() {
    let (dir, mut svc) = setup();
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    dst.register(&encrypting()).await.unwrap();
    src.host("dst").await.unwrap();
    let issued = src.create_migration("vm-audit", "dst").await.unwrap();
    dst.fetch_key(issued.id).await.unwrap();
    src.record_outcome(issued.id, Outcome::Committed)
        .await
        .unwrap();
    dst.outcome(issued.id).await.unwrap();
    let key = *issued.material.key.expose_secret();
    assert!(svc.terminate().success(), "SIGTERM is a clean exit");

    let audit = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap();
    let id = issued.id.to_string();
    for (caller, action) in [
        ("dst", "register_host"),
        ("src", "read_host"),
        ("src", "create_migration"),
        ("dst", "fetch_key"),
        ("src", "record_outcome"),
        ("dst", "read_outcome"),
    ] {
        let v = audit_lines(&audit)
            .into_iter()
            .find(|v| v["caller"] == caller && v["action"] == action)
            .unwrap_or_else(|| panic!("{action} by {caller} missing:\n{audit}"));
        let line = v.to_string();
        assert_eq!(v["result"], "ok");
        assert!(v["time_ms"].as_u64().unwrap() > 0);
        if action.contains("migration") || action.contains("key") || action.contains("outcome") {
            assert_eq!(v["migration_id"], id.as_str(), "{line}");
        }
    }
    let forms = [
        hex::encode(key),
        hex::encode_upper(key),
        base64::engine::general_purpose::STANDARD.encode(key),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key),
    ];
    for entry in walk(dir.path().join("state")) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for f in &forms {
            assert!(
                !text.contains(f.as_str()),
                "key material in {}",
                entry.display()
            );
        }
        assert!(
            !bytes.windows(32).any(|w| w == key),
            "raw key bytes in {}",
            entry.display()
        );
    }
}

fn walk(dir: PathBuf) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "a");
    let cfg = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(dir.path().join("keyservice.toml"))
        .unwrap()
        .replace("registry_ttl = \"60s\"", "registry_ttl = \"sometimes\"");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml")
            && err.contains("registry_ttl")
            && err.contains("line 9, field `registry_ttl`"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["pki", "init", "--out"])
        .arg(dir.path().join("x"))
        .args(["--hosts", "good,not a host"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`not a host` is not a valid host name"));

    // pki init never overwrites an existing PKI (its keys).
    let out = Command::new(BIN)
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .args(["--hosts", "b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // Private keys are owner-only.
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca-key.pem", "keyservice-key.pem", "hosts/a-key.pem"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
}

/// SIGTERM drops (zeroizes) every key still waiting for its destination, and says how
/// many; the process exits 0.
#[tokio::test]
async fn shutdown_zeroizes_the_keys_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst");
    let config = dir.path().join("keyservice.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:7443", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let client = |host: &str| {
        KeyServiceClient::new(
            &format!("https://{addr}"),
            &ClientIdentity {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join(format!("hosts/{host}.pem")),
                key: dir.path().join(format!("hosts/{host}-key.pem")),
            },
        )
        .unwrap()
    };
    let src = client("src");
    let fetched = src.create_migration("a", "dst").await.unwrap();
    src.create_migration("b", "dst").await.unwrap();
    client("dst").fetch_key(fetched.id).await.unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys_zeroized=1"),
        "one key was still held:\n{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal"
    );
}

fn audit_lines(audit: &str) -> Vec<serde_json::Value> {
    audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect()
}

/// A service whose configuration ends with `limit` (one `key = value` line), with hosts
/// src and dst.
fn limited(limit: &str) -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst");
    let config = dir.path().join("limited.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\n\
             key = \"keyservice-key.pem\"\njournal = \"state/journal.jsonl\"\n\
             audit_log = \"state/audit.jsonl\"\n{limit}\n"
        ),
    )
    .unwrap();
    let svc = Service::spawn(dir.path(), config);
    (dir, svc)
}

/// One certified host cannot take the service's connection budget: past
/// `connections_per_host` open connections its next one is answered
/// `too_many_connections` (and audited), while every other host is served as before; once
/// it closes some, it is served again.
#[tokio::test]
async fn one_host_cannot_hold_every_connection() {
    let (dir, svc) = limited("connections_per_host = 3");
    let tls = Arc::new(
        vmotion_keyservice_client::tls::client_config(&ClientIdentity {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("hosts/src.pem"),
            key: dir.path().join("hosts/src-key.pem"),
        })
        .unwrap(),
    );
    // Three connections of src, each proven served by one answer, then left idle.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(&svc.addr).await.unwrap();
        let mut c = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        c.write_all(b"GET /v1/hosts/dst HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).await.unwrap();
        assert!(head.starts_with(b"HTTP/1.1 "), "{head:?}");
        idle.push(c);
    }
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let e = src.create_migration("vm-1", "dst").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::TooManyConnections, "{e}");
    assert!(e.to_string().contains("3 connections"), "{e}");
    // Another host is not held up.
    let started = std::time::Instant::now();
    dst.register(&encrypting()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        svc.audit().contains("too_many_connections"),
        "{}",
        svc.audit()
    );
    // Closing them frees the host's budget.
    drop(idle);
    let mut served = false;
    for _ in 0..40 {
        if src.create_migration("vm-1", "dst").await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "src is served again once its connections closed");
}

/// A host that sends requests faster than `requests_per_second_per_host` (bursts of twice
/// that) gets `rate_limited` for the excess (audited), while other hosts are served; after
/// a pause it is served again.
#[tokio::test]
async fn one_host_cannot_flood_the_service_with_requests() {
    let (_dir, svc) = limited("requests_per_second_per_host = 5");
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    dst.register(&encrypting()).await.unwrap();
    let (mut served, mut limited) = (0, 0);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        match src.host("dst").await {
            Ok(_) => served += 1,
            Err(e) => {
                assert_eq!(code(&e), ErrorCode::RateLimited, "{e}");
                limited += 1;
            }
        }
    }
    // A burst of 10 and a trickle of 5/s while the loop ran.
    let most = 10 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize + 1;
    assert!(
        (10..=most).contains(&served),
        "served {served}, at most {most}"
    );
    assert!(limited > 0, "limited {limited}");
    dst.host("src").await.expect("another host is served");
    assert!(svc.audit().contains("\"rate_limited\""), "{}", svc.audit());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    src.host("dst").await.expect("served again after a pause");
}

/// Maintenance mode: a draining host gets no migration (`host_draining`, naming it) until
/// it is undrained, also across a restart (the journal keeps it); only the host itself
/// or an admin may drain it; other destinations are unaffected; the operator's command
/// (`vmotion-keyservice host undrain`) ends it.
#[tokio::test]
async fn a_draining_host_gets_no_migration_until_undrained() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst,ops");
    let config = dir.path().join("test.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\n\
         key = \"keyservice-key.pem\"\njournal = \"state/journal.jsonl\"\n\
         audit_log = \"state/audit.jsonl\"\nadmins = [\"ops\"]\n\
         [limits]\noutbound_per_host = 0\ninbound_per_host = 0\ncluster = 0\n",
    )
    .unwrap();
    let svc = Service::spawn(dir.path(), config.clone());
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let e = src.set_maintenance("dst", true).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::Forbidden, "{e}");
    assert!(!dst.maintenance("dst").await.unwrap().draining);
    assert!(dst.set_maintenance("dst", true).await.unwrap().draining);
    let e = src.create_migration("vm-a", "dst").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::HostDraining, "{e}");
    assert!(e.to_string().contains("dst"), "{e}");
    src.create_migration("vm-b", "ops").await.unwrap();
    drop(svc);

    let svc = Service::spawn(dir.path(), config);
    let src = svc.client("src");
    assert!(src.maintenance("dst").await.unwrap().draining);
    let e = src.create_migration("vm-c", "dst").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::HostDraining, "{e}");
    let d = dir.path();
    let said = run_ok(
        Command::new(BIN)
            .args(["host", "undrain", "dst", "--keyservice", &svc.url(), "--ca"])
            .arg(d.join("ca.pem"))
            .arg("--cert")
            .arg(d.join("hosts/ops.pem"))
            .arg("--key")
            .arg(d.join("hosts/ops-key.pem")),
    );
    assert_eq!(said.trim(), "dst: in service");
    src.create_migration("vm-d", "dst").await.unwrap();
}

/// `metrics_listen`: the key service's metrics, scraped with curl after a few requests,
/// count them by action and result and time them.
#[tokio::test]
async fn metrics_count_requests_by_action_and_result() {
    let curl = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !curl {
        eprintln!("SKIPPED: curl not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "src,dst");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("test.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\n\
             key = \"keyservice-key.pem\"\njournal = \"state/journal.jsonl\"\n\
             audit_log = \"state/audit.jsonl\"\nmetrics_listen = \"127.0.0.1:{port}\"\n\
             [limits]\noutbound_per_host = 0\ninbound_per_host = 0\ncluster = 0\n"
        ),
    )
    .unwrap();
    let svc = Service::spawn(dir.path(), config);
    let (src, dst) = (svc.client("src"), svc.client("dst"));
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    dst.fetch_key(issued.id).await.unwrap();
    let again = dst.fetch_key(issued.id).await.unwrap_err();
    assert_eq!(code(&again), ErrorCode::AlreadyFetched);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "vmotion_keyservice_requests_total{action=\"create_migration\",result=\"ok\"} 1",
        "vmotion_keyservice_requests_total{action=\"fetch_key\",result=\"ok\"} 1",
        "vmotion_keyservice_requests_total{action=\"fetch_key\",result=\"already_fetched\"} 1",
        "vmotion_keyservice_request_duration_seconds_count{action=\"fetch_key\"} 2",
        "vmotion_keyservice_request_duration_seconds_count{action=\"create_migration\"} 1",
        // Both fetches reached the store (the second to be refused by it).
        "vmotion_keyservice_store_duration_seconds_count{op=\"fetch_key\"} 2",
        "vmotion_keyservice_store_duration_seconds_count{op=\"create\"} 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // No key material in the metrics: only counts and times.
    let key_hex = hex::encode(issued.material.key.expose_secret());
    assert!(!text.contains(&key_hex));
}
