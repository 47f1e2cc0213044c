//! The reconcile loop: observe, plan (hearth-core), execute one step, persist, repeat.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_core::{plan, Observed, Step, MAX_ITERATIONS};
use hearth_types::{Desired, NetworkMode, VmId, VmRecord, VmState};
use tonic::Status;
use tracing::{info, info_span, warn, Instrument};

use crate::daemon::{internal, now_millis, Daemon};

/// How long a guest gets to stop by itself before it is killed, unless `stop -t` says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest may take from VMM start to hearth-init's ready report.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Per-call knobs for a reconcile run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub stop_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { stop_timeout: DEFAULT_STOP_TIMEOUT }
    }
}

/// Files of a VM's directory.
pub fn disk_path(d: &Daemon, id: &VmId) -> std::path::PathBuf {
    d.vm_dir(id).join("disk.img")
}
pub fn config_path(d: &Daemon, id: &VmId) -> std::path::PathBuf {
    d.vm_dir(id).join("config.img")
}

/// The live VMM of a VM, if any: the recorded pid when it is still this VM's VMM (same start
/// time, a command line naming the VM's files), else the one the pid file names, with the same
/// check (a crash between launch and recording the pid). A pid now held by anything else is
/// no VMM of this VM's, whatever the files say.
fn observe_vmm(dir: &Path, rec: &VmRecord) -> (Option<(i32, u64)>, bool) {
    if let (Some(pid), Some(start)) = (rec.status.pid, rec.status.pid_start_time) {
        if hearth_vmm::is_vmm_of(dir, pid, start) {
            return (Some((pid, start)), true);
        }
    }
    (hearth_vmm::find_running(dir), false)
}

fn observe(d: &Daemon, rec: &VmRecord) -> (Observed, Option<(i32, u64)>) {
    let dir = d.vm_dir(&rec.spec.id);
    let (vmm, recorded) = observe_vmm(&dir, rec);
    let obs = Observed {
        dir: dir.exists(),
        disk: disk_path(d, &rec.spec.id).exists(),
        config_disk: config_path(d, &rec.spec.id).exists(),
        vmm_alive: vmm.is_some(),
        vmm_recorded: recorded,
    };
    (obs, vmm)
}

/// Brings one VM to its desired state. Holds the VM's lock throughout.
pub async fn reconcile(d: &Arc<Daemon>, id: &VmId, opts: Options) -> Result<Option<VmRecord>, Status> {
    let lock = d.lock_for(id);
    let _guard = lock.lock().await;
    reconcile_locked(d, id, opts).await
}

/// As [`reconcile`], for callers that already hold the VM's lock.
pub async fn reconcile_locked(d: &Arc<Daemon>, id: &VmId, opts: Options) -> Result<Option<VmRecord>, Status> {
    for attempt in 0..MAX_ITERATIONS {
        let Some(mut rec) = d.get(id)? else { return Ok(None) };
        let (obs, vmm) = observe(d, &rec);
        let steps = plan(&rec, &obs);
        let Some(step) = steps.first().copied() else { return Ok(Some(rec)) };
        let span = info_span!("step", vm = %id, name = %rec.spec.name, ?step, attempt);
        let done = execute(d, &mut rec, step, vmm, opts).instrument(span).await;
        if let Err(e) = done {
            // A failed start is recorded on the VM, so `ps` and `inspect` say why.
            if step == Step::Launch || step == Step::CreateDisk || step == Step::WriteConfigDisk {
                if let Ok(Some(mut cur)) = d.get(id) {
                    cur.status.state = VmState::Failed;
                    cur.status.reason = e.message().to_owned();
                    cur.desired = Desired::Stopped;
                    d.save(&cur)?;
                }
            }
            return Err(e);
        }
    }
    Err(Status::internal(format!("vm {id} did not settle after {MAX_ITERATIONS} reconcile rounds; see hearthd's log")))
}

