//! `Network`: a virtual L2 network, optionally with L3 (gateway, NAT, DHCP).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, check_envelope, resource};
use super::{Condition, MacAddress, ObjectMeta, ValidationErrors};

resource! {
    /// A virtual network VMs attach to.
    ///
    /// ```
    /// use hci_core::model::{Resource, Network};
    /// let net = Network::from_yaml(r#"
    /// apiVersion: hci.dev/v1
    /// kind: Network
    /// metadata: { name: mgmt }
    /// spec:
    ///   kind: { type: management }
    ///   cidr: 10.42.0.0/24
    ///   gateway: 10.42.0.1
    ///   dhcp: { start: 10.42.0.100, end: 10.42.0.200 }
    /// "#).unwrap();
    /// net.validate().unwrap();
    /// ```
    Network, "Network", NetworkSpec, NetworkStatus
}

/// Desired state of a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// What kind of network.
    pub kind: NetworkKind,
    /// IPv4 subnet (required for `management`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Net>,
    /// Gateway address inside `cidr` (the node's address on the bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Built-in DHCP server range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpRange>,
    /// Host NIC carrying the network off the node (`bridge`/`vlan`; `overlay` underlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// MTU seen by VMs (576 to 9000); derived from the uplink when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// Kinds of networks, written `{type: management}`, `{type: vlan, id: 100}`,
/// `{type: overlay, vni: 42}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum NetworkKind {
    /// Per-node bridge with a gateway and masquerade NAT to the node's uplink.
    Management,
    /// Untagged L2 on an uplink (or isolated without one).
    Bridge,
    /// 802.1Q VLAN on a trunk uplink.
    Vlan {
        /// VLAN id, 1 to 4094.
        id: u16,
    },
    /// VXLAN overlay across nodes.
    Overlay {
        /// VXLAN network identifier, 1 to 16777215.
        vni: u32,
    },
}

/// A DHCP address pool (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DhcpRange {
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
}

/// Observed state of a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkStatus {
    /// Nodes where the network is realised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready_nodes: Vec<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Addresses the network's DHCP server handed out, recorded in a
    /// cluster so that the next server (on a new leader) gives every VM the
    /// address it had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<NetworkLease>,
}

/// An address a network's DHCP server leased to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkLease {
    /// The NIC's MAC.
    pub mac: MacAddress,
    /// Its address.
    pub ip: Ipv4Addr,
}

impl NetworkSpec {
    /// A network of `kind` with no addressing.
    pub fn new(kind: NetworkKind) -> Self {
        NetworkSpec {
            kind,
            cidr: None,
            gateway: None,
            dhcp: None,
            uplink: None,
            mtu: None,
        }
    }

    /// A management network on `cidr`: NAT to the node's uplink, the first
    /// host address as gateway and every other host address for DHCP.
    ///
    /// ```
    /// use hci_core::model::{Network, NetworkSpec, Resource};
    /// let spec = NetworkSpec::management("10.42.0.0/24".parse().unwrap());
    /// assert_eq!(spec.gateway.unwrap().to_string(), "10.42.0.1");
    /// let dhcp = spec.dhcp.unwrap();
    /// assert_eq!((dhcp.start.to_string(), dhcp.end.to_string()),
    ///            ("10.42.0.2".into(), "10.42.0.254".into()));
    /// Network::new("mgmt", spec).validate().unwrap();
    /// ```
    pub fn management(cidr: Ipv4Net) -> Self {
        let net = cidr.trunc();
        let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
        // A /31 or /32 has no room for a gateway and a pool.
        let (gateway, dhcp) = if last - first >= 3 {
            (
                Some(Ipv4Addr::from(first + 1)),
                Some(DhcpRange {
                    start: Ipv4Addr::from(first + 2),
                    end: Ipv4Addr::from(last - 1),
                }),
            )
        } else {
            (None, None)
        };
        NetworkSpec {
            cidr: Some(net),
            gateway,
            dhcp,
            ..NetworkSpec::new(NetworkKind::Management)
        }
    }

    /// An 802.1Q VLAN `id` on trunk NIC `uplink`, without addressing.
    pub fn vlan(id: u16, uplink: impl Into<String>) -> Self {
        NetworkSpec {
            uplink: Some(uplink.into()),
            ..NetworkSpec::new(NetworkKind::Vlan { id })
        }
    }

    /// A VXLAN overlay with identifier `vni`, without addressing.
    pub fn overlay(vni: u32) -> Self {
        NetworkSpec::new(NetworkKind::Overlay { vni })
    }
}

fn usable(net: &Ipv4Net, ip: Ipv4Addr) -> bool {
    net.contains(&ip) && (net.prefix_len() >= 31 || (ip != net.network() && ip != net.broadcast()))
}

impl Resource for Network {
    const KIND: &'static str = "Network";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        let s = &self.spec;
        match s.kind {
            NetworkKind::Management if s.cidr.is_none() => {
                errs.push("spec.cidr", "a management network needs a subnet");
            }
            NetworkKind::Vlan { id } => {
                if !(1..=4094).contains(&id) {
                    errs.push(
                        "spec.kind.id",
                        format!("{id} is out of range: must be 1 to 4094"),
                    );
                }
                if s.uplink.is_none() {
                    errs.push(
                        "spec.uplink",
                        "a VLAN network needs an uplink (the trunk NIC)",
                    );
                }
            }
            NetworkKind::Overlay { vni } if !(1..=16_777_215).contains(&vni) => {
                errs.push(
                    "spec.kind.vni",
                    format!("{vni} is out of range: must be 1 to 16777215"),
                );
            }
            _ => {}
        }
        if let Some(cidr) = s.cidr {
            if cidr != cidr.trunc() {
                errs.push(
                    "spec.cidr",
                    format!("{cidr} has host bits set; did you mean {}?", cidr.trunc()),
                );
            }
            if let Some(gw) = s.gateway
                && !usable(&cidr.trunc(), gw)
            {
                errs.push(
                    "spec.gateway",
                    format!("{gw} is not a usable address in {}", cidr.trunc()),
                );
            }
            if let Some(r) = s.dhcp {
                let net = cidr.trunc();
                if !usable(&net, r.start) {
                    errs.push(
                        "spec.dhcp.start",
                        format!("{} is not a usable address in {net}", r.start),
                    );
                }
                if !usable(&net, r.end) {
                    errs.push(
                        "spec.dhcp.end",
                        format!("{} is not a usable address in {net}", r.end),
                    );
                }
                if r.start > r.end {
                    errs.push(
                        "spec.dhcp",
                        format!("start {} is after end {}", r.start, r.end),
                    );
                }
                if let Some(gw) = s.gateway
                    && gw >= r.start
                    && gw <= r.end
                {
                    errs.push("spec.dhcp", format!("the range includes the gateway {gw}"));
                }
            }
        } else {
            if s.gateway.is_some() {
                errs.push("spec.gateway", "needs spec.cidr");
            }
            if s.dhcp.is_some() {
                errs.push("spec.dhcp", "needs spec.cidr");
            }
        }
        if let Some(mtu) = s.mtu
            && !(576..=9000).contains(&mtu)
        {
            errs.push(
                "spec.mtu",
                format!("{mtu} is out of range: must be 576 to 9000"),
            );
        }
        if let Some(u) = &s.uplink
            && (u.is_empty() || u.len() > 15 || u.contains('/') || u.contains(char::is_whitespace))
        {
            errs.push(
                "spec.uplink",
                format!("{u:?} is not a valid interface name"),
            );
        }
        errs.into_result()
    }
}
