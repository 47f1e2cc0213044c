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

/// Puts `file` at the same absolute path under `root`: a hard link where both are on one
/// filesystem, else a copy (the target's own content, links resolved). Its directories are
/// made as real directories (a host's `/lib64 -> usr/lib64` is not reproduced).
pub fn place(root: &Path, file: &Path) -> std::io::Result<PathBuf> {
    let rel = file.strip_prefix("/").unwrap_or(file);
    let at = root.join(rel);
    if let Some(dir) = at.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let real = std::fs::canonicalize(file)?;
    let _ = std::fs::remove_file(&at);
    if std::fs::hard_link(&real, &at).is_err() {
        std::fs::copy(&real, &at)?;
    }
    Ok(at)
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
        assert_eq!(std::fs::read(&at).expect("read"), b"x");
    }
}
