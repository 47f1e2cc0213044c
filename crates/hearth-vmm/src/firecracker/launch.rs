//! Starting, finding and stopping a VM's Firecracker.
//!
//! Firecracker is started with only its API socket, configured through it, and left before
//! `InstanceStart`: the guest runs once its console is captured ([`start_guest`]). It writes no
//! pid file of its own: hearth writes `firecracker.pid`, and a process counts as this VM's only
//! while it is alive with the same start time and its command line names this VM's API socket.

use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_types::Accel;

use super::api::{api_error, Api};
use super::{config, API_SOCK, LOG, METRICS, PID, RUNTIME_FILES};
use crate::console::{FIFO_IN, FIFO_OUT};
use crate::process::{is_alive, read_pidfile, wait_exit};
use crate::{LaunchSpec, Launched, VmmError};

/// How long Firecracker may take to open its API socket.
const API_WAIT: Duration = Duration::from_secs(5);

/// Removes what a Firecracker that is gone left: sockets, FIFOs, the pid file.
pub fn remove_runtime_files(vm_dir: &Path) {
    for name in RUNTIME_FILES {
        let _ = std::fs::remove_file(vm_dir.join(name));
    }
    // Firecracker's hybrid vsock makes `agent.sock_PORT` for connections the guest opens.
    if let Ok(rd) = std::fs::read_dir(vm_dir) {
        for e in rd.flatten() {
            if e.file_name().as_bytes().starts_with(b"agent.sock_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The Firecracker running for `vm_dir`, as (pid, start time).
pub fn find_running(vm_dir: &Path) -> Option<(i32, u64)> {
    let (pid, start) = read_pidfile(&vm_dir.join(PID))?;
    names_vm(pid, vm_dir).then_some((pid, start))
}

/// True when `pid`, started at `start`, is still this VM's Firecracker.
pub fn is_vmm_of(vm_dir: &Path, pid: i32, start: u64) -> bool {
    is_alive(pid, start) && names_vm(pid, vm_dir)
}

fn names_vm(pid: i32, vm_dir: &Path) -> bool {
    crate::process::arg_of(pid, b"--api-sock").as_deref()
        == Some(vm_dir.join(API_SOCK).as_os_str().as_bytes())
}

/// Every live Firecracker whose API socket lies in a directory under `vms_dir`, as (VM
/// directory, pid), found from /proc alone (a predecessor may have died before the pid file).
pub fn scan(vms_dir: &Path) -> Vec<(PathBuf, i32)> {
    crate::process::scan_vmms(vms_dir, b"--api-sock", API_SOCK)
}

/// Starts Firecracker for `spec` and configures it; returns once it waits for `InstanceStart`.
pub fn launch(spec: &LaunchSpec, binary: &Path) -> Result<Launched, VmmError> {
    let spec = &crate::spawn::absolute(spec)?;
    let dir = &spec.vm_dir;
    if spec.accel == Accel::Tcg {
        return Err(VmmError::Accel(
            "Firecracker runs guests only with KVM: --accel tcg is QEMU's; use --vmm qemu".into(),
        ));
    }
    let warning = crate::accel::kvm_unusable(&crate::accel::HostFacts::probe()).map(|why| {
        format!("KVM may not run guests here ({why}); Firecracker has no software emulation")
    });
    if let Some((pid, _)) = find_running(dir) {
        return Err(VmmError::AlreadyRunning { pid, vm_dir: dir.clone() });
    }
    remove_runtime_files(dir);
    let log_path = dir.join(LOG);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { path, source }
    };
    // Fresh per boot, so a start error quotes this boot's messages only.
    std::fs::write(&log_path, b"").map_err(io(&log_path))?;
    std::fs::write(dir.join(METRICS), b"").map_err(io(&dir.join(METRICS)))?;
    let log = OpenOptions::new().append(true).open(&log_path).map_err(io(&log_path))?;
    // The serial port is Firecracker's stdin and stdout: FIFOs hearth's console capture reads
    // and writes. Its input is opened read-write, so it never sees an end of file; its output
    // write-only, so with no capture attached (hearthd restarting) output is dropped, never
    // blocking the guest.
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
    let group = crate::spawn::cgroup(spec, false)?;
    // Its instance id (letters, digits and '-', at most 64): the VM directory's name.
    let id: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    let id = if id.trim_matches('-').is_empty() { "hearth-vm".to_owned() } else { id };
    let mut cmd = Command::new(binary);
    // The logger is set on the command line: until it is, Firecracker logs to its stdout, which
    // is the guest's serial console here.
    cmd.arg("--api-sock")
        .arg(dir.join(API_SOCK))
        .args(["--id", &id])
        .arg("--log-path")
        .arg(&log_path)
        .args(["--level", "Warning", "--show-level"])
        .current_dir(dir)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(log);
    crate::sys::detach_and_join(&mut cmd, group.as_ref().map(|g| g.join_fds()).unwrap_or_default());
    let started = (|| {
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: binary.display().to_string(),
            fix: "install Firecracker from its releases or set HEARTH_FIRECRACKER",
            source,
        })?;
        let pid = child.id() as i32;
        let start_time = crate::start_time(pid);
        let configured = (|| -> Result<u64, VmmError> {
            let start_time =
                start_time.ok_or_else(|| api_error("it exited right after starting"))?;
            hearth_fs::atomic_write(&dir.join(PID), pid.to_string().as_bytes())
                .map_err(io(&dir.join(PID)))?;
            wait_api(dir, pid, start_time)?;
            let api = Api::new(&dir.join(API_SOCK));
            for (path, body) in config::calls(spec) {
                api.put(&path, &body)?;
            }
            if let Some(data) = config::mmds(spec) {
                api.put("/mmds", &data)?;
            }
            Ok(start_time)
        })();
        match configured {
            Ok(start_time) => {
                // Not waited for here: reaped when its exit is seen (crate::process::wait_exit).
                drop(child);
                Ok((pid, start_time))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(VmmError::Start {
                    vmm: "firecracker",
                    log: format!("{e}; {}:\n{}", log_path.display(), crate::spawn::tail(&log_path)),
                })
            }
        }
    })();
    drop(reader);
    match started {
        Ok((pid, start_time)) => Ok(Launched { pid, start_time, accel: Accel::Kvm, warning }),
        Err(e) => {
            remove_runtime_files(dir);
            if let Some(g) = &group {
                g.remove();
            }
            Err(e)
        }
    }
}

/// Waits until the API socket answers, or the process is gone.
fn wait_api(dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
    let api = Api::new(&dir.join(API_SOCK));
    let deadline = Instant::now() + API_WAIT;
    loop {
        match api.get("/") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline || !is_alive(pid, start) => {
                return Err(api_error(format!("the API socket never answered: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The instance's state as Firecracker reports it (`Not started`, `Running`, `Paused`).
fn state(dir: &Path) -> Result<String, VmmError> {
    let info = Api::new(&dir.join(API_SOCK)).get("/")?;
    Ok(info.get("state").and_then(|s| s.as_str()).unwrap_or_default().to_owned())
}

/// `InstanceStart`, once; with `only_if_never_started`, only for a VM that was configured and
/// never started (a crash between launch and start). Returns whether it started the guest.
pub async fn start_guest(vm_dir: &Path, only_if_never_started: bool) -> Result<bool, VmmError> {
    let dir = vm_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        if only_if_never_started && state(&dir)? != "Not started" {
            return Ok(false);
        }
        let api = Api::new(&dir.join(API_SOCK));
        api.put("/actions", &serde_json::json!({ "action_type": "InstanceStart" }))?;
        Ok(true)
    })
    .await
    .map_err(|e| api_error(e.to_string()))?
}

/// Waits until a Firecracker found running answers on its API socket.
pub async fn wait_set_up(vm_dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
    let dir = vm_dir.to_owned();
    tokio::task::spawn_blocking(move || wait_api(&dir, pid, start))
        .await
        .map_err(|e| api_error(e.to_string()))?
}

/// Ctrl-Alt-Del through the emulated keyboard (the guest's init decides what it means), then,
/// after `grace`, SIGKILL; a zero grace kills at once. Returns once the process is gone.
pub async fn stop(vm_dir: &Path, pid: i32, start: u64, grace: Duration) -> Result<(), VmmError> {
    if !is_alive(pid, start) {
        remove_runtime_files(vm_dir);
        return Ok(());
    }
    if !grace.is_zero() {
        let dir = vm_dir.to_owned();
        let asked = tokio::task::spawn_blocking(move || {
            Api::new(&dir.join(API_SOCK))
                .put("/actions", &serde_json::json!({ "action_type": "SendCtrlAltDel" }))
        })
        .await;
        if matches!(asked, Ok(Ok(())))
            && tokio::time::timeout(grace, wait_exit(pid, start)).await.is_ok()
        {
            remove_runtime_files(vm_dir);
            return Ok(());
        }
    }
    crate::spawn::kill_and_wait("firecracker", pid, start).await?;
    remove_runtime_files(vm_dir);
    Ok(())
}
