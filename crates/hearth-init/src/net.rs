//! The guest's network: loopback up, the card hearth gave the VM configured statically (found by
//! its MAC, whatever the kernel named it) or by DHCP on a LAN ([`crate::dhcp`]), a default
//! route, and the resolver and hosts files. Plain ioctls on an inet socket: no netlink library,
//! nothing in the image.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hearth_types::GuestNetwork;

use crate::sys::inet::Sock;

/// How long the network card gets to appear after its driver loaded.
const CARD_WAIT: Duration = Duration::from_secs(5);

/// The interface whose MAC is `mac`, waiting for it to appear.
fn find_card(mac: &str) -> Option<String> {
    let deadline = Instant::now() + CARD_WAIT;
    loop {
        let found = std::fs::read_dir("/sys/class/net").ok().and_then(|rd| {
            rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).find(|n| {
                std::fs::read_to_string(format!("/sys/class/net/{n}/address"))
                    .is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
            })
        });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings loopback up; configures `net` when the VM has one. Failures are reported, not fatal:
/// a workload that never touches the network still runs.
pub fn configure(net: Option<&GuestNetwork>, hostname: &str) {
    let sock = match Sock::new() {
        Ok(s) => s,
        Err(e) => return eprintln!("hearth-init: network: socket: {e}"),
    };
    if let Err(e) = sock.up("lo") {
        eprintln!("hearth-init: network: bringing lo up: {e}");
    }
    let Some(net) = net else {
        write_hosts(None, hostname);
        return;
    };
    let res = find_card(&net.mac)
        .ok_or_else(|| format!("no interface with MAC {} appeared", net.mac))
        .and_then(|card| set_address(&sock, &card, net, true));
    if let Err(e) = res {
        eprintln!("hearth-init: network: {e}");
    }
    write_resolv(&net.dns);
    write_hosts(Some(&net.address), hostname);
}

/// Ethernet cards in the order the kernel found them (by interface index): a restored guest's
/// cards still have the MACs of the VM its snapshot was taken of.
fn cards_in_order() -> Vec<String> {
    let mut cards: Vec<(u32, String)> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
                    // ARPHRD_ETHER (1): not loopback, tunnels or others.
                    (read("type")?.trim() == "1").then_some(())?;
                    Some((read("ifindex")?.trim().parse().ok()?, name))
                })
                .collect()
        })
        .unwrap_or_default();
    cards.sort();
    cards.into_iter().map(|(_, n)| n).collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Gives a restored guest's cards the new VM's MACs and addresses, in order: the first with its
/// default route, resolvers and hosts file; the others their address alone.
pub fn reconfigure(first: Option<&GuestNetwork>, rest: &[hearth_types::GuestCard], hostname: &str) {
    let cards = cards_in_order();
    let macs = first.map(|n| n.mac.as_str()).into_iter().chain(rest.iter().map(|c| c.mac.as_str()));
    let res = (|| -> Result<(), String> {
        let sock = Sock::new().map_err(|e| format!("socket: {e}"))?;
        for (card, mac) in cards.iter().zip(macs) {
            let mac = parse_mac(mac).ok_or_else(|| format!("bad MAC {mac:?}"))?;
            sock.set_mac(card, mac).map_err(|e| format!("{card}: setting its MAC: {e}"))?;
        }
        // The old address's routes went with it: the first card's default route again.
        let nets = first.into_iter().chain(rest.iter().filter_map(|c| c.network.as_ref()));
        for (i, (card, net)) in cards.iter().zip(nets).enumerate() {
            set_address(&sock, card, net, i == 0)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("hearth-init: network: {e}");
    }
    write_hosts(first.map(|n| n.address.as_str()), hostname);
}

/// Gives `card` the address of `net` and brings it up; with `route`, the default route through
/// its gateway (a LAN address may come without one: then the subnet is all it reaches).
fn set_address(sock: &Sock, card: &str, net: &GuestNetwork, route: bool) -> Result<(), String> {
    let addr: Ipv4Addr =
        net.address.parse().map_err(|_| format!("bad address {:?}", net.address))?;
    sock.set_addr(card, addr, net.prefix)
        .map_err(|e| format!("{card}: setting {addr}/{}: {e}", net.prefix))?;
    sock.up(card).map_err(|e| format!("{card}: up: {e}"))?;
    if route && !net.gateway.is_empty() {
        let gw: Ipv4Addr =
            net.gateway.parse().map_err(|_| format!("bad gateway {:?}", net.gateway))?;
        sock.default_route(gw).map_err(|e| format!("default route via {gw}: {e}"))?;
    }
    Ok(())
}

/// How long the boot waits for a DHCP lease before the workload starts without one (a client
/// thread goes on asking).
const DHCP_WAIT: Duration = Duration::from_secs(10);

/// What a DHCP lease sets besides its card's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseUse {
    /// The VM's first card: the default route through the router, the resolvers, the hosts file.
    First,
    /// The default route only (the `dhcp` tool).
    Route,
    /// A card after the first: its address (and its subnet's route) alone.
    AddressOnly,
}

/// Takes the card with MAC `mac` up and its address from the LAN's DHCP server, then keeps the
/// lease in a thread of its own; `role` says what else the lease sets. Failures are reported,
/// not fatal.
pub fn dhcp(mac_text: &str, hostname: &str, role: LeaseUse) {
    let res = (|| -> Result<(), String> {
        let mac =
            crate::dhcp::parse_mac(mac_text).ok_or_else(|| format!("bad MAC {mac_text:?}"))?;
        let card = find_card(mac_text)
            .ok_or_else(|| format!("no interface with MAC {mac_text} appeared"))?;
        up(&card)?;
        let (name, host) = (card.clone(), hostname.to_owned());
        let lease = match crate::dhcp::acquire(&card, mac, hostname, DHCP_WAIT) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "hearth-init: network: {e}; the workload starts without an address on {card}"
                );
                std::thread::spawn(move || {
                    if let Ok(l) = crate::dhcp::acquire(&name, mac, &host, Duration::MAX) {
                        apply_lease(&name, &host, &l, role);
                        crate::dhcp::keep(name.clone(), mac, host.clone(), l, |l| {
                            apply_lease(&name, &host, l, role)
                        });
                    }
                });
                return Ok(());
            }
        };
        apply_lease(&card, hostname, &lease, role);
        std::thread::spawn(move || {
            crate::dhcp::keep(name.clone(), mac, host.clone(), lease, |l| {
                apply_lease(&name, &host, l, role)
            })
        });
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("hearth-init: network: {e}");
    }
}

