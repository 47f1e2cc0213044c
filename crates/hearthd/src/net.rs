//! The network card a VM is launched with: its MAC, published ports and the SSH forward.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

use std::collections::HashMap;
use std::sync::Mutex;

use hearth_core::ports::{NetLaunch, NetPlan};
use hearth_types::net::SSH_PORT;
use hearth_types::{NetworkMode, PortMapping, Protocol, VmId, VmRecord, VmSpec};
use tonic::Status;

use crate::daemon::{internal, Daemon};

/// The cards for `spec`, and the loopback port forwarded to the guest's SSH port when `--ssh`
/// asked for one. Every published host port is checked first, so a port in use is reported
/// as such instead of as a VMM start failure.
pub fn plan(spec: &VmSpec) -> Result<Option<NetPlan>, Status> {
    if spec.network == NetworkMode::None {
        return Ok(None);
    }
    check_ports_free(spec)?;
    let mut cards: Vec<NetLaunch> = (spec.cards().into_iter())
        .map(|c| match c.network {
            // On the LAN: no forwards, SSH goes to the guest's own address.
            NetworkMode::Macvtap => {
                NetLaunch { mac: c.mac, macvtap: Some(c.link), ..Default::default() }
            }
            // The guest has its own address: ports are DNAT rules (claim), SSH goes direct.
            NetworkMode::Bridge => {
                NetLaunch { mac: c.mac, tap: Some(c.link), ..Default::default() }
            }
            _ => NetLaunch { mac: c.mac, ..Default::default() },
        })
        .collect();
    if spec.network != NetworkMode::User {
        return Ok(Some(NetPlan { cards, ssh_port: None }));
    }
    let mut forwards = spec.ports.clone();
    let ssh_port = match &spec.ssh_public_key {
        Some(_) => {
            let port = free_loopback_port()
                .map_err(|e| Status::unavailable(format!("no free loopback port for SSH: {e}")))?;
            forwards.push(PortMapping {
                host_ip: Ipv4Addr::LOCALHOST.to_string(),
                host_port: port,
                guest_port: SSH_PORT,
                protocol: Protocol::Tcp,
            });
            Some(port)
        }
        None => None,
    };
    cards[0].forwards = forwards;
    Ok(Some(NetPlan { cards, ssh_port }))
}

/// Every published host port can be bound now: a published port must not shadow a host service
/// (on the bridge, DNAT would take its traffic silently).
pub fn check_ports_free(spec: &VmSpec) -> Result<(), Status> {
    spec.ports.iter().try_for_each(check_free)
}

fn check_free(p: &PortMapping) -> Result<(), Status> {
    let ip: IpAddr = p
        .host_ip
        .parse()
        .map_err(|_| Status::invalid_argument(format!("-p {p}: bad host address")))?;
    let addr = SocketAddr::new(ip, p.host_port);
    let res = match p.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    res.map_err(|e| {
        Status::failed_precondition(format!(
            "cannot publish {p}: host port {} is unavailable ({e}); choose another -p",
            p.host_port
        ))
    })
}

/// Published host ports of VMs being launched: claimed before their VMM starts, carried by
/// their records once those say the VM runs. All claims and table writes happen under its lock,
/// so concurrent launches can neither drop each other's forwards nor take one port twice.
#[derive(Debug, Default)]
pub struct Ports {
    launching: Mutex<HashMap<VmId, VmSpec>>,
}

fn live(r: &VmRecord) -> bool {
    r.status.state.is_active()
}

/// The port conflict of `spec` with `others`, as the user sees it.
fn taken<'a>(spec: &VmSpec, others: impl Iterator<Item = &'a VmSpec>) -> Option<Status> {
    hearth_core::forwards::port_conflict(spec, others).map(|(other, p)| {
        hearth_api::status::to_status(hearth_core::forwards::port_conflict_error(other, &p))
    })
}

