//! The raw calls this crate makes, each behind a safe function.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `mknod(2)` for device nodes and fifos; `mode` includes the file type bits.
pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cpath(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: p is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev) })
}

/// `lsetxattr(2)`: sets an extended attribute without following symlinks.
pub fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in xattr name"))?;
    // SAFETY: p and n are valid C strings; value's pointer and length describe a live slice.
    check(unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Sets access and modification time of `path` (not following a symlink there).
pub fn set_mtime_nofollow(path: &Path, secs: i64, nanos: i64) -> io::Result<()> {
    let p = cpath(path)?;
    let t = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: nanos as _ };
    let times = [t, t];
    // SAFETY: p is a valid C string and times points to two initialised timespecs.
    check(unsafe {
        libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
    })
}

/// Takes an exclusive `flock(2)` on `file`, waiting for it; released when the file is closed.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor is owned by `file`, which is alive for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        match check(rc) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
