//! One module per subcommand family.

pub mod console;
pub mod cp;
pub mod exec;
pub mod host;
pub mod image;
pub mod kernel;
pub mod lifecycle;
pub mod provision;
pub mod ps;
pub mod run;
pub mod snapshot;
pub mod ssh;
