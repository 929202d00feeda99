//! The Raft network of a cluster of one: there is nobody to talk to. Multi-node clusters plug
//! their own [`openraft::RaftNetworkFactory`] into [`crate::MetaNode::start`].

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use crate::{NodeAddr, NodeId, TypeConfig};

#[derive(Debug, thiserror::Error)]
#[error("node {0} is not reachable: this node runs without peers")]
struct NoPeers(NodeId);

/// A network factory whose clients cannot reach anyone.
#[derive(Clone, Default)]
pub struct NoNetwork;

pub struct NoClient(NodeId);

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoClient;
    async fn new_client(&mut self, target: NodeId, _node: &NodeAddr) -> NoClient {
        NoClient(target)
    }
}

type Rpc<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, NodeAddr, E>>;

impl RaftNetwork<TypeConfig> for NoClient {
    async fn append_entries(
        &mut self,
        _: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeers(self.0))))
    }

    async fn install_snapshot(
        &mut self,
        _: InstallSnapshotRequest<TypeConfig>,
        _: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeers(self.0))))
    }

    async fn vote(&mut self, _: VoteRequest<NodeId>, _: RPCOption) -> Rpc<VoteResponse<NodeId>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoPeers(self.0))))
    }
}
