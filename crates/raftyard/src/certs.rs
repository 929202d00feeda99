//! `raftyard certs`: a CA and certificates made with rcgen, so nobody needs openssl.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A new certificate authority and its key.
fn new_ca() -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "raftyard CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    Ok((ca, ca_key))
}

/// A certificate signed by `ca` for `hosts` (names or IPs; `localhost` and `127.0.0.1` are
/// always added), usable as server and client; returns its chain and key (PEM).
fn leaf(ca: &rcgen::Certificate, ca_key: &KeyPair, hosts: &[String]) -> anyhow::Result<(String, String)> {
    let mut names: Vec<String> = hosts.to_vec();
    for d in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|h| h == d) {
            names.push(d.to_string());
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, names[0].clone());
    params.subject_alt_names = names
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((format!("{}{}", cert.pem(), ca.pem()), key.serialize_pem()))
}

/// Writes `ca.pem` (trust this), `cert.pem` (server chain) and `key.pem` into `out` for the
/// given host names and IP addresses (`localhost` and `127.0.0.1` are always included).
pub fn self_signed(hosts: &[String], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (ca, ca_key) = new_ca()?;
    let (chain, key) = leaf(&ca, &ca_key, hosts)?;
    write(out.join("ca.pem"), ca.pem(), 0o644)?;
    write(out.join("ca-key.pem"), ca_key.serialize_pem(), 0o600)?;
    write(out.join("cert.pem"), chain, 0o644)?;
    write(out.join("key.pem"), key, 0o600)?;
    Ok(())
}

/// A cluster CA and one certificate per node, for mutual TLS on the peer port. Each `node` is
/// `name` or `name=host,host,...`; the name is always one of its hosts.
pub fn cluster(nodes: &[String], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (ca, ca_key) = new_ca()?;
    write(out.join("ca.pem"), ca.pem(), 0o644)?;
    write(out.join("ca-key.pem"), ca_key.serialize_pem(), 0o600)?;
    for spec in nodes {
        let (name, extra) = spec.split_once('=').unwrap_or((spec, ""));
        anyhow::ensure!(!name.is_empty() && !name.contains('/'), "invalid node name {name:?}");
        let mut hosts = vec![name.to_string()];
        hosts.extend(extra.split(',').filter(|h| !h.is_empty()).map(String::from));
        let (chain, key) = leaf(&ca, &ca_key, &hosts)?;
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write(dir.join("ca.pem"), ca.pem(), 0o644)?;
        write(dir.join("cert.pem"), chain, 0o644)?;
        write(dir.join("key.pem"), key, 0o600)?;
    }
    Ok(())
}

fn write(path: std::path::PathBuf, content: String, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}
