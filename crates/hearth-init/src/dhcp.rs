//! A DHCPv4 client (RFC 2131) for a card on a LAN that gave the VM no static address (a macvtap
//! network without `--ip`), so an image without a DHCP client of its own still gets one. Only
//! for workloads hearth-init supervises: a full-OS image's own init runs its own client.
//!
//! Replies are asked to be broadcast (the card has no address to receive a unicast on yet), read
//! from a UDP socket bound to the card, and parsed with every length checked against the
//! datagram: a reply from the LAN is untrusted input. The lease is renewed at T1 by a thread of
//! its own, and taken again from scratch if the server refuses it or it runs out.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

const OP_REQUEST: u8 = 1;
const OP_REPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The fixed part of a message, before the magic cookie and the options.
const FIXED: usize = 236;
/// Largest reply read: an Ethernet frame's payload.
const MAX_REPLY: usize = 1500;
/// Ask the server to broadcast its replies.
const FLAG_BROADCAST: u16 = 0x8000;

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

const OPT_SUBNET: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE: u8 = 51;
const OPT_MSG_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMS: u8 = 55;
const OPT_RENEWAL: u8 = 58;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;
const OPT_PAD: u8 = 0;

/// What the server leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    /// Seconds; `u32::MAX` is for ever.
    pub lease_secs: u32,
    /// When to renew (T1), seconds.
    pub renew_secs: u32,
}

/// A message to the server.
#[derive(Debug, Clone)]
struct Message<'a> {
    kind: u8,
    xid: u32,
    mac: [u8; 6],
    /// Our address while we renew a lease, else unspecified.
    ciaddr: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    hostname: &'a str,
}

fn encode(m: &Message<'_>) -> Vec<u8> {
    let mut b = vec![0u8; FIXED];
    b[0] = OP_REQUEST;
    b[1] = 1; // Ethernet
    b[2] = 6; // its address length
    b[4..8].copy_from_slice(&m.xid.to_be_bytes());
    if m.ciaddr.is_unspecified() {
        b[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
    }
    b[12..16].copy_from_slice(&m.ciaddr.octets());
    b[28..34].copy_from_slice(&m.mac);
    b.extend_from_slice(&MAGIC);
    let mut opt = |code: u8, data: &[u8]| {
        b.push(code);
        b.push(u8::try_from(data.len()).unwrap_or(u8::MAX));
        b.extend_from_slice(&data[..data.len().min(255)]);
    };
    opt(OPT_MSG_TYPE, &[m.kind]);
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&m.mac);
    opt(OPT_CLIENT_ID, &client_id);
    if let Some(ip) = m.requested {
        opt(OPT_REQUESTED_IP, &ip.octets());
    }
    if let Some(ip) = m.server {
        opt(OPT_SERVER_ID, &ip.octets());
    }
    if !m.hostname.is_empty() {
        opt(OPT_HOSTNAME, m.hostname.as_bytes());
    }
    opt(OPT_PARAMS, &[OPT_SUBNET, OPT_ROUTER, OPT_DNS, OPT_LEASE, OPT_SERVER_ID, OPT_RENEWAL]);
    b.push(OPT_END);
    // Some servers ignore requests shorter than BOOTP's 300 bytes.
    if b.len() < 300 {
        b.resize(300, OPT_PAD);
    }
    b
}

/// A reply to us: its type, the address offered and the options we use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    kind: u8,
    yiaddr: Ipv4Addr,
    subnet: Option<Ipv4Addr>,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    lease: Option<u32>,
    renewal: Option<u32>,
}

fn ip(b: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(b.get(..4)?).ok().map(Ipv4Addr::from)
}

fn secs(b: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(b.get(..4)?).ok().map(u32::from_be_bytes)
}

/// The reply in `buf` if it is one to our transaction `xid` and our `mac`, every length checked.
fn decode(buf: &[u8], xid: u32, mac: [u8; 6]) -> Option<Reply> {
    if buf.len() < FIXED + MAGIC.len() || buf[0] != OP_REPLY || buf[4..8] != xid.to_be_bytes() {
        return None;
    }
    if buf[28..34] != mac || buf[FIXED..FIXED + 4] != MAGIC {
        return None;
    }
    let mut r = Reply {
        kind: 0,
        yiaddr: ip(&buf[16..20])?,
        subnet: None,
        router: None,
        dns: Vec::new(),
        server: None,
        lease: None,
        renewal: None,
    };
    let mut at = FIXED + 4;
    while let Some(&code) = buf.get(at) {
        match code {
            OPT_END => break,
            OPT_PAD => at += 1,
            _ => {
                let len = usize::from(*buf.get(at + 1)?);
                let data = buf.get(at + 2..at + 2 + len)?;
                match code {
                    OPT_MSG_TYPE => r.kind = *data.first()?,
                    OPT_SUBNET => r.subnet = ip(data),
                    OPT_ROUTER => r.router = ip(data),
                    OPT_DNS => r.dns = data.chunks_exact(4).filter_map(ip).take(3).collect(),
                    OPT_SERVER_ID => r.server = ip(data),
                    OPT_LEASE => r.lease = secs(data),
                    OPT_RENEWAL => r.renewal = secs(data),
                    _ => {}
                }
                at += 2 + len;
            }
        }
    }
    (r.kind != 0).then_some(r)
}

