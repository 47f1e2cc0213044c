//! The host hearth runs on: what it has for running VMs, and how to fix what it lacks
//! (`hearth host check`, and hearthd's start-up report). Reads the host only: nothing is changed.
#![forbid(unsafe_code)]

mod evaluate;
mod facts;

pub use evaluate::{evaluate, pool_check};
pub use facts::{Facts, ModState, PoolUsage};

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, with a limit worth knowing.
    Info,
    /// A feature needs this; the rest works.
    Warn,
    /// hearth cannot run VMs until this is fixed.
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    /// What to do, when the level is not ok.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

pub(crate) fn check(
    name: &str,
    level: Level,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check { name: name.into(), level, detail: detail.into(), fix: fix.into() }
}
