//! Building the processes hearth-init starts: the workload and `hearth exec` commands.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::{sys, user};

/// What to run, as the host resolved it.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub hostname: String,
}

/// A spawn failure as a shell reports it: 127 not found, 126 not executable, 125 otherwise.
#[derive(Debug)]
pub struct SpawnError {
    pub code: i32,
    pub message: String,
}

fn key(e: &str) -> &str {
    e.split_once('=').map_or(e, |(k, _)| k)
}

/// Merges `extra` over `base` by key.
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let mut out = base.to_vec();
    for e in extra {
        match out.iter_mut().find(|x| key(x) == key(e)) {
            Some(slot) => *slot = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}

/// A ready-to-spawn command. `ctty` is the fd (in the child) to make the controlling terminal.
pub fn command(spec: &Spec, ctty: Option<i32>) -> Result<Command, SpawnError> {
    let fail = |code, message| SpawnError { code, message };
    let Some(program) = spec.args.first() else { return Err(fail(125, "no command to run".into())) };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let ids = user::resolve(&spec.user, &passwd, &group).map_err(|m| fail(125, m))?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| key(e) == "HOME") {
        env.push(format!("HOME={}", ids.home));
    }
    if !env.iter().any(|e| key(e) == "HOSTNAME") && !spec.hostname.is_empty() {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    if !env.iter().any(|e| key(e) == "PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let cwd = if spec.cwd.is_empty() { "/".to_owned() } else { spec.cwd.clone() };
    // Docker creates a missing WORKDIR; so does hearth.
    if std::fs::create_dir_all(&cwd).is_err() {
        return Err(fail(125, format!("cannot create the working directory {cwd}")));
    }
    let path = env.iter().find(|e| key(e) == "PATH").and_then(|e| e.split_once('=')).map(|(_, v)| v.to_owned()).unwrap_or_default();
    if !program.contains('/') && !path.split(':').any(|d| std::path::Path::new(d).join(program).is_file()) {
        return Err(fail(127, format!("exec: \"{program}\": executable file not found in $PATH")));
    }
    let mut cmd = Command::new(program);
    cmd.args(&spec.args[1..]).env_clear().current_dir(&cwd);
    for e in &env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        cmd.env(k, v);
    }
    let (uid, gid, groups) = (ids.uid, ids.gid, ids.groups.clone());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            sys::setsid_ctty(ctty)?;
            sys::setgroups(&groups)?;
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Maps an exec failure of `spawn` to a shell-style error.
pub fn spawn_error(program: &str, e: &std::io::Error) -> SpawnError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => 125,
    };
    SpawnError { code, message: format!("exec {program}: {e}") }
}

/// The workload: stdio on the console (stdin only with a terminal).
pub fn spawn_workload(spec: &Spec, tty: bool, stdin: bool) -> Result<std::process::Child, SpawnError> {
    let mut cmd = command(spec, tty.then_some(0))?;
    if tty || stdin {
        let console =
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/console").map_err(|e| spawn_error("/dev/console", &e))?;
        cmd.stdin(console);
    } else {
        cmd.stdin(Stdio::null());
    }
    cmd.spawn().map_err(|e| spawn_error(&spec.args[0], &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merges_by_key() {
        let m = merge_env(&["A=1".into(), "B=2".into()], &["B=3".into(), "C=4".into()]);
        assert_eq!(m, ["A=1", "B=3", "C=4"]);
    }
}
