//! # hci-storage
//!
//! Block storage for hci: a crash-safe local replica store with O(1) snapshots
//! ([`local`]), an NBD server exporting any [`hci_core::block::BlockDevice`]
//! ([`nbd`]), a replica server and its wire protocol ([`replica`]), and the
//! synchronously replicated engine with fencing and rebuild ([`engine`]), and
//! raw image files as block devices ([`raw`]), and the control channel of a
//! running engine ([`control`]).
#![deny(missing_docs)]

pub mod control;
pub mod engine;
pub mod local;
pub mod nbd;
pub mod raw;
pub mod replica;
