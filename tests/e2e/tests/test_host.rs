//! Host set-up that needs kernel features this CI host lacks (device-mapper thin pools, loop
//! devices), tested inside a guest that hearth boots under QEMU/TCG with Debian's cloud kernel,
//! which has them as modules: the guest is the test host. Its image is busybox with hearth's
//! CLI (and the loader and libraries it links) and the modules' files; hearth loads the modules
//! itself, natively, as it would on a host.

use hearth_e2e::{require_e2e, text, Daemon};

/// The test-host image: busybox, the `hearth` binary, and the modules a thin pool on files needs.
fn test_host_image(d: &Daemon, name: &str) {
    let tree = std::path::PathBuf::from(std::env::var("HEARTH_TEST_MODULES").expect("modules"));
    let keep = hearth_kernel::modules::closure(&tree, &["dm_thin_pool", "loop"]).expect("closure");
    let img = hearth_e2e::testutil::TestImage {
        host_binaries: vec![hearth_bin()],
        modules: Some((tree, keep)),
        ..Default::default()
    };
    let layout = tempfile::tempdir().expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(layout.path(), "1", &img).expect("layout");
    d.ok(&["image", "import", layout.path().to_str().expect("utf8"), "--name", name]);
}

/// The `hearth` binary, at the path it has in the test-host image too.
fn hearth_bin() -> std::path::PathBuf {
    std::fs::canonicalize(hearth_e2e::bin_dir().join("hearth")).expect("hearth")
}

/// Runs `script` in a test-host guest; returns what it printed (its console) and its exit code.
fn in_test_host(d: &Daemon, image: &str, script: &str) -> (String, i32) {
    let out = d.hearth(&[
        "run",
        "--rm",
        "--memory",
        "1G",
        "--size",
        "3G",
        "--network",
        "none",
        image,
        "sh",
        "-c",
        script,
    ]);
    (text(&out.stdout), out.status.code().unwrap_or(-1))
}

#[test]
fn provision_dev_makes_a_thin_pool_on_files_once_and_dry_run_changes_nothing() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhost:1");
    let h = hearth_bin().display().to_string();
    let p = format!(
        "{h} host provision --dev --root /var/lib/hearth --data-size 1G --metadata-size 64M"
    );
    let script = format!(
        "set -e; echo '== plan'; {p} --dry-run; test ! -e /var/lib/hearth/pool; \
         echo '== first'; {p}; echo '== second'; {p}; echo '== plan again'; {p} --dry-run; \
         echo '== check'; {h} host check --root /var/lib/hearth || true; \
         echo '== files'; ls -ls /var/lib/hearth/pool"
    );
    let (out, code) = in_test_host(&d, "testhost:1", &script);
    assert_eq!(code, 0, "{out}");
    let section = |name: &str| -> String {
        out.split(&format!("== {name}\n"))
            .nth(1)
            .unwrap_or_default()
            .split("\n== ")
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let plan = section("plan");
    assert!(
        plan.contains("would load the kernel module dm_thin_pool")
            && plan.contains("would make the sparse file /var/lib/hearth/pool/data (1.0 GiB)")
            && plan.contains("would create the thin pool hearth-thinpool"),
        "the plan names every step:\n{out}"
    );
    let first = section("first");
    assert!(first.contains("loaded the kernel module dm_thin_pool"), "{out}");
    assert!(first.contains("did create the thin pool hearth-thinpool"), "{out}");
    assert!(first.contains("thin pool hearth-thinpool: data 0.0% used of 1.0 GiB"), "{out}");
    let second = section("second");
    assert!(
        !second.contains("did ") && second.contains("nothing changed"),
        "a second run changes nothing:\n{out}"
    );
    assert!(section("plan again").contains("nothing to do"), "{out}");
    let check = section("check");
    let pool = check.lines().find(|l| l.starts_with("thin pool")).unwrap_or_default();
    assert!(
        pool.contains("OK") && pool.contains("hearth-thinpool: data 0.0% used of 1.0 GiB"),
        "read from device-mapper:\n{check}"
    );
    for m in ["dm_thin_pool", "loop"] {
        let row = check.lines().find(|l| l.starts_with(&format!("module {m}"))).unwrap_or_default();
        assert!(row.contains("OK"), "{m} in the test host:\n{check}");
    }
    // Sparse: the files hold almost nothing of their size.
    let files = section("files");
    assert!(files.lines().any(|l| l.ends_with(" data")), "{files}");
}

#[test]
fn on_a_host_without_device_mapper_the_pool_and_its_module_are_reported_with_their_fix() {
    require_e2e!();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    let tree = std::path::Path::new("/lib/modules").join(release.trim());
    let on_disk = std::process::Command::new("find")
        .arg(&tree)
        .args(["-name", "dm-thin-pool.ko*"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if std::path::Path::new("/sys/module/dm_thin_pool").exists() || on_disk {
        eprintln!("skipped: this host's kernel has dm_thin_pool (the test-host guest covers it)");
        return;
    }
    let d = Daemon::start();
    let check = d.ok(&["host", "check"]);
    let row =
        |name: &str| check.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
    // Missing, or (where the kernel's module lists are not on the host) not known: either way
    // not OK, and with the fix.
    let module = row("module dm_thin_pool");
    assert!(!module.contains(" OK ") && module.contains("fix: "), "{check}");
    let pool = row("thin pool");
    assert!(pool.contains("fix: hearth host provision --dev"), "{check}");
    let out =
        d.hearth(&["host", "provision", "--dev", "--root", d.root.path().to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("no module dm_thin_pool"), "{err}");
    assert!(!d.root.path().join("pool").exists(), "nothing made");
}
