//! The error type shared by every backend trait.
//!
//! Errors that cross a trait boundary must be produced by any backend, so the
//! variants describe *what went wrong from the caller's point of view*
//! (not found, conflict, out of range, fenced, unavailable…) and carry the
//! resource they concern. Backend-specific detail travels as a `#[source]`.

use std::io;

/// A boxed error from a backend, kept as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by hci backends and the resource model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named resource (volume, snapshot, VM, key…) does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind of resource, e.g. `"volume"`.
        kind: &'static str,
        /// Its name or key.
        name: String,
    },

    /// A resource with that name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Kind of resource.
        kind: &'static str,
        /// Its name or key.
        name: String,
    },

    /// A compare-and-swap precondition failed: someone else changed the resource.
    #[error(
        "{kind} {name:?} was modified concurrently: expected revision {expected}, found {actual}"
    )]
    Conflict {
        /// Kind of resource.
        kind: &'static str,
        /// Its name or key.
        name: String,
        /// Revision the caller expected (0 = "must not exist").
        expected: u64,
        /// Revision actually stored (0 = absent).
        actual: u64,
    },

    /// The request is invalid (bad spec, bad argument).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid, e.g. `"volume size"`.
        what: String,
        /// Why.
        reason: String,
    },

    /// A resource spec failed validation; every problem is listed.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] crate::model::ValidationErrors),

    /// An I/O range falls outside the device.
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },

    /// A write was attempted on a read-only device or export.
    #[error("{what} is read-only")]
    ReadOnly {
        /// The device or export.
        what: String,
    },

    /// The operation is not supported by this backend or in this state.
    #[error("{operation} is not supported by {backend}")]
    Unsupported {
        /// What was attempted.
        operation: String,
        /// Which backend or kernel lacks it.
        backend: String,
    },

    /// The object is busy (e.g. a volume is open elsewhere, a snapshot is in use).
    #[error("{kind} {name:?} is busy: {reason}")]
    Busy {
        /// Kind of resource.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Why it is busy.
        reason: String,
    },

    /// A newer writer holds the resource: this engine/handle has been fenced off.
    #[error("{what} is fenced: generation {ours} is older than {current}")]
    Fenced {
        /// The fenced resource.
        what: String,
        /// Generation of the caller.
        ours: u64,
        /// Newest generation the resource has seen.
        current: u64,
    },

    /// A watch asked for history that has been compacted away.
    #[error("revision {requested} has been compacted; the oldest available is {oldest}")]
    Compacted {
        /// Revision the caller asked for.
        requested: u64,
        /// Oldest revision still available.
        oldest: u64,
    },

    /// Data failed an integrity check (checksum, authentication tag, wrong key).
    #[error("{what} failed its integrity check")]
    Corrupt {
        /// What failed.
        what: String,
        /// Underlying cause, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// A dependency (peer, server, disk) is unreachable or timed out; retrying may help.
    #[error("{what} is unavailable")]
    Unavailable {
        /// What was unreachable.
        what: String,
        /// Underlying cause, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// An operating-system I/O error, with what was being done.
    #[error("failed to {context}")]
    Io {
        /// What was being done, e.g. `"open volume data at /var/lib/hci/data"`.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The operation was cancelled by the caller.
    #[error("operation cancelled")]
    Cancelled,

    /// A backend failure that fits no other variant.
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What failed.
        message: String,
        /// Underlying cause, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Builds an [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds an [`Error::NotFound`].
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            name: name.into(),
        }
    }

    /// Builds an [`Error::AlreadyExists`].
    pub fn already_exists(kind: &'static str, name: impl Into<String>) -> Self {
        Error::AlreadyExists {
            kind,
            name: name.into(),
        }
    }

    /// Builds an [`Error::Invalid`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Unsupported`].
    pub fn unsupported(operation: impl Into<String>, backend: impl Into<String>) -> Self {
        Error::Unsupported {
            operation: operation.into(),
            backend: backend.into(),
        }
    }

    /// True if retrying the same call later may succeed (timeouts, unreachable peers, busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Busy { .. } | Error::Conflict { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }

    /// True for "does not exist" errors.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_resource() {
        let e = Error::not_found("volume", "data");
        assert_eq!(e.to_string(), "volume \"data\" not found");
        let e = Error::OutOfRange {
            offset: 4096,
            len: 512,
            size: 4096,
        };
        assert_eq!(
            e.to_string(),
            "range 4096+512 is outside the device of 4096 bytes"
        );
        let e = Error::io("open volume data", io::Error::from(io::ErrorKind::TimedOut));
        assert!(e.is_retryable());
        assert!(!Error::Cancelled.is_retryable());
    }
}
