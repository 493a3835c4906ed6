//! Credentials for QEMU's TLS migrations (`tls-creds-x509`).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// Writes a throw-away PKI into `dir` (created if missing) in the layout QEMU's
/// `-object tls-creds-x509,id=tls0,dir=<dir>,endpoint=server|client[,verify-peer=on]`
/// reads: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem` (ECDSA P-256, valid ten years, made with the `openssl` CLI). One
/// directory serves both ends.
///
/// The server certificate names `server_names` as subject alternative names: IP
/// addresses as `IP:` entries, anything else as `DNS:` (the first is also its CN). The
/// client certificate has the client-auth purpose only.
///
/// What QEMU 10 checks (found by experiment, GnuTLS underneath):
///
/// - both QEMUs need the object and `migrate-set-parameters {"tls-creds": "tls0"}`; the
///   destination's object is `endpoint=server`, the source's `endpoint=client`;
/// - the source verifies the destination's certificate against the CA and a host name:
///   the `tls-hostname` migration parameter when set, else the host of a `tcp:` URI. So
///   `tcp:127.0.0.1:<port>` needs `127.0.0.1` among `server_names` (GnuTLS matches an IP
///   literal against `IP:` entries); a `unix:` URI has no host, and without
///   `tls-hostname` the migration fails with "No hostname for certificate validation"; a
///   name not in the certificate fails with "Certificate does not match the hostname X";
/// - with `verify-peer=on` the destination requires a client certificate signed by the
///   CA (it checks no client name unless given a `tls-authz` object);
/// - a destination whose incoming migration fails exits ("load of migration failed").
pub fn write_tls_creds(dir: &Path, server_names: &[&str]) -> Result<()> {
    let invalid = |what: String| {
        Error::io(
            "writing TLS credentials",
            io::Error::new(io::ErrorKind::InvalidInput, what),
        )
    };
    let Some(first) = server_names.first() else {
        return Err(invalid("no server name given".into()));
    };
    if let Some(bad) = server_names.iter().find(|name| {
        name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '*'))
    }) {
        return Err(invalid(format!(
            "server name {bad:?} is not a host name or an IP address"
        )));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;

    let alt_names: Vec<String> = server_names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => format!("IP:{ip}"),
            Err(_) => format!("DNS:{name}"),
        })
        .collect();
    // Our own config: the system's openssl.cnf may add extensions that clash.
    let config = format!(
        "[req]\n\
         distinguished_name = dn\n\
         prompt = no\n\
         [dn]\n\
         CN = vmotion-qemu test CA\n\
         [ca]\n\
         basicConstraints = critical, CA:TRUE\n\
         keyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = {}\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n\
         [client]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = clientAuth\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
        alt_names.join(", ")
    );
    let cnf = dir.join("vmotion-openssl.cnf");
    fs::write(&cnf, config).map_err(|e| Error::io(format!("writing {}", cnf.display()), e))?;
    let result = issue(dir, first);
    for scratch in [
        "vmotion-openssl.cnf",
        "ca-key.pem",
        "server.csr",
        "client.csr",
    ] {
        let _ = fs::remove_file(dir.join(scratch));
    }
    result
}

/// Runs openssl in `dir` to make the CA and the two leaf certificates.
fn issue(dir: &Path, server_cn: &str) -> Result<()> {
    const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                           -config vmotion-openssl.cnf";
    openssl(
        dir,
        &format!(
            "req -x509 {NEW_KEY} -extensions ca -days 3650 -keyout ca-key.pem -out ca-cert.pem"
        ),
        &["-subj", "/CN=vmotion-qemu test CA"],
    )?;
    for (name, cn, serial) in [
        ("server", server_cn, 2),
        ("client", "vmotion-qemu client", 3),
    ] {
        openssl(
            dir,
            &format!("req -new {NEW_KEY} -keyout {name}-key.pem -out {name}.csr"),
            &["-subj", &format!("/CN={cn}")],
        )?;
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca-cert.pem -CAkey ca-key.pem -set_serial {serial} \
                 -days 3650 -extfile vmotion-openssl.cnf -extensions {name} -out {name}-cert.pem"
            ),
            &[],
        )?;
    }
    Ok(())
}

/// Runs `openssl` in `dir` with the whitespace-separated `words`, then `more`.
fn openssl(dir: &Path, words: &str, more: &[&str]) -> Result<()> {
    let args: Vec<&str> = words
        .split_whitespace()
        .chain(more.iter().copied())
        .collect();
    let command = format!("openssl {}", args.join(" "));
    let output = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::io(format!("running {command}"), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Tool {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_inject_config_are_refused() {
        let dir = std::env::temp_dir().join("vmotion-qemu-never-created");
        for names in [&[][..], &["a, DNS:b"], &["a\nb"], &[""]] {
            let err = write_tls_creds(&dir, names).unwrap_err();
            assert!(
                err.to_string().starts_with("writing TLS credentials"),
                "{err}"
            );
        }
        assert!(!dir.exists());
    }

    #[test]
    fn the_certificates_verify_against_the_ca() {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("skipped: the openssl CLI is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vmotion-qemu-tls-{}", std::process::id()));
        write_tls_creds(&dir, &["localhost", "127.0.0.1"]).unwrap();
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "ca-cert.pem",
                "client-cert.pem",
                "client-key.pem",
                "server-cert.pem",
                "server-key.pem"
            ]
        );
        let verify = Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                "ca-cert.pem",
                "-purpose",
                "sslserver",
                "server-cert.pem",
            ])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        let verify = Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                "ca-cert.pem",
                "-purpose",
                "sslclient",
                "client-cert.pem",
            ])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        let text = Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-ext",
                "subjectAltName",
                "-in",
                "server-cert.pem",
            ])
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("DNS:localhost, IP Address:127.0.0.1"),
            "{text}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
