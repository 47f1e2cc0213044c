//! Printing: tables, JSON, errors.

use hearth_types::VmRecord;

/// Prints an error chain once, gRPC statuses reduced to their message.
pub fn print_error(e: &anyhow::Error) {
    let mut msg = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            Some(s) => s.message().to_owned(),
            None => cause.to_string(),
        };
        if i > 0 {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    eprintln!("hearth: {msg}");
}

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `12 seconds ago`-style age from Unix seconds.
pub fn ago(unix_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = now.saturating_sub(unix_secs);
    let (n, unit) = match secs {
        0..=59 => (secs, "second"),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// The STATUS column, as docker words it.
pub fn status_text(r: &VmRecord) -> String {
    let s = &r.status;
    if s.restarting {
        return match s.exit_code {
            Some(c) => format!("Restarting ({c})"),
            None => "Restarting".into(),
        };
    }
    match s.state {
        hearth_types::VmState::Stopped => match s.exit_code {
            Some(c) => format!("Exited ({c})"),
            None if !s.reason.is_empty() => format!("Stopped ({})", s.reason),
            None => "Stopped".into(),
        },
        hearth_types::VmState::Failed => format!("Failed: {}", s.reason),
        hearth_types::VmState::Running if s.paused => "Running (Paused)".into(),
        other => {
            let mut t = other.to_string();
            if let Some(c) = t.get_mut(0..1) {
                c.make_ascii_uppercase();
            }
            t
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    hearth_types::format_size(n)
}

pub fn parse_json<T: for<'de> serde::Deserialize<'de>>(s: &str) -> anyhow::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        anyhow::anyhow!(
            "the daemon sent a record this client cannot read ({e}); are versions mismatched?"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_types::{Desired, VmState};

    #[test]
    fn the_status_column_says_what_a_user_checks() {
        let s = |state, exit_code, reason: &str, paused| {
            let mut r = hearth_testkit::record(1, Desired::Running, state);
            (r.status.exit_code, r.status.reason, r.status.paused) =
                (exit_code, reason.into(), paused);
            status_text(&r)
        };
        assert_eq!(s(VmState::Running, None, "", false), "Running");
        assert_eq!(s(VmState::Running, None, "", true), "Running (Paused)");
        assert_eq!(s(VmState::Stopped, Some(3), "", false), "Exited (3)");
        assert_eq!(s(VmState::Stopped, None, "killed", false), "Stopped (killed)");
        assert_eq!(s(VmState::Failed, None, "no disk", false), "Failed: no disk");
        let mut r = hearth_testkit::record(1, Desired::Running, VmState::Stopped);
        (r.status.restarting, r.status.exit_code) = (true, Some(2));
        assert_eq!(status_text(&r), "Restarting (2)");
    }
}
