//! A Firecracker VM's configuration, from a [`LaunchSpec`]: the API calls made before
//! `InstanceStart`, in order. Every path is absolute (Firecracker resolves them itself).

use serde_json::{json, Value};

use crate::LaunchSpec;

/// The guest's CID on the hybrid vsock device (2 is the host; guests start at 3).
pub const GUEST_CID: u32 = 3;

/// The kernel command line: the serial console, no PCI (virtio-mmio devices, which Firecracker
/// adds to the command line itself), the keyboard reset as reboot, hearth-init as /init, and
/// told to end the VM with a reset (Firecracker has no power-off; a reset ends its process).
pub fn kernel_cmdline(spec: &LaunchSpec) -> String {
    let c = String::from(
        "console=ttyS0 quiet loglevel=0 reboot=k panic=-1 pci=off rdinit=/init hearth.exit=reset",
    );
    // The VM's own arguments replace hearth's by key, and follow them otherwise.
    hearth_types::kernel::merge_cmdline(&c, &spec.cmdline)
}

/// A Firecracker resource id (alphanumerics and underscores only) for a disk serial.
fn drive_id(serial: &str) -> String {
    serial.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// What MMDS serves: the cloud-init files under `latest`, as Flintlock lays them out; `None`
/// when the VM has none or no card to serve them on.
pub fn mmds(spec: &LaunchSpec) -> Option<Value> {
    let card = spec.networks.first().is_some_and(|n| n.tap.is_some());
    // MMDS holds text: bytes that are not UTF-8 (gzip user-data) reach the guest exactly
    // through hearth-init's NoCloud seed instead.
    let latest: serde_json::Map<String, Value> =
        spec.cloud_init.iter().map(|(k, v)| (k.clone(), v.to_text_lossy().into())).collect();
    (card && !spec.cloud_init.is_empty()).then(|| json!({ "latest": latest }))
}

/// The configuration calls, as (path, body) pairs for `PUT`.
pub fn calls(spec: &LaunchSpec) -> Vec<(String, Value)> {
    let dir = &spec.vm_dir;
    let path = |p: &std::path::Path| p.display().to_string();
    let mut out = vec![
        ("/metrics".to_owned(), json!({ "metrics_path": path(&dir.join(super::METRICS)) })),
        (
            "/machine-config".to_owned(),
            json!({ "vcpu_count": spec.cpus, "mem_size_mib": spec.memory_mib, "smt": false }),
        ),
        (
            "/boot-source".to_owned(),
            json!({
                "kernel_image_path": path(&spec.kernel),
                "initrd_path": path(&spec.initrd),
                "boot_args": kernel_cmdline(spec),
            }),
        ),
    ];
    let mut drive = |id: String, file: &std::path::Path, read_only: bool| {
        out.push((
            format!("/drives/{id}"),
            json!({ "drive_id": id, "path_on_host": path(file), "is_root_device": false, "is_read_only": read_only }),
        ));
    };
    // Firecracker gives each disk its drive id as the virtio serial hearth-init looks for.
    drive(drive_id(hearth_types::guest::ROOT_SERIAL), &spec.root_disk, false);
    drive("config".to_owned(), &spec.config_disk, false);
    for v in crate::virtiofs::disks(&spec.volumes) {
        drive(drive_id(&v.serial), &v.path, v.read_only);
    }
    // Taps only (Firecracker opens them by name): the core never gives it another kind.
    for (i, n) in spec.networks.iter().enumerate() {
        let Some(tap) = &n.tap else { continue };
        let id = format!("eth{i}");
        out.push((
            format!("/network-interfaces/{id}"),
            json!({ "iface_id": id, "host_dev_name": tap, "guest_mac": n.mac }),
        ));
    }
    // Flintlock's own Firecracker provider serves cloud-init through MMDS v2 on a card; so
    // does hearth, on the first, with the same bundle hearth-init seeds (the NoCloud files).
    if mmds(spec).is_some() {
        out.push((
            "/mmds/config".to_owned(),
            json!({ "version": "V2", "network_interfaces": ["eth0"] }),
        ));
    }
    out.push((
        "/vsock".to_owned(),
        json!({ "guest_cid": GUEST_CID, "uds_path": path(&dir.join(super::AGENT_SOCK)) }),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        crate::sample_spec()
    }

    fn body<'a>(calls: &'a [(String, Value)], path: &str) -> &'a Value {
        &calls.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("no {path}")).1
    }

    #[test]
    fn the_calls_carry_the_vms_shape_disks_card_and_agent() {
        let c = calls(&spec());
        let m = body(&c, "/machine-config");
        assert_eq!((m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()), (Some(2), Some(512)));
        let boot = body(&c, "/boot-source");
        assert_eq!(boot["kernel_image_path"], "/k/vmlinux");
        let args = boot["boot_args"].as_str().expect("args");
        assert!(
            args.starts_with("console=ttyS0 ") && args.ends_with(" systemd.unit=rescue.target")
        );
        let root = body(&c, "/drives/hearth_root");
        assert_eq!(root["path_on_host"], "/var/lib/hearth/vms/abc/disk.img");
        assert_eq!(root["is_read_only"], false);
        assert_eq!(body(&c, "/drives/hearth_vol0")["is_read_only"], true);
        let net = body(&c, "/network-interfaces/eth0");
        assert_eq!(
            (net["host_dev_name"].as_str(), net["guest_mac"].as_str()),
            (Some("hth-abc"), Some("02:00:00:00:00:01"))
        );
        assert_eq!(body(&c, "/vsock")["uds_path"], "/var/lib/hearth/vms/abc/agent.sock");
        // A second card is eth1, on its own tap.
        let mut s = spec();
        let second = crate::NetLaunch {
            mac: "12:00:00:00:00:01".into(),
            tap: Some("hth-abc1".into()),
            ..Default::default()
        };
        s.networks.push(second);
        let c = calls(&s);
        let net = body(&c, "/network-interfaces/eth1");
        assert_eq!(
            (net["iface_id"].as_str(), net["host_dev_name"].as_str(), net["guest_mac"].as_str()),
            (Some("eth1"), Some("hth-abc1"), Some("12:00:00:00:00:01"))
        );
        // Drive ids are Firecracker resource ids.
        for (p, _) in c.iter().filter(|(p, _)| p.starts_with("/drives/")) {
            assert!(
                p["/drives/".len()..].chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
                "{p}"
            );
        }
    }

    #[test]
    fn without_a_network_there_is_no_card_and_no_metadata_service() {
        let mut s = LaunchSpec { networks: vec![], ..spec() };
        s.cloud_init.insert("user-data".into(), "#cloud-config\n".into());
        let c = calls(&s);
        assert!(c
            .iter()
            .all(|(p, _)| !p.starts_with("/network-interfaces") && p != "/mmds/config"));
        assert_eq!(mmds(&s), None);
    }

    #[test]
    fn cloud_init_is_served_through_mmds_v2_on_the_card() {
        let mut s = spec();
        assert_eq!(mmds(&s), None, "nothing to serve");
        s.cloud_init.insert("meta-data".into(), "instance-id: i-1\n".into());
        s.cloud_init.insert("user-data".into(), "#cloud-config\n".into());
        let c = calls(&s);
        let cfg = body(&c, "/mmds/config");
        assert_eq!(
            (cfg["version"].as_str(), cfg["network_interfaces"][0].as_str()),
            (Some("V2"), Some("eth0"))
        );
        let card = c.iter().position(|(p, _)| p.starts_with("/network-interfaces")).expect("card");
        let service = c.iter().position(|(p, _)| p == "/mmds/config").expect("mmds");
        assert!(card < service, "MMDS names a card that exists");
        let data = mmds(&s).expect("data");
        assert_eq!(data["latest"]["meta-data"], "instance-id: i-1\n");
        assert_eq!(data["latest"]["user-data"], "#cloud-config\n");
    }
}
