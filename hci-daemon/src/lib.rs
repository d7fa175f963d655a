//! # hci-daemon
//!
//! The reference hci daemon: a gRPC API (tonic) over a
//! [`StateStore`](hci_core::store::StateStore), by default the embedded
//! [`store::RedbStateStore`].
//!
//! [`controllers`] reconcile volumes, snapshots, images, networks, backups
//! and VMs on this node (local storage pool, hci's KVM VMM). In cluster
//! mode ([`store::EtcdStateStore`], `hci-daemon --store etcd://…`) one
//! daemon per node shares the state: nodes hold liveness leases, an elected
//! leader places VMs and restarts those of failed nodes elsewhere
//! ([`controllers::scheduler`]). [`metrics`] serves Prometheus metrics.
#![deny(missing_docs)]

pub mod api;
pub mod cli;
pub mod controllers;
pub mod events;
pub mod metrics;
pub mod resources;
pub mod store;
mod sys;

/// Generated protobuf messages and tonic clients/servers of the `hci.v1` API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("hci.v1");

    /// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hci_v1_descriptor.bin"));
}
