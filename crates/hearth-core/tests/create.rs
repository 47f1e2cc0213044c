//! The create use-case against the ports' fakes: what a user sees when `hearth run` refuses,
//! and that a refused create leaves no record behind.

use std::net::Ipv4Addr;

use hearth_core::ports::VmRepository;
use hearth_core::{ErrorKind, NewVm, NewVolume, SshKey};
use hearth_testkit::fakes::{harness, Harness};
use hearth_types::{Desired, ImageConfig, NetworkMode, VmState, VolumeSource};

const MIB: u64 = 1 << 20;

/// A host with the busybox image (48 MiB root filesystem, root and nobody users) and a kernel.
fn host() -> Harness {
    let h = harness();
    let config = ImageConfig { cmd: vec!["sh".into()], ..Default::default() };
    h.host.add_image(
        "docker.io/library/busybox:latest",
        config,
        48 * MIB,
        Some(("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n", "root:x:0:\n")),
    );
    h.host.add_kernel("default");
    h
}

fn new_vm() -> NewVm {
    NewVm {
        image: "docker.io/library/busybox:latest".into(),
        cpus: 1,
        memory_mib: 256,
        disk_bytes: 64 * MIB,
        network: NetworkMode::User,
        ..Default::default()
    }
}

fn records(h: &Harness) -> usize {
    h.host.list().expect("list").len()
}

#[tokio::test]
async fn a_create_records_a_stopped_vm_with_the_image_and_default_kernel() {
    let h = host();
    let rec = h.reconciler.create(new_vm()).await.expect("create");
    assert_eq!(rec.desired, Desired::Stopped);
    assert_eq!(rec.status.state, VmState::Created);
    assert_eq!(rec.spec.image, "docker.io/library/busybox:latest");
    assert_eq!(rec.spec.kernel, "default");
    assert!(!rec.spec.name.is_empty(), "a name is generated");
    assert_eq!(h.host.record(&rec.spec.id), Some(rec));
}

#[tokio::test]
async fn generated_names_never_repeat_and_a_taken_name_is_refused() {
    let h = host();
    let a = h.reconciler.create(new_vm()).await.expect("first");
    let b = h.reconciler.create(new_vm()).await.expect("second");
    assert_ne!(a.spec.name, b.spec.name);
    let e = h
        .reconciler
        .create(NewVm { name: Some(a.spec.name.clone()), ..new_vm() })
        .await
        .expect_err("name in use");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert!(e.message.contains(&a.spec.name) && e.message.contains("--name"), "{e}");
    assert_eq!(records(&h), 2);
}

#[tokio::test]
async fn missing_images_and_kernels_say_how_to_get_them() {
    let h = host();
    let e = h.reconciler.create(NewVm { image: "alpine:3".into(), ..new_vm() }).await;
    let e = e.expect_err("not pulled");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("hearth image pull alpine:3"), "{e}");

    let e = h.reconciler.create(NewVm { image: "Bad Ref".into(), ..new_vm() }).await;
    assert_eq!(e.expect_err("malformed").kind, ErrorKind::Invalid);

    let e = h.reconciler.create(NewVm { kernel: Some("6.9".into()), ..new_vm() }).await;
    let e = e.expect_err("no such kernel");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("hearth kernel ls"), "{e}");
    // A kernel by reference is looked up under its familiar name, and the fix is a pull.
    let kernel = Some("docker.io/weaveworks/ignite-kernel:5.10.51".into());
    let e = h.reconciler.create(NewVm { kernel, ..new_vm() }).await.expect_err("not pulled");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.starts_with("kernel weaveworks/ignite-kernel:5.10.51 does not exist")
            && e.message.contains("hearth kernel pull weaveworks/ignite-kernel:5.10.51"),
        "{e}"
    );
    let e = h.reconciler.create(NewVm { kernel: Some("Bad:Ref:".into()), ..new_vm() }).await;
    assert_eq!(e.expect_err("malformed").kind, ErrorKind::Invalid);

    let volume = NewVolume { id: "data".into(), image: "data:1".into(), ..Default::default() };
    let e = h.reconciler.create(NewVm { volumes: vec![volume], ..new_vm() }).await;
    let e = e.expect_err("volume image not pulled");
    assert!(e.message.contains("volume data") && e.message.contains("pull"), "{e}");
    assert_eq!(records(&h), 0);
}

