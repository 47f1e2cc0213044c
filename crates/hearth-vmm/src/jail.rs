//! What a VMM needs inside a chroot of its own besides its binary: a dynamically linked VMM
//! (a distribution's or a source build's Firecracker, against glibc) cannot even be executed in
//! an empty chroot, because its program interpreter and shared libraries are not there. They
//! are found natively from the binary's ELF headers (`PT_INTERP`, then `DT_NEEDED` of it and of
//! every library, resolved in the system's library directories, as the dynamic loader would
//! without a cache) and linked into the chroot at the same paths. A static binary needs none.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hearth_fs::elf::{u64_at, Elf, PT_DYNAMIC, PT_INTERP};

/// Where the loader looks when it has no cache (glibc's trusted directories on a multiarch
/// distribution first).
const LIB_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
/// Bounds on what is read of one file and on how many libraries a binary may pull in.
const MAX_DYNAMIC: u64 = 64 << 10;
const MAX_STRTAB: u64 = 1 << 20;
const MAX_LIBS: usize = 64;

const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;

/// The program interpreter and every shared library `binary` needs, as the paths the loader
/// opens (which the chroot must have); empty for a static binary.
pub fn runtime_files(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let read = |p: &Path| {
        Elf::open(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .ok_or_else(|| format!("{} is not an ELF64 file hearth can read", p.display()))
    };
    let elf = read(binary)?;
    let Some(interp) = interpreter(&elf) else { return Ok(Vec::new()) };
    let mut files = vec![interp];
    let mut queue = needed(&elf);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if seen.len() > MAX_LIBS {
            return Err(format!("{} needs more than {MAX_LIBS} libraries", binary.display()));
        }
        let lib = resolve(&name).ok_or_else(|| {
            format!("{} needs {name}, found in none of {}", binary.display(), LIB_DIRS.join(", "))
        })?;
        queue.extend(needed(&read(&lib)?));
        if !files.contains(&lib) {
            files.push(lib);
        }
    }
    Ok(files)
}

fn interpreter(elf: &Elf) -> Option<PathBuf> {
    let seg = elf.of_kind(PT_INTERP).next()?;
    let bytes = elf.contents(seg, 4096)?;
    let path = bytes.split(|&b| b == 0).next()?;
    (path.first() == Some(&b'/')).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(path)))
}

/// The `DT_NEEDED` names of the dynamic section (plain file names only: a name with a slash
/// is not searched for).
fn needed(elf: &Elf) -> Vec<String> {
    let Some(dynamic) = elf.of_kind(PT_DYNAMIC).next().and_then(|s| elf.contents(s, MAX_DYNAMIC))
    else {
        return Vec::new();
    };
    let entries: Vec<(u64, u64)> = dynamic
        .chunks_exact(16)
        .map_while(|e| Some((u64_at(e, 0)?, u64_at(e, 8)?)))
        .take_while(|(tag, _)| *tag != 0)
        .collect();
    let value = |tag| entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
    let (Some(strtab), Some(strsz)) = (value(DT_STRTAB), value(DT_STRSZ)) else {
        return Vec::new();
    };
    let Some(strings) = elf.offset_of(strtab).and_then(|at| elf.read(at, strsz, MAX_STRTAB)) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|(t, _)| *t == DT_NEEDED)
        .filter_map(|(_, at)| {
            let s = strings.get(usize::try_from(*at).ok()?..)?;
            let name = std::str::from_utf8(s.split(|&b| b == 0).next()?).ok()?;
            (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
        })
        .collect()
}

