//! `hearth host check` and `hearth host init` on this machine (init inside a network namespace
//! the test makes, so the host's own network is never touched).

use std::process::Command;

use hearth_e2e::{require_e2e, text, Netns};

#[test]
fn host_check_reports_what_this_machine_really_has_with_fixes() {
    require_e2e!();
    let root = tempfile::tempdir().expect("tmp");
    let out = Command::new(hearth_e2e::bin_dir().join("hearth"))
        .args(["host", "check", "-o", "json", "--root"])
        .arg(root.path())
        .output()
        .expect("hearth");
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    let get = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
            .clone()
    };

    // KVM: usable exactly when /dev/kvm opens and the CPU advertises vmx or svm.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
    let flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert_eq!(get("kvm")["level"] == "ok", flags && opens, "{:?}", get("kvm"));
    // Tools: found exactly when they are on PATH.
    for tool in ["qemu-system-x86_64", "mkfs.ext4"] {
        assert_eq!(
            get(tool)["level"] == "ok",
            hearth_e2e::which(tool).is_some(),
            "{:?}",
            get(tool)
        );
    }
    assert_eq!(get("/dev/net/tun")["level"] == "ok", std::path::Path::new("/dev/net/tun").exists());
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("sysctl");
    assert_eq!(get("net.ipv4.ip_forward")["level"] == "ok", forward.trim() == "1");
    // Everything not ok says how to fix it, and the exit code follows the failures.
    for c in checks.iter().filter(|c| c["level"] != "ok") {
        assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "no fix for {c}");
    }
    let failed = checks.iter().any(|c| c["level"] == "fail");
    assert_eq!(out.status.success(), !failed, "{}", text(&out.stderr));
    // The table form says the same in words.
    let table = Command::new(hearth_e2e::bin_dir().join("hearth"))
        .args(["host", "check", "--root"])
        .arg(root.path())
        .output()
        .expect("hearth");
    assert!(text(&table.stdout).contains("CHECK") && text(&table.stdout).contains("kvm"));
}

#[test]
fn host_init_makes_the_bridge_network_and_is_idempotent() {
    require_e2e!();
    let ns = Netns::new();
    let root = tempfile::tempdir().expect("tmp");
    let state = root.path().join("state");
    let hearth = hearth_e2e::bin_dir().join("hearth");
    let init = || {
        ns.run(&[
            hearth.to_str().expect("utf8"),
            "host",
            "init",
            "--root",
            state.to_str().expect("utf8"),
        ])
    };
    for round in 0..2 {
        let out = init();
        assert!(out.status.success(), "round {round}: {}{}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stdout).contains("bridge hearth0"), "{}", text(&out.stdout));
    }
    assert!(state.is_dir());
    let addr = text(&ns.run(&["ip", "-4", "-o", "addr", "show", "dev", "hearth0"]).stdout);
    assert_eq!(
        addr.matches("10.61.0.1/16").count(),
        1,
        "one gateway address after two runs: {addr}"
    );
    assert_eq!(text(&ns.run(&["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout).trim(), "1");
    let nat = text(&ns.run(&["nft", "list", "table", "ip", "hearth"]).stdout);
    assert_eq!(
        nat.matches("ip saddr 10.61.0.0/16 oifname != \"hearth0\" masquerade").count(),
        1,
        "one NAT rule after two runs: {nat}"
    );
    // --no-network leaves the network alone.
    let other = Netns::new();
    let out = other.run(&[
        hearth.to_str().expect("utf8"),
        "host",
        "init",
        "--no-network",
        "--root",
        state.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !other.run(&["ip", "link", "show", "hearth0"]).status.success(),
        "no bridge with --no-network"
    );
}
