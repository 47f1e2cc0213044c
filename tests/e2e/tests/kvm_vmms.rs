//! VMs under Firecracker and Cloud Hypervisor through hearthd and the CLI: created with `--vmm
//! firecracker` (the kernel converted to the ELF vmlinux Firecracker boots) or `--vmm
//! cloud-hypervisor` (the bzImage as it is), the serial console in `hearth logs`, a tap on the
//! bridge, removed with nothing left. On this machine kind (nested paravirtual KVM) the guest
//! dies after its first kernel lines, so readiness is checked only where KVM can run guests.

use std::time::{Duration, Instant};

use hearth_e2e::{require_e2e, text, which, Daemon};

/// Whether the real `vmm` is here; says why not.
fn have(vmm: &str) -> bool {
    let found = which(vmm).is_some();
    if !found {
        eprintln!("skipped: {vmm} is not on PATH (.ci/run puts ../shared/vmm/bin there)");
    }
    found
}

/// Imports the busybox test image under `name`, from an OCI layout (no registry needed).
fn import_busybox(d: &Daemon, name: &str) {
    let layout = tempfile::tempdir().expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(
        layout.path(),
        "1",
        &hearth_e2e::testutil::TestImage::default(),
    )
    .expect("layout");
    d.ok(&["image", "import", layout.path().to_str().expect("utf8"), "--name", name]);
}

/// Runs a VM under `vmm` that sleeps (no network), from `image`, without waiting for ready.
fn run_sleeping(d: &Daemon, vmm: &str, name: &str, image: &str) {
    let args = ["run", "-d", "--no-wait", "--vmm", vmm, "--network", "none", "--name", name];
    d.ok(&[&args[..], &[image, "sleep", "600"]].concat());
}

/// Whether `pid` still runs (gone, or a zombie init has yet to reap, counts as ended).
fn runs(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !matches!(stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]), None | Some("Z"))
}

/// A jailed Firecracker (hearthd's default): it runs as the VM's recorded uid, at the root of
/// its jail in the VM's directory, in the VM's cgroup.
fn assert_jailed(d: &Daemon, v: &serde_json::Value) {
    let pid = v["status"]["pid"].as_i64().expect("pid");
    let uid = v["status"]["vmm_uid"].as_u64().expect("a VMM uid of its own");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert_eq!(uid_line.split_whitespace().nth(2), Some(uid.to_string().as_str()), "{status}");
    let dir = d.root.path().join("vms").join(v["spec"]["id"].as_str().expect("id"));
    use std::os::unix::fs::MetadataExt;
    let seen = std::fs::metadata(format!("/proc/{pid}/root/")).expect("its root");
    let jail = hearth_vmm::jail::root_of(&dir).expect("the VM's jail");
    let jail = std::fs::metadata(jail).expect("the jail");
    assert_eq!((seen.dev(), seen.ino()), (jail.dev(), jail.ino()), "chrooted in its jail");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let id = v["spec"]["id"].as_str().expect("id");
    assert!(cgroups.contains(&format!("/vm-{id}")), "in the VM's cgroup: {cgroups}");
}

