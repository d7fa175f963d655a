//! In-memory reference implementations of the storage and state traits, for
//! tests, examples and as executable documentation of each contract.
//!
//! Each passes the conformance suite of its trait (`hci_core::testing`).

mod backup;
mod block;
mod store;
mod volume;

pub use backup::MemBackupTarget;
pub use block::MemBlockDevice;
pub use store::MemStateStore;
pub use volume::MemVolumeBackend;
