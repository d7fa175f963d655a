//! # hci-core
//!
//! The shared foundation of the hci hyperconverged-infrastructure SDK:
//!
//! - [`model`]: the resource model (VirtualMachine, Volume, Network, …) with
//!   YAML/JSON round-trips and validation that names the offending field;
//! - the backend traits every other crate implements: [`block::BlockDevice`],
//!   [`volume::VolumeBackend`], [`compute::Hypervisor`], [`net::NetworkBackend`],
//!   [`backup::BackupTarget`] / [`backup::BackupEngine`], [`store::StateStore`];
//! - [`memory`]: in-memory reference implementations of the storage and state
//!   traits, useful for tests and examples;
//! - `testing` (feature `testing`): one conformance suite per trait, macros that
//!   turn a suite into one `#[test]` per case, and fault-injecting wrappers.
//!
//! hci-core depends on no other hci crate.
#![deny(missing_docs)]

pub mod backup;
pub mod block;
pub mod cancel;
pub mod compute;
pub mod error;
pub mod memory;
pub mod model;
pub mod net;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod volume;

pub use cancel::CancelToken;
pub use error::{Error, Result};
