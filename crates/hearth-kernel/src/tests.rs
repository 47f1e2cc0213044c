use super::*;

fn fake_kernel(dir: &Path) -> PathBuf {
    let mut b = b"\x7fELF".to_vec();
    b.extend_from_slice(b"\0Linux version 6.9.9-fake (x) #1\0");
    let p = dir.join("vmlinux");
    fs::write(&p, b).expect("write");
    p
}

#[test]
fn import_list_default_remove() {
    let root = tempfile::tempdir().expect("tmp");
    let src = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let k = fake_kernel(src.path());
    let rec = s.import(&k, None, "fake").expect("import");
    assert_eq!((rec.version.as_str(), rec.format.as_str()), ("6.9.9-fake", "elf"));
    assert_eq!((rec.pvh, rec.compression.as_deref()), (Some(false), None), "read at import");
    assert_eq!(rec.format_detail(), "elf (no pvh)");
    assert_eq!(s.default_name().expect("default").as_deref(), Some("fake"));
    assert!(matches!(s.import(&k, None, "fake"), Err(KernelError::Exists(_))));
    assert_eq!(s.list().expect("list").len(), 1);
    let init = src.path().join("init");
    fs::write(&init, b"binary").expect("write");
    let img = s.initramfs("fake", &init).expect("initramfs");
    assert!(img.exists());
    s.remove("fake").expect("rm");
    assert!(s.list().expect("list").is_empty());
    assert_eq!(s.default_name().expect("default"), None);
}

#[test]
fn sweep_removes_import_staging_temporaries_and_recordless_kernels() {
    let root = tempfile::tempdir().expect("tmp");
    let src = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    s.import(&fake_kernel(src.path()), None, "kept").expect("import");
    let dir = root.path().join("kernels");
    fs::create_dir_all(dir.join(".half.123.importing/modules")).expect("staging");
    fs::create_dir_all(dir.join("removed-halfway/modules")).expect("recordless");
    fs::write(dir.join(".default.9.1.tmp"), b"x").expect("tmp");
    fs::write(dir.join("kept/.initramfs-ab.img.9.2.tmp"), b"x").expect("tmp");
    assert_eq!(s.sweep().expect("sweep").len(), 4);
    assert_eq!(s.list().expect("list").len(), 1);
    let mut left: Vec<_> =
        fs::read_dir(&dir).expect("dir").map(|e| e.expect("e").file_name()).collect();
    left.sort();
    assert_eq!(left, [".default", "kept"]);
    assert_eq!(fs::read_dir(dir.join("kept")).expect("kept").count(), 2, "kernel and record stay");
}

/// Every file under `dir` (links not followed) whose content holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        let ft = e.file_type().expect("type");
        if ft.is_dir() {
            out.extend(files_holding(&p, needle));
        } else if ft.is_file()
            && fs::read(&p).expect("read").windows(needle.len()).any(|w| w == needle)
        {
            out.push(p);
        }
    }
    out
}

#[test]
fn links_in_a_kernel_image_never_bring_host_files_into_the_store() {
    let host = tempfile::tempdir().expect("tmp");
    let secret = host.path().join("shadow");
    fs::write(&secret, b"root:HOST-SECRET-HASH:19000::::::").expect("secret");
    let img = host.path().join("image");
    let tree = img.join("lib/modules/6.9.9-fake");
    fs::create_dir_all(tree.join("kernel/drivers")).expect("mkdir");
    fs::create_dir_all(img.join("boot")).expect("mkdir");
    let k = fake_kernel(&img.join("boot"));
    assert_eq!(k, img.join("boot/vmlinux"));
    fs::write(
        tree.join("kernel/drivers/virtio_blk.ko"),
        modules::tests::fake_ko(&["vermagic=6.9.9-fake SMP"]),
    )
    .expect("ko");
    // Links out of the image, absolute and climbing, to the host's secret...
    std::os::unix::fs::symlink(&secret, tree.join("kernel/drivers/virtio_net.ko")).expect("link");
    std::os::unix::fs::symlink("../../../../../shadow", tree.join("kernel/drivers/virtio_pci.ko"))
        .expect("link");
    std::os::unix::fs::symlink(&secret, tree.join("modules.dep")).expect("link");
    // ...and one inside it, which is kept as a copy of what it names.
    std::os::unix::fs::symlink("drivers/virtio_blk.ko", tree.join("kernel/virtio_console.ko"))
        .expect("link");
    let root = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let rec = s.import_rootfs(&img, "pulled").expect("import");
    assert_eq!(rec.modules, 2, "the module and the in-image link: {rec:?}");
    let init = host.path().join("init");
    fs::write(&init, b"INIT").expect("init");
    let initramfs = s.initramfs("pulled", &init).expect("initramfs");
    assert!(files_holding(root.path(), b"HOST-SECRET").is_empty(), "a host file reached the store");
    assert!(!fs::read(&initramfs).expect("read").windows(11).any(|w| w == b"HOST-SECRET"));
    let copied = s.kdir("pulled").join("modules/6.9.9-fake/kernel/virtio_console.ko");
    assert!(fs::symlink_metadata(&copied).expect("copied").is_file(), "links become plain files");

    // A kernel that is only a link out of the image is no kernel.
    let bad = host.path().join("bad");
    fs::create_dir_all(bad.join("boot")).expect("mkdir");
    std::os::unix::fs::symlink(&k, bad.join("boot/vmlinux")).expect("link");
    assert!(matches!(s.import_rootfs(&bad, "bad"), Err(KernelError::NoKernelInImage { .. })));
    assert!(matches!(
        s.import_image_file(&bad, "boot/vmlinux", "bad"),
        Err(KernelError::NoKernelFile { .. })
    ));
    // lib/modules pointing at the host's own modules is not followed either.
    fs::create_dir_all(bad.join("lib")).expect("mkdir");
    std::os::unix::fs::symlink(img.join("lib/modules"), bad.join("lib/modules")).expect("link");
    fs::copy(&k, bad.join("boot/real")).expect("copy");
    let rec = s.import_image_file(&bad, "boot/real", "bad").expect("kernel without modules");
    assert_eq!(rec.modules, 0);
}

