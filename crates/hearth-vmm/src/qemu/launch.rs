//! Starting QEMU and stopping it.
//!
//! QEMU is started in a session of its own (setsid), inside its cgroup, with its output in
//! qemu.log, and is "started" once its QMP monitor greets: it has set up every device and waits,
//! paused, for `cont` ([`resume`]). An exit before that is a start failure quoting qemu.log. It
//! outlives hearthd (reparented when hearthd exits) and is found again by pid + start time; while
//! hearthd runs it is hearthd's child, reaped when its exit is seen (crate::process).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::qmp::qmp_error;
use crate::process::{is_alive, wait_exit};
use crate::qemu::{find_running, qemu_args, Features, Qmp, QBOOT};
use crate::spawn::{absolute, tail};
use crate::{resolve_accel, LaunchSpec, Launched, VmmError};
use hearth_types::Accel;

/// Files QEMU leaves behind when it is killed rather than exiting on its own.
const RUNTIME_FILES: [&str; 4] = ["console.sock", "agent.sock", "qmp.sock", "qemu.pid"];

/// How long QEMU may take to set up its devices.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until QEMU's QMP monitor greets (every device set up), or QEMU exits, or the timeout.
fn wait_started(child: &mut std::process::Child, qmp: &Path) -> Result<(), String> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("it exited while starting ({status})"));
        }
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(qmp) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut first = [0u8; 1];
            if s.read(&mut first).is_ok_and(|n| n == 1) {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("it did not answer on {} within {START_TIMEOUT:?}", qmp.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the QEMU binary supports, asked once per binary (`-help`, a few milliseconds).
fn features(binary: &Path) -> Features {
    static SEEN: std::sync::Mutex<Vec<(PathBuf, Features)>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, f)) = seen.iter().find(|(b, _)| b == binary) {
        return *f;
    }
    let help = Command::new(binary)
        .arg("-help")
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let f = Features::from_help(&help.unwrap_or_default());
    seen.push((binary.to_owned(), f));
    f
}

/// qboot for the `pc` machine where Debian ships it.
fn bios(accel: Accel) -> Option<PathBuf> {
    let q = Path::new(QBOOT);
    (accel == Accel::Tcg && q.exists()).then(|| q.to_owned())
}

/// Removes sockets and the pid file of a QEMU that is gone, so a stale pid file can never be
/// read as a live VMM later.
pub fn remove_runtime_files(vm_dir: &Path) {
    for name in RUNTIME_FILES {
        let _ = std::fs::remove_file(vm_dir.join(name));
    }
    crate::virtiofs::stop_all(vm_dir);
}

