//! hearth-init: PID 1 of every hearth guest.
//!
//! Boots from the initramfs hearth builds per kernel: mounts the API filesystems, loads the
//! module closure, finds the config disk (by magic) and the root disk, switches root, then runs
//! the image's OCI process under supervision — reaping zombies, forwarding signals, serving the
//! host over the agent port — and when it exits writes the exit record and powers off. An image
//! whose command is an init system gets it exec'd as PID 1 instead, and a forked hearth-init
//! stays behind as an ordinary process serving the agent (exec, copy, readiness, shutdown) and
//! the cloud-init seed it wrote. Nothing here may panic or
//! hang silently: a PID 1 that dies takes the kernel with it, so every failure is reported on the
//! console and in the exit record, and the VM powers off.

#![deny(unsafe_code)]

mod agent;
mod boot;
mod dhcp;
mod net;
mod process;
// The only module with raw system calls (unsafe code is denied everywhere else).
#[allow(unsafe_code)]
mod sys;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_types::agent::Ready;
use hearth_types::guest::{encode_record, is_init_system, EXIT_MAGIC, EXIT_OFFSET};
use hearth_types::GuestExit;

/// Signals PID 1 handles synchronously (blocked, then collected with sigtimedwait).
const SIGNALS: [i32; 6] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];
/// How long the workload gets between SIGTERM and SIGKILL on an agent shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() {
    // Not PID 1: a tool for tests of the parts that need no VM (`hearth-init dhcp IFACE`).
    if std::process::id() != 1 {
        std::process::exit(tool(&std::env::args().skip(1).collect::<Vec<_>>()));
    }
    let started = sys::uptime_ms();
    sys::block_signals(&SIGNALS);
    let mut config_disk: Option<File> = None;
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(started, &mut config_disk)));
    let exit = match outcome {
        Ok(Ok(exit)) => exit,
        Ok(Err(msg)) => {
            eprintln!("hearth-init: {msg}");
            GuestExit { exit_code: 125, signal: None, error: Some(msg) }
        }
        Err(_) => {
            GuestExit { exit_code: 125, signal: None, error: Some("hearth-init panicked".into()) }
        }
    };
    finish(config_disk.as_ref(), &exit);
}

fn run(started: u64, config_disk: &mut Option<File>) -> Result<GuestExit, String> {
    boot::mount_early()?;
    boot::load_modules();
    let (cfg, root_dev) = boot::find_disks(config_disk)?;
    if cfg.version != hearth_types::guest::GUEST_CONFIG_VERSION {
        return Err(format!(
            "config version {} is not supported by this hearth-init; update hearth",
            cfg.version
        ));
    }
    boot::switch_root(&root_dev)?;
    boot::mount_late();
    boot::mount_volumes(&cfg.volumes);
    sys::raw_output(1);
    if !cfg.hostname.is_empty() {
        let _ = sys::sethostname(&cfg.hostname);
    }
    net::configure(cfg.network.as_ref(), &cfg.hostname);
    net::configure_cards(&cfg.cards);
    install_keys(&cfg.ssh_authorized_keys);
    seed_cloud_init(&cfg.cloud_init);
    let spec = process::Spec {
        args: cfg.process.args.clone(),
        env: cfg.process.env.clone(),
        cwd: cfg.process.cwd.clone(),
        user: cfg.process.user.clone(),
        hostname: cfg.hostname.clone(),
    };
    if cfg.init_system || is_init_system(&spec.args) {
        // A full-OS image: its own init becomes PID 1, and a child of ours serves the agent.
        let mut cmd = match process::command(&spec, None, false) {
            Ok(c) => c,
            Err(e) => return Ok(cannot_start(e)),
        };
        // No thread has been started yet; the agent's threads start in the child.
        match sys::fork() {
            Ok(0) => full_os_agent(started, spec),
            Ok(_) => {}
            Err(e) => eprintln!(
                "hearth-init: no agent for this VM (fork: {e}); the image's init starts anyway"
            ),
        }
        let err = cmd.exec();
        return Ok(cannot_start(process::spawn_error(&spec.args[0], &err)));
    }
    // Threads may start from here on (the full-OS branch forked before any did).
    if let Some(mac) = &cfg.dhcp {
        net::dhcp(mac, &cfg.hostname, net::LeaseUse::First);
    }
    for card in cfg.cards.iter().filter(|c| c.network.is_none()) {
        net::dhcp(&card.mac, &cfg.hostname, net::LeaseUse::AddressOnly);
    }
    let shared = Arc::new(agent::Shared::default());
    *shared.defaults.lock().unwrap_or_else(|e| e.into_inner()) = spec.clone();
    {
        let s = shared.clone();
        std::thread::spawn(move || agent::serve(s));
    }
    if cfg.process.stdin && !cfg.process.tty {
        // Piped input (`-i` without `-t`): no echo into the log, no line editing.
        sys::raw_input(0);
    }
    let child = match process::spawn_workload(&spec, cfg.process.tty, cfg.process.stdin) {
        Ok(c) => c,
        Err(e) => return Ok(cannot_start(e)),
    };
    shared.set_ready(Ready { init_started_ms: started, ready_ms: sys::uptime_ms() });
    Ok(supervise(&shared, child.id() as i32))
}

