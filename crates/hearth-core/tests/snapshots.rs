//! The snapshot use-cases against the ports' fakes: what is recorded, what a restore is given,
//! what is refused, and that the source VM runs on.

use hearth_core::{ErrorKind, FromSnapshot, NewVm, Options};
use hearth_testkit::fakes::{harness, Harness};
use hearth_types::{Desired, ImageConfig, NetworkMode, VmRecord, VmState};

/// A running VM of an image and kernel the host has.
async fn running(h: &Harness, _n: u8) -> VmRecord {
    let config = ImageConfig { cmd: vec!["sh".into()], ..Default::default() };
    h.host.add_image("busybox:1", config, 32 << 20, None);
    h.host.add_kernel("default");
    let new = NewVm {
        image: "busybox:1".into(),
        cpus: 1,
        memory_mib: 256,
        disk_bytes: 64 << 20,
        network: NetworkMode::User,
        ..Default::default()
    };
    let rec = h.reconciler.create(new).await.expect("create");
    h.reconciler.start(&rec.spec.id).await.expect("start");
    h.until(&rec.spec.id, "ready", |r| r.is_some_and(|r| r.status.state == VmState::Running))
        .await
        .expect("record")
}

fn from(snapshot: &str, name: &str) -> FromSnapshot {
    FromSnapshot { snapshot: snapshot.into(), name: Some(name.into()), ..Default::default() }
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_records_the_vm_and_a_restore_is_a_vm_of_its_own() {
    let h = harness();
    let src = running(&h, 1).await;
    let snap = h.reconciler.snapshot_create(&src.spec.id, "s1").await.expect("snapshot");
    assert_eq!(
        (snap.spec.id.clone(), snap.vmm_version.as_str()),
        (src.spec.id.clone(), "FakeVMM 1.0")
    );
    let pid = src.status.pid.expect("pid");
    assert!(!h.vmm.frozen(pid), "the source runs on after its snapshot");
    assert_eq!(h.reconciler.snapshots().expect("ls").len(), 1);

    let r = h.reconciler.create_from_snapshot(from("s1", "r1")).await.expect("restore");
    assert_ne!(r.spec.id, src.spec.id);
    assert_ne!(r.spec.mac(), src.spec.mac());
    assert_eq!(r.spec.snapshot.as_deref(), Some("s1"));
    assert!(r.status.restore_pending);
    assert_eq!(h.host.restored_disks(), [(r.spec.id.clone(), "s1".to_owned())]);

    // Its first start loads the snapshot's state; the guest is then told who it is.
    h.reconciler.start(&r.spec.id).await.expect("start");
    let launch = h.vmm.launches().last().cloned().expect("a launch");
    assert!(launch.incoming.is_some_and(|p| p.ends_with("s1/state")));
    let up = h
        .until(&r.spec.id, "ready", |x| x.is_some_and(|x| x.status.state == VmState::Running))
        .await
        .expect("record");
    assert!(!up.status.restore_pending && !up.status.identity_pending);
    let told = h.host.identities();
    assert_eq!(told.len(), 1);
    let (who, identity) = &told[0];
    assert_eq!((who, identity.hostname.as_str()), (&r.spec.id, "r1"));
    assert_eq!(identity.entropy.len(), 64);
    assert_eq!(identity.network.as_ref().map(|n| n.mac.clone()), Some(r.spec.mac()));

    // Started again, it boots.
    h.reconciler.set_desired(&r.spec.id, Desired::Stopped, Options::default()).await.expect("stop");
    h.reconciler.start(&r.spec.id).await.expect("start");
    assert!(h.vmm.launches().last().expect("launch").incoming.is_none());
}

#[tokio::test(start_paused = true)]
async fn snapshots_that_cannot_be_taken_or_restored_are_refused_by_reason() {
    let h = harness();
    let src = running(&h, 1).await;
    let e = h.reconciler.snapshot_create(&src.spec.id, "../x").await.expect_err("bad name");
    assert_eq!(e.kind, ErrorKind::Invalid);
    h.reconciler.snapshot_create(&src.spec.id, "s1").await.expect("snapshot");
    let e = h.reconciler.snapshot_create(&src.spec.id, "s1").await.expect_err("taken");
    assert_eq!(e.kind, ErrorKind::Conflict);

    let other_kernel = FromSnapshot { kernel: Some("other".into()), ..from("s1", "r") };
    let e = h.reconciler.create_from_snapshot(other_kernel).await.expect_err("another kernel");
    assert!(e.message.contains("kernel") && e.message.contains("--kernel"), "{e}");
    let e = h.reconciler.create_from_snapshot(from("nope", "r")).await.expect_err("missing");
    assert_eq!(e.kind, ErrorKind::NotFound);

    // A snapshot a VM still waits to be restored from stays.
    h.reconciler.create_from_snapshot(from("s1", "waiting")).await.expect("restore");
    let e = h.reconciler.snapshot_remove("s1").expect_err("in use");
    assert!(e.message.contains("waiting"), "{e}");

    // A stopped VM has no guest state to take.
    h.reconciler
        .set_desired(&src.spec.id, Desired::Stopped, Options::default())
        .await
        .expect("stop");
    let e = h.reconciler.snapshot_create(&src.spec.id, "s2").await.expect_err("stopped");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
}
