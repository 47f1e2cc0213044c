//! A guest whose agent speaks garbage is cut off, logged, and does not disturb other VMs.
//!
//! The hostile guest is faked: a record of a "running" VM whose VMM is a stand-in process
//! and whose agent socket is served by this test, writing oversized and malformed frames.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use hearth_e2e::{require_e2e, text, Daemon};
use hearth_types::{Desired, VmRecord, VmState, VmStatus};

#[test]
fn a_hostile_agent_is_cut_off_and_other_vms_keep_working() {
    require_e2e!();
    let reg = hearth_e2e::testutil::LocalRegistry::start().expect("registry");
    hearth_e2e::testutil::push_busybox(&reg, "demo:1", "").expect("push");
    let image = format!("{}/demo:1", reg.host());
    let mut d = Daemon::start();
    d.import_kernel();
    d.ok(&["run", "-d", "--name", "good", &image, "sleep", "100000"]);

    // Plant the fake VM while the daemon is down, as if it had been running all along.
    d.kill9();
    let mut spec = hearth_testkit::spec(9);
    spec.name = "hostile".into();
    let dir = d.root.path().join("vms").join(spec.id.as_str());
    std::fs::create_dir_all(&dir).expect("vm dir");
    let mut vmm = hearth_e2e::fake_vmm(&dir);
    let pid = vmm.id() as i32;
    let rec = VmRecord {
        spec: spec.clone(),
        desired: Desired::Running,
        status: VmStatus {
            state: VmState::Running,
            pid: Some(pid),
            pid_start_time: hearth_vmm::start_time(pid),
            ..Default::default()
        },
    };
    std::fs::write(dir.join("record.json"), serde_json::to_vec(&rec).expect("json"))
        .expect("record");
    let listener = UnixListener::bind(dir.join("agent.sock")).expect("agent socket");
    let guest = std::thread::spawn(move || {
        // First connection: an oversized frame. Second: an unknown frame kind.
        for junk in
            [&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1][..], &[0, 0, 0, 1, 0xee, 0, 0, 0, 1, 0][..]]
        {
            let Ok((mut s, _)) = listener.accept() else { return };
            let _ = s.write_all(junk);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    d.spawn();

    for _ in 0..2 {
        let out = d.hearth(&["exec", "hostile", "--", "true"]);
        assert!(!out.status.success(), "exec on a hostile guest must fail");
        assert!(text(&out.stderr).contains("agent"), "{}", text(&out.stderr));
    }
    assert!(
        d.log().contains("guest agent connection cut off"),
        "hearthd should log the cut-off:\n{}",
        d.log()
    );
    // hearthd is alive and the well-behaved VM still answers.
    assert_eq!(d.ok(&["exec", "good", "--", "echo", "fine"]), "fine\n");
    let _ = guest.join();
    let _ = vmm.kill();
    let _ = vmm.wait();
    d.wait_for("hostile", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
}
