//! Harness for hearth's VM-booting end-to-end tests: an isolated hearthd per test, the CLI, a
//! local registry, and checks that nothing is left behind.
//!
//! The tests boot real guests under QEMU and need root; they run when `HEARTH_E2E=1` (as
//! `cargo xtask e2e` and CI set it) and print why they skip otherwise.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use hearth_image::testutil;
pub mod test_host;

/// Why a test cannot run here, or `None` when it can.
/// Whether KVM here can run guests (hardware virtualisation), not merely open /dev/kvm.
pub fn kvm_runs_guests() -> bool {
    hearth_vmm::accel::kvm_unusable(&hearth_vmm::accel::HostFacts::probe()).is_none()
}

pub fn skip_reason() -> Option<String> {
    if std::env::var("HEARTH_E2E").as_deref() != Ok("1") {
        return Some("HEARTH_E2E is not 1 (run `cargo xtask e2e`)".into());
    }
    // SAFETY-free check of the effective uid through id(1).
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref().ok() != Some("0") {
        return Some("the e2e tests need root (mknod, loop devices, QEMU)".into());
    }
    for bin in ["qemu-system-x86_64", "mkfs.ext4"] {
        if which(bin).is_none() {
            return Some(format!("{bin} is not installed (cargo xtask deps)"));
        }
    }
    for var in ["HEARTH_INIT", "HEARTH_TEST_KERNEL"] {
        if std::env::var_os(var).is_none() {
            return Some(format!("{var} is not set (cargo xtask e2e sets it)"));
        }
    }
    None
}

/// Skips the calling test, printing why, when the e2e environment is missing.
#[macro_export]
macro_rules! require_e2e {
    () => {
        if let Some(why) = $crate::skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(bin)).find(|p| p.is_file()))
}

/// Where the built `hearth` and `hearthd` are.
pub fn bin_dir() -> PathBuf {
    if let Some(b) = std::env::var_os("BIN") {
        return b.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug")
}

/// An isolated daemon with its own root and socket.
#[derive(Debug)]
pub struct Daemon {
    pub root: tempfile::TempDir,
    pub socket: PathBuf,
    /// Flags given to every hearthd this harness starts on the root.
    args: Vec<String>,
    /// The network namespace hearthd (and so its VMMs) runs in, when not the test's own.
    netns: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts hearthd and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`Daemon::start`], with extra hearthd flags.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_inner(args, None)
    }

    /// As [`Daemon::start`], with hearthd and its VMMs inside the network namespace `ns`.
    pub fn start_in(ns: &Netns) -> Self {
        Self::start_inner(&[], Some(ns.name.clone()))
    }

    /// As [`Daemon::start_in`], with extra hearthd flags.
    pub fn start_in_with(ns: &Netns, args: &[&str]) -> Self {
        Self::start_inner(args, Some(ns.name.clone()))
    }

    /// As [`Daemon::start`], with its root inside `dir` (a filesystem of the test's choosing).
    pub fn start_under(dir: &Path) -> Self {
        Self::start_inner_at(&[], None, dir)
    }

    fn start_inner(args: &[&str], netns: Option<String>) -> Self {
        Self::start_inner_at(args, netns, &test_tmp())
    }

    fn start_inner_at(args: &[&str], netns: Option<String>, dir: &Path) -> Self {
        let root = tempfile::Builder::new().prefix("hearth-e2e-").tempdir_in(dir).expect("tempdir");
        let socket = root.path().join("hearthd.sock");
        let mut d = Self {
            root,
            socket,
            args: args.iter().map(|a| a.to_string()).collect(),
            netns,
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts a new hearthd process on the same root (after a crash or kill).
    pub fn spawn(&mut self) {
        let started = std::time::SystemTime::now() - Duration::from_millis(50);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("hearthd.log"))
            .expect("log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_dir().join("hearthd"));
                c
            }
            None => Command::new(bin_dir().join("hearthd")),
        };
        let child = cmd
            .arg("--root")
            .arg(self.root.path())
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("HEARTH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting hearthd (build it with cargo build -p hearthd)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // This daemon's socket, not one a killed predecessor left (whose listener a child it was
        // forking may hold for a moment).
        let fresh =
            |s: &Path| std::fs::metadata(s).and_then(|m| m.modified()).is_ok_and(|t| t >= started);
        while !fresh(&self.socket) || std::os::unix::net::UnixStream::connect(&self.socket).is_err()
        {
            assert!(Instant::now() < deadline, "hearthd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon (VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// hearthd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs the CLI against this daemon.
    pub fn hearth(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running hearth")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("hearth"));
        c.arg("--host").arg(self.host()).args(args).env_remove("HEARTH_HOST");
        c
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.hearth(args);
        assert!(
            out.status.success(),
            "hearth {args:?} failed ({}):\n{}\n--- hearthd log:\n{}",
            out.status,
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("hearthd.log")).unwrap_or_default()
    }

    /// Imports the test kernel as the default.
    pub fn import_kernel(&self) {
        let k = std::env::var("HEARTH_TEST_KERNEL").expect("HEARTH_TEST_KERNEL");
        let mut args = vec!["kernel", "import", k.as_str(), "--name", "debian", "--default"];
        let m = std::env::var("HEARTH_TEST_MODULES").unwrap_or_default();
        if !m.is_empty() {
            args.extend(["--modules", m.as_str()]);
        }
        self.ok(&args);
    }

    /// Imports the test kernel and the busybox test image (under `name`), as most tests start.
    pub fn with_kernel_and_busybox(self, name: &str) -> Self {
        self.import_kernel();
        let layout = tempfile::tempdir().expect("tmp");
        let img = crate::testutil::TestImage::default();
        crate::testutil::busybox_oci_layout(layout.path(), "1", &img).expect("layout");
        self.ok(&["image", "import", layout.path().to_str().expect("utf8"), "--name", name]);
        self
    }

    /// The VM record as `inspect` prints it.
    pub fn inspect(&self, vm: &str) -> serde_json::Value {
        let out = self.ok(&["inspect", vm]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
        v[0].clone()
    }

    /// Polls `inspect` until `pred` holds or the deadline passes.
    pub fn wait_for(
        &self,
        vm: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.inspect(vm);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{vm} never became {what}: {v:#}\n--- log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes every VM (force), then stops the daemon.
    pub fn shutdown(&mut self) {
        if self.child.is_some() {
            let ids = self.hearth(&["ps", "-a", "-q"]);
            for id in text(&ids.stdout).lines() {
                let _ = self.hearth(&["rm", "-f", id]);
            }
        }
        if let Some(mut c) = self.child.take() {
            // SIGTERM: graceful shutdown.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
        // Kill any QEMU left over from this root, so a failing test cannot leak VMs.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(self.root.path().display().to_string())
            .status();
    }
}

/// A network namespace of the test's own (loopback up), removed on drop. Declare it before the
/// [`Daemon`] that runs in it, so the daemon and its VMs go first.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("hearth-e2e-{}-{n}", std::process::id());
        let ok =
            Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed");
        let ns = Self { name };
        assert!(ns.run(&["ip", "link", "set", "lo", "up"]).status.success());
        ns
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A registry (plain HTTP on loopback, no auth) serving one image, `stall:1`, whose manifest and
/// config arrive but whose layer blob stops after a few bytes, the connection left open.
#[derive(Debug)]
pub struct StallingRegistry {
    pub port: u16,
}

impl StallingRegistry {
    pub fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        use std::net::TcpListener;
        let sha = |b: &[u8]| {
            use sha2::Digest as _;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
        };
        let layer = vec![0u8; 1 << 20];
        let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [sha(&layer)]}})
            .to_string()
            .into_bytes();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}],
        })
        .to_string()
        .into_bytes();
        let (config_path, layer_path) = (
            format!("/v2/stall/blobs/{}", sha(&config)),
            format!("/v2/stall/blobs/{}", sha(&layer)),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (manifest, config, config_path, layer_path) =
                    (manifest.clone(), config.clone(), config_path.clone(), layer_path.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    let _ = reader.read_line(&mut line);
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let mut s = &stream;
                    let answer = |s: &mut &std::net::TcpStream, ct: &str, body: &[u8]| {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(body);
                    };
                    if path == "/v2/stall/manifests/1" {
                        answer(&mut s, "application/vnd.oci.image.manifest.v1+json", &manifest);
                    } else if path == config_path {
                        answer(&mut s, "application/octet-stream", &config);
                    } else if path == layer_path {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 1 << 20);
                        let _ = s.write_all(&[0u8; 4096]);
                        std::thread::sleep(Duration::from_secs(3600));
                    } else {
                        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                });
            }
        });
        Self { port }
    }

    /// The image's reference.
    pub fn image(&self) -> String {
        format!("127.0.0.1:{}/stall:1", self.port)
    }
}

