//! Device-mapper through its control device, `/dev/mapper/control`, natively
//! (docs/adr/0018-device-mapper-thin-pool.md): the `struct dm_ioctl` requests `dmsetup` makes
//! (create, load, suspend and resume, remove, status, table, message, list), encoded and decoded
//! here with every length checked against the buffer, so a kernel answer is never read past its
//! end. Thin pools on top of it: [`thin`]; loop devices for a pool on files: `hearth_fs::loopdev`.

pub mod disks;
pub mod pool;
pub mod thin;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// `sizeof(struct dm_ioctl)`: where a request's data starts.
const HEADER: usize = 312;
/// The interface version hearth speaks (4.x: every kernel since 2.6).
const VERSION: [u32; 3] = [4, 0, 0];
/// The largest answer hearth accepts (a status or a device list); past it, an error.
const MAX_BUFFER: usize = 1 << 20;
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
/// `sizeof(struct dm_target_spec)`.
const SPEC: usize = 40;

const CMD_VERSION: u32 = 0;
const CMD_LIST_DEVICES: u32 = 2;
const CMD_DEV_CREATE: u32 = 3;
const CMD_DEV_REMOVE: u32 = 4;
const CMD_DEV_SUSPEND: u32 = 6;
const CMD_DEV_STATUS: u32 = 7;
const CMD_TABLE_LOAD: u32 = 9;
const CMD_TABLE_STATUS: u32 = 12;
const CMD_TARGET_MSG: u32 = 14;

const FLAG_SUSPEND: u32 = 1 << 1;
const FLAG_STATUS_TABLE: u32 = 1 << 4;
const FLAG_ACTIVE_PRESENT: u32 = 1 << 5;
const FLAG_BUFFER_FULL: u32 = 1 << 8;
const FLAG_DATA_OUT: u32 = 1 << 16;

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
fn request(cmd: u32) -> libc::c_ulong {
    (3 << 30) | ((HEADER as libc::c_ulong) << 16) | (0xfd << 8) | libc::c_ulong::from(cmd)
}

/// One line of a device's table: `length` sectors from `start` mapped by target `kind` with
/// `params` (`thin-pool 7:1 7:0 128 32768 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub kind: String,
    pub params: String,
}

/// What device-mapper says of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    /// Its block device number (`makedev(major, minor)`).
    pub dev: u64,
    /// How many openers it has.
    pub open_count: i32,
    /// Whether a table is live (a device just created has none until resumed).
    pub active: bool,
    pub suspended: bool,
}

/// The device-mapper control device.
#[derive(Debug)]
pub struct Control {
    file: File,
}

/// A request: the header and its data, in one buffer of `capacity` bytes.
fn encode(
    name: &str,
    flags: u32,
    targets: u32,
    data: &[u8],
    capacity: usize,
) -> io::Result<Vec<u8>> {
    if name.len() >= NAME_LEN || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device-mapper name {name:?} is too long or has a NUL"),
        ));
    }
    let len = (HEADER + data.len()).max(capacity);
    let mut b = vec![0u8; len];
    for (i, v) in VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[12..16].copy_from_slice(&(len as u32).to_ne_bytes());
    b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
    b[20..24].copy_from_slice(&targets.to_ne_bytes());
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    b[HEADER..HEADER + data.len()].copy_from_slice(data);
    Ok(b)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
/// The NUL-terminated string at the start of `b` (all of `b` when it has no NUL).
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An answer's data: from its `data_start` to its `data_size`, within the buffer.
fn data(b: &[u8]) -> &[u8] {
    let start = u32_at(b, 16).map_or(HEADER, |s| s as usize).min(b.len());
    let end = u32_at(b, 12).map_or(b.len(), |s| s as usize).min(b.len());
    b.get(start..end.max(start)).unwrap_or_default()
}