/// Refuses a spec whose published ports another live VM publishes (create-time check; the
/// launch claims them for real with [`claim`]).
pub fn check_unclaimed(d: &Daemon, spec: &VmSpec) -> Result<(), Status> {
    if spec.ports.is_empty() {
        return Ok(());
    }
    let records = d.vms.list().map_err(internal)?;
    let launching = d.ports.launching.lock().unwrap_or_else(|e| e.into_inner());
    match taken(spec, records.iter().filter(|r| live(r)).map(|r| &r.spec).chain(launching.values()))
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Claims the published ports of a VM about to launch: refused when another live or launching
/// VM holds one; on the bridge, the table is rewritten with them. Call [`settle`] once the
/// launch is recorded or failed.
pub fn claim(d: &Daemon, spec: &VmSpec) -> Result<(), Status> {
    if spec.ports.is_empty() {
        return Ok(());
    }
    let mut launching = d.ports.launching.lock().unwrap_or_else(|e| e.into_inner());
    let records = d.vms.list().map_err(internal)?;
    if let Some(e) =
        taken(spec, records.iter().filter(|r| live(r)).map(|r| &r.spec).chain(launching.values()))
    {
        return Err(e);
    }
    launching.insert(spec.id.clone(), spec.clone());
    if spec.network == NetworkMode::Bridge {
        if let Err(e) = write_rules(d, &records, &launching, None) {
            launching.remove(&spec.id);
            return Err(e);
        }
    }
    Ok(())
}

/// Ends a launch's claim: its record carries the ports now, or (`failed`) the launch did not
/// happen and its forwards are taken back out of the table.
pub fn settle(d: &Daemon, spec: &VmSpec, failed: bool) -> Result<(), Status> {
    let mut launching = d.ports.launching.lock().unwrap_or_else(|e| e.into_inner());
    if launching.remove(&spec.id).is_none() || !failed || spec.network != NetworkMode::Bridge {
        return Ok(());
    }
    write_rules(d, &d.vms.list().map_err(internal)?, &launching, None)
}

/// Rewrites the bridge's table from the records and the launches in flight, leaving out `gone`
/// (a VM on its way out whose record still says it runs). Derived whole each time, so it cannot
/// drift; also how the table is rebuilt when hearthd starts.
pub fn sync_nat(d: &Daemon, gone: Option<&VmId>) -> Result<(), Status> {
    let launching = d.ports.launching.lock().unwrap_or_else(|e| e.into_inner());
    write_rules(d, &d.vms.list().map_err(internal)?, &launching, gone)
}

fn write_rules(
    d: &Daemon,
    records: &[VmRecord],
    launching: &HashMap<VmId, VmSpec>,
    gone: Option<&VmId>,
) -> Result<(), Status> {
    let specs = records.iter().filter(|r| live(r)).map(|r| &r.spec).chain(launching.values());
    let rules = hearth_core::forwards::bridge_forwards(specs, gone);
    crate::adapters::write_nat(&d.bridge, rules).map_err(|e| {
        Status::failed_precondition(format!("writing the bridge's port forwards: {e}"))
    })
}

/// Deletes the taps and macvtaps hearth made for VMs that are gone (a crash between a VM's
/// record going and its link going): links named as a VM card's link (`ht`, 12 hex digits and
/// the card's index after the first) that are a tap or a macvtap, and no VM's card's. Run at start, before any launch.
pub async fn sweep_links(d: &Daemon) {
    let Ok(records) = d.vms.list() else { return };
    let ours: std::collections::HashSet<String> =
        records.iter().flat_map(|r| r.spec.cards()).map(|c| c.link).collect();
    let Ok(links) = std::fs::read_dir("/sys/class/net") else { return };
    for link in links.flatten() {
        let name = link.file_name().to_string_lossy().into_owned();
        let hearths = hearth_types::card::link_stem(&name).is_some();
        let kind = link.path();
        let tap_like = kind.join("tun_flags").exists() || kind.join("macvtap").is_dir();
        if !hearths || !tap_like || ours.contains(&name) {
            continue;
        }
        match hearth_net::remove_macvtap(&name).await {
            Ok(_) => tracing::info!(link = name, "removed a tap whose VM is gone"),
            Err(e) => {
                tracing::warn!(link = name, error = %e, "removing a tap whose VM is gone failed")
            }
        }
    }
}

/// The host's resolvers for guests on the bridge: /etc/resolv.conf's, loopback ones left out
/// (the guest cannot reach the host's local stub); behind systemd-resolved's stub, the upstream
/// servers it lists in /run/systemd/resolve/resolv.conf.
pub fn host_resolvers() -> Vec<String> {
    let read = |p: &str| nameservers(&std::fs::read_to_string(p).unwrap_or_default());
    let found = read("/etc/resolv.conf");
    if found.is_empty() {
        read("/run/systemd/resolve/resolv.conf")
    } else {
        found
    }
}

/// The non-loopback `nameserver` addresses of a resolv.conf.
fn nameservers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|a| a.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
        .map(str::to_owned)
        .collect()
}