/// A host disk has one writer at most, however it is named; readers share it.
#[tokio::test]
async fn a_host_disk_is_never_given_to_two_writers_and_a_missing_one_is_named() {
    let h = host();
    h.host.host_disk("/dev/vdb", "disk-b");
    h.host.host_disk("/dev/disk/by-id/virtio-b", "disk-b");
    h.host.host_disk("/srv/shared.img", "shared");
    let vol = |path: &str, read_only: bool| NewVolume {
        id: "data".into(),
        source: VolumeSource::Host { path: path.into() },
        mount_point: Some("/data".into()),
        read_only,
        ..Default::default()
    };
    let with = |name: &str, vols: Vec<NewVolume>| NewVm {
        name: Some(name.into()),
        volumes: vols,
        ..new_vm()
    };
    let first = h.reconciler.create(with("a", vec![vol("/dev/vdb", false)])).await.expect("a");
    assert_eq!(first.spec.volumes[0].source, VolumeSource::Host { path: "/dev/vdb".into() });

    // Another name for the same disk, writable or not: refused, naming the holder and the fix.
    for read_only in [false, true] {
        let e = h.reconciler.create(with("b", vec![vol("/dev/disk/by-id/virtio-b", read_only)]));
        let e = e.await.expect_err("two writers");
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert!(e.message.contains("VM a") && e.message.contains(":ro"), "{e}");
    }
    // Read-only everywhere is shared; one writer among readers is not.
    h.reconciler.create(with("c", vec![vol("/srv/shared.img", true)])).await.expect("reader");
    h.reconciler.create(with("d", vec![vol("/srv/shared.img", true)])).await.expect("reader");
    let e = h.reconciler.create(with("e", vec![vol("/srv/shared.img", false)])).await;
    assert_eq!(e.expect_err("a writer among readers").kind, ErrorKind::Conflict);
    let missing = vec![vol("/dev/null-ish", true)];
    let e = h.reconciler.create(with("f", missing)).await.expect_err("not on the host");
    assert!(e.message.contains("volume data") && e.message.contains("/dev/null-ish"), "{e}");
    assert_eq!(records(&h), 3);
}

/// A shared directory is kept by the path the host resolved, mounted by hearth-init as
/// virtio-fs; a VMM without virtio-fs and a path that is no directory are refused.
#[tokio::test]
async fn a_shared_directory_is_kept_by_its_real_path_and_needs_a_vmm_with_virtio_fs() {
    let h = host();
    h.host.host_disk("/srv/disk.img", "disk");
    let share = |path: &str| NewVolume {
        id: "data".into(),
        source: VolumeSource::Share { path: path.into() },
        mount_point: Some("/data".into()),
        read_only: true,
        ..Default::default()
    };
    let rec = h.reconciler.create(NewVm { volumes: vec![share("/srv/data/")], ..new_vm() }).await;
    let rec = rec.expect("shared");
    assert_eq!(rec.spec.volumes[0].source, VolumeSource::Share { path: "/srv/data".into() });
    let image = ImageConfig { cmd: vec!["sh".into()], ..Default::default() };
    let cfg = hearth_core::guest_config(&rec.spec, &image).expect("guest config");
    assert!(cfg.volumes[0].share && cfg.volumes[0].read_only, "{:?}", cfg.volumes);

    let e = h.reconciler.create(NewVm { volumes: vec![share("/srv/disk.img")], ..new_vm() });
    let e = e.await.expect_err("a file");
    assert!(e.message.contains("volume data") && e.message.contains("not a directory"), "{e}");
    let fc = NewVm {
        provider: hearth_types::Provider::Firecracker,
        network: NetworkMode::Bridge,
        volumes: vec![share("/srv/data")],
        ..new_vm()
    };
    let e = h.reconciler.create(fc).await.expect_err("no virtio-fs");
    assert!(e.message.contains("virtio-fs") && e.message.contains("--vmm qemu"), "{e}");
    assert_eq!(records(&h), 1);
}

#[tokio::test]
async fn without_any_kernel_the_error_says_to_import_one() {
    let h = harness();
    h.host.add_image("docker.io/library/busybox:latest", ImageConfig::default(), MIB, None);
    let e = h.reconciler.create(new_vm()).await.expect_err("no kernel");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(e.message.contains("hearth kernel import"), "{e}");
}

#[tokio::test]
async fn a_size_the_image_does_not_fit_in_or_the_host_cannot_hold_is_refused() {
    let h = host();
    let e = h.reconciler.create(NewVm { disk_bytes: 32 * MIB, ..new_vm() }).await;
    let e = e.expect_err("too small");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(
        e.message.contains("smaller than the root filesystem") && e.message.contains("or more"),
        "{e}"
    );

    h.host.set_capacity(32 * MIB);
    let e = h.reconciler.create(new_vm()).await.expect_err("larger than the filesystem");
    assert!(e.message.contains("larger than the whole filesystem"), "{e}");
    assert_eq!(records(&h), 0);
}

