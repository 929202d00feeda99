//! Side-by-side benchmarks of raftyard: the registry against CNCF Distribution
//! (`raftyard-bench`, see its binary's docs) and the tunnel against rathole
//! (`raftyard-tunnel-bench`, see [`tunnel`]), and the RPO of a backup node
//! (`raftyard-backup-bench`, see [`backup`]), and what authentication costs
//! (`raftyard-auth-bench`, see [`auth`]), and what tracing costs (`raftyard-telemetry-bench`,
//! see [`telemetry`]), and how a cluster's costs grow with the registry
//! (`raftyard-scale-bench`, see [`scale`]; [`direct`] fills stopped nodes for it). The other
//! modules are the parts the binaries share: starting processes, bulk HTTP transfers, medians
//! and tables.

pub mod auth;
pub mod backup;
pub mod bulk;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod deployment;
pub mod direct;
pub mod failover;
pub mod report;
pub mod scale;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tunnel;
pub mod workload;
