//! The one error type of hearth's use-cases: a kind a front end maps to its own codes (gRPC in
//! hearth-api, exit codes in the CLI) and a message that names the problem and the fix.

/// What went wrong, as far as a caller can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The VM, image or kernel named does not exist.
    NotFound,
    /// The request itself is wrong (a bad size, name or option); repeating it cannot help.
    Invalid,
    /// It clashes with something that exists (a name in use, a port published twice).
    Conflict,
    /// The host or the VM is not in a state that allows it (an image removed, a VM running).
    FailedPrecondition,
    /// A bounded resource ran out (VMM uids, addresses).
    Exhausted,
    /// Something outside hearth did not answer (a registry, the host's network); may pass later.
    Unavailable,
    /// A bug or an I/O failure on the host.
    Internal,
}

/// A use-case's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

/// Shorthand for results of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Exhausted, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// An internal error carrying the whole chain of `e`'s causes.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, e.to_string())
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying the same thing again later may succeed: the world outside hearth did not
    /// answer, or the host failed in a way that is not the request's fault. Flintlock's
    /// provisioning retries exactly these.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Internal)
    }

    /// The same error with `context` in front of its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Self { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outside_and_host_failures_are_retried() {
        assert!(Error::unavailable("registry timed out").is_retryable());
        assert!(Error::internal("disk I/O").is_retryable());
        for e in [
            Error::invalid("bad size"),
            Error::not_found("no image"),
            Error::conflict("name"),
            Error::precondition("removed"),
        ] {
            assert!(!e.is_retryable(), "{e:?}");
        }
        assert_eq!(Error::precondition("gone").context("volume 1").to_string(), "volume 1: gone");
    }
}
