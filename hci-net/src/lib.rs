//! # hci-net
//!
//! Virtual networks for hci VMs: Linux bridges and TAP ports, VXLAN overlays
//! between nodes, a NAT'd management network and a built-in DHCP server,
//! implementing hci-core's `NetworkBackend`.
//!
//! **Status: not implemented yet** (tracked in issue #7). The crate exists so
//! the workspace has its final shape; it exports nothing.
#![deny(missing_docs)]
