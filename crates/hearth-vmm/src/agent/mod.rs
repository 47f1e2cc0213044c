//! The host end of the agent protocol (docs/adr/0003-agent-protocol.md).
//!
//! One [`AgentClient`] per VM owns the connection (QEMU's virtio-serial chardev takes one
//! client at a time). A reader task decodes frames — bounded by the decoder — and routes them:
//! stream 0 to the control channel, others to the stream's own channel. A malformed frame ends
//! the connection with [`AgentError::Protocol`]; it never panics or grows memory without bound.
//!
//! Streams are flow-controlled (see hearth_types::agent): the reader never waits for a stream's
//! consumer, because the guest may only have [`WINDOW`] of unconsumed output per stream; a
//! guest that sends more is cut off. Credit goes back as the stream's consumer takes frames, and
//! stdin waits for the guest's credit. So one stalled exec client stalls only its own stream.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_types::agent::{
    credit_cost, queue_cost, Decoder, Frame, Hello, Kind, Ready, CONTROL_ALLOWANCE,
    PROTOCOL_VERSION, WINDOW,
};
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

mod flow;
mod reader;
#[cfg(test)]
mod tests;
mod vsock;

use flow::*;
pub use flow::{Stream, StreamInput};
use reader::*;
pub use vsock::hybrid_vsock_handshake;

/// A live connection to one guest's agent.
#[derive(Debug)]
pub struct AgentClient {
    tx: mpsc::Sender<Frame>,
    control: tokio::sync::Mutex<mpsc::Receiver<Frame>>,
    routes: Routes,
    next_stream: AtomicU32,
    next_ping: AtomicU64,
    /// Set once the reader stopped, with why.
    closed: Arc<Mutex<Option<String>>>,
    /// The last Ready the guest sent, so every caller sees it.
    ready: Mutex<Option<Ready>>,
    /// Stopped on drop, so a dropped client closes its connection (QEMU's chardev serves one
    /// client at a time, and the next one would wait behind a lingering reader).
    reader: tokio::task::AbortHandle,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // The writer ends by itself once `tx` is dropped; the reader must be told.
        self.reader.abort();
    }
}

impl AgentClient {
    /// Connects to a virtio-serial chardev socket.
    pub async fn connect(path: &Path) -> Result<Self, AgentError> {
        let s = tokio::net::UnixStream::connect(path).await.map_err(AgentError::Connect)?;
        Ok(Self::over(s))
    }

