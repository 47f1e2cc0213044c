//! The image store as create sees it, and the host's key generator.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use hearth_types::ImageRecord;

use crate::Result;

/// An image's root filesystem, built once per image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootFs {
    /// Its size: the smallest root disk it fits on.
    pub bytes: u64,
    /// The image's `/etc/passwd` and `/etc/group`, when it has a passwd file.
    pub users: Option<(String, String)>,
}

#[async_trait]
pub trait Images: Send + Sync {
    /// The image a reference or id names, when it is in the store.
    fn find(&self, reference: &str) -> Result<Option<ImageRecord>>;
    /// Builds the image's root filesystem if it is not built yet; what create checks against.
    async fn root_fs(&self, image: &ImageRecord) -> Result<RootFs>;
    /// Removes the image and what was built from it. Blocking.
    fn remove(&self, image: &ImageRecord) -> Result<ImageRecord>;
}

/// Makes a VM's SSH key pair.
pub trait Keys: Send + Sync {
    /// Generates a key pair in `vm_dir`; returns the public key line and the private key's path.
    /// Blocking.
    fn generate_ssh_key(&self, vm_dir: &Path, comment: &str) -> Result<(String, PathBuf)>;
}
