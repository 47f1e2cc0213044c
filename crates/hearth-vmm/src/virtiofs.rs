//! Shared directories (docs/adr/0025-shared-directories.md): one virtiofsd per share, the
//! vhost-user backend of the VMM's virtio-fs device, started before the VMM at
//! `DIR/fs{k}.sock` (k: the share's place among the VM's shares; DIR: the VM's directory, or
//! the root of its VMM's chroot). virtiofsd confines itself to the directory (its namespace
//! sandbox: a mount namespace whose root is the share, so no path or symlink the guest
//! makes leads out of it) under its own seccomp filter, and serves one connection: it ends when
//! the VMM does. [`stop_all`] ends any left (a VMM that never connected), found from /proc by
//! the socket path on their command line, so a daemon that died meanwhile leaves none behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{VmmError, VolumeDisk};

/// The binary, when not `virtiofsd` on PATH or where Debian and Fedora install it.
pub const BINARY_ENV: &str = "HEARTH_VIRTIOFSD";
const FIX: &str = "install virtiofsd (apt install virtiofsd, or cargo install virtiofsd) or set HEARTH_VIRTIOFSD to its path";
/// Where distributions put it outside PATH.
const LIBEXEC: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// The flag that names its socket: how a VM's virtiofsd is recognised.
const SOCKET_FLAG: &[u8] = b"--socket-path";
/// How long virtiofsd may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// What is kept of its standard error (it logs errors only).
const STDERR_KEEP: usize = 4096;

/// The socket of the VM's `k`th share, in `dir`.
pub fn socket(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("fs{k}.sock"))
}

/// The VM's shares, in order.
pub fn shares(volumes: &[VolumeDisk]) -> impl Iterator<Item = &VolumeDisk> {
    volumes.iter().filter(|v| v.share)
}

/// The VM's disks (its volumes that are not shares), in order.
pub fn disks(volumes: &[VolumeDisk]) -> impl Iterator<Item = &VolumeDisk> {
    volumes.iter().filter(|v| !v.share)
}

/// The virtiofsd binary: `HEARTH_VIRTIOFSD`, else `virtiofsd` on PATH, else a distribution's
/// libexec path.
fn binary() -> Result<PathBuf, VmmError> {
    if let Some(b) = std::env::var_os(BINARY_ENV).filter(|b| !b.is_empty()) {
        return Ok(b.into());
    }
    let on_path = crate::jail::on_path(Path::new("virtiofsd"));
    on_path.into_iter().chain(LIBEXEC.iter().map(PathBuf::from)).find(|p| p.is_file()).ok_or_else(
        || VmmError::Spawn {
            binary: "virtiofsd".into(),
            fix: FIX,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        },
    )
}

/// The arguments of a virtiofsd serving `share` on `socket`.
pub fn args(share: &VolumeDisk, socket: &Path) -> Vec<String> {
    let mut a = vec![
        "--socket-path".to_owned(),
        socket.display().to_string(),
        "--shared-dir".to_owned(),
        share.path.display().to_string(),
        "--sandbox".to_owned(),
        "namespace".to_owned(),
        "--seccomp".to_owned(),
        "kill".to_owned(),
        "--cache".to_owned(),
        "auto".to_owned(),
        "--log-level".to_owned(),
        "error".to_owned(),
    ];
    if share.read_only {
        a.push("--readonly".to_owned());
    }
    a
}

/// Starts a virtiofsd for each share of `volumes`, its socket in `dir` and owned by `owner`
/// (the uid the VMM runs as, where it connects after dropping privileges); returns once each
/// listens. When one fails, those started are ended and the error quotes its words.
pub fn start(
    volumes: &[VolumeDisk],
    dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), VmmError> {
    if shares(volumes).next().is_none() {
        return Ok(());
    }
    let binary = binary()?;
    let started = shares(volumes).enumerate().try_for_each(|(k, share)| {
        let sock = socket(dir, k);
        let _ = std::fs::remove_file(&sock);
        start_one(&binary, share, &sock, owner)
    });
    if started.is_err() {
        stop_all(dir);
    }
    started
}

