//! hearth's task runner. `cargo xtask help` lists the tasks.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the tests and the demo need.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "e2fsprogs",
    "skopeo",
    "umoci",
    "docker-registry",
    "busybox-static",
    "protobuf-compiler",
    "libprotobuf-dev",
    "openssl",
    "cpio",
    "zstd",
    "iproute2",
    "nftables",
    // sshd for the `hearth ssh` test image, and the client `hearth ssh` runs.
    "dropbear-bin",
    "openssh-client",
    // LVM's tools for `hearth host provision --direct-lvm`, copied into the test-host guest.
    "lvm2",
    "thin-provisioning-tools",
    // A real DHCP server for hearth-init's DHCP client (tests in network namespaces).
    "dnsmasq-base",
    // The Debian test host (systemd, apt) that `hearth host provision --all` is tested in.
    "debootstrap",
    // An HTTP client for the Flintlock HTTP gateway's tests.
    "curl",
    // What virtiofsd (shared directories) builds against: Debian 12 does not package it.
    "libseccomp-dev",
    "libcap-ng-dev",
    "pkg-config",
];

/// virtiofsd, built from crates.io with its own lock file where the machine has none.
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// The guest kernel package: Debian's cloud kernel (virtio as modules).
const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let result = match task {
        "deps" => deps(),
        "init" => build_init().map(|p| println!("{}", p.display())),
        "kernel" => kernel().map(|(k, m)| println!("{} {}", k.display(), m.display())),
        "build" => build_all(false),
        "demo" => demo(),
        "test" => test(&args[1..]),
        "e2e" => e2e(&args[1..]),
        "lint" => lint(),
        "layers" => layers(),
        "bench" => bench(&args[1..]),
        _ => {
            println!("cargo xtask deps|init|kernel|build|demo|test|e2e|lint|bench");
            println!(
                "  demo   install what is needed, build, boot a sample image and print its output"
            );
            println!("  test   everything CI runs: fmt, clippy, unit tests, VM-booting e2e tests");
            println!(
                "  bench  image preparation and run-to-ready benchmarks against their baselines"
            );
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("xtask {task}: {e:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

/// Installs the Debian packages that are missing, never removing or downgrading one the machine
/// has. apt resolves a conflict by removing the installed package (a backported qemu-utils is
/// removed to install bookworm's QEMU), so the install is simulated first; when it would remove
/// something, the same install from the release's backports is tried, and when that would too,
/// the task fails naming the packages instead of touching them.
fn deps() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(apt().args(["update", "-q"]))?;
    let mut target = None;
    let mut removed = apt_removals(&missing, None)?;
    if !removed.is_empty() {
        let backports = format!("{}-backports", os_codename()?);
        eprintln!(
            "xtask deps: installing {} would remove {}; trying {backports}",
            missing.join(" "),
            removed.join(" ")
        );
        ensure_apt_suite(&backports)?;
        removed = apt_removals(&missing, Some(&backports))?;
        target = Some(backports);
    }
    if !removed.is_empty() {
        bail!(
            "installing {} would remove {}, which this machine has; install the packages by hand in a way that keeps them \
             (for example from the release that provided them), then run this again",
            missing.join(" "),
            removed.join(" ")
        );
    }
    let mut install = apt();
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "--no-remove",
    ]);
    if let Some(t) = &target {
        install.args(["-t", t]);
    }
    run(install.args(&missing))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

/// `apt-get`, through sudo when not root.
fn apt() -> Command {
    if nix_is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    }
}

/// The packages an install of `pkgs` would remove (or downgrade: apt removes to downgrade).
fn apt_removals(pkgs: &[&str], target: Option<&str>) -> Result<Vec<String>> {
    let mut sim = apt();
    sim.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-s",
        "-q",
        "--no-install-recommends",
    ]);
    if let Some(t) = target {
        sim.args(["-t", t]);
    }
    let out = sim.args(pkgs).output().context("simulating apt-get install")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "apt-get cannot install {}: {}{}",
            pkgs.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(removals(&text))
}

/// The packages an `apt-get install -s` transcript removes (`Remv NAME [VERSION]` lines).
fn removals(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME")
}

