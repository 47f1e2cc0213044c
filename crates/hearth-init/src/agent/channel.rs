//! Finding the agent's channel (virtio-serial port or vsock) and serving it.

use super::*;

/// How long the agent looks for its virtio-serial port before concluding there is none.
pub(super) const PORT_WAIT: Duration = Duration::from_secs(10);
/// How long a frame may wait for a connected but slow host before it is dropped.
pub(super) const WRITE_PATIENCE: Duration = Duration::from_secs(5);
/// Frames queued for the host at most.
pub(super) const QUEUE: usize = 64;

/// Where the host reaches the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Channel {
    /// The virtio-serial port's `/dev` node (QEMU).
    Port(String),
    /// A virtio vsock device: listen on [`AGENT_VSOCK_PORT`] (Firecracker, Cloud Hypervisor).
    Vsock,
}

/// Virtio device id of vsock (virtio spec 5.10).
pub(super) const VIRTIO_ID_VSOCK: &str = "0x0013";

/// The agent's channel, waiting for the devices to appear: the virtio-serial port named
/// [`AGENT_PORT_NAME`] when the VM has one, else a vsock device.
pub fn find_channel() -> Option<Channel> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == AGENT_PORT_NAME {
                    return Some(Channel::Port(format!(
                        "/dev/{}",
                        e.file_name().to_string_lossy()
                    )));
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/bus/virtio/devices") {
            let vsock = rd.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("device"))
                    .is_ok_and(|d| d.trim() == VIRTIO_ID_VSOCK)
            });
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
pub(super) fn writer(port: File, rx: mpsc::Receiver<Vec<u8>>) {
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
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
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
            Err(e) => {
                eprintln!("hearth-init: agent: listening on vsock port {AGENT_VSOCK_PORT}: {e}")
            }
        },
        None => {}
    }
}

/// Points the shared queue at a new writer thread for `conn`.
pub(super) fn attach_writer(shared: &Shared, conn: &File) -> std::io::Result<()> {
    let w = conn.try_clone()?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    std::thread::spawn(move || writer(w, rx));
    *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    Ok(())
}

/// The virtio-serial port: one device for the VM's life; the host end comes and goes.
pub(super) fn serve_port(shared: Arc<Shared>, port: &str) {
    let port_file =
        match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(port) {
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
