//! `hearth exec`: a process of the host's, its output pumped into frames.

use super::*;

pub(super) fn pump(shared: &Shared, stream: u32, kind: Kind, mut r: File) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return, // EIO on a pty once the process is gone
            Ok(n) => {
                shared.send_data(kind, stream, &buf[..n]);
            }
        }
    }
}

pub(super) fn exec(shared: &Arc<Shared>, stream: u32, req: ExecRequest) {
    let defaults = shared.defaults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let spec = Spec {
        args: req.args.clone(),
        env: process::merge_env(&defaults.env, &req.env),
        cwd: if req.cwd.is_empty() { defaults.cwd.clone() } else { req.cwd.clone() },
        user: if req.user.is_empty() { defaults.user.clone() } else { req.user.clone() },
        hostname: defaults.hostname.clone(),
    };
    let fail = |code: i32, msg: String| {
        shared.drop_stdin(stream);
        shared.send_data(Kind::Stderr, stream, format!("hearth: {msg}\n").as_bytes());
        shared.send(&Frame::json(Kind::Exit, stream, &ExecExit { exit_code: code, signal: None }));
        shared.close_output(stream);
    };
    let mut cmd = match process::command(&spec, req.tty.then_some(0), true) {
        Ok(c) => c,
        Err(e) => return fail(e.code, e.message),
    };
    let mut readers = Vec::new();
    let (child, master) = if req.tty {
        let (master, slave) = match sys::openpty(req.rows, req.cols) {
            Ok(p) => p,
            Err(e) => return fail(125, format!("openpty: {e}")),
        };
        let (Ok(s1), Ok(s2)) = (slave.try_clone(), slave.try_clone()) else {
            return fail(125, "dup pty".into());
        };
        cmd.stdin(slave).stdout(s1).stderr(s2);
        let child = match process::spawn(&mut cmd, &spec.args[0]) {
            Ok(c) => c,
            Err(e) => return fail(e.code, e.message),
        };
        drop(cmd); // closes our copies of the slave
        if let (Ok(r), Ok(w)) = (master.try_clone(), master.try_clone()) {
            let s = shared.clone();
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stdout, r)));
            shared.open_stdin(stream, w);
        }
        (child, Some(master))
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match process::spawn(&mut cmd, &spec.args[0]) {
            Ok(c) => c,
            Err(e) => return fail(e.code, e.message),
        };
        drop(cmd);
        if let Some(out) = child.stdout.take() {
            let (s, f) = (shared.clone(), File::from(std::os::fd::OwnedFd::from(out)));
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stdout, f)));
        }
        if let Some(err) = child.stderr.take() {
            let (s, f) = (shared.clone(), File::from(std::os::fd::OwnedFd::from(err)));
            readers.push(std::thread::spawn(move || pump(&s, stream, Kind::Stderr, f)));
        }
        if let Some(inp) = child.stdin.take() {
            shared.open_stdin(stream, File::from(std::os::fd::OwnedFd::from(inp)));
        }
        (child, None)
    };
    let pid = child.id() as i32;
    let exited = shared.watch(pid);
    shared
        .pids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(stream, (pid, master.as_ref().and_then(|m| m.try_clone().ok())));
    let status = exited.recv().unwrap_or(255 << 8);
    if req.tty {
        // The pty reader ends with EIO once the last slave fd closes; drop ours first.
        drop(master);
    }
    for r in readers {
        let _ = r.join();
    }
    shared.drop_stdin(stream);
    shared.pids.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream);
    let (code, signal) = sys::decode_status(status);
    shared.send(&Frame::json(Kind::Exit, stream, &ExecExit { exit_code: code, signal }));
    shared.close_output(stream);
}
