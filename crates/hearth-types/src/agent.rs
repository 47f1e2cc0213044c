//! The agent protocol between hearthd and hearth-init (docs/adr/0003-agent-protocol.md).
//!
//! One byte stream (virtio-serial with QEMU, vsock elsewhere) carries frames:
//! `[u32 BE payload length][u8 kind][u32 BE stream][payload]`. Stream 0 is the control stream;
//! each exec or copy gets its own stream id, chosen by the host. Payloads are bounded by
//! [`MAX_PAYLOAD`], so a confused peer can make the other side hold at most one frame.
//!
//! Data on a stream (`Stdout`/`Stderr` one way, `Stdin` the other) is flow-controlled per
//! stream and direction: a sender starts with [`WINDOW`] of credit, each data frame costs
//! [`credit_cost`] of it, and the receiver hands credit back in [`Kind::Credit`] frames as its
//! consumer takes the data. So one stream whose reader stalls stops only itself, and neither side
//! buffers more than a window per stream.

use serde::{Deserialize, Serialize};

/// Protocol version spoken in [`Kind::Hello`].
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 9;
/// Credit each side starts with, per stream, for the data it sends.
pub const WINDOW: u64 = 256 << 10;
/// What a data frame costs beyond its payload, so a flood of tiny frames is bounded too.
pub const FRAME_COST: u64 = 64;

/// What a receiver lets a stream hold beyond its data window in frames that carry no data
/// (exit, error, and whatever a hostile peer sends instead), counted like data.
pub const CONTROL_ALLOWANCE: u64 = 64 << 10;

/// What any frame queued for a stream's consumer counts against [`WINDOW`] +
/// [`CONTROL_ALLOWANCE`]: its payload plus [`FRAME_COST`], so no kind of frame is free to queue.
pub fn queue_cost(len: usize) -> u64 {
    len as u64 + FRAME_COST
}

/// Credit a data frame with `len` payload bytes uses up; an empty frame (end of stdin) is free.
pub fn credit_cost(len: usize) -> u64 {
    if len == 0 {
        0
    } else {
        len as u64 + FRAME_COST
    }
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both ways, first frame: JSON [`Hello`].
    Hello = 1,
    /// Guest to host: the workload has been started. JSON [`Ready`].
    Ready = 2,
    Ping = 3,
    Pong = 4,
    /// Host to guest: stop the workload, sync, unmount and power off.
    Shutdown = 5,
    /// Host to guest: start a process on this stream. JSON [`ExecRequest`].
    Exec = 10,
    /// Host to guest: stdin bytes; an empty payload closes stdin.
    Stdin = 11,
    /// Guest to host: output bytes.
    Stdout = 12,
    Stderr = 13,
    /// Guest to host: the stream's process ended. JSON [`ExecExit`].
    Exit = 14,
    /// Host to guest: deliver a signal (`u32` BE) to the stream's process.
    Signal = 15,
    /// Host to guest: terminal size (`u16` BE rows, `u16` BE cols).
    Resize = 16,
    /// Either way: the stream failed. UTF-8 message.
    Error = 17,
    /// Either way: the receiver consumed data; the sender may send `u32` BE more credit's worth.
    Credit = 18,
    /// Host to guest: unpack the tar archive that follows as `Stdin` frames into a directory.
    /// JSON [`CopyRequest`]. The guest answers `Exit` (code 0 on success) or `Error`.
    CopyIn = 20,
    /// Host to guest: send a path as a tar archive in `Stdout` frames, then `Exit`.
    /// JSON [`CopyRequest`].
    CopyOut = 21,
    /// Host to guest, first after a VM restored from a snapshot connects: take this identity
    /// (JSON [`Identity`]) before anything else runs. Handled in order with the frames after it.
    Reidentify = 22,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Ready,
            3 => Self::Ping,
            4 => Self::Pong,
            5 => Self::Shutdown,
            10 => Self::Exec,
            11 => Self::Stdin,
            12 => Self::Stdout,
            13 => Self::Stderr,
            14 => Self::Exit,
            15 => Self::Signal,
            16 => Self::Resize,
            17 => Self::Error,
            18 => Self::Credit,
            20 => Self::CopyIn,
            21 => Self::CopyOut,
            22 => Self::Reidentify,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: impl Into<Vec<u8>>) -> Self {
        Self { kind, stream, payload: payload.into() }
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(kind: Kind, stream: u32, value: &T) -> Self {
        Self::new(kind, stream, serde_json::to_vec(value).unwrap_or_default())
    }

    /// Hands `amount` of credit back to the sender of `stream`'s data.
    pub fn credit(stream: u32, amount: u64) -> Self {
        Self::new(
            Kind::Credit,
            stream,
            (amount.min(u64::from(u32::MAX)) as u32).to_be_bytes().to_vec(),
        )
    }

    /// The amount a [`Kind::Credit`] frame grants (0 when malformed).
    pub fn credit_amount(&self) -> u64 {
        self.payload.get(..4).map_or(0, |b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    }

    /// Parses the payload as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Json(e.to_string()))
    }

    /// Header and payload, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Why the byte stream is unusable. Every variant ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed JSON payload: {0}")]
    Json(String),
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out. Linear in the bytes
/// received: frames are read at a moving offset and consumed bytes are dropped in one move when
/// new ones arrive, never once per frame. It holds at most one partial frame (bounded by
/// [`MAX_PAYLOAD`]) plus what one feed brought.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first byte not yet returned as part of a frame.
    at: usize,
    /// Bytes copied to make room (what makes decoding linear or not), for the tests.
    #[cfg(test)]
    moved: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the channel.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 {
            #[cfg(test)]
            {
                self.moved += self.buf.len() - self.at;
            }
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. An error poisons the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let b = &self.buf[self.at..];
        if b.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let kind = Kind::from_u8(b[4]).ok_or(FrameError::UnknownKind(b[4]))?;
        if b.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        let payload = b[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.at += HEADER_LEN + len;
        Ok(Some(Frame { kind, stream, payload }))
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }
}

/// First frame both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
}

