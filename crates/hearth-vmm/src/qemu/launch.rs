//! Starting QEMU daemonized and stopping it.
//!
//! `-daemonize` makes QEMU fork once its devices are set up; the parent exits 0 only when the
//! child is running, so a zero exit means "started" and anything else comes with QEMU's own
//! message in qemu.log. The daemon is not our child: it outlives hearthd and is found again by
//! pid + start time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{is_alive, kill, read_pidfile, wait_exit};
use crate::qemu::{find_running, qemu_args, Qmp, QBOOT};
use crate::{resolve_accel, LaunchSpec, Launched, VmmError};
use hearth_types::Accel;

/// Files QEMU leaves behind when it is killed rather than exiting on its own.
const RUNTIME_FILES: [&str; 4] = ["console.sock", "agent.sock", "qmp.sock", "qemu.pid"];

/// Lines of qemu.log quoted in a start error.
const TAIL_LINES: usize = 10;

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(TAIL_LINES).collect();
    if lines.is_empty() {
        return format!("{} is empty", path.display());
    }
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// qboot for the `pc` machine where Debian ships it.
fn bios(accel: Accel) -> Option<PathBuf> {
    let q = Path::new(QBOOT);
    (accel == Accel::Tcg && q.exists()).then(|| q.to_owned())
}

/// QEMU changes its directory to `/` when it daemonizes, so every path must be absolute.
fn absolute(spec: &LaunchSpec) -> Result<LaunchSpec, VmmError> {
    let abs = |p: &Path| std::path::absolute(p).map_err(|source| VmmError::Io { path: p.to_owned(), source });
    Ok(LaunchSpec {
        vm_dir: abs(&spec.vm_dir)?,
        kernel: abs(&spec.kernel)?,
        initrd: abs(&spec.initrd)?,
        root_disk: abs(&spec.root_disk)?,
        config_disk: abs(&spec.config_disk)?,
        ..spec.clone()
    })
}

/// Removes sockets and the pid file of a QEMU that is gone, so a stale pid file can never be
/// read as a live VMM later.
pub fn remove_runtime_files(vm_dir: &Path) {
    for name in RUNTIME_FILES {
        let _ = std::fs::remove_file(vm_dir.join(name));
    }
}

/// Starts QEMU for `spec` and returns once it runs, its guest paused: capture the console
/// ([`crate::console::Console::capture`]), then [`resume`]. The returned pid is the daemon's,
/// read from its pid file, with its start time so later checks survive pid reuse.
pub fn launch(spec: &LaunchSpec) -> Result<Launched, VmmError> {
    let (accel, warning) = resolve_accel(spec.accel)?;
    let spec = absolute(spec)?;
    let dir = &spec.vm_dir;
    if let Some((pid, _)) = find_running(dir) {
        return Err(VmmError::AlreadyRunning { pid, vm_dir: dir.clone() });
    }
    remove_runtime_files(dir);
    let log_path = dir.join("qemu.log");
    let io = |source| VmmError::Io { path: log_path.clone(), source };
    // Fresh per boot, so a start error quotes this boot's messages only. Errors before QEMU
    // opens its `-D` file arrive through these descriptors.
    std::fs::write(&log_path, b"").map_err(io)?;
    let log = std::fs::OpenOptions::new().append(true).open(&log_path).map_err(io)?;
    let binary = spec.qemu_binary.clone().unwrap_or_else(|| "qemu-system-x86_64".into());
    let args = qemu_args(&spec, accel, bios(accel).as_deref());
    tracing::debug!(vm_dir = %dir.display(), binary = %binary.display(), ?args, "starting qemu");
    let status = Command::new(&binary)
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .status()
        .map_err(|source| VmmError::Spawn { binary: binary.display().to_string(), source })?;
    if !status.success() {
        return Err(VmmError::Start { log: format!("{status}; {}:\n{}", log_path.display(), tail(&log_path)) });
    }
    let (pid, start_time) = read_pidfile(&dir.join("qemu.pid")).ok_or_else(|| VmmError::Start {
        log: format!("it exited right after starting (no live process in qemu.pid); {}:\n{}", log_path.display(), tail(&log_path)),
    })?;
    Ok(Launched { pid, start_time, accel, warning })
}

