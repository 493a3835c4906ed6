//! The service's TOML configuration. Every error names the file and the field (and the
//! line, for syntax and type errors).
//!
//! ```toml
//! listen = "127.0.0.1:7443"   # address to listen on (port 0: any free port)
//! ca = "ca.pem"               # CA whose client certificates are accepted
//! cert = "keyservice.pem"     # the service's certificate chain
//! key = "keyservice-key.pem"  # the service's private key
//! journal = "state/journal.jsonl"   # append-only, fsynced outcome journal
//! audit_log = "state/audit.jsonl"   # JSON lines, one per request
//! key_ttl = "5m"              # how long a migration's key waits for its destination
//! registry_ttl = "60s"        # how long a host registration lasts unless refreshed
//! connections_per_host = 32   # open connections one certified host may hold (0: no limit)
//! requests_per_second_per_host = 1000   # sustained rate per host, bursts of twice that (0: no limit)
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
    /// Outcome journal.
    pub journal: PathBuf,
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
    journal: PathBuf,
    audit_log: PathBuf,
    #[serde(default = "default_key_ttl", deserialize_with = "duration")]
    key_ttl: Duration,
    #[serde(default = "default_registry_ttl", deserialize_with = "duration")]
    registry_ttl: Duration,
    #[serde(default = "default_connections_per_host")]
    connections_per_host: usize,
    #[serde(default = "default_requests_per_second_per_host")]
    requests_per_second_per_host: u32,
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
        let config = Self {
            listen: raw.listen,
            ca: resolve(raw.ca),
            cert: resolve(raw.cert),
            key: resolve(raw.key),
            journal: resolve(raw.journal),
            audit_log: resolve(raw.audit_log),
            key_ttl: raw.key_ttl,
            registry_ttl: raw.registry_ttl,
            connections_per_host: raw.connections_per_host,
            requests_per_second_per_host: raw.requests_per_second_per_host,
        };
        if config.journal == config.audit_log {
            return Err(ConfigError::Field {
                path: path.to_owned(),
                field: "audit_log",
                message: "must not be the journal's file".into(),
            });
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