/// Sent by the guest once the workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Guest uptime when hearth-init started, and when the workload was started (milliseconds).
    pub init_started_ms: u64,
    pub ready_ms: u64,
}

/// Who a guest restored from a snapshot is now: the snapshot's guest was another VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// The first card's settings (its new MAC and address), when the guest configures it.
    #[serde(default)]
    pub network: Option<crate::GuestNetwork>,
    /// The MACs of the cards after the first, in order, with their static settings.
    #[serde(default)]
    pub cards: Vec<crate::GuestCard>,
    /// Fresh randomness from the host, mixed into the guest's pool (and credited) so two
    /// guests restored from one snapshot never share random state.
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// The host's wall clock (Unix milliseconds): the guest's stopped at the snapshot.
    #[serde(default)]
    pub now_ms: u64,
}

/// A process to start in the guest (`hearth exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub args: Vec<String>,
    /// Extra `KEY=VALUE` entries over the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// How an exec'd process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
}

/// A guest path for [`Kind::CopyIn`] (the directory to unpack into) or [`Kind::CopyOut`] (the
/// file or directory to archive).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRequest {
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_across_partial_reads() {
        let a = Frame::new(Kind::Stdout, 7, b"hello".to_vec());
        let b = Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION });
        let mut bytes = a.encode();
        bytes.extend(b.encode());
        let mut d = Decoder::new();
        let mut out = vec![];
        for chunk in bytes.chunks(3) {
            d.feed(chunk);
            while let Some(f) = d.next_frame().expect("valid") {
                out.push(f);
            }
        }
        assert_eq!(out, vec![a, b]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut d = Decoder::new();
        d.feed(&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn credit_frames_carry_their_amount() {
        let f = Frame::credit(3, 70_000);
        assert_eq!((f.kind, f.stream, f.credit_amount()), (Kind::Credit, 3, 70_000));
        let mut d = Decoder::new();
        d.feed(&f.encode());
        assert_eq!(d.next_frame().expect("valid"), Some(f));
        assert_eq!(Frame::new(Kind::Credit, 1, vec![1]).credit_amount(), 0);
        assert_eq!(credit_cost(0), 0);
        assert_eq!(credit_cost(10), 10 + FRAME_COST);
    }

    #[test]
    fn decoding_many_small_frames_is_linear_and_partial_frames_wait() {
        let frames: Vec<u8> = (0..100_000u32)
            .flat_map(|i| Frame::new(Kind::Stdout, 1, i.to_be_bytes().to_vec()).encode())
            .collect();
        // Fed in odd-sized pieces, as reads deliver them, and all at once.
        for piece_len in [7, 8191, frames.len()] {
            let mut d = Decoder::new();
            let mut n = 0;
            for piece in frames.chunks(piece_len) {
                d.feed(piece);
                while let Some(f) = d.next_frame().expect("valid") {
                    assert_eq!(f.payload, (n as u32).to_be_bytes());
                    n += 1;
                }
            }
            assert_eq!((n, d.pending()), (100_000, 0));
            // Only the partial frame at the end of a feed is ever copied: at most one frame's
            // bytes per feed, never the buffer once per frame (which is 65 GB for one feed).
            assert!(
                d.moved <= frames.len().div_ceil(piece_len) * HEADER_LEN * 2,
                "{piece_len}: {} bytes moved",
                d.moved
            );
        }
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut d = Decoder::new();
        d.feed(&[0, 0, 0, 0, 200, 0, 0, 0, 1]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(200)));
    }
}
