//! Manifest parsing and validation: Docker schema 2 manifests and manifest lists, OCI image
//! manifests and indexes, and artifacts (`artifactType`, `subject`).
//!
//! The registry stores manifest bytes exactly as pushed; this module only extracts what the
//! registry must know about them (the references that must exist, the subject, the artifact
//! type, annotations for the referrers API) and rejects what is not a manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Largest manifest accepted (spec: at least 4 MB must be supported).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Whether a manifest lists blobs (image) or other manifests (index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestKind {
    Image,
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    NotJson(String),
    #[error("manifest invalid: {0}")]
    Invalid(String),
    #[error("manifest of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub kind: ManifestKind,
    /// The media type the manifest is stored and served under.
    pub media_type: String,
    /// Blobs and manifests that must exist in the repository before this manifest is accepted
    /// (config, layers or child manifests; not the subject, not foreign layers).
    pub required: Vec<Digest>,
    pub subject: Option<Digest>,
    /// `artifactType`, falling back to the config media type for image manifests, as the
    /// referrers API reports it.
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

fn is_known_manifest_type(t: &str) -> bool {
    matches!(t, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)
}

/// Removes parameters and whitespace from a media type header value.
pub fn bare_media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// A layer the registry is not expected to hold (non-distributable / foreign).
fn is_foreign(d: &Descriptor) -> bool {
    let t = d.media_type.as_str();
    t.contains(".nondistributable.") || t.contains(".foreign.")
}

fn descriptor(v: &Value, what: &str) -> Result<Descriptor, ManifestError> {
    let d: Descriptor =
        serde_json::from_value(v.clone()).map_err(|e| ManifestError::Invalid(format!("{what}: {e}")))?;
    if d.media_type.is_empty() {
        return Err(ManifestError::Invalid(format!("{what}: empty mediaType")));
    }
    Ok(d)
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ManifestError::Invalid(format!("{key} must be a string"))),
    }
}

