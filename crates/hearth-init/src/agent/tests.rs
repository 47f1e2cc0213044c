use super::*;
use std::os::unix::net::{UnixListener, UnixStream};

fn read_frame(s: &mut UnixStream, dec: &mut Decoder) -> Frame {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().expect("valid frames") {
            return f;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "agent closed the connection");
        dec.feed(&buf[..n]);
    }
}

/// The socket path (vsock in a guest; a Unix socket here, as this host has no vsock
/// transport): each connection is greeted and served, and a new one works after the last
/// one closed.
#[test]
fn a_listener_serves_one_connection_after_another() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.sock");
    let listener = std::os::fd::OwnedFd::from(UnixListener::bind(&path).expect("bind"));
    let shared = Arc::new(Shared::default());
    let s2 = shared.clone();
    std::thread::spawn(move || serve_listener(&s2, &listener));
    for round in 0..2u8 {
        let mut c = UnixStream::connect(&path).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut dec = Decoder::new();
        c.write_all(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }).encode())
            .expect("hello");
        assert_eq!(read_frame(&mut c, &mut dec).kind, Kind::Hello, "round {round}");
        c.write_all(&Frame::new(Kind::Ping, 0, vec![round]).encode()).expect("ping");
        let pong = loop {
            let f = read_frame(&mut c, &mut dec);
            if f.kind == Kind::Pong {
                break f;
            }
        };
        assert_eq!(pong.payload, vec![round]);
    }
}

/// Output waits for the host's credit, a stream at a time, and drains once the host left.
#[test]
fn output_is_sent_as_credit_allows() {
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::sync_channel(1024);
    *shared.out.lock().expect("out") = Some(tx);
    shared.open_output(1);
    shared.open_output(2);
    let s = shared.clone();
    let big =
        std::thread::spawn(move || s.send_data(Kind::Stdout, 1, &vec![0u8; 2 * WINDOW as usize]));
    let sent = |rx: &mpsc::Receiver<Vec<u8>>| -> usize {
        let mut d = Decoder::new();
        while let Ok(b) = rx.recv_timeout(Duration::from_millis(300)) {
            d.feed(&b);
        }
        std::iter::from_fn(|| d.next_frame().expect("valid")).map(|f| f.payload.len()).sum()
    };
    let first = sent(&rx);
    assert!(
        first <= WINDOW as usize && first > (WINDOW / 2) as usize,
        "one window's worth, got {first}"
    );
    assert!(!big.is_finished(), "waits for credit");
    // Another stream is not held up by the first.
    assert!(shared.send_data(Kind::Stderr, 2, b"other"));
    assert_eq!(sent(&rx), 5);
    // Credit lets more through; the host leaving lets the rest drain.
    shared.add_credit(1, WINDOW);
    assert!(sent(&rx) > (WINDOW / 2) as usize);
    shared.release_output();
    assert!(big.join().expect("join"), "drained");
    shared.close_output(1);
    assert!(!shared.send_data(Kind::Stdout, 1, b"late"), "a closed stream takes nothing");
}

#[test]
fn vsock_listener_binds_the_agent_port_where_vsock_exists() {
    match sys::vsock_listen(AGENT_VSOCK_PORT) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            eprintln!("skipping: no vsock in this kernel")
        }
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            eprintln!("skipping: port {AGENT_VSOCK_PORT} in use here")
        }
        Err(e) => panic!("vsock listen: {e}"),
    }
}
