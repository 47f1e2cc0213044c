//! Every row of the reconcile table (docs/design.md) and the crash windows, driven through the
//! ports' fakes with tokio's clock paused: no root, VMM or kernel needed.

use std::time::Duration;

use hearth_core::ports::VmRepository;
use hearth_core::{ErrorKind, Options};
use hearth_testkit::fakes::{harness, Harness, Launch};
use hearth_testkit::record;
use hearth_types::{Desired, PortMapping, Protocol, VmId, VmRecord, VmState};

async fn until(
    h: &Harness,
    id: &VmId,
    what: &str,
    cond: impl Fn(Option<&VmRecord>) -> bool,
) -> Option<VmRecord> {
    h.until(id, what, cond).await
}

fn state(r: Option<&VmRecord>) -> Option<VmState> {
    r.map(|r| r.status.state)
}

async fn run(h: &Harness, n: u8) -> VmRecord {
    h.run(n).await
}

/// A record as a crash left it, its disks made.
fn stored(h: &Harness, n: u8, desired: Desired, state: VmState) -> VmRecord {
    let rec = record(n, desired, state);
    h.host.put(rec.clone());
    h.host.with_disks(&rec.spec.id);
    rec
}

/// One reconcile that must succeed and leave the VM.
async fn reconciled(h: &Harness, id: &VmId) -> VmRecord {
    h.reconciler.reconcile(id, Options::default()).await.expect("reconcile").expect("record")
}

