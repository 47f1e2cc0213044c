//! The QEMU provider against the real `qemu-system-x86_64` under TCG: launch daemonized and
//! paused, console captured before the guest runs, QMP, stop, cleanup. The guest is the Debian cloud kernel
//! with an empty initramfs, so it panics ("no root") after printing its boot log; no hearth-init
//! needed. Skips, saying why, when QEMU or the kernel is missing (HEARTH_TEST_KERNEL overrides
//! the kernel path; `cargo xtask kernel` fetches it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_testkit::wait_for_text;

use hearth_types::Accel;
use hearth_vmm::console::{Console, LogLimits};
use hearth_vmm::qemu::{observe, qemu_args, Qmp};
use hearth_vmm::{is_alive, kill, launch, resume, stop, wait_exit, LaunchSpec, Stopped, VmmError};

/// What hearthd does after a launch: capture the console, then let the guest run.
async fn capture_and_resume(dir: &Path) -> std::sync::Arc<Console> {
    let console =
        Console::capture(dir, LogLimits::default(), Default::default()).await.expect("capture");
    resume(dir).await.expect("cont");
    console
}

fn kernel() -> Option<PathBuf> {
    let k = std::env::var_os("HEARTH_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/kpkg/root/boot/vmlinuz-6.1.0-56-cloud-amd64".into());
    k.exists().then_some(k)
}

fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Kills the VMM when a test ends, however it ends, so no QEMU outlives the test run.
struct Reaper(Option<(i32, u64)>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some((pid, start)) = self.0 {
            kill(pid, start, libc::SIGKILL);
            let _ = hearth_vmm::wait_exit_blocking(pid, start, Duration::from_secs(10));
        }
    }
}

