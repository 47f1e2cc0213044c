//! hearth's bridged network on the host (`--network bridge`): one Linux bridge with the
//! gateway address, each VM's tap attached to it, and outbound NAT for the subnet.
//!
//! Links and addresses are set over rtnetlink, natively. The NAT rule lives in an nftables table
//! of hearth's own (`ip hearth`), written whole and atomically with `nft -f`, so setting it up
//! twice is the same as once and removing the table removes everything hearth added. QEMU
//! creates each VM's tap itself (not persistent), so a tap cannot outlive its VMM; for VMMs that
//! open an existing tap, [`create_tap`] makes a persistent one that [`remove_tap`] deletes.
//!
//! A VM on the host's LAN (`--network macvtap:IFACE`, Flintlock's MACVTAP) gets a macvtap in
//! bridge mode on that interface with the VM's MAC ([`ensure_macvtap`]); the VMM is handed its
//! character device, `/dev/tapN` (N its interface index), as an open descriptor.
#![deny(unsafe_code)]

// The only module with raw system calls (unsafe code is denied everywhere else).
#[allow(unsafe_code)]
mod sys;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkMacVtap, LinkUnspec};

/// The nftables table holding hearth's rules.
pub const NFT_TABLE: &str = "hearth";

/// Why a network operation failed; each names the link or tool involved.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{what} {link}: {source}")]
    Netlink {
        what: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the link {0} did not appear (was the VMM started with this tap?)")]
    NoLink(String),
    #[error("creating the tap {tap} (is /dev/net/tun there? modprobe tun): {source}")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("running nft (install Debian's nftables package): {0}")]
    NftMissing(#[source] std::io::Error),
    #[error("nft refused hearth's NAT rules: {0}")]
    Nft(String),
    #[error("this kernel has no macvtap (load it: modprobe macvtap), so {link} cannot be made")]
    NoMacvtap { link: String },
    #[error("the host interface {0} does not exist: name the host's NIC (see `ip link`)")]
    NoParent(String),
    #[error("enabling IPv4 forwarding ({path}): {source}")]
    Forwarding {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bridge and its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// The host's address on the bridge: the VMs' default gateway.
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Bridge {
    /// hearth's bridge, `hearth0` on 10.61.0.0/16 (hearth_types::net's constants).
    pub fn hearth0() -> Self {
        use hearth_types::net::{BRIDGE_GATEWAY, BRIDGE_NAME, BRIDGE_PREFIX};
        Self { name: BRIDGE_NAME.into(), gateway: BRIDGE_GATEWAY, prefix: BRIDGE_PREFIX }
    }

    /// The subnet in CIDR notation.
    pub fn subnet(&self) -> String {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
        format!("{}/{}", Ipv4Addr::from(u32::from(self.gateway) & mask), self.prefix)
    }
}

async fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(NetError::Netlink { what: "looking up", link: name.to_owned(), source }),
    }
}

/// Creates the bridge with its gateway address if missing, brings it up, enables forwarding (and
/// loopback-sourced routing on the bridge, for ports published on 127.0.0.1), and writes the NAT
/// table when there is none (an existing one holds the daemon's port forwards). Idempotent.
pub async fn ensure_bridge(b: &Bridge) -> Result<(), NetError> {
    let h = connect().await?;
    let netlink = |what, source| NetError::Netlink { what, link: b.name.clone(), source };
    let index = match link_index(&h, &b.name).await? {
        Some(i) => i,
        None => {
            match h.link().add(LinkBridge::new(&b.name).up().build()).execute().await {
                Err(e) if errno(&e) != Some(libc::EEXIST) => {
                    return Err(netlink("creating bridge", e))
                }
                _ => {}
            }
            link_index(&h, &b.name).await?.ok_or_else(|| NetError::NoLink(b.name.clone()))?
        }
    };
    match h.address().add(index, IpAddr::V4(b.gateway), b.prefix).execute().await {
        Err(e) if errno(&e) != Some(libc::EEXIST) => {
            return Err(netlink("adding the gateway address to", e))
        }
        _ => {}
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink("bringing up", e))?;
    enable_forwarding(&b.name)?;
    if !nat_table_exists() {
        write_nat(b, &[])?;
    }
    Ok(())
}

/// A published port: host address (any local address when `None`) and port to a guest's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_ip: Ipv4Addr,
    pub guest_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Who the rule is for (a VM id), kept in the rule's comment.
    pub owner: String,
}

/// Makes the persistent tap `name` for a VMM that opens an existing one (kept if it exists).
pub fn create_tap(name: &str, owner: Option<u32>) -> Result<(), NetError> {
    sys::create_tap(name, owner).map_err(|source| NetError::Tap { tap: name.to_owned(), source })
}

