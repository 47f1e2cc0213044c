//! Shared fixtures for hearth's tests: records, and fakes of every hearth-core port (a scripted
//! VMM, an in-memory host behind the repository, disks, kernels, network, guests and sandbox
//! ports, a manual clock), so the use-cases are tested without root, QEMU or a kernel.
#![forbid(unsafe_code)]

pub mod contract;
pub mod fakes;
mod records;

pub use records::{launch_spec, record, spec};
