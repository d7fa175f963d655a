//! The one mapping from Rust errors ([`hci_core::Error`], gRPC statuses,
//! connection failures) to the Python exception hierarchy:
//!
//! ```text
//! HciError
//! ├── NotFound              NotFound                 / NOT_FOUND
//! ├── Conflict              Conflict                 / ABORTED
//! │   └── AlreadyExists     AlreadyExists            / ALREADY_EXISTS
//! ├── InvalidSpec           Invalid, InvalidSpec     / INVALID_ARGUMENT
//! ├── OutOfRange            OutOfRange, Compacted    / OUT_OF_RANGE
//! ├── FailedPrecondition                             / FAILED_PRECONDITION
//! │   ├── ReadOnly          ReadOnly
//! │   ├── Busy              Busy
//! │   └── Fenced            Fenced
//! ├── Unsupported           Unsupported              / UNIMPLEMENTED
//! ├── Unavailable           Unavailable, retryable Io / UNAVAILABLE, DEADLINE_EXCEEDED
//! ├── PermissionDenied      Io(PermissionDenied)     / PERMISSION_DENIED, UNAUTHENTICATED
//! ├── Corrupt               Corrupt                  / DATA_LOSS
//! └── Cancelled             Cancelled                / CANCELLED
//! ```
//!
//! Everything else is a plain `HciError`. The message is the Rust error's
//! message followed by its chain of causes, `: `-separated (the same text
//! the daemon puts in a gRPC status), so nothing is lost on the way.

use hci_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use tonic::{Code, Status};

create_exception!(
    hci,
    HciError,
    PyException,
    "Base class of every error raised by hci."
);
create_exception!(
    hci,
    NotFound,
    HciError,
    "The named resource (volume, snapshot, backup, VM…) does not exist."
);
create_exception!(
    hci,
    Conflict,
    HciError,
    "Someone else changed the resource (stale resource version), or it exists already."
);
create_exception!(
    hci,
    AlreadyExists,
    Conflict,
    "A resource with that name already exists."
);
create_exception!(
    hci,
    InvalidSpec,
    HciError,
    "The request or resource document is invalid; the message names every offending field."
);
create_exception!(
    hci,
    OutOfRange,
    HciError,
    "An I/O range lies outside the device, or watched history was compacted away."
);
create_exception!(
    hci,
    FailedPrecondition,
    HciError,
    "The resource is not in a state that allows the operation."
);
create_exception!(
    hci,
    ReadOnly,
    FailedPrecondition,
    "A write was attempted on a read-only volume or export."
);
create_exception!(
    hci,
    Busy,
    FailedPrecondition,
    "The resource is in use (e.g. a volume open elsewhere)."
);
create_exception!(
    hci,
    Fenced,
    FailedPrecondition,
    "A newer writer holds the resource: this handle has been fenced off."
);
create_exception!(
    hci,
    Unsupported,
    HciError,
    "The operation is not supported by this backend, kernel or daemon."
);
create_exception!(
    hci,
    Unavailable,
    HciError,
    "A dependency (daemon, peer, disk, target) is unreachable or timed out; retrying may help."
);
create_exception!(
    hci,
    PermissionDenied,
    HciError,
    "The caller lacks the rights (missing or wrong token, root-only socket, file permissions)."
);
create_exception!(
    hci,
    Corrupt,
    HciError,
    "Data failed an integrity check (checksum, authentication tag, wrong key)."
);
create_exception!(hci, Cancelled, HciError, "The operation was cancelled.");

/// Registers every exception class on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("HciError", py.get_type::<HciError>())?;
    m.add("NotFound", py.get_type::<NotFound>())?;
    m.add("Conflict", py.get_type::<Conflict>())?;
    m.add("AlreadyExists", py.get_type::<AlreadyExists>())?;
    m.add("InvalidSpec", py.get_type::<InvalidSpec>())?;
    m.add("OutOfRange", py.get_type::<OutOfRange>())?;
    m.add("FailedPrecondition", py.get_type::<FailedPrecondition>())?;
    m.add("ReadOnly", py.get_type::<ReadOnly>())?;
    m.add("Busy", py.get_type::<Busy>())?;
    m.add("Fenced", py.get_type::<Fenced>())?;
    m.add("Unsupported", py.get_type::<Unsupported>())?;
    m.add("Unavailable", py.get_type::<Unavailable>())?;
    m.add("PermissionDenied", py.get_type::<PermissionDenied>())?;
    m.add("Corrupt", py.get_type::<Corrupt>())?;
    m.add("Cancelled", py.get_type::<Cancelled>())?;
    Ok(())
}

