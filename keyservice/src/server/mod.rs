//! The HTTPS server: mutual TLS, routing, the audit log and the journal.

mod log;
pub(crate) mod state;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use vmotion_proto::MigrationId;
use zeroize::Zeroizing;

use crate::api::{
    CreateMigrationRequest, CreateMigrationResponse, ErrorBody, ErrorCode, FetchKeyResponse,
    OutcomeRequest, RegisterRequest,
};
use crate::config::Config;
use log::LogFile;
use state::{JournalEntry, Refused, State, parse_id};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How often expired keys and registrations are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The listening socket.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The journal or the audit log.
    #[error("{path}: {message}")]
    Journal {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

struct Shared {
    state: Mutex<State>,
    journal: LogFile,
    audit: LogFile,
    key_ttl: Duration,
    registry_ttl: Duration,
    rng: ring::rand::SystemRandom,
}

/// A bound, not yet running, key service.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads the journal; a torn last line (a crash mid-write) is ignored, any other bad
/// line is an error naming it.
fn read_journal(path: &std::path::Path) -> Result<Vec<JournalEntry>, ServeError> {
    let err = |message: String| ServeError::Journal {
        path: path.to_owned(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(format!("cannot read: {e}"))),
    };
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut entries = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(e) => entries.push(e),
            Err(_) if i + 1 == lines.len() && !complete => {
                tracing::warn!(line = i + 1, "ignoring a torn last journal line");
            }
            Err(e) => return Err(err(format!("line {}: {e}", i + 1))),
        }
    }
    Ok(entries)
}

impl Server {
    /// Loads TLS material, replays the journal and binds the listening socket.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let tls = crate::tls::server_config(&config.ca, &config.cert, &config.key)?;
        let mut state = State::default();
        let restored = state.replay(read_journal(&config.journal)?, Instant::now(), unix_ms());
        tracing::info!(restored, journal = %config.journal.display(), "journal replayed");
        let open = |path: &std::path::Path, sync| {
            LogFile::open(path, sync).map_err(|e| ServeError::Journal {
                path: path.to_owned(),
                message: format!("cannot open for appending: {e}"),
            })
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            journal: open(&config.journal, true)?,
            audit: open(&config.audit_log, false)?,
            key_ttl: config.key_ttl,
            registry_ttl: config.registry_ttl,
            rng: ring::rand::SystemRandom::new(),
        });
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: config.listen,
                    source,
                })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            shared,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then zeroizes every key and flushes the logs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let sweeper = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    lock(&shared.state).expire(Instant::now(), shared.key_ttl);
                }
            }
        });
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(connection(self.acceptor.clone(), shared.clone(), tcp, peer));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        sweeper.abort();
        let held = {
            let mut state = lock(&shared.state);
            let held = state.keys_held();
            state.drop_all_keys();
            held
        };
        tracing::info!(keys_zeroized = held, "shutting down");
        let _ = shared.journal.flush().await;
        let _ = shared.audit.flush().await;
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock would be a bug; keep serving rather than cascade.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn connection(
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            shared.audit.append(audit_line(
                "-",
                "tls_handshake",
                None,
                "refused",
                Some(&e.to_string()),
            ));
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let Some(caller) = crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        tracing::info!(%peer, "client certificate has no DNS name; closing");
        shared.audit.append(audit_line(
            "-",
            "tls_handshake",
            None,
            "refused",
            Some("no DNS name in the client certificate"),
        ));
        return;
    };
    let caller: Arc<str> = caller.into();
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let caller = caller.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &caller, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[derive(Serialize)]
struct AuditLine<'a> {
    time_ms: u64,
    caller: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    migration_id: Option<&'a str>,
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

fn audit_line(
    caller: &str,
    action: &str,
    migration_id: Option<&str>,
    result: &str,
    detail: Option<&str>,
) -> String {
    serde_json::to_string(&AuditLine {
        time_ms: unix_ms(),
        caller,
        action,
        migration_id,
        result,
        detail,
    })
    .expect("plain strings serialize")
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

fn error_response(Refused(code, message): Refused) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(code.status()).expect("valid status");
    json_response(
        status,
        serde_json::to_vec(&ErrorBody {
            error: code,
            message,
        })
        .expect("serializes"),
    )
}

