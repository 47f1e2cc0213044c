//! The network card a VM is launched with: its MAC, published ports and the SSH forward.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};

use hearth_types::net::{tap_name, SSH_PORT};
use hearth_types::{NetworkMode, PortMapping, Protocol, VmSpec};
use hearth_vmm::NetLaunch;
use tonic::Status;

/// The card for `spec`, and the loopback port forwarded to the guest's SSH port when `--ssh`
/// asked for one. Every published host port is checked first, so a port in use is reported
/// as such instead of as a VMM start failure.
pub fn plan(spec: &VmSpec) -> Result<Option<(NetLaunch, Option<u16>)>, Status> {
    if spec.network == NetworkMode::None {
        return Ok(None);
    }
    // A published port must not shadow a host service (on the bridge, DNAT would take its
    // traffic silently).
    for p in &spec.ports {
        check_free(p)?;
    }
    if spec.network == NetworkMode::Bridge {
        // The guest has its own address: ports are DNAT rules (sync_nat), SSH goes direct.
        return Ok(Some((NetLaunch { mac: spec.mac(), forwards: vec![], tap: Some(tap_name(&spec.id)) }, None)));
    }
    let mut forwards = spec.ports.clone();
    let ssh_port = match &spec.ssh_public_key {
        Some(_) => {
            let port = free_loopback_port().map_err(|e| Status::unavailable(format!("no free loopback port for SSH: {e}")))?;
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
    Ok(Some((NetLaunch { mac: spec.mac(), forwards, tap: None }, ssh_port)))
}

fn check_free(p: &PortMapping) -> Result<(), Status> {
    let ip: IpAddr = p.host_ip.parse().map_err(|_| Status::invalid_argument(format!("-p {p}: bad host address")))?;
    let addr = SocketAddr::new(ip, p.host_port);
    let res = match p.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    res.map_err(|e| {
        Status::failed_precondition(format!("cannot publish {p}: host port {} is unavailable ({e}); choose another -p", p.host_port))
    })
}

/// Rewrites the bridge's NAT table with the published ports of every bridged VM that runs, plus
/// `launching`, minus `gone` (a VM on its way out whose record still says running). Derived from
/// the records each time, so it cannot drift.
pub fn sync_nat(d: &crate::daemon::Daemon, launching: Option<&VmSpec>, gone: Option<&hearth_types::VmId>) -> Result<(), Status> {
    use hearth_types::VmState;
    let records = d.vms.list().map_err(crate::daemon::internal)?;
    let live = records
        .iter()
        .filter(|r| matches!(r.status.state, VmState::Starting | VmState::Running | VmState::Stopping))
        .map(|r| &r.spec)
        .chain(launching)
        .filter(|s| s.network == NetworkMode::Bridge && Some(&s.id) != gone);
    let mut forwards = Vec::new();
    for spec in live {
        let Some(guest_ip) = spec.address else { continue };
        for p in &spec.ports {
            let host_ip = match p.host_ip.parse::<Ipv4Addr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip),
                Err(_) => continue,
            };
            forwards.push(hearth_net::Forward {
                host_ip,
                host_port: p.host_port,
                guest_ip,
                guest_port: p.guest_port,
                protocol: p.protocol.to_string(),
                owner: format!("hearth vm {}", spec.id.as_str()),
            });
        }
    }
    forwards.dedup();
    hearth_net::write_nat(&hearth_net::Bridge::hearth0(), &forwards)
        .map_err(|e| Status::failed_precondition(format!("writing the bridge's port forwards: {e}")))
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
        let (net, ssh) = plan(&spec).expect("plan").expect("a card");
        let port = ssh.expect("ssh port");
        assert_eq!(net.forwards.len(), 1);
        assert_eq!((net.forwards[0].host_ip.as_str(), net.forwards[0].host_port, net.forwards[0].guest_port), ("127.0.0.1", port, 22));
        assert_eq!(net.mac, hearth_types::net::mac_for(&spec.id));
        spec.network = NetworkMode::None;
        spec.ssh_public_key = None;
        assert!(plan(&spec).expect("plan").is_none());
    }

    #[test]
    fn a_busy_host_port_is_named() {
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = busy.local_addr().expect("addr").port();
        let mut spec = hearth_testkit::spec(1);
        spec.ports = vec![format!("127.0.0.1:{port}:80").parse().expect("port")];
        let e = plan(&spec).expect_err("busy");
        assert!(e.message().contains(&format!("host port {port} is unavailable")), "{}", e.message());
        assert!(e.message().contains("choose another -p"));
    }
}