/// Makes `suite` (a Debian backports suite) known to apt. Backports have a low default priority,
/// so adding them changes nothing until an install asks for them with `-t`.
fn ensure_apt_suite(suite: &str) -> Result<()> {
    let policy = Command::new("apt-cache").arg("policy").output().context("apt-cache policy")?;
    let known = String::from_utf8_lossy(&policy.stdout);
    if known.contains(&format!("a={suite},")) || known.contains(&format!("n={suite},")) {
        return Ok(());
    }
    let file = format!("/etc/apt/sources.list.d/hearth-{suite}.sources");
    eprintln!("xtask deps: adding {suite} to apt's sources in {file}");
    let body = format!(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    std::fs::write(&file, body).with_context(|| format!("writing {file}"))?;
    run(apt().args(["update", "-q"]))
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

/// Builds the static guest init; returns its path.
fn build_init() -> Result<PathBuf> {
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "-p", "hearth-init", "--target", HOST_TRIPLE]))?;
    Ok(root().join("target").join(HOST_TRIPLE).join("release/hearth-init"))
}

fn build_all(release: bool) -> Result<()> {
    build_init()?;
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(root()).args(["build", "-p", "hearth", "-p", "hearthd"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Downloads Debian's cloud kernel into .cache/kernel once; returns (kernel, modules dir).
fn kernel() -> Result<(PathBuf, PathBuf)> {
    let cache = root().join(".cache/kernel");
    let find = |cache: &Path| -> Option<(PathBuf, PathBuf)> {
        let boot = std::fs::read_dir(cache.join("root/boot")).ok()?;
        let k = boot
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))?;
        let ver = k.file_name()?.to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
        Some((k, cache.join("root/lib/modules").join(ver)))
    };
    if let Some(found) = find(&cache) {
        return Ok(found);
    }
    std::fs::create_dir_all(&cache)?;
    // The meta package depends on the versioned image package; download that.
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_PACKAGE])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("cloud-amd64-"))
        .map(str::trim)
        .context(
            "cannot find the kernel package linux-image-cloud-amd64 depends on; run apt-get update",
        )?
        .to_owned();
    run(Command::new("apt-get").current_dir(&cache).args(["download", &pkg]))?;
    let deb = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(cache.join("root")))?;
    std::fs::remove_file(&deb)?;
    find(&cache).context("the kernel package held no /boot/vmlinuz-*")
}

fn lint() -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root()).args(["fmt", "--all", "--check"]))?;
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    layers()
}

/// Which hearth crates each layer may depend on (style.md, convention 1).
fn allowed(krate: &str) -> Option<&'static [&'static str]> {
    // hearth-fs is a base crate like hearth-types: shared primitives, no domain knowledge.
    const ADAPTER: &[&str] = &["hearth-types", "hearth-fs", "hearth-core"];
    match krate {
        "hearth-types" | "hearth-fs" => Some(&[]),
        "hearth-core" => Some(&["hearth-types"]),
        "hearth-image" | "hearth-kernel" | "hearth-storage" | "hearth-vmm" | "hearth-store"
        | "hearth-api" | "hearth-net" | "hearth-host" => Some(ADAPTER),
        "hearth-init" => Some(&["hearth-types"]),
        _ => None, // binaries, testkit, e2e, xtask may use anything
    }
}

/// Outside crates the core must not use: gRPC, netlink, process and VMM plumbing.
const CORE_FORBIDDEN: &[&str] =
    &["tonic", "prost", "hyper", "tower", "rtnetlink", "netlink", "nix", "libc", "reqwest"];

/// Fails when a crate imports a layer above or beside it (read from `cargo metadata`).
fn layers() -> Result<()> {
    let out = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut bad = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let name = pkg["name"].as_str().unwrap_or_default();
        let Some(ok) = allowed(name) else { continue };
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let d = dep["name"].as_str().unwrap_or_default();
            let dev = dep["kind"].as_str() == Some("dev");
            if d.starts_with("hearth") && !dev && !ok.contains(&d) {
                bad.push(format!("{name} must not depend on {d}"));
            }
            // The core is the use-cases and the ports: no wire protocol, no host plumbing.
            if name == "hearth-core" && !dev && CORE_FORBIDDEN.iter().any(|f| d.starts_with(f)) {
                bad.push(format!("hearth-core must not depend on {d} (it belongs in an adapter)"));
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "layering violations (types -> core -> adapters -> binaries):\n  {}",
            bad.join("\n  ")
        );
    }
    eprintln!("layers: ok");
    Ok(())
}

