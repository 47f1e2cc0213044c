//! The serial console: `logs` (from the captured log file) and `attach` (the live socket).

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use hearth_api::v1::Chunk;
use hearth_types::{VmId, VmState};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

use crate::daemon::Daemon;

/// How often a follower looks for new console output while the VM runs.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const CHUNK: usize = 64 << 10;

fn is_running(d: &Daemon, id: &VmId) -> bool {
    matches!(d.get(id), Ok(Some(r)) if matches!(r.status.state, VmState::Starting | VmState::Running | VmState::Stopping))
}

/// Streams the console log from `offset`; with `follow`, until the VM stops.
pub fn stream_logs(d: Arc<Daemon>, id: VmId, offset: u64, follow: bool) -> mpsc::Receiver<Result<Chunk, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let path = d.vm_dir(&id).join("console.log");
        let mut pos = offset;
        let mut buf = vec![0u8; CHUNK];
        let mut changes = d.subscribe();
        loop {
            let mut progressed = false;
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(SeekFrom::Start(pos)).await.is_ok() {
                    loop {
                        match f.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                pos += n as u64;
                                progressed = true;
                                if tx.send(Ok(Chunk { data: buf[..n].to_vec(), r#ref: String::new() })).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
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

/// Connects a client's byte stream to the VM's console socket.
pub async fn attach(d: Arc<Daemon>, id: VmId, mut input: tonic::Streaming<Chunk>) -> Result<mpsc::Receiver<Result<Chunk, Status>>, Status> {
    let sock = d.vm_dir(&id).join("console.sock");
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| Status::failed_precondition(format!("cannot attach: the console is busy or the VM is not running ({e})")))?;
    let (mut rd, wr) = stream.into_split();
    // Dropping the write half would half-close the socket, which QEMU takes as a disconnect:
    // keep it open until the output side ends, even after the client's input ended.
    let wr = std::sync::Arc::new(tokio::sync::Mutex::new(wr));
    let keep = wr.clone();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = input.message().await {
            if wr.lock().await.write_all(&chunk.data).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let _keep = keep;
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if tx.send(Ok(Chunk { data: buf[..n].to_vec(), r#ref: String::new() })).await.is_err() { return },
                },
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}
