//! A scripted VMM: processes are entries in a table, alive until told to exit.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hearth_core::ports::{
    AgentTransport, Capabilities, Confinement, Endpoints, KernelFormat, LaunchSpec, Launched,
    Provider, Vmm, VmmError, VmmHandle,
};
use hearth_types::Accel;
use tokio::sync::watch;

/// What the next launch does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Starts a VMM.
    Ok,
    /// Fails with this message.
    Fail(String),
    /// Reports that a VMM already runs (one appeared since the VM was observed).
    AlreadyRunning,
}

#[derive(Debug)]
struct Process {
    dir: PathBuf,
    exited: watch::Sender<bool>,
    /// The VMM's own files name it (else only the record can).
    findable: bool,
    /// The guest is still paused, waiting for its first start.
    paused: bool,
    /// The guest was started and is frozen since (`hearth pause`).
    frozen: bool,
}

#[derive(Debug, Default)]
struct State {
    next_pid: i32,
    procs: HashMap<i32, Process>,
    script: VecDeque<Launch>,
    launches: Vec<LaunchSpec>,
    /// Guests ignore the VMM's power-off request.
    stubborn: bool,
    orphans: Vec<PathBuf>,
    cleaned: Vec<PathBuf>,
    /// What the VMM's log says when it ends.
    last_words: Option<String>,
}

impl State {
    /// The live VMM of `dir`.
    fn of(&mut self, dir: &Path) -> Result<&mut Process, VmmError> {
        self.procs
            .values_mut()
            .find(|p| p.dir == dir)
            .ok_or_else(|| VmmError::Failed("no VMM".into()))
    }
}

/// The scripted VMM.
#[derive(Debug, Default)]
pub struct FakeVmm(Mutex<State>);

impl FakeVmm {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the coming launches do, in order (then they succeed).
    pub fn script(&self, launches: impl IntoIterator<Item = Launch>) {
        self.state().script.extend(launches);
    }

    /// Every launch so far.
    pub fn launches(&self) -> Vec<LaunchSpec> {
        self.state().launches.clone()
    }

    /// The VMM logs `why` before it ends (a signal, a seccomp violation).
    pub fn says_when_it_ends(&self, why: &str) {
        self.state().last_words = Some(why.to_owned());
    }

    /// Guests ignore power-off requests from now on (only a kill ends them).
    pub fn stubborn(&self) {
        self.state().stubborn = true;
    }

    /// A VMM running for `dir` that no record knows (a crash right after the launch); with
    /// `findable` false its own files do not name it yet (only a scan finds it).
    pub fn spawn_unrecorded(&self, dir: &Path, findable: bool) -> VmmHandle {
        let h = self.start(dir, findable);
        if !findable {
            self.state().orphans.push(dir.to_owned());
        }
        h
    }

    fn start(&self, dir: &Path, findable: bool) -> VmmHandle {
        let mut s = self.state();
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        s.procs.insert(
            pid,
            Process {
                dir: dir.to_owned(),
                exited: watch::channel(false).0,
                findable,
                paused: true,
                frozen: false,
            },
        );
        VmmHandle { pid, start_time: 7 }
    }

    /// The VMM with this pid exits (the guest powered off, or it crashed).
    pub fn exit(&self, pid: i32) {
        if let Some(p) = self.state().procs.remove(&pid) {
            p.exited.send_replace(true);
        }
    }

    /// The live VMMs, by directory.
    pub fn running(&self) -> Vec<(i32, PathBuf)> {
        let mut v: Vec<_> =
            self.state().procs.iter().map(|(pid, p)| (*pid, p.dir.clone())).collect();
        v.sort();
        v
    }

    /// Whether the guest of `pid` still waits for its first start.
    pub fn paused(&self, pid: i32) -> bool {
        self.state().procs.get(&pid).is_some_and(|p| p.paused)
    }

    /// Whether the guest of `pid` was frozen after its start (`hearth pause`).
    pub fn frozen(&self, pid: i32) -> bool {
        self.state().procs.get(&pid).is_some_and(|p| p.frozen)
    }

    /// Directories cleaned up after a VMM.
    pub fn cleaned(&self) -> Vec<PathBuf> {
        self.state().cleaned.clone()
    }
}