/// A stand-in for a VM's VMM: a process whose command line names the VM's pid file as QEMU's
/// does (`-pidfile DIR/qemu.pid`), so hearth takes it for the VM's VMM. Its pid is written there.
pub fn fake_vmm(vm_dir: &Path) -> Child {
    let pidfile = vm_dir.join("qemu.pid");
    // One process (no child to leak when the test kills it), holding no test output open.
    let child = Command::new("perl")
        .args(["-e", "sleep 1000", "--", "-pidfile"])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perl");
    std::fs::write(&pidfile, child.id().to_string()).expect("pid file");
    child
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scratch directory on the same filesystem as the tests' roots.
pub fn test_tmp() -> PathBuf {
    let p =
        std::env::var_os("HEARTH_TEST_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&p).expect("tmp");
    p
}

/// QEMU processes whose command line mentions `needle`.
pub fn qemu_processes(needle: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-a", "-f", "qemu-system"]).output().expect("pgrep");
    text(&out.stdout).lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

/// Mounts and loop devices that mention `needle`.
pub fn mounts_and_loops(needle: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect();
    let losetup =
        Command::new("losetup").arg("-a").output().map(|o| text(&o.stdout)).unwrap_or_default();
    out.extend(losetup.lines().filter(|l| l.contains(needle)).map(str::to_owned));
    out
}

/// Whether this host's kernel has the module `name` (loaded, built in, or on disk to load).
pub fn kernel_has(name: &str) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let tree = Path::new("/lib/modules").join(release.trim());
    let file = format!("{}.ko*", name.replace('_', "-"));
    let on_disk = std::process::Command::new("find")
        .arg(&tree)
        .args(["-name", &file])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    Path::new("/sys/module").join(name).exists() || on_disk
}

/// A local registry serving the busybox test image as `demo:1`, and that image's reference
/// (the registry is stopped when dropped).
pub fn demo_registry() -> (testutil::LocalRegistry, String) {
    let reg = testutil::LocalRegistry::start().expect("registry");
    testutil::push_busybox(&reg, "demo:1", "").expect("push");
    let image = format!("{}/demo:1", reg.host());
    (reg, image)
}
