//! The `Vmm` contract: what the reconciler relies on from every provider, as one suite run
//! against the fake (hearth-core's tests) and against each real VMM (hearth-vmm's tests).

use std::time::Duration;

use hearth_core::ports::{LaunchSpec, Vmm, VmmError};

/// Drives `vmm` through a VM's life on `spec` (whose guest need not boot: the suite never
/// starts more than its CPUs) and panics with the broken promise.
pub async fn vmm_contract(vmm: &dyn Vmm, spec: &LaunchSpec) {
    let dir = &spec.vm_dir;
    assert!(vmm.find(dir, None).is_none(), "no VMM runs for a fresh directory");
    let launched = vmm.launch(spec).unwrap_or_else(|e| panic!("launch: {e}"));
    let h = launched.handle();
    assert_eq!(vmm.find(dir, Some(h)), Some((h, true)), "the recorded VMM is found as recorded");
    assert_eq!(
        vmm.find(dir, None),
        Some((h, false)),
        "it is found from its own files too (a crash before recording)"
    );
    let mut other = h;
    other.start_time += 1;
    assert_eq!(
        vmm.find(dir, Some(other)),
        Some((h, false)),
        "a record naming another start time is not trusted"
    );
    match vmm.launch(spec) {
        Err(VmmError::AlreadyRunning { pid }) => assert_eq!(pid, h.pid),
        other => panic!("a second launch for the same VM must be refused, got {other:?}"),
    }
    vmm.wait_set_up(dir, h).await.unwrap_or_else(|e| panic!("wait_set_up: {e}"));
    assert!(
        vmm.start_guest(dir, true).await.expect("start a never-started guest"),
        "a guest launched paused is started"
    );
    assert!(
        !vmm.start_guest(dir, true).await.expect("ask again"),
        "a started guest is left as it is"
    );
    vmm.set_paused(dir, true).await.unwrap_or_else(|e| panic!("pause: {e}"));
    assert!(
        !vmm.start_guest(dir, true).await.expect("ask while paused"),
        "a guest paused after its start is not one that was never started: it stays paused"
    );
    vmm.set_paused(dir, false).await.unwrap_or_else(|e| panic!("resume: {e}"));
    let ends = tokio::time::timeout(Duration::from_millis(100), vmm.wait_exit(h)).await;
    assert!(ends.is_err(), "wait_exit waits while the VMM runs");
    vmm.stop(dir, h, Duration::ZERO).await.unwrap_or_else(|e| panic!("stop: {e}"));
    tokio::time::timeout(Duration::from_secs(10), vmm.wait_exit(h))
        .await
        .expect("wait_exit resolves once it is gone");
    assert!(
        vmm.find(dir, Some(h)).is_none() && vmm.find(dir, None).is_none(),
        "a stopped VMM is found by nothing"
    );
    assert!(!vmm.signal(dir, h, 15), "a gone VMM is never signalled");
    vmm.cleanup(dir, &spec.confinement);
    let again = vmm.launch(spec).unwrap_or_else(|e| panic!("a relaunch after a stop: {e}"));
    assert_ne!(again.handle(), h);
    assert!(vmm.signal(dir, again.handle(), 9), "the live VMM takes a signal");
    tokio::time::timeout(Duration::from_secs(10), vmm.wait_exit(again.handle()))
        .await
        .expect("killed by its signal");
    vmm.cleanup(dir, &spec.confinement);
}
