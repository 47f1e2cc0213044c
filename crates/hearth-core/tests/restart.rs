//! Restart policies on the ports' fakes (tokio's clock paused; the wall clock moved by hand):
//! which ends restart a VM under each policy, the back-off, the count of restarts in a row, a
//! crash loop, stops and starts by hand meanwhile, and what a daemon start does.

use std::time::Duration;

use hearth_core::ports::Clock;
use hearth_core::Options;
use hearth_testkit::fakes::{harness, Harness};
use hearth_testkit::record;
use hearth_types::{Desired, RestartPolicy, VmRecord, VmState};

/// VM `n` under `policy`, launched.
async fn running(h: &Harness, n: u8, policy: &str) -> VmRecord {
    let mut rec = record(n, Desired::Running, VmState::Created);
    rec.spec.restart = policy.parse().expect("policy");
    h.reconciled(rec).await
}

/// The VM's VMM ends, the guest saying `exit_code` (`None`: it said nothing: a crash, a host
/// that went down); the record once that is settled.
async fn ends(h: &Harness, rec: &VmRecord, exit_code: Option<i32>) -> VmRecord {
    let pid = h.host.record(&rec.spec.id).and_then(|r| r.status.pid).expect("a running VMM");
    if let Some(code) = exit_code {
        h.host.guest_exit(&rec.spec.id, code);
    }
    h.vmm.exit(pid);
    h.until(&rec.spec.id, "settled", |r| r.is_some_and(|r| !r.status.state.is_active()))
        .await
        .expect("record")
}

/// Waits until the VM runs a VMM again; its launches so far.
async fn relaunched(h: &Harness, rec: &VmRecord) -> usize {
    h.until(&rec.spec.id, "relaunched", |r| r.is_some_and(|r| r.status.pid.is_some())).await;
    h.vmm.launches().len()
}

#[tokio::test(start_paused = true)]
async fn on_failure_restarts_a_failed_run_after_its_back_off_and_not_a_clean_one() {
    let h = harness();
    let rec = running(&h, 1, "on-failure").await;
    let after = ends(&h, &rec, Some(1)).await;
    assert_eq!(
        (after.status.state, after.status.restarting, after.desired, after.status.exit_code),
        (VmState::Stopped, true, Desired::Running, Some(1)),
        "stopped, with a restart pending"
    );
    assert_eq!(
        after.status.restart_at,
        Some(h.clock.now_millis() + 100),
        "docker's first back-off"
    );
    assert_eq!(h.vmm.launches().len(), 1, "not before its back-off");
    assert_eq!(relaunched(&h, &rec).await, 2);
    let again = h.host.record(&rec.spec.id).expect("record");
    assert_eq!((again.status.restart_count, again.status.restarting), (1, false));
    // A VMM that died without the guest saying how is a failure too.
    ends(&h, &rec, None).await;
    assert_eq!(relaunched(&h, &rec).await, 3);
    let clean = ends(&h, &rec, Some(0)).await;
    assert_eq!((clean.status.restarting, clean.desired), (false, Desired::Stopped));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.vmm.launches().len(), 3, "an exit code of 0 is not restarted");
}

#[tokio::test(start_paused = true)]
async fn no_never_restarts_and_always_restarts_every_end() {
    let h = harness();
    let no = running(&h, 2, "no").await;
    let done = ends(&h, &no, Some(1)).await;
    assert_eq!((done.status.restarting, done.desired), (false, Desired::Stopped));
    for (n, policy) in [(3, "always"), (4, "unless-stopped")] {
        let vm = running(&h, n, policy).await;
        let before = h.vmm.launches().len();
        ends(&h, &vm, Some(0)).await;
        assert_eq!(relaunched(&h, &vm).await, before + 1, "{policy} after an exit code of 0");
    }
}

#[tokio::test(start_paused = true)]
async fn the_back_off_doubles_in_a_row_and_a_steady_run_starts_it_over() {
    let h = harness();
    let rec = running(&h, 5, "always").await;
    let mut waits = Vec::new();
    for _ in 0..3 {
        let after = ends(&h, &rec, Some(1)).await;
        waits.push(after.status.restart_at.expect("pending") - h.clock.now_millis());
        relaunched(&h, &rec).await;
    }
    assert_eq!(waits, [100, 200, 400]);
    // Ten seconds of running: the next restart is the first in a row again.
    h.clock.advance(10_000);
    let after = ends(&h, &rec, Some(1)).await;
    assert_eq!(after.status.restarts_in_a_row, 1);
    assert_eq!(after.status.restart_at.expect("pending") - h.clock.now_millis(), 100);
    assert_eq!(after.status.restart_count, 4, "the count since creation goes on");
}

