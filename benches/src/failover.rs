//! Leader failover under a stream of small pushes (cluster mode).
//!
//! In each repetition a writer pushes 4 KiB blobs to a follower, one after another on one
//! connection, each in a single `POST /v2/<repo>/blobs/uploads/?digest=` request. The writer
//! takes the followers in turn (repetition 1 the lowest id, repetition 2 the next, …), so that
//! both cases occur: the writer's node wins the election, or it stays a follower and forwards
//! to the new leader. After 2 s the leader is killed with SIGKILL (or, with `--failover-signal
//! term`, stopped with SIGTERM: it hands its leadership over, then drains), and three times
//! are taken from the signal:
//!
//! * **election** — until every live node names the same live node as leader (health is
//!   polled every 20 ms, so this is as coarse);
//! * **first push** — until the first push *started after the kill* succeeds (a push in
//!   flight at the kill may have been committed before it, so its success proves nothing);
//! * **longest gap** — the longest time between two consecutive successful pushes in the
//!   repetition, which is normally the one around the kill.
//!
//! The writer keeps going for 1 s after a push has succeeded again, then stops. The killed
//! node is restarted with its config and data directory, and the next repetition starts once
//! it has caught up (its applied index has reached the leader's).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::RngCore;
use tokio::task::JoinHandle;

use crate::client::{sha256_digest, RegistryClient};
use crate::cluster::Cluster;

/// Size of each blob the writer pushes.
pub const BLOB_BYTES: usize = 4096;
/// How long the writer runs before the leader is killed.
pub const KILL_AFTER: Duration = Duration::from_secs(2);
/// Interval of the health polls that detect the new leader.
pub const HEALTH_POLL: Duration = Duration::from_millis(20);
/// Pause after a failed push before the next one, so failures do not spin on the CPU the
/// surviving nodes need for their election.
pub const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// How long the writer keeps going after the first successful push following the kill.
const AFTER_RECOVERY: Duration = Duration::from_secs(1);

const REPO: &str = "bench/failover";

/// How the leader is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: an orderly stop.
    Term,
}

/// Timeouts of a failover measurement.
pub struct FailoverPlan {
    pub reps: u32,
    pub signal: Signal,
    /// Longest wait for a leader, a successful push after the kill, or a node to catch up.
    pub recovery_timeout: Duration,
    /// Timeout of one push.
    pub request_timeout: Duration,
}

/// What one repetition measured.
#[derive(Clone, Debug)]
pub struct FailoverRep {
    /// The leader that was killed.
    pub killed: u64,
    pub new_leader: u64,
    /// The follower the writer pushed to.
    pub writer: u64,
    /// From the kill until all live nodes agree on the new leader.
    pub election: Duration,
    /// From the kill until the first push started after it succeeded.
    pub first_push: Duration,
    /// Longest time between two consecutive successful pushes.
    pub longest_gap: Duration,
    pub pushes_ok: usize,
    pub pushes_failed: usize,
    /// The first error a push started after the kill met, if any.
    pub first_error: Option<String>,
    /// From the restart of the killed node until it had caught up.
    pub catch_up: Duration,
}

/// Runs `plan.reps` failover repetitions on `cluster`, which must have an agreed leader.
pub async fn measure(cluster: &mut Cluster, plan: &FailoverPlan) -> Result<Vec<FailoverRep>> {
    let mut reps = Vec::with_capacity(plan.reps as usize);
    for rep in 1..=plan.reps {
        let outcome = run_rep(cluster, rep, plan).await.with_context(|| format!("failover rep {rep}"))?;
        eprintln!(
            "[failover] rep {rep}/{}: killed leader node {}, node {} leads after {:.0} ms; first push after the kill \
             {:.0} ms, longest gap {:.0} ms ({} pushes to node {} ok, {} failed); node {} caught up {:.2?} after \
             restart",
            plan.reps,
            outcome.killed,
            outcome.new_leader,
            millis(outcome.election),
            millis(outcome.first_push),
            millis(outcome.longest_gap),
            outcome.pushes_ok,
            outcome.writer,
            outcome.pushes_failed,
            outcome.killed,
            outcome.catch_up,
        );
        if let Some(err) = &outcome.first_error {
            eprintln!("[failover] rep {rep}: first failed push after the kill: {err}");
        }
        reps.push(outcome);
    }
    Ok(reps)
}

async fn run_rep(cluster: &mut Cluster, rep: u32, plan: &FailoverPlan) -> Result<FailoverRep> {
    let leader = cluster.wait_for_leader(plan.recovery_timeout, HEALTH_POLL).await?.leader;
    let writer_id = writer_for_rep(&cluster.followers(leader), rep)?;
    let client = RegistryClient::new(cluster.base(writer_id)?, plan.request_timeout, plan.request_timeout)?;
    let writer = Writer::start(client);

    tokio::time::sleep(KILL_AFTER).await;
    if writer.successes() == 0 {
        bail!("no push to node {writer_id} succeeded before the kill: {}", writer.last_error());
    }
    let current = cluster.leadership().await?.leader;
    if current != leader {
        bail!("leadership moved from node {leader} to node {current} while the writer warmed up");
    }
    let killed_at = Instant::now();
    match plan.signal {
        Signal::Kill => cluster.kill(leader)?,
        Signal::Term => cluster.terminate(leader)?,
    }
    let new_leader = cluster.wait_for_leader(plan.recovery_timeout, HEALTH_POLL).await?.leader;
    let election = killed_at.elapsed();
    writer.wait_for_success_after(killed_at, plan.recovery_timeout).await?;
    tokio::time::sleep(AFTER_RECOVERY).await;
    let attempts = writer.stop().await;

    cluster.restart(leader)?;
    let restarted_at = Instant::now();
    cluster.wait_caught_up(leader, plan.recovery_timeout).await?;
    let catch_up = restarted_at.elapsed();

    Ok(FailoverRep {
        killed: leader,
        new_leader,
        writer: writer_id,
        election,
        first_push: first_push_after(&attempts, killed_at).context("no successful push after the kill")?,
        longest_gap: longest_gap(&attempts).unwrap_or_default(),
        pushes_ok: attempts.iter().filter(|a| a.error.is_none()).count(),
        pushes_failed: attempts.iter().filter(|a| a.error.is_some()).count(),
        first_error: attempts.iter().filter(|a| a.started >= killed_at).find_map(|a| a.error.clone()),
        catch_up,
    })
}