/// The image a VM was created from; it may have been removed with `image rm --force`.
fn image_of(d: &Daemon, rec: &VmRecord) -> Result<hearth_types::ImageRecord, Status> {
    d.images
        .get(&rec.spec.image_id)
        .map_err(internal)?
        .ok_or_else(|| Status::failed_precondition(format!("image {} was removed; pull it again", rec.spec.image)))
}

/// The images of a VM's volumes, with whether each is shared read-only.
fn volume_images(d: &Daemon, rec: &VmRecord) -> Result<Vec<(hearth_types::ImageRecord, bool)>, Status> {
    rec.spec
        .volumes
        .iter()
        .map(|v| {
            let img = d.images.get(&v.image_id).map_err(internal)?;
            let img =
                img.ok_or_else(|| Status::failed_precondition(format!("volume {}: image {} was removed; pull it again", v.id, v.image)))?;
            Ok((img, v.read_only))
        })
        .collect()
}

/// The guest config a VM's config disk holds: the image's process with the VM's overrides, the
/// host's resolvers on the bridge, cloud-init's network-config when asked for. Create checks it
/// (size, USER) with the same function that writes it.
pub fn guest_config_for(spec: &hearth_types::VmSpec, image: &hearth_types::ImageConfig) -> Result<hearth_types::GuestConfig, Status> {
    let mut cfg = hearth_core::guest_config(spec, image).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let (Some(net), NetworkMode::Bridge) = (cfg.network.as_mut(), spec.network) {
        net.dns = crate::net::host_resolvers();
    }
    if let (Some(device), Some(net)) = (&spec.cloud_init_network, &cfg.network) {
        cfg.cloud_init.entry("network-config".into()).or_insert_with(|| hearth_core::cloud_init_network_config(device, net));
    }
    Ok(cfg)
}

/// The VM's own copy of its `index`th (writable) volume.
pub fn volume_path(vm_dir: &Path, index: usize) -> std::path::PathBuf {
    vm_dir.join(format!("volume-{index}.img"))
}

async fn execute(d: &Arc<Daemon>, rec: &mut VmRecord, step: Step, vmm: Option<(i32, u64)>, opts: Options) -> Result<(), Status> {
    let id = rec.spec.id.clone();
    match step {
        Step::CreateDisk => {
            let image = image_of(d, rec)?;
            let volumes = volume_images(d, rec)?;
            let (dk, size) = (disk_path(d, &id), rec.spec.disk_bytes);
            let (d2, dir) = (d.clone(), d.vm_dir(&id));
            let method = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                // Volumes first: the root disk's existence marks the step done.
                for (i, (img, read_only)) in volumes.iter().enumerate() {
                    let base = d2.images.rootfs(img)?;
                    let path = volume_path(&dir, i);
                    if !read_only && !path.exists() {
                        let len = std::fs::metadata(&base)?.len();
                        hearth_storage::clone_disk(&base, &path, len)?;
                    }
                }
                let base = d2.images.rootfs(&image)?;
                Ok(hearth_storage::clone_disk(&base, &dk, size)?)
            })
            .await
            .map_err(internal)?
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
            info!(?method, "root disk created");
            rec.status.disk_path = Some(disk_path(d, &id).display().to_string());
            d.save(rec)
        }
        Step::WriteConfigDisk => {
            let cfg = guest_config_for(&rec.spec, &image_of(d, rec)?.config)?;
            hearth_storage::create_config_disk(&config_path(d, &id), &cfg).map_err(internal)
        }
        Step::Launch => launch(d, rec).await,
        Step::AdoptVmm => {
            let (pid, start) = vmm.ok_or_else(|| Status::internal("no vmm to adopt"))?;
            info!(pid, "adopting a running VMM");
            take_over(d, &rec.spec).await;
            rec.status.pid = Some(pid);
            rec.status.pid_start_time = Some(start);
            if rec.status.state != VmState::Running {
                rec.status.state = VmState::Starting;
            }
            d.save(rec)?;
            spawn_watchers(d, &id, pid, start, rec.status.state == VmState::Starting);
            Ok(())
        }
        Step::Stop => {
            let (pid, start) = vmm.ok_or_else(|| Status::internal("no vmm to stop"))?;
            rec.status.state = VmState::Stopping;
            d.save(rec)?;
            stop_vmm(d, &id, pid, start, opts.stop_timeout).await;
            Ok(())
        }
        Step::Kill => {
            let (pid, start) = vmm.ok_or_else(|| Status::internal("no vmm to kill"))?;
            hearth_vmm::kill(pid, start, libc::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(10), hearth_vmm::wait_exit(pid, start)).await;
            Ok(())
        }
        Step::RecordExit => {
            record_exit(d, rec)?;
            if rec.spec.network == NetworkMode::Bridge && !rec.spec.ports.is_empty() {
                // Its ports go with it.
                if let Err(e) = crate::net::sync_nat(d, Some(&id)) {
                    warn!(error = %e.message(), "removing the VM's port forwards failed");
                }
            }
            Ok(())
        }
        Step::Remove => {
            if rec.spec.network == NetworkMode::Bridge {
                // The VMM is gone; its tap goes with it a moment later, or is deleted here.
                let tap = hearth_types::net::tap_name(&id);
                if let Err(e) = hearth_net::remove_tap(&tap, Duration::from_secs(2)).await {
                    warn!(tap, error = %e, "removing the VM's tap failed");
                }
                if !rec.spec.ports.is_empty() {
                    if let Err(e) = crate::net::sync_nat(d, Some(&id)) {
                        warn!(error = %e.message(), "removing the VM's port forwards failed");
                    }
                }
            }
            crate::console::forget(d, &id);
            if let Some(cg) = d.cgroup_of(&id) {
                hearth_vmm::cgroup::remove(&cg);
            }
            d.forget(rec)
        }
    }
}

