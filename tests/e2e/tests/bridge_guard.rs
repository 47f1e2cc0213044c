//! What the bridge network keeps out (SECURITY.md): a guest cannot reach services on the host's
//! loopback, a neighbour routed to the bridge reaches only published ports, and published ports
//! are one VM's each, kept whole through concurrent launches and daemon restarts. Inside network
//! namespaces the test makes; each guard is also shown to be what stops the attack, by removing
//! it and watching the attack succeed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_e2e::testutil::{busybox_oci_layout, TestImage};
use hearth_e2e::{require_e2e, text, Daemon, Netns};

const SERVE: &str =
    "echo served-by-$(hostname) > /tmp/index.html; exec busybox httpd -f -p 8080 -h /tmp";

fn get(addr: &str, port: u16) -> String {
    format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {addr} {port}")
}

/// Retries until `attempt` answers with 200 OK; the answer.
fn until_served(what: &str, attempt: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = attempt();
        if out.contains("200 OK") {
            return out;
        }
        assert!(Instant::now() < deadline, "{what} never answered: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn daemon_in(ns: &Netns) -> Daemon {
    let d = Daemon::start_in(ns);
    d.import_kernel();
    let layout = tempfile::tempdir().expect("tmp");
    busybox_oci_layout(layout.path(), "1", &TestImage::default()).expect("layout");
    d.ok(&["image", "import", layout.path().to_str().expect("utf8"), "--name", "br:1"]);
    d
}

/// A web server inside `ns` on 127.0.0.1:`port` serving `body`, killed on drop (with the
/// directory it serves).
struct LoopbackService {
    child: Child,
    _www: tempfile::TempDir,
}

impl LoopbackService {
    fn start(ns: &Netns, port: u16, body: &str) -> Self {
        let www = tempfile::tempdir().expect("tmp");
        std::fs::write(www.path().join("index.html"), body).expect("page");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "busybox",
                "httpd",
                "-f",
                "-p",
                &format!("127.0.0.1:{port}"),
                "-h",
            ])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("httpd");
        let svc = Self { child, _www: www };
        until_served("the host's loopback service", || {
            text(&ns.run(&["sh", "-c", &get("127.0.0.1", port)]).stdout)
        });
        svc
    }
}

impl Drop for LoopbackService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_guest_cannot_reach_host_loopback_and_a_neighbour_only_published_ports() {
    require_e2e!();
    let (ns, lan) = (Netns::new(), Netns::new());
    let d = daemon_in(&ns);
    let _svc = LoopbackService::start(&ns, 19999, "host-loopback-secret");
    d.ok(&[
        "run",
        "-d",
        "--network",
        "bridge",
        "--name",
        "g",
        "-p",
        "18090:8080",
        "br:1",
        "sh",
        "-c",
        SERVE,
    ]);
    let guest_ip = d.inspect("g")["status"]["ip"].as_str().expect("ip").to_owned();

    // The guest routes 127.0.0.1 to its gateway, as a hostile guest would (CVE-2020-8558), and
    // accepts answers from that address (its own, on lo) on its card.
    let route_loopback_out = "cd /proc/sys/net/ipv4/conf; for f in */route_localnet */accept_local; do echo 1 > $f; done; \
         busybox ip route del local 127.0.0.0/8 dev lo table local; busybox ip route del local 127.0.0.1 dev lo table local; \
         busybox ip route add 127.0.0.1/32 via 10.61.0.1";
    d.ok(&["exec", "g", "--", "sh", "-c", route_loopback_out]);
    let attack =
        || text(&d.hearth(&["exec", "g", "--", "sh", "-c", &get("127.0.0.1", 19999)]).stdout);
    for _ in 0..3 {
        assert!(
            !attack().contains("host-loopback-secret"),
            "the guest reached the host's loopback service"
        );
    }

    // A neighbour with a route to the bridge through the host.
    assert!(ns
        .run(&["ip", "link", "add", "hv0", "type", "veth", "peer", "name", "hv1"])
        .status
        .success());
    assert!(ns.run(&["ip", "link", "set", "hv1", "netns", &lan.name]).status.success());
    for (n, cmd) in [
        (&ns, "ip addr add 10.99.0.1/24 dev hv0 && ip link set hv0 up"),
        (&lan, "ip addr add 10.99.0.2/24 dev hv1 && ip link set hv1 up && ip route add 10.61.0.0/16 via 10.99.0.1"),
    ] {
        let out = n.run(&["sh", "-c", cmd]);
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    }
    let published = until_served("the published port, from the neighbour", || {
        text(&lan.run(&["sh", "-c", &get("10.99.0.1", 18090)]).stdout)
    });
    assert!(published.contains("served-by-g"), "{published}");
    let direct = || text(&lan.run(&["sh", "-c", &get(&guest_ip, 8080)]).stdout);
    assert!(!direct().contains("200 OK"), "the neighbour reached an unpublished guest port");

    // Each guard is what stopped its attack: without it, both get through.
    assert!(ns.run(&["nft", "flush", "chain", "ip", "hearth", "forward"]).status.success());
    until_served("the unpublished port once the forward filter is gone", direct);
    assert!(ns.run(&["nft", "flush", "chain", "ip", "hearth", "input"]).status.success());
    assert!(until_served("the loopback service once the input filter is gone", attack)
        .contains("host-loopback-secret"));
}

#[test]
fn published_ports_survive_concurrent_launches_and_restarts_and_belong_to_one_vm() {
    require_e2e!();
    let ns = Netns::new();
    let mut d = daemon_in(&ns);
    let launches: Vec<Child> = (0..4)
        .map(|i| {
            let port = format!("1810{i}:8080");
            let name = format!("c{i}");
            d.cmd(&[
                "run",
                "-d",
                "--network",
                "bridge",
                "-p",
                &port,
                "--name",
                &name,
                "br:1",
                "sleep",
                "600",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run")
        })
        .collect();
    for l in launches {
        let out = l.wait_with_output().expect("run");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let forwards = |ns: &Netns| {
        let rules = text(&ns.run(&["nft", "list", "chain", "ip", "hearth", "prerouting"]).stdout);
        (0..4).filter(|i| rules.contains(&format!("dport 1810{i} dnat to"))).count()
    };
    assert_eq!(forwards(&ns), 4, "every concurrent launch kept its forward");

    let out = d.hearth(&[
        "run",
        "-d",
        "--network",
        "bridge",
        "-p",
        "127.0.0.1:18102:80",
        "br:1",
        "sleep",
        "600",
    ]);
    assert!(!out.status.success(), "a host port another VM publishes is refused");
    assert!(
        text(&out.stderr).contains("VM c2 already publishes host port 18102"),
        "{}",
        text(&out.stderr)
    );
    let out = d.hearth(&["run", "-d", "-p", "18103:80", "br:1", "sleep", "600"]);
    assert!(!out.status.success(), "on the user network too: {}", text(&out.stderr));

    // The table is rebuilt when hearthd starts, e.g. after someone flushed it.
    d.kill9();
    assert!(ns.run(&["nft", "delete", "table", "ip", "hearth"]).status.success());
    d.spawn();
    // hearthd answers once its recovery is done.
    d.ok(&["ps"]);
    assert_eq!(forwards(&ns), 4, "the forwards came back with the daemon");
}
