use super::*;
use std::time::Duration;

#[tokio::test]
async fn ready_after_hello_and_streams_are_routed() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    let s = c.open_stream();
    let ready = Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 1, ready_ms: 2 }).encode();
    guest.write_all(&ready).await.expect("write");
    guest.write_all(&Frame::new(Kind::Stdout, s.id, b"hi".to_vec()).encode()).await.expect("write");
    let r = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect("ready");
    assert_eq!(r.ready_ms, 2);
    let mut s = s;
    let f = s.recv().await.expect("frame");
    assert_eq!((f.kind, f.payload.as_slice()), (Kind::Stdout, b"hi".as_slice()));
    // The client greeted the guest first.
    let mut buf = vec![0u8; 9];
    guest.read_exact(&mut buf).await.expect("hello header");
    assert_eq!(buf[4], Kind::Hello as u8);
}

#[tokio::test]
async fn an_oversized_frame_cuts_the_connection() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    let s = c.open_stream();
    guest.write_all(&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1]).await.expect("write");
    let mut s = s;
    assert!(s.recv().await.is_none(), "stream ended");
    let err = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect_err("cut off");
    assert!(err.to_string().contains("limit"), "{err}");
}

#[tokio::test]
async fn garbage_cuts_the_connection() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    guest.write_all(b"\x00\x00\x00\x01\xeegarbage-garbage").await.expect("write");
    let err = c.wait_ready(Instant::now() + Duration::from_secs(5)).await.expect_err("cut off");
    assert!(matches!(err, AgentError::Protocol(_)), "{err}");
    // The connection is really dropped: the guest end reads the client's Hello, then EOF.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), guest.read_to_end(&mut rest))
        .await
        .expect("eof")
        .expect("read");
    let mut dec = Decoder::new();
    dec.feed(&rest);
    while let Some(f) = dec.next_frame().expect("host frames are valid") {
        assert_eq!(f.kind, Kind::Hello);
    }
    assert!(matches!(c.send(Frame::new(Kind::Ping, 0, vec![])).await, Err(AgentError::Closed)));
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// A well-behaved fake hearth-init: answers Hello with Hello and Ready, Ping with Pong
/// (after an unrelated Pong, which the client must not take for its answer).
fn fake_guest(mut guest: tokio::io::DuplexStream) -> tokio::task::JoinHandle<Vec<Kind>> {
    tokio::spawn(async move {
        let mut dec = Decoder::new();
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = guest.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return seen;
            }
            dec.feed(&buf[..n]);
            while let Ok(Some(f)) = dec.next_frame() {
                seen.push(f.kind);
                let answer: Vec<Frame> = match f.kind {
                    Kind::Hello => vec![
                        Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }),
                        Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 5, ready_ms: 9 }),
                    ],
                    Kind::Ping => vec![
                        Frame::new(Kind::Pong, 0, b"stale".to_vec()),
                        Frame::new(Kind::Pong, 0, f.payload),
                    ],
                    _ => vec![],
                };
                for a in answer {
                    // Byte by byte: frames must be reassembled from partial reads.
                    for b in a.encode() {
                        if guest.write_all(&[b]).await.is_err() {
                            return seen;
                        }
                    }
                }
            }
        }
    })
}

#[tokio::test]
async fn hello_ready_ping_and_shutdown_against_a_fake_guest() {
    let (host, guest) = tokio::io::duplex(64);
    let g = fake_guest(guest);
    let c = AgentClient::over(host);
    assert_eq!(c.ready(), None);
    let r = c.wait_ready(soon()).await.expect("ready");
    assert_eq!((r.init_started_ms, r.ready_ms), (5, 9));
    assert_eq!(c.ready(), Some(r.clone()));
    // Ready is remembered: a second waiter returns at once.
    assert_eq!(c.wait_ready(Instant::now()).await.expect("cached"), r);
    c.ping(soon()).await.expect("pong");
    c.ping(soon()).await.expect("second pong");
    c.shutdown().await.expect("shutdown");
    drop(c);
    let seen = g.await.expect("guest");
    assert_eq!(seen.first(), Some(&Kind::Hello));
    assert_eq!(seen.iter().filter(|k| **k == Kind::Ping).count(), 2);
    assert_eq!(seen.last(), Some(&Kind::Shutdown));
}

#[tokio::test]
async fn a_silent_guest_times_out() {
    let (host, _guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    let soon = Instant::now() + Duration::from_millis(100);
    assert!(matches!(c.ping(soon).await, Err(AgentError::Timeout)));
    assert!(matches!(
        c.wait_ready(Instant::now() + Duration::from_millis(100)).await,
        Err(AgentError::Timeout)
    ));
}

#[tokio::test]
async fn a_guest_speaking_another_version_is_refused() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    guest
        .write_all(&Frame::json(Kind::Hello, 0, &Hello { version: 99 }).encode())
        .await
        .expect("write");
    let e = c.wait_ready(soon()).await.expect_err("version");
    assert!(e.to_string().contains("protocol 99"), "{e}");
}

