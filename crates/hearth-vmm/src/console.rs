//! The serial console, captured by hearth rather than by the VMM (docs/adr/0010-console-capture.md).
//!
//! The VMM serves the console on `console.sock` and starts the guest paused; [`Console::capture`]
//! connects, and only then is the guest resumed, so no output is lost. What the guest writes goes
//! to `console.log`, capped at [`LogLimits::max_size`] and rotated into `console.log.1` ..
//! `console.log.N-1` (docker's `max-size`/`max-file`), and to every attached client. Input from
//! clients goes to the guest's UART. A guest that floods its console fills at most
//! `max_size * max_files` of disk, and nothing when the disk is nearly full ([`MIN_FREE`]).
//!
//! Offsets into the log are logical: bytes the VM has ever logged. `console.log.start` holds where
//! `console.log` begins, so a reader at an offset keeps its place across rotations.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};

use crate::VmmError;

/// The log file, in the VM's directory.
pub const LOG: &str = "console.log";
/// The VMM's console socket, in the VM's directory.
pub const SOCKET: &str = "console.sock";
/// Or a pair of FIFOs, for a VMM whose serial port is its standard output and input
/// (Firecracker): the VMM writes `console.out` and reads `console.in`.
pub const FIFO_OUT: &str = "console.out";
pub const FIFO_IN: &str = "console.in";

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Sender = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// The VMM's console: its FIFOs when it has them, else its socket (waiting up to 5 s for it).
async fn connect(vm_dir: &Path) -> Result<(Reader, Sender), VmmError> {
    let out = vm_dir.join(FIFO_OUT);
    if out.exists() {
        use tokio::net::unix::pipe;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::Io { path, source }
        };
        let rd = pipe::OpenOptions::new().open_receiver(&out).map_err(io(&out))?;
        let input = vm_dir.join(FIFO_IN);
        let wr = pipe::OpenOptions::new().open_sender(&input).map_err(io(&input))?;
        return Ok((Box::new(rd), Box::new(wr)));
    }
    // In the VMM's jail when it has one, where the socket is the VMM's to replace: reached
    // only as itself.
    let sock = crate::jail::host_path(vm_dir, SOCKET);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let connected = crate::jail::connect(&sock).and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        });
        match connected {
            Ok(s) => {
                let (rd, wr) = s.into_split();
                return Ok((Box::new(rd), Box::new(wr)));
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(VmmError::Io { path: sock, source: e })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
const START: &str = "console.log.start";
/// Below this much free space the log stops growing (record saves need the room).
pub const MIN_FREE: u64 = 64 << 20;
/// Bytes read from the console at a time.
const CHUNK: usize = 64 << 10;

/// How large the log may grow: `max_files` files (the current one included) of `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub max_size: u64,
    pub max_files: u32,
}

impl Default for LogLimits {
    /// Kubernetes' defaults for container logs: 10 MiB, 5 files.
    fn default() -> Self {
        Self { max_size: 10 << 20, max_files: 5 }
    }
}

fn rotated(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{LOG}.{n}"))
}

fn read_start(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(START)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// The only writer of a VM's log.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    limits: LogLimits,
    file: File,
    len: u64,
    start: u64,
    /// Bytes written since free space was last checked, and whether output is being dropped.
    since_check: u64,
    dropping: bool,
}

impl Writer {
    fn open(dir: &Path, limits: LogLimits) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(dir.join(LOG))?;
        let len = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            limits,
            file,
            len,
            start: read_start(dir),
            since_check: u64::MAX,
            dropping: false,
        })
    }

    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if !self.room(data.len() as u64) {
            return Ok(());
        }
        while !data.is_empty() {
            if self.len >= self.limits.max_size {
                self.rotate()?;
            }
            let n = data
                .len()
                .min(usize::try_from(self.limits.max_size - self.len).unwrap_or(usize::MAX));
            self.file.write_all(&data[..n])?;
            self.len += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Whether there is room for `n` more bytes; checks the filesystem every MiB and says once
    /// in the log when output starts being dropped.
    fn room(&mut self, n: u64) -> bool {
        self.since_check = self.since_check.saturating_add(n);
        if self.since_check >= 1 << 20 {
            self.since_check = 0;
            let low = crate::sys::available_bytes(&self.dir).is_ok_and(|free| free < MIN_FREE);
            if low && !self.dropping {
                let _ = self.file.write_all(
                    b"\r\n[hearth: console output dropped: the disk is nearly full]\r\n",
                );
            }
            self.dropping = low;
        }
        !self.dropping
    }

    /// `console.log` becomes `console.log.1` (and so on up), or is emptied when only one file
    /// is kept; the new file's logical start is recorded.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.limits.max_files.saturating_sub(1);
        if keep == 0 {
            self.file.set_len(0)?;
        } else {
            let ignore_missing = |r: io::Result<()>| match r {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
            ignore_missing(fs::remove_file(rotated(&self.dir, keep)))?;
            for n in (1..keep).rev() {
                ignore_missing(fs::rename(rotated(&self.dir, n), rotated(&self.dir, n + 1)))?;
            }
            fs::rename(self.dir.join(LOG), rotated(&self.dir, 1))?;
            // The old file was renamed away: this one is new and empty.
            self.file = OpenOptions::new().create(true).append(true).open(self.dir.join(LOG))?;
        }
        self.start += self.len;
        self.len = 0;
        hearth_fs::atomic_write(&self.dir.join(START), self.start.to_string().as_bytes())
    }
}

