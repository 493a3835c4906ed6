//! The JSON API, shared by the server and the client. Specified for operators (with
//! `curl` examples) in `docs/keyservice-api.md`.
//!
//! | method | path | caller | what |
//! |---|---|---|---|
//! | `POST` | `/v1/hosts/register` | any host | register or refresh the caller's capabilities |
//! | `GET` | `/v1/hosts/{host}` | any host | a host's registry entry |
//! | `POST` | `/v1/migrations` | the source | create a migration: id, key, nonce, destination's capabilities |
//! | `POST` | `/v1/migrations/{id}/key` | the destination | fetch the key, once |
//! | `PUT` | `/v1/migrations/{id}/outcome` | source or destination | move the outcome record one step (see [`Outcome`]) |
//! | `GET` | `/v1/migrations/{id}/outcome` | source or destination | read the outcome |
//!
//! The caller's identity is the DNS name in its client certificate; no body field can
//! claim another.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The cipher suite name hosts register.
pub const CIPHER_AES_256_GCM: &str = "aes-256-gcm";

/// Body of `POST /v1/hosts/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The host can fetch migration keys and decrypt.
    pub can_encrypt: bool,
    /// vmotion protocol versions the host speaks.
    pub protocol_versions: Vec<u8>,
    /// Cipher suites the host supports (e.g. `aes-256-gcm`).
    pub ciphers: Vec<String>,
}

/// Body of `PUT /v1/hosts/{host}/maintenance`, and the answer of it and of `GET` on the
/// same path: whether the host is in maintenance (`draining`). No migration is created
/// *to* a draining host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// The host is draining.
    pub draining: bool,
}

/// A host's registry entry (answer of register and of `GET /v1/hosts/{host}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// The host's identity (its certificate's DNS name).
    pub host: String,
    /// The host can encrypt.
    pub can_encrypt: bool,
    /// Protocol versions.
    pub protocol_versions: Vec<u8>,
    /// Cipher suites.
    pub ciphers: Vec<String>,
    /// When the entry expires unless refreshed (Unix time, milliseconds).
    pub expires_at_ms: u64,
}

impl HostRecord {
    /// Whether the registry says this host encrypts with a suite vmotion uses.
    pub fn encrypts(&self) -> bool {
        self.can_encrypt && self.ciphers.iter().any(|c| c == CIPHER_AES_256_GCM)
    }
}

/// Body of `POST /v1/migrations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMigrationRequest {
    /// The VM being migrated.
    pub vm: String,
    /// The destination host's identity.
    pub destination: String,
    /// The client's id for this request (32 lowercase hex digits, random per create): a
    /// retry with the same id, from the same source, answers the migration the first
    /// attempt created (with the same key while it is still unfetched) instead of a
    /// second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Abort this source's own earlier migration of the same VM if it is still at
    /// `null` (a sender that died before its switchover), instead of being refused with
    /// `vm_in_flight`. Never touches a migration past `null` nor another host's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_stale: bool,
}

/// Answer of `POST /v1/migrations`. Holds the key: zeroized on drop.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMigrationResponse {
    /// Migration id, 32 hex digits.
    pub migration_id: String,
    /// The 256-bit key, standard base64.
    pub key: Zeroizing<String>,
    /// The 64-bit nonce, 16 hex digits.
    pub nonce: String,
    /// When the key expires at the service (Unix time, milliseconds).
    pub expires_at_ms: u64,
    /// The destination's registry entry, or `null` if it is not registered.
    pub destination: Option<HostRecord>,
}

/// Answer of `POST /v1/migrations/{id}/key`. Holds the key: zeroized on drop.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchKeyResponse {
    /// Migration id.
    pub migration_id: String,
    /// The 256-bit key, standard base64.
    pub key: Zeroizing<String>,
    /// The 64-bit nonce, 16 hex digits.
    pub nonce: String,
    /// The source host.
    pub source: String,
    /// The VM.
    pub vm: String,
}

macro_rules! redacted_debug {
    ($t:ty, $($field:ident),*) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($field), &self.$field))*
                    .field("key", &"[redacted]")
                    .finish()
            }
        }
    };
}
redacted_debug!(
    CreateMigrationResponse,
    migration_id,
    nonce,
    expires_at_ms,
    destination
);
redacted_debug!(FetchKeyResponse, migration_id, nonce, source, vm);

