//! Starting, finding and stopping a VM's Firecracker.
//!
//! Firecracker is started with only its API socket, configured through it, and left before
//! `InstanceStart`: the guest runs once its console is captured ([`start_guest`]). It writes no
//! pid file of its own: hearth writes `firecracker.pid`, and a process counts as this VM's only
//! while it is alive with the same start time and its command line names this VM's API socket.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hearth_types::Accel;

use super::{config, jail, API_SOCK, JAILER_LOG, LOG, METRICS, PID, RUNTIME_FILES};
use crate::console::{FIFO_IN, FIFO_OUT};
use crate::http::Api;

use crate::{LaunchSpec, Launched, VmmError};

const FIX: &str = "install Firecracker from its releases or set HEARTH_FIRECRACKER";

/// How long Firecracker may take to open its API socket.
const API_WAIT: Duration = Duration::from_secs(5);

/// Removes what a Firecracker that is gone left: sockets, FIFOs, the pid file, its jail.
pub fn remove_runtime_files(vm_dir: &Path) {
    crate::spawn::remove_files(vm_dir, &RUNTIME_FILES);
    jail::remove(vm_dir);
}

/// Starts Firecracker for `spec` and configures it; returns once it waits for `InstanceStart`.
/// With a `jailer` and a uid to run as, under the jailer ([`super::jail`]); else as it is.
pub fn launch(
    spec: &LaunchSpec,
    binary: &Path,
    jailer: Option<&Path>,
) -> Result<Launched, VmmError> {
    let spec = &crate::spawn::absolute(spec)?;
    let dir = &spec.vm_dir;
    let warning = crate::spawn::kvm_only("Firecracker", spec)?;
    if let Some((pid, _)) = super::FINDER.find_running(dir) {
        return Err(VmmError::AlreadyRunning { pid, vm_dir: dir.clone() });
    }
    remove_runtime_files(dir);
    let jail = spec.confinement.run_as.zip(jailer);
    // The jailer is given the binary's path, and its libraries are read from it.
    let found;
    let binary = match jail {
        Some(_) => {
            found = crate::jail::binary_file(binary, FIX)?;
            found.as_path()
        }
        None => binary,
    };
    let launched = launch_as(spec, binary, jail, warning);
    if launched.is_err() {
        jail::remove(dir);
    }
    launched
}

fn launch_as(
    spec: &LaunchSpec,
    binary: &Path,
    jail: Option<((u32, u32), &Path)>,
    warning: Option<String>,
) -> Result<Launched, VmmError> {
    let dir = &spec.vm_dir;
    // Jailed, Firecracker sees its files at the chroot's root, and its stderr (with the
    // jailer's) goes to a log outside the chroot.
    let (inside, held, stderr_log) = match jail {
        Some((ids, _)) => {
            let (inside, held) = jail::prepare(spec, binary, ids)?;
            let _ = std::fs::remove_file(dir.join(LOG));
            (inside, held, dir.join(JAILER_LOG))
        }
        None => (spec.clone(), vec![], dir.join(LOG)),
    };
    let log = crate::spawn::fresh_log(&stderr_log)?;
    let metrics = dir.join(METRICS);
    if jail.is_none() {
        std::fs::write(&metrics, b"").map_err(|source| VmmError::Io { path: metrics, source })?;
    }
    // Its reader is held until Firecracker is set up, so nothing it writes meanwhile fails.
    let (stdin, stdout, _reader) = serial_fifos(dir)?;
    let group = crate::spawn::cgroup(spec, false)?;
    let mut cmd = command(dir, binary, jail)?;
    // The logger is set on the command line: until it is, Firecracker logs to its stdout, which
    // is the guest's serial console here.
    cmd.arg("--api-sock")
        .arg(inside.vm_dir.join(API_SOCK))
        .arg("--log-path")
        .arg(inside.vm_dir.join(LOG))
        .args(["--level", "Warning", "--show-level"])
        .current_dir(dir)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(log);
    let start = crate::spawn::Start {
        vmm: "firecracker",
        fix: match jail {
            Some(_) => "install Firecracker's jailer from its releases (beside firecracker), set HEARTH_JAILER, or start hearthd with --no-jail",
            None => FIX,
        },
        binary: jail.map(|(_, j)| j).unwrap_or(binary),
        vm_dir: dir,
        pid_file: PID,
        log: &stderr_log,
        runtime_files: &RUNTIME_FILES,
        forks: jail.map(|_| jail::forked_pid as fn(&Path) -> Option<i32>),
        confine: None,
    };
    let (pid, start_time) = start.run(cmd, group.as_ref(), |pid, start_time| {
        let api = api(dir);
        api.wait_ready("/", pid, start_time, API_WAIT)?;
        for (path, body) in config::calls(&inside) {
            api.put(&path, &body)?;
        }
        match config::mmds(spec) {
            Some(data) => api.put("/mmds", &data),
            None => Ok(()),
        }
    })?;
    Ok(Launched { pid, start_time, accel: Accel::Kvm, warning, held })
}

