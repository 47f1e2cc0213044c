//! Per-VM disks.
//!
//! A VM's root disk is a copy-on-write clone of its image's base ext4: a reflink where the
//! filesystem shares extents (constant time, whatever the image size), else a sparse copy that
//! copies only the data extents. The clone is then grown to the VM's `--size` and the filesystem
//! resized with e2fsprogs. The *config disk* carries the guest config in and the exit record out
//! (docs/adr/0002-config-disk.md).

mod sys;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_types::guest::{decode_record, encode_record, CONFIG_DISK_BYTES, CONFIG_MAGIC, EXIT_MAGIC, EXIT_OFFSET};
use hearth_types::{GuestConfig, GuestExit};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("disk I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--size {requested} bytes is smaller than the image's {base} bytes: use a larger --size")]
    TooSmall { requested: u64, base: u64 },
    #[error("{tool} failed on {path}: {stderr}")]
    Tool { tool: &'static str, path: PathBuf, stderr: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_owned(), source }
}

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Extents shared with the base (FICLONE).
    Reflink,
    /// Only the base's data extents copied; holes stay holes.
    SparseCopy,
}

/// Clones `base` to `dest`, grows it to `size` bytes and resizes the ext4 inside.
/// On any error nothing is left at `dest`.
pub fn clone_disk(base: &Path, dest: &Path, size: u64) -> Result<CloneMethod, StorageError> {
    let tmp = dest.with_extension("tmp");
    let result = clone_into(base, &tmp, size).and_then(|m| {
        fs::rename(&tmp, dest).map_err(io_err(dest))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn clone_into(base: &Path, tmp: &Path, size: u64) -> Result<CloneMethod, StorageError> {
    let src = File::open(base).map_err(io_err(base))?;
    let base_len = src.metadata().map_err(io_err(base))?.len();
    if size < base_len {
        return Err(StorageError::TooSmall { requested: size, base: base_len });
    }
    let dst = OpenOptions::new().write(true).create(true).truncate(true).open(tmp).map_err(io_err(tmp))?;
    let method = match sys::ficlone(&dst, &src) {
        Ok(()) => CloneMethod::Reflink,
        Err(_) => {
            sparse_copy(&src, &dst, base_len).map_err(io_err(tmp))?;
            CloneMethod::SparseCopy
        }
    };
    dst.set_len(size).map_err(io_err(tmp))?;
    dst.sync_all().map_err(io_err(tmp))?;
    drop(dst);
    if size > base_len {
        // The base comes fresh from mkfs and is never mounted, so -f (skip the fsck
        // requirement) is safe and saves a full check per VM.
        run_tool("resize2fs", &["-f"], tmp, &[0])?;
    }
    Ok(method)
}

fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut pos = 0;
    while pos < len {
        let Some(start) = sys::seek(src, pos, true)? else { break };
        let end = sys::seek(src, start, false)?.unwrap_or(len).min(len);
        sys::copy_range(src, dst, start, end - start)?;
        pos = end;
    }
    Ok(())
}

fn run_tool(tool: &'static str, args: &[&str], path: &Path, ok: &[i32]) -> Result<(), StorageError> {
    let out = Command::new(tool).args(args).arg(path).output().map_err(|e| StorageError::Tool {
        tool,
        path: path.to_owned(),
        stderr: format!("cannot run it ({e}); install e2fsprogs"),
    })?;
    match out.status.code() {
        Some(c) if ok.contains(&c) => Ok(()),
        _ => Err(StorageError::Tool { tool, path: path.to_owned(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() }),
    }
}

/// Writes a fresh config disk holding `cfg`, with an empty exit area.
pub fn create_config_disk(path: &Path, cfg: &GuestConfig) -> Result<(), StorageError> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.set_len(CONFIG_DISK_BYTES)?;
        f.write_all(&encode_record(CONFIG_MAGIC, cfg))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StorageError::Io { path: path.to_owned(), source: e }
    })
}

