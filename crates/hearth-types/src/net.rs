//! A VM's network: the mode, published ports, the guest's address and its SSH access.
//!
//! The `user` mode is the VMM's user-mode NAT (QEMU's slirp): the guest sits alone on a private
//! 10.0.2.0/24 behind the host's own stack, and published ports are forwarded from host sockets.
//! It needs no root, no bridge and changes nothing on the host (docs/adr/0007-user-networking.md).
//! The `bridge` mode puts every VM's tap on one host bridge (`hearth0`, 10.61.0.0/16, the host
//! at .0.1), so VMs reach each other and the host reaches them directly; outbound traffic is
//! NATed (docs/adr/0009-bridge-network.md).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::id::VmId;

/// The guest's address, prefix, gateway and resolver in the `user` mode (QEMU's defaults).
pub const USER_NET_ADDRESS: &str = "10.0.2.15";
pub const USER_NET_PREFIX: u8 = 24;
pub const USER_NET_GATEWAY: &str = "10.0.2.2";
pub const USER_NET_DNS: &str = "10.0.2.3";
/// The bridge of the `bridge` mode, the host's address on it (the VMs' gateway) and the prefix.
pub const BRIDGE_NAME: &str = "hearth0";
pub const BRIDGE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 61, 0, 1);
pub const BRIDGE_PREFIX: u8 = 16;
/// The guest port `hearth ssh` reaches.
pub const SSH_PORT: u16 = 22;
/// Longest public key line accepted (RSA 16384 is about 2.8 KiB).
pub const MAX_SSH_KEY: usize = 8 << 10;

/// How the VM reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// User-mode NAT through the VMM; ports published from host sockets.
    #[default]
    User,
    /// A tap on the host bridge, with an address of its own from the bridge's subnet.
    Bridge,
    /// No network device at all.
    None,
    /// A macvtap on a host interface ([`crate::VmSpec::macvtap_parent`]): the VM is on the
    /// host's LAN with its own MAC and takes its address there.
    Macvtap,
}

impl std::str::FromStr for NetworkMode {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" | "" => Ok(Self::User),
            "none" => Ok(Self::None),
            "bridge" => Ok(Self::Bridge),
            "macvtap" => Ok(Self::Macvtap),
            other => Err(NetError::Mode(other.to_owned())),
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Bridge => "bridge",
            Self::None => "none",
            Self::Macvtap => "macvtap",
        })
    }
}

/// Transport of a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A host socket forwarded to a guest port (`-p [IP:]HOST:GUEST[/PROTO]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// Host address to listen on; all addresses (`0.0.0.0`) when the user gives none, as docker.
    pub host_ip: String,
    pub host_port: u16,
    pub guest_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = match self.host_ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => self.host_ip.clone(),
        };
        write!(f, "{ip}:{}->{}/{}", self.host_port, self.guest_port, self.protocol)
    }
}

impl PortMapping {
    /// Whether two mappings claim the same host socket: one protocol and port, and the same
    /// address or an unspecified one (which takes every address).
    pub fn overlaps(&self, other: &PortMapping) -> bool {
        let any = |ip: &str| ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip == other.host_ip || any(&self.host_ip) || any(&other.host_ip))
    }
}

/// Why a network setting was refused. Each message names the flag and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("--network must be user, bridge, none or macvtap[:IFACE], got {0:?}")]
    Mode(String),
    #[error("-p {0:?}: expected [IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], e.g. 8080:80 or 127.0.0.1:8080:80/tcp")]
    PortSyntax(String),
    #[error("-p {0:?}: {1:?} is not a port number between 1 and 65535")]
    PortNumber(String, String),
    #[error("-p {0:?}: {1:?} is not an IP address")]
    PortAddress(String, String),
    #[error("-p {0:?}: the protocol must be tcp or udp")]
    PortProtocol(String),
    #[error("host port {0} is published twice; give each -p its own host port")]
    PortTwice(String),
    #[error("ports and SSH need a network: drop --network none, or drop -p and --ssh")]
    NeedsNetwork,
    #[error("-p {0}: --network bridge publishes on IPv4 host addresses only; give an IPv4 address or none")]
    PortV6OnBridge(String),
    #[error("address {0} is not a host address of the bridge network {BRIDGE_GATEWAY}/{BRIDGE_PREFIX} (the gateway {BRIDGE_GATEWAY} is the host's)")]
    BridgeAddress(String),
    #[error("the bridge network {BRIDGE_GATEWAY}/{BRIDGE_PREFIX} has no free address left; remove VMs that use it")]
    BridgeFull,
    #[error("MAC address {0:?} must be six hex octets like 02:00:00:00:00:01, unicast (first octet even)")]
    Mac(String),
    #[error(
        "--ssh: the public key must be one line like \"ssh-ed25519 AAAA... comment\" (got {0})"
    )]
    SshKey(String),
}