#[tokio::test(start_paused = true)]
async fn a_new_vm_gets_its_disks_a_vmm_and_becomes_ready() {
    let h = harness();
    let rec = run(&h, 1).await;
    assert_eq!(rec.status.state, VmState::Starting);
    let pid = rec.status.pid.expect("a pid");
    assert_eq!(h.vmm.running(), [(pid, h.host.vm_dir(&rec.spec.id))]);
    assert!(!h.vmm.paused(pid), "the guest's CPUs were started once its console was captured");
    let launch = &h.vmm.launches()[0];
    assert!(
        launch.root_disk.ends_with("disk.img") && launch.kernel.ends_with("vmlinuz"),
        "{launch:?}"
    );
    assert_eq!(rec.status.boots, 1);
    assert!(rec.status.vmm_uid.is_some(), "a uid of its own");
    assert_eq!(h.host.uid_claims(), 0, "the launch's uid claim became the record's");
    let ready = until(&h, &rec.spec.id, "ready", |r| state(r) == Some(VmState::Running))
        .await
        .expect("record");
    let boot = ready.status.boot.expect("boot timings");
    assert_eq!((boot.kernel_to_init_ms, boot.init_to_ready_ms), (300, 150));
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_never_reports_ready_stays_starting() {
    let h = harness();
    h.host.never_ready();
    let rec = run(&h, 2).await;
    tokio::time::sleep(hearth_core::READY_TIMEOUT + Duration::from_secs(5)).await;
    let now = h.host.record(&rec.spec.id).expect("record");
    assert_eq!(now.status.state, VmState::Starting);
    assert!(now.status.pid.is_some() && now.status.ready_at.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failed_launch_is_recorded_and_gives_back_what_it_claimed() {
    let h = harness();
    h.vmm.script([Launch::Fail("qemu failed to start: could not open disk.img".into())]);
    let mut rec = record(3, Desired::Running, VmState::Created);
    rec.spec.ports = vec![PortMapping {
        host_ip: "127.0.0.1".into(),
        host_port: 8080,
        guest_port: 80,
        protocol: Protocol::Tcp,
    }];
    h.host.put(rec.clone());
    let e = h.reconciler.reconcile(&rec.spec.id, Options::default()).await.expect_err("fails");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    let now = h.host.record(&rec.spec.id).expect("record");
    assert_eq!((now.status.state, now.desired), (VmState::Failed, Desired::Stopped));
    assert!(now.status.reason.contains("could not open disk.img"), "{}", now.status.reason);
    assert_eq!((h.host.port_claims(), h.host.uid_claims()), (0, 0), "nothing stays claimed");
    assert!(h.vmm.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_disk_that_cannot_be_made_fails_the_vm_before_any_launch() {
    let h = harness();
    h.host.fail_disks("image demo:1 was removed; pull it again");
    let rec = record(4, Desired::Running, VmState::Created);
    h.host.put(rec.clone());
    let e = h.reconciler.reconcile(&rec.spec.id, Options::default()).await.expect_err("fails");
    assert!(e.message.contains("pull it again"));
    assert_eq!(h.host.record(&rec.spec.id).expect("record").status.state, VmState::Failed);
    assert!(h.vmm.launches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_console_that_cannot_be_captured_undoes_the_launch() {
    let h = harness();
    h.host.fail_console();
    let rec = record(5, Desired::Running, VmState::Created);
    h.host.put(rec.clone());
    let e = h.reconciler.reconcile(&rec.spec.id, Options::default()).await.expect_err("fails");
    assert!(e.message.contains("capturing the VM's console"), "{e}");
    assert!(h.vmm.running().is_empty(), "the half-started VMM was killed");
    assert_eq!(h.vmm.cleaned(), [h.host.vm_dir(&rec.spec.id)], "and its files removed");
    assert_eq!(h.host.uid_claims(), 0);
    assert_eq!(h.host.record(&rec.spec.id).expect("record").status.state, VmState::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_workload_that_exits_stops_its_vm_with_its_code() {
    let h = harness();
    let rec = run(&h, 6).await;
    h.host.guest_exit(&rec.spec.id, 3);
    h.vmm.exit(rec.status.pid.expect("pid"));
    let done = until(&h, &rec.spec.id, "stopped", |r| state(r) == Some(VmState::Stopped))
        .await
        .expect("record");
    assert_eq!(
        (done.status.exit_code, done.status.pid, done.desired),
        (Some(3), None, Desired::Stopped)
    );
    assert!(h.host.released().contains(&(rec.spec.id.clone(), false)), "its forwards went with it");
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_dies_is_recorded_not_relaunched() {
    let h = harness();
    let rec = run(&h, 7).await;
    h.vmm.exit(rec.status.pid.expect("pid"));
    let done = until(&h, &rec.spec.id, "stopped", |r| state(r) == Some(VmState::Stopped))
        .await
        .expect("record");
    assert_eq!(done.status.exit_code, None);
    assert!(done.status.reason.contains("unexpectedly"), "{}", done.status.reason);
    assert_eq!(h.vmm.launches().len(), 1, "not launched again");
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_says_why_it_died_has_that_as_the_reason() {
    let h = harness();
    let rec = run(&h, 7).await;
    h.vmm.says_when_it_ends("Shutting down VM after intercepting signal 7, code 0.");
    h.vmm.exit(rec.status.pid.expect("pid"));
    let done = until(&h, &rec.spec.id, "stopped", |r| state(r) == Some(VmState::Stopped))
        .await
        .expect("record");
    assert_eq!(
        done.status.reason,
        "vmm exited unexpectedly: Shutting down VM after intercepting signal 7, code 0."
    );
}

#[tokio::test(start_paused = true)]
async fn an_auto_remove_vm_goes_when_its_workload_ends() {
    let h = harness();
    let mut rec = record(8, Desired::Running, VmState::Created);
    rec.spec.auto_remove = true;
    h.host.put(rec.clone());
    let rec = reconciled(&h, &rec.spec.id).await;
    h.host.guest_exit(&rec.spec.id, 0);
    h.vmm.exit(rec.status.pid.expect("pid"));
    until(&h, &rec.spec.id, "removed", |r| r.is_none()).await;
    assert_eq!(h.host.removed(), std::slice::from_ref(&rec.spec.id));
}

async fn stop(h: &Harness, rec: &VmRecord, timeout: Duration) -> VmRecord {
    let opts = Options { stop_timeout: timeout };
    let done = h
        .reconciler
        .set_desired(&rec.spec.id, Desired::Stopped, opts)
        .await
        .expect("stop")
        .expect("record");
    assert_eq!(done.desired, Desired::Stopped, "the intent is persisted");
    done
}

#[tokio::test(start_paused = true)]
async fn stop_asks_the_guest_first() {
    let h = harness();
    let rec = run(&h, 9).await;
    let done = stop(&h, &rec, Duration::from_secs(10)).await;
    assert_eq!(done.status.state, VmState::Stopped);
    assert_eq!(
        done.status.exit_code,
        Some(143),
        "the workload was stopped by hearth-init's SIGTERM"
    );
    assert!(h.vmm.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn stop_kills_a_guest_that_ignores_every_request_after_the_timeout() {
    let h = harness();
    h.host.ignore_shutdown();
    h.vmm.stubborn();
    let rec = run(&h, 10).await;
    let started = tokio::time::Instant::now();
    let done = stop(&h, &rec, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "killed after the timeout, took {took:?}"
    );
    assert_eq!(
        (done.status.state, done.status.exit_code, done.status.reason.as_str()),
        (VmState::Stopped, Some(137), "stopped")
    );
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_exits_during_a_stop_is_recorded_once() {
    let h = harness();
    h.host.ignore_shutdown();
    h.vmm.stubborn();
    let rec = run(&h, 11).await;
    let pid = rec.status.pid.expect("pid");
    let vmm = h.vmm.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        vmm.exit(pid);
    });
    let done = stop(&h, &rec, Duration::from_secs(30)).await;
    assert_eq!(done.status.state, VmState::Stopped);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = h.host.record(&rec.spec.id).expect("record");
    assert_eq!(
        (after.status.state, after.status.finished_at),
        (VmState::Stopped, done.status.finished_at),
        "the exit watcher changed nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn delete_kills_the_vmm_and_removes_exactly_what_exists() {
    let h = harness();
    let rec = run(&h, 12).await;
    let mut gone = h.host.record(&rec.spec.id).expect("record");
    gone.desired = Desired::Deleted;
    h.host.put(gone);
    assert!(h.reconciler.reconcile(&rec.spec.id, Options::default()).await.expect("rm").is_none());
    assert!(h.vmm.running().is_empty());
    assert_eq!(h.host.removed(), std::slice::from_ref(&rec.spec.id));
    assert!(h.host.released().contains(&(rec.spec.id.clone(), true)), "its tap and forwards went");
    // Deleting what is gone is a no-op.
    assert!(h
        .reconciler
        .reconcile(&rec.spec.id, Options::default())
        .await
        .expect("again")
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_launch_and_saving_the_pid_is_adopted_not_relaunched() {
    let h = harness();
    // The record says starting, with no pid: the VMM started, the daemon died before saving it.
    let rec = stored(&h, 13, Desired::Running, VmState::Starting);
    let vmm = h.vmm.spawn_unrecorded(&h.host.vm_dir(&rec.spec.id), true);
    let now = reconciled(&h, &rec.spec.id).await;
    assert_eq!(now.status.pid, Some(vmm.pid), "adopted");
    assert!(h.vmm.launches().is_empty(), "never launched twice");
    assert!(!h.vmm.paused(vmm.pid), "a guest left paused before its start is started");
    until(&h, &rec.spec.id, "ready", |r| state(r) == Some(VmState::Running)).await;
}

#[tokio::test(start_paused = true)]
async fn recovery_finds_a_vmm_whose_files_do_not_name_it_yet() {
    let h = harness();
    let rec = stored(&h, 14, Desired::Running, VmState::Starting);
    let vmm = h.vmm.spawn_unrecorded(&h.host.vm_dir(&rec.spec.id), false);
    h.reconciler.recover().await;
    assert!(h.vmm.launches().is_empty(), "the scan found it: not launched twice");
    assert_eq!(h.host.record(&rec.spec.id).expect("record").status.pid, Some(vmm.pid));
}

#[tokio::test(start_paused = true)]
async fn recovery_re_adopts_live_vms_and_records_dead_ones() {
    let h = harness();
    let live = run(&h, 15).await;
    // A second VM that was running when the daemon went down, and whose VMM died meanwhile.
    let mut dead = record(16, Desired::Running, VmState::Running);
    dead.status.pid = Some(4242);
    dead.status.pid_start_time = Some(7);
    h.host.put(dead.clone());
    h.host.with_disks(&dead.spec.id);
    h.reconciler.recover().await;
    let d = h.host.record(&dead.spec.id).expect("record");
    assert_eq!((d.status.state, d.status.pid), (VmState::Stopped, None));
    assert!(h.host.attached(&live.spec.id), "the live VM's tap is put back on the bridge");
    // The live one is watched again: its exit is recorded.
    h.vmm.exit(live.status.pid.expect("pid"));
    until(&h, &live.spec.id, "stopped", |r| state(r) == Some(VmState::Stopped)).await;
    assert_eq!(h.vmm.launches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_no_record_naming_a_disk_that_is_gone() {
    let h = harness();
    // Stopped, its disk recorded, but gone (a half-made thin device a predecessor's crash left,
    // removed at start).
    let mut rec = record(18, Desired::Stopped, VmState::Stopped);
    rec.status.disk_path = Some("/dev/dm-2".into());
    h.host.put(rec.clone());
    h.reconciler.recover().await;
    let after = h.host.record(&rec.spec.id).expect("record");
    assert_eq!(after.status.disk_path, None);
    // Started again, it gets a disk and the record names it.
    h.reconciler.start(&rec.spec.id).await.expect("start");
    let started = h.host.record(&rec.spec.id).expect("record");
    assert!(started.status.disk_path.is_some(), "{:?}", started.status);
}

#[tokio::test(start_paused = true)]
async fn recovery_finishes_a_delete_saved_before_the_crash() {
    let h = harness();
    let rec = run(&h, 17).await;
    let mut gone = h.host.record(&rec.spec.id).expect("record");
    gone.desired = Desired::Deleted;
    h.host.put(gone);
    h.reconciler.recover().await;
    until(&h, &rec.spec.id, "removed", |r| r.is_none()).await;
    assert!(h.vmm.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_appeared_meanwhile_is_adopted_instead_of_a_second_launch() {
    let h = harness();
    h.vmm.script([Launch::AlreadyRunning]);
    let rec = run(&h, 18).await;
    assert_eq!(h.vmm.launches().len(), 1);
    assert_eq!(h.vmm.running().len(), 1, "one VMM");
    assert_eq!(rec.status.pid, Some(h.vmm.running()[0].0));
    assert_eq!(h.host.uid_claims(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_record_that_cannot_be_saved_after_a_launch_is_an_error_and_claims_are_given_back() {
    let h = harness();
    let rec = stored(&h, 19, Desired::Running, VmState::Created);
    h.host.fail_saves(true);
    let e = h.reconciler.reconcile(&rec.spec.id, Options::default()).await.expect_err("save fails");
    assert!(e.message.contains("No space left"), "{e}");
    assert_eq!((h.host.port_claims(), h.host.uid_claims()), (0, 0));
    // The VMM runs unrecorded; once saving works again it is adopted, not launched twice.
    h.host.fail_saves(false);
    let now = reconciled(&h, &rec.spec.id).await;
    assert_eq!(h.vmm.launches().len(), 1);
    assert_eq!(now.status.pid, Some(h.vmm.running()[0].0));
}

#[tokio::test(start_paused = true)]
async fn restarting_a_stopped_vm_reuses_its_disk_and_boots_again() {
    let h = harness();
    let rec = run(&h, 20).await;
    stop(&h, &rec, Duration::from_secs(10)).await;
    let mut again = h.host.record(&rec.spec.id).expect("record");
    again.desired = Desired::Running;
    h.host.put(again);
    let now = reconciled(&h, &rec.spec.id).await;
    assert_eq!(
        (now.status.state, now.status.boots, now.status.exit_code),
        (VmState::Starting, 2, None)
    );
    assert_eq!(h.vmm.launches().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn kill_signals_the_vmm_and_the_vm_stays_stopped() {
    let h = harness();
    let rec = run(&h, 21).await;
    let done = h.reconciler.kill(&rec.spec.id, 9).await.expect("kill").expect("record");
    assert_eq!(
        (done.status.state, done.desired, done.status.pid),
        (VmState::Stopped, Desired::Stopped, None)
    );
    assert!(h.vmm.running().is_empty());
    let e = h.reconciler.kill(&rec.spec.id, 9).await.expect_err("not running");
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
}

#[tokio::test(start_paused = true)]
async fn pause_freezes_a_running_guest_and_unpause_lets_it_run() {
    let h = harness();
    let rec = run(&h, 22).await;
    let id = &rec.spec.id;
    let pid = rec.status.pid.expect("pid");
    let e = h.reconciler.set_paused(id, false).await.expect_err("not paused yet");
    assert_eq!((e.kind, e.message()), (ErrorKind::FailedPrecondition, "VM vm22 is not paused"));
    until(&h, id, "running", |r| state(r) == Some(VmState::Running)).await;
    let paused = h.reconciler.set_paused(id, true).await.expect("pause");
    assert!(paused.status.paused && h.vmm.frozen(pid));
    assert!(h.host.record(id).expect("record").status.paused, "recorded");
    let e = h.reconciler.set_paused(id, true).await.expect_err("twice");
    assert_eq!(e.message(), "VM vm22 is already paused");
    let resumed = h.reconciler.set_paused(id, false).await.expect("unpause");
    assert!(!resumed.status.paused && !h.vmm.frozen(pid));
    assert_eq!(resumed.status.state, VmState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_is_not_running_cannot_be_paused() {
    let h = harness();
    let rec = stored(&h, 23, Desired::Stopped, VmState::Stopped);
    let e = h.reconciler.set_paused(&rec.spec.id, true).await.expect_err("stopped");
    assert_eq!(
        (e.kind, e.message()),
        (ErrorKind::FailedPrecondition, "VM vm23 is stopped: only a running VM can be paused")
    );
    let gone = VmId::from_bytes([99; 8]);
    let e = h.reconciler.set_paused(&gone, true).await.expect_err("no such VM");
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[tokio::test(start_paused = true)]
async fn a_paused_vm_is_resumed_to_stop_gracefully_and_its_exit_clears_the_pause() {
    let h = harness();
    let rec = run(&h, 24).await;
    until(&h, &rec.spec.id, "running", |r| state(r) == Some(VmState::Running)).await;
    h.reconciler.set_paused(&rec.spec.id, true).await.expect("pause");
    let started = tokio::time::Instant::now();
    let done = stop(&h, &rec, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "not killed after the timeout");
    assert_eq!(
        (done.status.state, done.status.exit_code, done.status.paused),
        (VmState::Stopped, Some(143), false),
        "the guest heard the stop (hearth-init's SIGTERM), and a stopped VM is not paused"
    );
}

#[tokio::test]
async fn the_fake_vmm_keeps_the_vmm_contract() {
    let h = harness();
    let spec = hearth_testkit::launch_spec(std::path::Path::new("/fake/vms/contract"));
    hearth_testkit::contract::vmm_contract(h.vmm.as_ref(), &spec).await;
}

#[tokio::test(start_paused = true)]
async fn changing_the_intent_of_a_vm_that_is_gone_is_none() {
    let h = harness();
    let id = record(22, Desired::Running, VmState::Created).spec.id;
    assert!(h
        .reconciler
        .set_desired(&id, Desired::Running, Options::default())
        .await
        .expect("no error")
        .is_none());
    assert!(h.vmm.launches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_vmm_gets_the_same_cloud_init_bundle_the_guest_seeds() {
    let h = harness();
    let mut rec = record(1, Desired::Running, VmState::Created);
    rec.spec.network = hearth_types::NetworkMode::Bridge;
    rec.spec.address = Some("10.61.0.9".parse().expect("ip"));
    rec.spec.cloud_init_network = Some("eth1".into());
    rec.spec.cloud_init.insert("user-data".into(), "#cloud-config\n".into());
    h.host.put(rec.clone());
    reconciled(&h, &rec.spec.id).await;
    let launched = h.vmm.launches().pop().expect("a launch");
    assert_eq!(launched.cloud_init["user-data"], "#cloud-config\n");
    let net = launched.cloud_init.get("network-config").expect("the generated network-config");
    let net = net.to_text_lossy();
    assert!(net.contains("10.61.0.9/16") && net.contains("eth1"), "{net}");
    assert!(net.contains("192.0.2.53"), "the host's resolvers, as on the config disk: {net}");
}
