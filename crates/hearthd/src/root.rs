//! The state directory as a whole: its lock, its modes, and what a crash left in it.
//!
//! One hearthd owns a root at a time: [`RootLock`] holds an exclusive `flock` on
//! `ROOT/hearthd.lock` (with the owner's pid in it) for the daemon's life, and everything that
//! writes under the root, the socket included, happens after it is taken. The root is `0711`
//! (others may reach the socket inside it, nothing else) and every directory under it `0700`;
//! the daemon's umask is `077`, so what it creates is private to root.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

/// Mode of the root: traversable, so a socket inside it can be reached by a `--group`.
pub const ROOT_MODE: u32 = 0o711;
/// Mode of every directory hearthd makes under the root.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// The root's subdirectories; each holds guests' data, secrets or an image's unpacked files.
const PRIVATE_DIRS: [&str; 5] = ["images", "kernels", "vms", "flintlock", "tmp"];

/// Makes files hearthd (and the processes it starts) creates private to root.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// The exclusive claim on a root, released when the daemon exits (however it exits).
#[derive(Debug)]
pub struct RootLock {
    _lock: Flock<File>,
}

/// Takes `root`'s lock, creating the root with its modes. Fails, naming the holder's pid, when
/// another hearthd holds it.
pub fn lock(root: &Path) -> anyhow::Result<RootLock> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    fs::set_permissions(root, fs::Permissions::from_mode(ROOT_MODE))
        .with_context(|| format!("setting the mode of {}", root.display()))?;
    let path = root.join("hearthd.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // A holder that is dead may still hold the lock for a moment, through a child it forked that
    // has not exec'd yet (its descriptors close at exec): wait for that, not for a live daemon.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut file = file;
    let mut lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((mut f, _)) => {
                let mut holder = String::new();
                let _ = f.rewind().and_then(|()| f.read_to_string(&mut holder));
                let holder = holder.trim().to_owned();
                let alive = holder
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if alive || std::time::Instant::now() > deadline {
                    let who = if holder.is_empty() {
                        "another hearthd".to_owned()
                    } else {
                        format!("hearthd pid {holder}")
                    };
                    anyhow::bail!(
                        "{who} already owns {}: stop it first, or give this one another --root",
                        root.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                file = f;
            }
        }
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(*lock, "{}", std::process::id()))
        .context("writing the lock file")?;
    for sub in PRIVATE_DIRS {
        let dir = root.join(sub);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Roots made by older versions had 0755 directories.
        fs::set_permissions(&dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    Ok(RootLock { _lock: lock })
}

/// A socket file's own lock (`SOCKET.lock`), so two daemons of different roots can never
/// serve one socket path either.
pub fn lock_socket(socket: &Path) -> anyhow::Result<Flock<File>> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another hearthd serves {}: stop it or pick another --socket",
            socket.display()
        )
    })
}

/// Space set aside for records (`ROOT/.reserve`): released when a record save finds the disk
/// full, made again at the next start when there is room.
const RESERVE: &str = ".reserve";
const RESERVE_BYTES: u64 = 16 << 20;

/// Makes sure the reserve exists with its blocks allocated (written, not sparse).
pub fn keep_reserve(root: &Path) {
    let path = root.join(RESERVE);
    if fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return;
    }
    let made = (|| -> std::io::Result<()> {
        let mut f = File::create(&path)?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES >> 20 {
            f.write_all(&zeros)?;
        }
        f.sync_all()
    })();
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        tracing::warn!(error = %e, "no room for hearthd's 16 MiB reserve for records");
    }
}

/// Frees the reserve; true when there was one to free.
pub fn release_reserve(root: &Path) -> bool {
    fs::remove_file(root.join(RESERVE)).is_ok()
}

/// Removes what an interrupted run left under `ROOT/tmp` (kernel-image staging). Returns how many
/// entries went.
pub fn sweep_tmp(root: &Path) -> std::io::Result<usize> {
    let dir = root.join("tmp");
    let mut n = 0;
    for e in fs::read_dir(&dir)? {
        let p = e?.path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn one_lock_per_root_naming_the_holder() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        let held = lock(&root).expect("first");
        let e = lock(&root).expect_err("second");
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.to_string().contains("already owns"), "{e}");
        drop(held);
        lock(&root).expect("free again once the holder is gone");
    }

    #[test]
    fn the_root_is_traversable_and_its_directories_private() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        fs::create_dir_all(root.join("vms")).expect("old layout");
        fs::set_permissions(root.join("vms"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let _l = lock(&root).expect("lock");
        assert_eq!(fs::metadata(&root).expect("root").mode() & 0o777, ROOT_MODE);
        for sub in PRIVATE_DIRS {
            assert_eq!(
                fs::metadata(root.join(sub)).expect(sub).mode() & 0o777,
                PRIVATE_DIR_MODE,
                "{sub}"
            );
        }
    }

    #[test]
    fn a_socket_is_served_by_one_daemon() {
        let t = tempfile::tempdir().expect("tmp");
        let s = t.path().join("x.sock");
        let held = lock_socket(&s).expect("first");
        assert!(lock_socket(&s)
            .expect_err("second")
            .to_string()
            .contains("another hearthd serves"));
        drop(held);
        lock_socket(&s).expect("again");
    }

    #[test]
    fn tmp_is_swept() {
        let t = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(t.path().join("tmp/kernel-1/boot")).expect("mkdir");
        fs::write(t.path().join("tmp/stray"), b"x").expect("write");
        assert_eq!(sweep_tmp(t.path()).expect("sweep"), 2);
        assert_eq!(fs::read_dir(t.path().join("tmp")).expect("dir").count(), 0);
    }
}
