//! hearth's domain model.
//!
//! Plain data and validation only: no I/O, no async, no adapters. Every other crate speaks in
//! these types; wire types (protobuf) and config files are converted into them in one place each.
#![forbid(unsafe_code)]

pub mod agent;
pub mod blob;
pub mod card;
pub mod digest;
pub mod guest;
pub mod id;
pub mod image;
pub mod kernel;
pub mod net;
pub mod reference;
pub mod restart;
pub mod size;
pub mod snapshot;
pub mod user;
pub mod vm;

pub use blob::Blob;
pub use card::{Card, NicSpec};
pub use digest::{Digest, DigestError};
pub use guest::{GuestCard, GuestConfig, GuestExit, GuestNetwork, GuestProcess, GuestVolume};
pub use id::{generate_name, validate_name, IdError, VmId};
pub use image::{ImageConfig, ImageRecord};
pub use kernel::{kernel_name, KernelNameError, KernelRecord};
pub use net::{NetError, NetworkMode, PortMapping, Protocol};
pub use reference::{ImageRef, ReferenceError};
pub use restart::{RestartPolicy, RestartPolicyError};
pub use size::{format_size, parse_size, size_flag, SizeError};
pub use vm::{
    parse_labels, Accel, BootTimings, Desired, LanAddress, LogOptions, Provider, VmRecord, VmSpec,
    VmSpecError, VmState, VmStatus, VolumeSource, VolumeSpec,
};
