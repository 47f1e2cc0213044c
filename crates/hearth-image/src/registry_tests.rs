//! Pull tests: a fake registry with bearer auth (always runs) and the real `docker-registry`
//! (when installed).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine;

use super::*;
use crate::testutil::{self, LocalRegistry, TestImage};
use crate::{ImageStore, NoProgress};

/// Records every progress call.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Progress for Recorder {
    fn start(&self, d: &str, total: u64) {
        self.0.lock().expect("lock").push(format!("start {d} {total}"));
    }
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, d: &str) {
        self.0.lock().expect("lock").push(format!("finish {d}"));
    }
}

/// A registry answering from a map of paths, behind bearer auth that wants basic `u:p`.
struct FakeRegistry {
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

fn respond(mut s: &TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut out =
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = s.write_all(out.as_bytes()).and_then(|_| s.write_all(body));
}

impl FakeRegistry {
    fn start(content: HashMap<String, (String, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut auth = String::new();
                loop {
                    let mut hl = String::new();
                    if reader.read_line(&mut hl).unwrap_or(0) == 0 || hl == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = hl.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = v.trim().to_owned();
                        }
                    }
                }
                h.lock().expect("lock").push(path.clone());
                let basic =
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("u:p"));
                if path.starts_with("/token?") {
                    if auth == basic && path.contains("scope=repository%3Ademo%3Apull") {
                        respond(&stream, "200 OK", &[], br#"{"token":"T0K"}"#);
                    } else {
                        respond(&stream, "401 Unauthorized", &[], b"");
                    }
                } else if auth != "Bearer T0K" {
                    let challenge = format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:demo:pull""#
                    );
                    respond(&stream, "401 Unauthorized", &[("WWW-Authenticate", challenge)], b"");
                } else if let Some((ct, body)) = content.get(&path) {
                    respond(&stream, "200 OK", &[("Content-Type", ct.clone())], body);
                } else {
                    respond(&stream, "404 Not Found", &[], b"");
                }
            }
        });
        Self { port, hits }
    }
}

fn json_digest(v: &serde_json::Value) -> (String, Vec<u8>) {
    let b = v.to_string().into_bytes();
    (digest_of(&b).to_string(), b)
}

/// An index (arm64 + amd64) at tag `1`, an arm64-only index at `armonly`, and the image.
fn fake_content() -> HashMap<String, (String, Vec<u8>)> {
    let layer = testutil::busybox_layer(&TestImage::default()).expect("layer");
    let zst = zstd::encode_all(&layer[..], 1).expect("zstd");
    let layer_digest = digest_of(&zst).to_string();
    let diff_id = digest_of(&layer).to_string();
    let (config_digest, config) = json_digest(
        &serde_json::json!({"config": {"Entrypoint": ["/bin/sh", "-c"], "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}}),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": layer_digest, "size": zst.len()}],
    });
    let (manifest_digest, manifest) = json_digest(&manifest);
    let arm = serde_json::json!({"mediaType": DOCKER_MANIFEST, "digest": format!("sha256:{}", "1".repeat(64)), "size": 1,
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}});
    let amd = serde_json::json!({"mediaType": DOCKER_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"}});
    let (_, index) = json_digest(
        &serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [arm, amd]}),
    );
    let (_, arm_only) = json_digest(
        &serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [arm]}),
    );
    let mut c = HashMap::new();
    c.insert("/v2/demo/manifests/1".into(), (DOCKER_LIST.into(), index));
    c.insert("/v2/demo/manifests/armonly".into(), (DOCKER_LIST.into(), arm_only));
    c.insert(format!("/v2/demo/manifests/{manifest_digest}"), (DOCKER_MANIFEST.into(), manifest));
    c.insert(
        format!("/v2/demo/blobs/{config_digest}"),
        ("application/octet-stream".into(), config),
    );
    c.insert(format!("/v2/demo/blobs/{layer_digest}"), ("application/octet-stream".into(), zst));
    c
}

#[test]
fn bearer_auth_with_docker_config_credentials_and_platform_selection() {
    let fake = FakeRegistry::start(fake_content());
    let t = tempfile::tempdir().expect("tmp");
    let s = ImageStore::open(t.path()).expect("open");
    let r: ImageRef = format!("127.0.0.1:{}/demo:1", fake.port).parse().expect("ref");

    let no_creds =
        PullOptions { docker_config: Some(t.path().join("empty.json")), ..Default::default() };
    std::fs::write(t.path().join("empty.json"), "{}").expect("write");
    let err = s.pull(&r, &no_creds, &NoProgress).expect_err("denied");
    assert!(matches!(err, PullError::Denied { .. }), "{err}");

    let cfg = t.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("u:p");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#, fake.port),
    )
    .expect("write");
    let opts = PullOptions { docker_config: Some(cfg), ..Default::default() };
    let progress = Recorder::default();
    let rec = s.pull(&r, &opts, &progress).expect("pull");
    assert_eq!(rec.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(rec.config.labels.get("a").map(String::as_str), Some("b"));
    assert_eq!(rec.names, [r.to_string()]);
    assert_eq!(
        progress.0.lock().expect("lock").iter().filter(|p| p.starts_with("finish")).count(),
        2,
        "config and layer"
    );
    let dir = t.path().join("unpacked");
    s.unpack_to(&rec, &dir).expect("zstd layer unpacks");
    assert!(dir.join("bin/busybox").is_file());

    let before = fake.hits.lock().expect("lock").iter().filter(|p| p.contains("/blobs/")).count();
    let again = s.pull(&r, &opts, &progress).expect("pull again");
    let after = fake.hits.lock().expect("lock").iter().filter(|p| p.contains("/blobs/")).count();
    assert_eq!((again.id, before), (rec.id, after), "blobs are reused, not downloaded again");

    let arm: ImageRef = format!("127.0.0.1:{}/demo:armonly", fake.port).parse().expect("ref");
    let err = s.pull(&arm, &opts, &NoProgress).expect_err("no amd64");
    assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
    let missing: ImageRef = format!("127.0.0.1:{}/demo:nope", fake.port).parse().expect("ref");
    assert!(matches!(s.pull(&missing, &opts, &NoProgress), Err(PullError::NotFound { .. })));
}