#[tokio::test]
async fn bridge_addresses_are_allocated_once_and_asked_ones_checked() {
    let h = host();
    let bridge = || NewVm { network: NetworkMode::Bridge, ..new_vm() };
    let a = h.reconciler.create(bridge()).await.expect("first");
    let b = h.reconciler.create(bridge()).await.expect("second");
    let (a_ip, b_ip) = (a.spec.address.expect("address"), b.spec.address.expect("address"));
    assert_ne!(a_ip, b_ip);

    let e = h.reconciler.create(NewVm { address: Some(a_ip), ..bridge() }).await;
    let e = e.expect_err("taken");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert!(e.message.contains(&a.spec.name), "{e}");

    let user = NewVm { address: Some(Ipv4Addr::new(10, 61, 0, 99)), ..new_vm() };
    let e = h.reconciler.create(user).await.expect_err("address without the bridge");
    assert!(e.message.contains("--network bridge"), "{e}");

    let outside = NewVm { address: Some(Ipv4Addr::new(192, 168, 1, 2)), ..bridge() };
    assert_eq!(
        h.reconciler.create(outside).await.expect_err("off the bridge").kind,
        ErrorKind::Invalid
    );
    assert_eq!(records(&h), 2);
}

#[tokio::test]
async fn each_bridge_card_gets_its_own_address_and_only_the_first_a_route() {
    let h = host();
    let card = || hearth_types::NicSpec::on(NetworkMode::Bridge);
    let two = || NewVm { network: NetworkMode::Bridge, nics: vec![card()], ..new_vm() };
    let a = h.reconciler.create(two()).await.expect("two cards");
    let b = h.reconciler.create(two()).await.expect("two more");
    let ips: Vec<Ipv4Addr> = [&a, &b]
        .iter()
        .flat_map(|r| [r.spec.address, r.spec.nics[0].address])
        .map(|ip| ip.expect("every card has an address"))
        .collect();
    let unique: std::collections::BTreeSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 4, "no address given twice: {ips:?}");

    // The guest is told every card, each by its own MAC; only the first routes.
    let image = ImageConfig { cmd: vec!["sh".into()], ..Default::default() };
    let cfg = hearth_core::guest_config(&a.spec, &image).expect("guest config");
    let first = cfg.network.as_ref().expect("first card");
    assert_eq!(cfg.cards.len(), 1);
    let second = cfg.cards[0].network.as_ref().expect("second card");
    assert_ne!(first.mac, second.mac);
    assert_eq!(second.address, ips[1].to_string());
    assert!(!first.gateway.is_empty() && second.gateway.is_empty(), "{first:?} {second:?}");

    // One address asked for on two cards, and a second card's address taken elsewhere.
    let twice = NewVm {
        address: Some(Ipv4Addr::new(10, 61, 0, 90)),
        nics: vec![hearth_types::NicSpec { address: Some(Ipv4Addr::new(10, 61, 0, 90)), ..card() }],
        ..two()
    };
    let e = h.reconciler.create(twice).await.expect_err("one address, two cards");
    assert!(e.message.contains("two of the VM's cards"), "{e}");
    let taken =
        NewVm { nics: vec![hearth_types::NicSpec { address: Some(ips[1]), ..card() }], ..two() };
    let e = h.reconciler.create(taken).await.expect_err("taken");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert_eq!(records(&h), 2);
}

#[tokio::test]
async fn a_user_the_image_lacks_is_refused_unless_its_own_init_runs() {
    let h = host();
    let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
    for user in ["postgres", "nobody"] {
        let config =
            ImageConfig { cmd: vec!["sh".into()], user: user.into(), ..Default::default() };
        h.host.add_image(&format!("runs-as-{user}:1"), config, MIB, Some((passwd, "root:x:0:\n")));
    }
    let as_user = |u: &str| NewVm { image: format!("runs-as-{u}:1"), ..new_vm() };
    let e = h.reconciler.create(as_user("postgres")).await.expect_err("no such user");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.contains("USER \"postgres\""), "{e}");
    h.reconciler.create(as_user("nobody")).await.expect("a user the image has");
    let init = NewVm { entrypoint: Some(vec!["/sbin/init".into()]), ..as_user("postgres") };
    h.reconciler.create(init).await.expect("init runs as root and switches itself");
}

#[tokio::test]
async fn a_generated_ssh_key_is_recorded_and_a_failed_one_leaves_no_vm() {
    let h = host();
    let rec = h.reconciler.create(NewVm { ssh: SshKey::Generate, ..new_vm() }).await.expect("ssh");
    let key = rec.spec.ssh_public_key.expect("public key");
    assert!(key.starts_with("ssh-ed25519 ") && key.ends_with(&format!("hearth@{}", rec.spec.name)));
    assert_eq!(h.host.keys_made(), vec![h.host.vm_dir(&rec.spec.id)]);
    assert!(rec.status.ssh_key_path.is_some());

    h.host.fail_keys();
    let e = h.reconciler.create(NewVm { ssh: SshKey::Generate, ..new_vm() }).await;
    assert!(e.expect_err("keygen failed").message.contains("SSH key pair"));
    assert_eq!(records(&h), 1);
    assert_eq!(h.host.discarded().len(), 1, "the half-made directory goes");
}

