//! QEMU's command line for a [`LaunchSpec`](crate::LaunchSpec). Pure, so it is unit-tested.

use hearth_types::Accel;

use crate::LaunchSpec;

/// hearth's kernel arguments, then the user's.
pub fn kernel_cmdline(spec: &LaunchSpec, accel: Accel) -> String {
    let mut c = String::from("console=ttyS0 quiet loglevel=0 rdinit=/init panic=-1");
    if accel == Accel::Kvm {
        // microvm has no PCI and no ACPI reboot path; reboot=t triple-faults out.
        c.push_str(" reboot=t pci=off");
    }
    // The VM's own arguments replace hearth's by key, and follow them otherwise.
    hearth_types::kernel::merge_cmdline(&c, &spec.cmdline)
}

/// qboot: a minimal firmware that boots `-kernel` straight away and prints nothing on the serial
/// console (SeaBIOS would print its banner into the VM's log).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// What a QEMU binary can do, from its `-help`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `-sandbox` (built with seccomp).
    pub sandbox: bool,
    /// `-run-with user=...,chroot=...` (QEMU 9.1 and later).
    pub run_with: bool,
}

impl Features {
    /// Everything, for tests of the command line.
    pub const ALL: Self = Self { sandbox: true, run_with: true };

    pub fn from_help(help: &str) -> Self {
        Self { sandbox: help.contains("-sandbox"), run_with: help.contains("-run-with") }
    }
}

/// The confinement arguments: the seccomp sandbox (no obsolete syscalls, no spawning, no
/// resource control), and the drop to the VM's uid:gid inside a chroot of its directory. With
/// a drop, `elevateprivileges` must stay allowed, as QEMU's own setuid comes after the filter
/// is installed; once dropped, with no capabilities, no exec and NO_NEW_PRIVS, it has nothing
/// to elevate to.
pub fn confinement_args(spec: &LaunchSpec, f: Features) -> Vec<String> {
    let mut a = Vec::new();
    let drop = spec.confinement.run_as.filter(|_| f.run_with);
    if f.sandbox {
        let elevate = if drop.is_some() { "allow" } else { "deny" };
        a.extend([
            "-sandbox".to_owned(),
            format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"),
        ]);
    }
    if let Some((uid, gid)) = drop {
        a.extend([
            "-run-with".to_owned(),
            format!("user={uid}:{gid},chroot={}", spec.vm_dir.display()),
        ]);
    }
    a
}

