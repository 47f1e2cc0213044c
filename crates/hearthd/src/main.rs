//! `hearthd`: the hearth daemon.
#![forbid(unsafe_code)]

mod adapters;
mod config;
mod console;
mod create;
mod daemon;
mod exec;
mod flintlock;
mod gateway;
mod net;
mod root;
mod service;
mod ssh;
mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use hearth_api::microvm::services::api::v1alpha1::micro_vm_server::MicroVmServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

/// hearth's daemon: owns the state under --root and serves the API on --socket.
#[derive(Debug, Parser)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// A TOML file of settings, each key one of these long flags (`thin-pool = "NAME"`,
    /// `insecure = true`); flags given here win over it. Unknown keys are refused.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding images, kernels and VMs.
    #[arg(long, env = "HEARTH_ROOT", default_value = "/var/lib/hearth")]
    root: PathBuf,
    /// Unix socket to serve the API on (default: ROOT/hearthd.sock).
    #[arg(long, env = "HEARTH_SOCKET")]
    socket: Option<PathBuf>,
    /// The static hearth-init binary to put in initramfs images.
    #[arg(long, env = "HEARTH_INIT")]
    init_binary: Option<PathBuf>,
    /// Also serve Flintlock's MicroVM API on this TCP address (e.g. 0.0.0.0:9090), for Cluster
    /// API Provider MicroVM and other Flintlock clients. It is always served on --socket.
    #[arg(long, value_name = "ADDR")]
    flintlock_listen: Option<std::net::SocketAddr>,
    /// Serve --flintlock-listen in plaintext (no TLS). Only for trusted networks.
    #[arg(long)]
    insecure: bool,
    /// TLS certificate (PEM) for --flintlock-listen.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --flintlock-listen.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) client certificates are checked against; a client that presents one it did
    /// not sign is refused.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Require every client to present a certificate --tls-client-ca signed (mutual TLS), as
    /// Flintlock's flag.
    #[arg(long, requires = "tls_client_ca")]
    tls_client_validate: bool,
    /// The lowest TLS version served on --flintlock-listen.
    #[arg(long, value_name = "VERSION", default_value = "1.3")]
    tls_min_version: tls::MinVersion,
    /// The network of Flintlock microVMs' interfaces: bridge (the hearth0 bridge; static
    /// addresses allowed; VMs reach each other) or user (user-mode NAT; changes nothing on the host).
    #[arg(long, default_value = "bridge", value_name = "MODE")]
    flintlock_network: hearth_types::NetworkMode,
    /// The host interface macvtap networks sit on: `hearth run --network macvtap` with no
    /// interface named, and Flintlock interfaces of type MACVTAP (else they go on
    /// --flintlock-network), as Flintlock's flag.
    #[arg(long, value_name = "IFACE")]
    parent_iface: Option<String>,
    /// The bridge `--network bridge` VMs (and Flintlock's TAP interfaces) are on, made when
    /// missing, as Flintlock's flag; its subnet is 10.61.0.0/16 whatever its name.
    #[arg(long, value_name = "NAME", default_value = hearth_types::net::BRIDGE_NAME)]
    bridge_name: String,
    /// Addresses of the bridge network that are never given to a VM that asks for none (where a
    /// workload cluster's control-plane VIP lives, say), as CIDRs; repeatable or comma-separated.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    flintlock_reserve: Vec<hearth_types::net::Ipv4Net>,
    /// Host directories (and those under them) that Flintlock clients may share with their
    /// microVMs as `virtiofs_source` volumes; repeatable or comma-separated. None unless given:
    /// a share gives the guest the directory as root on the host sees it.
    #[arg(long, value_name = "DIR", value_delimiter = ',')]
    virtiofs_root: Vec<std::path::PathBuf>,
    /// Also serve Flintlock's HTTP/JSON gateway (its proto's HTTP routes) on --http-endpoint,
    /// with --flintlock-listen's TLS and token, as Flintlock's flag.
    #[arg(long, requires = "flintlock_listen")]
    enable_http: bool,
    /// Where --enable-http serves the gateway.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8090")]
    http_endpoint: std::net::SocketAddr,
    /// Require `authorization: Basic <base64(TOKEN)>` on --flintlock-listen, as Flintlock's flag.
    #[arg(long, env = "HEARTH_BASIC_AUTH_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    basic_auth_token: Option<String>,
    /// Let members of this group use the API socket (mode 0660 instead of 0600). Membership is
    /// equivalent to root on this host, as with docker's group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// The longest a registry may stay silent during a pull (connecting, answering, between
    /// two reads of a blob) before the pull fails, e.g. 60s or 2m.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    registry_timeout: std::time::Duration,
    /// Size at which a VM's console log is rotated (a VM's own --log-opt max-size wins).
    #[arg(long, value_name = "SIZE", default_value = "10M", value_parser = parse_log_size)]
    log_max_size: u64,
    /// Console log files kept per VM, the current one included (--log-opt max-file wins).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    log_max_files: u32,
    /// VMMs drop to an unprivileged uid and gid of their VM's own, from this one up (65536 of
    /// them), once set up, chrooted into their VM's directory. 0 runs them as root.
    #[arg(long, value_name = "UID", default_value_t = 2_100_000_000)]
    vmm_uid_base: u32,
    /// The VMM of VMs and microVMs that do not name one: qemu, firecracker or cloud-hypervisor.
    /// QEMU is the default, since only it runs guests where KVM cannot (TCG).
    #[arg(long, env = "HEARTH_DEFAULT_VMM", value_name = "VMM", default_value = "qemu")]
    default_vmm: hearth_types::Provider,
    /// Runs Firecracker without its jailer and Cloud Hypervisor without its chroot (no uid of
    /// their own: they run as root). For debugging only.
    #[arg(long)]
    no_jail: bool,
    /// Puts VM root disks on this device-mapper thin pool as thin snapshots of a base per
    /// image (`hearth host provision --dev` makes `hearth-thinpool`); a pool on files in
    /// ROOT/pool is brought back at start. Without it, disks are reflink or sparse copies.
    #[arg(long, value_name = "NAME")]
    thin_pool: Option<String>,
    /// The cgroup each VMM's own group goes under (memory, CPU and process limits from the VM's
    /// size); empty for none.
    #[arg(long, value_name = "NAME", default_value = "hearth")]
    cgroup_parent: String,
    /// Log filter, as RUST_LOG.
    #[arg(long, env = "HEARTH_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() {
    // Before anything is created: what hearthd and its VMMs write is private to root.
    root::private_umask();
    let flags: Vec<(String, bool)> = Args::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| (l.to_owned(), a.get_action().takes_values())))
        .collect();
    let argv = config::with_config(std::env::args_os().collect(), &flags).unwrap_or_else(|e| {
        eprintln!("hearthd: {e:#}");
        std::process::exit(2);
    });
    let mut args = Args::parse_from(argv);
    // VMMs change directory when they daemonize, and identity checks compare the paths on their
    // command lines: the root must be absolute.
    if let Ok(abs) = std::path::absolute(&args.root) {
        args.root = abs;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args).await {
        eprintln!("hearthd: {e:#}");
        std::process::exit(1);
    }
    // Exit now rather than wait for blocking work in flight (a pull from a slow registry may
    // take minutes): everything it writes is a per-attempt temporary the next start sweeps.
    std::process::exit(0);
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tls = tls_config(&args)?;
    anyhow::ensure!(
        args.flintlock_network != hearth_types::NetworkMode::None,
        "--flintlock-network must be bridge or user: microVM interfaces need a network"
    );
    let socket = args.socket.clone().unwrap_or_else(|| args.root.join("hearthd.sock"));
    let group = args.group.as_deref().map(group_id).transpose()?;
    let init = daemon::find_init_binary(args.init_binary.as_deref())?;
    // Everything below writes under the root or serves its socket: one daemon at a time.
    let _root_lock = root::lock(&args.root)?;
    let mut d = daemon::Daemon::open(&args.root, init)
        .with_context(|| format!("opening {}", args.root.display()))?;
    d.registry_timeout = args.registry_timeout;
    d.parent_iface = args.parent_iface.clone();
    anyhow::ensure!(
        !args.bridge_name.is_empty()
            && args.bridge_name.len() <= 15
            && args.bridge_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
        "--bridge-name {:?}: an interface name is 1-15 letters, digits, '_', '.' or '-'",
        args.bridge_name
    );
    d.bridge.name = args.bridge_name.clone();
    d.reserved_networks = args.flintlock_reserve.clone();
    d.virtiofs_roots = args.virtiofs_root.clone();
    configure_vmms(&mut d, &args)?;
    if let Some(pool) = &args.thin_pool {
        d.use_thin_pool(pool).with_context(|| format!("--thin-pool {pool}"))?;
    }
    d.consoles.default_limits =
        crate::adapters::LogLimits { max_size: args.log_max_size, max_files: args.log_max_files };
    let d = Arc::new(d);
    adapters::wire(&d);
    if let Some(dir) = socket.parent().filter(|dir| !dir.exists()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(root::ROOT_MODE))?;
    }
    let _socket_lock = root::lock_socket(&socket)?;
    let listener = bind_socket(&socket, group).await?;
    tracing::info!(root = %args.root.display(), socket = %socket.display(), "hearthd serving");
    report_host(&args.root);
    net::sweep_links(&d).await;
    d.reconciler().recover().await;
    let fl = flintlock::Flintlock::new(d.clone(), args.flintlock_network)
        .context("opening the Flintlock API's records")?;
    fl.resume();
    if let Some(addr) = args.flintlock_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --flintlock-listen {addr}"))?;
        tracing::info!(%addr, tls = tls.is_some(), auth = args.basic_auth_token.is_some(), "serving the Flintlock API");
        if args.enable_http {
            serve_gateway(&args, tls.clone(), fl.clone()).await?;
        }
        let (fl, token) = (fl.clone(), args.basic_auth_token.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_flintlock(tcp, tls, fl, token).await {
                tracing::error!(error = %e, "the Flintlock API listener stopped");
            }
        });
    }

    let svc = hearth_api::v1::hearth_server::HearthServer::new(service::Api::new(d.clone()));
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
    };
    let router =
        tonic::transport::Server::builder().add_service(svc).add_service(MicroVmServer::new(fl));
    let sets = [hearth_api::HEARTH_DESCRIPTOR_SET, hearth_api::FLINTLOCK_DESCRIPTOR_SET];
    with_reflection(router, &sets)?
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the API")?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("hearthd stopped; VMs keep running and are re-adopted on the next start");
    Ok(())
}

