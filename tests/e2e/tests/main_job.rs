//! The main job end to end: registry → pull → run under QEMU → exit code, lifecycle, recovery,
//! bad input. Boots real guests; see `hearth_e2e::skip_reason` for when it skips.

use std::path::Path;
use std::time::Duration;

use hearth_e2e::{mounts_and_loops, qemu_processes, require_e2e, text, Daemon};

const BOOT: Duration = Duration::from_secs(180);

/// A registry on loopback holding the busybox test image as `demo:1`.
fn registry_with_demo(user: &str) -> (hearth_e2e::testutil::LocalRegistry, String) {
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("starting docker-registry");
    let reference = format!("127.0.0.1:{}/demo:1", reg.port);
    hearth_e2e::testutil::push_busybox(&reg, "demo:1", user).expect("pushing the test image");
    (reg, reference)
}

fn ready_daemon() -> Daemon {
    let d = Daemon::start();
    d.import_kernel();
    d
}

fn vm_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("vms"))
        .map(|r| {
            r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Nothing of any VM is left: records, files, processes, mounts, loop devices.
fn assert_clean(d: &Daemon) {
    assert_eq!(d.ok(&["ps", "-a", "-q"]).trim(), "", "VMs left behind");
    assert!(
        vm_dirs(d.root.path()).is_empty(),
        "VM directories left behind: {:?}",
        vm_dirs(d.root.path())
    );
    let root = d.root.path().display().to_string();
    assert!(qemu_processes(&root).is_empty(), "QEMU left running: {:?}", qemu_processes(&root));
    assert!(
        mounts_and_loops(&root).is_empty(),
        "mounts or loop devices left: {:?}",
        mounts_and_loops(&root)
    );
}

#[test]
fn run_prints_output_and_exits_with_the_workload_code() {
    require_e2e!();
    let (_reg, image) = registry_with_demo("");
    let d = ready_daemon();
    let out = d.hearth(&["run", "--rm", &image, "sh", "-c", "echo hello; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}\nlog: {}", text(&out.stderr), d.log());
    assert_eq!(text(&out.stdout).trim(), "hello", "stderr: {}", text(&out.stderr));
    assert_clean(&d);
}

#[test]
fn image_env_workdir_and_user_are_honoured() {
    require_e2e!();
    let (_reg, image) = registry_with_demo("app");
    let d = ready_daemon();
    d.ok(&["image", "pull", &image]);
    let script = "echo \"$GREETING\"; pwd; id -u";
    let out = d.ok(&["run", "--rm", &image, "sh", "-c", script]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["hi", "/work", "1000"]);
    let out = d.ok(&["run", "--rm", "-e", "GREETING=override", &image, "sh", "-c", script]);
    assert_eq!(out.lines().next(), Some("override"));
    assert_clean(&d);
}

#[test]
fn detached_vm_stops_starts_logs_both_boots_and_is_removed_cleanly() {
    require_e2e!();
    let (_reg, image) = registry_with_demo("");
    let d = ready_daemon();
    let id = d.ok(&[
        "run",
        "-d",
        "--name",
        "life",
        &image,
        "sh",
        "-c",
        "echo booted; exec sleep 100000",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 16, "run -d prints the id: {id:?}");
    let ps = d.ok(&["ps"]);
    assert!(ps.contains("life") && ps.contains("Running"), "{ps}");
    let boot = &d.inspect("life")["status"]["boot"];
    assert!(
        boot["vmm_to_ready_ms"].as_u64().unwrap_or(0) > 0
            && boot["kernel_to_init_ms"].as_u64().unwrap_or(0) > 0,
        "boot timings: {boot}"
    );
    d.ok(&["stop", "-t", "20", "life"]);
    let v = d.inspect("life");
    assert_eq!(v["status"]["state"], "stopped", "{v:#}");
    assert!(!d.ok(&["ps"]).contains("life"));
    d.ok(&["start", id]);
    d.wait_for("life", "running", BOOT, |v| v["status"]["state"] == "running");
    // Ready means the workload was started; its first output follows shortly after.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut logs = d.ok(&["logs", "life"]);
    while logs.matches("booted").count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        logs = d.ok(&["logs", "life"]);
    }
    assert_eq!(logs.matches("booted").count(), 2, "logs of both boots: {logs:?}");
    // `kill` ends the VMM at once, and the VM stays stopped.
    let pid = d.inspect("life")["status"]["pid"].as_i64().expect("a running VM has a pid") as i32;
    d.ok(&["kill", "life"]);
    let v = d.inspect("life");
    assert_eq!(
        (v["status"]["state"].as_str(), v["desired"].as_str()),
        (Some("stopped"), Some("stopped")),
        "{v:#}"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the VMM is gone");
    let again = d.hearth(&["kill", "life"]);
    assert!(
        !again.status.success() && text(&again.stderr).contains("not running"),
        "{}",
        text(&again.stderr)
    );
    d.ok(&["start", "life"]);
    d.wait_for("life", "running", BOOT, |v| v["status"]["state"] == "running");
    let busy = d.hearth(&["rm", "life"]);
    assert!(
        !busy.status.success() && text(&busy.stderr).contains("rm -f"),
        "{}",
        text(&busy.stderr)
    );
    d.ok(&["rm", "-f", &id[..6]]);
    assert_clean(&d);
}

#[test]
fn a_restarted_daemon_readopts_running_vms_and_notices_dead_vmms() {
    require_e2e!();
    let (_reg, image) = registry_with_demo("");
    let mut d = ready_daemon();
    d.ok(&["run", "-d", "--name", "survivor", &image, "sleep", "100000"]);
    d.ok(&["run", "-d", "--name", "victim", &image, "sleep", "100000"]);
    d.kill9();
    d.spawn();
    let ps = d.ok(&["ps"]);
    assert!(ps.contains("survivor") && ps.contains("victim"), "after restart: {ps}");
    d.ok(&["stop", "survivor"]);
    assert_eq!(d.inspect("survivor")["status"]["state"], "stopped");

    let pid = d.inspect("victim")["status"]["pid"].as_i64().expect("victim has a pid");
    // Kill the VMM behind hearth's back.
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    let v = d.wait_for("victim", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    assert!(v["status"]["reason"].as_str().unwrap_or("").contains("unexpectedly"), "{v:#}");
    d.ok(&["rm", "survivor", "victim"]);
    assert_clean(&d);
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    require_e2e!();
    let (_reg, image) = registry_with_demo("");
    let d = ready_daemon();
    d.ok(&["image", "pull", &image]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--pull", "never", "127.0.0.1:1/nope:1"], "not in the store"),
        (vec!["run", "Not//Valid"], "malformed"),
        (vec!["run", "--kernel", "nope", &image], "kernel nope"),
        (vec!["run", "--memory", "0", &image], "--memory"),
        (vec!["run", "--cpus", "0", &image], "--cpus"),
        (vec!["run", "--accel", "warp", &image], "--accel"),
    ];
    for (args, needle) in cases {
        let out = d.hearth(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: error {err:?} should mention {needle:?}");
    }
    d.ok(&["create", "--name", "dup", &image]);
    let out = d.hearth(&["create", "--name", "dup", &image]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("already used"),
        "{}",
        text(&out.stderr)
    );
    // An image in use is not removed unless forced.
    let out = d.hearth(&["image", "rm", &image]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("used by"),
        "{}",
        text(&out.stderr)
    );
    d.ok(&["rm", "dup"]);
    // A pull of an unknown image names it.
    let missing = image.replace("demo:1", "missing:1");
    let out = d.hearth(&["image", "pull", &missing]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("missing"),
        "{}",
        text(&out.stderr)
    );
    assert_clean(&d);
}
