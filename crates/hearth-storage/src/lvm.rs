//! A thin pool on a whole disk through LVM (`hearth host provision --direct-lvm --disk DEV`),
//! as Flintlock's provisioning makes one: a volume group on the disk, a thin pool on 95% of it
//! (LVM sizes the metadata for the data, where Flintlock takes a fixed 1%, too little on a
//! small disk), an autoextend profile. LVM's own tools do the LVM steps (its
//! on-disk format is LVM's to write); what hearth does natively is look: whether the disk is
//! free ([`inspect_disk`]: mounts, holders, partitions and the signatures of what it may hold)
//! and what exists of the group and pool already, so a second run changes nothing.
//!
//! The pool's device-mapper name is LVM's for it, `VG-LV` with each `-` doubled; with no thin
//! volumes of LVM's own on it, that device is the `thin-pool` target itself, so hearthd uses it
//! as it uses the dev pool (`hearthd --thin-pool NAME`).

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The volume group and pool hearth makes unless told otherwise; their device-mapper name is
/// `hearth-thinpool`, the dev pool's default name too.
pub const DEFAULT_VG: &str = "hearth";
pub const DEFAULT_LV: &str = "thinpool";
/// The autoextend profile's name, in `/etc/lvm/profile/`.
pub const PROFILE: &str = "hearth-thinpool";
/// Grow the pool by 20% of its size each time it passes 80% full, as Flintlock's profile does.
const PROFILE_TEXT: &str =
    "activation {\n\tthin_pool_autoextend_threshold=80\n\tthin_pool_autoextend_percent=20\n}\n";

/// What is found on a disk that is not free for a volume group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    NotBlock,
    Mounted(String),
    Held(Vec<String>),
    Partitions(Vec<String>),
    Signature(&'static str),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::NotBlock => write!(f, "it is not a block device"),
            Found::Mounted(at) => write!(f, "it is mounted at {at}"),
            Found::Held(by) => write!(f, "it is in use by {}", by.join(", ")),
            Found::Partitions(p) => write!(f, "it has partitions ({})", p.join(", ")),
            Found::Signature(what) => write!(f, "it holds {what}"),
        }
    }
}

impl Found {
    /// Whether `--force` may go past it: never for a disk in use, which would lose live data.
    pub fn forcible(&self) -> bool {
        matches!(self, Found::Partitions(_) | Found::Signature(_))
    }
}

/// Signatures at fixed offsets: (offset, magic, what it means).
const SIGNATURES: [(usize, &[u8], &str); 9] = [
    (1080, &[0x53, 0xef], "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (512, b"LABELONE", "an LVM physical volume"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (4086, b"SWAPSPACE2", "swap space"),
    (512, b"EFI PART", "a GPT partition table"),
    (32769, b"CD001", "an ISO 9660 filesystem"),
    (510, &[0x55, 0xaa], "a partition table or boot sector (MBR)"),
];

/// What the first bytes of a disk say it holds, if anything.
pub fn signature(head: &[u8]) -> Option<&'static str> {
    SIGNATURES.iter().find_map(|(at, magic, what)| {
        head.get(*at..at + magic.len()).filter(|b| b == magic).map(|_| *what)
    })
}

