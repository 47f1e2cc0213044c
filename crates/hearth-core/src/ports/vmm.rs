//! The `Vmm` port: what the core needs from a virtual machine monitor. QEMU is the first
//! adapter (hearth-vmm's qemu folder); a provider says what it can do in [`Capabilities`], so the
//! core asks, never assumes.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use hearth_types::Provider;
use hearth_types::{Accel, PortMapping};

/// How the host reaches hearth-init's agent in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTransport {
    /// A virtio-serial port the VMM exposes as a Unix socket.
    Serial,
    /// Firecracker-style hybrid vsock: a Unix socket and a `CONNECT port` handshake.
    Vsock,
}

/// The kernel image formats a provider boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed `bzImage` (Debian's `vmlinuz`).
    BzImage,
    /// An uncompressed ELF `vmlinux` with a PVH note.
    ElfPvh,
    /// An uncompressed ELF `vmlinux` without one (Firecracker's kernels).
    Elf,
}

/// What a provider can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub provider: Provider,
    /// A user-mode NAT stack with host port forwards (no root, no bridge).
    pub user_network: bool,
    /// The VMM creates the VM's tap itself (else the host makes it first).
    pub creates_tap: bool,
    /// It takes a macvtap's character device as an open descriptor.
    pub macvtap: bool,
    /// It shares host directories with the guest through virtio-fs (a vhost-user backend).
    pub shares: bool,
    /// It saves a running guest's state to a file and starts a new VM from one (snapshots).
    pub snapshots: bool,
    /// The serial console is a socket hearth can capture and attach to.
    pub console_socket: bool,
    pub agent: AgentTransport,
    pub kernel_formats: &'static [KernelFormat],
    pub accels: &'static [Accel],
}

/// Everything a provider needs to start one VM; all paths resolved.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM's directory: sockets, pid file, logs go here.
    pub vm_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel arguments, merged over the provider's by key (`merge_cmdline`).
    pub cmdline: String,
    pub root_disk: PathBuf,
    pub config_disk: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The accelerator asked for (a QEMU option: the other providers need KVM).
    pub accel: Accel,
    /// The VMM binary; the provider's default from PATH when `None`.
    pub binary: Option<PathBuf>,
    /// The VM's network cards, in the order the guest sees them; the first alone may have
    /// forwards.
    pub networks: Vec<NetLaunch>,
    /// Disks after the root and config disks, in order.
    pub volumes: Vec<VolumeDisk>,
    /// How the VMM is confined beyond the guest's own isolation.
    pub confinement: Confinement,
    /// The VM's cloud-init files (meta-data, user-data, vendor-data, network-config), for a
    /// VMM with a metadata service (Firecracker's MMDS); hearth-init seeds them in any case.
    pub cloud_init: std::collections::BTreeMap<String, hearth_types::Blob>,
    /// A guest state file ([`Vmm::save_state`]) to restore instead of booting: the launch
    /// returns with the guest loaded and paused, as a booting one is.
    pub incoming: Option<PathBuf>,
}

/// What confines a VMM (docs/adr/0011-vmm-confinement.md): a seccomp sandbox always; where
/// given, an unprivileged uid:gid of the VM's own that it drops to once set up, chrooted into
/// the VM's directory, and a cgroup of its own (this path below the hierarchy's root) with
/// limits from the VM's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub run_as: Option<(u32, u32)>,
    pub cgroup: Option<String>,
}

/// An extra disk: the file, the virtio serial the guest finds it by, and whether it is
/// read-only; or, with `share`, a host directory shared through virtio-fs under that tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
    /// A file or block device of the host's (a host volume), not hearth's: the VMM opens it
    /// where it is, and a jail never links, copies or re-owns it.
    pub host: bool,
    /// A directory shared through virtio-fs (`serial` is its tag), not a disk.
    pub share: bool,
}

/// One of the VM's network cards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetLaunch {
    pub mac: String,
    /// Host sockets forwarded to guest ports (user-mode network only).
    pub forwards: Vec<PortMapping>,
    /// A tap under this name (bridge network), instead of the user-mode stack.
    pub tap: Option<String>,
    /// A macvtap under this name, made already, whose character device (`/dev/tapN`, N its
    /// interface index) the VMM is handed open, instead.
    pub macvtap: Option<String>,
}

