//! Flintlock's MicroVM API as its clients use it: a gRPC client on TCP, with the basic token,
//! creating a microVM from a kernel image and a full-OS root image in a local registry, then
//! getting, listing, and deleting it — the calls Cluster API Provider MicroVM makes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hearth_api::flintlock::types as fl;
use hearth_api::microvm::services::api::v1alpha1 as fpb;
use hearth_e2e::testutil::{push_image, LocalRegistry, TestImage};
use hearth_e2e::{require_e2e, Daemon, Netns};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "hearth-e2e-token";

type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = fpb::micro_vm_client::MicroVmClient<InterceptedService<Channel, Auth>>;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A daemon serving Flintlock's API in plaintext on a free loopback port, its microVMs on
/// user-mode NAT (the test's daemon runs in the host's own network namespace), with `extra`
/// flags; and the port.
fn plaintext_daemon(extra: &[&str]) -> (Daemon, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = ["--flintlock-listen", &listen, "--insecure", "--flintlock-network", "user"];
    (Daemon::start_with(&[&base[..], extra].concat()), port)
}

fn client(rt: &tokio::runtime::Runtime, port: u16, token: Option<&str>) -> Client {
    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{port}")).expect("endpoint");
    let channel = rt.block_on(connect(&endpoint)).expect("connecting to the Flintlock API");
    with_token(channel, token)
}

/// Connects, retrying while the daemon comes up.
async fn connect(
    endpoint: &tonic::transport::Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn with_token(channel: Channel, token: Option<&str>) -> Client {
    let header =
        token.map(|t| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(t)));
    let auth: Auth = Box::new(move |mut req| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.parse().expect("header"));
        }
        Ok(req)
    });
    fpb::micro_vm_client::MicroVmClient::with_interceptor(channel, auth)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).expect("base64"))
        .expect("utf8")
}

/// An Ignite-style kernel image's layer (/boot/vmlinux and the guest's modules).
fn kernel_layer() -> Vec<u8> {
    let kernel = std::path::PathBuf::from(std::env::var("HEARTH_TEST_KERNEL").expect("kernel"));
    let modules = std::path::PathBuf::from(std::env::var("HEARTH_TEST_MODULES").expect("modules"));
    let keep =
        hearth_kernel::modules::closure(&modules, hearth_kernel::GUEST_MODULES).expect("closure");
    hearth_e2e::testutil::kernel_layer(&kernel, &modules, &keep).expect("kernel layer")
}

/// A full-OS root image: busybox's init, which prints the cloud-init seed it finds.
fn os_image() -> TestImage {
    let inittab =
        "::sysinit:/bin/sh -c 'echo full-os-booted; cat /var/lib/cloud/seed/nocloud/meta-data'\n\
                   ::respawn:/bin/sleep 3600\n\
                   ::shutdown:/bin/echo full-os-shutting-down\n";
    TestImage { inittab: Some(inittab.into()), ..Default::default() }
}

/// A registry with the kernel image and the full-OS root image.
fn registry() -> (LocalRegistry, String, String) {
    let reg = LocalRegistry::start().expect("registry");
    hearth_e2e::testutil::push_layer(&reg, "kernel-bin:6.1", &kernel_layer()).expect("push kernel");
    push_image(&reg, "os:1", &os_image()).expect("push os");
    let (k, r) = (format!("{}/kernel-bin:6.1", reg.host()), format!("{}/os:1", reg.host()));
    (reg, k, r)
}

/// Imports the kernel and OS images under the names specs use, so they are not pulled.
fn import_images(d: &Daemon) -> (&'static str, &'static str) {
    let dir = tempfile::tempdir().expect("tmp");
    let (kernel, root) = ("registry.invalid/kernel-bin:6.1", "registry.invalid/os:1");
    hearth_e2e::testutil::oci_layout(&dir.path().join("k"), "t", &kernel_layer(), "")
        .expect("kernel layout");
    hearth_e2e::testutil::busybox_oci_layout(&dir.path().join("os"), "t", &os_image())
        .expect("os layout");
    d.ok(&["image", "import", dir.path().join("k").to_str().expect("utf8"), "--name", kernel]);
    d.ok(&["image", "import", dir.path().join("os").to_str().expect("utf8"), "--name", root]);
    (kernel, root)
}

