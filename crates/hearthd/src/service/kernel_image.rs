//! Kernels from OCI images (`hearth kernel pull`, Flintlock's kernel images).

use super::*;

/// Imports the kernel in a pulled image as `name`, with its initramfs: the file at `filename`
/// inside the image, or Ignite's layout (`/boot/vmlinux`, `/lib/modules`) when none is given.
pub fn kernel_from_image(
    d: &Daemon,
    img: &hearth_types::ImageRecord,
    name: &str,
    filename: Option<&str>,
) -> anyhow::Result<hearth_types::KernelRecord> {
    let staging = tempfile_dir(&d.root)?;
    let out = (|| {
        d.images.unpack_to(img, &staging)?;
        let rec = match filename {
            None => d.kernels.import_rootfs(&staging, name)?,
            Some(f) => {
                let rel = std::path::Path::new(f.trim_start_matches('/'));
                if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    anyhow::bail!("kernel filename {f:?} must be a plain path inside the image, like boot/vmlinux");
                }
                d.kernels.import_image_file(&staging, f, name)?
            }
        };
        d.kernels.initramfs(name, &d.init_binary)?;
        anyhow::Ok(rec)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    out
}

/// Stores the initrd at `file` in the image `img`; its digest.
pub fn initrd_from_image(
    d: &Daemon,
    img: &hearth_types::ImageRecord,
    file: &str,
) -> anyhow::Result<String> {
    let staging = tempfile_dir(&d.root)?;
    let out = (|| {
        d.images.unpack_to(img, &staging)?;
        anyhow::Ok(d.kernels.import_initrd(&staging, file)?)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    out
}

pub(super) fn tempfile_dir(root: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = root.join("tmp").join(format!("kernel-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