async fn launch(d: &Arc<Daemon>, rec: &mut VmRecord) -> Result<(), Status> {
    let id = rec.spec.id.clone();
    let dir = d.vm_dir(&id);
    let (kernels, init, name) = (d.clone(), d.init_binary.clone(), rec.spec.kernel.clone());
    let (kernel, initrd) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        if kernels.kernels.get(&name)?.is_none() {
            anyhow::bail!("kernel {name} was removed; import it again with `hearth kernel import`");
        }
        Ok((kernels.kernels.kernel_path(&name), kernels.kernels.initramfs(&name, &init)?))
    })
    .await
    .map_err(internal)?
    .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
    hearth_storage::clear_exit_record(&config_path(d, &id)).map_err(internal)?;
    rec.status.console_offset = crate::console::log_end(d, &id);
    let net = crate::net::plan(&rec.spec)?;
    let volumes = {
        let (d2, images, dir) = (d.clone(), volume_images(d, rec)?, dir.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<hearth_vmm::VolumeDisk>> {
            let mut out = Vec::new();
            for (i, (img, read_only)) in images.iter().enumerate() {
                // Read-only volumes share the image's cached filesystem; the others have a copy.
                let path = if *read_only { d2.images.rootfs(img)? } else { volume_path(&dir, i) };
                out.push(hearth_vmm::VolumeDisk { path, serial: hearth_types::guest::volume_serial(i), read_only: *read_only });
            }
            Ok(out)
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?
    };
    let tap = net.as_ref().and_then(|(card, _)| card.tap.clone());
    if tap.is_some() {
        hearth_net::ensure_bridge(&hearth_net::Bridge::hearth0())
            .await
            .map_err(|e| Status::failed_precondition(format!("setting up the bridge network: {e}")))?;
    }
    crate::net::claim(d, &rec.spec)?;
    let uid = match d.claim_uid() {
        Ok(u) => u,
        Err(e) => return Err(unclaim(d, &rec.spec, e)),
    };
    let tcg = hearth_vmm::resolve_accel(rec.spec.accel).map_or(true, |(a, _)| a == hearth_types::Accel::Tcg);
    let confinement = hearth_vmm::Confinement {
        run_as: uid.map(|u| (u, u)),
        cgroup: d
            .cgroup_of(&id)
            .map(|_| hearth_vmm::cgroup::Limits::for_vm(&d.cgroup_parent, id.as_str(), rec.spec.cpus, rec.spec.memory_mib, tcg)),
    };
    let spec = hearth_vmm::LaunchSpec {
        vm_dir: dir.clone(),
        kernel,
        initrd,
        cmdline: rec.spec.kernel_args.clone(),
        root_disk: disk_path(d, &id),
        config_disk: config_path(d, &id),
        cpus: rec.spec.cpus,
        memory_mib: rec.spec.memory_mib,
        accel: rec.spec.accel,
        qemu_binary: std::env::var_os("HEARTH_QEMU").map(Into::into),
        network: net.as_ref().map(|(card, _)| card.clone()),
        volumes,
        confinement,
    };
    rec.status.started_at = Some(now_millis());
    let launched = match tokio::task::spawn_blocking(move || hearth_vmm::launch(&spec)).await.map_err(internal) {
        Ok(Ok(l)) => l,
        Ok(Err(hearth_vmm::VmmError::AlreadyRunning { pid, .. })) => {
            // A VMM appeared for this VM since it was observed: adopt it on the next round.
            warn!(pid, "a VMM already runs for this VM; adopting it instead of launching another");
            d.settle_uid(uid);
            let _ = crate::net::settle(d, &rec.spec, true);
            return Ok(());
        }
        Ok(Err(e)) => {
            d.settle_uid(uid);
            return Err(unclaim(d, &rec.spec, Status::failed_precondition(format!("{e:#}"))));
        }
        Err(e) => {
            d.settle_uid(uid);
            return Err(unclaim(d, &rec.spec, e));
        }
    };
    // The guest waits, paused, until its network and console are in place; anything that
    // cannot be set up undoes the launch.
    let ready = async {
        if let Some(tap) = &tap {
            hearth_net::attach(tap, &hearth_net::Bridge::hearth0().name)
                .await
                .map_err(|e| format!("attaching the VM's tap to the bridge: {e}"))?;
        }
        crate::console::capture(d, &rec.spec).await.map_err(|e| format!("capturing the VM's console: {e}"))?;
        hearth_vmm::resume(&dir).await.map_err(|e| format!("starting the guest's CPUs: {e}"))
    };
    if let Err(why) = ready.await {
        hearth_vmm::kill(launched.pid, launched.start_time, libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), hearth_vmm::wait_exit(launched.pid, launched.start_time)).await;
        crate::console::closed(d, &id).await;
        hearth_vmm::remove_runtime_files(&dir);
        if let Some(cg) = d.cgroup_of(&id) {
            hearth_vmm::cgroup::remove(&cg);
        }
        d.settle_uid(uid);
        return Err(unclaim(d, &rec.spec, Status::failed_precondition(why)));
    }
    if let Some(w) = &launched.warning {
        warn!("{w}");
    }
    rec.status.pid = Some(launched.pid);
    rec.status.pid_start_time = Some(launched.start_time);
    rec.status.accel = launched.accel.to_string();
    rec.status.state = VmState::Starting;
    rec.status.reason = launched.warning.clone().unwrap_or_default();
    rec.status.exit_code = None;
    rec.status.ready_at = None;
    rec.status.boot = None;
    rec.status.finished_at = None;
    rec.status.boots += 1;
    rec.status.ssh_port = net.as_ref().and_then(|(_, ssh)| *ssh);
    rec.status.ip = hearth_core::guest_network(&rec.spec).map(|n| n.address);
    rec.status.vmm_uid = uid;
    let saved = d.save(rec);
    d.settle_uid(uid);
    // The record carries the ports from here on (or, unsaved, the launch is undone by the watcher).
    let _ = crate::net::settle(d, &rec.spec, saved.is_err());
    saved?;
    info!(pid = launched.pid, accel = %launched.accel, "vmm started");
    spawn_watchers(d, &id, launched.pid, launched.start_time, true);
    Ok(())
}

