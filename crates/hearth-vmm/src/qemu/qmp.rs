//! A minimal QMP client: greeting, capabilities, commands, bounded replies.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmmError;

/// Longest QMP line accepted.
const MAX_LINE: usize = 1 << 20;

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let s = UnixStream::connect(path).await.map_err(|e| VmmError::Qmp(format!("connecting {}: {e}", path.display())))?;
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
            let n =
                AsyncReadExt::take(&mut self.rd, MAX_LINE as u64).read_line(&mut line).await.map_err(|e| VmmError::Qmp(e.to_string()))?;
            if n == 0 {
                return Err(VmmError::Qmp("connection closed".into()));
            }
            if !line.ends_with('\n') && n >= MAX_LINE {
                return Err(VmmError::Qmp("reply exceeds 1 MiB".into()));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| VmmError::Qmp(format!("bad reply: {e}")))?;
            // Asynchronous events interleave with replies; skip them.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.wr.write_all(&bytes).await.map_err(|e| VmmError::Qmp(e.to_string()))?;
        let reply = self.read_message().await?;
        if let Some(err) = reply.get("error") {
            return Err(VmmError::Qmp(format!("{command}: {}", err["desc"].as_str().unwrap_or("error"))));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `query-status`'s `status` (`running`, `paused`, ...).
    pub async fn status(&mut self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or_default().to_owned())
    }
}
