//! Published ports: which VM holds which host port, and the forwarding rules the bridge needs,
//! derived whole from the VMs every time (so the host's table cannot drift from the records).

use std::net::Ipv4Addr;

use hearth_types::{NetworkMode, PortMapping, Protocol, VmId, VmSpec};

use crate::Error;

/// One DNAT rule of the bridge: traffic to the host's port goes to the guest's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRule {
    /// The host address it applies to; `None` for every address (`0.0.0.0`).
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_ip: Ipv4Addr,
    pub guest_port: u16,
    pub protocol: Protocol,
    /// Who the rule is for, as the host's table shows it.
    pub owner: String,
}

/// The first of `spec`'s published ports that one of `others` (live or launching VMs) already
/// publishes, with that VM.
pub fn port_conflict<'a>(
    spec: &VmSpec,
    others: impl Iterator<Item = &'a VmSpec>,
) -> Option<(&'a VmSpec, PortMapping)> {
    others.filter(|o| o.id != spec.id).find_map(|o| {
        spec.ports.iter().find(|p| o.ports.iter().any(|q| q.overlaps(p))).map(|p| (o, p.clone()))
    })
}

/// The error for a port another VM holds.
pub fn port_conflict_error(other: &VmSpec, p: &PortMapping) -> Error {
    Error::precondition(format!(
        "cannot publish {p}: VM {} already publishes host port {}/{}; choose another -p",
        other.name, p.host_port, p.protocol
    ))
}

/// The bridge's rules for the bridged VMs among `specs` (live or launching), leaving out `gone`
/// (a VM on its way out whose record still says it runs).
pub fn bridge_forwards<'a>(
    specs: impl Iterator<Item = &'a VmSpec>,
    gone: Option<&VmId>,
) -> Vec<ForwardRule> {
    let mut rules = Vec::new();
    for spec in specs.filter(|s| s.network == NetworkMode::Bridge && Some(&s.id) != gone) {
        let Some(guest_ip) = spec.address else { continue };
        for p in &spec.ports {
            let host_ip = match p.host_ip.parse::<Ipv4Addr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip),
                Err(_) => continue,
            };
            rules.push(ForwardRule {
                host_ip,
                host_port: p.host_port,
                guest_ip,
                guest_port: p.guest_port,
                protocol: p.protocol,
                owner: format!("hearth vm {}", spec.id.as_str()),
            });
        }
    }
    rules.dedup();
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridged(n: u8, address: [u8; 4], ports: &[(&str, u16, u16)]) -> VmSpec {
        VmSpec {
            network: NetworkMode::Bridge,
            address: Some(Ipv4Addr::from(address)),
            ports: ports
                .iter()
                .map(|(ip, host, guest)| PortMapping {
                    host_ip: (*ip).into(),
                    host_port: *host,
                    guest_port: *guest,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            ..hearth_testkit::spec(n)
        }
    }

    #[test]
    fn rules_follow_the_bridged_vms_and_leave_out_the_one_going() {
        let a = bridged(1, [10, 61, 0, 2], &[("0.0.0.0", 8080, 80), ("127.0.0.1", 2222, 22)]);
        let b = bridged(2, [10, 61, 0, 3], &[("0.0.0.0", 9090, 90)]);
        let user = VmSpec {
            network: NetworkMode::User,
            ..bridged(3, [10, 61, 0, 4], &[("0.0.0.0", 7070, 70)])
        };
        let rules = bridge_forwards([&a, &b, &user].into_iter(), None);
        assert_eq!(
            rules.len(),
            3,
            "user-mode VMs forward in their VMM, not on the bridge: {rules:?}"
        );
        assert_eq!(
            (rules[0].host_ip, rules[0].guest_ip, rules[0].guest_port),
            (None, Ipv4Addr::new(10, 61, 0, 2), 80)
        );
        assert_eq!(rules[1].host_ip, Some(Ipv4Addr::LOCALHOST));
        assert!(rules[0].owner.contains(a.id.as_str()));
        let without_a = bridge_forwards([&a, &b].into_iter(), Some(&a.id));
        assert_eq!(without_a.iter().map(|r| r.host_port).collect::<Vec<_>>(), [9090]);
    }

    #[test]
    fn a_port_another_vm_publishes_is_a_conflict_naming_it() {
        let a = bridged(1, [10, 61, 0, 2], &[("0.0.0.0", 8080, 80)]);
        let b = bridged(2, [10, 61, 0, 3], &[("127.0.0.1", 8080, 81)]);
        let (other, p) = port_conflict(&b, [&a, &b].into_iter()).expect("0.0.0.0 covers 127.0.0.1");
        assert_eq!((other.id.clone(), p.host_port), (a.id.clone(), 8080));
        assert!(port_conflict_error(other, &p).message.contains(&a.name));
        assert!(
            port_conflict(&a, [&a].into_iter()).is_none(),
            "a VM does not conflict with itself"
        );
    }
}
