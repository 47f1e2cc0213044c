//! `hearth cp`: tar archives out of and into the guest.

use super::*;

/// Frames written to it become `Stdout` frames of one stream.
pub(super) struct FrameWriter<'a> {
    pub(super) shared: &'a Shared,
    pub(super) stream: u32,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        if !self.shared.send_data(Kind::Stdout, self.stream, &buf[..n]) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) fn copy_out(shared: &Shared, stream: u32, path: String) {
    let p = std::path::Path::new(&path);
    let result = (|| -> std::io::Result<()> {
        let name = p.file_name().map(|n| n.to_owned()).unwrap_or_else(|| ".".into());
        let mut b = tar::Builder::new(FrameWriter { shared, stream });
        b.follow_symlinks(false);
        if std::fs::symlink_metadata(p)?.is_dir() {
            b.append_dir_all(&name, p)?;
        } else {
            b.append_path_with_name(p, &name)?;
        }
        b.finish()
    })();
    match result {
        Ok(()) => shared.send(&Frame::json(Kind::Exit, stream, &ExecExit::default())),
        Err(e) => {
            shared.send(&Frame::new(Kind::Error, stream, format!("{path}: {e}").into_bytes()))
        }
    }
    shared.close_output(stream);
}

pub(super) fn copy_in(shared: &Arc<Shared>, stream: u32, dest: String) {
    // The archive arrives as Stdin frames; collect it through a pipe-like file in /run.
    let tmp = format!("/run/.hearth-copy-{stream}");
    let file =
        match OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp) {
            Ok(f) => f,
            Err(e) => {
                return shared.send(&Frame::new(
                    Kind::Error,
                    stream,
                    format!("{tmp}: {e}").into_bytes(),
                ))
            }
        };
    let Ok(w) = file.try_clone() else { return };
    // The writer thread ends once the host closed stdin and everything is written.
    let _ = shared.open_stdin(stream, w).join();
    let result = unpack(&tmp, &dest);
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => shared.send(&Frame::json(Kind::Exit, stream, &ExecExit::default())),
        Err(e) => {
            shared.send(&Frame::new(Kind::Error, stream, format!("{dest}: {e}").into_bytes()))
        }
    }
}

/// Docker's `cp` rule: into `dest` when it is a directory, else as `dest`.
pub(super) fn unpack(archive: &str, dest: &str) -> std::io::Result<()> {
    let dest = std::path::Path::new(dest);
    let into_dir = dest.is_dir();
    let mut ar = tar::Archive::new(File::open(archive)?);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        {
            return Err(std::io::Error::other(format!(
                "unsafe path {} in the archive",
                rel.display()
            )));
        }
        let mut comps = rel.components().filter(|c| matches!(c, std::path::Component::Normal(_)));
        let Some(first) = comps.next() else { continue };
        let rest: std::path::PathBuf = comps.collect();
        let base = if into_dir { dest.join(first) } else { dest.to_owned() };
        let target = if rest.as_os_str().is_empty() { base } else { base.join(rest) };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry.unpack(&target)?;
    }
    Ok(())
}
