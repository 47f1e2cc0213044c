//! The guest end of the agent protocol: readiness, shutdown, exec, copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_types::agent::{
    credit_cost, CopyRequest, Decoder, ExecExit, ExecRequest, Frame, Hello, Kind, Ready, FRAME_COST, PROTOCOL_VERSION, WINDOW,
};
use hearth_types::guest::{AGENT_PORT_NAME, AGENT_VSOCK_PORT};

use crate::process::{self, Spec};
use crate::sys;

/// Largest output frame the guest sends.
const CHUNK: usize = 64 << 10;

/// Where a stream's stdin goes: held until the process exists, then to its writer thread.
enum Slot {
    Pending(Vec<u8>, bool),
    Open(mpsc::Sender<Vec<u8>>),
}

/// Exit waiters by pid, and wait statuses reaped before their waiter registered.
pub type Exits = (HashMap<i32, mpsc::Sender<i32>>, HashMap<i32, i32>);

/// Most stdin buffered for a stream whose process has not started yet.
const MAX_PENDING: usize = 8 << 20;

/// State shared by the supervisor and the agent threads.
#[derive(Default)]
pub struct Shared {
    /// The workload's environment, user and directory: the defaults for `exec`.
    pub defaults: Mutex<Spec>,
    pub ready: Mutex<Option<Ready>>,
    pub shutdown: AtomicBool,
    /// Exit waiters by pid, and exits reaped before their waiter registered.
    pub exits: Mutex<Exits>,
    /// Frames for the writer thread.
    out: Mutex<Option<mpsc::SyncSender<Vec<u8>>>>,
    /// Stdin of execs and copies by stream. Input that arrives before the process exists is
    /// kept (bounded) until it does.
    stdins: Mutex<HashMap<u32, Slot>>,
    pids: Mutex<HashMap<u32, (i32, Option<File>)>>,
    /// Output credit the host gave each stream (flow control), and a wake-up for senders.
    credit: Mutex<HashMap<u32, u64>>,
    more_credit: std::sync::Condvar,
}

impl Shared {
    /// Queues a frame for the host, waiting while the queue is full (backpressure for output
    /// streams). Dropped when the agent channel is not up.
    pub fn send(&self, f: &Frame) {
        let tx = self.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(f.encode());
        }
    }

    /// Queues a frame without ever blocking (for PID 1's own thread); dropped when the queue
    /// is full. The host learns the state again with its next `Hello`.
    pub fn try_send(&self, f: &Frame) {
        let tx = self.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.try_send(f.encode());
        }
    }

    /// Registers interest in `pid`'s exit; the supervisor's reaper fills it.
    pub fn watch(&self, pid: i32) -> mpsc::Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        let mut ex = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        match ex.1.remove(&pid) {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                ex.0.insert(pid, tx);
            }
        }
        rx
    }

    /// Called by the reaper for every child that is not the workload.
    pub fn reaped(&self, pid: i32, status: i32) {
        let mut ex = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        match ex.0.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                if ex.1.len() < 4096 {
                    ex.1.insert(pid, status);
                }
            }
        }
    }

    pub fn set_ready(&self, r: Ready) {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        self.try_send(&Frame::json(Kind::Ready, 0, &r));
    }
}

/// Unlimited credit, for streams whose host went away: their output drains and is dropped.
const UNMETERED: u64 = u64::MAX / 2;

impl Shared {
    /// Starts output flow control for a new stream.
    fn open_output(&self, stream: u32) {
        self.credit.lock().unwrap_or_else(|e| e.into_inner()).insert(stream, WINDOW);
    }

    fn close_output(&self, stream: u32) {
        self.credit.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    }

