//! The raw calls this crate makes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits (works for non-children).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path` (`statvfs(3)`).
pub fn available_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `st` is plain old data that statvfs fills; `c` is a NUL-terminated path that
    // outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call, as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: a plain syscall with integer arguments.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reaps `pid` if it is an exited child of this process (`waitpid` with WNOHANG); nothing when
/// it is not our child.
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid with a valid out-pointer to a local; WNOHANG never blocks.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// `poll(2)` for readability on one fd; `Ok(true)` when readable before `timeout_ms` ran out.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is a valid pollfd we own for the whole call and the count is 1; the fd is
    // borrowed, so it stays open until poll returns.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match rc {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Makes the child `cmd` starts a session leader of its own (no terminal, no signal from
/// hearthd's process group) that joins the cgroups whose `cgroup.procs` are open as `fds`
/// before it executes: it writes `0` ("this process") to each. Each `(from, to)` of `inherit`
/// is handed over as descriptor `to`; no `to` may be another pair's `from` (see [`dup_high`]).
pub fn detach_and_join(cmd: &mut std::process::Command, fds: Vec<i32>, inherit: Vec<(i32, i32)>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes only the async-signal-safe
    // setsid(2), write(2), dup2(2) and fcntl(2) calls, on descriptors the parent keeps open for
    // the duration of the spawn, writing from a static buffer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Last: a descriptor handed over may land where a cgroup descriptor was.
            for &(from, to) in &inherit {
                let rc = if from == to {
                    libc::fcntl(from, libc::F_SETFD, 0)
                } else {
                    libc::dup2(from, to)
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The lowest descriptor [`dup_high`] gives: above any a child is handed.
const HIGH_FD: i32 = 64;

/// A duplicate of `fd` numbered [`HIGH_FD`] or above, closed on exec: the source of a
/// descriptor handed to a child as a low number, which then can never be another's target.
pub fn dup_high(fd: &std::os::fd::OwnedFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor `fd` keeps open; a new descriptor it
    // returns is ours alone.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just opened and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// `mkfifo(3)`: a FIFO at `path` with `mode`.
pub fn mkfifo(path: &std::path::Path, mode: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mknod(2)`: a character device node at `path` with `mode` (permission bits).
pub fn mknod_char(path: &std::path::Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    mknod(path, libc::S_IFCHR | mode as libc::mode_t, libc::makedev(major, minor))
}

/// `mknod(2)`: a block device node at `path` for device number `dev`, with `mode`.
pub fn mknod_block(path: &std::path::Path, mode: u32, dev: u64) -> io::Result<()> {
    mknod(path, libc::S_IFBLK | mode as libc::mode_t, dev as libc::dev_t)
}

fn mknod(path: &std::path::Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the child `cmd` starts enter the chroot `root` and become `uid:gid`, with no
/// supplementary groups, no capabilities (a root-to-user setuid clears them) and no way to gain
/// privileges again, before it executes (the program's path is then resolved inside `root`).
/// Registered after [`detach_and_join`], so the cgroup is joined with root's rights.
pub fn chroot_and_drop(
    cmd: &mut std::process::Command,
    root: &std::path::Path,
    (uid, gid): (u32, u32),
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let root = std::ffi::CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))?;
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe system
    // calls (chroot, chdir, setgroups, setgid, setuid, prctl) on data made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ok =
                |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
            ok(libc::chroot(root.as_ptr()))?;
            ok(libc::chdir(c"/".as_ptr()))?;
            ok(libc::setgroups(0, std::ptr::null()))?;
            ok(libc::setgid(gid))?;
            ok(libc::setuid(uid))?;
            ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        });
    }
    Ok(())
}

/// `sendmsg(2)` of `data` on `stream` with `fds` passed as `SCM_RIGHTS` (a descriptor handed to
/// a VMM over its API socket); returns the bytes sent, which may be fewer than `data`'s.
pub fn send_with_fds(stream: &impl AsRawFd, data: &[u8], fds: &[i32]) -> io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live local buffer whose
    // length is given alongside (iov and control), and the control buffer is CMSG_SPACE bytes,
    // so the one header CMSG_FIRSTHDR returns and its data (fd_bytes) fit inside it.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
