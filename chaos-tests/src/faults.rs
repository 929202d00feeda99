//! The fault schedule: derived from the seed alone, so a failing seed replays the same
//! faults at the same times (which node is the leader at that time is up to the cluster).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::proxy::{LinkState, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// `kill -9`; started again when healed.
    Kill,
    /// SIGSTOP; SIGCONT when healed.
    Pause,
    /// SIGTERM (a drain) and start again at once.
    Restart,
    /// Every peer link of the node held both ways (cut from the others; a leader loses its
    /// majority).
    Isolate,
    /// The node hears the others but nothing it sends arrives.
    OneWay,
    /// Every peer link of the node delayed.
    Slow,
    /// `kill -9` of the tunnel relay (with `--relay`); started again when healed.
    Relay,
    /// The node's disk fills up (a file grows until ENOSPC); the file is removed when healed.
    Disk,
    /// A garbage collection through the node (`raftyard gc`, links older than
    /// [`crate::cluster::GC_GRACE`]), in the background; nothing to heal.
    Gc,
}

impl Kind {
    pub const ALL: [Kind; 8] =
        [Kind::Kill, Kind::Pause, Kind::Restart, Kind::Isolate, Kind::OneWay, Kind::Slow, Kind::Disk, Kind::Gc];

    pub fn parse(s: &str) -> Result<Kind, String> {
        Ok(match s {
            "kill" => Kind::Kill,
            "pause" => Kind::Pause,
            "restart" => Kind::Restart,
            "isolate" => Kind::Isolate,
            "oneway" => Kind::OneWay,
            "slow" => Kind::Slow,
            "relay" => Kind::Relay,
            "disk" => Kind::Disk,
            "gc" => Kind::Gc,
            _ => {
                return Err(format!(
                    "unknown fault {s:?} (kill, pause, restart, isolate, oneway, slow, disk, gc, relay)"
                ))
            }
        })
    }
}

/// Whom a fault hits, resolved when it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Target {
    Leader,
    /// The k-th follower (modulo their number).
    Follower(usize),
    /// The backup node (with `--backup`).
    Backup,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at: Duration,
    pub kind: Kind,
    pub target: Target,
    /// How long the fault lasts before it is healed.
    pub hold: Duration,
    /// For `Slow`: the added delay per chunk.
    pub delay: Duration,
}

/// One fault at a time: 1–4 s of fault, 1–3 s of calm, from 1.5 s until 1 s before the end.
/// With a backup node, one fault in five (not the relay's) hits it.
pub fn schedule(seed: u64, duration: Duration, mix: &[Kind], backup: bool) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut t = Duration::from_millis(1500);
    if mix.is_empty() {
        return steps;
    }
    loop {
        let hold = Duration::from_millis(rng.gen_range(1000..4000));
        if t + hold + Duration::from_secs(1) > duration {
            return steps;
        }
        let kind = mix[rng.gen_range(0..mix.len())];
        let mut target = if rng.gen_bool(0.5) { Target::Leader } else { Target::Follower(rng.gen_range(0..8)) };
        let delay = Duration::from_millis(rng.gen_range(5..60));
        if backup && rng.gen_ratio(1, 5) && kind != Kind::Relay {
            target = Target::Backup;
        }
        steps.push(Step { at: t, kind, target, hold, delay });
        t += hold + Duration::from_millis(rng.gen_range(1000..3000));
    }
}

/// The node a step hits, given the current leader (node 1 when none is known).
pub fn resolve(target: Target, leader: Option<u64>, ids: &[u64], backup: Option<u64>) -> u64 {
    let leader = leader.unwrap_or(ids[0]);
    match target {
        Target::Backup => backup.unwrap_or(leader),
        Target::Leader => leader,
        Target::Follower(k) => {
            let f: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
            f[k % f.len()]
        }
    }
}

pub async fn apply(c: &mut Cluster, step: &Step, node: u64) -> anyhow::Result<()> {
    match step.kind {
        Kind::Kill => c.kill(node),
        Kind::Pause => c.pause(node),
        Kind::Restart => c.restart(node).await?,
        Kind::Isolate => c.set_links_of(node, LinkState::CUT),
        Kind::OneWay => {
            for other in c.all_ids().into_iter().filter(|&o| o != node) {
                c.set_link(node, other, LinkState { forward: Mode::Hold, backward: Mode::Pass });
                c.set_link(other, node, LinkState { forward: Mode::Pass, backward: Mode::Hold });
            }
        }
        Kind::Slow => {
            c.set_links_of(node, LinkState { forward: Mode::Delay(step.delay), backward: Mode::Delay(step.delay) })
        }
        Kind::Relay => c.kill_relay(),
        Kind::Disk => c.fill_disk(node)?,
        Kind::Gc => c.collect(node, crate::cluster::GC_GRACE),
    }
    Ok(())
}

/// Undoes one fault on `node`; `others` are the faults still in place (link faults are
/// recomputed from them).
pub async fn heal_one(c: &mut Cluster, step: &Step, node: u64, others: &[(&Step, u64)]) -> anyhow::Result<()> {
    match step.kind {
        Kind::Kill | Kind::Restart => c.start_again(node).await?,
        Kind::Pause => c.resume(node),
        Kind::Disk => {
            c.free_disk(node);
            c.start_again(node).await?;
        }
        Kind::Relay => c.start_relay().await?,
        Kind::Gc => {}
        Kind::Isolate | Kind::OneWay | Kind::Slow => {
            c.heal_links();
            for (s, n) in others {
                if matches!(s.kind, Kind::Isolate | Kind::OneWay | Kind::Slow) {
                    apply(c, s, *n).await?;
                }
            }
        }
    }
    Ok(())
}

/// Undoes every fault: links pass, paused nodes continue, killed nodes start again.
pub async fn heal(c: &mut Cluster) -> anyhow::Result<()> {
    c.heal_links();
    for id in c.all_ids() {
        c.free_disk(id);
        if c.node(id).paused {
            c.resume(id);
        }
        c.start_again(id).await?;
    }
    c.start_relay().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let a = schedule(7, Duration::from_secs(60), &Kind::ALL, false);
        let b = schedule(7, Duration::from_secs(60), &Kind::ALL, false);
        assert!(!a.is_empty());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", schedule(8, Duration::from_secs(60), &Kind::ALL, false)));
        assert!(a.iter().all(|s| s.at + s.hold < Duration::from_secs(60)));
    }
}
