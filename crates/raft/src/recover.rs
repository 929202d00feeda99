//! Offline recovery: turns a stopped node's metadata storage (a backup's, once the primaries
//! are lost) into a cluster with this node as its only voter.
//!
//! Nothing the node holds is dropped: every log entry it has (applied or not) stays, and a
//! membership entry naming it the only voter is appended after the last one. When the node
//! starts, it elects itself, commits that entry and everything before it, and applies them.
//! The entry carries the log id of its predecessor's leader and term: it is written where no
//! other member can ever contest it (they are gone), and the first election moves the term on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{Entry, EntryPayload, Membership, RaftLogReader};

use crate::log_store::LogStore;
use crate::node::StartError;
use crate::state::StateMachine;
use crate::{LogId, NodeAddr, NodeId, StorageWatch, TypeConfig};

/// What [`single_voter`] did.
#[derive(Debug)]
pub struct Recovered {
    pub id: NodeId,
    pub addr: NodeAddr,
    /// The voters of the membership it replaced.
    pub old_voters: Vec<NodeId>,
    pub applied: u64,
    /// Index of the new membership entry.
    pub index: u64,
}

/// The members this storage knows: the latest membership in its log, else its state's.
async fn membership(
    log: &mut LogStore,
    sm: &mut StateMachine,
) -> Result<(Membership<NodeId, NodeAddr>, Option<LogId>, Option<LogId>), StartError> {
    let (applied, stored) = sm.applied_state().await?;
    let state = log.get_log_state().await?;
    let last = state.last_log_id.or(applied);
    let mut m = stored.membership().clone();
    if let Some(last) = last {
        let from = applied.map(|l| l.index + 1).unwrap_or(0);
        if from <= last.index {
            for e in log.try_get_log_entries(from..=last.index).await? {
                if let EntryPayload::Membership(new) = e.payload {
                    m = new;
                }
            }
        }
    }
    Ok((m, applied, last))
}

/// Makes node `id` the only voter of the storage under `dir` (the node must be stopped).
/// Without `id`: the only learner of its membership (a backup).
pub async fn single_voter(dir: &Path, id: Option<NodeId>) -> Result<Recovered, StartError> {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        return Err(StartError::Storage(format!("{} holds no metadata storage", dir.display())));
    }
    let db = crate::node::open_offline_db(dir, false)?;
    let watch = StorageWatch::offline();
    let (mut log, mut sm) = (LogStore::open(&db, watch.clone())?, StateMachine::open(&db, dir, watch)?);
    let (m, applied, last) = membership(&mut log, &mut sm).await?;
    let last = last.ok_or_else(|| StartError::Storage("the log is empty: this node never joined".into()))?;
    let id = match id {
        Some(id) => id,
        None => {
            let voters: BTreeSet<NodeId> = m.voter_ids().collect();
            let learners: Vec<NodeId> = m.nodes().map(|(id, _)| *id).filter(|id| !voters.contains(id)).collect();
            match learners.as_slice() {
                [one] => *one,
                [] => return Err(StartError::Storage("no learner in this node's membership: pass its id".into())),
                more => {
                    return Err(StartError::Storage(format!(
                        "several learners ({more:?}) in this node's membership: pass its id"
                    )))
                }
            }
        }
    };
    let addr = m
        .get_node(&id)
        .cloned()
        .ok_or_else(|| StartError::Storage(format!("node {id} is not a member of this storage's cluster")))?;
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(last.leader_id, last.index + 1),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([id])],
            BTreeMap::from([(id, addr.clone())]),
        )),
    };
    log.append_offline(&entry)?;
    db.flush_async().await?;
    Ok(Recovered {
        id,
        addr,
        old_voters: m.voter_ids().collect(),
        applied: applied.map(|l| l.index).unwrap_or(0),
        index: last.index + 1,
    })
}