/// A running VMM process: its pid and its start time (clock ticks since boot), so a reused pid
/// is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmmHandle {
    pub pid: i32,
    pub start_time: u64,
}

/// A started VMM, its guest paused until [`Vmm::start_guest`].
#[derive(Debug, Clone)]
pub struct Launched {
    pub pid: i32,
    /// Clock ticks since boot when the process started (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The accelerator really used.
    pub accel: Accel,
    /// Said to the user once, e.g. that TCG is slow.
    pub warning: Option<String>,
    /// Descriptors to hold until the guest has started (the VMM may open its disks only then):
    /// loop devices a jail attached for host files, which detach themselves once the VMM and
    /// these are closed.
    pub held: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
}

impl Launched {
    pub fn handle(&self) -> VmmHandle {
        VmmHandle { pid: self.pid, start_time: self.start_time }
    }
}

/// Why a VMM could not be started or controlled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmmError {
    /// A VMM already runs for this VM (it appeared since the VM was observed).
    #[error("a VMM (pid {pid}) is still running for this VM: stop the VM first")]
    AlreadyRunning { pid: i32 },
    /// Anything else, with the VMM's own words and the fix.
    #[error("{0}")]
    Failed(String),
}

/// A virtual machine monitor. Blocking methods are called off the async runtime.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    fn capabilities(&self) -> Capabilities;

    /// Starts the VMM with the guest paused; returns once it runs. Blocking.
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError>;

    /// The live VMM of `vm_dir`: `recorded` when it still names that VMM (true), else one found
    /// from the VMM's own files (false: a crash before the pid was recorded). A pid now held by
    /// anything else is no VMM of this VM's.
    fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)>;

    /// VM directories under `vms_dir` whose VMM runs but cannot be found from its files (a
    /// predecessor died between starting it and its pid file); made findable again.
    fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf>;

    /// Waits until a VMM found running (not launched by this process) has finished setting up,
    /// so its console and agent can be reached: a predecessor may have died right after
    /// starting it. Fails when it exits first or does not get there in time.
    async fn wait_set_up(&self, vm_dir: &Path, vmm: VmmHandle) -> Result<(), VmmError>;

    /// Lets the guest's CPUs run. With `only_if_never_started`, only a guest that was launched
    /// and never started (a crash between launch and start); returns whether it started it.
    async fn start_guest(
        &self,
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> Result<bool, VmmError>;

    /// Freezes the guest's CPUs (`paused`) or lets them run again (`hearth pause`/`unpause`);
    /// a guest frozen this way is not one that was never started.
    async fn set_paused(&self, vm_dir: &Path, paused: bool) -> Result<(), VmmError>;

    /// Asks the guest to power off, waits up to `grace`, then kills the VMM; a zero grace kills
    /// at once. Returns once the VMM is gone.
    async fn stop(&self, vm_dir: &Path, vmm: VmmHandle, grace: Duration) -> Result<(), VmmError>;

    /// Sends `signal` to the VMM process if it is still this VM's (`hearth kill -s`); returns
    /// whether it was sent.
    fn signal(&self, vm_dir: &Path, vmm: VmmHandle, signal: i32) -> bool;

    /// Resolves when the VMM has exited (and reaps it if it is the caller's child).
    async fn wait_exit(&self, vmm: VmmHandle);

    /// The agent's and the serial console's sockets.
    fn endpoints(&self, vm_dir: &Path) -> Endpoints;

    /// Removes what a VMM that is gone left: sockets, pid file, its cgroup.
    fn cleanup(&self, vm_dir: &Path, confinement: &Confinement);

    /// Saves the running guest's memory and device state into the new file `to` (the
    /// [`Capabilities::snapshots`] a provider has), its CPUs stopped first and left stopped,
    /// its disks flushed; returns the VMM's version, which a restore must match.
    async fn save_state(
        &self,
        _vm_dir: &Path,
        _vmm: VmmHandle,
        _to: &Path,
    ) -> Result<String, VmmError> {
        Err(VmmError::Failed(format!(
            "--vmm {} cannot take snapshots yet: use --vmm qemu",
            self.capabilities().provider
        )))
    }

    /// Why a VMM that is gone ended, in its own words (its log's last error: a signal, a
    /// seccomp violation), when it said; `None` when it left nothing (SIGKILL).
    fn exit_reason(&self, _vm_dir: &Path) -> Option<String> {
        None
    }
}