    fn add_credit(&self, stream: u32, amount: u64) {
        if let Some(c) = self.credit.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&stream) {
            *c = c.saturating_add(amount).min(UNMETERED);
        }
        self.more_credit.notify_all();
    }

    /// The host went away: nobody will hand credit back for the streams it had.
    fn release_output(&self) {
        for c in self.credit.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            *c = UNMETERED;
        }
        self.more_credit.notify_all();
    }

    /// Takes credit for up to `want` bytes on `stream`, waiting while it has none; `None` once
    /// the stream is closed.
    fn take_credit(&self, stream: u32, want: usize) -> Option<usize> {
        let mut credit = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match credit.get_mut(&stream) {
                None => return None,
                Some(c) if *c > FRAME_COST => {
                    let n = want.min((*c - FRAME_COST).min(CHUNK as u64) as usize);
                    *c -= credit_cost(n);
                    return Some(n);
                }
                Some(_) => {}
            }
            credit = self.more_credit.wait_timeout(credit, Duration::from_secs(1)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Sends output on a stream as fast as the host's credit allows. Returns false when the
    /// stream is closed.
    fn send_data(&self, kind: Kind, stream: u32, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(n) = self.take_credit(stream, data.len()) else { return false };
            self.send(&Frame::new(kind, stream, data[..n].to_vec()));
            data = &data[n..];
        }
        true
    }

    /// Connects a stream's stdin to `w` through a writer thread (so a process that does not
    /// read stalls only that thread), replaying what arrived early. Credit goes back to the
    /// host as bytes reach the process. The thread ends when stdin closes.
    fn open_stdin(self: &Arc<Self>, stream: u32, mut w: File) -> std::thread::JoinHandle<()> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let mut stdins = self.stdins.lock().unwrap_or_else(|e| e.into_inner());
        let (early, eof) = match stdins.remove(&stream) {
            Some(Slot::Pending(buf, eof)) => (buf, eof),
            _ => (Vec::new(), false),
        };
        if !early.is_empty() {
            let _ = tx.send(early);
        }
        if !eof {
            stdins.insert(stream, Slot::Open(tx));
        } else {
            drop(tx);
        }
        drop(stdins);
        let shared = self.clone();
        std::thread::spawn(move || {
            let mut broken = false;
            for chunk in rx {
                // After a write error (the process closed stdin) the rest is discarded, but
                // still credited, so the host never waits on a stream that cannot take input.
                broken = broken || w.write_all(&chunk).is_err();
                shared.send(&Frame::credit(stream, credit_cost(chunk.len())));
            }
        })
    }

    fn drop_stdin(&self, stream: u32) {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    }
}

/// How long the agent looks for its virtio-serial port before concluding there is none.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// How long a frame may wait for a connected but slow host before it is dropped.
const WRITE_PATIENCE: Duration = Duration::from_secs(5);
/// Frames queued for the host at most.
const QUEUE: usize = 64;

/// Where the host reaches the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Channel {
    /// The virtio-serial port's `/dev` node (QEMU).
    Port(String),
    /// A virtio vsock device: listen on [`AGENT_VSOCK_PORT`] (Firecracker, Cloud Hypervisor).
    Vsock,
}

/// Virtio device id of vsock (virtio spec 5.10).
const VIRTIO_ID_VSOCK: &str = "0x0013";

