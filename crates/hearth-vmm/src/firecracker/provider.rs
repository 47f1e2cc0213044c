//! Firecracker as hearth-core's `Vmm` port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_core::ports::{
    AgentTransport, Capabilities, Confinement, Endpoints, KernelFormat, LaunchSpec, Launched,
    Provider, Vmm, VmmError, VmmHandle,
};
use hearth_types::Accel;

use super::{find_running, is_vmm_of, scan, AGENT_SOCK, PID};
use crate::port_error;

/// The Firecracker provider.
#[derive(Debug, Clone, Default)]
pub struct Firecracker {
    /// The Firecracker binary; `firecracker` from PATH when `None`.
    pub binary: Option<PathBuf>,
}

impl Firecracker {
    /// Configured from the environment: `HEARTH_FIRECRACKER` names the binary.
    pub fn from_env() -> Self {
        Self { binary: std::env::var_os("HEARTH_FIRECRACKER").map(Into::into) }
    }
}

const FINDER: crate::found::Finder =
    crate::found::Finder { find_running, is_vmm_of, scan, pid_file: PID };

#[async_trait::async_trait]
impl Vmm for Firecracker {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: Provider::Firecracker,
            user_network: false,
            creates_tap: false,
            console_socket: true,
            agent: AgentTransport::Vsock,
            kernel_formats: &[KernelFormat::Elf, KernelFormat::ElfPvh],
            accels: &[Accel::Kvm],
        }
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let binary = spec
            .binary
            .clone()
            .or_else(|| self.binary.clone())
            .unwrap_or_else(|| "firecracker".into());
        super::launch(spec, &binary).map_err(port_error)
    }

    fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        FINDER.find(vm_dir, recorded)
    }

    fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf> {
        FINDER.recover_orphans(vms_dir)
    }

    async fn wait_set_up(&self, vm_dir: &Path, vmm: VmmHandle) -> Result<(), VmmError> {
        super::launch::wait_set_up(vm_dir, vmm.pid, vmm.start_time).await.map_err(port_error)
    }

    async fn start_guest(
        &self,
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> Result<bool, VmmError> {
        super::start_guest(vm_dir, only_if_never_started).await.map_err(port_error)
    }

    async fn stop(&self, vm_dir: &Path, vmm: VmmHandle, grace: Duration) -> Result<(), VmmError> {
        super::stop(vm_dir, vmm.pid, vmm.start_time, grace).await.map_err(port_error)
    }

    fn signal(&self, vm_dir: &Path, vmm: VmmHandle, signal: i32) -> bool {
        FINDER.signal(vm_dir, vmm, signal)
    }

    async fn wait_exit(&self, vmm: VmmHandle) {
        crate::process::wait_exit(vmm.pid, vmm.start_time).await;
    }

    fn endpoints(&self, vm_dir: &Path) -> Endpoints {
        Endpoints { agent: vm_dir.join(AGENT_SOCK), console: vm_dir.join(crate::console::FIFO_OUT) }
    }

    fn cleanup(&self, vm_dir: &Path, confinement: &Confinement) {
        super::remove_runtime_files(vm_dir);
        if let Some(cg) = &confinement.cgroup {
            crate::cgroup::remove(cg);
        }
    }
}
