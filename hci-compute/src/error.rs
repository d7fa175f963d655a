//! Errors of the KVM VMM.
//!
//! [`VmmError`] says what the VMM was doing when something failed; it converts
//! into [`hci_core::Error`] at the [`Hypervisor`](hci_core::compute::Hypervisor)
//! boundary (bad configurations become `Invalid`, a missing `/dev/kvm` becomes
//! `Unavailable`, everything else `Backend { backend: "kvm" }`).

use std::io;
use std::path::PathBuf;

/// `Result` with [`VmmError`].
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// What went wrong in the VMM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error("KVM is not available (/dev/kvm)")]
    KvmUnavailable(#[source] io::Error),

    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation, e.g. `"KVM_CREATE_VM"`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The VM configuration is invalid.
    #[error("invalid {what}: {reason}")]
    InvalidConfig {
        /// What was invalid, e.g. `"memory size"`.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),

    /// The kernel image could not be read.
    #[error("failed to read kernel {path}")]
    KernelFile {
        /// Kernel path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The kernel or initrd could not be loaded into guest memory.
    #[error("failed to load {what}: {reason}")]
    Boot {
        /// What was being loaded, e.g. `"kernel"`.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },

    /// A device could not be set up.
    #[error("device {device}: {reason}")]
    Device {
        /// Device name.
        device: String,
        /// Why it failed.
        reason: String,
    },

    /// An operating-system call failed.
    #[error("failed to {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The VM is not in a state that allows the operation.
    #[error("cannot {op} a VM that is {state}")]
    BadState {
        /// The operation.
        op: &'static str,
        /// The current state.
        state: String,
    },

    /// vCPUs did not acknowledge a pause in time.
    #[error("timed out waiting for vCPUs to {0}")]
    Timeout(&'static str),

    /// A live migration failed (the source VM keeps running).
    #[error("migration failed: {0}")]
    Migration(String),

    /// A live migration was cancelled (the source VM keeps running).
    #[error("migration cancelled")]
    Cancelled,
}

impl VmmError {
    /// Builds a [`VmmError::Kvm`] from a kvm-ioctls error.
    pub(crate) fn kvm(op: &'static str, e: vmm_sys_util::errno::Error) -> Self {
        VmmError::Kvm {
            op,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }

    /// Builds a [`VmmError::InvalidConfig`].
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        VmmError::InvalidConfig {
            what,
            reason: reason.into(),
        }
    }

    /// Builds a [`VmmError::Io`].
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        VmmError::Io { context, source }
    }
}

impl From<VmmError> for hci_core::Error {
    fn from(e: VmmError) -> Self {
        match e {
            VmmError::InvalidConfig { what, reason } => hci_core::Error::invalid(what, reason),
            VmmError::KernelFile { ref path, .. } if !path.exists() => {
                hci_core::Error::invalid("kernel", format!("{} does not exist", path.display()))
            }
            VmmError::KvmUnavailable(_) => hci_core::Error::Unavailable {
                what: "/dev/kvm".into(),
                source: Some(Box::new(e)),
            },
            VmmError::Cancelled => hci_core::Error::Cancelled,
            VmmError::BadState { op, state } => hci_core::Error::Busy {
                kind: "vm",
                name: String::new(),
                reason: format!("cannot {op} a VM that is {state}"),
            },
            other => {
                let message = other.to_string();
                // Keep the OS error as the source; the message already says the rest.
                let source: Option<hci_core::error::BoxError> = match other {
                    VmmError::Kvm { source, .. }
                    | VmmError::Io { source, .. }
                    | VmmError::KernelFile { source, .. } => Some(Box::new(source)),
                    _ => None,
                };
                hci_core::Error::Backend {
                    backend: "kvm",
                    message,
                    source,
                }
            }
        }
    }
}
