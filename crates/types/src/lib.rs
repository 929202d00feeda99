//! Pure data types of raftyard: content digests, repository names, tags and references,
//! manifest parsing and validation, identities and grants with the access policy, retention
//! policies, and the metadata events kept in the Raft log.
//!
//! This crate owns the *vocabulary* every other crate speaks. It performs no IO and has no
//! async code; everything here is deterministic and unit-tested on its own. It must not depend
//! on any other raftyard crate.

pub mod access;
pub mod digest;
pub mod event;
pub mod lifecycle;
pub mod manifest;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use event::{Command, Event, JournalEntry, Outcome, Rejection};
pub use manifest::{Descriptor, ManifestError, ManifestKind, ParsedManifest};
pub use name::{NameError, Reference, RepoName, Tag};
