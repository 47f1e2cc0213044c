//! `cargo xtask bench`: hearth against its baselines, in one run, printed as tables.
//!
//! 1. Image preparation (pull + unpack + ext4) against `skopeo copy` + `umoci unpack` +
//!    `mkfs.ext4 -d` on the same image from the same local registry.
//! 2. Run-to-ready (`hearth run -d`, which returns when hearth-init reports ready) against the
//!    bare `qemu-system-x86_64` command booting the same kernel, initramfs and disk, timed to the
//!    same ready report on the agent socket.
//! 3. `hearth exec VM -- true` round trip, median of 100, beside `hearth ssh VM true` (OpenSSH's
//!    client to dropbear in the same VM) where dropbear-bin is installed.
//! 4. Control plane: VM creations per second through the API (intent persisted, no boot) beside
//!    the rate of a no-op RPC on the same socket; hearthd's memory per VM record; and the
//!    manager's overhead from `hearth run -d` to the VMM being spawned.
//! 5. Command to guest start under Firecracker and Cloud Hypervisor against each bare VMM
//!    configured by hand, and hearthd's memory per running VM (`bench/vmms.rs`; alone with
//!    `--vmms`).
//! 6. A VM's root disk as a thin snapshot against a sparse copy, for a small and a 1 GiB image,
//!    inside the test-host guest (`bench/thin.rs`; alone with `--thin`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::testutil::{push_image, LocalRegistry, TestImage};
use hearth_e2e::{text, Daemon};
use hearth_types::net;

#[path = "bench/thin.rs"]
mod bench_thin;
#[path = "bench/vmms.rs"]
mod bench_vmms;

/// The bare QEMU's network card.
const MAC: &str = "02:00:00:00:00:01";

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn row(name: &str, v: &mut [Duration]) -> (String, Duration) {
    let m = median(v);
    (format!("| {name} | {} | {} | {} |", ms(m), ms(v[0]), ms(v[v.len() - 1])), m)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

fn image_prep(reg: &LocalRegistry, runs: usize) {
    let image = format!("{}/bench:1", reg.host());
    let work = tempfile::tempdir().expect("tmp");
    let (mut hearth, mut base) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let root = work.path().join(format!("hearth-{i}"));
        let t = Instant::now();
        let store = hearth_image::ImageStore::open(&root).expect("store");
        let rec = store
            .pull(
                &image.parse().expect("ref"),
                &hearth_image::PullOptions::default(),
                &hearth_image::NoProgress,
            )
            .expect("pull");
        store.rootfs(&rec).expect("rootfs");
        hearth.push(t.elapsed());

        let dir = work.path().join(format!("base-{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:t", dir.join("oci").display())));
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:t", dir.join("oci").display()))
            .arg(dir.join("bundle")));
        let rootfs = dir.join("bundle/rootfs");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&rootfs)
            .arg(dir.join("root.ext4"))
            .arg("256M"));
        base.push(t.elapsed());
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("\n### Image preparation: pull + unpack + ext4 (busybox + 64 MiB payload, local registry, {runs} runs)\n");
    println!("| pipeline | median | min | max |\n|---|---|---|---|");
    let (a, ma) = row("hearth (pull, unpack, mkfs.ext4 -d)", &mut hearth);
    let (b, mb) = row("skopeo copy + umoci unpack + mkfs.ext4 -d", &mut base);
    println!("{a}\n{b}");
    println!(
        "\nhearth takes {:.0}% of the baseline's time.",
        100.0 * ma.as_secs_f64() / mb.as_secs_f64()
    );
}

/// Waits on an agent socket for hearth-init's Ready with the same client hearthd uses.
fn wait_ready(sock: &Path, deadline: Instant) -> bool {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return false;
    };
    rt.block_on(async {
        let agent = loop {
            match hearth_vmm::agent::AgentClient::connect(sock).await {
                Ok(a) => break a,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(_) => return false,
            }
        };
        agent.wait_ready(tokio::time::Instant::from_std(deadline)).await.is_ok()
    })
}