/// A table for `TABLE_LOAD`: each target spec, its parameters NUL-terminated, padded to 8
/// bytes, `next` counted from the spec itself.
fn encode_table(targets: &[Target]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in targets {
        if t.kind.len() >= 16 || t.params.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad target {t:?}")));
        }
        let len = (SPEC + t.params.len() + 1).next_multiple_of(8);
        let mut spec = vec![0u8; len];
        spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&t.length.to_ne_bytes());
        spec[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        spec[24..24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
        spec[SPEC..SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
        out.extend_from_slice(&spec);
    }
    Ok(out)
}

/// The targets of a `TABLE_STATUS` answer: `count` specs, each `next` counted from the data's
/// start; a spec or string past the end ends the list.
fn decode_targets(d: &[u8], count: u32) -> Vec<Target> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let (Some(start), Some(length), Some(next)) =
            (u64_at(d, at), u64_at(d, at + 8), u32_at(d, at + 20))
        else {
            break;
        };
        let Some(kind) = d.get(at + 24..at + SPEC) else { break };
        let params_end =
            if next as usize > at + SPEC { (next as usize).min(d.len()) } else { d.len() };
        let params = d.get(at + SPEC..params_end).map(c_str).unwrap_or_default();
        out.push(Target { start, length, kind: c_str(kind), params });
        if next as usize <= at {
            break;
        }
        at = next as usize;
    }
    out
}

/// The devices of a `LIST_DEVICES` answer: entries of `dev`, `next` (from the entry) and the
/// NUL-terminated name; `next == 0` ends it, as does an entry past the end.
fn decode_names(d: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let (Some(dev), Some(next)) = (u64_at(d, at), u32_at(d, at + 8)) {
        let name = d.get(at + 12..).map(c_str).unwrap_or_default();
        if dev == 0 && name.is_empty() {
            break;
        }
        out.push((name, dev));
        if next == 0 || out.len() > MAX_BUFFER / 16 {
            break;
        }
        at += next as usize;
    }
    out
}

impl Control {
    /// Opens `/dev/mapper/control` and checks the interface version.
    pub fn open() -> io::Result<Self> {
        Self::open_at(Path::new("/dev/mapper/control"))
    }

