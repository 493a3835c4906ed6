//! The async client senders and receivers use. It knows one or more replicas of the
//! service, keeps a TLS connection to each lazily (HTTP/1.1 keep-alive, reopened before a
//! request when the replica closed it), sends each call to the replica that last
//! answered, and moves to the next one on a failure as [`crate::failover`] says.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use vmotion_authority::{CreateOptions, FetchedKey};
use vmotion_proto::{
    DestinationCapability, KeyMaterial, MigrationId, MigrationKey, MigrationNonce,
};
use zeroize::Zeroizing;

use crate::api::{
    CreateMigrationRequest, CreateMigrationResponse, ErrorBody, ErrorCode, FetchKeyResponse,
    HostRecord, Maintenance, Outcome, OutcomeRecord, OutcomeRequest, RegisterRequest,
};
use crate::failover::{self, Failure, Idempotence, Schedule};
use crate::tls::{ClientIdentity, TlsError};

/// Largest answer accepted from the service.
const MAX_RESPONSE: usize = 1 << 20;

/// Errors talking to the key service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service URL (or list of URLs) is not usable; the message says why.
    #[error("{0}")]
    Url(String),
    /// The client's TLS credentials could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TCP connection failed (refused, unreachable, not within the connect timeout):
    /// the request was not sent.
    #[error("cannot connect to the key service at {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, certificate refused, not in time...): the
    /// request was not sent.
    #[error("TLS handshake with the key service at {addr} failed: {source}")]
    Handshake {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection was found closed before the request was written: it was not sent.
    #[error("the connection to the key service closed before the request was sent: {0}")]
    Closed(#[source] hyper::Error),
    /// HTTP-level failure after the request may have been written (the connection dropped
    /// mid-exchange, ...): the request may or may not have been processed.
    #[error("HTTP exchange with the key service failed: {0}")]
    Http(#[from] hyper::Error),
    /// The service refused the request.
    #[error("the key service refused ({status}, {code:?}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Machine-readable code.
        code: ErrorCode,
        /// The service's explanation.
        message: String,
        /// `vm_in_flight`: the migration holding the VM.
        migration_id: Option<MigrationId>,
        /// `busy`: how long the service asks the caller to wait.
        retry_after: Option<Duration>,
    },
    /// The service did not answer in time. The request may or may not have been
    /// processed: read the state back (e.g. the outcome) before acting.
    #[error("the key service did not answer within {0:?}")]
    Timeout(Duration),
    /// The service's answer did not parse.
    #[error("unexpected answer from the key service: {0}")]
    BadResponse(String),
    /// No replica answered within the call's time budget; `last` is the last failure.
    #[error(
        "no key service replica answered within {within:.1?} ({attempts} attempts over \
         {replicas}); the last failure: {last}"
    )]
    Exhausted {
        /// Requests tried, on all replicas together.
        attempts: u32,
        /// How long the call tried.
        within: Duration,
        /// The replicas, as configured.
        replicas: String,
        /// The last failure.
        #[source]
        last: Box<Self>,
    },
    /// A key fetch failed after its request may have reached the service: the key may
    /// have been handed out (and so spent) or not. It is never fetched again: the source
    /// retries the migration, with a new key.
    #[error(
        "the state of this migration's key is unknown: the request may have reached the \
         key service and spent the key ({0}); retry the migration from the source"
    )]
    KeyStateUnknown(#[source] Box<Self>),
    /// The OS random generator failed (for a create's request id).
    #[error("no OS randomness for the request id")]
    NoRandomness,
}

impl ClientError {
    /// The service's error code, if the service refused (for a call that tried several
    /// replicas, the last refusal).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            Self::Exhausted { last, .. } | Self::KeyStateUnknown(last) => last.code(),
            _ => None,
        }
    }
}

/// A migration as the source receives it from [`KeyServiceClient::create_migration`].
#[derive(Debug)]
pub struct IssuedMigration {
    /// The id both ends use.
    pub id: MigrationId,
    /// Key and nonce.
    pub material: KeyMaterial,
    /// When the key expires at the service (Unix ms).
    pub expires_at_ms: u64,
    /// The destination's registry entry, if registered.
    pub destination: Option<HostRecord>,
}

