//! OCI and Docker wire formats: manifests, indexes, image configs.

use std::collections::BTreeMap;

use hearth_types::ImageConfig;
use serde::Deserialize;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer media types hearth can unpack (the compression is sniffed from the bytes anyway).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// Whether a layer of this media type can be unpacked (an absent type is taken as a tar).
pub fn is_layer_type(media_type: &str) -> bool {
    media_type.is_empty() || LAYER_TYPES.contains(&media_type)
}

/// The `org.opencontainers.image.ref.name` annotation of OCI layout indexes.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or an index (told apart by which fields are present).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: String,
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl Manifest {
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX
            || self.media_type == DOCKER_LIST
            || (self.config.is_none() && !self.manifests.is_empty())
    }

    /// The linux/amd64 entry of an index; else the platforms it has (`os/arch[/variant]`).
    pub fn pick_amd64(&self) -> Result<&Descriptor, Vec<String>> {
        self.manifests
            .iter()
            .find(|d| {
                d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                self.manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| match &p.variant {
                        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                        None => format!("{}/{}", p.os, p.architecture),
                    })
                    .collect()
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Runtime {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<Runtime>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The digests of the uncompressed layers (`rootfs.diff_ids`) an image config promises, bottom
/// first; `None` when the config has no such list.
pub fn diff_ids(bytes: &[u8]) -> Result<Option<Vec<String>>, serde_json::Error> {
    let f: ConfigFile = serde_json::from_slice(bytes)?;
    Ok(f.rootfs.map(|r| r.diff_ids))
}

/// The runtime defaults of an image config blob.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, serde_json::Error> {
    let f: ConfigFile = serde_json::from_slice(bytes)?;
    let r = f.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: r.entrypoint.unwrap_or_default(),
        cmd: r.cmd.unwrap_or_default(),
        env: r.env.unwrap_or_default(),
        working_dir: r.working_dir.unwrap_or_default(),
        user: r.user.unwrap_or_default(),
        labels: r.labels.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_linux_amd64_or_names_what_exists() {
        let idx: Manifest = serde_json::from_str(
            r#"{"manifests":[{"digest":"sha256:a","platform":{"architecture":"arm64","os":"linux"}},{"digest":"sha256:b","platform":{"architecture":"amd64","os":"linux"}}]}"#,
        )
        .expect("json");
        assert!(idx.is_index());
        assert_eq!(idx.pick_amd64().expect("amd64").digest, "sha256:b");
        let arm: Manifest =
            serde_json::from_str(r#"{"manifests":[{"digest":"sha256:a","platform":{"architecture":"arm64","os":"linux"}}]}"#)
                .expect("json");
        assert_eq!(arm.pick_amd64().expect_err("none"), ["linux/arm64"]);
        let docker_list: Manifest = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[
                {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:c","size":1,"platform":{"architecture":"arm","os":"linux","variant":"v7"}},
                {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:d","size":1,"platform":{"architecture":"s390x","os":"linux"}}]}"#,
        )
        .expect("json");
        assert!(docker_list.is_index());
        assert_eq!(docker_list.pick_amd64().expect_err("none"), ["linux/arm/v7", "linux/s390x"]);
    }

    #[test]
    fn layer_media_types() {
        assert!(is_layer_type("application/vnd.oci.image.layer.v1.tar+zstd"));
        assert!(is_layer_type("application/vnd.docker.image.rootfs.diff.tar.gzip"));
        assert!(!is_layer_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"));
        assert!(!is_layer_type("application/vnd.cncf.helm.chart.content.v1.tar+gzip"));
    }

    #[test]
    fn config_fields() {
        let c = parse_config(
            br#"{"config":{"Cmd":["sh"],"Env":["A=1"],"WorkingDir":"/w","User":"app"}}"#,
        )
        .expect("cfg");
        assert_eq!(
            (c.cmd, c.env, c.working_dir.as_str(), c.user.as_str()),
            (vec!["sh".to_string()], vec!["A=1".to_string()], "/w", "app")
        );
        assert_eq!(parse_config(b"{}").expect("empty"), ImageConfig::default());
    }
}
