//! The Cloud Hypervisor provider: its `vm.create` configuration (`config.rs`), start, find and
//! stop through its REST API (`launch.rs`, over [`crate::http`]), and all of it as hearth-core's
//! `Vmm` port (`provider.rs`).
//!
//! Files a Cloud Hypervisor VM keeps in its directory: `cloud-hypervisor.sock` (the API, with
//! the `.lock` file Cloud Hypervisor keeps beside it), `cloud-hypervisor.pid` (written by
//! hearth), `cloud-hypervisor.log` (its log and stderr for the current boot), `console.sock`
//! (the serial port, which the console capture turns into `console.log` like any VM's) and
//! `agent.sock` (hybrid vsock to hearth-init's agent). Confined ([`jail`]), the sockets are in
//! the chroot `cloud-hypervisor/jail/root/` instead.

mod config;
pub mod jail;
mod launch;
mod provider;

pub use config::{kernel_cmdline, vm_config, GUEST_CID};
pub use launch::{launch, pause, remove_runtime_files, resume, start_guest, state, stop};
pub use provider::CloudHypervisor;

/// The API socket, in the VM's directory.
pub const API_SOCK: &str = "cloud-hypervisor.sock";
/// Found by hearth's pid file and the API socket on its command line.
pub(crate) const FINDER: crate::found::Finder = crate::found::Finder {
    pid_file: PID,
    flag: b"--api-socket",
    named: API_SOCK,
    jail: Some(jail::root),
};

pub const PID: &str = "cloud-hypervisor.pid";
pub const LOG: &str = "cloud-hypervisor.log";
/// The hybrid vsock socket the host reaches hearth-init's agent through.
pub const AGENT_SOCK: &str = "agent.sock";

const RUNTIME_FILES: [&str; 5] =
    [API_SOCK, "cloud-hypervisor.sock.lock", PID, AGENT_SOCK, crate::console::SOCKET];
