//! Streams and their flow control: what the guest may still send, and stdin's credit.

use super::*;

/// Where the reader puts a stream's frames, and its flow-control state.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) tx: mpsc::UnboundedSender<Frame>,
    pub(super) flow: Arc<Flow>,
}

/// One stream's credit, both directions.
#[derive(Debug)]
pub(super) struct Flow {
    /// What the guest sent on the stream that the consumer has not taken yet, every kind of
    /// frame counted ([`queue_cost`]); bounded by the window plus [`CONTROL_ALLOWANCE`].
    pub(super) unconsumed: Mutex<u64>,
    /// Credit the guest gave for stdin, and a wake-up for a sender waiting on it.
    pub(super) stdin_credit: Mutex<u64>,
    pub(super) more_credit: tokio::sync::Notify,
    /// The stream was closed or the connection ended: no more credit will come.
    pub(super) ended: std::sync::atomic::AtomicBool,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            unconsumed: Mutex::new(0),
            stdin_credit: Mutex::new(WINDOW),
            more_credit: tokio::sync::Notify::new(),
            ended: false.into(),
        }
    }
}

impl Flow {
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.more_credit.notify_waiters();
    }
}

pub(super) type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// Frames of one stream, and the id to send on. Take frames with [`Stream::recv`], which hands
/// the guest credit back; send stdin with [`StreamInput::send`], which waits for the guest's.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub(super) rx: mpsc::UnboundedReceiver<Frame>,
    pub(super) flow: Arc<Flow>,
    pub(super) out: mpsc::Sender<Frame>,
    /// Credit taken but not yet handed back (sent in batches of a quarter window).
    pub(super) owed: u64,
}

/// The sending half of a stream's stdin, usable beside [`Stream::recv`].
#[derive(Debug, Clone)]
pub struct StreamInput {
    pub id: u32,
    pub(super) flow: Arc<Flow>,
    pub(super) out: mpsc::Sender<Frame>,
}

impl Stream {
    /// The next frame the guest sent on this stream; `None` once the connection or the stream
    /// is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        {
            let mut u = self.flow.unconsumed.lock().unwrap_or_else(|e| e.into_inner());
            *u = u.saturating_sub(queue_cost(f.payload.len()));
        }
        if matches!(f.kind, Kind::Stdout | Kind::Stderr) {
            // Only data spends the guest's credit; only data is credited back.
            let cost = credit_cost(f.payload.len());
            self.owed += cost;
            if self.owed >= WINDOW / 4 {
                let _ = self.out.send(Frame::credit(self.id, self.owed)).await;
                self.owed = 0;
            }
        }
        Some(f)
    }

    /// A handle that sends stdin on this stream.
    pub fn input(&self) -> StreamInput {
        StreamInput { id: self.id, flow: self.flow.clone(), out: self.out.clone() }
    }
}

impl StreamInput {
    /// Sends `f` (stdin data, or any control frame for the stream), first waiting until the
    /// guest has credit for it.
    pub async fn send(&self, f: Frame) -> Result<(), AgentError> {
        let cost = if f.kind == Kind::Stdin { credit_cost(f.payload.len()) } else { 0 };
        loop {
            let notified = self.flow.more_credit.notified();
            {
                let mut c = self.flow.stdin_credit.lock().unwrap_or_else(|e| e.into_inner());
                if *c >= cost {
                    *c -= cost;
                    break;
                }
            }
            if self.out.is_closed() || self.flow.ended.load(Ordering::SeqCst) {
                return Err(AgentError::Closed);
            }
            // Credit, or a periodic look at whether the connection died.
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
        self.out.send(f).await.map_err(|_| AgentError::Closed)
    }
}