/// A port the kernel says is free on 127.0.0.1 now. QEMU binds it a moment later; a race with
/// another program is reported by the launch like any port in use.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_leave_out_the_hosts_loopback_stub() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch lan\nnameserver ::1\nnameserver 2001:db8::1\n";
        assert_eq!(nameservers(conf), ["192.0.2.1", "2001:db8::1"]);
        assert!(nameservers("nameserver 127.0.0.53\n").is_empty());
    }

    #[test]
    fn ssh_gets_a_loopback_forward_and_none_gets_no_card() {
        let mut spec = hearth_testkit::spec(1);
        spec.ssh_public_key = Some("ssh-ed25519 AAAA".into());
        let planned = plan(&spec).expect("plan").expect("a card");
        let net = &planned.cards[0];
        let port = planned.ssh_port.expect("ssh port");
        assert_eq!(net.forwards.len(), 1);
        assert_eq!(
            (
                net.forwards[0].host_ip.as_str(),
                net.forwards[0].host_port,
                net.forwards[0].guest_port
            ),
            ("127.0.0.1", port, 22)
        );
        assert_eq!(net.mac, hearth_types::net::mac_for(&spec.id));
        spec.network = NetworkMode::None;
        spec.ssh_public_key = None;
        assert!(plan(&spec).expect("plan").is_none());
    }

    #[test]
    fn every_card_gets_its_link() {
        let mut spec = hearth_testkit::spec(1);
        spec.network = NetworkMode::Bridge;
        let mut lan = hearth_types::NicSpec::on(NetworkMode::Macvtap);
        lan.macvtap_parent = Some("eth0".into());
        spec.nics = vec![hearth_types::NicSpec::on(NetworkMode::Bridge), lan];
        let NetPlan { cards, ssh_port } = plan(&spec).expect("plan").expect("cards");
        assert_eq!(ssh_port, None);
        let links: Vec<_> = spec.cards().into_iter().map(|c| (c.mac, c.link)).collect();
        assert_eq!(cards.len(), 3);
        assert_eq!((&cards[0].mac, cards[0].tap.as_ref()), (&links[0].0, Some(&links[0].1)));
        assert_eq!((&cards[1].mac, cards[1].tap.as_ref()), (&links[1].0, Some(&links[1].1)));
        assert_eq!((&cards[2].mac, cards[2].macvtap.as_ref()), (&links[2].0, Some(&links[2].1)));
        assert!(cards.iter().all(|c| c.forwards.is_empty()));
    }

    #[test]
    fn a_busy_host_port_is_named() {
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = busy.local_addr().expect("addr").port();
        let mut spec = hearth_testkit::spec(1);
        spec.ports = vec![format!("127.0.0.1:{port}:80").parse().expect("port")];
        let e = plan(&spec).expect_err("busy");
        assert!(
            e.message().contains(&format!("host port {port} is unavailable")),
            "{}",
            e.message()
        );
        assert!(e.message().contains("choose another -p"));
    }
}
