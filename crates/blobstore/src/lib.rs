//! The content-addressed blob store of one node.
//!
//! Owns everything under `<data-dir>/blobs` (committed blobs, one file per digest) and
//! `<data-dir>/uploads` (upload sessions in progress). A blob becomes visible under its digest
//! only after its bytes were hashed while being written (never re-read), the digest matched,
//! the file was fsynced and renamed under its digest, and the directory was fsynced. A crash at
//! any instant therefore leaves either nothing or the whole verified blob.
//!
//! It also keeps the data directory's reserve of space for the metadata log ([`Reserve`]).
//!
//! This crate knows nothing about repositories' metadata, Raft or HTTP: the caller decides
//! which blobs are visible where; this crate only keeps bytes safe.

mod reserve;
mod store;
mod upload;

pub use reserve::{Action as ReserveAction, Reserve};
pub use store::{disk_space, free_bytes, BlobPin, BlobStore, BlobStoreConfig, SweepReport, PEER_COPY_HOLD};
pub use upload::UploadStatus;

use raftyard_types::Digest;

/// Errors of the blob store. The registry maps them to OCI error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("upload session is in use by another request")]
    UploadBusy,
    #[error("chunk out of order: the upload holds {size} bytes")]
    RangeInvalid { size: u64 },
    #[error("digest mismatch: expected {expected}, content has {actual}")]
    DigestInvalid { expected: Digest, actual: Digest },
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeInvalid { expected: u64, actual: u64 },
    #[error("blob unknown")]
    BlobUnknown,
    #[error("request body: {0}")]
    Body(String),
    /// Too many upload sessions open, on the node or for one client.
    #[error("too many uploads: {0}")]
    TooManyUploads(String),
    /// The disk is full, or its free space is below the configured reserve.
    #[error("insufficient storage: {0}")]
    StorageFull(String),
    #[error("storage: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for BlobError {
    fn from(e: std::io::Error) -> Self {
        if matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) {
            BlobError::StorageFull(e.to_string())
        } else {
            BlobError::Io(e)
        }
    }
}

pub type Result<T, E = BlobError> = std::result::Result<T, E>;
