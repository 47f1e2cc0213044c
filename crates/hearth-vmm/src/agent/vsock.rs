//! The hybrid vsock handshake (Firecracker's and Cloud Hypervisor's vsock over a Unix socket).

use super::*;

/// Longest handshake answer accepted (`OK 1073741824\n` is 14 bytes).
pub(super) const MAX_HANDSHAKE_LINE: usize = 64;

/// The hybrid vsock handshake on an open stream. Reads byte by byte so nothing after the
/// answer's newline (the agent's first frame) is consumed.
pub async fn hybrid_vsock_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    port: u32,
) -> Result<(), AgentError> {
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(AgentError::Connect)?;
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.map_err(AgentError::Connect)? == 0 {
            return Err(AgentError::Protocol(format!(
                "the VMM closed the vsock socket instead of answering CONNECT {port}: is the guest agent listening on that port?"
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_HANDSHAKE_LINE {
            return Err(AgentError::Protocol(format!(
                "the answer to CONNECT {port} is longer than {MAX_HANDSHAKE_LINE} bytes"
            )));
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") && line != b"OK" {
        return Err(AgentError::Protocol(format!(
            "the VMM refused CONNECT {port}: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(())
}