/// What a misbehaving registry does for one path.
#[derive(Clone)]
enum Act {
    /// Answers with this content type and body.
    Serve(String, Vec<u8>),
    /// Promises `len` bytes, sends `sent`, then goes silent with the connection open.
    Stall { len: usize, sent: Vec<u8> },
    /// Sends a body longer than any descriptor of it (with a matching Content-Length).
    Flood(usize),
    /// Redirects to `to`.
    Redirect(String),
}

/// A registry (no auth) acting out `acts` by path; unknown paths are 404.
fn misbehaving(acts: HashMap<String, Act>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let acts = acts.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                loop {
                    let mut hl = String::new();
                    if reader.read_line(&mut hl).unwrap_or(0) == 0 || hl == "\r\n" {
                        break;
                    }
                }
                match acts.get(&path) {
                    Some(Act::Serve(ct, body)) => {
                        respond(&stream, "200 OK", &[("Content-Type", ct.clone())], body)
                    }
                    Some(Act::Stall { len, sent }) => {
                        let mut s = &stream;
                        let _ = s.write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
                        );
                        let _ = s.write_all(sent);
                        std::thread::sleep(std::time::Duration::from_secs(600));
                    }
                    Some(Act::Flood(n)) => respond(&stream, "200 OK", &[], &vec![b'x'; *n]),
                    Some(Act::Redirect(to)) => {
                        respond(&stream, "307 Temporary Redirect", &[("Location", to.clone())], b"")
                    }
                    None => respond(&stream, "404 Not Found", &[], b""),
                }
            });
        }
    });
    port
}

/// A one-layer image whose layer blob `act` serves; the manifest claims the layer has `size`.
fn image_with_layer(act: impl FnOnce(&str) -> Act, size: usize) -> (HashMap<String, Act>, String) {
    let layer = testutil::busybox_layer(&TestImage::default()).expect("layer");
    let layer_digest = digest_of(&layer).to_string();
    let (config_digest, config) = json_digest(
        &serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [layer_digest.clone()]}}),
    );
    let (_, manifest) = json_digest(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": size}],
    }));
    let mut acts = HashMap::new();
    acts.insert("/v2/bad/manifests/1".to_owned(), Act::Serve(OCI_MANIFEST.into(), manifest));
    acts.insert(
        format!("/v2/bad/blobs/{config_digest}"),
        Act::Serve("application/octet-stream".into(), config),
    );
    let path = format!("/v2/bad/blobs/{layer_digest}");
    acts.insert(path.clone(), act(&path));
    (acts, layer_digest)
}

fn nothing_staged(t: &tempfile::TempDir) -> bool {
    std::fs::read_dir(t.path().join("images/tmp")).expect("tmp").next().is_none()
}

#[test]
fn a_registry_that_stalls_mid_blob_fails_the_pull_after_the_timeout() {
    let (acts, _) = image_with_layer(|_| Act::Stall { len: 1 << 20, sent: vec![0; 1000] }, 1 << 20);
    let port = misbehaving(acts);
    let t = tempfile::tempdir().expect("tmp");
    let s = ImageStore::open(t.path()).expect("open");
    let r: ImageRef = format!("127.0.0.1:{port}/bad:1").parse().expect("ref");
    let opts = PullOptions { timeout: std::time::Duration::from_secs(1), ..Default::default() };
    let started = std::time::Instant::now();
    let e = s.pull(&r, &opts, &NoProgress).expect_err("stalled");
    assert!(matches!(e, PullError::Stalled { .. }), "{e}");
    assert!(
        e.to_string().contains("nothing arrived for 1 s")
            && e.to_string().contains("--registry-timeout"),
        "{e}"
    );
    // It gave up on the silence, not after the server's ten minutes.
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    assert!(nothing_staged(&t), "the partial download was removed");
    assert!(s.list().expect("list").is_empty());
}

