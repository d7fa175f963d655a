//! The network controller: realises each `Network` on this node through
//! hci-net (bridge, NAT, VXLAN, DHCP), reports the node in its status, and
//! removes what a deleted network made.
//!
//! Overlays need the node's underlay address (`spec.addresses[0]` of this
//! node's `Node`) and reach every other node's first address as a peer.
//!
//! Cluster mode: every node realises every network (so a VM can run
//! anywhere), and looks again every lease TTL, so overlay peers follow the
//! node list. Where the nodes' bridges share one L2 (an overlay, a VLAN, a
//! bridge with an uplink) only the leader serves DHCP, so a client gets one
//! answer; when the leader changes, the new one takes over. The serving
//! leader records its bound leases in the Network's `status.leases` (for
//! NICs of VMs that exist), and a server taking over reserves those
//! addresses for their MACs, so every VM keeps its address and no address
//! is handed out twice across the change. Networks
//! private to a node (management with NAT, a bridge without uplink) serve
//! DHCP on every node.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{
    ConditionStatus, MacAddress, Network, NetworkKind as ModelKind, NetworkLease, Node, Resource,
    VirtualMachine, set_condition,
};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind};
use hci_core::{Error, Result};
use hci_net::dhcp::{DhcpNames, Lease};

use super::{Reconcile, Runtime, set_status};
use crate::resources::ResourceStore;

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
pub fn resolve(net: &Network, nodes: &[Node], this: &str) -> Result<NetworkConfig> {
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

/// Whether the bridges of `net` on different nodes share one L2 (through
/// an uplink or an overlay), so one DHCP server must serve them all.
pub(crate) fn shared_l2(net: &Network) -> bool {
    match &net.spec.kind {
        ModelKind::Overlay { .. } | ModelKind::Vlan { .. } => true,
        ModelKind::Bridge => net.spec.uplink.is_some(),
        ModelKind::Management => false,
    }
}

/// The names `network`'s DHCP server hands out: each VM's name to its NICs
/// on that network (option 12), so guests learn their host names. One name
/// per MAC: a MAC two VMs claim keeps the first VM's name.
pub(crate) async fn dhcp_names(resources: &ResourceStore, network: &str) -> Result<DhcpNames> {
    let vms = resources.list::<VirtualMachine>().await?.items;
    let mut hostnames: Vec<([u8; 6], String)> = Vec::new();
    for vm in &vms {
        for (i, nic) in vm.spec.nics.iter().enumerate() {
            if nic.network == network
                && let Some(mac) = vm.nic_mac(i)
                && !hostnames.iter().any(|(m, _)| *m == mac.0)
            {
                hostnames.push((mac.0, vm.name().to_string()));
            }
        }
    }
    Ok(DhcpNames {
        domain: None,
        hostnames,
    })
}

/// The leases to record for a shared network: what its server has bound
/// now, then what was recorded before (a MAC the server does not know any
/// more keeps its address), for NICs of VMs that still exist; one address
/// per MAC and one MAC per address, sorted.
fn record_leases(
    recorded: &[NetworkLease],
    served: &[Lease],
    nics: &[[u8; 6]],
) -> Vec<NetworkLease> {
    let mut out: Vec<NetworkLease> = Vec::new();
    let now = served.iter().filter(|l| l.bound).map(|l| NetworkLease {
        mac: MacAddress(l.mac),
        ip: l.ip,
    });
    for lease in now.chain(recorded.iter().copied()) {
        if nics.contains(&lease.mac.0)
            && !out.iter().any(|o| o.mac == lease.mac || o.ip == lease.ip)
        {
            out.push(lease);
        }
    }
    out.sort();
    out
}

/// Reservations for a server taking over a shared network: the spec's own,
/// then the recorded leases of existing NICs inside the DHCP range that
/// clash with none of them.
fn carried_reservations(
    recorded: &[NetworkLease],
    nics: &[[u8; 6]],
    dhcp: &DhcpConfig,
) -> Vec<([u8; 6], IpAddr)> {
    let mut out = dhcp.reservations.clone();
    for lease in recorded {
        let ip = IpAddr::V4(lease.ip);
        let in_range = dhcp.range_start <= ip && ip <= dhcp.range_end;
        if in_range
            && nics.contains(&lease.mac.0)
            && !out.iter().any(|(m, a)| *m == lease.mac.0 || *a == ip)
        {
            out.push((lease.mac.0, ip));
        }
    }
    out
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
        let mut nics = Vec::new();
        if net.spec.dhcp.is_some() {
            // Before the server starts, so that no guest is answered without its name.
            let names = dhcp_names(&self.rt.resources, name).await?;
            nics = names.hostnames.iter().map(|(mac, _)| *mac).collect();
            backend.set_dhcp_names(name, names).await?;
        }
        // Cluster mode: one DHCP server per shared network, on the leader.
        let shared = self.rt.cluster.is_some() && net.spec.dhcp.is_some() && shared_l2(&net);
        let mut serve_dhcp = true;
        if shared {
            let leader = super::scheduler::leader(&**self.rt.resources.state_store()).await?;
            serve_dhcp = leader.as_deref() == Some(this.as_str());
        }
        let recorded = net
            .status
            .as_ref()
            .map(|s| s.leases.clone())
            .unwrap_or_default();
        let ensured = match resolve(&net, &nodes, &this) {
            Ok(mut config) => {
                if !serve_dhcp {
                    config.dhcp = None;
                } else if shared && let Some(dhcp) = config.dhcp.as_mut() {
                    // A server that took over from another leader hands
                    // out the addresses the last one did.
                    dhcp.reservations = carried_reservations(&recorded, &nics, dhcp);
                }
                backend.ensure_network(&config).await
            }
            Err(e) => Err(e),
        };
        // What this server leased, recorded for the next one.
        let leases = if shared && serve_dhcp && ensured.is_ok() {
            let served = backend.leases(name).await.unwrap_or_default();
            Some(record_leases(&recorded, &served, &nics))
        } else {
            None
        };
        let again = self.rt.cluster.as_ref().map(|c| c.lease_ttl);
        match ensured {
            Ok(status) => {
                set_status(&self.rt.resources, name, |n: &mut Network| {
                    let st = n.status_mut();
                    if let Some(leases) = &leases {
                        st.leases.clone_from(leases);
                    }
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
                Ok(again)
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

    fn lease(mac: u8, ip: [u8; 4]) -> NetworkLease {
        NetworkLease {
            mac: MacAddress([2, 0, 0, 0, 0, mac]),
            ip: ip.into(),
        }
    }

    #[test]
    fn leases_are_recorded_for_existing_nics_with_the_server_winning() {
        let nics = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]];
        let recorded = [
            lease(1, [10, 0, 0, 10]),
            lease(2, [10, 0, 0, 11]),
            // A NIC whose VM is gone: forgotten, its address free again.
            lease(9, [10, 0, 0, 19]),
        ];
        let served = [
            // The server moved NIC 2 to .12; NIC 3 is new; an offer that
            // was never bound does not count.
            Lease {
                mac: [2, 0, 0, 0, 0, 2],
                ip: [10, 0, 0, 12].into(),
                expires: 0,
                bound: true,
                hostname: None,
            },
            Lease {
                mac: [2, 0, 0, 0, 0, 3],
                ip: [10, 0, 0, 10].into(),
                expires: 0,
                bound: false,
                hostname: None,
            },
        ];
        assert_eq!(
            record_leases(&recorded, &served, &nics),
            vec![lease(1, [10, 0, 0, 10]), lease(2, [10, 0, 0, 12])]
        );
        // A bound lease takes an address recorded for another MAC: the
        // server's word wins, one MAC per address.
        let served = [Lease {
            mac: [2, 0, 0, 0, 0, 3],
            ip: [10, 0, 0, 10].into(),
            expires: 0,
            bound: true,
            hostname: None,
        }];
        assert_eq!(
            record_leases(&recorded, &served, &nics),
            vec![lease(2, [10, 0, 0, 11]), lease(3, [10, 0, 0, 10])]
        );
    }

    #[test]
    fn a_new_server_reserves_the_recorded_addresses_inside_its_range() {
        let nics = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]];
        let dhcp = DhcpConfig {
            range_start: [10, 0, 0, 10].into(),
            range_end: [10, 0, 0, 20].into(),
            lease_time: LEASE_TIME,
            dns: vec![],
            // The spec's own reservation comes first.
            reservations: vec![([2, 0, 0, 0, 0, 3], [10, 0, 0, 15].into())],
        };
        let recorded = [
            lease(1, [10, 0, 0, 10]),
            // Outside the range (the spec changed): not reserved.
            lease(2, [10, 0, 0, 99]),
            // Clashes with the spec's reservation.
            lease(3, [10, 0, 0, 11]),
            // Not a NIC any more.
            lease(9, [10, 0, 0, 12]),
        ];
        assert_eq!(
            carried_reservations(&recorded, &nics, &dhcp),
            vec![
                ([2, 0, 0, 0, 0, 3], [10, 0, 0, 15].into()),
                ([2, 0, 0, 0, 0, 1], [10, 0, 0, 10].into()),
            ]
        );
    }

    #[test]
    fn dhcp_is_served_once_only_where_nodes_share_an_l2() {
        let net = |kind, uplink: Option<&str>| {
            let mut n = Network::new("n", NetworkSpec::new(kind));
            n.spec.uplink = uplink.map(str::to_string);
            n
        };
        assert!(shared_l2(&net(ModelKind::Overlay { vni: 7 }, None)));
        assert!(shared_l2(&net(ModelKind::Vlan { id: 7 }, Some("eth0"))));
        assert!(shared_l2(&net(ModelKind::Bridge, Some("eth0"))));
        assert!(!shared_l2(&net(ModelKind::Bridge, None)));
        assert!(!shared_l2(&net(ModelKind::Management, None)));
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

    #[tokio::test]
    async fn vms_name_their_nics_for_dhcp() {
        use hci_core::model::{BootSpec, ByteSize, MacAddress, NicSpec, VmSpec};
        let store = ResourceStore::new(std::sync::Arc::new(hci_core::memory::MemStateStore::new()));
        let nic = |name: &str, network: &str, mac: Option<MacAddress>| NicSpec {
            name: name.into(),
            network: network.into(),
            mac,
            model: Default::default(),
        };
        for net in ["lan", "other"] {
            store
                .create(Network::new(net, NetworkSpec::new(ModelKind::Bridge)))
                .await
                .expect("create network");
        }
        let fixed = MacAddress([0x52, 0x54, 0, 0, 0, 1]);
        let mut web = VmSpec::new(1, ByteSize::mib(64), BootSpec::kernel("k", ""));
        web.nics = vec![nic("eth0", "lan", Some(fixed)), nic("eth1", "other", None)];
        let mut db = VmSpec::new(1, ByteSize::mib(64), BootSpec::kernel("k", ""));
        db.nics = vec![nic("eth0", "lan", None)];
        let mut clash = VmSpec::new(1, ByteSize::mib(64), BootSpec::kernel("k", ""));
        clash.nics = vec![nic("eth0", "lan", Some(fixed))];
        for (name, spec) in [("web", web), ("db", db), ("zz-clash", clash)] {
            store
                .create(VirtualMachine::new(name, spec))
                .await
                .expect("create");
        }
        let names = dhcp_names(&store, "lan").await.expect("names");
        names.validate().expect("valid names");
        let db_mac = MacAddress::from_name("db/eth0").0;
        let mut got = names.hostnames.clone();
        got.sort();
        let mut want = vec![(fixed.0, "web".to_string()), (db_mac, "db".to_string())];
        want.sort();
        assert_eq!(got, want);
        assert!(
            dhcp_names(&store, "none")
                .await
                .expect("names")
                .hostnames
                .is_empty()
        );
    }

    #[test]
    fn vlans_need_an_uplink() {
        let net = Network::new("v", NetworkSpec::new(ModelKind::Vlan { id: 5 }));
        let err = resolve(&net, &[], "a").expect_err("no uplink");
        assert!(err.to_string().contains("spec.uplink"), "{err}");
    }
}
