//! One function per step of the plan.

use std::sync::Arc;
use std::time::Duration;

use hearth_types::{Desired, VmRecord, VmState};
use tracing::{info, warn};

use super::{Options, Reconciler};
use crate::ports::{Confinement, LaunchSpec, Launched, VmmError, VmmHandle};
use crate::{Error, Result, Step};

impl Reconciler {
    pub(super) async fn execute(
        self: &Arc<Self>,
        rec: &mut VmRecord,
        step: Step,
        vmm: Option<VmmHandle>,
        opts: Options,
    ) -> Result<()> {
        let p = &self.ports;
        match step {
            Step::CreateDisk => {
                let path = p.disks.create(rec).await?;
                info!(disk = %path.display(), "root disk created");
                rec.status.disk_path = Some(path.display().to_string());
                p.repo.save(rec)
            }
            Step::WriteConfigDisk => p.disks.write_config(rec).await,
            Step::Launch => self.launch(rec).await,
            Step::AdoptVmm => {
                self.adopt(rec, vmm.ok_or_else(|| Error::internal("no vmm to adopt"))?).await
            }
            Step::Stop => {
                let h = vmm.ok_or_else(|| Error::internal("no vmm to stop"))?;
                if rec.status.paused {
                    // A frozen guest can neither hear a power-off request nor carry it out.
                    let dir = p.repo.vm_dir(&rec.spec.id);
                    if let Err(e) = p.vmms.of(rec.spec.provider).set_paused(&dir, false).await {
                        warn!(vm = %rec.spec.id, error = %e, "resuming the paused guest to stop it failed");
                    }
                    rec.status.paused = false;
                }
                rec.status.state = VmState::Stopping;
                p.repo.save(rec)?;
                self.stop_vmm(rec, h, opts.stop_timeout).await;
                Ok(())
            }
            Step::Kill => {
                let h = vmm.ok_or_else(|| Error::internal("no vmm to kill"))?;
                self.kill_now(rec, h).await;
                Ok(())
            }
            Step::RecordExit => {
                self.record_exit(rec)?;
                p.network.release(&rec.spec, false).await;
                self.schedule_restart(rec);
                Ok(())
            }
            Step::Remove => {
                p.network.release(&rec.spec, true).await;
                p.guests.forget(&rec.spec.id, true).await;
                p.vmms
                    .of(rec.spec.provider)
                    .cleanup(&p.repo.vm_dir(&rec.spec.id), &p.sandbox.of(&rec.spec));
                p.repo.remove(rec)?;
                self.locks.forget(&rec.spec.id);
                Ok(())
            }
        }
    }

    /// Kills the VMM now and waits for it to go.
    pub(super) async fn kill_now(&self, rec: &VmRecord, h: VmmHandle) {
        let dir = self.ports.repo.vm_dir(&rec.spec.id);
        if let Err(e) = self.ports.vmms.of(rec.spec.provider).stop(&dir, h, Duration::ZERO).await {
            warn!(vm = %rec.spec.id, error = %e, "killing the VMM failed");
        }
    }

    /// Records a live VMM found by its own files (a crash before its pid was recorded) and
    /// takes it over.
    async fn adopt(self: &Arc<Self>, rec: &mut VmRecord, h: VmmHandle) -> Result<()> {
        info!(pid = h.pid, "adopting a running VMM");
        self.take_over(rec, h).await;
        rec.status.pid = Some(h.pid);
        rec.status.pid_start_time = Some(h.start_time);
        if rec.status.state != VmState::Running {
            rec.status.state = VmState::Starting;
        }
        self.ports.repo.save(rec)?;
        self.spawn_watchers(&rec.spec, h, rec.status.state == VmState::Starting);
        Ok(())
    }

