//! `hearth exec`: run a command in a VM through hearth-init's agent (no sshd needed).

use std::io::{IsTerminal, Write};

use clap::Args;
use hearth_api::v1 as pb;
use tokio::io::AsyncReadExt;

use crate::client;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a terminal in the guest.
    #[arg(short = 't', long)]
    tty: bool,
    /// Set environment variables (KEY=VALUE).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User to run as (name, uid, user:group).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// The VM.
    vm: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

fn window_size() -> (u32, u32) {
    // Standard input may not be a terminal: then the conventional 24x80.
    match rustix::termios::tcgetwinsize(std::io::stdin()) {
        Ok(ws) if ws.ws_row > 0 && ws.ws_col > 0 => (ws.ws_row.into(), ws.ws_col.into()),
        _ => (24, 80),
    }
}

pub async fn exec(host: Option<String>, a: ExecArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let command = match a.command.first().map(String::as_str) {
        Some("--") => a.command[1..].to_vec(),
        _ => a.command.clone(),
    };
    if command.is_empty() {
        anyhow::bail!("no command given: hearth exec VM -- COMMAND [ARG...]");
    }
    let (rows, cols) = if a.tty { window_size() } else { (0, 0) };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExecInput>(16);
    tx.send(pb::ExecInput {
        start: Some(pb::ExecStart {
            r#ref: a.vm.clone(),
            args: command,
            env: a.env.clone(),
            cwd: a.workdir.clone().unwrap_or_default(),
            user: a.user.clone().unwrap_or_default(),
            tty: a.tty,
            stdin: a.interactive,
            rows,
            cols,
        }),
        ..Default::default()
    })
    .await?;
    let mut out = c.exec(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let _raw = (a.tty && a.interactive && std::io::stdin().is_terminal())
        .then(crate::cmd::console::RawMode::enter);
    if !a.interactive {
        tx.send(pb::ExecInput { stdin_eof: true, ..Default::default() }).await?;
    } else {
        forward_stdin(tx.clone());
    }
    if a.tty {
        forward_window_size(tx.clone());
    }
    forward_signals(tx.clone());
    let (mut so, mut se) = (std::io::stdout(), std::io::stderr());
    while let Some(m) = out.message().await? {
        if !m.stdout.is_empty() {
            so.write_all(&m.stdout)?;
            so.flush()?;
        }
        if !m.stderr.is_empty() {
            se.write_all(&m.stderr)?;
            se.flush()?;
        }
        if m.exited {
            return Ok(m.exit_code);
        }
    }
    anyhow::bail!("the exec stream ended without an exit code (the VM stopped?)")
}

/// Sends this terminal's input to the guest process, then its end.
fn forward_stdin(tx: Sender) {
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(pb::ExecInput { stdin_eof: true, ..Default::default() }).await;
                    return;
                }
                Ok(n) => {
                    if tx
                        .send(pb::ExecInput { stdin: buf[..n].to_vec(), ..Default::default() })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// Keeps the guest terminal's size in step with ours.
fn forward_window_size(tx: Sender) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
        while winch.recv().await.is_some() {
            let (rows, cols) = window_size();
            if tx.send(pb::ExecInput { rows, cols, ..Default::default() }).await.is_err() {
                return;
            }
        }
    });
}

/// Forwards Ctrl-C and friends to the guest process rather than dying here.
fn forward_signals(tx: Sender) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) =
            (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
        else {
            return;
        };
        loop {
            let sig = tokio::select! { _ = int.recv() => nix::libc::SIGINT, _ = term.recv() => nix::libc::SIGTERM };
            if tx.send(pb::ExecInput { signal: sig, ..Default::default() }).await.is_err() {
                return;
            }
        }
    });
}

type Sender = tokio::sync::mpsc::Sender<pb::ExecInput>;