/// The full argument list (without the binary). `accel` must be resolved (Kvm or Tcg); `bios`
/// replaces the machine's default firmware.
pub fn qemu_args(
    spec: &LaunchSpec,
    accel: Accel,
    bios: Option<&std::path::Path>,
    features: Features,
) -> Vec<String> {
    let dir = &spec.vm_dir;
    let p = |name: &str| dir.join(name).display().to_string();
    let kvm = accel == Accel::Kvm;
    let serial = if kvm { "virtio-serial-device" } else { "virtio-serial-pci" };
    let shares: Vec<_> = crate::virtiofs::shares(&spec.volumes).collect();
    let mut a = machine_args(kvm, bios);
    if !shares.is_empty() {
        // A vhost-user backend maps the guest's memory: it must be shareable (a memfd).
        if let Some(m) = a.iter_mut().skip_while(|x| *x != "-M").nth(1) {
            m.push_str(",memory-backend=mem");
        }
        let backend = format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib);
        push(&mut a, &["-object", &backend]);
    }
    let (mem, cpus) = (spec.memory_mib.to_string(), spec.cpus.to_string());
    push(
        &mut a,
        &[
            "-m",
            &mem,
            "-smp",
            &cpus,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-no-reboot",
        ],
    );
    let (kernel, initrd, cmdline) = (
        spec.kernel.display().to_string(),
        spec.initrd.display().to_string(),
        kernel_cmdline(spec, accel),
    );
    push(&mut a, &["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);
    let chrooted = spec.confinement.run_as.is_some() && features.run_with;
    a.extend(disk_args(spec, kvm, chrooted));
    // Each share: virtio-fs on its virtiofsd's socket, found in the guest by its tag.
    let fs = if kvm { "vhost-user-fs-device" } else { "vhost-user-fs-pci" };
    for (k, share) in shares.iter().enumerate() {
        let sock = crate::virtiofs::socket(dir, k);
        let chardev = format!("socket,id=fs{k},path={}", sock.display());
        let device = format!("{fs},chardev=fs{k},tag={}", share.serial);
        push(&mut a, &["-chardev", &chardev, "-device", &device]);
    }
    // hearth captures the console itself (crate::console), so it can cap and rotate the log.
    let console = format!("socket,id=con,path={},server=on,wait=off", p(crate::console::SOCKET));
    push(&mut a, &["-chardev", &console, "-serial", "chardev:con"]);
    let agent = format!("socket,id=agent,path={},server=on,wait=off", p("agent.sock"));
    push(
        &mut a,
        &[
            "-device",
            serial,
            "-chardev",
            &agent,
            "-device",
            "virtserialport,chardev=agent,name=hearth.agent",
        ],
    );
    let nic = if kvm { "virtio-net-device" } else { "virtio-net-pci,romfile=" };
    let mut macvtaps = 0;
    for (i, net) in spec.networks.iter().enumerate() {
        let netdev = netdev(net, i, MACVTAP_FD + macvtaps);
        macvtaps += i32::from(net.macvtap.is_some());
        let device = format!("{nic},netdev=net{i},mac={}", net.mac);
        push(&mut a, &["-netdev", &netdev, "-device", &device]);
    }
    let qmp = format!("unix:{},server=on,wait=off", p("qmp.sock"));
    // `-D`: QEMU's own log (it truncates it on open, so qemu.log holds this boot only). `-S`:
    // the guest waits, paused, until hearth has connected to the console and says `cont`. No
    // `-daemonize`: QEMU installs its seccomp filter before it would fork, and the filter denies
    // forking; hearth starts it in a session of its own instead (launch.rs).
    push(&mut a, &["-qmp", &qmp, "-pidfile", &p("qemu.pid"), "-D", &p("qemu.log"), "-S"]);
    // A restore: the guest's state comes over QMP (a descriptor hearth opened), not a boot.
    if spec.incoming.is_some() {
        push(&mut a, &["-incoming", "defer"]);
    }
    a.extend(confinement_args(spec, features));
    a
}

/// The machine, accelerator, CPU model and firmware: microvm with KVM, pc with TCG (microvm
/// hangs under TCG calibrating its timer).
fn machine_args(kvm: bool, bios: Option<&std::path::Path>) -> Vec<String> {
    let machine: &[&str] = if kvm {
        &[
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ]
    } else {
        &["-M", "pc", "-accel", "tcg", "-cpu", "max"]
    };
    let mut a: Vec<String> = machine.iter().map(|s| s.to_string()).collect();
    if let Some(b) = bios {
        a.extend(["-bios".to_owned(), b.display().to_string()]);
    } else if !kvm {
        // Without qboot, keep SeaBIOS off the serial console.
        a.extend(["-fw_cfg".to_owned(), "name=etc/sercon-port,string=0".to_owned()]);
    }
    a
}

fn push(a: &mut Vec<String>, items: &[&str]) {
    a.extend(items.iter().map(|s| s.to_string()));
}

/// The root disk (with its serial), the config disk and the volumes: virtio-mmio under KVM's
/// microvm machine, PCI under TCG's pc. `auto-read-only=off`: QEMU never reopens a disk to
/// change its access (saving the guest's state drops write access): once chrooted as the VM's
/// uid it could not open the path again. With `chrooted` (QEMU will chroot into the VM's
/// directory, having started there), the VM's own files are also named relative to it, so the
/// one name holds before the chroot and after it.
fn disk_args(spec: &LaunchSpec, kvm: bool, chrooted: bool) -> Vec<String> {
    let blk = if kvm { "virtio-blk-device" } else { "virtio-blk-pci" };
    let mut a = Vec::new();
    let mut drive = |file: &std::path::Path, id: &str, extra: &str, serial: Option<&str>| {
        let file = match file.strip_prefix(&spec.vm_dir) {
            Ok(inside) if chrooted => inside,
            _ => file,
        };
        a.push("-drive".to_owned());
        a.push(format!(
            "file={},if=none,id={id},format=raw,cache=writeback,auto-read-only=off{extra}",
            file.display()
        ));
        a.push("-device".to_owned());
        a.push(match serial {
            Some(s) => format!("{blk},drive={id},serial={s}"),
            None => format!("{blk},drive={id}"),
        });
    };
    drive(&spec.root_disk, "root", ",discard=unmap", Some(hearth_types::guest::ROOT_SERIAL));
    drive(&spec.config_disk, "config", "", None);
    for (i, v) in spec.volumes.iter().enumerate().filter(|(_, v)| !v.share) {
        let ro = if v.read_only { ",readonly=on" } else { "" };
        drive(&v.path, &format!("vol{i}"), ro, Some(&v.serial));
    }
    a
}

/// The descriptor the first macvtap's character device is handed to QEMU as; the next ones
/// follow it, in the order of their cards.
pub const MACVTAP_FD: i32 = 3;

/// The backend of card `i`: a macvtap's device inherited as descriptor `fd`, a tap QEMU
/// creates itself (gone with the process; no scripts), or QEMU's user-mode network with one
/// `hostfwd` per published port.
fn netdev(net: &crate::NetLaunch, i: usize, fd: i32) -> String {
    if net.macvtap.is_some() {
        // Opened by hearth and inherited (launch.rs); no vhost-net: QEMU does the I/O itself.
        return format!("tap,id=net{i},fd={fd},vhost=off");
    }
    if let Some(tap) = &net.tap {
        return format!("tap,id=net{i},ifname={tap},script=no,downscript=no");
    }
    let mut s = format!("user,id=net{i}");
    for f in &net.forwards {
        let ip =
            if f.host_ip.contains(':') { format!("[{}]", f.host_ip) } else { f.host_ip.clone() };
        s.push_str(&format!(",hostfwd={}:{ip}:{}-:{}", f.protocol, f.host_port, f.guest_port));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            vm_dir: PathBuf::from("/r/vms/abc"),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "foo=bar".into(),
            root_disk: "/r/vms/abc/disk.img".into(),
            config_disk: "/r/vms/abc/config.img".into(),
            cpus: 2,
            memory_mib: 512,
            accel: Accel::Auto,
            binary: None,
            networks: vec![],
            volumes: vec![],
            confinement: Default::default(),
            cloud_init: Default::default(),
            incoming: None,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn the_vmm_is_sandboxed_and_drops_to_the_vms_uid_in_a_chroot_of_its_directory() {
        let mut s = spec();
        let a = qemu_args(&s, Accel::Tcg, None, Features::ALL);
        assert_eq!(
            after(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(after(&a, "-run-with").is_empty(), "no uid given, no drop");
        s.confinement.run_as = Some((2_100_000_007, 2_100_000_007));
        let a = qemu_args(&s, Accel::Tcg, None, Features::ALL);
        assert_eq!(
            after(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(after(&a, "-run-with"), ["user=2100000007:2100000007,chroot=/r/vms/abc"]);
        // Its own disks by names that hold before the chroot (it starts in its directory) and
        // after it.
        let drives = after(&a, "-drive");
        assert!(
            drives[0].starts_with("file=disk.img,") && drives[1].starts_with("file=config.img,")
        );
        // A QEMU without the options gets none of them (and hearth says so when it launches).
        let a = qemu_args(&s, Accel::Tcg, None, Features::default());
        assert!(after(&a, "-sandbox").is_empty() && after(&a, "-run-with").is_empty());
        let f =
            Features::from_help("-sandbox on[,obsolete=allow|deny]\n-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]");
        assert_eq!(f, Features::ALL);
    }

    #[test]
    fn tcg_uses_pc_with_pci_devices() {
        let a = qemu_args(&spec(), Accel::Tcg, None, Features::ALL);
        assert_eq!(after(&a, "-M"), ["pc"]);
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert!(after(&a, "-device").contains(&"virtio-blk-pci,drive=root,serial=hearth_root"));
        assert!(after(&a, "-device").contains(&"virtio-serial-pci"));
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["512"]);
    }

    #[test]
    fn kvm_uses_microvm_with_mmio_devices() {
        let a = qemu_args(&spec(), Accel::Kvm, None, Features::ALL);
        assert!(after(&a, "-M")[0].starts_with("microvm"));
        assert!(after(&a, "-device").contains(&"virtio-blk-device,drive=root,serial=hearth_root"));
        assert!(after(&a, "-append")[0].contains("reboot=t"));
    }

    #[test]
    fn root_disk_comes_first_and_everything_lives_in_the_vm_dir() {
        let a = qemu_args(&spec(), Accel::Tcg, None, Features::ALL);
        let drives = after(&a, "-drive");
        assert!(drives[0].contains("disk.img") && drives[1].contains("config.img"));
        assert!(after(&a, "-chardev").iter().all(|c| c.contains("/r/vms/abc/")));
        assert!(after(&a, "-append")[0].ends_with("panic=-1 foo=bar"));
        assert!(
            !a.contains(&"-daemonize".to_string()),
            "the sandbox denies the fork -daemonize makes"
        );
        assert_eq!(after(&a, "-pidfile"), ["/r/vms/abc/qemu.pid"]);
        assert_eq!(after(&a, "-D"), ["/r/vms/abc/qemu.log"]);
        assert_eq!(after(&a, "-qmp"), ["unix:/r/vms/abc/qmp.sock,server=on,wait=off"]);
    }

    #[test]
    fn console_is_logged_and_the_agent_sits_on_the_virtio_serial_bus() {
        for accel in [Accel::Tcg, Accel::Kvm] {
            let a = qemu_args(&spec(), accel, None, Features::ALL);
            let chardevs = after(&a, "-chardev");
            assert_eq!(
                chardevs[0], "socket,id=con,path=/r/vms/abc/console.sock,server=on,wait=off",
                "no logfile: hearth captures it"
            );
            assert!(a.iter().any(|x| x == "-S"), "the guest starts paused");
            assert_eq!(after(&a, "-serial"), ["chardev:con"]);
            assert_eq!(
                chardevs[1],
                "socket,id=agent,path=/r/vms/abc/agent.sock,server=on,wait=off"
            );
            let devices = after(&a, "-device");
            let bus =
                devices.iter().position(|d| d.starts_with("virtio-serial")).expect("virtio-serial");
            let port = devices
                .iter()
                .position(|d| *d == "virtserialport,chardev=agent,name=hearth.agent")
                .expect("port");
            assert!(bus < port, "the port needs its bus first");
            for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
                assert!(a.iter().any(|x| x == flag), "{flag} missing");
            }
            assert_eq!(after(&a, "-display"), ["none"]);
            assert_eq!((after(&a, "-kernel"), after(&a, "-initrd")), (vec!["/k"], vec!["/i"]));
        }
    }

    #[test]
    fn kernel_cmdline_takes_the_users_arguments_over_hearths_by_key() {
        let mut s = spec();
        s.cmdline = "  loglevel=7 ds=nocloud ".into();
        assert_eq!(
            kernel_cmdline(&s, Accel::Tcg),
            "console=ttyS0 quiet loglevel=7 rdinit=/init panic=-1 ds=nocloud"
        );
        s.cmdline.clear();
        assert_eq!(
            kernel_cmdline(&s, Accel::Tcg),
            "console=ttyS0 quiet loglevel=0 rdinit=/init panic=-1"
        );
        assert!(!kernel_cmdline(&s, Accel::Tcg).contains("reboot=t"));
    }

    #[test]
    fn disks_are_raw_virtio_with_writeback_and_discard_on_root() {
        let a = qemu_args(&spec(), Accel::Kvm, None, Features::ALL);
        assert_eq!(
            after(&a, "-drive"),
            [
                "file=/r/vms/abc/disk.img,if=none,id=root,format=raw,cache=writeback,auto-read-only=off,discard=unmap",
                "file=/r/vms/abc/config.img,if=none,id=config,format=raw,cache=writeback,auto-read-only=off"
            ]
        );
        let devices = after(&a, "-device");
        assert_eq!(
            &devices[..2],
            ["virtio-blk-device,drive=root,serial=hearth_root", "virtio-blk-device,drive=config"]
        );
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-accel"), ["kvm"]);
    }

    #[test]
    fn firmware_choice() {
        let q = std::path::Path::new("/usr/share/qemu/qboot.rom");
        let a = qemu_args(&spec(), Accel::Tcg, Some(q), Features::ALL);
        assert_eq!(after(&a, "-bios"), ["/usr/share/qemu/qboot.rom"]);
        let a = qemu_args(&spec(), Accel::Tcg, None, Features::ALL);
        assert!(after(&a, "-bios").is_empty());
        assert_eq!(after(&a, "-fw_cfg"), ["name=etc/sercon-port,string=0"]);
    }

    #[test]
    fn volumes_follow_the_config_disk_with_their_serials() {
        let mut s = spec();
        s.volumes = vec![
            crate::VolumeDisk {
                path: "/r/images/rootfs/k.ext4".into(),
                serial: "hearth_vol0".into(),
                read_only: true,
                host: false,
                share: false,
            },
            crate::VolumeDisk {
                path: "/r/vms/abc/volume-1.img".into(),
                serial: "hearth_vol1".into(),
                read_only: false,
                host: false,
                share: false,
            },
        ];
        let a = qemu_args(&s, Accel::Tcg, None, Features::ALL);
        let drives = after(&a, "-drive");
        assert_eq!(drives.len(), 4);
        assert!(
            drives[2].contains("file=/r/images/rootfs/k.ext4")
                && drives[2].ends_with(",readonly=on"),
            "{}",
            drives[2]
        );
        assert!(
            drives[3].contains("file=/r/vms/abc/volume-1.img") && !drives[3].contains("readonly"),
            "{}",
            drives[3]
        );
        let devices = after(&a, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=vol0,serial=hearth_vol0"), "{devices:?}");
        assert!(devices.contains(&"virtio-blk-pci,drive=vol1,serial=hearth_vol1"), "{devices:?}");
    }

    #[test]
    fn a_share_is_virtio_fs_on_its_sockets_with_the_guests_memory_shareable() {
        let mut s = spec();
        assert!(after(&qemu_args(&s, Accel::Tcg, None, Features::ALL), "-object").is_empty());
        let vol = |path: &str, serial: &str, share| crate::VolumeDisk {
            path: path.into(),
            serial: serial.into(),
            read_only: false,
            host: true,
            share,
        };
        s.volumes = vec![
            vol("/srv/a", "hearth_vol0", true),
            vol("/dev/vdb", "hearth_vol1", false),
            vol("/srv/b", "hearth_vol2", true),
        ];
        for (accel, fs) in [(Accel::Tcg, "vhost-user-fs-pci"), (Accel::Kvm, "vhost-user-fs-device")]
        {
            let a = qemu_args(&s, accel, None, Features::ALL);
            assert!(after(&a, "-M")[0].ends_with(",memory-backend=mem"), "{a:?}");
            assert_eq!(after(&a, "-object"), ["memory-backend-memfd,id=mem,size=512M,share=on"]);
            assert_eq!(after(&a, "-m"), ["512"], "the backend's size is the guest's");
            let chardevs = after(&a, "-chardev");
            assert!(chardevs.contains(&"socket,id=fs0,path=/r/vms/abc/fs0.sock"), "{chardevs:?}");
            assert!(chardevs.contains(&"socket,id=fs1,path=/r/vms/abc/fs1.sock"), "{chardevs:?}");
            let devices = after(&a, "-device");
            assert!(devices.contains(&format!("{fs},chardev=fs0,tag=hearth_vol0").as_str()));
            assert!(devices.contains(&format!("{fs},chardev=fs1,tag=hearth_vol2").as_str()));
            let drives = after(&a, "-drive");
            assert_eq!(drives.len(), 3, "the disk alone is a drive: {drives:?}");
            assert!(drives[2].contains("file=/dev/vdb,") && drives[2].contains("id=vol1"));
        }
    }

    #[test]
    fn network_card_and_forwards() {
        assert!(
            after(&qemu_args(&spec(), Accel::Tcg, None, Features::ALL), "-netdev").is_empty(),
            "no network, no card"
        );
        let mut s = spec();
        let forwards = ["127.0.0.1:2222:22", "8080:80", "[::1]:5353:53/udp"]
            .map(|p| p.parse().expect("port"))
            .to_vec();
        s.networks = vec![crate::NetLaunch {
            mac: "02:00:00:00:00:01".into(),
            forwards,
            ..Default::default()
        }];
        let a = qemu_args(&s, Accel::Tcg, None, Features::ALL);
        assert_eq!(
            after(&a, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80,hostfwd=udp:[::1]:5353-:53"]
        );
        assert!(after(&a, "-device")
            .contains(&"virtio-net-pci,romfile=,netdev=net0,mac=02:00:00:00:00:01"));
        let a = qemu_args(&s, Accel::Kvm, None, Features::ALL);
        assert!(
            after(&a, "-device").contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:01")
        );
        s.networks = vec![crate::NetLaunch {
            mac: "02:00:00:00:00:01".into(),
            forwards: vec![],
            tap: Some("ht0123".into()),
            macvtap: None,
        }];
        assert_eq!(
            after(&qemu_args(&s, Accel::Tcg, None, Features::ALL), "-netdev"),
            ["tap,id=net0,ifname=ht0123,script=no,downscript=no"]
        );
        // A macvtap's device is inherited as descriptor 3; QEMU does its I/O (no vhost-net).
        s.networks = vec![crate::NetLaunch {
            mac: "02:00:00:00:00:01".into(),
            macvtap: Some("ht0123".into()),
            ..Default::default()
        }];
        assert_eq!(
            after(&qemu_args(&s, Accel::Tcg, None, Features::ALL), "-netdev"),
            ["tap,id=net0,fd=3,vhost=off"]
        );
        // More cards: each its own backend and device, macvtaps on the next descriptors.
        let card = |mac: &str, tap: Option<&str>, macvtap: Option<&str>| crate::NetLaunch {
            mac: mac.into(),
            tap: tap.map(Into::into),
            macvtap: macvtap.map(Into::into),
            ..Default::default()
        };
        s.networks = vec![
            card("02:00:00:00:00:01", None, Some("ht0123")),
            card("12:00:00:00:00:01", Some("ht01231"), None),
            card("22:00:00:00:00:01", None, Some("ht01232")),
        ];
        let a = qemu_args(&s, Accel::Tcg, None, Features::ALL);
        assert_eq!(
            after(&a, "-netdev"),
            [
                "tap,id=net0,fd=3,vhost=off",
                "tap,id=net1,ifname=ht01231,script=no,downscript=no",
                "tap,id=net2,fd=4,vhost=off"
            ]
        );
        let devices = after(&a, "-device");
        assert!(devices.contains(&"virtio-net-pci,romfile=,netdev=net2,mac=22:00:00:00:00:01"));
    }
}
