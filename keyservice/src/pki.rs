//! A development PKI: one CA, the key service's certificate and one client certificate
//! per host, for tests, demos and first steps. Production deployments bring their own CA.
//!
//! Layout written by [`init`]:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca-key.pem` | the CA |
//! | `keyservice.pem`, `keyservice-key.pem` | the service (SANs: `localhost`, `127.0.0.1`, `::1` and any extra names) |
//! | `hosts/NAME.pem`, `hosts/NAME-key.pem` | host `NAME`'s client certificate (DNS SAN `NAME`) |
//! | `keyservice.toml` | a service configuration using the files above, listening on 127.0.0.1:7443 |
//!
//! Private keys are written with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A host name is not a valid DNS name.
    #[error("`{0}` is not a valid host name (letters, digits, '-' and '.', 1 to 253 bytes)")]
    BadHostName(String),
    /// No host was named.
    #[error("name at least one host")]
    NoHosts,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `name` is usable as a host identity (a DNS name).
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(err)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vmotion dev PKI");
    dn.push(DnType::CommonName, cn);
    dn
}

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The folder.
    pub dir: PathBuf,
    /// Host names with a client certificate.
    pub hosts: Vec<String>,
}

impl PkiFiles {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// A host's certificate.
    pub fn host_cert(&self, host: &str) -> PathBuf {
        self.dir.join("hosts").join(format!("{host}.pem"))
    }
    /// A host's private key.
    pub fn host_key(&self, host: &str) -> PathBuf {
        self.dir.join("hosts").join(format!("{host}-key.pem"))
    }
    /// The generated service configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("keyservice.toml")
    }
}

/// Writes a CA, the service certificate, one client certificate per host and a service
/// configuration into `dir`.
pub fn init(dir: &Path, hosts: &[String], service_names: &[String]) -> Result<PkiFiles, PkiError> {
    if hosts.is_empty() {
        return Err(PkiError::NoHosts);
    }
    if let Some(bad) = hosts
        .iter()
        .chain(service_names)
        .find(|h| !valid_host_name(h))
    {
        return Err(PkiError::BadHostName(bad.clone()));
    }

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("vmotion dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    write(&dir.join("ca.pem"), &ca.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    sans.extend(service_names.iter().cloned());
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = name("vmotion-keyservice");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write(&dir.join("keyservice.pem"), &cert.pem(), false)?;
    write(&dir.join("keyservice-key.pem"), &key.serialize_pem(), true)?;

    let files = PkiFiles {
        dir: dir.to_owned(),
        hosts: hosts.to_vec(),
    };
    for host in hosts {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.clone()])?;
        params.distinguished_name = name(host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write(&files.host_cert(host), &cert.pem(), false)?;
        write(&files.host_key(host), &key.serialize_pem(), true)?;
    }

    let config = "\
# Written by `vmotion-keyservice pki init`. Paths are relative to this file.
listen = \"127.0.0.1:7443\"
ca = \"ca.pem\"
cert = \"keyservice.pem\"
key = \"keyservice-key.pem\"
journal = \"state/journal.jsonl\"
audit_log = \"state/audit.jsonl\"
key_ttl = \"5m\"
registry_ttl = \"60s\"
";
    write(&files.config(), config, false)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        for good in ["a", "host-1", "src.example.test", "x1.y2"] {
            assert!(valid_host_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a/b", "ä", &"a".repeat(64)] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }
}