    pub fn open_at(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (load the dm_mod module: modprobe dm_mod)", path.display()),
            )
        })?;
        let c = Self { file };
        let b = c.call(CMD_VERSION, "", 0, 0, &[])?;
        let major = u32_at(&b, 0).unwrap_or(0);
        if major != VERSION[0] {
            return Err(io::Error::other(format!(
                "device-mapper interface {major}.x, hearth speaks 4.x"
            )));
        }
        Ok(c)
    }

    /// One request, retried with a larger buffer while the kernel says it was too small; the
    /// error is the kernel's own (its errno kept).
    fn call_raw(
        &self,
        cmd: u32,
        name: &str,
        flags: u32,
        targets: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        let mut capacity = 16 << 10;
        loop {
            let mut b = encode(name, flags, targets, payload, capacity)?;
            crate::sys::ioctl_buf(&self.file, request(cmd), &mut b)?;
            if u32_at(&b, 28).unwrap_or(0) & FLAG_BUFFER_FULL == 0 {
                return Ok(b);
            }
            if capacity >= MAX_BUFFER {
                return Err(io::Error::other(format!(
                    "device-mapper's answer for {name:?} is larger than {MAX_BUFFER} bytes"
                )));
            }
            capacity *= 4;
        }
    }

    /// [`Self::call_raw`], its error naming the request and the device.
    fn call(
        &self,
        cmd: u32,
        name: &str,
        flags: u32,
        targets: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.call_raw(cmd, name, flags, targets, payload).map_err(|e| {
            io::Error::new(e.kind(), format!("device-mapper request {cmd} for {name:?}: {e}"))
        })
    }

    /// Like [`Self::call`], but `Ok(None)` when there is no device `name` (ENXIO).
    fn call_if_exists(&self, cmd: u32, name: &str) -> io::Result<Option<Vec<u8>>> {
        match self.call_raw(cmd, name, 0, 0, &[]) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("device-mapper request {cmd} for {name:?}: {e}"),
            )),
        }
    }

    /// Creates the device `name` (no table yet), with `uuid` when not empty.
    pub fn create(&self, name: &str, uuid: &str) -> io::Result<u64> {
        if uuid.len() >= UUID_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "uuid too long"));
        }
        let mut b = encode(name, 0, 0, &[], 0)?;
        b[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
        crate::sys::ioctl_buf(&self.file, request(CMD_DEV_CREATE), &mut b).map_err(|e| {
            io::Error::new(e.kind(), format!("creating device-mapper device {name}: {e}"))
        })?;
        Ok(u64_at(&b, 40).unwrap_or(0))
    }

    /// Loads `targets` as the device's inactive table (live at the next resume).
    pub fn load(&self, name: &str, targets: &[Target]) -> io::Result<()> {
        let table = encode_table(targets)?;
        self.call(CMD_TABLE_LOAD, name, 0, targets.len() as u32, &table).map(drop)
    }

    /// Resumes the device: its loaded table goes live.
    pub fn resume(&self, name: &str) -> io::Result<()> {
        self.call(CMD_DEV_SUSPEND, name, 0, 0, &[]).map(drop)
    }

    /// Suspends the device (I/O is held until it resumes).
    pub fn suspend(&self, name: &str) -> io::Result<()> {
        self.call(CMD_DEV_SUSPEND, name, FLAG_SUSPEND, 0, &[]).map(drop)
    }

    /// Removes the device; `Ok(false)` when there was none.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        Ok(self.call_if_exists(CMD_DEV_REMOVE, name)?.is_some())
    }

    /// The device `name`, `None` when there is none.
    pub fn info(&self, name: &str) -> io::Result<Option<DevInfo>> {
        let Some(b) = self.call_if_exists(CMD_DEV_STATUS, name)? else { return Ok(None) };
        let flags = u32_at(&b, 28).unwrap_or(0);
        Ok(Some(DevInfo {
            dev: u64_at(&b, 40).unwrap_or(0),
            open_count: u32_at(&b, 24).unwrap_or(0) as i32,
            active: flags & FLAG_ACTIVE_PRESENT != 0,
            suspended: flags & FLAG_SUSPEND != 0,
        }))
    }

    /// The live table's status lines (`table`: the table itself, as loaded).
    pub fn status(&self, name: &str, table: bool) -> io::Result<Vec<Target>> {
        let flags = if table { FLAG_STATUS_TABLE } else { 0 };
        let b = self.call(CMD_TABLE_STATUS, name, flags, 0, &[])?;
        Ok(decode_targets(data(&b), u32_at(&b, 20).unwrap_or(0)))
    }

    /// Sends `message` to the target at `sector` (`create_thin 1`); returns what it answered.
    /// ENODATA (a thin id the pool lacks) is returned as the kernel's own error.
    pub fn message(&self, name: &str, sector: u64, message: &str) -> io::Result<String> {
        let mut payload = sector.to_ne_bytes().to_vec();
        payload.extend_from_slice(message.as_bytes());
        payload.push(0);
        let b = self.call_raw(CMD_TARGET_MSG, name, 0, 0, &payload).map_err(|e| {
            match e.raw_os_error() {
                // A thin id the pool does not have: kept as the kernel's, for the caller to tell.
                Some(libc::ENODATA) => e,
                _ => io::Error::new(
                    e.kind(),
                    format!("device-mapper message {message:?} to {name}: {e}"),
                ),
            }
        })?;
        let out_flags = u32_at(&b, 28).unwrap_or(0);
        Ok(if out_flags & FLAG_DATA_OUT != 0 { c_str(data(&b)) } else { String::new() })
    }

    /// Every device-mapper device, as (name, device number).
    pub fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let b = self.call(CMD_LIST_DEVICES, "", 0, 0, &[])?;
        Ok(decode_names(data(&b)))
    }
}