/// The VMM's processes (its binary is the command; hearthd's flags may name it too) that name
/// `needle` on their command line or are chrooted under it.
fn processes(vmm: &str, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep").args(["-a", "-f", vmm]).output().expect("pgrep");
    let is_vmm = |l: &str| {
        l.split_whitespace().nth(1).is_some_and(|c| std::path::Path::new(c).ends_with(vmm))
    };
    let chrooted = |l: &str| {
        let pid = l.split_whitespace().next().unwrap_or_default();
        std::fs::read_link(format!("/proc/{pid}/root"))
            .is_ok_and(|r| r.to_string_lossy().starts_with(needle))
    };
    text(&out.stdout)
        .lines()
        .filter(|l| is_vmm(l) && (l.contains(needle) || chrooted(l)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_firecracker_vm_boots_its_kernel_logs_its_console_and_is_removed_cleanly() {
    boots_its_kernel_logs_its_console_and_is_removed_cleanly("firecracker");
}

#[test]
fn a_cloud_hypervisor_vm_boots_its_kernel_logs_its_console_and_is_removed_cleanly() {
    boots_its_kernel_logs_its_console_and_is_removed_cleanly("cloud-hypervisor");
}

fn boots_its_kernel_logs_its_console_and_is_removed_cleanly(vmm: &str) {
    require_e2e!();
    if !have(vmm) {
        return;
    }
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("starting docker-registry");
    let image = format!("127.0.0.1:{}/demo:1", reg.port);
    hearth_e2e::testutil::push_busybox(&reg, "demo:1", "").expect("pushing the test image");
    // Cloud Hypervisor is the daemon's default here, so its VM names no VMM; Firecracker's does.
    let by_default = vmm == "cloud-hypervisor";
    let d = if by_default { Daemon::start_with(&["--default-vmm", vmm]) } else { Daemon::start() };
    d.import_kernel();

    // What the VMM cannot do is refused before anything is made.
    let out = d.hearth(&["run", "-d", "--vmm", vmm, &image, "true"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--network bridge"), "{}", text(&out.stderr));
    assert_eq!(d.ok(&["ps", "-a", "-q"]).trim(), "");

    let args = "loglevel=8 earlyprintk=serial,ttyS0";
    let choice: &[&str] = if by_default { &[] } else { &["--vmm", vmm] };
    d.ok(&[
        &["run", "-d", "--no-wait"],
        choice,
        &[
            "--network",
            "none",
            "--name",
            "fc",
            "--kernel-args",
            args,
            &image,
            "sh",
            "-c",
            "echo from-the-guest",
        ],
    ]
    .concat());
    let v = d.inspect("fc");
    assert_eq!(v["spec"]["provider"], vmm, "{v:#}");
    let ps = d.ok(&["ps"]);
    assert!(ps.contains("VMM") && ps.contains(&format!(" {vmm} ")), "ps shows the VMM:\n{ps}");
    assert!(v["status"]["pid"].as_i64().is_some(), "a launched VM has its VMM's pid: {v:#}");
    let root = d.root.path().display().to_string();
    let pid = v["status"]["pid"].as_i64().expect("pid");
    assert_jailed(&d, &v);
    let elf = d.root.path().join("kernels/debian/vmlinux").is_file();
    assert_eq!(elf, vmm == "firecracker", "only Firecracker needs the ELF kernel extracted");

    // The guest's serial console reaches `hearth logs`: the kernel's own command line.
    let deadline = Instant::now() + Duration::from_secs(120);
    let logs = loop {
        let logs = d.ok(&["logs", "fc"]);
        // A line after it, so the whole line is in (the log is read as it is written).
        if logs.lines().skip_while(|l| !l.contains("Command line:")).nth(1).is_some() {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel output in `hearth logs`:\n{logs}\n--- log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let line = logs.lines().find(|l| l.contains("Command line:")).expect("line");
    assert!(
        !logs.contains("Firecracker v") && !logs.contains("cloud-hypervisor:"),
        "the VMM's own log stays out of the console:\n{logs}"
    );
    // The VM's arguments, merged over hearth's by key (its loglevel replaces hearth's).
    let has_args =
        |l: &str| args.split_whitespace().all(|a| l.contains(a)) && !l.contains("loglevel=0");
    assert!(line.contains("rdinit=/init") && has_args(line), "{line}");

    // `logs -f` follows the console until the VM stops; `kill` stops it and leaves no VMM,
    // socket, jail or cgroup (its disk stays until rm).
    let mut follow =
        d.cmd(&["logs", "-f", "fc"]).stdout(std::process::Stdio::piped()).spawn().expect("logs -f");
    let lines = lines_of(follow.stdout.take().expect("stdout"));
    until_line(&lines, "Command line:", "logs -f");
    assert!(follow.try_wait().expect("try_wait").is_none(), "logs -f ends only with the VM");
    if !hearth_e2e::kvm_runs_guests() {
        d.ok(&["kill", "fc"]);
        let v = d.inspect("fc");
        assert_eq!(v["status"]["state"], "stopped", "{v:#}");
        let ended = wait_child(&mut follow, Duration::from_secs(20));
        assert!(ended.is_some_and(|s| s.success()), "logs -f ends once the VM stopped");
        assert!(!runs(pid) && processes(vmm, &root).is_empty(), "{vmm} left running after kill");
        assert_unconfined_and_closed(&d, &v, vmm);
        d.ok(&["start", "--no-wait", "fc"]);
    }

    if hearth_e2e::kvm_runs_guests() {
        let v = d.wait_for("fc", "exited", Duration::from_secs(180), |v| {
            v["status"]["state"] == "exited"
        });
        assert_eq!(v["status"]["exit_code"], 0, "{v:#}");
        assert!(d.ok(&["logs", "fc"]).contains("from-the-guest"));
    } else {
        eprintln!(
            "skipped: the boot to ready (KVM here cannot run guests; {vmm} has no emulation)"
        );
    }

    let pid = d.inspect("fc")["status"]["pid"].as_i64().unwrap_or(pid);
    d.ok(&["rm", "-f", "fc"]);
    assert_eq!(d.ok(&["ps", "-a", "-q"]).trim(), "", "VMs left behind");
    assert!(processes(vmm, &root).is_empty() && !runs(pid), "{vmm} left running");
    let id = v["spec"]["id"].as_str().expect("id");
    for m in ["memory", "cpu", "pids", ""] {
        let group = std::path::Path::new("/sys/fs/cgroup").join(m).join(format!("hearth/vm-{id}"));
        assert!(!group.exists(), "{} left behind", group.display());
    }
    let dirs: Vec<_> =
        std::fs::read_dir(d.root.path().join("vms")).expect("vms").flatten().collect();
    assert!(dirs.is_empty(), "VM directories left behind: {dirs:?}");
}

/// The lines a child prints, as they come.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (two minutes at most) for a line that contains `needle`.
fn until_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(e) => panic!("{what}: no line with {needle:?} ({e})"),
        }
    }
}

/// The child's exit status, if it ends within `within`.
fn wait_child(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    None
}

/// A VM whose VMM is gone has no API or console socket, jail or cgroup left.
fn assert_unconfined_and_closed(d: &Daemon, v: &serde_json::Value, vmm: &str) {
    let id = v["spec"]["id"].as_str().expect("id");
    let dir = d.root.path().join("vms").join(id);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("the VM's directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock") || n == "firecracker" || n == "cloud-hypervisor")
        .collect();
    assert!(left.is_empty(), "{vmm} left {left:?} in {}", dir.display());
    for m in ["memory", "cpu", "pids", ""] {
        let group = std::path::Path::new("/sys/fs/cgroup").join(m).join(format!("hearth/vm-{id}"));
        assert!(!group.exists(), "{} left behind", group.display());
    }
}

/// `hearth run` in the foreground streams the console as it comes, and Ctrl-C stops the VM.
#[test]
fn a_firecracker_vm_run_in_the_foreground_streams_its_console_and_stops_on_ctrl_c() {
    foreground_run_streams_and_stops_on_ctrl_c("firecracker");
}

#[test]
fn a_cloud_hypervisor_vm_run_in_the_foreground_streams_its_console_and_stops_on_ctrl_c() {
    foreground_run_streams_and_stops_on_ctrl_c("cloud-hypervisor");
}

fn foreground_run_streams_and_stops_on_ctrl_c(vmm: &str) {
    require_e2e!();
    if !have(vmm) {
        return;
    }
    if hearth_e2e::kvm_runs_guests() {
        eprintln!("skipped: a guest that boots here ends by itself (the main job tests that)");
        return;
    }
    let d = Daemon::start();
    d.import_kernel();
    import_busybox(&d, "fg:1");
    let args = "loglevel=8 earlyprintk=serial,ttyS0";
    let mut run = d
        .cmd(&[
            "run",
            "--vmm",
            vmm,
            "--network",
            "none",
            "--name",
            "fg",
            "--kernel-args",
            args,
            "fg:1",
            "sleep",
            "600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let lines = lines_of(run.stdout.take().expect("stdout"));
    let line = until_line(&lines, "Command line:", "run in the foreground");
    assert!(args.split_whitespace().all(|a| line.contains(a)), "{line}");
    let pid = d.inspect("fg")["status"]["pid"].as_i64().expect("a running VMM");
    let sent = std::process::Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let status = wait_child(&mut run, Duration::from_secs(60)).expect("run ends after Ctrl-C");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("stopping"), "{err}");
    assert!(!status.success(), "a VM stopped before its workload ended is no success");
    let v = d.inspect("fg");
    assert_eq!(v["status"]["state"], "stopped", "{v:#}");
    assert!(!runs(pid), "{vmm} left running");
    assert_unconfined_and_closed(&d, &v, vmm);
}

#[test]
fn a_bridged_firecracker_vm_gets_a_tap_hearth_made_on_the_bridge_and_loses_it_with_the_vm() {
    gets_a_tap_on_the_bridge_and_loses_it_with_the_vm("firecracker");
}

#[test]
fn a_bridged_cloud_hypervisor_vm_gets_a_tap_hearth_made_on_the_bridge_and_loses_it_with_the_vm() {
    gets_a_tap_on_the_bridge_and_loses_it_with_the_vm("cloud-hypervisor");
}

fn gets_a_tap_on_the_bridge_and_loses_it_with_the_vm(vmm: &str) {
    require_e2e!();
    if !have(vmm) {
        return;
    }
    let ns = hearth_e2e::Netns::new();
    let d = Daemon::start_in(&ns);
    d.import_kernel();
    import_busybox(&d, "fcbr:1");
    d.ok(&[
        "run",
        "-d",
        "--no-wait",
        "--vmm",
        vmm,
        "--network",
        "bridge",
        "--name",
        "fcb",
        "fcbr:1",
        "sleep",
        "600",
    ]);
    let v = d.inspect("fcb");
    let id: hearth_types::VmId = v["spec"]["id"].as_str().expect("id").parse().expect("id");
    let tap = hearth_types::net::tap_name(&id);
    let link = text(&ns.run(&["ip", "-o", "link", "show", &tap]).stdout);
    assert!(
        link.contains("master hearth0"),
        "the VM's tap is on the bridge: {link:?}\n{}",
        d.log()
    );
    // The VMM (confined, as the VM's uid) has the tap open: a tun descriptor attached to it.
    let pid = v["status"]["pid"].as_i64().expect("pid");
    let attached = || {
        std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten().any(|f| {
            std::fs::read_to_string(f.path())
                .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().eq(["iff:", tap.as_str()])))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !attached() {
        assert!(Instant::now() < deadline, "{vmm} never opened {tap}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    d.ok(&["rm", "-f", "fcb"]);
    let gone = ns.run(&["ip", "link", "show", &tap]);
    assert!(!gone.status.success(), "the tap went with the VM: {}", text(&gone.stdout));
}

#[test]
fn an_unknown_default_vmm_is_refused_with_the_choices() {
    require_e2e!();
    let out = std::process::Command::new(hearth_e2e::bin_dir().join("hearthd"))
        .args(["--root", "/nonexistent/hearth-e2e", "--default-vmm", "vmware"])
        .output()
        .expect("hearthd");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("vmware") && err.contains("cloud-hypervisor"), "{err}");
}

#[test]
fn a_new_hearthd_readopts_firecracker_and_cloud_hypervisor_vms_after_a_kill_9() {
    require_e2e!();
    if !have("firecracker") || !have("cloud-hypervisor") {
        return;
    }
    let mut d = Daemon::start();
    d.import_kernel();
    import_busybox(&d, "adopt:1");
    let vms = [("fc", "firecracker"), ("ch", "cloud-hypervisor")];
    let mut pids = Vec::new();
    for (name, vmm) in vms {
        run_sleeping(&d, vmm, name, "adopt:1");
        let v = d.inspect(name);
        assert_jailed(&d, &v);
        pids.push(v["status"]["pid"].as_i64().expect("pid"));
    }

    d.kill9();
    d.spawn();
    let ps = d.ok(&["ps"]);
    for ((name, vmm), pid) in vms.iter().zip(&pids) {
        assert!(ps.lines().any(|l| l.contains(name) && l.contains(vmm)), "{name} in ps:\n{ps}");
        let v = d.inspect(name);
        assert_eq!(v["status"]["pid"].as_i64(), Some(*pid), "{name} re-adopted: {v:#}");
    }

    // A stop through the new daemon ends the adopted Firecracker.
    d.ok(&["stop", "-t", "1", "fc"]);
    let v = d.inspect("fc");
    assert_eq!(v["status"]["state"], "stopped", "{v:#}");
    // Gone, or a zombie its new parent (init, since hearthd died) has yet to reap.
    assert!(!runs(pids[0]), "Firecracker still runs");

    // A Cloud Hypervisor killed behind hearth's back is recorded as stopped, with the reason.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pids[1].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let v =
        d.wait_for("ch", "stopped", Duration::from_secs(30), |v| v["status"]["state"] == "stopped");
    let reason = v["status"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("exited unexpectedly"), "{v:#}");

    d.ok(&["rm", "-f", "fc", "ch"]);
    let root = d.root.path().display().to_string();
    for ((_, vmm), pid) in vms.iter().zip(&pids) {
        assert!(processes(vmm, &root).is_empty() && !runs(*pid), "{vmm} left running");
    }
}

#[test]
fn hearthd_no_jail_runs_firecracker_and_cloud_hypervisor_unconfined_and_says_so() {
    require_e2e!();
    if !have("firecracker") || !have("cloud-hypervisor") {
        return;
    }
    let d = Daemon::start_with(&["--no-jail"]);
    d.import_kernel();
    import_busybox(&d, "nojail:1");
    for vmm in ["firecracker", "cloud-hypervisor"] {
        run_sleeping(&d, vmm, "unjailed", "nojail:1");
        let v = d.inspect("unjailed");
        let pid = v["status"]["pid"].as_i64().expect("pid");
        let dir = d.root.path().join("vms").join(v["spec"]["id"].as_str().expect("id"));
        assert_eq!(hearth_vmm::jail::root_of(&dir), None, "no jail for {vmm}");
        let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root");
        assert_eq!(root, std::path::Path::new("/"), "{vmm} not chrooted");
        d.ok(&["rm", "-f", "unjailed"]);
        assert!(!runs(pid), "{vmm} left running");
    }
    assert!(d.log().contains("--no-jail"), "the daemon warns:\n{}", d.log());
}

/// Debian's vmlinux with its PVH note disabled (the note's type changed, so it names nothing
/// QEMU or hearth look for): the kind of ELF kernel Cluster API Provider MicroVM's templates use.
fn vmlinux_without_pvh(dir: &std::path::Path) -> std::path::PathBuf {
    let bz = std::fs::read(std::env::var("HEARTH_TEST_KERNEL").expect("HEARTH_TEST_KERNEL"))
        .expect("kernel");
    let mut elf = hearth_kernel::vmlinux::from_bzimage(&bz).expect("vmlinux");
    // type 18 (XEN_ELFNOTE_PHYS32_ENTRY) and the name "Xen\0", after a name size of 4 and the
    // descriptor's size.
    let tail: &[u8] = b"\x12\0\0\0Xen\0";
    let at: Vec<usize> = (8..elf.len().saturating_sub(tail.len()))
        .filter(|&i| elf[i..].starts_with(tail) && elf[i - 8..i - 4] == [4, 0, 0, 0])
        .collect();
    assert!(!at.is_empty(), "Debian's vmlinux has a PVH note");
    for i in at {
        elf[i] = 0x7f;
    }
    let path = dir.join("vmlinux-nopvh");
    std::fs::write(&path, elf).expect("write");
    path
}

#[test]
fn an_elf_kernel_without_pvh_is_refused_for_qemu_and_boots_under_firecracker() {
    require_e2e!();
    if !have("firecracker") {
        return;
    }
    let d = Daemon::start();
    d.import_kernel();
    import_busybox(&d, "nopvh:1");
    let tmp = tempfile::tempdir().expect("tmp");
    let vmlinux = vmlinux_without_pvh(tmp.path());
    let modules = std::env::var("HEARTH_TEST_MODULES").unwrap_or_default();
    let mut import = vec!["kernel", "import", vmlinux.to_str().expect("utf8"), "--name", "nopvh"];
    if !modules.is_empty() {
        import.extend(["--modules", modules.as_str()]);
    }
    d.ok(&import);
    let ls = d.ok(&["kernel", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with("nopvh") && l.contains("elf (no pvh)")), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("debian") && l.contains("bzimage (")), "{ls}");

    // QEMU (the daemon's default) cannot boot it: refused before anything is made, naming the fix.
    let out = d.hearth(&["run", "-d", "--kernel", "nopvh", "--network", "none", "nopvh:1", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("kernel nopvh is an ELF vmlinux without a PVH note")
            && err.contains("use --vmm firecracker"),
        "{err}"
    );
    assert_eq!(d.ok(&["ps", "-a", "-q"]).trim(), "", "nothing made");

    // Firecracker boots it as it is: no conversion, the kernel's first lines in `hearth logs`.
    let args = "loglevel=8 earlyprintk=serial,ttyS0";
    d.ok(&[
        "run",
        "-d",
        "--no-wait",
        "--vmm",
        "firecracker",
        "--kernel",
        "nopvh",
        "--network",
        "none",
        "--name",
        "elf",
        "--kernel-args",
        args,
        "nopvh:1",
        "true",
    ]);
    assert!(!d.root.path().join("kernels/nopvh/vmlinux").exists(), "an ELF is not converted");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logs = d.ok(&["logs", "elf"]);
        let has_args = |l: &str| args.split_whitespace().all(|a| l.contains(a));
        if logs.lines().any(|l| l.contains("Command line:") && has_args(l)) {
            break;
        }
        assert!(Instant::now() < deadline, "no kernel output:\n{logs}\n--- log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    d.ok(&["rm", "-f", "elf"]);
}
