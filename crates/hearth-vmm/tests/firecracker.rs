//! The Firecracker provider against the real `firecracker` binary: its configuration accepted
//! through the API, the Vmm contract, the console captured through its FIFOs before the guest
//! runs (the kernel's own command line read back from the guest's serial port), stop and
//! cleanup. The guest is Debian's cloud kernel (its ELF vmlinux, taken out of the bzImage) with
//! an empty initramfs. Where KVM cannot run guests (a nested paravirtual KVM) the guest dies
//! after its first lines, which is all these tests need; a boot to ready is an end-to-end test.
//! Skips, saying why, without root, /dev/kvm, the binary or the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hearth_testkit::wait_for_text;

use hearth_core::ports::{LaunchSpec, Vmm};
use hearth_types::Accel;
use hearth_vmm::console::{Console, LogLimits};
use hearth_vmm::firecracker::{Api, Firecracker, API_SOCK};

fn binary() -> Option<PathBuf> {
    let ok =
        Command::new("firecracker").arg("--version").output().is_ok_and(|o| o.status.success());
    ok.then(|| "firecracker".into())
}

/// A VM directory with the test kernel's vmlinux, an empty initramfs and zeroed disks.
fn vm(extra_cmdline: &str) -> Option<(tempfile::TempDir, LaunchSpec)> {
    let why = if !nix_is_root() {
        Some("not root (Firecracker needs /dev/kvm and hearth's VM directories)")
    } else if !Path::new("/dev/kvm").exists() {
        Some("no /dev/kvm")
    } else if binary().is_none() {
        Some("firecracker is not on PATH (.ci/run puts ../shared/vmm/bin there)")
    } else if std::env::var_os("HEARTH_TEST_KERNEL").is_none() {
        Some("HEARTH_TEST_KERNEL is not set (cargo xtask kernel fetches one)")
    } else {
        None
    };
    if let Some(why) = why {
        eprintln!("skipped: {why}");
        return None;
    }
    let bz = std::fs::read(std::env::var_os("HEARTH_TEST_KERNEL")?).expect("kernel");
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("vmlinux"), hearth_kernel::vmlinux::from_bzimage(&bz).expect("elf"))
        .expect("vmlinux");
    // Not a valid cpio: the kernel says so after its first lines, which is all the tests need.
    std::fs::write(d.join("initrd.img"), vec![0u8; 4096]).expect("initrd");
    std::fs::write(d.join("disk.img"), vec![0u8; 1 << 20]).expect("disk");
    std::fs::write(d.join("config.img"), vec![0u8; 1 << 20]).expect("config");
    let spec = LaunchSpec {
        kernel: d.join("vmlinux"),
        cmdline: extra_cmdline.into(),
        memory_mib: 256,
        accel: Accel::Auto,
        ..hearth_testkit::launch_spec(d)
    };
    Some((dir, spec))
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_keeps_the_vmm_contract() {
    let Some((_dir, spec)) = vm("") else { return };
    hearth_testkit::contract::vmm_contract(&Firecracker::default(), &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_is_configured_its_console_captured_and_it_is_stopped_and_cleaned_up() {
    // loglevel=8 before earlyprintk: the early console replays the kernel's buffer with the
    // loglevel in force when it registers (../shared/vmm/README.md).
    let Some((dir, spec)) = vm("loglevel=8 earlyprintk=serial,ttyS0") else { return };
    let fc = Firecracker::default();
    let launched = fc.launch(&spec).expect("launch");
    let h = launched.handle();

    // Configured as asked, and waiting for InstanceStart.
    let api = Api::new(&dir.path().join(API_SOCK));
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
    let text = wait_for_text(&log, "earlyprintk=serial,ttyS0", Duration::from_secs(90));
    let line = text.lines().find(|l| l.contains("Command line:")).expect("line");
    assert!(line.contains("console=ttyS0") && line.contains("rdinit=/init"), "{line}");

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
    spec.kernel = dir.path().join("no-such-vmlinux");
    let e = Firecracker::default().launch(&spec).expect_err("refused").to_string();
    assert!(e.contains("firecracker failed to start") && e.contains("/boot-source"), "{e}");
    assert!(!dir.path().join(API_SOCK).exists() && !dir.path().join("firecracker.pid").exists());
    let tcg = LaunchSpec { accel: Accel::Tcg, ..spec };
    let e = Firecracker::default().launch(&tcg).expect_err("no tcg").to_string();
    assert!(e.contains("--vmm qemu"), "{e}");
}

/// A network namespace of the test's own with a tap in it, removed when dropped.
struct Netns(String);

impl Netns {
    fn with_tap(tap: &str) -> Option<Self> {
        let name = format!("hearth-fc-{}", std::process::id());
        let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Self(name);
        ok(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]).then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_init_is_served_through_mmds_on_the_vms_card() {
    let Some((dir, mut spec)) = vm("") else { return };
    let Some(ns) = Netns::with_tap("fctap0") else {
        eprintln!("skipped: cannot make a network namespace with a tap (ip netns, /dev/net/tun)");
        return;
    };
    // Firecracker runs inside the namespace, where its tap is (never on the host's network).
    let wrapper = dir.path().join("firecracker-in-netns");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec ip netns exec {} firecracker \"$@\"\n", ns.0),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    spec.binary = Some(wrapper);
    spec.network = Some(hearth_vmm::NetLaunch {
        mac: "02:00:00:00:00:07".into(),
        forwards: vec![],
        tap: Some("fctap0".into()),
    });
    spec.cloud_init.insert("meta-data".into(), "instance-id: i-7\n".into());
    spec.cloud_init.insert("user-data".into(), "#cloud-config\nhostname: seven\n".into());
    let fc = Firecracker::default();
    let launched = fc.launch(&spec).expect("launch");
    let api = Api::new(&dir.path().join(API_SOCK));
    let data = api.get("/mmds").expect("mmds");
    assert_eq!(data["latest"]["meta-data"], "instance-id: i-7\n");
    assert_eq!(data["latest"]["user-data"], "#cloud-config\nhostname: seven\n");
    let config = api.get("/vm/config").expect("config");
    let card = &config["network-interfaces"][0];
    assert_eq!(
        (card["host_dev_name"].as_str(), card["guest_mac"].as_str()),
        (Some("fctap0"), Some("02:00:00:00:00:07"))
    );
    assert_eq!(config["mmds-config"]["version"], "V2", "{config:#}");
    fc.stop(dir.path(), launched.handle(), Duration::ZERO).await.expect("stop");
    fc.cleanup(dir.path(), &spec.confinement);
}