/// One file of the log: its path, where it starts (logical) and its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

/// The log's files, oldest first. Hold the VM's log lock (read) while using them if a capture
/// may be writing.
pub fn segments(dir: &Path) -> Vec<Segment> {
    let mut start = read_start(dir);
    let len = fs::metadata(dir.join(LOG)).map(|m| m.len()).unwrap_or(0);
    let mut out = vec![Segment { path: dir.join(LOG), start, len }];
    for n in 1.. {
        let Ok(m) = fs::metadata(rotated(dir, n)) else { break };
        start = start.saturating_sub(m.len());
        out.push(Segment { path: rotated(dir, n), start, len: m.len() });
    }
    out.reverse();
    out
}

/// The logical end of the log: where the next byte the VM logs will be.
pub fn end(dir: &Path) -> u64 {
    read_start(dir) + fs::metadata(dir.join(LOG)).map(|m| m.len()).unwrap_or(0)
}

/// Up to `max` bytes of the log from logical offset `pos`, and the offset after them. An offset
/// older than the oldest byte kept starts at that byte.
pub fn read_at(dir: &Path, pos: u64, max: usize) -> io::Result<(Vec<u8>, u64)> {
    for seg in segments(dir) {
        if pos >= seg.start + seg.len {
            continue;
        }
        let from = pos.max(seg.start);
        let mut f = File::open(&seg.path)?;
        f.seek(SeekFrom::Start(from - seg.start))?;
        let mut buf = Vec::with_capacity(max.min(CHUNK));
        f.take(max as u64).read_to_end(&mut buf)?;
        let next = from + buf.len() as u64;
        return Ok((buf, next));
    }
    Ok((Vec::new(), pos.max(end(dir))))
}

/// A live capture of one VM's console.
#[derive(Debug)]
pub struct Console {
    /// Never read itself: new subscribers are made from it. The capture task holds the only
    /// sender, so subscribers see the end when the console closes.
    output: broadcast::Receiver<Vec<u8>>,
    input: mpsc::Sender<Vec<u8>>,
    done: watch::Receiver<bool>,
}

impl Console {
    /// Connects to the VMM's console socket (waiting up to 5 s for it) and starts logging.
    /// `log_lock` is the VM's lock for its log files: taken for writing around rotations, so
    /// readers holding it for reading never see a rotation half done.
    pub async fn capture(
        vm_dir: &Path,
        limits: LogLimits,
        log_lock: Arc<RwLock<()>>,
    ) -> Result<Arc<Self>, VmmError> {
        let (mut rd, mut wr) = connect(vm_dir).await?;
        let mut writer = Writer::open(vm_dir, limits)
            .map_err(|source| VmmError::Io { path: vm_dir.join(LOG), source })?;
        let (out, output) = broadcast::channel(256);
        let (input, mut input_rx) = mpsc::channel::<Vec<u8>>(64);
        let (done_tx, done) = watch::channel(false);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                tokio::select! {
                    n = rd.read(&mut buf) => {
                        let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                        let written = {
                            let _w = log_lock.write().unwrap_or_else(|e| e.into_inner());
                            writer.write(&buf[..n])
                        };
                        if let Err(e) = written {
                            tracing::warn!(error = %e, dir = %writer.dir.display(), "writing the console log failed; output is still relayed");
                        }
                        // No subscriber is fine; a slow one loses what it lagged behind.
                        let _ = out.send(buf[..n].to_vec());
                    }
                    Some(data) = input_rx.recv() => {
                        if wr.write_all(&data).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = writer.file.sync_data();
            let _ = done_tx.send(true);
        });
        Ok(Arc::new(Self { output, input, done }))
    }

