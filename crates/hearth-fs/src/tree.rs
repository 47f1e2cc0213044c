//! Paths inside an untrusted tree (an unpacked image), resolved as if the tree were `/`.
//!
//! An image may hold `boot/vmlinux -> /etc/shadow` or `lib -> ../../..`: read naively, such a
//! link hands a host file to whoever made the image. Here every link is followed the way the
//! guest would follow it, with the tree as its root: an absolute target starts again at the
//! tree's top and `..` stops there, so nothing outside the tree is ever reached.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Links followed before a path counts as a loop (the kernel's own limit).
const MAX_HOPS: usize = 40;

fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let comps: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    pending.extend(comps.into_iter().rev());
}

/// Resolves `path` (absolute or relative, taken from the tree's top either way) inside `root`:
/// every symbolic link is followed with `root` as `/`. Returns a path under `root` made only of
/// real directories and, last, the entry itself (which is no symbolic link). Errors: NotFound
/// for a missing component, NotADirectory for a file in the middle, a loop after 40 links.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut pending = Vec::new();
    push_components(&mut pending, path);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut here = root.to_owned();
        here.extend(&resolved);
        here.push(&c);
        let meta = fs::symlink_metadata(&here)?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_HOPS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = fs::read_link(&here)?;
            if target.is_absolute() {
                resolved.clear();
            }
            push_components(&mut pending, &target);
            continue;
        }
        if !pending.is_empty() && !meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        resolved.push(c);
    }
    let mut out = root.to_owned();
    out.extend(&resolved);
    Ok(out)
}

/// Opens the regular file at `path` inside `root` ([`resolve_in_root`]) for reading, refusing
/// anything but a regular file.
pub fn open_in_root(root: &Path, path: &Path) -> io::Result<File> {
    let real = resolve_in_root(root, path)?;
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&real)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    /// A tree with links of every kind, beside a "host" secret outside it.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::write(t.path().join("secret"), b"host secret").expect("secret");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib/modules/6.1")).expect("mkdir");
        std::fs::create_dir_all(root.join("boot")).expect("mkdir");
        std::fs::write(root.join("usr/lib/modules/6.1/virtio.ko"), b"module").expect("write");
        std::fs::write(root.join("boot/vmlinuz-6.1"), b"kernel").expect("write");
        symlink("usr/lib", root.join("lib")).expect("relative link");
        symlink("/usr/lib", root.join("abslib")).expect("absolute link");
        symlink("vmlinuz-6.1", root.join("boot/vmlinux")).expect("link");
        symlink(t.path().join("secret"), root.join("boot/shadow")).expect("absolute escape");
        symlink("../../secret", root.join("boot/up")).expect("climbing escape");
        symlink("loop", root.join("loop")).expect("loop");
        (t, root)
    }

    fn read(root: &Path, p: &str) -> io::Result<String> {
        let mut s = String::new();
        open_in_root(root, Path::new(p))?.read_to_string(&mut s)?;
        Ok(s)
    }

    #[test]
    fn links_inside_the_tree_are_followed() {
        let (_t, root) = tree();
        assert_eq!(read(&root, "boot/vmlinux").expect("kernel"), "kernel");
        assert_eq!(read(&root, "/lib/modules/6.1/virtio.ko").expect("via lib"), "module");
        assert_eq!(read(&root, "abslib/modules/6.1/virtio.ko").expect("absolute inside"), "module");
        assert_eq!(
            resolve_in_root(&root, Path::new("lib/modules")).expect("dir"),
            root.join("usr/lib/modules")
        );
    }

    #[test]
    fn nothing_outside_the_tree_is_reached() {
        let (_t, root) = tree();
        // An absolute target starts at the tree's top, where there is no /secret...
        assert_eq!(
            read(&root, "boot/shadow").expect_err("absolute").kind(),
            io::ErrorKind::NotFound
        );
        // ...and `..` stops at the top.
        assert_eq!(read(&root, "boot/up").expect_err("climbing").kind(), io::ErrorKind::NotFound);
        assert_eq!(read(&root, "../secret").expect_err("dot-dot").kind(), io::ErrorKind::NotFound);
        std::fs::write(root.join("secret"), b"the tree's own").expect("write");
        assert_eq!(read(&root, "boot/up").expect("now inside"), "the tree's own");
    }

    #[test]
    fn loops_files_in_the_middle_and_directories_are_refused() {
        let (_t, root) = tree();
        assert_eq!(
            resolve_in_root(&root, Path::new("loop")).expect_err("loop").raw_os_error(),
            Some(libc::ELOOP)
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("boot/vmlinux/x")).expect_err("file").raw_os_error(),
            Some(libc::ENOTDIR)
        );
        assert_eq!(
            open_in_root(&root, Path::new("boot")).expect_err("dir").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
