//! Import tests: OCI layouts, docker archives and plain rootfs tars built in a temp dir.

use std::io::Write;

use super::*;
use crate::testutil::{self, TestImage};

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn setup() -> (tempfile::TempDir, ImageStore) {
    let t = tempfile::tempdir().expect("tmp");
    let s = ImageStore::open(&t.path().join("root")).expect("open");
    (t, s)
}

fn tmp_is_empty(t: &tempfile::TempDir) -> bool {
    fs::read_dir(t.path().join("root/images/tmp")).expect("tmp").next().is_none()
}

#[test]
fn plain_rootfs_tars_plain_gzip_and_zstd() {
    let (t, s) = setup();
    let plain = tar_of(&[("bin/hello", b"hello")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).expect("gz");
    let gz = gz.finish().expect("gz");
    let zst = zstd::encode_all(&plain[..], 1).expect("zstd");
    let mut ids = Vec::new();
    for (i, bytes) in [&plain, &gz, &zst].into_iter().enumerate() {
        let p = t.path().join(format!("rootfs{i}.tar"));
        fs::write(&p, bytes).expect("write");
        let rec = s.import(&p, &format!("demo:{i}").parse().expect("ref")).expect("import");
        assert_eq!(rec.config.cmd, ["/bin/sh"]);
        assert!(rec.config.entrypoint.is_empty());
        assert!(rec.config.env[0].starts_with("PATH=/usr/local/sbin"));
        assert_eq!(
            (rec.layers.len(), rec.size, rec.manifest_digest.clone()),
            (1, bytes.len() as u64, None)
        );
        let dir = t.path().join(format!("out{i}"));
        s.unpack_to(&rec, &dir).expect("unpack");
        assert_eq!(fs::read(dir.join("bin/hello")).expect("file"), b"hello");
        ids.push(rec.id);
    }
    // Same content, same diff id, same config: one image with three names.
    assert!(ids.iter().all(|i| *i == ids[0]));
    assert_eq!(s.list().expect("list").len(), 1);
    let other = t.path().join("other.tar");
    fs::write(&other, tar_of(&[("bin/other", b"x")])).expect("write");
    let rec = s.import(&other, &"other:1".parse().expect("ref")).expect("import");
    assert_ne!(rec.id, ids[0], "different content, different id");
    assert!(tmp_is_empty(&t));
}

#[test]
fn junk_and_empty_files_are_refused_clearly() {
    let (t, s) = setup();
    for (name, bytes) in [("junk", vec![7u8; 2048]), ("empty", vec![]), ("zeros", vec![0u8; 1024])]
    {
        let p = t.path().join(name);
        fs::write(&p, bytes).expect("write");
        let e = s.import(&p, &"x:1".parse().expect("ref")).expect_err(name);
        assert!(e.to_string().contains("is not a tar archive"), "{name}: {e}");
    }
    let e = s.import(t.path(), &"x:1".parse().expect("ref")).expect_err("plain dir");
    assert!(e.to_string().contains("OCI layout"), "{e}");
    assert!(s.list().expect("list").is_empty());
}

#[test]
fn oci_layout_from_testutil() {
    let (t, s) = setup();
    let layout = t.path().join("layout");
    testutil::busybox_oci_layout(
        &layout,
        "v1",
        &TestImage { user: "app".into(), ..Default::default() },
    )
    .expect("layout");
    let rec = s.import(&layout, &"demo:v1".parse().expect("ref")).expect("import");
    assert_eq!(rec.names, ["docker.io/library/demo:v1"]);
    assert_eq!((rec.config.user.as_str(), rec.config.working_dir.as_str()), ("app", "/work"));
    assert!(rec.config.env.contains(&"GREETING=hi".to_owned()));
    let md = rec.manifest_digest.clone().expect("manifest digest");
    assert!(s.has_blob(&md) && s.has_blob(&rec.id) && s.has_blob(&rec.layers[0]));
    let dir = t.path().join("out");
    s.unpack_to(&rec, &dir).expect("unpack");
    assert!(fs::symlink_metadata(dir.join("bin/sh")).expect("sh").file_type().is_symlink());
    assert!(dir.join("work").is_dir());
}

/// Rewrites the layout's index.json to `index` (a JSON value) and returns the layout.
fn layout_with_index(
    t: &tempfile::TempDir,
    index: impl FnOnce(serde_json::Value) -> serde_json::Value,
) -> PathBuf {
    let layout = t.path().join("layout");
    testutil::busybox_oci_layout(&layout, "v1", &TestImage::default()).expect("layout");
    let old: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("read")).expect("json");
    fs::write(layout.join("index.json"), index(old).to_string()).expect("write");
    layout
}

#[test]
fn oci_layout_through_a_nested_multi_platform_index() {
    let (t, s) = setup();
    let layout = layout_with_index(&t, |old| {
        let mut amd = old["manifests"][0].clone();
        amd["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
        let arm = serde_json::json!({"mediaType": oci::OCI_MANIFEST, "digest": format!("sha256:{}", "2".repeat(64)), "size": 1,
            "platform": {"architecture": "arm64", "os": "linux"}});
        serde_json::json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [arm, amd]})
    });
    // Put that index in a blob and point index.json at it, as skopeo does for multi-arch.
    let nested = fs::read(layout.join("index.json")).expect("read");
    let d = digest_of(&nested);
    fs::write(layout.join("blobs/sha256").join(d.hex()), &nested).expect("write");
    fs::write(
        layout.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": oci::OCI_INDEX, "digest": d.to_string(), "size": nested.len()}]})
            .to_string(),
    )
    .expect("write");
    let rec = s.import(&layout, &"multi:1".parse().expect("ref")).expect("import");
    assert_eq!(rec.config.cmd, ["sh"]);
}

