//! Test helpers (feature `testutil`): a busybox OCI image built in Rust (from the host's
//! static `/bin/busybox`), and Debian's `docker-registry` on a free loopback port, pushed to
//! with `skopeo`.
//!
//! The test image: busybox with applet links in `/bin`, `/etc/passwd` (root, and `app` with uid
//! 1000) and `/etc/group`, an empty `/work`; config `Env` = PATH and `GREETING=hi`,
//! `WorkingDir` = `/work`, `Cmd` = `["sh"]`, `User` as asked.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Busybox applets the test image links.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "ls",
    "id",
    "pwd",
    "env",
    "sleep",
    "true",
    "false",
    "tty",
    "mount",
    "poweroff",
    "sync",
    "head",
    "sha256sum",
    "tar",
    "mkdir",
    "rm",
    "uname",
    "hostname",
    "grep",
    "wc",
    "dd",
    "stat",
    "chmod",
    "cp",
    "mv",
    "find",
    "md5sum",
    "seq",
    "kill",
    "ps",
    "sed",
    "cut",
    "df",
    "umount",
];

/// What the test image's config says.
#[derive(Debug, Clone, Default)]
pub struct TestImage {
    /// OCI `User`; empty for root.
    pub user: String,
    /// Extra bytes of payload (a file at /payload.bin), to make images of a chosen size.
    pub payload_bytes: usize,
    /// Host programs copied in at the same paths, with the shared libraries `ldd` lists
    /// (e.g. `/usr/sbin/dropbear` for an image with an SSH server).
    pub host_binaries: Vec<PathBuf>,
    /// A full-OS image: busybox's init as /sbin/init, run by this /etc/inittab.
    pub inittab: Option<String>,
    /// Kernel modules at /lib/modules/VERSION: a `lib/modules/VERSION` tree and the paths in
    /// it to copy (a guest that is itself a test host loads them).
    pub modules: Option<(PathBuf, Vec<PathBuf>)>,
    /// More files: (path in the image, host file to copy there, mode).
    pub files: Vec<(String, PathBuf, u32)>,
}

/// Adds the directories above `rel` that `made` does not list yet.
fn parents(
    b: &mut tar::Builder<Vec<u8>>,
    made: &mut Vec<PathBuf>,
    rel: &Path,
) -> std::io::Result<()> {
    let mut above: Vec<&Path> =
        rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).collect();
    above.reverse();
    for anc in above {
        let builtin = ["bin", "etc", "var", "var/run", "tmp", "root", "home", "home/app", "work"]
            .contains(&anc.to_string_lossy().as_ref());
        if !builtin && !made.iter().any(|m| m == anc) {
            entry(b, &anc.to_string_lossy(), 0o755, &[], tar::EntryType::Directory, None)?;
            made.push(anc.to_path_buf());
        }
    }
    Ok(())
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
    kind: tar::EntryType,
    link: Option<&str>,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    if let Some(l) = link {
        h.set_link_name(l)?;
    }
    h.set_cksum();
    b.append_data(&mut h, path, data)
}

/// The busybox image's single layer (uncompressed tar).
pub fn busybox_layer(img: &TestImage) -> std::io::Result<Vec<u8>> {
    use tar::EntryType::{Directory, Regular, Symlink};
    let busybox = fs::read("/bin/busybox")?;
    let mut b = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "work", "root", "home", "home/app", "tmp", "var", "var/run"] {
        entry(&mut b, d, if d == "tmp" { 0o1777 } else { 0o755 }, &[], Directory, None)?;
    }
    entry(&mut b, "bin/busybox", 0o755, &busybox, Regular, None)?;
    for a in APPLETS {
        entry(&mut b, &format!("bin/{a}"), 0o777, &[], Symlink, Some("busybox"))?;
    }
    entry(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        Regular,
        None,
    )?;
    entry(&mut b, "etc/group", 0o644, b"root:x:0:\napp:x:1000:\n", Regular, None)?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for bin in &img.host_binaries {
        let mut files = vec![bin.clone()];
        files.extend(shared_libraries(bin)?);
        for f in files {
            let rel = f.strip_prefix("/").unwrap_or(&f).to_path_buf();
            parents(&mut b, &mut dirs, &rel)?;
            entry(&mut b, &rel.to_string_lossy(), 0o755, &fs::read(&f)?, Regular, None)?;
        }
    }
    if !img.host_binaries.is_empty() {
        // dropbear keeps generated host keys here.
        entry(&mut b, "etc/dropbear", 0o700, &[], Directory, None)?;
    }
    if let Some(inittab) = &img.inittab {
        entry(&mut b, "sbin", 0o755, &[], Directory, None)?;
        entry(&mut b, "sbin/init", 0o777, &[], Symlink, Some("/bin/busybox"))?;
        entry(&mut b, "etc/inittab", 0o644, inittab.as_bytes(), Regular, None)?;
    }
    if let Some((tree, keep)) = &img.modules {
        let version =
            tree.file_name().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default();
        for rel in keep {
            let at = Path::new("lib/modules").join(&version).join(rel);
            parents(&mut b, &mut dirs, &at)?;
            entry(&mut b, &at.to_string_lossy(), 0o644, &fs::read(tree.join(rel))?, Regular, None)?;
        }
    }
    for (at, host, mode) in &img.files {
        let rel = Path::new(at.trim_start_matches('/'));
        parents(&mut b, &mut dirs, rel)?;
        entry(&mut b, &rel.to_string_lossy(), *mode, &fs::read(host)?, Regular, None)?;
    }
    if img.payload_bytes > 0 {
        // Incompressible-ish but deterministic content.
        let mut data = Vec::with_capacity(img.payload_bytes);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while data.len() < img.payload_bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(img.payload_bytes);
        entry(&mut b, "payload.bin", 0o644, &data, Regular, None)?;
    }
    b.into_inner()
}

