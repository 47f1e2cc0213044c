//! Host set-up that needs kernel features this CI host lacks (device-mapper thin pools, loop
//! devices), tested inside a guest that hearth boots under QEMU/TCG with Debian's cloud kernel,
//! which has them as modules: the guest is the test host. Its image is busybox with hearth's
//! CLI (and the loader and libraries it links) and the modules' files; hearth loads the modules
//! itself, natively, as it would on a host. `provision --all` is also tested on a
//! debootstrapped Debian test host booted with systemd, where it installs packages with apt and
//! runs hearthd as a systemd service.

use hearth_e2e::test_host::{
    debian_test_host_image, hearth_bin, in_test_host, in_test_host_with, prelude, section,
    test_host_image,
};
use hearth_e2e::{require_e2e, text, Daemon};

#[test]
fn provision_dev_makes_a_thin_pool_on_files_once_and_dry_run_changes_nothing() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhost:1", false);
    let h = hearth_bin().display().to_string();
    let p = format!(
        "{h} host provision --dev --root /var/lib/hearth --data-size 1G --metadata-size 64M"
    );
    let script = format!(
        "set -e; echo '== plan'; {p} --dry-run; test ! -e /var/lib/hearth/pool; \
         echo '== first'; {p}; echo '== second'; {p}; echo '== plan again'; {p} --dry-run; \
         echo '== check'; {h} host check --root /var/lib/hearth || true; \
         echo '== files'; ls -ls /var/lib/hearth/pool"
    );
    let (out, code) = in_test_host(&d, "testhost:1", "1G", "3G", &script);
    assert_eq!(code, 0, "{out}");
    let section = |name: &str| section(&out, name);
    let plan = section("plan");
    assert!(
        plan.contains("would load the kernel module dm_thin_pool")
            && plan.contains("would make the sparse file /var/lib/hearth/pool/data (1.0 GiB)")
            && plan.contains("would create the thin pool hearth-thinpool"),
        "the plan names every step:\n{out}"
    );
    let first = section("first");
    assert!(first.contains("loaded the kernel module dm_thin_pool"), "{out}");
    assert!(first.contains("did create the thin pool hearth-thinpool"), "{out}");
    assert!(first.contains("thin pool hearth-thinpool: data 0.0% used of 1.0 GiB"), "{out}");
    let second = section("second");
    assert!(
        !second.contains("did ") && second.contains("nothing changed"),
        "a second run changes nothing:\n{out}"
    );
    assert!(section("plan again").contains("nothing to do"), "{out}");
    let check = section("check");
    let pool = check.lines().find(|l| l.starts_with("thin pool")).unwrap_or_default();
    assert!(
        pool.contains("OK") && pool.contains("hearth-thinpool: data 0.0% used of 1.0 GiB"),
        "read from device-mapper:\n{check}"
    );
    for m in ["dm_thin_pool", "loop", "macvtap", "vhost_vsock"] {
        let row = check.lines().find(|l| l.starts_with(&format!("module {m}"))).unwrap_or_default();
        assert!(row.contains("OK"), "{m} in the test host:\n{check}");
    }
    // Sparse: the files hold almost nothing of their size.
    let files = section("files");
    assert!(files.lines().any(|l| l.ends_with(" data")), "{files}");
}

