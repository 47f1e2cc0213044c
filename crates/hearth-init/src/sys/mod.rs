//! Every raw system call hearth-init makes.

pub mod inet;

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mount(2)`.
pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    let fptr = if fstype.is_empty() { std::ptr::null() } else { f.as_ptr() };
    let dptr = if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() };
    // SAFETY: all pointers are valid NUL-terminated strings (or null where allowed) that live
    // until the call returns.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fptr, flags, dptr) })
}

/// `chroot(2)`.
pub fn chroot(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: p is a valid C string for the duration of the call.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

/// `finit_module(2)` on an open module file.
pub fn finit_module(f: &std::fs::File) -> io::Result<()> {
    let empty = c"";
    // SAFETY: the fd is open for the call and the params string is a static empty C string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits, for up to `within`, until what was written to the console (hearth-init's standard
/// error) has left the serial port: the tty's output queue is empty (`TIOCOUTQ`), then the
/// UART's transmitter (`TIOCSERGETLSR`). A power-off drops what is still queued, which would be
/// the workload's last lines. Bounded, so a console that never drains cannot stop the VM.
pub fn drain_console(within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    let fd = libc::STDERR_FILENO;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the pointer, which points at `queued`.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        let mut lsr: libc::c_int = 0;
        // SAFETY: TIOCSERGETLSR writes one int through the pointer, which points at `lsr`.
        let lsr_rc = unsafe { libc::ioctl(fd, libc::TIOCSERGETLSR, &mut lsr) };
        // TIOCSER_TEMT: the transmitter is empty.
        let empty = lsr_rc != 0 || lsr & 0x01 != 0;
        if rc != 0 || (queued == 0 && empty) || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Powers the machine off, or resets it where the VMM ends a VM on a reset instead
/// (`reboot`: Firecracker, which has no power-off). Does not return on success.
pub fn power_off(reboot: bool) -> io::Error {
    let how = if reboot { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    io::Error::last_os_error()
}

/// `fork(2)` of a process that has a single thread: `Ok(0)` in the child, the child's pid in
/// the parent. Refused once a second thread exists (the child would get a copy of only the
/// calling thread, and a lock another thread held would never be released there).
pub fn fork() -> io::Result<i32> {
    if thread_count()? != 1 {
        return Err(io::Error::other("fork refused: the process already has other threads"));
    }
    // SAFETY: the process is single-threaded (checked just above; nothing in hearth-init starts
    // a thread concurrently with this call, as it runs on the only thread).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// The number of threads of this process, from /proc/self/status.
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Mixes `bytes` into the kernel's entropy pool, credited as that many bits of entropy
/// (RNDADDENTROPY on `/dev/urandom`), then has the kernel reseed its random number generator
/// from the pool at once (RNDRESEEDCRNG), so no value drawn after comes from the state before.
pub fn add_entropy_and_reseed(bytes: &[u8]) -> io::Result<()> {
    /// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` from linux/random.h.
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let len =
        i32::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len().next_multiple_of(4));
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().next_multiple_of(4), 0);
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a rand_pool_info laid out as the kernel reads it (two ints, then
    // buf_size bytes), alive for the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: an ioctl without an argument on an open descriptor.
    check(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) })
}

/// Sets the wall clock (`clock_settime(CLOCK_REALTIME)`) to `ms` Unix milliseconds.
pub fn set_clock(ms: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec, read for the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// Blocks `signals` in this thread (and threads spawned after).
pub fn block_signals(signals: &[i32]) {
    // SAFETY: the sigset is a local initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits up to `timeout_ms` for one of `signals` (which must be blocked); returns its number.
pub fn wait_signal(signals: &[i32], timeout_ms: u64) -> Option<i32> {
    // SAFETY: set and ts are locals; sigtimedwait writes nothing when info is null.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        let ts = libc::timespec {
            tv_sec: (timeout_ms / 1000) as _,
            tv_nsec: ((timeout_ms % 1000) * 1_000_000) as _,
        };
        let s = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        (s > 0).then_some(s)
    }
}