/// Binds the API socket (a stale file is replaced; one a daemon answers on is refused) with its
/// mode set explicitly: 0600, or 0660 owned by `group`.
async fn bind_socket(
    socket: &std::path::Path,
    group: Option<nix::unistd::Gid>,
) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!(
                "another hearthd already serves {}; stop it or pick another --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    if let Some(gid) = group {
        nix::unistd::chown(socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    Ok(listener)
}

fn parse_log_size(s: &str) -> Result<u64, String> {
    let n = hearth_types::parse_size(s).map_err(|e| e.to_string())?;
    if !(hearth_types::vm::MIN_LOG_SIZE..=hearth_types::vm::MAX_LOG_SIZE).contains(&n) {
        return Err("must be between 4K and 1G".into());
    }
    Ok(n)
}

/// A group by name or number.
fn group_id(name: &str) -> anyhow::Result<nix::unistd::Gid> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => anyhow::bail!(
            "--group {name}: no such group; create it (groupadd {name}) or give a gid"
        ),
        Err(e) => anyhow::bail!("--group {name}: looking the group up failed: {e}"),
    }
}

/// The TLS settings of --flintlock-listen, checked as Flintlock checks its flags.
fn tls_config(args: &Args) -> anyhow::Result<Option<tls::Settings>> {
    let certs = args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_client_ca.is_some();
    if args.flintlock_listen.is_none() {
        anyhow::ensure!(
            !certs && !args.insecure,
            "--insecure and --tls-* only apply with --flintlock-listen ADDR"
        );
        return Ok(None);
    }
    if args.insecure {
        anyhow::ensure!(
            !certs,
            "--insecure cannot be combined with --tls-cert, --tls-key or --tls-client-ca"
        );
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        anyhow::bail!("--flintlock-listen needs --tls-cert and --tls-key (or --insecure to serve plaintext on a trusted network)");
    };
    let settings = tls::Settings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_client_ca.clone(),
        client_validate: args.tls_client_validate,
        min_version: args.tls_min_version,
    };
    // Read and checked now, so a bad file stops the daemon with its name.
    settings.acceptor(&[b"h2"])?;
    Ok(Some(settings))
}

