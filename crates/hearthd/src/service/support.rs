//! What the handlers share: replies, blocking work, errors, progress, new records.

use super::*;

pub(super) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Any domain record (VM, image, kernel) as the API's JSON record.
pub(super) fn record<T: serde::Serialize>(v: &T) -> Response<pb::Record> {
    Response::new(pb::Record { json: json(v), warning: String::new() })
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

pub(super) fn user_error(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

pub(super) fn chain(e: impl Into<anyhow::Error>) -> Status {
    Status::failed_precondition(format!("{:#}", e.into()))
}

/// Runs a mutation to its end in a task of the daemon's own. A client that goes away drops the
/// handler's future, which then cancels only its wait for the answer: the work is never cut off
/// between two steps (a VMM started but not recorded, watched or attached).
pub async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work).await.map_err(internal)?
}

pub(super) fn running(r: &VmRecord) -> bool {
    r.status.state.is_active()
}

pub(super) struct ChannelProgress(
    pub(super) tokio::sync::mpsc::Sender<Result<pb::Progress, Status>>,
);

impl hearth_image::Progress for ChannelProgress {
    fn start(&self, digest: &str, total: u64) {
        let _ = self.0.blocking_send(Ok(pb::Progress {
            digest: digest.into(),
            total,
            ..Default::default()
        }));
    }
    fn advance(&self, digest: &str, bytes: u64) {
        let _ = self.0.blocking_send(Ok(pb::Progress {
            digest: digest.into(),
            current: bytes,
            ..Default::default()
        }));
    }
    fn finish(&self, digest: &str) {
        let _ = self.0.blocking_send(Ok(pb::Progress {
            digest: digest.into(),
            done: true,
            ..Default::default()
        }));
    }
}

pub(super) fn parse_signal(s: &str) -> Result<i32, Status> {
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "" | "KILL" | "9" => libc::SIGKILL,
        "TERM" | "15" => libc::SIGTERM,
        "INT" | "2" => libc::SIGINT,
        "HUP" | "1" => libc::SIGHUP,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown signal {other:?}: use KILL, TERM, INT or HUP"
            )))
        }
    })
}
