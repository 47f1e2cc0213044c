//! Boots the Debian cloud kernel with hearth's initramfs and hearth-init under QEMU/TCG, and
//! checks the workload's output and exit code. Skips (saying why) without the kernel, QEMU or
//! the static hearth-init (`cargo xtask init`; HEARTH_INIT points at it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_kernel::KernelStore;
use hearth_types::guest::{decode_record, encode_record, CONFIG_DISK_BYTES, CONFIG_MAGIC, EXIT_MAGIC, EXIT_OFFSET};
use hearth_types::{GuestConfig, GuestExit, GuestProcess};

fn kernel() -> Option<(PathBuf, PathBuf)> {
    let k = std::env::var_os("HEARTH_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/kpkg/root/boot/vmlinuz-6.1.0-56-cloud-amd64".into());
    let m = std::env::var_os("HEARTH_TEST_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/kpkg/root/lib/modules/6.1.0-56-cloud-amd64".into());
    (k.exists() && m.exists()).then_some((k, m))
}

fn init_binary() -> Option<PathBuf> {
    let p = std::env::var_os("HEARTH_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/x86_64-unknown-linux-gnu/release/hearth-init"));
    p.exists().then_some(p)
}

#[test]
fn debian_kernel_boots_hearth_init_and_reports_the_exit_code() {
    let (Some((kernel, modules)), Some(init)) = (kernel(), init_binary()) else {
        eprintln!("skipping: needs the Debian kernel (cargo xtask kernel) and hearth-init (cargo xtask init)");
        return;
    };
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() || Command::new("mkfs.ext4").arg("-V").output().is_err() {
        eprintln!("skipping: qemu-system-x86_64 or mkfs.ext4 is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let store = KernelStore::open(tmp.path()).expect("store");
    store.import(&kernel, Some(&modules), "debian").expect("import");
    let initrd = store.initramfs("debian", &init).expect("initramfs");

    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox (apt install busybox-static)");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink");
    let disk = tmp.path().join("disk.img");
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&rootfs).arg(&disk).arg("32M").status().expect("mkfs");
    assert!(st.success());
    let cfg = GuestConfig {
        version: 1,
        hostname: "t".into(),
        process: GuestProcess {
            args: vec!["sh".into(), "-c".into(), "echo hello-from-guest; exit 3".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let config = tmp.path().join("config.img");
    let mut bytes = encode_record(CONFIG_MAGIC, &cfg);
    bytes.resize(CONFIG_DISK_BYTES as usize, 0);
    std::fs::write(&config, bytes).expect("config");

    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1", "-nographic", "-nodefaults", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=0 rdinit=/init panic=-1"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", config.display()))
        .args(["-serial", "stdio"])
        .args(std::env::var("EXTRA_QEMU").map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap_or_default())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu");
    let deadline = started + Duration::from_secs(120);
    while qemu.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = qemu.kill();
            panic!("the guest did not power off within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = qemu.wait_with_output().expect("output");
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!("guest ran for {:?}; console:\n{console}", started.elapsed());
    assert!(console.contains("hello-from-guest"), "console: {console}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    let data = std::fs::read(&config).expect("read");
    let exit: GuestExit = decode_record(EXIT_MAGIC, &data[EXIT_OFFSET as usize..]).expect("exit record");
    assert_eq!(exit.exit_code, 3);
}
