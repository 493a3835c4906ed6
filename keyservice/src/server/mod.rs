//! The HTTPS server: mutual TLS, routing, the audit log and the journal.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    Maintenance, OutcomeRequest, RegisterRequest,
};
use crate::config::Config;
use crate::logfile::LogFile;
use crate::store::rules::{InFlight, Refused, parse_id, parse_request_id};
use crate::store::{CreateRequest, Store, unix_ms};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How often expired keys and registrations are swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request's head must arrive within this (also ends idle keep-alive connections; the
/// client reconnects transparently).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A request body must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait in the kernel's accept queue. Well under
/// the usual 1024 open-file limit, so a flood of idle sockets cannot exhaust descriptors.
const MAX_CONNECTIONS: usize = 512;
/// Longest request path echoed into the audit log.
const MAX_AUDITED_PATH: usize = 128;

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
    /// The store (etcd unreachable at start, a KEK that cannot be read, ...).
    #[error("the store: {0}")]
    Store(String),
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
    store: Store,
    /// Set at shutdown: every request from then on is refused, so no key is issued after
    /// the keys were zeroized.
    closing: std::sync::atomic::AtomicBool,
    audit: LogFile,
    rng: ring::rand::SystemRandom,
    /// Open connections per certified host, and the most one may hold (0: no limit).
    connections: Mutex<std::collections::HashMap<Arc<str>, usize>>,
    connections_per_host: usize,
    /// Each host's request budget (a token bucket), and its rate (0: no limit).
    rates: Mutex<std::collections::HashMap<String, Bucket>>,
    requests_per_second: u32,
    /// Who may put any host in maintenance.
    admins: Vec<String>,
    metrics: crate::metrics::KsMetrics,
}

/// A token bucket: `tokens` requests may go now; it refills at the host's rate up to
/// twice that.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Shared {
    /// Runs one store operation, its time observed as `op`'s store latency.
    async fn stored<T>(&self, op: &'static str, f: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        self.metrics.store(op, started.elapsed());
        out
    }

    /// Takes one request from `caller`'s budget, or refuses it.
    fn admit(&self, caller: &str) -> Result<(), Refused> {
        if self.requests_per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(self.requests_per_second);
        let burst = 2.0 * rate;
        let now = Instant::now();
        let mut rates = self
            .rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if rates.len() > 4096 {
            // Only certified hosts get here; forget the idle ones rather than grow.
            rates.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(10));
        }
        // A host seen before costs no allocation.
        if !rates.contains_key(caller) {
            rates.insert(
                caller.to_owned(),
                Bucket {
                    tokens: burst,
                    at: now,
                },
            );
        }
        let b = rates.get_mut(caller).expect("inserted above");
        b.tokens = (b.tokens + rate * now.duration_since(b.at).as_secs_f64()).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(Refused::new(
                ErrorCode::RateLimited,
                format!(
                    "this host sends more than {} requests per second; retry shortly",
                    self.requests_per_second
                ),
            ));
        }
        b.tokens -= 1.0;
        Ok(())
    }
}

/// A bound, not yet running, key service.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    /// `metrics_listen`, bound.
    metrics: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads TLS material, replays the journal and binds the listening socket.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let tls = crate::tls::server_config(&config.ca, &config.cert, &config.key)?;
        let store = Store::open(config).await?;
        let audit = LogFile::open(&config.audit_log, false).map_err(|e| ServeError::Journal {
            path: config.audit_log.clone(),
            message: format!("cannot open for appending: {e}"),
        })?;
        let shared = Arc::new(Shared {
            store,
            closing: std::sync::atomic::AtomicBool::new(false),
            audit,
            connections: Mutex::default(),
            connections_per_host: config.connections_per_host,
            rates: Mutex::default(),
            requests_per_second: config.requests_per_second_per_host,
            admins: config.admins.clone(),
            metrics: crate::metrics::KsMetrics::new(),
            rng: ring::rand::SystemRandom::new(),
        });
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Listen { addr, source })?,
            ),
            None => None,
        };
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
            metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then zeroizes every key and flushes the logs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let metrics = self.metrics.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics at /metrics");
            }
            let shared = shared.clone();
            let render = Arc::new(move || shared.metrics.render());
            tokio::spawn(vmotion_metrics::serve(listener, render))
        });
        let sweeper = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    shared.store.sweep();
                }
            }
        });
        tokio::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let (acceptor, shared) = (self.acceptor.clone(), shared.clone());
                        tokio::spawn(async move {
                            connection(acceptor, shared, tcp, peer).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        sweeper.abort();
        if let Some(m) = metrics {
            m.abort();
        }
        shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let held = shared.store.close().await;
        tracing::info!(keys_zeroized = held, "shutting down");
        let _ = shared.audit.flush().await;
    }
}

