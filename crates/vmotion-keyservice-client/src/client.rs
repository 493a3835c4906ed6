//! The async client senders and receivers use. It keeps one TLS connection open (HTTP/1.1
//! keep-alive) and reconnects when the service closed it.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use vmotion_authority::FetchedKey;
use vmotion_proto::{
    DestinationCapability, KeyMaterial, MigrationId, MigrationKey, MigrationNonce,
};
use zeroize::Zeroizing;

use crate::api::{
    CreateMigrationRequest, CreateMigrationResponse, ErrorBody, ErrorCode, FetchKeyResponse,
    HostRecord, Outcome, OutcomeRecord, OutcomeRequest, RegisterRequest,
};
use crate::tls::{ClientIdentity, TlsError};

/// Largest answer accepted from the service.
const MAX_RESPONSE: usize = 1 << 20;
/// A request (connecting included) that takes longer fails; the connection is dropped.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Errors talking to the key service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service URL is not `https://HOST:PORT`.
    #[error("invalid key service URL `{0}`: expected https://HOST:PORT")]
    Url(String),
    /// The client's TLS credentials could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TCP connection failed.
    #[error("cannot connect to the key service at {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, certificate refused, ...).
    #[error("TLS handshake with the key service failed: {0}")]
    Handshake(#[source] std::io::Error),
    /// HTTP-level failure (connection closed mid-request, ...).
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
    },
    /// The service did not answer in time. The request may or may not have been
    /// processed: read the state back (e.g. the outcome) before acting.
    #[error("the key service did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The service's answer did not parse.
    #[error("unexpected answer from the key service: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// The service's error code, if the service refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
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

/// A client of the key service, authenticated by a host certificate.
pub struct KeyServiceClient {
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for KeyServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServiceClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Splits `https://HOST:PORT` (or `HOST:PORT`; IPv6 in brackets) into a socket address
/// string and the TLS server name.
fn parse_url(url: &str) -> Result<(String, ServerName<'static>), ClientError> {
    let bad = || ClientError::Url(url.to_owned());
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

impl KeyServiceClient {
    /// A client for the service at `url` (`https://HOST:PORT`) with this host's identity.
    /// Connects lazily, on the first request.
    pub fn new(url: &str, identity: &ClientIdentity) -> Result<Self, ClientError> {
        let (addr, server_name) = parse_url(url)?;
        let config = crate::tls::client_config(identity)?;
        Ok(Self {
            addr,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(ClientError::Handshake)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "key service connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends one request and returns the status and body. The connection is reused; if
    /// the service closed it, a new one is opened before the request is sent (never after,
    /// so no request is sent twice).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut guard = self.conn.lock().await;
        let exchange = self.exchange_on(&mut guard, method, path, body);
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be stuck mid-request: never reuse it.
                *guard = None;
                Err(ClientError::Timeout(REQUEST_TIMEOUT))
            }
        }
    }

    async fn exchange_on(
        &self,
        guard: &mut Option<SendRequest<Full<Bytes>>>,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let reusable = match guard.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            *guard = Some(self.connect().await?);
        }
        let sender = guard.as_mut().expect("just connected");
        let host = self.addr.clone();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                *guard = None;
                return Err(e.into());
            }
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::BadResponse(format!("cannot read the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.exchange(method, path, body).await?;
        if !status.is_success() {
            let e: ErrorBody = serde_json::from_slice(&bytes).map_err(|_| {
                ClientError::BadResponse(format!("status {status} without an error body"))
            })?;
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: e.error,
                message: e.message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// Registers (or refreshes) this host's capabilities.
    pub async fn register(&self, req: &RegisterRequest) -> Result<HostRecord, ClientError> {
        let body = serde_json::to_vec(req).expect("serializes");
        self.call(Method::POST, "/v1/hosts/register", Some(body))
            .await
    }

    /// A host's registry entry, or `None` if it is not registered.
    pub async fn host(&self, host: &str) -> Result<Option<HostRecord>, ClientError> {
        if !crate::api::valid_host_name(host) {
            return Err(ClientError::Url(format!("invalid host name {host}")));
        }
        match self
            .call(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a migration of `vm` from this host to `destination`.
    pub async fn create_migration(
        &self,
        vm: &str,
        destination: &str,
    ) -> Result<IssuedMigration, ClientError> {
        let body = serde_json::to_vec(&CreateMigrationRequest {
            vm: vm.to_owned(),
            destination: destination.to_owned(),
            request_id: None,
            abort_stale: false,
        })
        .expect("serializes");
        let r: CreateMigrationResponse = self
            .call(Method::POST, "/v1/migrations", Some(body))
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

    /// Fetches a migration's key (this host must be its destination; works once).
    pub async fn fetch_key(&self, id: MigrationId) -> Result<FetchedKey, ClientError> {
        let r: FetchKeyResponse = self
            .call(
                Method::POST,
                &format!("/v1/migrations/{id}/key"),
                Some(Vec::new()),
            )
            .await?;
        Ok(FetchedKey {
            material: key_material(&r.key, &r.nonce)?,
            source: r.source.clone(),
            vm: r.vm.clone(),
        })
    }

    /// Moves the outcome record one step: `committed` and `reverted` from the source,
    /// `claimed` from the destination, `aborted` from either (see [`Outcome`]). Returns the
    /// record once the step is on disk; a retry of a step the record already took returns
    /// the record as it is (e.g. `claimed` for a retried `committed`). A record in a state
    /// the step cannot follow is refused with [`ErrorCode::Conflict`]
    /// ([`ClientError::code`]): the race is lost, and [`outcome`](Self::outcome) tells
    /// who won.
    pub async fn record_outcome(
        &self,
        id: MigrationId,
        outcome: Outcome,
    ) -> Result<OutcomeRecord, ClientError> {
        let body = serde_json::to_vec(&OutcomeRequest { outcome }).expect("serializes");
        self.call(
            Method::PUT,
            &format!("/v1/migrations/{id}/outcome"),
            Some(body),
        )
        .await
    }

    /// Reads the outcome (this host must be the source or the destination).
    pub async fn outcome(&self, id: MigrationId) -> Result<OutcomeRecord, ClientError> {
        self.call(Method::GET, &format!("/v1/migrations/{id}/outcome"), None)
            .await
    }
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
    fn key_material_is_checked() {
        let k = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(key_material(&k, "0102030405060708").is_ok());
        assert!(key_material(&k, "01020304050607").is_err());
        assert!(key_material("!!", "0102030405060708").is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert!(key_material(&short, "0102030405060708").is_err());
    }
}
