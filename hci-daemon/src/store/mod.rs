//! State stores the daemon can run on.
//!
//! [`RedbStateStore`] is the embedded single-node store; [`EtcdStateStore`]
//! (feature `etcd`, on by default) keeps a cluster's state in etcd. Both
//! implement [`hci_core::store::StateStore`] and pass
//! `hci_core::testing::store`'s conformance suite.

mod codec;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub mod etcd_server;
mod redb;

#[cfg(feature = "etcd")]
pub use self::etcd::{EtcdOptions, EtcdStateStore};
#[cfg(feature = "etcd")]
pub use self::etcd_server::EtcdServer;

pub use self::redb::{RedbOptions, RedbStateStore};
