//! SECURITY.md's promises about the state directory, the daemon and the reconciler, each
//! checked against real hearthd processes and, where a VM is needed, real guests under QEMU.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::{bin_dir, qemu_processes, require_e2e, text, Daemon};

const BOOT: Duration = Duration::from_secs(180);

/// A daemon with the test kernel and the busybox image imported as `demo:1`.
fn ready() -> Daemon {
    let d = Daemon::start();
    d.import_kernel();
    let layout = tempfile::tempdir_in(hearth_e2e::test_tmp()).expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(layout.path(), "1", &Default::default())
        .expect("layout");
    d.ok(&["image", "import", &layout.path().display().to_string(), "--name", "demo:1"]);
    d
}

fn running(d: &Daemon, vm: &str) -> serde_json::Value {
    // A client still creating it (a foreground run) makes it appear a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.hearth(&["inspect", vm]).status.success() {
        assert!(Instant::now() < deadline, "{vm} was never created:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_for(vm, "running", BOOT, |v| v["status"]["state"] == "running")
}

fn pid_of(v: &serde_json::Value) -> i32 {
    v["status"]["pid"].as_i64().expect("a recorded pid") as i32
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn record_path(d: &Daemon, v: &serde_json::Value) -> std::path::PathBuf {
    d.root.path().join("vms").join(v["spec"]["id"].as_str().expect("id")).join("record.json")
}

/// Rewrites a record on disk (the daemon must be down), as a crash at that point would leave it.
fn edit_record(d: &Daemon, v: &serde_json::Value, change: impl FnOnce(&mut serde_json::Value)) {
    let path = record_path(d, v);
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    change(&mut rec);
    std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write record");
}

/// Every QEMU running for this root is the recorded VMM of one of its VMs.
fn assert_no_orphan_vmm(d: &Daemon) {
    let recorded: BTreeSet<i32> = text(&d.hearth(&["ps", "-a", "-q"]).stdout)
        .lines()
        .filter_map(|id| d.inspect(id)["status"]["pid"].as_i64().map(|p| p as i32))
        .collect();
    let running: BTreeSet<i32> = qemu_processes(&d.root.path().display().to_string())
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        running.is_subset(&recorded),
        "QEMUs {running:?} are not all recorded ({recorded:?})\n{}",
        d.log()
    );
}

#[test]
fn one_daemon_per_root_and_per_socket() {
    require_e2e!();
    let d = Daemon::start();
    let other = d.root.path().join("other.sock");
    let out = Command::new(bin_dir().join("hearthd"))
        .arg("--root")
        .arg(d.root.path())
        .arg("--socket")
        .arg(&other)
        .output()
        .expect("hearthd");
    assert!(!out.status.success(), "a second daemon on the root must be refused");
    let holder = d.pid().expect("pid");
    assert!(
        text(&out.stderr).contains(&format!("hearthd pid {holder} already owns")),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.exists(), "the refused daemon bound no socket");

    let root2 = tempfile::tempdir_in(hearth_e2e::test_tmp()).expect("tmp");
    let out = Command::new(bin_dir().join("hearthd"))
        .arg("--root")
        .arg(root2.path())
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .expect("hearthd");
    assert!(!out.status.success(), "a second daemon on the socket must be refused");
    assert!(text(&out.stderr).contains("serves"), "{}", text(&out.stderr));
    assert!(d.ok(&["version"]).contains("Server: hearthd"), "the first daemon still serves");
}

#[test]
fn the_state_directory_is_private_to_root() {
    require_e2e!();
    if hearth_e2e::which("setpriv").is_none() {
        eprintln!("skipping: setpriv (util-linux) is not installed");
        return;
    }
    let d = ready();
    d.ok(&[
        "run",
        "-d",
        "--ssh",
        "--name",
        "secret",
        "-e",
        "TOKEN=hunter2",
        "demo:1",
        "sleep",
        "100000",
    ]);
    let v = running(&d, "secret");
    let root = d.root.path();
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    };
    assert_eq!(mode(root), 0o711, "the root lets others reach the socket and nothing else");
    for sub in ["images", "kernels", "vms", "flintlock", "tmp"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&d.socket), 0o600);
    let vm = root.join("vms").join(v["spec"]["id"].as_str().expect("id"));
    // As an unprivileged user, nothing under the root can be read or listed.
    let as_nobody = |argv: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(argv)
            .output()
            .expect("setpriv")
    };
    let sensitive = [
        vm.join("record.json"),
        vm.join("config.img"),
        vm.join("disk.img"),
        vm.join("console.log"),
        vm.join("ssh/id_ed25519"),
        root.join("images/blobs/sha256"),
        root.join("images/tmp"),
        root.join("kernels"),
        root.join("vms"),
        root.to_owned(),
    ];
    for p in &sensitive {
        let p = p.display().to_string();
        let out = as_nobody(&["ls", "-la", &p]);
        assert!(!out.status.success(), "nobody can list {p}:\n{}", text(&out.stdout));
        let out = as_nobody(&["cat", &p]);
        assert!(
            !out.status.success() && text(&out.stderr).contains("Permission denied"),
            "nobody can read {p}: {}",
            text(&out.stderr)
        );
    }
    let host = d.host();
    let out = as_nobody(&[&bin_dir().join("hearth").display().to_string(), "--host", &host, "ps"]);
    assert!(!out.status.success(), "nobody can use the API socket:\n{}", text(&out.stdout));
    assert!(
        text(&out.stderr).to_lowercase().contains("permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_stale_pid_never_adopts_or_kills_an_unrelated_process() {
    require_e2e!();
    let mut d = ready();
    d.ok(&["run", "-d", "--name", "v", "demo:1", "sleep", "100000"]);
    let v = running(&d, "v");
    let qemu = pid_of(&v);
    // hearthd is down when the VMM dies (an OOM kill, say), and its pid goes to someone else.
    d.kill9();
    assert!(Command::new("kill").args(["-9", &qemu.to_string()]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(qemu) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut decoy = Command::new("sleep").arg("1000").spawn().expect("decoy");
    let decoy_pid = decoy.id() as i32;
    let start = hearth_vmm::start_time(decoy_pid).expect("start time");
    edit_record(&d, &v, |r| {
        r["status"]["pid"] = decoy_pid.into();
        r["status"]["pid_start_time"] = start.into();
    });
    std::fs::write(record_path(&d, &v).with_file_name("qemu.pid"), decoy_pid.to_string())
        .expect("pid file");
    d.spawn();
    let after =
        d.wait_for("v", "stopped", Duration::from_secs(30), |v| v["status"]["state"] == "stopped");
    assert!(after["status"]["pid"].is_null(), "the decoy was not adopted: {after}");
    assert!(
        !record_path(&d, &v).with_file_name("qemu.pid").exists(),
        "the stale pid file went with the exit"
    );
    d.ok(&["rm", "-f", "v"]);
    assert!(alive(decoy_pid), "rm -f must not kill a process that merely holds the old pid");
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn wait_run_and_start_end_when_the_vm_is_removed() {
    require_e2e!();
    let d = ready();
    let mut fg = d
        .cmd(&["run", "--name", "fg", "demo:1", "sleep", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    running(&d, "fg");
    let mut waiter = d.cmd(&["wait", "fg"]).stdout(Stdio::piped()).spawn().expect("wait");
    d.ok(&["rm", "-f", "fg"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for child in [&mut fg, &mut waiter] {
        while child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "a client kept waiting for a removed VM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let run = fg.wait_with_output().expect("run");
    assert_eq!(run.status.code(), Some(125), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("removed"), "{}", text(&run.stderr));
    assert_eq!(text(&waiter.wait_with_output().expect("wait").stdout).trim(), "-1");

    d.ok(&["create", "--name", "booting", "demo:1", "sleep", "100000"]);
    let starter = d
        .cmd(&["start", "booting"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    d.wait_for("booting", "starting", BOOT, |v| v["status"]["state"] == "starting");
    let removed_at = Instant::now();
    d.ok(&["rm", "-f", "booting"]);
    let out = starter.wait_with_output().expect("start");
    assert!(
        removed_at.elapsed() < Duration::from_secs(20),
        "start waited {:?} after the VM went",
        removed_at.elapsed()
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("removed while it started"), "{}", text(&out.stderr));
}

#[test]
fn a_stop_or_rm_saved_before_a_crash_is_carried_out_after_restart() {
    require_e2e!();
    let mut d = ready();
    d.ok(&["run", "-d", "--name", "to-stop", "demo:1", "sleep", "100000"]);
    d.ok(&["run", "-d", "--name", "to-remove", "demo:1", "sleep", "100000"]);
    let (a, b) = (running(&d, "to-stop"), running(&d, "to-remove"));
    d.kill9();
    edit_record(&d, &a, |r| r["desired"] = "stopped".into());
    edit_record(&d, &b, |r| {
        r["desired"] = "deleted".into();
        r["status"]["state"] = "stopping".into();
    });
    d.spawn();
    d.wait_for("to-stop", "stopped", Duration::from_secs(60), |v| {
        v["status"]["state"] == "stopped"
    });
    assert!(!alive(pid_of(&a)), "the stop was carried out");
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.hearth(&["inspect", "to-remove"]).status.success() {
        assert!(Instant::now() < deadline, "the rm was never carried out:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(pid_of(&b)) && !record_path(&d, &b).parent().expect("dir").exists());
}

#[test]
fn a_client_that_goes_away_mid_start_leaves_no_unrecorded_vmm() {
    require_e2e!();
    let d = ready();
    for (i, delay_ms) in [0u64, 60, 150, 300, 600, 1200].into_iter().enumerate() {
        let name = format!("cut{i}");
        d.ok(&["create", "--name", &name, "demo:1", "sleep", "100000"]);
        let mut client = d
            .cmd(&["start", "--no-wait", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = client.kill();
        let _ = client.wait();
    }
    // Whatever the client saw, each VM ends up started and recorded, or never started.
    for i in 0..6 {
        let name = format!("cut{i}");
        let v = d.wait_for(&name, "settled", BOOT, |v| {
            ["running", "created", "stopped"].contains(&v["status"]["state"].as_str().unwrap_or(""))
        });
        if v["status"]["state"] == "running" {
            assert!(alive(pid_of(&v)), "{name}: recorded VMM is alive");
        }
    }
    assert_no_orphan_vmm(&d);
}

#[test]
fn bad_specs_are_refused_at_create_and_leave_no_vm() {
    require_e2e!();
    let d = ready();
    let layout = tempfile::tempdir_in(hearth_e2e::test_tmp()).expect("tmp");
    let ghost = hearth_e2e::testutil::TestImage { user: "ghost".into(), ..Default::default() };
    hearth_e2e::testutil::busybox_oci_layout(layout.path(), "1", &ghost).expect("layout");
    d.ok(&["image", "import", &layout.path().display().to_string(), "--name", "ghost:1"]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = format!("127.0.0.1:{}:80", busy.local_addr().expect("addr").port());
    let big_env: Vec<String> =
        (0..6).map(|i| format!("BIG{i}={}", "x".repeat(100 << 10))).collect();
    let mut env_args: Vec<&str> = vec!["create"];
    for e in &big_env {
        env_args.extend(["-e", e.as_str()]);
    }
    env_args.extend(["demo:1", "true"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "--size", "17M", "demo:1", "true"], "smaller than the root filesystem"),
        (vec!["create", "--size", "1000T", "demo:1", "true"], "16 TiB"),
        (vec!["create", "--size", "15T", "demo:1", "true"], "larger than the whole filesystem"),
        (env_args, "over the config disk"),
        (vec!["create", "-p", &busy_port, "demo:1", "true"], "is unavailable"),
        (vec!["create", "ghost:1"], "unable to find user ghost"),
    ];
    for (args, needle) in cases {
        let out = d.hearth(&args);
        assert!(!out.status.success(), "{:?} should be refused", &args[..3]);
        assert!(text(&out.stderr).contains(needle), "{:?}: {}", &args[..3], text(&out.stderr));
        assert_eq!(d.ok(&["ps", "-a", "-q"]).trim(), "", "{:?} left a VM", &args[..3]);
    }
    // The suggestion in the message is a size that works.
    let out = d.hearth(&["create", "--size", "17M", "demo:1", "true"]);
    let hint = text(&out.stderr)
        .split("use --size ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a --size hint")
        .to_owned();
    d.ok(&["create", "--name", "fits", "--size", &hint, "demo:1", "true"]);
    assert!(std::fs::read_dir(d.root.path().join("vms")).expect("vms").count() == 1);
}

#[test]
fn a_corrupt_record_is_skipped_not_fatal() {
    require_e2e!();
    let mut d = ready();
    d.ok(&["create", "--name", "fine", "demo:1", "true"]);
    let bad = d.root.path().join("vms").join("00000000deadbeef");
    std::fs::create_dir_all(&bad).expect("dir");
    std::fs::write(bad.join("record.json"), b"{\"spec\": trunc").expect("corrupt");
    assert!(d.ok(&["ps", "-a"]).contains("fine"), "listings go on");
    d.kill9();
    d.spawn();
    assert!(d.ok(&["ps", "-a"]).contains("fine"), "recovery goes on");
    d.ok(&["start", "fine"]);
    assert!(d.log().contains("corrupt"), "the corrupt record is reported:\n{}", d.log());
    assert!(bad.join("record.json").exists(), "and left for the operator");
}

#[test]
fn a_guest_flooding_its_console_stays_within_the_cap() {
    require_e2e!();
    let d = ready();
    let flood = "while true; do echo 'flooding the console with a line of some length, again and again'; done";
    d.ok(&[
        "run",
        "-d",
        "--name",
        "flood",
        "--log-opt",
        "max-size=64K",
        "--log-opt",
        "max-file=2",
        "demo:1",
        "sh",
        "-c",
        flood,
    ]);
    let v = running(&d, "flood");
    let dir = record_path(&d, &v).parent().expect("dir").to_owned();
    // Until the guest has logged far more than the cap.
    let logged = || {
        std::fs::read_to_string(dir.join("console.log.start"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while logged() < 1 << 20 {
        assert!(Instant::now() < deadline, "the guest logged only {} bytes", logged());
        std::thread::sleep(Duration::from_millis(200));
    }
    let files: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with("console.log")
                && !e.file_name().to_string_lossy().ends_with("start")
        })
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().expect("meta").len()))
        .collect();
    assert_eq!(files.len(), 2, "two files kept: {files:?}");
    assert!(files.iter().all(|(_, len)| *len <= 64 << 10), "each within max-size: {files:?}");
    // What `logs` shows is the newest of it.
    let out = d.hearth(&["logs", "flood"]);
    assert!(out.status.success() && out.stdout.len() <= 128 << 10, "{} bytes", out.stdout.len());
    assert!(text(&out.stdout).contains("flooding the console"));
    d.ok(&["rm", "-f", "flood"]);
}

/// The memory limit of a cgroup named `name`, on v2 or v1.
fn memory_limit(name: &str) -> Option<u64> {
    ["/sys/fs/cgroup/{}/memory.max", "/sys/fs/cgroup/memory/{}/memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(f.replace("{}", name)).ok())
        .and_then(|s| s.trim().parse().ok())
}

#[test]
fn the_vmm_is_sandboxed_unprivileged_chrooted_and_limited() {
    require_e2e!();
    let d = ready();
    d.ok(&["run", "-d", "--name", "a", "--memory", "256M", "demo:1", "sleep", "100000"]);
    d.ok(&["run", "-d", "--name", "b", "demo:1", "sleep", "100000"]);
    let (a, b) = (running(&d, "a"), running(&d, "b"));
    let mut uids = Vec::new();
    for v in [&a, &b] {
        let pid = pid_of(v);
        let uid = v["status"]["vmm_uid"].as_u64().expect("a VMM uid of its own");
        assert!(uid >= 2_100_000_000, "{uid}");
        uids.push(uid);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert!(
            field("Uid:").iter().chain(&field("Gid:")).all(|x| *x == uid.to_string()),
            "{status}"
        );
        assert_eq!(field("CapEff:"), ["0000000000000000"], "no capabilities");
        assert_eq!(
            (field("Seccomp:"), field("NoNewPrivs:")),
            (vec!["2".to_owned()], vec!["1".to_owned()]),
            "seccomp filter on"
        );
        let dir = record_path(&d, v).parent().expect("dir").to_owned();
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).expect("root"),
            dir,
            "chrooted into its own directory"
        );
        let group = format!("hearth/vm-{}", v["spec"]["id"].as_str().expect("id"));
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(cgroups.contains(&group), "in its own cgroup: {cgroups}");
        let limit = memory_limit(&group).expect("a memory limit");
        let guest = v["spec"]["memory_mib"].as_u64().expect("memory") << 20;
        assert!(
            limit > guest && limit <= guest + (2 << 30),
            "limit {limit} for {guest} bytes of guest memory"
        );
    }
    assert_ne!(uids[0], uids[1], "each VMM has a uid of its own");
    // Confined, the VM still works, and its group goes with it.
    assert_eq!(d.ok(&["exec", "a", "--", "echo", "fine"]), "fine\n");
    d.ok(&["rm", "-f", "a"]);
    assert!(
        memory_limit(&format!("hearth/vm-{}", a["spec"]["id"].as_str().expect("id"))).is_none(),
        "the cgroup is removed"
    );
}

/// Every file under `dir` (not following links) whose name says it is a leftover.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            if name.ends_with(".tmp")
                || name.contains(".tmp-")
                || name.ends_with(".importing")
                || name.ends_with(".deleting")
            {
                out.push(p.display().to_string());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    for sub in ["images/tmp", "tmp"] {
        out.extend(
            std::fs::read_dir(dir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().display().to_string()),
        );
    }
    out
}

/// Records, processes and files under the root agree, and nothing half-made is left.
fn assert_consistent(d: &Daemon, what: &str) {
    // Settled: nothing is still starting or stopping.
    let deadline = Instant::now() + BOOT;
    let records = loop {
        let out = d.ok(&["ps", "-a", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ps json");
        let busy = v.as_array().into_iter().flatten().any(|r| {
            ["starting", "stopping"].contains(&r["status"]["state"].as_str().unwrap_or(""))
        });
        if !busy {
            break v;
        }
        assert!(Instant::now() < deadline, "{what}: VMs never settled: {v:#}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in records.as_array().into_iter().flatten() {
        let (state, pid) =
            (r["status"]["state"].as_str().unwrap_or(""), r["status"]["pid"].as_i64());
        match state {
            "running" => assert!(
                pid.is_some_and(|p| alive(p as i32)),
                "{what}: running without a live VMM: {r}"
            ),
            _ => assert!(pid.is_none(), "{what}: {state} with a pid: {r}"),
        }
    }
    assert_no_orphan_vmm(d);
    let root = d.root.path();
    let left = leftovers(root);
    assert!(left.is_empty(), "{what}: leftovers {left:?}\n{}", d.log());
    for e in std::fs::read_dir(root.join("vms")).expect("vms").flatten() {
        assert!(
            e.path().join("record.json").is_file(),
            "{what}: a VM directory without a record: {}",
            e.path().display()
        );
    }
    for e in std::fs::read_dir(root.join("kernels"))
        .expect("kernels")
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        let p = e.path();
        assert!(
            p.join("record.json").is_file() && p.join("kernel").is_file(),
            "{what}: a half-imported kernel {}",
            p.display()
        );
    }
    let images: serde_json::Value =
        serde_json::from_str(&d.ok(&["image", "ls", "-o", "json"])).expect("images");
    for i in images.as_array().into_iter().flatten() {
        let hex = i["id"].as_str().expect("id").trim_start_matches("sha256:");
        assert!(
            root.join("images/rootfs").join(format!("{hex}.ext4")).is_file(),
            "{what}: image {hex} recorded without its filesystem"
        );
    }
}

#[test]
fn kill_9_at_random_points_leaves_nothing_behind() {
    require_e2e!();
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("registry");
    // Large enough that a pull (download, unpack, mkfs) takes a good second to be killed in.
    let big = hearth_e2e::testutil::TestImage { payload_bytes: 48 << 20, ..Default::default() };
    hearth_e2e::testutil::push_image(&reg, "pulled:1", &big).expect("push");
    let mut d = ready();
    let kernel = std::env::var("HEARTH_TEST_KERNEL").expect("kernel");
    let modules = std::env::var("HEARTH_TEST_MODULES").expect("modules");
    // Each operation, killed at points spread over the time it takes here (fixed, so every run
    // of the test hits the same points): a run boots for seconds, a pull and an import take a
    // few hundred milliseconds.
    // (operation, kill after ms): 0 run, 1 stop and 2 rm of the last run VM, 3 image pull, 4 kernel import.
    let order: [(usize, u64); 22] = [
        (0, 50),
        (1, 20),
        (2, 10),
        (0, 300),
        (1, 150),
        (2, 60),
        (0, 900),
        (1, 500),
        (2, 250),
        (0, 1800),
        (0, 3000),
        (3, 5),
        (3, 25),
        (3, 60),
        (3, 120),
        (3, 250),
        (3, 400),
        (4, 5),
        (4, 30),
        (4, 80),
        (4, 200),
        (4, 400),
    ];
    let mut last_vm = String::new();
    for (round, (op, ms)) in order.into_iter().enumerate() {
        let name = format!("c{round}");
        let args: Vec<String> = match op {
            0 => {
                last_vm = name.clone();
                vec!["run", "-d", "--name", &name, "demo:1", "sleep", "100000"]
                    .into_iter()
                    .map(String::from)
                    .collect()
            }
            1 => vec!["stop".into(), last_vm.clone()],
            2 => vec!["rm".into(), "-f".into(), last_vm.clone()],
            3 => vec!["image".into(), "pull".into(), format!("{}/pulled:1", reg.host())],
            _ => vec!["kernel", "import", &kernel, "--modules", &modules, "--name", &name]
                .into_iter()
                .map(String::from)
                .collect(),
        };
        let wait = Duration::from_millis(ms);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut client =
            d.cmd(&argv).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("client");
        std::thread::sleep(wait);
        d.kill9();
        let _ = client.kill();
        let _ = client.wait();
        d.spawn();
        assert_consistent(&d, &format!("round {round} ({argv:?}, killed after {wait:?})"));
        if op == 3 {
            let _ = d.hearth(&["image", "rm", &format!("{}/pulled:1", reg.host())]);
        }
    }
}

/// A small tmpfs of the test's own, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_still_lets_hearthd_record_what_it_does() {
    require_e2e!();
    let fs = SmallFs(tempfile::tempdir_in(hearth_e2e::test_tmp()).expect("tmp"));
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400M", "tmpfs"])
        .arg(fs.0.path())
        .status();
    assert!(mounted.is_ok_and(|s| s.success()), "mounting a tmpfs");
    let layout = tempfile::tempdir_in(hearth_e2e::test_tmp()).expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(layout.path(), "1", &Default::default())
        .expect("layout");
    {
        let d = Daemon::start_under(fs.0.path());
        d.import_kernel();
        d.ok(&["image", "import", &layout.path().display().to_string(), "--name", "demo:1"]);
        d.ok(&["create", "--name", "keep", "--size", "100M", "demo:1", "true"]);
        // Fill the filesystem to the last block.
        let filler = fs.0.path().join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status();
        assert!(
            std::fs::write(fs.0.path().join("probe"), vec![0u8; 1 << 20]).is_err(),
            "the filesystem is full"
        );
        d.ok(&["rm", "keep"]);
        assert!(d.log().contains("used hearthd's reserve"), "{}", d.log());
        assert_eq!(
            d.ok(&["ps", "-a", "-q"]).trim(),
            "",
            "the removal was recorded and carried out"
        );
    }
}