/// `--direct-lvm` on the test host's extra disks: a blank one (a sparse file of zeros here) and
/// one holding ext4 (made here), both attached as they are with `-v`.
#[test]
fn provision_direct_lvm_makes_a_pool_on_a_blank_disk_once_and_refuses_a_disk_in_use() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhost-lvm:1", true);
    let work = tempfile::tempdir().expect("tmp");
    let (blank, formatted) = (work.path().join("blank.img"), work.path().join("ext4.img"));
    std::fs::File::create(&blank).and_then(|f| f.set_len(2 << 30)).expect("blank disk");
    std::fs::File::create(&formatted).and_then(|f| f.set_len(256 << 20)).expect("disk");
    let st = std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&formatted).status();
    assert!(st.expect("mkfs.ext4").success());
    // A disk with an MBR partition table and one Linux partition (and nothing in it).
    let parted = work.path().join("parted.img");
    let mut mbr = vec![0u8; 512];
    let sectors: u32 = (64 << 20) / 512;
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    mbr[510..].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&parted, &mbr)
        .and_then(|()| std::fs::OpenOptions::new().write(true).open(&parted)?.set_len(64 << 20))
        .expect("partitioned disk");
    let (h, p) = (hearth_bin().display().to_string(), prelude());
    // LVM without udev in the guest: device-mapper's nodes made by libdevmapper itself.
    let script = format!(
        "{p} export DM_DISABLE_UDEV=1; mkdir -p /run/lock /etc/lvm; \
         disk_of() {{ for b in /sys/block/vd*; do [ \"$(cat $b/serial)\" = $1 ] && echo /dev/${{b##*/}}; done; }}; \
         B=$(disk_of hearth_vol0); F=$(disk_of hearth_vol1); T=$(disk_of hearth_vol2); P=\"{h} host provision --direct-lvm --disk\"; \
         echo '== formatted'; $P $F --dry-run 2>&1; echo \"exit=$?\"; \
         echo '== partitioned'; $P $T 2>&1; echo \"exit=$?\"; \
         mkdir -p /mnt/f; mount $F /mnt/f; echo '== mounted'; $P $F --force 2>&1; echo \"exit=$?\"; umount /mnt/f; \
         echo '== plan'; $P $B --dry-run 2>&1; echo '== first'; $P $B 2>&1; echo \"exit=$?\"; \
         echo '== second'; $P $B 2>&1; echo '== plan again'; $P $B --dry-run 2>&1; \
         echo '== check'; {h} host check || true; \
         echo '== lvs'; lvm lvs --noheadings -o lv_name,lv_attr,lv_profile hearth 2>&1; \
         daemon --thin-pool hearth-thinpool; import_kernel; $H image import /demo --name demo:1 >/dev/null; \
         $H create --name a --network none --size 1G demo:1 >/dev/null; $H start a >/dev/null 2>&1; \
         echo '== vm'; cat /sys/block/dm-*/dm/name; $H rm -f a >/dev/null; \
         echo '== vm removed'; cat /sys/block/dm-*/dm/name; kill $HD; \
         echo '== held'; $P $B --vg other --force 2>&1; echo \"exit=$?\"; \
         echo '== forced'; $P $F --force --vg other 2>&1; echo \"exit=$?\"; \
         echo '== end'"
    );
    let (b, f) = (blank.display().to_string(), formatted.display().to_string());
    let t = parted.display().to_string();
    let disks = ["-v", &b, "-v", &f, "-v", &t];
    let (out, code) = in_test_host_with(&d, "testhost-lvm:1", "1G", "3G", &disks, &script);
    assert_eq!(code, 0, "{out}");
    let section = |name: &str| section(&out, name);
    let formatted_said = section("formatted");
    assert!(
        formatted_said.contains("holds an ext2/3/4 filesystem")
            && formatted_said.contains("--force wipes it")
            && formatted_said.contains("exit=1"),
        "a formatted disk is refused, naming what it holds:\n{out}"
    );
    let partitioned = section("partitioned");
    assert!(
        partitioned.contains("it has partitions (") && partitioned.contains("exit=1"),
        "a partitioned disk is refused, naming its partitions:\n{out}"
    );
    let held = section("held");
    assert!(
        held.contains("it is in use by") && held.contains("exit=1"),
        "a disk LVM holds is refused, even with --force:\n{out}"
    );
    let mounted = section("mounted");
    assert!(
        mounted.contains("it is mounted at /mnt/f") && mounted.contains("exit=1"),
        "a mounted disk is refused even with --force:\n{out}"
    );
    let plan = section("plan");
    for step in [
        "would write the autoextend profile /etc/lvm/profile/hearth-thinpool.profile",
        "would make /dev/vd",
        "would create the volume group hearth on /dev/vd",
        "would create the thin pool hearth/thinpool",
    ] {
        assert!(plan.contains(step), "the plan says {step:?}:\n{out}");
    }
    let first = section("first");
    assert!(first.contains("did create the thin pool hearth/thinpool"), "{out}");
    assert!(
        first.contains("thin pool hearth-thinpool: data 0.0% used of 1.")
            && first.contains("exit=0"),
        "{out}"
    );
    let second = section("second");
    assert!(!second.contains("did ") && second.contains("nothing changed"), "{out}");
    assert!(section("plan again").contains("nothing to do"), "{out}");
    let check = section("check");
    let pool = check.lines().find(|l| l.starts_with("thin pool")).unwrap_or_default();
    assert!(pool.contains("OK") && pool.contains("hearth-thinpool: data 0.0%"), "{check}");
    let lvs = section("lvs");
    let row = lvs.lines().find(|l| l.trim_start().starts_with("thinpool")).unwrap_or_default();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert!(
        fields.len() == 3 && fields[1].starts_with('t') && fields[2] == "hearth-thinpool",
        "an LVM thin pool with the autoextend profile:\n{lvs}"
    );
    // hearthd puts a VM's root disk on the LVM pool as on the dev pool, and removes it with it.
    let vm = section("vm");
    assert!(vm.lines().any(|l| l.starts_with("hearth-vm-")), "a thin device of its own:\n{out}");
    let removed = section("vm removed");
    assert!(!removed.contains("hearth-vm-") && removed.contains("hearth-thinpool"), "{out}");
    // --force goes past the filesystem, and LVM sizes the metadata of a small pool too.
    let forced = section("forced");
    assert!(forced.contains("did make /dev/vd") && forced.contains("exit=0"), "{out}");
    assert!(forced.contains("thin pool other-thinpool: data 0.0%"), "{out}");
}

