//! `hearthd`: the hearth daemon.
#![forbid(unsafe_code)]

mod console;
mod create;
mod daemon;
mod exec;
mod net;
mod reconcile;
mod service;
mod ssh;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// hearth's daemon: owns the state under --root and serves the API on --socket.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory holding images, kernels and VMs.
    #[arg(long, env = "HEARTH_ROOT", default_value = "/var/lib/hearth")]
    root: PathBuf,
    /// Unix socket to serve the API on (default: ROOT/hearthd.sock).
    #[arg(long, env = "HEARTH_SOCKET")]
    socket: Option<PathBuf>,
    /// The static hearth-init binary to put in initramfs images.
    #[arg(long, env = "HEARTH_INIT")]
    init_binary: Option<PathBuf>,
    /// Log filter, as RUST_LOG.
    #[arg(long, env = "HEARTH_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(&args.log)).with_writer(std::io::stderr).init();
    if let Err(e) = run(args).await {
        eprintln!("hearthd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.socket.clone().unwrap_or_else(|| args.root.join("hearthd.sock"));
    let init = daemon::find_init_binary(args.init_binary.as_deref())?;
    let d = Arc::new(daemon::Daemon::open(&args.root, init).with_context(|| format!("opening {}", args.root.display()))?);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file nobody answers on is stale; one that answers means another daemon runs.
    if socket.exists() {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            anyhow::bail!("another hearthd already serves {}; stop it or pick another --socket", socket.display());
        }
        std::fs::remove_file(&socket).with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(root = %args.root.display(), socket = %socket.display(), "hearthd serving");
    reconcile::recover(&d).await;

    let svc = hearth_api::v1::hearth_server::HearthServer::new(service::Api::new(d.clone()));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("hearthd stopped; VMs keep running and are re-adopted on the next start");
    Ok(())
}