/// Flintlock's API on TCP: TLS unless --insecure, basic-token auth when set, plus gRPC health
/// and reflection (which Flintlock clients and grpcurl use).
async fn serve_flintlock(
    tcp: tokio::net::TcpListener,
    tls: Option<tls::Settings>,
    fl: flintlock::Flintlock,
    token: Option<String>,
) -> anyhow::Result<()> {
    let auth = move |req: tonic::Request<()>| match &token {
        Some(t) => flintlock::check_basic_auth(t, &req).map(|()| req),
        None => Ok(req),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<MicroVmServer<flintlock::Flintlock>>().await;
    let router = tonic::transport::Server::builder()
        .add_service(MicroVmServer::with_interceptor(fl, auth))
        .add_service(health);
    let router = with_reflection(router, &[hearth_api::FLINTLOCK_DESCRIPTOR_SET])?;
    match tls {
        Some(tls) => router.serve_with_incoming(tls::incoming(tcp, tls.acceptor(&[b"h2"])?)).await,
        None => router.serve_with_incoming(TcpListenerStream::new(tcp)).await,
    }
    .context("serving the Flintlock API")
}

/// Flintlock's HTTP/JSON gateway on --http-endpoint, with the gRPC listener's TLS and token.
async fn serve_gateway(
    args: &Args,
    tls: Option<tls::Settings>,
    fl: flintlock::Flintlock,
) -> anyhow::Result<()> {
    let addr = args.http_endpoint;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --http-endpoint {addr}"))?;
    let addr = tcp.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "serving Flintlock's HTTP gateway");
    let router = gateway::router(fl, args.basic_auth_token.clone());
    match tls {
        Some(tls) => {
            let incoming = tls::incoming(tcp, tls.acceptor(&[b"http/1.1"])?);
            tokio::spawn(async move {
                let listener = gateway::TlsListener { incoming, addr };
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "the HTTP gateway stopped");
                }
            });
        }
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, router).await {
                    tracing::error!(error = %e, "the HTTP gateway stopped");
                }
            });
        }
    }
    Ok(())
}