#[test]
fn on_a_host_without_device_mapper_the_pool_and_its_module_are_reported_with_their_fix() {
    require_e2e!();
    if hearth_e2e::kernel_has("dm_thin_pool") {
        eprintln!("skipped: this host's kernel has dm_thin_pool (the test-host guest covers it)");
        return;
    }
    let d = Daemon::start();
    let check = d.ok(&["host", "check"]);
    let row =
        |name: &str| check.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_owned();
    // Missing, or (where the kernel's module lists are not on the host) not known: either way
    // not OK, and with the fix.
    let module = row("module dm_thin_pool");
    assert!(!module.contains(" OK ") && module.contains("fix: "), "{check}");
    let pool = row("thin pool");
    assert!(pool.contains("fix: hearth host provision --dev"), "{check}");
    for m in ["macvtap", "vhost_vsock"].into_iter().filter(|m| !hearth_e2e::kernel_has(m)) {
        let module = row(&format!("module {m}"));
        assert!(!module.contains(" OK ") && module.contains("fix: "), "{m}:\n{check}");
    }
    let out =
        d.hearth(&["host", "provision", "--dev", "--root", d.root.path().to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("no module dm_thin_pool"), "{err}");
    assert!(!d.root.path().join("pool").exists(), "nothing made");
}

#[test]
fn vm_disks_on_the_pool_are_thin_snapshots_of_one_base_and_go_with_their_vms() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhostd:1", true);
    let script = format!(
        "{p} set -e; \
         mkdir -p $R/pool; dd if=/dev/urandom of=$R/pool/data bs=1M count=256 2>/dev/null; \
         dd if=/dev/zero of=$R/pool/data bs=1M seek=4095 count=1 2>/dev/null; \
         $H host provision --dev --root $R --data-size 4G --metadata-size 64M >/dev/null; \
         daemon --thin-pool hearth-thinpool; import_kernel; \
         $H image import /demo --name demo:1 >/dev/null; \
         for n in a b c; do $H create --name $n --network none --size 1G demo:1 >/dev/null; \
           $H start $n >/dev/null 2>&1 || true; done; \
         echo '== devices'; cat /sys/block/dm-*/dm/name; \
         echo '== sizes'; for n in /sys/block/dm-*; do echo $(cat $n/dm/name) $(cat $n/size); done; \
         echo '== state'; cat $R/pool/devices.json; echo; \
         echo '== check'; $H host check --root $R | grep '^thin pool'; \
         echo '== fs'; dumpe2fs -h $(dev_of $(id_of a)) 2>/dev/null | grep -E '^Block (count|size):'; \
         $H rm a b c >/dev/null; \
         E=$($H create --name e --network none --size 1G demo:1); $H start e >/dev/null 2>&1 || true; \
         dd if=/dev/urandom of=$(dev_of $E) bs=4096 seek=$((512*256)) count=1 conv=fsync 2>/dev/null; \
         echo '== reused'; dd if=$(dev_of $E) bs=4096 skip=$((512*256+1)) count=15 2>/dev/null | md5sum; \
         dd if=/dev/zero bs=4096 count=15 2>/dev/null | md5sum; \
         $H rm e >/dev/null; $H image rm demo:1 >/dev/null; \
         echo '== after'; cat /sys/block/dm-*/dm/name; cat $R/pool/devices.json; echo; \
         echo '== log'; cat /tmp/hearthd.log",
        p = prelude()
    );
    let (out, code) = in_test_host(&d, "testhostd:1", "1G", "3G", &script);
    assert_eq!(code, 0, "{out}");
    let section = |name: &str| section(&out, name);
    let devices = section("devices");
    let vms: Vec<&str> = devices.lines().filter(|l| l.starts_with("hearth-vm-")).collect();
    assert_eq!(vms.len(), 3, "three thin devices, one per VM:\n{out}");
    assert!(devices.lines().any(|l| l == "hearth-thinpool"), "{out}");
    assert!(
        !devices.contains("hearth-base-"),
        "the base is written once and left inactive:\n{out}"
    );
    // Each VM's disk is its --size (1 GiB, in 512-byte sectors), whatever the base's.
    let sizes = section("sizes");
    for l in sizes.lines().filter(|l| l.starts_with("hearth-vm-")) {
        assert!(l.ends_with(" 2097152"), "{l}\n{out}");
    }
    let state: serde_json::Value =
        serde_json::from_str(section("state").trim()).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let bases = state["bases"].as_object().expect("bases");
    assert_eq!(bases.len(), 1, "one base for the image:\n{out}");
    let base_id = bases.values().next().expect("base")["id"].as_u64();
    let vm_ids: std::collections::BTreeSet<u64> = state["vms"]
        .as_object()
        .expect("vms")
        .values()
        .map(|v| {
            assert_eq!(v["ready"], true, "{v}");
            v["id"].as_u64().expect("id")
        })
        .collect();
    assert_eq!(vm_ids.len(), 3, "distinct thin ids:\n{out}");
    assert!(!vm_ids.contains(&base_id.expect("id")));
    assert!(section("check").contains("hearth-thinpool: data"), "{out}");
    // The filesystem in the snapshot was grown to fill it (the base's is the image's size).
    let fs = section("fs");
    let field = |name: &str| -> u64 {
        let line = fs.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().last().and_then(|n| n.parse().ok()).expect("a number")
    };
    assert_eq!(field("Block count:") * field("Block size:"), 1 << 30, "{out}");
    // The pool's data file held data before (as a reused disk does): a VM's first small write
    // into a fresh block leaves the rest of the block zeroed, not showing what was there.
    let reused = section("reused");
    let reused: Vec<&str> = reused.lines().collect();
    assert!(
        reused.len() == 2 && reused[0] == reused[1],
        "the rest of the block reads as zeros:\n{out}"
    );
    let after = section("after");
    assert!(!after.contains("hearth-vm-"), "rm removed every VM's thin device:\n{out}");
    assert!(after.contains("\"vms\": {}"), "and their entries:\n{out}");
    assert!(after.contains("\"bases\": {}"), "the image's base goes with the image:\n{out}");
}