#[test]
fn a_module_of_another_kernel_is_refused_from_the_initramfs() {
    let src = tempfile::tempdir().expect("tmp");
    let k = fake_kernel(src.path());
    let tree = src.path().join("6.9.9-fake");
    fs::create_dir_all(&tree).expect("mkdir");
    fs::write(tree.join("virtio_blk.ko"), modules::tests::fake_ko(&["vermagic=6.9.9-fake SMP"]))
        .expect("ko");
    fs::write(tree.join("virtio_net.ko"), modules::tests::fake_ko(&["vermagic=5.10.0 SMP"]))
        .expect("ko");
    let root = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    s.import(&k, Some(&tree), "mixed").expect("import");
    let init = src.path().join("init");
    fs::write(&init, b"INIT").expect("init");
    let e = s.initramfs("mixed", &init).expect_err("wrong vermagic");
    assert!(e.to_string().contains("virtio_net.ko") && e.to_string().contains("5.10.0"), "{e}");
    fs::write(s.kdir("mixed").join("modules/6.9.9-fake/virtio_net.ko"), b"not an ELF")
        .expect("write");
    assert!(matches!(
        s.initramfs("mixed", &init),
        Err(KernelError::Initramfs(InitramfsError::Modules(ModuleError::BadElf(_))))
    ));
}

#[test]
fn not_a_kernel_is_named() {
    let root = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let p = root.path().join("junk");
    fs::write(&p, b"junk").expect("write");
    let e = s.import(&p, None, "x").expect_err("junk");
    assert!(e.to_string().contains("neither an ELF vmlinux nor a bzImage"), "{e}");
    assert!(s.list().expect("list").is_empty());
}

#[test]
fn module_trees_are_found_in_every_accepted_shape() {
    let src = tempfile::tempdir().expect("tmp");
    let k = fake_kernel(src.path());
    let tree = src.path().join("root/lib/modules/6.9.9-fake/kernel");
    fs::create_dir_all(&tree).expect("mkdir");
    fs::write(tree.join("virtio.ko"), modules::tests::fake_ko(&["vermagic=6.9.9-fake SMP"]))
        .expect("write");
    let other = src.path().join("root/lib/modules/5.0.0/kernel");
    fs::create_dir_all(&other).expect("mkdir");
    fs::write(other.join("virtio.ko"), modules::tests::fake_ko(&["vermagic=5.0.0 SMP"]))
        .expect("write");
    let root = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    for (i, m) in ["root", "root/lib/modules", "root/lib/modules/6.9.9-fake"].iter().enumerate() {
        let rec = s.import(&k, Some(&src.path().join(m)), &format!("k{i}")).expect(m);
        assert_eq!(rec.modules, 1, "{m}");
        assert!(s.kdir(&rec.name).join("modules/6.9.9-fake/kernel/virtio.ko").is_file());
    }
    let e = s
        .import(&k, Some(&src.path().join("root/lib/modules/5.0.0")), "wrong")
        .expect_err("wrong version");
    assert!(matches!(e, KernelError::WrongModules { .. }), "{e}");
    fs::create_dir_all(src.path().join("empty")).expect("mkdir");
    let e = s.import(&k, Some(&src.path().join("empty")), "none").expect_err("no modules");
    assert!(matches!(e, KernelError::NoModules { .. }), "{e}");
    assert!(matches!(s.import(&k, None, "../escape"), Err(KernelError::Name(_))));
    assert_eq!(s.default_name().expect("default").as_deref(), Some("k0"));
    s.set_default("k2").expect("set default");
    assert_eq!(s.default_name().expect("default").as_deref(), Some("k2"));
    assert!(matches!(s.set_default("ghost"), Err(KernelError::NotFound(_))));
}

