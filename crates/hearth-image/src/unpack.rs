//! Applying one layer tar onto a staging directory, OCI-style, without ever writing outside it.
//!
//! The `tar` crate only parses; every file is created here, so that path resolution is ours.
//! Rules (each has a test):
//! - entry paths are taken relative to the root (`./a`, `/a` and `a` are the same); a `..`
//!   component anywhere is an escape;
//! - parent directories are resolved component by component inside the root, never by the
//!   kernel: a relative symlink is followed while it stays inside the root; a symlink with an
//!   absolute target, or one that climbs above the root, is an escape (we reject rather than
//!   reinterpret it chroot-style, so a crafted layer fails loudly);
//! - the final component is never written through: an existing symlink there is replaced;
//! - hard links must name an existing non-directory inside the root, resolved by the same rules;
//! - `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` empties its directory of lower
//!   layers' content (what this layer wrote stays);
//! - modes, owners (`lchown`), mtimes and PAX `SCHILY.xattr.*` are applied; `security.*` and
//!   `trusted.*` xattrs are best effort, others must apply.
//!
//! [`Unpack::copy`] applies the same path rules to a tree a guest sends (`hearth cp VM:SRC
//! DEST`): no whiteouts (such names are ordinary files), no owners or xattrs (the copy belongs
//! to whoever copies), setuid and setgid bits dropped, device nodes refused.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} tries to write outside the image root; the layer is rejected")]
    Escape { entry: String },
    #[error("layer entry {entry:?} goes through too many symbolic links; the layer is rejected")]
    SymlinkLoop { entry: String },
    #[error("layer entry {entry:?} is a hard link to {target:?}, which is not in the image; the layer is corrupt")]
    MissingLinkTarget { entry: String, target: String },
    #[error("layer entry {entry:?} could not be written")]
    Entry {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("the layer is not a readable tar archive; the blob is corrupt")]
    Archive(#[source] io::Error),
    #[error("entry {entry:?} is a device node; a copy makes none")]
    Device { entry: String },
}

/// What an unpack applies beyond the path rules, which always hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpack {
    /// `.wh.` names delete from lower layers (OCI); else they are ordinary names.
    pub whiteouts: bool,
    /// Owners from the archive (`lchown`); else the unpacker's own.
    pub owners: bool,
    /// PAX xattrs.
    pub xattrs: bool,
    /// Setuid and setgid bits.
    pub setid: bool,
    /// Character and block devices (fifos are always made); else refused.
    pub devices: bool,
}

impl Unpack {
    /// An image layer: everything the layer says.
    pub const LAYER: Self =
        Self { whiteouts: true, owners: true, xattrs: true, setid: true, devices: true };
    /// A tree from an untrusted peer, copied for the user.
    pub const COPY: Self =
        Self { whiteouts: false, owners: false, xattrs: false, setid: false, devices: false };
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const MAX_LINK_HOPS: usize = 40;

/// Why a path could not be resolved inside the root.
enum Resolve {
    Escape,
    Loop,
    Missing,
    Io(io::Error),
}

/// Splits an entry path into plain components; `None` if it has a `..`.
fn components(raw: &[u8]) -> Option<Vec<OsString>> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Some(out)
}

/// Resolves the directory `comps` inside `root`, following relative symlinks that stay inside.
/// With `create`, missing directories are made (mode 0755). Returns a path made only of real
/// directories under `root`.
fn resolve_dir(root: &Path, comps: &[OsString], create: bool) -> Result<PathBuf, Resolve> {
    let mut stack: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == "." {
            continue;
        }
        if c == ".." {
            // Only symlink targets bring `..` here; the stack holds real directories only.
            stack.pop().ok_or(Resolve::Escape)?;
            continue;
        }
        let mut here = root.to_owned();
        here.extend(&stack);
        here.push(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(Resolve::Loop);
                }
                let target = fs::read_link(&here).map_err(Resolve::Io)?;
                let bytes = target.as_os_str().as_bytes();
                if bytes.starts_with(b"/") {
                    return Err(Resolve::Escape);
                }
                for t in bytes.split(|&b| b == b'/').rev().filter(|t| !t.is_empty()) {
                    pending.push(OsStr::from_bytes(t).to_owned());
                }
            }
            Ok(m) if m.is_dir() => stack.push(c),
            Ok(_) => return Err(Resolve::Io(io::Error::from_raw_os_error(libc::ENOTDIR))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&here).map_err(Resolve::Io)?;
                fs::set_permissions(&here, fs::Permissions::from_mode(0o755))
                    .map_err(Resolve::Io)?;
                stack.push(c);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Resolve::Missing),
            Err(e) => return Err(Resolve::Io(e)),
        }
    }
    let mut out = root.to_owned();
    out.extend(&stack);
    Ok(out)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Metadata from PAX records that the plain header cannot carry.