/// Starts QEMU for `spec` and returns once it runs, its guest paused: capture the console
/// ([`crate::console::Console::capture`]), then [`resume`]. The returned pid is the daemon's,
/// read from its pid file, with its start time so later checks survive pid reuse.
pub fn launch(spec: &LaunchSpec) -> Result<Launched, VmmError> {
    let (accel, warning) = resolve_accel(spec.accel)?;
    let spec = absolute(spec)?;
    let dir = &spec.vm_dir;
    if let Some((pid, _)) = find_running(dir) {
        return Err(VmmError::AlreadyRunning { pid, vm_dir: dir.clone() });
    }
    remove_runtime_files(dir);
    let log_path = dir.join("qemu.log");
    let io = |source| VmmError::Io { path: log_path.clone(), source };
    // Fresh per boot, so a start error quotes this boot's messages only. Errors before QEMU
    // opens its `-D` file arrive through these descriptors.
    std::fs::write(&log_path, b"").map_err(io)?;
    let log = std::fs::OpenOptions::new().append(true).open(&log_path).map_err(io)?;
    let binary = spec.binary.clone().unwrap_or_else(|| "qemu-system-x86_64".into());
    let f = features(&binary);
    if spec.confinement.run_as.is_some() && !f.run_with {
        tracing::warn!(binary = %binary.display(), "this QEMU cannot drop privileges (-run-with needs QEMU 9.1 or later): the VMM runs as root");
    }
    if !f.sandbox {
        tracing::warn!(binary = %binary.display(), "this QEMU has no seccomp sandbox (-sandbox): the VMM runs without one");
    }
    let args = qemu_args(&spec, accel, bios(accel).as_deref(), f);
    tracing::debug!(vm_dir = %dir.display(), binary = %binary.display(), ?args, "starting qemu");
    let group = crate::spawn::cgroup(&spec, accel == Accel::Tcg)?;
    let mut cmd = Command::new(&binary);
    cmd.args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    // The macvtaps' devices, opened here (as root) and handed over as descriptors 3, 4, ...
    let macvtaps = (spec.networks.iter().filter_map(|n| n.macvtap.as_deref()))
        .map(|name| {
            let dev = crate::macvtap::open(name)?;
            crate::sys::dup_high(&dev.into()).map_err(|e| VmmError::Control {
                api: "macvtap",
                message: format!("duplicating {name}'s device: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let inherit = (macvtaps.iter().zip(super::config::MACVTAP_FD..))
        .map(|(f, to)| {
            use std::os::fd::AsRawFd;
            (f.as_raw_fd(), to)
        })
        .collect();
    let joins = group.as_ref().map(|g| g.join_fds()).unwrap_or_default();
    crate::sys::detach_and_join(&mut cmd, joins, inherit);
    let started = (|| {
        // The shares' backends listen first; QEMU connects to them (as root, before it drops
        // to the VM's uid) while it sets up its devices.
        crate::virtiofs::start(&spec.volumes, dir, None)?;
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: binary.display().to_string(),
            fix: "install Debian's qemu-system-x86 or set HEARTH_QEMU",
            source,
        })?;
        let started = wait_started(&mut child, &dir.join("qmp.sock"))
            .and_then(|()| spec.incoming.as_deref().map_or(Ok(()), |s| load_state(dir, s)));
        if let Err(e) = started {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmmError::Start {
                vmm: "qemu",
                log: format!("{e}; {}:\n{}", log_path.display(), tail(&log_path)),
            });
        }
        let pid = child.id() as i32;
        // Not waited for here: reaped when its exit is seen (crate::process::wait_exit).
        drop(child);
        let start_time = crate::start_time(pid).ok_or_else(|| VmmError::Start {
            vmm: "qemu",
            log: format!(
                "it exited right after starting; {}:\n{}",
                log_path.display(),
                tail(&log_path)
            ),
        })?;
        Ok((pid, start_time))
    })();
    let (pid, start_time) = match started {
        Ok(p) => p,
        Err(e) => {
            if let Some(g) = &group {
                g.remove();
            }
            crate::virtiofs::stop_all(dir);
            return Err(e);
        }
    };
    Ok(Launched { pid, start_time, accel, warning, held: vec![] })
}

/// How long saving or loading a guest's state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// The name QEMU knows the state file's descriptor by.
const STATE_FD: &str = "hearth-state";

/// Waits until the migration QEMU runs (out to a state file, or in from one) has completed.
async fn migration_done(q: &mut Qmp, what: &str) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let m = q.execute("query-migrate", None).await?;
        match m["status"].as_str().unwrap_or_default() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = m["error-desc"].as_str().unwrap_or("QEMU gave no reason");
                return Err(qmp_error(format!("{what} the guest's state failed: {why}")));
            }
            _ if tokio::time::Instant::now() > deadline => {
                return Err(qmp_error(format!(
                    "{what} the guest's state took over {MIGRATION_TIMEOUT:?}"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Saves the running guest's memory and device state into the new file `to`: its CPUs are
/// stopped, the state streamed (QMP `migrate` to a descriptor hearth opened, so a QEMU in its
/// chroot needs no path to it), its disks flushed; the CPUs stay stopped ([`resume`] lets
/// them run). Returns QEMU's version, which a restore needs again.
pub async fn save_state(vm_dir: &Path, to: &Path) -> Result<String, VmmError> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| VmmError::Io { path: to.to_owned(), source };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io)?;
    let mut q = qmp(vm_dir).await?;
    q.execute("stop", None).await?;
    let fd = serde_json::json!({ "fdname": STATE_FD });
    q.execute_with_fd("getfd", Some(fd), file.as_fd()).await?;
    q.execute("migrate", Some(serde_json::json!({ "uri": format!("fd:{STATE_FD}") }))).await?;
    migration_done(&mut q, "saving").await?;
    file.sync_all().map_err(io)?;
    let v = q.execute("query-version", None).await?;
    let n = |k: &str| v["qemu"][k].as_u64().unwrap_or_default();
    Ok(format!("QEMU {}.{}.{}", n("major"), n("minor"), n("micro")))
}

/// Loads a state file into a QEMU started with `-incoming defer` (QMP `migrate-incoming` from a
/// descriptor hearth opened); the guest stays paused. Blocking: it runs its own small runtime,
/// as a launch runs off the async one.
fn load_state(vm_dir: &Path, state: &Path) -> Result<(), String> {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(state).map_err(|e| format!("{}: {e}", state.display()))?;
    let load = async {
        let mut q = qmp(vm_dir).await?;
        let fd = serde_json::json!({ "fdname": STATE_FD });
        q.execute_with_fd("getfd", Some(fd), file.as_fd()).await?;
        let uri = serde_json::json!({ "uri": format!("fd:{STATE_FD}") });
        q.execute("migrate-incoming", Some(uri)).await?;
        migration_done(&mut q, "restoring").await
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(load).map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("restoring the guest's state panicked".into()))
    })
}

/// Freezes the guest's CPUs (QMP `stop`): QEMU's state becomes `paused`, never `prelaunch`.
pub async fn pause(vm_dir: &Path) -> Result<(), VmmError> {
    qmp(vm_dir).await?.execute("stop", None).await.map(drop)
}

/// Lets a guest launched paused (`-S`), or paused since, run: QMP `cont`. Call it once the
/// console is captured.
pub async fn resume(vm_dir: &Path) -> Result<(), VmmError> {
    qmp(vm_dir).await?.execute("cont", None).await.map(drop)
}

/// The VM's QMP session, connected within [`QMP_TIMEOUT`].
async fn qmp(vm_dir: &Path) -> Result<Qmp, VmmError> {
    tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(&vm_dir.join("qmp.sock")))
        .await
        .map_err(|_| qmp_error("qemu did not answer on its QMP socket"))?
}

