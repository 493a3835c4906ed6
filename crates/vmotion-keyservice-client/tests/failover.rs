//! Failover between key service replicas, against real `vmotion_keyservice::Server`s on
//! loopback over real mutual TLS: each replica runs in a thread of its own with its own
//! runtime, so stopping one ends every connection it served, as a dead process would.
//!
//! The replicas share one PKI but no state (today's store is a journal per service), so
//! each test reads state back only from the replica that wrote it; which replica served a
//! call shows in what it knows (a registration, a migration).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt as _;
use vmotion_keyservice::pki::PkiFiles;
use vmotion_keyservice::{Config, Server};
use vmotion_keyservice_client::api::{ErrorCode, RegisterRequest};
use vmotion_keyservice_client::{ClientError, ClientIdentity, KeyServiceClient};

struct Pki {
    _dir: tempfile::TempDir,
    files: PkiFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["src".to_owned(), "dst".to_owned()];
        let files = vmotion_keyservice::pki::init(dir.path(), &hosts, &[]).unwrap();
        Self { _dir: dir, files }
    }

    /// `host`'s client of the replicas at `urls` (comma-separated).
    fn client(&self, host: &str, urls: &str) -> KeyServiceClient {
        KeyServiceClient::new(
            urls,
            &ClientIdentity {
                ca: self.files.ca(),
                cert: self.files.host_cert(host),
                key: self.files.host_key(host),
            },
        )
        .unwrap()
    }
}

/// One replica: a `Server` on a runtime of its own.
struct Replica {
    addr: SocketAddr,
    shut_down: Option<tokio::sync::oneshot::Sender<()>>,
    end: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(pki: &Pki, name: &str) -> Self {
        let mut config = Config::load(&pki.files.config()).unwrap();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.store = vmotion_keyservice::config::StoreConfig::Journal {
            path: pki.files.dir.join(name).join("journal.jsonl"),
        };
        config.audit_log = pki.files.dir.join(name).join("audit.jsonl");
        let (bound, addr) = std::sync::mpsc::channel();
        let (shut_down, shutdown) = tokio::sync::oneshot::channel::<()>();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = Server::bind(&config).await.unwrap();
                bound.send(server.local_addr().unwrap()).unwrap();
                server
                    .run(async move {
                        let _ = shutdown.await;
                    })
                    .await;
                // Connections accepted before the shutdown keep being served (with
                // `unavailable`) until the runtime goes.
                let _ = ended.await;
            });
        });
        Self {
            addr: addr.recv().unwrap(),
            shut_down: Some(shut_down),
            end: Some(end),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops accepting; connections already open are answered `unavailable`.
    fn shut_down(&mut self) {
        if let Some(tx) = self.shut_down.take() {
            let _ = tx.send(());
        }
    }

    /// Gone: its runtime is dropped, and every connection it served closes with it.
    fn kill(&mut self) {
        self.shut_down();
        if let Some(tx) = self.end.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://{}", l.local_addr().unwrap())
}

fn encrypting() -> RegisterRequest {
    RegisterRequest {
        can_encrypt: true,
        protocol_versions: vec![1],
        ciphers: vec!["aes-256-gcm".into()],
    }
}

/// The first URL refuses connections: every call, the single-use key fetch included, is
/// served by the second.
#[tokio::test]
async fn a_dead_first_url_is_passed_over_for_the_second() {
    let pki = Pki::new();
    let live = Replica::start(&pki, "b");
    let urls = format!("{},{}", dead_url(), live.url());
    let (src, dst) = (pki.client("src", &urls), pki.client("dst", &urls));
    assert_eq!(dst.register(&encrypting()).await.unwrap().host, "dst");
    assert!(src.host("dst").await.unwrap().is_some());
    let issued = src.create_migration("vm-1", "dst").await.unwrap();
    assert!(issued.destination.is_some());
    // A fresh client, so the fetch itself meets the dead replica first.
    let dst = pki.client("dst", &urls);
    let fetched = dst.fetch_key(issued.id).await.unwrap();
    assert_eq!(
        fetched.material.key.expose_secret(),
        issued.material.key.expose_secret()
    );
    assert_eq!(src.outcome(issued.id).await.unwrap().outcome, None);
}

/// A "replica" that accepts TCP connections and closes them at once (the TLS handshake
/// fails): counted, to see which calls reach it.
async fn closing_listener() -> (String, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (url, accepted)
}

/// After a failover the client starts at the replica that answered: the broken first
/// one is not tried again while the second answers.
#[tokio::test]
async fn the_client_stays_with_the_replica_that_answered() {
    let pki = Pki::new();
    let live = Replica::start(&pki, "b");
    let (broken, accepted) = closing_listener().await;
    let dst = pki.client("dst", &format!("{broken},{}", live.url()));
    dst.register(&encrypting()).await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the first call tried it"
    );
    for _ in 0..3 {
        dst.register(&encrypting()).await.unwrap();
        assert!(dst.host("dst").await.unwrap().is_some());
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "later calls went to the second"
    );
}

