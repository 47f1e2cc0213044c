//! Choosing QEMU's accelerator. An openable /dev/kvm is not proof that KVM can run a guest
//! (nested paravirtual KVM opens but stalls guests), so auto also needs vmx/svm in the CPU flags.

use std::fs::OpenOptions;

use hearth_types::Accel;

use crate::VmmError;

/// The environment variable that picks the accelerator when the request is `auto`.
pub const ACCEL_ENV: &str = "HEARTH_ACCEL";

/// What the host offers, gathered once. Tests build it by hand.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Whether /dev/kvm opens read-write, else why not.
    pub kvm_opens: Result<(), String>,
    /// The text of /proc/cpuinfo.
    pub cpuinfo: String,
    /// The value of `HEARTH_ACCEL`, if set.
    pub env_accel: Option<String>,
}

impl HostFacts {
    pub fn probe() -> Self {
        let kvm_opens = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| e.to_string());
        Self {
            kvm_opens,
            cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            env_accel: std::env::var(ACCEL_ENV).ok(),
        }
    }
}

fn has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Why KVM cannot be used here, or `None` when it can.
pub fn kvm_unusable(facts: &HostFacts) -> Option<String> {
    if let Err(e) = &facts.kvm_opens {
        return Some(format!("/dev/kvm cannot be opened ({e})"));
    }
    if !has_virt_flag(&facts.cpuinfo) {
        return Some(
            "the CPU does not advertise vmx or svm (nested or paravirtual KVM cannot run guests)"
                .into(),
        );
    }
    None
}

/// Why KVM cannot run guests on this host, probed now; `None` when it can.
pub fn kvm_unusable_here() -> Option<String> {
    kvm_unusable(&HostFacts::probe())
}

/// Resolves `requested` against the host: `(accelerator, warning)`. An explicit request wins
/// over `HEARTH_ACCEL`, which wins over probing.
pub fn decide(requested: Accel, facts: &HostFacts) -> Result<(Accel, Option<String>), VmmError> {
    let requested = match (requested, facts.env_accel.as_deref().map(str::trim)) {
        (Accel::Auto, Some(v)) => v.parse::<Accel>().map_err(|_| {
            VmmError::Accel(format!(
                "{ACCEL_ENV}={v:?} is not an accelerator: use auto, kvm or tcg"
            ))
        })?,
        (r, _) => r,
    };
    match (requested, kvm_unusable(facts)) {
        (Accel::Tcg, _) => Ok((Accel::Tcg, None)),
        (Accel::Kvm, None) | (Accel::Auto, None) => Ok((Accel::Kvm, None)),
        (Accel::Kvm, Some(why)) => Err(VmmError::Accel(format!(
            "--accel kvm is not possible here: {why}; use --accel tcg"
        ))),
        (Accel::Auto, Some(why)) => Ok((
            Accel::Tcg,
            Some(format!(
                "KVM is not usable here ({why}): using TCG software emulation, which is slower"
            )),
        )),
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
            env_accel: None,
        }
    }

    fn with_env(mut f: HostFacts, v: &str) -> HostFacts {
        f.env_accel = Some(v.into());
        f
    }

    #[test]
    fn the_environment_picks_for_auto_only() {
        assert_eq!(
            decide(Accel::Auto, &with_env(facts(true, "vmx"), "tcg")).expect("ok"),
            (Accel::Tcg, None)
        );
        assert_eq!(
            decide(Accel::Kvm, &with_env(facts(true, "vmx"), "tcg")).expect("ok").0,
            Accel::Kvm
        );
        assert_eq!(
            decide(Accel::Tcg, &with_env(facts(true, "vmx"), "kvm")).expect("ok").0,
            Accel::Tcg
        );
        let e =
            decide(Accel::Auto, &with_env(facts(true, "hypervisor"), "kvm")).expect_err("no kvm");
        assert!(e.to_string().contains("--accel tcg"), "{e}");
        let e = decide(Accel::Auto, &with_env(facts(true, "vmx"), "xen")).expect_err("bad value");
        assert!(e.to_string().contains("HEARTH_ACCEL"), "{e}");
        assert_eq!(
            decide(Accel::Auto, &with_env(facts(true, "vmx"), "auto")).expect("ok").0,
            Accel::Kvm
        );
    }

    #[test]
    fn only_the_flags_line_counts() {
        let f = HostFacts {
            kvm_opens: Ok(()),
            cpuinfo: "model name : vmx-like svm cpu\nflags : fpu sse\n".into(),
            env_accel: None,
        };
        assert_eq!(decide(Accel::Auto, &f).expect("ok").0, Accel::Tcg);
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