#[derive(Default)]
struct Pax {
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    mtime: Option<(i64, i64)>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn parse_pax<R: Read>(entry: &mut tar::Entry<'_, R>) -> Pax {
    let mut pax = Pax::default();
    let Ok(Some(exts)) = entry.pax_extensions() else { return pax };
    for ext in exts.flatten() {
        let key = ext.key_bytes();
        let value = ext.value_bytes();
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            pax.xattrs.push((name.to_vec(), value.to_vec()));
            continue;
        }
        let text = std::str::from_utf8(value).unwrap_or("");
        match key {
            b"mtime" => {
                let (s, frac) = text.split_once('.').unwrap_or((text, ""));
                let nanos =
                    format!("{frac:0<9}").get(..9).and_then(|f| f.parse().ok()).unwrap_or(0);
                pax.mtime = s.parse().ok().map(|s| (s, nanos));
            }
            b"uid" => pax.uid = text.parse().ok(),
            b"gid" => pax.gid = text.parse().ok(),
            _ => {}
        }
    }
    pax
}

/// One layer being applied.
struct Layer<'a> {
    root: &'a Path,
    opts: Unpack,
    /// Real paths this layer created, with their ancestors (kept by opaque whiteouts).
    written: HashSet<PathBuf>,
    /// Directory mtimes, applied once their contents are complete.
    dir_times: Vec<(PathBuf, i64, i64)>,
}

