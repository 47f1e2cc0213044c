//! Frames from the host, decoded and handled.

use super::*;

/// Reads frames from the host. On the virtio-serial port a closed host end reads as EOF /
/// POLLHUP: the loop then sleeps 100 ms between checks, greets the host when it (re)connects,
/// and starts a fresh decoder. On a connection (`stream`), the end of it ends the loop.
pub(super) fn read_loop(shared: &Arc<Shared>, port: &File, stream: bool) {
    let mut dec = Decoder::new();
    let mut connected = false;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let revents = sys::poll(port.as_raw_fd(), libc::POLLIN, 1000).unwrap_or(0);
        if revents & libc::POLLHUP != 0 && revents & libc::POLLIN == 0 {
            if stream {
                shared.release_output();
                return;
            }
            if connected {
                shared.release_output();
                connected = false;
                dec = Decoder::new();
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if !connected {
            connected = true;
            shared.send(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
        }
        match (&*port).read(&mut buf) {
            Ok(0) if stream => return shared.release_output(),
            Ok(0) => {
                dec = Decoder::new();
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(n) => {
                dec.feed(&buf[..n]);
                loop {
                    match dec.next_frame() {
                        Ok(Some(f)) => handle(shared, f),
                        Ok(None) => break,
                        Err(e) => {
                            // Drop what is buffered and resynchronise on the next frame.
                            eprintln!("hearth-init: agent: {e}; dropping the buffered input");
                            dec = Decoder::new();
                            break;
                        }
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) if stream => return shared.release_output(),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

pub(super) fn handle(shared: &Arc<Shared>, f: Frame) {
    match f.kind {
        Kind::Hello => {
            shared.send(&Frame::json(Kind::Hello, 0, &Hello { version: PROTOCOL_VERSION }));
            let ready = shared.ready.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(r) = ready {
                shared.send(&Frame::json(Kind::Ready, 0, &r));
            }
        }
        Kind::Ping => shared.send(&Frame::new(Kind::Pong, 0, f.payload)),
        // In line: frames after it (an exec) see the new identity.
        Kind::Reidentify => match f.parse::<hearth_types::agent::Identity>() {
            Ok(id) => reidentify(&id),
            Err(e) => eprintln!("hearth-init: agent: a malformed identity: {e}"),
        },
        Kind::Shutdown => shared.shutdown.store(true, Ordering::SeqCst),
        Kind::Credit => shared.add_credit(f.stream, f.credit_amount()),
        Kind::Exec => match f.parse::<ExecRequest>() {
            Ok(req) => {
                shared.open_output(f.stream);
                shared
                    .stdins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(f.stream, Slot::Pending(Vec::new(), false));
                let s = shared.clone();
                std::thread::spawn(move || exec(&s, f.stream, req));
            }
            Err(e) => shared.send(&Frame::new(Kind::Error, f.stream, e.to_string().into_bytes())),
        },
        Kind::Stdin => {
            let mut stdins = shared.stdins.lock().unwrap_or_else(|e| e.into_inner());
            match stdins.get_mut(&f.stream) {
                Some(Slot::Pending(buf, eof)) => {
                    if f.payload.is_empty() {
                        *eof = true;
                    } else if buf.len() + f.payload.len() <= MAX_PENDING {
                        buf.extend_from_slice(&f.payload);
                    }
                }
                Some(Slot::Open(_)) if f.payload.is_empty() => {
                    stdins.remove(&f.stream);
                }
                Some(Slot::Open(w)) => {
                    let _ = w.send(f.payload);
                }
                None => {}
            }
        }
        Kind::Signal => {
            if let (Some(b), Some((pid, _))) = (
                f.payload.get(..4),
                shared.pids.lock().unwrap_or_else(|e| e.into_inner()).get(&f.stream),
            ) {
                sys::kill(*pid, i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Kind::Resize => {
            if let (Some(b), Some((_, Some(m)))) = (
                f.payload.get(..4),
                shared.pids.lock().unwrap_or_else(|e| e.into_inner()).get(&f.stream),
            ) {
                sys::set_winsize(
                    m.as_raw_fd(),
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                );
            }
        }
        Kind::CopyOut => {
            shared.open_output(f.stream);
            let s = shared.clone();
            std::thread::spawn(move || {
                copy_out(&s, f.stream, f.parse::<CopyRequest>().map(|r| r.path).unwrap_or_default())
            });
        }
        Kind::CopyIn => {
            shared
                .stdins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(f.stream, Slot::Pending(Vec::new(), false));
            let s = shared.clone();
            std::thread::spawn(move || {
                copy_in(&s, f.stream, f.parse::<CopyRequest>().map(|r| r.path).unwrap_or_default())
            });
        }
        _ => {}
    }
}

/// A guest restored from a snapshot takes its new VM's identity: fresh randomness first (nothing
/// random it draws after comes from the snapshot's state), the clock, its hostname, its cards.
fn reidentify(id: &hearth_types::agent::Identity) {
    if let Err(e) = sys::add_entropy_and_reseed(&id.entropy) {
        eprintln!("hearth-init: reseeding the random number generator: {e}");
    }
    if id.now_ms > 0 {
        if let Err(e) = sys::set_clock(id.now_ms) {
            eprintln!("hearth-init: setting the clock: {e}");
        }
    }
    if !id.hostname.is_empty() {
        if let Err(e) = sys::sethostname(&id.hostname) {
            eprintln!("hearth-init: setting the hostname: {e}");
        }
    }
    crate::net::reconfigure(id.network.as_ref(), &id.cards, &id.hostname);
    if let Err(e) = renew_machine_id(std::path::Path::new(MACHINE_ID)) {
        eprintln!("hearth-init: renewing {MACHINE_ID}: {e}");
    }
}

/// systemd's (and D-Bus's) id of the machine: a restored guest must not share its snapshot's.
const MACHINE_ID: &str = "/etc/machine-id";

/// Gives the machine a new random id when it has one (an empty file or none means the image's
/// init makes its own at first boot; a link is the init's to manage, and never followed).
fn renew_machine_id(path: &std::path::Path) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let current = std::fs::read_to_string(path).unwrap_or_default();
    if !meta.file_type().is_file() || current.trim().is_empty() || current.trim() == "uninitialized"
    {
        return Ok(());
    }
    let mut id = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut id)?;
    let text: String = id.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n";
    let tmp = path.with_extension("hearth-new");
    std::fs::write(&tmp, text)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod machine_id_tests {
    use super::*;

    #[test]
    fn a_machine_id_is_renewed_and_an_unset_one_or_a_link_left_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("machine-id");
        renew_machine_id(&path).expect("none: nothing to do");
        assert!(!path.exists());
        let old = "0123456789abcdef0123456789abcdef\n";
        std::fs::write(&path, old).expect("id");
        renew_machine_id(&path).expect("renew");
        let new = std::fs::read_to_string(&path).expect("read");
        assert!(new != old && new.len() == 33 && new.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        for unset in ["", "uninitialized\n"] {
            std::fs::write(&path, unset).expect("unset");
            renew_machine_id(&path).expect("left");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), unset);
        }
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, old).expect("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        renew_machine_id(&link).expect("a link");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), old, "never followed");
    }
}
