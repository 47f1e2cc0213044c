//! Snapshots under QEMU/TCG: a running VM's guest state and disks, restored into new VMs that
//! go on where it was (its processes and memory) with identities of their own.

use std::time::{Duration, Instant};

use hearth_e2e::{require_e2e, text, Daemon, Netns};

/// The guest's counter, written by a process started before the snapshot (0 until it has
/// written it).
fn count(d: &Daemon, vm: &str) -> u64 {
    let out = d.hearth(&["exec", vm, "--", "cat", "/tmp/count"]);
    text(&out.stdout).trim().parse().unwrap_or(0)
}

/// Waits until the counter of `vm` has gone past `than`.
fn counts_past(d: &Daemon, vm: &str, than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = count(d, vm);
        if n > than {
            return n;
        }
        assert!(Instant::now() < deadline, "{vm}'s counter stays at {n}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_snapshot_restores_running_processes_and_memory_into_vms_of_their_own() {
    require_e2e!();
    let ns = Netns::new();
    let d = Daemon::start_in(&ns).with_kernel_and_busybox("snap:1");

    // A VM with a process counting, and data only in its memory (/dev/shm is a tmpfs).
    let work = "echo 0123456789abcdef0123456789abcdef > /etc/machine-id; \
        mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm; echo in-memory > /dev/shm/data; \
        i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done";
    d.ok(&["run", "-d", "--network", "bridge", "--name", "src", "snap:1", "sh", "-c", work]);
    let before = counts_past(&d, "src", 2);
    d.ok(&["snapshot", "create", "src", "s1"]);
    let ls = d.ok(&["snapshot", "ls"]);
    assert!(ls.contains("s1") && ls.contains("src") && ls.contains("QEMU"), "{ls}");
    // The VM runs on after its snapshot.
    counts_past(&d, "src", before);

    d.ok(&["run", "-d", "--snapshot", "s1", "--name", "r1"]);
    d.ok(&["run", "-d", "--snapshot", "s1", "--name", "r2"]);
    let ip = |vm: &str| d.inspect(vm)["status"]["ip"].as_str().expect("an address").to_owned();
    let mac = |vm: &str| d.ok(&["exec", vm, "--", "cat", "/sys/class/net/eth0/address"]);
    let mut seen = std::collections::BTreeMap::new();
    for vm in ["r1", "r2"] {
        // The snapshot's process runs on (from where it was, not from 0), its memory is there.
        let n = count(&d, vm);
        assert!(n >= before, "{vm} starts again at {n}, the snapshot was at {before}");
        counts_past(&d, vm, n);
        assert_eq!(d.ok(&["exec", vm, "--", "cat", "/dev/shm/data"]).trim(), "in-memory");
        // Its own name, id, MAC and address, in the guest as on the host.
        assert_eq!(d.ok(&["exec", vm, "--", "hostname"]).trim(), vm);
        let addr = d.ok(&["exec", vm, "--", "busybox", "ip", "-4", "addr"]);
        assert!(addr.contains(&format!("inet {}/16", ip(vm))), "{vm}: {addr}");
        let rec = d.inspect(vm);
        assert_eq!(rec["spec"]["snapshot"], "s1");
        seen.insert(vm, (rec["spec"]["id"].to_string(), mac(vm), ip(vm)));
    }
    let src = (d.inspect("src")["spec"]["id"].to_string(), mac("src"), ip("src"));
    let (r1, r2) = (&seen["r1"], &seen["r2"]);
    for (what, a, b, c) in [
        ("id", &r1.0, &r2.0, &src.0),
        ("MAC", &r1.1, &r2.1, &src.1),
        ("address", &r1.2, &r2.2, &src.2),
    ] {
        assert!(a != b && a != c && b != c, "{what}s repeat: {a} {b} {c}");
    }
    // The restores never share random state: their RNGs and boot ids differ (the snapshot's
    // guest never read its boot id, so each restore draws its own).
    let random = |vm: &str, what: &str| d.ok(&["exec", vm, "--", "sh", "-c", what]);
    let draw = "head -c 32 /dev/urandom | busybox od -An -tx1";
    assert_ne!(random("r1", draw), random("r2", draw), "the guests' RNGs repeat each other");
    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    assert_ne!(random("r1", boot_id), random("r2", boot_id));
    // Each has a machine id of its own (the snapshot's guest had one on its disk).
    let ids: Vec<String> =
        ["src", "r1", "r2"].iter().map(|vm| random(vm, "cat /etc/machine-id")).collect();
    assert!(ids[0] != ids[1] && ids[0] != ids[2] && ids[1] != ids[2], "{ids:?}");
    // Both reach the network at their own addresses.
    for vm in ["r1", "r2"] {
        let ping = ns.run(&["busybox", "ping", "-c", "1", "-W", "10", &ip(vm)]);
        assert!(ping.status.success(), "{vm}: {}", text(&ping.stdout));
    }

    // A restore onto another kernel is refused, naming the snapshot's; so is a name taken.
    let out = d.hearth(&["run", "-d", "--snapshot", "s1", "--kernel", "another"]);
    assert!(!out.status.success(), "a restore with another kernel ran");
    assert!(text(&out.stderr).contains("kernel"), "{}", text(&out.stderr));
    let out = d.hearth(&["snapshot", "create", "src", "s1"]);
    assert!(!out.status.success() && text(&out.stderr).contains("exists"), "{}", text(&out.stderr));
    // Stopped and started again, a restored VM boots from its own disk.
    d.ok(&["stop", "r1"]);
    d.ok(&["start", "r1"]);
    assert_eq!(d.ok(&["exec", "r1", "--", "hostname"]).trim(), "r1");

    for vm in ["src", "r1", "r2"] {
        d.ok(&["rm", "-f", vm]);
    }
    d.ok(&["snapshot", "rm", "s1"]);
    assert!(!d.ok(&["snapshot", "ls"]).contains("s1"));
    assert!(!d.root.path().join("snapshots/s1").exists(), "the snapshot's files are gone");
}
