//! Applying one layer tar onto a staging directory, OCI-style, without ever writing outside it.
//!
//! Rules (each has a test):
//! - entry paths are taken relative to the root (`./a`, `/a` and `a` are the same); any `..`
//!   component is an escape;
//! - parent directories are resolved inside the root: a relative symlink is followed while it
//!   stays inside; a symlink whose target is absolute or climbs above the root is an escape;
//! - the final component is never written through: an existing symlink there is replaced;
//! - hard links must name an existing entry inside the root, by the same rules;
//! - `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` empties its directory of lower
//!   layers' content.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::sys;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} tries to write outside the image root; the layer is rejected")]
    Escape { entry: String },
    #[error("layer entry {entry:?}: {source}")]
    Entry {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the layer archive")]
    Archive(#[source] io::Error),
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_LINK_HOPS: usize = 40;

/// Normalises an entry path to plain components; `None` if it contains `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Resolves `rel` (a directory path) inside `root`, following relative symlinks that stay
/// inside. Returns the real path, or `None` on an escape.
fn resolve_dir(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_owned()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            stack.pop()?;
            continue;
        }
        if c == "." {
            continue;
        }
        let mut here: PathBuf = root.to_owned();
        here.extend(&stack);
        here.push(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return None;
                }
                let target = fs::read_link(&here).ok()?;
                if target.is_absolute() {
                    return None;
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(p) => pending.push(p.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        Component::CurDir => {}
                        _ => return None,
                    }
                }
            }
            _ => stack.push(c),
        }
    }
    let mut out = root.to_owned();
    out.extend(&stack);
    Some(out)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one (uncompressed) layer tar onto `root`.
