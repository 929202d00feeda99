//! What the workloads run against: one server, or a raftyard cluster in which one follower
//! takes the writes and another the reads.

use anyhow::Result;
use reqwest::Url;

use crate::cli::Target;
use crate::cluster::{Cluster, Roles};
use crate::server::Server;

pub enum Deployment {
    Single(Server),
    Cluster { cluster: Cluster, roles: Roles },
}

impl Deployment {
    pub fn target(&self) -> Target {
        match self {
            Deployment::Single(server) => server.target,
            Deployment::Cluster { .. } => Target::Raftyard,
        }
    }

    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        match self {
            Deployment::Single(_) => None,
            Deployment::Cluster { cluster, .. } => Some(cluster),
        }
    }

    /// Where blob pushes and manifest PUTs go.
    pub fn write_base(&self) -> Result<Url> {
        match self {
            Deployment::Single(server) => Ok(server.base.clone()),
            Deployment::Cluster { cluster, roles } => cluster.base(roles.writer),
        }
    }

    /// Where blob pulls and manifest GETs go.
    pub fn read_base(&self) -> Result<Url> {
        match self {
            Deployment::Single(server) => Ok(server.base.clone()),
            Deployment::Cluster { cluster, roles } => cluster.base(roles.reader),
        }
    }

    /// The processes whose resident memory is summed up as the deployment's RSS.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Deployment::Single(server) => vec![server.pid()],
            Deployment::Cluster { cluster, .. } => cluster.pids(),
        }
    }

    /// Fails if a server has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self {
            Deployment::Single(server) => server.ensure_running(),
            Deployment::Cluster { cluster, .. } => cluster.ensure_running(),
        }
    }

    /// The servers' log tails, for error messages.
    pub fn log_tails(&self) -> String {
        match self {
            Deployment::Single(server) => {
                format!("last lines of {}:\n{}", server.log_path.display(), server.log_tail(20))
            }
            Deployment::Cluster { cluster, .. } => cluster.log_tails(),
        }
    }
}