/// A crash of hearthd half way through making disks, and a reboot of the host: the test host
/// runs the same script on two boots. First boot: VMs on a pool over files; a marker written
/// into one VM's disk; hearthd killed; one VM's entry marked half made and another VM's record
/// removed, as a crash between the steps would leave them; hearthd started again. Second boot:
/// hearthd brings the pool back and the marked disk still holds its marker.
#[test]
fn the_pool_comes_back_after_a_reboot_and_a_crash_leaves_no_orphan_device() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhostr:1", true);
    let script = format!(
        "{p} \
         if [ ! -e $R/booted-once ]; then \
           echo '== boot1'; \
           $H host provision --dev --root $R --data-size 4G --metadata-size 64M >/dev/null; \
           daemon --thin-pool hearth-thinpool; import_kernel; \
           $H image import /demo --name demo:1 >/dev/null; \
           for n in a b c; do $H create --name $n --network none --size 1G demo:1 >/dev/null; \
             $H start $n >/dev/null 2>&1 || true; done; \
           A=$(id_of a); B=$(id_of b); C=$(id_of c); \
           echo marker-of-a | dd of=$(dev_of $A) bs=1 seek=$((900*1024*1024)) conv=fsync 2>/dev/null; \
           kill -9 $HD; sleep 0.5; \
           sed -i \"/\\\"$B\\\"/,/}}/ s/\\\"ready\\\": true/\\\"ready\\\": false/\" $R/pool/devices.json; \
           rm -rf $R/vms/$C; \
           daemon --thin-pool hearth-thinpool; \
           echo \"== recovered\"; cat $R/pool/devices.json; echo; cat /sys/block/dm-*/dm/name; \
           echo \"== names $A $B $C\"; \
           for t in 0.05 0.15 0.3 0.5 0.8 1.2 2; do \
             ( $H run -d --no-wait --network none --size 1G --name k$t demo:1 >/dev/null 2>&1 & ); \
             sleep $t; kill -9 $HD; sleep 0.2; daemon --thin-pool hearth-thinpool; done; \
           echo '== chaos state'; cat $R/pool/devices.json; echo; \
           echo '== chaos records'; for f in $R/vms/*/record.json; do \
             echo $(basename $(dirname $f)) $(grep -o '\"disk_path\": *\"[^\"]*\"' $f | cut -d'\"' -f4); done; \
           echo '== chaos active'; cat /sys/block/dm-*/dm/name; \
           touch $R/booted-once; \
         else \
           echo '== boot2'; echo '== pool before'; cat /sys/block/dm-*/dm/name 2>/dev/null; daemon --thin-pool hearth-thinpool; \
           echo '== pool after'; cat /sys/block/dm-*/dm/name; \
           $H start a >/dev/null 2>&1 || true; \
           A=$(id_of a); echo \"== marker\"; \
           dd if=$(dev_of $A) bs=1 skip=$((900*1024*1024)) count=11 2>/dev/null; echo; \
           echo '== end'; \
         fi",
        p = prelude()
    );
    let run = d.hearth(&[
        "run",
        "-d",
        "--no-wait",
        "--name",
        "th",
        "--memory",
        "1G",
        "--size",
        "3G",
        "--network",
        "none",
        "testhostr:1",
        "sh",
        "-c",
        &script,
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    d.ok(&["wait", "th"]);
    let first = d.ok(&["logs", "th"]);
    let after = section;
    let names = after(&first, "names");
    let ids: Vec<&str> = names.split_whitespace().collect();
    assert_eq!(ids.len(), 3, "{first}");
    let recovered = after(&first, "recovered");
    assert!(recovered.contains(&format!("hearth-vm-{}", ids[0])), "a's disk stays:\n{first}");
    for (what, id) in [("half made", ids[1]), ("without a record", ids[2])] {
        assert!(!recovered.contains(id), "the disk {what} is gone, device and entry:\n{first}");
    }
    // hearthd killed at several points of creates: every thin device and entry belongs to a VM
    // whose record exists, and every record whose disk was made has its entry.
    let state: serde_json::Value = serde_json::from_str(after(&first, "chaos state").trim())
        .unwrap_or_else(|e| panic!("{e}:\n{first}"));
    let entries: Vec<&String> = state["vms"].as_object().expect("vms").keys().collect();
    let records = after(&first, "chaos records");
    let records: Vec<Vec<&str>> = records
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| !r.is_empty())
        .collect();
    assert!(records.len() > 3, "some of the creates made a record before the kill:\n{first}");
    for e in &entries {
        assert!(records.iter().any(|r| r[0] == e.as_str()), "thin entry {e} has no VM:\n{first}");
        assert_eq!(state["vms"][e.as_str()]["ready"], true, "a half-made entry stayed:\n{first}");
    }
    for r in records.iter().filter(|r| r.len() > 1) {
        assert!(entries.iter().any(|e| e.as_str() == r[0]), "VM {} lost its disk:\n{first}", r[0]);
    }
    for name in after(&first, "chaos active").lines().filter_map(|l| l.strip_prefix("hearth-vm-")) {
        assert!(entries.iter().any(|e| e.as_str() == name), "orphan device {name}:\n{first}");
    }

    // The host reboots: the same VM boots again.
    d.ok(&["start", "--no-wait", "th"]);
    d.ok(&["wait", "th"]);
    let second = d.ok(&["logs", "th"]);
    let boot2 = second.split("== boot2").nth(1).unwrap_or_default().to_owned();
    assert!(
        !after(&boot2, "pool before").contains("hearth-thinpool"),
        "a reboot loses the pool's device:\n{second}"
    );
    assert!(
        after(&boot2, "pool after").contains("hearth-thinpool"),
        "hearthd brings it back:\n{second}"
    );
    assert!(after(&boot2, "marker").contains("marker-of-a"), "the VM's disk is intact:\n{second}");
    d.ok(&["rm", "-f", "th"]);
}

