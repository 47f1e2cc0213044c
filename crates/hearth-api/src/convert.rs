//! Wire requests into the core's commands, validated: every field that does not parse is refused
//! here with the flag to fix.

use hearth_core::{Error, NewVm, NewVolume, SshKey};
use hearth_types::{LogOptions, NetworkMode, NicSpec, Provider, VolumeSource};

use crate::v1 as pb;

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::invalid(e.to_string())
}

impl TryFrom<pb::CreateVmRequest> for NewVm {
    type Error = Error;

    fn try_from(req: pb::CreateVmRequest) -> Result<Self, Error> {
        let given_key = req.ssh_public_key.trim().to_owned();
        let ssh = match (given_key.is_empty(), req.ssh) {
            (false, _) => SshKey::Given(given_key),
            (true, true) => SshKey::Generate,
            (true, false) => SshKey::None,
        };
        let first = card_settings(&req.network, &req.address, &req.gateway, &req.dns)?;
        let provider = match req.vmm.as_str() {
            "" => Provider::default(),
            v => v.parse().map_err(invalid)?,
        };
        let nics = req.cards.into_iter().map(nic).collect::<Result<_, _>>()?;
        Ok(NewVm {
            image: req.image,
            kernel: Some(req.kernel).filter(|k| !k.is_empty()),
            initrd: None,
            name: Some(req.name).filter(|n| !n.is_empty()),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disk_bytes: req.disk_bytes,
            kernel_args: req.kernel_args,
            entrypoint: req.has_entrypoint.then_some(req.entrypoint),
            command: req.command,
            env: req.env,
            labels: req.labels.into_iter().collect(),
            accel: req.accel.parse().map_err(invalid)?,
            provider,
            auto_remove: req.auto_remove,
            interactive: req.interactive,
            tty: req.tty,
            network: first.network,
            macvtap_parent: first.macvtap_parent,
            lan: first.lan,
            nics,
            ports: req
                .ports
                .iter()
                .map(|p| p.parse())
                .collect::<Result<_, _>>()
                .map_err(invalid)?,
            ssh,
            mac: Some(req.mac).filter(|m| !m.is_empty()),
            address: first.address,
            cloud_init_network: Some(req.cloud_init_network).filter(|d| !d.is_empty()),
            volumes: req.volumes.into_iter().map(volume).collect::<Result<_, _>>()?,
            cloud_init: req.cloud_init.into_iter().map(|(k, v)| (k, v.into())).collect(),
            log: LogOptions::parse(&req.log_opts).map_err(invalid)?,
            restart: req.restart.parse().map_err(invalid)?,
            crash_loop_limit: Some(req.crash_loop_limit).filter(|&n| n > 0),
        })
    }
}

/// A card's network, macvtap parent, LAN address and bridge address (its MAC and name left
/// out). On the LAN a static address is a CIDR; on the bridge, an address of its subnet.
/// `macvtap:IFACE` names the host interface; `macvtap` alone takes the daemon's.
fn card_settings(
    network: &str,
    address: &str,
    gateway: &str,
    dns: &[String],
) -> Result<NicSpec, Error> {
    let (mode, parent) = match network.split_once(':') {
        Some(("macvtap", iface)) => ("macvtap", Some(iface.to_owned())),
        _ => (network, None),
    };
    let mode: NetworkMode = mode.parse().map_err(invalid)?;
    let on_lan = mode == NetworkMode::Macvtap;
    let lan = match address {
        a if on_lan && !a.is_empty() => {
            Some(hearth_types::LanAddress::parse(a, Some(gateway), dns).map_err(invalid)?)
        }
        _ if !gateway.is_empty() || !dns.is_empty() => return Err(Error::invalid(
            "--gateway and --dns go with a static address on --network macvtap (--ip A.B.C.D/N)",
        )),
        _ => None,
    };
    let address = match address {
        "" => None,
        _ if on_lan => None,
        a => Some(
            a.parse::<std::net::Ipv4Addr>()
                .map_err(|_| Error::invalid(format!("address {a:?} is not an IPv4 address")))?,
        ),
    };
    Ok(NicSpec { address, macvtap_parent: parent, lan, ..NicSpec::on(mode) })
}

/// A card after the first.
fn nic(c: pb::NetworkCard) -> Result<NicSpec, Error> {
    Ok(NicSpec {
        mac: Some(c.mac).filter(|m| !m.is_empty()),
        guest_name: Some(c.guest_name).filter(|g| !g.is_empty()),
        ..card_settings(&c.network, &c.address, &c.gateway, &c.dns)?
    })
}

