//! The one place core errors become gRPC statuses (and back, for the daemon's code that still
//! speaks `Status` to the core's ports).

use hearth_core::{Error, ErrorKind};
use tonic::{Code, Status};

/// The gRPC status of a core error.
pub fn to_status(e: Error) -> Status {
    let code = match e.kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::Conflict => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Exhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, e.message)
}

/// The core error of a gRPC status: the inverse of [`to_status`] (codes with no kind of their
/// own count as internal).
pub fn from_status(s: &Status) -> Error {
    let kind = match s.code() {
        Code::NotFound => ErrorKind::NotFound,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::Invalid,
        Code::AlreadyExists | Code::Aborted => ErrorKind::Conflict,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::ResourceExhausted => ErrorKind::Exhausted,
        Code::Unavailable | Code::DeadlineExceeded => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_round_trip() {
        use ErrorKind::*;
        for kind in
            [NotFound, Invalid, Conflict, FailedPrecondition, Exhausted, Unavailable, Internal]
        {
            let e = Error::new(kind, "why and the fix");
            let s = to_status(e.clone());
            assert_eq!(s.message(), "why and the fix");
            assert_eq!(from_status(&s), e, "{kind:?} as {:?}", s.code());
        }
        assert_eq!(to_status(Error::conflict("name in use")).code(), Code::AlreadyExists);
    }
}