/// A migration's outcome: the states of the record the key service arbitrates.
///
/// ```text
/// null ──(source: committed)──▶ committed ──(destination: claimed)──▶ claimed
///                                   └──────(source: reverted)────────▶ reverted
/// null ──(source or destination: aborted)──▶ aborted
/// ```
///
/// Each arrow is one compare-and-set at the service, so at most one of `claimed` and
/// `reverted` ever exists for a migration; `claimed`, `reverted` and `aborted` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The source stopped the VM and handed it over. Next, the destination claims it or
    /// the source reverts it; whichever is recorded first decides.
    Committed,
    /// The migration did not happen: the source runs the VM; the destination discards what
    /// it received. Recorded from `null` only, by the source or the destination.
    Aborted,
    /// After `committed`: the destination won the VM and may resume it; the source never
    /// runs it again.
    Claimed,
    /// After `committed`: the source took the VM back; the destination discards what it
    /// received and never resumes it.
    Reverted,
}

impl Outcome {
    /// The wire spelling (`committed`, `aborted`, `claimed`, `reverted`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Claimed => "claimed",
            Self::Reverted => "reverted",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of `PUT /v1/migrations/{id}/outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeRequest {
    /// The outcome.
    pub outcome: Outcome,
}

/// A migration's outcome record (answer of both outcome calls).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeRecord {
    /// Migration id.
    pub migration_id: String,
    /// Source host.
    pub source: String,
    /// Destination host.
    pub destination: String,
    /// The VM.
    pub vm: String,
    /// The outcome, or `null` while none is recorded. Only what is on disk shows here.
    pub outcome: Option<Outcome>,
    /// When its latest transition was recorded (Unix time, milliseconds).
    pub recorded_at_ms: Option<u64>,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (bad JSON, unknown field, bad id).
    BadRequest,
    /// The caller may not do this (not the migration's source or destination, or not the
    /// one of them the call or outcome step is reserved for).
    Forbidden,
    /// No such migration, host or route.
    NotFound,
    /// The key was already handed out.
    AlreadyFetched,
    /// The migration's key expired.
    Expired,
    /// The outcome record is not in a state the requested outcome may follow (e.g.
    /// `claimed` after `reverted`). The message names the recorded outcome; read the
    /// outcome back for the whole record.
    Conflict,
    /// The service failed (journal write).
    Internal,
    /// Not now: the outcome is being written, or the service is shutting down. Read the
    /// outcome back (or retry) later.
    Unavailable,
    /// This host holds too many connections to the service at once: retry on one of
    /// them, or later.
    TooManyConnections,
    /// This host sends requests faster than its rate limit: retry a little later.
    RateLimited,
    /// The VM already has a migration in flight (from any host); the error body names it
    /// (`migration_id`). It ends with that migration's first outcome (`committed` or `aborted`) or its expiry.
    VmInFlight,
    /// An admission limit is reached (migrations in flight from the source, to the
    /// destination or in the cluster): retry after `retry_after_ms`.
    Busy,
    /// The destination is in maintenance (draining): no migration is created to it.
    HostDraining,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::AlreadyFetched | Self::Conflict => 409,
            Self::Expired => 410,
            Self::Internal => 500,
            Self::Unavailable | Self::Busy => 503,
            Self::VmInFlight | Self::HostDraining => 409,
            Self::TooManyConnections | Self::RateLimited => 429,
        }
    }
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The code.
    pub error: ErrorCode,
    /// A sentence for people.
    pub message: String,
    /// `vm_in_flight`: the migration that holds the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// `busy`: how long to wait before trying again (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Whether `name` is usable as a host identity: a lowercase DNS name whose last label is
/// not all digits (so it can never be read as an IP address).
pub fn valid_host_name(name: &str) -> bool {
    let numeric_tld = name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    !name.is_empty()
        && name.len() <= 253
        && !numeric_tld
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_wire_spellings() {
        for (o, wire) in [
            (Outcome::Committed, "committed"),
            (Outcome::Aborted, "aborted"),
            (Outcome::Claimed, "claimed"),
            (Outcome::Reverted, "reverted"),
        ] {
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{wire}\""));
            assert_eq!(o.to_string(), wire);
            let req: OutcomeRequest =
                serde_json::from_str(&format!("{{\"outcome\":\"{wire}\"}}")).unwrap();
            assert_eq!(req.outcome, o);
        }
        assert!(serde_json::from_str::<OutcomeRequest>(r#"{"outcome":"Claimed"}"#).is_err());
    }

    #[test]
    fn host_names_are_checked() {
        for good in ["a", "host-1", "src.example.test", "x1.y2"] {
            assert!(valid_host_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a/b",
            "ä",
            "Upper",
            "10.0.0.5",
            "host.123",
            "*.x",
            &"a".repeat(64),
        ] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }
}
