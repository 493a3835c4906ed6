//! The service's TOML configuration. Every error names the file and the field (and the
//! line, for syntax and type errors).
//!
//! ```toml
//! listen = "127.0.0.1:7443"   # address to listen on (port 0: any free port)
//! ca = "ca.pem"               # CA whose client certificates are accepted
//! cert = "keyservice.pem"     # the service's certificate chain
//! key = "keyservice-key.pem"  # the service's private key
//! journal = "state/journal.jsonl"   # the journal store's fsynced journal (not with etcd)
//! audit_log = "state/audit.jsonl"   # JSON lines, one per request
//! key_ttl = "5m"              # how long a migration's key waits for its destination
//! registry_ttl = "60s"        # how long a host registration lasts unless refreshed
//! connections_per_host = 32   # open connections one certified host may hold (0: no limit)
//! requests_per_second_per_host = 1000   # sustained rate per host, bursts of twice that (0: no limit)
//! admins = ["ops"]            # client identities that may put any host in maintenance
//! metrics_listen = "127.0.0.1:9701"   # Prometheus metrics at http://ADDR/metrics (plain HTTP)
//!
//! [store]                     # optional; without it, the journal store
//! kind = "etcd"               # "journal" (default) or "etcd"
//! endpoints = ["http://127.0.0.1:2379"]   # etcd members (https:// with the TLS files below)
//! prefix = "/vmotion/"        # every key the service writes starts with it
//! kek_file = "kek"            # key-encryption key: 64 hex digits, mode 0600
//! previous_kek_files = []     # older KEKs, still readable during a rotation
//! ca = "etcd-ca.pem"          # optional: TLS to etcd (CA, client cert and key)
//! cert = "etcd-client.pem"
//! key = "etcd-client-key.pem"
//! request_timeout = "3s"      # one etcd request, then the caller gets `unavailable`
//!
//! [limits]                    # admission; 0: no limit
//! outbound_per_host = 2       # migrations in flight from one source host
//! inbound_per_host = 2        # ... to one destination host
//! cluster = 5                 # ... in the whole cluster
//! in_flight_ttl = "1h"        # a migration still at `null` frees its VM after this
//! ```
//!
//! Relative paths are relative to the configuration file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Service certificate chain (PEM).
    pub cert: PathBuf,
    /// Service private key (PEM).
    pub key: PathBuf,
    /// Where the state lives.
    pub store: StoreConfig,
    /// Admission limits and the VM lock's lifetime.
    pub limits: crate::store::Limits,
    /// Audit log.
    pub audit_log: PathBuf,
    /// Key lifetime.
    pub key_ttl: Duration,
    /// Registration lifetime.
    pub registry_ttl: Duration,
    /// Open connections one certified host may hold at once (0: no limit): one host
    /// cannot take the whole connection budget from the others.
    pub connections_per_host: usize,
    /// Requests per second one certified host may make, sustained (bursts of twice as
    /// many; 0: no limit).
    pub requests_per_second_per_host: u32,
    /// Client identities that may put any host in maintenance (a host may always do it
    /// for itself).
    pub admins: Vec<String>,
    /// Where to serve Prometheus metrics (plain HTTP, `/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// The store: the journal (one replica) or etcd (any number of replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The fsynced local journal.
    Journal {
        /// Its file.
        path: PathBuf,
    },
    /// An etcd cluster.
    Etcd(EtcdConfig),
}

/// The etcd store's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Member URLs.
    pub endpoints: Vec<String>,
    /// Prefix of every key written.
    pub prefix: String,
    /// The key-encryption key that seals new keys.
    pub kek: PathBuf,
    /// Older KEKs, for reading keys sealed before a rotation.
    pub previous_keks: Vec<PathBuf>,
    /// TLS to etcd: CA, client certificate, client key.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Deadline of one etcd request.
    pub request_timeout: Duration,
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, a field is unknown, missing or of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    journal: Option<PathBuf>,
    audit_log: PathBuf,
    #[serde(default = "default_key_ttl", deserialize_with = "duration")]
    key_ttl: Duration,
    #[serde(default = "default_registry_ttl", deserialize_with = "duration")]
    registry_ttl: Duration,
    #[serde(default = "default_connections_per_host")]
    connections_per_host: usize,
    #[serde(default = "default_requests_per_second_per_host")]
    requests_per_second_per_host: u32,
    #[serde(default)]
    admins: Vec<String>,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    kind: StoreKind,
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    kek_file: Option<PathBuf>,
    #[serde(default)]
    previous_kek_files: Vec<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    request_timeout: Duration,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    #[default]
    Journal,
    Etcd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_outbound")]
    outbound_per_host: usize,
    #[serde(default = "default_outbound")]
    inbound_per_host: usize,
    #[serde(default = "default_cluster")]
    cluster: usize,
    #[serde(default = "default_in_flight_ttl", deserialize_with = "duration")]
    in_flight_ttl: Duration,
}

impl Default for RawLimits {
    fn default() -> Self {
        let d = crate::store::Limits::default();
        Self {
            outbound_per_host: d.outbound_per_host,
            inbound_per_host: d.inbound_per_host,
            cluster: d.cluster,
            in_flight_ttl: d.in_flight_ttl,
        }
    }
}

fn default_outbound() -> usize {
    crate::store::Limits::default().outbound_per_host
}

fn default_cluster() -> usize {
    crate::store::Limits::default().cluster
}

fn default_in_flight_ttl() -> Duration {
    crate::store::Limits::default().in_flight_ttl
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_requests_per_second_per_host() -> u32 {
    1000
}

fn default_connections_per_host() -> usize {
    32
}

fn default_key_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_registry_ttl() -> Duration {
    Duration::from_secs(60)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let v = humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration ({e}); write e.g. \"90s\" or \"5m\""
        ))
    })?;
    if v.is_zero() || v > Duration::from_secs(7 * 24 * 3600) {
        return Err(serde::de::Error::custom(format!(
            "`{s}` is out of range (more than 0, at most 7 days)"
        )));
    }
    Ok(v)
}