/// A VM directory with an empty initramfs and zeroed disks.
fn vm(extra_cmdline: &str) -> Option<(tempfile::TempDir, LaunchSpec)> {
    let Some(kernel) = kernel() else {
        eprintln!("skipping: the Debian kernel is not at /tmp/kpkg/root/boot (cargo xtask kernel, or set HEARTH_TEST_KERNEL)");
        return None;
    };
    if !have_qemu() {
        eprintln!("skipping: qemu-system-x86_64 is not installed (apt install qemu-system-x86)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("initrd.img"), b"").expect("initrd");
    std::fs::write(d.join("disk.img"), vec![0u8; 1 << 20]).expect("disk");
    std::fs::write(d.join("config.img"), vec![0u8; 1 << 20]).expect("config");
    let spec = LaunchSpec {
        kernel,
        cmdline: extra_cmdline.into(),
        memory_mib: 256,
        accel: Accel::Tcg,
        ..hearth_testkit::launch_spec(d)
    };
    Some((dir, spec))
}

fn sockets_left(dir: &Path) -> Vec<String> {
    ["console.sock", "agent.sock", "qmp.sock", "qemu.pid"]
        .iter()
        .filter(|n| dir.join(n).exists())
        .map(|n| n.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_guest_runs_is_logged_without_a_client_and_is_stopped() {
    // panic=0 after hearth's panic=-1: the kernel halts after its panic instead of resetting,
    // so the VM stays up until we stop it.
    let Some((dir, spec)) = vm("loglevel=7 panic=0") else { return };
    let launched = launch(&spec).expect("launch");
    let mut reaper = Reaper(Some((launched.pid, launched.start_time)));
    assert_eq!(launched.accel, Accel::Tcg);
    assert!(is_alive(launched.pid, launched.start_time));
    assert!(!is_alive(launched.pid, launched.start_time + 1));

    // The guest waits, paused, until the console is captured: the log has its first line.
    let mut qmp = Qmp::connect(&dir.path().join("qmp.sock")).await.expect("qmp");
    assert_eq!(qmp.status().await.expect("query-status"), "prelaunch");
    drop(qmp);
    let _capture = capture_and_resume(dir.path()).await;
    let console = dir.path().join("console.log");
    wait_for_text(&console, "Linux version", Duration::from_secs(60));
    let text = wait_for_text(&console, "Kernel panic", Duration::from_secs(120));
    assert!(text.contains("console [ttyS0] enabled"), "{text}");

    let mut qmp = Qmp::connect(&dir.path().join("qmp.sock")).await.expect("qmp");
    assert_eq!(qmp.status().await.expect("query-status"), "running");
    drop(qmp);

    // What hearthd does after a restart: find the QEMU from the VM directory alone.
    let seen = observe(&spec.vm_dir, Duration::from_secs(5)).await.expect("observed");
    assert_eq!(
        (seen.pid, seen.start_time, seen.status.as_deref()),
        (launched.pid, launched.start_time, Some("running"))
    );

    // A second QEMU on the same directory would share its disks: refused.
    match launch(&spec) {
        Err(VmmError::AlreadyRunning { pid, .. }) => assert_eq!(pid, launched.pid),
        other => panic!("second launch: {other:?}"),
    }

    // A halted kernel ignores the ACPI button: stop escalates to SIGKILL after the timeout.
    let how = stop(&spec.vm_dir, launched.pid, launched.start_time, Duration::from_millis(500))
        .await
        .expect("stop");
    assert_eq!(how, Stopped::Killed);
    assert!(!is_alive(launched.pid, launched.start_time));
    assert_eq!(sockets_left(dir.path()), Vec::<String>::new());
    assert_eq!(observe(&spec.vm_dir, Duration::from_secs(1)).await, None);
    reaper.0 = None;

    // The console log survives and is appended to by the next boot.
    let before = std::fs::metadata(&console).expect("console.log").len();
    let again = launch(&spec).expect("relaunch");
    let _reaper = Reaper(Some((again.pid, again.start_time)));
    let _capture = capture_and_resume(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&console).expect("console.log").len() <= before {
        assert!(Instant::now() < deadline, "the second boot logged nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let how = stop(&spec.vm_dir, again.pid, again.start_time, Duration::from_millis(200))
        .await
        .expect("stop");
    assert_eq!(how, Stopped::Killed);
    assert!(!is_alive(again.pid, again.start_time));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_guest_ends_qemu_by_itself() {
    // hearth's own panic=-1 with -no-reboot: the panic resets, and QEMU exits instead.
    let Some((dir, spec)) = vm("loglevel=7") else { return };
    let launched = launch(&spec).expect("launch");
    let _reaper = Reaper(Some((launched.pid, launched.start_time)));
    let capture = capture_and_resume(dir.path()).await;
    tokio::time::timeout(Duration::from_secs(120), wait_exit(launched.pid, launched.start_time))
        .await
        .expect("qemu exits on its own");
    assert!(!is_alive(launched.pid, launched.start_time));
    capture.wait_done(Duration::from_secs(5)).await;
    assert!(capture.is_done(), "the capture ends with the VMM, everything logged");
    let text =
        wait_for_text(&dir.path().join("console.log"), "Kernel panic", Duration::from_secs(1));
    assert!(text.contains("Linux version"));
    let how = stop(&spec.vm_dir, launched.pid, launched.start_time, Duration::from_secs(1))
        .await
        .expect("stop");
    assert_eq!(how, Stopped::AlreadyGone);
    assert_eq!(sockets_left(dir.path()), Vec::<String>::new());
}

#[test]
fn a_start_failure_quotes_qemus_own_message() {
    let Some((_dir, mut spec)) = vm("") else { return };
    spec.root_disk = spec.vm_dir.join("missing.img");
    let e = launch(&spec).expect_err("no disk");
    let msg = e.to_string();
    assert!(msg.contains("missing.img") && msg.contains("No such file"), "{msg}");
    assert!(std::fs::read_to_string(spec.vm_dir.join("qemu.log"))
        .expect("qemu.log")
        .contains("missing.img"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_microvm_command_line_is_accepted_by_qemu() {
    // microvm needs KVM to boot, and this host may have none; QEMU still builds the machine and
    // its devices under TCG while the CPU waits (hearth always passes -S), which checks the
    // arguments.
    let Some((dir, mut spec)) = vm("") else { return };
    // With hearth's confinement, which real QEMU must accept too.
    spec.confinement.run_as = Some((2_099_999_999, 2_099_999_999));
    let mut args = qemu_args(&spec, Accel::Kvm, None, hearth_vmm::qemu::Features::ALL);
    for a in args.iter_mut() {
        match a.as_str() {
            "kvm" => *a = "tcg".into(),
            "host" => *a = "max".into(),
            _ => {}
        }
    }
    let log = std::fs::File::create(dir.path().join("qemu.log")).expect("log");
    // Started in the VM's directory, as hearth starts it: the disks are named from there.
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .current_dir(dir.path())
        .stderr(log)
        .spawn()
        .expect("qemu");
    let pid = child.id() as i32;
    let start = hearth_vmm::start_time(pid).expect("start time");
    let _reaper = Reaper(Some((pid, start)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("qmp.sock").exists() {
        let log_text = std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default();
        assert!(child.try_wait().expect("try_wait").is_none(), "qemu exited: {log_text}");
        assert!(Instant::now() < deadline, "no QMP socket: {log_text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qmp = Qmp::connect(&dir.path().join("qmp.sock")).await.expect("qmp");
    assert_eq!(qmp.status().await.expect("query-status"), "prelaunch");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    for (key, want) in [
        ("Uid:", "2099999999"),
        ("Seccomp:", "2"),
        ("NoNewPrivs:", "1"),
        ("CapEff:", "0000000000000000"),
    ] {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {status}"));
        assert!(line.split_whitespace().skip(1).all(|v| v == want), "{line}");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).expect("root"),
        dir.path(),
        "chrooted into the VM's directory"
    );
    qmp.quit().await.expect("quit");
    tokio::time::timeout(Duration::from_secs(10), wait_exit(pid, start)).await.expect("qemu quits");
    assert!(child.try_wait().is_err(), "wait_exit reaped its exited child: no zombie is left");
}

/// Kills whatever QEMU the directory's pid file names when a test ends, however it ends.
struct DirReaper(PathBuf);

impl Drop for DirReaper {
    fn drop(&mut self) {
        if let Some((pid, start)) = hearth_vmm::find_running(&self.0) {
            kill(pid, start, libc::SIGKILL);
            let _ = hearth_vmm::wait_exit_blocking(pid, start, Duration::from_secs(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_keeps_the_vmm_contract() {
    // panic=0: the guest halts after its kernel panics ("no root"), so the VMM stays up until
    // the suite stops it.
    let Some((dir, spec)) = vm("panic=0") else { return };
    let _reaper = DirReaper(dir.path().to_owned());
    hearth_testkit::contract::vmm_contract(&hearth_vmm::Qemu::default(), &spec).await;
}
