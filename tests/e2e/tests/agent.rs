//! Into the guest through hearth-init's agent: exec (streams, exit codes, stdin, TTY,
//! concurrency) and cp both ways. One VM is booted for all of it.

use std::io::Write;
use std::process::Stdio;

use hearth_e2e::{demo_registry, require_e2e, text, Daemon};

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum");
    text(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn exec_and_cp_through_the_agent() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let d = Daemon::start();
    d.import_kernel();
    d.ok(&["run", "-d", "--name", "box", &image, "sleep", "1000000"]);

    // Separate streams and the exit code.
    let out = d.hearth(&["exec", "box", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // The image's environment and working directory, with -e and -w on top.
    let out =
        d.ok(&["exec", "-e", "EXTRA=1", "box", "--", "sh", "-c", "echo $GREETING $EXTRA; pwd"]);
    assert_eq!(out, "hi 1\n/work\n");
    assert_eq!(
        d.ok(&["exec", "-w", "/tmp", "-u", "app", "box", "--", "sh", "-c", "pwd; id -u"]),
        "/tmp\n1000\n"
    );

    // stdin is forwarded with -i.
    let mut child = d
        .cmd(&["exec", "-i", "box", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec -i");
    child.stdin.take().expect("stdin").write_all(b"echoed through the guest\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "echoed through the guest\n");

    // -t gives the process a terminal.
    let out = d.ok(&["exec", "-t", "box", "--", "tty"]);
    assert!(out.trim().starts_with("/dev/pts/"), "tty said {out:?}");

    // A missing command is 127, as in a shell.
    let out = d.hearth(&["exec", "box", "--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // Ten at once, each with its own output.
    let children: Vec<_> = (0..10)
        .map(|i| {
            (
                i,
                d.cmd(&["exec", "box", "--", "sh", "-c", &format!("sleep 1; echo job-{i}")])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn"),
            )
        })
        .collect();
    for (i, c) in children {
        let out = c.wait_with_output().expect("wait");
        assert!(out.status.success(), "job {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("job-{i}\n"));
    }

    // cp: a 20 MiB file and a directory tree, both ways, with modes kept.
    let work = tempfile::tempdir().expect("tmp");
    let big = work.path().join("big.bin");
    let data: Vec<u8> =
        (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&big, &data).expect("write");
    d.ok(&["cp", big.to_str().expect("utf8"), "box:/tmp/big.bin"]);
    let guest_sum = d.ok(&["exec", "box", "--", "sha256sum", "/tmp/big.bin"]);
    assert_eq!(guest_sum.split_whitespace().next(), Some(sha256(&big).as_str()));
    let back = work.path().join("back.bin");
    d.ok(&["cp", "box:/tmp/big.bin", back.to_str().expect("utf8")]);
    assert_eq!(sha256(&back), sha256(&big));

    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).expect("mkdir");
    std::fs::write(tree.join("a.txt"), b"alpha").expect("write");
    std::fs::write(tree.join("sub/deeper/run.sh"), b"#!/bin/sh\necho run\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tree.join("sub/deeper/run.sh"),
            std::fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");
    }
    d.ok(&["cp", tree.to_str().expect("utf8"), "box:/srv"]);
    assert_eq!(d.ok(&["exec", "box", "--", "sh", "/srv/sub/deeper/run.sh"]), "run\n");
    assert_eq!(
        d.ok(&["exec", "box", "--", "stat", "-c", "%a", "/srv/sub/deeper/run.sh"]).trim(),
        "750"
    );
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    d.ok(&["cp", "box:/srv", out_dir.to_str().expect("utf8")]);
    assert_eq!(std::fs::read(out_dir.join("srv/a.txt")).expect("a.txt"), b"alpha");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out_dir.join("srv/sub/deeper/run.sh"))
            .expect("run.sh")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
    }

    // An exec whose client stops reading its output holds up only itself: the guest keeps
    // the rest within the stream's flow-control window, and other execs still answer.
    let mut flood = d
        .cmd(&[
            "exec",
            "box",
            "--",
            "sh",
            "-c",
            "while :; do echo flooding-the-host-with-output; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let t0 = std::time::Instant::now();
    assert_eq!(d.ok(&["exec", "box", "--", "echo", "still-answering"]), "still-answering\n");
    let mut piped = [0u8; 64];
    std::io::Read::read_exact(flood.stdout.as_mut().expect("stdout"), &mut piped)
        .expect("the flood's own output still comes");
    assert!(text(&piped).contains("flooding"), "{}", text(&piped));
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "held up for {:?}", t0.elapsed());
    // The client left, so hearthd killed the process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.ok(&["exec", "box", "--", "ps"]).contains("flooding") {
        assert!(std::time::Instant::now() < deadline, "the flood outlived its client");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Graceful stop goes through the agent: quick, and recorded as a stop.
    let t0 = std::time::Instant::now();
    d.ok(&["stop", "-t", "30", "box"]);
    assert!(t0.elapsed() < std::time::Duration::from_secs(25), "stop took {:?}", t0.elapsed());
    let out = d.hearth(&["exec", "box", "--", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("not running"),
        "{}",
        text(&out.stderr)
    );
}

/// `pause` freezes the guest (a counter it prints stops), `exec` says why it cannot reach it,
/// `unpause` lets it count on, and a paused VM stops gracefully (its workload gets SIGTERM).
#[test]
fn pause_freezes_the_guest_and_unpause_lets_it_run_on() {
    require_e2e!();
    let (_reg, image) = demo_registry();
    let d = Daemon::start();
    d.import_kernel();
    let counter = "i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.2; done";
    d.ok(&["run", "-d", "--name", "ticker", &image, "sh", "-c", counter]);
    let ticks = || d.ok(&["logs", "ticker"]).matches("tick-").count();
    let wait_ticks = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while ticks() < n {
            assert!(std::time::Instant::now() < deadline, "only {} ticks", ticks());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_ticks(3);

    assert_eq!(d.ok(&["pause", "ticker"]).trim(), "ticker");
    assert_eq!(d.inspect("ticker")["status"]["paused"], true);
    assert!(d.ok(&["ps"]).contains("Running (Paused)"), "{}", d.ok(&["ps"]));
    // Bytes already on their way out of the UART land; then nothing more.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let frozen = ticks();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(ticks(), frozen, "the guest counted while paused");
    let out = d.hearth(&["exec", "ticker", "--", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("VM ticker is paused"),
        "{}",
        text(&out.stderr)
    );
    let out = d.hearth(&["pause", "ticker"]);
    assert!(text(&out.stderr).contains("already paused"), "{}", text(&out.stderr));

    assert_eq!(d.ok(&["unpause", "ticker"]).trim(), "ticker");
    wait_ticks(frozen + 3);
    assert_eq!(d.inspect("ticker")["status"]["paused"], serde_json::Value::Null);
    let out = d.hearth(&["unpause", "ticker"]);
    assert!(text(&out.stderr).contains("is not paused"), "{}", text(&out.stderr));

    d.ok(&["pause", "ticker"]);
    d.ok(&["stop", "ticker"]);
    let v = d.inspect("ticker");
    assert_eq!(
        (v["status"]["state"].as_str(), v["status"]["exit_code"].as_i64()),
        (Some("stopped"), Some(143)),
        "stopped through hearth-init (SIGTERM to the workload), not killed: {v}"
    );
}
