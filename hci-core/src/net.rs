//! The networking contract: virtual networks on a node and VM ports on them.
//!
//! A [`NetworkBackend`] realises a resolved [`NetworkConfig`] on this node
//! (bridge, uplink, VXLAN device and forwarding entries, NAT rules, DHCP
//! server) idempotently — calling [`NetworkBackend::ensure_network`] again
//! with the same or an updated config reconciles what exists — and creates
//! TAP ports for VM NICs.
//!
//! The daemon turns `model::Network` resources into `NetworkConfig`s (adding
//! node-specific facts such as the overlay peers), the same way it turns VMs
//! into `compute::VmConfig`s.

use std::fmt::{self, Debug};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;

use crate::error::Result;

/// How a network reaches the outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkKind {
    /// A node-local bridge with the gateway address and masquerade NAT out of
    /// `uplink` (or the default route's interface when `None`).
    Management {
        /// Interface to masquerade through.
        uplink: Option<String>,
    },
    /// Untagged L2 on an uplink NIC (or an isolated bridge when `None`).
    Bridge {
        /// NIC enslaved to the bridge.
        uplink: Option<String>,
    },
    /// An 802.1Q VLAN on a trunk uplink.
    Vlan {
        /// VLAN id, 1..=4094.
        id: u16,
        /// Trunk NIC.
        uplink: String,
    },
    /// A VXLAN overlay between nodes.
    Overlay {
        /// VXLAN network identifier, 1..=16777215.
        vni: u32,
        /// This node's underlay address (source of encapsulated packets).
        local: IpAddr,
        /// Other nodes' underlay addresses (static flood entries; learning is off).
        peers: Vec<IpAddr>,
        /// UDP port (4789 is the IANA default).
        port: u16,
        /// Underlay interface, if it must be pinned.
        underlay: Option<String>,
    },
}

/// Built-in DHCP server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// First address handed out.
    pub range_start: IpAddr,
    /// Last address handed out.
    pub range_end: IpAddr,
    /// Lease duration.
    pub lease_time: Duration,
    /// DNS servers announced to clients.
    pub dns: Vec<IpAddr>,
    /// Fixed MAC → address assignments.
    pub reservations: Vec<([u8; 6], IpAddr)>,
}

/// A resolved network definition for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Network name (DNS-1123 label); device names derive from it.
    pub name: String,
    /// Kind and its parameters.
    pub kind: NetworkKind,
    /// Subnet of the network, if it has L3 settings.
    pub cidr: Option<IpNet>,
    /// Gateway address (assigned to the bridge for management networks).
    pub gateway: Option<IpAddr>,
    /// DHCP server, if enabled.
    pub dhcp: Option<DhcpConfig>,
    /// MTU of the bridge and ports (overlay overhead already accounted for by the caller or backend).
    pub mtu: Option<u16>,
}

/// A VM NIC port to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Port id, unique on the node (e.g. `<vm>-<nic>`); the TAP name derives from it.
    pub name: String,
    /// Guest MAC address (DHCP leases are keyed by it).
    pub mac: [u8; 6],
    /// Number of queues (multi-queue TAP when > 1).
    pub queues: u16,
}

/// A TAP device created for a VM NIC.
#[derive(Clone)]
pub struct TapHandle {
    /// Host interface name.
    pub ifname: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// MTU of the port.
    pub mtu: u16,
    /// Open queue file descriptors (one per queue), if the backend keeps them.
    pub fds: Vec<Arc<OwnedFd>>,
}

impl Debug for TapHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TapHandle")
            .field("ifname", &self.ifname)
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("queues", &self.fds.len())
            .finish()
    }
}

/// What exists on the node for one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkStatus {
    /// Network name.
    pub name: String,
    /// Bridge interface name.
    pub bridge: String,
    /// Attached port names.
    pub ports: Vec<String>,
    /// Whether the DHCP server runs.
    pub dhcp_running: bool,
}

/// A node's network backend.
#[async_trait]
pub trait NetworkBackend: Send + Sync + Debug {
    /// Creates or reconciles a network on this node. Idempotent.
    async fn ensure_network(&self, config: &NetworkConfig) -> Result<NetworkStatus>;

    /// Removes a network and everything created for it (ports included). Removing
    /// an absent network is `NotFound`.
    async fn remove_network(&self, name: &str) -> Result<()>;

    /// Lists the networks this backend manages on the node.
    async fn list_networks(&self) -> Result<Vec<NetworkStatus>>;

    /// Creates a TAP port on `network` for a VM NIC. Attaching an existing port
    /// name again returns the existing port (idempotent) if the MAC matches.
    async fn attach_port(&self, network: &str, port: &PortConfig) -> Result<TapHandle>;

    /// Removes a port.
    async fn detach_port(&self, network: &str, port: &str) -> Result<()>;
}