fn resolve(name: &str) -> Option<PathBuf> {
    LIB_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// `binary` as a path: as it is when it has a slash, else the first match on PATH (as exec
/// would find it).
pub fn on_path(binary: &Path) -> Option<PathBuf> {
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return Some(binary.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(binary)).find(|p| p.is_file())
}

/// Puts `file` at the same absolute path under `root`: a hard link where both are on one
/// filesystem, else a copy (the target's own content, links resolved). Its directories are
/// made as real directories (a host's `/lib64 -> usr/lib64` is not reproduced).
pub fn place(root: &Path, file: &Path) -> std::io::Result<PathBuf> {
    let rel = file.strip_prefix("/").unwrap_or(file);
    let at = root.join(rel);
    // Directories the VMM may pass through but not change (whatever hearthd's umask).
    std::fs::create_dir_all(root)?;
    let mut dir = root.to_owned();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        dir.push(part);
        if std::fs::symlink_metadata(&dir).is_err() {
            std::fs::create_dir(&dir)?;
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let real = std::fs::canonicalize(file)?;
    let _ = std::fs::remove_file(&at);
    if std::fs::hard_link(&real, &at).is_err() {
        std::fs::copy(&real, &at)?;
        std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(at)
}

/// Opens `path` for reading without following a symbolic link in its last component: a file in
/// a jail (the VMM's log) is the VMM's to replace, with a link to anything on the host.
pub fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Connects to the Unix socket at `path` only if it is one, never through a symbolic link in
/// its last component (a jailed VMM owns its chroot and could put a link to another service's
/// socket in its API socket's place). The socket is reached through its `O_PATH` descriptor,
/// which also lifts the 108-byte limit on socket paths.
pub fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_needs_its_loader_and_libraries_and_a_static_one_none() {
        // This test's own binary is linked against the host's glibc.
        let me = std::env::current_exe().expect("exe");
        let files = runtime_files(&me).expect("deps");
        assert!(
            files[0].to_string_lossy().contains("ld-linux"),
            "the loader comes first: {files:?}"
        );
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        assert!(files.iter().all(|f| f.is_absolute() && f.is_file()), "{files:?}");
        let dir = tempfile::tempdir().expect("tmp");
        let not_elf = dir.path().join("script");
        std::fs::write(&not_elf, "#!/bin/sh\n").expect("write");
        assert!(runtime_files(&not_elf).is_err_and(|e| e.contains("not an ELF64")));
    }

    #[test]
    fn sockets_are_reached_only_as_themselves_and_files_never_through_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(connect(&sock).is_ok());
        drop(listener.accept().expect("accepted"));
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).expect("symlink");
        assert!(connect(&link).is_err(), "a link to another socket is refused");
        let plain = dir.path().join("file");
        std::fs::write(&plain, b"x").expect("write");
        assert!(connect(&plain).is_err_and(|e| e.to_string().contains("not a socket")));
        let to_file = dir.path().join("log");
        std::os::unix::fs::symlink(&plain, &to_file).expect("symlink");
        assert!(open_nofollow(&to_file).is_err() && open_nofollow(&plain).is_ok());
    }

    #[test]
    fn a_truncated_binary_is_read_without_panic_or_a_large_allocation() {
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let dir = tempfile::tempdir().expect("tmp");
        for cut in [16, 64, 200, 4096, me.len() / 2] {
            let p = dir.path().join(format!("cut{cut}"));
            std::fs::write(&p, &me[..cut]).expect("write");
            let _ = runtime_files(&p);
        }
    }

    #[test]
    fn placed_files_keep_their_path_under_the_root_and_their_content() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("lib/libx.so");
        std::fs::create_dir_all(src.parent().expect("dir")).expect("mkdir");
        std::fs::write(&src, b"x").expect("write");
        let link = dir.path().join("alias.so");
        std::os::unix::fs::symlink(&src, &link).expect("symlink");
        let root = dir.path().join("root");
        let at = place(&root, &link).expect("place");
        assert_eq!(at, root.join(link.strip_prefix("/").expect("abs")));
        assert!(!at.is_symlink());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(at.parent().expect("dir")).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "passable by the VMM's uid whatever the umask");
        assert_eq!(std::fs::read(&at).expect("read"), b"x");
    }
}