impl std::str::FromStr for PortMapping {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NetError::PortSyntax(s.to_owned());
        let (rest, protocol) = match s.rsplit_once('/') {
            Some((r, "tcp")) => (r, Protocol::Tcp),
            Some((r, "udp")) => (r, Protocol::Udp),
            Some(_) => return Err(NetError::PortProtocol(s.to_owned())),
            None => (s, Protocol::Tcp),
        };
        let (front, guest) = rest.rsplit_once(':').ok_or_else(syntax)?;
        let (ip, host) = match front.rsplit_once(':') {
            Some((ip, host)) => (ip.trim_start_matches('[').trim_end_matches(']'), host),
            None => ("0.0.0.0", front),
        };
        if ip.is_empty() {
            return Err(syntax());
        }
        ip.parse::<IpAddr>().map_err(|_| NetError::PortAddress(s.to_owned(), ip.to_owned()))?;
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(NetError::PortNumber(s.to_owned(), p.to_owned())),
        };
        Ok(Self {
            host_ip: ip.to_owned(),
            host_port: port(host)?,
            guest_port: port(guest)?,
            protocol,
        })
    }
}

/// Checks a VM's network settings together.
pub fn validate(
    mode: NetworkMode,
    ports: &[PortMapping],
    ssh_key: Option<&str>,
) -> Result<(), NetError> {
    if mode == NetworkMode::None && (!ports.is_empty() || ssh_key.is_some()) {
        return Err(NetError::NeedsNetwork);
    }
    if let Some(p) = ports.iter().find(|p| mode == NetworkMode::Bridge && p.host_ip.contains(':')) {
        return Err(NetError::PortV6OnBridge(p.to_string()));
    }
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q.host_port == p.host_port && q.protocol == p.protocol) {
            return Err(NetError::PortTwice(format!("{}/{}", p.host_port, p.protocol)));
        }
    }
    if let Some(key) = ssh_key {
        validate_ssh_key(key)?;
    }
    Ok(())
}

/// A public key as `authorized_keys` holds it: one line, a known key type, base64 data.
pub fn validate_ssh_key(key: &str) -> Result<(), NetError> {
    let bad = |why: &str| Err(NetError::SshKey(why.to_owned()));
    if key.len() > MAX_SSH_KEY {
        return bad("a key longer than 8 KiB");
    }
    if key.trim().contains(['\n', '\r']) {
        return bad("more than one line");
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(data)) = (parts.next(), parts.next()) else {
        return bad("fewer than two fields");
    };
    let known =
        kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    if !known {
        return bad(&format!("unknown key type {kind:?}; is this a private key?"));
    }
    if !data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
        return bad("key data that is not base64");
    }
    Ok(())
}

/// The bridge subnet's network and broadcast addresses, as numbers.
fn bridge_range() -> (u32, u32) {
    let mask = u32::MAX << (32 - u32::from(BRIDGE_PREFIX));
    let net = u32::from(BRIDGE_GATEWAY) & mask;
    (net, net | !mask)
}

