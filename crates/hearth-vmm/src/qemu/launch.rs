//! Starting QEMU daemonized and stopping it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{is_alive, kill, read_pidfile, wait_exit};
use crate::qemu::{qemu_args, Qmp, QBOOT};
use crate::{resolve_accel, LaunchSpec, Launched, VmmError};
use hearth_types::Accel;

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(10).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// qboot for the `pc` machine where Debian ships it.
fn bios(accel: Accel) -> Option<std::path::PathBuf> {
    let q = Path::new(QBOOT);
    (accel == Accel::Tcg && q.exists()).then(|| q.to_owned())
}

/// Starts QEMU for `spec`. QEMU daemonizes once its devices are set up; the returned pid is the
/// daemon's, read from its pid file.
pub fn launch(spec: &LaunchSpec) -> Result<Launched, VmmError> {
    let (accel, warning) = resolve_accel(spec.accel)?;
    let dir = &spec.vm_dir;
    for stale in ["console.sock", "agent.sock", "qmp.sock", "qemu.pid"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let log_path = dir.join("qemu.log");
    let io = |source| VmmError::Io { path: log_path.clone(), source };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io)?;
    let binary = spec.qemu_binary.clone().unwrap_or_else(|| "qemu-system-x86_64".into());
    let status = Command::new(&binary)
        .args(qemu_args(spec, accel, bios(accel).as_deref()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .status()
        .map_err(|source| VmmError::Spawn { binary: binary.display().to_string(), source })?;
    if !status.success() {
        return Err(VmmError::Start { log: tail(&log_path) });
    }
    let (pid, start_time) = read_pidfile(&dir.join("qemu.pid"))
        .ok_or_else(|| VmmError::Start { log: format!("no live process in qemu.pid; {}", tail(&log_path)) })?;
    Ok(Launched { pid, start_time, accel, warning })
}

/// Asks the guest to power off through ACPI (QMP `system_powerdown`), waits until `timeout`,
/// then kills the VMM. Returns once it is gone.
pub async fn stop(vm_dir: &Path, pid: i32, start: u64, timeout: Duration) -> Result<(), VmmError> {
    if !is_alive(pid, start) {
        return Ok(());
    }
    let asked = async {
        let mut q = Qmp::connect(&vm_dir.join("qmp.sock")).await?;
        q.execute("system_powerdown", None).await
    };
    if tokio::time::timeout(Duration::from_secs(2), asked).await.is_ok()
        && tokio::time::timeout(timeout, wait_exit(pid, start)).await.is_ok()
    {
        return Ok(());
    }
    kill(pid, start, libc::SIGKILL);
    tokio::time::timeout(Duration::from_secs(10), wait_exit(pid, start))
        .await
        .map_err(|_| VmmError::Qmp(format!("qemu pid {pid} survived SIGKILL for 10 s")))
}
