//! Section 5 of `cargo xtask bench`: from the command to the guest's start under each KVM-only
//! VMM (`hearth run -d --no-wait`, which returns once the VMM is configured and its guest
//! started) against the same VMM started and configured by hand through its API with the same
//! configuration (the calls hearth-vmm's config builds), and hearthd's memory per running VM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::Daemon;
use hearth_vmm::http::Api;

/// The files of a bare VM: a copy of the image's base ext4 and a config disk.
fn bare_vm(d: &Daemon, dir: &Path, vmm: &str) -> hearth_vmm::LaunchSpec {
    std::fs::create_dir_all(dir).expect("mkdir");
    let kdir = d.root.path().join("kernels/debian");
    let (initrd, base) = super::built_files(d.root.path());
    let disk = dir.join("disk.img");
    let copied = Command::new("cp").arg("--sparse=always").arg(&base).arg(&disk).status();
    assert!(copied.is_ok_and(|s| s.success()), "cp");
    let cfg =
        hearth_types::GuestConfig { version: 1, hostname: "bare".into(), ..Default::default() };
    hearth_storage::create_config_disk(&dir.join("config.img"), &cfg).expect("config disk");
    // Firecracker boots the ELF hearth took out of the bzImage; Cloud Hypervisor the bzImage.
    let kernel = if vmm == "firecracker" { "vmlinux" } else { "kernel" };
    hearth_vmm::LaunchSpec {
        vm_dir: dir.to_owned(),
        kernel: kdir.join(kernel),
        initrd,
        cmdline: String::new(),
        root_disk: disk,
        config_disk: dir.join("config.img"),
        cpus: 1,
        memory_mib: 512,
        accel: hearth_types::Accel::Kvm,
        binary: None,
        networks: vec![],
        volumes: vec![],
        confinement: Default::default(),
        cloud_init: Default::default(),
        incoming: None,
    }
}

/// Starts `vmm` by hand for `spec`, configures it through its API and starts the guest: the time
/// that takes. The process is killed after.
fn bare_start(vmm: &str, spec: &hearth_vmm::LaunchSpec) -> Duration {
    let dir = &spec.vm_dir;
    let (flag, sock): (&str, PathBuf) = match vmm {
        "firecracker" => ("--api-sock", dir.join(hearth_vmm::firecracker::API_SOCK)),
        _ => ("--api-socket", dir.join(hearth_vmm::cloud_hypervisor::API_SOCK)),
    };
    let t = Instant::now();
    let mut child = Command::new(vmm)
        .arg(flag)
        .arg(&sock)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(vmm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "{vmm} never opened its API socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    if vmm == "firecracker" {
        let api = Api::firecracker(&sock);
        for (path, body) in hearth_vmm::firecracker::calls(spec) {
            api.put(&path, &body).expect("configure");
        }
        api.put("/actions", &serde_json::json!({ "action_type": "InstanceStart" })).expect("start");
    } else {
        let api = Api::cloud_hypervisor(&sock);
        api.put("/api/v1/vm.create", &hearth_vmm::cloud_hypervisor::vm_config(spec))
            .expect("create");
        api.put_empty("/api/v1/vm.boot").expect("boot");
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

/// The section's table.
pub fn vmm_start(d: &Daemon, image: &str, runs: usize, rss: impl Fn() -> u64) {
    println!("\n### Command to guest start per VMM ({runs} runs; same kernel, initramfs, disk)\n");
    println!("| VMM | hearth run -d --no-wait | the bare VMM configured by hand | hearthd memory per running VM |");
    println!("|---|---|---|---|");
    for vmm in ["firecracker", "cloud-hypervisor"] {
        if hearth_e2e::which(vmm).is_none() {
            println!("| {vmm} | skipped: not on PATH | | |");
            continue;
        }
        let run = |name: &str| {
            let args =
                ["run", "-d", "--no-wait", "--vmm", vmm, "--network", "none", "--name", name];
            d.ok(&[&args[..], &[image, "sleep", "100000"]].concat());
        };
        // Warm the caches both sides use (base ext4, initramfs, the ELF kernel).
        run("warm");
        d.ok(&["rm", "-f", "warm"]);
        // Each start timed with no other guest running: on a small host, guests still booting
        // would take the CPU the next start measures.
        let mut hearth = Vec::new();
        for i in 0..runs {
            let t = Instant::now();
            run(&format!("{vmm}-timed-{i}"));
            hearth.push(t.elapsed());
            d.ok(&["rm", "-f", &format!("{vmm}-timed-{i}")]);
        }
        let before = rss();
        for i in 0..runs {
            run(&format!("{vmm}-{i}"));
        }
        let per_vm = rss().saturating_sub(before) / runs.max(1) as u64;
        for i in 0..runs {
            d.ok(&["rm", "-f", &format!("{vmm}-{i}")]);
        }
        let work = tempfile::tempdir().expect("tmp");
        let mut bare: Vec<Duration> = (0..runs)
            .map(|i| bare_start(vmm, &bare_vm(d, &work.path().join(format!("bare-{i}")), vmm)))
            .collect();
        hearth.sort();
        bare.sort();
        let ms = |v: &[Duration]| format!("{:.0} ms", v[v.len() / 2].as_secs_f64() * 1000.0);
        println!("| {vmm} | {} | {} | {} KiB |", ms(&hearth), ms(&bare), per_vm >> 10);
    }
}
