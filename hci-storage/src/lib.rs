//! # hci-storage
//!
//! Block storage for hci: a crash-safe local replica store with O(1) snapshots
//! ([`local`]), and an NBD server exporting any [`hci_core::block::BlockDevice`]
//! ([`nbd`]).
#![deny(missing_docs)]

pub mod engine;
pub mod local;
pub mod nbd;
pub mod replica;
