//! Interface and route ioctls on an inet socket (SIOCSIFADDR, SIOCSIFFLAGS, SIOCADDRT): the
//! guest's network set-up without netlink.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct rtentry` from linux/route.h (libc has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn inet(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes, and every bit pattern is a valid
    // sockaddr; this is the cast the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(r)
}

/// An inet datagram socket for interface and route ioctls.
pub struct Sock(OwnedFd);

impl Sock {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned by the OwnedFd from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// An interface ioctl that reads and writes one `ifreq`.
    fn ifr(&self, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: r is a valid ifreq for the whole call; every SIOC[GS]IF* ioctl used here takes
        // a pointer to one.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req, r as *mut libc::ifreq) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Brings the interface up.
    pub fn up(&self, name: &str) -> io::Result<()> {
        let mut r = ifreq(name)?;
        self.ifr(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ifr(libc::SIOCSIFFLAGS, &mut r)
    }

    /// Gives the interface an address and netmask.
    pub fn set_addr(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = inet(addr);
        self.ifr(libc::SIOCSIFADDR, &mut r)?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
        r.ifr_ifru.ifru_netmask = inet(Ipv4Addr::from(mask));
        self.ifr(libc::SIOCSIFNETMASK, &mut r)
    }

    /// Gives the (Ethernet) interface the MAC `mac`.
    pub fn set_mac(&self, name: &str, mac: [u8; 6]) -> io::Result<()> {
        let mut r = ifreq(name)?;
        // SAFETY: sockaddr is plain data; all zeroes is valid.
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = hw;
        self.ifr(libc::SIOCSIFHWADDR, &mut r)
    }

    /// Adds the default route through `gateway` (one already there is fine).
    pub fn default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: inet(Ipv4Addr::UNSPECIFIED),
            rt_gateway: inet(gateway),
            rt_genmask: inet(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: rt is a valid, fully initialised rtentry for the duration of the call.
        let rc =
            unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT, &mut rt as *mut RtEntry) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Binds `s` to the interface `name` (SO_BINDTODEVICE): it sends and hears only there, which is
/// how a DHCP client talks on a card that has no address yet.
pub fn bind_to_device(s: &std::net::UdpSocket, name: &str) -> io::Result<()> {
    let r = ifreq(name)?;
    // SAFETY: the option value is the interface name in ifr_name, NUL-terminated (ifreq zeroed
    // it and the name is shorter than IFNAMSIZ), and the length passed is that buffer's.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            r.ifr_name.as_ptr().cast(),
            libc::IFNAMSIZ as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_are_network_order() {
        let sa = inet(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[2..6], &[10, 0, 2, 15]);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120, "the kernel's struct rtentry on 64-bit");
    }

    #[test]
    fn interface_names_are_bounded() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-far-too-long").is_err());
    }
}
