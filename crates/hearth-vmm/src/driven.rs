//! hearth-core's `Vmm` port for a VMM driven through a REST API on a Unix socket (Firecracker,
//! Cloud Hypervisor): a provider says how it launches, starts, stops and is found again in a
//! [`Driver`], and [`Driven`] makes that the port, the same way for each.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_core::ports::{
    Capabilities, Confinement, Endpoints, LaunchSpec, Launched, Vmm, VmmError, VmmHandle,
};

use crate::port_error;

/// What one API-driven VMM does, as plain functions of its VM directory.
pub trait Driver: Send + Sync + std::fmt::Debug + Default + 'static {
    const CAPABILITIES: Capabilities;
    /// The binary when neither the spec nor the provider names one (from PATH).
    const BINARY: &'static str;
    /// The environment variable that names the binary.
    const BINARY_ENV: &'static str;
    #[doc(hidden)]
    const FINDER: crate::found::Finder;

    /// The launcher that confines the VMM (Firecracker's jailer), from PATH when none is named;
    /// `None` for a VMM without one.
    const JAILER: Option<(&'static str, &'static str)> = None;

    /// Launches `binary`, confined (under `jailer` for a VMM that has one) when `confine` and
    /// the spec names a uid to run as.
    fn launch(
        spec: &LaunchSpec,
        binary: &Path,
        confine: bool,
        jailer: Option<&Path>,
    ) -> Result<Launched, crate::VmmError>;
    fn wait_set_up(
        vm_dir: &Path,
        pid: i32,
        start: u64,
    ) -> impl Future<Output = Result<(), crate::VmmError>> + Send;
    fn start_guest(
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> impl Future<Output = Result<bool, crate::VmmError>> + Send;
    fn stop(
        vm_dir: &Path,
        pid: i32,
        start: u64,
        grace: Duration,
    ) -> impl Future<Output = Result<(), crate::VmmError>> + Send;
    /// Freezes or resumes the guest's CPUs.
    fn set_paused(
        vm_dir: &Path,
        paused: bool,
    ) -> impl Future<Output = Result<(), crate::VmmError>> + Send;
    fn endpoints(vm_dir: &Path) -> Endpoints;
    fn remove_runtime_files(vm_dir: &Path);
    /// The VMM's log, whose last error says why it ended.
    fn log(vm_dir: &Path) -> PathBuf;
}

/// An API-driven provider.
#[derive(Debug, Clone, Default)]
pub struct Driven<D> {
    /// The VMM binary; the driver's default from PATH when `None`.
    pub binary: Option<PathBuf>,
    /// The driver's jailer binary; its default from PATH when `None`.
    pub jailer: Option<PathBuf>,
    /// Runs the VMM unconfined, as root, even where it has a uid (hearthd's `--no-jail`).
    pub no_jail: bool,
    _driver: std::marker::PhantomData<D>,
}

impl<D: Driver> Driven<D> {
    /// Configured from the environment: the driver's variables name the binary and its jailer.
    pub fn from_env() -> Self {
        Self {
            jailer: D::JAILER.and_then(|(_, var)| std::env::var_os(var)).map(Into::into),
            ..Self::with_binary(std::env::var_os(D::BINARY_ENV).map(Into::into))
        }
    }

    pub fn with_binary(binary: Option<PathBuf>) -> Self {
        Self { binary, jailer: None, no_jail: false, _driver: std::marker::PhantomData }
    }
}

#[async_trait::async_trait]
impl<D: Driver> Vmm for Driven<D> {
    fn capabilities(&self) -> Capabilities {
        D::CAPABILITIES
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let binary =
            spec.binary.clone().or_else(|| self.binary.clone()).unwrap_or_else(|| D::BINARY.into());
        let jailer = D::JAILER
            .filter(|_| !self.no_jail)
            .map(|(name, _)| self.jailer.clone().unwrap_or_else(|| name.into()));
        D::launch(spec, &binary, !self.no_jail, jailer.as_deref()).map_err(port_error)
    }

    fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        D::FINDER.find(vm_dir, recorded)
    }

    fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf> {
        D::FINDER.recover_orphans(vms_dir)
    }

    async fn wait_set_up(&self, vm_dir: &Path, vmm: VmmHandle) -> Result<(), VmmError> {
        D::wait_set_up(vm_dir, vmm.pid, vmm.start_time).await.map_err(port_error)
    }

    async fn start_guest(
        &self,
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> Result<bool, VmmError> {
        D::start_guest(vm_dir, only_if_never_started).await.map_err(port_error)
    }

    async fn set_paused(&self, vm_dir: &Path, paused: bool) -> Result<(), VmmError> {
        D::set_paused(vm_dir, paused).await.map_err(port_error)
    }

    async fn stop(&self, vm_dir: &Path, vmm: VmmHandle, grace: Duration) -> Result<(), VmmError> {
        D::stop(vm_dir, vmm.pid, vmm.start_time, grace).await.map_err(port_error)
    }

    fn signal(&self, vm_dir: &Path, vmm: VmmHandle, signal: i32) -> bool {
        D::FINDER.signal(vm_dir, vmm, signal)
    }

    async fn wait_exit(&self, vmm: VmmHandle) {
        crate::process::wait_exit(vmm.pid, vmm.start_time).await;
    }

    fn endpoints(&self, vm_dir: &Path) -> Endpoints {
        D::endpoints(vm_dir)
    }

    fn cleanup(&self, vm_dir: &Path, confinement: &Confinement) {
        D::remove_runtime_files(vm_dir);
        if let Some(cg) = &confinement.cgroup {
            crate::cgroup::remove(cg);
        }
    }

    fn exit_reason(&self, vm_dir: &Path) -> Option<String> {
        exit_reason(&log_tail(&D::log(vm_dir)).ok()?)
    }
}

/// How much of a log's end is read for the exit reason.
const LOG_TAIL: usize = 64 << 10;

/// The last `LOG_TAIL` bytes of a VMM's log, however large it grew.
fn log_tail(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    // Read without following a link: a jailed VMM's log was its to replace.
    let mut f = crate::jail::open_nofollow(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL as u64)))?;
    let mut tail = Vec::with_capacity(LOG_TAIL.min(len as usize));
    f.take(LOG_TAIL as u64).read_to_end(&mut tail)?;
    Ok(tail)
}

/// Why a VMM ended, from its log's last error line (Firecracker: `[.. :ERROR] Shutting down VM
/// after intercepting signal 7`, a bad syscall; Cloud Hypervisor: `cloud-hypervisor: .. ERROR:..
/// -- ...`), a seccomp violation named as one; `None` when no error was logged.
pub(crate) fn exit_reason(log: &[u8]) -> Option<String> {
    let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(LOG_TAIL)..]).into_owned();
    let line = tail.lines().rev().find(|l| l.contains("ERROR"))?.trim();
    // The message after the logger's prefix.
    let msg = line
        .rsplit_once("] ")
        .map(|(_, m)| m)
        .or_else(|| line.split_once(" -- ").map(|(_, m)| m))
        .unwrap_or(line)
        .trim();
    let msg: String = msg.chars().take(300).collect();
    Some(if msg.contains("bad syscall") || msg.to_ascii_lowercase().contains("seccomp") {
        format!("a seccomp violation (a system call outside the VMM's filter): {msg}")
    } else {
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::{exit_reason, log_tail, LOG_TAIL};

    #[test]
    fn the_last_logged_error_is_the_reason_and_a_bad_syscall_is_named() {
        let fc = b"2026-12-03T07:00:00 [vm:main:WARN:src/x.rs:1] slow\n2026-12-03T07:00:01 [vm:main:ERROR:src/vmm/src/signal_handler.rs:60] Shutting down VM after intercepting signal 7, code 0.\n";
        assert_eq!(
            exit_reason(fc).as_deref(),
            Some("Shutting down VM after intercepting signal 7, code 0.")
        );
        let sys = b"[vm:fc_vcpu 0:ERROR:src/vmm/src/signal_handler.rs:40] Shutting down VM after intercepting a bad syscall (42).\n";
        assert!(exit_reason(sys)
            .is_some_and(|r| r.starts_with("a seccomp violation") && r.contains("(42)")));
        let ch =
            b"cloud-hypervisor: 5.1s: <vmm> ERROR:vmm/src/lib.rs:900 -- Error booting VM: kernel\n";
        assert_eq!(exit_reason(ch).as_deref(), Some("Error booting VM: kernel"));
        assert_eq!(exit_reason(b"all well\n"), None);
        // A log grown huge (an error of its own long ago, then junk) is read from its end only.
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("vmm.log");
        let mut big = b"[x:ERROR] old\n".to_vec();
        big.resize(32 << 20, b'x');
        big.extend_from_slice(b"\n[vm:main:ERROR:y] the last words\n");
        std::fs::write(&log, &big).expect("log");
        let tail = log_tail(&log).expect("tail");
        assert_eq!(tail.len(), LOG_TAIL);
        assert_eq!(exit_reason(&tail).as_deref(), Some("the last words"));
        assert_eq!(exit_reason(b""), None);
    }
}
