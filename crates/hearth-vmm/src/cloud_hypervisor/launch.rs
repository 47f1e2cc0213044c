//! Starting, finding and stopping a VM's Cloud Hypervisor.
//!
//! Cloud Hypervisor is started with only its API socket and given the VM with `vm.create`,
//! which makes the devices (the serial port's socket among them) but runs nothing: the guest
//! runs at `vm.boot` ([`start_guest`]), once its console is captured. With a uid to run as, it
//! runs confined ([`super::jail`]). It logs to its standard error, `cloud-hypervisor.log` in
//! the VM's directory. hearth writes `cloud-hypervisor.pid`; a process counts as this VM's only
//! while it is alive with the same start time and its command line names this VM's API socket
//! (at its jail's root when confined).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_types::Accel;

use super::{config, jail, API_SOCK, LOG, PID, RUNTIME_FILES};
use crate::http::Api;

use crate::{LaunchSpec, Launched, VmmError};

/// How long Cloud Hypervisor may take to open its API socket.
const API_WAIT: Duration = Duration::from_secs(5);
const PING: &str = "/api/v1/vmm.ping";

const FIX: &str = "install Cloud Hypervisor from its releases or set HEARTH_CLOUD_HYPERVISOR";

/// Removes what a Cloud Hypervisor that is gone left: sockets, the lock file, the pid file,
/// its jail.
pub fn remove_runtime_files(vm_dir: &Path) {
    crate::spawn::remove_files(vm_dir, &RUNTIME_FILES);
    crate::virtiofs::stop_all(vm_dir);
    jail::remove(vm_dir);
}

/// The VM's API, in its jail when it has one.
fn api(dir: &Path) -> Api {
    Api::cloud_hypervisor(&crate::jail::host_path(dir, API_SOCK))
}

/// Every file the VM needs, there before Cloud Hypervisor is started: it opens the kernel and
/// initramfs only at `vm.boot`, after hearth has reported the VM created.
fn check_inputs(spec: &LaunchSpec) -> Result<(), VmmError> {
    let files = [&spec.kernel, &spec.initrd, &spec.root_disk, &spec.config_disk];
    for f in files.into_iter().chain(crate::virtiofs::disks(&spec.volumes).map(|v| &v.path)) {
        std::fs::metadata(f).map_err(|source| VmmError::Io { path: f.clone(), source })?;
    }
    Ok(())
}

/// Starts Cloud Hypervisor for `spec` and creates the VM; returns before `vm.boot`. With
/// `confine` and a uid to run as, in its jail as that uid.
pub fn launch(spec: &LaunchSpec, binary: &Path, confine: bool) -> Result<Launched, VmmError> {
    let spec = &crate::spawn::absolute(spec)?;
    let dir = &spec.vm_dir;
    let warning = crate::spawn::kvm_only("Cloud Hypervisor", spec)?;
    if let Some((pid, _)) = super::FINDER.find_running(dir) {
        return Err(VmmError::AlreadyRunning { pid, vm_dir: dir.clone() });
    }
    check_inputs(spec)?;
    remove_runtime_files(dir);
    let launched = match spec.confinement.run_as.filter(|_| confine) {
        Some(ids) => {
            let binary = crate::jail::binary_file(binary, FIX)?;
            let (inside, held) = jail::prepare(spec, &binary, ids)?;
            let root = jail::root(dir);
            // The shares' sockets are in its chroot, its uid's to connect to at vm.boot.
            crate::virtiofs::start(&spec.volumes, &root, Some(ids))
                .and_then(|()| start(spec, &inside, Path::new(jail::BINARY), Some((&root, ids))))
                .map(|l| Launched { held, ..l })
        }
        None => crate::virtiofs::start(&spec.volumes, dir, None)
            .and_then(|()| start(spec, spec, binary, None)),
    };
    if launched.is_err() {
        crate::virtiofs::stop_all(dir);
        jail::remove(dir);
    }
    Ok(Launched { warning, ..launched? })
}

