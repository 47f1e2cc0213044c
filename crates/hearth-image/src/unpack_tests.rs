//! Unit tests of `unpack`, among them crafted malicious layers.

use super::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

/// One entry: path and link name are written as raw header bytes (the builder refuses `..`).
struct E<'a> {
    path: &'a str,
    kind: tar::EntryType,
    link: &'a str,
    data: &'a [u8],
    mode: u32,
}

fn e<'a>(path: &'a str, kind: tar::EntryType, link: &'a str, data: &'a [u8]) -> E<'a> {
    E { path, kind, link, data, mode: if kind == D { 0o755 } else { 0o644 } }
}

fn header(x: &E<'_>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..x.path.len()].copy_from_slice(x.path.as_bytes());
    let ln = &mut h.as_old_mut().linkname;
    ln.fill(0);
    ln[..x.link.len()].copy_from_slice(x.link.as_bytes());
    h.set_entry_type(x.kind);
    h.set_size(x.data.len() as u64);
    h.set_mode(x.mode);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for x in entries {
        b.append(&header(x), x.data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A temp dir holding `root` (the destination) and `outside` (a sentinel file).
struct Scene {
    t: tempfile::TempDir,
    root: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        fs::create_dir(&root).expect("mkdir");
        fs::write(t.path().join("outside"), b"keep").expect("sentinel");
        Self { t, root }
    }

    fn apply(&self, entries: &[E<'_>]) -> Result<(), UnpackError> {
        unpack_layer(&layer(entries)[..], &self.root)
    }

    /// Nothing outside `root` was created, removed or changed.
    fn outside_untouched(&self) {
        let mut names: Vec<_> =
            fs::read_dir(self.t.path()).expect("rd").flatten().map(|e| e.file_name()).collect();
        names.sort();
        assert_eq!(names, ["outside", "root"], "something was written outside the root");
        assert_eq!(fs::read(self.t.path().join("outside")).expect("sentinel"), b"keep");
        assert_eq!(
            fs::symlink_metadata(self.t.path().join("outside")).expect("meta").nlink(),
            1,
            "hard linked from inside"
        );
    }

    fn escape(&self, entries: &[E<'_>], entry: &str) {
        let err = self.apply(entries).expect_err("escape must fail");
        assert!(matches!(err, UnpackError::Escape { .. }), "{entry}: {err}");
        assert!(err.to_string().contains(&format!("{entry:?}")), "error names the entry: {err}");
        assert!(err.to_string().contains("outside the image root"), "{err}");
        self.outside_untouched();
    }
}

#[test]
fn files_dirs_links_modes_owners_and_mtimes() {
    let s = Scene::new();
    let mut suid = e("bin/su", F, "", b"#!");
    suid.mode = 0o4755;
    let mut owned = e("home/app/", D, "", b"");
    owned.mode = 0o700;
    let entries = [
        e("./etc/", D, "", b""),
        e("etc/a", F, "", b"A"),
        e("/etc/b", S, "a", b""),
        e("etc/c", H, "etc/a", b""),
        suid,
        owned,
    ];
    let mut tar = tar::Builder::new(Vec::new());
    for x in &entries {
        let mut h = header(x);
        if x.path.starts_with("home") {
            h.set_uid(1000);
            h.set_gid(1001);
            h.set_cksum();
        }
        tar.append(&h, x.data).expect("append");
    }
    unpack_layer(&tar.into_inner().expect("tar")[..], &s.root).expect("unpack");
    let r = &s.root;
    assert_eq!(fs::read(r.join("etc/b")).expect("via symlink"), b"A");
    assert_eq!(fs::read_link(r.join("etc/b")).expect("link"), Path::new("a"));
    assert_eq!(
        fs::metadata(r.join("etc/c")).expect("hl").ino(),
        fs::metadata(r.join("etc/a")).expect("a").ino()
    );
    assert_eq!(fs::metadata(r.join("etc/a")).expect("a").mode() & 0o7777, 0o644);
    assert_eq!(
        fs::metadata(r.join("bin/su")).expect("su").mode() & 0o7777,
        0o4755,
        "setuid survives chown"
    );
    assert_eq!(fs::metadata(r.join("bin")).expect("implicit dir").mode() & 0o7777, 0o755);
    let home = fs::metadata(r.join("home/app")).expect("home");
    assert_eq!((home.uid(), home.gid(), home.mode() & 0o777), (1000, 1001, 0o700));
    assert_eq!(fs::metadata(r.join("etc/a")).expect("a").mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(r.join("etc")).expect("dir").mtime(),
        1_600_000_000,
        "dir mtime set after its children"
    );
    s.outside_untouched();
}

#[test]
fn long_names_devices_and_fifos() {
    let s = Scene::new();
    let long = format!("{}/file", "d".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, &long, &b"x"[..]).expect("long");
    for (name, kind) in [
        ("dev/null", tar::EntryType::Char),
        ("dev/loop9", tar::EntryType::Block),
        ("run/fifo", tar::EntryType::Fifo),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(1).expect("major");
        h.set_device_minor(3).expect("minor");
        b.append_data(&mut h, name, &b""[..]).expect("dev");
    }
    unpack_layer(&b.into_inner().expect("tar")[..], &s.root).expect("unpack");
    assert_eq!(fs::read(s.root.join(&long)).expect("long name"), b"x");
    let null = fs::symlink_metadata(s.root.join("dev/null")).expect("null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(fs::symlink_metadata(s.root.join("dev/loop9"))
        .expect("blk")
        .file_type()
        .is_block_device());
    assert!(fs::symlink_metadata(s.root.join("run/fifo")).expect("fifo").file_type().is_fifo());
}

#[test]
fn user_xattrs_are_kept_and_security_ones_are_best_effort() {
    let s = Scene::new();
    if sys::lsetxattr(&s.t.path().join("outside"), b"user.probe", b"1").is_err() {
        eprintln!("skipping: the temp filesystem has no user xattrs");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.user.note", &b"hello"[..]),
        ("SCHILY.xattr.security.bogus", &b"x"[..]),
    ])
    .expect("pax");
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &b"x"[..]).expect("file");
    unpack_layer(&b.into_inner().expect("tar")[..], &s.root).expect("unpack");
    let out = std::process::Command::new("getfattr")
        .args(["-n", "user.note", "--only-values"])
        .arg(s.root.join("f"))
        .output();
    if let Ok(out) = out {
        assert_eq!(out.stdout, b"hello");
    }
}

#[test]
fn whiteouts_and_opaque_dirs() {
    let s = Scene::new();
    s.apply(&[
        e("d/", D, "", b""),
        e("d/x", F, "", b"1"),
        e("d/y", F, "", b"2"),
        e("o/", D, "", b""),
        e("o/z", F, "", b"3"),
        e("o/sub/", D, "", b""),
        e("o/sub/old", F, "", b"4"),
    ])
    .expect("lower");
    s.apply(&[
        e("d/.wh.x", F, "", b""),
        e("d/.wh.never-existed", F, "", b""),
        e("gone/.wh.x", F, "", b""),
        e("o/sub/new", F, "", b"5"),
        e("o/.wh..wh..opq", F, "", b""),
        e("o/later", F, "", b"6"),
    ])
    .expect("upper");
    let r = &s.root;
    assert!(!r.join("d/x").exists() && r.join("d/y").exists());
    assert!(!r.join("d/.wh.x").exists(), "whiteout markers are not files");
    assert!(!r.join("gone").exists(), "a whiteout under a missing dir creates nothing");
    assert!(
        !r.join("o/z").exists() && !r.join("o/sub/old").exists(),
        "opaque dir hides all lower content"
    );
    assert!(r.join("o/sub/new").exists() && r.join("o/later").exists(), "but keeps this layer's");
    s.outside_untouched();
}

#[test]
fn whiteouts_naming_dot_or_dotdot_are_escapes() {
    for bad in [".wh..", ".wh...", "a/.wh...", ".wh."] {
        let s = Scene::new();
        s.apply(&[e("a/", D, "", b"")]).expect("lower");
        s.escape(&[e(bad, F, "", b"")], bad);
        assert!(s.root.join("a").is_dir());
    }
}

#[test]
fn dotdot_anywhere_is_an_escape() {
    for bad in [
        "../evil",
        "a/../../evil",
        "./../outside",
        "/../outside",
        "a/b/../../../outside",
        "..",
        "a/..",
    ] {
        let s = Scene::new();
        s.escape(&[e(bad, F, "", b"pwned")], bad);
    }
    let s = Scene::new();
    s.escape(&[e("../outdir/", D, "", b"")], "../outdir/");
}

#[test]
fn absolute_paths_stay_inside() {
    let s = Scene::new();
    s.apply(&[e("/abs", F, "", b"x"), e("//etc///passwd", F, "", b"y")]).expect("unpack");
    assert!(s.root.join("abs").exists() && s.root.join("etc/passwd").exists());
    s.outside_untouched();
}

#[test]
fn writing_through_an_escaping_symlink_is_an_escape() {
    let outside = Scene::new().t.path().to_owned();
    let abs = outside.display().to_string();
    for target in ["/", "/etc", "..", "../..", "a/../../..", "./../", abs.as_str()] {
        let s = Scene::new();
        s.escape(&[e("evil", S, target, b""), e("evil/passwd", F, "", b"x")], "evil/passwd");
        let s = Scene::new();
        s.escape(&[e("evil", S, target, b""), e("evil/sub/", D, "", b"")], "evil/sub/");
    }
}

#[test]
fn symlink_chains_and_cross_layer_escapes() {
    let s = Scene::new();
    // Dangling or escaping links are fine as links; only writing through them is refused.
    s.apply(&[e("a/", D, "", b""), e("a/up", S, "..", b""), e("link", S, "a/up/a/up/..", b"")])
        .expect("links alone");
    s.escape(&[e("link/x", F, "", b"x")], "link/x");
    s.escape(&[e("a/up/a/up/../x", F, "", b"x")], "a/up/a/up/../x");
    s.apply(&[e("a/up/a/inside", F, "", b"ok")]).expect("a chain that stays inside");
    assert_eq!(fs::read(s.root.join("a/inside")).expect("inside"), b"ok");
}

#[test]
fn symlink_loops_are_refused() {
    let s = Scene::new();
    let err = s
        .apply(&[e("x", S, "y", b""), e("y", S, "x", b""), e("x/f", F, "", b"")])
        .expect_err("loop");
    assert!(matches!(err, UnpackError::SymlinkLoop { .. }), "{err}");
    s.outside_untouched();
}

#[test]
fn hardlink_escapes_are_refused() {
    for target in [
        "../outside",
        "/../outside",
        "a/../../outside",
        "evil/outside",
        "evil/passwd",
        "up/outside",
    ] {
        let s = Scene::new();
        s.apply(&[e("a/", D, "", b""), e("evil", S, "/etc", b""), e("up", S, "..", b"")])
            .expect("lower");
        s.escape(&[e("h", H, target, b"")], "h");
        assert!(!s.root.join("h").exists());
    }
}

#[test]
fn hardlink_to_missing_or_directory_is_refused() {
    let s = Scene::new();
    let err = s.apply(&[e("h", H, "nope/missing", b"")]).expect_err("missing");
    assert!(matches!(err, UnpackError::MissingLinkTarget { .. }), "{err}");
    let err = s.apply(&[e("d/", D, "", b""), e("h", H, "d", b"")]).expect_err("dir");
    assert!(matches!(err, UnpackError::Entry { .. }), "{err}");
    s.outside_untouched();
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink_itself() {
    let s = Scene::new();
    s.apply(&[e("l", S, "../outside", b""), e("h", H, "l", b"")]).expect("unpack");
    assert!(fs::symlink_metadata(s.root.join("h")).expect("h").file_type().is_symlink());
    s.outside_untouched();
}

#[test]
fn inside_relative_symlinks_are_followed() {
    let s = Scene::new();
    s.apply(&[
        e("usr/bin/", D, "", b""),
        e("bin", S, "usr/bin", b""),
        e("bin/tool", F, "", b"t"),
        e("usr/sbin", S, "./bin", b""),
    ])
    .expect("unpack");
    s.apply(&[e("usr/sbin/other", F, "", b"o")]).expect("second layer");
    assert_eq!(fs::read(s.root.join("usr/bin/tool")).expect("tool"), b"t");
    assert_eq!(fs::read(s.root.join("usr/bin/other")).expect("other"), b"o");
    assert!(fs::symlink_metadata(s.root.join("bin")).expect("bin").file_type().is_symlink());
}

#[test]
fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
    let s = Scene::new();
    s.apply(&[e("f", S, "../outside", b""), e("f", F, "", b"new")]).expect("unpack");
    assert_eq!(fs::read(s.root.join("f")).expect("f"), b"new");
    s.apply(&[e("g", S, "../outside", b""), e("g/", D, "", b"")]).expect("dir over symlink");
    assert!(fs::symlink_metadata(s.root.join("g")).expect("g").is_dir());
    s.outside_untouched();
}

#[test]
fn a_parent_that_is_a_file_is_an_error_not_an_escape() {
    let s = Scene::new();
    let err = s.apply(&[e("f", F, "", b"x"), e("f/child", F, "", b"y")]).expect_err("not a dir");
    assert!(matches!(err, UnpackError::Entry { .. }), "{err}");
}

#[test]
fn garbage_is_an_archive_error() {
    let s = Scene::new();
    let err = unpack_layer(&[0x42u8; 1024][..], &s.root).expect_err("garbage");
    assert!(matches!(err, UnpackError::Archive(_)), "{err}");
}
