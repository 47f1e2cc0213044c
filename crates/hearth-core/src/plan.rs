//! The planner: desired state + observation -> next steps.

use hearth_types::{Desired, VmRecord};

/// A reconcile loop gives up after this many plan/execute rounds.
pub const MAX_ITERATIONS: usize = 12;

/// What the daemon saw on the host for one VM, gathered without changing anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// The VM's directory exists.
    pub dir: bool,
    /// The writable root disk exists.
    pub disk: bool,
    /// The config disk exists.
    pub config_disk: bool,
    /// A VMM process for this VM is alive (from the record's pid, or the VMM's pid file).
    pub vmm_alive: bool,
    /// The record's pid/start time still name that live VMM (false after a crash before the
    /// pid was recorded: the VMM must be adopted).
    pub vmm_recorded: bool,
    /// The VM's restart policy starts it again, but not yet (its back-off runs).
    pub restart_later: bool,
}

/// One idempotent action. Each is safe to repeat after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Clone the image's base ext4 into the VM's root disk and grow it.
    CreateDisk,
    /// Write the guest config disk.
    WriteConfigDisk,
    /// Record the pid of a live VMM found by its pid file.
    AdoptVmm,
    /// Start the VMM and record its pid.
    Launch,
    /// Ask the guest to stop (agent, then ACPI), kill after the timeout.
    Stop,
    /// Kill the VMM now.
    Kill,
    /// The VMM is gone: record how the workload ended.
    RecordExit,
    /// Remove the VM's directory and record.
    Remove,
}

/// The next steps for `rec` given `obs`; empty when the VM is where it should be.
pub fn plan(rec: &VmRecord, obs: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    let state = rec.status.state;
    if obs.vmm_alive && !obs.vmm_recorded {
        steps.push(Step::AdoptVmm);
        return steps;
    }
    match rec.desired {
        Desired::Deleted => {
            if obs.vmm_alive {
                steps.push(Step::Kill);
            }
            if obs.dir {
                steps.push(Step::Remove);
            }
        }
        Desired::Stopped => {
            if obs.vmm_alive {
                steps.push(Step::Stop);
            } else if state.is_active() {
                steps.push(Step::RecordExit);
            }
        }
        Desired::Running => {
            if obs.vmm_alive {
                return steps;
            }
            if state.is_active() {
                // It was running and its VMM is gone: the workload ended or the VMM died.
                steps.push(Step::RecordExit);
                return steps;
            }
            if obs.restart_later {
                return steps;
            }
            if !obs.disk {
                steps.push(Step::CreateDisk);
            }
            if !obs.config_disk || !obs.disk {
                steps.push(Step::WriteConfigDisk);
            }
            steps.push(Step::Launch);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_types::VmState;

    fn rec(desired: Desired, state: VmState) -> VmRecord {
        hearth_testkit::record(7, desired, state)
    }

    const FRESH: Observed = Observed {
        dir: true,
        disk: false,
        config_disk: false,
        vmm_alive: false,
        vmm_recorded: false,
        restart_later: false,
    };
    const RUNNING: Observed = Observed {
        dir: true,
        disk: true,
        config_disk: true,
        vmm_alive: true,
        vmm_recorded: true,
        restart_later: false,
    };
    const DOWN: Observed = Observed {
        dir: true,
        disk: true,
        config_disk: true,
        vmm_alive: false,
        vmm_recorded: false,
        restart_later: false,
    };

    #[test]
    fn a_new_vm_gets_disks_then_a_vmm() {
        let steps = plan(&rec(Desired::Running, VmState::Created), &FRESH);
        assert_eq!(steps, [Step::CreateDisk, Step::WriteConfigDisk, Step::Launch]);
    }

    #[test]
    fn restarting_reuses_the_disk() {
        assert_eq!(plan(&rec(Desired::Running, VmState::Stopped), &DOWN), [Step::Launch]);
    }

    #[test]
    fn a_restart_waits_for_its_back_off() {
        let waiting = Observed { restart_later: true, ..DOWN };
        assert!(plan(&rec(Desired::Running, VmState::Stopped), &waiting).is_empty());
        assert_eq!(plan(&rec(Desired::Running, VmState::Stopped), &DOWN), [Step::Launch]);
        // A stop or rm while it waits is carried out.
        assert_eq!(plan(&rec(Desired::Deleted, VmState::Stopped), &waiting), [Step::Remove]);
    }

    #[test]
    fn a_running_vm_needs_nothing() {
        assert!(plan(&rec(Desired::Running, VmState::Running), &RUNNING).is_empty());
    }

    #[test]
    fn a_vmm_that_vanished_is_recorded_not_relaunched() {
        assert_eq!(plan(&rec(Desired::Running, VmState::Running), &DOWN), [Step::RecordExit]);
        assert_eq!(plan(&rec(Desired::Running, VmState::Starting), &DOWN), [Step::RecordExit]);
    }

    #[test]
    fn an_unrecorded_live_vmm_is_adopted_first() {
        let obs = Observed { vmm_recorded: false, ..RUNNING };
        assert_eq!(plan(&rec(Desired::Deleted, VmState::Starting), &obs), [Step::AdoptVmm]);
    }

    #[test]
    fn stop_then_record() {
        assert_eq!(plan(&rec(Desired::Stopped, VmState::Running), &RUNNING), [Step::Stop]);
        assert_eq!(plan(&rec(Desired::Stopped, VmState::Stopping), &DOWN), [Step::RecordExit]);
        assert!(plan(&rec(Desired::Stopped, VmState::Stopped), &DOWN).is_empty());
    }

    #[test]
    fn delete_removes_exactly_what_exists() {
        assert_eq!(
            plan(&rec(Desired::Deleted, VmState::Running), &RUNNING),
            [Step::Kill, Step::Remove]
        );
        assert_eq!(plan(&rec(Desired::Deleted, VmState::Stopped), &DOWN), [Step::Remove]);
        let gone = Observed::default();
        assert!(plan(&rec(Desired::Deleted, VmState::Stopped), &gone).is_empty());
    }
}
