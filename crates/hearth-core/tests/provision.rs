//! Provisioning for Flintlock's microVMs against the ports' fakes, in paused time: what a
//! client sees in a microVM's record as its images come (or do not), and that a delete always
//! wins, even behind a registry that stalls.

use std::sync::Arc;
use std::time::Duration;

use hearth_core::ports::{Job, Outcome, VmRepository};
use hearth_core::provision::{kernel_name, OWNER_LABEL};
use hearth_core::{NewVm, Provisioner, RetryPolicy};
use hearth_testkit::fakes::{harness, Answer, FakeFetch, FakeJobs, Harness, Phase};
use hearth_types::{NetworkMode, VmState};

const KERNEL: &str = "ghcr.io/example/kernel:6.1";
const ROOT: &str = "ghcr.io/example/node:1.30";
const VOLUME: &str = "ghcr.io/example/data:1";

struct World {
    h: Harness,
    jobs: Arc<FakeJobs>,
    fetch: Arc<FakeFetch>,
    p: Arc<Provisioner>,
}

fn world(policy: RetryPolicy) -> World {
    let h = harness();
    let jobs = Arc::new(FakeJobs::default());
    let fetch = Arc::new(FakeFetch::new(h.host.clone()));
    let p = Provisioner::start(h.reconciler.clone(), jobs.clone(), fetch.clone(), policy);
    World { h, jobs, fetch, p }
}

fn job(name: &str) -> Job {
    Job {
        kernel_image: KERNEL.into(),
        kernel_file: None,
        initrd: None,
        images: vec![ROOT.into(), VOLUME.into()],
        vm: NewVm {
            image: ROOT.into(),
            name: Some(name.into()),
            cpus: 1,
            memory_mib: 256,
            disk_bytes: 64 << 20,
            network: NetworkMode::User,
            entrypoint: Some(vec!["/sbin/init".into()]),
            ..Default::default()
        },
        failures: 0,
    }
}