/// Attaches a VM's tap to the bridge and brings it up; waits up to 5 s for the tap to appear.
pub async fn attach(tap: &str, bridge: &str) -> Result<(), NetError> {
    let h = connect().await?;
    let br = link_index(&h, bridge).await?.ok_or_else(|| NetError::NoLink(bridge.to_owned()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let index = loop {
        if let Some(i) = link_index(&h, tap).await? {
            break i;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(NetError::NoLink(tap.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    h.link()
        .set(LinkUnspec::new_with_index(index).controller(br).up().build())
        .execute()
        .await
        .map_err(|source| NetError::Netlink {
            what: "attaching to the bridge",
            link: tap.to_owned(),
            source,
        })
}

/// Makes sure a VM's tap is gone once its VMM has exited: the kernel unregisters a
/// non-persistent tap shortly after the last descriptor closes; one still there after `wait` is
/// deleted. Returns whether it had to be deleted.
pub async fn remove_tap(tap: &str, wait: Duration) -> Result<bool, NetError> {
    let h = connect().await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Some(index) = link_index(&h, tap).await? else { return Ok(false) };
        if tokio::time::Instant::now() > deadline {
            return match h.link().del(index).execute().await {
                Err(e) if errno(&e) != Some(libc::ENODEV) => {
                    Err(NetError::Netlink { what: "deleting", link: tap.to_owned(), source: e })
                }
                _ => Ok(true),
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes the macvtap `name` (bridge mode: VMs on one interface reach each other too) on the host
/// interface `parent` with `mac`, up, unless one of that name is there already on that parent
/// with that MAC (a stopped VM's, kept for its next start); a stale one is replaced. Returns its
/// character device, `/dev/tapN`, once devtmpfs has made it.
pub async fn ensure_macvtap(
    name: &str,
    parent: &str,
    mac: &str,
) -> Result<std::path::PathBuf, NetError> {
    let h = connect().await?;
    let netlink = |what, source| NetError::Netlink { what, link: name.to_owned(), source };
    let lower = link_index(&h, parent).await?.ok_or_else(|| NetError::NoParent(parent.into()))?;
    let bytes =
        mac_bytes(mac).ok_or_else(|| NetError::NoLink(format!("{name} (bad MAC {mac})")))?;
    if let Some(index) = link_index(&h, name).await? {
        if macvtap_matches(name, lower, mac) {
            return tap_device(index).await;
        }
        h.link().del(index).execute().await.map_err(|e| netlink("replacing", e))?;
    }
    let add = LinkMacVtap::new(name, lower, rtnetlink::packet_route::link::MacVtapMode::Bridge)
        .address(bytes)
        .up()
        .build();
    match h.link().add(add).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
            return Err(NetError::NoMacvtap { link: name.to_owned() })
        }
        Err(e) => return Err(netlink("creating the macvtap", e)),
    }
    let index = link_index(&h, name).await?.ok_or_else(|| NetError::NoLink(name.to_owned()))?;
    tap_device(index).await
}

/// Deletes the macvtap (or any link) `name`, if there; returns whether it was.
pub async fn remove_macvtap(name: &str) -> Result<bool, NetError> {
    let h = connect().await?;
    let Some(index) = link_index(&h, name).await? else { return Ok(false) };
    match h.link().del(index).execute().await {
        Err(e) if errno(&e) != Some(libc::ENODEV) => {
            Err(NetError::Netlink { what: "deleting", link: name.to_owned(), source: e })
        }
        _ => Ok(true),
    }
}

/// Whether the macvtap `name` sits on the interface `lower` with `mac` (read from sysfs).
fn macvtap_matches(name: &str, lower: u32, mac: &str) -> bool {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    dir.join("macvtap").is_dir()
        && read("address").trim().eq_ignore_ascii_case(mac)
        && read("iflink").trim() == lower.to_string()
}

/// `/dev/tapN` for the macvtap with index `index`, waiting briefly for devtmpfs.
async fn tap_device(index: u32) -> Result<std::path::PathBuf, NetError> {
    let dev = std::path::PathBuf::from(format!("/dev/tap{index}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !dev.exists() {
        if tokio::time::Instant::now() > deadline {
            return Err(NetError::NoLink(dev.display().to_string()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(dev)
}

fn mac_bytes(mac: &str) -> Option<Vec<u8>> {
    let b: Vec<u8> =
        mac.split(':').map(|o| u8::from_str_radix(o, 16).ok()).collect::<Option<_>>()?;
    (b.len() == 6).then_some(b)
}

fn enable_forwarding(bridge: &str) -> Result<(), NetError> {
    let sysctls = [
        ("/proc/sys/net/ipv4/ip_forward".to_owned(), "1"),
        (format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"), "1"),
    ];
    for (path, value) in sysctls {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
            continue;
        }
        std::fs::write(&path, value).map_err(|source| NetError::Forwarding { path, source })?;
    }
    Ok(())
}

fn nat_table_exists() -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "ip", NFT_TABLE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// hearth's whole nftables table, declared, flushed and refilled in one nft transaction.
///
/// NAT: published ports are DNAT rules in prerouting (from elsewhere) and output (from the host
/// itself); the subnet is masqueraded on its way out, and connections from the host's loopback
/// onto the bridge too, so the guest can answer them.
///
/// Filters, because `route_localnet` (needed for ports published on 127.0.0.1) would otherwise
/// let a guest reach services bound to the host's loopback (CVE-2020-8558 in kube-proxy), and
/// forwarding would let a neighbour with a route reach every guest port:
/// - input: a packet for 127.0.0.0/8 that did not come in on `lo` is dropped unless it belongs
///   to a connection the host made or was DNAT'ed;
/// - forward: into the bridge from elsewhere, only published ports (DNAT'ed) and replies to
///   connections the guests made. Guest to guest and guest to the world stay open.
pub fn nat_ruleset(b: &Bridge, forwards: &[Forward]) -> String {
    let dnat: String = forwards
        .iter()
        .map(|f| {
            let dest = match f.host_ip {
                Some(ip) => format!("ip daddr {ip}"),
                None => "fib daddr type local".to_owned(),
            };
            format!(
                "\t\t{dest} {p} dport {} dnat to {}:{} comment \"{}\"\n",
                f.host_port,
                f.guest_ip,
                f.guest_port,
                f.owner,
                p = f.protocol
            )
        })
        .collect();
    format!(
        "table ip {t} {{}}\n\
         flush table ip {t}\n\
         table ip {t} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {net} oifname != \"{br}\" masquerade\n\
         \t\tip saddr 127.0.0.0/8 oifname \"{br}\" masquerade\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"lo\" accept\n\
         \t\tip daddr != 127.0.0.0/8 accept\n\
         \t\tct state established,related accept\n\
         \t\tct status dnat accept\n\
         \t\tdrop comment \"no loopback service for anything but loopback\"\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\toifname != \"{br}\" accept\n\
         \t\tiifname \"{br}\" accept\n\
         \t\tct state established,related accept\n\
         \t\tct status dnat accept\n\
         \t\tdrop comment \"only published ports reach the guests\"\n\
         \t}}\n\
         }}\n",
        t = NFT_TABLE,
        net = b.subnet(),
        br = b.name,
    )
}

/// Writes the NAT table with exactly these port forwards (the daemon passes all of them).
pub fn write_nat(b: &Bridge, forwards: &[Forward]) -> Result<(), NetError> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(NetError::NftMissing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(nat_ruleset(b, forwards).as_bytes()).map_err(NetError::NftMissing)?;
    }
    let out = child.wait_with_output().map_err(NetError::NftMissing)?;
    if !out.status.success() {
        return Err(NetError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subnet_is_the_gateways_network() {
        let b = Bridge::hearth0();
        assert_eq!(b.subnet(), "10.61.0.0/16");
        let rules = nat_ruleset(&b, &[]);
        assert!(rules.contains("flush table ip hearth"), "{rules}");
        assert!(
            rules.contains("ip saddr 10.61.0.0/16 oifname != \"hearth0\" masquerade"),
            "{rules}"
        );
        let fwd = |host_ip| Forward {
            host_ip,
            host_port: 8080,
            guest_ip: Ipv4Addr::new(10, 61, 0, 2),
            guest_port: 80,
            protocol: "tcp".into(),
            owner: "vm 0123".into(),
        };
        let rules = nat_ruleset(&b, &[fwd(None), fwd(Some(Ipv4Addr::LOCALHOST))]);
        assert_eq!(
            rules
                .matches(
                    "fib daddr type local tcp dport 8080 dnat to 10.61.0.2:80 comment \"vm 0123\""
                )
                .count(),
            2,
            "{rules}"
        );
        assert_eq!(
            rules.matches("ip daddr 127.0.0.1 tcp dport 8080 dnat to 10.61.0.2:80").count(),
            2,
            "{rules}"
        );
    }

    /// The rules of one chain, in order.
    fn chain<'a>(rules: &'a str, name: &str) -> Vec<&'a str> {
        let start = rules
            .find(&format!("chain {name} {{"))
            .unwrap_or_else(|| panic!("no chain {name}:\n{rules}"));
        rules[start..].lines().skip(1).map(str::trim).take_while(|l| *l != "}").collect()
    }

    #[test]
    fn loopback_services_and_unpublished_ports_are_filtered() {
        let rules = nat_ruleset(&Bridge::hearth0(), &[]);
        let input = chain(&rules, "input");
        assert_eq!(input[0], "type filter hook input priority filter; policy accept;");
        // Everything for 127/8 from a non-loopback interface falls through to the drop unless
        // the host made the connection or a published port DNAT'ed it.
        assert_eq!(
            &input[1..5],
            [
                "iifname \"lo\" accept",
                "ip daddr != 127.0.0.0/8 accept",
                "ct state established,related accept",
                "ct status dnat accept"
            ]
        );
        assert!(input[5].starts_with("drop"), "{input:?}");
        let forward = chain(&rules, "forward");
        assert_eq!(
            &forward[1..5],
            [
                "oifname != \"hearth0\" accept",
                "iifname \"hearth0\" accept",
                "ct state established,related accept",
                "ct status dnat accept"
            ]
        );
        assert!(forward[5].starts_with("drop"), "{forward:?}");
    }
}