#[async_trait::async_trait]
impl Vmm for FakeVmm {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            provider: Provider::Qemu,
            user_network: true,
            creates_tap: true,
            macvtap: true,
            shares: true,
            snapshots: true,
            console_socket: true,
            agent: AgentTransport::Serial,
            kernel_formats: &[KernelFormat::BzImage, KernelFormat::ElfPvh],
            accels: &[Accel::Tcg],
        }
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmmError> {
        let next = {
            let mut s = self.state();
            s.launches.push(spec.clone());
            // Like a real VMM's pid file: a second launch for a directory is refused.
            if let Some((pid, _)) = s.procs.iter().find(|(_, p)| p.dir == spec.vm_dir && p.findable)
            {
                return Err(VmmError::AlreadyRunning { pid: *pid });
            }
            s.script.pop_front().unwrap_or(Launch::Ok)
        };
        match next {
            Launch::Ok => {
                let h = self.start(&spec.vm_dir, true);
                Ok(Launched {
                    pid: h.pid,
                    start_time: h.start_time,
                    accel: Accel::Tcg,
                    warning: None,
                    held: vec![],
                })
            }
            Launch::Fail(why) => Err(VmmError::Failed(why)),
            Launch::AlreadyRunning => {
                let h = self.start(&spec.vm_dir, true);
                Err(VmmError::AlreadyRunning { pid: h.pid })
            }
        }
    }

    fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        let s = self.state();
        if let Some(h) = recorded {
            if s.procs.get(&h.pid).is_some_and(|p| p.dir == vm_dir) && h.start_time == 7 {
                return Some((h, true));
            }
        }
        s.procs
            .iter()
            .find(|(_, p)| p.dir == vm_dir && p.findable)
            .map(|(pid, _)| (VmmHandle { pid: *pid, start_time: 7 }, false))
    }

    fn recover_orphans(&self, _vms_dir: &Path) -> Vec<PathBuf> {
        let mut s = self.state();
        let dirs = std::mem::take(&mut s.orphans);
        for p in s.procs.values_mut().filter(|p| dirs.contains(&p.dir)) {
            p.findable = true;
        }
        dirs
    }

    async fn wait_set_up(&self, _vm_dir: &Path, vmm: VmmHandle) -> Result<(), VmmError> {
        match self.state().procs.contains_key(&vmm.pid) {
            true => Ok(()),
            false => Err(VmmError::Failed("it exited".into())),
        }
    }

    async fn start_guest(
        &self,
        vm_dir: &Path,
        only_if_never_started: bool,
    ) -> Result<bool, VmmError> {
        let mut s = self.state();
        let p = s.of(vm_dir)?;
        let was_paused = p.paused;
        p.paused = false;
        if !only_if_never_started {
            p.frozen = false;
        }
        Ok(was_paused || !only_if_never_started)
    }

    async fn set_paused(&self, vm_dir: &Path, paused: bool) -> Result<(), VmmError> {
        self.state().of(vm_dir)?.frozen = paused;
        Ok(())
    }

    /// Freezes the guest, as a VMM saving its state does; the state file is not written.
    async fn save_state(
        &self,
        vm_dir: &Path,
        _vmm: VmmHandle,
        _to: &Path,
    ) -> Result<String, VmmError> {
        self.state().of(vm_dir)?.frozen = true;
        Ok("FakeVMM 1.0".into())
    }

    async fn stop(&self, _vm_dir: &Path, vmm: VmmHandle, grace: Duration) -> Result<(), VmmError> {
        // A frozen guest cannot answer a power-off request either.
        let frozen = self.frozen(vmm.pid);
        let stubborn = self.state().stubborn || frozen;
        if stubborn && !grace.is_zero() {
            tokio::time::sleep(grace).await;
        }
        self.exit(vmm.pid);
        Ok(())
    }

    fn signal(&self, vm_dir: &Path, vmm: VmmHandle, _signal: i32) -> bool {
        let ours = self.state().procs.get(&vmm.pid).is_some_and(|p| p.dir == vm_dir);
        if ours {
            // Every signal a test sends ends the fake VMM.
            self.exit(vmm.pid);
        }
        ours
    }

    async fn wait_exit(&self, vmm: VmmHandle) {
        let rx = self.state().procs.get(&vmm.pid).map(|p| p.exited.subscribe());
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|gone| *gone).await;
        }
    }

    fn endpoints(&self, vm_dir: &Path) -> Endpoints {
        Endpoints { agent: vm_dir.join("agent"), console: vm_dir.join("console") }
    }

    fn cleanup(&self, vm_dir: &Path, _confinement: &Confinement) {
        self.state().cleaned.push(vm_dir.to_owned());
    }

    fn exit_reason(&self, _vm_dir: &Path) -> Option<String> {
        self.state().last_words.clone()
    }
}
