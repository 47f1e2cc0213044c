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
use hearth_vmm::firecracker::{Api, Firecracker, API_SOCK};

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
    let text = wait_for_text(&log, "earlyprintk=serial,ttyS0", Duration::from_secs(90));
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
    spec.kernel = dir.path().join("no-such-vmlinux");
    let e = Firecracker::default().launch(&spec).expect_err("refused").to_string();
    assert!(e.contains("firecracker failed to start") && e.contains("/boot-source"), "{e}");
    assert!(!dir.path().join(API_SOCK).exists() && !dir.path().join("firecracker.pid").exists());
    let tcg = LaunchSpec { accel: Accel::Tcg, ..spec };
    let e = Firecracker::default().launch(&tcg).expect_err("no tcg").to_string();
    assert!(e.contains("--vmm qemu"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_init_is_served_through_mmds_on_the_vms_card() {
    let Some((dir, mut spec)) = vm("") else { return };
    let Some(ns) = hearth_testkit::kvm::Netns::with_tap("hearth-fc", "fctap0") else {
        eprintln!("skipped: cannot make a network namespace with a tap (ip netns, /dev/net/tun)");
        return;
    };
    // Firecracker runs inside the namespace, where its tap is (never on the host's network).
    spec.binary = Some(ns.wrapper(dir.path(), "firecracker"));
    spec.network = Some(hearth_vmm::NetLaunch {
        mac: "02:00:00:00:00:07".into(),
        forwards: vec![],
        tap: Some("fctap0".into()),
    });
    spec.cloud_init.insert("meta-data".into(), "instance-id: i-7\n".into());
    spec.cloud_init.insert("user-data".into(), "#cloud-config\nhostname: seven\n".into());
    let fc = Firecracker::default();
    let launched = fc.launch(&spec).expect("launch");
    let api = Api::firecracker(&dir.path().join(API_SOCK));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_ended_by_a_signal_says_so_as_its_exit_reason() {
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

/// The jailer's way, with what hearth puts in the chroot: a Firecracker linked against glibc
/// (as ../shared/vmm/bin's is) runs in an otherwise empty chroot once its loader and libraries
/// are placed there, as an unprivileged uid, in a PID namespace of its own, and answers on
/// its API socket inside the chroot.
#[test]
fn a_dynamically_linked_firecracker_runs_under_the_jailer_with_its_libraries_placed() {
    for binary in ["firecracker", "jailer"] {
        if let Some(why) = hearth_testkit::kvm::skip_reason(binary) {
            eprintln!("skipped: {why}");
            return;
        }
    }
    let which = |b: &str| {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(b))
            .find(|p| p.is_file())
            .expect("on PATH")
    };
    let fc = which("firecracker");
    let base = tempfile::tempdir().expect("tmp");
    let id = "jail-test";
    let root = base.path().join("firecracker").join(id).join("root");
    let files = hearth_vmm::jail::runtime_files(&fc).expect("libraries");
    for f in &files {
        hearth_vmm::jail::place(&root, f).expect("place");
    }
    let uid = "2100009999";
    let status = std::process::Command::new(which("jailer"))
        .args(["--id", id, "--uid", uid, "--gid", uid, "--new-pid-ns", "--exec-file"])
        .arg(&fc)
        .arg("--chroot-base-dir")
        .arg(base.path())
        .args(["--", "--api-sock", "/firecracker.sock", "--level", "Warning"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("jailer");
    // With a new PID namespace the jailer forks, writes the VMM's pid and exits.
    assert!(status.success(), "{status}");
    let pid: i32 = std::fs::read_to_string(root.join("firecracker.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let _kill = scopeguard(pid);
    let sock = root.join("firecracker.sock");
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "no API socket; static: {}",
        files.is_empty()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().nth(1).map(str::to_owned))
    };
    assert_eq!(ids("Uid:").flatten().as_deref(), Some(uid));
    assert_eq!(ids("Gid:").flatten().as_deref(), Some(uid));
    // Its root is the chroot (pivoted to in a mount namespace of its own, so /proc shows "/":
    // the same directory, by device and inode), and it is init of a PID namespace of its own.
    use std::os::unix::fs::MetadataExt;
    let (seen, made) = (
        std::fs::metadata(format!("/proc/{pid}/root/")).expect("its root"),
        std::fs::metadata(&root).expect("chroot"),
    );
    assert_eq!((seen.dev(), seen.ino()), (made.dev(), made.ino()));
    assert!(status.lines().any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")), "{status}");
    let info = Api::firecracker(&sock).get("/").expect("API");
    assert_eq!(info["state"], "Not started");
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

/// Kills `pid` when dropped (the test's Firecracker, whatever the test's outcome).
fn scopeguard(pid: i32) -> impl Drop {
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill").args(["-9", &self.0.to_string()]).status();
        }
    }
    Kill(pid)
}