impl Layer<'_> {
    fn mark_written(&mut self, p: &Path) {
        for a in p.ancestors() {
            if a == self.root || !self.written.insert(a.to_owned()) {
                break;
            }
        }
    }

    /// Removes everything under `dir` that this layer did not write.
    fn prune(&self, dir: &Path) -> io::Result<()> {
        for child in fs::read_dir(dir)? {
            let p = child?.path();
            if !self.written.contains(&p) {
                remove_any(&p)?;
            } else if fs::symlink_metadata(&p)?.is_dir() {
                self.prune(&p)?;
            }
        }
        Ok(())
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let e = EntryErr(String::from_utf8_lossy(&raw).into_owned());
        let mut comps = components(&raw).ok_or_else(|| e.escape())?;
        let kind = entry.header().entry_type();
        let Some(name) = comps.pop() else {
            // The root itself: its owner and mode are hearth's, not the layer's.
            return Ok(());
        };
        if self.opts.whiteouts
            && (name.as_bytes() == OPAQUE || name.as_bytes().starts_with(WHITEOUT))
        {
            return self.whiteout(&comps, name.as_bytes(), &e);
        }
        if !matches!(
            kind,
            tar::EntryType::Directory
                | tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse
                | tar::EntryType::Symlink
                | tar::EntryType::Link
                | tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo
        ) {
            // Metadata-only records (PAX globals, volume labels) create nothing.
            return Ok(());
        }
        if !self.opts.devices && matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            return Err(UnpackError::Device { entry: e.0 });
        }
        let parent = resolve_dir(self.root, &comps, true).map_err(|r| e.resolve(r))?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let pax = parse_pax(&mut entry);
        let setid = if self.opts.setid { 0o7777 } else { 0o1777 };
        let mode = header.mode().unwrap_or(0o644) & setid;
        let existing_dir = fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
        if !(kind == tar::EntryType::Directory && existing_dir) {
            remove_any(&target).map_err(|x| e.at(x))?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !existing_dir {
                    fs::create_dir(&target).map_err(|x| e.at(x))?;
                }
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name_bytes().ok_or_else(|| e.at(einval()))?;
                symlink(OsStr::from_bytes(&link), &target).map_err(|x| e.at(x))?;
            }
            tar::EntryType::Link => {
                let link = entry.link_name_bytes().ok_or_else(|| e.at(einval()))?;
                // A hard link keeps its target's metadata: nothing more to set.
                return self.hard_link(&link, &target, &e);
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let fmt = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                sys::mknod(&target, fmt | mode, major, minor).map_err(|x| e.at(x))?;
            }
            _ => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|x| e.at(x))?;
                io::copy(&mut entry, &mut f).map_err(|x| e.at(x))?;
            }
        }
        self.mark_written(&target);
        self.set_metadata(target, kind, &header, &pax, mode).map_err(|x| e.at(x))
    }

    /// An OCI whiteout: `.wh..wh..opq` empties its directory, `.wh.NAME` removes NAME.
    fn whiteout(&self, comps: &[OsString], name: &[u8], e: &EntryErr) -> Result<(), UnpackError> {
        let parent = match resolve_dir(self.root, comps, false) {
            Ok(p) => p,
            Err(Resolve::Missing) => return Ok(()),
            Err(r) => return Err(e.resolve(r)),
        };
        if name == OPAQUE {
            return self.prune(&parent).map_err(|x| e.at(x));
        }
        let victim = &name[WHITEOUT.len()..];
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(e.escape());
        }
        remove_any(&parent.join(OsStr::from_bytes(victim))).map_err(|x| e.at(x))
    }

    /// A hard link to an earlier entry, resolved inside the root (never through a symlink out).
    fn hard_link(&mut self, link: &[u8], target: &Path, e: &EntryErr) -> Result<(), UnpackError> {
        let shown_link = String::from_utf8_lossy(link).into_owned();
        let missing =
            || UnpackError::MissingLinkTarget { entry: e.0.clone(), target: shown_link.clone() };
        let mut lcomps = components(link).ok_or_else(|| e.escape())?;
        let lname = lcomps.pop().ok_or_else(|| e.escape())?;
        let lparent = match resolve_dir(self.root, &lcomps, false) {
            Err(Resolve::Missing) => return Err(missing()),
            other => other.map_err(|r| e.resolve(r))?,
        };
        let src = lparent.join(lname);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.is_dir() => return Err(e.at(io::Error::from_raw_os_error(libc::EISDIR))),
            Ok(_) => {}
            Err(_) => return Err(missing()),
        }
        // linkat without AT_SYMLINK_FOLLOW: a symlink there is linked, not followed.
        fs::hard_link(&src, target).map_err(|x| e.at(x))?;
        self.mark_written(target);
        Ok(())
    }

    /// Owner, mode, extended attributes and mtime from the entry (a directory's mtime is set
    /// last, once nothing more is written into it).
    fn set_metadata(
        &mut self,
        target: PathBuf,
        kind: tar::EntryType,
        header: &tar::Header,
        pax: &Pax,
        mode: u32,
    ) -> io::Result<()> {
        if self.opts.owners {
            let uid = pax.uid.unwrap_or_else(|| header.uid().unwrap_or(0) as u32);
            let gid = pax.gid.unwrap_or_else(|| header.gid().unwrap_or(0) as u32);
            lchown(&target, Some(uid), Some(gid))?;
        }
        if kind != tar::EntryType::Symlink {
            // After chown, which clears setuid/setgid bits.
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
        }
        for (xname, value) in pax.xattrs.iter().filter(|_| self.opts.xattrs) {
            if let Err(e) = sys::lsetxattr(&target, xname, value) {
                // security.* and trusted.* may be refused by the staging filesystem.
                if !xname.starts_with(b"security.") && !xname.starts_with(b"trusted.") {
                    return Err(e);
                }
            }
        }
        let (secs, nanos) = pax.mtime.unwrap_or((header.mtime().unwrap_or(0) as i64, 0));
        if kind == tar::EntryType::Directory {
            self.dir_times.push((target, secs, nanos));
            Ok(())
        } else {
            sys::set_mtime_nofollow(&target, secs, nanos)
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// The errors of one entry, named by its path as the layer spells it.
struct EntryErr(String);

impl EntryErr {
    fn escape(&self) -> UnpackError {
        UnpackError::Escape { entry: self.0.clone() }
    }

    fn at(&self, source: io::Error) -> UnpackError {
        UnpackError::Entry { entry: self.0.clone(), source }
    }

    fn resolve(&self, r: Resolve) -> UnpackError {
        match r {
            Resolve::Escape => self.escape(),
            Resolve::Loop => UnpackError::SymlinkLoop { entry: self.0.clone() },
            Resolve::Missing => self.at(io::Error::from_raw_os_error(libc::ENOENT)),
            Resolve::Io(e) => self.at(e),
        }
    }
}

/// Applies one uncompressed layer tar onto `dest`, which must exist.
pub fn unpack_layer(reader: impl Read, dest: &Path) -> Result<(), UnpackError> {
    unpack(reader, dest, Unpack::LAYER)
}

/// Unpacks a tar onto `dest` (which must exist) with the path rules and `opts`.
pub fn unpack(reader: impl Read, dest: &Path, opts: Unpack) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer { root: dest, opts, written: HashSet::new(), dir_times: Vec::new() };
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        layer.apply(entry.map_err(UnpackError::Archive)?)?;
    }
    // Deepest first, though creating children no longer happens at this point.
    for (dir, secs, nanos) in layer.dir_times.iter().rev() {
        // A later entry of this layer may have replaced the directory; ignore what is gone.
        if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            sys::set_mtime_nofollow(dir, *secs, *nanos).map_err(|source| UnpackError::Entry {
                entry: dir.display().to_string(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