/// Takes over a running VMM hearthd did not launch in this run: captures its console and lets a
/// guest left waiting for its first `cont` (a crash between launch and resume) run.
async fn take_over(d: &Daemon, spec: &hearth_types::VmSpec) {
    let id = &spec.id;
    if let Err(e) = crate::console::capture(d, spec).await {
        warn!(vm = %id, error = %e, "capturing the VM's console failed; its output is not logged");
    }
    match hearth_vmm::resume_if_prelaunch(&d.vm_dir(id)).await {
        Ok(true) => info!(vm = %id, "resumed a guest that was launched but never started"),
        Ok(false) => {}
        Err(e) => warn!(vm = %id, error = %e, "asking the VM's QEMU for its status failed"),
    }
}

/// Takes back a failed launch's claim on its published ports, keeping the launch's error.
fn unclaim(d: &Daemon, spec: &hearth_types::VmSpec, launch_error: Status) -> Status {
    if let Err(e) = crate::net::settle(d, spec, true) {
        warn!(error = %e.message(), "taking back the failed launch's port forwards failed");
    }
    launch_error
}

/// Watches a VMM until it exits (then reconciles), and, while the guest boots, waits for
/// hearth-init's ready report.
pub fn spawn_watchers(d: &Arc<Daemon>, id: &VmId, pid: i32, start: u64, await_ready: bool) {
    let (d1, id1) = (d.clone(), id.clone());
    tokio::spawn(async move {
        hearth_vmm::wait_exit(pid, start).await;
        info!(vm = %id1, pid, "vmm exited");
        // Everything the guest wrote is in the log before the exit is recorded.
        crate::console::closed(&d1, &id1).await;
        d1.forget_agent(&id1).await;
        if let Err(e) = reconcile(&d1, &id1, Options::default()).await {
            warn!(vm = %id1, error = %e.message(), "reconcile after vmm exit failed");
        }
    });
    if await_ready {
        let (d2, id2) = (d.clone(), id.clone());
        tokio::spawn(async move {
            let ready = async {
                let agent = d2.agent(&id2).await?;
                agent.wait_ready(tokio::time::Instant::now() + READY_TIMEOUT).await
            };
            match ready.await {
                Ok(r) => mark_ready(&d2, &id2, pid, r).await,
                Err(e) => info!(vm = %id2, error = %e, "no ready report from the guest"),
            }
        });
    }
}

