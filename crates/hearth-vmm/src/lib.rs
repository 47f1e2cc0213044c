//! hearth's VMM providers and the host end of the guest agent.
//!
//! - [`qemu`]: builds QEMU's command line from a [`LaunchSpec`] (`microvm` with virtio-mmio under
//!   KVM, `pc` with virtio-pci under TCG), starts it with `-daemonize` so VMs outlive hearthd,
//!   speaks QMP for status and ACPI shutdown, and finds a running QEMU again from its pid file.
//! - [`process`]: recognises a VMM by pid *and* start time, waits for non-child exits with pidfd.
//! - [`accel`]: decides whether KVM can really run a guest here, else TCG.
//! - [`agent`]: the framed agent protocol over the VMM's channel (virtio-serial or hybrid vsock).
//! - [`console`]: captures the serial console from the VMM's socket into a capped, rotated log.
//!
//! Files a QEMU VM keeps in its directory: `console.log` (the serial console across boots, as
//! [`console`] captures it, with `console.log.N` rotations and `console.log.start`), `qemu.log`
//! (QEMU's stderr for the current boot: QEMU truncates its `-D` file when it opens it, and
//! without `-D` a daemonized QEMU sends stderr to /dev/null),
//! `qemu.pid`, and the `console.sock`, `agent.sock` and `qmp.sock` sockets, which [`stop`]
//! removes.

pub mod accel;
pub mod agent;
pub mod cgroup;
pub mod console;
pub mod process;
pub mod qemu;
mod sys;

use std::path::PathBuf;

use hearth_types::Accel;

pub use accel::resolve_accel;
pub use process::{is_alive, kill, read_pidfile, start_time, wait_exit, wait_exit_blocking};
pub use qemu::{find_running, is_vmm_of, launch, remove_runtime_files, resume, resume_if_prelaunch, stop, Stopped};

/// Everything a provider needs to start one VM; all paths resolved.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM's directory: sockets, pid file, logs go here.
    pub vm_dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel arguments, appended after hearth's.
    pub cmdline: String,
    pub root_disk: PathBuf,
    pub config_disk: PathBuf,
    pub cpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    /// The QEMU binary; `qemu-system-x86_64` from PATH when `None`.
    pub qemu_binary: Option<PathBuf>,
    /// The VM's network card, if it has one.
    pub network: Option<NetLaunch>,
    /// Disks after the root and config disks, in order.
    pub volumes: Vec<VolumeDisk>,
    /// How the VMM is confined beyond the guest's own isolation.
    pub confinement: Confinement,
}

/// What confines a VMM (docs/adr/0011-vmm-confinement.md): a seccomp sandbox always; where
/// given, an unprivileged uid:gid of the VM's own that it drops to once set up, chrooted into
/// the VM's directory, and a cgroup of its own with limits from the VM's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub run_as: Option<(u32, u32)>,
    pub cgroup: Option<cgroup::Limits>,
}

/// An extra disk: the file, the virtio serial the guest finds it by, and whether it is read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
}

/// A user-mode NAT network card and the host sockets forwarded into the guest.
#[derive(Debug, Clone, Default)]
pub struct NetLaunch {
    pub mac: String,
    /// Host sockets forwarded to guest ports (user-mode network only).
    pub forwards: Vec<hearth_types::PortMapping>,
    /// A tap the VMM creates under this name (bridge network), instead of the user-mode stack.
    pub tap: Option<String>,
}

/// A started VMM.
#[derive(Debug, Clone)]
pub struct Launched {
    pub pid: i32,
    /// Clock ticks since boot when the process started (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The accelerator really used.
    pub accel: Accel,
    /// Said to the user once, e.g. that TCG is slow.
    pub warning: Option<String>,
}

/// Why a VMM could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Accel(String),
    #[error("cannot start {binary}: {source}; install Debian's qemu-system-x86 or set HEARTH_QEMU")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu failed to start: {log}")]
    Start { log: String },
    #[error("vmm I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the VMM's cgroup {name} (is /sys/fs/cgroup writable?)")]
    Cgroup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qmp: {0}")]
    Qmp(String),
    #[error("qmp: qemu closed the connection")]
    QmpClosed,
    #[error("a VMM (pid {pid}) is still running for {vm_dir}: stop the VM first")]
    AlreadyRunning { pid: i32, vm_dir: PathBuf },
}