/// The command that starts Firecracker: under its jailer, or as it is.
fn command(
    dir: &Path,
    binary: &Path,
    jail: Option<((u32, u32), &Path)>,
) -> Result<Command, VmmError> {
    Ok(match jail {
        Some(((uid, gid), jailer)) => {
            let mut cmd = Command::new(jailer);
            cmd.args(["--id", jail::ID, "--uid", &uid.to_string(), "--gid", &gid.to_string()])
                .arg("--new-pid-ns")
                .arg("--exec-file")
                .arg(jail::exec_file(dir, binary)?)
                .arg("--chroot-base-dir")
                .arg(dir)
                .arg("--");
            cmd
        }
        None => {
            let mut cmd = Command::new(binary);
            cmd.args(["--id", &instance_id(dir)]);
            cmd
        }
    })
}

/// The serial port's FIFOs, as Firecracker's stdin and stdout: hearth's console capture reads
/// and writes their other ends. Its input is opened read-write, so it never sees an end of
/// file; its output write-only, so with no capture attached (hearthd restarting) output is
/// dropped, never blocking the guest. Returns a reader of the output too: opening it for
/// writing needs one.
fn serial_fifos(dir: &Path) -> Result<(File, File, File), VmmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { path, source }
    };
    let (fifo_out, fifo_in) = (dir.join(FIFO_OUT), dir.join(FIFO_IN));
    for f in [&fifo_out, &fifo_in] {
        crate::sys::mkfifo(f, 0o600).map_err(io(f))?;
    }
    let stdin = OpenOptions::new().read(true).write(true).open(&fifo_in).map_err(io(&fifo_in))?;
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_out)
        .map_err(io(&fifo_out))?;
    let stdout = OpenOptions::new().write(true).open(&fifo_out).map_err(io(&fifo_out))?;
    Ok((stdin, stdout, reader))
}

/// Firecracker's instance id (letters, digits and '-', at most 64): the VM directory's name.
fn instance_id(dir: &Path) -> String {
    let id: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if id.trim_matches('-').is_empty() {
        "hearth-vm".to_owned()
    } else {
        id
    }
}

/// The VM's API, in its jail when it has one.
fn api(dir: &Path) -> Api {
    Api::firecracker(&jail::host_path(dir, API_SOCK))
}

/// The instance's state as Firecracker reports it (`Not started`, `Running`, `Paused`).
pub fn state(dir: &Path) -> Result<String, VmmError> {
    let info = api(dir).get("/")?;
    Ok(info.get("state").and_then(|s| s.as_str()).unwrap_or_default().to_owned())
}

/// `InstanceStart`, once; with `only_if_never_started`, only for a VM that was configured and
/// never started (a crash between launch and start). Returns whether it started the guest.
pub async fn start_guest(vm_dir: &Path, only_if_never_started: bool) -> Result<bool, VmmError> {
    let dir = vm_dir.to_owned();
    api(vm_dir)
        .off_runtime(move |api| {
            if only_if_never_started && state(&dir)? != "Not started" {
                return Ok(false);
            }
            api.put("/actions", &serde_json::json!({ "action_type": "InstanceStart" }))?;
            Ok(true)
        })
        .await
}

/// Pauses the guest's vCPUs (`PATCH /vm` to `Paused`).
pub async fn pause(vm_dir: &Path) -> Result<(), VmmError> {
    set_vm_state(vm_dir, "Paused").await
}

/// Resumes a paused guest (`PATCH /vm` to `Resumed`).
pub async fn resume(vm_dir: &Path) -> Result<(), VmmError> {
    set_vm_state(vm_dir, "Resumed").await
}

async fn set_vm_state(vm_dir: &Path, to: &'static str) -> Result<(), VmmError> {
    api(vm_dir).off_runtime(move |api| api.patch("/vm", &serde_json::json!({ "state": to }))).await
}

/// Waits until a Firecracker found running answers on its API socket.
pub async fn wait_set_up(vm_dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
    api(vm_dir).off_runtime(move |api| api.wait_ready("/", pid, start, API_WAIT)).await
}

/// Ctrl-Alt-Del through the emulated keyboard (the guest's init decides what it means), then,
/// after `grace`, SIGKILL; a zero grace kills at once. Returns once the process is gone.
pub async fn stop(vm_dir: &Path, pid: i32, start: u64, grace: Duration) -> Result<(), VmmError> {
    let ctrl_alt_del = serde_json::json!({ "action_type": "SendCtrlAltDel" });
    let ask = api(vm_dir).off_runtime(move |api| api.put("/actions", &ctrl_alt_del));
    crate::spawn::stop("firecracker", (pid, start), grace, ask, || remove_runtime_files(vm_dir))
        .await
}
