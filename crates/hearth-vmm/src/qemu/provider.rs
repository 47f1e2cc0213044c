//! QEMU as hearth-core's `Vmm` port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_core::ports::{
    AgentTransport, Capabilities, Confinement, Endpoints, KernelFormat, LaunchSpec, Launched,
    Provider, Vmm, VmmError, VmmHandle,
};
use hearth_types::Accel;

use crate::port_error;

/// The QEMU provider.
#[derive(Debug, Clone, Default)]
pub struct Qemu {
    /// The QEMU binary; `qemu-system-x86_64` from PATH when `None`.
    pub binary: Option<PathBuf>,
}

impl Qemu {
    /// Configured from the environment: `HEARTH_QEMU` names the binary.
    pub fn from_env() -> Self {
        Self { binary: std::env::var_os("HEARTH_QEMU").map(Into::into) }
    }
}

use crate::qemu::observe::FINDER;

#[async_trait::async_trait]
impl Vmm for Qemu {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: Provider::Qemu,
            user_network: true,
            creates_tap: true,
            macvtap: true,
            shares: true,
            snapshots: true,
            console_socket: true,
            agent: AgentTransport::Serial,
            kernel_formats: &[KernelFormat::BzImage, KernelFormat::ElfPvh],
            accels: &[Accel::Kvm, Accel::Tcg],
        }
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let mut spec = spec.clone();
        if spec.binary.is_none() {
            spec.binary.clone_from(&self.binary);
        }
        crate::qemu::launch(&spec).map_err(port_error)
    }

    fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        FINDER.find(vm_dir, recorded)
    }

    fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf> {
        FINDER.recover_orphans(vms_dir)
    }

    async fn wait_set_up(&self, vm_dir: &Path, vmm: VmmHandle) -> Result<(), VmmError> {
        crate::qemu::wait_set_up(vm_dir, vmm.pid, vmm.start_time).await.map_err(port_error)
    }

    async fn start_guest(
        &self,
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> Result<bool, VmmError> {
        if only_if_never_started {
            crate::qemu::resume_if_prelaunch(vm_dir).await.map_err(port_error)
        } else {
            crate::qemu::resume(vm_dir).await.map(|()| true).map_err(port_error)
        }
    }

    async fn set_paused(&self, vm_dir: &Path, paused: bool) -> Result<(), VmmError> {
        if paused {
            crate::qemu::pause(vm_dir).await.map_err(port_error)
        } else {
            crate::qemu::resume(vm_dir).await.map_err(port_error)
        }
    }

    async fn stop(&self, vm_dir: &Path, vmm: VmmHandle, grace: Duration) -> Result<(), VmmError> {
        crate::qemu::stop(vm_dir, vmm.pid, vmm.start_time, grace)
            .await
            .map(drop)
            .map_err(port_error)
    }

    fn signal(&self, vm_dir: &Path, vmm: VmmHandle, signal: i32) -> bool {
        FINDER.signal(vm_dir, vmm, signal)
    }

    async fn wait_exit(&self, vmm: VmmHandle) {
        crate::process::wait_exit(vmm.pid, vmm.start_time).await;
    }

    fn endpoints(&self, vm_dir: &Path) -> Endpoints {
        Endpoints { agent: vm_dir.join("agent.sock"), console: vm_dir.join("console.sock") }
    }

    async fn save_state(
        &self,
        vm_dir: &Path,
        _vmm: VmmHandle,
        to: &Path,
    ) -> Result<String, VmmError> {
        crate::qemu::save_state(vm_dir, to).await.map_err(port_error)
    }

    fn cleanup(&self, vm_dir: &Path, confinement: &Confinement) {
        crate::qemu::remove_runtime_files(vm_dir);
        if let Some(cg) = &confinement.cgroup {
            crate::cgroup::remove(cg);
        }
    }
}
