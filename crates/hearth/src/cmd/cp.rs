//! `hearth cp`: copy files and directory trees between the host and a VM, modes kept.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use hearth_api::v1 as pb;

use crate::client;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Archive mode, as docker's: keep the guest's owners and setuid/setgid bits when copying
    /// out of a VM (device nodes are still refused).
    #[arg(short = 'a', long)]
    archive: bool,
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
            let mut chunks = vec![pb::CopyChunk {
                data: Vec::new(),
                r#ref: vm.to_owned(),
                path: path.to_owned(),
            }];
            chunks.extend(
                data.chunks(256 << 10)
                    .map(|d| pb::CopyChunk { data: d.to_vec(), ..Default::default() }),
            );
            c.copy_to(tokio_stream::iter(chunks)).await?;
        }
        (Some((vm, path)), None) => {
            let mut s = c
                .copy_from(pb::CopyFromRequest { r#ref: vm.to_owned(), path: path.to_owned() })
                .await?
                .into_inner();
            // Streamed through a short queue: what the guest sends is never held whole.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
            let dest = PathBuf::from(&a.dest);
            let opts = if a.archive {
                hearth_image::Unpack { owners: true, setid: true, ..hearth_image::Unpack::COPY }
            } else {
                hearth_image::Unpack::COPY
            };
            let unpacker = tokio::task::spawn_blocking(move || {
                unpack(ChunkReader { rx, chunk: Vec::new(), at: 0 }, &dest, opts)
            });
            while let Some(chunk) = s.message().await? {
                if tx.send(chunk.data).is_err() {
                    break; // the unpacker stopped early; its error says why
                }
            }
            drop(tx);
            unpacker.await??;
        }
        (Some(_), Some(_)) => {
            bail!("copying between two VMs is not supported: copy to the host first")
        }
        (None, None) => bail!("one of the paths must be VM:PATH"),
    }
    Ok(0)
}