/// Gives each card after the first its static address (the first card alone has the default
/// route and the resolvers). Those without one take DHCP later ([`dhcp`], once threads may
/// start). Failures are reported, not fatal.
pub fn configure_cards(cards: &[hearth_types::GuestCard]) {
    for net in cards.iter().filter_map(|c| c.network.as_ref()) {
        let res = (|| -> Result<(), String> {
            let sock = Sock::new().map_err(|e| format!("socket: {e}"))?;
            let card = find_card(&net.mac)
                .ok_or_else(|| format!("no interface with MAC {} appeared", net.mac))?;
            set_address(&sock, &card, net, false)
        })();
        if let Err(e) = res {
            eprintln!("hearth-init: network: {e}");
        }
    }
}

/// Brings `card` up (a DHCP client sends on it before it has an address).
pub fn up(card: &str) -> Result<(), String> {
    let sock = Sock::new().map_err(|e| format!("socket: {e}"))?;
    sock.up(card).map_err(|e| format!("{card}: up: {e}"))
}

/// Puts a DHCP lease on `card`: its address, and what `role` says besides.
pub fn apply_lease(card: &str, hostname: &str, l: &crate::dhcp::Lease, role: LeaseUse) {
    let res = (|| -> Result<(), String> {
        let sock = Sock::new().map_err(|e| format!("socket: {e}"))?;
        sock.set_addr(card, l.address, l.prefix)
            .map_err(|e| format!("{card}: setting {}/{}: {e}", l.address, l.prefix))?;
        sock.up(card).map_err(|e| format!("{card}: up: {e}"))?;
        if let Some(gw) = l.router.filter(|_| role != LeaseUse::AddressOnly) {
            sock.default_route(gw).map_err(|e| format!("default route via {gw}: {e}"))?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("hearth-init: network: {e}");
    }
    if role == LeaseUse::First {
        write_resolv(&l.dns.iter().map(ToString::to_string).collect::<Vec<_>>());
        write_hosts(Some(&l.address.to_string()), hostname);
    }
}

/// /etc/resolv.conf, unless the image manages it through a symlink (systemd-resolved).
fn write_resolv(dns: &[String]) {
    let path = "/etc/resolv.conf";
    if dns.is_empty() || std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return;
    }
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("hearth-init: network: writing {path}: {e}");
    }
}

/// /etc/hosts with localhost and the VM's own name, as docker writes it.
pub(crate) fn write_hosts(address: Option<&str>, hostname: &str) {
    let path = "/etc/hosts";
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return;
    }
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write(path, hosts_file(address, hostname)) {
        eprintln!("hearth-init: network: writing {path}: {e}");
    }
}

fn hosts_file(address: Option<&str>, hostname: &str) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        s.push_str(&format!("{}\t{hostname}\n", address.unwrap_or("127.0.1.1")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_the_vm() {
        assert!(hosts_file(Some("10.0.2.15"), "web").ends_with("10.0.2.15\tweb\n"));
        assert!(hosts_file(None, "web").ends_with("127.0.1.1\tweb\n"));
        assert!(hosts_file(None, "").starts_with("127.0.0.1\tlocalhost\n"));
    }
}
