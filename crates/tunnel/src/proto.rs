//! The wire protocol between agent and relay.
//!
//! Both kinds of connection arrive on the relay's control port; the first byte tells them apart:
//! - a **control connection** starts with a TLS handshake (first byte `0x16`). Inside it, frames
//!   of a big-endian `u32` length followed by a bincode [`AgentMsg`] or [`RelayMsg`]. The agent
//!   opens with `Hello`; the relay answers `Welcome` or `Refused`.
//! - a **data channel** starts with [`DATA_MAGIC`] and a 16-byte nonce the relay sent in an
//!   `Open` over the control connection; after those 20 bytes it carries one visitor's raw bytes.
//! - a **pooled data channel** is opened ahead of need: [`POOL_MAGIC`] and the session id; the
//!   relay answers a fresh 16-byte challenge, and the agent proves it holds the session's pool
//!   key (sent in `Welcome`, inside TLS) with [`pool_proof`], an HMAC-SHA256 over the session and
//!   the challenge. The key itself never crosses the plain connection, so whoever watches the
//!   agent→relay path learns nothing that opens a channel. The channel then waits idle until the
//!   relay activates it with the service name (one length byte, then the name); the agent
//!   answers [`ACTIVATED`] once the local service is connected (or [`NOT_ACTIVATED`]), and from
//!   then on it carries one visitor's raw bytes.
//!
//! Since version 3, once a data channel is paired with a visitor (either kind), the relay's
//! first bytes on it are a PROXY protocol v2 header ([`crate::proxy`]) naming the visitor's
//! address; the visitor's own bytes follow.
//!
//! The data channel's nonce crosses in clear too, but it is single-use and unknown until the
//! agent presents it: by then the relay has paired it, and a copy is refused.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// 3: a paired data channel starts with a PROXY v2 header naming the visitor (relay → agent).
pub const VERSION: u16 = 3;
/// The oldest agent protocol a relay still serves (without visitor addresses).
pub const MIN_VERSION: u16 = 2;
/// First bytes of a data channel opened on request.
pub const DATA_MAGIC: [u8; 4] = *b"RYD1";
/// First bytes of a pooled data channel.
pub const POOL_MAGIC: [u8; 4] = *b"RYP2";
/// The agent's answer to an activation: the local service is connected.
pub const ACTIVATED: u8 = b'+';
/// The agent's answer to an activation: the local service could not be reached.
pub const NOT_ACTIVATED: u8 = b'-';
/// First byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;
/// Control frames are small; anything larger is a protocol violation.
const MAX_FRAME: usize = 64 * 1024;

pub type Nonce = [u8; 16];
/// Pooled data channels a relay keeps per agent session.
pub const MAX_POOL: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello {
        version: u16,
        agent: String,
        token: String,
        services: Vec<String>,
        /// The relay drops the agent after this long without a frame from it.
        heartbeat_timeout_ms: u64,
    },
    Ping(u64),
    /// The agent could not serve an `Open` (its local service refused): try another agent.
    OpenFailed(Nonce),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RelayMsg {
    /// `pool_key` authenticates the session's pooled data channels.
    Welcome {
        session: u64,
        pool_key: [u8; 16],
    },
    Refused {
        reason: String,
    },
    /// Open a data channel for a visitor of `service`, presenting `nonce`.
    Open {
        nonce: Nonce,
        service: String,
    },
    Pong(u64),
}

pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let body = bincode::serialize(msg).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("control frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    bincode::deserialize(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The preamble of a data channel.
pub fn data_preamble(nonce: &Nonce) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[..4].copy_from_slice(&DATA_MAGIC);
    p[4..].copy_from_slice(nonce);
    p
}

/// The preamble of a pooled data channel: the magic and the session id.
pub fn pool_preamble(session: u64) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&POOL_MAGIC);
    p[4..].copy_from_slice(&session.to_be_bytes());
    p
}

/// The relay's challenge to a pooled data channel.
pub type Challenge = [u8; 16];

/// Proof that a pooled channel belongs to `session`: HMAC-SHA256 keyed with the session's pool
/// key over the session id and the relay's challenge for this channel.
pub fn pool_proof(key: &[u8; 16], session: u64, challenge: &Challenge) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"raftyard pooled channel");
    mac.update(&session.to_be_bytes());
    mac.update(challenge);
    mac.finalize().into_bytes().into()
}

/// The activation of a pooled channel: the service name, length-prefixed.
pub fn activation(service: &str) -> Vec<u8> {
    let name = &service.as_bytes()[..service.len().min(255)];
    let mut v = Vec::with_capacity(1 + name.len());
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v
}

pub async fn read_activation<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut len = [0u8; 1];
    r.read_exact(&mut len).await?;
    let mut name = vec![0u8; len[0] as usize];
    r.read_exact(&mut name).await?;
    String::from_utf8(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_frames_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &RelayMsg::Open { nonce: [7; 16], service: "registry".into() }).await.unwrap();
        let m: RelayMsg = read_frame(&mut buf.as_slice()).await.unwrap();
        assert!(matches!(m, RelayMsg::Open { nonce, service } if nonce == [7; 16] && service == "registry"));

        let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        big.extend(vec![0u8; 16]);
        let e = read_frame::<_, AgentMsg>(&mut big.as_slice()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_pool_proof_depends_on_the_key_the_session_and_the_challenge() {
        let p = pool_proof(&[1; 16], 7, &[2; 16]);
        assert_eq!(p, pool_proof(&[1; 16], 7, &[2; 16]));
        assert_ne!(p, pool_proof(&[3; 16], 7, &[2; 16]));
        assert_ne!(p, pool_proof(&[1; 16], 8, &[2; 16]));
        assert_ne!(p, pool_proof(&[1; 16], 7, &[4; 16]));
    }
}
