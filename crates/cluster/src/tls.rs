//! Mutual TLS on the peer port: every node presents a certificate signed by the cluster's CA
//! and accepts only peers that do the same (`raftyard certs cluster` makes them).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The CA and this node's certificate and key (PEM).
#[derive(Clone)]
pub struct PeerTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl PeerTls {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> std::io::Result<PeerTls> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        Ok(PeerTls { ca: read(ca)?, cert: read(cert)?, key: read(key)? })
    }

    /// `ca.pem`, `cert.pem` and `key.pem` of one directory.
    pub fn load_dir(dir: &Path) -> std::io::Result<PeerTls> {
        Self::load(&dir.join("ca.pem"), &dir.join("cert.pem"), &dir.join("key.pem"))
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// Server side: present our certificate, require a client certificate from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity()).client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Client side for a peer at `host` (name or IP, as in its certificate).
    pub fn client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(host.to_string())
    }
}

/// The host part of `host:port` (without brackets for IPv6).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[').trim_end_matches(']')
}
