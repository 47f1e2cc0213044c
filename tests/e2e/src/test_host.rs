//! The test-host guest: a VM hearth boots under QEMU/TCG with Debian's cloud kernel, whose
//! image holds hearth's binaries and the modules the host features under test need (this CI
//! host's kernel lacks device-mapper, macvtap, vhost-vsock); scripts run inside it as root.

use crate::{text, Daemon};

/// The test-host image: busybox, hearth's CLI and LVM's tools (`with_daemon`: hearthd, hearth-init,
/// e2fsprogs, the test kernel and a busybox image's OCI layout too), and the modules a thin
/// pool on files, macvtap and vhost-vsock need (and the guest modules an initramfs needs),
/// listed in a `modules.dep`.
pub fn test_host_image(d: &Daemon, name: &str, with_daemon: bool) {
    let tree = std::path::PathBuf::from(std::env::var("HEARTH_TEST_MODULES").expect("modules"));
    // What a Flintlock host needs of its kernel: a thin pool on files, macvtap, vhost-vsock.
    let mut roots = vec!["dm_thin_pool", "loop", "macvtap", "vhost_vsock"];
    // LVM's tools for --direct-lvm (every command is a subcommand of `lvm`), with the
    // thin_check its thin pools are activated through.
    let mut img = crate::testutil::TestImage {
        host_binaries: vec![hearth_bin(), "/usr/sbin/lvm".into(), "/usr/sbin/thin_check".into()],
        ..Default::default()
    };
    let layout = tempfile::tempdir().expect("tmp");
    if with_daemon {
        roots.extend(hearth_kernel::GUEST_MODULES);
        img.host_binaries.extend([
            hearthd_bin(),
            "/usr/sbin/mkfs.ext4".into(),
            "/usr/sbin/e2fsck".into(),
            "/usr/sbin/resize2fs".into(),
            "/usr/sbin/dumpe2fs".into(),
        ]);
        let init = std::env::var("HEARTH_INIT").expect("HEARTH_INIT");
        let kernel = std::env::var("HEARTH_TEST_KERNEL").expect("HEARTH_TEST_KERNEL");
        img.files.push(("/boot/vmlinuz".into(), kernel.into(), 0o644));
        img.files.push(("/hearth-init".into(), init.into(), 0o755));
        let demo = layout.path().join("demo");
        crate::testutil::busybox_oci_layout(&demo, "1", &Default::default()).expect("demo layout");
        for f in walk(&demo) {
            let rel = f.strip_prefix(&demo).expect("inside").display().to_string();
            img.files.push((format!("/demo/{rel}"), f, 0o644));
        }
    }
    let keep = hearth_kernel::modules::closure(&tree, &roots).expect("closure");
    let version = tree.file_name().expect("version").to_string_lossy().into_owned();
    let dep = layout.path().join("modules.dep");
    std::fs::write(&dep, modules_dep(&tree, &keep)).expect("modules.dep");
    img.files.push((format!("/lib/modules/{version}/modules.dep"), dep, 0o644));
    img.modules = Some((tree.clone(), keep));
    let dir = layout.path().join("testhost");
    crate::testutil::busybox_oci_layout(&dir, "1", &img).expect("layout");
    d.ok(&["image", "import", dir.to_str().expect("utf8"), "--name", name]);
}