#[tokio::test]
async fn frames_for_unknown_streams_are_dropped_and_others_still_flow() {
    let (host, mut guest) = tokio::io::duplex(1 << 16);
    let c = AgentClient::over(host);
    let mut s = c.open_stream();
    guest
        .write_all(&Frame::new(Kind::Stdout, 4242, b"nobody".to_vec()).encode())
        .await
        .expect("write");
    guest
        .write_all(&Frame::new(Kind::Stderr, s.id, b"mine".to_vec()).encode())
        .await
        .expect("write");
    let f = s.recv().await.expect("frame");
    assert_eq!((f.kind, f.payload.as_slice()), (Kind::Stderr, b"mine".as_slice()));
    c.close_stream(s.id);
    assert!(s.recv().await.is_none(), "closed stream ends");
    assert!(c.closed().is_none());
}

#[tokio::test]
async fn hybrid_vsock_handshake_keeps_the_bytes_after_ok() {
    let (mut host, mut guest) = tokio::io::duplex(1 << 16);
    let vmm = tokio::spawn(async move {
        let mut req = [0u8; 12];
        guest.read_exact(&mut req).await.expect("connect line");
        assert_eq!(&req, b"CONNECT 789\n");
        let mut answer = b"OK 1073741824\n".to_vec();
        answer.extend(
            Frame::json(Kind::Ready, 0, &Ready { init_started_ms: 1, ready_ms: 2 }).encode(),
        );
        guest.write_all(&answer).await.expect("answer");
        guest
    });
    hybrid_vsock_handshake(&mut host, 789).await.expect("handshake");
    let _guest = vmm.await.expect("vmm");
    let c = AgentClient::over(host);
    assert_eq!(c.wait_ready(soon()).await.expect("ready").ready_ms, 2);
}

#[tokio::test]
async fn hybrid_vsock_refusals_say_what_happened() {
    for (answer, expect) in [
        (b"ERR no listener\n".to_vec(), "refused CONNECT 7"),
        (Vec::new(), "closed the vsock socket"),
        (vec![b'x'; 200], "longer than"),
    ] {
        let (mut host, mut guest) = tokio::io::duplex(1 << 16);
        let vmm = tokio::spawn(async move {
            let mut req = [0u8; 10];
            let _ = guest.read_exact(&mut req).await;
            let _ = guest.write_all(&answer).await;
            // Dropping `guest` closes the stream.
        });
        let e = hybrid_vsock_handshake(&mut host, 7).await.expect_err("refused");
        assert!(e.to_string().contains(expect), "{e}");
        vmm.await.expect("vmm");
    }
}

#[tokio::test]
async fn connects_over_unix_sockets_both_ways() {
    let dir = tempfile::tempdir().expect("tmp");
    let (serial, vsock) = (dir.path().join("agent.sock"), dir.path().join("v.sock"));
    let l1 = tokio::net::UnixListener::bind(&serial).expect("bind");
    let l2 = tokio::net::UnixListener::bind(&vsock).expect("bind");
    let server = tokio::spawn(async move {
        let (mut a, _) = l1.accept().await.expect("accept");
        a.write_all(&Frame::json(Kind::Ready, 0, &Ready::default()).encode()).await.expect("ready");
        let (mut b, _) = l2.accept().await.expect("accept");
        let mut line = [0u8; 14];
        b.read_exact(&mut line).await.expect("connect");
        assert_eq!(&line, b"CONNECT 10789\n");
        b.write_all(b"OK 5\n").await.expect("ok");
        b.write_all(&Frame::json(Kind::Ready, 0, &Ready::default()).encode()).await.expect("ready");
        (a, b)
    });
    let c1 = AgentClient::connect(&serial).await.expect("connect");
    let c2 = AgentClient::connect_hybrid_vsock(&vsock, 10789).await.expect("connect");
    c1.wait_ready(soon()).await.expect("ready over virtio-serial socket");
    c2.wait_ready(soon()).await.expect("ready over hybrid vsock");
    let _conns = server.await.expect("server");
    let missing = AgentClient::connect(&dir.path().join("nope.sock")).await.expect_err("no socket");
    assert!(matches!(missing, AgentError::Connect(_)), "{missing}");
}

