//! # hci-daemon
//!
//! The reference hci daemon (tonic gRPC API, reconcilers, scheduler, embedded
//! or etcd state store) and the `hcictl` CLI.
//!
//! **Status: not implemented yet** (tracked in issues #5 and #10). The crate
//! exists so the workspace has its final shape; it exports nothing.
#![deny(missing_docs)]
