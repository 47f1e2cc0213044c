//! The raw calls this crate makes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in path"))
}

/// `mknod(2)` for device nodes and fifos.
pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cpath(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: p is a valid C string for the duration of the call.
    if unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lsetxattr(2)`: sets an extended attribute without following symlinks.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in xattr name"))?;
    // SAFETY: p and n are valid C strings; value's pointer and length describe a live slice.
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
