//! [`raftyard_raft::LeaderLink`] over the peer protocol: how a follower forwards proposals and
//! asks for read indexes, and how a stopping leader asks a voter to stand for election.

use std::sync::Arc;
use std::time::Duration;

use raftyard_raft::{LeaderLink, NodeAddr, NodeId, ProposeError};
use raftyard_types::event::VersionedCommand;
use raftyard_types::{Outcome, Rejection};

use crate::codec;
use crate::pb::meta_client::MetaClient;
use crate::pb::{CampaignRequest, HeartbeatRequest, ProposeRequest, ReadIndexRequest};
use crate::peers::{Peers, MAX_MESSAGE};

/// Deadline of a forwarded proposal (commit on a majority and apply on the leader).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct GrpcLeaderLink {
    peers: Arc<Peers>,
}

impl GrpcLeaderLink {
    pub fn new(peers: Arc<Peers>) -> Self {
        GrpcLeaderLink { peers }
    }

    fn client(&self, leader: &NodeAddr) -> Result<MetaClient<crate::peers::PeerChannel>, ProposeError> {
        let ch = self.peers.channel(&leader.peer).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        Ok(MetaClient::new(ch).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
    }
}

#[async_trait::async_trait]
impl LeaderLink for GrpcLeaderLink {
    async fn propose(
        &self,
        from: NodeId,
        leader: &NodeAddr,
        cmd: VersionedCommand,
    ) -> Result<(u64, Outcome), ProposeError> {
        let command = codec::encode(&cmd).map_err(codec::status_to_propose_error)?;
        let mut req = tonic::Request::new(ProposeRequest { command: command.into(), from });
        req.set_timeout(PROPOSE_TIMEOUT);
        let reply = self.client(leader)?.propose(req).await.map_err(codec::status_to_propose_error)?.into_inner();
        let outcome = if reply.rejection.is_empty() {
            Ok(())
        } else {
            Err(codec::decode::<Rejection>(&reply.rejection).map_err(codec::status_to_propose_error)?)
        };
        Ok((reply.index, outcome))
    }

    async fn nudge(&self, leader: &NodeAddr) {
        if let Ok(mut c) = self.client(leader) {
            let mut req = tonic::Request::new(HeartbeatRequest {});
            req.set_timeout(crate::peers::CALL_TIMEOUT);
            let _ = c.heartbeat(req).await;
        }
    }

    async fn read_index(&self, from: NodeId, leader: &NodeAddr) -> Result<u64, ProposeError> {
        self.ask_index(from, leader, false).await
    }

    async fn probe(&self, from: NodeId, leader: &NodeAddr) -> Result<u64, ProposeError> {
        self.ask_index(from, leader, true).await
    }

    async fn campaign(&self, from: NodeId, to: &NodeAddr, last_index: u64) -> Result<(), String> {
        let mut c = self.client(to).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(CampaignRequest { from, last_index });
        req.set_timeout(crate::peers::CALL_TIMEOUT);
        c.campaign(req).await.map(|_| ()).map_err(|s| s.message().to_string())
    }
}

impl GrpcLeaderLink {
    async fn ask_index(&self, from: NodeId, leader: &NodeAddr, probe: bool) -> Result<u64, ProposeError> {
        let mut req = tonic::Request::new(ReadIndexRequest { from, probe });
        req.set_timeout(crate::peers::CALL_TIMEOUT);
        let reply = self.client(leader)?.read_index(req).await.map_err(codec::status_to_propose_error)?;
        Ok(reply.into_inner().index)
    }
}
