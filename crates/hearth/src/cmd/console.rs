//! `logs` and `attach`: the VM's serial console.

use std::io::Write;
use std::os::fd::AsFd;

use clap::Args;
use hearth_api::v1 as pb;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncReadExt;

use crate::client::{self, Client};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the VM stops.
    #[arg(short = 'f', long)]
    follow: bool,
    vm: String,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    vm: String,
}

/// Copies the console log to stdout; `from_boot` starts at the current boot.
pub async fn follow_logs(mut c: Client, vm: String, from_boot: bool) -> anyhow::Result<()> {
    let mut s = c.logs(pb::LogsRequest { r#ref: vm, follow: true, from_boot }).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(chunk) = s.message().await? {
        out.write_all(&chunk.data)?;
        out.flush()?;
    }
    Ok(())
}

pub async fn logs(host: Option<String>, a: LogsArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    if a.follow {
        follow_logs(c, a.vm, false).await?;
        return Ok(0);
    }
    let mut s = c
        .logs(pb::LogsRequest { r#ref: a.vm, follow: false, from_boot: false })
        .await?
        .into_inner();
    let mut out = std::io::stdout();
    while let Some(chunk) = s.message().await? {
        out.write_all(&chunk.data)?;
    }
    out.flush()?;
    Ok(0)
}

/// Puts the terminal in raw mode while alive.
pub struct RawMode(Option<Termios>);

impl RawMode {
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else { return Self(None) };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

const CTRL_P: u8 = 0x10;
const CTRL_Q: u8 = 0x11;

/// Wires stdin and stdout to the console until the VM stops or the user detaches. Input is
/// held back until `gate` fires (a booting guest would lose what reaches its UART too early).
pub async fn attach_stream(
    c: &mut Client,
    vm: &str,
    raw: bool,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::Chunk>(16);
    tx.send(pb::Chunk { data: Vec::new(), r#ref: vm.to_owned() }).await?;
    let mut s = c.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let _raw = (raw && nix::unistd::isatty(0).unwrap_or(false)).then(RawMode::enter);
    let (detach_tx, mut detach_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Some(g) = gate {
            let _ = g.await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        let mut saw_p = false;
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // End of input is not a detach: keep following the output.
                    std::future::pending::<()>().await;
                    return;
                }
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if saw_p && b == CTRL_Q {
                    let _ = detach_tx.send(());
                    return;
                }
                saw_p = b == CTRL_P;
            }
            if tx.send(pb::Chunk { data: buf[..n].to_vec(), r#ref: String::new() }).await.is_err() {
                return;
            }
        }
    });
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            m = s.message() => match m? {
                Some(chunk) => { out.write_all(&chunk.data)?; out.flush()?; }
                None => return Ok(()),
            },
            _ = &mut detach_rx => {
                eprintln!("\r\nhearth: detached from {vm}\r");
                return Ok(());
            }
        }
    }
}

pub async fn attach(host: Option<String>, a: AttachArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    attach_stream(&mut c, &a.vm, true, None).await?;
    Ok(0)
}