/// Parses and validates manifest bytes pushed with the given `Content-Type` (may be empty).
pub fn parse_manifest(bytes: &[u8], content_type: &str) -> Result<ParsedManifest, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len()));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::NotJson(e.to_string()))?;
    let obj = value.as_object().ok_or_else(|| ManifestError::Invalid("manifest is not a JSON object".into()))?;

    let content_type = bare_media_type(content_type);
    let field_type = string_field(obj, "mediaType")?;
    if let (Some(ft), false) = (&field_type, content_type.is_empty()) {
        if is_known_manifest_type(content_type) && ft != content_type {
            return Err(ManifestError::Invalid(format!(
                "mediaType {ft:?} does not match Content-Type {content_type:?}"
            )));
        }
    }
    if matches!(content_type, DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED)
        || field_type.as_deref().is_some_and(|t| t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED)
        || obj.get("schemaVersion").and_then(Value::as_i64) == Some(1)
    {
        return Err(ManifestError::Invalid("Docker image manifest schema 1 is deprecated and not accepted".into()));
    }
    match obj.get("schemaVersion").and_then(Value::as_i64) {
        Some(2) => {}
        _ => return Err(ManifestError::Invalid("schemaVersion must be 2".into())),
    }

    let media_type = match (&field_type, content_type) {
        (Some(ft), _) => ft.clone(),
        (None, ct) if is_known_manifest_type(ct) => ct.to_string(),
        (None, _) if obj.contains_key("manifests") => OCI_INDEX.to_string(),
        (None, _) if obj.contains_key("config") => OCI_MANIFEST.to_string(),
        (None, ct) if !ct.is_empty() && ct != "application/octet-stream" && ct != "application/json" => ct.to_string(),
        _ => return Err(ManifestError::Invalid("cannot determine the manifest media type".into())),
    };

    let kind = match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => ManifestKind::Index,
        OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
        _ if obj.contains_key("manifests") => ManifestKind::Index,
        _ if obj.contains_key("config") => ManifestKind::Image,
        other => return Err(ManifestError::Invalid(format!("unsupported manifest media type {other:?}"))),
    };

    let mut required = Vec::new();
    let mut config_media_type = None;
    match kind {
        ManifestKind::Image => {
            let config =
                obj.get("config").ok_or_else(|| ManifestError::Invalid("image manifest without config".into()))?;
            let config = descriptor(config, "config")?;
            config_media_type = Some(config.media_type.clone());
            required.push(config.digest);
            let layers = match obj.get("layers") {
                Some(Value::Array(a)) => a.as_slice(),
                None if media_type == OCI_MANIFEST => &[],
                _ => return Err(ManifestError::Invalid("layers must be an array".into())),
            };
            for (i, l) in layers.iter().enumerate() {
                let d = descriptor(l, &format!("layers[{i}]"))?;
                if !is_foreign(&d) {
                    required.push(d.digest);
                }
            }
            if obj.contains_key("manifests") {
                return Err(ManifestError::Invalid("image manifest with manifests field".into()));
            }
        }
        ManifestKind::Index => {
            let manifests = match obj.get("manifests") {
                Some(Value::Array(a)) => a.as_slice(),
                _ => return Err(ManifestError::Invalid("manifests must be an array".into())),
            };
            for (i, m) in manifests.iter().enumerate() {
                let d = descriptor(m, &format!("manifests[{i}]"))?;
                required.push(d.digest);
            }
        }
    }
    let subject = match obj.get("subject") {
        None | Some(Value::Null) => None,
        Some(s) => Some(descriptor(s, "subject")?.digest),
    };
    let artifact_type = string_field(obj, "artifactType")?.filter(|s| !s.is_empty()).or(match kind {
        ManifestKind::Image => config_media_type,
        ManifestKind::Index => None,
    });
    let annotations = match obj.get("annotations") {
        None | Some(Value::Null) => None,
        Some(a) => Some(
            serde_json::from_value::<BTreeMap<String, String>>(a.clone())
                .map_err(|e| ManifestError::Invalid(format!("annotations: {e}")))?,
        ),
    };
    required.sort();
    required.dedup();
    Ok(ParsedManifest { kind, media_type, required, subject, artifact_type, annotations })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::sha256(&[n]).to_string()
    }

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}}]{extra}}}"#,
            d(1),
            d(2)
        )
    }

    #[test]
    fn oci_image_manifest() {
        let m = parse_manifest(image("").as_bytes(), OCI_MANIFEST).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.required.len(), 2);
        assert_eq!(m.subject, None);
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
    }

    #[test]
    fn artifact_with_subject_and_type() {
        let extra = format!(
            r#","artifactType":"application/vnd.example.sbom","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}},"annotations":{{"a":"b"}},"custom":{{"x":1}}"#,
            d(9)
        );
        let m = parse_manifest(image(&extra).as_bytes(), "").unwrap();
        assert_eq!(m.subject, Some(Digest::sha256(&[9])));
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.example.sbom"));
        assert_eq!(m.annotations.unwrap()["a"], "b");
        // the subject is not required to exist
        assert!(!m.required.contains(&Digest::sha256(&[9])));
    }

    #[test]
    fn index_requires_children() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":5,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d(3)
        );
        let m = parse_manifest(body.as_bytes(), OCI_INDEX).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.required, vec![Digest::sha256(&[3])]);
        assert_eq!(m.artifact_type, None);
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":3,"urls":["https://example.com/l"]}},
                      {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{}","size":3}}]}}"#,
            d(1),
            d(2),
            d(4)
        );
        let m = parse_manifest(body.as_bytes(), DOCKER_MANIFEST).unwrap();
        assert_eq!(m.required, vec![Digest::sha256(&[1])]);
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(matches!(parse_manifest(b"not json", OCI_MANIFEST), Err(ManifestError::NotJson(_))));
        assert!(parse_manifest(b"[]", OCI_MANIFEST).is_err());
        assert!(parse_manifest(br#"{"schemaVersion":1}"#, "").is_err());
        // mediaType mismatch with Content-Type
        assert!(parse_manifest(image("").as_bytes(), OCI_INDEX).is_err());
        // bad digest inside
        let bad = image("").replace(&d(2), "sha256:1234");
        assert!(parse_manifest(bad.as_bytes(), OCI_MANIFEST).is_err());
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(parse_manifest(&big, OCI_MANIFEST), Err(ManifestError::TooLarge(_))));
    }

    #[test]
    fn media_type_from_content_type_when_field_missing() {
        let body = image("").replace(&format!(r#""mediaType":"{OCI_MANIFEST}","#), "");
        let m = parse_manifest(body.as_bytes(), DOCKER_MANIFEST).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        let m = parse_manifest(body.as_bytes(), "").unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
    }
}
