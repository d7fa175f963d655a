//! # hci-net
//!
//! Virtual networks for hci VMs on Linux, implementing hci-core's
//! [`NetworkBackend`](hci_core::net::NetworkBackend):
//!
//! - [`LinuxBridgeBackend`]: one Linux bridge per network, TAP ports for VM
//!   NICs, an uplink NIC, VLAN networks on a VLAN-filtering trunk bridge per
//!   uplink, VXLAN overlays with static flood entries per peer node, and
//!   masquerade NAT for management networks — all through netlink
//!   (`rtnetlink`), except NAT which goes through one tightly scoped
//!   `nft -f -` call per change.
//!
//! VLAN networks: the uplink NIC is the trunk port of a bridge with VLAN
//! filtering on (`IFLA_BR_VLAN_FILTERING`, one such bridge per uplink, shared
//! by its VLAN networks), carrying each network's VLAN id tagged. Each VLAN
//! network keeps its own bridge (TAP ports, DHCP, counters as for every other
//! kind), joined to the trunk bridge by a veth patch whose trunk end is an
//! access port: PVID = the VLAN id, egress untagged (`IFLA_AF_SPEC` /
//! `IFLA_BRIDGE_VLAN_INFO`). Kernels without `CONFIG_BRIDGE_VLAN_FILTERING`
//! refuse VLAN networks with [`hci_core::Error::Unsupported`] naming it,
//! leaving nothing behind; [`LinuxBridgeBackend::supports_vlan_networks`]
//! asks in advance.
//! - TAP ports persistent or fd-owned, multi-queue, with a vnet header and
//!   a port MTU ([`LinuxBridgeBackend::attach_port_with`]); counters of every
//!   port for metrics ([`LinuxBridgeBackend::network_stats`]).
//! - [`dhcp`]: a built-in DHCPv4 server per network (packets by `dhcproto`,
//!   server logic and lease database here), started and stopped with the
//!   network; router, DNS, MTU, domain and per-MAC host name options
//!   ([`LinuxBridgeBackend::set_dhcp_names`]).
//! - [`NetNs`]: run the backend against another network namespace (tests use
//!   namespaces as fake nodes).
//!
//! The `hci-net` binary wraps the backend for integrators and debugging:
//! `hci-net up -f NETWORK.yaml [--peer NODE_ADDR …] [--keep]` ensures a
//! network from an hci `Network` resource and serves its DHCP until
//! SIGINT/SIGTERM, `hci-net port add NAME --ifname IF [--mac MAC]` plugs an
//! existing TAP or veth into it
//! ([`LinuxBridgeBackend::attach_interface`]), `hci-net leases NAME`,
//! `hci-net stats NAME`, `hci-net down NAME` and `hci-net ls` show and
//! remove what exists.
//!
//! Every device the backend creates has a name with a fixed prefix (`hci-br-`,
//! `hci-tp-`, `hci-vx-`, `hci-vl-`/`hci-vp-` for VLAN patches, `hci-tk-` for
//! trunk bridges) followed by a hash of the network, port or uplink name, and carries an interface alias recording what it belongs to, so a
//! restarted backend adopts what exists and [`LinuxBridgeBackend::cleanup_all`]
//! removes everything it ever made.
//!
//! ```no_run
//! use hci_core::net::{NetworkBackend, NetworkConfig, NetworkKind, PortConfig};
//! use hci_net::{BackendOptions, LinuxBridgeBackend};
//!
//! # async fn demo() -> hci_core::Result<()> {
//! let backend = LinuxBridgeBackend::new(BackendOptions::default()).await?;
//! let net = NetworkConfig {
//!     name: "lab".into(),
//!     kind: NetworkKind::Bridge { uplink: None },
//!     cidr: None,
//!     gateway: None,
//!     dhcp: None,
//!     mtu: None,
//! };
//! backend.ensure_network(&net).await?;
//! let port = PortConfig { name: "vm1-nic0".into(), mac: [0x02, 0x68, 0x63, 0, 0, 1], queues: 1 };
//! let tap = backend.attach_port("lab", &port).await?;
//! tracing::info!(ifname = %tap.ifname, "VM NIC ready");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod backend;
pub mod dhcp;
mod link;
pub mod mac;
mod names;
mod nat;
mod netns;
mod reconcile;
mod tap;

pub use backend::{BackendOptions, LinuxBridgeBackend, PortCounters, PortStats, TapOptions};
pub use names::{DEVICE_PREFIX, MAX_IFNAME_LEN};
pub use netns::NetNs;

/// Bytes a VXLAN encapsulation adds over an IPv4 underlay (outer Ethernet 14 +
/// IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD_V4: u16 = 50;

/// Bytes a VXLAN encapsulation adds over an IPv6 underlay.
pub const VXLAN_OVERHEAD_V6: u16 = 70;