async fn mark_ready(d: &Arc<Daemon>, id: &VmId, pid: i32, r: hearth_types::agent::Ready) {
    let lock = d.lock_for(id);
    let _guard = lock.lock().await;
    if let Ok(Some(mut rec)) = d.get(id) {
        if rec.status.pid == Some(pid) && rec.status.state == VmState::Starting {
            rec.status.state = VmState::Running;
            let now = now_millis();
            rec.status.ready_at = Some(now);
            rec.status.boot = Some(hearth_types::BootTimings {
                vmm_to_ready_ms: now.saturating_sub(rec.status.started_at.unwrap_or(now)),
                kernel_to_init_ms: r.init_started_ms,
                init_to_ready_ms: r.ready_ms.saturating_sub(r.init_started_ms),
            });
            if let Err(e) = d.save(&rec) {
                warn!(vm = %id, error = %e.message(), "recording readiness failed");
            }
        }
    }
}

/// Agent shutdown first (the guest flushes and unmounts), then ACPI, then kill.
async fn stop_vmm(d: &Arc<Daemon>, id: &VmId, pid: i32, start: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let asked = tokio::time::timeout(Duration::from_secs(2), async {
        let agent = d.agent(id).await?;
        agent.shutdown().await
    })
    .await;
    if matches!(asked, Ok(Ok(()))) && tokio::time::timeout_at(deadline, hearth_vmm::wait_exit(pid, start)).await.is_ok() {
        return;
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Err(e) = hearth_vmm::stop(&d.vm_dir(id), pid, start, left).await {
        warn!(vm = %id, error = %e, "graceful stop failed; killing");
        hearth_vmm::kill(pid, start, libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), hearth_vmm::wait_exit(pid, start)).await;
    }
}

