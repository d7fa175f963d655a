//! # hci-daemon
//!
//! The reference hci daemon: a gRPC API (tonic) over a
//! [`StateStore`](hci_core::store::StateStore), by default the embedded
//! [`store::RedbStateStore`].
//!
//! Reconcilers, the scheduler, cluster mode (etcd), authentication and
//! metrics are not implemented yet.
#![deny(missing_docs)]

pub mod api;
pub mod resources;
pub mod store;

/// Generated protobuf messages and tonic clients/servers of the `hci.v1` API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("hci.v1");

    /// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hci_v1_descriptor.bin"));
}
