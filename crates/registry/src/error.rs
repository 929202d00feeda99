//! The one place where failures become OCI error responses: every handler returns
//! [`RegistryError`], and [`RegistryError::into_response`] decides status, code and headers.

use http::{header, HeaderValue, Response, StatusCode};
use raftyard_blobstore::BlobError;
use raftyard_raft::ProposeError;
use raftyard_types::{Digest, ManifestError, Rejection};
use serde_json::json;

use crate::body::{full, Body};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("provided digest did not match uploaded content: {0}")]
    DigestInvalid(String),
    #[error("manifest references a manifest or blob unknown to registry")]
    ManifestBlobUnknown(Vec<Digest>),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest is larger than the limit of {0} bytes")]
    ManifestTooLarge(usize),
    #[error("manifest unknown to registry")]
    ManifestUnknown,
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    /// A page size or position that is not a number (`n`, `since`, `limit`): 400, with the
    /// code CNCF Distribution gives it.
    #[error("invalid pagination parameter: {0}")]
    PaginationInvalid(String),
    #[error("{0}")]
    Denied(String),
    /// A push that would take repositories over their storage quota: 403 `DENIED` with the
    /// figures.
    #[error("storage quota of {repos} exceeded: {used} of {limit} bytes used, this push adds {adds}")]
    QuotaExceeded { repos: String, limit: u64, used: u64, adds: u64 },
    /// No valid credentials: 401 with the challenge to send them.
    #[error("authentication required: {message}")]
    Unauthorized { challenge: String, message: String },
    /// A refused OAuth2 token request (`POST /auth/token`): 400 with the RFC 6749 body
    /// (`error`: `invalid_grant`, `unsupported_grant_type`, …), not the registry's.
    #[error("{error}: {description}")]
    OAuth { error: &'static str, description: String },
    /// Too many failed authentications from this address: 429 for this many seconds.
    #[error("too many failed authentication attempts from this address; retry in {0} s")]
    LockedOut(u64),
    /// A chunk that does not continue the upload: 416 with the upload's state.
    #[error("requested range not satisfiable: the upload holds {size} bytes")]
    UploadRange { location: String, size: u64 },
    /// A blob `Range` outside the blob.
    #[error("requested range not satisfiable")]
    BlobRange { size: u64 },
    #[error("tag {tag} changed concurrently (now {current:?})")]
    TagConflict { tag: String, current: Option<Digest> },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not found")]
    NotFound,
    #[error("request header or query too large")]
    TooLarge,
    /// Metadata could not be committed (no leader, no quorum) — safe to retry.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// A limit on concurrent work of this client or node was reached: 429, retry later.
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    /// This node's disk is full (or below its reserve): 507, safe to retry on another node.
    #[error("insufficient storage on this node: {0}")]
    InsufficientStorage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    pub fn status(&self) -> StatusCode {
        use RegistryError::*;
        match self {
            BlobUnknown | BlobUploadUnknown | ManifestUnknown | NameUnknown | NotFound => StatusCode::NOT_FOUND,
            BlobUploadInvalid(_)
            | DigestInvalid(_)
            | ManifestBlobUnknown(_)
            | ManifestInvalid(_)
            | NameInvalid(_)
            | PaginationInvalid(_)
            | SizeInvalid(_)
            | OAuth { .. } => StatusCode::BAD_REQUEST,
            ManifestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Unsupported(_) | MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Denied(_) | QuotaExceeded { .. } => StatusCode::FORBIDDEN,
            Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            UploadRange { .. } | BlobRange { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            TagConflict { .. } => StatusCode::PRECONDITION_FAILED,
            TooLarge => StatusCode::URI_TOO_LONG,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TooManyRequests(_) | LockedOut(_) => StatusCode::TOO_MANY_REQUESTS,
            InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI error code.
    pub fn code(&self) -> &'static str {
        use RegistryError::*;
        match self {
            BlobUnknown => "BLOB_UNKNOWN",
            BlobUploadInvalid(_) | UploadRange { .. } => "BLOB_UPLOAD_INVALID",
            BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            DigestInvalid(_) => "DIGEST_INVALID",
            ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            ManifestInvalid(_) | ManifestTooLarge(_) | TagConflict { .. } => "MANIFEST_INVALID",
            ManifestUnknown => "MANIFEST_UNKNOWN",
            NameInvalid(_) => "NAME_INVALID",
            NameUnknown | NotFound => "NAME_UNKNOWN",
            SizeInvalid(_) | BlobRange { .. } | TooLarge => "SIZE_INVALID",
            Unsupported(_) | MethodNotAllowed => "UNSUPPORTED",
            PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            Denied(_) | QuotaExceeded { .. } => "DENIED",
            Unauthorized { .. } | OAuth { .. } => "UNAUTHORIZED",
            Unavailable(_) => "UNAVAILABLE",
            TooManyRequests(_) | LockedOut(_) => "TOOMANYREQUESTS",
            InsufficientStorage(_) | Internal(_) => "UNKNOWN",
        }
    }

    fn detail(&self) -> serde_json::Value {
        match self {
            RegistryError::ManifestBlobUnknown(d) => json!({ "digests": d }),
            RegistryError::UploadRange { size, .. } | RegistryError::BlobRange { size } => {
                json!({ "size": size })
            }
            RegistryError::TagConflict { current, .. } => json!({ "current": current }),
            RegistryError::QuotaExceeded { repos, limit, used, adds } => {
                json!({ "quota": repos, "limit": limit, "used": used, "adds": adds })
            }
            _ => serde_json::Value::Null,
        }
    }

    /// The response for this error: the spec's JSON body, plus the headers a client needs.
    pub fn into_response(self, head_only: bool) -> Response<Body> {
        let status = self.status();
        let body = match &self {
            RegistryError::OAuth { error, description } => json!({"error": error, "error_description": description}),
            _ => json!({"errors": [{"code": self.code(), "message": self.to_string(), "detail": self.detail()}]}),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let len = bytes.len();
        let mut resp = Response::new(if head_only { crate::body::empty() } else { full(bytes) });
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        match &self {
            RegistryError::UploadRange { location, size } => {
                if let Ok(v) = HeaderValue::from_str(location) {
                    h.insert(header::LOCATION, v);
                }
                h.insert(header::RANGE, crate::handlers::range_header(*size));
            }
            RegistryError::BlobRange { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            RegistryError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RegistryError::TooManyRequests(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            RegistryError::LockedOut(secs) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            RegistryError::Unauthorized { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

impl From<BlobError> for RegistryError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::UploadUnknown => RegistryError::BlobUploadUnknown,
            BlobError::UploadBusy => {
                RegistryError::BlobUploadInvalid("another request is writing to this upload".into())
            }
            // The handler turns this into UploadRange, which needs the location.
            BlobError::RangeInvalid { size } => RegistryError::UploadRange { location: String::new(), size },
            e @ BlobError::DigestInvalid { .. } => RegistryError::DigestInvalid(e.to_string()),
            e @ BlobError::SizeInvalid { .. } => RegistryError::SizeInvalid(e.to_string()),
            BlobError::BlobUnknown => RegistryError::BlobUnknown,
            e @ BlobError::Body(_) => RegistryError::BlobUploadInvalid(e.to_string()),
            BlobError::StorageFull(m) => RegistryError::InsufficientStorage(m),
            BlobError::TooManyUploads(m) => RegistryError::TooManyRequests(m),
            BlobError::Io(e) => RegistryError::Internal(format!("storage: {e}")),
        }
    }
}

impl From<ProposeError> for RegistryError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Rejected(r) => r.into(),
            e @ ProposeError::NotLeader { .. } => RegistryError::Unavailable(e.to_string()),
            ProposeError::Unavailable(m) => RegistryError::Unavailable(m),
        }
    }
}

impl From<Rejection> for RegistryError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::BlobUnknown(_) => RegistryError::BlobUnknown,
            Rejection::ManifestBlobUnknown(d) => RegistryError::ManifestBlobUnknown(d),
            Rejection::ManifestUnknown => RegistryError::ManifestUnknown,
            Rejection::TagConflict { tag, current } => RegistryError::TagConflict { tag: tag.to_string(), current },
            Rejection::QuotaExceeded { repos, limit, used, adds } => {
                RegistryError::QuotaExceeded { repos, limit, used, adds }
            }
            r @ (Rejection::UserUnknown(_)
            | Rejection::UserExists(_)
            | Rejection::RobotUnknown(_)
            | Rejection::GrantUnknown
            | Rejection::RetentionUnknown(_)
            | Rejection::QuotaUnknown(_)
            | Rejection::NeedsProtocol(_)) => RegistryError::Internal(format!("unexpected rejection: {r}")),
        }
    }
}

impl From<ManifestError> for RegistryError {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::TooLarge(_) => RegistryError::ManifestTooLarge(raftyard_types::manifest::MAX_MANIFEST_BYTES),
            e => RegistryError::ManifestInvalid(e.to_string()),
        }
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Internal(e.to_string())
    }
}

impl From<raftyard_types::DigestError> for RegistryError {
    fn from(e: raftyard_types::DigestError) -> Self {
        RegistryError::DigestInvalid(e.to_string())
    }
}