/// Zeroes the exit area before a boot, so a stale record is never read as this boot's.
pub fn clear_exit_record(path: &Path) -> Result<(), StorageError> {
    let mut f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(EXIT_OFFSET)).map_err(io_err(path))?;
    f.write_all(&[0u8; 4096]).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The guest's exit record, if it wrote one.
pub fn read_exit_record(path: &Path) -> Result<Option<GuestExit>, StorageError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(EXIT_OFFSET)).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(CONFIG_DISK_BYTES - EXIT_OFFSET).read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(decode_record(EXIT_MAGIC, &buf).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    fn mkfs(path: &Path, mib: u64) {
        let f = File::create(path).expect("create");
        f.set_len(mib << 20).expect("len");
        let st = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path).status().expect("mkfs");
        assert!(st.success());
    }

    #[test]
    fn clone_grows_and_resizes_the_filesystem() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base.ext4"), dir.path().join("vm.img"));
        mkfs(&base, 32);
        clone_disk(&base, &dest, 64 << 20).expect("clone");
        assert_eq!(fs::metadata(&dest).expect("meta").len(), 64 << 20);
        let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&dest).output().expect("fsck");
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        let info = Command::new("dumpe2fs").arg("-h").arg(&dest).output().expect("dumpe2fs");
        let text = String::from_utf8_lossy(&info.stdout);
        let blocks: u64 =
            text.lines().find_map(|l| l.strip_prefix("Block count:")).and_then(|v| v.trim().parse().ok()).expect("block count");
        let bsize: u64 = text.lines().find_map(|l| l.strip_prefix("Block size:")).and_then(|v| v.trim().parse().ok()).expect("block size");
        assert_eq!(blocks * bsize, 64 << 20);
        // The base is untouched and the clone stays sparse.
        assert_eq!(fs::metadata(&base).expect("meta").len(), 32 << 20);
        assert!(fs::metadata(&dest).expect("meta").blocks() * 512 < 32 << 20);
    }

    #[test]
    fn a_size_below_the_image_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("vm.img"));
        File::create(&base).expect("create").set_len(8 << 20).expect("len");
        let err = clone_disk(&base, &dest, 1 << 20).expect_err("too small");
        assert!(err.to_string().contains("--size"), "{err}");
        assert!(!dest.exists() && !dest.with_extension("tmp").exists());
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("copy"));
        let mut f = File::create(&base).expect("create");
        f.set_len(16 << 20).expect("len");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(b"middle").expect("write");
        drop(f);
        let (s, d) = (File::open(&base).expect("open"), File::create(&dest).expect("create"));
        sparse_copy(&s, &d, 16 << 20).expect("copy");
        let data = fs::read(&dest).expect("read");
        assert_eq!(&data[8 << 20..(8 << 20) + 6], b"middle");
        assert!(fs::metadata(&dest).expect("meta").blocks() * 512 <= 1 << 20);
    }

    #[test]
    fn config_disk_round_trip_and_exit_record() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("config.img");
        let cfg = GuestConfig { version: 1, hostname: "h".into(), ..Default::default() };
        create_config_disk(&p, &cfg).expect("create");
        assert_eq!(fs::metadata(&p).expect("meta").len(), CONFIG_DISK_BYTES);
        assert_eq!(decode_record::<GuestConfig>(CONFIG_MAGIC, &fs::read(&p).expect("read")), Ok(cfg));
        assert_eq!(read_exit_record(&p).expect("read"), None);
        let exit = GuestExit { exit_code: 3, ..Default::default() };
        let mut f = OpenOptions::new().write(true).open(&p).expect("open");
        f.seek(SeekFrom::Start(EXIT_OFFSET)).expect("seek");
        f.write_all(&encode_record(EXIT_MAGIC, &exit)).expect("write");
        drop(f);
        assert_eq!(read_exit_record(&p).expect("read"), Some(exit));
        clear_exit_record(&p).expect("clear");
        assert_eq!(read_exit_record(&p).expect("read"), None);
    }
}