/// The machine's virtiofsd, else one built into .cache/virtiofsd once.
fn virtiofsd() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("virtiofsd"))
        .chain(["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].map(PathBuf::from));
    let cache = root().join(".cache/virtiofsd");
    let built = cache.join("bin/virtiofsd");
    if let Some(found) = on_path.chain([built.clone()]).find(|p| p.is_file()) {
        return Ok(found);
    }
    run(Command::new(env!("CARGO"))
        .args(["install", "--locked", "--quiet", "--root"])
        .arg(&cache)
        .args(["virtiofsd", "--version", VIRTIOFSD_VERSION]))?;
    Ok(built)
}

/// Environment for the VM-booting tests.
fn e2e_env(cmd: &mut Command) -> Result<()> {
    let init = build_init()?;
    let (k, m) = kernel()?;
    cmd.env("HEARTH_VIRTIOFSD", virtiofsd()?);
    // The kernel crate's boot tests take the unpacked package root and the init binary.
    let kernel_root = root().join(".cache/kernel/root");
    cmd.env("HEARTH_KERNEL_DIR", kernel_root).env("HEARTH_INIT_BIN", &init);
    cmd.env("HEARTH_E2E", "1")
        .env("HEARTH_INIT", init)
        .env("HEARTH_TEST_KERNEL", k)
        .env("HEARTH_TEST_MODULES", m);
    Ok(())
}

fn e2e(extra: &[String]) -> Result<()> {
    deps()?;
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "-p", "hearth", "-p", "hearthd"]))?;
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(root()).args(["test", "-p", "hearth-e2e", "--", "--test-threads=1"]).args(extra);
    e2e_env(&mut c)?;
    run(&mut c)
}

/// Everything CI runs.
fn test(extra: &[String]) -> Result<()> {
    deps()?;
    lint()?;
    let mut unit = Command::new(env!("CARGO"));
    unit.current_dir(root()).args([
        "test",
        "--workspace",
        "--exclude",
        "hearth-e2e",
        "--features",
        "hearth-image/testutil",
    ]);
    // The kernel crate's boot test uses the same kernel and init as the e2e suite.
    e2e_env(&mut unit)?;
    run(&mut unit)?;
    e2e(extra)
}

fn demo() -> Result<()> {
    deps()?;
    build_all(false)?;
    let (k, m) = kernel()?;
    let init = root().join("target").join(HOST_TRIPLE).join("release/hearth-init");
    run(Command::new(root().join("tests/e2e/demo.sh"))
        .env("HEARTH_INIT", init)
        .env("KERNEL", k)
        .env("MODULES", m)
        .env("BIN", root().join("target/debug")))
}

fn bench(extra: &[String]) -> Result<()> {
    deps()?;
    build_all(true)?;
    let (k, m) = kernel()?;
    let init = root().join("target").join(HOST_TRIPLE).join("release/hearth-init");
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["run", "--release", "-p", "hearth-e2e", "--bin", "hearth-bench", "--"])
        .args(extra)
        .env("HEARTH_INIT", init)
        .env("HEARTH_TEST_KERNEL", k)
        .env("HEARTH_TEST_MODULES", m)
        .env("BIN", root().join("target/release")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_install_that_removes_a_package_is_seen() {
        let sim = "NOTE: This is only a simulation!\nRemv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
                   Inst ipxe-qemu (1.0.0 Debian:12.15/oldstable [all])\nConf qemu-system-x86 (1:7.2 Debian [amd64])\n";
        assert_eq!(removals(sim), ["qemu-utils"]);
        assert!(removals("Inst a (1 x)\nConf a (1 x)\n").is_empty());
    }
}