fn spec(name: &str, kernel: &str, root: &str) -> fl::MicroVmSpec {
    fl::MicroVmSpec {
        id: name.into(),
        namespace: "ns0".into(),
        labels: HashMap::from([("cluster-name".into(), "c1".into())]),
        vcpu: 1,
        memory_in_mb: 256,
        kernel: Some(fl::Kernel {
            image: kernel.into(),
            filename: Some("boot/vmlinux".into()),
            add_network_config: true,
            ..Default::default()
        }),
        root_volume: Some(fl::Volume {
            id: "root".into(),
            source: Some(fl::VolumeSource {
                container_source: Some(root.into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        interfaces: vec![fl::NetworkInterface {
            device_id: "eth1".into(),
            r#type: fl::network_interface::IfaceType::Tap as i32,
            ..Default::default()
        }],
        metadata: HashMap::from([
            ("meta-data".into(), b64("local_hostname: mvm0\nplatform: liquid_metal\n")),
            ("user-data".into(), b64("#cloud-config\nfinal_message: hello\n")),
        ]),
        ..Default::default()
    }
}

fn get(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    uid: &str,
) -> Result<fl::MicroVm, tonic::Status> {
    rt.block_on(c.get_micro_vm(fpb::GetMicroVmRequest { uid: uid.into() }))
        .map(|r| r.into_inner().microvm.expect("microvm"))
}

fn state(vm: &fl::MicroVm) -> fl::micro_vm_status::MicroVmState {
    vm.status.as_ref().expect("status").state()
}

/// Polls Get until `pred` holds, failing with the last answer and the daemon's log.
fn wait_get(
    rt: &tokio::runtime::Runtime,
    c: &mut Client,
    d: &Daemon,
    uid: &str,
    what: &str,
    pred: impl Fn(&Result<fl::MicroVm, tonic::Status>) -> bool,
) -> Result<fl::MicroVm, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = get(rt, c, uid);
        if pred(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "microvm {uid} never became {what}; last: {got:?}\n--- hearthd log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_flintlock_client_creates_gets_lists_and_deletes_a_microvm() {
    require_e2e!();
    let (_reg, kernel, root) = registry();
    // Host directories under this one may be shared with microVMs (virtiofs_source).
    let shares = tempfile::tempdir().expect("shares");
    let shared = shares.path().join("mvm0");
    std::fs::create_dir(&shared).expect("shared");
    std::fs::write(shared.join("hello"), "from the host's directory\n").expect("hello");
    let root_flag = shares.path().display().to_string();
    let (d, port) = plaintext_daemon(&["--basic-auth-token", TOKEN, "--virtiofs-root", &root_flag]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // Without the token (or with the wrong one): UNAUTHENTICATED.
    for token in [None, Some("wrong")] {
        let mut anon = client(&rt, port, token);
        let e = rt
            .block_on(anon.list_micro_v_ms(fpb::ListMicroVMsRequest::default()))
            .expect_err("unauthenticated");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }

    let mut c = client(&rt, port, Some(TOKEN));
    // Volumes as CAPMVM's templates use them: the kernel image's modules, read-only, and a
    // writable one.
    let volume = |id: &str, image: &str, mount: &str, ro: bool| fl::Volume {
        id: id.into(),
        is_read_only: ro,
        mount_point: Some(mount.into()),
        source: Some(fl::VolumeSource {
            container_source: Some(image.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    // And a block device of the host's (a loop device over an ext4 file here).
    let work = tempfile::tempdir().expect("tmp");
    let disk = work.path().join("host.img");
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).expect("tree");
    std::fs::write(tree.join("hello"), "from the host's disk\n").expect("hello");
    std::fs::File::create(&disk).and_then(|f| f.set_len(16 << 20)).expect("disk");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk)
        .status();
    assert!(made.expect("mkfs.ext4").success());
    let loopdev = LoopDev::attach(&disk);
    let mut first = spec("mvm0", &kernel, &root);
    let virtiofs = |dir: &str| fl::Volume {
        id: "shared".into(),
        mount_point: Some("/shared".into()),
        source: Some(fl::VolumeSource { virtiofs_source: Some(dir.into()), ..Default::default() }),
        ..Default::default()
    };
    // A directory outside --virtiofs-root is refused at once.
    let mut outside = spec("outside", &kernel, &root);
    outside.additional_volumes = vec![virtiofs(&work.path().display().to_string())];
    let e = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(outside),
            metadata: HashMap::new(),
        }))
        .expect_err("outside the shared roots");
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("--virtiofs-root"),
        "{e:?}"
    );
    first.additional_volumes = vec![
        volume("modules", &kernel, "/mnt/modules", true),
        volume("data", &root, "/data", false),
        volume("hostdisk", &loopdev.0, "/hostdisk", false),
        virtiofs(&shared.display().to_string()),
    ];
    let created = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(first.clone()),
            metadata: HashMap::new(),
        }))
        .expect("create")
        .into_inner()
        .microvm
        .expect("microvm");
    // Flintlock's contract: at once, version 1, PENDING, uid set, instance_id in the meta-data.
    let s = created.spec.clone().expect("spec");
    let uid = s.uid.clone().expect("uid");
    assert_eq!(uid.len(), 26, "a ULID: {uid}");
    assert_eq!(created.version, 1);
    assert_eq!(state(&created), fl::micro_vm_status::MicroVmState::Pending);
    let meta = unb64(&s.metadata["meta-data"]);
    assert!(
        meta.contains(&format!("instance_id: {uid}")) && meta.contains("local_hostname: mvm0"),
        "{meta}"
    );
    let mac = s.interfaces[0].guest_mac.clone().expect("a MAC is filled in");
    assert_eq!(s.labels["cluster-name"], "c1", "labels are echoed back");

    let up = wait_get(&rt, &mut c, &d, &uid, "CREATED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
    })
    .expect("get");
    // Each change of what Get reports is a new version; asking again changes nothing.
    assert!(up.version > 1, "PENDING then CREATED: {}", up.version);
    let again = get(&rt, &mut c, &uid).expect("get");
    assert_eq!(again.version, up.version);
    let status = up.status.expect("status");
    assert_eq!(status.network_interfaces["eth1"].mac_address, mac);
    // Every volume is reported with the host file (or device) behind it.
    let hostdisk = status.volumes.get("hostdisk").and_then(|v| v.mount.as_ref());
    assert_eq!(hostdisk.map(|m| m.source.as_str()), Some(loopdev.0.as_str()));
    let share = status.volumes.get("shared").and_then(|v| v.mount.as_ref());
    let real = std::fs::canonicalize(&shared).expect("real").display().to_string();
    assert_eq!(share.map(|m| m.source.as_str()), Some(real.as_str()));
    for id in ["root", "modules", "data"] {
        let source = status
            .volumes
            .get(id)
            .and_then(|v| v.mount.as_ref())
            .map(|m| m.source.clone())
            .unwrap_or_default();
        assert!(std::path::Path::new(&source).is_file(), "volume {id}: {source:?}");
    }

    // The image's own init is PID 1, the agent still answers, and cloud-init's seed is there.
    let vm = "mvm0.ns0";
    assert_eq!(d.ok(&["exec", vm, "--", "cat", "/proc/1/comm"]).trim(), "init");
    let seeded = d.ok(&["exec", vm, "--", "cat", "/var/lib/cloud/seed/nocloud/meta-data"]);
    assert!(seeded.contains(&format!("instance_id: {uid}")), "{seeded}");
    assert!(d
        .ok(&["exec", vm, "--", "cat", "/var/lib/cloud/seed/nocloud/user-data"])
        .contains("final_message: hello"));
    let netcfg = d.ok(&["exec", vm, "--", "cat", "/var/lib/cloud/seed/nocloud/network-config"]);
    assert!(netcfg.contains(&mac) && netcfg.contains("eth1"), "{netcfg}");
    assert!(d.ok(&["logs", vm]).contains("full-os-booted"));
    let mounts = d.ok(&["exec", vm, "--", "cat", "/proc/mounts"]);
    let mount = |at: &str| {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(at))
            .unwrap_or_else(|| panic!("{at} not mounted:\n{mounts}"))
            .to_owned()
    };
    assert!(mount("/mnt/modules").contains(" ext4 ro"), "{}", mount("/mnt/modules"));
    assert!(mount("/data").contains(" ext4 rw"), "{}", mount("/data"));
    assert!(
        !d.ok(&["exec", vm, "--", "ls", "/mnt/modules/lib/modules"]).trim().is_empty(),
        "the kernel image's modules are in the volume"
    );
    d.ok(&["exec", vm, "--", "sh", "-c", "echo kept > /data/written && cat /data/written"]);
    let refused = d.hearth(&["exec", vm, "--", "touch", "/mnt/modules/x"]);
    assert!(!refused.status.success(), "a read-only volume refuses writes");
    // The host's block device is the guest's disk: read there, written back to it.
    assert_eq!(d.ok(&["exec", vm, "--", "cat", "/hostdisk/hello"]), "from the host's disk\n");
    d.ok(&["exec", vm, "--", "sh", "-c", "echo from-the-guest > /hostdisk/back; sync"]);
    // The virtiofs_source directory is shared live: read in the guest, written back at once.
    assert!(mount("/shared").contains(" virtiofs rw"), "{}", mount("/shared"));
    assert_eq!(d.ok(&["exec", vm, "--", "cat", "/shared/hello"]), "from the host's directory\n");
    d.ok(&["exec", vm, "--", "sh", "-c", "echo from-the-guest > /shared/back"]);
    assert_eq!(std::fs::read_to_string(shared.join("back")).expect("back"), "from-the-guest\n");

    // Listing: by namespace, by name ("" is no filter), all namespaces; the stream.
    let list = |c: &mut Client, ns: &str, name: Option<&str>| {
        let req = fpb::ListMicroVMsRequest { namespace: ns.into(), name: name.map(Into::into) };
        rt.block_on(c.list_micro_v_ms(req)).expect("list").into_inner().microvm.len()
    };
    assert_eq!(list(&mut c, "ns0", None), 1);
    assert_eq!(list(&mut c, "ns0", Some("")), 1);
    assert_eq!(list(&mut c, "ns0", Some("mvm0")), 1);
    assert_eq!(list(&mut c, "ns0", Some("other")), 0);
    assert_eq!(list(&mut c, "", None), 1);
    assert_eq!(list(&mut c, "elsewhere", None), 0);
    let streamed = rt.block_on(async {
        let mut s = c
            .list_micro_v_ms_stream(fpb::ListMicroVMsRequest {
                namespace: "ns0".into(),
                name: None,
            })
            .await
            .expect("stream")
            .into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await.expect("message") {
            assert_eq!(
                m.microvm.and_then(|v| v.spec).and_then(|s| s.uid).as_deref(),
                Some(uid.as_str())
            );
            n += 1;
        }
        n
    });
    assert_eq!(streamed, 1);
    let e = rt
        .block_on(c.list_micro_v_ms_stream(fpb::ListMicroVMsRequest::default()))
        .map(drop)
        .expect_err("namespace required");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The same create again (CAPMVM retrying one whose answer it lost, with a new MAC): OK, the
    // microVM that exists.
    let mut again = first.clone();
    again.interfaces[0].guest_mac = Some("02:aa:bb:cc:dd:ee".into());
    let same = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(again),
            metadata: HashMap::new(),
        }))
        .expect("a repeated create")
        .into_inner();
    let same = same.microvm.and_then(|m| m.spec).expect("spec");
    assert_eq!(same.uid.as_deref(), Some(uid.as_str()), "the existing microVM");
    assert_eq!(same.interfaces[0].guest_mac.as_deref(), Some(mac.as_str()), "with its own MAC");
    // The same namespace/name with another spec is refused; bad specs are refused naming the
    // field.
    let dup = rt.block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
        microvm: Some(spec("mvm0", &kernel, &root)),
        metadata: HashMap::new(),
    }));
    assert_eq!(dup.expect_err("duplicate").code(), tonic::Code::AlreadyExists);
    let mut bad = spec("bad", &kernel, &root);
    bad.root_volume = None;
    let e = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(bad),
            metadata: HashMap::new(),
        }))
        .expect_err("no root");
    assert!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("root_volume"),
        "{e:?}"
    );

    // Unknown uids: NOT_FOUND, with the "not found" text CAPMVM matches; an empty one is
    // INVALID_ARGUMENT, saying "not found" too.
    let e = get(&rt, &mut c, "01ARZ3NDEKTSV4RRFFQ69G5FAV").expect_err("unknown");
    assert!(e.code() == tonic::Code::NotFound && e.message().contains("not found"), "{e:?}");
    let e = get(&rt, &mut c, "").expect_err("empty");
    assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("not found"), "{e:?}");

    // Delete: DELETING, then gone from Get and List, and the VM and its QEMU with it.
    rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() })).expect("delete");
    let gone = wait_get(&rt, &mut c, &d, &uid, "gone", |g| {
        g.as_ref().is_err_and(|e| e.code() == tonic::Code::NotFound)
    });
    assert!(gone.expect_err("gone").message().contains("not found"));
    assert_eq!(list(&mut c, "", None), 0);
    assert!(!d.ok(&["ps", "-a"]).contains(vm));
    assert!(
        hearth_e2e::qemu_processes(&d.root.path().display().to_string()).is_empty(),
        "QEMU left running"
    );
    // The host's device is left as it was, with what the guest wrote.
    drop(loopdev);
    let back = std::process::Command::new("debugfs").args(["-R", "cat /back"]).arg(&disk).output();
    assert_eq!(String::from_utf8_lossy(&back.expect("debugfs").stdout), "from-the-guest\n");
}

