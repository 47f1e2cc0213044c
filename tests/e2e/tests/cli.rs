//! CLI behaviour around the main job: interactive runs, attach, daemon autostart, kernel pull.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_e2e::{demo_registry, require_e2e, text, Daemon};

#[test]
fn run_i_feeds_stdin_and_attach_reaches_the_console() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let d = Daemon::start();
    d.import_kernel();
    let mut child = d
        .cmd(&["run", "-i", "--rm", &image, "head", "-n1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run -i");
    child.stdin.take().expect("stdin").write_all(b"through the console\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("through the console"), "{:?}", text(&out.stdout));

    d.ok(&["run", "-d", "-i", "--name", "talk", &image, "sh", "-c", "read line; echo got:$line"]);
    let mut child = d
        .cmd(&["attach", "talk"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("attach");
    child.stdin.take().expect("stdin").write_all(b"xyz\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(text(&out.stdout).contains("got:xyz"), "{:?}", text(&out.stdout));
    d.wait_for("talk", "stopped", Duration::from_secs(60), |v| v["status"]["state"] == "stopped");
    assert_eq!(d.inspect("talk")["status"]["exit_code"], 0);

    // Ctrl-P Ctrl-Q detaches and leaves the VM running; the keys never reach the guest, what
    // was typed before them does.
    d.ok(&["run", "-d", "-i", "--name", "keys", &image, "sh", "-c", "read line; echo got:$line"]);
    let attach = |input: &[u8]| {
        let mut child = d
            .cmd(&["attach", "keys"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("attach");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write");
        // Held open, so only the keys (or the VM's end) can end the attach.
        let out = child.wait_with_output().expect("wait");
        drop(stdin);
        out
    };
    let out = attach(b"ab\x10\x11");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("detached from keys"), "{}", text(&out.stderr));
    assert_eq!(d.inspect("keys")["status"]["state"], "running", "detaching leaves it running");
    let out = attach(b"c\n");
    let said = text(&out.stdout);
    assert!(said.lines().any(|l| l.trim_end() == "got:abc"), "{said:?}");
}

/// `run --rm` in the foreground prints every byte the workload wrote, even to a reader slower
/// than the guest: the VM and its log are removed only after the follower has read them.
#[test]
fn a_slow_reader_of_run_rm_gets_every_line_before_the_vm_goes() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let d = Daemon::start();
    d.import_kernel();
    let lines = 20_000;
    let script =
        format!("i=0; while [ $i -lt {lines} ]; do echo line-$i; i=$((i+1)); done; echo last-line");
    let mut child = d
        .cmd(&["run", "--rm", &image, "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4 << 10];
    loop {
        // About 80 KiB/s: slower than the guest writes, so the follower lags behind it.
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = text(&got);
    let printed: Vec<&str> =
        got.lines().map(str::trim_end).filter(|l| l.starts_with("line-")).collect();
    assert_eq!(printed.len(), lines, "every line, in order");
    assert!(printed.iter().enumerate().all(|(i, l)| *l == format!("line-{i}")));
    assert!(
        got.contains("last-line"),
        "the last line: {:?}",
        &got[got.len().saturating_sub(200)..]
    );
    let ps = d.ok(&["ps", "-a", "-q"]);
    assert!(ps.trim().is_empty(), "the --rm VM is gone: {ps}");
}

#[test]
fn the_cli_starts_a_daemon_when_none_answers() {
    require_e2e!();
    let root = tempfile::tempdir().expect("tmp");
    let out = Command::new(hearth_e2e::bin_dir().join("hearth"))
        .arg("version")
        .env("HEARTH_ROOT", root.path())
        .env_remove("HEARTH_HOST")
        .output()
        .expect("hearth");
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(format!("hearthd --root {}", root.path().display()))
        .status();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("started hearthd"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Server: hearthd"), "{}", text(&out.stdout));
}

#[test]
fn kernel_pull_from_an_ignite_style_image_boots() {
    require_e2e!();
    let (reg, image) = demo_registry();
    let kernel = std::path::PathBuf::from(std::env::var("HEARTH_TEST_KERNEL").expect("kernel"));
    let modules = std::path::PathBuf::from(std::env::var("HEARTH_TEST_MODULES").expect("modules"));
    let keep = hearth_kernel_closure(&modules);
    let layer = hearth_e2e::testutil::kernel_layer(&kernel, &modules, &keep).expect("kernel layer");
    hearth_e2e::testutil::push_layer(&reg, "kernels/debian:6.1", &layer)
        .expect("push kernel image");
    let d = Daemon::start();
    d.ok(&["kernel", "pull", "--name", "pulled", &format!("{}/kernels/debian:6.1", reg.host())]);
    let ls = d.ok(&["kernel", "ls"]);
    assert!(ls.contains("pulled") && ls.contains("6.1.0"), "{ls}");
    let out = d.ok(&["run", "--rm", "--kernel", "pulled", &image, "uname", "-r"]);
    assert!(out.trim().starts_with("6.1.0"), "{out}");

    // By reference, as Ignite's --kernel-image: pulled when missing, named after the reference.
    let reference = format!("{}/kernels/debian:6.1", reg.host());
    let missing = format!("{}/kernels/none:1", reg.host());
    let out = d.hearth(&["run", "--rm", "--pull", "never", "--kernel", &missing, &image, "true"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("kernel {missing} does not exist")),
        "{err}"
    );
    let out = d.hearth(&["run", "--rm", "--kernel-image", &reference, &image, "uname", "-r"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).trim().starts_with("6.1.0"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains(&format!("Unable to find kernel '{reference}' locally")));
    let ls = d.ok(&["kernel", "ls"]);
    assert!(ls.lines().any(|l| l.starts_with(&reference)), "named after its reference:\n{ls}");
    // A second run finds it: nothing is pulled again.
    let out = d.hearth(&["run", "--rm", "--kernel", &reference, &image, "true"]);
    assert!(
        out.status.success() && !text(&out.stderr).contains("Unable to find"),
        "{}",
        text(&out.stderr)
    );
    d.ok(&["kernel", "rm", &reference]);
    assert!(!d.ok(&["kernel", "ls"]).contains(&reference));
}

/// The module files the guest needs, found the way hearth finds them.
fn hearth_kernel_closure(modules: &std::path::Path) -> Vec<std::path::PathBuf> {
    hearth_kernel::modules::closure(modules, hearth_kernel::GUEST_MODULES).expect("closure")
}

/// `hearth info` counts what the daemon has and says how it stores VM disks (here, without a
/// thin pool, copies of each image's base); `-o json` is the same for machines.
#[test]
fn info_says_what_the_daemon_has_and_how_it_stores_disks() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let d = Daemon::start();
    d.import_kernel();
    d.ok(&["create", "--name", "a", &image]);
    let info = d.ok(&["info"]);
    for line in [
        "VMs: 1 (running 0, stopped 1)",
        "Images: 1",
        "Kernels: 1 (default debian)",
        "Default VMM: qemu",
        "copies of each image's base filesystem",
    ] {
        assert!(info.contains(line), "{line}:\n{info}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&d.ok(&["info", "-o", "json"])).expect("json");
    assert_eq!(json["vms"]["total"], 1);
    assert_eq!(json["root"].as_str(), d.root.path().to_str());
}

/// `--restart` as docker has it, against real guests: on-failure restarts a run that failed (and
/// a VMM killed) but not one that exited 0; no leaves a killed VMM's VM stopped; always restarts
/// every end until a stop by hand; after a daemon restart, always starts a VM stopped by hand and
/// unless-stopped does not. The root disk is kept across restarts, so a workload can count its runs.
#[test]
fn restart_policies_start_vms_again_as_docker_does() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let mut d = Daemon::start();
    d.import_kernel();
    let long = Duration::from_secs(180);
    let field = |v: &serde_json::Value, k: &str| v["status"][k].as_i64().unwrap_or(0);
    let run = |name: &str, policy: &str, script: &str| {
        d.ok(&[
            "run",
            "-d",
            "--no-wait",
            "--restart",
            policy,
            "--name",
            name,
            &image,
            "sh",
            "-c",
            script,
        ]);
    };
    // Fails on its first run, succeeds on its second.
    run("flaky", "on-failure", "if [ -e /ran ]; then exit 0; fi; touch /ran; sync; exit 1");
    let v = d.wait_for("flaky", "done", long, |v| {
        v["status"]["state"] == "stopped" && v["status"]["restarting"].is_null()
    });
    assert_eq!(
        (field(&v, "exit_code"), field(&v, "restart_count"), field(&v, "boots")),
        (0, 1, 2),
        "{v:#}"
    );
    assert_eq!(v["spec"]["restart"], "on-failure");
    assert!(d.ok(&["ps", "-a"]).contains("Exited (0)"));

    // A VMM killed behind hearth's back: a failure for on-failure, the end for no.
    run("sturdy", "on-failure", "sleep 100000");
    run("plain", "no", "sleep 100000");
    for name in ["sturdy", "plain"] {
        let v = d.wait_for(name, "running", long, |v| v["status"]["state"] == "running");
        let pid = v["status"]["pid"].as_i64().expect("pid").to_string();
        assert!(Command::new("kill").args(["-9", &pid]).status().expect("kill").success());
    }
    let v = d.wait_for("sturdy", "running again", long, |v| {
        v["status"]["state"] == "running" && field(v, "boots") == 2
    });
    assert_eq!(field(&v, "restart_count"), 1);
    let v = d.wait_for("plain", "stopped", long, |v| v["status"]["state"] == "stopped");
    assert!(v["status"]["reason"].as_str().unwrap_or("").contains("unexpectedly"), "{v:#}");
    assert_eq!(field(&v, "boots"), 1, "no: never started again");

    // always: every end, until stopped by hand.
    run("loop", "always", "exit 0");
    d.wait_for("loop", "restarted twice", long, |v| field(v, "restart_count") >= 2);
    d.ok(&["stop", "loop"]);
    let boots = field(&d.inspect("loop"), "boots");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(field(&d.inspect("loop"), "boots"), boots, "a stop by hand ends the loop");

    // A daemon restart: always starts its VM stopped by hand, unless-stopped does not.
    run("kept", "unless-stopped", "sleep 100000");
    d.wait_for("kept", "running", long, |v| v["status"]["state"] == "running");
    d.ok(&["stop", "kept", "sturdy"]);
    d.ok(&["rm", "-f", "flaky", "plain"]);
    d.kill9();
    d.spawn();
    d.wait_for("loop", "started with the daemon", long, |v| field(v, "boots") > boots);
    std::thread::sleep(Duration::from_secs(2));
    for name in ["kept", "sturdy"] {
        assert_eq!(d.inspect(name)["status"]["state"], "stopped", "{name} stays stopped");
    }
    d.ok(&["stop", "loop"]);

    // `hearth restart` stops and starts; --rm with a policy is refused.
    d.ok(&["start", "kept"]);
    let before = field(&d.inspect("kept"), "boots");
    d.ok(&["restart", "-t", "2", "kept"]);
    let v = d.inspect("kept");
    assert_eq!((v["status"]["state"].as_str(), field(&v, "boots")), (Some("running"), before + 1));
    let out = d.hearth(&["run", "--rm", "--restart", "always", &image, "true"]);
    assert!(
        text(&out.stderr).contains("--rm cannot be combined with --restart always"),
        "{}",
        text(&out.stderr)
    );
}
