//! hearth's VMM providers and the host end of the guest agent.
//!
//! - [`qemu`]: the QEMU provider, [`Qemu`], hearth-core's `Vmm` port: builds QEMU's command line
//!   from a [`LaunchSpec`] (`microvm` with virtio-mmio under KVM, `pc` with virtio-pci under
//!   TCG), starts it in a session of its own so VMs outlive hearthd, speaks QMP for status and
//!   ACPI shutdown, and finds a running QEMU again from its pid file.
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
#![deny(unsafe_code)]

pub mod accel;
pub mod agent;
pub mod cgroup;
pub mod cloud_hypervisor;
pub mod console;
pub mod driven;
pub mod firecracker;
mod found;
pub mod http;
pub mod jail;
mod macvtap;
pub mod process;
pub mod qemu;
mod spawn;
// The only module with raw system calls (the crate denies unsafe code everywhere else).
#[allow(unsafe_code)]
mod sys;
pub mod virtiofs;

use std::path::PathBuf;

pub use accel::resolve_accel;
pub use hearth_core::ports::{Confinement, LaunchSpec, Launched, NetLaunch, VolumeDisk};
pub use process::{is_alive, kill, read_pidfile, start_time, wait_exit, wait_exit_blocking};
pub use qemu::{
    find_running, is_vmm_of, launch, remove_runtime_files, resume, resume_if_prelaunch, stop, Qemu,
    Stopped,
};

/// The provider `kind`, configured from the environment; `no_jail` runs Firecracker and Cloud
/// Hypervisor unconfined (no jailer, chroot or uid of their own).
pub fn provider_with(
    kind: hearth_core::ports::Provider,
    no_jail: bool,
) -> std::sync::Arc<dyn hearth_core::ports::Vmm> {
    match kind {
        hearth_core::ports::Provider::Qemu => std::sync::Arc::new(Qemu::from_env()),
        hearth_core::ports::Provider::Firecracker => {
            let mut fc = firecracker::Firecracker::from_env();
            fc.no_jail = no_jail;
            std::sync::Arc::new(fc)
        }
        hearth_core::ports::Provider::CloudHypervisor => {
            let mut ch = cloud_hypervisor::CloudHypervisor::from_env();
            ch.no_jail = no_jail;
            std::sync::Arc::new(ch)
        }
    }
}

/// Every provider, configured from the environment.
pub fn providers() -> hearth_core::ports::Vmms {
    providers_with(false)
}

/// Every provider; `no_jail` runs Firecracker and Cloud Hypervisor unconfined.
pub fn providers_with(no_jail: bool) -> hearth_core::ports::Vmms {
    hearth_core::ports::Vmms::new(
        hearth_core::ports::Provider::ALL.iter().map(|&p| provider_with(p, no_jail)).collect(),
    )
}

/// A VM with a card and a read-only volume, for the providers' configuration tests.
#[cfg(test)]
pub(crate) fn sample_spec() -> LaunchSpec {
    LaunchSpec {
        vm_dir: "/var/lib/hearth/vms/abc".into(),
        kernel: "/k/vmlinux".into(),
        initrd: "/k/initrd".into(),
        cmdline: " systemd.unit=rescue.target ".into(),
        root_disk: "/var/lib/hearth/vms/abc/disk.img".into(),
        config_disk: "/var/lib/hearth/vms/abc/config.img".into(),
        cpus: 2,
        memory_mib: 512,
        accel: hearth_types::Accel::Kvm,
        binary: None,
        networks: vec![NetLaunch {
            mac: "02:00:00:00:00:01".into(),
            forwards: vec![],
            tap: Some("hth-abc".into()),
            macvtap: None,
        }],
        volumes: vec![VolumeDisk {
            path: "/images/data.ext4".into(),
            serial: hearth_types::guest::volume_serial(0),
            read_only: true,
            host: false,
            share: false,
        }],
        confinement: Confinement::default(),
        cloud_init: Default::default(),
        incoming: None,
    }
}

/// Why a VMM could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Accel(String),
    #[error("cannot start {binary}: {source}; {fix}")]
    Spawn {
        binary: String,
        /// How to get the binary (the provider's package or its env variable).
        fix: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{vmm} failed to start: {log}")]
    Start { vmm: &'static str, log: String },
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
    /// The VMM's control channel (QEMU's QMP, Firecracker's API socket) refused or failed.
    #[error("{api}: {message}")]
    Control { api: &'static str, message: String },
    /// A VMM SIGKILL did not end: a task stuck in the kernel.
    #[error("{vmm} pid {pid} survived SIGKILL for 10 s; check for a hung kernel task (D state)")]
    Unkillable { vmm: &'static str, pid: i32 },
    /// The VMM hung up its control channel (it exits right after a quit).
    #[error("{api}: the VMM closed the connection")]
    Closed { api: &'static str },
    #[error("a VMM (pid {pid}) is still running for {vm_dir}: stop the VM first")]
    AlreadyRunning { pid: i32, vm_dir: PathBuf },
}

/// hearth-vmm's own errors as the port's: the words are kept, they name the fix.
pub(crate) fn port_error(e: crate::VmmError) -> hearth_core::ports::VmmError {
    match e {
        crate::VmmError::AlreadyRunning { pid, .. } => {
            hearth_core::ports::VmmError::AlreadyRunning { pid }
        }
        other => hearth_core::ports::VmmError::Failed(chain(&other)),
    }
}

/// The whole chain of an error, as `{:#}` prints it for anyhow.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