/// Starts `binary` (as it is named from where it runs: its jail's root when `confine` names
/// one) and creates the VM `inside` describes, as it sees its files.
fn start(
    spec: &LaunchSpec,
    inside: &LaunchSpec,
    binary: &Path,
    confine: Option<(&Path, (u32, u32))>,
) -> Result<Launched, VmmError> {
    let dir = &spec.vm_dir;
    let log_path = dir.join(LOG);
    let log = crate::spawn::fresh_log(&log_path)?;
    let err = log.try_clone().map_err(|source| VmmError::Io { path: log_path.clone(), source })?;
    let group = crate::spawn::cgroup(spec, false)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--api-socket")
        .arg(inside.vm_dir.join(API_SOCK))
        .args(["--seccomp", "true"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    let start = crate::spawn::Start {
        vmm: "cloud-hypervisor",
        fix: FIX,
        binary,
        vm_dir: dir,
        pid_file: PID,
        log: &log_path,
        runtime_files: &RUNTIME_FILES,
        forks: None,
        confine,
    };
    let (pid, start_time) = start.run(cmd, group.as_ref(), |pid, start_time| {
        let api = api(dir);
        api.wait_ready(PING, pid, start_time, API_WAIT)?;
        api.put("/api/v1/vm.create", &config::vm_config(inside))?;
        // A macvtap's card: vm.create takes no descriptors, vm.add-net does (SCM_RIGHTS).
        for (i, n) in spec.networks.iter().enumerate() {
            let Some(name) = n.macvtap.as_deref() else { continue };
            use std::os::fd::AsRawFd;
            let dev = crate::macvtap::open(name)?;
            let card = serde_json::json!({ "id": config::card_id(i), "mac": n.mac });
            api.put_with_fds("/api/v1/vm.add-net", &card, &[dev.as_raw_fd()])?;
        }
        Ok(())
    })?;
    Ok(Launched { pid, start_time, accel: Accel::Kvm, warning: None, held: vec![] })
}

/// The VM's state as Cloud Hypervisor reports it (`Created`, `Running`, `Paused`, `Shutdown`).
pub fn state(vm_dir: &Path) -> Result<String, VmmError> {
    let info = api(vm_dir).get("/api/v1/vm.info")?;
    Ok(info.get("state").and_then(|s| s.as_str()).unwrap_or_default().to_owned())
}

/// `vm.boot`, once; with `only_if_never_started`, only for a VM that was created and never
/// booted (a crash between launch and start). Returns whether it booted the guest.
pub async fn start_guest(vm_dir: &Path, only_if_never_started: bool) -> Result<bool, VmmError> {
    let dir = vm_dir.to_owned();
    api(vm_dir)
        .off_runtime(move |api| {
            if only_if_never_started && state(&dir)? != "Created" {
                return Ok(false);
            }
            api.put_empty("/api/v1/vm.boot")?;
            Ok(true)
        })
        .await
}

/// Waits until a Cloud Hypervisor found running answers on its API socket.
pub async fn wait_set_up(vm_dir: &Path, pid: i32, start: u64) -> Result<(), VmmError> {
    api(vm_dir).off_runtime(move |api| api.wait_ready(PING, pid, start, API_WAIT)).await
}

/// Pauses the guest's vCPUs (`vm.pause`).
pub async fn pause(vm_dir: &Path) -> Result<(), VmmError> {
    api(vm_dir).off_runtime(|api| api.put_empty("/api/v1/vm.pause")).await
}

/// Resumes a paused guest (`vm.resume`).
pub async fn resume(vm_dir: &Path) -> Result<(), VmmError> {
    api(vm_dir).off_runtime(|api| api.put_empty("/api/v1/vm.resume")).await
}

/// How long Cloud Hypervisor gets to end itself on `vmm.shutdown` before it is killed.
const VMM_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The ACPI power button (the guest powers off, which ends Cloud Hypervisor); after `grace`,
/// `vmm.shutdown` (Cloud Hypervisor ends itself), then SIGKILL; a zero grace kills at once.
/// Returns once the process is gone.
pub async fn stop(vm_dir: &Path, pid: i32, start: u64, grace: Duration) -> Result<(), VmmError> {
    if !grace.is_zero() && crate::process::is_alive(pid, start) {
        let ended = |within| tokio::time::timeout(within, crate::process::wait_exit(pid, start));
        let pressed = api(vm_dir).off_runtime(|api| api.put_empty("/api/v1/vm.power-button"));
        if !(pressed.await.is_ok() && ended(grace).await.is_ok()) {
            // The guest did not power off: the VMM is asked to end before it is killed.
            let shutdown = api(vm_dir).off_runtime(|api| api.put_empty("/api/v1/vmm.shutdown"));
            if shutdown.await.is_ok() {
                let _ = ended(VMM_SHUTDOWN_WAIT).await;
            }
        }
    }
    let nothing_to_ask = async { Ok(()) };
    crate::spawn::stop("cloud-hypervisor", (pid, start), Duration::ZERO, nothing_to_ask, || {
        remove_runtime_files(vm_dir)
    })
    .await
}