/// The block device node of device number `dev`: `/dev/NAME` as the kernel names it
/// (`/sys/dev/block/MAJ:MIN/uevent`), which devtmpfs makes, with or without udev.
pub fn node(dev: u64) -> io::Result<PathBuf> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|n| !n.is_empty() && !n.contains(".."))
        .ok_or_else(|| io::Error::other(format!("block device {major}:{minor} has no name")))?;
    Ok(Path::new("/dev").join(name))
}

/// `major:minor` of device number `dev`, as tables name devices.
pub fn dev_name(dev: u64) -> String {
    format!("{}:{}", libc::major(dev), libc::minor(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_version_sizes_name_and_data() {
        assert_eq!(request(CMD_VERSION), 0xc138_fd00, "_IOWR(0xfd, 0, 312 bytes)");
        assert_eq!(request(CMD_TARGET_MSG), 0xc138_fd0e);
        let b = encode("pool", FLAG_SUSPEND, 2, b"xyz", 1024).expect("encode");
        assert_eq!(b.len(), 1024);
        assert_eq!((u32_at(&b, 0), u32_at(&b, 4), u32_at(&b, 8)), (Some(4), Some(0), Some(0)));
        assert_eq!(
            (u32_at(&b, 12), u32_at(&b, 16), u32_at(&b, 20)),
            (Some(1024), Some(312), Some(2))
        );
        assert_eq!(u32_at(&b, 28), Some(FLAG_SUSPEND));
        assert_eq!(c_str(&b[48..]), "pool");
        assert_eq!(&b[HEADER..HEADER + 3], b"xyz");
        assert!(encode(&"n".repeat(128), 0, 0, &[], 0).is_err(), "names are at most 127 bytes");
        assert!(encode("a\0b", 0, 0, &[], 0).is_err());
    }

    #[test]
    fn a_table_round_trips_through_its_encoding() {
        let t = vec![
            Target {
                start: 0,
                length: 2048,
                kind: "thin-pool".into(),
                params: "7:1 7:0 128 32768 0".into(),
            },
            Target { start: 2048, length: 8, kind: "zero".into(), params: String::new() },
        ];
        let table = encode_table(&t).expect("encode");
        assert_eq!(table.len() % 8, 0);
        // Input `next` is from each spec; answers count it from the data's start.
        let first = u32_at(&table, 20).expect("next") as usize;
        let mut answer = table.clone();
        answer[first + 20..first + 24].copy_from_slice(&(table.len() as u32).to_ne_bytes());
        assert_eq!(decode_targets(&answer, 2), t);
        assert!(encode_table(&[Target { kind: "x".repeat(16), ..t[1].clone() }]).is_err());
    }

    #[test]
    fn hostile_answers_are_read_within_their_bounds() {
        // Counts and offsets that point past the end, backwards, or nowhere.
        assert_eq!(decode_targets(&[0u8; 10], 5), vec![]);
        let mut spec = vec![0u8; SPEC + 8];
        spec[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        spec[24..28].copy_from_slice(b"thin");
        let t = decode_targets(&spec, 3);
        assert_eq!(t.len(), 1, "{t:?}");
        spec[20..24].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(decode_targets(&spec, 1000).len(), 1, "a spec pointing at itself ends the list");
        let mut names = vec![0u8; 12];
        names[0..8].copy_from_slice(&(7u64 << 8).to_ne_bytes());
        names[8..12].copy_from_slice(&4u32.to_ne_bytes());
        let n = decode_names(&names);
        assert_eq!(n.len(), 1, "the next entry would be past the end: {n:?}");
        assert_eq!(decode_names(&[0u8; 32]), vec![], "an empty list");
        let mut header = encode("x", 0, 0, &[], 400).expect("encode");
        header[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        header[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(data(&header).is_empty());
    }
}