/// The prefix length of a netmask; a mask with holes is taken up to its first zero bit.
fn prefix_of(mask: Ipv4Addr) -> u8 {
    u8::try_from(u32::from(mask).leading_ones()).unwrap_or(32)
}

impl Reply {
    fn lease(&self, server: Ipv4Addr) -> Lease {
        let lease_secs = self.lease.unwrap_or(3600);
        Lease {
            address: self.yiaddr,
            prefix: self.subnet.map_or(24, prefix_of),
            router: self.router,
            dns: self.dns.clone(),
            server: self.server.unwrap_or(server),
            lease_secs,
            renew_secs: self.renewal.unwrap_or(lease_secs / 2).min(lease_secs),
        }
    }
}

/// A UDP socket on port 68 of `card`, broadcasting.
fn socket(card: &str) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    crate::sys::inet::bind_to_device(&s, card)?;
    s.set_broadcast(true)?;
    Ok(s)
}

fn transaction_id(mac: [u8; 6]) -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ t ^ std::process::id()
}

/// Sends `m` to `to` (every server: the broadcast address) and waits up to `wait` for a reply
/// of one of the `kinds`.
fn ask(
    s: &UdpSocket,
    to: Ipv4Addr,
    m: &Message<'_>,
    kinds: &[u8],
    wait: Duration,
) -> io::Result<Option<Reply>> {
    s.send_to(&encode(m), SocketAddrV4::new(to, 67))?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; MAX_REPLY];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        s.set_read_timeout(Some(left))?;
        match s.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some(r) = decode(&buf[..n], m.xid, m.mac).filter(|r| kinds.contains(&r.kind))
                {
                    return Ok(Some(r));
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Discovers a server and takes the lease it offers, retrying (1, 2, 4 s...) for up to `within`.
pub fn acquire(card: &str, mac: [u8; 6], hostname: &str, within: Duration) -> io::Result<Lease> {
    let s = socket(card)?;
    // `None`: for as long as it takes.
    let deadline = Instant::now().checked_add(within);
    let mut wait = Duration::from_secs(1);
    while deadline.is_none_or(|d| Instant::now() < d) {
        let xid = transaction_id(mac);
        let m = Message {
            kind: DISCOVER,
            xid,
            mac,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested: None,
            server: None,
            hostname,
        };
        let wait_now =
            deadline.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
        wait = (wait * 2).min(Duration::from_secs(8));
        let Some(offer) = ask(&s, Ipv4Addr::BROADCAST, &m, &[OFFER], wait_now)? else { continue };
        let Some(server) = offer.server else { continue };
        let m = Message { kind: REQUEST, requested: Some(offer.yiaddr), server: Some(server), ..m };
        match ask(&s, Ipv4Addr::BROADCAST, &m, &[ACK, NAK], Duration::from_secs(4))? {
            Some(r) if r.kind == ACK => return Ok(r.lease(server)),
            _ => continue,
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no DHCP server answered on {card}")))
}

/// Asks for `lease` to be extended: of its server (RENEWING), or with `rebind` of any server
/// (REBINDING, a broadcast). The renewed lease, `Ok(None)` when refused (NAK) or not answered.
pub fn renew(
    card: &str,
    mac: [u8; 6],
    hostname: &str,
    lease: &Lease,
    rebind: bool,
) -> io::Result<Option<Lease>> {
    let s = socket(card)?;
    let m = Message {
        kind: REQUEST,
        xid: transaction_id(mac),
        mac,
        ciaddr: lease.address,
        requested: None,
        server: None,
        hostname,
    };
    let to = if rebind { Ipv4Addr::BROADCAST } else { lease.server };
    Ok(match ask(&s, to, &m, &[ACK, NAK], Duration::from_secs(4))? {
        Some(r) if r.kind == ACK && r.yiaddr == lease.address => Some(r.lease(lease.server)),
        _ => None,
    })
}

/// Keeps `lease` on `card` for as long as the VM runs: renews it with its server at T1 (then
/// every minute), with any server past T2 (7/8 of the lease), and when it is refused or runs out
/// takes a new one, calling `apply` with each lease whose address or settings changed.
pub fn keep(
    card: String,
    mac: [u8; 6],
    hostname: String,
    mut lease: Lease,
    apply: impl Fn(&Lease),
) {
    loop {
        if lease.lease_secs == u32::MAX {
            return;
        }
        let got = Instant::now();
        let expires = got + Duration::from_secs(u64::from(lease.lease_secs));
        let rebind_at = got + Duration::from_secs(u64::from(lease.lease_secs) / 8 * 7);
        std::thread::sleep(Duration::from_secs(u64::from(lease.renew_secs.max(10))));
        let next = loop {
            match renew(&card, mac, &hostname, &lease, Instant::now() >= rebind_at) {
                Ok(Some(l)) => break Some(l),
                Ok(None) | Err(_) if Instant::now() + Duration::from_secs(60) < expires => {
                    std::thread::sleep(Duration::from_secs(60));
                }
                _ => break None,
            }
        };
        let next = match next {
            Some(l) => l,
            None => match acquire(&card, mac, &hostname, Duration::from_secs(60)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("hearth-init: network: {e}; trying again");
                    continue;
                }
            },
        };
        if next.address != lease.address || next.router != lease.router || next.dns != lease.dns {
            apply(&next);
        }
        lease = next;
    }
}

/// A MAC address from its text form.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> =
        s.trim().split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    <[u8; 6]>::try_from(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    /// A server's reply, as dnsmasq sends one.
    fn reply(kind: u8, xid: u32, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; FIXED];
        b[0] = OP_REPLY;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&xid.to_be_bytes());
        b[16..20].copy_from_slice(&[192, 168, 77, 50]);
        b[28..34].copy_from_slice(&MAC);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[OPT_MSG_TYPE, 1, kind]);
        for (code, data) in options {
            b.push(*code);
            b.push(data.len() as u8);
            b.extend_from_slice(data);
        }
        b.push(OPT_END);
        b
    }

    #[test]
    fn a_discover_asks_for_a_broadcast_reply_and_what_the_guest_needs() {
        let m = Message {
            kind: DISCOVER,
            xid: 0x1234_5678,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested: None,
            server: None,
            hostname: "web",
        };
        let b = encode(&m);
        assert_eq!((b[0], b[1], b[2]), (OP_REQUEST, 1, 6));
        assert_eq!(&b[4..8], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&b[10..12], &[0x80, 0], "the broadcast flag");
        assert_eq!(&b[28..34], &MAC);
        assert_eq!(&b[FIXED..FIXED + 4], &MAGIC);
        assert_eq!(&b[FIXED + 4..FIXED + 7], &[OPT_MSG_TYPE, 1, DISCOVER]);
        assert!(b.windows(5).any(|w| w == [OPT_HOSTNAME, 3, b'w', b'e', b'b']));
        assert!(b.len() >= 300);
        // A renewal says its address and is answered to it.
        let r = encode(&Message { kind: REQUEST, ciaddr: Ipv4Addr::new(10, 1, 2, 3), ..m });
        assert_eq!(&r[12..16], &[10, 1, 2, 3]);
        assert_eq!(&r[10..12], &[0, 0]);
    }

    #[test]
    fn an_ack_gives_the_lease_with_its_mask_router_resolvers_and_times() {
        let b = reply(
            ACK,
            9,
            &[
                (OPT_SUBNET, &[255, 255, 255, 0]),
                (OPT_ROUTER, &[192, 168, 77, 1, 192, 168, 77, 2]),
                (OPT_DNS, &[1, 1, 1, 1, 9, 9, 9, 9]),
                (OPT_SERVER_ID, &[192, 168, 77, 1]),
                (OPT_LEASE, &7200u32.to_be_bytes()),
            ],
        );
        let r = decode(&b, 9, MAC).expect("a reply");
        let lease = r.lease(Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            lease,
            Lease {
                address: Ipv4Addr::new(192, 168, 77, 50),
                prefix: 24,
                router: Some(Ipv4Addr::new(192, 168, 77, 1)),
                dns: vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)],
                server: Ipv4Addr::new(192, 168, 77, 1),
                lease_secs: 7200,
                renew_secs: 3600,
            }
        );
    }

    #[test]
    fn replies_to_others_and_malformed_ones_are_ignored() {
        let good = reply(OFFER, 9, &[(OPT_SERVER_ID, &[10, 0, 0, 1])]);
        assert!(decode(&good, 9, MAC).is_some());
        assert!(decode(&good, 10, MAC).is_none(), "another transaction");
        assert!(decode(&good, 9, [2, 0, 0, 0, 0, 8]).is_none(), "another card");
        let mut request = good.clone();
        request[0] = OP_REQUEST;
        assert!(decode(&request, 9, MAC).is_none(), "not a reply");
        // Every cut of it is either still whole enough or refused: never read past its end.
        for n in 0..good.len() {
            let _ = decode(&good[..n], 9, MAC);
        }
        // An option whose length runs past the datagram.
        let mut long = reply(OFFER, 9, &[]);
        long.pop();
        long.extend_from_slice(&[OPT_DNS, 200, 1, 2, 3, 4]);
        assert!(decode(&long, 9, MAC).is_none());
        // No message type: not a DHCP reply.
        let mut bootp = good.clone();
        bootp.truncate(FIXED + 4);
        bootp.push(OPT_END);
        assert!(decode(&bootp, 9, MAC).is_none());
    }

    #[test]
    fn masks_and_macs_parse() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 240, 0)), 20);
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), 32);
        assert_eq!(prefix_of(Ipv4Addr::UNSPECIFIED), 0);
        assert_eq!(parse_mac("02:00:00:00:00:07"), Some(MAC));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:07"), None);
    }
}
