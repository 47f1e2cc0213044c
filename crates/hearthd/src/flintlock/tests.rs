use super::*;

fn good() -> fl::MicroVmSpec {
    fl::MicroVmSpec {
        id: "mvm0".into(),
        kernel: Some(fl::Kernel { image: "reg/kernel:1".into(), ..Default::default() }),
        root_volume: Some(fl::Volume {
            id: "root".into(),
            source: Some(fl::VolumeSource {
                container_source: Some("reg/os:1".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        interfaces: vec![fl::NetworkInterface { device_id: "eth1".into(), ..Default::default() }],
        ..Default::default()
    }
}

#[test]
fn validation_fills_flintlocks_defaults() {
    let s = validate(good(), NetworkMode::User).expect("valid");
    assert_eq!((s.namespace.as_str(), s.vcpu, s.memory_in_mb), ("default", 2, 1024));
}

#[test]
fn validation_names_what_is_wrong() {
    type Change = Box<dyn Fn(&mut fl::MicroVmSpec)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|s| s.id.clear()), "id"),
        (Box::new(|s| s.kernel = None), "kernel.image"),
        (Box::new(|s| s.root_volume = None), "container_source"),
        (Box::new(|s| s.vcpu = 65), "vcpu"),
        (Box::new(|s| s.memory_in_mb = 16), "memory_in_mb"),
        (Box::new(|s| s.initrd = Some(fl::Initrd::default())), "initrd.image"),
        (Box::new(|s| s.provider = Some("vmware".into())), "provider"),
        (Box::new(|s| s.interfaces[0].guest_mac = Some("01:00:00:00:00:01".into())), "MAC"),
        // A client naming more cards than a VM has, or one card twice.
        (
            Box::new(|s| {
                s.interfaces = (0..=hearth_types::card::MAX_CARDS)
                    .map(|i| fl::NetworkInterface {
                        device_id: format!("eth{i}"),
                        r#type: fl::network_interface::IfaceType::Tap as i32,
                        ..Default::default()
                    })
                    .collect()
            }),
            "at most",
        ),
        (Box::new(|s| s.interfaces.push(s.interfaces[0].clone())), "given twice"),
        (
            Box::new(|s| {
                s.metadata.insert("../user-data".into(), String::new()).map(drop).unwrap_or(())
            }),
            "metadata key",
        ),
        (
            Box::new(|s| {
                let big = "x".repeat(hearth_types::vm::MAX_CLOUD_INIT_BYTES + 1);
                s.metadata.insert("user-data".into(), big).map(drop).unwrap_or(())
            }),
            "larger than",
        ),
        (Box::new(|s| s.id = "bad/name".into()), "microvm id"),
        (
            Box::new(|s| {
                s.additional_volumes.push(fl::Volume { id: "v".into(), ..Default::default() })
            }),
            "container_source",
        ),
        (
            Box::new(|s| {
                let src = fl::VolumeSource {
                    virtiofs_source: Some("srv/../etc".into()),
                    ..Default::default()
                };
                s.additional_volumes.push(fl::Volume {
                    id: "v".into(),
                    source: Some(src),
                    mount_point: Some("/srv".into()),
                    ..Default::default()
                })
            }),
            "must be an absolute host directory",
        ),
        (
            Box::new(|s| {
                let src =
                    fl::VolumeSource { virtiofs_source: Some("/srv".into()), ..Default::default() };
                s.additional_volumes.push(fl::Volume {
                    id: "v".into(),
                    source: Some(src),
                    ..Default::default()
                })
            }),
            "needs the mount_point",
        ),
        (
            Box::new(|s| {
                let src =
                    fl::VolumeSource { virtiofs_source: Some("/srv".into()), ..Default::default() };
                s.provider = Some("firecracker".into());
                s.additional_volumes.push(fl::Volume {
                    id: "v".into(),
                    source: Some(src),
                    mount_point: Some("/srv".into()),
                    ..Default::default()
                })
            }),
            "Firecracker has no virtio-fs",
        ),
    ];
    for (change, needle) in cases {
        let mut s = good();
        change(&mut s);
        let e = validate(s, NetworkMode::User).expect_err(needle);
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
}

#[test]
fn instance_id_is_injected_unless_the_client_gave_one_and_the_rest_of_the_meta_data_kept() {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut s = good();
    s.metadata.insert(
        "meta-data".into(),
        b64.encode("local_hostname: node1\ninstance_id: client-chose-this\n"),
    );
    inject_instance_id(&mut s, "01ABC").expect("inject");
    let text = String::from_utf8(b64.decode(&s.metadata["meta-data"]).expect("b64")).expect("utf8");
    let doc: serde_yaml::Mapping = serde_yaml::from_str(&text).expect("yaml");
    assert_eq!(doc.get("instance_id").and_then(|v| v.as_str()), Some("client-chose-this"));
    assert_eq!(doc.get("instance-id").and_then(|v| v.as_str()), Some("client-chose-this"));
    assert_eq!(doc.get("local_hostname").and_then(|v| v.as_str()), Some("node1"));
    let mut empty = good();
    inject_instance_id(&mut empty, "01XYZ").expect("inject");
    assert!(String::from_utf8(b64.decode(&empty.metadata["meta-data"]).expect("b64"))
        .expect("utf8")
        .contains("instance_id: 01XYZ"));
    // Raw (not base64) meta-data, as the fl CLI sends a file.
    let mut raw = good();
    raw.metadata.insert("meta-data".into(), "local_hostname: raw\n".into());
    inject_instance_id(&mut raw, "01RAW").expect("inject");
    let text =
        String::from_utf8(b64.decode(&raw.metadata["meta-data"]).expect("b64")).expect("utf8");
    assert!(text.contains("local_hostname: raw") && text.contains("instance_id: 01RAW"), "{text}");
}

#[test]
fn the_create_request_carries_cloud_init_the_mac_and_kernel_arguments() {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut s = validate(good(), NetworkMode::User).expect("valid");
    s.interfaces[0].guest_mac = Some("02:00:00:00:00:07".into());
    let k = s.kernel.as_mut().expect("kernel");
    k.add_network_config = true;
    k.cmdline.insert("console".into(), "ttyS0".into());
    k.cmdline.insert("quiet".into(), String::new());
    s.metadata.insert("user-data".into(), b64.encode("#cloud-config\n"));
    // Values that are not base64 are taken as they are; keys beyond cloud-init's are kept.
    s.metadata.insert("vendor-data".into(), "#cloud-config raw!\n".into());
    s.metadata.insert("capmvm-extra".into(), b64.encode([0x1f_u8, 0x8b, 0x08, 0xff]));
    s.labels.insert("cluster-name".into(), "c1".into());
    let req = create_request(&s, "01ABC", "fl-0123", NetworkMode::User).expect("request");
    assert_eq!(req.name, "mvm0.default");
    assert_eq!(req.image, "reg/os:1");
    assert_eq!((req.cpus, req.memory_mib), (2, 1024));
    assert_eq!(req.entrypoint, vec!["/sbin/init"]);
    assert_eq!(req.mac, "02:00:00:00:00:07");
    assert_eq!(req.kernel_args, "console=ttyS0 quiet");
    assert_eq!(req.cloud_init["user-data"], b"#cloud-config\n");
    assert_eq!(req.cloud_init["vendor-data"], b"#cloud-config raw!\n");
    assert_eq!(req.cloud_init["capmvm-extra"], [0x1f, 0x8b, 0x08, 0xff], "bytes exactly");
    assert_eq!(req.cloud_init_network, "eth1", "network-config is generated for eth1 at start");
    assert_eq!(req.labels[UID_LABEL], "01ABC");
    assert_eq!(req.labels["cluster-name"], "c1");
    assert_eq!(req.network, "user");
}

/// With hearthd's --parent-iface, an interface of type MACVTAP (the default) is a macvtap, and a
/// static address on it may be on any subnet, with its gateway and resolvers.
#[test]
fn a_macvtap_interface_takes_a_static_lan_address() {
    let mut s = good();
    s.interfaces[0].address = Some(fl::StaticAddress {
        address: "192.168.1.50/24".into(),
        gateway: Some("192.168.1.1".into()),
        nameservers: vec!["192.168.1.1".into()],
    });
    let nets = Nets::new(NetworkMode::Bridge, Some("eth0"));
    let network = nets.of(&s.interfaces[0]);
    assert_eq!(network, NetworkMode::Macvtap);
    assert_eq!(Nets::new(NetworkMode::Bridge, None).of(&s.interfaces[0]), NetworkMode::Bridge);
    let s = validate(s, network).expect("valid on the LAN");
    let req = create_request(&s, "01ABC", "fl-0", network).expect("request");
    assert_eq!(req.network, "macvtap");
    assert_eq!((req.address.as_str(), req.gateway.as_str()), ("192.168.1.50/24", "192.168.1.1"));
    assert_eq!(req.dns, ["192.168.1.1"]);
    // The same address is not the bridge's.
    assert!(validate(good_with_address("192.168.1.50/24"), NetworkMode::Bridge).is_err());
}

fn good_with_address(cidr: &str) -> fl::MicroVmSpec {
    let mut s = good();
    s.interfaces[0].address =
        Some(fl::StaticAddress { address: cidr.into(), ..Default::default() });
    s
}

#[test]
fn an_additional_volume_sourced_from_an_absolute_path_is_the_hosts_device() {
    let mut s = good();
    let vol = |id: &str, source: &str| fl::Volume {
        id: id.into(),
        source: Some(fl::VolumeSource {
            container_source: Some(source.into()),
            ..Default::default()
        }),
        mount_point: Some(format!("/mnt/{id}")),
        ..Default::default()
    };
    s.additional_volumes = vec![vol("disk", "/dev/vdb"), vol("mods", "reg/modules:1")];
    let s = validate(s, NetworkMode::User).expect("valid");
    let req = create_request(&s, "01ABC", "fl-0", NetworkMode::User).expect("request");
    let got: Vec<(&str, &str, &str)> = (req.volumes.iter())
        .map(|v| (v.id.as_str(), v.image.as_str(), v.host_path.as_str()))
        .collect();
    assert_eq!(got, [("disk", "", "/dev/vdb"), ("mods", "reg/modules:1", "")]);
    // A client may not make a host file (or a path out of /dev) its VM's disk.
    for path in ["/etc/shadow", "/dev/../etc/shadow", "/var/lib/hearth/vms/x/disk.img"] {
        let mut s = good();
        s.additional_volumes = vec![vol("disk", path)];
        let e = validate(s, NetworkMode::User).expect_err(path);
        assert!(e.message().contains("block device under /dev"), "{path}: {}", e.message());
    }
}

#[test]
fn a_virtiofs_source_is_shared_only_under_the_hosts_virtiofs_roots() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (root, other) = (tmp.path().join("shares"), tmp.path().join("private"));
    std::fs::create_dir_all(root.join("a")).expect("root");
    std::fs::create_dir(&other).expect("other");
    // A link inside the root that leads out of it is judged by where it leads.
    std::os::unix::fs::symlink(&other, root.join("out")).expect("symlink");
    let mut s = good();
    s.additional_volumes = vec![fl::Volume {
        id: "data".into(),
        source: Some(fl::VolumeSource {
            virtiofs_source: Some(root.join("a").display().to_string()),
            ..Default::default()
        }),
        mount_point: Some("/data".into()),
        is_read_only: true,
        ..Default::default()
    }];
    let s = validate(s, NetworkMode::User).expect("valid");
    let mut req = create_request(&s, "01ABC", "fl-0", NetworkMode::User).expect("request");
    assert!(req.volumes[0].share && req.volumes[0].read_only, "{:?}", req.volumes);
    let e = confine_shares(&mut req.clone(), &[]).expect_err("no roots");
    assert!(e.contains("--virtiofs-root"), "{e}");
    confine_shares(&mut req, std::slice::from_ref(&root)).expect("under the root");
    let real = std::fs::canonicalize(root.join("a")).expect("real");
    assert_eq!(req.volumes[0].host_path, real.display().to_string());
    for outside in [other.clone(), root.join("out"), tmp.path().to_owned()] {
        let e = share_path(&outside.display().to_string(), std::slice::from_ref(&root))
            .expect_err("outside");
        assert!(e.contains("not under"), "{}: {e}", outside.display());
    }
}

#[test]
fn static_addresses_need_the_bridge_and_must_lie_on_it() {
    let with = |address: &str, gateway: Option<&str>| {
        let mut s = good();
        let a = fl::StaticAddress {
            address: address.into(),
            gateway: gateway.map(Into::into),
            nameservers: vec![],
        };
        s.interfaces[0].address = Some(a);
        s
    };
    let e = validate(with("10.61.0.50/16", None), NetworkMode::User).expect_err("user mode");
    assert!(e.message().contains("--flintlock-network bridge"), "{}", e.message());
    let ok = validate(with("10.61.0.50/16", Some("10.61.0.1/16")), NetworkMode::Bridge)
        .expect("on the bridge");
    let req = create_request(&ok, "01ABC", "fl-0", NetworkMode::Bridge).expect("request");
    assert_eq!((req.address.as_str(), req.network.as_str()), ("10.61.0.50", "bridge"));
    for (address, gateway, needle) in [
        ("192.168.1.5/24", None, "/16"),
        ("192.168.1.5/16", None, "not a host address"),
        ("10.61.0.1/16", None, "not a host address"),
        ("10.61.0.50", None, "CIDR"),
        ("10.61.0.50/16", Some("10.61.0.254"), "gateway"),
    ] {
        let e = validate(with(address, gateway), NetworkMode::Bridge).expect_err(address);
        assert!(e.message().contains(needle), "{address}: {}", e.message());
    }
}

#[test]
fn the_state_follows_the_vm() {
    use fl::micro_vm_status::MicroVmState as S;
    let rec = |phase| Record {
        uid: "u".into(),
        spec: String::new(),
        phase,
        reason: "pull failed".into(),
        retry: 0,
        created_at: 0,
        updated_at: 0,
        version: 0,
        reported: String::new(),
    };
    let vm = |state| hearth_testkit::record(1, hearth_types::Desired::Running, state);
    assert_eq!(observed_state(&rec(Phase::Pending), None).0, S::Pending);
    assert_eq!(observed_state(&rec(Phase::Failed), None), (S::Failed, "pull failed".into()));
    assert_eq!(observed_state(&rec(Phase::Deleting), Some(&vm(VmState::Running))).0, S::Deleting);
    assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Starting))).0, S::Pending);
    assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Running))).0, S::Created);
    assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Stopped))).0, S::Failed);
    assert!(observed_state(&rec(Phase::Created), None).1.contains("removed"));
    // A VM that restarts: PENDING, saying why; FAILED always says why.
    let mut restarting = vm(VmState::Stopped);
    (restarting.status.restarting, restarting.status.exit_code) = (true, Some(1));
    let (state, why) = observed_state(&rec(Phase::Created), Some(&restarting));
    assert_eq!(state, S::Pending);
    assert!(why.starts_with("restarting") && why.contains("exit code 1"), "{why}");
    for state in [VmState::Stopped, VmState::Failed, VmState::Stopping] {
        let (s, why) = observed_state(&rec(Phase::Created), Some(&vm(state)));
        assert!(s == S::Failed && !why.is_empty(), "{state}: {why:?}");
    }
}