/// A volume from exactly one source.
fn volume(v: pb::VolumeRequest) -> Result<NewVolume, Error> {
    let source = match (v.image.is_empty(), v.host_path.is_empty(), v.size_bytes) {
        (false, true, 0) => VolumeSource::Image,
        (true, false, 0) if v.share => VolumeSource::Share { path: v.host_path },
        (true, false, 0) => VolumeSource::Host { path: v.host_path },
        (true, true, n) if n > 0 => VolumeSource::Blank { size_bytes: n },
        _ => {
            return Err(Error::invalid(format!(
                "volume {}: give exactly one of an image, a host path and a size",
                v.id
            )))
        }
    };
    Ok(NewVolume {
        id: v.id,
        source,
        image: v.image,
        mount_point: Some(v.mount_point).filter(|m| !m.is_empty()),
        read_only: v.read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::CreateVmRequest {
        pb::CreateVmRequest {
            image: "busybox:latest".into(),
            cpus: 1,
            memory_mib: 256,
            disk_bytes: 1 << 30,
            network: "user".into(),
            ..Default::default()
        }
    }

    #[test]
    fn empty_fields_mean_the_defaults() {
        let v = NewVm::try_from(req()).expect("valid");
        assert_eq!((v.kernel, v.name, v.address, v.mac), (None, None, None, None));
        assert_eq!(v.provider, Provider::Qemu);
        assert_eq!(v.ssh, SshKey::None);
        assert_eq!(v.entrypoint, None);
    }

    #[test]
    fn ssh_uses_a_given_key_and_generates_one_only_when_none_is_given() {
        let mut r = req();
        r.ssh = true;
        assert_eq!(NewVm::try_from(r.clone()).expect("valid").ssh, SshKey::Generate);
        r.ssh_public_key = " ssh-ed25519 AAAAC3 me \n".into();
        assert_eq!(
            NewVm::try_from(r).expect("valid").ssh,
            SshKey::Given("ssh-ed25519 AAAAC3 me".into())
        );
    }

    #[test]
    fn a_macvtap_network_names_its_interface_and_takes_a_static_lan_address() {
        let mut r = req();
        r.network = "macvtap:eth0".into();
        r.address = "192.168.1.50/24".into();
        r.gateway = "192.168.1.1".into();
        r.dns = vec!["192.168.1.1".into()];
        let v = NewVm::try_from(r.clone()).expect("valid");
        assert_eq!(v.network, hearth_types::NetworkMode::Macvtap);
        assert_eq!(v.macvtap_parent.as_deref(), Some("eth0"));
        let lan = v.lan.expect("lan");
        assert_eq!((lan.address.to_string(), lan.prefix), ("192.168.1.50".into(), 24));
        assert_eq!(v.address, None, "not a bridge address");
        r.network = "bridge".into();
        r.address = String::new();
        let e = NewVm::try_from(r).expect_err("a gateway without a LAN address");
        assert!(e.message.contains("--network macvtap"), "{e}");
    }

    #[test]
    fn cards_after_the_first_take_the_same_settings() {
        let mut r = req();
        r.network = "bridge".into();
        r.cards = vec![
            pb::NetworkCard {
                network: "macvtap:eth0".into(),
                address: "192.168.1.50/24".into(),
                gateway: "192.168.1.1".into(),
                guest_name: "eth1".into(),
                ..Default::default()
            },
            pb::NetworkCard {
                network: "bridge".into(),
                address: "10.61.0.9".into(),
                mac: "02:00:00:00:00:09".into(),
                ..Default::default()
            },
        ];
        let v = NewVm::try_from(r.clone()).expect("valid");
        assert_eq!(v.nics.len(), 2);
        let lan = &v.nics[0];
        assert_eq!(lan.network, hearth_types::NetworkMode::Macvtap);
        assert_eq!(lan.macvtap_parent.as_deref(), Some("eth0"));
        assert_eq!(
            lan.lan.as_ref().and_then(|l| l.gateway).map(|g| g.to_string()).as_deref(),
            Some("192.168.1.1")
        );
        assert_eq!(lan.guest_name.as_deref(), Some("eth1"));
        let bridge = &v.nics[1];
        assert_eq!(bridge.address, Some(std::net::Ipv4Addr::new(10, 61, 0, 9)));
        assert_eq!(bridge.mac.as_deref(), Some("02:00:00:00:00:09"));
        r.cards[1].gateway = "10.61.0.1".into();
        let e = NewVm::try_from(r).expect_err("a gateway on the bridge");
        assert!(e.message.contains("--gateway"), "{e}");
    }

    #[test]
    fn each_malformed_field_is_refused_with_its_flag() {
        type Spoil = fn(&mut pb::CreateVmRequest);
        let cases: [(Spoil, &str); 6] = [
            (|r| r.accel = "hvf".into(), "--accel"),
            (|r| r.vmm = "vmware".into(), "--vmm"),
            (|r| r.network = "wifi".into(), "network"),
            (|r| r.ports = vec!["99999:80".into()], "99999"),
            (|r| r.address = "10.61.0".into(), "IPv4"),
            (|r| r.log_opts = vec!["max-size=0".into()], "--log-opt"),
        ];
        for (bad, says) in cases {
            let mut r = req();
            bad(&mut r);
            let e = NewVm::try_from(r).expect_err(says);
            assert_eq!(e.kind, hearth_core::ErrorKind::Invalid, "{e}");
            assert!(e.message.contains(says), "{says}: {e}");
        }
    }
}
