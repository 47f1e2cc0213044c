//! Finding a VM's QEMU again (after a hearthd restart) and asking how it is.
//!
//! A pid file alone is not proof: the pid may have been reused. A QEMU counts as this VM's when
//! the process is alive, not a zombie, and its command line names this VM's pid file; its start
//! time is returned so later checks ([`crate::is_alive`]) keep guarding against reuse.

use std::path::Path;
use std::time::Duration;

use crate::process::read_pidfile;
use crate::qemu::Qmp;

/// The QEMU running for a VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub pid: i32,
    /// `/proc/PID/stat` field 22.
    pub start_time: u64,
    /// QMP `query-status` (`running`, `paused`, `shutdown`, ...), or `None` when QMP did not
    /// answer in time (QEMU busy or wedged: alive, but not known to be healthy).
    pub status: Option<String>,
}

/// The QEMU still running for `vm_dir`, as `(pid, start time)`.
pub fn find_running(vm_dir: &Path) -> Option<(i32, u64)> {
    let pidfile = vm_dir.join("qemu.pid");
    let (pid, start) = read_pidfile(&pidfile)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = pidfile.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg == needle).then_some((pid, start))
}

/// [`find_running`] plus a QMP status query bounded by `qmp_timeout`.
pub async fn observe(vm_dir: &Path, qmp_timeout: Duration) -> Option<Observed> {
    let (pid, start_time) = find_running(vm_dir)?;
    let query = async {
        let mut q = Qmp::connect(&vm_dir.join("qmp.sock")).await?;
        q.status().await
    };
    let status = match tokio::time::timeout(qmp_timeout, query).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(pid, error = %e, "qemu did not answer query-status");
            None
        }
        Err(_) => None,
    };
    Some(Observed { pid, start_time, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_naming_an_unrelated_process_is_not_a_running_vmm() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(find_running(dir.path()), None, "no pid file");
        // Our own pid is alive, but our command line does not name this pid file.
        std::fs::write(dir.path().join("qemu.pid"), std::process::id().to_string()).expect("write");
        assert_eq!(find_running(dir.path()), None);
    }

    #[tokio::test]
    async fn nothing_is_observed_in_an_empty_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(observe(dir.path(), Duration::from_millis(100)).await, None);
    }
}
