//! Per-VM disks.
//!
//! A VM's root disk is a copy-on-write clone of its image's base ext4: a reflink where the
//! filesystem shares extents (constant time, whatever the image size), else a sparse copy that
//! copies only the data extents. The clone is then grown to the VM's `--size` and the filesystem
//! resized with e2fsprogs. The *config disk* carries the guest config in and the exit record out
//! (docs/adr/0002-config-disk.md). Volumes that are not images: [`create_blank`], and the
//! host's own disks a VM is given ([`check_host_disk`]).
#![deny(unsafe_code)]

pub mod dm;
pub mod lvm;
mod volumes;
// The only module with raw system calls (the crate denies unsafe code everywhere else).
#[allow(unsafe_code)]
mod sys;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_types::guest::{
    decode_record, encode_record, RecordError, CONFIG_DISK_BYTES, CONFIG_MAGIC, EXIT_MAGIC,
    EXIT_OFFSET, MAX_RECORD,
};
use hearth_types::{GuestConfig, GuestExit};
pub use volumes::{
    check_host_disk, check_share_dir, create_blank, host_disk_id, HostDiskError, ShareError,
};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("disk I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk size {requested} bytes is smaller than the image's {base} bytes: use a larger --size (at least {base})")]
    TooSmall { requested: u64, base: u64 },
    #[error("the guest config is {bytes} bytes, over the config disk's {limit}-byte limit: trim the environment, labels or keys")]
    ConfigTooLarge { bytes: usize, limit: usize },
    #[error("the exit record on {path} is unreadable; the guest wrote a corrupt record")]
    ExitRecord {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    #[error("{tool} failed on {path}: {output}; is the base image an intact ext4 filesystem?")]
    Tool { tool: &'static str, path: PathBuf, output: String },
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

/// Where a clone of `dest` is built: `disk.img.<random>.tmp`, a name of this attempt's own, so
/// a tool a dead daemon left running never writes what this attempt renames.
fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    PathBuf::from(name)
}

/// Whether a `tmp_path` of `dest` is left beside it.
#[cfg(test)]
fn has_tmp(dest: &Path) -> bool {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else { return false };
    let prefix = format!("{}.", name.to_string_lossy());
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.starts_with(&prefix) && n.ends_with(".tmp")
    })
}

/// Whether files in `dir` can be cloned by reflink (so per-VM disks cost no copy), tried on two
/// scratch files that are removed again.
pub fn supports_reflink(dir: &Path) -> Result<bool, StorageError> {
    let (a, b) = (dir.join(".hearth-reflink-probe-a"), dir.join(".hearth-reflink-probe-b"));
    let probe = || -> std::io::Result<bool> {
        let mut src =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&a)?;
        std::io::Write::write_all(&mut src, &[0u8; 4096])?;
        src.sync_all()?;
        let dst = OpenOptions::new().write(true).create(true).truncate(true).open(&b)?;
        Ok(sys::ficlone(&dst, &src).is_ok())
    };
    let out = probe().map_err(io_err(dir));
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    out
}