fn start_one(
    binary: &Path,
    share: &VolumeDisk,
    sock: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), VmmError> {
    let mut cmd = Command::new(binary);
    cmd.args(args(share, sock)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // A session of its own, as the VMM's: it outlives hearthd, and ends with its VMM.
    crate::sys::detach_and_join(&mut cmd, vec![], vec![]);
    let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: binary.display().to_string(),
        fix: FIX,
        source,
    })?;
    let mut stderr = child.stderr.take();
    let failed = |why: String, stderr: &mut Option<std::process::ChildStderr>| {
        let mut text = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(STDERR_KEEP as u64).read_to_string(&mut text);
        }
        VmmError::Start {
            vmm: "virtiofsd",
            log: format!("sharing {}: {why}: {}", share.path.display(), text.trim()),
        }
    };
    let deadline = Instant::now() + LISTEN_WAIT;
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(format!("it exited ({status})"), &mut stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("it did not listen within {LISTEN_WAIT:?}"), &mut stderr));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(sock, Some(uid), Some(gid))
            .map_err(|source| VmmError::Io { path: sock.to_owned(), source })?;
    }
    // Its errors are drained (a bounded tail kept for the log) and it is reaped when it ends.
    let shown = share.path.display().to_string();
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        if let Some(mut e) = stderr {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = e.read(&mut buf) {
                tail.extend_from_slice(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_KEEP);
                tail.drain(..excess);
            }
        }
        if let Ok(status) = child.wait() {
            if !status.success() && !tail.is_empty() {
                let text = String::from_utf8_lossy(&tail);
                tracing::warn!(share = %shown, %status, "virtiofsd ended: {}", text.trim());
            }
        }
    });
    Ok(())
}

/// Ends every virtiofsd serving a socket under `vm_dir` (its jail's included) and removes the
/// sockets: what a VMM that never connected to them, or a launch that failed, leaves.
pub fn stop_all(vm_dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    for (pid, value) in crate::process::live_with_flag(SOCKET_FLAG) {
        let path = Path::new(std::ffi::OsStr::from_bytes(&value));
        let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim().starts_with("virtiofsd"));
        if named && path.starts_with(vm_dir) {
            if let Some(start) = crate::process::start_time(pid) {
                crate::process::kill(pid, start, libc::SIGKILL);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(vm_dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.as_bytes();
            if name.starts_with(b"fs") && name.ends_with(b".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(path: &str, read_only: bool) -> VolumeDisk {
        VolumeDisk {
            path: path.into(),
            serial: "hearth_vol0".into(),
            read_only,
            host: true,
            share: true,
        }
    }

    #[test]
    fn virtiofsd_is_sandboxed_to_the_share_and_read_only_when_asked() {
        let a = args(&share("/srv/data", false), Path::new("/vm/fs0.sock"));
        let pairs: Vec<_> = a.chunks(2).map(|p| p.join(" ")).collect();
        for want in [
            "--socket-path /vm/fs0.sock",
            "--shared-dir /srv/data",
            "--sandbox namespace",
            "--seccomp kill",
        ] {
            assert!(pairs.iter().any(|p| p == want), "{want}: {a:?}");
        }
        assert!(!a.contains(&"--readonly".to_owned()));
        assert!(args(&share("/srv/data", true), Path::new("/s")).contains(&"--readonly".into()));
    }

    #[test]
    fn shares_and_disks_are_told_apart_in_order() {
        let disk = VolumeDisk { share: false, ..share("/d.img", false) };
        let vols = [share("/a", false), disk.clone(), share("/b", true)];
        let s: Vec<_> = shares(&vols).map(|v| v.path.clone()).collect();
        assert_eq!(s, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(disks(&vols).cloned().collect::<Vec<_>>(), [disk]);
    }

    #[test]
    fn a_missing_binary_names_the_install_step() {
        let dir = tempfile::tempdir().expect("tmp");
        let shared = share(dir.path().to_str().expect("utf8"), false);
        let binary = Path::new("/nonexistent/virtiofsd");
        let e = start_one(binary, &shared, &socket(dir.path(), 0), None);
        let e = crate::chain(&e.expect_err("no binary"));
        assert!(e.contains("virtiofsd") && e.contains("install"), "{e}");
    }
}