    /// Takes over a running VMM not launched in this run: captures its console and lets a guest
    /// left waiting for its start (a crash between launch and start) run.
    pub(super) async fn take_over(&self, rec: &VmRecord, h: VmmHandle) {
        let id = &rec.spec.id;
        let vmm = self.ports.vmms.of(rec.spec.provider);
        if let Err(e) = vmm.wait_set_up(&self.ports.repo.vm_dir(id), h).await {
            warn!(vm = %id, error = %e, "the VMM did not finish setting up");
        }
        if let Err(e) = self.ports.guests.capture_console(&rec.spec).await {
            warn!(vm = %id, error = %e, "capturing the VM's console failed; its output is not logged");
        }
        match vmm.start_guest(&self.ports.repo.vm_dir(id), true).await {
            Ok(true) => info!(vm = %id, "resumed a guest that was launched but never started"),
            Ok(false) => {}
            Err(e) => warn!(vm = %id, error = %e, "asking the VMM for the guest's state failed"),
        }
    }

    async fn launch(self: &Arc<Self>, rec: &mut VmRecord) -> Result<()> {
        let p = &self.ports;
        let id = rec.spec.id.clone();
        let vmm = p.vmms.of(rec.spec.provider);
        let formats = vmm.capabilities().kernel_formats;
        let (kernel, initrd) =
            p.kernels.boot_files(&rec.spec.kernel, formats, rec.spec.initrd.as_deref()).await?;
        p.disks.clear_exit(rec)?;
        rec.status.console_offset = p.guests.console_offset(&id);
        let net = p.network.plan(&rec.spec)?;
        let (root_disk, config_disk, volumes) = p.disks.attach(rec).await?;
        // A thin device's node may differ from one activation to the next: the record says
        // the one this boot uses.
        rec.status.disk_path = Some(root_disk.display().to_string());
        p.network.prepare(&rec.spec).await?;
        let confinement = match p.sandbox.claim(&rec.spec) {
            Ok(c) => c,
            Err(e) => return Err(self.unclaim(rec, e)),
        };
        // A VM made from a snapshot restores its guest, once; it boots from its disk after.
        let incoming = match (&rec.spec.snapshot, rec.status.restore_pending) {
            (Some(name), true) => {
                let state = p.snapshots.state_file(name);
                if p.snapshots.get(name)?.is_none() {
                    return Err(Error::precondition(format!(
                        "snapshot {name}, which this VM is to be restored from, was removed: remove the VM and make another"
                    )));
                }
                Some(state)
            }
            _ => None,
        };
        let spec = LaunchSpec {
            vm_dir: p.repo.vm_dir(&id),
            kernel,
            initrd,
            cmdline: rec.spec.kernel_args.clone(),
            root_disk,
            config_disk,
            cpus: rec.spec.cpus,
            memory_mib: rec.spec.memory_mib,
            accel: rec.spec.accel,
            binary: None,
            networks: net.as_ref().map(|n| n.cards.clone()).unwrap_or_default(),
            volumes,
            confinement: confinement.clone(),
            cloud_init: crate::create::cloud_init_bundle(&rec.spec, p.network.resolvers()),
            incoming,
        };
        rec.status.started_at = Some(p.clock.now_millis());
        let (vmm2, spec2) = (vmm.clone(), spec.clone());
        let launched = match tokio::task::spawn_blocking(move || vmm2.launch(&spec2)).await {
            Ok(Ok(l)) => l,
            Ok(Err(VmmError::AlreadyRunning { pid })) => {
                // A VMM appeared for this VM since it was observed: adopt it on the next round.
                warn!(
                    pid,
                    "a VMM already runs for this VM; adopting it instead of launching another"
                );
                p.sandbox.settle(&confinement);
                p.network.settle(&rec.spec, true);
                return Ok(());
            }
            Ok(Err(VmmError::Failed(why))) => {
                p.sandbox.settle(&confinement);
                return Err(self.unclaim(rec, Error::precondition(why)));
            }
            Err(e) => {
                p.sandbox.settle(&confinement);
                return Err(self.unclaim(rec, Error::internal(e)));
            }
        };
        // The guest waits, paused, until its network and console are in place; anything that
        // cannot be set up undoes the launch.
        let ready = async {
            p.network.attach(&rec.spec).await?;
            p.guests
                .capture_console(&rec.spec)
                .await
                .map_err(|e| e.context("capturing the VM's console"))?;
            vmm.start_guest(&spec.vm_dir, false)
                .await
                .map_err(|e| Error::precondition(format!("starting the guest's CPUs: {e}")))
        };
        if let Err(e) = ready.await {
            if let Err(k) = vmm.stop(&spec.vm_dir, launched.handle(), Duration::ZERO).await {
                warn!(error = %k, "killing the half-started VMM failed");
            }
            p.guests.console_closed(&id).await;
            vmm.cleanup(&spec.vm_dir, &confinement);
            p.sandbox.settle(&confinement);
            return Err(self.unclaim(rec, Error::precondition(e.message)));
        }
        self.record_launch(rec, &launched, net.and_then(|n| n.ssh_port), &confinement)
    }

