//! TLS: the acceptor built from the configured PEM files (feature `proxy-tls`).
//!
//! Apart from the listener, which only runs the handshake it is given, because building the
//! acceptor is configuration work done once at start (reading files, choosing the crypto
//! provider and ALPN), and because a build without the feature must still refuse a TLS
//! configuration with a clear error rather than serve plain HTTP.

use super::config::ProxyConfig;

/// The TLS acceptor, when TLS is configured.
#[cfg(feature = "proxy-tls")]
pub(crate) type Tls = Option<tokio_rustls::TlsAcceptor>;
/// No TLS in this build (`validate` refuses a TLS configuration).
#[cfg(not(feature = "proxy-tls"))]
pub(crate) type Tls = Option<std::convert::Infallible>;

/// Builds the TLS acceptor from the configured PEM files; `None` when `proxy.tls` is not set.
///
/// # Errors
/// A message naming the field (`proxy.tls.cert`, `proxy.tls.key`) when a file cannot be read
/// or holds no certificate or key, or when rustls refuses them; `start` reports it as
/// `ProxyError::Tls`. The acceptor offers HTTP/2 and HTTP/1.1 by ALPN.
#[cfg(feature = "proxy-tls")]
pub(crate) fn tls_acceptor(config: &ProxyConfig) -> Result<Tls, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("proxy.tls.cert {}: {e}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "proxy.tls.cert {}: no certificate",
            tls.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("proxy.tls.key {}: {e}", tls.key.display()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("proxy.tls: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        server,
    ))))
}

/// Builds the TLS acceptor: this build has none.
#[cfg(not(feature = "proxy-tls"))]
pub(crate) fn tls_acceptor(config: &ProxyConfig) -> Result<Tls, String> {
    match config.tls {
        Some(_) => Err("this build has no TLS support; enable the `proxy-tls` feature".into()),
        None => Ok(None),
    }
}
