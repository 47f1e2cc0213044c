//! Firecracker as hearth-core's `Vmm` port, through [`crate::driven`].

use std::path::Path;
use std::time::Duration;

use hearth_core::ports::{
    AgentTransport, Capabilities, Endpoints, KernelFormat, LaunchSpec, Launched, Provider,
};
use hearth_types::Accel;

use super::AGENT_SOCK;
use crate::VmmError;

/// The Firecracker provider (`HEARTH_FIRECRACKER` names the binary).
pub type Firecracker = crate::driven::Driven<Driver>;

/// Firecracker's part of the provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct Driver;

impl crate::driven::Driver for Driver {
    const CAPABILITIES: Capabilities = Capabilities {
        provider: Provider::Firecracker,
        user_network: false,
        creates_tap: false,
        macvtap: false,
        shares: false,
        snapshots: false,
        console_socket: true,
        agent: AgentTransport::Vsock,
        kernel_formats: &[KernelFormat::Elf, KernelFormat::ElfPvh],
        accels: &[Accel::Kvm],
    };
    const BINARY: &'static str = "firecracker";
    const BINARY_ENV: &'static str = "HEARTH_FIRECRACKER";
    const FINDER: crate::found::Finder = super::FINDER;
    const JAILER: Option<(&'static str, &'static str)> = Some(("jailer", "HEARTH_JAILER"));

    fn launch(
        spec: &LaunchSpec,
        binary: &Path,
        _confine: bool,
        jailer: Option<&Path>,
    ) -> Result<Launched, VmmError> {
        super::launch(spec, binary, jailer)
    }

    async fn wait_set_up(vm_dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
        super::launch::wait_set_up(vm_dir, pid, start).await
    }

    async fn start_guest(vm_dir: &Path, only_if_never_started: bool) -> Result<bool, VmmError> {
        super::start_guest(vm_dir, only_if_never_started).await
    }

    async fn stop(vm_dir: &Path, pid: i32, start: u64, grace: Duration) -> Result<(), VmmError> {
        super::stop(vm_dir, pid, start, grace).await
    }

    async fn set_paused(vm_dir: &Path, paused: bool) -> Result<(), VmmError> {
        if paused {
            super::pause(vm_dir).await
        } else {
            super::resume(vm_dir).await
        }
    }

    fn endpoints(vm_dir: &Path) -> Endpoints {
        Endpoints {
            agent: super::jail::host_path(vm_dir, AGENT_SOCK),
            console: vm_dir.join(crate::console::FIFO_OUT),
        }
    }

    fn remove_runtime_files(vm_dir: &Path) {
        super::remove_runtime_files(vm_dir);
    }

    fn log(vm_dir: &Path) -> std::path::PathBuf {
        vm_dir.join(super::LOG)
    }
}