/// A loop device over a file, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &std::path::Path) -> Self {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Self(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_microvm_whose_kernel_cannot_be_found_fails_with_the_reason() {
    require_e2e!();
    let (_reg, kernel, root) = registry();
    let (d, port) = plaintext_daemon(&[]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, None);
    let mut s = spec("nokernel", &kernel, &root);
    s.kernel.as_mut().expect("kernel").filename = Some("boot/nope".into());
    let created = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(s),
            metadata: HashMap::new(),
        }))
        .expect("create");
    let uid = created.into_inner().microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid");
    let failed = wait_get(&rt, &mut c, &d, &uid, "FAILED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Failed)
    })
    .expect("get");
    let reason = failed.status.expect("status").reason;
    assert!(reason.contains("boot/nope"), "{reason}");
    // A failed microVM can be deleted like any other.
    rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() })).expect("delete");
    wait_get(&rt, &mut c, &d, &uid, "gone", |g| {
        g.as_ref().is_err_and(|e| e.code() == tonic::Code::NotFound)
    })
    .expect_err("gone");
}

/// A self-signed certificate for localhost (not a CA, as rustls wants of an end entity).
fn self_signed(dir: &std::path::Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
        ])
        .arg(format!("/CN={name}"))
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (cargo xtask deps installs it)");
    assert!(out.status.success(), "openssl: {}", hearth_e2e::text(&out.stderr));
    (std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key"))
}

