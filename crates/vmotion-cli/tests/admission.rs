//! `vmotion-send` against a key service that will not admit the migration: `busy` (it
//! waits its turn, up to `--queue-timeout`) and `vm_in_flight` (`--abort-stale`). The
//! real key service does not give these answers yet, so a stand-in does, over real
//! mutual TLS with the dev PKI: it answers every create with the refusal it was built
//! with and records the request bodies.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A key service that refuses every create with `status` and `body`.
struct Refusing {
    addr: SocketAddr,
    creates: Arc<Mutex<Vec<serde_json::Value>>>,
    _rt: tokio::runtime::Runtime,
}

impl Refusing {
    fn start(w: &World, status: &'static str, body: String) -> Self {
        let config = vmotion_keyservice::tls::server_config(
            &w.p("ca.pem"),
            &w.p("keyservice.pem"),
            &w.p("keyservice-key.pem"),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let creates = Arc::new(Mutex::new(Vec::new()));
        let seen = creates.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, body) = (acceptor.clone(), seen.clone(), body.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, status, &body, &seen).await;
                    }
                });
            }
        });
        Self {
            addr,
            creates,
            _rt: rt,
        }
    }

    fn creates(&self) -> Vec<serde_json::Value> {
        self.creates.lock().unwrap().clone()
    }

    /// `vmotion-send` of VM `web` from `src` to `dst` through this key service, to a
    /// receiver address nothing listens on (it is never reached).
    fn send(&self, w: &World, extra: &[&str]) -> (std::process::Output, Duration) {
        let mut cmd = w.send_command("web", "127.0.0.1:9", false);
        let mut identity = w.identity("src");
        identity[1] = format!("https://{}", self.addr);
        cmd.args(identity)
            .args(["--destination", "dst", "--synthetic-mib", "1"])
            .args(extra);
        let started = Instant::now();
        let out = cmd.output().unwrap();
        (out, started.elapsed())
    }
}

/// Answers each request on one connection: creates with the refusal, anything else
/// `not_found`.
async fn serve(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    status: &str,
    refusal: &str,
    creates: &Mutex<Vec<serde_json::Value>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < end + 4 + length {
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..end + 4 + length).skip(end + 4).collect();
        let (status, answer) = if head.starts_with("post /v1/migrations ") {
            creates
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            (status, refusal.to_owned())
        } else {
            (
                "404 Not Found",
                r#"{"error":"not_found","message":"no such route"}"#.to_owned(),
            )
        };
        let out = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if tls.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn world() -> World {
    let w = World::new();
    w.policy("web", "encryption = \"required\"\n");
    w
}

const BUSY: &str =
    r#"{"error":"busy","message":"2 migrations in flight to dst, its limit","retry_after_ms":200}"#;

/// Busy for longer than `--queue-timeout 1s`: the sender shows it is queued, asks again
/// (each time a new create with a new request id), and gives up with exit 3 at the
/// timeout, nothing sent.
#[test]
fn a_busy_key_service_queues_vmotion_send_until_its_queue_timeout() {
    let w = world();
    let ks = Refusing::start(&w, "503 Service Unavailable", BUSY.into());
    let (o, took) = ks.send(&w, &["--queue-timeout", "1s"]);
    expect(
        &o,
        3,
        &[
            "refused, the VM keeps running at the source",
            "queued: waiting for an admission slot at the key service",
            "no admission slot within the queue timeout",
            "its limit",
            "--queue-timeout",
        ],
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    let creates = ks.creates();
    assert!(creates.len() >= 3, "asked again after 200 ms: {creates:?}");
    let ids: std::collections::HashSet<&str> = creates
        .iter()
        .map(|c| c["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        creates.len(),
        "a new create per ask: {creates:?}"
    );
    assert!(ids.iter().all(|id| id.len() == 32), "{ids:?}");
}

/// `--queue-timeout 0`: no wait at all.
#[test]
fn queue_timeout_zero_fails_at_the_first_busy() {
    let w = world();
    let ks = Refusing::start(&w, "503 Service Unavailable", BUSY.into());
    let (o, took) = ks.send(&w, &["--queue-timeout", "0s"]);
    expect(&o, 3, &["the queue timeout is 0 (do not wait)"]);
    assert!(!text(&o).contains("queued:"), "{}", text(&o));
    assert_eq!(ks.creates().len(), 1);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// `vm_in_flight`: exit 3 naming the migration that holds the VM; `--abort-stale` is
/// suggested, and once given it reaches the key service (and the message then says it
/// did not apply).
#[test]
fn a_vm_in_flight_names_its_migration_and_abort_stale_is_sent() {
    let w = world();
    let holder = "ab".repeat(16);
    let body = format!(
        r#"{{"error":"vm_in_flight","message":"VM web has a migration in flight","migration_id":"{holder}"}}"#
    );
    let ks = Refusing::start(&w, "409 Conflict", body);
    let (o, _) = ks.send(&w, &[]);
    expect(
        &o,
        3,
        &[
            &format!("VM `web` already has migration {holder} in flight"),
            "run again with --abort-stale",
            "died before the switchover",
        ],
    );
    assert_eq!(ks.creates().len(), 1, "not a queue: asked once");
    assert!(ks.creates()[0].get("abort_stale").is_none());

    let (o, _) = ks.send(&w, &["--abort-stale"]);
    expect(&o, 3, &[holder.as_str(), "--abort-stale did not apply"]);
    assert!(
        !text(&o).contains("run again with --abort-stale"),
        "{}",
        text(&o)
    );
    assert_eq!(
        ks.creates()[1]["abort_stale"],
        serde_json::Value::Bool(true)
    );
}

/// `--abort-stale` means nothing without a key service: a usage error.
#[test]
fn abort_stale_needs_a_key_service() {
    let w = world();
    let o = w
        .send_command("web", "127.0.0.1:9", false)
        .args(["--synthetic-mib", "1", "--abort-stale"])
        .output()
        .unwrap();
    expect(&o, 2, &["--keyservice"]);
}
