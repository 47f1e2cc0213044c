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