/// "line N, field `key`: message" from a toml error, without toml's multi-line drawing.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return message.to_owned();
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let source_line = text.lines().nth(line - 1).unwrap_or("").trim();
    match source_line.split_once('=') {
        Some((key, _)) if !message.contains(key.trim()) => {
            format!("line {line}, field `{}`: {message}", key.trim())
        }
        _ => format!("line {line}: {message}"),
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe(text, &e),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let field = |field: &'static str, message: &str| ConfigError::Field {
            path: path.to_owned(),
            field,
            message: message.to_owned(),
        };
        let store = store_config(raw.store, raw.journal.map(&resolve), &resolve)
            .map_err(|(f, m)| field(f, &m))?;
        let config = Self {
            listen: raw.listen,
            ca: resolve(raw.ca),
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            store,
            audit_log: resolve(raw.audit_log),
            key_ttl: raw.key_ttl,
            registry_ttl: raw.registry_ttl,
            connections_per_host: raw.connections_per_host,
            requests_per_second_per_host: raw.requests_per_second_per_host,
            admins: raw.admins,
            metrics_listen: raw.metrics_listen,
            limits: crate::store::Limits {
                outbound_per_host: raw.limits.outbound_per_host,
                inbound_per_host: raw.limits.inbound_per_host,
                cluster: raw.limits.cluster,
                in_flight_ttl: raw.limits.in_flight_ttl,
            },
        };
        if matches!(&config.store, StoreConfig::Journal { path } if *path == config.audit_log) {
            return Err(field("audit_log", "must not be the journal's file"));
        }
        for (field, file) in [
            ("ca", &config.ca),
            ("cert", &config.cert),
            ("key", &config.key),
        ] {
            if let Err(e) = std::fs::metadata(file) {
                return Err(ConfigError::Field {
                    path: path.to_owned(),
                    field,
                    message: format!("cannot read {}: {e}", file.display()),
                });
            }
        }
        Ok(config)
    }
}

type FieldError = (&'static str, String);

/// The `[store]` table (and the top-level `journal`) as a [`StoreConfig`].
fn store_config(
    raw: RawStore,
    journal: Option<PathBuf>,
    resolve: &impl Fn(PathBuf) -> PathBuf,
) -> Result<StoreConfig, FieldError> {
    if raw.kind == StoreKind::Journal {
        let path = journal.ok_or((
            "journal",
            "missing (the journal store needs its file)".to_owned(),
        ))?;
        return Ok(StoreConfig::Journal { path });
    }
    if journal.is_some() {
        return Err((
            "journal",
            "not used with `[store] kind = \"etcd\"`; remove it".into(),
        ));
    }
    if raw.endpoints.is_empty() {
        return Err(("store.endpoints", "at least one etcd member URL".into()));
    }
    if let Some(bad) = raw
        .endpoints
        .iter()
        .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
    {
        return Err((
            "store.endpoints",
            format!("`{bad}` is not an http:// or https:// URL"),
        ));
    }
    let prefix = raw.prefix.unwrap_or_else(|| "/vmotion/".into());
    if prefix.is_empty() || !prefix.ends_with('/') {
        return Err(("store.prefix", "must be non-empty and end with '/'".into()));
    }
    let kek = raw.kek_file.ok_or((
        "store.kek_file",
        "missing (the etcd store seals keys with it)".to_owned(),
    ))?;
    let tls = match (raw.ca, raw.cert, raw.key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some((resolve(ca), resolve(cert), resolve(key))),
        _ => {
            return Err((
                "store.ca",
                "TLS to etcd needs all of ca, cert and key".into(),
            ));
        }
    };
    Ok(StoreConfig::Etcd(EtcdConfig {
        endpoints: raw.endpoints,
        prefix,
        kek: resolve(kek),
        previous_keks: raw.previous_kek_files.into_iter().map(resolve).collect(),
        tls,
        request_timeout: raw.request_timeout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_pems() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "c.pem", "k.pem"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        d
    }

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
journal = "j"
audit_log = "a"
key_ttl = "90s"
"#;

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let d = dir_with_pems();
        let path = d.path().join("ks.toml");
        let c = Config::parse(GOOD, &path).unwrap();
        assert_eq!(c.ca, d.path().join("ca.pem"));
        assert_eq!(c.key_ttl, Duration::from_secs(90));
        assert_eq!(c.registry_ttl, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_file_field_and_line() {
        let d = dir_with_pems();
        let path = d.path().join("ks.toml");
        let cases = [
            (
                GOOD.replace("key_ttl = \"90s\"", "key_ttl = \"soon\""),
                vec!["ks.toml", "key_ttl", "soon", "line 8"],
            ),
            (
                GOOD.replace("key_ttl = \"90s\"", "key_ttl = \"0s\""),
                vec!["key_ttl", "out of range"],
            ),
            (
                format!("{GOOD}colour = \"blue\"\n"),
                vec!["ks.toml", "colour", "line 9"],
            ),
            (
                GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""),
                vec!["listen", "line 2"],
            ),
            (GOOD.replace("journal = \"j\"\n", ""), vec!["journal"]),
            (
                GOOD.replace("ca.pem", "missing.pem"),
                vec!["ks.toml", "field `ca`", "missing.pem"],
            ),
        ];
        for (text, needles) in cases {
            let msg = Config::parse(&text, &path).unwrap_err().to_string();
            for n in needles {
                assert!(msg.contains(n), "{n:?} not in {msg:?}");
            }
        }
    }
}
