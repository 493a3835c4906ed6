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
//! Private keys are written with mode 0600; certificates last a year (the CA ten). It
//! refuses a folder that already holds a PKI rather than overwrite keys.

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
    /// The folder already holds a PKI; `pki init` never overwrites keys.
    #[error("{0} already exists; choose an empty folder (pki init never overwrites keys)")]
    Exists(PathBuf),
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

pub use vmotion_keyservice_client::api::valid_host_name;

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    // create_new: never follow a planted symlink or reuse a file with looser permissions.
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    opts.mode(if private { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(err)?;
    if private {
        // The umask can only remove bits; make the mode exact anyway.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(contents.as_bytes()).map_err(err)
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
    // The service may also be reached by an IP address (its certificate then carries an
    // IP SAN); hosts are names.
    let service_ok = |h: &String| h.parse::<std::net::IpAddr>().is_ok() || valid_host_name(h);
    if let Some(bad) = hosts
        .iter()
        .find(|h| !valid_host_name(h))
        .or_else(|| service_names.iter().find(|h| !service_ok(h)))
    {
        return Err(PkiError::BadHostName(bad.clone()));
    }
    for existing in ["ca.pem", "ca-key.pem", "keyservice.toml"] {
        if dir.join(existing).exists() {
            return Err(PkiError::Exists(dir.join(existing)));
        }
    }
    let now = time::OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("vmotion dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::hours(1);
    ca_params.not_after = now + time::Duration::days(3650);
    let ca = ca_params.self_signed(&ca_key)?;
    write(&dir.join("ca.pem"), &ca.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    sans.extend(service_names.iter().cloned());
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = name("vmotion-keyservice");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
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
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
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

# Migrations in flight at once (0: no limit); over a limit, `create` answers `busy` and
# vmotion-send waits its turn. A VM has one migration in flight at a time.
[limits]
outbound_per_host = 2
inbound_per_host = 2
cluster = 5
in_flight_ttl = \"1h\"
";
    write(&files.config(), config, false)?;
    Ok(files)
}
