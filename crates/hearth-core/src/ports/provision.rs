//! What provisioning for an owner outside hearth (a Flintlock microVM) needs: the owner's
//! records, and a way to fetch images and kernels.

use async_trait::async_trait;
use hearth_types::ImageRecord;

use crate::{NewVm, Result};

/// What one owner asks to be provisioned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    /// The OCI image the kernel comes from.
    pub kernel_image: String,
    /// The kernel's file in that image; Ignite's layout (`boot/vmlinux`...) when `None`.
    pub kernel_file: Option<String>,
    /// An initrd of the VM's own: its image, and the file in it.
    pub initrd: Option<(String, String)>,
    /// The root image, then each volume's image: pulled in this order.
    pub images: Vec<String>,
    /// The VM to create; provisioning fills in its kernel and the owner's label.
    pub vm: NewVm,
    /// Failed attempts so far (what Flintlock's `status.retry` shows).
    pub failures: u32,
}

/// How an attempt ended, as the owner's record keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM exists and was started; the failure count is back to zero.
    Created,
    /// It failed in a way that may pass; another attempt is queued.
    Retrying { failures: u32, reason: String },
    /// Given up: the request is wrong, or the attempts ran out.
    Failed { failures: u32, reason: String },
}

/// The owners' records. Each call is atomic against the others.
pub trait Jobs: Send + Sync {
    /// The owner's job while its provisioning is pending; `None` once it was created, failed,
    /// is being deleted or is gone. An error that is not retryable fails the job.
    fn pending(&self, owner: &str) -> Result<Option<Job>>;
    /// Whether the owner is being deleted, or is gone.
    fn deleting(&self, owner: &str) -> Result<bool>;
    /// Records how an attempt ended (a record being deleted keeps that mark).
    fn record(&self, owner: &str, outcome: &Outcome) -> Result<()>;
    /// Removes the owner's record, once its VM is gone.
    fn remove(&self, owner: &str) -> Result<()>;
}

/// Images and kernels from registries.
#[async_trait]
pub trait Fetch: Send + Sync {
    /// The image, pulled first when the store does not have it. `Unavailable` when the
    /// registry may answer later; a refused or missing image is not retryable.
    async fn pull(&self, reference: &str) -> Result<ImageRecord>;
    /// Imports the kernel (and builds its initramfs) from `image`'s `file` under `name`.
    async fn import_kernel(
        &self,
        image: &ImageRecord,
        file: Option<&str>,
        name: &str,
    ) -> Result<()>;
    /// Stores the initrd at `file` in `image`; its digest.
    async fn import_initrd(&self, image: &ImageRecord, file: &str) -> Result<String>;
}