/// The error and its chain of causes, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Skip causes whose text the message already carries.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Converts an hci error to the matching Python exception.
pub fn from_core(err: Error) -> PyErr {
    let msg = chain(&err);
    match &err {
        Error::NotFound { .. } => NotFound::new_err(msg),
        Error::AlreadyExists { .. } => AlreadyExists::new_err(msg),
        Error::Conflict { .. } => Conflict::new_err(msg),
        Error::Invalid { .. } | Error::InvalidSpec(_) => InvalidSpec::new_err(msg),
        Error::OutOfRange { .. } | Error::Compacted { .. } => OutOfRange::new_err(msg),
        Error::ReadOnly { .. } => ReadOnly::new_err(msg),
        Error::Busy { .. } => Busy::new_err(msg),
        Error::Fenced { .. } => Fenced::new_err(msg),
        Error::Unsupported { .. } => Unsupported::new_err(msg),
        Error::Unavailable { .. } => Unavailable::new_err(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            PermissionDenied::new_err(msg)
        }
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            NotFound::new_err(msg)
        }
        Error::Io { .. } if err.is_retryable() => Unavailable::new_err(msg),
        Error::Corrupt { .. } => Corrupt::new_err(msg),
        Error::Cancelled => Cancelled::new_err(msg),
        _ => HciError::new_err(msg),
    }
}

/// Converts a gRPC status from the daemon to the matching Python exception.
pub fn from_status(status: Status) -> PyErr {
    let msg = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    match status.code() {
        Code::NotFound => NotFound::new_err(msg),
        Code::AlreadyExists => AlreadyExists::new_err(msg),
        Code::Aborted => Conflict::new_err(msg),
        Code::InvalidArgument => InvalidSpec::new_err(msg),
        Code::OutOfRange => OutOfRange::new_err(msg),
        Code::FailedPrecondition => FailedPrecondition::new_err(msg),
        Code::Unimplemented => Unsupported::new_err(msg),
        Code::Unavailable | Code::DeadlineExceeded => Unavailable::new_err(msg),
        Code::PermissionDenied | Code::Unauthenticated => PermissionDenied::new_err(msg),
        Code::DataLoss => Corrupt::new_err(msg),
        Code::Cancelled => Cancelled::new_err(msg),
        _ => HciError::new_err(msg),
    }
}

/// Converts a failure to reach the daemon.
pub fn from_connect(err: hci_daemon::cli::client::ConnectError) -> PyErr {
    use hci_daemon::cli::client::ConnectError;
    let msg = err.to_string();
    match &err {
        ConnectError::BadAddress(_) => InvalidSpec::new_err(msg),
        ConnectError::Unreachable { reason, .. } if reason.contains("permission denied") => {
            PermissionDenied::new_err(msg)
        }
        ConnectError::Unreachable { .. } => Unavailable::new_err(msg),
    }
}

/// `.py_err()` on results carrying [`hci_core::Error`].
pub trait CoreResultExt<T> {
    /// Maps the error with [`from_core`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(from_core)
    }
}

/// `.py_err()` on results carrying a gRPC [`Status`].
pub trait StatusResultExt<T> {
    /// Maps the error with [`from_status`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> StatusResultExt<T> for Result<T, Status> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(from_status)
    }
}

/// Raises one of the exceptions from Python with a message: lets the tests
/// check the hierarchy end to end for every mapped hci error.
#[pyfunction]
#[pyo3(name = "_raise_core_error", signature = (kind, message = "test"))]
pub fn raise_core_error(kind: &str, message: &str) -> PyResult<()> {
    let m = message.to_string();
    let io = |k| Error::io(m.clone(), std::io::Error::from(k));
    let err = match kind {
        "not_found" => Error::not_found("volume", m),
        "already_exists" => Error::already_exists("volume", m),
        "conflict" => Error::Conflict {
            kind: "volume",
            name: m,
            expected: 1,
            actual: 2,
        },
        "invalid" => Error::invalid("volume size", m),
        "out_of_range" => Error::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        },
        "read_only" => Error::ReadOnly { what: m },
        "busy" => Error::Busy {
            kind: "volume",
            name: m,
            reason: "open elsewhere".into(),
        },
        "fenced" => Error::Fenced {
            what: m,
            ours: 1,
            current: 2,
        },
        "unsupported" => Error::unsupported(m, "this backend"),
        "unavailable" => Error::Unavailable {
            what: m,
            source: Some("connection refused".into()),
        },
        "permission_denied" => io(std::io::ErrorKind::PermissionDenied),
        "timed_out" => io(std::io::ErrorKind::TimedOut),
        "corrupt" => Error::Corrupt {
            what: m,
            source: None,
        },
        "cancelled" => Error::Cancelled,
        _ => Error::Backend {
            backend: "test",
            message: m,
            source: None,
        },
    };
    Err(from_core(err))
}

/// Raises the exception a gRPC status with `code` (its number) maps to:
/// lets the tests check the daemon-side mapping for every code.
#[pyfunction]
#[pyo3(name = "_raise_status", signature = (code, message = "test"))]
pub fn raise_status(code: i32, message: &str) -> PyResult<()> {
    Err(from_status(Status::new(Code::from_i32(code), message)))
}
