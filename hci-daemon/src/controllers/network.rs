//! The network controller: realises each `Network` on this node through
//! hci-net (bridge, NAT, VXLAN, DHCP), reports the node in its status, and
//! removes what a deleted network made.
//!
//! Overlays need the node's underlay address (`spec.addresses[0]` of this
//! node's `Node`) and reach every other node's first address as a peer.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{ConditionStatus, Network, NetworkKind as ModelKind, Node, set_condition};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind};
use hci_core::{Error, Result};

use super::{Reconcile, Runtime, set_status};

/// Default lease time handed out by the built-in DHCP server.
const LEASE_TIME: Duration = Duration::from_secs(3600);
/// IANA's VXLAN port.
const VXLAN_PORT: u16 = 4789;

/// The first address of a node, parsed.
fn node_address(node: &Node) -> Option<IpAddr> {
    node.spec
        .addresses
        .iter()
        .find_map(|a| a.parse::<IpAddr>().ok())
}

/// Resolves a `Network` for this node: `nodes` are every `Node` (for
/// overlay peers), `this` the node's name.
pub(crate) fn resolve(net: &Network, nodes: &[Node], this: &str) -> Result<NetworkConfig> {
    let spec = &net.spec;
    let kind = match &spec.kind {
        ModelKind::Management => NetworkKind::Management {
            uplink: spec.uplink.clone(),
        },
        ModelKind::Bridge => NetworkKind::Bridge {
            uplink: spec.uplink.clone(),
        },
        ModelKind::Vlan { id } => NetworkKind::Vlan {
            id: *id,
            uplink: spec.uplink.clone().ok_or_else(|| {
                Error::invalid("spec.uplink", "a vlan network needs a trunk uplink")
            })?,
        },
        ModelKind::Overlay { vni } => {
            let local = nodes
                .iter()
                .find(|n| n.metadata.name == this)
                .and_then(node_address)
                .ok_or_else(|| {
                    Error::invalid(
                        format!("node {this:?}"),
                        "has no address for overlay traffic: start hci-daemon with --address",
                    )
                })?;
            let peers = nodes
                .iter()
                .filter(|n| n.metadata.name != this)
                .filter_map(node_address)
                .collect();
            NetworkKind::Overlay {
                vni: *vni,
                local,
                peers,
                port: VXLAN_PORT,
                underlay: spec.uplink.clone(),
            }
        }
    };
    let dhcp = spec.dhcp.map(|range| DhcpConfig {
        range_start: range.start.into(),
        range_end: range.end.into(),
        lease_time: LEASE_TIME,
        dns: spec.gateway.map(IpAddr::from).into_iter().collect(),
        reservations: vec![],
    });
    let mtu = match spec.mtu {
        Some(m) => Some(
            u16::try_from(m)
                .map_err(|_| Error::invalid("spec.mtu", format!("{m} is larger than any MTU")))?,
        ),
        None => None,
    };
    Ok(NetworkConfig {
        name: net.metadata.name.clone(),
        kind,
        cidr: spec.cidr.map(Into::into),
        gateway: spec.gateway.map(Into::into),
        dhcp,
        mtu,
    })
}

pub(crate) struct NetworkController {
    rt: Runtime,
}

impl NetworkController {
    pub(crate) fn new(rt: Runtime) -> Self {
        NetworkController { rt }
    }
}

#[async_trait]
impl Reconcile for NetworkController {
    type Kind = Network;

    async fn reconcile(&self, name: &str, current: Option<Network>) -> Result<Option<Duration>> {
        let this = self.rt.node.name.clone();
        let Some(backend) = &self.rt.networks else {
            if current.is_some() {
                set_status(&self.rt.resources, name, |n: &mut Network| {
                    set_condition(
                        &mut n.status_mut().conditions,
                        "Ready",
                        ConditionStatus::False,
                        "NoNetworkBackend",
                        "this node manages no networks (hci-daemon needs CAP_NET_ADMIN)",
                    );
                })
                .await?;
            }
            return Ok(None);
        };
        let Some(net) = current else {
            return match backend.remove_network(name).await {
                Ok(()) | Err(Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
        };
        let nodes = self.rt.resources.list::<Node>().await?.items;
        let ensured = match resolve(&net, &nodes, &this) {
            Ok(config) => backend.ensure_network(&config).await,
            Err(e) => Err(e),
        };
        match ensured {
            Ok(status) => {
                set_status(&self.rt.resources, name, |n: &mut Network| {
                    let st = n.status_mut();
                    if !st.ready_nodes.contains(&this) {
                        st.ready_nodes.push(this.clone());
                        st.ready_nodes.sort();
                    }
                    set_condition(
                        &mut st.conditions,
                        "Ready",
                        ConditionStatus::True,
                        "Ensured",
                        &format!("bridge {}", status.bridge),
                    );
                })
                .await?;
                Ok(None)
            }
            Err(e) => {
                let message = e.to_string();
                set_status(&self.rt.resources, name, |n: &mut Network| {
                    let st = n.status_mut();
                    st.ready_nodes.retain(|n| n != &this);
                    set_condition(
                        &mut st.conditions,
                        "Ready",
                        ConditionStatus::False,
                        "EnsureFailed",
                        &message,
                    );
                })
                .await?;
                Err(e)
            }
        }
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        let Some(backend) = &self.rt.networks else {
            return Ok(());
        };
        for net in backend.list_networks().await? {
            if !existing.contains(&net.name) {
                tracing::info!(
                    network = net.name,
                    "removing a network whose resource is gone"
                );
                if let Err(e) = backend.remove_network(&net.name).await {
                    tracing::warn!(network = net.name, error = %e, "cannot remove an orphaned network");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hci_core::model::{NetworkSpec, NodeSpec};

    use super::*;

    fn node(name: &str, addr: &str) -> Node {
        Node::new(
            name,
            NodeSpec {
                addresses: vec![addr.to_string()],
                ..NodeSpec::default()
            },
        )
    }

    #[test]
    fn overlays_take_peers_from_the_node_list() {
        let net = Network::new("ov", NetworkSpec::new(ModelKind::Overlay { vni: 42 }));
        let nodes = [
            node("a", "10.0.0.1"),
            node("b", "10.0.0.2"),
            node("c", "bogus"),
        ];
        let config = resolve(&net, &nodes, "a").expect("resolve");
        match config.kind {
            NetworkKind::Overlay {
                vni, local, peers, ..
            } => {
                assert_eq!(vni, 42);
                assert_eq!(local, "10.0.0.1".parse::<IpAddr>().expect("ip"));
                assert_eq!(peers, vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]);
            }
            other => panic!("not an overlay: {other:?}"),
        }
        let err = resolve(&net, &nodes, "c").expect_err("no address");
        assert!(err.to_string().contains("--address"), "{err}");
    }

    #[test]
    fn vlans_need_an_uplink() {
        let net = Network::new("v", NetworkSpec::new(ModelKind::Vlan { id: 5 }));
        let err = resolve(&net, &[], "a").expect_err("no uplink");
        assert!(err.to_string().contains("spec.uplink"), "{err}");
    }
}