/// The workload could not be started: say so on the console, record it like a shell would.
fn cannot_start(e: process::SpawnError) -> GuestExit {
    eprintln!("hearth-init: {}", e.message);
    GuestExit { exit_code: e.code, signal: None, error: Some(e.message) }
}

/// Reaps, forwards signals, honours agent shutdown; returns when the workload exits.
fn supervise(shared: &agent::Shared, workload: i32) -> GuestExit {
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(sig) = sys::wait_signal(&SIGNALS, 100) {
            if sig != libc::SIGCHLD {
                sys::kill(workload, sig);
            }
        }
        let _g = process::spawn_guard();
        while let Some((pid, status)) = sys::reap_one() {
            if pid == workload {
                let (code, signal) = sys::decode_status(status);
                return GuestExit { exit_code: code, signal, error: None };
            }
            shared.reaped(pid, status);
        }
        if kill_at.is_none() && shared.shutdown.load(Ordering::SeqCst) {
            sys::kill(workload, libc::SIGTERM);
            kill_at = Some(Instant::now() + SHUTDOWN_GRACE);
        }
        if kill_at.is_some_and(|t| Instant::now() > t) {
            sys::kill(workload, libc::SIGKILL);
        }
    }
}

/// The agent beside a full-OS image's init: reaps its own children (execs, copies), reports
/// ready at once (hearth-init's part of the boot is done), and on a shutdown request asks the
/// image's init to power off, forcing it after [`SHUTDOWN_GRACE`].
fn full_os_agent(started: u64, spec: process::Spec) -> ! {
    // The console belongs to the image's init and gettys now: a hang-up there must not take the
    // agent down with a failed write. Its messages go to the kernel log.
    sys::redirect_stdio("/dev/null", "/dev/kmsg");
    let shared = Arc::new(agent::Shared::default());
    *shared.defaults.lock().unwrap_or_else(|e| e.into_inner()) = spec;
    {
        let s = shared.clone();
        std::thread::spawn(move || agent::serve(s));
    }
    shared.set_ready(Ready { init_started_ms: started, ready_ms: sys::uptime_ms() });
    let mut force_at: Option<Instant> = None;
    loop {
        let signal = sys::wait_signal(&SIGNALS, 100);
        {
            let _g = process::spawn_guard();
            while let Some((pid, status)) = sys::reap_one() {
                shared.reaped(pid, status);
            }
        }
        // The image's init is shutting the system down (it sends every process SIGTERM): go, so
        // it need not wait for us.
        if signal == Some(libc::SIGTERM) && force_at.is_none() {
            std::process::exit(0);
        }
        if force_at.is_none() && shared.shutdown.load(Ordering::SeqCst) {
            // Inits without a known power-off signal get SIGTERM, which most treat as "stop".
            sys::kill(1, init_poweroff_signal().unwrap_or(libc::SIGTERM));
            force_at = Some(Instant::now() + SHUTDOWN_GRACE);
        }
        if force_at.is_some_and(|t| Instant::now() > t) {
            eprintln!(
                "hearth-init: the image's init did not power off in {}s; forcing it",
                SHUTDOWN_GRACE.as_secs()
            );
            halt(1);
        }
    }
}

/// The signal that makes PID 1 power off cleanly, for the inits that have one.
fn init_poweroff_signal() -> Option<i32> {
    /// systemd's "poweroff" is SIGRTMIN+4 in the kernel's numbering (34 + 4), whatever a libc
    /// reserves of the real-time range for itself.
    const SYSTEMD_POWEROFF: i32 = 38;
    let exe = std::fs::read_link("/proc/1/exe").ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    match name.as_str() {
        "systemd" => Some(SYSTEMD_POWEROFF),
        "busybox" => Some(libc::SIGUSR2),
        _ => None,
    }
}

/// Writes the cloud-init NoCloud seed (0700 directory, 0600 files: user-data may hold secrets).
fn seed_cloud_init(files: &std::collections::BTreeMap<String, hearth_types::Blob>) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if files.is_empty() {
        return;
    }
    let dir = std::path::Path::new(hearth_types::guest::CLOUD_INIT_SEED_DIR);
    let res = (|| -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        for (name, content) in files {
            // Only cloud-init's own files, by their names: never a path.
            if !hearth_types::vm::CLOUD_INIT_FILES.contains(&name.as_str()) {
                continue;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(name))?;
            std::io::Write::write_all(&mut f, content.as_bytes())?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("hearth-init: writing the cloud-init seed in {}: {e}", dir.display());
    }
}

