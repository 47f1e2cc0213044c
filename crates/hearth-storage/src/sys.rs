//! The raw calls this crate makes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FICLONE`: share all extents of `src` with `dest` (btrfs, xfs, bcachefs).
pub fn ficlone(dest: &File, src: &File) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open files owned by the caller for the whole call; FICLONE
    // takes the source fd as its integer argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek` with SEEK_DATA / SEEK_HOLE; `Ok(None)` at end of file (ENXIO).
pub fn seek(f: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: lseek on an fd we own; no memory is passed.
    let rc = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Copies `len` bytes at `off` from `src` to the same offset in `dest`, in the kernel.
pub fn copy_range(src: &File, dest: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (off + done) as libc::loff_t;
        let mut off_out = off_in;
        // SAFETY: the offsets are locals we own; both fds are open for the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dest.as_raw_fd(),
                &mut off_out,
                (len - done) as usize,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early"));
        }
        done += n as u64;
    }
    Ok(())
}

pub use hearth_fs::ioctl_buf;
