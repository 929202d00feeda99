//! The wire protocol between agent and relay.
//!
//! Both kinds of connection arrive on the relay's control port; the first byte tells them apart:
//! - a **control connection** starts with a TLS handshake (first byte `0x16`). Inside it, frames
//!   of a big-endian `u32` length followed by a bincode [`AgentMsg`] or [`RelayMsg`]. The agent
//!   opens with `Hello`; the relay answers `Welcome` or `Refused`.
//! - a **data channel** starts with [`DATA_MAGIC`] and a 16-byte nonce the relay sent in an
//!   `Open` over the control connection; after those 20 bytes it carries one visitor's raw bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const VERSION: u16 = 1;
/// First bytes of a data channel.
pub const DATA_MAGIC: [u8; 4] = *b"RYD1";
/// First byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;
/// Control frames are small; anything larger is a protocol violation.
const MAX_FRAME: usize = 64 * 1024;

pub type Nonce = [u8; 16];

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
    Welcome {
        session: u64,
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
}