#[test]
fn basic_auth_wants_the_base64_token_under_any_case_of_basic() {
    let with = |v: &str| {
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", v.parse().expect("header"));
        r
    };
    let token = base64::engine::general_purpose::STANDARD.encode("s3cret");
    assert!(check_basic_auth("s3cret", &with(&format!("Basic {token}"))).is_ok());
    assert!(check_basic_auth("s3cret", &with(&format!("basic {token}"))).is_ok());
    assert_eq!(
        check_basic_auth("s3cret", &with("Basic czNjcmV")).expect_err("wrong").code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        check_basic_auth("s3cret", &with(&format!("Bearer {token}"))).expect_err("scheme").code(),
        tonic::Code::Unauthenticated
    );
    assert!(check_basic_auth("s3cret", &Request::new(())).is_err());
}

#[test]
fn a_long_or_odd_microvm_name_maps_to_a_bounded_hearth_name_of_its_own() {
    let mut s = good();
    s.id = "node".into();
    s.namespace = "ns0".into();
    assert_eq!(vm_name(&s), "node.ns0", "a name hearth takes is used as it is");
    s.id = format!("capmvm-{}", "a".repeat(83));
    s.namespace = "n".repeat(90);
    s.uid = Some("01HZX3A7K9QW2E5R8T6Y4U1IOP".into());
    let a = vm_name(&s);
    assert!(hearth_types::validate_name(&a).is_ok() && a.len() <= 63, "{a}");
    assert!(a.starts_with("capmvm-aaa") && a.ends_with("-8t6y4u1iop"), "{a}");
    s.uid = Some("01HZX3A7K9QW2E5R8T6Y4U1IOQ".into());
    assert_ne!(vm_name(&s), a, "another microVM, another name");
    s.id = "Ünïcode/../id".into();
    let odd = vm_name(&s);
    assert!(hearth_types::validate_name(&odd).is_ok(), "{odd}");
    // Validation takes long names but not paths or control characters.
    let mut long = good();
    long.id = "x".repeat(90);
    long.namespace = "y".repeat(90);
    assert!(validate(long, NetworkMode::User).is_ok());
    for bad in ["a/b", "a\nb", &"z".repeat(254)] {
        let mut b = good();
        b.id = bad.into();
        let e = validate(b, NetworkMode::User).expect_err(bad);
        assert!(e.message().contains("microvm id"), "{e:?}");
    }
}
