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

use hearth_types::agent::{credit_cost, queue_cost, Decoder, Frame, Hello, Kind, Ready, CONTROL_ALLOWANCE, PROTOCOL_VERSION, WINDOW};
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

/// Where the reader puts a stream's frames, and its flow-control state.
#[derive(Debug)]
struct Route {
    tx: mpsc::UnboundedSender<Frame>,
    flow: Arc<Flow>,
}

/// One stream's credit, both directions.
#[derive(Debug)]
struct Flow {
    /// What the guest sent on the stream that the consumer has not taken yet, every kind of
    /// frame counted ([`queue_cost`]); bounded by the window plus [`CONTROL_ALLOWANCE`].
    unconsumed: Mutex<u64>,
    /// Credit the guest gave for stdin, and a wake-up for a sender waiting on it.
    stdin_credit: Mutex<u64>,
    more_credit: tokio::sync::Notify,
    /// The stream was closed or the connection ended: no more credit will come.
    ended: std::sync::atomic::AtomicBool,
}

impl Default for Flow {
    fn default() -> Self {
        Self { unconsumed: Mutex::new(0), stdin_credit: Mutex::new(WINDOW), more_credit: tokio::sync::Notify::new(), ended: false.into() }
    }
}

impl Flow {
    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.more_credit.notify_waiters();
    }
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

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

/// Frames of one stream, and the id to send on. Take frames with [`Stream::recv`], which hands
/// the guest credit back; send stdin with [`StreamInput::send`], which waits for the guest's.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    rx: mpsc::UnboundedReceiver<Frame>,
    flow: Arc<Flow>,
    out: mpsc::Sender<Frame>,
    /// Credit taken but not yet handed back (sent in batches of a quarter window).
    owed: u64,
}

/// The sending half of a stream's stdin, usable beside [`Stream::recv`].
#[derive(Debug, Clone)]
pub struct StreamInput {
    pub id: u32,
    flow: Arc<Flow>,
    out: mpsc::Sender<Frame>,
}

impl Stream {
    /// The next frame the guest sent on this stream; `None` once the connection or the stream
    /// is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        {
            let mut u = self.flow.unconsumed.lock().unwrap_or_else(|e| e.into_inner());
            *u = u.saturating_sub(queue_cost(f.payload.len()));
        }
        if matches!(f.kind, Kind::Stdout | Kind::Stderr) {
            // Only data spends the guest's credit; only data is credited back.
            let cost = credit_cost(f.payload.len());
            self.owed += cost;
            if self.owed >= WINDOW / 4 {
                let _ = self.out.send(Frame::credit(self.id, self.owed)).await;
                self.owed = 0;
            }
        }
        Some(f)
    }

    /// A handle that sends stdin on this stream.
    pub fn input(&self) -> StreamInput {
        StreamInput { id: self.id, flow: self.flow.clone(), out: self.out.clone() }
    }
}

