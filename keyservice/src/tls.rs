//! The service's TLS configuration (rustls with the `ring` provider, TLS 1.3 only; the
//! PEM loading and the client side are `vmotion_keyservice_client::tls`) and host identity.
//!
//! A host's identity is the first DNS name in the subject alternative names of its client
//! certificate, which the server has already verified against the configured CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
pub use vmotion_keyservice_client::tls::{TlsError, load_certs, load_key, provider, roots};

/// The server side: TLS 1.3, a client certificate from `ca` required.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert, "the service certificate")?, load_key(key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session would reuse the client certificate
    // verified at the first handshake without checking it again.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// A host name in its one canonical spelling (lowercase, no trailing dot), or `None` if
/// it is not a valid host name. Identities, destinations and registry keys all go through
/// this, so `DST`, `dst.` and `dst` are one host.
pub fn canonical_host(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    crate::pki::valid_host_name(&name).then_some(name)
}

/// The identity of a verified peer: the one DNS name of its end-entity certificate,
/// canonical. A certificate with no DNS name, several, or a wildcard names no single host
/// and gets no identity (the connection is refused).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(certs?.first()?).ok()?;
    let mut names = ee.valid_dns_names();
    let name = names.next()?;
    if names.next().is_some() || name.contains('*') {
        return None;
    }
    canonical_host(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_is_one_canonical_dns_name() {
        let id = |names: &[&str]| peer_identity(Some(&[cert_with(names)]));
        assert_eq!(id(&["dst"]), Some("dst".into()));
        assert_eq!(
            id(&["DST.example"]),
            Some("dst.example".into()),
            "lowercased"
        );
        assert_eq!(id(&["src", "dst"]), None, "two names: which host is it?");
        assert_eq!(id(&["*.example"]), None, "a wildcard names no single host");
        assert_eq!(
            id(&["10.0.0.5"]),
            None,
            "an IP address is not a host identity"
        );
        assert_eq!(peer_identity(None), None);
    }

    #[test]
    fn host_names_have_one_spelling() {
        assert_eq!(canonical_host("DST."), Some("dst".into()));
        assert_eq!(canonical_host("a_b"), None);
        assert_eq!(canonical_host("host.123"), None);
    }
}