#[tokio::test]
async fn a_failed_save_is_reported_and_nothing_is_recorded() {
    let h = host();
    h.host.fail_saves(true);
    let e = h.reconciler.create(new_vm()).await.expect_err("disk full");
    assert!(e.message.contains("No space left"), "{e}");
    h.host.fail_saves(false);
    assert_eq!(records(&h), 0);
    assert_eq!(h.host.discarded().len(), 1, "the half-made directory goes");
}

#[tokio::test]
async fn a_published_port_in_use_is_refused_before_anything_is_recorded() {
    let h = host();
    let port: hearth_types::PortMapping = "8080:80".parse().expect("port");
    let first = h.reconciler.create(NewVm { ports: vec![port.clone()], ..new_vm() }).await;
    let mut first = first.expect("first");
    first.status.state = VmState::Running;
    h.host.put(first);
    let e = h.reconciler.create(NewVm { ports: vec![port], ..new_vm() }).await;
    assert!(e.expect_err("port taken").message.contains("8080"));
    assert_eq!(records(&h), 1);
}

#[tokio::test]
async fn an_image_or_kernel_in_use_is_kept_unless_forced() {
    let h = host();
    let vm = h.reconciler.create(new_vm()).await.expect("create");
    let image = "docker.io/library/busybox:latest";
    let e = h.reconciler.remove_image(image, false).await.expect_err("in use");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(e.message.contains(&vm.spec.name) && e.message.contains("--force"), "{e}");
    let e = h.reconciler.remove_kernel("default", false).await.expect_err("in use");
    assert!(e.message.contains(&vm.spec.name), "{e}");

    h.reconciler.remove_image(image, true).await.expect("forced");
    let e = h.reconciler.create(new_vm()).await.expect_err("gone");
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = h.reconciler.remove_image(image, false).await.expect_err("already gone");
    assert!(e.message.contains("hearth image ls"), "{e}");
    h.reconciler.remove_kernel("default", true).await.expect("forced");
}

#[tokio::test]
async fn an_image_used_only_as_a_volume_is_kept_too() {
    let h = host();
    h.host.add_image("data:1", ImageConfig::default(), MIB, None);
    let volume = NewVolume { id: "data".into(), image: "data:1".into(), ..Default::default() };
    h.reconciler.create(NewVm { volumes: vec![volume], ..new_vm() }).await.expect("create");
    let e = h.reconciler.remove_image("data:1", false).await.expect_err("a volume uses it");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
}

#[tokio::test]
async fn a_kernel_the_vmm_cannot_boot_is_refused_at_create_naming_the_kernel_and_the_fix() {
    let h = host();
    h.host.add_kernel_of("k8s-5.10", hearth_core::ports::KernelFormat::Elf);
    let e = h
        .reconciler
        .create(NewVm { kernel: Some("k8s-5.10".into()), ..new_vm() })
        .await
        .expect_err("QEMU cannot boot an ELF without PVH");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(
        e.message.contains("kernel k8s-5.10 is an ELF vmlinux without a PVH note")
            && e.message.contains("bzImage"),
        "{e}"
    );
    assert_eq!(records(&h), 0);
    h.host.add_kernel_of("pvh", hearth_core::ports::KernelFormat::ElfPvh);
    let ok = NewVm { kernel: Some("pvh".into()), ..new_vm() };
    h.reconciler.create(ok).await.expect("an ELF with PVH boots under QEMU");
}

#[tokio::test]
async fn what_the_vmm_cannot_do_is_refused_at_create_naming_the_alternative() {
    // The harness drives only its fake QEMU: Firecracker's entry there can do nothing.
    let h = host();
    let fc = hearth_types::Provider::Firecracker;
    let e = h.reconciler.create(NewVm { provider: fc, ..new_vm() }).await.expect_err("no user net");
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(
        e.message.contains("--vmm firecracker") && e.message.contains("--network bridge"),
        "{e}"
    );
    let tcg = NewVm {
        provider: fc,
        network: NetworkMode::None,
        accel: hearth_types::Accel::Tcg,
        ..new_vm()
    };
    let e = h.reconciler.create(tcg).await.expect_err("no tcg");
    assert!(e.message.contains("--vmm qemu"), "{e}");
    assert_eq!(records(&h), 0);
}
