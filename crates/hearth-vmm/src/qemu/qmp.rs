//! A minimal QMP client: greeting, capabilities, commands, bounded replies.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmmError;

/// Longest QMP line accepted.
const MAX_LINE: usize = 1 << 20;

/// A hang-up is [`VmmError::Closed { api: "qmp" }`] (QEMU exits right after `quit`); other I/O errors stay.
fn io_error(e: std::io::Error) -> VmmError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            VmmError::Closed { api: "qmp" }
        }
        _ => qmp_error(e.to_string()),
    }
}

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| qmp_error(format!("connecting {}: {e}", path.display())))?;
        let (rd, wr) = s.into_split();
        let mut q = Self { rd: BufReader::new(rd), wr };
        q.read_message().await?;
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = AsyncReadExt::take(&mut self.rd, MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(io_error)?;
            if n == 0 {
                return Err(VmmError::Closed { api: "qmp" });
            }
            if !line.ends_with('\n') && n >= MAX_LINE {
                return Err(qmp_error("reply exceeds 1 MiB"));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| qmp_error(format!("bad reply: {e}")))?;
            // Asynchronous events interleave with replies; skip them.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, VmmError> {
        let bytes = Self::message(command, args);
        self.wr.write_all(&bytes).await.map_err(io_error)?;
        self.reply(command).await
    }

    /// Runs a command with `fd` handed to QEMU alongside it (`SCM_RIGHTS`), as `getfd` takes
    /// one.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, VmmError> {
        use std::os::fd::AsRawFd;
        let bytes = Self::message(command, args);
        let sock: &UnixStream = self.wr.as_ref();
        let mut sent = 0;
        while sent < bytes.len() {
            sock.writable().await.map_err(io_error)?;
            let fds = if sent == 0 { vec![fd.as_raw_fd()] } else { vec![] };
            let rest = &bytes[sent..];
            match sock.try_io(tokio::io::Interest::WRITABLE, || {
                crate::sys::send_with_fds(sock, rest, &fds)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        self.reply(command).await
    }

    fn message(command: &str, args: Option<Value>) -> Vec<u8> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    async fn reply(&mut self, command: &str) -> Result<Value, VmmError> {
        let reply = self.read_message().await?;
        if let Some(err) = reply.get("error") {
            return Err(qmp_error(format!(
                "{command}: {}",
                err["desc"].as_str().unwrap_or("error")
            )));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `query-status`'s `status` (`running`, `paused`, `prelaunch`, `shutdown`, ...).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| qmp_error(format!("query-status answered without a status: {v}")))
    }

    /// `system_powerdown`: presses the ACPI power button. The guest decides whether to obey.
    pub async fn powerdown(&mut self) -> Result<(), VmmError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once, without asking the guest. QEMU may close the socket before
    /// its reply arrives; that counts as done.
    pub async fn quit(&mut self) -> Result<(), VmmError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(VmmError::Closed { api: "qmp" }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A QMP failure.
pub(crate) fn qmp_error(message: impl Into<String>) -> VmmError {
    VmmError::Control { api: "qmp", message: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;

    /// A fake QMP server that answers each command line with the next canned reply (which may
    /// hold several lines, e.g. an event first).
    async fn server(
        replies: Vec<String>,
    ) -> (tempfile::TempDir, std::path::PathBuf, tokio::task::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            wr.write_all(format!("{GREETING}\r\n").as_bytes()).await.expect("greeting");
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                seen.push(line.trim().to_owned());
                if wr.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
            seen
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn negotiates_then_skips_events_between_replies() {
        let ok = "{\"return\": {}}\r\n".to_owned();
        let status = concat!(
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\r\n",
            "{\"return\": {\"status\": \"running\", \"singlestep\": false, \"running\": true}}\r\n"
        );
        let (_dir, path, task) = server(vec![ok.clone(), status.to_owned(), ok.clone(), ok]).await;
        let mut q = Qmp::connect(&path).await.expect("connect");
        assert_eq!(q.status().await.expect("status"), "running");
        q.powerdown().await.expect("powerdown");
        q.quit().await.expect("quit");
        let seen = task.await.expect("server");
        let cmds: Vec<String> = seen
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("json")["execute"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(cmds, ["qmp_capabilities", "query-status", "system_powerdown", "quit"]);
    }

    #[tokio::test]
    async fn an_error_reply_carries_its_description() {
        let err = "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n";
        let (_dir, path, _task) = server(vec!["{\"return\": {}}\n".into(), err.into()]).await;
        let mut q = Qmp::connect(&path).await.expect("connect");
        let e = q.execute("nope", None).await.expect_err("error reply");
        assert!(e.to_string().contains("has not been found"), "{e}");
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_without_buffering_it_all() {
        let huge = format!("{{\"return\": \"{}", "x".repeat(MAX_LINE + 10));
        let (_dir, path, _task) = server(vec!["{\"return\": {}}\n".into(), huge]).await;
        let mut q = Qmp::connect(&path).await.expect("connect");
        let e = q.status().await.expect_err("too long");
        assert!(e.to_string().contains("1 MiB"), "{e}");
    }

    #[tokio::test]
    async fn quit_accepts_a_closed_socket_as_done() {
        // The server answers capabilities, reads `quit` and hangs up without replying.
        let (_dir, path, _task) = server(vec!["{\"return\": {}}\n".into()]).await;
        let mut q = Qmp::connect(&path).await.expect("connect");
        q.quit().await.expect("quit");
    }
}
