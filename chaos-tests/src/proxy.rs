//! A fault-injecting TCP proxy for one directed peer link (node i dialling node j).
//!
//! Each direction of every connection through it is in one of three modes: bytes pass, bytes
//! pass after a delay (a slow link), or bytes are held (a partition: nothing gets through and
//! nothing is reset — like packets dropped on the floor; what was held flows once healed, as
//! TCP retransmission would deliver it, unless an end gave up first).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(Duration),
    Hold,
}

/// The modes of a link: `forward` is dialler → target (requests), `backward` the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub forward: Mode,
    pub backward: Mode,
}

impl LinkState {
    pub const PASS: LinkState = LinkState { forward: Mode::Pass, backward: Mode::Pass };
    pub const CUT: LinkState = LinkState { forward: Mode::Hold, backward: Mode::Hold };
}

/// Runs a proxy on `listener` to `target` until the returned sender is dropped.
pub fn spawn(listener: TcpListener, target: SocketAddr) -> watch::Sender<LinkState> {
    let (tx, rx) = watch::channel(LinkState::PASS);
    tokio::spawn(async move {
        let mut closed = rx.clone();
        loop {
            let (client, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = closed.changed() => {
                    if closed.has_changed().is_err() { return } else { continue }
                }
            };
            let rx = rx.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else { return };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::select! {
                    _ = pipe(cr, sw, rx.clone(), |s| s.forward) => {}
                    _ = pipe(sr, cw, rx, |s| s.backward) => {}
                }
            });
        }
    });
    tx
}

/// Copies `from` to `to` as the link's mode says: `Delay(d)` holds each chunk until `d` after
/// it arrived (latency, not a bandwidth limit: chunks behind it are read meanwhile), `Hold`
/// holds everything until the mode changes.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
    mode: fn(&LinkState) -> Mode,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if tx.send((tokio::time::Instant::now(), buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            loop {
                let m = mode(&state.borrow());
                match m {
                    Mode::Pass => break,
                    Mode::Delay(d) => {
                        tokio::time::sleep_until(arrived + d).await;
                        break;
                    }
                    Mode::Hold => {
                        if state.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // the reader ends at EOF; what it queued is still written
    tokio::join!(reader, writer);
}
