//! The serial console through hearthd: one capture per running VM (the adapters' console), which
//! writes the capped, rotated log and relays output to attached clients; `logs` reads the log by
//! logical offset, `attach` joins the capture. (docs/adr/0010-console-capture.md)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::adapters::{console_log, Console, LogLimits, VmmError};
use hearth_api::v1::Chunk;
use hearth_types::{VmId, VmSpec};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::daemon::Daemon;

/// How often a follower looks for new console output while the VM runs (a change of the VM's
/// record wakes it earlier).
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const CHUNK: usize = 64 << 10;
/// How long an exited VMM's capture may take to write its last bytes.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a removal waits for a follower of the VM's log that makes no progress (a client
/// that stopped reading) before it removes the log anyway.
const FOLLOWER_STALL: Duration = Duration::from_secs(3);

/// The live captures, and each VM's log lock (stable across boots).
#[derive(Debug, Default)]
pub struct Consoles {
    live: Mutex<HashMap<VmId, Arc<Console>>>,
    locks: Mutex<HashMap<VmId, Arc<RwLock<()>>>>,
    /// Per VM, its log's followers: how many, and how many chunks they have sent in all.
    followers: Mutex<HashMap<VmId, watch::Sender<(usize, u64)>>>,
    /// The daemon's `--log-max-size`/`--log-max-files`, for VMs that set none.
    pub default_limits: LogLimits,
}

impl Consoles {
    fn lock_of(&self, id: &VmId) -> Arc<RwLock<()>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default().clone()
    }

    fn followers_of(&self, id: &VmId) -> watch::Sender<(usize, u64)> {
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_insert_with(|| watch::channel((0, 0)).0)
            .clone()
    }

    fn live(&self, id: &VmId) -> Option<Arc<Console>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|c| !c.is_done())
            .cloned()
    }

    /// The log limits of a VM: its own, else the daemon's.
    pub fn limits_for(&self, spec: &VmSpec) -> LogLimits {
        let d = self.default_limits;
        match &spec.log {
            Some(l) => LogLimits {
                max_size: l.max_size.unwrap_or(d.max_size),
                max_files: l.max_files.unwrap_or(d.max_files),
            },
            None => d,
        }
    }
}

/// Starts capturing a VM's console: after a launch, before the guest is resumed, and when a
/// running VM is re-adopted.
pub async fn capture(d: &Daemon, spec: &VmSpec) -> Result<(), VmmError> {
    let c = Console::capture(
        &d.vm_dir(&spec.id),
        d.consoles.limits_for(spec),
        d.consoles.lock_of(&spec.id),
    )
    .await?;
    d.consoles.live.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id.clone(), c);
    Ok(())
}

/// Waits (bounded) until the capture of a VM whose VMM exited has written its last bytes.
pub async fn closed(d: &Daemon, id: &VmId) {
    let c = d.consoles.live.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    if let Some(c) = c {
        c.wait_done(CLOSE_TIMEOUT).await;
    }
}

/// Forgets a removed VM's entries, once the followers of its log have read its last lines (an
/// `--rm` VM's log goes with it): as long as they make progress, or until they end.
pub async fn forget(d: &Daemon, id: &VmId) {
    d.consoles.live.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    let followers = d.consoles.followers.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    if let Some(followers) = followers {
        let mut rx = followers.subscribe();
        while rx.borrow_and_update().0 > 0 {
            if !matches!(tokio::time::timeout(FOLLOWER_STALL, rx.changed()).await, Ok(Ok(()))) {
                break;
            }
        }
    }
    d.consoles.locks.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
}

/// A follower of a VM's log, counted while it lives.
struct Following(watch::Sender<(usize, u64)>);

impl Following {
    fn new(followers: watch::Sender<(usize, u64)>) -> Self {
        followers.send_modify(|(n, _)| *n += 1);
        Self(followers)
    }

    fn progressed(&self) {
        self.0.send_modify(|(_, sent)| *sent += 1);
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.send_modify(|(n, _)| *n -= 1);
    }
}

/// The logical end of a VM's log: where its next boot's output will start.
pub fn log_end(d: &Daemon, id: &VmId) -> u64 {
    let lock = d.consoles.lock_of(id);
    let _r = lock.read().unwrap_or_else(|e| e.into_inner());
    console_log::end(&d.vm_dir(id))
}

