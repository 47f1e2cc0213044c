//! The host end of the agent protocol (docs/adr/0003-agent-protocol.md).
//!
//! One [`AgentClient`] per VM owns the connection (QEMU's virtio-serial chardev takes one
//! client at a time). A reader task decodes frames — bounded by the decoder — and routes them:
//! stream 0 to the control channel, others to the stream's own channel. A malformed frame ends
//! the connection with [`AgentError::Protocol`]; it never panics or grows memory without bound.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use hearth_types::agent::{Decoder, Frame, Hello, Kind, Ready, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Why the agent could not be reached or misbehaved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent: {0}")]
    Connect(std::io::Error),
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(String),
    #[error("the guest agent connection closed")]
    Closed,
    #[error("the guest did not answer in time")]
    Timeout,
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Frame>>>>;

/// A live connection to one guest's agent.
#[derive(Debug)]
pub struct AgentClient {
    tx: mpsc::Sender<Frame>,
    control: tokio::sync::Mutex<mpsc::Receiver<Frame>>,
    routes: Routes,
    next_stream: AtomicU32,
    /// Set once the reader stopped, with why.
    closed: Arc<Mutex<Option<String>>>,
    /// The last Ready the guest sent, so every caller sees it.
    ready: Mutex<Option<Ready>>,
}

/// Frames of one stream, and the id to send on.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub rx: mpsc::Receiver<Frame>,
}

impl AgentClient {
    /// Connects to a virtio-serial chardev socket.
    pub async fn connect(path: &Path) -> Result<Self, AgentError> {
        let s = tokio::net::UnixStream::connect(path).await.map_err(AgentError::Connect)?;
        Ok(Self::over(s))
    }

