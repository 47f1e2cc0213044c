//! Choosing QEMU's accelerator. An openable /dev/kvm is not proof that KVM can run a guest
//! (nested paravirtual KVM opens but stalls guests), so auto also needs vmx/svm in the CPU flags.

use std::fs::OpenOptions;

use hearth_types::Accel;

use crate::VmmError;

/// What the host offers, gathered once.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub kvm_opens: Result<(), String>,
    pub cpuinfo: String,
}

impl HostFacts {
    pub fn probe() -> Self {
        let kvm_opens = OpenOptions::new().read(true).write(true).open("/dev/kvm").map(|_| ()).map_err(|e| e.to_string());
        Self { kvm_opens, cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default() }
    }
}

fn has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Why KVM cannot be used here, or `None` when it can.
pub fn kvm_unusable(facts: &HostFacts) -> Option<String> {
    if let Err(e) = &facts.kvm_opens {
        return Some(format!("/dev/kvm cannot be opened ({e})"));
    }
    if !has_virt_flag(&facts.cpuinfo) {
        return Some("the CPU does not advertise vmx or svm (nested or paravirtual KVM cannot run guests)".into());
    }
    None
}

/// Resolves `requested` against the host: `(accelerator, warning)`.
pub fn decide(requested: Accel, facts: &HostFacts) -> Result<(Accel, Option<String>), VmmError> {
    match (requested, kvm_unusable(facts)) {
        (Accel::Tcg, _) => Ok((Accel::Tcg, None)),
        (Accel::Kvm, None) | (Accel::Auto, None) => Ok((Accel::Kvm, None)),
        (Accel::Kvm, Some(why)) => Err(VmmError::Accel(format!("--accel kvm is not possible here: {why}; use --accel tcg"))),
        (Accel::Auto, Some(why)) => {
            Ok((Accel::Tcg, Some(format!("KVM is not usable ({why}): using TCG software emulation, which is much slower"))))
        }
    }
}

/// [`decide`] on this host.
pub fn resolve_accel(requested: Accel) -> Result<(Accel, Option<String>), VmmError> {
    decide(requested, &HostFacts::probe())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(opens: bool, flags: &str) -> HostFacts {
        HostFacts {
            kvm_opens: if opens { Ok(()) } else { Err("No such file".into()) },
            cpuinfo: format!("processor : 0\nflags\t\t: fpu {flags} sse\n"),
        }
    }

    #[test]
    fn auto_needs_both_the_device_and_the_cpu_flag() {
        assert_eq!(decide(Accel::Auto, &facts(true, "vmx")).expect("ok").0, Accel::Kvm);
        assert_eq!(decide(Accel::Auto, &facts(true, "svm")).expect("ok").0, Accel::Kvm);
        let (a, w) = decide(Accel::Auto, &facts(true, "hypervisor")).expect("ok");
        assert_eq!(a, Accel::Tcg);
        assert!(w.expect("warning").contains("vmx"));
        assert_eq!(decide(Accel::Auto, &facts(false, "vmx")).expect("ok").0, Accel::Tcg);
    }

    #[test]
    fn forcing_kvm_where_it_cannot_work_says_why() {
        let e = decide(Accel::Kvm, &facts(true, "")).expect_err("no kvm");
        assert!(e.to_string().contains("--accel tcg"), "{e}");
        assert_eq!(decide(Accel::Tcg, &facts(true, "vmx")).expect("ok").0, Accel::Tcg);
    }
}
