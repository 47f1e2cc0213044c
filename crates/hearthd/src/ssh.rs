//! The per-VM key pair behind `run --ssh` and `hearth ssh`, generated natively (no ssh-keygen).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

/// Where a VM's generated private key lives, inside its directory.
pub fn key_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("ssh").join("id_ed25519")
}

/// Writes a new ed25519 key pair under `vm_dir/ssh` (0700; private key 0600) and returns the
/// public key as an `authorized_keys` line.
pub fn generate(vm_dir: &Path, comment: &str) -> anyhow::Result<String> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)?;
    key.set_comment(comment);
    let path = key_path(vm_dir);
    let dir = path.parent().unwrap_or(vm_dir);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let private = key.to_openssh(LineEnding::LF)?;
    let public = key.public_key().to_openssh()?;
    let write = |p: &Path, data: &[u8], mode: u32| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(p)?;
        f.write_all(data)?;
        f.sync_all()
    };
    write(&path, private.as_bytes(), 0o600)?;
    write(&path.with_extension("pub"), format!("{public}\n").as_bytes(), 0o644)?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_pair_is_private_and_usable_by_openssh() {
        let dir = tempfile::tempdir().expect("tmp");
        let public = generate(dir.path(), "hearth-vm1").expect("generate");
        assert!(
            public.starts_with("ssh-ed25519 AAAA") && public.ends_with(" hearth-vm1"),
            "{public}"
        );
        hearth_types::net::validate_ssh_key(&public).expect("valid authorized_keys line");
        let path = key_path(dir.path());
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("dir")), 0o700);
        // The private key parses back and matches the public half.
        let back = PrivateKey::read_openssh_file(&path).expect("read back");
        assert_eq!(back.public_key().to_openssh().expect("encode"), public);
        // A second key in the same place is refused rather than overwriting the first.
        assert!(generate(dir.path(), "again").is_err());
    }
}
