//! Finding hearthd: connect to its socket, starting a daemon for the user when none answers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hearth_api::v1::hearth_client::HearthClient;
use tonic::transport::Channel;

pub type Client = HearthClient<Channel>;

/// The system daemon's root and socket.
pub const DEFAULT_ROOT: &str = "/var/lib/hearth";

fn socket_path(host: Option<&str>) -> anyhow::Result<PathBuf> {
    match host {
        None | Some("") => {
            let root = std::env::var_os("HEARTH_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
            Ok(root.join("hearthd.sock"))
        }
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None if h.starts_with('/') => Ok(PathBuf::from(h)),
            None => bail!("--host {h:?} is not supported: use unix:///path/to/hearthd.sock"),
        },
    }
}

/// Connects to the daemon, starting one when nothing answers on the socket.
pub async fn connect(host: Option<String>) -> anyhow::Result<Client> {
    let path = socket_path(host.as_deref())?;
    if let Ok(ch) = hearth_api::connect_unix(path.clone()).await {
        return Ok(HearthClient::new(ch).max_decoding_message_size(64 << 20));
    }
    start_daemon(&path)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match hearth_api::connect_unix(path.clone()).await {
            Ok(ch) => return Ok(HearthClient::new(ch).max_decoding_message_size(64 << 20)),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the hearthd started for you did not answer within 30 s; see its log");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Starts `hearthd` (found beside this binary, else on PATH) detached, logging to ROOT/hearthd.log.
fn start_daemon(socket: &Path) -> anyhow::Result<()> {
    let root = std::env::var_os("HEARTH_ROOT")
        .map(PathBuf::from)
        .or_else(|| socket.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {} to start hearthd (are you root?)", root.display()))?;
    let exe = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("hearthd"))).filter(|p| p.is_file());
    let exe = exe.unwrap_or_else(|| PathBuf::from("hearthd"));
    let log_path = root.join("hearthd.log");
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("--root").arg(&root).arg("--socket").arg(socket).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // A new session, so the daemon outlives this terminal.
        cmd.process_group(0);
    }
    let child = cmd.spawn().with_context(|| format!("no hearthd answers on {} and starting {} failed", socket.display(), exe.display()))?;
    eprintln!(
        "hearth: no daemon answered on {}; started hearthd (pid {}, root {}, log {})",
        socket.display(),
        child.id(),
        root.display(),
        log_path.display()
    );
    Ok(())
}