#[test]
fn the_flintlock_api_speaks_tls_and_mutual_tls() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    require_e2e!();
    let certs = tempfile::tempdir().expect("tmp");
    let (server_cert, _) = self_signed(certs.path(), "server");
    let (client_cert, client_key) = self_signed(certs.path(), "client");
    let path = |n: &str| certs.path().join(n).display().to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let list = |channel: Channel| {
        let mut c = with_token(channel, None);
        rt.block_on(c.list_micro_v_ms(fpb::ListMicroVMsRequest::default()))
            .map(|r| r.into_inner().microvm.len())
    };
    let tls = |port: u16, identity: bool| {
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&server_cert))
            .domain_name("localhost");
        if identity {
            cfg = cfg.identity(Identity::from_pem(&client_cert, &client_key));
        }
        let endpoint = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(cfg)
            .expect("tls");
        rt.block_on(connect(&endpoint))
    };

    // Server TLS: a client trusting the certificate gets answers; a plaintext one does not.
    // A daemon serving TLS with the server's certificate, plus `extra` flags.
    let tls_daemon = |port: u16, extra: &[&str]| {
        let listen = format!("127.0.0.1:{port}");
        let (cert, key) = (path("server.pem"), path("server.key"));
        let args = [
            &[
                "--flintlock-listen",
                listen.as_str(),
                "--tls-cert",
                cert.as_str(),
                "--tls-key",
                key.as_str(),
            ][..],
            extra,
        ]
        .concat();
        Daemon::start_with(&args)
    };
    let port = free_port();
    let _d = tls_daemon(port, &[]);
    assert_eq!(list(tls(port, false).expect("TLS connect")).expect("list over TLS"), 0);
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}")).expect("endpoint");
    let refused = rt.block_on(plain.connect()).map(list);
    assert!(!matches!(refused, Ok(Ok(_))), "plaintext was answered on a TLS listener");

    // TLS 1.3 unless told: a client that speaks at most TLS 1.2 is refused.
    let handshake = |port: u16, version: &str| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", version, "-connect", &format!("127.0.0.1:{port}")])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl s_client");
        // "New, TLSv1.3, Cipher is ...": a handshake done ("New, (NONE)" when refused).
        String::from_utf8_lossy(&out.stdout).contains("New, TLSv1.")
    };
    assert!(handshake(port, "-tls1_3") && !handshake(port, "-tls1_2"), "only TLS 1.3");
    let port12 = free_port();
    let _v = tls_daemon(port12, &["--tls-min-version", "1.2"]);
    // hearthd answers on its socket before its TCP listener is up: retried until it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !handshake(port12, "-tls1_2") {
        assert!(Instant::now() < deadline, "--tls-min-version 1.2 takes TLS 1.2");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Mutual TLS (--tls-client-validate, as Flintlock): without a client certificate from the
    // CA, no answer.
    let port = free_port();
    let _m = tls_daemon(port, &["--tls-client-ca", &path("client.pem"), "--tls-client-validate"]);
    assert_eq!(list(tls(port, true).expect("mTLS connect")).expect("list over mTLS"), 0);
    let anonymous = tls(port, false).map(list);
    assert!(
        !matches!(anonymous, Ok(Ok(_))),
        "a client without a certificate was answered under mutual TLS"
    );
    // A CA without --tls-client-validate: a client may come without a certificate, or with one
    // the CA signed.
    let port = free_port();
    let _o = tls_daemon(port, &["--tls-client-ca", &path("client.pem")]);
    assert_eq!(list(tls(port, false).expect("TLS connect")).expect("anonymous"), 0);
    assert_eq!(list(tls(port, true).expect("TLS connect")).expect("with its certificate"), 0);
}

#[test]
fn hearthd_refuses_unsafe_or_contradictory_listener_flags() {
    require_e2e!();
    let root = tempfile::tempdir().expect("tmp");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(hearth_e2e::bin_dir().join("hearthd"))
            .arg("--root")
            .arg(root.path())
            .args(extra)
            .output()
            .expect("hearthd");
        assert!(!out.status.success(), "hearthd {extra:?} started");
        hearth_e2e::text(&out.stderr)
    };
    let listen = ["--flintlock-listen", "127.0.0.1:1"];
    assert!(run(&listen).contains("--insecure"), "plaintext TCP must be asked for");
    let both = [&listen[..], &["--insecure", "--tls-cert", "/nonexistent"]].concat();
    assert!(run(&both).contains("cannot be combined"));
    assert!(run(&["--insecure"]).contains("--flintlock-listen"));
}

