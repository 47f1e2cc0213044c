//! The QEMU provider: the command line (`config.rs`), daemonized launch and stop
//! (`launch.rs`), the QMP client (`qmp.rs`) and finding a running QEMU again (`observe.rs`).

mod config;
mod launch;
mod observe;
mod qmp;

pub use config::{confinement_args, kernel_cmdline, qemu_args, Features, QBOOT};
pub use launch::{launch, remove_runtime_files, resume, resume_if_prelaunch, stop, Stopped};
pub use observe::{find_running, is_vmm_of, observe, scan, Observed};
pub use qmp::Qmp;