/// An IPv4 network, A.B.C.D/N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        u32::from(a) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network like 10.61.200.0/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Self { addr: a.parse().map_err(|_| bad())?, prefix })
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The lowest address of the bridge's subnet that is not the gateway, the network, the
/// broadcast, in `used` or in one of the `reserved` networks (kube-vip's control-plane
/// addresses, say: a VM may still ask for one of those by name).
pub fn allocate_bridge_address(
    used: &[Ipv4Addr],
    reserved: &[Ipv4Net],
) -> Result<Ipv4Addr, NetError> {
    let used: std::collections::HashSet<Ipv4Addr> = used.iter().copied().collect();
    let (net, broadcast) = bridge_range();
    (net + 1..broadcast)
        .map(Ipv4Addr::from)
        .find(|a| {
            *a != BRIDGE_GATEWAY && !used.contains(a) && !reserved.iter().any(|r| r.contains(*a))
        })
        .ok_or(NetError::BridgeFull)
}

/// Checks an address asked for on the bridge: inside the subnet, not its network, broadcast or
/// gateway address.
pub fn check_bridge_address(a: Ipv4Addr) -> Result<(), NetError> {
    let (net, broadcast) = bridge_range();
    let x = u32::from(a);
    if !(net + 1..broadcast).contains(&x) || a == BRIDGE_GATEWAY {
        return Err(NetError::BridgeAddress(a.to_string()));
    }
    Ok(())
}

/// The tap device of a VM on the bridge (at most 15 bytes, as IFNAMSIZ allows).
pub fn tap_name(id: &VmId) -> String {
    format!("ht{}", &id.as_str()[..12])
}

/// A MAC address a VM's card can take: six `:`-separated hex octets, not multicast.
pub fn validate_mac(mac: &str) -> Result<(), NetError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let hex = octets.len() == 6
        && octets.iter().all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    match u8::from_str_radix(octets[0], 16) {
        Ok(first) if hex && first & 1 == 0 => Ok(()),
        _ => Err(NetError::Mac(mac.to_owned())),
    }
}