#[test]
fn microvms_on_the_bridge_get_their_addresses_and_reach_each_other() {
    require_e2e!();
    let ns = Netns::new();
    // The default --flintlock-network is the bridge: hearthd runs inside the test's namespace.
    let d = Daemon::start_in(&ns);
    // Images already in the store are not pulled again: import them under the specs' names.
    let (kernel, root) = import_images(&d);

    // Flintlock's service is on hearthd's Unix socket too.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c =
        with_token(rt.block_on(hearth_api::connect_unix(d.socket.clone())).expect("socket"), None);
    let mut create = |name: &str, address: Option<&str>| {
        let mut s = spec(name, kernel, root);
        s.interfaces[0].address = address.map(|a| fl::StaticAddress {
            address: a.into(),
            gateway: Some("10.61.0.1".into()),
            nameservers: vec![],
        });
        // The microVM with a static address has a second card on the bridge, with one too.
        if address.is_some() {
            s.interfaces.push(fl::NetworkInterface {
                device_id: "eth2".into(),
                r#type: fl::network_interface::IfaceType::Tap as i32,
                address: Some(fl::StaticAddress {
                    address: "10.61.0.51/16".into(),
                    gateway: None,
                    nameservers: vec![],
                }),
                ..Default::default()
            });
        }
        let out = rt
            .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
                microvm: Some(s),
                metadata: HashMap::new(),
            }))
            .expect("create");
        out.into_inner().microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid")
    };
    let (fixed, dynamic) = (create("fixed", Some("10.61.0.50/16")), create("dynamic", None));
    // The static address is promised at once: a second microVM cannot have it, even while the
    // first is still pulling.
    let mut dup = spec("dup", kernel, root);
    dup.interfaces[0].address = Some(fl::StaticAddress {
        address: "10.61.0.50/16".into(),
        gateway: None,
        nameservers: vec![],
    });
    let e = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(dup),
            metadata: HashMap::new(),
        }))
        .expect_err("taken");
    assert!(e.code() == tonic::Code::AlreadyExists && e.message().contains("10.61.0.50"), "{e:?}");
    for (uid, cards) in [(&fixed, &["eth1", "eth2"][..]), (&dynamic, &["eth1"][..])] {
        let up = wait_get(&rt, &mut c, &d, uid, "CREATED", |g| {
            g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
        })
        .expect("get");
        let status = up.status.expect("status");
        assert_eq!(status.network_interfaces.len(), cards.len(), "{status:?}");
        let mut taps = std::collections::BTreeSet::new();
        for card in cards {
            let iface = &status.network_interfaces[*card];
            assert!(iface.host_device_name.starts_with("ht"), "the tap is reported: {iface:?}");
            let path = format!("/sys/class/net/{}/ifindex", iface.host_device_name);
            let index = String::from_utf8_lossy(&ns.run(&["cat", &path]).stdout).trim().to_owned();
            assert_eq!(iface.index.to_string(), index, "with its interface index: {iface:?}");
            let on_bridge = ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]);
            let on_bridge = String::from_utf8_lossy(&on_bridge.stdout).into_owned();
            assert!(on_bridge.contains(&iface.host_device_name), "{iface:?}: {on_bridge}");
            taps.insert(iface.host_device_name.clone());
        }
        assert_eq!(taps.len(), cards.len(), "each card has its own tap: {taps:?}");
    }
    // The static address is the guest's, and cloud-init's network-config says the same.
    assert!(d
        .ok(&["exec", "fixed.ns0", "--", "busybox", "ip", "-4", "addr"])
        .contains("inet 10.61.0.50/16"));
    let netcfg =
        d.ok(&["exec", "fixed.ns0", "--", "cat", "/var/lib/cloud/seed/nocloud/network-config"]);
    assert!(netcfg.contains("10.61.0.50/16") && netcfg.contains("via: 10.61.0.1"), "{netcfg}");
    // The second card has its address in the guest and in network-config, named as asked.
    assert!(d
        .ok(&["exec", "fixed.ns0", "--", "busybox", "ip", "-4", "addr"])
        .contains("inet 10.61.0.51/16"));
    assert!(netcfg.contains("eth2:") && netcfg.contains("10.61.0.51/16"), "{netcfg}");
    assert_eq!(netcfg.matches("to: default").count(), 1, "one default route: {netcfg}");
    // The other got an address of its own, and the two reach each other.
    let other = d.inspect("dynamic.ns0")["status"]["ip"].as_str().expect("ip").to_owned();
    assert!(other.starts_with("10.61.") && other != "10.61.0.50", "{other}");
    let ping = d.hearth(&[
        "exec",
        "dynamic.ns0",
        "--",
        "busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "10",
        "10.61.0.50",
    ]);
    assert!(
        ping.status.success(),
        "{}{}",
        hearth_e2e::text(&ping.stdout),
        hearth_e2e::text(&ping.stderr)
    );

    for uid in [&fixed, &dynamic] {
        rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() }))
            .expect("delete");
    }
    for uid in [&fixed, &dynamic] {
        wait_get(&rt, &mut c, &d, uid, "gone", |g| {
            g.as_ref().is_err_and(|e| e.code() == tonic::Code::NotFound)
        })
        .expect_err("gone");
    }
    let taps = hearth_e2e::text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert!(taps.is_empty(), "taps left: {taps}");
}

#[test]
fn a_delete_behind_a_stalled_pull_completes() {
    require_e2e!();
    let reg = hearth_e2e::StallingRegistry::start();
    // A timeout far longer than the test: the delete must not wait for it.
    let (d, port) = plaintext_daemon(&["--registry-timeout", "10m"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, None);
    let s = spec("stalled", &reg.image(), &reg.image());
    let vm = rt
        .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
            microvm: Some(s),
            metadata: HashMap::new(),
        }))
        .expect("create")
        .into_inner();
    let uid = vm.microvm.expect("microvm").spec.expect("spec").uid.expect("uid");
    // The kernel image's pull is under way (and stalled) when the delete comes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(d.root.path().join("images/tmp")).is_ok_and(|mut r| r.next().is_some())
    {
        assert!(Instant::now() < deadline, "the pull never started:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let asked = Instant::now();
    rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() })).expect("delete");
    wait_get(
        &rt,
        &mut c,
        &d,
        &uid,
        "deleted",
        |g| matches!(g, Err(s) if s.code() == tonic::Code::NotFound),
    )
    .expect_err("gone");
    assert!(
        asked.elapsed() < Duration::from_secs(60),
        "the delete waited {:?} behind the pull",
        asked.elapsed()
    );
}

/// Whether the real `vmm` is here; says why not.
fn have(vmm: &str) -> bool {
    let found = hearth_e2e::which(vmm).is_some();
    if !found {
        eprintln!("skipped: {vmm} is not on PATH (.ci/run puts ../shared/vmm/bin there)");
    }
    found
}

