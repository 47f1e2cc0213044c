//! The raw calls this crate makes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Makes the child `cmd` starts die (SIGKILL) with the thread that starts it, so a tool
/// (mkfs.ext4, e2fsck, resize2fs) never outlives a daemon killed mid-build to race the next
/// attempt. The caller must wait for the child on the same thread, as `Command::output` does:
/// the signal follows the thread, not the process.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and makes only the async-signal-safe
    // prctl(2) and getppid(2) calls; it touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may already have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}

/// `ioctl(fd, request, buf)` with a buffer the kernel reads and rewrites in place
/// (device-mapper's `struct dm_ioctl` and its data, a loop device's `struct loop_config`).
/// Returns the ioctl's non-negative result.
pub fn ioctl_buf(f: &File, request: libc::c_ulong, buf: &mut [u8]) -> io::Result<i32> {
    // SAFETY: `buf` is exclusively borrowed for the call and the structure it holds gives the
    // kernel its own length (device-mapper's data_size is set to buf.len() by the caller; a
    // loop_config has the fixed size the request encodes), so the kernel writes within it.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `ioctl(fd, request, arg)` with an integer argument (`LOOP_CTL_GET_FREE`, `LOOP_CLR_FD`).
pub fn ioctl_int(f: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the argument is passed by value; no memory of ours is touched.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Gives SIGPIPE its default action back (Rust ignores it), so a command-line tool whose
/// output pipe closes ends quietly, as other tools do. Call it before starting threads.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no handler of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State letter of a process, `None` once it is gone.
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 1..].trim_start().chars().next()
    }

    #[test]
    fn the_child_dies_with_the_thread_that_started_it() {
        let ok = die_with_parent(&mut Command::new("true")).output().expect("true");
        assert!(ok.status.success(), "a child that is waited for runs normally");
        // A thread starts a long child and ends without waiting for it: the child is killed.
        let mut child = std::thread::spawn(|| {
            die_with_parent(&mut Command::new("sleep")).arg("30").spawn().expect("sleep")
        })
        .join()
        .expect("thread");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !matches!(state(child.id()), Some('Z') | None) {
            assert!(std::time::Instant::now() < deadline, "the child outlived its parent thread");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = child.wait().expect("reap");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