    /// Connects through Firecracker/Cloud Hypervisor hybrid vsock: the VMM's Unix socket,
    /// then `CONNECT <port>\n` and its `OK <host port>\n`.
    pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<Self, AgentError> {
        // In a jail, the socket is the VMM's to replace: reached only as itself.
        let s = crate::jail::connect(path).and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        });
        let mut s = s.map_err(AgentError::Connect)?;
        hybrid_vsock_handshake(&mut s, port).await?;
        Ok(Self::over(s))
    }

    /// Runs the protocol over any byte stream (tests use an in-memory duplex).
    pub fn over<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> Self {
        let (rd, mut wr) = tokio::io::split(s);
        let (tx, mut out_rx) = mpsc::channel::<Frame>(64);
        let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(16);
        let routes: Routes = Arc::default();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        // The reader tells the writer to stop when the connection is cut, so both halves are
        // dropped and the socket really closes (the guest side then sees EOF).
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // Queued frames first: a Shutdown sent just before the client is dropped
                    // still goes out.
                    biased;
                    f = out_rx.recv() => match f {
                        Some(f) => if wr.write_all(&f.encode()).await.is_err() { return },
                        None => return,
                    },
                    _ = &mut stop_rx => return,
                }
            }
        });
        let (r2, c2) = (routes.clone(), closed.clone());
        let reader = tokio::spawn(async move {
            let why = read_loop(rd, &ctl_tx, &r2).await;
            drop(stop_tx);
            // Logged once, here, because nobody awaits the reader: the connection is dropped and
            // the next user reconnects.
            if why != "closed by the guest" {
                tracing::warn!(error = %why, "guest agent connection cut off");
            }
            *c2.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            // Dropping the senders ends every open stream, and the control channel (only now, so
            // a waiter that sees it end also sees why).
            for (_, r) in r2.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                r.flow.end();
            }
            drop(ctl_tx);
        });
        let c = Self {
            tx,
            control: tokio::sync::Mutex::new(ctl_rx),
            routes,
            next_stream: AtomicU32::new(1),
            next_ping: AtomicU64::new(1),
            closed,
            ready: Mutex::new(None),
            reader: reader.abort_handle(),
        };
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
        let mut ask = tokio::time::interval(HELLO_INTERVAL);
        loop {
            tokio::select! {
                f = ctl.recv() => {
                    if let Some(r) = self.note(self.control_frame(f)?)? {
                        return Ok(r);
                    }
                }
                _ = ask.tick() => self.send(Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION })).await?,
                _ = tokio::time::sleep_until(deadline) => return Err(AgentError::Timeout),
            }
        }
    }

    /// Round trip on the control stream: sends Ping with a fresh token and waits, until
    /// `deadline`, for the Pong that echoes it. Returns the round-trip time.
    pub async fn ping(&self, deadline: Instant) -> Result<Duration, AgentError> {
        let token = self.next_ping.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let mut ctl = self.control.lock().await;
        let sent = Instant::now();
        self.send(Frame::new(Kind::Ping, 0, token.to_vec())).await?;
        loop {
            tokio::select! {
                f = ctl.recv() => {
                    let f = self.control_frame(f)?;
                    if f.kind == Kind::Pong && f.payload == token {
                        return Ok(sent.elapsed());
                    }
                    self.note(f)?;
                }
                _ = tokio::time::sleep_until(deadline) => return Err(AgentError::Timeout),
            }
        }
    }

    /// The guest's Ready, if it has been seen.
    pub fn ready(&self) -> Option<Ready> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A frame from the control channel, or why the channel ended.
    fn control_frame(&self, f: Option<Frame>) -> Result<Frame, AgentError> {
        f.ok_or_else(|| self.closed().map_or(AgentError::Closed, AgentError::Protocol))
    }

    /// Remembers what a control frame says; returns the Ready it carries, if it is one.
    fn note(&self, f: Frame) -> Result<Option<Ready>, AgentError> {
        match f.kind {
            Kind::Ready => {
                let r: Ready =
                    f.parse().map_err(|e| AgentError::Protocol(format!("ready: {e}")))?;
                *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                Ok(Some(r))
            }
            Kind::Hello => {
                let h: Hello =
                    f.parse().map_err(|e| AgentError::Protocol(format!("hello: {e}")))?;
                if h.version != PROTOCOL_VERSION {
                    return Err(AgentError::Protocol(format!(
                        "the guest speaks agent protocol {}, hearth speaks {PROTOCOL_VERSION}: rebuild the kernel's initramfs with this hearth-init",
                        h.version
                    )));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Asks hearth-init to stop the workload, sync, unmount and power off.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.send(Frame::new(Kind::Shutdown, 0, Vec::new())).await
    }

    /// Tells hearth-init of a guest restored from a snapshot who it is now; it takes the
    /// identity before any frame sent after this one.
    pub async fn reidentify(&self, id: &hearth_types::agent::Identity) -> Result<(), AgentError> {
        self.send(Frame::json(Kind::Reidentify, 0, id)).await
    }

    /// Opens a new stream; frames the guest sends on it arrive through [`Stream::recv`].
    pub fn open_stream(&self) -> Stream {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        // On a dead connection the stream ends at once (the reader sets `closed` before it
        // clears the routes, and this check holds the routes lock).
        if self.closed().is_none() {
            routes.insert(id, Route { tx, flow: flow.clone() });
        }
        Stream { id, rx, flow, out: self.tx.clone(), owed: 0 }
    }

    /// Forgets a finished stream; stdin still waiting for its credit fails.
    pub fn close_stream(&self, id: u32) {
        if let Some(r) = self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
            r.flow.end();
        }
    }
}
