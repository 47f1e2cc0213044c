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

use hearth_types::agent::{CopyRequest, Decoder, ExecExit, ExecRequest, Frame, Hello, Kind, Ready, PROTOCOL_VERSION};
use hearth_types::guest::AGENT_PORT_NAME;

use crate::process::{self, Spec};
use crate::sys;

/// Largest output frame the guest sends.
const CHUNK: usize = 64 << 10;

/// Where a stream's stdin goes.
enum Slot {
    Pending(Vec<u8>, bool),
    Open(File),
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

impl Shared {
    /// Connects a stream's stdin to `w`, replaying what arrived early.
    fn open_stdin(&self, stream: u32, mut w: File) {
        let mut stdins = self.stdins.lock().unwrap_or_else(|e| e.into_inner());
        let (early, eof) = match stdins.remove(&stream) {
            Some(Slot::Pending(buf, eof)) => (buf, eof),
            _ => (Vec::new(), false),
        };
        if w.write_all(&early).is_ok() && !eof {
            stdins.insert(stream, Slot::Open(w));
        }
    }

    fn drop_stdin(&self, stream: u32) {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    }

    fn stdin_open(&self, stream: u32) -> bool {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&stream)
    }
}

/// How long the agent looks for its virtio-serial port before concluding there is none.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// How long a frame may wait for a connected but slow host before it is dropped.
const WRITE_PATIENCE: Duration = Duration::from_secs(5);
/// Frames queued for the host at most.
const QUEUE: usize = 64;

/// The `/dev` node of the virtio-serial port named [`AGENT_PORT_NAME`], if there is one.
pub fn find_port() -> Option<String> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == AGENT_PORT_NAME {
                    return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
                }
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

/// Finds the agent port and serves it until the VM powers off. Without a port (no
/// virtio-serial device) it returns quietly: the agent is optional.
pub fn serve(shared: Arc<Shared>) {
    let Some(port) = find_port() else { return };
    let port_file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(&port) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hearth-init: agent port {port}: {e}");
            return;
        }
    };
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    match port_file.try_clone() {
        Ok(w) => {
            std::thread::spawn(move || writer(w, rx));
            *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        }
        Err(e) => {
            eprintln!("hearth-init: agent port {port}: {e}");
            return;
        }
    }
    read_loop(&shared, &port_file);
}

/// Reads frames from the host. A closed host end reads as EOF / POLLHUP: the loop then sleeps
/// 100 ms between checks, greets the host when it (re)connects, and starts a fresh decoder.
fn read_loop(shared: &Arc<Shared>, port: &File) {
    let mut dec = Decoder::new();
    let mut connected = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let revents = sys::poll(port.as_raw_fd(), libc::POLLIN, 1000).unwrap_or(0);
        if revents & libc::POLLHUP != 0 && revents & libc::POLLIN == 0 {
            if connected {
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
        Kind::Exec => match f.parse::<ExecRequest>() {
            Ok(req) => {
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
                Some(Slot::Open(w)) if f.payload.is_empty() || (&*w).write_all(&f.payload).is_err() => {
                    stdins.remove(&f.stream);
                }
                Some(Slot::Open(_)) => {}
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
            Ok(n) => shared.send(&Frame::new(kind, stream, buf[..n].to_vec())),
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
        shared.send(&Frame::new(Kind::Stderr, stream, format!("hearth: {msg}\n").into_bytes()));
        shared.send(&Frame::json(Kind::Exit, stream, &ExecExit { exit_code: code, signal: None }));
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
}

/// Frames written to it become `Stdout` frames of one stream.
struct FrameWriter<'a> {
    shared: &'a Shared,
    stream: u32,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        self.shared.send(&Frame::new(Kind::Stdout, self.stream, buf[..n].to_vec()));
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
}

fn copy_in(shared: &Shared, stream: u32, dest: String) {
    // The archive arrives as Stdin frames; collect it through a pipe-like file in /run.
    let tmp = format!("/run/.hearth-copy-{stream}");
    let file = match OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp) {
        Ok(f) => f,
        Err(e) => return shared.send(&Frame::new(Kind::Error, stream, format!("{tmp}: {e}").into_bytes())),
    };
    let Ok(w) = file.try_clone() else { return };
    shared.open_stdin(stream, w);
    // Wait until the host closes stdin (the entry disappears).
    while shared.stdin_open(stream) {
        std::thread::sleep(Duration::from_millis(5));
    }
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
