//! The QEMU provider: command line, daemonized launch, QMP.

mod config;
mod launch;
mod qmp;

pub use config::{kernel_cmdline, qemu_args, QBOOT};
pub use launch::{launch, stop, Stopped};
pub use qmp::Qmp;