#[test]
fn microvms_asking_for_firecracker_or_cloudhypervisor_run_under_it_with_their_metadata() {
    require_e2e!();
    if !have("firecracker") || !have("cloud-hypervisor") {
        return;
    }
    let ns = Netns::new();
    let d = Daemon::start_in(&ns);
    let (kernel, root) = import_images(&d);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c =
        with_token(rt.block_on(hearth_api::connect_unix(d.socket.clone())).expect("socket"), None);
    let mut uids = Vec::new();
    for (name, provider) in [("fc", "firecracker"), ("ch", "cloudhypervisor")] {
        let mut s = spec(name, kernel, root);
        s.provider = Some(provider.into());
        let created = rt
            .block_on(c.create_micro_vm(fpb::CreateMicroVmRequest {
                microvm: Some(s),
                metadata: HashMap::new(),
            }))
            .expect("create")
            .into_inner();
        uids.push(created.microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid"));
    }

    // Each runs under the VMM it asked for, once its images are in.
    let launched = |vm: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = d.hearth(&["inspect", vm]);
            if out.status.success() {
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("inspect json");
                if v[0]["status"]["pid"].as_i64().is_some() {
                    return v[0].clone();
                }
            }
            assert!(Instant::now() < deadline, "{vm} never got a VMM:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let fc = launched("fc.ns0");
    assert_eq!(fc["spec"]["provider"], "firecracker", "{fc:#}");
    let fc_dir = d.root.path().join("vms").join(fc["spec"]["id"].as_str().expect("id"));
    let api = hearth_vmm::http::Api::firecracker(&hearth_vmm::jail::host_path(
        &fc_dir,
        hearth_vmm::firecracker::API_SOCK,
    ));
    // MMDS serves the microVM's cloud-init data, instance_id included, on its card.
    let mmds = api.get("/mmds").expect("mmds");
    let meta = mmds["latest"]["meta-data"].as_str().unwrap_or_default();
    assert!(meta.contains(&format!("instance_id: {}", uids[0])), "{mmds:#}");
    assert!(mmds["latest"]["user-data"].as_str().is_some_and(|u| u.contains("final_message")));
    let config = api.get("/vm/config").expect("config");
    assert_eq!(config["mmds-config"]["version"], "V2", "{config:#}");
    assert_eq!(config["machine-config"]["mem_size_mib"], 256);
    let card = config["network-interfaces"][0]["host_dev_name"].as_str().unwrap_or_default();
    assert!(card.starts_with("ht"), "the card is hearth's tap: {config:#}");

    let ch = launched("ch.ns0");
    assert_eq!(ch["spec"]["provider"], "cloud-hypervisor", "{ch:#}");
    let ch_dir = d.root.path().join("vms").join(ch["spec"]["id"].as_str().expect("id"));
    // Confined in its jail, where its API socket is.
    let api = hearth_vmm::http::Api::cloud_hypervisor(&hearth_vmm::jail::host_path(
        &ch_dir,
        hearth_vmm::cloud_hypervisor::API_SOCK,
    ));
    let info = api.get("/api/v1/vm.info").expect("vm.info");
    let config = &info["config"];
    assert_eq!(config["memory"]["size"], 256u64 << 20, "{info:#}");
    assert!(config["net"][0]["tap"].as_str().is_some_and(|t| t.starts_with("ht")), "{info:#}");
    assert_eq!(config["disks"][0]["serial"], "hearth_root");
    assert!(config["vsock"]["socket"].as_str().is_some_and(|s| s.ends_with("/agent.sock")));

    for uid in &uids {
        rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() }))
            .expect("delete");
    }
    for uid in &uids {
        wait_get(&rt, &mut c, &d, uid, "gone", |g| {
            g.as_ref().is_err_and(|e| e.code() == tonic::Code::NotFound)
        })
        .expect_err("gone");
    }
    let taps = hearth_e2e::text(&ns.run(&["ip", "-o", "link", "show", "master", "hearth0"]).stdout);
    assert!(taps.is_empty(), "taps left: {taps}");
    assert!(!fc_dir.exists() && !ch_dir.exists(), "VM directories left behind");
}

/// What CAPMVM relies on when a node's VM ends: its microVM is restarted without a client's
/// call (PENDING meanwhile, CREATED again), after its VMM is killed and after a host reboot
/// (hearthd and the VMM both killed, hearthd started); a microVM whose VM cannot stay up is
/// FAILED once it crash-loops, with the reason.
#[test]
fn a_microvm_whose_vm_ends_is_restarted_and_failed_only_after_a_crash_loop() {
    require_e2e!();
    let (mut d, port) = plaintext_daemon(&[]);
    let (kernel, root) = import_images(&d);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, None);
    let create = |c: &mut Client, spec: fl::MicroVmSpec| {
        let req = fpb::CreateMicroVmRequest { microvm: Some(spec), metadata: HashMap::new() };
        let created = rt.block_on(c.create_micro_vm(req)).expect("create").into_inner();
        created.microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid")
    };
    // As CAPMVM builds a node: the kernel image's modules as a read-only volume, a MACVTAP
    // interface with a guest MAC (on --flintlock-network here: this host has no macvtap), and
    // meta-data, user-data and vendor-data.
    let mut node = spec("node", kernel, root);
    node.additional_volumes = vec![fl::Volume {
        id: "modules".into(),
        is_read_only: true,
        mount_point: Some("/lib/modules".into()),
        source: Some(fl::VolumeSource {
            container_source: Some(kernel.into()),
            ..Default::default()
        }),
        ..Default::default()
    }];
    node.interfaces[0].r#type = fl::network_interface::IfaceType::Macvtap as i32;
    node.interfaces[0].guest_mac = Some("02:12:34:56:78:9a".into());
    node.metadata.insert("vendor-data".into(), b64("#cloud-config\nruncmd: []\n"));
    let uid = create(&mut c, node);
    let created = |g: &Result<fl::MicroVm, tonic::Status>| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
    };
    wait_get(&rt, &mut c, &d, &uid, "CREATED", created).expect("get");
    let vm = "node.ns0";
    let boots = |d: &Daemon| d.inspect(vm)["status"]["boots"].as_i64().unwrap_or(0);
    let vmm_pid =
        |d: &Daemon| d.inspect(vm)["status"]["pid"].as_i64().expect("a running VMM").to_string();
    let kill = |pid: String| {
        let st = std::process::Command::new("kill").args(["-9", &pid]).status();
        assert!(st.expect("kill").success());
    };

    // The VMM killed: PENDING while it restarts, CREATED again, nobody asking.
    kill(vmm_pid(&d));
    wait_get(&rt, &mut c, &d, &uid, "CREATED after a VMM crash", |g| created(g) && boots(&d) == 2)
        .expect("get");

    // A host reboot: the daemon and the VMM gone, the daemon started again.
    let pid = vmm_pid(&d);
    d.kill9();
    kill(pid);
    d.spawn();
    let mut c = client(&rt, port, None);
    wait_get(&rt, &mut c, &d, &uid, "CREATED after a reboot", |g| created(g) && boots(&d) == 3)
        .expect("get");

    // A root image without an init: each boot ends at once, and after the crash loop the
    // microVM is FAILED, saying so.
    let plain = tempfile::tempdir().expect("tmp");
    hearth_e2e::testutil::busybox_oci_layout(plain.path(), "t", &TestImage::default())
        .expect("layout");
    d.ok(&[
        "image",
        "import",
        plain.path().to_str().expect("utf8"),
        "--name",
        "registry.invalid/plain:1",
    ]);
    let doomed = create(&mut c, spec("doomed", kernel, "registry.invalid/plain:1"));
    let failed = wait_get(&rt, &mut c, &d, &doomed, "FAILED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Failed)
    })
    .expect("get");
    let reason = failed.status.expect("status").reason;
    assert!(reason.starts_with("crash loop: restarted 5 times in a row"), "{reason}");
}

