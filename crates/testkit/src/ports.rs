//! Loopback ports for test nodes (also compiled into `crates/raftyard/tests/common`).

use std::net::TcpListener;

/// A loopback port to listen on. Taken below the kernel's ephemeral range (32768–60999 on
/// Linux), from a window of this test process (by pid): a port the kernel handed out could be
/// taken meanwhile as the local end of some outgoing connection of another test, and the
/// process started on it would fail with "address in use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const WINDOW: u32 = 64;
    let base = 20_000 + (std::process::id() % 190) * WINDOW;
    for _ in 0..WINDOW {
        let port = (base + NEXT.fetch_add(1, Ordering::Relaxed) % WINDOW) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
