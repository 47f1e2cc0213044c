//! The Firecracker provider against the real `firecracker` binary: its configuration accepted
//! through the API, the Vmm contract, the console captured through its FIFOs before the guest
//! runs (the kernel's own command line read back from the guest's serial port), stop and
//! cleanup. The guest is Debian's cloud kernel (its ELF vmlinux, taken out of the bzImage) with
//! an empty initramfs. Where KVM cannot run guests (a nested paravirtual KVM) the guest dies
//! after its first lines, which is all these tests need; a boot to ready is an end-to-end test.
//! Skips, saying why, without root, /dev/kvm, the binary or the kernel.

use std::time::Duration;

use hearth_testkit::wait_for_text;

use hearth_core::ports::{LaunchSpec, Vmm};
use hearth_types::Accel;
use hearth_vmm::console::{Console, LogLimits};
use hearth_vmm::firecracker::{jail, Api, Firecracker, API_SOCK};

/// A VM directory with the test kernel's vmlinux (Firecracker boots ELF kernels only).
fn vm(extra_cmdline: &str) -> Option<(tempfile::TempDir, LaunchSpec)> {
    let vmlinux = |bz: &[u8]| hearth_kernel::vmlinux::from_bzimage(bz).expect("elf");
    hearth_testkit::kvm::vm_dir("firecracker", vmlinux, extra_cmdline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_keeps_the_vmm_contract() {
    let Some((_dir, spec)) = vm("") else { return };
    hearth_testkit::contract::vmm_contract(&Firecracker::default(), &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_is_configured_its_console_captured_and_it_is_stopped_and_cleaned_up() {
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    // loglevel=8 before earlyprintk: the early console replays the kernel's buffer with the
    // loglevel in force when it registers (../shared/vmm/README.md).
    let Some((dir, spec)) = vm("loglevel=8 earlyprintk=serial,ttyS0") else { return };
    let fc = Firecracker::default();
    let launched = fc.launch(&spec).expect("launch");
    let h = launched.handle();

    // Configured as asked, and waiting for InstanceStart.
    let api = Api::firecracker(&dir.path().join(API_SOCK));
    let machine = api.get("/machine-config").expect("machine-config");
    assert_eq!(machine["vcpu_count"], 1);
    assert_eq!(machine["mem_size_mib"], 256);
    let config = api.get("/vm/config").expect("vm config");
    let drives: Vec<&str> = config["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .filter_map(|d| d["drive_id"].as_str())
        .collect();
    assert_eq!(drives, ["hearth_root", "config"]);
    assert!(config["vsock"]["uds_path"].as_str().is_some_and(|p| p.ends_with("/agent.sock")));
    assert_eq!(api.get("/").expect("info")["state"], "Not started");

    // The console is captured before the guest runs, so its first line is in the log.
    let _console = Console::capture(dir.path(), LogLimits::default(), Default::default())
        .await
        .expect("capture");
    assert!(fc.start_guest(dir.path(), false).await.expect("InstanceStart"));
    let log = dir.path().join("console.log");
    // The command line's last word: the whole line is in (the log is read as it is written).
    let text = wait_for_text(&log, "earlyprintk=serial,ttyS0", Duration::from_secs(180));
    let line = text.lines().find(|l| l.contains("Command line:")).expect("line");
    assert!(line.contains("console=ttyS0") && line.contains("rdinit=/init"), "{line}");

    // Pause and resume, as Firecracker reports them.
    hearth_vmm::firecracker::pause(dir.path()).await.expect("pause");
    assert_eq!(hearth_vmm::firecracker::state(dir.path()).expect("state"), "Paused");
    hearth_vmm::firecracker::resume(dir.path()).await.expect("resume");
    assert_eq!(hearth_vmm::firecracker::state(dir.path()).expect("state"), "Running");

    // A stop with a grace period asks first (Ctrl-Alt-Del), then kills; nothing is left.
    fc.stop(dir.path(), h, Duration::from_secs(1)).await.expect("stop");
    assert!(fc.find(dir.path(), Some(h)).is_none());
    fc.cleanup(dir.path(), &spec.confinement);
    for f in [API_SOCK, "firecracker.pid", "agent.sock", "console.out", "console.in"] {
        assert!(!dir.path().join(f).exists(), "{f} left behind");
    }
    assert!(log.exists(), "the console log stays for `hearth logs`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_firecracker_refuses_fails_the_launch_with_its_words_and_leaves_nothing() {
    let Some((dir, mut spec)) = vm("") else { return };
    let kernel = std::mem::replace(&mut spec.kernel, dir.path().join("no-such-vmlinux"));
    let e = Firecracker::default().launch(&spec).expect_err("refused").to_string();
    assert!(e.contains("firecracker failed to start") && e.contains("/boot-source"), "{e}");
    assert!(!dir.path().join(API_SOCK).exists() && !dir.path().join("firecracker.pid").exists());
    let tcg = LaunchSpec { accel: Accel::Tcg, ..spec.clone() };
    let e = Firecracker::default().launch(&tcg).expect_err("no tcg").to_string();
    assert!(e.contains("--vmm qemu"), "{e}");
    // A VMM or jailer that is not installed: named, with the install step.
    let absent = Firecracker::with_binary(Some("/nonexistent/firecracker".into()));
    let e = absent.launch(&spec).expect_err("no binary").to_string();
    assert!(e.contains("/nonexistent/firecracker") && e.contains("HEARTH_FIRECRACKER"), "{e}");
    let jailed = LaunchSpec {
        kernel,
        confinement: hearth_vmm::Confinement { run_as: Some((64_123, 64_123)), cgroup: None },
        ..spec
    };
    let mut no_jailer = Firecracker::default();
    no_jailer.jailer = Some("/nonexistent/jailer".into());
    let e = no_jailer.launch(&jailed).expect_err("no jailer").to_string();
    assert!(
        e.contains("/nonexistent/jailer") && e.contains("HEARTH_JAILER") && e.contains("--no-jail"),
        "{e}"
    );
    assert!(!dir.path().join("firecracker").exists(), "no jail is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_init_is_served_through_mmds_on_the_vms_card() {
    let Some((dir, mut spec)) = vm("") else { return };
    let Some(ns) = hearth_testkit::kvm::Netns::with_taps("hearth-fc", &["fctap0", "fctap1"]) else {
        eprintln!("skipped: cannot make a network namespace with a tap (ip netns, /dev/net/tun)");
        return;
    };
    // Firecracker runs inside the namespace, where its tap is (never on the host's network).
    spec.binary = Some(ns.wrapper(dir.path(), "firecracker"));
    let card = |mac: &str, tap: &str| hearth_vmm::NetLaunch {
        mac: mac.into(),
        tap: Some(tap.into()),
        ..Default::default()
    };
    // Two cards: MMDS is served on the first.
    spec.networks = vec![card("02:00:00:00:00:07", "fctap0"), card("12:00:00:00:00:07", "fctap1")];
    spec.cloud_init.insert("meta-data".into(), "instance-id: i-7\n".into());
    spec.cloud_init.insert("user-data".into(), "#cloud-config\nhostname: seven\n".into());
    let fc = Firecracker::default();
    let launched = fc.launch(&spec).expect("launch");
    let api = Api::firecracker(&dir.path().join(API_SOCK));
    let data = api.get("/mmds").expect("mmds");
    assert_eq!(data["latest"]["meta-data"], "instance-id: i-7\n");
    assert_eq!(data["latest"]["user-data"], "#cloud-config\nhostname: seven\n");
    let config = api.get("/vm/config").expect("config");
    let cards: Vec<_> = (config["network-interfaces"].as_array().expect("cards").iter())
        .map(|c| (c["iface_id"].as_str(), c["host_dev_name"].as_str(), c["guest_mac"].as_str()))
        .collect();
    assert_eq!(
        cards,
        [
            (Some("eth0"), Some("fctap0"), Some("02:00:00:00:00:07")),
            (Some("eth1"), Some("fctap1"), Some("12:00:00:00:00:07"))
        ],
        "{config:#}"
    );
    assert_eq!(config["mmds-config"]["network_interfaces"][0], "eth0", "{config:#}");
    assert_eq!(config["mmds-config"]["version"], "V2", "{config:#}");
    fc.stop(dir.path(), launched.handle(), Duration::ZERO).await.expect("stop");
    fc.cleanup(dir.path(), &spec.confinement);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_ended_by_a_signal_says_so_as_its_exit_reason() {
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    let Some((dir, spec)) = vm("") else { return };
    let fc = Firecracker::default();
    let h = fc.launch(&spec).expect("launch").handle();
    assert!(fc.start_guest(dir.path(), false).await.expect("InstanceStart"));
    // SIGBUS: Firecracker's handler logs it and exits.
    assert!(fc.signal(dir.path(), h, libc::SIGBUS));
    tokio::time::timeout(Duration::from_secs(10), fc.wait_exit(h)).await.expect("it exits");
    fc.cleanup(dir.path(), &spec.confinement);
    let why = fc.exit_reason(dir.path()).expect("a reason");
    assert!(why.contains("signal 7"), "{why}");
}

/// Under the jailer (the default wherever the VM has a uid of its own): the jailer's chroot in
/// the VM's directory with the kernel, disks and (for a glibc-linked Firecracker, as
/// ../shared/vmm/bin's is) the loader and libraries placed in it; Firecracker runs there as the
/// VM's uid and gid, as init of a PID namespace of its own, in the VM's cgroup with its limits;
/// it is found again without hearth's pid file; stop and cleanup leave no process, jail or
/// cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_firecracker_runs_unprivileged_in_its_chroot_and_cgroup_and_leaves_nothing() {
    if let Some(why) = hearth_testkit::kvm::skip_reason("jailer") {
        eprintln!("skipped: {why}");
        return;
    }
    let Some((dir, mut spec)) = vm("") else { return };
    let uid = 2_100_009_990;
    let group = format!("hearth-test/vm-jail-{}", std::process::id());
    spec.confinement =
        hearth_vmm::Confinement { run_as: Some((uid, uid)), cgroup: Some(group.clone()) };
    let host = hearth_testkit::kvm::HostVolumes::new(dir.path());
    spec.volumes = host.disks();
    let fc = Firecracker::default();
    let h = fc.launch(&spec).expect("launch").handle();
    let root = jail::root(dir.path());
    // The host's file and device reach it as nodes of its own; the file itself is untouched.
    host.assert_in_jail(&root, uid);

    let status =
        hearth_testkit::kvm::assert_confined(h.pid, uid, &root, &group, (256u64 + 256) << 20);
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid");
    assert!(nspid.ends_with("\t1"), "init of its PID namespace: {nspid}");

    // Configured with the paths it sees from inside.
    let api = Api::firecracker(&jail::host_path(dir.path(), API_SOCK));
    let config = api.get("/vm/config").expect("config");
    assert_eq!(config["boot-source"]["kernel_image_path"], "/vmlinux", "{config:#}");
    assert_eq!(config["drives"][0]["path_on_host"], "/disk.img");
    assert_eq!(config["vsock"]["uds_path"], "/agent.sock");
    let drive =
        |i: usize| (&config["drives"][i]["path_on_host"], &config["drives"][i]["is_read_only"]);
    assert_eq!(drive(2), (&"/volume-0.img".into(), &false.into()), "{config:#}");
    assert_eq!(drive(3), (&"/volume-1.img".into(), &true.into()), "{config:#}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dir.path().join("disk.img")).expect("disk").uid(), uid);

    // Found again from the VM's directory alone, even without hearth's pid file.
    std::fs::remove_file(dir.path().join("firecracker.pid")).expect("rm pid file");
    assert_eq!(
        fc.recover_orphans(dir.path().parent().expect("parent")),
        vec![dir.path().to_owned()]
    );
    assert_eq!(fc.find(dir.path(), None).map(|(f, _)| f), Some(h));

    fc.stop(dir.path(), h, Duration::ZERO).await.expect("stop");
    fc.cleanup(dir.path(), &spec.confinement);
    assert!(!hearth_vmm::is_alive(h.pid, h.start_time));
    assert!(!jail::dir(dir.path()).exists(), "the jail is removed");
    host.assert_released();
    hearth_testkit::kvm::assert_cgroup_gone(&group);
    for f in [API_SOCK, "firecracker.pid", "agent.sock", "console.out", "console.in"] {
        assert!(!dir.path().join(f).exists(), "{f} left behind");
    }
}
