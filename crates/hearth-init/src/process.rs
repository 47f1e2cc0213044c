//! Building the processes hearth-init starts: the workload and `hearth exec` commands.
//!
//! The program is resolved here, against the process's own `PATH` (a default one when it has
//! none), so failures get a shell's exit codes: 127 when nothing is found, 126 when what is found
//! cannot be executed. The environment is exactly the one given, plus `HOME` (from
//! /etc/passwd) and `HOSTNAME` when unset.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use crate::sys::{self, ChildSetup};

/// `PATH` used to find the program when the process's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Held while spawning and while reaping. std's `spawn` waits for a child whose exec failed;
/// if PID 1's reaper took that child first, std would panic, so the two never overlap.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// Serialises spawning against reaping (see [`SPAWN_LOCK`]).
pub fn spawn_guard() -> MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

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

fn is_executable(p: &Path) -> Option<bool> {
    let m = std::fs::metadata(p).ok()?;
    Some(m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `program` like a shell: a name with a slash is taken as is (relative to `cwd`),
/// anything else is searched in `path`.
pub fn resolve(program: &str, path: &str, cwd: &Path) -> Result<PathBuf, SpawnError> {
    let denied = |p: &Path| SpawnError {
        code: 126,
        message: format!("exec {}: permission denied (not an executable file)", p.display()),
    };
    if program.is_empty() {
        return Err(SpawnError { code: 127, message: "exec: empty command".into() });
    }
    if program.contains('/') {
        let p = cwd.join(program);
        return match is_executable(&p) {
            Some(true) => Ok(PathBuf::from(program)),
            Some(false) => Err(denied(&p)),
            None => Err(SpawnError {
                code: 127,
                message: format!("exec {program}: no such file or directory"),
            }),
        };
    }
    let mut not_executable = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = cwd.join(dir).join(program);
        match is_executable(&candidate) {
            Some(true) => return Ok(Path::new(dir).join(program)),
            Some(false) if not_executable.is_none() => not_executable = Some(candidate),
            _ => {}
        }
    }
    match not_executable {
        Some(p) => Err(denied(&p)),
        None => Err(SpawnError {
            code: 127,
            message: format!("exec: \"{program}\": executable file not found in $PATH"),
        }),
    }
}

/// A ready-to-spawn command. `ctty` is the fd (in the child) to make the controlling terminal;
/// `new_session` is false only when PID 1 execs an init system itself.
pub fn command(spec: &Spec, ctty: Option<i32>, new_session: bool) -> Result<Command, SpawnError> {
    let fail = |code, message| SpawnError { code, message };
    let Some(program) = spec.args.first() else {
        return Err(fail(125, "no command to run: the image has no entrypoint or cmd".into()));
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let ids = hearth_types::user::resolve(&spec.user, &passwd, &group).map_err(|m| fail(126, m))?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| key(e) == "HOME") {
        env.push(format!("HOME={}", ids.home));
    }
    if !env.iter().any(|e| key(e) == "HOSTNAME") && !spec.hostname.is_empty() {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    let cwd = if spec.cwd.is_empty() { "/".to_owned() } else { spec.cwd.clone() };
    // Docker creates a missing WORKDIR; so does hearth.
    if let Err(e) = std::fs::create_dir_all(&cwd) {
        return Err(fail(125, format!("cannot create the working directory {cwd}: {e}")));
    }
    let path = env
        .iter()
        .find(|e| key(e) == "PATH")
        .and_then(|e| e.split_once('='))
        .map_or(DEFAULT_PATH, |(_, v)| v);
    let resolved = resolve(program, path, Path::new(&cwd))?;
    let mut cmd = Command::new(resolved);
    cmd.arg0(program).args(&spec.args[1..]).env_clear().current_dir(&cwd);
    for e in &env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        cmd.env(k, v);
    }
    sys::configure_child(
        &mut cmd,
        ChildSetup { new_session, ctty, groups: ids.groups, gid: ids.gid, uid: ids.uid },
    );
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

/// Spawns under [`SPAWN_LOCK`].
pub fn spawn(cmd: &mut Command, program: &str) -> Result<Child, SpawnError> {
    let _g = spawn_guard();
    cmd.spawn().map_err(|e| spawn_error(program, &e))
}

/// The workload: stdout and stderr on the console; stdin the console with a terminal (or `-i`),
/// else /dev/null.
pub fn spawn_workload(spec: &Spec, tty: bool, stdin: bool) -> Result<Child, SpawnError> {
    let mut cmd = command(spec, tty.then_some(0), true)?;
    if tty || stdin {
        let console = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .map_err(|e| spawn_error("/dev/console", &e))?;
        cmd.stdin(console);
    } else {
        cmd.stdin(Stdio::null());
    }
    spawn(&mut cmd, &spec.args[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merges_by_key() {
        let m = merge_env(&["A=1".into(), "B=2".into()], &["B=3".into(), "C=4".into()]);
        assert_eq!(m, ["A=1", "B=3", "C=4"]);
    }

    #[test]
    fn programs_resolve_like_a_shell() {
        let dir = tempfile::tempdir().expect("tmp");
        let (bin, other) = (dir.path().join("bin"), dir.path().join("other"));
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::create_dir_all(&other).expect("mkdir");
        let write = |p: PathBuf, mode: u32| {
            std::fs::write(&p, b"#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(bin.join("tool"), 0o755);
        write(other.join("data"), 0o644);
        write(other.join("tool"), 0o755);
        let path = format!("{}:{}", bin.display(), other.display());
        let cwd = Path::new("/");
        assert_eq!(resolve("tool", &path, cwd).expect("found"), bin.join("tool"));
        assert_eq!(resolve("data", &path, cwd).expect_err("not executable").code, 126);
        assert_eq!(resolve("ghost", &path, cwd).expect_err("missing").code, 127);
        assert!(resolve("ghost", &path, cwd)
            .expect_err("missing")
            .message
            .contains("not found in $PATH"));
        assert_eq!(
            resolve("./bin/tool", "", dir.path()).expect("relative"),
            PathBuf::from("./bin/tool")
        );
        assert_eq!(resolve("/nonexistent/x", &path, cwd).expect_err("missing").code, 127);
        assert_eq!(
            resolve(&bin.display().to_string(), &path, cwd).expect_err("a directory").code,
            126
        );
        assert_eq!(resolve("", &path, cwd).expect_err("empty").code, 127);
    }

    #[test]
    fn spawned_commands_get_exactly_their_environment() {
        let spec = Spec {
            args: vec!["sh".into(), "-c".into(), "env | sort".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "A=1".into()],
            cwd: String::new(),
            user: String::new(),
            hostname: "box".into(),
        };
        let Ok(mut cmd) = command(&spec, None, true) else { panic!("command") };
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipping: setgroups needs root ({e})");
                return;
            }
            Err(e) => panic!("run: {e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut vars: Vec<&str> =
            text.lines().map(key).filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_").collect();
        vars.sort_unstable();
        let home_is_root = text.lines().any(|l| l.starts_with("HOME=/"));
        assert!(home_is_root, "{text}");
        assert_eq!(vars, ["A", "HOME", "HOSTNAME", "PATH"], "{text}");
    }

    #[test]
    fn children_start_with_no_signal_blocked() {
        // Like PID 1, block what init collects, on this thread (the one that forks).
        sys::block_signals(&[libc::SIGTERM, libc::SIGCHLD]);
        let spec = Spec {
            args: vec!["grep".into(), "SigBlk".into(), "/proc/self/status".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            ..Default::default()
        };
        let Ok(mut cmd) = command(&spec, None, true) else { panic!("command") };
        let Ok(out) = cmd.output() else {
            eprintln!("skipping: cannot spawn here (not root?)");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "SigBlk:\t0000000000000000", "{text}");
    }
}
