//! Finding a VM's QEMU again (after a hearthd restart) and asking how it is.
//!
//! A pid file alone is not proof: the pid may have been reused. A QEMU counts as this VM's when
//! the process is alive, not a zombie, and its command line names this VM's pid file; its start
//! time is returned so later checks ([`crate::is_alive`]) keep guarding against reuse.

use std::path::Path;
use std::time::Duration;

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

/// Found by its pid file, which its `-pidfile` names.
pub(crate) const FINDER: crate::found::Finder =
    crate::found::Finder { pid_file: "qemu.pid", flag: b"-pidfile", named: "qemu.pid", jail: None };

/// The QEMU still running for `vm_dir`, as `(pid, start time)`.
pub fn find_running(vm_dir: &Path) -> Option<(i32, u64)> {
    FINDER.find_running(vm_dir)
}

/// True when `pid`, started at `start`, is still this VM's QEMU (see `Finder::is_vmm_of`).
pub fn is_vmm_of(vm_dir: &Path, pid: i32, start: u64) -> bool {
    FINDER.is_vmm_of(vm_dir, pid, start)
}

/// Every live QEMU whose `-pidfile` lies in a directory under `vms_dir`, as (VM directory,
/// pid), found from /proc alone: a VMM its predecessor launched but died before recording may
/// not have written its pid file yet.
pub fn scan(vms_dir: &Path) -> Vec<(std::path::PathBuf, i32)> {
    FINDER.scan(vms_dir)
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

    #[test]
    fn a_vmm_is_known_by_start_time_and_the_pid_file_on_its_command_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let pidfile = dir.path().join("qemu.pid");
        // A stand-in whose command line carries `-pidfile DIR/qemu.pid`, as QEMU's does.
        let mut ours = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", "sh", "-pidfile"])
            .arg(&pidfile)
            .spawn()
            .expect("sh");
        let mut other = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let (pid, oid) = (ours.id() as i32, other.id() as i32);
        let (start, ostart) =
            (crate::start_time(pid).expect("start"), crate::start_time(oid).expect("start"));
        // Spawned is not yet exec'd: its command line is ours until then.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_vmm_of(dir.path(), pid, start) {
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in never showed its command line"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!is_vmm_of(dir.path(), pid, start + 1), "another start time is another process");
        assert!(!is_vmm_of(dir.path(), oid, ostart), "alive, right start time, but not this VM's");
        assert!(!is_vmm_of(&dir.path().join("elsewhere"), pid, start), "another VM's directory");
        std::fs::write(&pidfile, oid.to_string()).expect("write");
        assert_eq!(find_running(dir.path()), None, "a pid file naming an unrelated process");
        std::fs::write(&pidfile, pid.to_string()).expect("write");
        assert_eq!(find_running(dir.path()), Some((pid, start)));
        // Found from /proc alone too, pid file or not.
        std::fs::remove_file(&pidfile).expect("rm");
        assert!(scan(dir.path().parent().expect("parent")).contains(&(dir.path().to_owned(), pid)));
        for c in [&mut ours, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(!is_vmm_of(dir.path(), pid, start));
    }

    #[tokio::test]
    async fn nothing_is_observed_in_an_empty_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(observe(dir.path(), Duration::from_millis(100)).await, None);
    }
}
