//! Kernels as hearth stores them.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// A kernel in the local store, with the initramfs hearth built for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    /// Digest of the kernel file as imported: its identity.
    pub id: Digest,
    /// Version string read from the kernel image itself (e.g. `6.1.0-56-cloud-amd64`).
    pub version: String,
    /// `elf` (vmlinux) or `bzimage`.
    pub format: String,
    /// A bzImage's payload compression (`gzip`, `zstd`, `lz4`, `xz`, `lzma`, `bzip2`, `lzo`),
    /// read at import; `None` for an ELF and for kernels imported before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Whether an ELF has the PVH note QEMU and Cloud Hypervisor boot it by, read at import;
    /// `None` for a bzImage and for kernels imported before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvh: Option<bool>,
    /// Number of modules shipped with it.
    pub modules: usize,
    /// Unix seconds.
    pub created_at: u64,
}

impl KernelRecord {
    /// Its format as `kernel ls` shows it: `bzimage (zstd)`, `elf (pvh)`, `elf (no pvh)`.
    pub fn format_detail(&self) -> String {
        match (&self.compression, self.pvh) {
            (Some(c), _) => format!("{} ({c})", self.format),
            (None, Some(true)) => format!("{} (pvh)", self.format),
            (None, Some(false)) => format!("{} (no pvh)", self.format),
            (None, None) => self.format.clone(),
        }
    }
}

/// A kernel's name in the store: a plain name ([`crate::validate_name`]: `debian`,
/// `k8s-5.10`), or the reference of the image it was pulled from, in its familiar form
/// (`weaveworks/ignite-kernel:5.10.51`, `127.0.0.1:5000/kernel:1`), as Ignite's
/// `--kernel-image` takes it. What a user types becomes one: anything with a `/`, `:` or `@`
/// is read as an image reference (so `docker.io/weaveworks/ignite-kernel:5.10.51` and
/// `weaveworks/ignite-kernel:5.10.51` name one kernel), anything else must be a plain name.
pub fn kernel_name(given: &str) -> Result<String, KernelNameError> {
    if !is_reference(given) {
        return crate::validate_name(given)
            .map(|()| given.to_owned())
            .map_err(|_| KernelNameError(given.to_owned()));
    }
    let r: crate::ImageRef = given.parse().map_err(|_| KernelNameError(given.to_owned()))?;
    Ok(r.familiar())
}

/// Whether a kernel name is an image reference (else a plain name).
pub fn is_reference(name: &str) -> bool {
    name.contains(['/', ':', '@'])
}

/// A kernel name that is neither a plain name nor an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is no kernel name (letters, digits, '.', '_', '-', at most 63) and no image reference (like weaveworks/ignite-kernel:5.10.51)")]
pub struct KernelNameError(pub String);

/// The kernel command line `base` with `extra` merged over it, as a map: an argument of
/// `extra` whose key (`console` of `console=hvc0`, `quiet` of `quiet`) `base` has replaces it
/// where it stands, the rest are appended in their order. A key `extra` gives twice is kept
/// twice (several consoles). Order matters to the kernel (`loglevel` before `earlyprintk`), so
/// `base`'s order is kept.
pub fn merge_cmdline(base: &str, extra: &str) -> String {
    fn key(arg: &str) -> &str {
        arg.split_once('=').map_or(arg, |(k, _)| k)
    }
    let mut args: Vec<String> = base.split_whitespace().map(str::to_owned).collect();
    let mut replaced: Vec<&str> = Vec::new();
    for arg in extra.split_whitespace() {
        let k = key(arg);
        match args.iter().position(|a| key(a) == k).filter(|_| !replaced.contains(&k)) {
            Some(i) => {
                args[i] = arg.to_owned();
                // Any other default under that key goes: the given value stands alone.
                let mut at = 0;
                args.retain(|a| {
                    let keep = at == i || key(a) != k;
                    at += 1;
                    keep
                });
                replaced.push(k);
            }
            None => {
                args.push(arg.to_owned());
                replaced.push(k);
            }
        }
    }
    args.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_arguments_replace_defaults_by_key_where_they_stand_and_the_rest_follow() {
        let base = "console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init";
        assert_eq!(merge_cmdline(base, ""), base);
        assert_eq!(
            merge_cmdline(base, "loglevel=8 earlyprintk=serial,ttyS0"),
            "console=ttyS0 quiet loglevel=8 panic=-1 rdinit=/init earlyprintk=serial,ttyS0"
        );
        // Two consoles given: the first replaces the default, the second follows it.
        assert_eq!(
            merge_cmdline("console=ttyS0 quiet", "console=hvc0 console=tty1 ds=nocloud"),
            "console=hvc0 quiet console=tty1 ds=nocloud"
        );
        // A flag (no value) replaces a flag; a default given twice stands once, as given.
        assert_eq!(
            merge_cmdline("quiet console=a console=b", "console=c quiet"),
            "quiet console=c"
        );
    }

    #[test]
    fn plain_names_stay_and_references_take_their_familiar_form() {
        assert_eq!(kernel_name("debian").as_deref(), Ok("debian"));
        assert_eq!(
            kernel_name("docker.io/weaveworks/ignite-kernel:5.10.51").as_deref(),
            Ok("weaveworks/ignite-kernel:5.10.51")
        );
        assert_eq!(
            kernel_name("weaveworks/ignite-kernel").as_deref(),
            Ok("weaveworks/ignite-kernel:latest")
        );
        assert_eq!(kernel_name("127.0.0.1:5000/k:1").as_deref(), Ok("127.0.0.1:5000/k:1"));
        for bad in
            ["", "-x", "has space", "UPPER/Case:1", "a/b:c:d", "../x:1", ".a/x:1", &"x".repeat(64)]
        {
            assert!(kernel_name(bad).is_err(), "{bad:?}");
        }
    }
}
