//! Boots the Debian cloud kernel with hearth's initramfs and hearth-init under QEMU/TCG.
//!
//! Needs the kernel unpacked at /tmp/kpkg/root (or `HEARTH_KERNEL_DIR`: a directory with
//! `boot/vmlinuz*` and `lib/modules`), `qemu-system-x86_64`, `mkfs.ext4` and /bin/busybox
//! (busybox-static); each test skips, saying why, when one is missing. hearth-init is taken from
//! `HEARTH_INIT_BIN` or built here as a static binary.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use hearth_kernel::KernelStore;
use hearth_types::agent::{
    Decoder, ExecExit, ExecRequest, Frame, Hello, Kind, Ready, PROTOCOL_VERSION,
};
use hearth_types::guest::{
    decode_record, encode_record, CONFIG_DISK_BYTES, CONFIG_MAGIC, EXIT_MAGIC, EXIT_OFFSET,
};
use hearth_types::{GuestConfig, GuestExit, GuestProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn kernel_dir() -> PathBuf {
    std::env::var_os("HEARTH_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/kpkg/root".into())
}

/// Why these tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    let dir = kernel_dir();
    if !dir.join("boot").is_dir() || !dir.join("lib/modules").is_dir() {
        return Some(format!("no kernel under {} (set HEARTH_KERNEL_DIR)", dir.display()));
    }
    for (tool, arg) in [("qemu-system-x86_64", "--version"), ("mkfs.ext4", "-V")] {
        if Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_err()
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (apt install busybox-static)".into());
    }
    None
}

/// The static hearth-init: `HEARTH_INIT_BIN`, else built with cargo (once per test binary).
fn init_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HEARTH_INIT_BIN") {
            return PathBuf::from(p);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(env!("CARGO"))
            .current_dir(&workspace)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "-p",
                "hearth-init",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .arg("--message-format=json-render-diagnostics")
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "building hearth-init failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "hearth-init")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no hearth-init executable")
    })
    .clone()
}

/// A VM's files: kernel, initramfs, root disk, config disk, agent socket.
struct Vm {
    _tmp: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    config: PathBuf,
    agent: PathBuf,
}

fn prepare(process: GuestProcess) -> Vm {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = KernelStore::open(tmp.path()).expect("store");
    let rec = store.import_rootfs(&kernel_dir(), "debian").expect("import");
    let initrd = store.initramfs("debian", &init_binary()).expect("initramfs");
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for l in ["sh", "sleep", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).expect("symlink");
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
    let disk = tmp.path().join("disk.img");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&rootfs)
        .arg(&disk)
        .arg("16M")
        .status()
        .expect("mkfs");
    assert!(st.success(), "mkfs.ext4 failed");
    let cfg = GuestConfig { version: 1, hostname: "guest".into(), process, ..Default::default() };
    let config = tmp.path().join("config.img");
    let mut bytes = encode_record(CONFIG_MAGIC, &cfg);
    bytes.resize(CONFIG_DISK_BYTES as usize, 0);
    std::fs::write(&config, bytes).expect("config");
    let agent = tmp.path().join("agent.sock");
    Vm { kernel: store.kernel_path(&rec.name), initrd, disk, config, agent, _tmp: tmp }
}

fn start(vm: &Vm) -> Child {
    start_with(vm, true)
}

fn start_with(vm: &Vm, root_disk: bool) -> Child {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
    ]);
    if Path::new("/usr/share/qemu/qboot.rom").is_file() {
        cmd.args(["-bios", "/usr/share/qemu/qboot.rom"]);
    }
    cmd.arg("-kernel")
        .arg(&vm.kernel)
        .arg("-initrd")
        .arg(&vm.initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=0 rdinit=/init panic=-1"]);
    if root_disk {
        cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio", vm.disk.display()));
    }
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", vm.config.display()))
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!("socket,id=agent,path={},server=on,wait=off", vm.agent.display()))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=hearth.agent",
            "-serial",
            "stdio",
            "-display",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("start qemu")
}

