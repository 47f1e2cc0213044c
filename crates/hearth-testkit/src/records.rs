//! Records and specs with Ignite's defaults.

use hearth_types::vm::{DEFAULT_CPUS, DEFAULT_DISK_BYTES, DEFAULT_MEMORY_MIB};
use hearth_types::{Desired, VmId, VmRecord, VmSpec, VmState, VmStatus};

/// A valid spec with Ignite's defaults; `n` picks the id and name.
pub fn spec(n: u8) -> VmSpec {
    VmSpec {
        id: VmId::from_bytes([n; 8]),
        name: format!("vm{n}"),
        image: "demo:1".into(),
        image_id: "0".repeat(64),
        kernel: "k".into(),
        initrd: None,
        cpus: DEFAULT_CPUS,
        memory_mib: DEFAULT_MEMORY_MIB,
        disk_bytes: DEFAULT_DISK_BYTES,
        kernel_args: String::new(),
        entrypoint: None,
        command: vec![],
        env: vec![],
        labels: Default::default(),
        accel: Default::default(),
        provider: Default::default(),
        auto_remove: false,
        interactive: false,
        tty: false,
        network: Default::default(),
        ports: vec![],
        ssh_public_key: None,
        mac: None,
        address: None,
        cloud_init_network: None,
        macvtap_parent: None,
        nics: vec![],
        lan: None,
        volumes: vec![],
        cloud_init: Default::default(),
        log: None,
        restart: Default::default(),
        crash_loop_limit: None,
        snapshot: None,
        created_at: u64::from(n),
    }
}

/// A record of [`spec`] with the given intent and observed state.
pub fn record(n: u8, desired: Desired, state: VmState) -> VmRecord {
    VmRecord { spec: spec(n), desired, status: VmStatus { state, ..Default::default() } }
}

/// A launch of one vCPU and 128 MiB under TCG, its disks and boot files in `vm_dir`.
pub fn launch_spec(vm_dir: &std::path::Path) -> hearth_core::ports::LaunchSpec {
    hearth_core::ports::LaunchSpec {
        vm_dir: vm_dir.to_owned(),
        kernel: vm_dir.join("vmlinuz"),
        initrd: vm_dir.join("initrd.img"),
        cmdline: String::new(),
        root_disk: vm_dir.join("disk.img"),
        config_disk: vm_dir.join("config.img"),
        cpus: 1,
        memory_mib: 128,
        accel: hearth_types::Accel::Tcg,
        binary: None,
        networks: vec![],
        volumes: vec![],
        confinement: Default::default(),
        cloud_init: Default::default(),
        incoming: None,
    }
}