impl IssuedMigration {
    /// What the registry says about the destination, for the policy decision.
    pub fn destination_capability(&self) -> DestinationCapability {
        match &self.destination {
            None => DestinationCapability::Unregistered,
            Some(r) if r.encrypts() => DestinationCapability::Encrypts,
            Some(_) => DestinationCapability::DoesNotEncrypt,
        }
    }
}

/// One replica of the service and the connection to it, opened on first use.
struct Replica {
    addr: String,
    server_name: ServerName<'static>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// A client of the key service, authenticated by a host certificate.
pub struct KeyServiceClient {
    replicas: Vec<Replica>,
    /// The URLs as given, for logs and errors.
    names: Vec<String>,
    /// The replica that answered last: where the next call starts.
    preferred: AtomicUsize,
    connector: TlsConnector,
    schedule: Schedule,
}

impl std::fmt::Debug for KeyServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServiceClient")
            .field("replicas", &self.names)
            .finish_non_exhaustive()
    }
}

/// One request, as every attempt sends it.
struct Outgoing<'a> {
    method: Method,
    path: &'a str,
    body: Bytes,
}

impl Outgoing<'_> {
    fn request(&self, host: &str) -> Result<Request<Full<Bytes>>, ClientError> {
        Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(self.body.clone()))
            .map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}

/// Splits `https://HOST:PORT` (or `HOST:PORT`; IPv6 in brackets) into a socket address
/// string and the TLS server name.
fn parse_url(url: &str) -> Result<(String, ServerName<'static>), ClientError> {
    let bad = || {
        ClientError::Url(format!(
            "invalid key service URL `{url}`: expected https://HOST:PORT"
        ))
    };
    let rest = url
        .strip_prefix("https://")
        .unwrap_or(url)
        .trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() || bare.contains('/') {
        return Err(bad());
    }
    let name = ServerName::try_from(bare.to_owned()).map_err(|_| bad())?;
    Ok((format!("{host}:{port}"), name))
}

/// Parses a comma-separated list of replica URLs (one URL is a list of one). Blanks
/// around entries are ignored; an empty entry is an error, not skipped: it is a typo.
fn parse_urls(list: &str) -> Result<Vec<(String, String, ServerName<'static>)>, ClientError> {
    list.split(',')
        .enumerate()
        .map(|(i, url)| {
            let url = url.trim();
            if url.is_empty() {
                return Err(ClientError::Url(format!(
                    "key service URL list `{list}`: entry {} is empty; give one or more \
                     https://HOST:PORT separated by commas",
                    i + 1
                )));
            }
            let (addr, name) = parse_url(url)?;
            Ok((url.to_owned(), addr, name))
        })
        .collect()
}

/// A fresh request id: 128 random bits, 32 lowercase hex digits.
fn request_id() -> Result<String, ClientError> {
    let random = vmotion_proto::handshake_random().map_err(|_| ClientError::NoRandomness)?;
    Ok(random[..16].iter().map(|b| format!("{b:02x}")).collect())
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn key_material(key_b64: &str, nonce_hex: &str) -> Result<KeyMaterial, ClientError> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(key_b64)
            .map_err(|_| ClientError::BadResponse("the key is not base64".into()))?,
    );
    let key = MigrationKey::from_slice(&bytes)
        .ok_or_else(|| ClientError::BadResponse("the key is not 32 bytes".into()))?;
    let nonce = hex_array::<8>(nonce_hex)
        .ok_or_else(|| ClientError::BadResponse("the nonce is not 16 hex digits".into()))?;
    Ok(KeyMaterial {
        key,
        nonce: MigrationNonce(nonce),
    })
}

/// Reads a response's body; a connection that drops while it arrives is a failure that
/// may have reached the service (an [`ClientError::Http`]).
async fn read_answer(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(lost) => ClientError::Http(*lost),
            Err(other) => ClientError::BadResponse(format!("cannot read the answer: {other}")),
        })?
        .to_bytes();
    Ok((status, bytes))
}

/// A status and body as the call's answer: the body of a success, or the refusal.
fn answer(status: StatusCode, bytes: Bytes) -> Result<Bytes, ClientError> {
    if status.is_success() {
        return Ok(bytes);
    }
    let e: ErrorBody = serde_json::from_slice(&bytes)
        .map_err(|_| ClientError::BadResponse(format!("status {status} without an error body")))?;
    Err(ClientError::Refused {
        status: status.as_u16(),
        code: e.error,
        message: e.message,
        migration_id: e.migration_id.and_then(|id| id.parse().ok()),
        retry_after: e.retry_after_ms.map(Duration::from_millis),
    })
}