/// Waits until a QEMU found running (not launched by this process) has finished setting up:
/// it answers on QMP, so its console and agent sockets exist. A predecessor that died right
/// after spawning it leaves one still starting.
pub async fn wait_set_up(vm_dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match qmp(vm_dir).await {
            Ok(_) => return Ok(()),
            Err(e) if !is_alive(pid, start) || tokio::time::Instant::now() > deadline => {
                return Err(e)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Resumes a guest that never got its first `cont` (QMP status `prelaunch`: hearthd stopped
/// between launch and resume); leaves any other guest as it is. Returns whether it resumed.
pub async fn resume_if_prelaunch(vm_dir: &Path) -> Result<bool, VmmError> {
    let mut q = qmp(vm_dir).await?;
    if q.status().await? != "prelaunch" {
        return Ok(false);
    }
    q.execute("cont", None).await.map(|_| true)
}

/// How [`stop`] ended the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    AlreadyGone,
    /// The guest powered off after the ACPI request, within the timeout.
    PoweredOff,
    /// It had to be killed.
    Killed,
}

/// Grace period for the QMP exchange itself, within the caller's timeout.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the guest to power off through ACPI (QMP `system_powerdown`), waits until `timeout`,
/// then kills the VMM. Returns once it is gone, with its sockets and pid file removed.
pub async fn stop(
    vm_dir: &Path,
    pid: i32,
    start: u64,
    timeout: Duration,
) -> Result<Stopped, VmmError> {
    if !is_alive(pid, start) {
        remove_runtime_files(vm_dir);
        return Ok(Stopped::AlreadyGone);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let asked = async {
        let mut q = Qmp::connect(&vm_dir.join("qmp.sock")).await?;
        q.powerdown().await
    };
    let how = match tokio::time::timeout(QMP_TIMEOUT.min(timeout), asked).await {
        Ok(Ok(())) if tokio::time::timeout_at(deadline, wait_exit(pid, start)).await.is_ok() => {
            Stopped::PoweredOff
        }
        outcome => {
            if let Ok(Err(e)) = outcome {
                tracing::debug!(pid, error = %e, "acpi powerdown not delivered; killing");
            }
            crate::spawn::kill_and_wait("qemu", pid, start).await?;
            Stopped::Killed
        }
    };
    remove_runtime_files(vm_dir);
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_become_absolute() {
        let spec = LaunchSpec {
            vm_dir: "vms/a".into(),
            kernel: "/k".into(),
            initrd: "i".into(),
            cmdline: String::new(),
            root_disk: "vms/a/disk.img".into(),
            config_disk: "/c".into(),
            cpus: 1,
            memory_mib: 128,
            accel: Accel::Tcg,
            binary: None,
            networks: vec![],
            volumes: vec![],
            confinement: Default::default(),
            cloud_init: Default::default(),
            incoming: None,
        };
        let a = absolute(&spec).expect("absolute");
        assert!(a.vm_dir.is_absolute() && a.initrd.is_absolute() && a.root_disk.is_absolute());
        assert_eq!(a.kernel, PathBuf::from("/k"));
    }

    #[test]
    fn a_missing_binary_says_what_to_install() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = LaunchSpec {
            binary: Some(dir.path().join("no-such-qemu")),
            ..hearth_testkit::launch_spec(dir.path())
        };
        let e = launch(&spec).expect_err("no binary");
        assert!(e.to_string().contains("qemu-system-x86"), "{e}");
    }
}
