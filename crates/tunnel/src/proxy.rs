//! PROXY protocol version 2 headers: how the visitor's address travels from the relay to the
//! agent (first bytes of a paired data channel) and from the agent to a local service that
//! asked for it (first bytes of the local connection).
//!
//! A header is believed only where it cannot be forged: the agent reads it from a data channel
//! its relay paired (the relay writes it, the visitor's bytes come after), and a node reads it
//! only on a connection its own in-process agent opened, recognised by the connection's source
//! address ([`Trusted`]). A header sent by anyone else is never parsed.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const PROXY: u8 = 0x21;
/// Version 2, command LOCAL (no addresses: a health check).
const LOCAL: u8 = 0x20;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// Longest address block read (TLVs beyond the addresses are skipped up to this).
const MAX_LEN: usize = 512;

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// The header saying that `src` connected to `dst`.
pub fn encode(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(PROXY);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(TCP4);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            h.push(TCP6);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("PROXY v2 header: {what}"))
}

/// A header that names no addresses (the visitor's address is unknown).
pub fn encode_local() -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.extend_from_slice(&[LOCAL, 0, 0, 0]);
    h
}

/// Reads exactly one header from `r`; the source address it names (`None` for a LOCAL
/// header or an address family other than TCP over IPv4/IPv6).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<SocketAddr>> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head).await?;
    if head[..12] != SIGNATURE {
        return Err(bad("bad signature"));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > MAX_LEN {
        return Err(bad("too long"));
    }
    let mut rest = vec![0u8; len];
    r.read_exact(&mut rest).await?;
    match (head[12], head[13]) {
        (LOCAL, _) => Ok(None),
        (PROXY, TCP4) if len >= 12 => {
            let ip = IpAddr::from([rest[0], rest[1], rest[2], rest[3]]);
            Ok(Some(SocketAddr::new(ip, u16::from_be_bytes([rest[8], rest[9]]))))
        }
        (PROXY, TCP6) if len >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&rest[..16]);
            let ip = Ipv6Addr::from(a);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            Ok(Some(SocketAddr::new(ip, u16::from_be_bytes([rest[32], rest[33]]))))
        }
        (PROXY, _) => Ok(None),
        _ => Err(bad("unknown version or command")),
    }
}

/// The source addresses of the connections an in-process agent opened to a local service that
/// expects a header: the service reads a header on exactly those connections.
#[derive(Default)]
pub struct Trusted(Mutex<HashSet<SocketAddr>>);

impl Trusted {
    pub fn insert(&self, a: SocketAddr) {
        self.0.lock().expect("trusted lock").insert(a);
    }
    /// Whether `a` is one of ours (and forgets it: a source address names one connection).
    pub fn take(&self, a: &SocketAddr) -> bool {
        self.0.lock().expect("trusted lock").remove(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips() {
        for (s, d) in [
            ("203.0.113.7:51234", "127.0.0.1:6000"),
            ("[2001:db8::1]:443", "[::1]:6000"),
            ("198.51.100.2:1", "[::1]:6000"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let mut h = encode(s, d);
            h.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut r = h.as_slice();
            assert_eq!(read(&mut r).await.unwrap(), Some(s));
            assert_eq!(r, b"GET / HTTP/1.1\r\n", "exactly the header is consumed");
        }
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read(&mut r).await.is_err());
    }
}
