//! Turning an image's OCI config plus the user's overrides into what hearth-init runs.

use hearth_types::guest::{is_init_system, GUEST_CONFIG_VERSION};
use hearth_types::{GuestConfig, GuestProcess, ImageConfig, VmSpec};

/// PATH given to a workload whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why no process could be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestConfigError {
    #[error("image {0} has no ENTRYPOINT or CMD: give a command after the image name")]
    NoCommand(String),
}

/// The argv docker would run: ENTRYPOINT + CMD, where `--entrypoint` replaces ENTRYPOINT and
/// drops the image CMD, and a command line replaces CMD.
pub fn argv(spec: &VmSpec, image: &ImageConfig) -> Vec<String> {
    let (entrypoint, image_cmd) = match &spec.entrypoint {
        Some(ep) => (ep.clone(), Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if spec.command.is_empty() { image_cmd } else { spec.command.clone() };
    entrypoint.into_iter().chain(cmd).collect()
}

/// Image ENV with `-e` entries merged over it (same key replaces, in place).
pub fn merge_env(image: &[String], overrides: &[String]) -> Vec<String> {
    let key = |e: &str| e.split_once('=').map_or(e, |(k, _)| k).to_owned();
    let mut out: Vec<String> = image.to_vec();
    if !out.iter().any(|e| key(e) == "PATH") {
        out.insert(0, DEFAULT_PATH.to_owned());
    }
    for o in overrides {
        let k = key(o);
        match out.iter_mut().find(|e| key(e) == k) {
            Some(slot) => *slot = o.clone(),
            None => out.push(o.clone()),
        }
    }
    out
}

/// The full guest config for a VM.
pub fn guest_config(spec: &VmSpec, image: &ImageConfig) -> Result<GuestConfig, GuestConfigError> {
    let args = argv(spec, image);
    if args.is_empty() {
        return Err(GuestConfigError::NoCommand(spec.image.clone()));
    }
    Ok(GuestConfig {
        version: GUEST_CONFIG_VERSION,
        hostname: spec.name.clone(),
        init_system: is_init_system(&args),
        process: GuestProcess {
            args,
            env: merge_env(&image.env, &spec.env),
            cwd: image.working_dir.clone(),
            user: image.user.clone(),
            tty: spec.tty,
            stdin: spec.interactive || spec.tty,
        },
        ssh_authorized_keys: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entrypoint: Option<Vec<&str>>, command: Vec<&str>) -> VmSpec {
        VmSpec {
            name: "web".into(),
            entrypoint: entrypoint.map(|v| v.into_iter().map(String::from).collect()),
            command: command.into_iter().map(String::from).collect(),
            env: vec!["B=2".into(), "C=3".into()],
            ..hearth_testkit::spec(1)
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/bin".into(), "B=1".into()],
            working_dir: "/work".into(),
            user: "app".into(),
            labels: Default::default(),
        }
    }

    #[test]
    fn argv_follows_docker_rules() {
        assert_eq!(argv(&spec(None, vec![]), &image()), ["/entry", "default"]);
        assert_eq!(argv(&spec(None, vec!["x"]), &image()), ["/entry", "x"]);
        assert_eq!(argv(&spec(Some(vec!["sh"]), vec![]), &image()), ["sh"]);
        assert_eq!(argv(&spec(Some(vec!["sh"]), vec!["-c", "id"]), &image()), ["sh", "-c", "id"]);
    }

    #[test]
    fn env_overrides_by_key_and_adds_path() {
        assert_eq!(merge_env(&image().env, &spec(None, vec![]).env), ["PATH=/bin", "B=2", "C=3"]);
        assert_eq!(merge_env(&[], &[]), [DEFAULT_PATH]);
    }

    #[test]
    fn config_carries_image_defaults() {
        let cfg = guest_config(&spec(None, vec![]), &image()).expect("config");
        assert_eq!(cfg.process.cwd, "/work");
        assert_eq!(cfg.process.user, "app");
        assert_eq!(cfg.hostname, "web");
        assert!(!cfg.init_system);
        let none = ImageConfig::default();
        assert!(guest_config(&spec(None, vec![]), &none).is_err());
        assert!(guest_config(&spec(None, vec!["/sbin/init"]), &none).expect("cfg").init_system);
    }
}