/// Sends `out` on the connection in `conn` (opened if there is none, or if the replica
/// closed it). A keep-alive connection found closed as the request goes out is replaced
/// once, with the request unsent. `sent` says whether the request may have been written,
/// for a caller that gives up waiting.
async fn send_on<F, Fut>(
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    out: &Outgoing<'_>,
    host: &str,
    sent: &mut bool,
    connect: F,
) -> Result<(StatusCode, Bytes), ClientError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<SendRequest<Full<Bytes>>, ClientError>>,
{
    *sent = false;
    let mut reused = match conn.as_mut() {
        Some(s) => s.ready().await.is_ok(),
        None => false,
    };
    loop {
        if !reused {
            *conn = None;
            *conn = Some(connect().await?);
        }
        let sender = conn.as_mut().expect("just connected");
        let request = out.request(host)?;
        *sent = true;
        match sender.try_send_request(request).await {
            Ok(resp) => {
                let answer = read_answer(resp).await;
                if answer.is_err() {
                    *conn = None;
                }
                return answer;
            }
            Err(mut e) => {
                *conn = None;
                if e.take_message().is_none() {
                    return Err(ClientError::Http(e.into_error()));
                }
                *sent = false;
                if !reused {
                    return Err(ClientError::Closed(e.into_error()));
                }
                reused = false;
            }
        }
    }
}

impl KeyServiceClient {
    /// A client for the service at `urls`: one `https://HOST:PORT`, or several replicas'
    /// separated by commas (`https://ks1:7443,https://ks2:7443`), with this host's
    /// identity. Connects lazily, on the first request to each replica.
    pub fn new(urls: &str, identity: &ClientIdentity) -> Result<Self, ClientError> {
        let parsed = parse_urls(urls)?;
        let config = crate::tls::client_config(identity)?;
        let (names, replicas) = parsed
            .into_iter()
            .map(|(url, addr, server_name)| {
                let replica = Replica {
                    addr,
                    server_name,
                    conn: tokio::sync::Mutex::new(None),
                };
                (url, replica)
            })
            .unzip();
        Ok(Self {
            replicas,
            names,
            preferred: AtomicUsize::new(0),
            connector: TlsConnector::from(Arc::new(config)),
            schedule: Schedule::default(),
        })
    }

