//! Shared fixtures for hearth's tests: records, and fakes of every hearth-core port (a scripted
//! VMM, an in-memory host behind the repository, disks, kernels, network, guests and sandbox
//! ports, a manual clock), so the use-cases are tested without root, QEMU or a kernel.
#![forbid(unsafe_code)]

pub mod contract;
pub mod fakes;
pub mod kvm;
mod records;

pub use records::{launch_spec, record, spec};

/// Polls until the file at `path` holds `needle` and returns its text; fails after `within`
/// (a deadline bounds only a failure: no fixed sleeps).
pub fn wait_for_text(path: &std::path::Path, needle: &str, within: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} not in {} after {within:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
