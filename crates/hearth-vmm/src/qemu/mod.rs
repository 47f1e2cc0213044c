//! The QEMU provider: the command line (`config.rs`), launch and stop (`launch.rs`), the QMP
//! client (`qmp.rs`), finding a running QEMU again (`observe.rs`), and all of it as hearth-core's
//! `Vmm` port (`provider.rs`).

mod config;
mod launch;
mod observe;
mod provider;
mod qmp;

pub use config::{confinement_args, kernel_cmdline, qemu_args, Features, QBOOT};
pub use launch::{
    launch, pause, remove_runtime_files, resume, resume_if_prelaunch, save_state, stop,
    wait_set_up, Stopped,
};
pub use observe::{find_running, is_vmm_of, observe, scan, Observed};
pub use provider::Qemu;
pub use qmp::Qmp;
