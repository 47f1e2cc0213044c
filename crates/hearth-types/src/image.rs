//! Images as hearth stores them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// The runtime defaults an OCI image carries in its config blob.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An image in the local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Every name this image is known by (fully qualified references).
    pub names: Vec<String>,
    /// Digest of the config blob: the image's identity.
    pub id: Digest,
    /// Digest of the manifest it came from, when it came from a registry or OCI layout.
    pub manifest_digest: Option<Digest>,
    /// Layer blob digests, bottom first.
    pub layers: Vec<Digest>,
    pub config: ImageConfig,
    /// Bytes of the layers as stored (compressed).
    pub size: u64,
    /// Unix seconds.
    pub created_at: u64,
}