/// The agent's channel, waiting for the devices to appear: the virtio-serial port named
/// [`AGENT_PORT_NAME`] when the VM has one, else a vsock device.
pub fn find_channel() -> Option<Channel> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == AGENT_PORT_NAME {
                    return Some(Channel::Port(format!("/dev/{}", e.file_name().to_string_lossy())));
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/bus/virtio/devices") {
            let vsock = rd.flatten().any(|e| std::fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == VIRTIO_ID_VSOCK));
            if vsock {
                return Some(Channel::Vsock);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes queued frames to the port. Frames are dropped while the host end is closed
/// (POLLHUP), so nothing in the guest ever waits for a host that is not there.
fn writer(port: File, rx: mpsc::Receiver<Vec<u8>>) {
    let fd = port.as_raw_fd();
    for bytes in rx {
        let mut off = 0;
        let give_up = Instant::now() + WRITE_PATIENCE;
        while off < bytes.len() && Instant::now() < give_up {
            let revents = sys::poll(fd, libc::POLLOUT, 100).unwrap_or(0);
            if revents & libc::POLLHUP != 0 {
                break; // host not connected: drop the frame
            }
            if revents & libc::POLLOUT == 0 {
                continue;
            }
            match (&port).write(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// Finds the agent's channel and serves it until the VM powers off. Without one it returns
/// quietly: the agent is optional.
pub fn serve(shared: Arc<Shared>) {
    match find_channel() {
        Some(Channel::Port(port)) => serve_port(shared, &port),
        Some(Channel::Vsock) => match sys::vsock_listen(AGENT_VSOCK_PORT) {
            Ok(l) => serve_listener(&shared, &l),
            Err(e) => eprintln!("hearth-init: agent: listening on vsock port {AGENT_VSOCK_PORT}: {e}"),
        },
        None => {}
    }
}

/// Points the shared queue at a new writer thread for `conn`.
fn attach_writer(shared: &Shared, conn: &File) -> std::io::Result<()> {
    let w = conn.try_clone()?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    std::thread::spawn(move || writer(w, rx));
    *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    Ok(())
}

/// The virtio-serial port: one device for the VM's life; the host end comes and goes.
fn serve_port(shared: Arc<Shared>, port: &str) {
    let port_file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(port) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hearth-init: agent port {port}: {e}");
            return;
        }
    };
    if let Err(e) = attach_writer(&shared, &port_file) {
        eprintln!("hearth-init: agent port {port}: {e}");
        return;
    }
    read_loop(&shared, &port_file, false);
}

/// A listening socket (vsock): each host connection is served until it closes, then the next
/// one is accepted. Frames sent between connections are dropped, as on a closed port.
pub fn serve_listener(shared: &Arc<Shared>, listener: &std::os::fd::OwnedFd) {
    loop {
        let conn = match sys::accept(listener) {
            Ok(c) => File::from(c),
            Err(e) => {
                eprintln!("hearth-init: agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = attach_writer(shared, &conn) {
            eprintln!("hearth-init: agent: {e}");
            continue;
        }
        read_loop(shared, &conn, true);
        *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Reads frames from the host. On the virtio-serial port a closed host end reads as EOF /
/// POLLHUP: the loop then sleeps 100 ms between checks, greets the host when it (re)connects,
/// and starts a fresh decoder. On a connection (`stream`), the end of it ends the loop.
fn read_loop(shared: &Arc<Shared>, port: &File, stream: bool) {
    let mut dec = Decoder::new();
    let mut connected = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let revents = sys::poll(port.as_raw_fd(), libc::POLLIN, 1000).unwrap_or(0);
        if revents & libc::POLLHUP != 0 && revents & libc::POLLIN == 0 {
            if stream {
                shared.release_output();
                return;
            }
            if connected {
                shared.release_output();
                connected = false;
                dec = Decoder::new();
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if !connected {
            connected = true;
            shared.send(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
        }
        match (&*port).read(&mut buf) {
            Ok(0) if stream => return shared.release_output(),
            Ok(0) => {
                dec = Decoder::new();
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(n) => {
                dec.feed(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(f)) => handle(shared, f),
                        Ok(None) => break,
                        Err(e) => {
                            // Drop what is buffered and resynchronise on the next frame.
                            eprintln!("hearth-init: agent: {e}; dropping the buffered input");
                            dec = Decoder::new();
                            break;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) if stream => return shared.release_output(),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn handle(shared: &Arc<Shared>, f: Frame) {
    match f.kind {
        Kind::Hello => {
            shared.send(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
            let ready = shared.ready.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(r) = ready {
                shared.send(&Frame::json(Kind::Ready, 0, &r));
            }
        }
        Kind::Ping => shared.send(&Frame::new(Kind::Pong, 0, f.payload)),
        Kind::Shutdown => shared.shutdown.store(true, Ordering::SeqCst),
        Kind::Credit => shared.add_credit(f.stream, f.credit_amount()),
        Kind::Exec => match f.parse::<ExecRequest>() {
            Ok(req) => {
                shared.open_output(f.stream);
                shared.stdins.lock().unwrap_or_else(|e| e.into_inner()).insert(f.stream, Slot::Pending(Vec::new(), false));
                let s = shared.clone();
                std::thread::spawn(move || exec(&s, f.stream, req));
            }
            Err(e) => shared.send(&Frame::new(Kind::Error, f.stream, e.to_string().into_bytes())),
        },
        Kind::Stdin => {
            let mut stdins = shared.stdins.lock().unwrap_or_else(|e| e.into_inner());
            match stdins.get_mut(&f.stream) {
                Some(Slot::Pending(buf, eof)) => {
                    if f.payload.is_empty() {
                        *eof = true;
                    } else if buf.len() + f.payload.len() <= MAX_PENDING {
                        buf.extend_from_slice(&f.payload);
                    }
                }
                Some(Slot::Open(_)) if f.payload.is_empty() => {
                    stdins.remove(&f.stream);
                }
                Some(Slot::Open(w)) => {
                    let _ = w.send(f.payload);
                }
                None => {}
            }
        }
        Kind::Signal => {
            if let (Some(b), Some((pid, _))) = (f.payload.get(..4), shared.pids.lock().unwrap_or_else(|e| e.into_inner()).get(&f.stream)) {
                sys::kill(*pid, i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Kind::Resize => {
            if let (Some(b), Some((_, Some(m)))) =
                (f.payload.get(..4), shared.pids.lock().unwrap_or_else(|e| e.into_inner()).get(&f.stream))
            {
                sys::set_winsize(m.as_raw_fd(), u16::from_be_bytes([b[0], b[1]]), u16::from_be_bytes([b[2], b[3]]));
            }
        }
        Kind::CopyOut => {
            shared.open_output(f.stream);
            let s = shared.clone();
            std::thread::spawn(move || copy_out(&s, f.stream, f.parse::<CopyRequest>().map(|r| r.path).unwrap_or_default()));
        }
        Kind::CopyIn => {
            shared.stdins.lock().unwrap_or_else(|e| e.into_inner()).insert(f.stream, Slot::Pending(Vec::new(), false));
            let s = shared.clone();
            std::thread::spawn(move || copy_in(&s, f.stream, f.parse::<CopyRequest>().map(|r| r.path).unwrap_or_default()));
        }
        _ => {}
    }
}

fn pump(shared: &Shared, stream: u32, kind: Kind, mut r: File) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return, // EIO on a pty once the process is gone
            Ok(n) => {
                shared.send_data(kind, stream, &buf[..n]);
            }
        }
    }
}

fn exec(shared: &Arc<Shared>, stream: u32, req: ExecRequest) {
    let defaults = shared.defaults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let spec = Spec {
        args: req.args.clone(),
        env: process::merge_env(&defaults.env, &req.env),
        cwd: if req.cwd.is_empty() { defaults.cwd.clone() } else { req.cwd.clone() },
        user: if req.user.is_empty() { defaults.user.clone() } else { req.user.clone() },
        hostname: defaults.hostname.clone(),
    };
    let fail = |code: i32, msg: String| {
        shared.drop_stdin(stream);
        shared.send_data(Kind::Stderr, stream, format!("hearth: {msg}\n").as_bytes());
        shared.send(&Frame::json(Kind::Exit, stream, &ExecExit { exit_code: code, signal: None }));
        shared.close_output(stream);
    };
    let mut cmd = match process::command(&spec, req.tty.then_some(0), true) {
        Ok(c) => c,
        Err(e) => return fail(e.code, e.message),
    };
    let mut readers = Vec::new();
    let (child, master) = if req.tty {
        let (master, slave) = match sys::openpty(req.rows, req.cols) {
            Ok(p) => p,
            Err(e) => return fail(125, format!("openpty: {e}")),
        };
        let (Ok(s1), Ok(s2)) = (slave.try_clone(), slave.try_clone()) else { return fail(125, "dup pty".into()) };
        cmd.stdin(slave).stdout(s1).stderr(s2);
        let child = match process::spawn(&mut cmd, &spec.args[0]) {
            Ok(c) => c,
            Err(e) => return fail(e.code, e.message),
        };
        drop(cmd); // closes our copies of the slave
        if let (Ok(r), Ok(w)) = (master.try_clone(), master.try_clone()) {
            let s = shared.clone();
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stdout, r)));
            shared.open_stdin(stream, w);
        }
        (child, Some(master))
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match process::spawn(&mut cmd, &spec.args[0]) {
            Ok(c) => c,
            Err(e) => return fail(e.code, e.message),
        };
        drop(cmd);
        if let Some(out) = child.stdout.take() {
            let (s, f) = (shared.clone(), File::from(std::os::fd::OwnedFd::from(out)));
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stdout, f)));
        }
        if let Some(err) = child.stderr.take() {
            let (s, f) = (shared.clone(), File::from(std::os::fd::OwnedFd::from(err)));
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stderr, f)));
        }
        if let Some(inp) = child.stdin.take() {
            shared.open_stdin(stream, File::from(std::os::fd::OwnedFd::from(inp)));
        }
        (child, None)
    };
    let pid = child.id() as i32;
    let exited = shared.watch(pid);
    shared.pids.lock().unwrap_or_else(|e| e.into_inner()).insert(stream, (pid, master.as_ref().and_then(|m| m.try_clone().ok())));
    let status = exited.recv().unwrap_or(255 << 8);
    if req.tty {
        // The pty reader ends with EIO once the last slave fd closes; drop ours first.
        drop(master);
    }
    for r in readers {
        let _ = r.join();
    }
    shared.drop_stdin(stream);
    shared.pids.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    let (code, signal) = sys::decode_status(status);
    shared.send(&Frame::json(Kind::Exit, stream, &ExecExit { exit_code: code, signal }));
    shared.close_output(stream);
}

/// Frames written to it become `Stdout` frames of one stream.
struct FrameWriter<'a> {
    shared: &'a Shared,
    stream: u32,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        if !self.shared.send_data(Kind::Stdout, self.stream, &buf[..n]) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn copy_out(shared: &Shared, stream: u32, path: String) {
    let p = std::path::Path::new(&path);
    let result = (|| -> std::io::Result<()> {
        let name = p.file_name().map(|n| n.to_owned()).unwrap_or_else(|| ".".into());
        let mut b = tar::Builder::new(FrameWriter { shared, stream });
        b.follow_symlinks(false);
        if std::fs::symlink_metadata(p)?.is_dir() {
            b.append_dir_all(&name, p)?;
        } else {
            b.append_path_with_name(p, &name)?;
        }
        b.finish()
    })();
    match result {
        Ok(()) => shared.send(&Frame::json(Kind::Exit, stream, &ExecExit::default())),
        Err(e) => shared.send(&Frame::new(Kind::Error, stream, format!("{path}: {e}").into_bytes())),
    }
    shared.close_output(stream);
}

fn copy_in(shared: &Arc<Shared>, stream: u32, dest: String) {
    // The archive arrives as Stdin frames; collect it through a pipe-like file in /run.
    let tmp = format!("/run/.hearth-copy-{stream}");
    let file = match OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp) {
        Ok(f) => f,
        Err(e) => return shared.send(&Frame::new(Kind::Error, stream, format!("{tmp}: {e}").into_bytes())),
    };
    let Ok(w) = file.try_clone() else { return };
    // The writer thread ends once the host closed stdin and everything is written.
    let _ = shared.open_stdin(stream, w).join();
    let result = unpack(&tmp, &dest);
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => shared.send(&Frame::json(Kind::Exit, stream, &ExecExit::default())),
        Err(e) => shared.send(&Frame::new(Kind::Error, stream, format!("{dest}: {e}").into_bytes())),
    }
}

/// Docker's `cp` rule: into `dest` when it is a directory, else as `dest`.
fn unpack(archive: &str, dest: &str) -> std::io::Result<()> {
    let dest = std::path::Path::new(dest);
    let into_dir = dest.is_dir();
    let mut ar = tar::Archive::new(File::open(archive)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
            return Err(std::io::Error::other(format!("unsafe path {} in the archive", rel.display())));
        }
        let mut comps = rel.components().filter(|c| matches!(c, std::path::Component::Normal(_)));
        let Some(first) = comps.next() else { continue };
        let rest: std::path::PathBuf = comps.collect();
        let base = if into_dir { dest.join(first) } else { dest.to_owned() };
        let target = if rest.as_os_str().is_empty() { base } else { base.join(rest) };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry.unpack(&target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn read_frame(s: &mut UnixStream, dec: &mut Decoder) -> Frame {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = dec.next_frame().expect("valid frames") {
                return f;
            }
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "agent closed the connection");
            dec.feed(&buf[..n]);
        }
    }

    /// The socket path (vsock in a guest; a Unix socket here, as this host has no vsock
    /// transport): each connection is greeted and served, and a new one works after the last
    /// one closed.
    #[test]
    fn a_listener_serves_one_connection_after_another() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.sock");
        let listener = std::os::fd::OwnedFd::from(UnixListener::bind(&path).expect("bind"));
        let shared = Arc::new(Shared::default());
        let s2 = shared.clone();
        std::thread::spawn(move || serve_listener(&s2, &listener));
        for round in 0..2u8 {
            let mut c = UnixStream::connect(&path).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut dec = Decoder::new();
            c.write_all(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }).encode()).expect("hello");
            assert_eq!(read_frame(&mut c, &mut dec).kind, Kind::Hello, "round {round}");
            c.write_all(&Frame::new(Kind::Ping, 0, vec![round]).encode()).expect("ping");
            let pong = loop {
                let f = read_frame(&mut c, &mut dec);
                if f.kind == Kind::Pong {
                    break f;
                }
            };
            assert_eq!(pong.payload, vec![round]);
        }
    }

    /// Output waits for the host's credit, a stream at a time, and drains once the host left.
    #[test]
    fn output_is_sent_as_credit_allows() {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(1024);
        *shared.out.lock().expect("out") = Some(tx);
        shared.open_output(1);
        shared.open_output(2);
        let s = shared.clone();
        let big = std::thread::spawn(move || s.send_data(Kind::Stdout, 1, &vec![0u8; 2 * WINDOW as usize]));
        let sent = |rx: &mpsc::Receiver<Vec<u8>>| -> usize {
            let mut d = Decoder::new();
            while let Ok(b) = rx.recv_timeout(Duration::from_millis(300)) {
                d.feed(&b);
            }
            std::iter::from_fn(|| d.next_frame().expect("valid")).map(|f| f.payload.len()).sum()
        };
        let first = sent(&rx);
        assert!(first <= WINDOW as usize && first > (WINDOW / 2) as usize, "one window's worth, got {first}");
        assert!(!big.is_finished(), "waits for credit");
        // Another stream is not held up by the first.
        assert!(shared.send_data(Kind::Stderr, 2, b"other"));
        assert_eq!(sent(&rx), 5);
        // Credit lets more through; the host leaving lets the rest drain.
        shared.add_credit(1, WINDOW);
        assert!(sent(&rx) > (WINDOW / 2) as usize);
        shared.release_output();
        assert!(big.join().expect("join"), "drained");
        shared.close_output(1);
        assert!(!shared.send_data(Kind::Stdout, 1, b"late"), "a closed stream takes nothing");
    }

    #[test]
    fn vsock_listener_binds_the_agent_port_where_vsock_exists() {
        match sys::vsock_listen(AGENT_VSOCK_PORT) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => eprintln!("skipping: no vsock in this kernel"),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => eprintln!("skipping: port {AGENT_VSOCK_PORT} in use here"),
            Err(e) => panic!("vsock listen: {e}"),
        }
    }
}
