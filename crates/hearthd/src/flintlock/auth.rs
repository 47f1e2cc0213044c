//! Flintlock's `--basic-auth-token`.

use super::*;

/// Checks `authorization: Basic <base64(token)>` (scheme case-insensitive), as Flintlock's
/// `--basic-auth-token`.
pub fn check_basic_auth(token: &str, req: &Request<()>) -> Result<(), Status> {
    let expected = base64::engine::general_purpose::STANDARD.encode(token);
    let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    match given.split_once(' ') {
        Some((scheme, value))
            if scheme.eq_ignore_ascii_case("basic")
                && constant_time_eq(value.trim().as_bytes(), expected.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(Status::unauthenticated(
            "missing or wrong authorization: send \"authorization: Basic <base64 of the token>\"",
        )),
    }
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