/// The follower the writer pushes to in repetition `rep` (1-based): the followers in turn.
fn writer_for_rep(followers: &[u64], rep: u32) -> Result<u64> {
    if followers.is_empty() {
        bail!("the leader has no running follower to write to");
    }
    Ok(followers[(rep as usize - 1) % followers.len()])
}

/// One push by the writer.
struct Attempt {
    started: Instant,
    finished: Instant,
    error: Option<String>,
}

/// A background task pushing small blobs one after another until stopped (or dropped).
struct Writer {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    task: JoinHandle<()>,
}

impl Writer {
    fn start(client: RegistryClient) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, attempts) = (stop.clone(), attempts.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let (data, digest) = small_blob();
                    let started = Instant::now();
                    let outcome = client.push_blob_single_post(REPO, data, &digest).await;
                    let error = outcome.err().map(|err| format!("{err:#}"));
                    let failed = error.is_some();
                    lock(&attempts).push(Attempt { started, finished: Instant::now(), error });
                    if failed {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
        Writer { stop, attempts, task }
    }

    fn successes(&self) -> usize {
        lock(&self.attempts).iter().filter(|a| a.error.is_none()).count()
    }

    fn last_error(&self) -> String {
        let attempts = lock(&self.attempts);
        attempts.iter().rev().find_map(|a| a.error.clone()).unwrap_or_else(|| "no push finished".to_string())
    }

    /// Waits until a push started after `since` has succeeded.
    async fn wait_for_success_after(&self, since: Instant, timeout: Duration) -> Result<()> {
        while first_push_after(&lock(&self.attempts), since).is_none() {
            if since.elapsed() > timeout {
                bail!("no push succeeded within {timeout:?} of the kill; last error: {}", self.last_error());
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
        Ok(())
    }

    /// Stops the writer after its current push and returns all its attempts.
    async fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = (&mut self.task).await;
        std::mem::take(&mut *lock(&self.attempts))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(attempts: &Mutex<Vec<Attempt>>) -> std::sync::MutexGuard<'_, Vec<Attempt>> {
    attempts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random blob of [`BLOB_BYTES`] and its digest.
fn small_blob() -> (Bytes, String) {
    let mut data = vec![0u8; BLOB_BYTES];
    rand::thread_rng().fill_bytes(&mut data);
    let digest = sha256_digest(&data);
    (Bytes::from(data), digest)
}

/// Time from `kill` until the first successful push that started after it finished.
fn first_push_after(attempts: &[Attempt], kill: Instant) -> Option<Duration> {
    attempts.iter().filter(|a| a.error.is_none() && a.started >= kill).map(|a| a.finished - kill).min()
}

/// Longest time between the completions of two consecutive successful pushes.
fn longest_gap(attempts: &[Attempt]) -> Option<Duration> {
    let mut done: Vec<Instant> = attempts.iter().filter(|a| a.error.is_none()).map(|a| a.finished).collect();
    done.sort();
    done.windows(2).map(|w| w[1] - w[0]).max()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(base: Instant, started_ms: u64, finished_ms: u64, ok: bool) -> Attempt {
        Attempt {
            started: base + Duration::from_millis(started_ms),
            finished: base + Duration::from_millis(finished_ms),
            error: (!ok).then(|| "503".to_string()),
        }
    }

    #[test]
    fn writer_takes_the_followers_in_turn() {
        assert_eq!(writer_for_rep(&[2, 3], 1).unwrap(), 2);
        assert_eq!(writer_for_rep(&[2, 3], 2).unwrap(), 3);
        assert_eq!(writer_for_rep(&[1, 3], 3).unwrap(), 1);
        assert!(writer_for_rep(&[], 1).is_err());
    }

    #[test]
    fn first_push_ignores_pushes_in_flight_at_the_kill() {
        let base = Instant::now();
        let kill = base + Duration::from_millis(100);
        let attempts = [
            attempt(base, 90, 101, true),
            attempt(base, 101, 150, false),
            attempt(base, 155, 400, true),
            attempt(base, 400, 405, true),
        ];
        assert_eq!(first_push_after(&attempts, kill), Some(Duration::from_millis(300)));
        assert_eq!(first_push_after(&attempts[..2], kill), None);
    }

    #[test]
    fn longest_gap_is_between_successes() {
        let base = Instant::now();
        let attempts = [
            attempt(base, 0, 5, true),
            attempt(base, 5, 10, true),
            attempt(base, 10, 200, false),
            attempt(base, 205, 310, true),
            attempt(base, 310, 315, true),
        ];
        assert_eq!(longest_gap(&attempts), Some(Duration::from_millis(300)));
        assert_eq!(longest_gap(&attempts[..1]), None);
    }
}