async fn connection(
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let refused = |shared: &Shared, detail: &str| {
        shared.audit.append(audit_line(&Audit {
            peer,
            action: "tls_handshake",
            result: "refused",
            detail: Some(detail),
            ..Audit::default()
        }));
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            refused(&shared, &e.to_string());
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            refused(&shared, "the TLS handshake timed out");
            return;
        }
    };
    let Some(caller) = crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        tracing::info!(%peer, "client certificate names no usable host; closing");
        refused(
            &shared,
            "the client certificate must name exactly one host (a DNS name, no wildcard)",
        );
        return;
    };
    let caller: Arc<str> = caller.into();
    let Some(_held) = HostConnection::open(&shared, &caller) else {
        too_many_connections(&shared, &caller, peer, tls).await;
        return;
    };
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let caller = caller.clone();
        // Each request runs to its end on a task of its own, even if its client goes away
        // (hyper drops the service future of a closed connection): an outcome step must
        // never stop between marking the record as being written and confirming its
        // journal line, or every later step of that migration is refused `unavailable`.
        let request = tokio::spawn(async move { handle(&shared, &caller, peer, req).await });
        async move {
            Ok::<_, Infallible>(request.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a request handler failed");
                error_response(Refused::new(
                    ErrorCode::Internal,
                    "the request handler failed",
                ))
            }))
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// One open connection of a certified host, counted while it lives.
struct HostConnection {
    shared: Arc<Shared>,
    host: Arc<str>,
}

impl HostConnection {
    /// Counts a new connection of `host`, or `None` when it already holds its limit.
    fn open(shared: &Arc<Shared>, host: &Arc<str>) -> Option<Self> {
        let mut open = shared
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(host.clone()).or_default();
        if shared.connections_per_host != 0 && *n >= shared.connections_per_host {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            host: host.clone(),
        })
    }
}

impl Drop for HostConnection {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.host);
            }
        }
    }
}

/// A connection over its host's limit: its first request is answered
/// `too_many_connections` (so the client learns why), audited, and the connection closed.
async fn too_many_connections(
    shared: &Arc<Shared>,
    caller: &Arc<str>,
    peer: SocketAddr,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) {
    let detail = format!(
        "this host already holds {} connections to the key service",
        shared.connections_per_host
    );
    tracing::warn!(host = %caller, %peer, "{detail}; refusing another");
    shared.audit.append(audit_line(&Audit {
        caller,
        peer,
        action: "connect",
        result: "too_many_connections",
        detail: Some(&detail),
        ..Audit::default()
    }));
    let service = hyper::service::service_fn(move |_req| {
        let answer = error_response(Refused::new(ErrorCode::TooManyConnections, detail.clone()));
        async move { Ok::<_, Infallible>(answer) }
    });
    let _ = tokio::time::timeout(
        BODY_TIMEOUT,
        hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), service),
    )
    .await;
}

/// One audit record. Never holds key material: only names, ids, addresses and results.
#[derive(Serialize)]
struct AuditLine<'a> {
    time_ms: u64,
    #[serde(flatten)]
    audit: &'a Audit<'a>,
}

#[derive(Serialize)]
struct Audit<'a> {
    caller: &'a str,
    peer: SocketAddr,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    migration_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<&'a str>,
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// After a create: migrations in flight from its source, to its destination and in
    /// the cluster, counted where the create was decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight: Option<InFlight>,
}

impl Default for Audit<'_> {
    fn default() -> Self {
        Self {
            caller: "-",
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            action: "",
            migration_id: None,
            vm: None,
            destination: None,
            result: "",
            detail: None,
            in_flight: None,
        }
    }
}

fn audit_line(audit: &Audit<'_>) -> String {
    serde_json::to_string(&AuditLine {
        time_ms: unix_ms(),
        audit,
    })
    .expect("plain strings serialize")
}

