//! Recognising and waiting for VMM processes that are not our children.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use crate::sys;

/// Start time (field 22 of /proc/PID/stat) and whether the process has exited (a zombie).
fn stat(pid: i32) -> Option<(u64, bool)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<(u64, bool)> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 20 (num_threads) is index 17, field 22 (starttime)
    // index 19. A leader thread that has exited shows "Z" while the process's other threads
    // still run (and hold its files), and it cannot be reaped until they are gone: the process
    // has exited only when the zombie leader is its last thread.
    let leader_gone = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let zombie =
        leader_gone && fields.get(17).and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n <= 1);
    Some((fields.get(19)?.parse().ok()?, zombie))
}

/// The process's start time, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(t, _)| t)
}

/// True when `pid` is alive, not a zombie, and started at `start` (so not a reused pid).
pub fn is_alive(pid: i32, start: u64) -> bool {
    pid > 0 && matches!(stat(pid), Some((t, false)) if t == start)
}

/// Reads a pid file and the named process's start time.
pub fn read_pidfile(path: &Path) -> Option<(i32, u64)> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some((pid, start_time(pid)?))
}

/// Signals the process if it is still the one we started.
pub fn kill(pid: i32, start: u64, signal: i32) {
    if is_alive(pid, start) {
        let _ = sys::kill(pid, signal);
    }
}

/// Reaps the process if it is our exited child (a VMM hearthd started in this run): only while
/// `/proc` still shows it as that zombie, so the pid cannot name anything else.
fn reap_if_ours(pid: i32, start: u64) {
    if matches!(stat(pid), Some((t, true)) if t == start) {
        sys::reap(pid);
    }
}

/// Resolves when the process has exited (and reaps it, if it is our child).
pub async fn wait_exit(pid: i32, start: u64) {
    wait_exit_inner(pid, start).await;
    reap_if_ours(pid, start);
}

async fn wait_exit_inner(pid: i32, start: u64) {
    if !is_alive(pid, start) {
        return;
    }
    // The fd is an OwnedFd moved into the AsyncFd, so the I/O-safety concern behind the
    // deprecation (a borrowed fd closed under tokio) does not apply.
    #[allow(deprecated)]
    let registered = sys::pidfd_open(pid)
        .and_then(|fd| AsyncFd::with_interest(fd, tokio::io::Interest::READABLE));
    match registered {
        Ok(fd) => {
            // Readable means exited. A zombie also counts, so re-check liveness afterwards.
            while let Ok(mut g) = fd.readable().await {
                if !is_alive(pid, start) {
                    return;
                }
                g.clear_ready();
            }
            poll_exit(pid, start).await
        }
        Err(_) => poll_exit(pid, start).await,
    }
}

/// Blocks until the process has exited or `timeout` passed; true when it is gone. For callers
/// outside a runtime (and code that must not await); uses pidfd + poll, so it works for
/// processes that are not our children, such as QEMUs a previous hearthd started.
pub fn wait_exit_blocking(pid: i32, start: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let pidfd = sys::pidfd_open(pid).ok();
    loop {
        if !is_alive(pid, start) {
            reap_if_ours(pid, start);
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // Without a pidfd (pid already gone, or an old kernel) fall back to short sleeps.
        let step = left.min(Duration::from_millis(50));
        match &pidfd {
            Some(fd) => {
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
                if sys::poll_readable(fd.as_fd(), ms).is_err() {
                    std::thread::sleep(step);
                }
            }
            None => std::thread::sleep(step),
        }
    }
}

async fn poll_exit(pid: i32, start: u64) {
    while is_alive(pid, start) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value after `flag` on the command line of `pid` (`-pidfile PATH`, `--api-sock PATH`).
pub fn arg_of(pid: i32, flag: &[u8]) -> Option<Vec<u8>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].to_vec())
}

/// Every live process whose command line gives `flag` a path whose file is `file` in a
/// directory right under `vms_dir`, as (that VM directory, pid): how a VMM a dead daemon never
/// recorded is found from /proc alone. (Under the root's lock every child the predecessor
/// forked has exec'd: the lock's descriptor closes at exec.)
pub fn scan_vmms(vms_dir: &Path, flag: &[u8], file: &str) -> Vec<(PathBuf, i32)> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for (pid, value) in live_with_flag(flag) {
        let path = Path::new(std::ffi::OsStr::from_bytes(&value));
        let ours = path.file_name() == Some(file.as_ref())
            && path.parent().is_some_and(|d| d.parent() == Some(vms_dir));
        if let (true, Some(dir)) = (ours, path.parent()) {
            out.push((dir.to_owned(), pid));
        }
    }
    out
}

/// Every live process whose `flag` is `value` on its command line.
pub fn with_arg(flag: &[u8], value: &[u8]) -> Vec<i32> {
    live_with_flag(flag).into_iter().filter(|(_, v)| v == value).map(|(pid, _)| pid).collect()
}

/// Every live process with `flag` on its command line, with the flag's value.
pub(crate) fn live_with_flag(flag: &[u8]) -> Vec<(i32, Vec<u8>)> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(|pid| Some((pid, arg_of(pid, flag)?)))
        .filter(|(pid, _)| start_time(*pid).is_some_and(|t| is_alive(*pid, t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recognises_and_waits_for_a_process() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = child.id() as i32;
        let start = start_time(pid).expect("start time");
        assert!(is_alive(pid, start));
        assert!(!is_alive(pid, start + 1), "a different start time is a different process");
        kill(pid, start, libc::SIGKILL);
        let _ = child.wait();
        tokio::time::timeout(Duration::from_secs(5), wait_exit(pid, start))
            .await
            .expect("exit seen");
        assert!(!is_alive(pid, start));
    }

    #[test]
    fn blocking_wait_sees_a_non_child_exit_and_times_out_on_a_live_one() {
        // A grandchild: `sh` starts `sleep` in the background and exits, so `sleep` is not ours.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .expect("sh");
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("pid");
        let start = start_time(pid).expect("start time");
        assert!(!wait_exit_blocking(pid, start, Duration::from_millis(100)), "still running");
        kill(pid, start, libc::SIGTERM);
        assert!(wait_exit_blocking(pid, start, Duration::from_secs(5)), "exit seen");
        assert!(!is_alive(pid, start));
    }

    #[test]
    fn a_zombie_leader_with_live_threads_has_not_exited() {
        let line = |state: &str, threads: u32| {
            format!("4242 (qemu-system-x86) {state} 1 4242 4242 0 -1 4194560 9 0 0 0 0 0 0 0 20 0 {threads} 0 786414 3133440 372 0")
        };
        assert_eq!(parse_stat(&line("S", 4)), Some((786414, false)));
        assert_eq!(
            parse_stat(&line("Z", 4)),
            Some((786414, false)),
            "its vCPU and I/O threads still run"
        );
        assert_eq!(parse_stat(&line("Z", 1)), Some((786414, true)));
        assert_eq!(
            parse_stat("7 (a) b) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0"),
            Some((55, true)),
            "a ')' in the name"
        );
    }

    #[test]
    fn pidfile_with_a_dead_pid_is_none() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.pid");
        std::fs::write(&p, "999999999\n").expect("write");
        assert!(read_pidfile(&p).is_none());
    }
}