/// Replica A serves the first calls; it is killed between two calls, and the next ones
/// are served by B (which shows: B never heard of A's migration or registration).
#[tokio::test]
async fn a_killed_replica_hands_the_next_call_to_the_other() {
    let pki = Pki::new();
    let mut a = Replica::start(&pki, "a");
    let b = Replica::start(&pki, "b");
    let urls = format!("{},{}", a.url(), b.url());
    let (src, dst) = (pki.client("src", &urls), pki.client("dst", &urls));
    let b_only = pki.client("src", &b.url());
    dst.register(&encrypting()).await.unwrap();
    let on_a = src.create_migration("vm-1", "dst").await.unwrap();
    assert!(on_a.destination.is_some(), "A has dst's registration");
    assert_eq!(src.outcome(on_a.id).await.unwrap().outcome, None);
    assert!(
        b_only.host("dst").await.unwrap().is_none(),
        "served by A, not B"
    );

    a.kill();
    let on_b = src.create_migration("vm-2", "dst").await.unwrap();
    assert!(
        on_b.destination.is_none(),
        "B has no registration of dst: B answered"
    );
    assert_eq!(src.outcome(on_b.id).await.unwrap().outcome, None);
    let e = src.outcome(on_a.id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    dst.register(&encrypting()).await.unwrap();
    assert!(b_only.host("dst").await.unwrap().is_some());
}

/// Replica A shuts down between two calls: the connection the client keeps to it is
/// answered `unavailable`, and the call moves on to B.
#[tokio::test]
async fn a_replica_shutting_down_passes_the_call_on() {
    let pki = Pki::new();
    let mut a = Replica::start(&pki, "a");
    let b = Replica::start(&pki, "b");
    let dst = pki.client("dst", &format!("{},{}", a.url(), b.url()));
    let a_only = pki.client("dst", &a.url());
    let b_only = pki.client("src", &b.url());
    dst.register(&encrypting()).await.unwrap();
    assert!(a_only.host("dst").await.unwrap().is_some());
    assert!(b_only.host("dst").await.unwrap().is_none(), "served by A");

    a.shut_down();
    // What a kept connection gets from A now: a client of A alone has no one else to ask.
    let e = a_only.host("dst").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    dst.register(&encrypting()).await.unwrap();
    assert!(b_only.host("dst").await.unwrap().is_some(), "served by B");
}

/// A "replica" with the service's certificate that reads one request and drops the
/// connection without answering: whatever it was asked may have happened. Keeps the
/// bodies of the requests it swallowed.
async fn swallowing_replica(pki: &Pki) -> (String, Arc<Mutex<Vec<String>>>) {
    let f = &pki.files;
    let config = vmotion_keyservice::tls::server_config(
        &f.ca(),
        &f.dir.join("keyservice.pem"),
        &f.dir.join("keyservice-key.pem"),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let swallowed = Arc::new(Mutex::new(Vec::new()));
    let kept = swallowed.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if let Some(body) = read_request(&mut tls).await {
                kept.lock().unwrap().push(body);
            }
        }
    });
    (url, swallowed)
}

/// One HTTP/1.1 request's body (empty for none), or `None` if the connection ended first.
async fn read_request(tls: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into());
            }
        }
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A create whose request may have reached a replica is sent again (to the next
/// replica, then round again), every time with the request id the call drew; the next
/// call draws a new one.
#[tokio::test]
async fn a_create_sent_again_carries_the_same_request_id() {
    let pki = Pki::new();
    let (one, first) = swallowing_replica(&pki).await;
    let (two, second) = swallowing_replica(&pki).await;
    let src = pki.client("src", &format!("{one},{two}"));
    let e = src.create_migration("vm-1", "dst").await.unwrap_err();
    assert!(matches!(e, ClientError::Exhausted { .. }), "{e}");
    let id_of = |body: &String| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["request_id"].as_str().unwrap().to_owned()
    };
    let (first, second) = (
        first.lock().unwrap().clone(),
        second.lock().unwrap().clone(),
    );
    assert!(
        !first.is_empty() && !second.is_empty(),
        "{first:?} {second:?}"
    );
    let ids: HashSet<String> = first.iter().chain(&second).map(id_of).collect();
    assert_eq!(ids.len(), 1, "one request id for every retry: {ids:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(id.len(), 32);
    assert!(
        id.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );

    let (single, bodies) = swallowing_replica(&pki).await;
    let src = pki.client("src", &single);
    src.create_migration("vm-1", "dst").await.unwrap_err();
    let again: HashSet<String> = bodies.lock().unwrap().iter().map(id_of).collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(
        again.into_iter().next().unwrap(),
        id,
        "a new call, a new id"
    );
}

/// The key fetch is single-use: once its request may have reached a replica it is never
/// sent again, and the error says the key's state is unknown. The key is in fact still
/// unfetched at B, which the fetch never reached. Idempotent calls do move on.
#[tokio::test]
async fn a_key_fetch_that_may_have_arrived_is_never_sent_again() {
    let pki = Pki::new();
    let b = Replica::start(&pki, "b");
    let (swallower, swallowed) = swallowing_replica(&pki).await;
    let src = pki.client("src", &b.url());
    pki.client("dst", &b.url())
        .register(&encrypting())
        .await
        .unwrap();
    let issued = src.create_migration("vm-1", "dst").await.unwrap();

    let dst = pki.client("dst", &format!("{swallower},{}", b.url()));
    let e = dst.fetch_key(issued.id).await.unwrap_err();
    assert!(matches!(e, ClientError::KeyStateUnknown(_)), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains("key is unknown") && shown.contains("retry the migration from the source"),
        "{shown}"
    );
    assert_eq!(swallowed.lock().unwrap().len(), 1);
    let fetched = pki.client("dst", &b.url()).fetch_key(issued.id).await;
    assert!(
        fetched.is_ok(),
        "B never saw the fetch: {:?}",
        fetched.err()
    );

    // Registering is idempotent: swallowed by the first, sent again to B.
    let record = dst.register(&encrypting()).await.unwrap();
    assert_eq!(record.host, "dst");
    assert_eq!(swallowed.lock().unwrap().len(), 2);
}
