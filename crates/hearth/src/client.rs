//! Finding hearthd: connect to its socket, starting a daemon for the user when none answers.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hearth_api::v1::hearth_client::HearthClient;
use tonic::transport::Channel;

pub type Client = HearthClient<Channel>;

/// The system daemon's root and socket.
pub const DEFAULT_ROOT: &str = "/var/lib/hearth";

/// Where the daemon is: an explicit `--host`/`HEARTH_HOST` socket, or the default socket of the
/// default root (`HEARTH_ROOT` or /var/lib/hearth), which is the only one a daemon is started for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Explicit(PathBuf),
    DefaultRoot(PathBuf),
}

fn target(host: Option<&str>) -> anyhow::Result<Target> {
    match host {
        None | Some("") => {
            let root = std::env::var_os("HEARTH_ROOT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
            Ok(Target::DefaultRoot(root))
        }
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) => Ok(Target::Explicit(PathBuf::from(p))),
            None if h.starts_with('/') => Ok(Target::Explicit(PathBuf::from(h))),
            None => bail!("--host {h:?} is not supported: use unix:///path/to/hearthd.sock"),
        },
    }
}

/// Connects to the daemon. When nothing answers on the default root's socket, starts a daemon
/// for that root; an explicit `--host` is never given a daemon of the CLI's choosing (its root
/// is unknown, and guessing one would put a second daemon beside a starting one).
pub async fn connect(host: Option<String>) -> anyhow::Result<Client> {
    let (path, root) = match target(host.as_deref())? {
        Target::Explicit(p) => (p, None),
        Target::DefaultRoot(r) => (r.join("hearthd.sock"), Some(r)),
    };
    if let Ok(ch) = hearth_api::connect_unix(path.clone()).await {
        return Ok(HearthClient::new(ch).max_decoding_message_size(64 << 20));
    }
    if let Err(e) = std::os::unix::net::UnixStream::connect(&path) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            bail!("permission denied on {}: use hearth as root, or as a member of the group hearthd serves with --group", path.display());
        }
    }
    let Some(root) = root else {
        bail!(
            "no hearthd answers on {}: start one with `hearthd --socket {}` (and its --root), or drop --host/HEARTH_HOST to use the default daemon",
            path.display(),
            path.display()
        );
    };
    start_daemon(&root)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match hearth_api::connect_unix(path.clone()).await {
            Ok(ch) => return Ok(HearthClient::new(ch).max_decoding_message_size(64 << 20)),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(
                    "the hearthd started for you did not answer within 30 s; see its log",
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Starts `hearthd --root ROOT` (found beside this binary, else on PATH) detached, logging to
/// ROOT/hearthd.log. Two CLIs racing here start two daemons, and the root's lock lets one serve.
fn start_daemon(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| {
        format!("cannot create {} to start hearthd (are you root?)", root.display())
    })?;
    let exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("hearthd")))
        .filter(|p| p.is_file());
    let exe = exe.unwrap_or_else(|| PathBuf::from("hearthd"));
    let log_path = root.join("hearthd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("--root").arg(root).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // A new session, so the daemon outlives this terminal.
        cmd.process_group(0);
    }
    let child = cmd.spawn().with_context(|| {
        format!("no hearthd answers in {} and starting {} failed", root.display(), exe.display())
    })?;
    eprintln!(
        "hearth: no daemon answered on {}; started hearthd (pid {}, root {}, log {})",
        root.join("hearthd.sock").display(),
        child.id(),
        root.display(),
        log_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_default_root_gets_a_daemon_started() {
        assert_eq!(
            target(Some("unix:///tmp/x.sock")).expect("unix"),
            Target::Explicit("/tmp/x.sock".into())
        );
        assert_eq!(
            target(Some("/run/h.sock")).expect("path"),
            Target::Explicit("/run/h.sock".into())
        );
        assert!(matches!(target(None).expect("default"), Target::DefaultRoot(_)));
        assert!(target(Some("tcp://h:1")).is_err());
    }

    #[tokio::test]
    async fn an_explicit_socket_nobody_answers_on_is_an_error_not_a_new_daemon() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("hearthd.sock");
        let e =
            connect(Some(format!("unix://{}", sock.display()))).await.expect_err("nobody answers");
        assert!(e.to_string().contains("no hearthd answers on"), "{e}");
        assert!(e.to_string().contains("start one with"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "nothing was started or created"
        );
    }
}
