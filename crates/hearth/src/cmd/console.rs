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

/// The detach sequence, Ctrl-P Ctrl-Q, as docker reads it: a Ctrl-P is held back until the next
/// byte says whether it starts the sequence; the sequence never reaches the guest, and
/// everything typed before it does.
#[derive(Debug, Default)]
struct DetachKeys {
    held_p: bool,
}

impl DetachKeys {
    /// The bytes to send on, and whether the user detached (then nothing after the sequence).
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.held_p {
                self.held_p = false;
                if b == CTRL_Q {
                    return (out, true);
                }
                out.push(CTRL_P);
            }
            if b == CTRL_P {
                self.held_p = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

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
        let mut keys = DetachKeys::default();
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // End of input is not a detach: keep following the output.
                    std::future::pending::<()>().await;
                    return;
                }
                Ok(n) => n,
            };
            let (data, detach) = keys.feed(&buf[..n]);
            if !data.is_empty() && tx.send(pb::Chunk { data, r#ref: String::new() }).await.is_err()
            {
                return;
            }
            if detach {
                let _ = detach_tx.send(());
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
                // The input is closed: the daemon sends on what was typed before the keys, then
                // ends the output (bounded, for a daemon that does not).
                let rest = async {
                    while let Ok(Some(chunk)) = s.message().await {
                        out.write_all(&chunk.data)?;
                    }
                    out.flush()
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rest).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_p_ctrl_q_detaches_and_everything_else_reaches_the_guest() {
        let mut k = DetachKeys::default();
        assert_eq!(k.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        // Typed before the sequence in the same read: sent; the sequence itself: not.
        assert_eq!(k.feed(&[b'a', CTRL_P, CTRL_Q, b'z']), (b"a".to_vec(), true));
        // A Ctrl-P at the end of one read waits for the next.
        let mut k = DetachKeys::default();
        assert_eq!(k.feed(&[b'x', CTRL_P]), (b"x".to_vec(), false));
        assert_eq!(k.feed(&[CTRL_Q]), (Vec::new(), true));
        // A Ctrl-P that starts no sequence goes on, late but in order (twice over, too).
        let mut k = DetachKeys::default();
        assert_eq!(k.feed(&[CTRL_P]), (Vec::new(), false));
        assert_eq!(
            k.feed(&[b'k', CTRL_P, CTRL_P, b'j']),
            (vec![CTRL_P, b'k', CTRL_P, CTRL_P, b'j'], false)
        );
    }
}