#[test]
fn oci_layout_errors_name_platforms_and_catch_tampering() {
    let (t, s) = setup();
    let layout = layout_with_index(&t, |mut old| {
        old["manifests"][0]["platform"] =
            serde_json::json!({"architecture": "riscv64", "os": "linux"});
        old
    });
    let e = s.import(&layout, &"x:1".parse().expect("ref")).expect_err("platform");
    assert!(e.to_string().contains("linux/riscv64"), "{e}");

    let (t2, s2) = setup();
    let layout = layout_with_index(&t2, |old| old);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("read")).expect("json");
    let manifest_hex = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_owned();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&manifest_hex)).expect("m"),
    )
    .expect("json");
    let layer_hex = manifest["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_owned();
    fs::write(layout.join("blobs/sha256").join(&layer_hex), b"tampered").expect("tamper");
    let e = s2.import(&layout, &"x:1".parse().expect("ref")).expect_err("tampered");
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert!(s2.list().expect("list").is_empty());
    assert!(tmp_is_empty(&t2));
    drop(t);
}

/// The config of the docker archive: its runtime settings and `n` copies of `layer`'s diff_id.
fn docker_config(layer: &[u8], n: usize) -> Vec<u8> {
    let id = digest_of(layer).to_string();
    let ids = vec![format!("\"{id}\""); n].join(",");
    format!(
        r#"{{"config":{{"Entrypoint":["/bin/app"],"WorkingDir":"/srv","Env":["A=1"]}},"rootfs":{{"type":"layers","diff_ids":[{ids}]}}}}"#
    )
    .into_bytes()
}

/// A `docker save`-style archive: layers as `<id>/layer.tar`, the second a symlink to the first.
fn docker_archive(dir: &Path, with_link: bool) -> PathBuf {
    let layer = tar_of(&[("etc/x", b"hi")]);
    let config = docker_config(&layer, if with_link { 2 } else { 1 });
    let manifest = if with_link {
        br#"[{"Config":"cfg.json","RepoTags":["app:1"],"Layers":["l1/layer.tar","./l2/layer.tar"]}]"#.to_vec()
    } else {
        br#"[{"Config":"cfg.json","RepoTags":["app:1"],"Layers":["l1/layer.tar"]}]"#.to_vec()
    };
    let mut ar = tar::Builder::new(Vec::new());
    for (name, data) in
        [("l1/layer.tar", &layer[..]), ("cfg.json", &config[..]), ("manifest.json", &manifest[..])]
    {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        ar.append_data(&mut h, name, data).expect("append");
    }
    if with_link {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        ar.append_link(&mut h, "l2/layer.tar", "../l1/layer.tar").expect("link");
    }
    let p = dir.join("saved.tar");
    fs::write(&p, ar.into_inner().expect("archive")).expect("write");
    p
}

#[test]
fn docker_save_archive_import() {
    let (t, s) = setup();
    let p = docker_archive(t.path(), true);
    let rec = s.import(&p, &"app:1".parse().expect("ref")).expect("import");
    assert_eq!(rec.config.entrypoint, ["/bin/app"]);
    assert_eq!(
        (rec.config.working_dir.as_str(), rec.config.env.clone()),
        ("/srv", vec!["A=1".to_owned()])
    );
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(rec.layers[0], rec.layers[1], "the linked layer is the same blob");
    assert_eq!(rec.id, digest_of(&docker_config(&tar_of(&[("etc/x", b"hi")]), 2)));
    let out = t.path().join("out");
    s.unpack_to(&rec, &out).expect("unpack");
    assert_eq!(fs::read(out.join("etc/x")).expect("x"), b"hi");
    assert!(tmp_is_empty(&t), "nothing staged is left");
}

#[test]
fn docker_archive_naming_missing_or_escaping_members_is_refused() {
    let (t, s) = setup();
    let manifest = br#"[{"Config":"cfg.json","RepoTags":[],"Layers":["../../etc/passwd"]}]"#;
    let mut ar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    ar.append_data(&mut h, "manifest.json", &manifest[..]).expect("append");
    let p = t.path().join("bad.tar");
    fs::write(&p, ar.into_inner().expect("tar")).expect("write");
    let e = s.import(&p, &"x:1".parse().expect("ref")).expect_err("bad");
    assert!(e.to_string().contains("which the archive lacks"), "{e}");
    assert!(s.list().expect("list").is_empty());
}

#[test]
fn member_paths_are_normalised_and_stay_inside() {
    assert_eq!(member(b"./a//b/"), "a/b");
    assert_eq!(join_member("l2", "../l1/layer.tar").as_deref(), Some("l1/layer.tar"));
    assert_eq!(join_member("", "../x"), None);
    assert_eq!(join_member("a/b", "/c").as_deref(), Some("c"));
}
