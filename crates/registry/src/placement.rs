//! Where blob copies live: replicating a new blob to a write quorum before its upload is
//! acknowledged, and fetching a blob this node lacks from a node that holds it.

use raftyard_types::{Digest, Event, RepoName};
use tracing::info;

use crate::error::RegistryError;
use crate::Registry;

impl Registry {
    /// Copies (this node's included) a new blob needs before its upload is acknowledged.
    fn write_quorum(&self, voters: usize) -> usize {
        match self.cfg.blob_write_quorum {
            0 => voters / 2 + 1,
            n => n,
        }
    }

    /// Makes a blob that was just stored here durable on a write quorum of nodes, then commits
    /// its link in `repo` and its placements.
    pub(crate) async fn commit_new_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        let me = self.meta.id();
        let members = self.meta.members();
        let voters = members.iter().filter(|(_, _, v)| *v).count().max(1);
        let needed = self.write_quorum(voters).saturating_sub(1);
        let targets: Vec<_> =
            members.into_iter().filter(|(id, _, _)| *id != me).map(|(id, a, _)| (id, a.peer)).collect();
        let mut holders = vec![me];
        if !targets.is_empty() {
            holders.extend(self.peers.replicate(repo, digest, targets, needed).await);
            if holders.len() <= needed {
                return Err(RegistryError::Unavailable(format!(
                    "blob {digest} reached {} of the {} nodes the write quorum needs",
                    holders.len(),
                    needed + 1
                )));
            }
        }
        let mut events = vec![Event::BlobLinked { repo: repo.clone(), digest: digest.clone(), size }];
        events.extend(holders.into_iter().map(|node| Event::BlobPlaced { digest: digest.clone(), size, node }));
        self.meta.propose(events).await?;
        Ok(())
    }

    /// Links a blob the registry already holds into another repository (a mount).
    pub(crate) async fn link_existing(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        self.meta.propose(vec![Event::BlobLinked { repo: repo.clone(), digest: digest.clone(), size }]).await?;
        Ok(())
    }

    /// Makes sure this node holds `digest`, fetching it from a holder if needed.
    pub(crate) async fn ensure_local(&self, repo: &RepoName, digest: &Digest) -> Result<(), RegistryError> {
        if self.blobs.stat(digest).is_some() {
            return Ok(());
        }
        let me = self.meta.id();
        let info = self.meta.reader().blob_info(digest)?;
        let holders: Vec<u64> = info.map(|i| i.holders).unwrap_or_default();
        let members = self.meta.members();
        // Holders first, then every other member (placements may lag behind).
        let mut sources: Vec<String> = Vec::new();
        for (id, addr, _) in members.iter().filter(|(id, _, _)| holders.contains(id) && *id != me) {
            let _ = id;
            sources.push(addr.peer.clone());
        }
        for (_, addr, _) in members.iter().filter(|(id, _, _)| !holders.contains(id) && *id != me) {
            sources.push(addr.peer.clone());
        }
        let size =
            self.peers.fetch(repo, digest, &sources).await.map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        info!(%digest, size, "blob fetched from a peer");
        self.meta.propose(vec![Event::BlobPlaced { digest: digest.clone(), size, node: me }]).await?;
        Ok(())
    }
}