/// The VMM is gone: read the guest's exit record and settle the VM as stopped. Its sockets and
/// pid file go too, so nothing can mistake them for a live VMM later.
fn record_exit(d: &Daemon, rec: &mut VmRecord) -> Result<(), Status> {
    hearth_vmm::remove_runtime_files(&d.vm_dir(&rec.spec.id));
    if let Some(cg) = d.cgroup_of(&rec.spec.id) {
        hearth_vmm::cgroup::remove(&cg);
    }
    rec.status.vmm_uid = None;
    let exit = hearth_storage::read_exit_record(&config_path(d, &rec.spec.id)).unwrap_or_else(|e| {
        warn!(vm = %rec.spec.id, error = %e, "unreadable exit record");
        None
    });
    let was_stopping = rec.status.state == VmState::Stopping || rec.desired == Desired::Stopped;
    match exit {
        Some(x) => {
            rec.status.exit_code = Some(x.exit_code);
            rec.status.reason = x.error.unwrap_or_default();
        }
        None if was_stopping => {
            rec.status.exit_code = Some(137);
            rec.status.reason = "stopped".into();
        }
        None => {
            rec.status.exit_code = None;
            rec.status.reason = "vmm exited unexpectedly (killed outside hearth, or it crashed; see qemu.log)".into();
        }
    }
    rec.status.state = VmState::Stopped;
    rec.status.finished_at = Some(now_millis());
    rec.status.pid = None;
    rec.status.pid_start_time = None;
    rec.status.ip = None;
    rec.status.ssh_port = None;
    rec.desired = if rec.spec.auto_remove { Desired::Deleted } else { Desired::Stopped };
    d.save(rec)
}

/// On daemon start: re-adopt live VMMs, record the ones that died while hearthd was down, and
/// finish half-done work.
pub async fn recover(d: &Arc<Daemon>) {
    let records = match d.vms.list() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "listing VMs for recovery failed");
            return;
        }
    };
    // A VMM launched by a predecessor that died before recording it, or before the VMM wrote its
    // pid file: the pid file is written for it, so it is adopted, never launched twice.
    for (dir, pid, _) in hearth_vmm::qemu::scan(&d.root.join("vms")) {
        if hearth_vmm::find_running(&dir).is_none_or(|(p, _)| p != pid) {
            info!(dir = %dir.display(), pid, "found a VMM without its pid file");
            if let Err(e) = std::fs::write(dir.join("qemu.pid"), pid.to_string()) {
                warn!(dir = %dir.display(), error = %e, "writing the found VMM's pid file failed");
            }
        }
    }
    for rec in records {
        let id = rec.spec.id.clone();
        let dir = d.vm_dir(&id);
        if let (Some((pid, start)), true) = observe_vmm(&dir, &rec) {
            info!(vm = %id, pid, "re-adopting running VM");
            if rec.spec.network == NetworkMode::Bridge {
                // A crash between launch and attach left the tap off the bridge; attaching is idempotent.
                if let Err(e) = hearth_net::attach(&hearth_types::net::tap_name(&id), &hearth_net::Bridge::hearth0().name).await {
                    warn!(vm = %id, error = %e, "re-attaching the VM's tap to the bridge failed");
                }
            }
            take_over(d, &rec.spec).await;
            spawn_watchers(d, &id, pid, start, rec.status.state == VmState::Starting);
            if rec.desired != Desired::Running || rec.status.state == VmState::Stopping {
                // A stop or rm saved just before the crash is carried out now.
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = reconcile(&d, &id, Options::default()).await {
                        warn!(vm = %id, error = %e.message(), "finishing an interrupted stop or rm failed");
                    }
                });
            }
            continue;
        }
        if let Err(e) = reconcile(d, &id, Options::default()).await {
            warn!(vm = %id, error = %e.message(), "recovery reconcile failed");
        }
    }
    // The table may have been flushed (or lost with a reboot) while hearthd was down.
    let bridged_live = d.vms.list().unwrap_or_default().iter().any(|r| {
        r.spec.network == NetworkMode::Bridge && matches!(r.status.state, VmState::Starting | VmState::Running | VmState::Stopping)
    });
    if bridged_live {
        if let Err(e) = crate::net::sync_nat(d, None) {
            warn!(error = %e.message(), "rebuilding the bridge's port forwards failed");
        }
    }
}