/// Everything that makes `disk` not free for a new volume group; empty when it is free.
pub fn inspect_disk(disk: &Path) -> std::io::Result<Vec<Found>> {
    let m = std::fs::metadata(disk)?;
    if !m.file_type().is_block_device() {
        return Ok(vec![Found::NotBlock]);
    }
    let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"))?;
    let mut found = Vec::new();
    let name = sys.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut devices = vec![(format!("{major}:{minor}"), name.clone())];
    let mut parts = Vec::new();
    for e in std::fs::read_dir(&sys)?.flatten() {
        let p = e.path();
        if p.join("partition").exists() {
            let dev = std::fs::read_to_string(p.join("dev")).unwrap_or_default();
            let part = e.file_name().to_string_lossy().into_owned();
            devices.push((dev.trim().to_owned(), part.clone()));
            parts.push(part);
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if let (Some(dev), Some(at)) = (f.get(2), f.get(4)) {
            if let Some((_, n)) = devices.iter().find(|(d, _)| d == dev) {
                found.push(Found::Mounted(format!("{at} (/dev/{n})")));
            }
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for (_, n) in &devices {
        if swaps.lines().any(|l| l.starts_with(&format!("/dev/{n} "))) {
            found.push(Found::Mounted(format!("swap (/dev/{n})")));
        }
    }
    let mut holders = Vec::new();
    for (_, n) in &devices {
        let dir = Path::new("/sys/class/block").join(n).join("holders");
        for h in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let h = h.file_name().to_string_lossy().into_owned();
            let dm = std::fs::read_to_string(format!("/sys/class/block/{h}/dm/name"));
            holders.push(match dm {
                Ok(dm) => format!("device-mapper's {}", dm.trim()),
                Err(_) => h,
            });
        }
    }
    if !holders.is_empty() {
        found.push(Found::Held(holders));
    }
    if !parts.is_empty() {
        found.push(Found::Partitions(parts));
    }
    let mut head = vec![0u8; 128 << 10];
    let n = read_up_to(disk, &mut head)?;
    if let Some(what) = signature(&head[..n]) {
        found.push(Found::Signature(what));
    }
    Ok(found)
}

fn read_up_to(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A pool on a disk through LVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectLvm {
    pub disk: PathBuf,
    pub vg: String,
    pub lv: String,
    /// Go past partitions and signatures on the disk (wiping them), never past a disk in use.
    pub force: bool,
}

/// One step of a set-up, for a plan or a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Pv(PathBuf),
    Vg { vg: String, disk: PathBuf },
    Pool { vg: String, lv: String },
    Profile(PathBuf),
    UseProfile { vg: String, lv: String },
    Activate { vg: String, lv: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Pv(d) => write!(f, "make {} an LVM physical volume (pvcreate)", d.display()),
            Step::Vg { vg, disk } => {
                write!(f, "create the volume group {vg} on {} (vgcreate)", disk.display())
            }
            Step::Pool { vg, lv } => write!(
                f,
                "create the thin pool {vg}/{lv} on 95% of the group, its metadata sized by LVM (lvcreate --type thin-pool)"
            ),
            Step::Profile(p) => {
                write!(f, "write the autoextend profile {} (80% full: grow by 20%)", p.display())
            }
            Step::UseProfile { vg, lv } => {
                write!(f, "give {vg}/{lv} the profile {PROFILE} (lvchange --metadataprofile)")
            }
            Step::Activate { vg, lv } => write!(f, "activate {vg}/{lv} (lvchange -ay)"),
        }
    }
}

impl DirectLvm {
    /// The pool's device-mapper name.
    pub fn dm_name(&self) -> String {
        format!("{}-{}", self.vg.replace('-', "--"), self.lv.replace('-', "--"))
    }

    fn profile_path() -> PathBuf {
        Path::new("/etc/lvm/profile").join(format!("{PROFILE}.profile"))
    }

    /// What [`Self::ensure`] would do now, or why the disk cannot be used.
    pub fn plan(&self) -> Result<Vec<Step>, String> {
        let (vg, lv) = (self.vg.clone(), self.lv.clone());
        let mut steps = Vec::new();
        let pvs = lvm(&["pvs", "--noheadings", "-o", "pv_name,vg_name"]).unwrap_or_default();
        let disk = std::fs::canonicalize(&self.disk)
            .map_err(|e| format!("{}: {e}", self.disk.display()))?;
        let ours = pvs.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next().and_then(|p| std::fs::canonicalize(p).ok()).as_deref() == Some(disk.as_path())
                && f.next() == Some(vg.as_str())
        });
        let vg_pvs: Vec<&str> = pvs
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(vg.as_str()))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if !ours {
            if !vg_pvs.is_empty() {
                return Err(format!(
                    "the volume group {vg} exists on other disks ({}): name another with --vg",
                    vg_pvs.join(", ")
                ));
            }
            let found =
                inspect_disk(&self.disk).map_err(|e| format!("{}: {e}", self.disk.display()))?;
            let refused: Vec<&Found> =
                found.iter().filter(|f| !self.force || !f.forcible()).collect();
            if !refused.is_empty() {
                let what: Vec<String> = refused.iter().map(ToString::to_string).collect();
                let fix = if refused.iter().all(|f| f.forcible()) {
                    "; --force wipes it (everything on it is lost)"
                } else {
                    ""
                };
                return Err(format!(
                    "{} cannot take a volume group: {}{fix}",
                    self.disk.display(),
                    what.join("; ")
                ));
            }
            steps.push(Step::Pv(self.disk.clone()));
            steps.push(Step::Vg { vg: vg.clone(), disk: self.disk.clone() });
        }
        let attrs = if ours {
            lvm(&["lvs", "--noheadings", "-o", "lv_attr,lv_profile", &format!("{vg}/{lv}")]).ok()
        } else {
            None
        };
        match attrs.as_deref().map(str::split_whitespace).map(|mut f| (f.next(), f.next())) {
            None | Some((None, _)) => {
                steps.push(Step::Pool { vg: vg.clone(), lv: lv.clone() });
                steps.push(Step::UseProfile { vg: vg.clone(), lv: lv.clone() });
            }
            Some((Some(attr), profile)) => {
                if !attr.starts_with('t') {
                    return Err(format!(
                        "{vg}/{lv} exists and is not a thin pool ({attr}): name another with --pool-name"
                    ));
                }
                if profile != Some(PROFILE) {
                    steps.push(Step::UseProfile { vg: vg.clone(), lv: lv.clone() });
                }
                if attr.as_bytes().get(4) != Some(&b'a') {
                    steps.push(Step::Activate { vg: vg.clone(), lv: lv.clone() });
                }
            }
        }
        if std::fs::read_to_string(Self::profile_path()).ok().as_deref() != Some(PROFILE_TEXT) {
            steps.insert(0, Step::Profile(Self::profile_path()));
        }
        Ok(steps)
    }

    /// Makes what is missing; returns the steps it took (none when all was there). A run that
    /// made the volume group and then fails removes it and the disk's LVM label again, so the
    /// disk is as it was found.
    pub fn ensure(&self) -> Result<Vec<Step>, String> {
        let steps = self.plan()?;
        let mut labelled = false;
        for s in &steps {
            if let Err(e) = self.run(s) {
                if labelled {
                    let disk = self.disk.to_string_lossy().into_owned();
                    let _ = lvm(&["vgremove", "-y", "-ff", &self.vg]);
                    let _ = lvm(&["pvremove", "-y", "-ff", &disk]);
                    return Err(format!(
                        "{e} (the volume group {} and the disk's LVM label were removed again)",
                        self.vg
                    ));
                }
                return Err(e);
            }
            labelled |= matches!(s, Step::Pv(_));
        }
        Ok(steps)
    }

    fn run(&self, step: &Step) -> Result<(), String> {
        let disk = self.disk.to_string_lossy().into_owned();
        let (vg, lv) = (self.vg.as_str(), self.lv.as_str());
        match step {
            Step::Profile(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                hearth_fs::atomic_write(path, PROFILE_TEXT.as_bytes())
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Step::Pv(_) if self.force => lvm(&["pvcreate", "-y", "-ff", &disk]).map(drop),
            Step::Pv(_) => lvm(&["pvcreate", &disk]).map(drop),
            Step::Vg { .. } => lvm(&["vgcreate", vg, &disk]).map(drop),
            // Data on 95% of the group; metadata (and its spare) sized by LVM for the data and
            // chunk size, so a small disk works too. Zeroing stays on: a VM never reads
            // another's old blocks (SECURITY.md).
            Step::Pool { .. } => lvm(&[
                "lvcreate",
                "-y",
                "--type",
                "thin-pool",
                "--zero",
                "y",
                "--chunksize",
                "64K",
                "-l",
                "95%VG",
                "-n",
                lv,
                vg,
            ])
            .map(drop),
            Step::UseProfile { .. } => {
                lvm(&["lvchange", "--metadataprofile", PROFILE, &format!("{vg}/{lv}")]).map(drop)
            }
            Step::Activate { .. } => lvm(&["lvchange", "-ay", &format!("{vg}/{lv}")]).map(drop),
        }
    }
}

