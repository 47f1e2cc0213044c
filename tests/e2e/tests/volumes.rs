//! Volumes that are not images, through `hearth run -v`: the host's own file (written by the
//! guest, kept after rm), the host's file read-only (never written), a blank volume of the VM's
//! own (its size, gone with the VM), and the refusals that leave no VM behind. Two guests boot:
//! the second reads what the first wrote. And a host directory, shared live through virtio-fs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use hearth_e2e::{require_e2e, text, Daemon};

/// An ext4 image of `mib` MiB holding `hello` with `content`, owned by 4321.
fn ext4_with(path: &Path, mib: u64, content: &str) {
    let tree = path.with_extension("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("hello"), content).expect("hello");
    let f = std::fs::File::create(path).expect("file");
    f.set_len(mib << 20).expect("size");
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&tree).arg(path).status();
    assert!(st.expect("mkfs.ext4").success());
    std::os::unix::fs::chown(path, Some(4321), Some(4321)).expect("chown");
}

/// A file's content inside an ext4 image, read on the host with debugfs.
fn read_in(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(image).output();
    text(&out.expect("debugfs").stdout)
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    text(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// A daemon with a kernel, and a busybox image in a local registry (kept while the test runs).
fn daemon_and_image() -> (Daemon, hearth_e2e::testutil::LocalRegistry, String) {
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("registry");
    hearth_e2e::testutil::push_busybox(&reg, "vol:1", "").expect("push");
    let image = format!("{}/vol:1", reg.host());
    let d = Daemon::start();
    d.import_kernel();
    (d, reg, image)
}

#[test]
fn host_files_and_blank_volumes_reach_the_guest_and_only_the_vms_own_go_with_it() {
    require_e2e!();
    let (d, _reg, image) = daemon_and_image();
    let work = tempfile::tempdir().expect("tmp");
    let (data, ro) = (work.path().join("data.img"), work.path().join("ro.img"));
    ext4_with(&data, 32, "from the host\n");
    ext4_with(&ro, 16, "read only\n");
    let ro_sum = sha256(&ro);

    let script = "cat /data/hello; echo written-by-guest > /data/out; \
        if echo x > /ro/x 2>/dev/null; then echo ro-writable; else echo ro-refused; fi; cat /ro/hello; \
        echo kept > /scratch/f; df -k /scratch | grep -o ' [0-9]* *[0-9]* *[0-9]* *[0-9]*% /scratch' ; \
        grep -E ' /(data|ro|scratch) ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1";
    let data_v = format!("{}:/data", data.display());
    let ro_v = format!("{}:/ro:ro", ro.display());
    let out = d.hearth(&[
        "run",
        "--name",
        "vols",
        "-v",
        &data_v,
        "-v",
        &ro_v,
        "-v",
        "scratch:/scratch",
        "--volume-size",
        "scratch=64M",
        &image,
        "sh",
        "-c",
        script,
    ]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("from the host\n"), "the host file's content: {said}");
    assert!(said.contains("ro-refused\n") && said.contains("read only\n"), "{said}");
    assert!(said.contains("/data rw\n") && said.contains("/ro ro\n"), "{said}");
    assert!(said.contains("/scratch rw\n"), "{said}");
    // The blank volume is about the size asked for (ext4 keeps some for itself).
    let total_kib: u64 = said
        .lines()
        .find(|l| l.ends_with("% /scratch"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df /scratch: {said}"));
    assert!((48 << 10..=64 << 10).contains(&total_kib), "{total_kib} KiB");

    // The guest wrote the host's file; the read-only one is as it was; owners are kept.
    assert_eq!(read_in(&data, "/out"), "written-by-guest\n");
    assert_eq!(sha256(&ro), ro_sum, "a read-only host volume is never written");
    for f in [&data, &ro] {
        let m = std::fs::metadata(f).expect("host file");
        assert_eq!((m.uid(), m.gid()), (4321, 4321), "{f:?} keeps its owner");
    }
    let inspect = d.inspect("vols");
    let vols = inspect["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<String> =
        vols.iter().map(|v| v["source"]["kind"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(kinds, ["host", "host", "blank"], "{inspect:#}");

    // Removing the VM removes its blank volume, never the host's files.
    let id = inspect["spec"]["id"].as_str().expect("id").to_owned();
    let blank = d.root.path().join("vms").join(&id).join("volume-2.img");
    assert!(blank.exists(), "the blank volume is the VM's own file");
    d.ok(&["rm", "vols"]);
    assert!(data.exists() && ro.exists(), "the host's files stay");
    assert_eq!(read_in(&data, "/out"), "written-by-guest\n");
    assert!(!blank.exists(), "the blank volume went with the VM");

    // Another VM, after the first is gone, reads what the first wrote.
    let out = d.hearth(&["run", "--rm", "-v", &data_v, &image, "cat", "/data/out"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim_end_matches(['\r', '\n']), "written-by-guest");
}

#[test]
fn volumes_that_cannot_be_given_are_refused_by_name_and_leave_no_vm() {
    require_e2e!();
    let (d, _reg, image) = daemon_and_image();
    let work = tempfile::tempdir().expect("tmp");
    let shared = work.path().join("shared.img");
    ext4_with(&shared, 16, "x\n");
    let empty = work.path().join("empty.img");
    std::fs::write(&empty, b"").expect("empty");
    let link = work.path().join("alias.img");
    std::os::unix::fs::symlink(&shared, &link).expect("link");
    let v = |p: &Path, suffix: &str| format!("{}{suffix}", p.display());

    d.ok(&["create", "--name", "writer", "-v", &v(&shared, ":/data"), &image]);
    let cases = [
        (v(&work.path().join("missing.img"), ":/d"), "does not exist"),
        (v(d.root.path(), ":/d"), "hearth's state directory"),
        (v(&d.root.path().join("vms"), ":/d"), "hearth's state directory"),
        (v(work.path(), ""), "needs the path to mount it"),
        (v(&empty, ":/d"), "is empty"),
        (v(&link, ":/d:ro"), "attached to VM writer already"),
        ("data/rel:/d".to_owned(), "absolute path"),
    ];
    for (arg, says) in cases {
        let out = d.hearth(&["create", "--name", "refused", "-v", &arg, &image]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "-v {arg}: {err}");
    }
    let out = d.hearth(&["create", "--volume-size", "nope=1G", &image]);
    assert!(text(&out.stderr).contains("no -v nope:/PATH"), "{}", text(&out.stderr));
    let ps = d.ok(&["ps", "-a", "-q"]);
    assert_eq!(ps.lines().count(), 1, "only the writer exists: {ps}");
    d.ok(&["rm", "writer"]);
    // Once the writer is gone, the disk is free for another.
    d.ok(&["create", "--name", "next", "-v", &v(&link, ":/data:ro"), &image]);
}

/// The sockets under `dir` that live virtiofsd processes serve, from /proc (one each: in its
/// sandbox, a virtiofsd is two processes).
fn virtiofsds_under(dir: &Path) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> =
            cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let socket = (args.windows(2))
            .find(|w| w[0] == "--socket-path" && Path::new(&w[1]).starts_with(dir))
            .map(|w| w[1].clone());
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
        if let (Some(socket), false) = (socket, zombie) {
            found.insert(socket);
        }
    }
    found
}

/// `-v DIR:/PATH` shares a host directory with the guest, as docker bind-mounts one: the guest
/// reads what the host put there and the host sees what the guest writes, at once; `:ro` is
/// enforced by virtiofsd and the guest's mount; a symlink in the share never leads the guest to
/// the host's files; the share's virtiofsd goes with the VM.
#[test]
fn a_host_directory_is_shared_live_and_confined_to_itself() {
    require_e2e!();
    let (d, _reg, image) = daemon_and_image();
    let work = tempfile::tempdir().expect("tmp");
    let (shared, ro, outside) =
        (work.path().join("shared"), work.path().join("ro"), work.path().join("outside"));
    for dir in [&shared, &ro, &outside] {
        std::fs::create_dir(dir).expect("dir");
    }
    std::fs::write(shared.join("hello"), "from the host\n").expect("hello");
    std::fs::write(ro.join("keep"), "unchanged\n").expect("keep");
    std::fs::write(outside.join("secret"), "host secret\n").expect("secret");
    // Links that would lead out of the share on the host.
    std::os::unix::fs::symlink("../outside/secret", shared.join("rel")).expect("link");
    std::os::unix::fs::symlink(outside.join("secret"), shared.join("abs")).expect("link");

    let script = "cat /data/hello; echo written-by-guest > /data/out; mkdir /data/sub; \
        if echo x > /ro/x 2>/dev/null; then echo ro-writable; else echo ro-refused; fi; cat /ro/keep; \
        cat /data/rel /data/abs 2>&1 | grep -c 'host secret' ; \
        grep -E ' /(data|ro) ' /proc/mounts | cut -d' ' -f2,3,4 | cut -d, -f1; \
        until [ -e /data/from-host ]; do sleep 0.1; done; cat /data/from-host";
    let data_v = format!("{}:/data", shared.display());
    let ro_v = format!("{}:/ro:ro", ro.display());
    let args =
        ["run", "-d", "--name", "share", "-v", &data_v, "-v", &ro_v, &image, "sh", "-c", script];
    d.ok(&args);
    // What the guest writes is on the host while it runs, and the other way round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !shared.join("out").exists() {
        assert!(std::time::Instant::now() < deadline, "the guest never wrote /data/out");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(virtiofsds_under(d.root.path()).len(), 2, "a virtiofsd per share");
    std::fs::write(shared.join("from-host"), "seen live\n").expect("from-host");
    assert_eq!(d.ok(&["wait", "share"]).trim(), "0");
    let said = d.ok(&["logs", "share"]);
    assert!(said.contains("from the host\n") && said.contains("seen live\n"), "{said}");
    assert!(said.contains("ro-refused\n") && said.contains("unchanged\n"), "{said}");
    assert!(said.contains("\n0\n"), "no link leads to the host's secret: {said}");
    assert!(said.contains("/data virtiofs rw\n") && said.contains("/ro virtiofs ro\n"), "{said}");
    assert_eq!(std::fs::read_to_string(shared.join("out")).expect("out"), "written-by-guest\n");
    assert!(shared.join("sub").is_dir());
    assert!(!ro.join("x").exists(), "nothing is written to a read-only share");
    assert_eq!(std::fs::read_to_string(outside.join("secret")).expect("kept"), "host secret\n");

    let inspect = d.inspect("share");
    let kinds: Vec<_> = (inspect["spec"]["volumes"].as_array().into_iter().flatten())
        .map(|v| v["source"]["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, ["share", "share"], "{inspect:#}");
    // The VM ended: its virtiofsds with it. Removing it leaves the host's directories.
    assert!(virtiofsds_under(d.root.path()).is_empty(), "{:?}", virtiofsds_under(d.root.path()));
    d.ok(&["rm", "share"]);
    assert!(shared.join("out").exists() && ro.join("keep").exists());

    // Firecracker has no virtio-fs: refused, naming the VMMs that share.
    let out =
        d.hearth(&["create", "--vmm", "firecracker", "--network", "bridge", "-v", &data_v, &image]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("virtio-fs"),
        "{}",
        text(&out.stderr)
    );
}
