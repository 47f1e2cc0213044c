//! The ports: narrow traits the use-cases drive and adapters implement. Each is what the core
//! needs, not what an adapter can do; fakes of all of them are in hearth-testkit.

pub mod clock;
pub mod disks;
pub mod guests;
pub mod images;
pub mod network;
pub mod provision;
pub mod repo;
pub mod sandbox;
pub mod snapshots;
pub mod vmm;

pub use clock::{Clock, SystemClock};
pub use disks::{DiskState, Disks, Kernels};
pub use guests::Guests;
pub use images::{Images, Keys, RootFs};
pub use network::{NetPlan, Network};
pub use provision::{Fetch, Job, Jobs, Outcome};
pub use repo::VmRepository;
pub use sandbox::Sandbox;
pub use snapshots::Snapshots;
pub use vmm::{
    AgentTransport, Capabilities, Confinement, Endpoints, KernelFormat, LaunchSpec, Launched,
    NetLaunch, Provider, Vmm, VmmError, VmmHandle, Vmms, VolumeDisk,
};
