//! A microVM's reported state, derived from its hearth VM.

use super::*;

/// PENDING until the guest is up (and again while its VM restarts after it ended), CREATED while
/// it runs, FAILED with a reason otherwise (a crash loop, a stop outside the Flintlock API).
pub(super) fn observed_state(
    rec: &Record,
    vm: Option<&VmRecord>,
) -> (fl::micro_vm_status::MicroVmState, String) {
    use fl::micro_vm_status::MicroVmState as S;
    match (rec.phase, vm) {
        (Phase::Deleting, _) => (S::Deleting, String::new()),
        (Phase::Failed, _) => (S::Failed, rec.reason.clone()),
        (Phase::Pending, _) => (S::Pending, rec.reason.clone()),
        (Phase::Created, None) => {
            (S::Failed, "the VM was removed outside the Flintlock API (hearth rm)".into())
        }
        (Phase::Created, Some(vm)) if vm.status.restarting => {
            let why = match (vm.status.exit_code, vm.status.reason.as_str()) {
                (Some(c), _) => format!("the VM ended (exit code {c})"),
                (None, "") => "the VM ended".to_owned(),
                (None, r) => r.to_owned(),
            };
            (S::Pending, format!("restarting ({} in a row): {why}", vm.status.restarts_in_a_row))
        }
        (Phase::Created, Some(vm)) => match vm.status.state {
            VmState::Running => (S::Created, String::new()),
            VmState::Created | VmState::Starting => (S::Pending, String::new()),
            VmState::Stopping | VmState::Stopped | VmState::Failed => {
                let why = if vm.status.reason.is_empty() {
                    format!("the VM is {}", vm.status.state)
                } else {
                    vm.status.reason.clone()
                };
                (S::Failed, why)
            }
        },
    }
}

pub(super) fn timestamp(secs: u64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: secs as i64, nanos: 0 }
}
