//! `hearth cp`: copy files and directory trees between the host and a VM, modes kept.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use hearth_api::v1 as pb;

use crate::client;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// HOST_PATH or VM:GUEST_PATH
    src: String,
    /// HOST_PATH or VM:GUEST_PATH
    dest: String,
}

/// `VM:PATH` splits into the VM and the guest path; host paths (containing `/` before any `:`,
/// or no `:`) do not.
fn guest(spec: &str) -> Option<(&str, &str)> {
    let (vm, path) = spec.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/')).then_some((vm, path))
}

/// Packs a host file or directory into a tar whose single top-level entry is its base name.
fn pack(src: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(src).with_context(|| format!("{}", src.display()))?;
    let name = src.file_name().context("the source path has no file name")?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    if meta.is_dir() {
        b.append_dir_all(name, src)?;
    } else {
        b.append_path_with_name(src, name)?;
    }
    Ok(b.into_inner()?)
}

pub async fn cp(host: Option<String>, a: CpArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    match (guest(&a.src), guest(&a.dest)) {
        (None, Some((vm, path))) => {
            let src = PathBuf::from(&a.src);
            let data = tokio::task::spawn_blocking(move || pack(&src)).await??;
            // The archive's top entry is the source's name: unpack it into the destination's
            // parent and let the guest rename when the destination names a new entry.
            let mut chunks = vec![pb::CopyChunk { data: Vec::new(), r#ref: vm.to_owned(), path: path.to_owned() }];
            chunks.extend(data.chunks(256 << 10).map(|d| pb::CopyChunk { data: d.to_vec(), ..Default::default() }));
            c.copy_to(tokio_stream::iter(chunks)).await?;
        }
        (Some((vm, path)), None) => {
            let mut s = c.copy_from(pb::CopyFromRequest { r#ref: vm.to_owned(), path: path.to_owned() }).await?.into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = s.message().await? {
                data.extend_from_slice(&chunk.data);
            }
            let dest = PathBuf::from(&a.dest);
            tokio::task::spawn_blocking(move || unpack(&data, &dest)).await??;
        }
        (Some(_), Some(_)) => bail!("copying between two VMs is not supported: copy to the host first"),
        (None, None) => bail!("one of the paths must be VM:PATH"),
    }
    Ok(0)
}

/// Unpacks a tar with one top-level entry to `dest`: into it when it is an existing directory,
/// else as `dest` itself.
fn unpack(data: &[u8], dest: &Path) -> anyhow::Result<()> {
    let into_dir = dest.is_dir();
    let mut ar = tar::Archive::new(data);
    ar.set_preserve_permissions(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let mut comps = rel.components();
        let Some(first) = comps.next() else { continue };
        let rest: PathBuf = comps.collect();
        let base = if into_dir { dest.join(first) } else { dest.to_owned() };
        let target = if rest.as_os_str().is_empty() { base } else { base.join(&rest) };
        if rel.components().any(|c| matches!(c, std::path::Component::ParentDir | std::path::Component::RootDir)) {
            bail!("the guest sent an unsafe path {}", rel.display());
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry.unpack(&target).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}
