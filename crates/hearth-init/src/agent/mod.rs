//! The guest end of the agent protocol: readiness, shutdown, exec, copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_types::agent::{
    credit_cost, CopyRequest, Decoder, ExecExit, ExecRequest, Frame, Hello, Kind, Ready,
    FRAME_COST, PROTOCOL_VERSION, WINDOW,
};
use hearth_types::guest::{AGENT_PORT_NAME, AGENT_VSOCK_PORT};

use crate::process::{self, Spec};
use crate::sys;

/// Largest output frame the guest sends.
const CHUNK: usize = 64 << 10;

mod channel;
mod copy;
mod exec;
mod reader;
mod shared;
#[cfg(test)]
mod tests;

#[cfg(test)]
use channel::*;
use copy::*;
use exec::*;
use reader::*;
use shared::*;

pub use channel::serve;
pub use shared::Shared;