    /// Saves a started VMM on the record and watches it.
    fn record_launch(
        self: &Arc<Self>,
        rec: &mut VmRecord,
        launched: &Launched,
        ssh_port: Option<u16>,
        c: &Confinement,
    ) -> Result<()> {
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
        rec.status.restarting = false;
        rec.status.restart_at = None;
        rec.status.boots += 1;
        rec.status.ssh_port = ssh_port;
        rec.status.ip = crate::guest_network(&rec.spec).map(|n| n.address);
        rec.status.vmm_uid = c.run_as.map(|(u, _)| u);
        // A restored guest ran on the snapshot's disks: from now on it boots from its own.
        if rec.status.restore_pending {
            rec.status.restore_pending = false;
            rec.status.identity_pending = true;
        }
        let saved = self.ports.repo.save(rec);
        self.ports.sandbox.settle(c);
        // The record carries the ports from here on (or, unsaved, the launch is undone by the watcher).
        self.ports.network.settle(&rec.spec, saved.is_err());
        saved?;
        info!(pid = launched.pid, accel = %launched.accel, "vmm started");
        self.spawn_watchers(&rec.spec, launched.handle(), true);
        Ok(())
    }

    /// Takes back a failed launch's claim on its published ports, keeping the launch's error.
    fn unclaim(&self, rec: &VmRecord, launch_error: Error) -> Error {
        self.ports.network.settle(&rec.spec, true);
        launch_error
    }

    /// The VMM is gone: read the guest's exit record and settle the VM as stopped. Its sockets and
    /// pid file go too, so nothing can mistake them for a live VMM later.
    fn record_exit(&self, rec: &mut VmRecord) -> Result<()> {
        let p = &self.ports;
        p.vmms
            .of(rec.spec.provider)
            .cleanup(&p.repo.vm_dir(&rec.spec.id), &p.sandbox.of(&rec.spec));
        rec.status.vmm_uid = None;
        let exit = p.disks.read_exit(rec).unwrap_or_else(|e| {
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
                let vm_dir = p.repo.vm_dir(&rec.spec.id);
                rec.status.reason = match p.vmms.of(rec.spec.provider).exit_reason(&vm_dir) {
                    Some(why) => format!("vmm exited unexpectedly: {why}"),
                    None => "vmm exited unexpectedly (killed outside hearth, or it crashed; see the VMM's log in the VM's directory)".into(),
                };
            }
        }
        rec.status.state = VmState::Stopped;
        rec.status.paused = false;
        rec.status.finished_at = Some(p.clock.now_millis());
        rec.status.pid = None;
        rec.status.pid_start_time = None;
        rec.status.ip = None;
        rec.status.ssh_port = None;
        let on_its_own = rec.desired == Desired::Running && !was_stopping;
        rec.desired = if rec.spec.auto_remove { Desired::Deleted } else { Desired::Stopped };
        rec.status.restarting = false;
        rec.status.restart_at = None;
        if on_its_own {
            let code = rec.status.exit_code;
            self.apply_restart_policy(rec, code);
        }
        p.repo.save(rec)
    }
}