    /// TCP, TLS and the HTTP/1.1 handshake with `r`, within the schedule's connect time.
    async fn connect(&self, r: &Replica) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let limit = self.schedule.connect;
        let deadline = tokio::time::Instant::now() + limit;
        let late = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no {what} within {limit:?}"),
            )
        };
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(&r.addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(self.connect_error(r, source)),
            Err(_) => return Err(self.connect_error(r, late("connection"))),
        };
        let _ = tcp.set_nodelay(true);
        let handshake = self.connector.connect(r.server_name.clone(), tcp);
        let tls = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => return Err(self.handshake_error(r, source)),
            Err(_) => return Err(self.handshake_error(r, late("TLS handshake"))),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(ClientError::Closed)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "key service connection ended");
            }
        });
        Ok(sender)
    }

    fn connect_error(&self, r: &Replica, source: std::io::Error) -> ClientError {
        ClientError::Connect {
            addr: r.addr.clone(),
            source,
        }
    }

    fn handshake_error(&self, r: &Replica, source: std::io::Error) -> ClientError {
        ClientError::Handshake {
            addr: r.addr.clone(),
            source,
        }
    }

    /// One attempt at replica `r`, within `limit` (waiting for its connection, which
    /// another call may be using, included). A connection given up on mid-request is
    /// dropped, never reused.
    async fn attempt(
        &self,
        r: &Replica,
        out: &Outgoing<'_>,
        limit: Duration,
    ) -> Result<Bytes, ClientError> {
        let deadline = Instant::now() + limit;
        let late = |what: String| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
        let Ok(mut conn) = tokio::time::timeout(limit, r.conn.lock()).await else {
            let busy = late(format!("its connection stayed busy for {limit:?}"));
            return Err(self.connect_error(r, busy));
        };
        let mut sent = false;
        let left = deadline.saturating_duration_since(Instant::now());
        let exchange = send_on(&mut conn, out, &r.addr, &mut sent, || self.connect(r));
        match tokio::time::timeout(left, exchange).await {
            Ok(result) => {
                let (status, bytes) = result?;
                answer(status, bytes)
            }
            Err(_) => {
                *conn = None;
                if sent {
                    Err(ClientError::Timeout(limit))
                } else {
                    Err(self.connect_error(r, late(format!("not connected within {limit:?}"))))
                }
            }
        }
    }

    /// Sends one request, failing over between replicas as [`failover`] says, and
    /// parses the answer.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotence: Idempotence,
    ) -> Result<T, ClientError> {
        let out = Outgoing {
            method,
            path,
            body: Bytes::from(body.unwrap_or_default()),
        };
        let first = self.preferred.load(Ordering::Relaxed);
        let answered = failover::call(
            &self.schedule,
            &self.names,
            first,
            idempotence,
            |i, limit| {
                let attempt = self.attempt(&self.replicas[i], &out, limit);
                async move {
                    let result = attempt.await;
                    // A replica that answered (even with a refusal) is where the next
                    // call starts; one that said "not now" or failed is not.
                    let answered = match &result {
                        Ok(_) => true,
                        Err(e) => failover::classify(e) == Failure::Answer,
                    };
                    if answered {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    result
                }
            },
        )
        .await;
        let (_, bytes) = answered?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// Registers (or refreshes) this host's capabilities.
    pub async fn register(&self, req: &RegisterRequest) -> Result<HostRecord, ClientError> {
        let body = serde_json::to_vec(req).expect("serializes");
        self.call(
            Method::POST,
            "/v1/hosts/register",
            Some(body),
            Idempotence::Idempotent,
        )
        .await
    }

    /// A host's registry entry, or `None` if it is not registered.
    pub async fn host(&self, host: &str) -> Result<Option<HostRecord>, ClientError> {
        if !crate::api::valid_host_name(host) {
            return Err(ClientError::Url(format!("invalid host name `{host}`")));
        }
        let path = format!("/v1/hosts/{host}");
        match self
            .call(Method::GET, &path, None, Idempotence::Idempotent)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Puts `host` in maintenance (`draining`: no migration is created to it) or takes it
    /// out. A host may do this for itself; other callers must be among the service's
    /// `admins`.
    pub async fn set_maintenance(
        &self,
        host: &str,
        draining: bool,
    ) -> Result<Maintenance, ClientError> {
        let path = maintenance_path(host)?;
        let body = serde_json::to_vec(&Maintenance { draining }).expect("serializes");
        self.call(Method::PUT, &path, Some(body), Idempotence::Idempotent)
            .await
    }

    /// Whether `host` is in maintenance.
    pub async fn maintenance(&self, host: &str) -> Result<Maintenance, ClientError> {
        let path = maintenance_path(host)?;
        self.call(Method::GET, &path, None, Idempotence::Idempotent)
            .await
    }

    /// Creates a migration of `vm` from this host to `destination`, with the default
    /// options.
    pub async fn create_migration(
        &self,
        vm: &str,
        destination: &str,
    ) -> Result<IssuedMigration, ClientError> {
        self.create_migration_with(vm, destination, CreateOptions::default())
            .await
    }

    /// Creates a migration of `vm` from this host to `destination`. The request carries a
    /// fresh request id, the same on every retry of this call, so a retry of a create that
    /// reached a replica answers the migration it created rather than a second one. The
    /// service may refuse with `vm_in_flight` (the VM has a migration in flight; see
    /// [`CreateOptions::abort_stale`]) or `busy` (an admission limit; the refusal's
    /// `retry_after` says when to ask again): both come back at once.
    pub async fn create_migration_with(
        &self,
        vm: &str,
        destination: &str,
        options: CreateOptions,
    ) -> Result<IssuedMigration, ClientError> {
        let body = serde_json::to_vec(&CreateMigrationRequest {
            vm: vm.to_owned(),
            destination: destination.to_owned(),
            request_id: Some(match options.request_id {
                Some(id) => id.iter().map(|b| format!("{b:02x}")).collect(),
                None => request_id()?,
            }),
            abort_stale: options.abort_stale,
        })
        .expect("serializes");
        let r: CreateMigrationResponse = self
            .call(
                Method::POST,
                "/v1/migrations",
                Some(body),
                Idempotence::Idempotent,
            )
            .await?;
        let id = hex_array::<16>(&r.migration_id).ok_or_else(|| {
            ClientError::BadResponse("the migration id is not 32 hex digits".into())
        })?;
        Ok(IssuedMigration {
            id: MigrationId(id),
            material: key_material(&r.key, &r.nonce)?,
            expires_at_ms: r.expires_at_ms,
            destination: r.destination.clone(),
        })
    }

    /// Fetches a migration's key (this host must be its destination; works once). A
    /// request that never left this host is sent to another replica; one that may have
    /// reached a replica is never sent again, since the first to arrive spends the key:
    /// it fails with [`ClientError::KeyStateUnknown`].
    pub async fn fetch_key(&self, id: MigrationId) -> Result<FetchedKey, ClientError> {
        let path = format!("/v1/migrations/{id}/key");
        let r: FetchKeyResponse = self
            .call(Method::POST, &path, Some(Vec::new()), Idempotence::Once)
            .await
            .map_err(|e| {
                if failover::classify(&e).maybe_sent() {
                    ClientError::KeyStateUnknown(Box::new(e))
                } else {
                    e
                }
            })?;
        Ok(FetchedKey {
            material: key_material(&r.key, &r.nonce)?,
            source: r.source.clone(),
            vm: r.vm.clone(),
        })
    }

    /// Moves the outcome record one step: `committed` and `reverted` from the source,
    /// `claimed` from the destination, `aborted` from either (see [`Outcome`]). Returns the
    /// record once the step is on disk; a retry of a step the record already took returns
    /// the record as it is (e.g. `claimed` for a retried `committed`), which is what makes
    /// it safe to send again on another replica. A record in a state the step cannot
    /// follow is refused with [`ErrorCode::Conflict`] ([`ClientError::code`]): the race
    /// is lost, and [`outcome`](Self::outcome) tells who won.
    pub async fn record_outcome(
        &self,
        id: MigrationId,
        outcome: Outcome,
    ) -> Result<OutcomeRecord, ClientError> {
        let body = serde_json::to_vec(&OutcomeRequest { outcome }).expect("serializes");
        let path = format!("/v1/migrations/{id}/outcome");
        self.call(Method::PUT, &path, Some(body), Idempotence::Idempotent)
            .await
    }

    /// Reads the outcome (this host must be the source or the destination).
    pub async fn outcome(&self, id: MigrationId) -> Result<OutcomeRecord, ClientError> {
        let path = format!("/v1/migrations/{id}/outcome");
        self.call(Method::GET, &path, None, Idempotence::Idempotent)
            .await
    }
}

/// `/v1/hosts/{host}/maintenance`, for a valid host name.
fn maintenance_path(host: &str) -> Result<String, ClientError> {
    if !crate::api::valid_host_name(host) {
        return Err(ClientError::Url(format!("invalid host name `{host}`")));
    }
    Ok(format!("/v1/hosts/{host}/maintenance"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("https://127.0.0.1:7443").unwrap().0,
            "127.0.0.1:7443"
        );
        assert_eq!(parse_url("localhost:1").unwrap().0, "localhost:1");
        assert_eq!(parse_url("https://[::1]:7443/").unwrap().0, "[::1]:7443");
        for bad in [
            "https://host",
            "https://:1",
            "https://h:99999",
            "https://a/b:1",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_lists_parse() {
        let one = parse_urls("https://127.0.0.1:7443").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, "https://127.0.0.1:7443");
        assert_eq!(one[0].1, "127.0.0.1:7443");
        let two = parse_urls("https://ks1:7443, https://[::1]:7444/").unwrap();
        let addrs: Vec<&str> = two.iter().map(|(_, addr, _)| addr.as_str()).collect();
        assert_eq!(addrs, ["ks1:7443", "[::1]:7444"]);
        assert_eq!(
            two[1].0, "https://[::1]:7444/",
            "named as given, for the logs"
        );
        for (bad, says) in [
            ("", "entry 1 is empty"),
            ("https://ks1:7443,", "entry 2 is empty"),
            ("https://ks1:7443,,https://ks2:7443", "entry 2 is empty"),
            (" , https://ks2:7443", "entry 1 is empty"),
            (
                "https://ks1:7443,https://ks2",
                "`https://ks2`: expected https://HOST:PORT",
            ),
        ] {
            match parse_urls(bad) {
                Err(ClientError::Url(m)) => assert!(m.contains(says), "{bad:?}: {m}"),
                other => panic!("{bad:?}: {:?}", other.map(|v| v.len())),
            }
        }
    }

    #[test]
    fn request_ids_are_fresh_lowercase_hex() {
        let (a, b) = (request_id().unwrap(), request_id().unwrap());
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            );
        }
    }

    fn get() -> Outgoing<'static> {
        Outgoing {
            method: Method::GET,
            path: "/v1/hosts/dst",
            body: Bytes::new(),
        }
    }

    /// An HTTP/1.1 client connection over an in-memory pipe, and the pipe's other end.
    async fn piped() -> (SendRequest<Full<Bytes>>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, theirs)
    }

    async fn no_reconnect() -> Result<SendRequest<Full<Bytes>>, ClientError> {
        Err(ClientError::Connect {
            addr: "replica".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        })
    }

    /// A connection the replica dropped before the request went out: the request is
    /// unsent, and a new connection is tried (once) before the failure is reported.
    #[tokio::test]
    async fn a_connection_closed_before_the_request_is_unsent() {
        let (sender, theirs) = piped().await;
        drop(theirs);
        let mut conn = Some(sender);
        let mut sent = true;
        let reconnects = std::sync::atomic::AtomicU32::new(0);
        let e = send_on(&mut conn, &get(), "ks", &mut sent, || {
            reconnects.fetch_add(1, Ordering::Relaxed);
            no_reconnect()
        })
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert_eq!(failover::classify(&e), Failure::Unsent);
        assert!(!sent, "nothing was written");
        assert_eq!(reconnects.load(Ordering::Relaxed), 1);
        assert!(conn.is_none());
    }

    /// A replica that reads the request and drops the connection: the request may have
    /// been acted on, and the connection is not kept.
    #[tokio::test]
    async fn a_connection_dropped_mid_exchange_may_have_been_acted_on() {
        use tokio::io::AsyncReadExt as _;
        let (sender, mut theirs) = piped().await;
        let replica = tokio::spawn(async move {
            let mut head = [0u8; 16];
            theirs.read_exact(&mut head).await.unwrap();
            assert!(head.starts_with(b"GET /v1/hosts/"), "{head:?}");
        });
        let mut conn = Some(sender);
        let mut sent = false;
        let e = send_on(&mut conn, &get(), "ks", &mut sent, no_reconnect)
            .await
            .unwrap_err();
        replica.await.unwrap();
        assert!(matches!(e, ClientError::Http(_)), "{e}");
        assert_eq!(failover::classify(&e), Failure::Lost);
        assert!(sent);
        assert!(conn.is_none());
    }

    /// An answer on a kept connection comes back whole, refusals parsed with their
    /// fields; the connection stays for the next request.
    #[tokio::test]
    async fn answers_and_refusals_come_back_parsed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (sender, mut theirs) = piped().await;
        let body = r#"{"error":"busy","message":"3 in flight","retry_after_ms":250}"#;
        tokio::spawn(async move {
            let mut head = [0u8; 16];
            theirs.read_exact(&mut head).await.unwrap();
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            theirs.write_all(answer.as_bytes()).await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut conn = Some(sender);
        let mut sent = false;
        let (status, bytes) = send_on(&mut conn, &get(), "ks", &mut sent, no_reconnect)
            .await
            .unwrap();
        assert!(conn.is_some(), "kept alive");
        let e = answer(status, bytes).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Busy));
        assert!(matches!(
            e,
            ClientError::Refused { retry_after: Some(d), .. } if d == Duration::from_millis(250)
        ));
        assert_eq!(failover::classify(&e), Failure::Answer);
    }

    #[test]
    fn key_material_is_checked() {
        let k = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(key_material(&k, "0102030405060708").is_ok());
        assert!(key_material(&k, "01020304050607").is_err());
        assert!(key_material("!!", "0102030405060708").is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(key_material(&short, "0102030405060708").is_err());
    }
}