    /// The output from now on, until the console closes (the VMM exited).
    pub fn subscribe(&self) -> broadcast::Receiver<Vec<u8>> {
        self.output.resubscribe()
    }

    /// Sends input to the guest's console; false once it is closed.
    pub async fn send(&self, data: Vec<u8>) -> bool {
        self.input.send(data).await.is_ok()
    }

    /// Whether the console has closed (everything the VM wrote is in the log).
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until the console has closed, at most `timeout`.
    pub async fn wait_done(&self, timeout: Duration) {
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(dir: &Path) -> Vec<u8> {
        segments(dir).iter().flat_map(|s| fs::read(&s.path).expect("segment")).collect()
    }

    #[test]
    fn the_log_is_capped_rotated_and_read_by_logical_offset() {
        let t = tempfile::tempdir().expect("tmp");
        let limits = LogLimits { max_size: 100, max_files: 3 };
        let mut w = Writer::open(t.path(), limits).expect("open");
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(37) {
            w.write(piece).expect("write");
        }
        // Three files of at most 100 bytes: the newest 200..300 bytes are kept.
        let segs = segments(t.path());
        assert_eq!(segs.len(), 3, "{segs:?}");
        assert!(segs.iter().all(|s| s.len <= 100), "{segs:?}");
        assert_eq!(end(t.path()), 1000);
        let kept = all(t.path());
        assert_eq!(kept, data[1000 - kept.len()..], "the newest bytes, in order");
        // Reading from 0 starts at the oldest byte kept; from 950 gives the last 50.
        let (first, next) = read_at(t.path(), 0, 10).expect("read");
        assert_eq!(
            (first.as_slice(), next),
            (&data[segs[0].start as usize..segs[0].start as usize + 10], segs[0].start + 10)
        );
        let mut pos = 950;
        let mut tail = Vec::new();
        loop {
            let (chunk, next) = read_at(t.path(), pos, 16).expect("read");
            if chunk.is_empty() {
                break;
            }
            tail.extend(chunk);
            pos = next;
        }
        assert_eq!((tail.as_slice(), pos), (&data[950..], 1000));
        // A writer opened again (a daemon restart) continues the same offsets.
        drop(w);
        let mut w = Writer::open(t.path(), limits).expect("reopen");
        w.write(b"more").expect("write");
        assert_eq!(end(t.path()), 1004);
    }

    #[test]
    fn one_file_kept_means_truncated_in_place() {
        let t = tempfile::tempdir().expect("tmp");
        let mut w = Writer::open(t.path(), LogLimits { max_size: 10, max_files: 1 }).expect("open");
        w.write(b"0123456789abcdef").expect("write");
        assert_eq!(fs::read(t.path().join(LOG)).expect("log"), b"abcdef");
        assert_eq!(segments(t.path()).len(), 1);
        assert_eq!(end(t.path()), 16);
    }

    #[tokio::test]
    async fn a_capture_logs_relays_and_takes_input_until_the_vmm_closes_the_socket() {
        let t = tempfile::tempdir().expect("tmp");
        let listener = tokio::net::UnixListener::bind(t.path().join(SOCKET)).expect("bind");
        let vmm = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(b"boot line\n").await.expect("write");
            let mut got = [0u8; 5];
            s.read_exact(&mut got).await.expect("input");
            s.write_all(b"echo:").await.expect("write");
            s.write_all(&got).await.expect("write");
            got
        });
        let console = Console::capture(t.path(), LogLimits::default(), Arc::default())
            .await
            .expect("capture");
        let mut out = console.subscribe();
        assert!(console.send(b"hello".to_vec()).await);
        let got = vmm.await.expect("vmm");
        assert_eq!(&got, b"hello");
        console.wait_done(Duration::from_secs(5)).await;
        assert!(console.is_done());
        let logged = fs::read_to_string(t.path().join(LOG)).expect("log");
        assert!(logged.starts_with("boot line\n") && logged.ends_with("echo:hello"), "{logged:?}");
        let mut relayed = Vec::new();
        while let Ok(chunk) = out.recv().await {
            relayed.extend(chunk);
        }
        assert!(String::from_utf8_lossy(&relayed).contains("echo:hello"), "{relayed:?}");
        // The output ended with the console, though the handle is still held.
        assert!(matches!(
            console.subscribe().recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }
}
