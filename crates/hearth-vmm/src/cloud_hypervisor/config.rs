//! A Cloud Hypervisor VM's configuration, from a [`LaunchSpec`]: the one `vm.create` body.
//! Every path is absolute (Cloud Hypervisor resolves them itself, at boot).

use serde_json::{json, Value};

use crate::LaunchSpec;

/// The guest's CID on the hybrid vsock device (2 is the host; guests start at 3).
pub const GUEST_CID: u32 = 3;

/// The kernel command line: the serial console and hearth-init as /init. The devices are
/// virtio-pci, found by the guest itself; the guest powers off through ACPI, which ends Cloud
/// Hypervisor's process.
pub fn kernel_cmdline(spec: &LaunchSpec) -> String {
    let c = String::from("console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init");
    // The VM's own arguments replace hearth's by key, and follow them otherwise.
    hearth_types::kernel::merge_cmdline(&c, &spec.cmdline)
}

/// The `vm.create` body: shape, payload, disks (each found by its virtio serial), the card, the
/// agent's hybrid vsock, the serial port on a socket, and no virtio console.
pub fn vm_config(spec: &LaunchSpec) -> Value {
    let dir = &spec.vm_dir;
    let path = |p: &std::path::Path| p.display().to_string();
    let mut disks = vec![
        json!({ "id": "root", "path": path(&spec.root_disk), "readonly": false,
                "serial": hearth_types::guest::ROOT_SERIAL }),
        json!({ "id": "config", "path": path(&spec.config_disk), "readonly": false }),
    ];
    for (i, v) in spec.volumes.iter().enumerate().filter(|(_, v)| !v.share) {
        disks.push(json!({ "id": format!("vol{i}"), "path": path(&v.path),
                           "readonly": v.read_only, "serial": v.serial }));
    }
    let mut config = json!({
        "cpus": { "boot_vcpus": spec.cpus, "max_vcpus": spec.cpus },
        "memory": { "size": spec.memory_mib << 20 },
        "payload": {
            "kernel": path(&spec.kernel),
            "initramfs": path(&spec.initrd),
            "cmdline": kernel_cmdline(spec),
        },
        "disks": disks,
        "rng": { "src": "/dev/urandom" },
        "serial": { "mode": "Socket", "socket": path(&dir.join(crate::console::SOCKET)) },
        "console": { "mode": "Off" },
        "vsock": { "cid": GUEST_CID, "socket": path(&dir.join(super::AGENT_SOCK)) },
    });
    // The taps; a macvtap's card is added after vm.create (launch.rs).
    let nets: Vec<Value> = (spec.networks.iter().enumerate())
        .filter_map(|(i, n)| {
            let tap = n.tap.as_ref()?;
            Some(json!({ "id": card_id(i), "tap": tap, "mac": n.mac }))
        })
        .collect();
    if !nets.is_empty() {
        config["net"] = Value::Array(nets);
    }
    // Each share: virtio-fs on its virtiofsd's socket (in the VM's directory as Cloud
    // Hypervisor sees it), which maps the guest's memory: shared memory, then.
    let fs: Vec<Value> = (crate::virtiofs::shares(&spec.volumes).enumerate())
        .map(|(k, s)| {
            json!({ "tag": s.serial, "socket": path(&crate::virtiofs::socket(dir, k)),
                    "num_queues": 1, "queue_size": 1024, "id": format!("fs{k}") })
        })
        .collect();
    if !fs.is_empty() {
        config["memory"]["shared"] = Value::Bool(true);
        config["fs"] = Value::Array(fs);
    }
    config
}

/// Cloud Hypervisor's device id of the VM's `i`th card.
pub fn card_id(i: usize) -> String {
    format!("eth{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec { kernel: "/k/vmlinuz".into(), ..crate::sample_spec() }
    }

    #[test]
    fn the_config_carries_the_vms_shape_disks_card_console_and_agent() {
        let c = vm_config(&spec());
        assert_eq!(
            (c["cpus"]["boot_vcpus"].as_u64(), c["cpus"]["max_vcpus"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(c["memory"]["size"], 512u64 << 20);
        assert_eq!(c["payload"]["kernel"], "/k/vmlinuz");
        let args = c["payload"]["cmdline"].as_str().expect("cmdline");
        assert!(
            args.starts_with("console=ttyS0 ") && args.ends_with(" systemd.unit=rescue.target"),
            "{args}"
        );
        assert!(!args.contains("pci=off"), "Cloud Hypervisor's devices are virtio-pci: {args}");
        let disks = c["disks"].as_array().expect("disks");
        assert_eq!(disks[0]["serial"], hearth_types::guest::ROOT_SERIAL);
        assert_eq!(disks[0]["path"], "/var/lib/hearth/vms/abc/disk.img");
        assert_eq!(
            (disks[2]["serial"].as_str(), disks[2]["readonly"].as_bool()),
            (Some("hearth_vol0"), Some(true))
        );
        assert_eq!(
            (c["net"][0]["tap"].as_str(), c["net"][0]["mac"].as_str()),
            (Some("hth-abc"), Some("02:00:00:00:00:01"))
        );
        assert_eq!(c["serial"]["socket"], "/var/lib/hearth/vms/abc/console.sock");
        assert_eq!(c["console"]["mode"], "Off");
        assert_eq!(c["vsock"]["socket"], "/var/lib/hearth/vms/abc/agent.sock");
    }

    #[test]
    fn a_share_is_a_virtio_fs_device_on_its_socket_in_shared_memory() {
        assert!(vm_config(&spec()).get("fs").is_none());
        let mut s = spec();
        s.volumes.push(crate::VolumeDisk {
            path: "/srv/data".into(),
            serial: "hearth_vol1".into(),
            read_only: false,
            host: true,
            share: true,
        });
        let c = vm_config(&s);
        assert_eq!(c["memory"]["shared"], true);
        assert_eq!(c["fs"][0]["tag"], "hearth_vol1");
        assert_eq!(c["fs"][0]["socket"], "/var/lib/hearth/vms/abc/fs0.sock");
        let disks = c["disks"].as_array().expect("disks");
        assert!(disks.iter().all(|d| d["path"] != "/srv/data"), "a share is no disk: {disks:?}");
    }

    #[test]
    fn without_a_tap_there_is_no_card() {
        let c = vm_config(&LaunchSpec { networks: vec![], ..spec() });
        assert!(c.get("net").is_none(), "{c}");
    }

    #[test]
    fn each_tap_is_a_card_and_a_macvtap_waits_for_add_net() {
        let mut s = spec();
        let card = |mac: &str, tap: Option<&str>, macvtap: Option<&str>| crate::NetLaunch {
            mac: mac.into(),
            tap: tap.map(Into::into),
            macvtap: macvtap.map(Into::into),
            ..Default::default()
        };
        s.networks.push(card("12:00:00:00:00:01", None, Some("hth-abc1")));
        s.networks.push(card("22:00:00:00:00:01", Some("hth-abc2"), None));
        let c = vm_config(&s);
        let nets = c["net"].as_array().expect("cards");
        let ids: Vec<_> = nets.iter().map(|n| (n["id"].as_str(), n["tap"].as_str())).collect();
        assert_eq!(ids, [(Some("eth0"), Some("hth-abc")), (Some("eth2"), Some("hth-abc2"))]);
    }
}