/// What the store shares with a VMM's jail is readable by all (inside the private state
/// directory), so the jail links it: a kernel others may read is linked as it is, one they may
/// not is copied (its own mode left alone); the initramfs and the vmlinux follow.
#[test]
fn kernels_and_their_boot_files_are_stored_readable_for_vmm_jails() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().expect("tmp");
    let src = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let k = fake_kernel(src.path());
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    fs::set_permissions(&k, fs::Permissions::from_mode(0o600)).expect("chmod");
    s.import(&k, None, "private").expect("import");
    let stored = s.kernel_path("private");
    assert_eq!((mode(&stored), mode(&k)), (0o644, 0o600), "a copy, the user's file untouched");
    assert_ne!(fs::metadata(&stored).expect("stat").ino(), fs::metadata(&k).expect("stat").ino());
    fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).expect("chmod");
    s.import(&k, None, "public").expect("import");
    let linked = s.kernel_path("public");
    assert_eq!(fs::metadata(&linked).expect("stat").ino(), fs::metadata(&k).expect("stat").ino());
    let init = src.path().join("init");
    fs::write(&init, b"binary").expect("write");
    assert_eq!(mode(&s.initramfs("private", &init).expect("initramfs")), 0o644);
}

#[test]
fn ignite_style_image_imports_when_the_debian_kernel_is_present() {
    let Some(dir) = std::env::var_os("HEARTH_KERNEL_DIR").map(PathBuf::from) else {
        eprintln!("skipped: HEARTH_KERNEL_DIR is not set (cargo xtask kernel fetches one)");
        return;
    };
    let version = fs::read_dir(dir.join("lib/modules"))
        .expect("modules")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a module tree");
    let root = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let rec = s.import_rootfs(&dir, "debian").expect("import");
    assert_eq!((rec.version.as_str(), rec.format.as_str()), (version.as_str(), "bzimage"));
    let method = rec.compression.clone().expect("its payload's compression, read at import");
    assert_eq!(rec.format_detail(), format!("bzimage ({method})"));
    assert!(rec.modules > 100, "{rec:?}");
    assert_eq!(rec.id.hex(), sha256_file(&s.kernel_path("debian")).expect("hash"));
    let init = root.path().join("init");
    fs::write(&init, b"init").expect("write");
    let img = s.initramfs("debian", &init).expect("initramfs");
    assert_eq!(s.initramfs("debian", &init).expect("cached"), img);
    let list = cpio::tests::parse(&fs::read(&img).expect("read"))
        .into_iter()
        .find(|e| e.0 == initramfs::MODULE_LIST)
        .expect("module list");
    let list = String::from_utf8(list.3).expect("utf8");
    assert!(list.lines().any(|l| l.ends_with("/virtio_blk.ko")), "{list}");
    fs::write(&init, b"another init").expect("write");
    let img2 = s.initramfs("debian", &init).expect("rebuilt");
    assert_ne!(img, img2);
    assert!(!img.exists(), "the stale image is removed");
}

#[test]
fn a_kernel_named_by_its_image_reference_is_stored_listed_and_removed_under_it() {
    let root = tempfile::tempdir().expect("tmp");
    let src = tempfile::tempdir().expect("tmp");
    let s = KernelStore::open(root.path()).expect("open");
    let k = fake_kernel(src.path());
    let (a, b) = ("weaveworks/ignite-kernel:5.10.51", "weaveworks/ignite-kernel:5.10.52");
    s.import(&k, None, a).expect("import a");
    s.import(&k, None, b).expect("import b");
    assert_eq!(s.get(a).expect("get").map(|r| r.name).as_deref(), Some(a));
    let mut names: Vec<String> = s.list().expect("list").into_iter().map(|r| r.name).collect();
    names.sort();
    assert_eq!(names, [a, b], "two references, two kernels");
    assert!(s.kernel_path(a).starts_with(root.path().join("kernels")), "inside the store");
    assert_ne!(s.kernel_path(a), s.kernel_path(b));
    // Only the familiar form names it; anything else is no name at all.
    for not in ["docker.io/weaveworks/ignite-kernel:5.10.51", "../x:1", "a/../../b:1"] {
        assert!(matches!(s.import(&k, None, not), Err(KernelError::Name(_))), "{not}");
        assert_eq!(s.get(not).expect("get"), None);
    }
    s.remove(a).expect("rm");
    assert_eq!(s.get(a).expect("get"), None);
    assert!(s.get(b).expect("get").is_some());
}