/// Installs root's SSH keys (0700 directory, 0600 file, as sshd's StrictModes wants).
fn install_keys(keys: &[String]) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if keys.is_empty() {
        return;
    }
    let res = (|| -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create("/root/.ssh")?;
        std::fs::set_permissions("/root/.ssh", std::fs::Permissions::from_mode(0o700))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open("/root/.ssh/authorized_keys")?;
        std::io::Write::write_all(&mut f, (keys.join("\n") + "\n").as_bytes())
    })();
    if let Err(e) = res {
        eprintln!("hearth-init: installing SSH keys in /root/.ssh: {e}");
    }
}

/// `(pid, ppid)` from a `/proc/<pid>/stat` line (the command name may hold spaces and parens).
fn stat_ids(stat: &str) -> Option<(u32, u32)> {
    let pid = stat.split_whitespace().next()?.parse().ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some((pid, ppid))
}

/// Processes left besides PID 1, not counting kernel threads (kthreadd, pid 2, and its
/// children). Unreadable entries have just exited.
fn user_processes() -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| stat_ids(&s))
        .filter(|&(pid, ppid)| pid > 2 && ppid != 2 && ppid != 0)
        .count()
}

/// `hearth-init dhcp IFACE [--renew]`, outside a VM: takes a lease on IFACE as the guest does
/// (the address and default route set, no files written), prints it, and with `--renew` renews
/// it once. For tests against a real DHCP server in a network namespace.
fn tool(args: &[String]) -> i32 {
    let (Some("dhcp"), Some(card)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!("hearth-init is the init of hearth's guests (PID 1); outside one it only has `dhcp IFACE [--renew]`");
        return 2;
    };
    let mac = std::fs::read_to_string(format!("/sys/class/net/{card}/address")).unwrap_or_default();
    let Some(mac) = dhcp::parse_mac(&mac) else {
        eprintln!("no interface {card}");
        return 1;
    };
    if let Err(e) = net::up(card) {
        eprintln!("{e}");
        return 1;
    }
    let lease = match dhcp::acquire(card, mac, "probe", Duration::from_secs(20)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    net::apply_lease(card, "probe", &lease, net::LeaseUse::Route);
    println!("{lease:?}");
    if args.iter().any(|a| a == "--renew") {
        match dhcp::renew(card, mac, "probe", &lease, false) {
            Ok(Some(l)) => println!("renewed {l:?}"),
            other => {
                eprintln!("renewal failed: {other:?}");
                return 1;
            }
        }
    }
    0
}

/// Records the exit, stops everything else, flushes, powers off.
fn finish(config_disk: Option<&File>, exit: &GuestExit) -> ! {
    if let Some(f) = config_disk {
        let rec = encode_record(EXIT_MAGIC, exit);
        if f.write_all_at(&rec, EXIT_OFFSET).and_then(|_| f.sync_all()).is_err() {
            eprintln!("hearth-init: could not write the exit record");
        }
    }
    halt(0)
}

/// Stops every other process (TERM, up to 2 s, then KILL), remounts the root read-only and
/// powers off. `me` is how many user processes are expected to remain: 0 as PID 1, 1 for the
/// agent beside a full-OS init (it counts itself).
fn halt(me: usize) -> ! {
    let _g = process::spawn_guard();
    sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        while sys::reap_one().is_some() {}
        if user_processes() <= me {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sys::kill(-1, libc::SIGKILL);
    while sys::reap_one().is_some() {}
    let _ = sys::mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, "");
    // The workload's last lines are still leaving the serial port.
    sys::drain_console(Duration::from_secs(2));
    let err = sys::power_off(exit_by_reset(
        &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    ));
    eprintln!("hearth-init: power off failed: {err}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Whether the VMM ends a VM on a reset rather than a power-off: hearth puts
/// `hearth.exit=reset` on the command line of such VMMs' guests.
fn exit_by_reset(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|a| a == "hearth.exit=reset")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_says_how_a_vm_ends() {
        assert!(exit_by_reset("console=ttyS0 reboot=k hearth.exit=reset rdinit=/init"));
        assert!(!exit_by_reset("console=ttyS0 rdinit=/init"));
    }

    #[test]
    fn stat_lines_parse_with_awkward_names() {
        assert_eq!(stat_ids("42 (my) prog)) S 7 42 42 0 -1"), Some((42, 7)));
        assert_eq!(stat_ids("2 (kthreadd) S 0 0 0 0 -1"), Some((2, 0)));
        assert_eq!(stat_ids("garbage"), None);
    }
}
