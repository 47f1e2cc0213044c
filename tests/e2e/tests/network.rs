//! The guest's network (user-mode NAT): its address, published ports reached from the host,
//! `--network none`, and `hearth ssh` into an image that runs an SSH server.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_e2e::testutil::{push_image, LocalRegistry, TestImage};
use hearth_e2e::{require_e2e, text, Daemon};

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind").local_addr().expect("addr").port()
}

/// GETs `path` from 127.0.0.1:`port`, retrying while the server comes up.
fn http_get(port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/") => return body,
            other => assert!(Instant::now() < deadline, "no answer on port {port}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn published_ports_reach_the_guest_and_none_has_no_network() {
    require_e2e!();
    let reg = LocalRegistry::start().expect("registry");
    push_image(&reg, "net:1", &TestImage::default()).expect("push");
    let d = Daemon::start();
    d.import_kernel();
    let image = format!("{}/net:1", reg.host());
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let serve =
        "echo served-by-$(hostname) > /tmp/index.html; exec busybox httpd -f -p 8080 -h /tmp";
    d.ok(&["run", "-d", "--name", "web", "-p", &publish, &image, "sh", "-c", serve]);

    // A host client reaches the guest's server through the published port.
    let body = http_get(port, "/index.html");
    assert!(body.contains("served-by-web"), "{body}");

    // The guest has its address, a default route and a resolver.
    let addr = d.ok(&["exec", "web", "--", "busybox", "ip", "-4", "addr"]);
    assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
    assert!(addr.contains("inet 127.0.0.1/8"), "loopback is up: {addr}");
    assert!(d
        .ok(&["exec", "web", "--", "busybox", "ip", "route"])
        .contains("default via 10.0.2.2"));
    assert_eq!(d.ok(&["exec", "web", "--", "cat", "/etc/resolv.conf"]), "nameserver 10.0.2.3\n");
    assert!(d.ok(&["exec", "web", "--", "cat", "/etc/hosts"]).contains("10.0.2.15\tweb\n"));
    assert_eq!(d.inspect("web")["status"]["ip"], "10.0.2.15");
    let ps = d.ok(&["ps"]);
    assert!(ps.contains(&format!("127.0.0.1:{port}->8080/tcp")), "{ps}");

    // A second VM on the same host port is refused before anything starts, naming the port.
    let out = d.hearth(&["run", "-d", "--name", "clash", "-p", &publish, &image, "sleep", "100"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("host port {port} is unavailable"))
            && err.contains("choose another -p"),
        "{err}"
    );
    assert!(
        hearth_e2e::qemu_processes(&d.root.path().display().to_string()).len() == 1,
        "no VMM for the refused VM"
    );

    // The port is released when the VM stops.
    d.ok(&["stop", "web"]);
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port free again after stop");

    // --network none: loopback only, and -p with it is refused with the fix named.
    let links = d.ok(&["run", "--rm", "--network", "none", &image, "busybox", "ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(links.contains("lo:"), "{links}");
    let out = d.hearth(&["run", "--network", "none", "-p", "1:2", &image, "true"]);
    assert!(text(&out.stderr).contains("drop --network none"), "{}", text(&out.stderr));
}

#[test]
fn ssh_into_an_image_with_an_ssh_server() {
    require_e2e!();
    let dropbear = PathBuf::from("/usr/sbin/dropbear");
    if !dropbear.is_file() || hearth_e2e::which("ssh").is_none() {
        eprintln!(
            "skipping: needs dropbear-bin and openssh-client (cargo xtask deps installs them)"
        );
        return;
    }
    let reg = LocalRegistry::start().expect("registry");
    push_image(&reg, "sshd:1", &TestImage { host_binaries: vec![dropbear], ..Default::default() })
        .expect("push");
    let d = Daemon::start();
    d.import_kernel();
    let image = format!("{}/sshd:1", reg.host());
    let sshd = ["/usr/sbin/dropbear", "-F", "-E", "-R", "-p", "22"];

    // --ssh: hearth generates the key pair and hearth-init installs the public half.
    let mut args = vec!["run", "-d", "--ssh", "--name", "s1", image.as_str()];
    args.extend(sshd);
    d.ok(&args);
    let key =
        d.inspect("s1")["status"]["ssh_key_path"].as_str().expect("a generated key").to_owned();
    assert!(std::path::Path::new(&key).is_file());
    let deadline = Instant::now() + Duration::from_secs(90);
    let out = loop {
        let out = d.hearth(&["ssh", "s1", "--", "echo", "over-ssh", "$(hostname)"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(out.status.success(), "ssh never worked: {}\n{}", text(&out.stderr), d.log());
    assert_eq!(text(&out.stdout), "over-ssh s1\n");
    // The remote command's exit code comes back.
    assert_eq!(d.hearth(&["ssh", "s1", "--", "exit", "3"]).status.code(), Some(3));

    // --ssh=PATH installs the user's own public key; their private key gets in.
    let tmp = tempfile::tempdir().expect("tmp");
    let own = tmp.path().join("id_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "me@test", "-f"])
        .arg(&own)
        .status();
    assert!(st.expect("ssh-keygen").success());
    let pubkey = std::fs::read_to_string(own.with_extension("pub")).expect("pub");
    let flag = format!("--ssh={}", own.with_extension("pub").display());
    let mut args = vec!["run", "-d", flag.as_str(), "--name", "s2", image.as_str()];
    args.extend(sshd);
    d.ok(&args);
    assert!(
        d.inspect("s2")["status"]["ssh_key_path"].is_null(),
        "no key generated when one is given"
    );
    assert_eq!(d.ok(&["exec", "s2", "--", "cat", "/root/.ssh/authorized_keys"]), pubkey);
    let perms =
        d.ok(&["exec", "s2", "--", "stat", "-c", "%a", "/root/.ssh", "/root/.ssh/authorized_keys"]);
    assert_eq!(perms, "700\n600\n");

    // Without --ssh, hearth ssh explains what to do; rm removes the generated key.
    d.ok(&["run", "-d", "--name", "plain", &image, "sleep", "1000"]);
    let out = d.hearth(&["ssh", "plain"]);
    assert!(text(&out.stderr).contains("not created with --ssh"), "{}", text(&out.stderr));
    d.ok(&["rm", "-f", "s1"]);
    assert!(!std::path::Path::new(&key).exists(), "the VM's key is removed with it");
}

/// Where this host's kernel has no macvtap, `--network macvtap:IFACE` fails at start with the
/// reason and the fix, and the VM can be removed; Firecracker, which cannot take a macvtap,
/// is refused at create.
#[test]
fn a_macvtap_network_without_macvtap_in_the_kernel_or_under_firecracker_is_refused_with_why() {
    require_e2e!();
    if hearth_e2e::kernel_has("macvtap") {
        eprintln!("skipped: this host's kernel has macvtap (the test-host guest covers it)");
        return;
    }
    let ns = hearth_e2e::Netns::new();
    let d = Daemon::start_in(&ns);
    d.import_kernel();
    // The daemon is in the namespace, away from a registry on the host's loopback.
    let layout = tempfile::tempdir().expect("tmp");
    let dir = layout.path().join("mv");
    hearth_e2e::testutil::busybox_oci_layout(&dir, "1", &TestImage::default()).expect("layout");
    d.ok(&["image", "import", dir.to_str().expect("utf8"), "--name", "mv:1"]);
    let image = "mv:1";
    d.ok(&["create", "--name", "m", "--network", "macvtap:lo", image]);
    let out = d.hearth(&["start", "m"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("macvtap") && err.contains("CONFIG_MACVTAP"), "{err}");
    d.ok(&["rm", "-f", "m"]);
    let out = d.hearth(&["create", "--network", "macvtap", image]);
    assert!(text(&out.stderr).contains("--parent-iface"), "{}", text(&out.stderr));
    let out = d.hearth(&["create", "--vmm", "firecracker", "--network", "macvtap:lo", image]);
    assert!(text(&out.stderr).contains("no macvtap interfaces"), "{}", text(&out.stderr));
}

/// hearth-init's DHCP client (what a workload on a macvtap LAN without `--ip` gets) against a
/// real DHCP server: dnsmasq in one network namespace, the client (`hearth-init dhcp`, outside a
/// VM) in another, a veth pair between them. It takes the lease, sets the address and default
/// route the server gave, and renews the lease.
#[test]
fn hearth_inits_dhcp_client_takes_and_renews_a_lease_from_a_real_server() {
    require_e2e!();
    let Some(dnsmasq) = hearth_e2e::which("dnsmasq") else {
        eprintln!("skipped: dnsmasq is not installed (cargo xtask deps installs dnsmasq-base)");
        return;
    };
    let init = std::env::var("HEARTH_INIT").expect("HEARTH_INIT");
    let (server, client) = (hearth_e2e::Netns::new(), hearth_e2e::Netns::new());
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", text(&o.stderr));
    };
    ok(server.run(&["ip", "link", "add", "dhs0", "type", "veth", "peer", "name", "dhc0"]));
    ok(server.run(&["ip", "link", "set", "dhc0", "netns", &client.name]));
    ok(server.run(&["ip", "addr", "add", "10.77.0.1/24", "dev", "dhs0"]));
    ok(server.run(&["ip", "link", "set", "dhs0", "up"]));
    let work = tempfile::tempdir().expect("tmp");
    let leases = work.path().join("leases");
    let mut dnsmasq = std::process::Command::new("ip")
        .args(["netns", "exec", &server.name])
        .arg(dnsmasq)
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--port=0",
            "--bind-interfaces",
        ])
        .args([
            "--interface=dhs0",
            "--except-interface=lo",
            "--dhcp-range=10.77.0.50,10.77.0.59,255.255.255.0,2m",
        ])
        .args([
            "--dhcp-option=option:router,10.77.0.1",
            "--dhcp-option=option:dns-server,10.77.0.53",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .args(["--pid-file=", "--user=root"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dnsmasq");
    let out = client.run(&[&init, "dhcp", "dhc0", "--renew"]);
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    // dnsmasq picks by the client's (random) MAC: any of .50-.59.
    assert!(said.contains("address: 10.77.0.5"), "an address from the range: {said}");
    for field in ["prefix: 24", "router: Some(10.77.0.1)", "dns: [10.77.0.53]", "lease_secs: 120"] {
        assert!(said.contains(field), "{field}: {said}");
    }
    assert!(said.lines().any(|l| l.starts_with("renewed ")), "{said}");
    let addr = text(&client.run(&["ip", "-4", "-o", "addr", "show", "dhc0"]).stdout);
    assert!(addr.contains("inet 10.77.0.5") && addr.contains("/24"), "{addr}");
    let route = text(&client.run(&["ip", "-4", "route", "show", "default"]).stdout);
    assert!(route.contains("default via 10.77.0.1 dev dhc0"), "{route}");
    let lease_file = std::fs::read_to_string(&leases).unwrap_or_default();
    assert!(lease_file.contains("probe"), "the server recorded the client's name: {lease_file}");
}

/// `--flintlock-reserve`: the bridge's allocator never hands out an address in a reserved
/// network (kube-vip's VIP, say), while a VM may still ask for one by name.
#[test]
fn reserved_bridge_addresses_are_never_allocated_but_may_be_asked_for() {
    require_e2e!();
    let d = Daemon::start_with(&["--flintlock-reserve", "10.61.0.2/31,10.61.0.5/32"]);
    d.import_kernel();
    let layout = tempfile::tempdir().expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(layout.path(), "1", &TestImage::default())
        .expect("layout");
    d.ok(&["image", "import", layout.path().to_str().expect("utf8"), "--name", "res:1"]);
    let address = |name: &str| d.inspect(name)["spec"]["address"].as_str().unwrap_or("").to_owned();
    for name in ["a", "b"] {
        d.ok(&["create", "--network", "bridge", "--name", name, "res:1"]);
    }
    assert_eq!((address("a"), address("b")), ("10.61.0.4".into(), "10.61.0.6".into()));
    d.ok(&["create", "--network", "bridge", "--ip", "10.61.0.5", "--name", "vip", "res:1"]);
    assert_eq!(address("vip"), "10.61.0.5", "asked for by name");
    let bad = std::process::Command::new(hearth_e2e::bin_dir().join("hearthd"))
        .args(["--root", "/nonexistent/hearth-e2e", "--flintlock-reserve", "10.61.0.0/40"])
        .output()
        .expect("hearthd");
    assert!(
        !bad.status.success() && text(&bad.stderr).contains("10.61.0.0/40"),
        "{}",
        text(&bad.stderr)
    );
}