/// The shared libraries (and the dynamic loader) `ldd` says `bin` loads.
fn shared_libraries(bin: &Path) -> std::io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("ldd {} failed", bin.display())));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// Writes an OCI image layout of the busybox image to `dir`, tagged `tag`.
pub fn busybox_oci_layout(dir: &Path, tag: &str, img: &TestImage) -> std::io::Result<()> {
    oci_layout(dir, tag, &busybox_layer(img)?, &img.user)
}

/// An Ignite-style kernel image's layer: /boot/vmlinux and /lib/modules/VERSION (only the
/// modules under `modules` whose relative path is listed in `keep`, to stay small).
pub fn kernel_layer(kernel: &Path, modules: &Path, keep: &[PathBuf]) -> std::io::Result<Vec<u8>> {
    let version = modules.file_name().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default();
    let mut b = tar::Builder::new(Vec::new());
    b.append_path_with_name(kernel, "boot/vmlinux")?;
    for rel in keep {
        b.append_path_with_name(
            modules.join(rel),
            format!("lib/modules/{version}/{}", rel.display()),
        )?;
    }
    b.into_inner()
}

/// Writes an OCI layout holding one uncompressed-then-gzipped `layer`, tagged `tag`.
pub fn oci_layout(dir: &Path, tag: &str, layer: &[u8], user: &str) -> std::io::Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let diff_id = sha(layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(layer)?;
    let layer_gz = gz.finish()?;
    let user = serde_json::Value::String(user.to_owned());
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hi"],
                    "Cmd": ["sh"], "WorkingDir": "/work", "User": user },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] }
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(&config)), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha(&layer_gz)), "size": layer_gz.len() }]
    })
    .to_string()
    .into_bytes();
    for blob in [&layer_gz, &config, &manifest] {
        fs::write(blobs.join(sha(blob)), blob)?;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(&manifest)), "size": manifest.len(),
                        "annotations": { "org.opencontainers.image.ref.name": tag } }]
    });
    fs::write(dir.join("index.json"), index.to_string())?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// Debian's docker-registry serving a temporary directory on 127.0.0.1.
#[derive(Debug)]
pub struct LocalRegistry {
    pub port: u16,
    pub storage: PathBuf,
    dir: tempfile_lite::Dir,
    child: Child,
}

mod tempfile_lite {
    /// A directory removed on drop.
    #[derive(Debug)]
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl LocalRegistry {
    /// Starts the registry and waits until it answers.
    pub fn start() -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir()
            .join(format!("hearth-registry-{port}-{:08x}", rand::random::<u32>()));
        fs::create_dir_all(dir.join("storage"))?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )?;
        let log = fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let reg = Self { port, storage: dir.join("storage"), dir: tempfile_lite::Dir(dir), child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "docker-registry did not start listening within 20 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI layout to `repo:tag` with skopeo.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_tag: &str) -> std::io::Result<()> {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "skopeo copy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// The registry's stored blob file for `hex` (to corrupt in tests).
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the busybox image (config `User` = `user`) and pushes it as `repo_tag`.
pub fn push_busybox(reg: &LocalRegistry, repo_tag: &str, user: &str) -> std::io::Result<()> {
    push_image(reg, repo_tag, &TestImage { user: user.to_owned(), ..Default::default() })
}

/// Pushes a one-layer image as `repo_tag`.
pub fn push_layer(reg: &LocalRegistry, repo_tag: &str, layer: &[u8]) -> std::io::Result<()> {
    let layout = reg.dir.0.join(format!("layout-{:08x}", rand::random::<u32>()));
    oci_layout(&layout, "t", layer, "")?;
    let r = reg.push_layout(&layout, "t", repo_tag);
    let _ = fs::remove_dir_all(&layout);
    r
}

/// Builds a busybox image as described and pushes it as `repo_tag`.
pub fn push_image(reg: &LocalRegistry, repo_tag: &str, img: &TestImage) -> std::io::Result<()> {
    let layout = reg.dir.0.join(format!("layout-{:08x}", rand::random::<u32>()));
    busybox_oci_layout(&layout, "t", img)?;
    let r = reg.push_layout(&layout, "t", repo_tag);
    let _ = fs::remove_dir_all(&layout);
    r
}

/// Whether the tools the registry tests need are installed; `Err` names what is missing.
pub fn registry_tools() -> Result<(), String> {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "mkfs.ext4", "debugfs"]
        .into_iter()
        .filter(|t| {
            !std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
        })
        .collect();
    let busybox = Path::new("/bin/busybox").is_file();
    match (missing.is_empty(), busybox) {
        (true, true) => Ok(()),
        _ => Err(format!(
            "missing {}{}",
            missing.join(", "),
            if busybox { "" } else { " /bin/busybox (busybox-static)" }
        )),
    }
}
