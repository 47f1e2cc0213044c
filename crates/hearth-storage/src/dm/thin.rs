//! Thin provisioning on a device-mapper thin pool: the pool's table, its thin devices (made,
//! snapshotted, deleted by messages to the pool, activated as devices of their own), and its
//! usage read from its status.

use std::io;
use std::path::PathBuf;

use super::{Control, Target};

/// The pool's block size: 64 KiB (128 sectors), the size Flintlock's and containerd's dev pools
/// use, which keeps a snapshot's first write small.
pub const BLOCK_SECTORS: u64 = 128;
/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// A thin pool's table over a metadata and a data device (`major:minor` or a path): the whole
/// data device, 64 KiB blocks, an event when fewer than `low_water` blocks are left. New blocks
/// are zeroed (the pool's default, unlike Flintlock's dev pool): a guest's first 4 KiB write
/// into a fresh 64 KiB block must not leave the other 60 KiB holding what a removed VM wrote.
pub fn pool_table(metadata: &str, data: &str, data_bytes: u64) -> Target {
    let blocks = data_bytes / SECTOR / BLOCK_SECTORS;
    let low_water = (blocks / 10).clamp(1, 32768);
    Target {
        start: 0,
        length: blocks * BLOCK_SECTORS,
        kind: "thin-pool".into(),
        params: format!("{metadata} {data} {BLOCK_SECTORS} {low_water} 0"),
    }
}

/// A thin pool by its device-mapper name.
#[derive(Debug)]
pub struct Pool<'a> {
    pub dm: &'a Control,
    pub name: String,
}

/// How full a pool is, from its status (blocks of its own size for data, 4 KiB for metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub data_used: u64,
    pub data_total: u64,
    pub metadata_used: u64,
    pub metadata_total: u64,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: String,
    /// The pool's metadata needs `thin_check` before it is used read-write again.
    pub needs_check: bool,
}

impl Usage {
    /// Percent of data used (0 for an empty pool).
    pub fn data_percent(&self) -> f64 {
        percent(self.data_used, self.data_total)
    }
    pub fn metadata_percent(&self) -> f64 {
        percent(self.metadata_used, self.metadata_total)
    }
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    }
}

/// A pool's status line: `<transaction> <used>/<total meta> <used>/<total data> <held root>
/// <mode> ...`, or `Fail` / `Error`.
pub fn parse_usage(status: &str) -> Option<Usage> {
    let mut words = status.split_whitespace();
    let _transaction: u64 = words.next()?.parse().ok()?;
    let pair = |w: &str| -> Option<(u64, u64)> {
        let (a, b) = w.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let (metadata_used, metadata_total) = pair(words.next()?)?;
    let (data_used, data_total) = pair(words.next()?)?;
    let _held_root = words.next()?;
    let mode = words.next()?.to_owned();
    let needs_check = status.split_whitespace().any(|w| w == "needs_check");
    Some(Usage { data_used, data_total, metadata_used, metadata_total, mode, needs_check })
}

impl Pool<'_> {
    /// Makes thin device `id` (empty, of no size until activated with one).
    pub fn create_thin(&self, id: u32) -> io::Result<()> {
        self.dm.message(&self.name, 0, &format!("create_thin {id}")).map(drop)
    }

    /// Makes thin device `id` a snapshot of `origin`, which must not be active (or be
    /// suspended): its blocks are shared until either side writes them.
    pub fn create_snap(&self, id: u32, origin: u32) -> io::Result<()> {
        self.dm.message(&self.name, 0, &format!("create_snap {id} {origin}")).map(drop)
    }

    /// Deletes thin device `id` (which must not be active); `Ok(false)` when it did not exist.
    pub fn delete(&self, id: u32) -> io::Result<bool> {
        match self.dm.message(&self.name, 0, &format!("delete {id}")) {
            Ok(_) => Ok(true),
            // The kernel answers ENODATA for an id the pool does not have.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Activates thin device `id` as the device `name` of `bytes` (whole sectors); returns its
    /// node. An existing `name` is left as it is.
    pub fn activate(&self, name: &str, id: u32, bytes: u64) -> io::Result<PathBuf> {
        if let Some(info) = self.dm.info(name)? {
            if info.active {
                return super::node(info.dev);
            }
        } else {
            self.dm.create(name, "")?;
        }
        let pool = self.dm.info(&self.name)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no thin pool {}", self.name))
        })?;
        let table = Target {
            start: 0,
            length: bytes.div_ceil(SECTOR),
            kind: "thin".into(),
            params: format!("{} {id}", super::dev_name(pool.dev)),
        };
        let activated = self.dm.load(name, &[table]).and_then(|()| self.dm.resume(name));
        if let Err(e) = activated {
            let _ = self.dm.remove(name);
            return Err(e);
        }
        let info =
            self.dm.info(name)?.ok_or_else(|| io::Error::other(format!("{name} vanished")))?;
        super::node(info.dev)
    }

    /// Deactivates the device `name` (the thin device stays in the pool); `Ok(false)` when
    /// it was not active.
    pub fn deactivate(&self, name: &str) -> io::Result<bool> {
        self.dm.remove(name)
    }

    /// How full the pool is.
    pub fn usage(&self) -> io::Result<Usage> {
        let status = self.dm.status(&self.name, false)?;
        let line = status.first().map(|t| t.params.as_str()).unwrap_or_default();
        parse_usage(line)
            .ok_or_else(|| io::Error::other(format!("thin pool {} reports {line:?}", self.name)))
    }

    /// Its use as reports give it: percentages, data size in bytes, mode; the reason as text
    /// when it cannot be read.
    pub fn report(&self) -> Result<hearth_types::size::PoolUsage, String> {
        let u = self.usage().map_err(|e| e.to_string())?;
        Ok(hearth_types::size::PoolUsage {
            data_percent: u.data_percent(),
            metadata_percent: u.metadata_percent(),
            data_bytes: u.data_total * BLOCK_SECTORS * 512,
            mode: u.mode.clone(),
            needs_check: u.needs_check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_table_covers_the_data_device_in_64k_blocks() {
        let t = pool_table("7:1", "7:0", 1 << 30);
        assert_eq!((t.start, t.length, t.kind.as_str()), (0, 2 << 20, "thin-pool"));
        assert_eq!(t.params, "7:1 7:0 128 1638 0", "block zeroing stays on");
        let big = pool_table("m", "d", 100 << 30);
        assert!(big.params.contains(" 128 32768 "), "{}", big.params);
    }

    #[test]
    fn usage_is_read_from_the_pools_status() {
        let u = parse_usage("3 125/4096 80/16384 - rw discard_passdown queue_if_no_space - 1024")
            .expect("status");
        assert_eq!(
            (u.metadata_used, u.metadata_total, u.data_used, u.data_total),
            (125, 4096, 80, 16384)
        );
        assert_eq!(u.mode, "rw");
        assert!(!u.needs_check);
        assert!((u.data_percent() - 0.488).abs() < 0.01);
        let bad = parse_usage("0 1/2 3/4 - ro no_discard_passdown error_if_no_space needs_check 8")
            .expect("status");
        assert!(bad.needs_check && bad.mode == "ro");
        for junk in ["Fail", "Error", "", "x 1/2 3/4 - rw", "1 1/x 3/4 - rw", "1 1/2"] {
            assert_eq!(parse_usage(junk), None, "{junk:?}");
        }
    }
}