#[test]
fn a_registry_cannot_send_more_than_the_descriptors_say_or_redirect_forever() {
    let t = tempfile::tempdir().expect("tmp");
    let s = ImageStore::open(t.path()).expect("open");
    // A blob longer than its descriptor is cut off at the descriptor's size.
    let (acts, _) = image_with_layer(|_| Act::Flood(4 << 20), 1024);
    let port = misbehaving(acts);
    let r: ImageRef = format!("127.0.0.1:{port}/bad:1").parse().expect("ref");
    let e = s.pull(&r, &PullOptions::default(), &NoProgress).expect_err("flood");
    assert!(matches!(e, PullError::TooLarge { limit: 1024, .. }), "{e}");
    assert!(nothing_staged(&t));
    // A redirect loop ends.
    let (acts, _) = image_with_layer(|path| Act::Redirect(path.to_owned()), 1024);
    let port = misbehaving(acts);
    let r: ImageRef = format!("127.0.0.1:{port}/bad:1").parse().expect("ref");
    let e = s.pull(&r, &PullOptions::default(), &NoProgress).expect_err("loop");
    assert!(e.to_string().contains("redirected more than 5 times"), "{e}");
    // A manifest without end is refused at its bound.
    let mut acts = HashMap::new();
    acts.insert("/v2/bad/manifests/1".to_owned(), Act::Flood((MAX_MANIFEST + 10) as usize));
    let port = misbehaving(acts);
    let r: ImageRef = format!("127.0.0.1:{port}/bad:1").parse().expect("ref");
    let e = s.pull(&r, &PullOptions::default(), &NoProgress).expect_err("huge manifest");
    assert!(matches!(e, PullError::TooLarge { .. }), "{e}");
}

fn debugfs(img: &std::path::Path, cmd: &str) -> String {
    let out =
        std::process::Command::new("debugfs").args(["-R", cmd]).arg(img).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pull_from_a_local_registry_and_build_the_rootfs() {
    if let Err(why) = testutil::registry_tools() {
        eprintln!("skipping the docker-registry pull test: {why}");
        return;
    }
    let reg = LocalRegistry::start().expect("registry");
    testutil::push_busybox(&reg, "demo:1", "app").expect("push");
    let t = tempfile::tempdir().expect("tmp");
    let s = ImageStore::open(t.path()).expect("open");
    let r: ImageRef = format!("{}/demo:1", reg.host()).parse().expect("ref");
    let rec = s.pull(&r, &PullOptions::default(), &NoProgress).expect("pull");
    assert_eq!((rec.config.user.as_str(), rec.config.working_dir.as_str()), ("app", "/work"));
    assert!(rec.config.env.contains(&"GREETING=hi".to_owned()), "{:?}", rec.config.env);
    assert_eq!(rec.config.cmd, ["sh"]);
    assert!(rec.manifest_digest.is_some() && rec.size > 0);

    let img = s.rootfs(&rec).expect("rootfs");
    assert_eq!(img, t.path().join(format!("images/rootfs/{}.ext4", rec.id.hex())));
    let bin = debugfs(&img, "ls -l /bin");
    assert!(bin.contains("busybox") && bin.contains("sha256sum"), "{bin}");
    assert!(debugfs(&img, "stat /tmp").contains("Mode:  01777"));
    for d in ["/work", "/proc", "/sys", "/dev", "/run"] {
        assert!(debugfs(&img, &format!("stat {d}")).contains("Type: directory"), "{d}");
    }
    assert!(debugfs(&img, "cat /etc/passwd").contains("app:x:1000:1000"));
    let built = std::fs::metadata(&img).expect("meta").modified().expect("mtime");
    assert_eq!(s.rootfs(&rec).expect("cached"), img);
    assert_eq!(
        std::fs::metadata(&img).expect("meta").modified().expect("mtime"),
        built,
        "built once"
    );
    assert!(
        std::fs::read_dir(t.path().join("images/tmp")).expect("tmp").next().is_none(),
        "staging removed"
    );

    // The name moves to a new image; the old one stays, nameless.
    testutil::push_image(&reg, "demo:1", &TestImage { payload_bytes: 1000, ..Default::default() })
        .expect("push v2");
    let new = s.pull(&r, &PullOptions::default(), &NoProgress).expect("pull v2");
    assert_ne!(new.id, rec.id);
    let old = s.get(rec.id.hex()).expect("get").expect("old stays");
    assert!(old.names.is_empty());
    assert_eq!(s.list().expect("list").len(), 2);
    s.remove(rec.id.hex()).expect("rm old");
    assert!(!img.exists(), "its rootfs goes with it");

    // A corrupted blob in the registry is caught by digest verification.
    let t2 = tempfile::tempdir().expect("tmp");
    let s2 = ImageStore::open(t2.path()).expect("open");
    std::fs::write(reg.blob_file(new.layers[0].hex()), b"corrupt").expect("corrupt");
    let e = s2.pull(&r, &PullOptions::default(), &NoProgress).expect_err("mismatch");
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert!(s2.list().expect("list").is_empty());
    assert!(!s2.has_blob(&new.layers[0]));
    assert!(std::fs::read_dir(t2.path().join("images/tmp")).expect("tmp").next().is_none());
}