/// Clones `base` to `dest`, grows it to `size` bytes and resizes the ext4 inside.
///
/// The clone is built at `dest.tmp` and renamed into place only once it is complete and
/// resized, so `dest` either does not exist or is whole. On any error nothing is left behind.
/// A `size` below the base image's is refused (filesystems are never shrunk).
pub fn clone_disk(base: &Path, dest: &Path, size: u64) -> Result<CloneMethod, StorageError> {
    let tmp = tmp_path(dest);
    let result = clone_into(base, &tmp, size).and_then(|m| {
        fs::rename(&tmp, dest).map_err(io_err(dest))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies the first `len` bytes of `src` into `dst` (a file of that size already, or a block
/// device) at the same offsets, writing only `src`'s data extents: what it does not write must
/// read as zeros already (a new sparse file, a fresh thin device).
pub(crate) fn copy_data(src: &File, dst: &File, len: u64) -> io::Result<()> {
    copy_extents(src, dst, len)
}

/// Grows the ext4 on `disk` (a file or a block device) to fill it, after the check resize2fs
/// needs.
pub(crate) fn grow_filesystem(disk: &Path) -> Result<(), StorageError> {
    // A base filesystem mkfs made and nothing mounted since is one resize2fs takes as it is
    // (clean, checked since its last mount), so the per-VM cost does not grow with the image
    // by a full check. Anything else it refuses until checked: then e2fsck first (-p repairs
    // only what is safe to repair unattended; exit 1 means "errors corrected").
    if run_tool("resize2fs", &[], disk, &[0]).is_ok() {
        return Ok(());
    }
    run_tool("e2fsck", &["-f", "-p"], disk, &[0, 1])?;
    run_tool("resize2fs", &[], disk, &[0])
}

fn clone_into(base: &Path, tmp: &Path, size: u64) -> Result<CloneMethod, StorageError> {
    let src = File::open(base).map_err(io_err(base))?;
    let base_len = src.metadata().map_err(io_err(base))?.len();
    if size < base_len {
        return Err(StorageError::TooSmall { requested: size, base: base_len });
    }
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err(tmp))?;
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
        grow_filesystem(tmp)?;
    }
    Ok(method)
}

/// Copies the first `len` bytes of `src` into `dst` at the same offsets, leaving holes where
/// `src` has holes. Data extents go through `copy_file_range` (in-kernel, and shared where the
/// filesystem can); plain reads and writes are the fallback.
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    copy_extents(src, dst, len)
}

fn copy_extents(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut pos = 0;
    while pos < len {
        let start = match sys::seek(src, pos, true) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            // No SEEK_DATA on this filesystem: copy the rest, skipping zero blocks.
            Err(e) if unsupported(&e) => return copy_skipping_zeroes(src, dst, pos, len),
            Err(e) => return Err(e),
        };
        if start >= len {
            break;
        }
        let end = sys::seek(src, start, false)?.unwrap_or(len).min(len);
        match sys::copy_range(src, dst, start, end - start) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => copy_plain(src, dst, start, end)?,
            Err(e) => return Err(e),
        }
        pos = end;
    }
    Ok(())
}

/// Errors meaning "this filesystem or kernel cannot do that", not "the data is bad".
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP))
}

const CHUNK: usize = 1 << 20;

fn copy_plain(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = start;
    while off < end {
        let want = ((end - off) as usize).min(CHUNK);
        src.read_exact_at(&mut buf[..want], off)?;
        dst.write_all_at(&buf[..want], off)?;
        off += want as u64;
    }
    Ok(())
}

fn copy_skipping_zeroes(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut buf = vec![0u8; CHUNK];
    let mut off = start;
    while off < end {
        let want = ((end - off) as usize).min(CHUNK);
        src.read_exact_at(&mut buf[..want], off)?;
        for (i, block) in buf[..want].chunks(BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, off + (i * BLOCK) as u64)?;
            }
        }
        off += want as u64;
    }
    Ok(())
}