/// Reaps one exited child without blocking: `(pid, wait status)`.
pub fn reap_one() -> Option<(i32, i32)> {
    let mut status = 0;
    // SAFETY: status is a local the kernel writes to.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// `kill(2)`; errors ignored (the process may be gone).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain syscall with integer arguments.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Shell-style exit code from a wait status, and the signal if one ended the process.
pub fn decode_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        let s = libc::WTERMSIG(status);
        (128 + s, Some(s))
    } else {
        (255, None)
    }
}

/// Milliseconds since boot (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a local the kernel writes to.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Points stdin at `input` and stdout and stderr at `output` (best effort: on failure the
/// descriptors stay as they were).
pub fn redirect_stdio(input: &str, output: &str) {
    use std::os::fd::AsRawFd;
    let (Ok(i), Ok(o)) =
        (std::fs::File::open(input), std::fs::OpenOptions::new().write(true).open(output))
    else {
        return;
    };
    // SAFETY: dup2 on descriptors this function owns for the duration of the calls; 0-2 are
    // replaced atomically and the originals dropped afterwards.
    unsafe {
        libc::dup2(i.as_raw_fd(), 0);
        libc::dup2(o.as_raw_fd(), 1);
        libc::dup2(o.as_raw_fd(), 2);
    }
}

/// Turns output post-processing off on a terminal, so `\n` is not sent as `\r\n`.
pub fn raw_output(fd: i32) {
    // SAFETY: t is a local filled by tcgetattr before tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            t.c_oflag &= !libc::OPOST;
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// Turns off echo and canonical mode on a terminal, so piped input reaches the process as is.
pub fn raw_input(fd: i32) {
    // SAFETY: t is a local filled by tcgetattr before tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            t.c_lflag &= !(libc::ECHO | libc::ICANON | libc::ISIG);
            t.c_iflag &= !(libc::ICRNL | libc::IXON);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// Who a child runs as and how it is attached to its terminal.
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// Start a new session (always, except when exec'ing an init system as PID 1).
    pub new_session: bool,
    /// Make this fd (in the child) the controlling terminal.
    pub ctty: Option<i32>,
    pub groups: Vec<u32>,
    pub gid: u32,
    pub uid: u32,
}

/// Arranges for `cmd` to apply `setup` between fork and exec: session, controlling terminal,
/// then supplementary groups, gid and uid, in that order.
pub fn configure_child(cmd: &mut std::process::Command, setup: ChildSetup) {
    use std::os::unix::process::CommandExt;
    let apply = move || -> io::Result<()> {
        // SAFETY: these are async-signal-safe system calls taking integers, a local sigset, or a
        // pointer and length describing `setup.groups`, which lives in this closure.
        unsafe {
            // PID 1 blocks the signals it collects; the child must start with none blocked.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if setup.new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = setup.ctty {
                if libc::ioctl(fd, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setgroups(setup.groups.len(), setup.groups.as_ptr()) != 0
                || libc::setgid(setup.gid) != 0
                || libc::setuid(setup.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec; it allocates nothing and only
    // makes the async-signal-safe calls above.
    unsafe {
        cmd.pre_exec(apply);
    }
}

/// `poll(2)` on one fd: the returned events (0 on timeout).
pub fn poll(fd: i32, events: i16, timeout_ms: i32) -> io::Result<i16> {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: pfd is a valid array of one pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents)
}

/// Opens a new pseudo-terminal pair with the given size: `(master, slave)`.
pub fn openpty(rows: u16, cols: u16) -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: m and s are locals the call writes; ws is a valid winsize; name/termios may be null.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty just returned these two fds to us.
    Ok(unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) })
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: ws is a valid winsize for the duration of the call.
    unsafe {
        libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
    }
}

/// A vsock stream socket listening on `port` for any CID (the host connects to it).
pub fn vsock_listen(port: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the fd is owned by the OwnedFd right after.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; zeroes are valid, the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes for the duration of the call.
    check(unsafe {
        libc::bind(sock.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len)
    })?;
    // SAFETY: listen(2) on a socket we own.
    check(unsafe { libc::listen(sock.as_raw_fd(), 8) })?;
    Ok(sock)
}

/// Accepts one connection on `listener`, non-blocking and close-on-exec.
pub fn accept(listener: &std::os::fd::OwnedFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    loop {
        // SAFETY: accept4(2) without an address buffer; the returned fd is owned right after.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd was just returned by accept4(2) and nothing else owns it.
            return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