/// A VM on `--network macvtap:IFACE` in the test host (whose kernel has macvtap), on the guest's
/// own NIC: hearthd loads the module, makes the macvtap with the VM's MAC on that interface and
/// hands QEMU its `/dev/tapN` as descriptor 3 (a stand-in QEMU records what it was given, then
/// exits: a nested guest would be TCG in TCG); the macvtap stays while the VM exists and goes
/// with it.
#[test]
fn a_macvtap_is_made_on_the_hosts_nic_with_the_vms_mac_handed_to_qemu_and_removed_with_the_vm() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhost-mv:1", true);
    let p = prelude();
    let script = format!(
        "{p} printf '#!/bin/sh\\nls -l /proc/$$/fd/3 > /tmp/fd3; echo \"$*\" > /tmp/args; exit 1\\n' > /tmp/qemu; \
         chmod +x /tmp/qemu; NIC=$(ls /sys/class/net | grep -v '^lo$' | head -1); \
         QEMU=/tmp/qemu daemon; import_kernel; $H image import /demo --name demo:1 >/dev/null; \
         echo '== nic'; echo $NIC $(cat /sys/class/net/$NIC/ifindex); \
         $H create --name m --size 1G --network macvtap:$NIC demo:1 >/dev/null; $H start m >/dev/null 2>&1; \
         echo '== id'; id_of m; \
         echo '== link'; for l in /sys/class/net/ht*; do echo ${{l##*/}} $(cat $l/address) $(cat $l/iflink) $(cat $l/ifindex) $(ls $l | grep -c '^macvtap$'); done; \
         echo '== fd3'; cat /tmp/fd3; echo '== args'; grep -o 'tap,id=net0,[^ ]*' /tmp/args; \
         $H start m >/dev/null 2>&1; echo '== kept'; ls /sys/class/net | grep -c '^ht'; \
         $H rm -f m >/dev/null; echo '== after'; ls /sys/class/net | grep -c '^ht'; \
         $H create --name o --size 1G --network macvtap:$NIC demo:1 >/dev/null; $H start o >/dev/null 2>&1; \
         O=$(id_of o); echo '== before restart'; ls /sys/class/net | grep -c '^ht'; kill -9 $HD; rm -f $R/vms/$O/record.json; QEMU=/tmp/qemu daemon; \
         echo '== orphan'; ls /sys/class/net | grep -c '^ht'; \
         $H create --name s --size 1G --network macvtap:$NIC --ip 192.168.77.5/24 --gateway 192.168.77.1 demo:1 >/dev/null; \
         echo '== static'; $H inspect s | grep -A6 'lan' | tr -d ' \\n'; echo; echo '== end'"
    );
    let out = d.hearth(&[
        "run",
        "--rm",
        "--memory",
        "1G",
        "--size",
        "3G",
        "--network",
        "user",
        "testhost-mv:1",
        "sh",
        "-c",
        &script,
    ]);
    let out = text(&out.stdout);
    let section = |name: &str| section(&out, name);
    let nic = section("nic");
    let first = nic.lines().next().unwrap_or_default();
    let (nic_name, nic_index) = first.split_once(' ').unwrap_or_else(|| panic!("{out}"));
    let id: hearth_types::VmId = section("id").trim().parse().unwrap_or_else(|_| panic!("{out}"));
    let mac = hearth_types::net::mac_for(&id);
    let link = section("link");
    let fields: Vec<&str> = link.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "one macvtap:\n{out}");
    assert_eq!(fields[1], mac.as_str(), "with the VM's MAC:\n{out}");
    assert_eq!(fields[2], nic_index, "on {nic_name}:\n{out}");
    assert_eq!(fields[4], "1", "a macvtap (its tap device in sysfs):\n{out}");
    assert!(
        section("fd3").trim_end().ends_with(&format!("/dev/tap{}", fields[3])),
        "QEMU is handed the macvtap's /dev/tapN as descriptor 3:\n{out}"
    );
    assert!(section("args").contains("tap,id=net0,fd=3,vhost=off"), "{out}");
    assert_eq!(section("kept").trim(), "1", "a second start reuses it:\n{out}");
    assert_eq!(section("after").trim(), "0", "removed with the VM:\n{out}");
    // A macvtap whose VM's record is gone (a crash between them) is removed at the next start.
    assert_eq!(section("before restart").trim(), "1", "{out}");
    assert_eq!(section("orphan").trim(), "0", "no orphan macvtap after a restart:\n{out}");
    // A static address on the LAN is the VM's, with its gateway.
    let lan = section("static");
    assert!(
        lan.contains("\"address\":\"192.168.77.5\"")
            && lan.contains("\"prefix\":24")
            && lan.contains("\"gateway\":\"192.168.77.1\""),
        "{out}"
    );
}