/// Runs `lvm ARGS` (every LVM command is a subcommand of the one binary); its output, or its
/// own words when it fails.
fn lvm(args: &[&str]) -> Result<String, String> {
    let out = hearth_fs::die_with_parent(&mut Command::new("lvm"))
        .args(args)
        .output()
        .map_err(|e| format!("running lvm (install Debian's lvm2 package): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "lvm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_read_at_their_offsets() {
        let mut head = vec![0u8; 128 << 10];
        assert_eq!(signature(&head), None, "zeros hold nothing");
        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(signature(&head), Some("an ext2/3/4 filesystem"));
        let mut pv = vec![0u8; 4096];
        pv[512..520].copy_from_slice(b"LABELONE");
        assert_eq!(signature(&pv), Some("an LVM physical volume"));
        assert_eq!(signature(&pv[..100]), None, "a short read is no signature");
    }

    #[test]
    fn an_ext4_file_is_not_a_disk_and_names_are_lvms() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").expect("file");
        assert_eq!(inspect_disk(&f).expect("inspect"), vec![Found::NotBlock]);
        assert!(!Found::NotBlock.forcible() && !Found::Mounted("/".into()).forcible());
        assert!(Found::Signature("x").forcible());
        let d = DirectLvm { disk: f, vg: "my-vg".into(), lv: "thin-pool".into(), force: false };
        assert_eq!(d.dm_name(), "my--vg-thin--pool");
    }
}
