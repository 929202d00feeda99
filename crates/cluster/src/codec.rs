//! Conversions between domain values and the wire: bincode payloads inside protobuf messages,
//! and errors to and from tonic statuses. The only place that knows both sides.

use raftyard_raft::{NodeAddr, NodeId, ProposeError};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Code, Status};

/// Metadata key carrying the leader's id and addresses on a `FailedPrecondition` (not leader).
const LEADER_HINT: &str = "x-raftyard-leader";
/// The message of that status.
const NOT_LEADER: &str = "not the leader";

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    bincode::serialize(v).map_err(|e| Status::internal(format!("encoding: {e}")))
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    bincode::deserialize(b).map_err(|e| Status::invalid_argument(format!("decoding: {e}")))
}

/// A proposal error as a status for the forwarding follower.
pub fn propose_error_to_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader } => {
            let mut s = Status::failed_precondition(NOT_LEADER);
            if let Some((id, addr)) = leader {
                if let Ok(v) = format!("{id} {} {}", addr.peer, addr.registry).parse() {
                    s.metadata_mut().insert(LEADER_HINT, v);
                }
            }
            s
        }
        ProposeError::Unavailable(m) => Status::unavailable(m),
        ProposeError::Rejected(r) => Status::internal(format!("unexpected rejection: {r}")),
    }
}

/// Whether a status says the node asked was not the leader (any more): asking the leader again
/// may succeed. Other `FailedPrecondition`s (a refused member) are final.
pub fn is_not_leader(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.message() == NOT_LEADER
}

/// A status from the leader (or the transport) as a proposal error.
pub fn status_to_propose_error(s: Status) -> ProposeError {
    if !is_not_leader(&s) {
        return ProposeError::Unavailable(format!("peer: {}", s.message()));
    }
    let leader = s.metadata().get(LEADER_HINT).and_then(|v| v.to_str().ok()).and_then(|v| {
        let mut it = v.split(' ');
        let id: NodeId = it.next()?.parse().ok()?;
        Some((id, NodeAddr { peer: it.next()?.to_string(), registry: it.next()?.to_string() }))
    });
    ProposeError::NotLeader { leader }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Not the leader" crosses the wire with its hint; another refusal with the same code
    /// (a member the leader refused) is not mistaken for it, so nobody retries it.
    #[test]
    fn only_not_leader_comes_back_as_not_leader() {
        let addr = NodeAddr { peer: "127.0.0.1:7001".into(), registry: "127.0.0.1:5001".into() };
        let s = propose_error_to_status(ProposeError::NotLeader { leader: Some((2, addr.clone())) });
        assert!(is_not_leader(&s));
        match status_to_propose_error(s) {
            ProposeError::NotLeader { leader } => assert_eq!(leader, Some((2, addr))),
            other => panic!("{other:?}"),
        }
        let refused = Status::failed_precondition("node 4 is not a member");
        assert!(!is_not_leader(&refused));
        assert!(matches!(status_to_propose_error(refused), ProposeError::Unavailable(_)));
    }
}
