//! `hearth`: run OCI images as microVMs with docker's muscle memory.
#![forbid(unsafe_code)]

mod client;
mod cmd;
mod output;

use clap::{Parser, Subcommand};

/// Run container images as lightweight virtual machines.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, propagate_version = true)]
pub struct Cli {
    /// The daemon to talk to, as unix:///path/to/hearthd.sock.
    #[arg(long, global = true, env = "HEARTH_HOST")]
    host: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and start a VM from an image, like `docker run`.
    Run(cmd::run::RunArgs),
    /// Create a VM without starting it.
    Create(cmd::run::CreateArgs),
    /// Start stopped VMs.
    Start(cmd::lifecycle::StartArgs),
    /// Stop running VMs gracefully (agent, then ACPI, then kill after the timeout).
    Stop(cmd::lifecycle::StopArgs),
    /// Stop VMs (gracefully, as stop does) and start them again.
    Restart(cmd::lifecycle::RestartArgs),
    /// Kill running VMs.
    Kill(cmd::lifecycle::KillArgs),
    /// Freeze running VMs' guests (their CPUs stop; memory and devices are kept).
    Pause(cmd::lifecycle::PauseArgs),
    /// Let paused VMs' guests run again.
    Unpause(cmd::lifecycle::PauseArgs),
    /// Remove VMs.
    Rm(cmd::lifecycle::RmArgs),
    /// Wait for VMs to stop and print their exit codes.
    Wait(cmd::lifecycle::WaitArgs),
    /// List VMs.
    Ps(cmd::ps::PsArgs),
    /// Show VMs' full records.
    Inspect(cmd::ps::InspectArgs),
    /// Print a VM's console output.
    Logs(cmd::console::LogsArgs),
    /// Attach to a running VM's serial console (detach with Ctrl-P Ctrl-Q).
    Attach(cmd::console::AttachArgs),
    /// Run a command in a running VM.
    Exec(cmd::exec::ExecArgs),
    /// Copy files or directories between the host and a VM (VM:PATH).
    Cp(cmd::cp::CpArgs),
    /// SSH into a VM created with --ssh (its image must run an SSH server).
    Ssh(cmd::ssh::SshArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Manage kernels.
    #[command(subcommand)]
    Kernel(cmd::kernel::KernelCmd),
    /// Snapshot running VMs, and list and remove snapshots (`run --snapshot` restores one).
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCmd),
    /// Check or prepare this host (KVM, modules, tools, storage, the bridge network).
    #[command(subcommand)]
    Host(cmd::host::HostCmd),
    /// Show client and daemon versions.
    Version,
    /// Show what the daemon has (VMs, images, kernels) and how it stores VMs' disks (the thin
    /// pool's use, with a warning past 80%).
    Info {
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

fn main() {
    // Output piped into `head` or `grep -m1` ends quietly, as other tools' does, rather than
    // with a panic on the closed pipe.
    hearth_fs::default_sigpipe();
    let cli = Cli::parse();
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("hearth: cannot start the async runtime: {e}");
                std::process::exit(1);
            }
        };
    let code = rt.block_on(dispatch(cli));
    // Streams may still hold the runtime; exit without waiting for them.
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> i32 {
    let host = cli.host.clone();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(host, a).await,
        Command::Create(a) => cmd::run::create(host, a).await,
        Command::Start(a) => cmd::lifecycle::start(host, a).await,
        Command::Stop(a) => cmd::lifecycle::stop(host, a).await,
        Command::Restart(a) => cmd::lifecycle::restart(host, a).await,
        Command::Kill(a) => cmd::lifecycle::kill(host, a).await,
        Command::Pause(a) => cmd::lifecycle::pause(host, a, true).await,
        Command::Unpause(a) => cmd::lifecycle::pause(host, a, false).await,
        Command::Rm(a) => cmd::lifecycle::rm(host, a).await,
        Command::Wait(a) => cmd::lifecycle::wait(host, a).await,
        Command::Ps(a) => cmd::ps::ps(host, a).await,
        Command::Inspect(a) => cmd::ps::inspect(host, a).await,
        Command::Logs(a) => cmd::console::logs(host, a).await,
        Command::Attach(a) => cmd::console::attach(host, a).await,
        Command::Exec(a) => cmd::exec::exec(host, a).await,
        Command::Cp(a) => cmd::cp::cp(host, a).await,
        Command::Ssh(a) => cmd::ssh::ssh(host, a).await,
        Command::Image(c) => cmd::image::image(host, c).await,
        Command::Kernel(c) => cmd::kernel::kernel(host, c).await,
        Command::Snapshot(c) => cmd::snapshot::snapshot(host, c).await,
        Command::Host(c) => cmd::host::host(c).await,
        Command::Version => cmd::ps::version(host).await,
        Command::Info { output } => cmd::ps::info(host, &output).await,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "hearth", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            output::print_error(&e);
            // docker's convention: 125 when hearth itself failed, not the workload.
            125
        }
    }
}