/// A tar stream arriving in chunks over a channel.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => (self.chunk, self.at) = (c, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Unpacks a guest's tar, whose single top-level entry is the copied file or directory, to
/// `dest`: into it when it is an existing directory, else as `dest` itself. The guest is not
/// trusted: the archive is unpacked into a private staging directory beside the target with
/// hearth's unpacker (no path or link of the archive's ever leads outside it, no owners, no
/// setuid/setgid bits, no device nodes), then its top entry is renamed into place.
fn unpack(data: impl std::io::Read, dest: &Path, opts: hearth_image::Unpack) -> anyhow::Result<()> {
    let (dir, name) = if dest.is_dir() {
        (dest.to_owned(), None)
    } else {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        (
            parent.to_owned(),
            Some(dest.file_name().context("the destination path has no file name")?.to_owned()),
        )
    };
    let staging = tempfile::Builder::new()
        .prefix(".hearth-cp-")
        .tempdir_in(&dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    hearth_image::unpack(data, staging.path(), opts)
        .context("the guest sent an archive hearth will not unpack")?;
    let mut tops = std::fs::read_dir(staging.path())?.collect::<Result<Vec<_>, _>>()?;
    let [top] = tops.as_mut_slice() else {
        bail!("the guest sent {} top-level entries instead of one", tops.len())
    };
    let target = dir.join(name.unwrap_or_else(|| top.file_name()));
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        bail!(
            "{} already exists: remove it first, or copy into another directory",
            target.display()
        );
    }
    std::fs::rename(top.path(), &target)
        .with_context(|| format!("writing {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar from a hostile guest: entries written raw, in order.
    fn tar_of(entries: &[(&str, tar::EntryType, &str, u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link, mode) in entries {
            let mut h = tar::Header::new_gnu();
            let n = &mut h.as_old_mut().name;
            n.fill(0);
            n[..path.len()].copy_from_slice(path.as_bytes());
            let l = &mut h.as_old_mut().linkname;
            l.fill(0);
            l[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            // Owned by whoever runs the test, so archive mode can apply it without root.
            use std::os::unix::fs::MetadataExt;
            let me = std::fs::metadata("/proc/self").expect("self");
            h.set_uid(me.uid().into());
            h.set_gid(me.gid().into());
            let data: &[u8] = if *kind == tar::EntryType::Regular { b"payload" } else { b"" };
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_cksum();
            b.append(&h, data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    use hearth_image::Unpack;
    use tar::EntryType::{Block, Char, Directory, Regular, Symlink};
    const COPY: Unpack = Unpack::COPY;

    #[test]
    fn a_link_the_archive_made_is_never_followed_out_of_the_destination() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = t.path().join("cron.d");
        std::fs::create_dir(&outside).expect("mkdir");
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        let cases = [
            (outside.to_str().expect("utf8"), "x/l/evil", "outside"),
            ("../../cron.d", "x/l/evil", "outside"),
            // Stays inside the archive's own tree, but is not the one entry a copy may hold.
            ("..", "x/l/cron.d/evil", "top-level entries"),
        ];
        for (link, then, why) in cases {
            let tar = tar_of(&[
                ("x/", Directory, "", 0o755),
                ("x/l", Symlink, link, 0o777),
                (then, Regular, "", 0o644),
            ]);
            let e = unpack(&tar[..], &dest, COPY).expect_err("escape");
            assert!(format!("{e:#}").contains(why), "{e:#}");
            assert_eq!(
                std::fs::read_dir(&outside).expect("dir").count(),
                0,
                "wrote through {link}"
            );
            assert_eq!(
                std::fs::read_dir(&dest).expect("dir").count(),
                0,
                "nothing half-made is left in the destination"
            );
        }
    }

    #[test]
    fn setid_bits_are_dropped_devices_refused_and_links_kept_as_links() {
        let t = tempfile::tempdir().expect("tmp");
        let tar = tar_of(&[
            ("app/", Directory, "", 0o755),
            ("app/su", Regular, "", 0o6755),
            ("app/etc", Symlink, "/etc", 0o777),
            ("app/.wh.keep", Regular, "", 0o644),
        ]);
        unpack(&tar[..], t.path(), COPY).expect("unpack");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(t.path().join("app/su")).expect("su").permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(t.path().join("app/etc")).expect("link"),
            Path::new("/etc"),
            "a link is copied, not followed"
        );
        assert!(
            t.path().join("app/.wh.keep").is_file(),
            "whiteout names are plain names in a copy"
        );
        let kept = t.path().join("kept");
        unpack(&tar[..], &kept, Unpack { owners: true, setid: true, ..COPY })
            .expect("archive mode");
        assert_eq!(
            std::fs::metadata(kept.join("su")).expect("su").permissions().mode() & 0o7777,
            0o6755,
            "cp -a keeps them"
        );
        for kind in [Char, Block] {
            let tar = tar_of(&[("dev/", Directory, "", 0o755), ("dev/sda", kind, "", 0o600)]);
            let e = unpack(&tar[..], &t.path().join("devs"), COPY).expect_err("device");
            assert!(format!("{e:#}").contains("device node"), "{e:#}");
            assert!(!t.path().join("devs").exists());
        }
    }

    #[test]
    fn a_single_file_lands_at_the_destination_name_or_inside_a_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let tar = tar_of(&[("hosts", Regular, "", 0o644)]);
        unpack(&tar[..], &t.path().join("copy"), COPY).expect("as a new name");
        assert_eq!(std::fs::read(t.path().join("copy")).expect("read"), b"payload");
        unpack(&tar[..], t.path(), COPY).expect("into a directory");
        assert_eq!(std::fs::read(t.path().join("hosts")).expect("read"), b"payload");
        let two = tar_of(&[("a", Regular, "", 0o644), ("b", Regular, "", 0o644)]);
        assert!(unpack(&two[..], &t.path().join("two"), COPY)
            .expect_err("two tops")
            .to_string()
            .contains("top-level entries"));
        let leftovers: Vec<_> = std::fs::read_dir(t.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".hearth-cp-"))
            .collect();
        assert!(leftovers.is_empty(), "staging is always removed");
    }
}