/// `router` with gRPC reflection of the services in `sets`, as both of its versions (v1, and
/// v1alpha, which older clients such as grpcurl before 1.8.8 ask).
fn with_reflection(
    router: tonic::transport::server::Router,
    sets: &[&[u8]],
) -> anyhow::Result<tonic::transport::server::Router> {
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut alpha = tonic_reflection::server::Builder::configure();
    for set in sets {
        v1 = v1.register_encoded_file_descriptor_set(set);
        alpha = alpha.register_encoded_file_descriptor_set(set);
    }
    Ok(router
        .add_service(v1.build_v1().context("building gRPC reflection")?)
        .add_service(alpha.build_v1alpha().context("building gRPC reflection")?))
}

/// Logs what `hearth host check` would flag, so a daemon's log says why a feature cannot work.
fn report_host(root: &std::path::Path) {
    for c in hearth_host::evaluate(&adapters::host_facts(root)) {
        match c.level {
            hearth_host::Level::Fail => {
                tracing::error!(check = c.name, detail = c.detail, fix = c.fix, "host check failed")
            }
            hearth_host::Level::Warn => {
                tracing::warn!(check = c.name, detail = c.detail, fix = c.fix, "host check")
            }
            hearth_host::Level::Ok | hearth_host::Level::Info => {}
        }
    }
}

/// Says so at start when the default VMM needs KVM that cannot run guests here.
/// How VMMs run: their uids, cgroups, default and jail, from the flags (checked here).
fn configure_vmms(d: &mut daemon::Daemon, args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.vmm_uid_base == 0 || args.vmm_uid_base.checked_add(daemon::VMM_UIDS).is_some(),
        "--vmm-uid-base {} leaves no room for {} uids below 2^32",
        args.vmm_uid_base,
        daemon::VMM_UIDS
    );
    anyhow::ensure!(
        args.cgroup_parent.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
            || args.cgroup_parent.is_empty(),
        "--cgroup-parent {:?} must be a relative cgroup path like hearth or machine/hearth",
        args.cgroup_parent
    );
    d.vmm_uid_base = args.vmm_uid_base;
    d.default_vmm = args.default_vmm;
    warn_unusable_default(args.default_vmm);
    if args.no_jail {
        tracing::warn!("--no-jail: Firecracker and Cloud Hypervisor run without a jail, as root, unconfined but for their seccomp filters and cgroups; use this for debugging only");
        d.vmms = hearth_vmm::providers_with(true);
    }
    d.cgroup_parent = args.cgroup_parent.clone();
    Ok(())
}

fn warn_unusable_default(vmm: hearth_types::Provider) {
    if vmm == hearth_types::Provider::Qemu {
        return;
    }
    if let Some(why) = crate::adapters::kvm_unusable() {
        tracing::warn!(%vmm, "--default-vmm {vmm} cannot run guests here ({why}): VMs that name no VMM will fail to boot; --default-vmm qemu runs them under TCG");
    }
}