/// `provision --all` in the test host (no apt, no systemd, no nftables there: those steps say
/// why they are skipped; the network is left out with --no-network): modules loaded and listed
/// for boot, the sysctl set and persisted, the dev pool made, hearthd's config and unit
/// written; a second run does nothing; hearthd started from the config file uses what it says,
/// and a config with a key that is not a flag is refused by name.
#[test]
fn provision_all_sets_up_the_host_and_hearthd_runs_from_the_config_it_wrote() {
    require_e2e!();
    let d = Daemon::start();
    d.import_kernel();
    test_host_image(&d, "testhost-all:1", true);
    let p = prelude();
    let hd = hearth_e2e::test_host::hearthd_bin().display().to_string();
    let script = format!(
        "{p} echo 0 > /proc/sys/net/ipv4/ip_forward; \
         P=\"$H host provision --all --root $R --data-size 1G --metadata-size 64M --grpc-address 127.0.0.1:9090 --insecure --no-network --parent-iface eth0\"; \
         echo '== plan'; $P --dry-run 2>&1; test -e /etc/hearth/hearthd.toml || echo 'no config yet'; \
         echo '== first'; $P 2>&1; echo \"exit=$?\"; \
         echo '== second'; $P 2>&1; echo \"exit=$?\"; \
         echo '== config'; cat /etc/hearth/hearthd.toml; \
         echo '== boot files'; cat /etc/modules-load.d/hearth.conf /etc/sysctl.d/90-hearth.conf; \
         grep ExecStart /etc/systemd/system/hearthd.service; echo \"ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)\"; \
         echo '== daemon'; daemon --config /etc/hearth/hearthd.toml; \
         for i in $(seq 100); do grep -q 'serving the Flintlock' /tmp/hearthd.log && break; sleep 0.1; done; grep -o 'serving the Flintlock API.*\\|VM root disks are thin snapshots.*' /tmp/hearthd.log | cut -c1-60; \
         echo '== info'; $H info; kill $HD; \
         echo '== check'; $H host check | grep '^thin pool'; \
         echo 'thin_pol = \"x\"' > /tmp/bad.toml; echo '== bad'; {hd} --config /tmp/bad.toml 2>&1; echo \"exit=$?\"; \
         echo '== end'"
    );
    let (out, code) = in_test_host(&d, "testhost-all:1", "1G", "3G", &script);
    assert_eq!(code, 0, "{out}");
    let section = |name: &str| section(&out, name);
    let plan = section("plan");
    for step in [
        "skipped installing qemu-system-x86",
        "would load the kernel modules loop, dm_thin_pool, macvtap",
        "would set net.ipv4.ip_forward = 1",
        "would write /etc/modules-load.d/hearth.conf",
        "would create the thin pool hearth-thinpool",
        "would write /etc/hearth/hearthd.toml",
        "would write /etc/systemd/system/hearthd.service",
        "skipped starting hearthd: systemd is not running here",
        "no config yet",
    ] {
        assert!(plan.contains(step), "the plan says {step:?}:\n{out}");
    }
    let first = section("first");
    assert!(first.contains("did load the kernel modules") && first.contains("exit=0"), "{out}");
    assert!(first.contains("did write /etc/hearth/hearthd.toml"), "{out}");
    let second = section("second");
    assert!(!second.contains("did ") && second.contains("nothing changed"), "{out}");
    let config: toml::Table = section("config").parse().unwrap_or_else(|e| panic!("{e}:\n{out}"));
    assert_eq!(config["thin-pool"].as_str(), Some("hearth-thinpool"), "{out}");
    assert_eq!(config["flintlock-listen"].as_str(), Some("127.0.0.1:9090"), "{out}");
    assert_eq!(config["parent-iface"].as_str(), Some("eth0"), "{out}");
    assert_eq!(config["insecure"].as_bool(), Some(true), "{out}");
    let boot = section("boot files");
    for line in [
        "dm_thin_pool",
        "macvtap",
        "net.ipv4.ip_forward = 1",
        "--config /etc/hearth/hearthd.toml",
        "ip_forward=1",
    ] {
        assert!(boot.contains(line), "{line}:\n{out}");
    }
    let daemon = section("daemon");
    assert!(
        daemon.contains("serving the Flintlock API"),
        "from the config's flintlock-listen:\n{out}"
    );
    assert!(daemon.contains("VM root disks are thin snapshots"), "from its thin-pool:\n{out}");
    // `hearth info` reports the daemon's pool and its use, and the macvtap interface.
    let info = section("info");
    for line in [
        "VMs: 0 (running 0, stopped 0)",
        "Storage: hearth-thinpool: data 0.0% used of 1.0 GiB, metadata",
        "macvtap interface: eth0",
    ] {
        assert!(info.contains(line), "{line}:\n{out}");
    }
    assert!(!info.contains("WARNING"), "{out}");
    // `host check` reports the pool hearthd's config names, as hearthd's.
    let check = section("check");
    assert!(
        check.contains("hearth-thinpool") && check.contains("(hearthd's, from its config)"),
        "{out}"
    );
    let bad = section("bad");
    assert!(bad.contains("unknown key \"thin_pol\"") && bad.contains("exit=2"), "{out}");
}