/// A `modules.dep` for the modules `keep` of `tree` (each with what it needs, as depmod writes
/// it), so the test host's kernel lists what it can load.
fn modules_dep(tree: &std::path::Path, keep: &[std::path::PathBuf]) -> String {
    let mut out = String::new();
    for rel in keep {
        let name = hearth_kernel::modules::module_name(rel).expect("module");
        let deps = hearth_kernel::modules::closure(tree, &[name.as_str()]).expect("closure");
        let deps: Vec<String> =
            deps.iter().filter(|d| *d != rel).map(|d| d.display().to_string()).collect();
        out.push_str(&format!("{}: {}\n", rel.display(), deps.join(" ")));
    }
    out
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

pub fn hearthd_bin() -> std::path::PathBuf {
    std::fs::canonicalize(crate::bin_dir().join("hearthd")).expect("hearthd")
}

/// The `hearth` binary, at the path it has in the test-host image too.
pub fn hearth_bin() -> std::path::PathBuf {
    std::fs::canonicalize(crate::bin_dir().join("hearth")).expect("hearth")
}

/// Runs `script` in a test-host guest of `memory` and a root disk of `size`; returns what it
/// printed (its console) and its exit code.
pub fn in_test_host(
    d: &Daemon,
    image: &str,
    memory: &str,
    size: &str,
    script: &str,
) -> (String, i32) {
    in_test_host_with(d, image, memory, size, &[], script)
}

/// As [`in_test_host`], with more `hearth run` options (`-v` disks).
pub fn in_test_host_with(
    d: &Daemon,
    image: &str,
    memory: &str,
    size: &str,
    options: &[&str],
    script: &str,
) -> (String, i32) {
    let mut args = vec!["run", "--rm", "--memory", memory, "--size", size, "--network", "none"];
    args.extend(options);
    args.extend([image, "sh", "-c", script]);
    let out = d.hearth(&args);
    (text(&out.stdout), out.status.code().unwrap_or(-1))
}

/// Shell functions for scripts in the test host: `R` (hearth's root there, and `HEARTH_HOST`
/// set to its socket), `daemon ARGS...` (starts hearthd with the test kernel's init binary,
/// VMMs as root, no cgroups, QEMU replaced by `false` (or `$QEMU`) since nested guests would be TCG in TCG,
/// and waits for its socket; `$HD` is its pid), `id_of NAME` (a VM's id), `dev_of ID` (the
/// node of a VM's thin device), `import_kernel` (the test kernel as `k`, the default).
pub fn prelude() -> String {
    let (h, hd) = (hearth_bin().display().to_string(), hearthd_bin().display().to_string());
    let modules = std::env::var("HEARTH_TEST_MODULES").expect("HEARTH_TEST_MODULES");
    let version =
        std::path::Path::new(&modules).file_name().expect("version").to_string_lossy().into_owned();
    format!(
        "H={h}; R=/var/lib/hearth; export HEARTH_HOST=unix://$R/hearthd.sock; \
         id_of() {{ $H inspect $1 | grep -m1 '\"id\":' | cut -d'\"' -f4; }}; \
         dev_of() {{ for n in /sys/block/dm-*; do [ \"$(cat $n/dm/name)\" = hearth-vm-$1 ] && echo /dev/${{n##*/}}; done; }}; \
         daemon() {{ rm -f $R/hearthd.sock; HEARTH_QEMU=${{QEMU:-/bin/false}} {hd} --root $R \
           --init-binary /hearth-init --vmm-uid-base 0 --cgroup-parent '' \"$@\" >>/tmp/hearthd.log 2>&1 & \
           HD=$!; for i in $(seq 300); do [ -S $R/hearthd.sock ] && break; sleep 0.1; done; }}; \
         import_kernel() {{ $H kernel import /boot/vmlinuz --modules /lib/modules/{version} --name k --default >/dev/null; }}; "
    )
}

/// What a script printed after its marker line `== NAME` (the rest of that line, then the lines
/// up to the next marker).
pub fn section(out: &str, name: &str) -> String {
    let marker = format!("== {name}");
    let rest = out
        .match_indices(&marker)
        .map(|(at, _)| &out[at + marker.len()..])
        .find(|r| r.starts_with('\n') || r.starts_with(' '))
        .unwrap_or_default();
    // Up to the next marker line, which may follow at once (an empty section).
    let body = rest.split("\n== ").next().unwrap_or_default();
    body.strip_prefix('\n').unwrap_or(body).to_owned()
}

/// What the Debian test host has installed: systemd as its init, LVM's tools, e2fsprogs and
/// QEMU, as a Flintlock host has them. nftables is left out: `provision --all` installs it from
/// a local apt repository in the image (the guest has no network).
const DEBIAN_PACKAGES: &str = "systemd,systemd-sysv,udev,dbus,kmod,iproute2,lvm2,thin-provisioning-tools,e2fsprogs,qemu-system-x86";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}{}", text(&out.stdout), text(&out.stderr));
}

