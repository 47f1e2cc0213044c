//! Restart policies: docker's `--restart` names and meanings, for every VM (Flintlock's
//! microVMs get `always` with a crash-loop limit, as Flintlock relaunches a VMM that ended).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A run at least this long starts the count of restarts in a row (and their back-off) over.
pub const STEADY_RUN: Duration = Duration::from_secs(10);
/// The back-off before the first restart in a row; it doubles with each one after.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest back-off.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// When a VM whose VMM ended on its own (the workload exited, the guest powered off or
/// rebooted, the VMM crashed, the host went down) is started again. A VM stopped, killed or
/// removed through hearth never is, whatever its policy.
/// Stored and shown as docker writes it (`"on-failure:3"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RestartPolicy {
    /// Never (`no`).
    #[default]
    No,
    /// After a failure: an exit code other than 0, or a VMM that ended without the guest saying
    /// how (`on-failure[:N]`: at most N restarts in a row).
    OnFailure { max_retries: Option<u32> },
    /// After every end; also when hearthd starts, even after a stop by hand (`always`).
    Always,
    /// After every end, but a VM stopped by hand stays stopped across hearthd's starts
    /// (`unless-stopped`).
    UnlessStopped,
}

/// Why a `--restart` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--restart {0:?}: expected no, on-failure[:N], always or unless-stopped")]
pub struct RestartPolicyError(pub String);

impl std::str::FromStr for RestartPolicy {
    type Err = RestartPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RestartPolicyError(s.to_owned());
        match s.split_once(':') {
            None => match s {
                "no" | "" => Ok(Self::No),
                "on-failure" => Ok(Self::OnFailure { max_retries: None }),
                "always" => Ok(Self::Always),
                "unless-stopped" => Ok(Self::UnlessStopped),
                _ => Err(bad()),
            },
            Some(("on-failure", n)) => {
                let n: u32 = n.parse().map_err(|_| bad())?;
                Ok(Self::OnFailure { max_retries: (n > 0).then_some(n) })
            }
            Some(_) => Err(bad()),
        }
    }
}

impl TryFrom<String> for RestartPolicy {
    type Error = RestartPolicyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RestartPolicy> for String {
    fn from(p: RestartPolicy) -> Self {
        p.to_string()
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::No => f.write_str("no"),
            Self::OnFailure { max_retries: None } => f.write_str("on-failure"),
            Self::OnFailure { max_retries: Some(n) } => write!(f, "on-failure:{n}"),
            Self::Always => f.write_str("always"),
            Self::UnlessStopped => f.write_str("unless-stopped"),
        }
    }
}

impl RestartPolicy {
    /// Whether a VM that ended on its own with `exit_code` (`None`: the VMM ended without the
    /// guest saying how) is started again, `in_a_row` restarts having come before this one.
    pub fn restarts_after(&self, exit_code: Option<i32>, in_a_row: u32) -> bool {
        match *self {
            Self::No => false,
            Self::OnFailure { max_retries } => {
                exit_code != Some(0) && max_retries.is_none_or(|max| in_a_row < max)
            }
            Self::Always | Self::UnlessStopped => true,
        }
    }

    /// Whether hearthd, starting, starts a VM that was stopped by hand.
    pub fn starts_stopped_vms_with_the_daemon(&self) -> bool {
        *self == Self::Always
    }
}

/// The back-off before restart number `n` in a row (1 for the first): docker's, doubling from
/// 100 ms up to a minute.
pub fn delay(n: u32) -> Duration {
    FIRST_DELAY.saturating_mul(1 << n.saturating_sub(1).min(16)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockers_names_parse_and_print_back() {
        for s in ["no", "on-failure", "on-failure:3", "always", "unless-stopped"] {
            let p = s.parse::<RestartPolicy>().expect(s);
            assert_eq!(p.to_string(), s);
            let json = serde_json::to_string(&p).expect("json");
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<RestartPolicy>(&json).expect("back"), p);
        }
        assert_eq!("on-failure:0".parse(), Ok(RestartPolicy::OnFailure { max_retries: None }));
        for bad in ["sometimes", "on-failure:x", "always:2", "on-failure:-1"] {
            let e = bad.parse::<RestartPolicy>().expect_err(bad).to_string();
            assert!(e.contains(bad) && e.contains("unless-stopped"), "{e}");
        }
    }

    #[test]
    fn each_policy_restarts_what_docker_would() {
        use RestartPolicy::*;
        let cases: [(RestartPolicy, Option<i32>, u32, bool); 9] = [
            (No, Some(1), 0, false),
            (No, None, 0, false),
            (OnFailure { max_retries: None }, Some(0), 0, false),
            (OnFailure { max_retries: None }, Some(1), 50, true),
            (OnFailure { max_retries: None }, None, 0, true),
            (OnFailure { max_retries: Some(2) }, Some(1), 1, true),
            (OnFailure { max_retries: Some(2) }, Some(1), 2, false),
            (Always, Some(0), 9, true),
            (UnlessStopped, None, 0, true),
        ];
        for (p, code, n, want) in cases {
            assert_eq!(p.restarts_after(code, n), want, "{p} after {code:?}, {n} in a row");
        }
        assert!(Always.starts_stopped_vms_with_the_daemon());
        assert!(!UnlessStopped.starts_stopped_vms_with_the_daemon());
    }

    #[test]
    fn the_back_off_doubles_up_to_a_minute() {
        assert_eq!(delay(1), Duration::from_millis(100));
        assert_eq!(delay(2), Duration::from_millis(200));
        assert_eq!(delay(4), Duration::from_millis(800));
        assert_eq!(delay(11), MAX_DELAY);
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }
}