/// One bare QEMU started on a copy of hearth's own kernel, initramfs and base disk, timed from
/// its spawn to hearth-init's ready report.
fn bare_once(work: &Path, i: usize, kernel: &Path, initrd: &Path, base_img: &Path) -> Duration {
    let vm_dir = work.join(format!("bare-{i}"));
    std::fs::create_dir_all(&vm_dir).expect("mkdir");
    let disk = vm_dir.join("disk.img");
    run(Command::new("cp").arg("--sparse=always").arg(base_img).arg(&disk));
    let cfg = hearth_types::GuestConfig {
        version: 1,
        hostname: "bare".into(),
        process: hearth_types::GuestProcess {
            args: vec!["sleep".into(), "100000".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        // The same network hearth gives its VMs, so both sides configure the same card.
        network: Some(hearth_types::GuestNetwork {
            mac: MAC.into(),
            address: net::USER_NET_ADDRESS.into(),
            prefix: net::USER_NET_PREFIX,
            gateway: net::USER_NET_GATEWAY.into(),
            dns: vec![net::USER_NET_DNS.into()],
        }),
        ..Default::default()
    };
    hearth_storage::create_config_disk(&vm_dir.join("config.img"), &cfg).expect("config disk");
    let spec = hearth_vmm::LaunchSpec {
        vm_dir: vm_dir.clone(),
        kernel: kernel.to_owned(),
        initrd: initrd.to_owned(),
        cmdline: String::new(),
        root_disk: disk,
        config_disk: vm_dir.join("config.img"),
        cpus: 1,
        memory_mib: 512,
        accel: hearth_types::Accel::Tcg,
        binary: None,
        networks: vec![hearth_vmm::NetLaunch { mac: MAC.into(), ..Default::default() }],
        volumes: vec![],
        confinement: Default::default(),
        cloud_init: Default::default(),
        incoming: None,
    };
    let bios = Path::new(hearth_vmm::qemu::QBOOT);
    // The same command line, unconfined and not paused (nobody captures its console here).
    let mut args = hearth_vmm::qemu::qemu_args(
        &spec,
        hearth_types::Accel::Tcg,
        bios.exists().then_some(bios),
        Default::default(),
    );
    args.retain(|a| a != "-S");
    let log = std::fs::File::create(vm_dir.join("qemu.stderr")).expect("log");
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("qemu");
    if !wait_ready(&vm_dir.join("agent.sock"), Instant::now() + Duration::from_secs(120)) {
        let said = std::fs::read_to_string(vm_dir.join("qemu.stderr")).unwrap_or_default();
        panic!("bare qemu never became ready: {said}\n{args:?}");
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

/// Run to ready: `hearth run -d` (a cold boot), the bare QEMU command on the same files, and
/// `hearth run -d --snapshot` (a restore), interleaved run by run so that whatever the machine
/// does meanwhile falls on all three alike.
fn run_to_ready(reg: &LocalRegistry, runs: usize) -> Daemon {
    let image = format!("{}/demo:1", reg.host());
    let d = Daemon::start();
    d.import_kernel();
    d.ok(&["image", "pull", &image]);
    // Warm the caches both sides use (base ext4, initramfs).
    d.ok(&["run", "--rm", &image, "true"]);
    // The snapshot the restores start from: a VM as `hearth run -d` leaves it, ready.
    d.ok(&["run", "-d", "--name", "warm", &image, "sleep", "100000"]);
    d.ok(&["snapshot", "create", "warm", "bench-warm"]);
    d.ok(&["rm", "-f", "warm"]);
    let kernel = d.root.path().join("kernels/debian/kernel");
    let (initrd, base_img) = built_files(d.root.path());
    let work = tempfile::tempdir().expect("tmp");
    let (mut hearth, mut bare, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    let timed = |args: &[&str]| {
        let t = Instant::now();
        d.ok(args);
        t.elapsed()
    };
    for i in 0..runs {
        let (cold, warm) = (format!("bench{i}"), format!("restored{i}"));
        hearth.push(timed(&["run", "-d", "--name", &cold, &image, "sleep", "100000"]));
        d.ok(&["rm", "-f", &cold]);
        bare.push(bare_once(work.path(), i, &kernel, &initrd, &base_img));
        restore.push(timed(&["run", "-d", "--snapshot", "bench-warm", "--name", &warm]));
        d.ok(&["rm", "-f", &warm]);
    }
    d.ok(&["snapshot", "rm", "bench-warm"]);
    println!("\n### Run to ready under QEMU/TCG ({runs} runs each, interleaved; same kernel, initramfs, disk)\n");
    println!("| command | median | min | max |\n|---|---|---|---|");
    let (a, ma) =
        row("hearth run -d (CLI → daemon → disk clone → QEMU → boot → ready)", &mut hearth);
    let (b, mb) = row("bare qemu-system-x86_64 → boot → ready", &mut bare);
    let (c, mc) = row(
        "hearth run -d --snapshot (CLI → daemon → disk copy → QEMU → restore → ready)",
        &mut restore,
    );
    println!("{a}\n{b}\n{c}");
    println!(
        "\nhearth's overhead over bare QEMU: {:+.1}%; a restore takes {:.0}% of hearth's cold boot.",
        100.0 * (ma.as_secs_f64() / mb.as_secs_f64() - 1.0),
        100.0 * mc.as_secs_f64() / ma.as_secs_f64()
    );
    d
}

fn exec_latency(d: &Daemon, reg: &LocalRegistry, n: usize) {
    // One VM serves both rows: dropbear runs in it when installed, so ssh and exec are timed
    // against the same guest in the same run.
    let dropbear = Path::new("/usr/sbin/dropbear");
    let ssh = dropbear.is_file() && hearth_e2e::which("ssh").is_some();
    if ssh {
        let img = TestImage { host_binaries: vec![dropbear.to_path_buf()], ..Default::default() };
        push_image(reg, "sshd:1", &img).expect("push sshd image");
        let image = format!("{}/sshd:1", reg.host());
        d.ok(&[
            "run",
            "-d",
            "--ssh",
            "--name",
            "execbench",
            &image,
            "/usr/sbin/dropbear",
            "-F",
            "-E",
            "-R",
            "-p",
            "22",
        ]);
        // dropbear generates its host key on the first connection.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !d.hearth(&["ssh", "execbench", "true"]).status.success() {
            assert!(Instant::now() < deadline, "ssh into the bench VM never worked");
            std::thread::sleep(Duration::from_millis(500));
        }
    } else {
        let image = format!("{}/demo:1", reg.host());
        d.ok(&["run", "-d", "--name", "execbench", &image, "sleep", "100000"]);
    }
    let time = |args: &[&str], runs: usize| -> Vec<Duration> {
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                d.ok(args);
                t.elapsed()
            })
            .collect()
    };
    let mut exec = time(&["exec", "execbench", "--", "true"], n);
    let mut version = time(&["version"], n.min(20));
    println!("\n### exec round trip ({n} runs, guest under TCG)\n");
    println!("| command | median | min | max |\n|---|---|---|---|");
    let (row_exec, m_exec) = row("hearth exec VM -- true", &mut exec);
    println!("{row_exec}");
    if ssh {
        let mut over_ssh = time(&["ssh", "execbench", "true"], n);
        let (row_ssh, m_ssh) =
            row("hearth ssh VM true (OpenSSH client → dropbear in the guest)", &mut over_ssh);
        println!("{row_ssh}");
        println!("{}", row("hearth version (CLI + one RPC, no guest)", &mut version).0);
        println!(
            "\nexec is {:.1}× faster than ssh on the same VM.",
            m_ssh.as_secs_f64() / m_exec.as_secs_f64()
        );
    } else {
        println!("{}", row("hearth version (CLI + one RPC, no guest)", &mut version).0);
        println!("| hearth ssh VM true | skipped: install dropbear-bin and openssh-client (cargo xtask deps) | | |");
    }
    d.ok(&["rm", "-f", "execbench"]);
}

/// hearthd's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

const CONCURRENCY: usize = 8;

/// `creates` CreateVm calls (named `PREFIX-w-i`) from CONCURRENCY clients sharing `channel`, per
/// second; with `noop`, as many Version calls instead.
fn api_rate(
    rt: &tokio::runtime::Runtime,
    channel: &tonic::transport::Channel,
    image: &str,
    prefix: &str,
    creates: usize,
    noop: bool,
) -> f64 {
    use hearth_api::v1::{self as pb, hearth_client::HearthClient};
    let per = creates / CONCURRENCY;
    let t = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|w| {
                let (mut c, image, prefix) =
                    (HearthClient::new(channel.clone()), image.to_owned(), prefix.to_owned());
                tokio::spawn(async move {
                    for i in 0..per {
                        if noop {
                            c.version(pb::Empty {}).await.expect("version");
                            continue;
                        }
                        let req = pb::CreateVmRequest {
                            name: format!("{prefix}-{w}-{i}"),
                            image: image.clone(),
                            cpus: 1,
                            memory_mib: 512,
                            disk_bytes: 4 << 30,
                            ..Default::default()
                        };
                        c.create_vm(req).await.expect("create");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
    });
    (per * CONCURRENCY) as f64 / t.elapsed().as_secs_f64()
}

/// Creations per second on a daemon that already holds `existing` VM records (written beside
/// one real record while the daemon is down, then loaded at its start).
fn creation_rate_with(image: &str, existing: usize, creates: usize) -> f64 {
    let mut d = Daemon::start();
    d.import_kernel();
    d.ok(&["image", "pull", image]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let channel = rt.block_on(hearth_api::connect_unix(d.socket.clone())).expect("socket");
    api_rate(&rt, &channel, image, "seed", CONCURRENCY, false);
    let vms = d.root.path().join("vms");
    let seed_dir =
        std::fs::read_dir(&vms).expect("vms").flatten().next().expect("a seed VM").path();
    let seed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seed_dir.join("record.json")).expect("seed"))
            .expect("json");
    d.kill9();
    for i in 0..existing.saturating_sub(CONCURRENCY) {
        let id = format!("{:016x}", 0xbe00_0000_0000_0000u64 + i as u64);
        let mut r = seed.clone();
        r["spec"]["id"] = id.clone().into();
        r["spec"]["name"] = format!("old-{i}").into();
        let dir = vms.join(&id);
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("record.json"), serde_json::to_vec(&r).expect("json"))
            .expect("record");
    }
    d.spawn();
    let channel = rt.block_on(hearth_api::connect_unix(d.socket.clone())).expect("socket");
    // Served once start-up recovery has been through every record.
    api_rate(&rt, &channel, image, "", CONCURRENCY, true);
    api_rate(&rt, &channel, image, "new", creates, false)
}

fn control_plane(d: &Daemon, image: &str, creates: usize, runs: usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let channel = rt.block_on(hearth_api::connect_unix(d.socket.clone())).expect("socket");
    let pid = d.pid().expect("hearthd pid");
    let per = creates / CONCURRENCY;
    let noop = api_rate(&rt, &channel, image, "", creates, true);
    let before = rss_bytes(pid);
    let created = api_rate(&rt, &channel, image, "cp", creates, false);
    let after = rss_bytes(pid);
    let per_vm = after.saturating_sub(before) as f64 / (per * CONCURRENCY) as f64;
    // Manager overhead: from the command's start to the VMM spawned (the record's started_at).
    let mut overhead = Vec::new();
    for i in 0..runs {
        let name = format!("ovh{i}");
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        d.ok(&["run", "-d", "--no-wait", "--name", &name, image, "sleep", "100000"]);
        let started = d.inspect(&name)["status"]["started_at"].as_u64().expect("started_at");
        overhead.push(Duration::from_millis(started.saturating_sub(t0)));
        d.ok(&["rm", "-f", &name]);
    }
    println!("\n### Control plane ({} creations from {CONCURRENCY} clients over the Unix socket; no guest boots)\n", per * CONCURRENCY);
    println!("| measure | hearth | baseline / target |\n|---|---|---|");
    println!("| VM creations per second (CreateVm: validate, name, persist) | {created:.0}/s | no-op RPC on the same socket: {noop:.0}/s; target 150/s |");
    let (small, large) =
        (creation_rate_with(image, 10, 200), creation_rate_with(image, 10_000, 200));
    println!("| VM creations per second with 10,000 VMs already on the host | {large:.0}/s | the same daemon with 10 VMs: {small:.0}/s |");
    println!(
        "| hearthd memory per created VM (RSS growth / VMs) | {:.1} KiB | target < 1024 KiB |",
        per_vm / 1024.0
    );
    println!(
        "| `hearth run -d` command start to VMM spawn, cached image (median of {runs}) | {} | target < 50 ms |",
        ms(median(&mut overhead))
    );
    println!(
        "\nhearthd's resident memory: {:.1} MiB before the creations, {:.1} MiB after.",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    let ids = d.ok(&["ps", "-a", "-q"]);
    let ids: Vec<&str> = ids.lines().collect();
    for chunk in ids.chunks(50) {
        d.ok(&[&["rm", "-f"][..], chunk].concat());
    }
}

/// The initramfs and base ext4 a daemon on `root` built (for the bare baselines to boot).
fn built_files(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let initrd = std::fs::read_dir(root.join("kernels/debian"))
        .expect("kernel dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("initramfs-"))
        .expect("initramfs");
    let base = std::fs::read_dir(root.join("images/rootfs"))
        .expect("rootfs dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ext4"))
        .expect("base ext4");
    (initrd, base)
}

fn main() {
    if let Some(why) = hearth_e2e::skip_reason().filter(|w| !w.contains("HEARTH_E2E")) {
        eprintln!("hearth-bench: {why}");
        std::process::exit(2);
    }
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let reg = LocalRegistry::start().expect("docker-registry");
    push_image(&reg, "bench:1", &TestImage { payload_bytes: 64 << 20, ..Default::default() })
        .expect("push bench image");
    push_image(&reg, "demo:1", &TestImage::default()).expect("push demo image");
    println!(
        "## hearth benchmarks ({})",
        Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d")
            .output()
            .map(|o| text(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    );
    let demo = format!("{}/demo:1", reg.host());
    if std::env::args().any(|a| a == "--vmms") {
        // Only the KVM-only VMMs' start.
        let d = Daemon::start();
        d.import_kernel();
        d.ok(&["image", "pull", &demo]);
        let pid = d.pid().expect("hearthd pid");
        bench_vmms::vmm_start(&d, &demo, runs, || rss_bytes(pid));
        return;
    }
    if std::env::args().any(|a| a == "--thin") {
        // Only VM disks on the thin pool against copies, inside the test-host guest.
        let d = Daemon::start();
        d.import_kernel();
        bench_thin::thin_vs_copy(&d, runs);
        return;
    }
    if std::env::args().any(|a| a == "--ready") {
        // Only run to ready: cold boots, the bare command, restores.
        run_to_ready(&reg, runs);
        return;
    }
    if std::env::args().any(|a| a == "--control-plane") {
        // Only the control plane (a quick check of creation rates).
        let d = Daemon::start();
        d.import_kernel();
        d.ok(&["image", "pull", &demo]);
        control_plane(&d, &demo, 400, runs);
        return;
    }
    image_prep(&reg, runs);
    let d = run_to_ready(&reg, runs);
    exec_latency(&d, &reg, 100);
    control_plane(&d, &demo, 400, runs);
    let pid = d.pid().expect("hearthd pid");
    bench_vmms::vmm_start(&d, &demo, runs, || rss_bytes(pid));
    bench_thin::thin_vs_copy(&d, runs);
}