/// A debootstrapped Debian 12 (`DEBIAN_PACKAGES`), with nftables and the packages it needs as a
/// local apt repository at /srv/debs (the only source the image's apt has), made once and kept
/// in the repository's `.cache/testhost-debian`.
fn debian_tree() -> std::path::PathBuf {
    use std::process::Command;
    let cache =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/testhost-debian");
    let (root, stamp) = (cache.join("root"), cache.join("stamp"));
    let want = format!("bookworm {DEBIAN_PACKAGES} + nftables in /srv/debs, 1\n");
    if root.join("sbin/init").exists() && std::fs::read_to_string(&stamp).ok() == Some(want.clone())
    {
        return root;
    }
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).expect("cache");
    let tmp = cache.join("root.tmp");
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={DEBIAN_PACKAGES}"), "bookworm"])
            .arg(&tmp)
            .arg(DEBIAN_MIRROR),
    );
    // nftables and what it needs beyond what is installed, fetched by the tree's own apt.
    std::fs::copy("/etc/resolv.conf", tmp.join("etc/resolv.conf")).expect("resolv.conf");
    run_ok(Command::new("chroot").arg(&tmp).args(["apt-get", "update", "-q"]));
    run_ok(Command::new("chroot").arg(&tmp).args([
        "apt-get",
        "install",
        "-q",
        "-y",
        "--download-only",
        "--no-install-recommends",
        "nftables",
    ]));
    let debs = tmp.join("srv/debs");
    std::fs::create_dir_all(&debs).expect("srv/debs");
    let mut index = String::new();
    for e in std::fs::read_dir(tmp.join("var/cache/apt/archives")).expect("archives").flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "deb") {
            continue;
        }
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        std::fs::rename(&p, debs.join(&name)).expect("move deb");
        let control = Command::new("dpkg-deb").arg("-f").arg(debs.join(&name)).output();
        let sum = Command::new("sha256sum").arg(debs.join(&name)).output().expect("sha256sum");
        let size = std::fs::metadata(debs.join(&name)).expect("deb").len();
        index.push_str(text(&control.expect("dpkg-deb").stdout).trim_end());
        let sha = text(&sum.stdout).split_whitespace().next().unwrap_or_default().to_owned();
        index.push_str(&format!("\nFilename: ./{name}\nSize: {size}\nSHA256: {sha}\n\n"));
    }
    assert!(index.contains("Package: nftables"), "nftables was fetched");
    std::fs::write(debs.join("Packages"), index).expect("Packages");
    let _ = std::fs::remove_file(tmp.join("etc/apt/sources.list"));
    let _ = std::fs::remove_dir_all(tmp.join("etc/apt/sources.list.d"));
    std::fs::create_dir_all(tmp.join("etc/apt/sources.list.d")).expect("sources.list.d");
    std::fs::write(
        tmp.join("etc/apt/sources.list.d/local.list"),
        "deb [trusted=yes] file:/srv/debs ./\n",
    )
    .expect("local.list");
    for dir in ["var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"] {
        let _ = std::fs::remove_dir_all(tmp.join(dir));
        std::fs::create_dir_all(tmp.join(dir)).expect("dir");
    }
    std::fs::remove_file(tmp.join("etc/resolv.conf")).expect("resolv.conf");
    std::fs::write(tmp.join("etc/hostname"), "testhost\n").expect("hostname");
    std::fs::rename(&tmp, &root).expect("root");
    std::fs::write(&stamp, want).expect("stamp");
    root
}

/// The Debian test host as the image `name`: [`debian_tree`] with hearth's CLI and daemon at
/// the paths they have here, hearth-init where an installed hearthd looks for it, and the test
/// kernel with all its modules (and depmod's indexes, so the guest's modprobe finds them).
/// Booted with `/sbin/init` (systemd); scripts run in it with `hearth exec`.
pub fn debian_test_host_image(d: &Daemon, name: &str) {
    use std::process::Command;
    let tree = debian_tree();
    let work = tempfile::tempdir().expect("tmp");
    let stage = work.path().join("root");
    run_ok(Command::new("cp").args(["-a", "--reflink=auto"]).arg(&tree).arg(&stage));
    let place = |from: &std::path::Path, to: &str, mode: u32| {
        let dest = stage.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    };
    for bin in [hearth_bin(), hearthd_bin()] {
        place(&bin, &bin.display().to_string(), 0o755);
    }
    let init = std::env::var("HEARTH_INIT").expect("HEARTH_INIT");
    place(std::path::Path::new(&init), "/usr/lib/hearth/hearth-init", 0o755);
    let kernel = std::env::var("HEARTH_TEST_KERNEL").expect("HEARTH_TEST_KERNEL");
    place(std::path::Path::new(&kernel), "/boot/vmlinuz", 0o644);
    let modules = std::path::PathBuf::from(
        std::env::var("HEARTH_TEST_MODULES").expect("HEARTH_TEST_MODULES"),
    );
    let version = modules.file_name().expect("version").to_string_lossy().into_owned();
    std::fs::create_dir_all(stage.join("lib/modules")).expect("lib/modules");
    run_ok(Command::new("cp").arg("-a").arg(&modules).arg(stage.join("lib/modules")));
    run_ok(Command::new("chroot").arg(&stage).args(["depmod", &version]));
    let tar = work.path().join("testhost.tar");
    run_ok(Command::new("tar").arg("-C").arg(&stage).arg("-cf").arg(&tar).arg("."));
    d.ok(&["image", "import", tar.to_str().expect("utf8"), "--name", name]);
}