/// Names and metadata as CAPMVM and the fl CLI send them: a 90-character id and namespace; a
/// gzip-compressed user-data (valid cloud-init) that reaches the guest byte for byte; a value
/// that is not base64 (taken as it is) and a key that is not cloud-init's, both echoed by Get.
#[test]
fn long_names_raw_and_binary_metadata_and_unknown_keys_are_taken_as_flintlock_takes_them() {
    require_e2e!();
    let (d, port) = plaintext_daemon(&[]);
    let (kernel, root) = import_images(&d);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, None);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"#cloud-config\nfinal_message: zipped\n").expect("gzip");
    let user_data = gz.finish().expect("gzip");
    let mut s = spec(&"n".repeat(90), kernel, root);
    s.namespace = "s".repeat(90);
    s.metadata.insert("user-data".into(), b64_bytes(&user_data));
    s.metadata.insert("vendor-data".into(), "#cloud-config raw, not base64\n".into());
    s.metadata.insert("capmvm-extra".into(), b64("kept"));
    let req = fpb::CreateMicroVmRequest { microvm: Some(s), metadata: HashMap::new() };
    let created = rt.block_on(c.create_micro_vm(req)).expect("create").into_inner();
    let uid = created.microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid");
    let up = wait_get(&rt, &mut c, &d, &uid, "CREATED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
    })
    .expect("get");
    let spec = up.spec.expect("spec");
    assert_eq!((spec.id.len(), spec.namespace.len()), (90, 90), "its own id and namespace");
    assert_eq!(spec.metadata["vendor-data"], "#cloud-config raw, not base64\n");
    assert_eq!(spec.metadata["capmvm-extra"], b64("kept"));
    let vm = d.ok(&["ps", "-q"]).trim().to_owned();
    let name = d.inspect(&vm)["spec"]["name"].as_str().expect("name").to_owned();
    assert!(
        name.len() <= 63 && name.ends_with(&uid[uid.len() - 10..].to_ascii_lowercase()),
        "{name}"
    );
    let seed = "/var/lib/cloud/seed/nocloud";
    let sums = d.ok(&["exec", &vm, "--", "sha256sum", &format!("{seed}/user-data")]);
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&user_data))
    };
    assert!(sums.starts_with(&want), "the gzip user-data, byte for byte: {sums}");
    assert_eq!(
        d.ok(&["exec", &vm, "--", "cat", &format!("{seed}/vendor-data")]),
        "#cloud-config raw, not base64\n"
    );
    let listed = d.ok(&["exec", &vm, "--", "ls", seed]);
    assert!(!listed.contains("capmvm-extra"), "only cloud-init's files are seeded: {listed}");
    rt.block_on(c.delete_micro_vm(fpb::DeleteMicroVmRequest { uid: uid.clone() })).expect("delete");
    wait_get(&rt, &mut c, &d, &uid, "gone", |g| g.as_ref().is_err()).expect_err("gone");
}

fn b64_bytes(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// gRPC reflection in both of its versions (v1, and v1alpha that older grpcurl asks), on the
/// Flintlock TCP listener and on the Unix socket (where hearth's own service is listed too).
#[test]
fn reflection_lists_the_services_in_both_versions_on_tcp_and_the_socket() {
    require_e2e!();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--flintlock-listen", &listen, "--insecure"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tcp = || {
        let endpoint = Channel::from_shared(format!("http://{listen}")).expect("endpoint");
        rt.block_on(connect(&endpoint)).expect("tcp")
    };
    let unix = || {
        let path = d.root.path().join("hearthd.sock");
        rt.block_on(hearth_api::connect_unix(path)).expect("unix")
    };
    // The services a reflection client of version `$r` is told of.
    macro_rules! list_services {
        ($r:path, $channel:expr) => {
            rt.block_on(async {
                use $r as r;
                let mut c = r::server_reflection_client::ServerReflectionClient::new($channel);
                let ask = r::server_reflection_request::MessageRequest::ListServices(String::new());
                let req =
                    r::ServerReflectionRequest { host: String::new(), message_request: Some(ask) };
                let answer = c.server_reflection_info(tokio_stream::iter([req])).await;
                let mut s = answer.expect("reflection").into_inner();
                match s.message().await.expect("answer").and_then(|m| m.message_response) {
                    Some(r::server_reflection_response::MessageResponse::ListServicesResponse(
                        l,
                    )) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
                    other => panic!("answered {other:?}"),
                }
            })
        };
    }
    for (channel, hearth_too) in [(tcp(), false), (unix(), true)] {
        let v1 = list_services!(tonic_reflection::pb::v1, channel.clone());
        let alpha = list_services!(tonic_reflection::pb::v1alpha, channel.clone());
        for names in [&v1, &alpha] {
            assert!(
                names.iter().any(|n| n == "microvm.services.api.v1alpha1.MicroVM"),
                "{names:?}"
            );
            assert_eq!(names.iter().any(|n| n == "hearth.v1.Hearth"), hearth_too, "{names:?}");
        }
    }
}