pub fn unpack_layer(reader: impl Read, root: &Path) -> Result<(), UnpackError> {
    let mut ar = tar::Archive::new(reader);
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in ar.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let escape = || UnpackError::Escape { entry: shown.clone() };
        let at = |source| UnpackError::Entry { entry: shown.clone(), source };
        let rel = clean(Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw))).ok_or_else(escape)?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let parent_rel = rel.parent().map(Path::to_owned).unwrap_or_default();
        let parent = resolve_dir(root, &parent_rel).ok_or_else(escape)?;
        if name == OPAQUE {
            if let Ok(rd) = fs::read_dir(&parent) {
                for child in rd.flatten() {
                    let p = child.path();
                    if !written.contains(&p) {
                        remove_any(&p).map_err(at)?;
                    }
                }
            }
            continue;
        }
        if let Some(victim) = name.strip_prefix(WHITEOUT) {
            remove_any(&parent.join(victim)).map_err(at)?;
            continue;
        }
        fs::create_dir_all(&parent).map_err(at)?;
        // The parent may have been created through nothing but real directories; check again.
        if resolve_dir(root, &parent_rel).as_deref() != Some(parent.as_path()) {
            return Err(escape());
        }
        let target = parent.join(&name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        if !(kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir())) {
            remove_any(&target).map_err(at)?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(at)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::File::create(&target).map_err(at)?;
                io::copy(&mut entry, &mut f).map_err(at)?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(at)?.ok_or_else(escape)?;
                symlink(&link, &target).map_err(at)?;
            }
            tar::EntryType::Link => {
                let link = entry.link_name().map_err(at)?.ok_or_else(escape)?;
                let lrel = clean(&link).ok_or_else(escape)?;
                let lparent = resolve_dir(root, lrel.parent().unwrap_or(Path::new(""))).ok_or_else(escape)?;
                let src = lparent.join(lrel.file_name().ok_or_else(escape)?);
                fs::hard_link(&src, &target).map_err(at)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let fmt = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let (ma, mi) = (header.device_major().ok().flatten().unwrap_or(0), header.device_minor().ok().flatten().unwrap_or(0));
                sys::mknod(&target, fmt | mode, ma, mi).map_err(at)?;
            }
            // PAX headers are consumed by the tar crate; other types carry nothing to create.
            _ => continue,
        }
        written.insert(target.clone());
        let is_link = kind == tar::EntryType::Symlink;
        if !is_link && kind != tar::EntryType::Link {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(at)?;
        }
        if kind != tar::EntryType::Link {
            let (uid, gid) = (header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(at)?;
            if !is_link && mode & 0o6000 != 0 {
                // chown clears setuid/setgid; restore them.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(at)?;
            }
        }
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(xname) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    // security.* may be refused by the staging filesystem; others must apply.
                    if let Err(e) = sys::lsetxattr(&target, xname, ext.value_bytes()) {
                        if !xname.starts_with("security.") && !xname.starts_with("trusted.") {
                            return Err(at(e));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar entry whose path bytes are written raw (the builder refuses `..`).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        {
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        if let Some(l) = link {
            let ln = &mut h.as_old_mut().linkname;
            ln.fill(0);
            ln[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    fn layer(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, k, l, d) in entries {
            raw_entry(&mut b, p, *k, *l, d);
        }
        b.into_inner().expect("tar")
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().join("root");
        fs::create_dir(&root).expect("mkdir");
        (t, root)
    }

    fn outside_untouched(t: &tempfile::TempDir) {
        let names: Vec<_> = fs::read_dir(t.path()).expect("rd").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, ["root"], "something was written outside the root");
    }

    #[test]
    fn files_dirs_links_and_modes() {
        let (_t, root) = setup();
        let l =
            layer(&[("./etc/", D, None, b""), ("etc/a", F, None, b"A"), ("/etc/b", S, Some("a"), b""), ("etc/c", H, Some("etc/a"), b"")]);
        unpack_layer(&l[..], &root).expect("unpack");
        assert_eq!(fs::read(root.join("etc/b")).expect("via symlink"), b"A");
        assert_eq!(fs::metadata(root.join("etc/c")).expect("hl").ino(), fs::metadata(root.join("etc/a")).expect("a").ino());
        assert_eq!(fs::metadata(root.join("etc/a")).expect("a").mode() & 0o777, 0o644);
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let (_t, root) = setup();
        unpack_layer(&layer(&[("d/", D, None, b""), ("d/x", F, None, b"1"), ("d/y", F, None, b"2"), ("e/", D, None, b""), ("e/z", F, None, b"3")])[..], &root).expect("lower");
        unpack_layer(&layer(&[("d/.wh.x", F, None, b""), ("e/new", F, None, b"4"), ("e/.wh..wh..opq", F, None, b"")])[..], &root)
            .expect("upper");
        assert!(!root.join("d/x").exists() && root.join("d/y").exists());
        assert!(!root.join("e/z").exists(), "opaque dir hides lower content");
        assert!(root.join("e/new").exists(), "but keeps this layer's");
    }

    #[test]
    fn dotdot_is_rejected_naming_the_entry() {
        let (t, root) = setup();
        let e = unpack_layer(&layer(&[("../evil", F, None, b"x")])[..], &root).expect_err("escape");
        assert!(e.to_string().contains("../evil"), "{e}");
        outside_untouched(&t);
    }

    #[test]
    fn absolute_paths_stay_inside() {
        let (t, root) = setup();
        unpack_layer(&layer(&[("/abs", F, None, b"x")])[..], &root).expect("unpack");
        assert!(root.join("abs").exists());
        outside_untouched(&t);
    }

    #[test]
    fn writing_through_an_escaping_symlink_is_rejected() {
        for target in ["/", "..", "../..", "a/../../.."] {
            let (t, root) = setup();
            let l = layer(&[("evil", S, Some(target), b""), ("evil/pwned", F, None, b"x")]);
            let e = unpack_layer(&l[..], &root).expect_err(target);
            assert!(e.to_string().contains("evil/pwned"), "{e}");
            outside_untouched(&t);
        }
    }

    #[test]
    fn symlink_escape_across_layers_is_rejected() {
        let (t, root) = setup();
        unpack_layer(&layer(&[("link", S, Some("../"), b"")])[..], &root).expect("a dangling link alone is fine");
        let e = unpack_layer(&layer(&[("link/x", F, None, b"x")])[..], &root).expect_err("escape");
        assert!(matches!(e, UnpackError::Escape { .. }), "{e}");
        outside_untouched(&t);
    }

    #[test]
    fn hardlink_escapes_are_rejected() {
        for target in ["../outside", "/../../etc/passwd", "evil/x"] {
            let (t, root) = setup();
            fs::write(t.path().join("outside"), b"secret").expect("write");
            let l = layer(&[("evil", S, Some("/etc"), b""), ("h", H, Some(target), b"")]);
            let e = unpack_layer(&l[..], &root).expect_err(target);
            assert!(matches!(e, UnpackError::Escape { .. }), "{target}: {e}");
        }
    }

    #[test]
    fn inside_relative_symlinks_are_followed() {
        let (_t, root) = setup();
        let l = layer(&[("usr/", D, None, b""), ("usr/bin/", D, None, b""), ("bin", S, Some("usr/bin"), b""), ("bin/tool", F, None, b"t")]);
        unpack_layer(&l[..], &root).expect("unpack");
        assert_eq!(fs::read(root.join("usr/bin/tool")).expect("tool"), b"t");
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
        let (t, root) = setup();
        fs::write(t.path().join("victim"), b"keep").expect("write");
        let l = layer(&[("f", S, Some("../victim"), b""), ("f", F, None, b"new")]);
        unpack_layer(&l[..], &root).expect("unpack");
        assert_eq!(fs::read(t.path().join("victim")).expect("victim"), b"keep");
        assert_eq!(fs::read(root.join("f")).expect("f"), b"new");
    }
}
