//! hearth's core: how a VM's desired state turns into steps.
//!
//! The reconciler is split as Flintlock splits it: [`plan`] is a pure function from what was
//! asked (the persisted [`VmRecord`]) and what is observed ([`Observed`]) to the next
//! idempotent [`Step`]s; the daemon executes steps with its adapters, persists what each made,
//! observes again and re-plans, up to [`MAX_ITERATIONS`]. A crash anywhere re-runs the same
//! plan from the persisted record, and delete plans remove exactly what is observed to exist.
#![forbid(unsafe_code)]

pub mod guest;
pub mod plan;

pub use guest::{cloud_init_network_config, guest_config, guest_network, GuestConfigError};
pub use plan::{plan, Observed, Step, MAX_ITERATIONS};
