//! The peer side of a raftyard node: everything nodes of one cluster say to each other on the
//! peer port (`proto/raftyard_peer.proto`).
//!
//! Owns the tonic services and clients: the openraft network ([`network`]), forwarding of
//! proposals and read indexes to the leader ([`link`]), blob streaming between nodes
//! ([`blobs`]), the index of the blobs this node lacks ([`missing`]), the repair worker that
//! converges blob holdings ([`repair`]), garbage collections and the sweep of unlinked blob
//! files ([`gc`]), retention runs ([`retention`]), a backup's lag
//! figures ([`lag`]), and membership/status ([`admin`]). Protobuf stays at this edge: conversions live in
//! [`codec`], and the other crates never see prost types. It does not serve the registry
//! API; the registry crate uses it.

// tonic's Status is the error of every service method; boxing it everywhere buys nothing.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod blobs;
pub mod codec;
pub mod forward;
pub mod gc;
pub mod lag;
pub mod link;
pub mod missing;
pub mod network;
pub mod peers;
pub mod repair;
pub mod replica;
pub mod retention;
pub mod service;
pub mod tls;
pub mod versions;

/// Generated protobuf and tonic code.
pub mod pb {
    tonic::include_proto!("raftyard.peer.v1");
}

pub use blobs::BlobPeers;
pub use forward::{forward, HttpBody, LocalHttp, LocalHttpSlot};
pub use gc::{GcFigures, GcStats};
pub use lag::{Lag, LagFigures, LagMonitor};
pub use link::GrpcLeaderLink;
pub use missing::Missing;
pub use network::PeerNetwork;
pub use peers::Peers;
pub use repair::RepairWorker;
pub use replica::ReplicaSet;
pub use service::{serve, PeerServices};
pub use tls::PeerTls;