/// Lets a guest launched paused (`-S`) run: QMP `cont`. Call it once the console is captured.
pub async fn resume(vm_dir: &Path) -> Result<(), VmmError> {
    let mut q = tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(&vm_dir.join("qmp.sock")))
        .await
        .map_err(|_| VmmError::Qmp("qemu did not answer on its QMP socket".into()))??;
    q.execute("cont", None).await.map(drop)
}

/// Resumes a guest that never got its first `cont` (QMP status `prelaunch`: hearthd stopped
/// between launch and resume); leaves any other guest as it is. Returns whether it resumed.
pub async fn resume_if_prelaunch(vm_dir: &Path) -> Result<bool, VmmError> {
    let mut q = tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(&vm_dir.join("qmp.sock")))
        .await
        .map_err(|_| VmmError::Qmp("qemu did not answer on its QMP socket".into()))??;
    if q.status().await? != "prelaunch" {
        return Ok(false);
    }
    q.execute("cont", None).await.map(|_| true)
}

/// How [`stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    AlreadyGone,
    /// The guest powered off after the ACPI request, within the timeout.
    PoweredOff,
    /// It had to be killed.
    Killed,
}

/// Grace period for the QMP exchange itself, within the caller's timeout.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a SIGKILLed process may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the guest to power off through ACPI (QMP `system_powerdown`), waits until `timeout`,
/// then kills the VMM. Returns once it is gone, with its sockets and pid file removed.
pub async fn stop(vm_dir: &Path, pid: i32, start: u64, timeout: Duration) -> Result<Stopped, VmmError> {
    if !is_alive(pid, start) {
        remove_runtime_files(vm_dir);
        return Ok(Stopped::AlreadyGone);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let asked = async {
        let mut q = Qmp::connect(&vm_dir.join("qmp.sock")).await?;
        q.powerdown().await
    };
    let how = match tokio::time::timeout(QMP_TIMEOUT.min(timeout), asked).await {
        Ok(Ok(())) if tokio::time::timeout_at(deadline, wait_exit(pid, start)).await.is_ok() => Stopped::PoweredOff,
        outcome => {
            if let Ok(Err(e)) = outcome {
                tracing::debug!(pid, error = %e, "acpi powerdown not delivered; killing");
            }
            kill(pid, start, libc::SIGKILL);
            tokio::time::timeout(KILL_TIMEOUT, wait_exit(pid, start))
                .await
                .map_err(|_| VmmError::Qmp(format!("qemu pid {pid} survived SIGKILL for 10 s; check for a hung kernel task (D state)")))?;
            Stopped::Killed
        }
    };
    remove_runtime_files(vm_dir);
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("qemu.log");
        let text: String = (0..30).map(|i| format!("line {i}\n\n")).collect();
        std::fs::write(&p, text).expect("write");
        let t = tail(&p);
        assert_eq!(t.lines().count(), TAIL_LINES);
        assert!(t.starts_with("line 20") && t.ends_with("line 29"), "{t}");
        std::fs::write(&p, "").expect("write");
        assert!(tail(&p).contains("is empty"));
    }

    #[test]
    fn relative_paths_become_absolute() {
        let spec = LaunchSpec {
            vm_dir: "vms/a".into(),
            kernel: "/k".into(),
            initrd: "i".into(),
            cmdline: String::new(),
            root_disk: "vms/a/disk.img".into(),
            config_disk: "/c".into(),
            cpus: 1,
            memory_mib: 128,
            accel: Accel::Tcg,
            qemu_binary: None,
            network: None,
            volumes: vec![],
        };
        let a = absolute(&spec).expect("absolute");
        assert!(a.vm_dir.is_absolute() && a.initrd.is_absolute() && a.root_disk.is_absolute());
        assert_eq!(a.kernel, PathBuf::from("/k"));
    }

    #[test]
    fn a_missing_binary_says_what_to_install() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = LaunchSpec {
            vm_dir: dir.path().to_owned(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: String::new(),
            root_disk: "/d".into(),
            config_disk: "/c".into(),
            cpus: 1,
            memory_mib: 128,
            accel: Accel::Tcg,
            qemu_binary: Some(dir.path().join("no-such-qemu")),
            network: None,
            volumes: vec![],
        };
        let e = launch(&spec).expect_err("no binary");
        assert!(e.to_string().contains("qemu-system-x86"), "{e}");
    }
}
