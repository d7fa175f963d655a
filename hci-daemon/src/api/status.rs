//! The one mapping from [`hci_core::Error`] to gRPC status codes.
//!
//! (A `From<hci_core::Error> for tonic::Status` impl is impossible here: both
//! types are foreign to this crate. Handlers call [`to_status`], usually
//! through [`ResultExt::or_status`].)

use std::error::Error as _;

use hci_core::Error;
use tonic::{Code, Status};

/// Converts an error to the gRPC status a client should see.
///
/// | error | code |
/// |---|---|
/// | `NotFound` | `NOT_FOUND` |
/// | `AlreadyExists` | `ALREADY_EXISTS` |
/// | `Conflict` | `ABORTED` (message names the expected and actual versions) |
/// | `Invalid`, `InvalidSpec` | `INVALID_ARGUMENT` (message lists every field path) |
/// | `OutOfRange`, `Compacted` | `OUT_OF_RANGE` |
/// | `ReadOnly`, `Busy`, `Fenced` | `FAILED_PRECONDITION` |
/// | `Unsupported` | `UNIMPLEMENTED` |
/// | `Unavailable`, retryable `Io` | `UNAVAILABLE` |
/// | `Corrupt` | `DATA_LOSS` |
/// | `Cancelled` | `CANCELLED` |
/// | anything else | `INTERNAL` |
pub fn to_status(err: Error) -> Status {
    let code = match &err {
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::Conflict {
            kind,
            name,
            expected,
            actual,
        } => {
            let found = if *actual == 0 {
                "it no longer exists".to_string()
            } else {
                format!("found {actual}")
            };
            return Status::aborted(format!(
                "{kind} {name:?} was modified concurrently: expected resource version \
                 {expected}, {found}; read it again and retry"
            ));
        }
        Error::Invalid { .. } | Error::InvalidSpec(_) => Code::InvalidArgument,
        Error::OutOfRange { .. } | Error::Compacted { .. } => Code::OutOfRange,
        Error::ReadOnly { .. } | Error::Busy { .. } | Error::Fenced { .. } => {
            Code::FailedPrecondition
        }
        Error::Unsupported { .. } => Code::Unimplemented,
        Error::Unavailable { .. } => Code::Unavailable,
        Error::Io { .. } if err.is_retryable() => Code::Unavailable,
        Error::Corrupt { .. } => Code::DataLoss,
        Error::Cancelled => Code::Cancelled,
        _ => Code::Internal,
    };
    Status::new(code, message(&err))
}

/// The error and its chain of causes, `: `-separated.
fn message(err: &Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `.or_status()` on results carrying [`hci_core::Error`].
pub trait ResultExt<T> {
    /// Maps the error with [`to_status`].
    fn or_status(self) -> Result<T, Status>;
}

impl<T> ResultExt<T> for Result<T, Error> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(to_status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::model::ValidationErrors;

    #[test]
    fn codes() {
        assert_eq!(
            to_status(Error::not_found("Volume", "a")).code(),
            Code::NotFound
        );
        assert_eq!(
            to_status(Error::already_exists("Volume", "a")).code(),
            Code::AlreadyExists
        );
        let s = to_status(Error::Conflict {
            kind: "Volume",
            name: "a".into(),
            expected: 3,
            actual: 5,
        });
        assert_eq!(s.code(), Code::Aborted);
        assert!(
            s.message().contains("expected resource version 3, found 5"),
            "{}",
            s.message()
        );
        let mut errs = ValidationErrors::new();
        errs.push("spec.size", "must be greater than 0");
        errs.push("metadata.name", "is empty");
        let s = to_status(Error::InvalidSpec(errs));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("spec.size") && s.message().contains("metadata.name"));
        let s = to_status(Error::Compacted {
            requested: 1,
            oldest: 5,
        });
        assert_eq!(s.code(), Code::OutOfRange);
        let s = to_status(Error::Unavailable {
            what: "etcd".into(),
            source: Some("connection refused".into()),
        });
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "etcd is unavailable: connection refused");
        assert_eq!(to_status(Error::Cancelled).code(), Code::Cancelled);
        assert_eq!(
            to_status(Error::unsupported("console", "this daemon")).code(),
            Code::Unimplemented
        );
    }
}