#[tokio::test(start_paused = true)]
async fn on_failure_with_a_limit_gives_up_after_that_many_in_a_row() {
    let h = harness();
    let rec = running(&h, 6, "on-failure:2").await;
    for _ in 0..2 {
        ends(&h, &rec, Some(1)).await;
        relaunched(&h, &rec).await;
    }
    let last = ends(&h, &rec, Some(1)).await;
    assert_eq!((last.status.state, last.status.restarting), (VmState::Stopped, false));
    assert_eq!(h.vmm.launches().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_past_its_limit_fails_the_vm_saying_so() {
    let h = harness();
    let mut rec = record(7, Desired::Running, VmState::Created);
    (rec.spec.restart, rec.spec.crash_loop_limit) = (RestartPolicy::Always, Some(2));
    let rec = h.reconciled(rec).await;
    for _ in 0..2 {
        ends(&h, &rec, None).await;
        relaunched(&h, &rec).await;
    }
    let failed = ends(&h, &rec, Some(3)).await;
    assert_eq!((failed.status.state, failed.desired), (VmState::Failed, Desired::Stopped));
    assert!(
        failed.status.reason.starts_with("crash loop: restarted 2 times in a row")
            && failed.status.reason.ends_with("the last ended: exit code 3"),
        "{}",
        failed.status.reason
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_or_start_by_hand_during_the_back_off_wins() {
    let h = harness();
    let rec = running(&h, 8, "always").await;
    ends(&h, &rec, Some(1)).await;
    let stopped = h
        .reconciler
        .set_desired(&rec.spec.id, Desired::Stopped, Options::default())
        .await
        .expect("stop")
        .expect("record");
    assert!(!stopped.status.restarting && stopped.status.restart_at.is_none());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.vmm.launches().len(), 1, "a VM stopped by hand stays stopped");

    // Killed by hand: never restarted either.
    h.reconciler.start(&rec.spec.id).await.expect("start");
    let killed = h.reconciler.kill(&rec.spec.id, 9).await.expect("kill").expect("record");
    assert!(!killed.status.restarting);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.vmm.launches().len(), 2);

    // Started by hand while a restart waits: now, and the count starts over.
    h.reconciler.start(&rec.spec.id).await.expect("start");
    ends(&h, &rec, Some(1)).await;
    h.clock.advance(1);
    h.reconciler.start(&rec.spec.id).await.expect("start now");
    let started = h.host.record(&rec.spec.id).expect("record");
    assert_eq!((started.status.restarting, started.status.restarts_in_a_row), (false, 0));
    assert_eq!(h.vmm.launches().len(), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.vmm.launches().len(), 4, "the pending restart's timer does nothing");
}

#[tokio::test(start_paused = true)]
async fn a_daemon_start_restarts_what_died_meanwhile_and_always_even_after_a_stop() {
    let h = harness();
    // Running when the host went down (its VMM is gone now): restarted per its policy.
    let mut gone = record(9, Desired::Running, VmState::Running);
    (gone.spec.restart, gone.status.pid, gone.status.pid_start_time) =
        (RestartPolicy::OnFailure { max_retries: None }, Some(4242), Some(7));
    h.host.put(gone.clone());
    h.host.with_disks(&gone.spec.id);
    let mut plain = record(10, Desired::Running, VmState::Running);
    (plain.status.pid, plain.status.pid_start_time) = (Some(4243), Some(7));
    h.host.put(plain.clone());
    h.host.with_disks(&plain.spec.id);
    // Stopped by hand before: `always` starts with the daemon, `unless-stopped` does not.
    let stopped = |n: u8, policy: RestartPolicy| {
        let mut r = record(n, Desired::Stopped, VmState::Stopped);
        r.spec.restart = policy;
        h.host.put(r.clone());
        h.host.with_disks(&r.spec.id);
        r
    };
    let always = stopped(11, RestartPolicy::Always);
    let unless = stopped(12, RestartPolicy::UnlessStopped);
    h.reconciler.recover().await;
    relaunched(&h, &gone).await;
    relaunched(&h, &always).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let state = |r: &VmRecord| h.host.record(&r.spec.id).expect("record").status.state;
    assert_eq!(state(&plain), VmState::Stopped, "no policy: recorded as ended");
    assert_eq!(state(&unless), VmState::Stopped);
    assert_eq!(h.vmm.launches().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_restart_pending_when_the_daemon_went_down_is_carried_out_after_it_starts() {
    let h = harness();
    // As a daemon that went down during a back-off left it: 5 s still to wait.
    let mut rec = record(13, Desired::Running, VmState::Stopped);
    rec.spec.restart = RestartPolicy::Always;
    (rec.status.restarting, rec.status.restart_at) = (true, Some(h.clock.now_millis() + 5_000));
    h.host.put(rec.clone());
    h.host.with_disks(&rec.spec.id);
    h.reconciler.recover().await;
    assert_eq!(h.vmm.launches().len(), 0, "not before its back-off ends");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(relaunched(&h, &rec).await, 1);
}