/// The VM's MAC address: locally administered, unicast, derived from its id so it stays the
/// same for the VM's life without being stored.
pub fn mac_for(id: &VmId) -> String {
    let hex: Vec<char> = id.as_str().chars().chain(std::iter::repeat('0')).take(10).collect();
    let pairs: Vec<String> = hex.chunks(2).map(|c| c.iter().collect()).collect();
    format!("02:{}", pairs.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_addresses_are_the_lowest_free_after_the_gateway() {
        assert_eq!(allocate_bridge_address(&[], &[]), Ok(Ipv4Addr::new(10, 61, 0, 2)));
        let used = [Ipv4Addr::new(10, 61, 0, 2), Ipv4Addr::new(10, 61, 0, 4)];
        assert_eq!(allocate_bridge_address(&used, &[]), Ok(Ipv4Addr::new(10, 61, 0, 3)));
        // Reserved networks are never handed out.
        let reserved: [Ipv4Net; 2] =
            ["10.61.0.0/30".parse().expect("net"), "10.61.0.5/32".parse().expect("net")];
        assert_eq!(allocate_bridge_address(&used, &reserved), Ok(Ipv4Addr::new(10, 61, 0, 6)));
        assert!(
            "10.61.0.0/33".parse::<Ipv4Net>().is_err() && "10.61.0.0".parse::<Ipv4Net>().is_err()
        );
        assert!(tap_name(&VmId::from_bytes([0xab; 8])).len() <= 15);
        assert!(check_bridge_address(Ipv4Addr::new(10, 61, 3, 7)).is_ok());
        for bad in
            [[10, 61, 0, 1], [10, 61, 0, 0], [10, 61, 255, 255], [10, 62, 0, 5], [192, 168, 1, 2]]
        {
            assert!(check_bridge_address(Ipv4Addr::from(bad)).is_err(), "{bad:?}");
        }
        assert_eq!("bridge".parse::<NetworkMode>(), Ok(NetworkMode::Bridge));
        let p: PortMapping = "8080:80".parse().expect("port");
        assert_eq!(validate(NetworkMode::Bridge, &[p], None), Ok(()));
        let v6: PortMapping = "[::1]:8080:80".parse().expect("port");
        assert!(matches!(
            validate(NetworkMode::Bridge, &[v6], None),
            Err(NetError::PortV6OnBridge(_))
        ));
    }

    #[test]
    fn macs_must_be_six_hex_octets_and_unicast() {
        assert!(validate_mac("02:ab:cd:00:11:22").is_ok());
        assert!(validate_mac("AA:BB:CC:DD:EE:F0").is_ok());
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:22:33",
            "01:00:5e:00:00:01",
            "02-ab-cd-00-11-22",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert_eq!(validate_mac(bad), Err(NetError::Mac(bad.to_owned())), "{bad}");
        }
    }

    fn pm(s: &str) -> Result<PortMapping, NetError> {
        s.parse()
    }

    #[test]
    fn ports_parse_like_docker() {
        let p = pm("8080:80").expect("valid");
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.guest_port, p.protocol),
            ("0.0.0.0", 8080, 80, Protocol::Tcp)
        );
        let p = pm("127.0.0.1:5353:53/udp").expect("valid");
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.guest_port, p.protocol),
            ("127.0.0.1", 5353, 53, Protocol::Udp)
        );
        let p = pm("[::1]:2222:22").expect("valid");
        assert_eq!(p.host_ip, "::1");
        assert_eq!(p.to_string(), "[::1]:2222->22/tcp");
        assert_eq!(pm("8080:80").expect("valid").to_string(), "0.0.0.0:8080->80/tcp");
    }

    #[test]
    fn bad_ports_name_the_problem() {
        for (s, want) in [
            ("80", "expected [IP:]HOST_PORT:GUEST_PORT"),
            ("0:80", "\"0\" is not a port"),
            ("8080:70000", "\"70000\" is not a port"),
            ("x:80", "\"x\" is not a port"),
            ("host:1:2", "\"host\" is not an IP"),
            ("1:2/sctp", "tcp or udp"),
            (":1:2", "expected"),
        ] {
            let e = pm(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn settings_are_checked_together() {
        let p = vec![pm("1:2").expect("valid"), pm("1:3").expect("valid")];
        assert_eq!(validate(NetworkMode::User, &p, None), Err(NetError::PortTwice("1/tcp".into())));
        let p = vec![pm("1:2").expect("valid"), pm("1:2/udp").expect("valid")];
        assert_eq!(validate(NetworkMode::User, &p, None), Ok(()));
        assert_eq!(validate(NetworkMode::None, &p, None), Err(NetError::NeedsNetwork));
        assert_eq!(
            validate(NetworkMode::None, &[], Some("ssh-ed25519 AAAA")),
            Err(NetError::NeedsNetwork)
        );
        assert_eq!(validate(NetworkMode::None, &[], None), Ok(()));
    }

    #[test]
    fn ssh_keys_are_single_public_key_lines() {
        assert_eq!(validate_ssh_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI+/= me@host"), Ok(()));
        assert_eq!(validate_ssh_key("ecdsa-sha2-nistp256 AAAAE2Vj\n"), Ok(()));
        for bad in [
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc",
            "ssh-ed25519",
            "ssh-rsa AAA\nssh-rsa BBB",
            "ssh-rsa AA$A",
        ] {
            assert!(validate_ssh_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_ssh_key("-----BEGIN OPENSSH PRIVATE KEY----- x")
            .expect_err("private")
            .to_string()
            .contains("private key"));
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let id = VmId::from_bytes([0xab; 8]);
        assert_eq!(mac_for(&id), "02:ab:ab:ab:ab:ab");
        assert_eq!(mac_for(&id), mac_for(&id));
    }

    #[test]
    fn published_ports_overlap_on_one_protocol_port_and_address() {
        let p = |s: &str| s.parse::<PortMapping>().expect("port");
        assert!(p("8080:80").overlaps(&p("127.0.0.1:8080:81")), "0.0.0.0 takes every address");
        assert!(p("127.0.0.1:8080:80").overlaps(&p("127.0.0.1:8080:90")));
        assert!(!p("127.0.0.1:8080:80").overlaps(&p("127.0.0.2:8080:80")));
        assert!(!p("8080:80").overlaps(&p("8081:80")));
        assert!(!p("8080:80/udp").overlaps(&p("8080:80/tcp")));
    }
}