/// `provision --all` on a Debian host with systemd (debootstrapped, booted with its own init;
/// no network: its apt's only source is a local repository holding nftables): the missing
/// package installed with apt, modules and sysctls, the dev pool, the bridge with its NAT, the
/// config and a hearthd unit enabled and started by systemd, whose daemon serves the pool; a
/// second run changes nothing and leaves the service running as it was.
#[test]
fn provision_all_on_a_debian_host_installs_what_is_missing_and_runs_hearthd_under_systemd() {
    require_e2e!();
    if hearth_e2e::which("debootstrap").is_none() {
        eprintln!("skipped: debootstrap is not installed (cargo xtask deps installs it)");
        return;
    }
    let d = Daemon::start();
    d.import_kernel();
    debian_test_host_image(&d, "testhost-debian:1");
    let args = ["--memory", "1G", "--size", "4G", "--network", "none"];
    d.ok(&[&["run", "-d", "--name", "deb"][..], &args, &["testhost-debian:1", "/sbin/init"]]
        .concat());
    // The agent answers as soon as the image's init is exec'd; systemd takes a while to be.
    let wait = "for i in $(seq 600); do [ -S /run/systemd/private ] && break; sleep 0.1; done; \
                systemctl is-system-running --wait";
    let booted = d.hearth(&["exec", "deb", "--", "sh", "-c", wait]);
    let said = text(&booted.stdout);
    assert!(
        matches!(said.trim(), "running" | "degraded"),
        "systemd came up: {said}{}\n{}",
        text(&booted.stderr),
        d.ok(&["logs", "deb"])
    );
    let h = hearth_bin().display().to_string();
    let script = format!(
        "H={h}; R=/var/lib/hearth; export HEARTH_HOST=unix://$R/hearthd.sock; \
         P=\"$H host provision --all --data-size 1G --metadata-size 64M --grpc-address 127.0.0.1:9090 --insecure\"; \
         echo '== plan'; $P --dry-run 2>&1; \
         echo '== first'; $P 2>&1; echo \"exit=$?\"; \
         echo '== nft'; command -v nft; \
         echo '== service'; systemctl is-enabled hearthd; systemctl is-active hearthd; \
         for i in $(seq 150); do [ -S $R/hearthd.sock ] && break; sleep 0.2; done; \
         echo '== info'; $H info 2>&1; \
         echo '== pid'; systemctl show -p MainPID --value hearthd; \
         echo '== second'; $P 2>&1; echo \"exit=$?\"; \
         echo '== pid after'; systemctl show -p MainPID --value hearthd; \
         echo '== bridge'; ip -o link show hearth0; \
         echo '== end'"
    );
    let out = d.hearth(&["exec", "deb", "--", "sh", "-c", &script]);
    let out = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let section = |name: &str| section(&out, name);
    let plan = section("plan");
    for step in [
        "would install the packages nftables (apt-get)",
        "would create the thin pool hearth-thinpool",
        "would create the bridge hearth0",
        "would write /etc/systemd/system/hearthd.service",
        "would enable and (re)start the hearthd service (systemctl)",
    ] {
        assert!(plan.contains(step), "the plan says {step:?}:\n{out}");
    }
    let first = section("first");
    for step in [
        "did install the packages nftables (apt-get)",
        "did create the bridge hearth0",
        "did enable and (re)start the hearthd service (systemctl)",
        "exit=0",
    ] {
        assert!(first.contains(step), "{step:?}:\n{out}");
    }
    assert!(section("nft").trim().ends_with("/nft"), "nftables is installed:\n{out}");
    assert_eq!(
        section("service").split_whitespace().collect::<Vec<_>>(),
        ["enabled", "active"],
        "{out}"
    );
    let info = section("info");
    assert!(
        info.contains("Storage: hearth-thinpool: data 0.0% used of 1.0 GiB"),
        "systemd's hearthd runs from the config, on the pool:\n{out}"
    );
    let second = section("second");
    assert!(
        !second.contains("did ") && second.contains("exit=0"),
        "a second run changes nothing:\n{out}"
    );
    let pid = section("pid");
    assert!(pid.trim().parse::<u32>().is_ok_and(|p| p > 0), "{out}");
    assert_eq!(
        pid.trim(),
        section("pid after").trim(),
        "and leaves the service running as it was:\n{out}"
    );
    assert!(section("bridge").contains("hearth0"), "{out}");
    d.ok(&["rm", "-f", "deb"]);
}
