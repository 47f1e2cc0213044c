//! hearth's image store: registry pulls, imports, safe layer unpacking and cached base ext4s.
//!
//! A blocking library; the daemon calls it from `spawn_blocking`. Everything lives under
//! `ROOT/images` (see docs/layout.md):
//! - `blobs/sha256/<hex>`: layers, configs and manifests, content-addressed and verified as
//!   they are written (streamed to `tmp/`, hashed, renamed; a mismatch leaves nothing);
//! - `records/<id>.json`: one [`ImageRecord`](hearth_types::ImageRecord) per image, id = config
//!   digest, written atomically; a name that moves to a new image leaves the old one nameless;
//! - `rootfs/<id>.ext4`: the base root filesystem, built once per image by [`unpack`] (which
//!   never writes outside its staging directory) and `mkfs.ext4 -d`.
//!
//! Entry points: [`ImageStore::open`], [`ImageStore::pull`], [`ImageStore::import`],
//! [`ImageStore::list`], [`ImageStore::get`], [`ImageStore::remove`], [`ImageStore::rootfs`].
//! With the `testutil` feature, [`testutil`] builds a busybox test image and runs a local
//! registry for other crates' tests.
#![deny(unsafe_code)]

pub mod auth;
pub mod import;
pub mod oci;
pub mod registry;
pub mod rootfs;
mod store;
// The only module with raw system calls (the crate denies unsafe code everywhere else).
#[allow(unsafe_code)]
mod sys;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;
pub mod unpack;

pub use import::ImportError;
pub use registry::{PullError, PullOptions};
pub use rootfs::RootfsError;
pub use store::{ImageStore, StoreError};
pub use unpack::{unpack, unpack_layer, Unpack, UnpackError};

/// Pull progress, reported per blob (digest as `sha256:<hex>`).
pub trait Progress: Send + Sync {
    /// A download of `total` bytes begins.
    fn start(&self, digest: &str, total: u64);
    /// `bytes` more arrived.
    fn advance(&self, digest: &str, bytes: u64);
    /// The blob is stored and verified.
    fn finish(&self, digest: &str);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, _: &str) {}
}
