//! The reader task: decodes frames and routes them to the control channel or their stream.

use super::*;

/// How often `wait_ready` repeats its Hello while the guest is still booting.
pub(super) const HELLO_INTERVAL: Duration = Duration::from_millis(500);

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    rd: R,
    ctl: &mpsc::Sender<Frame>,
    routes: &Routes,
) -> String {
    let mut rd = BufReader::new(rd);
    let mut dec = Decoder::new();
    loop {
        let buf = match rd.fill_buf().await {
            Ok([]) => return "closed by the guest".into(),
            Ok(b) => b,
            Err(e) => return e.to_string(),
        };
        dec.feed(buf);
        let n = buf.len();
        rd.consume(n);
        loop {
            match dec.next_frame() {
                Ok(None) => break,
                Ok(Some(f)) if f.stream == 0 => {
                    // Control frames are small and rare; a flooding guest loses the excess.
                    let _ = ctl.try_send(f);
                }
                Ok(Some(f)) => {
                    let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                    // Frames for a stream nobody holds any more are dropped.
                    let Some(route) = routes.get(&f.stream) else { continue };
                    if f.kind == Kind::Credit {
                        let mut c =
                            route.flow.stdin_credit.lock().unwrap_or_else(|e| e.into_inner());
                        *c = c.saturating_add(f.credit_amount()).min(WINDOW);
                        route.flow.more_credit.notify_waiters();
                        continue;
                    }
                    // Every frame a consumer has yet to take counts: data within the window the
                    // guest was given, anything else within a small allowance beyond it.
                    let mut u = route.flow.unconsumed.lock().unwrap_or_else(|e| e.into_inner());
                    *u += queue_cost(f.payload.len());
                    if *u > WINDOW + CONTROL_ALLOWANCE {
                        return format!(
                            "the guest sent more than its {WINDOW}-byte window on stream {}",
                            f.stream
                        );
                    }
                    drop(u);
                    // Never waits: what a stream may hold is bounded above.
                    let _ = route.tx.send(f);
                }
                Err(e) => return e.to_string(),
            }
        }
    }
}