/// A string cut to a length fit for the audit log, at a char boundary.
fn short(s: &str) -> &str {
    let mut end = s.len().min(MAX_AUDITED_PATH);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// A body holding key material: hyper sends from this buffer itself, and it is wiped when
/// hyper drops it.
fn secret_json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    let mut body = Zeroizing::new(Vec::with_capacity(512));
    serde_json::to_writer(&mut *body, value).expect("serializes");
    json_response(StatusCode::OK, Bytes::from_owner(body))
}

fn error_response(Refused(code, message, hint): Refused) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(code.status()).expect("valid status");
    let mut response = json_response(
        status,
        serde_json::to_vec(&ErrorBody {
            error: code,
            message,
            migration_id: hint.migration_id.map(|id| id.to_string()),
            retry_after_ms: hint.retry_after_ms,
        })
        .expect("serializes"),
    );
    if let Some(ms) = hint.retry_after_ms {
        let secs = ms.div_ceil(1000).max(1);
        response
            .headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from(secs));
    }
    response
}

fn ok_json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(value).expect("serializes"),
    )
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Refused> {
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| Refused::new(ErrorCode::BadRequest, "the body did not arrive in time"))?
        .map_err(|e| Refused::new(ErrorCode::BadRequest, format!("cannot read the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| Refused::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
}

/// What a handler tells the audit log besides the result.
#[derive(Default)]
struct Noted {
    migration_id: Option<MigrationId>,
    in_flight: Option<InFlight>,
    vm: Option<String>,
    destination: Option<String>,
}

type Handled = Result<Response<Full<Bytes>>, Refused>;

/// One request: route, act, audit.
async fn handle(
    shared: &Shared,
    caller: &str,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut noted = Noted::default();
    let (action, result) = if shared.closing.load(std::sync::atomic::Ordering::SeqCst) {
        (
            "refused_at_shutdown",
            Err(Refused::new(
                ErrorCode::Unavailable,
                "the key service is shutting down",
            )),
        )
    } else if let Err(refused) = shared.admit(caller) {
        ("rate_limited", Err(refused))
    } else {
        match (&method, segments.as_slice()) {
            (&Method::POST, ["v1", "hosts", "register"]) => {
                ("register_host", register(shared, caller, req).await)
            }
            (&Method::GET, ["v1", "hosts", host]) => ("read_host", read_host(shared, host).await),
            (&Method::PUT, ["v1", "hosts", host, "maintenance"]) => (
                "set_maintenance",
                set_maintenance(shared, caller, host, req, &mut noted).await,
            ),
            (&Method::GET, ["v1", "hosts", host, "maintenance"]) => {
                ("read_maintenance", read_maintenance(shared, host).await)
            }
            (&Method::POST, ["v1", "migrations"]) => (
                "create_migration",
                create(shared, caller, req, &mut noted).await,
            ),
            (&Method::POST, ["v1", "migrations", id, "key"]) => {
                ("fetch_key", fetch(shared, caller, id, &mut noted).await)
            }
            (&Method::PUT, ["v1", "migrations", id, "outcome"]) => (
                "record_outcome",
                record_outcome(shared, caller, id, req, &mut noted).await,
            ),
            (&Method::GET, ["v1", "migrations", id, "outcome"]) => (
                "read_outcome",
                read_outcome(shared, caller, id, &mut noted).await,
            ),
            _ => (
                "unknown_route",
                Err(Refused::new(
                    ErrorCode::NotFound,
                    format!("no route for {method} {}", short(&path)),
                )),
            ),
        }
    };
    let (response, result, detail) = match result {
        Ok(response) => (response, "ok".to_owned(), None),
        Err(refused) => {
            let code = serde_json::to_value(refused.0)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let detail = Some(short(&refused.1).to_owned());
            (error_response(refused), code, detail)
        }
    };
    shared.metrics.request(action, &result, started.elapsed());
    let id = noted.migration_id.map(|id| id.to_string());
    shared.audit.append(audit_line(&Audit {
        caller,
        peer,
        action,
        migration_id: id.as_deref(),
        vm: noted.vm.as_deref().map(short),
        destination: noted.destination.as_deref().map(short),
        result: &result,
        detail: detail.as_deref(),
        in_flight: noted.in_flight,
    }));
    tracing::debug!(caller, action, result = %result, "request");
    response
}

async fn register(shared: &Shared, caller: &str, req: Request<Incoming>) -> Handled {
    let r: RegisterRequest = body(req).await?;
    let record = shared
        .stored("register", shared.store.register(caller, r))
        .await?;
    Ok(ok_json(&record))
}

async fn read_host(shared: &Shared, host: &str) -> Handled {
    let host = crate::tls::canonical_host(host)
        .ok_or_else(|| Refused::new(ErrorCode::BadRequest, "not a valid host name"))?;
    match shared.stored("host", shared.store.host(&host)).await? {
        Some(record) => Ok(ok_json(&record)),
        None => Err(Refused::new(
            ErrorCode::NotFound,
            format!("host {host} is not registered"),
        )),
    }
}

async fn set_maintenance(
    shared: &Shared,
    caller: &str,
    host: &str,
    req: Request<Incoming>,
    noted: &mut Noted,
) -> Handled {
    let host = crate::tls::canonical_host(host)
        .ok_or_else(|| Refused::new(ErrorCode::BadRequest, "not a valid host name"))?;
    noted.destination = Some(host.clone());
    let m: Maintenance = body(req).await?;
    let set = shared
        .store
        .set_draining(caller, &shared.admins, &host, m.draining);
    shared.stored("set_draining", set).await?;
    tracing::info!(caller, %host, draining = m.draining, "maintenance");
    Ok(ok_json(&m))
}

async fn read_maintenance(shared: &Shared, host: &str) -> Handled {
    let host = crate::tls::canonical_host(host)
        .ok_or_else(|| Refused::new(ErrorCode::BadRequest, "not a valid host name"))?;
    let draining = shared
        .stored("is_draining", shared.store.is_draining(&host))
        .await?;
    Ok(ok_json(&Maintenance { draining }))
}

async fn create(
    shared: &Shared,
    caller: &str,
    req: Request<Incoming>,
    noted: &mut Noted,
) -> Handled {
    let r: CreateMigrationRequest = body(req).await?;
    noted.vm = Some(r.vm.clone());
    noted.destination = Some(r.destination.clone());
    let destination = crate::tls::canonical_host(&r.destination).ok_or_else(|| {
        Refused::new(
            ErrorCode::BadRequest,
            "the destination is not a valid host name",
        )
    })?;
    let request = r.request_id.as_deref().map(parse_request_id).transpose()?;
    let create = shared.store.create(
        CreateRequest {
            caller,
            vm: &r.vm,
            destination: &destination,
            request,
            abort_stale: r.abort_stale,
        },
        &shared.rng,
    );
    let created = shared.stored("create", create).await?;
    noted.migration_id = Some(created.id);
    noted.in_flight = Some(created.in_flight);
    let response = CreateMigrationResponse {
        migration_id: created.id.to_string(),
        key: Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(created.key)),
        nonce: hex(&created.nonce),
        expires_at_ms: created.expires_at_ms,
        destination: created.destination.clone(),
    };
    Ok(secret_json(&response))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn fetch(shared: &Shared, caller: &str, id: &str, noted: &mut Noted) -> Handled {
    let id = parse_id(id)?;
    noted.migration_id = Some(id);
    let fetched = shared
        .stored("fetch_key", shared.store.fetch_key(caller, id))
        .await?;
    let response = FetchKeyResponse {
        migration_id: id.to_string(),
        key: Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(fetched.material.key.expose_secret()),
        ),
        nonce: hex(&fetched.material.nonce.0),
        source: fetched.source.clone(),
        vm: fetched.vm.clone(),
    };
    Ok(secret_json(&response))
}

async fn record_outcome(
    shared: &Shared,
    caller: &str,
    id: &str,
    req: Request<Incoming>,
    noted: &mut Noted,
) -> Handled {
    let id = parse_id(id)?;
    noted.migration_id = Some(id);
    let r: OutcomeRequest = body(req).await?;
    let record = shared.store.record_outcome(caller, id, r.outcome);
    let record = shared.stored("record_outcome", record).await?;
    Ok(ok_json(&record))
}

async fn read_outcome(shared: &Shared, caller: &str, id: &str, noted: &mut Noted) -> Handled {
    let id = parse_id(id)?;
    noted.migration_id = Some(id);
    let record = shared
        .stored("outcome", shared.store.outcome(caller, id))
        .await?;
    Ok(ok_json(&record))
}
