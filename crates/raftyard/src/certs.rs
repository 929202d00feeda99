//! `raftyard certs`: a CA and certificates made with rcgen, so nobody needs openssl.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Writes `ca.pem` (trust this), `cert.pem` (server chain) and `key.pem` into `out` for the
/// given host names and IP addresses (`localhost` and `127.0.0.1` are always included).
pub fn self_signed(hosts: &[String], out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "raftyard CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

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
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    write(out.join("ca.pem"), ca.pem(), 0o644)?;
    write(out.join("ca-key.pem"), ca_key.serialize_pem(), 0o600)?;
    write(out.join("cert.pem"), format!("{}{}", cert.pem(), ca.pem()), 0o644)?;
    write(out.join("key.pem"), key.serialize_pem(), 0o600)?;
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
