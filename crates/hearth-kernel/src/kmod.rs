//! Loading the host's kernel modules natively, as `modprobe` would: the modules a name needs
//! are found in `/lib/modules/RELEASE` (its `modules.dep`, else each module's own `depends`),
//! loaded dependencies first with `init_module(2)`, each read (and, when zstd-compressed,
//! decompressed) by [`crate::modules`], skipping what `/sys/module` shows is there already.

use std::path::{Path, PathBuf};

/// The running kernel's module tree.
pub fn tree() -> PathBuf {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Path::new("/lib/modules").join(release.trim())
}

/// Whether module `name` is loaded or built in.
pub fn present(name: &str) -> bool {
    Path::new("/sys/module").join(crate::modules::canonical(name)).exists()
}

/// Loads `names` and what they depend on from `tree`; returns the modules it loaded. A name
/// neither present nor in the tree is an error that names the kernel's lack.
pub fn load(tree: &Path, names: &[&str]) -> Result<Vec<String>, String> {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !present(n)).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    if !tree.is_dir() {
        return Err(format!(
            "this kernel has no module {}: not built in, and its modules ({}) are not on this host",
            missing[0],
            tree.display()
        ));
    }
    let order = crate::modules::closure(tree, &missing)
        .map_err(|e| format!("finding modules in {}: {e}", tree.display()))?;
    let mut loaded = Vec::new();
    for rel in order {
        let Some(name) = crate::modules::module_name(&rel) else { continue };
        if present(&name) {
            continue;
        }
        let image = crate::modules::read_module(&tree.join(&rel))
            .map_err(|e| format!("reading module {name}: {e}"))?;
        match nix::kmod::init_module(&image, c"") {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => loaded.push(name),
            Err(e) => return Err(format!("loading module {name} ({}): {e}", rel.display())),
        }
    }
    match missing.iter().find(|n| !present(n)) {
        Some(n) => {
            Err(format!("this kernel has no module {n} (not built in, not in {})", tree.display()))
        }
        None => Ok(loaded),
    }
}
