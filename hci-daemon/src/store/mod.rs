//! State stores the daemon can run on.
//!
//! [`RedbStateStore`] is the embedded single-node store; cluster mode (etcd)
//! comes later. Both implement [`hci_core::store::StateStore`] and pass
//! `hci_core::testing::store`'s conformance suite.

mod codec;
mod redb;

pub use self::redb::{RedbOptions, RedbStateStore};