fn ok_json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(value).expect("serializes"),
    )
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Refused> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Refused(ErrorCode::BadRequest, format!("cannot read the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| Refused(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
}

/// One request: route, act, audit.
async fn handle(shared: &Shared, caller: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (action, id_text, result) = match (&method, segments.as_slice()) {
        (&Method::POST, ["v1", "hosts", "register"]) => {
            ("register_host", None, register(shared, caller, req).await)
        }
        (&Method::GET, ["v1", "hosts", host]) => ("read_host", None, read_host(shared, host)),
        (&Method::POST, ["v1", "migrations"]) => {
            let (id, r) = create(shared, caller, req).await;
            ("create_migration", id, r)
        }
        (&Method::POST, ["v1", "migrations", id, "key"]) => (
            "fetch_key",
            Some((*id).to_owned()),
            fetch(shared, caller, id),
        ),
        (&Method::PUT, ["v1", "migrations", id, "outcome"]) => (
            "record_outcome",
            Some((*id).to_owned()),
            record_outcome(shared, caller, id, req).await,
        ),
        (&Method::GET, ["v1", "migrations", id, "outcome"]) => (
            "read_outcome",
            Some((*id).to_owned()),
            read_outcome(shared, caller, id),
        ),
        _ => (
            "unknown_route",
            None,
            Err(Refused(
                ErrorCode::NotFound,
                format!("no route for {method} {path}"),
            )),
        ),
    };
    let (response, outcome, detail) = match result {
        Ok((response, detail)) => (response, "ok".to_owned(), detail),
        Err(refused) => {
            let code = serde_json::to_value(refused.0)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let detail = Some(refused.1.clone());
            (error_response(refused), code, detail)
        }
    };
    // The id is echoed only if it is well-formed: an attacker's path is not logged raw.
    let id_text = id_text.filter(|t| parse_id(t).is_ok());
    shared.audit.append(audit_line(
        caller,
        action,
        id_text.as_deref(),
        &outcome,
        detail.as_deref(),
    ));
    tracing::debug!(caller, action, result = %outcome, "request");
    response
}

type Handled = Result<(Response<Full<Bytes>>, Option<String>), Refused>;

async fn register(shared: &Shared, caller: &str, req: Request<Incoming>) -> Handled {
    let r: RegisterRequest = body(req).await?;
    let detail = format!("can_encrypt={}", r.can_encrypt);
    let record =
        lock(&shared.state).register(caller, r, Instant::now(), unix_ms(), shared.registry_ttl);
    Ok((ok_json(&record), Some(detail)))
}

fn read_host(shared: &Shared, host: &str) -> Handled {
    match lock(&shared.state).host(host, Instant::now()) {
        Some(record) => Ok((ok_json(&record), None)),
        None => Err(Refused(
            ErrorCode::NotFound,
            format!("host {host} is not registered"),
        )),
    }
}

async fn create(
    shared: &Shared,
    caller: &str,
    req: Request<Incoming>,
) -> (Option<String>, Handled) {
    let r: CreateMigrationRequest = match body(req).await {
        Ok(r) => r,
        Err(e) => return (None, Err(e)),
    };
    let mut key = Zeroizing::new([0u8; 32]);
    let mut nonce = [0u8; 8];
    let mut id = [0u8; 16];
    let drawn = ring::rand::SecureRandom::fill(&shared.rng, &mut *key)
        .and_then(|()| ring::rand::SecureRandom::fill(&shared.rng, &mut nonce))
        .and_then(|()| ring::rand::SecureRandom::fill(&shared.rng, &mut id));
    if drawn.is_err() {
        return (
            None,
            Err(Refused(
                ErrorCode::Internal,
                "the OS random generator failed".into(),
            )),
        );
    }
    let id = MigrationId(id);
    let created = lock(&shared.state).create(
        caller,
        &r.vm,
        &r.destination,
        id,
        *key,
        nonce,
        Instant::now(),
        unix_ms(),
        shared.key_ttl,
    );
    let created = match created {
        Ok(c) => c,
        Err(e) => return (None, Err(e)),
    };
    // Not awaited: a crash before this line is on disk loses a migration that can then
    // never be committed (recording its outcome fails), so the source keeps the VM.
    shared
        .journal
        .append(serde_json::to_string(&created.journal).expect("serializes"));
    let expires_at_ms = unix_ms() + u64::try_from(shared.key_ttl.as_millis()).unwrap_or(u64::MAX);
    let response = CreateMigrationResponse {
        migration_id: id.to_string(),
        key: Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(created.key)),
        nonce: hex(&created.nonce),
        expires_at_ms,
        destination: created.destination.clone(),
    };
    // The body moves into hyper (no further copy); hyper's buffers are not wiped, see
    // docs/keyservice-api.md, "Known limitation".
    let body = serde_json::to_vec(&response).expect("serializes");
    let detail = format!(
        "vm={} destination={} registered={}",
        r.vm,
        r.destination,
        created.destination.is_some()
    );
    (
        Some(id.to_string()),
        Ok((json_response(StatusCode::OK, body), Some(detail))),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fetch(shared: &Shared, caller: &str, id: &str) -> Handled {
    let id = parse_id(id)?;
    let fetched = lock(&shared.state).fetch_key(caller, id, Instant::now())?;
    let response = FetchKeyResponse {
        migration_id: id.to_string(),
        key: Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(fetched.material.key.expose_secret()),
        ),
        nonce: hex(&fetched.material.nonce.0),
        source: fetched.source.clone(),
        vm: fetched.vm.clone(),
    };
    let body = serde_json::to_vec(&response).expect("serializes");
    Ok((json_response(StatusCode::OK, body), None))
}

async fn record_outcome(
    shared: &Shared,
    caller: &str,
    id: &str,
    req: Request<Incoming>,
) -> Handled {
    let id = parse_id(id)?;
    let r: OutcomeRequest = body(req).await?;
    let (record, journal) = lock(&shared.state).record_outcome(caller, id, r.outcome, unix_ms())?;
    if let Some(entry) = journal {
        // The answer waits for the fsync: a recorded outcome survives any crash after it.
        let line = serde_json::to_string(&entry).expect("serializes");
        if let Err(e) = shared.journal.append_durable(line).await {
            lock(&shared.state).forget_outcome(id);
            return Err(Refused(
                ErrorCode::Internal,
                format!("the journal write failed: {e}"),
            ));
        }
    }
    Ok((
        ok_json(&record),
        Some(format!("{:?}", r.outcome).to_lowercase()),
    ))
}

fn read_outcome(shared: &Shared, caller: &str, id: &str) -> Handled {
    let id = parse_id(id)?;
    let record = lock(&shared.state).outcome(caller, id)?;
    Ok((ok_json(&record), None))
}
