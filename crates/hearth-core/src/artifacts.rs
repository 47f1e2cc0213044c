//! Removing images and kernels: refused while a VM uses one, unless forced.

use std::sync::Arc;

use hearth_types::{ImageRecord, KernelRecord, VmRecord};

use crate::{Error, Reconciler, Result};

impl Reconciler {
    /// `hearth image rm`: refused while a VM boots from the image or has a volume of it.
    pub async fn remove_image(
        self: &Arc<Self>,
        reference: &str,
        force: bool,
    ) -> Result<ImageRecord> {
        let p = &self.ports;
        // No create picks the image between the check and the removal.
        let _no_creates = self.creating.lock().await;
        let image = p.images.find(reference)?.ok_or_else(|| {
            Error::not_found(format!("no such image: {reference} (see `hearth image ls`)"))
        })?;
        let id = image.id.hex();
        let uses = |v: &VmRecord| {
            v.spec.image_id == id || v.spec.volumes.iter().any(|vol| vol.image_id == id)
        };
        refuse_if_used("image", reference, &p.repo.list()?, uses, force)?;
        p.images.remove(&image)
    }

    /// `hearth kernel rm`: refused while a VM boots it.
    pub async fn remove_kernel(self: &Arc<Self>, name: &str, force: bool) -> Result<KernelRecord> {
        let p = &self.ports;
        let _no_creates = self.creating.lock().await;
        refuse_if_used("kernel", name, &p.repo.list()?, |v| v.spec.kernel == name, force)?;
        p.kernels.remove(name)
    }
}

fn refuse_if_used(
    what: &str,
    name: &str,
    vms: &[VmRecord],
    uses: impl Fn(&VmRecord) -> bool,
    force: bool,
) -> Result<()> {
    let users: Vec<&str> = vms.iter().filter(|v| uses(v)).map(|v| v.spec.name.as_str()).collect();
    if users.is_empty() || force {
        return Ok(());
    }
    Err(Error::precondition(format!(
        "{what} {name} is used by VM(s) {}: remove them first, or use --force",
        users.join(", ")
    )))
}