/// Flintlock's HTTP/JSON gateway (`--enable-http`), with curl as a client: the same requests as
/// gRPC, in proto3 JSON, behind the same token; Get and List told apart; errors as
/// grpc-gateway's (the HTTP status and `{"code", "message"}`).
#[test]
fn the_http_gateway_answers_what_the_grpc_api_answers() {
    require_e2e!();
    let endpoint = format!("127.0.0.1:{}", free_port());
    let (d, port) = plaintext_daemon(&[
        "--basic-auth-token",
        TOKEN,
        "--enable-http",
        "--http-endpoint",
        &endpoint,
    ]);
    let (kernel, root) = import_images(&d);
    let auth = format!("authorization: Basic {}", b64(TOKEN));
    // (HTTP status, JSON body) of a request.
    let curl = |method: &str, path: &str, body: Option<&str>, token: bool| {
        let mut c = std::process::Command::new("curl");
        c.args(["-s", "-w", "\n%{http_code}", "-X", method])
            .arg(format!("http://{endpoint}{path}"));
        if token {
            c.args(["-H", &auth]);
        }
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        let out = c.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').expect("a status line");
        (code.parse::<u16>().expect("status"), json.to_owned())
    };
    let json = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap_or_else(|e| panic!("{e}: {s}"))
    };
    let spec = serde_json::json!({
        "id": "web0", "namespace": "ns0", "vcpu": 1, "memoryInMb": 256,
        "kernel": { "image": kernel, "filename": "boot/vmlinux", "addNetworkConfig": true },
        "rootVolume": { "id": "root", "source": { "containerSource": root } },
        "interfaces": [{ "deviceId": "eth1", "type": "TAP" }],
        "metadata": { "meta-data": b64("local_hostname: web0\n") }
    })
    .to_string();

    let (code, body) = curl("POST", "/v1alpha1/microvm", Some(&spec), false);
    assert_eq!(code, 401, "no token: {body}");
    assert_eq!(json(&body)["code"], 16, "UNAUTHENTICATED: {body}");
    let (code, body) = curl("POST", "/v1alpha1/microvm", Some(&spec), true);
    assert_eq!(code, 200, "{body}");
    let created = json(&body);
    let uid = created["microvm"]["spec"]["uid"].as_str().expect("uid").to_owned();
    assert_eq!(created["microvm"]["status"]["state"], "PENDING", "{body}");
    assert_eq!(created["microvm"]["spec"]["memoryInMb"], 256, "proto3 JSON names: {body}");

    // The same microVM over gRPC and over HTTP, CREATED in time; Get by uid, List by namespace.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, Some(TOKEN));
    wait_get(&rt, &mut c, &d, &uid, "CREATED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
    })
    .expect("get");
    let (code, body) = curl("GET", &format!("/v1alpha1/microvm/{uid}"), None, true);
    assert_eq!(
        (code, json(&body)["microvm"]["spec"]["id"].as_str()),
        (200, Some("web0")),
        "{body}"
    );
    assert_eq!(json(&body)["microvm"]["status"]["state"], "CREATED", "{body}");
    let (code, body) = curl("GET", "/v1alpha1/microvm/ns0", None, true);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["microvm"].as_array().map(Vec::len), Some(1), "{body}");
    let (_, body) = curl("GET", "/v1alpha1/microvm?namespace=ns0&name=other", None, true);
    assert!(json(&body)["microvm"].as_array().is_none_or(Vec::is_empty), "{body}");
    let stream = "/microvm.services.api.v1alpha1.MicroVM/ListMicroVMsStream";
    let (code, body) = curl("POST", stream, Some(r#"{"namespace":"ns0"}"#), true);
    assert_eq!(code, 200, "{body}");
    let lines: Vec<serde_json::Value> = body.lines().map(json).collect();
    assert_eq!(lines.len(), 1, "{body}");
    assert_eq!(lines[0]["result"]["microvm"]["spec"]["uid"], uid.as_str());

    // Errors as grpc-gateway's.
    let (code, body) = curl("POST", "/v1alpha1/microvm", Some("{\"id\": 5"), true);
    assert_eq!((code, json(&body)["code"].as_i64()), (400, Some(3)), "{body}");
    let (code, body) =
        curl("POST", "/v1alpha1/microvm", Some(r#"{"id":"x","namespace":"ns0"}"#), true);
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["message"].as_str().unwrap_or("").contains("kernel"), "{body}");

    let (code, body) = curl("DELETE", &format!("/v1alpha1/microvm/{uid}"), None, true);
    assert_eq!((code, body.trim()), (200, "{}"));
    wait_get(&rt, &mut c, &d, &uid, "gone", |g| g.as_ref().is_err()).expect_err("gone");
    let (code, body) = curl("DELETE", &format!("/v1alpha1/microvm/{uid}"), None, true);
    assert_eq!((code, json(&body)["code"].as_i64()), (404, Some(5)), "{body}");
}

/// A microVM with an initrd of its own (an image's `boot/initrd`): it boots with that archive
/// before hearth's initramfs (so hearth-init is still its init and the microVM is CREATED).
#[test]
fn a_microvm_with_an_initrd_of_its_own_boots_with_it_before_hearths() {
    require_e2e!();
    let (d, port) = plaintext_daemon(&[]);
    let (kernel, root) = import_images(&d);
    let work = tempfile::tempdir().expect("tmp");
    let mut cpio = hearth_kernel::cpio::Cpio::new(Vec::new());
    cpio.dir("etc").expect("dir");
    cpio.file("etc/from-the-initrd", 0o644, b"yes\n").expect("file");
    let archive = cpio.finish().expect("cpio");
    std::fs::write(work.path().join("initrd"), &archive).expect("initrd");
    let image = TestImage {
        files: vec![("/boot/initrd".into(), work.path().join("initrd"), 0o644)],
        ..Default::default()
    };
    hearth_e2e::testutil::busybox_oci_layout(&work.path().join("layout"), "t", &image)
        .expect("layout");
    let layout = work.path().join("layout");
    d.ok(&[
        "image",
        "import",
        layout.to_str().expect("utf8"),
        "--name",
        "registry.invalid/initrd:1",
    ]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = client(&rt, port, None);
    let mut s = spec("withinitrd", kernel, root);
    s.initrd = Some(fl::Initrd { image: "registry.invalid/initrd:1".into(), filename: None });
    let req = fpb::CreateMicroVmRequest { microvm: Some(s), metadata: HashMap::new() };
    let created = rt.block_on(c.create_micro_vm(req)).expect("create").into_inner();
    let uid = created.microvm.and_then(|m| m.spec).and_then(|s| s.uid).expect("uid");
    wait_get(&rt, &mut c, &d, &uid, "CREATED", |g| {
        g.as_ref().is_ok_and(|v| state(v) == fl::micro_vm_status::MicroVmState::Created)
    })
    .expect("get");
    // The initrd QEMU was given starts with the microVM's own archive, byte for byte.
    let pid = d.inspect("withinitrd.ns0")["status"]["pid"].as_i64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let initrd = args.iter().skip_while(|a| *a != "-initrd").nth(1).expect("-initrd");
    // QEMU runs chrooted in the VM's directory: the path is inside it.
    let vm_dir = d
        .root
        .path()
        .join("vms")
        .join(d.inspect("withinitrd.ns0")["spec"]["id"].as_str().expect("id"));
    let host_path = vm_dir.join(initrd.trim_start_matches('/'));
    let path = if host_path.exists() { host_path } else { std::path::PathBuf::from(initrd) };
    let given = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(given.len() > archive.len() && given.starts_with(&archive), "{}", path.display());
}