/// Waits for QEMU to exit by itself; returns the console output.
fn wait_exit(mut qemu: Child, started: Instant) -> String {
    while qemu.try_wait().expect("wait").is_none() {
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = qemu.kill();
            let out = qemu.wait_with_output().expect("output");
            panic!(
                "the guest did not power off within {BOOT_TIMEOUT:?}; console:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = qemu.wait_with_output().expect("output");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "guest powered off after {:?}; console:\n{console}\nqemu stderr: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

fn exit_record(vm: &Vm) -> GuestExit {
    let data = std::fs::read(&vm.config).expect("read config disk");
    decode_record(EXIT_MAGIC, &data[EXIT_OFFSET as usize..]).expect("exit record")
}

#[test]
fn workload_output_and_exit_code_come_back() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let vm = prepare(GuestProcess {
        args: vec![
            "sh".into(),
            "-c".into(),
            "echo hello-from-guest; echo host=$HOSTNAME home=$HOME; exit 3".into(),
        ],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    });
    let started = Instant::now();
    let console = wait_exit(start(&vm), started);
    assert!(console.contains("hello-from-guest"), "{console}");
    assert!(console.contains("host=guest home=/root"), "{console}");
    assert!(!console.contains("\r\n"), "OPOST is off, so the log has plain newlines");
    assert_eq!(exit_record(&vm), GuestExit { exit_code: 3, signal: None, error: None });
}

#[test]
fn missing_program_is_reported_as_127() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let vm = prepare(GuestProcess {
        args: vec!["no-such-tool".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    });
    let started = Instant::now();
    let console = wait_exit(start(&vm), started);
    let exit = exit_record(&vm);
    assert_eq!(exit.exit_code, 127, "{exit:?}");
    assert!(exit.error.as_deref().is_some_and(|e| e.contains("no-such-tool")), "{exit:?}");
    assert!(console.contains("no-such-tool"), "{console}");
}

#[test]
fn boot_failure_is_recorded_and_powers_off() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let vm = prepare(GuestProcess { args: vec!["sh".into()], ..Default::default() });
    let started = Instant::now();
    let console = wait_exit(start_with(&vm, false), started);
    let exit = exit_record(&vm);
    assert_eq!(exit.exit_code, 125, "{exit:?}");
    assert!(exit.error.as_deref().is_some_and(|e| e.contains("root")), "{exit:?}");
    assert!(console.contains("hearth-init: "), "{console}");
}

/// Frames from the guest, read on a thread.
fn frames(sock: UnixStream) -> mpsc::Receiver<Frame> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sock = sock;
        let mut dec = Decoder::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = sock.read(&mut buf) {
            if n == 0 {
                return;
            }
            dec.feed(&buf[..n]);
            while let Ok(Some(f)) = dec.next_frame() {
                if tx.send(f).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn expect_frame(rx: &mpsc::Receiver<Frame>, kind: Kind, stream: u32) -> Frame {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no {kind:?} frame on stream {stream}: {e}"));
        if f.kind == kind && f.stream == stream {
            return f;
        }
    }
}

#[test]
fn agent_answers_hello_ping_exec_and_shutdown() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipping: {why}");
        return;
    }
    let vm = prepare(GuestProcess {
        args: vec!["sh".into(), "-c".into(), "echo workload-up; sleep 600".into()],
        env: vec!["PATH=/bin".into(), "IMAGE_VAR=from-image".into()],
        ..Default::default()
    });
    let started = Instant::now();
    let qemu = start(&vm);
    let sock = loop {
        match UnixStream::connect(&vm.agent) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("agent socket {}: {e}", vm.agent.display()),
        }
    };
    let rx = frames(sock.try_clone().expect("clone"));
    let mut w = sock;
    let send = |w: &mut UnixStream, f: Frame| w.write_all(&f.encode()).expect("send");
    // The guest greets as soon as it sees the host connected.
    let got: Hello = expect_frame(&rx, Kind::Hello, 0).parse().expect("hello");
    assert_eq!(got.version, PROTOCOL_VERSION);
    eprintln!("guest greeted after {:?}", started.elapsed());
    // Garbage: the guest must drop it and keep serving.
    w.write_all(&[0xff; 16]).expect("garbage");
    std::thread::sleep(Duration::from_millis(500));
    send(&mut w, Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
    expect_frame(&rx, Kind::Hello, 0);
    let ready: Ready = expect_frame(&rx, Kind::Ready, 0).parse().expect("ready");
    eprintln!("guest ready after {:?}: {ready:?}", started.elapsed());
    assert!(ready.ready_ms >= ready.init_started_ms);

    send(&mut w, Frame::new(Kind::Ping, 0, b"p1".to_vec()));
    assert_eq!(expect_frame(&rx, Kind::Pong, 0).payload, b"p1");

    let req = ExecRequest {
        args: vec![
            "sh".into(),
            "-c".into(),
            "cat; echo out-$IMAGE_VAR-$X; echo err >&2; exit 7".into(),
        ],
        env: vec!["X=extra".into()],
        ..Default::default()
    };
    send(&mut w, Frame::json(Kind::Exec, 5, &req));
    send(&mut w, Frame::new(Kind::Stdin, 5, b"typed-in\n".to_vec()));
    send(&mut w, Frame::new(Kind::Stdin, 5, Vec::new()));
    let mut out = Vec::new();
    let mut err = Vec::new();
    let exit: ExecExit = loop {
        let f = rx.recv_timeout(BOOT_TIMEOUT).expect("exec frames");
        match (f.kind, f.stream) {
            (Kind::Stdout, 5) => out.extend(f.payload),
            (Kind::Stderr, 5) => err.extend(f.payload),
            (Kind::Exit, 5) => break f.parse().expect("exit"),
            _ => {}
        }
    };
    assert_eq!(String::from_utf8_lossy(&out), "typed-in\nout-from-image-extra\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(exit, ExecExit { exit_code: 7, signal: None });

    send(&mut w, Frame::new(Kind::Shutdown, 0, Vec::new()));
    let console = wait_exit(qemu, started);
    assert!(console.contains("workload-up"), "{console}");
    assert_eq!(exit_record(&vm), GuestExit { exit_code: 143, signal: Some(15), error: None });
}
