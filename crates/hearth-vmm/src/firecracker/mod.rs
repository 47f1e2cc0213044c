//! The Firecracker provider: its configuration as API calls (`config.rs`), its HTTP API client
//! (`crate::http`), start, find and stop (`launch.rs`), and all of it as hearth-core's `Vmm` port
//! (`provider.rs`).
//!
//! Files a Firecracker VM keeps in its directory: `firecracker.sock` (the API),
//! `firecracker.pid` (written by hearth), `firecracker.log` (its log and stderr for the current
//! boot), `firecracker.metrics`, `agent.sock` (hybrid vsock to hearth-init's agent) and the
//! console FIFOs `console.out`/`console.in` (its serial port), which the console capture turns
//! into `console.log` like any VM's. Jailed ([`jail`]), the sockets, log and metrics are in the
//! chroot `firecracker/jail/root/` instead, and `jailer.log` holds the jailer's stderr.

mod config;
pub mod jail;
mod launch;
mod provider;

pub use crate::http::Api;
pub use config::{calls, kernel_cmdline, GUEST_CID};
pub use launch::{launch, pause, remove_runtime_files, resume, start_guest, state, stop};
pub use provider::Firecracker;

/// The API socket, in the VM's directory.
pub const API_SOCK: &str = "firecracker.sock";
/// Found by hearth's pid file and the API socket on its command line.
pub(crate) const FINDER: crate::found::Finder = crate::found::Finder {
    pid_file: PID,
    flag: b"--api-sock",
    named: API_SOCK,
    jail: Some(jail::root),
};

pub const PID: &str = "firecracker.pid";
pub const LOG: &str = "firecracker.log";
/// A jailed Firecracker's stderr and its jailer's, outside the chroot.
pub const JAILER_LOG: &str = "jailer.log";
pub const METRICS: &str = "firecracker.metrics";
/// The hybrid vsock socket the host reaches hearth-init's agent through.
pub const AGENT_SOCK: &str = "agent.sock";

const RUNTIME_FILES: [&str; 5] =
    [API_SOCK, PID, AGENT_SOCK, crate::console::FIFO_OUT, crate::console::FIFO_IN];