/// Where the host reaches a VM's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub agent: PathBuf,
    pub console: PathBuf,
}

/// The providers a daemon drives, each VM by its own (`VmSpec::provider`).
#[derive(Clone, Debug, Default)]
pub struct Vmms {
    list: Vec<std::sync::Arc<dyn Vmm>>,
}

impl Vmms {
    pub fn new(list: Vec<std::sync::Arc<dyn Vmm>>) -> Self {
        Self { list }
    }

    /// The provider `p`; one that refuses every launch with the reason when this daemon was
    /// built without it (a record from another build, a test harness with one fake).
    pub fn of(&self, p: Provider) -> std::sync::Arc<dyn Vmm> {
        self.list
            .iter()
            .find(|v| v.capabilities().provider == p)
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::new(Unconfigured(p)))
    }

    pub fn all(&self) -> &[std::sync::Arc<dyn Vmm>] {
        &self.list
    }
}

/// A provider this daemon does not drive: nothing of it can be running, and it launches nothing.
#[derive(Debug)]
struct Unconfigured(Provider);

#[async_trait::async_trait]
impl Vmm for Unconfigured {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: self.0,
            user_network: false,
            creates_tap: false,
            macvtap: false,
            shares: false,
            snapshots: false,
            console_socket: false,
            agent: AgentTransport::Serial,
            kernel_formats: &[],
            accels: &[],
        }
    }

    fn launch(&self, _spec: &LaunchSpec) -> Result<Launched, VmmError> {
        Err(VmmError::Failed(format!(
            "this hearthd does not drive the {} VMM; recreate the VM with another --vmm",
            self.0
        )))
    }

    fn find(&self, _vm_dir: &Path, _recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        None
    }

    fn recover_orphans(&self, _vms_dir: &Path) -> Vec<PathBuf> {
        Vec::new()
    }

    async fn wait_set_up(&self, _vm_dir: &Path, _vmm: VmmHandle) -> Result<(), VmmError> {
        Err(VmmError::Failed(format!("no {} VMM runs here", self.0)))
    }

    async fn start_guest(&self, _vm_dir: &Path, _only_if: bool) -> Result<bool, VmmError> {
        Err(VmmError::Failed(format!("no {} VMM runs here", self.0)))
    }

    async fn set_paused(&self, _vm_dir: &Path, _paused: bool) -> Result<(), VmmError> {
        Err(VmmError::Failed(format!("no {} VMM runs here", self.0)))
    }

    async fn stop(
        &self,
        _vm_dir: &Path,
        _vmm: VmmHandle,
        _grace: Duration,
    ) -> Result<(), VmmError> {
        Ok(())
    }

    fn signal(&self, _vm_dir: &Path, _vmm: VmmHandle, _signal: i32) -> bool {
        false
    }

    async fn wait_exit(&self, _vmm: VmmHandle) {}

    fn endpoints(&self, vm_dir: &Path) -> Endpoints {
        Endpoints { agent: vm_dir.join("agent.sock"), console: vm_dir.join("console.sock") }
    }

    fn cleanup(&self, _vm_dir: &Path, _confinement: &Confinement) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse_by_their_names_and_others_are_refused_with_the_choices() {
        for p in Provider::ALL {
            assert_eq!(p.to_string().parse::<Provider>(), Ok(*p));
        }
        let e = "vmware".parse::<Provider>().expect_err("not a provider").to_string();
        assert!(e.contains("\"vmware\"") && e.contains("qemu"), "{e}");
    }

    #[test]
    fn a_provider_the_daemon_lacks_launches_nothing_and_says_why() {
        let none = Vmms::default().of(Provider::Qemu);
        assert_eq!(none.capabilities().provider, Provider::Qemu);
        let spec = LaunchSpec {
            vm_dir: "/nonexistent".into(),
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: String::new(),
            root_disk: "r".into(),
            config_disk: "c".into(),
            cpus: 1,
            memory_mib: 128,
            accel: Accel::Auto,
            binary: None,
            networks: vec![],
            volumes: Vec::new(),
            confinement: Confinement::default(),
            cloud_init: Default::default(),
            incoming: None,
        };
        let why = none.launch(&spec).expect_err("nothing to launch").to_string();
        assert!(why.contains("qemu") && why.contains("--vmm"), "{why}");
        assert!(none.find(Path::new("/nonexistent"), None).is_none());
    }
}
