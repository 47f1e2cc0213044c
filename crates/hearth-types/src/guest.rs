//! What the host tells hearth-init, and what hearth-init tells the host back.
//!
//! Both travel on the VM's small raw *config disk* (see docs/adr/0002-config-disk.md): the host
//! writes a [`GuestConfig`] record at offset 0 before boot, and hearth-init writes a [`GuestExit`]
//! record at [`EXIT_OFFSET`] before it powers the VM off. Records are a magic, a little-endian
//! `u32` length and that many bytes of JSON, so a reader never trusts a length it cannot bound.

use serde::{Deserialize, Serialize};

/// Size of the config disk file.
pub const CONFIG_DISK_BYTES: u64 = 1 << 20;
/// Where the exit record starts on the config disk.
pub const EXIT_OFFSET: u64 = 512 << 10;
/// Largest record either side accepts.
pub const MAX_RECORD: usize = (EXIT_OFFSET as usize) - 64;
/// Magic of the config record.
pub const CONFIG_MAGIC: &[u8; 8] = b"HEARTHC1";
/// Magic of the exit record.
pub const EXIT_MAGIC: &[u8; 8] = b"HEARTHX1";
/// Name of the virtio-serial port that carries the agent protocol.
pub const AGENT_PORT_NAME: &str = "hearth.agent";
/// vsock port the agent listens on where the VMM offers vsock.
pub const AGENT_VSOCK_PORT: u32 = 10_789;

/// The process hearth-init runs: the image's OCI process with the user's overrides applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProcess {
    /// argv; `args[0]` is looked up in the guest's PATH when it has no slash.
    pub args: Vec<String>,
    /// `KEY=VALUE`, already merged (image ENV, then `-e`).
    pub env: Vec<String>,
    /// Working directory; `/` when empty.
    #[serde(default)]
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, as OCI's `User`; root when empty.
    #[serde(default)]
    pub user: String,
    /// Give the process the console as a controlling terminal.
    #[serde(default)]
    pub tty: bool,
    /// Connect the console to the process's stdin (`-i`).
    #[serde(default)]
    pub stdin: bool,
}

/// Everything hearth-init needs to know about this VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Format version; hearth-init refuses versions it does not know.
    pub version: u32,
    pub hostname: String,
    pub process: GuestProcess,
    /// Exec `process.args` as PID 1 (a full-OS image's own init) instead of supervising it.
    #[serde(default)]
    pub init_system: bool,
    /// Public keys to install in root's `authorized_keys`.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// The network interface to configure; none when the VM has no network.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// The MAC of a card on a LAN that takes its address by DHCP: hearth-init runs the client
    /// for a workload it supervises (a full-OS image's init runs its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<String>,
    /// The network cards after the first, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cards: Vec<GuestCard>,
    /// cloud-init NoCloud files, by name, that hearth-init writes to the seed directory
    /// ([`CLOUD_INIT_SEED_DIR`]) before handing over to the image's init.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cloud_init: std::collections::BTreeMap<String, crate::Blob>,
    /// Extra disks to mount, found by their virtio serial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<GuestVolume>,
}

/// An extra disk and where to mount it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVolume {
    /// The disk's virtio serial (`/sys/block/vdX/serial`), or a shared directory's virtio-fs
    /// tag.
    pub serial: String,
    pub mount_point: String,
    pub read_only: bool,
    /// A virtio-fs share (mounted by its tag) rather than a disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share: bool,
}

/// The virtio serial of the root disk, so it is never mistaken for a volume.
pub const ROOT_SERIAL: &str = "hearth_root";

/// The virtio serial of a VM's `index`th volume (virtio-blk serials hold 20 bytes).
pub fn volume_serial(index: usize) -> String {
    format!("hearth_vol{index}")
}

/// Where cloud-init's NoCloud data source looks for seed files on the root filesystem.
pub const CLOUD_INIT_SEED_DIR: &str = "/var/lib/cloud/seed/nocloud";

/// A statically configured interface: hearth-init needs no DHCP client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// Finds the interface, whatever the kernel named it.
    pub mac: String,
    /// IPv4 address and prefix length.
    pub address: String,
    pub prefix: u8,
    pub gateway: String,
    /// Resolvers written to /etc/resolv.conf.
    pub dns: Vec<String>,
}

/// A network card after the VM's first. The first card alone has the default route and the
/// resolvers: a card after it takes its address (and the routes of its subnet), nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCard {
    pub mac: String,
    /// Its static address (gateway and resolvers unused); DHCP for its address when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// Current [`GuestConfig::version`]. New optional fields keep it; older readers ignore them.
pub const GUEST_CONFIG_VERSION: u32 = 1;

/// How the workload ended, as hearth-init saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExit {
    /// Exit code as a shell reports it: the code, or 128 + signal.
    pub exit_code: i32,
    /// Signal that ended the workload, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Why the workload could not run at all (missing binary, bad user...), if that happened.
    #[serde(default)]
    pub error: Option<String>,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("no record (magic not found)")]
    Missing,
    #[error("record length {0} is out of bounds")]
    Length(usize),
    #[error("record is not valid JSON: {0}")]
    Json(String),
}

/// Encodes a record: magic, `u32` LE length, JSON.
pub fn encode_record<T: Serialize>(magic: &[u8; 8], value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(12 + json.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Decodes a record written by [`encode_record`] from the start of `buf`.
pub fn decode_record<T: for<'de> Deserialize<'de>>(
    magic: &[u8; 8],
    buf: &[u8],
) -> Result<T, RecordError> {
    if buf.len() < 12 || &buf[..8] != magic {
        return Err(RecordError::Missing);
    }
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > MAX_RECORD || 12 + len > buf.len() {
        return Err(RecordError::Length(len));
    }
    serde_json::from_slice(&buf[12..12 + len]).map_err(|e| RecordError::Json(e.to_string()))
}

/// Is `args[0]` an init system that should become PID 1 rather than run under hearth-init?
pub fn is_init_system(args: &[String]) -> bool {
    matches!(
        args.first().map(String::as_str),
        Some(
            "/sbin/init"
                | "/lib/systemd/systemd"
                | "/usr/lib/systemd/systemd"
                | "/init"
                | "/usr/sbin/init"
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let cfg = GuestConfig {
            version: GUEST_CONFIG_VERSION,
            hostname: "vm1".into(),
            process: GuestProcess {
                args: vec!["sh".into()],
                env: vec!["A=1".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let buf = encode_record(CONFIG_MAGIC, &cfg);
        assert_eq!(decode_record::<GuestConfig>(CONFIG_MAGIC, &buf), Ok(cfg));
    }

    #[test]
    fn wrong_magic_is_missing() {
        let buf = encode_record(EXIT_MAGIC, &GuestExit::default());
        assert_eq!(decode_record::<GuestExit>(CONFIG_MAGIC, &buf), Err(RecordError::Missing));
        assert_eq!(decode_record::<GuestExit>(EXIT_MAGIC, &[0; 4]), Err(RecordError::Missing));
    }

    #[test]
    fn oversized_length_is_refused() {
        let mut buf = encode_record(EXIT_MAGIC, &GuestExit::default());
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_record::<GuestExit>(EXIT_MAGIC, &buf),
            Err(RecordError::Length(_))
        ));
    }

    #[test]
    fn init_systems_are_recognised() {
        assert!(is_init_system(&["/sbin/init".into()]));
        assert!(!is_init_system(&["sh".into()]));
        assert!(!is_init_system(&[]));
    }
}
