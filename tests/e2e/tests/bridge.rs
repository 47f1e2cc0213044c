//! `--network bridge`, inside a network namespace the test makes: VMs on the hearth0 bridge
//! reach each other and the host reaches them at their own addresses and through published
//! ports; taps and port forwards go with their VMs.

use std::time::{Duration, Instant};

use hearth_e2e::{require_e2e, text, Daemon, Netns};

const SERVE: &str =
    "echo served-by-$(hostname) > /tmp/index.html; exec busybox httpd -f -p 8080 -h /tmp";

/// Retries `get` until it answers (the guest's server starts just after the VM is ready).
fn until_served(what: &str, get: impl Fn() -> (bool, String)) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = get();
        if ok {
            return out;
        }
        assert!(Instant::now() < deadline, "{what} never answered: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn bridged_vms_reach_each_other_and_the_host_reaches_them() {
    require_e2e!();
    let ns = Netns::new();
    let d = Daemon::start_in(&ns).with_kernel_and_busybox("br:1");

    d.ok(&["run", "-d", "--network", "bridge", "--name", "a", "br:1", "sh", "-c", SERVE]);
    d.ok(&["run", "-d", "--network", "bridge", "--name", "b", "br:1", "sleep", "600"]);
    let ip = |vm: &str| d.inspect(vm)["status"]["ip"].as_str().expect("an address").to_owned();
    let (ip_a, ip_b) = (ip("a"), ip("b"));
    assert!(
        ip_a.starts_with("10.61.") && ip_b.starts_with("10.61.") && ip_a != ip_b,
        "{ip_a} {ip_b}"
    );

    // Each guest has its own address on the bridge's subnet and the host as its gateway.
    let addr = d.ok(&["exec", "b", "--", "busybox", "ip", "-4", "addr"]);
    assert!(addr.contains(&format!("inet {ip_b}/16")), "{addr}");
    assert!(d.ok(&["exec", "b", "--", "busybox", "ip", "route"]).contains("default via 10.61.0.1"));

    // VM to VM, and the host (the namespace) to a VM, straight to the guest's port. (An HTTP
    // request through nc: static busybox's wget crashes resolving the service name.)
    let get =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {ip_a} 8080");
    let body = until_served("a, from b", || {
        let out = d.hearth(&["exec", "b", "--", "sh", "-c", &get]);
        (text(&out.stdout).contains("200 OK"), text(&out.stdout) + &text(&out.stderr))
    });
    assert!(body.contains("served-by-a"), "{body}");
    let body = until_served("a, from the host", || {
        let out = ns.run(&["sh", "-c", &get]);
        (text(&out.stdout).contains("200 OK"), text(&out.stdout) + &text(&out.stderr))
    });
    assert!(body.contains("served-by-a"), "{body}");

    // Both taps are on the bridge; outbound NAT is in hearth's own nftables table.
    let ports = text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert_eq!(ports.lines().count(), 2, "{ports}");
    let nat = text(&ns.run(&["nft", "list", "table", "ip", "hearth"]).stdout);
    assert!(nat.contains("masquerade") && nat.contains("10.61.0.0/16"), "{nat}");

    // Removing a VM removes its tap, and its address is free for the next VM.
    d.ok(&["rm", "-f", "a"]);
    let ports = text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert_eq!(ports.lines().count(), 1, "a's tap is gone: {ports}");
    d.ok(&["run", "-d", "--network", "bridge", "--name", "c", "br:1", "sleep", "600"]);
    assert_eq!(ip("c"), ip_a, "the lowest free address is reused");

    // An address asked for with --ip, and an image's filesystem mounted read-only in the guest.
    d.ok(&[
        "run",
        "-d",
        "--network",
        "bridge",
        "--ip",
        "10.61.0.77",
        "--image-volume",
        "br:1:/mnt/img:ro",
        "--name",
        "v",
        "br:1",
        "sleep",
        "600",
    ]);
    assert_eq!(ip("v"), "10.61.0.77");
    let mounts = d.ok(&["exec", "v", "--", "cat", "/proc/mounts"]);
    assert!(mounts.lines().any(|l| l.contains(" /mnt/img ext4 ro")), "{mounts}");
    assert!(d.ok(&["exec", "v", "--", "ls", "/mnt/img/bin"]).contains("busybox"));
    let out = d.hearth(&["run", "-d", "--network", "bridge", "--ip", "10.61.0.77", "br:1", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("10.61.0.77 is taken"),
        "{}",
        text(&out.stderr)
    );
    let out = d.hearth(&["run", "-d", "--network", "bridge", "--ip", "10.61.0.1", "br:1", "true"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("gateway"),
        "{}",
        text(&out.stderr)
    );
    d.ok(&["rm", "-f", "v"]);

    // Published ports are DNAT rules: reachable on the host's loopback and on its other local
    // addresses (here the bridge's), gone when the VM stops.
    d.ok(&[
        "run",
        "-d",
        "--network",
        "bridge",
        "--name",
        "pub",
        "-p",
        "127.0.0.1:18080:8080",
        "-p",
        "18081:8080",
        "br:1",
        "sh",
        "-c",
        SERVE,
    ]);
    for (addr, port) in [("127.0.0.1", 18080), ("10.61.0.1", 18081)] {
        let get = format!(
            "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {addr} {port}"
        );
        let body = until_served(&format!("{addr}:{port}"), || {
            let out = ns.run(&["sh", "-c", &get]);
            (text(&out.stdout).contains("200 OK"), text(&out.stdout) + &text(&out.stderr))
        });
        assert!(body.contains("served-by-pub"), "{body}");
    }
    assert!(d.ok(&["ps"]).contains("127.0.0.1:18080->8080/tcp"));
    let dnat = |ns: &Netns| {
        text(&ns.run(&["nft", "list", "chain", "ip", "hearth", "prerouting"]).stdout)
            .matches("dnat to")
            .count()
    };
    assert_eq!(dnat(&ns), 2);
    d.ok(&["stop", "pub"]);
    assert_eq!(dnat(&ns), 0, "the forwards go with the VM");
    d.ok(&["start", "pub"]);
    assert_eq!(dnat(&ns), 2, "and come back with it");
    d.ok(&["rm", "-f", "pub"]);
    assert_eq!(dnat(&ns), 0);

    // IPv6 host addresses are refused on the bridge, naming the fix.
    let out = d.hearth(&["run", "--network", "bridge", "-p", "[::1]:8080:80", "br:1", "true"]);
    assert!(!out.status.success() && text(&out.stderr).contains("IPv4"), "{}", text(&out.stderr));
}

/// `hearthd --bridge-name` puts bridged VMs on a bridge of that name (made when missing, with
/// the same subnet and NAT), as Flintlock's flag does.
#[test]
fn the_bridge_has_the_name_hearthd_is_given() {
    require_e2e!();
    let ns = Netns::new();
    let d =
        Daemon::start_in_with(&ns, &["--bridge-name", "br-vms"]).with_kernel_and_busybox("br:1");
    d.ok(&["run", "-d", "--network", "bridge", "--name", "a", "br:1", "sleep", "600"]);
    let ports = text(&ns.run(&["ip", "-o", "link", "show", "master", "br-vms"]).stdout);
    assert_eq!(ports.lines().count(), 1, "a's tap is on br-vms: {ports}");
    let addr = text(&ns.run(&["ip", "-o", "-4", "addr", "show", "br-vms"]).stdout);
    assert!(addr.contains("10.61.0.1/16"), "{addr}");
    let hearth0 = ns.run(&["ip", "link", "show", "hearth0"]);
    assert!(!hearth0.status.success(), "no hearth0 is made");
    d.ok(&["rm", "-f", "a"]);
}

/// `--network` given twice: two cards on the bridge, each with its own tap, MAC and address,
/// both reachable from the host; the default route is the first's; both taps go with the VM.
#[test]
fn a_vm_with_two_cards_on_the_bridge_is_reached_at_both_addresses() {
    require_e2e!();
    let ns = Netns::new();
    let d = Daemon::start_in(&ns).with_kernel_and_busybox("br:1");

    let args = ["run", "-d", "--network", "bridge", "--network", "bridge", "--name", "two"];
    d.ok(&[&args[..], &["br:1", "sleep", "600"]].concat());
    let rec = d.inspect("two");
    let first = rec["status"]["ip"].as_str().expect("first address").to_owned();
    let second = rec["spec"]["nics"][0]["address"].as_str().expect("second address").to_owned();
    assert!(first != second && second.starts_with("10.61."), "{first} {second}");

    // The guest has both, each on its own card, and routes through the first.
    let addr = d.ok(&["exec", "two", "--", "busybox", "ip", "-o", "-4", "addr"]);
    let card_of = |ip: &str| {
        let line = addr.lines().find(|l| l.contains(&format!("inet {ip}/16")));
        line.and_then(|l| l.split_whitespace().nth(1)).map(str::to_owned)
    };
    let (a, b) = (card_of(&first), card_of(&second));
    assert!(a.is_some() && b.is_some() && a != b, "{addr}");
    let routes = d.ok(&["exec", "two", "--", "busybox", "ip", "route"]);
    let default: Vec<_> = routes.lines().filter(|l| l.starts_with("default")).collect();
    assert_eq!(default.len(), 1, "{routes}");
    assert!(default[0].contains(a.as_deref().expect("card")), "{routes}");

    // The host reaches the guest at both addresses, through two taps on the bridge.
    for ip in [&first, &second] {
        let ping = ns.run(&["busybox", "ping", "-c", "1", "-W", "10", ip]);
        assert!(ping.status.success(), "{ip}: {}{}", text(&ping.stdout), text(&ping.stderr));
    }
    let ports = text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert_eq!(ports.lines().count(), 2, "{ports}");

    // A second VM never gets either address; removing the VM removes both taps.
    d.ok(&["run", "-d", "--network", "bridge", "--name", "other", "br:1", "sleep", "600"]);
    let other = d.inspect("other")["status"]["ip"].as_str().expect("address").to_owned();
    assert!(other != first && other != second, "{other}");
    d.ok(&["rm", "-f", "two"]);
    let ports = text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert_eq!(ports.lines().count(), 1, "two's taps are gone: {ports}");

    // A card after the first on `none` or `user` is refused, naming the fix.
    let out = d.hearth(&["run", "--network", "bridge", "--network", "user", "br:1", "true"]);
    assert!(!out.status.success(), "a second user-mode card was taken");
    assert!(text(&out.stderr).contains("bridge or macvtap"), "{}", text(&out.stderr));
}