fn is_running(d: &Daemon, id: &VmId) -> bool {
    matches!(d.get(id), Ok(Some(r)) if r.status.state.is_active())
}

/// Streams the console log from logical `offset`; with `follow`, until the VM stops.
pub fn stream_logs(
    d: Arc<Daemon>,
    id: VmId,
    offset: u64,
    follow: bool,
) -> mpsc::Receiver<Result<Chunk, Status>> {
    let (tx, rx) = mpsc::channel(16);
    // Counted from now, so a removal that follows waits for this reader.
    let following = follow.then(|| Following::new(d.consoles.followers_of(&id)));
    tokio::spawn(async move {
        let (dir, lock) = (d.vm_dir(&id), d.consoles.lock_of(&id));
        let mut pos = offset;
        let mut changes = d.subscribe();
        loop {
            let mut progressed = false;
            loop {
                let (dir, lock) = (dir.clone(), lock.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let _r = lock.read().unwrap_or_else(|e| e.into_inner());
                    console_log::read_at(&dir, pos, CHUNK)
                })
                .await;
                let Ok(Ok((data, next))) = read else { break };
                pos = next;
                if data.is_empty() {
                    break;
                }
                progressed = true;
                if tx.send(Ok(Chunk { data, r#ref: String::new() })).await.is_err() {
                    return;
                }
                if let Some(f) = &following {
                    f.progressed();
                }
            }
            if !follow {
                return;
            }
            // Read once more after the VM stopped, so the last lines are never lost.
            if !progressed && !is_running(&d, &id) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = changes.changed() => {}
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Joins a client to the VM's console: its output from now on, and its input to the guest.
pub async fn attach(
    d: Arc<Daemon>,
    id: VmId,
    mut input: tonic::Streaming<Chunk>,
) -> Result<mpsc::Receiver<Result<Chunk, Status>>, Status> {
    let console = d.consoles.live(&id).ok_or_else(|| {
        Status::failed_precondition("cannot attach: the VM's console is not running")
    })?;
    let mut output = console.subscribe();
    let (tx, rx) = mpsc::channel(16);
    let c = console.clone();
    // The client closes its input to detach: once what it typed is in, its output ends too.
    let (detached_tx, mut detached) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = input.message().await {
            if !c.send(chunk.data).await {
                break;
            }
        }
        let _ = detached_tx.send(());
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut detached => return,
                m = output.recv() => match m {
                    Ok(data) => if tx.send(Ok(Chunk { data, r#ref: String::new() })).await.is_err() { return },
                    // A client that fell behind loses what it missed (the log has it).
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_types::{Desired, VmState};

    /// What a follower of the log gets until its stream ends.
    async fn drain(rx: &mut mpsc::Receiver<Result<Chunk, Status>>) -> String {
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await {
            got.extend(chunk.expect("chunk").data);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// An `--rm` VM: its last lines, its exit recorded and its removal, one right after the
    /// other as the reconciler does them (nothing in between lets the follower run): the
    /// follower still gets the last lines, and its stream ends.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_removal_waits_until_a_follower_has_read_the_last_lines() {
        let root = tempfile::tempdir().expect("tmp");
        let _lock = crate::root::lock(root.path()).expect("lock");
        let d = Daemon::open(root.path(), "/nonexistent/hearth-init".into()).expect("open");
        let d = Arc::new(d);
        let mut rec = hearth_testkit::record(1, Desired::Deleted, VmState::Running);
        d.save(&rec).expect("save");
        let dir = d.vm_dir(&rec.spec.id);
        let log = dir.join(console_log::LOG);
        std::fs::write(&log, "booted\n").expect("log");
        let mut rx = stream_logs(d.clone(), rec.spec.id.clone(), 0, true);
        let first = rx.recv().await.expect("a chunk").expect("chunk");
        assert_eq!(first.data, b"booted\n");
        // The follower reads on, finds nothing more and waits (the clock is paused: it moves
        // only once every task waits for it).
        tokio::time::sleep(Duration::from_secs(1)).await;

        let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("log");
        std::io::Write::write_all(&mut f, b"last words\n").expect("write");
        rec.status.state = VmState::Stopped;
        d.save(&rec).expect("save");
        forget(&d, &rec.spec.id).await;
        d.forget(&rec).expect("remove");
        assert!(!dir.exists(), "the VM's directory went with it");
        assert_eq!(drain(&mut rx).await, "last words\n");
    }
}
