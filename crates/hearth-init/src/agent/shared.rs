//! What the agent's threads share: the host connection's writer, streams' stdin and output credit.

use super::*;

/// Where a stream's stdin goes: held until the process exists, then to its writer thread.
pub(super) enum Slot {
    Pending(Vec<u8>, bool),
    Open(mpsc::Sender<Vec<u8>>),
}

/// Exit waiters by pid, and wait statuses reaped before their waiter registered.
pub type Exits = (HashMap<i32, mpsc::Sender<i32>>, HashMap<i32, i32>);

/// Most stdin buffered for a stream whose process has not started yet.
pub(super) const MAX_PENDING: usize = 8 << 20;

/// State shared by the supervisor and the agent threads.
#[derive(Default)]
pub struct Shared {
    /// The workload's environment, user and directory: the defaults for `exec`.
    pub defaults: Mutex<Spec>,
    pub ready: Mutex<Option<Ready>>,
    pub shutdown: AtomicBool,
    /// Exit waiters by pid, and exits reaped before their waiter registered.
    pub exits: Mutex<Exits>,
    /// Frames for the writer thread.
    pub(super) out: Mutex<Option<mpsc::SyncSender<Vec<u8>>>>,
    /// Stdin of execs and copies by stream. Input that arrives before the process exists is
    /// kept (bounded) until it does.
    pub(super) stdins: Mutex<HashMap<u32, Slot>>,
    pub(super) pids: Mutex<HashMap<u32, (i32, Option<File>)>>,
    /// Output credit the host gave each stream (flow control), and a wake-up for senders.
    pub(super) credit: Mutex<HashMap<u32, u64>>,
    pub(super) more_credit: std::sync::Condvar,
}

impl Shared {
    /// Queues a frame for the host, waiting while the queue is full (backpressure for output
    /// streams). Dropped when the agent channel is not up.
    pub fn send(&self, f: &Frame) {
        let tx = self.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(f.encode());
        }
    }

    /// Queues a frame without ever blocking (for PID 1's own thread); dropped when the queue
    /// is full. The host learns the state again with its next `Hello`.
    pub fn try_send(&self, f: &Frame) {
        let tx = self.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.try_send(f.encode());
        }
    }

    /// Registers interest in `pid`'s exit; the supervisor's reaper fills it.
    pub fn watch(&self, pid: i32) -> mpsc::Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        let mut ex = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        match ex.1.remove(&pid) {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                ex.0.insert(pid, tx);
            }
        }
        rx
    }

    /// Called by the reaper for every child that is not the workload.
    pub fn reaped(&self, pid: i32, status: i32) {
        let mut ex = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        match ex.0.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                if ex.1.len() < 4096 {
                    ex.1.insert(pid, status);
                }
            }
        }
    }

    pub fn set_ready(&self, r: Ready) {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        self.try_send(&Frame::json(Kind::Ready, 0, &r));
    }
}

/// Unlimited credit, for streams whose host went away: their output drains and is dropped.
pub(super) const UNMETERED: u64 = u64::MAX / 2;

impl Shared {
    /// Starts output flow control for a new stream.
    pub(super) fn open_output(&self, stream: u32) {
        self.credit.lock().unwrap_or_else(|e| e.into_inner()).insert(stream, WINDOW);
    }

    pub(super) fn close_output(&self, stream: u32) {
        self.credit.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    }

    pub(super) fn add_credit(&self, stream: u32, amount: u64) {
        if let Some(c) = self.credit.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&stream) {
            *c = c.saturating_add(amount).min(UNMETERED);
        }
        self.more_credit.notify_all();
    }

    /// The host went away: nobody will hand credit back for the streams it had.
    pub(super) fn release_output(&self) {
        for c in self.credit.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            *c = UNMETERED;
        }
        self.more_credit.notify_all();
    }

    /// Takes credit for up to `want` bytes on `stream`, waiting while it has none; `None` once
    /// the stream is closed.
    pub(super) fn take_credit(&self, stream: u32, want: usize) -> Option<usize> {
        let mut credit = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match credit.get_mut(&stream) {
                None => return None,
                Some(c) if *c > FRAME_COST => {
                    let n = want.min((*c - FRAME_COST).min(CHUNK as u64) as usize);
                    *c -= credit_cost(n);
                    return Some(n);
                }
                Some(_) => {}
            }
            credit = self
                .more_credit
                .wait_timeout(credit, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends output on a stream as fast as the host's credit allows. Returns false when the
    /// stream is closed.
    pub(super) fn send_data(&self, kind: Kind, stream: u32, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(n) = self.take_credit(stream, data.len()) else { return false };
            self.send(&Frame::new(kind, stream, data[..n].to_vec()));
            data = &data[n..];
        }
        true
    }

    /// Connects a stream's stdin to `w` through a writer thread (so a process that does not
    /// read stalls only that thread), replaying what arrived early. Credit goes back to the
    /// host as bytes reach the process. The thread ends when stdin closes.
    pub(super) fn open_stdin(
        self: &Arc<Self>,
        stream: u32,
        mut w: File,
    ) -> std::thread::JoinHandle<()> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let mut stdins = self.stdins.lock().unwrap_or_else(|e| e.into_inner());
        let (early, eof) = match stdins.remove(&stream) {
            Some(Slot::Pending(buf, eof)) => (buf, eof),
            _ => (Vec::new(), false),
        };
        if !early.is_empty() {
            let _ = tx.send(early);
        }
        if !eof {
            stdins.insert(stream, Slot::Open(tx));
        } else {
            drop(tx);
        }
        drop(stdins);
        let shared = self.clone();
        std::thread::spawn(move || {
            let mut broken = false;
            for chunk in rx {
                // After a write error (the process closed stdin) the rest is discarded, but
                // still credited, so the host never waits on a stream that cannot take input.
                broken = broken || w.write_all(&chunk).is_err();
                shared.send(&Frame::credit(stream, credit_cost(chunk.len())));
            }
        })
    }

    pub(super) fn drop_stdin(&self, stream: u32) {
        self.stdins.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    }
}