    /// Connects through Firecracker/Cloud Hypervisor hybrid vsock: `CONNECT <port>\n`, `OK ...\n`.
    pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<Self, AgentError> {
        let mut s = tokio::net::UnixStream::connect(path).await.map_err(AgentError::Connect)?;
        s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(AgentError::Connect)?;
        let mut line = Vec::new();
        loop {
            let mut b = [0u8; 1];
            let n = s.read(&mut b).await.map_err(AgentError::Connect)?;
            if n == 0 || line.len() > 64 {
                return Err(AgentError::Protocol("hybrid vsock handshake failed".into()));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        if !line.starts_with(b"OK") {
            return Err(AgentError::Protocol(format!("hybrid vsock refused: {}", String::from_utf8_lossy(&line))));
        }
        Ok(Self::over(s))
    }

    /// Runs the protocol over any byte stream (tests use an in-memory duplex).
    pub fn over<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> Self {
        let (rd, mut wr) = tokio::io::split(s);
        let (tx, mut out_rx) = mpsc::channel::<Frame>(64);
        let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(16);
        let routes: Routes = Arc::default();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if wr.write_all(&f.encode()).await.is_err() {
                    return;
                }
            }
        });
        let (r2, c2) = (routes.clone(), closed.clone());
        tokio::spawn(async move {
            let why = read_loop(rd, ctl_tx, &r2).await;
            // Logged once, here, because nobody awaits the reader: the connection is dropped and
            // the next user reconnects.
            if why != "closed by the guest" {
                tracing::warn!(error = %why, "guest agent connection cut off");
            }
            *c2.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            // Dropping the senders ends every open stream.
            r2.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        let c =
            Self { tx, control: tokio::sync::Mutex::new(ctl_rx), routes, next_stream: AtomicU32::new(1), closed, ready: Mutex::new(None) };
        let _ = c.tx.try_send(Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
        c
    }

    /// Why the connection ended, once it has.
    pub fn closed(&self) -> Option<String> {
        self.closed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends one frame.
    pub async fn send(&self, f: Frame) -> Result<(), AgentError> {
        self.tx.send(f).await.map_err(|_| AgentError::Closed)
    }

    /// Waits for the guest's Ready (asking again with Hello, since the guest may have sent its
    /// first Ready before anyone listened).
    pub async fn wait_ready(&self, deadline: Instant) -> Result<Ready, AgentError> {
        if let Some(r) = self.ready.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(r);
        }
        let mut ctl = self.control.lock().await;
        let mut ask = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tokio::select! {
                f = ctl.recv() => {
                    let f = f.ok_or_else(|| self.closed().map_or(AgentError::Closed, AgentError::Protocol))?;
                    if f.kind == Kind::Ready {
                        let r: Ready = f.parse().map_err(|e| AgentError::Protocol(e.to_string()))?;
                        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                        return Ok(r);
                    }
                }
                _ = ask.tick() => self.send(Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION })).await?,
                _ = tokio::time::sleep_until(deadline) => return Err(AgentError::Timeout),
            }
        }
    }

    /// Asks hearth-init to stop the workload, sync, unmount and power off.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.send(Frame::new(Kind::Shutdown, 0, Vec::new())).await
    }

    /// Opens a new stream; frames the guest sends on it arrive on `rx`.
    pub fn open_stream(&self) -> Stream {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = mpsc::channel(64);
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        // On a dead connection the stream ends at once (the reader sets `closed` before it
        // clears the routes, and this check holds the routes lock).
        if self.closed().is_none() {
            routes.insert(id, tx);
        }
        Stream { id, rx }
    }

    /// Forgets a finished stream.
    pub fn close_stream(&self, id: u32) {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

async fn read_loop<R: AsyncRead + Unpin>(rd: R, ctl: mpsc::Sender<Frame>, routes: &Routes) -> String {
    let mut rd = BufReader::new(rd);
    let mut dec = Decoder::new();
    loop {
        let buf = match rd.fill_buf().await {
            Ok([]) => return "closed by the guest".into(),
            Ok(b) => b,
            Err(e) => return e.to_string(),
        };
        dec.feed(buf);
        let n = buf.len();
        rd.consume(n);
        loop {
            match dec.next_frame() {
                Ok(None) => break,
                Ok(Some(f)) if f.stream == 0 => {
                    // Control frames are small and rare; a flooding guest loses the excess.
                    let _ = ctl.try_send(f);
                }
                Ok(Some(f)) => {
                    let route = routes.lock().unwrap_or_else(|e| e.into_inner()).get(&f.stream).cloned();
                    if let Some(tx) = route {
                        // Backpressure per stream; a stream whose reader left is dropped.
                        if tx.send(f).await.is_err() {
                            continue;
                        }
                    }
                }
                Err(e) => return e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn ready_after_hello_and_streams_are_routed() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        let ready = Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 1, ready_ms: 2 }).encode();
        guest.write_all(&ready).await.expect("write");
        guest.write_all(&Frame::new(Kind::Stdout, s.id, b"hi".to_vec()).encode()).await.expect("write");
        let r = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect("ready");
        assert_eq!(r.ready_ms, 2);
        let mut rx = s.rx;
        let f = rx.recv().await.expect("frame");
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Stdout, b"hi".as_slice()));
        // The client greeted the guest first.
        let mut buf = vec![0u8; 9];
        guest.read_exact(&mut buf).await.expect("hello header");
        assert_eq!(buf[4], Kind::Hello as u8);
    }

    #[tokio::test]
    async fn an_oversized_frame_cuts_the_connection() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        guest.write_all(&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1]).await.expect("write");
        let mut rx = s.rx;
        assert!(rx.recv().await.is_none(), "stream ended");
        let err = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect_err("cut off");
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[tokio::test]
    async fn garbage_cuts_the_connection() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        guest.write_all(b"\x00\x00\x00\x01\xeegarbage-garbage").await.expect("write");
        let err = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect_err("cut off");
        assert!(matches!(err, AgentError::Protocol(_)), "{err}");
    }
}

#[cfg(test)]
mod closed_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn streams_opened_after_a_cut_off_end_at_once() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        guest.write_all(&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1]).await.expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut s = c.open_stream();
        assert!(tokio::time::timeout(Duration::from_secs(5), s.rx.recv()).await.expect("not hanging").is_none());
    }
}
