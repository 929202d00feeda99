//! Failed authentication attempts per client address: past `threshold` failures within a
//! minute, the address is locked out for `duration` (every request gets `429` with
//! `Retry-After`), and only that address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; past it, the oldest quiet ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// The key an address is counted under: itself, or for IPv6 its /64 (what one client holds).
fn key(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

pub struct Lockout {
    threshold: u32,
    duration: Duration,
    inner: Mutex<HashMap<IpAddr, Entry>>,
    /// Lockouts started, ever.
    pub lockouts: AtomicU64,
}

struct Entry {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

impl Lockout {
    /// `threshold` 0 disables the lockout.
    pub fn new(threshold: u32, duration: Duration) -> Lockout {
        Lockout { threshold, duration, inner: Mutex::default(), lockouts: AtomicU64::new(0) }
    }

    /// How long `addr` stays locked out, if it is.
    pub fn locked(&self, addr: IpAddr) -> Option<Duration> {
        let addr = key(addr);
        let now = Instant::now();
        let map = self.inner.lock().expect("lockout lock");
        let until = map.get(&addr)?.locked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Records a failure; returns true when it starts a lockout.
    pub fn failure(&self, addr: IpAddr) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let addr = key(addr);
        let now = Instant::now();
        let mut map = self.inner.lock().expect("lockout lock");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, e| now.duration_since(e.window_start) < WINDOW || e.locked_until.is_some_and(|u| u > now));
        }
        let e = map.entry(addr).or_insert(Entry { window_start: now, failures: 0, locked_until: None });
        if now.duration_since(e.window_start) >= WINDOW {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures > self.threshold && e.locked_until.is_none_or(|u| u <= now) {
            e.locked_until = Some(now + self.duration);
            e.failures = 0;
            e.window_start = now;
            self.lockouts.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Addresses locked out now.
    pub fn locked_count(&self) -> usize {
        let now = Instant::now();
        self.inner.lock().expect("lockout lock").values().filter(|e| e.locked_until.is_some_and(|u| u > now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_one_address_only() {
        let l = Lockout::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!l.failure(a));
        }
        assert!(l.locked(a).is_none(), "at the threshold: not yet");
        assert!(l.failure(a), "past it: locked");
        assert!(l.locked(a).is_some_and(|d| d > Duration::from_secs(50)));
        assert!(l.locked(b).is_none());
        assert_eq!(l.locked_count(), 1);
        assert_eq!(l.lockouts.load(Ordering::Relaxed), 1);
        // an IPv6 client is counted by its /64
        let v6 = Lockout::new(1, Duration::from_secs(60));
        v6.failure("2001:db8::1".parse().unwrap());
        v6.failure("2001:db8::2".parse().unwrap());
        assert!(v6.locked("2001:db8::ffff".parse().unwrap()).is_some());
        assert!(v6.locked("2001:db8:0:1::1".parse().unwrap()).is_none());
        let off = Lockout::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            assert!(!off.failure(a));
        }
    }
}
