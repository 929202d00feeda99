//! rustls configuration of the control connection: the relay's server side and the agent's
//! client side, which trusts only the configured CA.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::Error;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Io(path.display().to_string(), e))
}

fn tls_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{}: {e}", path.display()))
}

pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, Error> {
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(cert, e))?;
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| tls_err(key, e))?
        .ok_or_else(|| tls_err(key, "no private key"))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(cert, e))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

pub fn connector(ca: &Path) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
        roots.add(c.map_err(|e| tls_err(ca, e))?).map_err(|e| tls_err(ca, e))?;
    }
    if roots.is_empty() {
        return Err(tls_err(ca, "no certificate"));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(cfg)))
}
