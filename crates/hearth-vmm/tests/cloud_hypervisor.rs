//! The Cloud Hypervisor provider against the real `cloud-hypervisor` binary: the VM it was
//! given read back from `vm.info`, the Vmm contract, the console captured from its serial
//! socket before the guest runs (the kernel's own command line read back from the guest's
//! serial port), pause and resume, stop and cleanup. The guest is Debian's cloud kernel as it
//! ships (a bzImage, which Cloud Hypervisor boots directly) with an initramfs that is not one.
//! Where KVM cannot run guests (a nested paravirtual KVM) the guest dies after its first lines,
//! which is all these tests need; a boot to ready is an end-to-end test. Skips, saying why,
//! without root, /dev/kvm, the binary or the kernel.

use std::time::Duration;

use hearth_core::ports::{LaunchSpec, Vmm};
use hearth_testkit::wait_for_text;
use hearth_types::Accel;
use hearth_vmm::cloud_hypervisor::{self as ch, CloudHypervisor, API_SOCK};
use hearth_vmm::console::{Console, LogLimits};
use hearth_vmm::http::Api;

fn vm(extra_cmdline: &str) -> Option<(tempfile::TempDir, LaunchSpec)> {
    hearth_testkit::kvm::vm_dir("cloud-hypervisor", <[u8]>::to_vec, extra_cmdline)
}

fn api(dir: &std::path::Path) -> Api {
    Api::cloud_hypervisor(&dir.join(API_SOCK))
}

