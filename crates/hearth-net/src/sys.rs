//! The one raw call hearth-net makes: making a persistent tap (`/dev/net/tun` ioctls), for VMMs
//! that open an existing tap rather than create one (Firecracker, Cloud Hypervisor).

use std::io;
use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes the tap `name` (persistent, so it outlives this call until deleted), owned by `owner`
/// when given so an unprivileged VMM may open it. An existing tap is kept.
pub fn create_tap(name: &str, owner: Option<u32>) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad tap name {name:?}")));
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = tun.as_raw_fd();
    // SAFETY: req is a valid, initialised ifreq-sized struct for the whole call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes the uid by value.
        if unsafe { libc::ioctl(fd, TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: TUNSETPERSIST takes a flag by value.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_request_is_the_kernels_ifreq_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
