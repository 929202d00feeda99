//! openraft's network over the peer protocol: each Raft RPC is one unary call carrying the
//! bincode-encoded openraft request and answering the bincode-encoded `Result`.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use raftyard_raft::{NodeAddr, NodeId, TypeConfig};
use serde::{de::DeserializeOwned, Serialize};

use crate::codec;
use crate::pb::raft_client::RaftClient;
use crate::pb::RaftMessage;
use crate::peers::{Peers, MAX_MESSAGE};

/// Serialized appends larger than this are split by openraft (it retries with fewer entries).
const MAX_APPEND_BYTES: usize = 64 * 1024 * 1024;

/// Creates Raft clients for peers over `peers`' connections: give it connections of its own
/// ([`Peers::own_connections`]), so that they are opened, and run, on Raft's runtime.
#[derive(Clone)]
pub struct PeerNetwork {
    peers: Arc<Peers>,
}

impl PeerNetwork {
    pub fn new(peers: Arc<Peers>) -> Self {
        PeerNetwork { peers }
    }
}

/// The Raft client of one peer.
pub struct PeerRaft {
    target: NodeId,
    addr: String,
    peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerRaft;
    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerRaft {
        PeerRaft { target, addr: node.peer.clone(), peers: self.peers.clone() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer {target} at {addr}: {msg}")]
struct PeerCallError {
    target: NodeId,
    addr: String,
    msg: String,
}

type Rpc<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, NodeAddr, E>>;

impl PeerRaft {
    fn err(&self, msg: impl ToString) -> PeerCallError {
        PeerCallError { target: self.target, addr: self.addr.clone(), msg: msg.to_string() }
    }

    async fn call<Req, Resp, E>(&self, which: Which, req: &Req, option: &RPCOption) -> Rpc<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&self.err(e))))?;
        let channel =
            self.peers.channel(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&self.err(e))))?;
        let mut client =
            RaftClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
        let mut request = tonic::Request::new(RaftMessage { data: data.into() });
        request.set_timeout(option.hard_ttl());
        let reply = match which {
            Which::Append => client.append_entries(request).await,
            Which::Vote => client.vote(request).await,
            Which::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&self.err(s.message()))),
            _ => RPCError::Network(NetworkError::new(&self.err(s.message()))),
        })?;
        let result: Result<Resp, E> = codec::decode(&reply.into_inner().data)
            .map_err(|s| RPCError::Network(NetworkError::new(&self.err(s.message()))))?;
        result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
    }
}

enum Which {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerRaft {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        let n = rpc.entries.len() as u64;
        if n > 1 {
            let size = bincode::serialized_size(&rpc).unwrap_or(0) as usize;
            if size > MAX_APPEND_BYTES {
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint((n / 2).max(1))));
            }
        }
        self.call(Which::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(Which::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Rpc<VoteResponse<NodeId>> {
        self.call(Which::Vote, &rpc, &option).await
    }
}
