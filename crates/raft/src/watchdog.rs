//! Deadlines on storage waits. sled offers none: a write or flush whose IO never completes
//! (a wedged device; a failed write in sled's log that wakes no waiter) blocks its thread for
//! ever, and with it openraft's core, so the node would stay up, answer probes and commit
//! nothing. Every blocking sled call of this crate runs inside a [`StorageWatch`] guard; a
//! thread of its own looks at the guards and, once one is older than the deadline, reports the
//! storage stuck ([`StorageWatch::stuck`]). The node then stops (crash-only: its data is safe to
//! start again), instead of limping on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long an operation whose time grows with the state may take ([`StorageWatch::enter_bulk`]):
/// a snapshot of a very large registry is written at disk speed, not in milliseconds.
pub const BULK_DEADLINE: Duration = Duration::from_secs(1800);

/// Exit status of a process ended by a stuck storage operation ([`StorageWatch::exiting`]).
pub const EXIT_STORAGE_STUCK: i32 = 75;

struct Inner {
    deadline: Duration,
    /// End the process once an operation is stuck.
    exit: bool,
    next: AtomicU64,
    /// The storage operations in progress: what, since when, and whether bulk.
    ops: Mutex<HashMap<u64, (&'static str, Instant, bool)>>,
    /// Set once an operation outlived the deadline.
    stuck: watch::Sender<Option<String>>,
}

/// Watches the storage operations of one node. Cheap to clone.
#[derive(Clone)]
pub struct StorageWatch {
    inner: Arc<Inner>,
}

/// One storage operation in progress; it ends when the guard drops.
pub struct Guard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.ops.lock().unwrap().remove(&self.id);
    }
}

impl StorageWatch {
    /// Starts the watching thread; it ends when the last handle is dropped.
    pub fn new(deadline: Duration) -> Self {
        Self::start(deadline, false)
    }

    /// The same, and the watching thread itself ends the process (status
    /// [`EXIT_STORAGE_STUCK`]) once an operation is stuck: a process whose threads are blocked
    /// in storage may not get far enough to act on [`StorageWatch::stuck`] (a node still
    /// opening its database, a runtime whose every worker waits on the disk).
    pub fn exiting(deadline: Duration) -> Self {
        Self::start(deadline, true)
    }

    fn start(deadline: Duration, exit: bool) -> Self {
        let (stuck, _) = watch::channel(None);
        let inner = Arc::new(Inner { deadline, exit, next: AtomicU64::new(0), ops: Mutex::new(HashMap::new()), stuck });
        let weak = Arc::downgrade(&inner);
        let every = (deadline / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::Builder::new()
            .name("storage-watch".into())
            .spawn(move || watch_loop(weak, every))
            .expect("spawn the storage watchdog");
        StorageWatch { inner }
    }

    /// For offline tools (recovery, restore), where nobody waits on the answer: a deadline
    /// of an hour.
    pub fn offline() -> Self {
        Self::new(Duration::from_secs(3600))
    }

    /// Marks the start of a storage operation named `what`; it ends when the guard drops.
    pub fn enter(&self, what: &'static str) -> Guard {
        self.enter_as(what, false)
    }

    /// The same for an operation whose time grows with the size of the state (a snapshot read,
    /// written or installed; opening the database): held to [`BULK_DEADLINE`] instead, and not
    /// counted by [`StorageWatch::oldest`], so that a large snapshot neither stops a node nor
    /// makes it unready.
    pub fn enter_bulk(&self, what: &'static str) -> Guard {
        self.enter_as(what, true)
    }

    fn enter_as(&self, what: &'static str, bulk: bool) -> Guard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.ops.lock().unwrap().insert(id, (what, Instant::now(), bulk));
        Guard { inner: self.inner.clone(), id }
    }

    /// Runs a blocking storage call under a guard.
    pub fn run<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        let _g = self.enter(what);
        f()
    }

    /// The oldest operation in progress that is not bulk, and its age.
    pub fn oldest(&self) -> Option<(&'static str, Duration)> {
        let ops = self.inner.ops.lock().unwrap();
        ops.values()
            .filter(|(_, _, bulk)| !bulk)
            .min_by_key(|(_, at, _)| *at)
            .map(|(what, at, _)| (*what, at.elapsed()))
    }

    /// Resolves once a storage operation outlived the deadline, with what it was.
    pub async fn stuck(&self) -> String {
        let mut rx = self.inner.stuck.subscribe();
        let seen = rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| s.clone());
        match seen {
            Some(s) => s,
            None => std::future::pending().await,
        }
    }

    /// Whether a storage operation outlived the deadline.
    pub fn is_stuck(&self) -> bool {
        self.inner.stuck.borrow().is_some()
    }
}

fn watch_loop(weak: Weak<Inner>, every: Duration) {
    loop {
        std::thread::sleep(every);
        let Some(inner) = weak.upgrade() else { return };
        if inner.stuck.borrow().is_some() {
            return;
        }
        let late = {
            let ops = inner.ops.lock().unwrap();
            let limit = |bulk: bool| if bulk { BULK_DEADLINE.max(inner.deadline) } else { inner.deadline };
            ops.values().filter(|(_, at, bulk)| at.elapsed() > limit(*bulk)).min_by_key(|(_, at, _)| *at).copied()
        };
        if let Some((what, at, bulk)) = late {
            let deadline = if bulk { BULK_DEADLINE.max(inner.deadline) } else { inner.deadline };
            let msg = format!(
                "storage operation {what:?} has not completed after {:.1} s (deadline {:.1} s)",
                at.elapsed().as_secs_f64(),
                deadline.as_secs_f64()
            );
            tracing::error!("{msg}");
            inner.stuck.send_replace(Some(msg));
            if inner.exit {
                tracing::error!(
                    "metadata storage is stuck: the process ends now (crash-only: its data is safe to start again)"
                );
                std::process::exit(EXIT_STORAGE_STUCK);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_operation_past_the_deadline_is_reported_and_a_quick_one_is_not() {
        let w = StorageWatch::new(Duration::from_millis(200));
        for _ in 0..20 {
            w.run("quick", || std::thread::sleep(Duration::from_millis(5)));
        }
        assert!(!w.is_stuck());
        assert!(w.oldest().is_none());
        let started = Instant::now();
        let hang = w.enter("flush");
        let msg = tokio::time::timeout(Duration::from_secs(5), w.stuck()).await.expect("reported");
        assert!(msg.contains("\"flush\""), "{msg}");
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
        assert!(w.is_stuck());
        drop(hang);
    }

    #[tokio::test]
    async fn a_bulk_operation_has_a_long_deadline_and_does_not_count_as_slow() {
        let w = StorageWatch::new(Duration::from_millis(100));
        let bulk = w.enter_bulk("snapshot write");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!w.is_stuck(), "a bulk operation past the ordinary deadline is not stuck");
        assert!(w.oldest().is_none(), "nor slow for readiness");
        let _quick = w.enter("apply");
        assert_eq!(w.oldest().map(|(what, _)| what), Some("apply"));
        drop(bulk);
    }
}
