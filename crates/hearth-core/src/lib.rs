//! hearth's core: the use-cases, behind narrow ports that adapters implement.
//!
//! The reconciler is split as Flintlock splits it: [`plan`] is a pure function from what was
//! asked (the persisted [`VmRecord`](hearth_types::VmRecord)) and what is observed
//! ([`Observed`]) to the next idempotent [`Step`]s; the [`Reconciler`] executes steps through the
//! [`ports`], persists what each made, observes again and re-plans, up to [`MAX_ITERATIONS`]. A
//! crash anywhere re-runs the same plan from the persisted record, and delete plans remove
//! exactly what is observed to exist.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod create;
pub mod error;
pub mod forwards;
pub mod guest;
pub mod index;
pub mod locks;
pub mod plan;
pub mod ports;
pub mod provision;
pub mod reconcile;

pub use create::{cloud_init_bundle, guest_config_for, NewVm, NewVolume, SshKey};
pub use error::{Error, ErrorKind, Result};
pub use guest::{
    card_network, cloud_init_network_config, guest_config, guest_network, CloudInitCard,
    GuestConfigError,
};
pub use index::VmIndex;
pub use locks::KeyedLocks;
pub use plan::{plan, Observed, Step, MAX_ITERATIONS};
pub use provision::{Provisioner, RetryPolicy};
pub use reconcile::{
    FromSnapshot, Options, Ports, Reconciler, DEFAULT_STOP_TIMEOUT, READY_TIMEOUT,
};
