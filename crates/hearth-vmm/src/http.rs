//! The REST APIs of Firecracker and Cloud Hypervisor: HTTP/1.1 with JSON bodies on the VM's
//! Unix socket. One connection per request; replies are bounded (headers 16 KiB, bodies 1 MiB),
//! since a VMM is not trusted to answer sanely.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::VmmError;

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;
/// Every call is answered at once by a healthy Firecracker.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one VM's API socket.
#[derive(Debug, Clone)]
pub struct Api {
    pub socket: PathBuf,
    /// Which API, for errors: `firecracker api`, `cloud-hypervisor api`.
    name: &'static str,
}

impl Api {
    pub fn firecracker(socket: &Path) -> Self {
        Self { socket: socket.to_owned(), name: "firecracker api" }
    }

    pub fn cloud_hypervisor(socket: &Path) -> Self {
        Self { socket: socket.to_owned(), name: "cloud-hypervisor api" }
    }

    /// A failure of this API, with the VMM's own words.
    pub(crate) fn error(&self, message: impl Into<String>) -> VmmError {
        VmmError::Control { api: self.name, message: message.into() }
    }

    pub fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
        self.call("PUT", path, Some(body)).map(drop)
    }

    /// A `PUT` that hands the VMM open descriptors with the request (`SCM_RIGHTS`: Cloud
    /// Hypervisor's `vm.add-net` takes a tap's this way).
    pub fn put_with_fds(
        &self,
        path: &str,
        body: &serde_json::Value,
        fds: &[i32],
    ) -> Result<(), VmmError> {
        self.request("PUT", path, Some(body), fds).map(drop)
    }

    /// A `PUT` with no body (Cloud Hypervisor's actions: `vm.boot`, `vm.power-button`).
    pub fn put_empty(&self, path: &str) -> Result<(), VmmError> {
        self.call("PUT", path, None).map(drop)
    }

    pub fn patch(&self, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
        self.call("PATCH", path, Some(body)).map(drop)
    }

    pub fn get(&self, path: &str) -> Result<serde_json::Value, VmmError> {
        let body = self.call("GET", path, None)?;
        serde_json::from_slice(&body).map_err(|e| self.error(format!("GET {path}: {e}")))
    }

    /// Runs `f` on this API off the async runtime (every call blocks for up to its timeout).
    pub(crate) async fn off_runtime<T: Send + 'static>(
        self,
        f: impl FnOnce(&Api) -> Result<T, VmmError> + Send + 'static,
    ) -> Result<T, VmmError> {
        let on_panic = self.clone();
        tokio::task::spawn_blocking(move || f(&self))
            .await
            .map_err(|e| on_panic.error(e.to_string()))?
    }

    /// Waits until `GET path` answers, for up to `wait`, or until the process (pid, start time)
    /// is gone.
    pub(crate) fn wait_ready(
        &self,
        path: &str,
        pid: i32,
        start: u64,
        wait: Duration,
    ) -> Result<(), VmmError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.get(path) {
                Ok(_) => return Ok(()),
                Err(e)
                    if std::time::Instant::now() > deadline
                        || !crate::process::is_alive(pid, start) =>
                {
                    return Err(self.error(format!("the API socket never answered: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// One request; the reply's body when its status is 2xx, else the VMM's fault message.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, VmmError> {
        self.request(method, path, body, &[])
    }

    /// [`Self::call`], with `fds` sent along with the request's first bytes.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        fds: &[i32],
    ) -> Result<Vec<u8>, VmmError> {
        let what = format!("{method} {path}");
        let io = |e: std::io::Error| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                VmmError::Closed { api: self.name }
            } else {
                self.error(format!("{what}: {e} ({})", self.socket.display()))
            }
        };
        let mut s = crate::jail::connect(&self.socket).map_err(io)?;
        s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        if body.is_some() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", payload.len()));
        req.push_str("\r\n");
        req.push_str(&payload);
        let mut sent = 0;
        if !fds.is_empty() {
            sent = crate::sys::send_with_fds(&s, req.as_bytes(), fds).map_err(io)?;
        }
        s.write_all(&req.as_bytes()[sent..]).map_err(io)?;
        let (status, reply) = read_reply(&mut s).map_err(|m| self.error(format!("{what}: {m}")))?;
        if (200..300).contains(&status) {
            return Ok(reply);
        }
        Err(self.error(format!("{what} answered {status}: {}", fault(&reply))))
    }
}

/// The VMM's words in an error reply: Firecracker's `fault_message`, Cloud Hypervisor's chain of
/// messages (a JSON array), else the body as text.
fn fault(reply: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(reply) {
        Ok(serde_json::Value::Object(o))
            if o.get("fault_message").is_some_and(|m| m.is_string()) =>
        {
            o["fault_message"].as_str().unwrap_or_default().to_owned()
        }
        Ok(serde_json::Value::Array(chain)) if chain.iter().all(|m| m.is_string()) => {
            chain.iter().filter_map(|m| m.as_str()).collect::<Vec<_>>().join(": ")
        }
        _ => String::from_utf8_lossy(reply).into_owned(),
    }
}

/// Reads one HTTP reply: its status code and body (by Content-Length; none means empty).
fn read_reply(s: &mut impl Read) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("reply headers exceed {} KiB", MAX_HEAD >> 10));
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the VMM closed the connection before replying".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP reply: {:?}", head.lines().next().unwrap_or("")))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(n) if n > MAX_BODY => return Err(format!("reply body of {n} bytes exceeds 1 MiB")),
        Some(n) => {
            while body.len() < n {
                let k = s.read(&mut chunk).map_err(|e| e.to_string())?;
                if k == 0 {
                    return Err("the reply ended early".into());
                }
                body.extend_from_slice(&chunk[..k]);
            }
            body.truncate(n);
        }
        // Firecracker keeps the connection alive and sends no length with an empty body
        // (204): what arrived with the headers is all there is.
        None => body.truncate(MAX_BODY),
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_by_length_and_bounded() {
        let ok = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(read_reply(&mut &ok[..]), Ok((204, vec![])));
        let bad = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 27\r\n\r\n{\"fault_message\":\"nope\"}   extra";
        let (status, body) = read_reply(&mut &bad[..]).expect("reply");
        assert_eq!((status, body.len()), (400, 27));
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n";
        assert!(read_reply(&mut &huge[..]).expect_err("too big").contains("exceeds"));
        let endless = vec![b'x'; MAX_HEAD + 8192];
        assert!(read_reply(&mut &endless[..]).expect_err("no end").contains("headers"));
        assert!(read_reply(&mut &b"garbage\r\n\r\n"[..]).is_err());
    }

    #[test]
    fn error_replies_keep_the_vmms_words() {
        assert_eq!(fault(br#"{"fault_message":"bad drive"}"#), "bad drive");
        assert_eq!(
            fault(br#"["Error from API","The VM could not boot","Cannot open kernel file"]"#),
            "Error from API: The VM could not boot: Cannot open kernel file"
        );
        assert_eq!(fault(b"plain words"), "plain words");
    }
}