impl StreamInput {
    /// Sends `f` (stdin data, or any control frame for the stream), first waiting until the
    /// guest has credit for it.
    pub async fn send(&self, f: Frame) -> Result<(), AgentError> {
        let cost = if f.kind == Kind::Stdin { credit_cost(f.payload.len()) } else { 0 };
        loop {
            let notified = self.flow.more_credit.notified();
            {
                let mut c = self.flow.stdin_credit.lock().unwrap_or_else(|e| e.into_inner());
                if *c >= cost {
                    *c -= cost;
                    break;
                }
            }
            if self.out.is_closed() || self.flow.ended.load(Ordering::SeqCst) {
                return Err(AgentError::Closed);
            }
            // Credit, or a periodic look at whether the connection died.
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
        self.out.send(f).await.map_err(|_| AgentError::Closed)
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
        let mut s = tokio::net::UnixStream::connect(path).await.map_err(AgentError::Connect)?;
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
                let r: Ready = f.parse().map_err(|e| AgentError::Protocol(format!("ready: {e}")))?;
                *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                Ok(Some(r))
            }
            Kind::Hello => {
                let h: Hello = f.parse().map_err(|e| AgentError::Protocol(format!("hello: {e}")))?;
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

/// Longest handshake answer accepted (`OK 1073741824\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

/// The hybrid vsock handshake on an open stream. Reads byte by byte so nothing after the
/// answer's newline (the agent's first frame) is consumed.
pub async fn hybrid_vsock_handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, port: u32) -> Result<(), AgentError> {
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(AgentError::Connect)?;
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.map_err(AgentError::Connect)? == 0 {
            return Err(AgentError::Protocol(format!(
                "the VMM closed the vsock socket instead of answering CONNECT {port}: is the guest agent listening on that port?"
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_HANDSHAKE_LINE {
            return Err(AgentError::Protocol(format!("the answer to CONNECT {port} is longer than {MAX_HANDSHAKE_LINE} bytes")));
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") && line != b"OK" {
        return Err(AgentError::Protocol(format!("the VMM refused CONNECT {port}: {:?}", String::from_utf8_lossy(&line))));
    }
    Ok(())
}

/// How often `wait_ready` repeats its Hello while the guest is still booting.
const HELLO_INTERVAL: Duration = Duration::from_millis(500);

async fn read_loop<R: AsyncRead + Unpin>(rd: R, ctl: &mpsc::Sender<Frame>, routes: &Routes) -> String {
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
                    let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                    // Frames for a stream nobody holds any more are dropped.
                    let Some(route) = routes.get(&f.stream) else { continue };
                    if f.kind == Kind::Credit {
                        let mut c = route.flow.stdin_credit.lock().unwrap_or_else(|e| e.into_inner());
                        *c = c.saturating_add(f.credit_amount()).min(WINDOW);
                        route.flow.more_credit.notify_waiters();
                        continue;
                    }
                    // Every frame a consumer has yet to take counts: data within the window the
                    // guest was given, anything else within a small allowance beyond it.
                    let mut u = route.flow.unconsumed.lock().unwrap_or_else(|e| e.into_inner());
                    *u += queue_cost(f.payload.len());
                    if *u > WINDOW + CONTROL_ALLOWANCE {
                        return format!("the guest sent more than its {WINDOW}-byte window on stream {}", f.stream);
                    }
                    drop(u);
                    // Never waits: what a stream may hold is bounded above.
                    let _ = route.tx.send(f);
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
        let mut s = s;
        let f = s.recv().await.expect("frame");
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
        let mut s = s;
        assert!(s.recv().await.is_none(), "stream ended");
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
        // The connection is really dropped: the guest end reads the client's Hello, then EOF.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), guest.read_to_end(&mut rest)).await.expect("eof").expect("read");
        let mut dec = Decoder::new();
        dec.feed(&rest);
        while let Some(f) = dec.next_frame().expect("host frames are valid") {
            assert_eq!(f.kind, Kind::Hello);
        }
        assert!(matches!(c.send(Frame::new(Kind::Ping, 0, vec![])).await, Err(AgentError::Closed)));
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A well-behaved fake hearth-init: answers Hello with Hello and Ready, Ping with Pong
    /// (after an unrelated Pong, which the client must not take for its answer).
    fn fake_guest(mut guest: tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<Kind>> {
        tokio::spawn(async move {
            let mut dec = Decoder::new();
            let mut seen = Vec::new();
            let mut buf = [0u8; 512];
            loop {
                let n = guest.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return seen;
                }
                dec.feed(&buf[..n]);
                while let Ok(Some(f)) = dec.next_frame() {
                    seen.push(f.kind);
                    let answer: Vec<Frame> = match f.kind {
                        Kind::Hello => vec![
                            Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }),
                            Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 5, ready_ms: 9 }),
                        ],
                        Kind::Ping => vec![Frame::new(Kind::Pong, 0, b"stale".to_vec()), Frame::new(Kind::Pong, 0, f.payload)],
                        _ => vec![],
                    };
                    for a in answer {
                        // Byte by byte: frames must be reassembled from partial reads.
                        for b in a.encode() {
                            if guest.write_all(&[b]).await.is_err() {
                                return seen;
                            }
                        }
                    }
                }
            }
        })
    }

    #[tokio::test]
    async fn hello_ready_ping_and_shutdown_against_a_fake_guest() {
        let (host, guest) = tokio::io::duplex(64);
        let g = fake_guest(guest);
        let c = AgentClient::over(host);
        assert_eq!(c.ready(), None);
        let r = c.wait_ready(soon()).await.expect("ready");
        assert_eq!((r.init_started_ms, r.ready_ms), (5, 9));
        assert_eq!(c.ready(), Some(r.clone()));
        // Ready is remembered: a second waiter returns at once.
        assert_eq!(c.wait_ready(Instant::now()).await.expect("cached"), r);
        c.ping(soon()).await.expect("pong");
        c.ping(soon()).await.expect("second pong");
        c.shutdown().await.expect("shutdown");
        drop(c);
        let seen = g.await.expect("guest");
        assert_eq!(seen.first(), Some(&Kind::Hello));
        assert_eq!(seen.iter().filter(|k| **k == Kind::Ping).count(), 2);
        assert_eq!(seen.last(), Some(&Kind::Shutdown));
    }

    #[tokio::test]
    async fn a_silent_guest_times_out() {
        let (host, _guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!(c.ping(soon).await, Err(AgentError::Timeout)));
        assert!(matches!(c.wait_ready(Instant::now() + Duration::from_millis(100)).await, Err(AgentError::Timeout)));
    }

    #[tokio::test]
    async fn a_guest_speaking_another_version_is_refused() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        guest.write_all(&Frame::json(Kind::Hello, 0, &Hello { version: 99 }).encode()).await.expect("write");
        let e = c.wait_ready(soon()).await.expect_err("version");
        assert!(e.to_string().contains("protocol 99"), "{e}");
    }

    #[tokio::test]
    async fn frames_for_unknown_streams_are_dropped_and_others_still_flow() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        let mut s = c.open_stream();
        guest.write_all(&Frame::new(Kind::Stdout, 4242, b"nobody".to_vec()).encode()).await.expect("write");
        guest.write_all(&Frame::new(Kind::Stderr, s.id, b"mine".to_vec()).encode()).await.expect("write");
        let f = s.recv().await.expect("frame");
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Stderr, b"mine".as_slice()));
        c.close_stream(s.id);
        assert!(s.recv().await.is_none(), "closed stream ends");
        assert!(c.closed().is_none());
    }

    #[tokio::test]
    async fn hybrid_vsock_handshake_keeps_the_bytes_after_ok() {
        let (mut host, mut guest) = tokio::io::duplex(1 << 16);
        let vmm = tokio::spawn(async move {
            let mut req = [0u8; 12];
            guest.read_exact(&mut req).await.expect("connect line");
            assert_eq!(&req, b"CONNECT 789\n");
            let mut answer = b"OK 1073741824\n".to_vec();
            answer.extend(Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 1, ready_ms: 2 }).encode());
            guest.write_all(&answer).await.expect("answer");
            guest
        });
        hybrid_vsock_handshake(&mut host, 789).await.expect("handshake");
        let _guest = vmm.await.expect("vmm");
        let c = AgentClient::over(host);
        assert_eq!(c.wait_ready(soon()).await.expect("ready").ready_ms, 2);
    }

    #[tokio::test]
    async fn hybrid_vsock_refusals_say_what_happened() {
        for (answer, expect) in [
            (b"ERR no listener\n".to_vec(), "refused CONNECT 7"),
            (Vec::new(), "closed the vsock socket"),
            (vec![b'x'; 200], "longer than"),
        ] {
            let (mut host, mut guest) = tokio::io::duplex(1 << 16);
            let vmm = tokio::spawn(async move {
                let mut req = [0u8; 10];
                let _ = guest.read_exact(&mut req).await;
                let _ = guest.write_all(&answer).await;
                // Dropping `guest` closes the stream.
            });
            let e = hybrid_vsock_handshake(&mut host, 7).await.expect_err("refused");
            assert!(e.to_string().contains(expect), "{e}");
            vmm.await.expect("vmm");
        }
    }

    #[tokio::test]
    async fn connects_over_unix_sockets_both_ways() {
        let dir = tempfile::tempdir().expect("tmp");
        let (serial, vsock) = (dir.path().join("agent.sock"), dir.path().join("v.sock"));
        let l1 = tokio::net::UnixListener::bind(&serial).expect("bind");
        let l2 = tokio::net::UnixListener::bind(&vsock).expect("bind");
        let server = tokio::spawn(async move {
            let (mut a, _) = l1.accept().await.expect("accept");
            a.write_all(&Frame::json(Kind::Ready, 0, &Ready::default()).encode()).await.expect("ready");
            let (mut b, _) = l2.accept().await.expect("accept");
            let mut line = [0u8; 14];
            b.read_exact(&mut line).await.expect("connect");
            assert_eq!(&line, b"CONNECT 10789\n");
            b.write_all(b"OK 5\n").await.expect("ok");
            b.write_all(&Frame::json(Kind::Ready, 0, &Ready::default()).encode()).await.expect("ready");
            (a, b)
        });
        let c1 = AgentClient::connect(&serial).await.expect("connect");
        let c2 = AgentClient::connect_hybrid_vsock(&vsock, 10789).await.expect("connect");
        c1.wait_ready(soon()).await.expect("ready over virtio-serial socket");
        c2.wait_ready(soon()).await.expect("ready over hybrid vsock");
        let _conns = server.await.expect("server");
        let missing = AgentClient::connect(&dir.path().join("nope.sock")).await.expect_err("no socket");
        assert!(matches!(missing, AgentError::Connect(_)), "{missing}");
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
        assert!(tokio::time::timeout(Duration::from_secs(5), s.recv()).await.expect("not hanging").is_none());
    }

    /// Frames from the host end as the fake guest reads them.
    async fn host_frames(guest: &mut tokio::io::DuplexStream, dec: &mut Decoder, want: Kind) -> Frame {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = dec.next_frame().expect("host frames are valid") {
                if f.kind == want {
                    return f;
                }
            }
            let n = guest.read(&mut buf).await.expect("read");
            assert!(n > 0, "host closed");
            dec.feed(&buf[..n]);
        }
    }

    const K64: usize = 64 << 10;

    #[tokio::test]
    async fn a_stream_nobody_reads_does_not_hold_up_the_others() {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let c = AgentClient::over(host);
        let (mut stalled, mut live) = (c.open_stream(), c.open_stream());
        // A whole window of output for a stream whose consumer is busy elsewhere...
        for _ in 0..3 {
            guest.write_all(&Frame::new(Kind::Stdout, stalled.id, vec![b'x'; K64]).encode()).await.expect("write");
        }
        // ...does not keep the next stream's output from its reader.
        guest.write_all(&Frame::new(Kind::Stdout, live.id, b"through".to_vec()).encode()).await.expect("write");
        let f = tokio::time::timeout(Duration::from_secs(5), live.recv()).await.expect("not held up").expect("frame");
        assert_eq!(f.payload, b"through");
        for _ in 0..3 {
            assert_eq!(stalled.recv().await.expect("kept").payload.len(), K64);
        }
        assert!(c.closed().is_none());
    }

    #[tokio::test]
    async fn consumed_output_is_credited_back() {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let c = AgentClient::over(host);
        let mut s = c.open_stream();
        for _ in 0..2 {
            guest.write_all(&Frame::new(Kind::Stderr, s.id, vec![0; K64]).encode()).await.expect("write");
        }
        s.recv().await.expect("frame");
        s.recv().await.expect("frame");
        let mut dec = Decoder::new();
        let credit = host_frames(&mut guest, &mut dec, Kind::Credit).await;
        assert_eq!(credit.stream, s.id);
        assert_eq!(credit.credit_amount(), credit_cost(K64), "handed back once a quarter window was consumed");
    }

    #[tokio::test]
    async fn a_guest_that_ignores_its_window_is_cut_off() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        for _ in 0..5 {
            guest.write_all(&Frame::new(Kind::Stdout, s.id, vec![0; K64]).encode()).await.expect("write");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let why = c.closed().expect("cut off");
        assert!(why.contains("window"), "{why}");
    }

    #[tokio::test]
    async fn a_flood_of_frames_that_carry_no_data_is_bounded_too() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        // Empty Exit frames, Hellos and Pings on the stream, never read: each is counted.
        let flood: Vec<u8> =
            (0..20_000).flat_map(|i| Frame::new([Kind::Exit, Kind::Hello, Kind::Ping][i % 3], s.id, Vec::new()).encode()).collect();
        guest.write_all(&flood).await.expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let why = c.closed().expect("cut off before it could grow without bound");
        assert!(why.contains("window"), "{why}");
        drop(s);
    }

    #[tokio::test]
    async fn a_well_behaved_guests_exit_after_a_full_window_is_taken() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let mut s = c.open_stream();
        // A whole window of output, then the exit and an error: all within the bound.
        for _ in 0..3 {
            guest.write_all(&Frame::new(Kind::Stdout, s.id, vec![1; K64]).encode()).await.expect("write");
        }
        guest.write_all(&Frame::new(Kind::Stderr, s.id, vec![2; (WINDOW as usize) - 3 * (K64 + 64) - 64]).encode()).await.expect("write");
        guest.write_all(&Frame::new(Kind::Exit, s.id, b"{\"exit_code\":0}".to_vec()).encode()).await.expect("write");
        let mut kinds = Vec::new();
        for _ in 0..5 {
            kinds.push(s.recv().await.expect("frame").kind);
        }
        assert_eq!(kinds.last(), Some(&Kind::Exit));
        assert!(c.closed().is_none(), "{:?}", c.closed());
    }

    #[tokio::test]
    async fn stdin_waits_for_the_guests_credit() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        let input = s.input();
        // Three chunks fit the window; the fourth must wait for the guest.
        for _ in 0..3 {
            input.send(Frame::new(Kind::Stdin, s.id, vec![1; K64])).await.expect("within the window");
        }
        let fourth = {
            let input = input.clone();
            tokio::spawn(async move { input.send(Frame::new(Kind::Stdin, input.id, vec![2; K64])).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!fourth.is_finished(), "sent beyond the guest's window");
        guest.write_all(&Frame::credit(s.id, credit_cost(K64)).encode()).await.expect("credit");
        tokio::time::timeout(Duration::from_secs(5), fourth).await.expect("credit unblocks it").expect("join").expect("sent");
        // End of stdin is free, and stdin on a closed stream fails instead of waiting forever.
        input.send(Frame::new(Kind::Stdin, s.id, Vec::new())).await.expect("eof needs no credit");
        c.close_stream(s.id);
        let r = tokio::time::timeout(Duration::from_secs(5), input.send(Frame::new(Kind::Stdin, s.id, vec![3; K64]))).await;
        assert!(matches!(r, Ok(Err(AgentError::Closed))), "{r:?}");
    }
}