fn run_tool(
    tool: &'static str,
    args: &[&str],
    path: &Path,
    ok: &[i32],
) -> Result<(), StorageError> {
    let out =
        hearth_fs::die_with_parent(&mut Command::new(tool)).args(args).arg(path).output().map_err(
            |e| StorageError::Tool {
                tool,
                path: path.to_owned(),
                output: format!("cannot run it ({e}); install e2fsprogs"),
            },
        )?;
    match out.status.code() {
        Some(c) if ok.contains(&c) => Ok(()),
        _ => {
            let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if text.is_empty() {
                text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            Err(StorageError::Tool {
                tool,
                path: path.to_owned(),
                output: format!("{} ({text})", out.status),
            })
        }
    }
}

/// Refuses a guest config too large for the config disk (checked at create, so no VM is made
/// that could never start).
pub fn check_config_fits(cfg: &GuestConfig) -> Result<(), StorageError> {
    let record = encode_record(CONFIG_MAGIC, cfg);
    if record.len() > MAX_RECORD {
        return Err(StorageError::ConfigTooLarge { bytes: record.len(), limit: MAX_RECORD });
    }
    Ok(())
}

/// Writes a fresh config disk holding `cfg`, with an empty exit area. Built at a temporary name
/// and renamed into place.
pub fn create_config_disk(path: &Path, cfg: &GuestConfig) -> Result<(), StorageError> {
    check_config_fits(cfg)?;
    let record = encode_record(CONFIG_MAGIC, cfg);
    let tmp = tmp_path(path);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.set_len(CONFIG_DISK_BYTES)?;
        f.write_all(&record)?;
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
    let f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
    let zeroes = vec![0u8; (CONFIG_DISK_BYTES - EXIT_OFFSET) as usize];
    f.write_all_at(&zeroes, EXIT_OFFSET).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The guest's exit record: `None` when the guest wrote none (no magic), an error when it
/// wrote one that cannot be read.
pub fn read_exit_record(path: &Path) -> Result<Option<GuestExit>, StorageError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(EXIT_OFFSET)).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(CONFIG_DISK_BYTES - EXIT_OFFSET).read_to_end(&mut buf).map_err(io_err(path))?;
    match decode_record(EXIT_MAGIC, &buf) {
        Ok(exit) => Ok(Some(exit)),
        Err(RecordError::Missing) => Ok(None),
        Err(source) => Err(StorageError::ExitRecord { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    /// An ext4 image of `mib` MiB holding /hello.
    fn mkfs(dir: &Path, path: &Path, mib: u64) {
        let content = dir.join("content");
        fs::create_dir_all(&content).expect("mkdir");
        fs::write(content.join("hello"), b"hello from the base\n").expect("write");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&content)
            .arg(path)
            .arg(format!("{mib}M"))
            .status()
            .expect("mkfs");
        assert!(st.success());
    }

    fn dumpe2fs_field(path: &Path, field: &str) -> u64 {
        let info = Command::new("dumpe2fs").arg("-h").arg(path).output().expect("dumpe2fs");
        let text = String::from_utf8_lossy(&info.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in dumpe2fs output:\n{text}"))
    }

    #[test]
    fn clone_grows_and_resizes_the_filesystem() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base.ext4"), dir.path().join("disk.img"));
        mkfs(dir.path(), &base, 32);
        let base_blocks = dumpe2fs_field(&base, "Block count");
        let method = clone_disk(&base, &dest, 64 << 20).expect("clone");
        // tmpfs and ext4 cannot reflink; btrfs and xfs can.
        assert!(matches!(method, CloneMethod::Reflink | CloneMethod::SparseCopy));
        assert_eq!(fs::metadata(&dest).expect("meta").len(), 64 << 20);
        assert!(!has_tmp(&dest));
        let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&dest).output().expect("fsck");
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        let (blocks, bsize) =
            (dumpe2fs_field(&dest, "Block count"), dumpe2fs_field(&dest, "Block size"));
        assert!(blocks > base_blocks, "{blocks} blocks after, {base_blocks} before");
        assert_eq!(blocks * bsize, 64 << 20);
        let cat = Command::new("debugfs")
            .args(["-R", "cat /hello"])
            .arg(&dest)
            .output()
            .expect("debugfs");
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello from the base\n");
        // The base is untouched and the clone stays sparse.
        assert_eq!(fs::metadata(&base).expect("meta").len(), 32 << 20);
        assert_eq!(dumpe2fs_field(&base, "Block count"), base_blocks);
        if method == CloneMethod::SparseCopy {
            assert!(fs::metadata(&dest).expect("meta").blocks() * 512 < 32 << 20);
        }
    }

    #[test]
    fn a_filesystem_mounted_since_its_last_check_is_checked_before_it_grows() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base.ext4"), dir.path().join("disk.img"));
        mkfs(dir.path(), &base, 32);
        // As if it had been mounted after mkfs checked it: resize2fs alone refuses it.
        let set = Command::new("debugfs")
            .args(["-w", "-R", "ssv mtime 20300101"])
            .arg(&base)
            .output()
            .expect("debugfs");
        assert!(set.status.success());
        let alone = Command::new("resize2fs").arg(&base).output().expect("resize2fs");
        assert!(!alone.status.success(), "resize2fs wants a check first");
        clone_disk(&base, &dest, 64 << 20).expect("clone");
        let (blocks, bsize) =
            (dumpe2fs_field(&dest, "Block count"), dumpe2fs_field(&dest, "Block size"));
        assert_eq!(blocks * bsize, 64 << 20);
    }

    #[test]
    fn clone_at_the_base_size_is_a_plain_copy() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base.ext4"), dir.path().join("disk.img"));
        mkfs(dir.path(), &base, 16);
        clone_disk(&base, &dest, 16 << 20).expect("clone");
        assert_eq!(fs::read(&base).expect("base"), fs::read(&dest).expect("dest"));
    }

    #[test]
    fn a_size_below_the_image_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("vm.img"));
        File::create(&base).expect("create").set_len(8 << 20).expect("len");
        let err = clone_disk(&base, &dest, 1 << 20).expect_err("too small");
        let msg = err.to_string();
        assert!(
            msg.contains("--size")
                && msg.contains(&(8u64 << 20).to_string())
                && msg.contains(&(1u64 << 20).to_string()),
            "{msg}"
        );
        assert!(!dest.exists() && !has_tmp(&dest));
    }

    #[test]
    fn a_base_that_is_not_ext4_fails_the_resize_and_leaves_nothing() {
        if !have("e2fsck") {
            eprintln!("skipping: e2fsprogs not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("vm.img"));
        fs::write(&base, vec![7u8; 1 << 20]).expect("write");
        let err = clone_disk(&base, &dest, 4 << 20).expect_err("not ext4");
        assert!(matches!(err, StorageError::Tool { tool: "e2fsck", .. }), "{err}");
        assert!(!dest.exists() && !has_tmp(&dest));
    }

    fn holey_file(path: &Path) {
        let f = File::create(path).expect("create");
        f.set_len(16 << 20).expect("len");
        f.write_all_at(b"start", 0).expect("write");
        f.write_all_at(b"middle", 8 << 20).expect("write");
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("copy"));
        holey_file(&base);
        let (s, d) = (File::open(&base).expect("open"), File::create(&dest).expect("create"));
        sparse_copy(&s, &d, 16 << 20).expect("copy");
        assert_eq!(fs::read(&base).expect("read"), fs::read(&dest).expect("read"));
        let (sb, db) = (
            fs::metadata(&base).expect("meta").blocks(),
            fs::metadata(&dest).expect("meta").blocks(),
        );
        assert!(db <= sb.max(8) * 2 && db * 512 <= 1 << 20, "copy uses {db} blocks, base {sb}");
    }

    #[test]
    fn the_fallback_copy_skips_zero_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let (base, dest) = (dir.path().join("base"), dir.path().join("copy"));
        holey_file(&base);
        let (s, d) = (File::open(&base).expect("open"), File::create(&dest).expect("create"));
        d.set_len(16 << 20).expect("len");
        copy_skipping_zeroes(&s, &d, 0, 16 << 20).expect("copy");
        assert_eq!(fs::read(&base).expect("read"), fs::read(&dest).expect("read"));
        assert!(fs::metadata(&dest).expect("meta").blocks() * 512 <= 1 << 20);
    }

    #[test]
    fn config_disk_round_trip_and_exit_record() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("config.img");
        let cfg = GuestConfig { version: 1, hostname: "h".into(), ..Default::default() };
        create_config_disk(&p, &cfg).expect("create");
        assert!(!has_tmp(&p));
        let bytes = fs::read(&p).expect("read");
        assert_eq!(bytes.len() as u64, CONFIG_DISK_BYTES);
        assert!(bytes[EXIT_OFFSET as usize..].iter().all(|&b| b == 0), "exit area starts zeroed");
        assert_eq!(decode_record::<GuestConfig>(CONFIG_MAGIC, &bytes), Ok(cfg));
        assert_eq!(read_exit_record(&p).expect("read"), None);
        let exit = GuestExit { exit_code: 3, ..Default::default() };
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&encode_record(EXIT_MAGIC, &exit), EXIT_OFFSET).expect("write");
        drop(f);
        assert_eq!(read_exit_record(&p).expect("read"), Some(exit));
        clear_exit_record(&p).expect("clear");
        assert_eq!(read_exit_record(&p).expect("read"), None);
        assert_eq!(fs::metadata(&p).expect("meta").len(), CONFIG_DISK_BYTES);
    }

    #[test]
    fn a_corrupt_exit_record_is_an_error_not_a_silent_none() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("config.img");
        create_config_disk(&p, &GuestConfig::default()).expect("create");
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(b"HEARTHX1\x05\x00\x00\x00{{{{{", EXIT_OFFSET).expect("write");
        drop(f);
        let err = read_exit_record(&p).expect_err("corrupt");
        assert!(matches!(err, StorageError::ExitRecord { .. }), "{err}");
    }

    #[test]
    fn an_oversized_config_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("config.img");
        let cfg = GuestConfig { hostname: "x".repeat(MAX_RECORD), ..Default::default() };
        let err = create_config_disk(&p, &cfg).expect_err("too large");
        assert!(matches!(err, StorageError::ConfigTooLarge { .. }), "{err}");
        assert!(!p.exists() && !has_tmp(&p));
    }
}