/// Captures the console, boots the guest and waits for the kernel's command line (its last word,
/// so the whole line is in: the log is read as it is written); returns the capture and the log.
async fn boot_to_the_command_line(
    vmm: &CloudHypervisor,
    dir: &std::path::Path,
) -> (std::sync::Arc<Console>, String) {
    let console =
        Console::capture(dir, LogLimits::default(), Default::default()).await.expect("capture");
    assert!(vmm.start_guest(dir, false).await.expect("vm.boot"));
    let text = wait_for_text(
        &dir.join("console.log"),
        "earlyprintk=serial,ttyS0",
        Duration::from_secs(180),
    );
    (console, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_hypervisor_keeps_the_vmm_contract() {
    let Some((_dir, spec)) = vm("") else { return };
    hearth_testkit::contract::vmm_contract(&CloudHypervisor::default(), &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_hypervisor_is_configured_its_console_captured_and_it_is_stopped_and_cleaned_up() {
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    // loglevel=8 before earlyprintk: the early console replays the kernel's buffer with the
    // loglevel in force when it registers (../shared/vmm/README.md).
    let Some((dir, mut spec)) = vm("loglevel=8 earlyprintk=serial,ttyS0") else { return };
    std::fs::write(dir.path().join("data.img"), vec![0u8; 1 << 20]).expect("volume");
    spec.volumes.push(hearth_vmm::VolumeDisk {
        path: dir.path().join("data.img"),
        serial: hearth_types::guest::volume_serial(0),
        read_only: true,
        host: false,
        share: false,
    });
    let vmm = CloudHypervisor::default();
    let h = vmm.launch(&spec).expect("launch").handle();

    // The VM is created as asked, and not booted.
    let info = api(dir.path()).get("/api/v1/vm.info").expect("vm.info");
    assert_eq!(info["state"], "Created", "{info:#}");
    let config = &info["config"];
    assert_eq!(config["cpus"]["boot_vcpus"], 1);
    assert_eq!(config["memory"]["size"], 256u64 << 20);
    let disks: Vec<(&str, bool)> = config["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| (d["serial"].as_str().unwrap_or(""), d["readonly"].as_bool().unwrap_or(false)))
        .collect();
    assert_eq!(disks, [("hearth_root", false), ("", false), ("hearth_vol0", true)], "{config:#}");
    assert!(config["vsock"]["socket"].as_str().is_some_and(|p| p.ends_with("/agent.sock")));
    assert_eq!(config["serial"]["mode"], "Socket");

    // The console is captured before the guest runs, so its first line is in the log.
    let (_console, text) = boot_to_the_command_line(&vmm, dir.path()).await;
    let line = text.lines().find(|l| l.contains("Command line:")).expect("line");
    assert!(line.contains("console=ttyS0") && line.contains("rdinit=/init"), "{line}");

    ch::pause(dir.path()).await.expect("pause");
    assert_eq!(ch::state(dir.path()).expect("state"), "Paused");
    ch::resume(dir.path()).await.expect("resume");
    assert_eq!(ch::state(dir.path()).expect("state"), "Running");

    // A stop with a grace period asks first (the power button), then kills; nothing is left.
    vmm.stop(dir.path(), h, Duration::from_secs(1)).await.expect("stop");
    assert!(vmm.find(dir.path(), Some(h)).is_none());
    vmm.cleanup(dir.path(), &spec.confinement);
    for f in [
        API_SOCK,
        "cloud-hypervisor.sock.lock",
        "cloud-hypervisor.pid",
        "agent.sock",
        "console.sock",
    ] {
        assert!(!dir.path().join(f).exists(), "{f} left behind");
    }
    assert!(dir.path().join("console.log").exists(), "the console log stays for `hearth logs`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_the_vmms_words_or_the_file_and_leaves_nothing() {
    let Some((dir, spec)) = vm("") else { return };
    let leftovers = || {
        [API_SOCK, "cloud-hypervisor.pid", "console.sock", "agent.sock"]
            .into_iter()
            .filter(|f| dir.path().join(f).exists())
            .collect::<Vec<_>>()
    };
    // A Cloud Hypervisor that exits while it is being set up: its own last words are quoted.
    let exits = dir.path().join("exits");
    std::fs::write(&exits, "#!/bin/sh\nexec cloud-hypervisor \"$@\" --no-such-flag\n")
        .expect("wrapper");
    std::fs::set_permissions(&exits, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let e = CloudHypervisor::with_binary(Some(exits)).launch(&spec).expect_err("exits").to_string();
    assert!(e.contains("cloud-hypervisor failed to start") && e.contains("no-such-flag"), "{e}");
    assert_eq!(leftovers(), Vec::<&str>::new());

    // A missing kernel is named before anything starts.
    let missing = LaunchSpec { kernel: dir.path().join("no-such-kernel"), ..spec.clone() };
    let e = CloudHypervisor::default().launch(&missing).expect_err("no kernel").to_string();
    assert!(e.contains("no-such-kernel"), "{e}");
    assert_eq!(leftovers(), Vec::<&str>::new());

    // A kernel that is not one: Cloud Hypervisor reads it only at vm.boot, and says so then.
    std::fs::write(dir.path().join("kernel"), b"not a kernel").expect("kernel");
    let vmm = CloudHypervisor::default();
    let h = vmm.launch(&spec).expect("created").handle();
    let e = vmm.start_guest(dir.path(), false).await.expect_err("no boot").to_string();
    assert!(e.contains("vm.boot") && e.contains("kernel"), "{e}");
    vmm.stop(dir.path(), h, Duration::ZERO).await.expect("stop");
    vmm.cleanup(dir.path(), &spec.confinement);
    assert_eq!(leftovers(), Vec::<&str>::new());

    let tcg = LaunchSpec { accel: Accel::Tcg, ..spec.clone() };
    let e = CloudHypervisor::default().launch(&tcg).expect_err("no tcg").to_string();
    assert!(e.contains("--vmm qemu"), "{e}");
    let absent = CloudHypervisor::with_binary(Some("/nonexistent/cloud-hypervisor".into()));
    let e = absent.launch(&spec).expect_err("no binary").to_string();
    assert!(e.contains("HEARTH_CLOUD_HYPERVISOR"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vms_cards_are_its_taps_with_their_macs() {
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    let Some((dir, mut spec)) = vm("") else { return };
    let Some(ns) = hearth_testkit::kvm::Netns::with_taps("hearth-ch", &["chtap0", "chtap1"]) else {
        eprintln!("skipped: cannot make a network namespace with a tap (ip netns, /dev/net/tun)");
        return;
    };
    // Cloud Hypervisor runs inside the namespace, where its tap is (never on the host's network).
    spec.binary = Some(ns.wrapper(dir.path(), "cloud-hypervisor"));
    let card = |mac: &str, tap: &str| hearth_vmm::NetLaunch {
        mac: mac.into(),
        tap: Some(tap.into()),
        ..Default::default()
    };
    spec.networks = vec![card("02:00:00:00:00:08", "chtap0"), card("12:00:00:00:00:08", "chtap1")];
    let vmm = CloudHypervisor::default();
    let h = vmm.launch(&spec).expect("launch").handle();
    // The card is made at boot; the config holds it from vm.create.
    vmm.start_guest(dir.path(), false).await.expect("boot");
    let info = api(dir.path()).get("/api/v1/vm.info").expect("vm.info");
    let cards: Vec<_> = (info["config"]["net"].as_array().expect("cards").iter())
        .map(|c| (c["id"].as_str(), c["tap"].as_str(), c["mac"].as_str()))
        .collect();
    assert_eq!(
        cards,
        [
            (Some("eth0"), Some("chtap0"), Some("02:00:00:00:00:08")),
            (Some("eth1"), Some("chtap1"), Some("12:00:00:00:00:08"))
        ],
        "{info:#}"
    );
    vmm.stop(dir.path(), h, Duration::ZERO).await.expect("stop");
    vmm.cleanup(dir.path(), &spec.confinement);
}

/// An open descriptor of the tap `tap` in the network namespace `ns` (attached from a thread
/// that enters the namespace, so this process's own network is never touched).
fn tap_fd_in(ns: &str, tap: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    let (ns, tap) = (format!("/run/netns/{ns}"), tap.to_owned());
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&ns).expect("netns");
        // SAFETY: setns on a descriptor we hold, for this thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
        let tun = tun.expect("/dev/net/tun");
        // struct ifreq: the name (16 bytes), then the flags.
        let mut req = [0u8; 40];
        req[..tap.len()].copy_from_slice(tap.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is large enough for.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF {tap}: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from(tun)
    })
    .join()
    .expect("tap thread")
}

/// A card added with `vm.add-net` and the tap's descriptor sent with the request (how hearth
/// hands Cloud Hypervisor a macvtap's `/dev/tapN`): Cloud Hypervisor takes the descriptor and
/// boots with the card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_handed_over_as_a_descriptor_is_the_vms() {
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    let Some((dir, spec)) = vm("") else { return };
    let Some(ns) = hearth_testkit::kvm::Netns::with_tap("hearth-chfd", "chfd0") else {
        eprintln!("skipped: cannot make a network namespace with a tap (ip netns, /dev/net/tun)");
        return;
    };
    let vmm = CloudHypervisor::default();
    let h = vmm.launch(&spec).expect("launch").handle();
    let tap = tap_fd_in(&ns.0, "chfd0");
    let card = serde_json::json!({ "id": "eth0", "mac": "02:00:00:00:00:0a" });
    use std::os::fd::AsRawFd;
    api(dir.path()).put_with_fds("/api/v1/vm.add-net", &card, &[tap.as_raw_fd()]).expect("add-net");
    drop(tap);
    vmm.start_guest(dir.path(), false).await.expect("boot");
    let info = api(dir.path()).get("/api/v1/vm.info").expect("vm.info");
    let net = &info["config"]["net"][0];
    assert_eq!(net["mac"].as_str(), Some("02:00:00:00:00:0a"), "{info:#}");
    assert!(net["tap"].is_null(), "no tap by name: {info:#}");
    // It holds the tap: ours is closed, so the descriptor it has is the one it was sent.
    let holds = std::fs::read_dir(format!("/proc/{}/fd", h.pid))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| l == std::path::Path::new("/dev/net/tun"));
    assert!(holds, "Cloud Hypervisor holds the tap's descriptor");
    vmm.stop(dir.path(), h, Duration::ZERO).await.expect("stop");
    vmm.cleanup(dir.path(), &spec.confinement);
}

/// With a uid of its own, Cloud Hypervisor runs in the chroot hearth makes for it: as that uid
/// and gid with no capabilities, in its cgroup with the VM's memory limit, configured with the
/// paths it sees from inside, its console reached in the chroot (the guest kernel's command
/// line read back), found again without hearth's pid file; stop and cleanup leave no process,
/// jail or cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_cloud_hypervisor_runs_unprivileged_in_its_chroot_and_cgroup_and_leaves_nothing()
{
    let _one = hearth_testkit::kvm::one_guest_at_a_time().await;
    let Some((dir, mut spec)) = vm("loglevel=8 earlyprintk=serial,ttyS0") else { return };
    let uid = 2_100_009_991;
    let group = format!("hearth-test/vm-chjail-{}", std::process::id());
    spec.confinement =
        hearth_vmm::Confinement { run_as: Some((uid, uid)), cgroup: Some(group.clone()) };
    let host = hearth_testkit::kvm::HostVolumes::new(dir.path());
    spec.volumes = host.disks();
    // And a shared directory, served by a virtiofsd whose socket is in the jail.
    let shared = tempfile::tempdir().expect("shared");
    spec.volumes.push(hearth_vmm::VolumeDisk {
        path: shared.path().to_owned(),
        serial: hearth_types::guest::volume_serial(2),
        read_only: false,
        host: true,
        share: true,
    });
    let vmm = CloudHypervisor::default();
    // Held as the reconciler holds it: Cloud Hypervisor opens its disks only at vm.boot.
    let launched = vmm.launch(&spec).expect("launch");
    let h = launched.handle();
    let root = ch::jail::root(dir.path());
    host.assert_in_jail(&root, uid);
    hearth_testkit::kvm::assert_confined(h.pid, uid, &root, &group, (256u64 + 256) << 20);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", h.pid)).ok(),
        Some(root.join("cloud-hypervisor"))
    );

    let api = Api::cloud_hypervisor(&root.join(API_SOCK));
    let config = &api.get("/api/v1/vm.info").expect("vm.info")["config"];
    assert_eq!(config["payload"]["kernel"], "/kernel", "{config:#}");
    assert_eq!(config["disks"][0]["path"], "/disk.img");
    assert_eq!(config["vsock"]["socket"], "/agent.sock");
    assert_eq!(config["serial"]["socket"], "/console.sock");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dir.path().join("disk.img")).expect("disk").uid(), uid);

    assert_eq!(config["disks"][2]["path"], "/volume-0.img", "{config:#}");
    assert_eq!(config["disks"][3]["readonly"], true, "{config:#}");
    assert_eq!(config["disks"].as_array().map(Vec::len), Some(4), "a share is no disk");
    assert_eq!(config["fs"][0]["socket"], "/fs0.sock", "{config:#}");
    assert_eq!(config["fs"][0]["tag"], "hearth_vol2", "{config:#}");
    assert_eq!(config["memory"]["shared"], true, "{config:#}");
    let sock = std::fs::metadata(root.join("fs0.sock")).expect("virtiofsd's socket in the jail");
    assert_eq!(sock.uid(), uid, "the VMM's uid connects to it");
    assert_eq!(virtiofsds(dir.path()).len(), 1, "one virtiofsd for the share");

    let (_console, text) = boot_to_the_command_line(&vmm, dir.path()).await;
    assert!(text.contains("Command line:"), "{text}");
    drop(launched);
    // Booted, it has every disk open, the host file's through its loop device.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", h.pid))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(fds.iter().any(|l| l.ends_with("jail/root/volume-0.img")), "{fds:?}");

    std::fs::remove_file(dir.path().join("cloud-hypervisor.pid")).expect("rm pid file");
    assert_eq!(
        vmm.recover_orphans(dir.path().parent().expect("parent")),
        vec![dir.path().to_owned()]
    );
    assert_eq!(vmm.find(dir.path(), None).map(|(f, _)| f), Some(h));

    vmm.stop(dir.path(), h, Duration::ZERO).await.expect("stop");
    vmm.cleanup(dir.path(), &spec.confinement);
    assert!(!hearth_vmm::is_alive(h.pid, h.start_time));
    assert!(!ch::jail::dir(dir.path()).exists(), "the jail is removed");
    assert!(virtiofsds(dir.path()).is_empty(), "the share's virtiofsd is gone");
    host.assert_released();
    hearth_testkit::kvm::assert_cgroup_gone(&group);
    assert!(dir.path().join("cloud-hypervisor.log").exists(), "its log stays, for the reason");
}

/// The sockets under `dir` that live virtiofsd processes serve, from /proc (in its sandbox a
/// virtiofsd is two processes).
fn virtiofsds(dir: &std::path::Path) -> std::collections::BTreeSet<Vec<u8>> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let socket = args.windows(2).find(|w| {
            w[0] == b"--socket-path"
                && std::path::Path::new(&*String::from_utf8_lossy(w[1])).starts_with(dir)
        });
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
        if let (Some(w), false) = (socket, zombie) {
            out.insert(w[1].to_vec());
        }
    }
    out
}