#[cfg(test)]
mod closed_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn streams_opened_after_a_cut_off_end_at_once() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let c = AgentClient::over(host);
        guest.write_all(&[0xff, 0xff, 0xff, 0xff, 12, 0, 0, 0, 1]).await.expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut s = c.open_stream();
        assert!(tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .expect("not hanging")
            .is_none());
    }

    /// Frames from the host end as the fake guest reads them.
    async fn host_frames(
        guest: &mut tokio::io::DuplexStream,
        dec: &mut Decoder,
        want: Kind,
    ) -> Frame {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = dec.next_frame().expect("host frames are valid") {
                if f.kind == want {
                    return f;
                }
            }
            let n = guest.read(&mut buf).await.expect("read");
            assert!(n > 0, "host closed");
            dec.feed(&buf[..n]);
        }
    }

    const K64: usize = 64 << 10;

    #[tokio::test]
    async fn a_stream_nobody_reads_does_not_hold_up_the_others() {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let c = AgentClient::over(host);
        let (mut stalled, mut live) = (c.open_stream(), c.open_stream());
        // A whole window of output for a stream whose consumer is busy elsewhere...
        for _ in 0..3 {
            guest
                .write_all(&Frame::new(Kind::Stdout, stalled.id, vec![b'x'; K64]).encode())
                .await
                .expect("write");
        }
        // ...does not keep the next stream's output from its reader.
        guest
            .write_all(&Frame::new(Kind::Stdout, live.id, b"through".to_vec()).encode())
            .await
            .expect("write");
        let f = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("not held up")
            .expect("frame");
        assert_eq!(f.payload, b"through");
        for _ in 0..3 {
            assert_eq!(stalled.recv().await.expect("kept").payload.len(), K64);
        }
        assert!(c.closed().is_none());
    }

    #[tokio::test]
    async fn consumed_output_is_credited_back() {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let c = AgentClient::over(host);
        let mut s = c.open_stream();
        for _ in 0..2 {
            guest
                .write_all(&Frame::new(Kind::Stderr, s.id, vec![0; K64]).encode())
                .await
                .expect("write");
        }
        s.recv().await.expect("frame");
        s.recv().await.expect("frame");
        let mut dec = Decoder::new();
        let credit = host_frames(&mut guest, &mut dec, Kind::Credit).await;
        assert_eq!(credit.stream, s.id);
        assert_eq!(
            credit.credit_amount(),
            credit_cost(K64),
            "handed back once a quarter window was consumed"
        );
    }

    #[tokio::test]
    async fn a_guest_that_ignores_its_window_is_cut_off() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        for _ in 0..5 {
            guest
                .write_all(&Frame::new(Kind::Stdout, s.id, vec![0; K64]).encode())
                .await
                .expect("write");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let why = c.closed().expect("cut off");
        assert!(why.contains("window"), "{why}");
    }

    #[tokio::test]
    async fn a_flood_of_frames_that_carry_no_data_is_bounded_too() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        // Empty Exit frames, Hellos and Pings on the stream, never read: each is counted.
        let flood: Vec<u8> = (0..20_000)
            .flat_map(|i| {
                Frame::new([Kind::Exit, Kind::Hello, Kind::Ping][i % 3], s.id, Vec::new()).encode()
            })
            .collect();
        guest.write_all(&flood).await.expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.closed().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let why = c.closed().expect("cut off before it could grow without bound");
        assert!(why.contains("window"), "{why}");
        drop(s);
    }

    #[tokio::test]
    async fn a_well_behaved_guests_exit_after_a_full_window_is_taken() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let mut s = c.open_stream();
        // A whole window of output, then the exit and an error: all within the bound.
        for _ in 0..3 {
            guest
                .write_all(&Frame::new(Kind::Stdout, s.id, vec![1; K64]).encode())
                .await
                .expect("write");
        }
        guest
            .write_all(
                &Frame::new(Kind::Stderr, s.id, vec![2; (WINDOW as usize) - 3 * (K64 + 64) - 64])
                    .encode(),
            )
            .await
            .expect("write");
        guest
            .write_all(&Frame::new(Kind::Exit, s.id, b"{\"exit_code\":0}".to_vec()).encode())
            .await
            .expect("write");
        let mut kinds = Vec::new();
        for _ in 0..5 {
            kinds.push(s.recv().await.expect("frame").kind);
        }
        assert_eq!(kinds.last(), Some(&Kind::Exit));
        assert!(c.closed().is_none(), "{:?}", c.closed());
    }

    #[tokio::test]
    async fn stdin_waits_for_the_guests_credit() {
        let (host, mut guest) = tokio::io::duplex(1 << 22);
        let c = AgentClient::over(host);
        let s = c.open_stream();
        let input = s.input();
        // Three chunks fit the window; the fourth must wait for the guest.
        for _ in 0..3 {
            input
                .send(Frame::new(Kind::Stdin, s.id, vec![1; K64]))
                .await
                .expect("within the window");
        }
        let fourth = {
            let input = input.clone();
            tokio::spawn(async move {
                input.send(Frame::new(Kind::Stdin, input.id, vec![2; K64])).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!fourth.is_finished(), "sent beyond the guest's window");
        guest.write_all(&Frame::credit(s.id, credit_cost(K64)).encode()).await.expect("credit");
        tokio::time::timeout(Duration::from_secs(5), fourth)
            .await
            .expect("credit unblocks it")
            .expect("join")
            .expect("sent");
        // End of stdin is free, and stdin on a closed stream fails instead of waiting forever.
        input.send(Frame::new(Kind::Stdin, s.id, Vec::new())).await.expect("eof needs no credit");
        c.close_stream(s.id);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            input.send(Frame::new(Kind::Stdin, s.id, vec![3; K64])),
        )
        .await;
        assert!(matches!(r, Ok(Err(AgentError::Closed))), "{r:?}");
    }
}