/// Lets the provisioner's tasks run until the owner's record leaves `phase`, or `within` passes.
async fn settle(w: &World, owner: &str, phase: Option<Phase>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while w.jobs.phase(owner) == phase && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_microvm_gets_its_images_its_kernel_once_and_a_started_vm_labelled_with_its_uid() {
    let w = world(RetryPolicy::default());
    w.jobs.add("uid1", job("ns_one"));
    w.jobs.add("uid2", job("ns_two"));
    w.p.submit("uid1");
    w.p.submit("uid2");
    settle(&w, "uid1", Some(Phase::Pending), Duration::from_secs(5)).await;
    settle(&w, "uid2", Some(Phase::Pending), Duration::from_secs(5)).await;
    for owner in ["uid1", "uid2"] {
        assert_eq!(w.jobs.phase(owner), Some(Phase::Created), "{:?}", w.jobs.outcomes(owner));
        let vm = w.p.vm_of(owner).expect("list").expect("the microvm's VM");
        assert_eq!(vm.spec.labels.get(OWNER_LABEL).map(String::as_str), Some(owner));
        assert!(vm.status.state.is_active(), "started: {:?}", vm.status.state);
    }
    let kernel = w.h.host.list().expect("list")[0].spec.kernel.clone();
    assert!(w.fetch.pulls().iter().any(|r| r == KERNEL));
    assert_eq!(w.fetch.imports(), [kernel.as_str()], "two microVMs share one import");
    assert!(kernel.starts_with("fl-"), "{kernel}");
    for r in [ROOT, VOLUME] {
        assert!(w.fetch.pulls().iter().any(|p| p == r), "{r} pulled");
    }
}

#[tokio::test(start_paused = true)]
async fn an_initrd_of_the_microvms_own_is_pulled_stored_and_booted_with() {
    let w = world(RetryPolicy::default());
    let mut j = job("ns_initrd");
    j.initrd = Some(("reg/initrd:1".into(), "boot/initrd".into()));
    w.jobs.add("uid3", j);
    w.p.submit("uid3");
    settle(&w, "uid3", Some(Phase::Pending), Duration::from_secs(5)).await;
    assert_eq!(w.jobs.phase("uid3"), Some(Phase::Created), "{:?}", w.jobs.outcomes("uid3"));
    assert!(w.fetch.pulls().iter().any(|r| r == "reg/initrd:1"));
    assert!(w.fetch.imports().iter().any(|i| i == "initrd boot/initrd"), "{:?}", w.fetch.imports());
    let vm = w.p.vm_of("uid3").expect("list").expect("the VM");
    let digest = vm.spec.initrd.clone().expect("the VM boots with it");
    let launched = w.h.vmm.launches().pop().expect("launched");
    assert!(launched.initrd.to_string_lossy().ends_with(&format!("+{digest}")), "{launched:?}");
}

#[tokio::test(start_paused = true)]
async fn a_registry_that_is_away_is_retried_with_back_off_and_the_record_shows_each_failure() {
    let w = world(RetryPolicy::default());
    w.fetch.answer(ROOT, Answer::Unavailable(3));
    w.jobs.add("uid1", job("ns_one"));
    let t0 = tokio::time::Instant::now();
    w.p.submit("uid1");
    // After the first failure the record says why and how many, while the retry waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.jobs.failures("uid1"), Some(1));
    assert_eq!(w.jobs.phase("uid1"), Some(Phase::Pending));
    match &w.jobs.outcomes("uid1")[..] {
        [Outcome::Retrying { failures: 1, reason }] => {
            assert!(reason.contains(ROOT) && reason.contains("connection refused"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    settle(&w, "uid1", Some(Phase::Pending), Duration::from_secs(60)).await;
    assert_eq!(w.jobs.phase("uid1"), Some(Phase::Created));
    assert_eq!(w.jobs.failures("uid1"), Some(0), "the count resets on success");
    // Waits of 2, 4 and 8 s between the attempts.
    let took = tokio::time::Instant::now() - t0;
    assert!(took >= Duration::from_secs(14) && took < Duration::from_secs(16), "{took:?}");
    assert_eq!(w.fetch.pulls().iter().filter(|r| *r == ROOT).count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_refused_image_fails_the_microvm_at_once_and_a_registry_away_for_good_in_the_end() {
    let w = world(RetryPolicy { max_failures: 4, ..RetryPolicy::default() });
    w.fetch.answer(ROOT, Answer::Refused);
    w.fetch.answer(VOLUME, Answer::Unavailable(u32::MAX));
    let mut other = job("ns_two");
    other.images = vec![VOLUME.into()];
    w.jobs.add("refused", job("ns_one"));
    w.jobs.add("away", other);
    w.p.submit("refused");
    w.p.submit("away");
    settle(&w, "refused", Some(Phase::Pending), Duration::from_secs(1)).await;
    assert_eq!(w.jobs.phase("refused"), Some(Phase::Failed));
    assert_eq!(w.jobs.outcomes("refused").len(), 1, "not retried");
    settle(&w, "away", Some(Phase::Pending), Duration::from_secs(600)).await;
    assert_eq!(w.jobs.phase("away"), Some(Phase::Failed));
    match w.jobs.outcomes("away").last() {
        Some(Outcome::Failed { failures: 4, reason }) => {
            assert!(reason.starts_with("gave up after 4 attempts: pulling"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(w.h.host.list().expect("list").is_empty(), "no VM for either");
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_a_stalled_pull_completes_at_once_and_the_pull_creates_nothing_later() {
    let w = world(RetryPolicy::default());
    w.fetch.answer(ROOT, Answer::Stall);
    w.jobs.add("uid1", job("ns_one"));
    w.p.submit("uid1");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(w.fetch.pulls().iter().any(|r| r == ROOT), "the pull is in flight");
    w.jobs.mark_deleting("uid1");
    w.p.delete("uid1");
    settle(&w, "uid1", Some(Phase::Deleting), Duration::from_secs(1)).await;
    assert_eq!(w.jobs.phase("uid1"), None, "the record is gone");
    w.fetch.release();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(w.h.host.list().expect("list").is_empty(), "no VM was made");
}

#[tokio::test(start_paused = true)]
async fn a_delete_of_a_created_microvm_removes_its_vm_then_its_record() {
    let w = world(RetryPolicy::default());
    w.jobs.add("uid1", job("ns_one"));
    w.p.submit("uid1");
    settle(&w, "uid1", Some(Phase::Pending), Duration::from_secs(5)).await;
    let vm = w.p.vm_of("uid1").expect("list").expect("vm");
    assert_eq!(w.h.host.record(&vm.spec.id).map(|r| r.status.state), Some(VmState::Running));
    w.jobs.mark_deleting("uid1");
    w.p.delete("uid1");
    settle(&w, "uid1", Some(Phase::Deleting), Duration::from_secs(30)).await;
    assert_eq!(w.jobs.phase("uid1"), None);
    assert_eq!(w.h.host.removed(), [vm.spec.id]);
    assert!(w.h.vmm.running().is_empty(), "its VMM was stopped");
}

#[test]
fn kernel_names_are_valid_store_names() {
    let h = harness();
    let image = h.host.add_image("k", Default::default(), 1, None);
    let id = &image.id.hex()[..12];
    assert_eq!(kernel_name(&image, None), format!("fl-{id}"));
    let n = kernel_name(&image, Some("/boot/vmlinux-6.1"));
    assert_eq!(n, format!("fl-{id}-boot-vmlinux-6-1"));
    assert!(hearth_types::validate_name(&n).is_ok());
    let long = "x".repeat(100);
    assert_eq!(kernel_name(&image, Some(&long)).len(), 63);
}
