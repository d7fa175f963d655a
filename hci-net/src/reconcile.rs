//! `ensure_network`: validate, then reconcile the kernel with the config.
//!
//! Order matters for "never leak": whatever may be refused by this kernel
//! (the VLAN-filtering trunk bridge) is created before the network's bridge, and a network that did not
//! exist before a failed `ensure_network` is removed again completely.

use std::net::{IpAddr, Ipv4Addr};

use hci_core::net::{NetworkConfig, NetworkKind, NetworkStatus};
use hci_core::{Error, Result};
use ipnet::IpNet;
use rtnetlink::packet_route::link::{BridgeVlanInfo, BridgeVlanInfoFlags, InfoKind};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkVeth, LinkVxlan};

use crate::backend::{LinuxBridgeBackend, NetState, Slot, State};
use crate::dhcp::{self, DhcpServer, DhcpSettings};
use crate::link::{Link, VxlanParams, errno, nl_error, trunk_bridge_message};
use crate::names::{self, Role};
use crate::{VXLAN_OVERHEAD_V4, VXLAN_OVERHEAD_V6, nat};

fn uplink_of(kind: &NetworkKind) -> Option<&str> {
    match kind {
        NetworkKind::Bridge { uplink } => uplink.as_deref(),
        NetworkKind::Vlan { uplink, .. } => Some(uplink),
        _ => None,
    }
}

/// Checks everything that can be checked without touching the kernel.
fn validate(cfg: &NetworkConfig) -> Result<()> {
    names::validate_network_name(&cfg.name)?;
    if let Some(m) = cfg.mtu.filter(|m| *m < 68) {
        return Err(Error::invalid(
            "network MTU",
            format!("{m} is below the IPv4 minimum of 68"),
        ));
    }
    if let Some(gw) = cfg.gateway {
        let cidr = cfg
            .cidr
            .ok_or_else(|| Error::invalid("gateway", "a gateway needs the network's cidr"))?;
        if !cidr.contains(&gw) {
            return Err(Error::invalid("gateway", format!("{gw} is outside {cidr}")));
        }
    }
    match &cfg.kind {
        NetworkKind::Management { uplink } => {
            if cfg.cidr.is_none() || cfg.gateway.is_none() {
                return Err(Error::invalid(
                    "management network",
                    "needs a cidr and a gateway",
                ));
            }
            if let Some(u) = uplink {
                names::validate_ifname("uplink", u)?;
            }
        }
        NetworkKind::Bridge { uplink } => {
            if let Some(u) = uplink {
                names::validate_ifname("uplink", u)?;
            }
        }
        NetworkKind::Vlan { id, uplink } => {
            if !(1..=4094).contains(id) {
                return Err(Error::invalid(
                    "VLAN id",
                    format!("{id} is not in 1..=4094"),
                ));
            }
            names::validate_ifname("uplink", uplink)?;
        }
        NetworkKind::Overlay {
            vni,
            local,
            peers,
            port,
            underlay,
        } => {
            if !(1..=0x00ff_ffff).contains(vni) {
                return Err(Error::invalid(
                    "VXLAN VNI",
                    format!("{vni} is not in 1..=16777215"),
                ));
            }
            if *port == 0 {
                return Err(Error::invalid("VXLAN port", "must not be 0"));
            }
            if let Some(p) = peers.iter().find(|p| p.is_ipv4() != local.is_ipv4()) {
                return Err(Error::invalid(
                    "overlay peer",
                    format!("{p} is not in the family of {local}"),
                ));
            }
            if let Some(u) = underlay {
                names::validate_ifname("underlay", u)?;
            }
        }
    }
    if cfg.dhcp.is_some() && cfg.cidr.is_none() {
        return Err(Error::invalid(
            "DHCP",
            "a DHCP server needs the network's cidr",
        ));
    }
    Ok(())
}

impl LinuxBridgeBackend {
    pub(crate) async fn ensure_locked(
        &self,
        st: &mut State,
        cfg: &NetworkConfig,
    ) -> Result<NetworkStatus> {
        validate(cfg)?;
        let prev = st.nets.get(&cfg.name).map(|n| n.config.clone());
        let existed = prev.is_some() || self.bridge_of(&cfg.name).await?.is_some();
        match self.apply(st, prev.as_ref(), cfg).await {
            Ok(status) => Ok(status),
            Err(e) => {
                if !existed {
                    st.nets.remove(&cfg.name);
                    let mgmt = matches!(cfg.kind, NetworkKind::Management { .. });
                    if let Err(c) = self.remove_devices(&cfg.name, Some(mgmt)).await {
                        tracing::warn!(error = %c, "failed to roll back a half-created network");
                    }
                }
                Err(e)
            }
        }
    }

    async fn apply(
        &self,
        st: &mut State,
        prev: Option<&NetworkConfig>,
        cfg: &NetworkConfig,
    ) -> Result<NetworkStatus> {
        let name = cfg.name.as_str();
        let mtu = self.effective_mtu(cfg).await?;
        let dhcp_settings = match dhcp_settings(cfg, mtu)? {
            Some(s) => Some(match st.dhcp_names.get(name) {
                Some(n) => s.with_names(n)?,
                None => s,
            }),
            None => None,
        };
        let vlan = match &cfg.kind {
            NetworkKind::Vlan { id, uplink } => {
                Some(self.ensure_vlan(name, *id, uplink, mtu).await?)
            }
            _ => None,
        };
        let bridge = self.ensure_bridge(name, mtu).await?;
        let mut addresses = Vec::new();
        if let (Some(cidr), Some(gw)) = (cfg.cidr, cfg.gateway)
            && matches!(cfg.kind, NetworkKind::Management { .. })
        {
            addresses.push(
                IpNet::new(gw, cidr.prefix_len())
                    .map_err(|e| Error::invalid("cidr", e.to_string()))?,
            );
        }
        if let Some(s) = dhcp_settings
            .as_ref()
            .filter(|s| !addresses.iter().any(|a| a.addr() == IpAddr::V4(s.server)))
        {
            addresses.push(
                IpNet::new(IpAddr::V4(s.server), s.subnet.prefix_len())
                    .map_err(|e| Error::invalid("cidr", e.to_string()))?,
            );
        }
        self.reconcile_addresses(&bridge, &addresses).await?;

        match &cfg.kind {
            NetworkKind::Management { uplink } => {
                let cidr = cfg
                    .cidr
                    .ok_or_else(|| Error::invalid("management network", "needs a cidr"))?;
                self.nft(nat::masquerade_script(
                    name,
                    cidr,
                    &bridge.name,
                    uplink.as_deref(),
                ))
                .await?;
                let ns = self.ns.clone();
                tokio::task::spawn_blocking(move || nat::enable_forwarding(&ns, cidr))
                    .await
                    .map_err(|e| Error::Backend {
                        backend: "sysctl",
                        message: "task failed".into(),
                        source: Some(Box::new(e)),
                    })??;
            }
            NetworkKind::Bridge { uplink: Some(u) } => {
                let up = self
                    .nl
                    .link(u)
                    .await?
                    .ok_or_else(|| Error::not_found("uplink interface", u.clone()))?;
                if up.master.is_some_and(|m| m != bridge.index) {
                    return Err(Error::Busy {
                        kind: "interface",
                        name: u.clone(),
                        reason: "it is a port of another bridge".into(),
                    });
                }
                self.nl.set_master(&up, bridge.index).await?;
                self.nl.reconcile(&up, None, None, None).await?;
            }
            NetworkKind::Bridge { uplink: None } => {}
            NetworkKind::Vlan { .. } => {
                if let Some(v) = &vlan {
                    self.nl.set_master(v, bridge.index).await?;
                }
            }
            NetworkKind::Overlay { .. } => self.ensure_vxlan(cfg, &bridge, mtu).await?,
        }

        // Whatever an earlier version of this network had and this one has not.
        if let Some(old) = prev
            .and_then(|p| uplink_of(&p.kind))
            .filter(|o| Some(*o) != uplink_of(&cfg.kind))
            && let Some(l) = self
                .nl
                .link(old)
                .await?
                .filter(|l| l.master == Some(bridge.index))
        {
            self.nl.release(&l).await?;
        }
        if !matches!(cfg.kind, NetworkKind::Overlay { .. })
            && let Some(l) = self.device_of(Role::Vxlan, name).await?
        {
            self.nl.delete(&l).await?;
        }
        if !matches!(cfg.kind, NetworkKind::Vlan { .. }) {
            for role in [Role::Vlan, Role::VlanPeer] {
                if let Some(l) = self.device_of(role, name).await? {
                    self.nl.delete(&l).await?;
                }
            }
        }
        // A VLAN network that left a trunk (other uplink, other kind, other id).
        self.collect_trunks().await?;
        let was_mgmt = prev.is_some_and(|p| matches!(p.kind, NetworkKind::Management { .. }));
        if was_mgmt && !matches!(cfg.kind, NetworkKind::Management { .. }) {
            self.nft(nat::remove_script(name)).await?;
        }

        let links = self.nl.links().await?;
        let taps = self.taps_of(&links, name).await;
        // Each port at the network's MTU, or below it where asked.
        let port_mtu = |st: &State, port: &str| {
            st.ports
                .get(port)
                .filter(|p| p.network == cfg.name)
                .and_then(|p| p.mtu)
                .map_or(mtu, |m| m.min(mtu))
        };
        for (port, tap) in &taps {
            self.nl
                .reconcile(tap, Some(u32::from(port_mtu(st, port))), None, None)
                .await?;
            self.nl.set_master(tap, bridge.index).await?;
        }
        if taps.iter().any(|(port, _)| port_mtu(st, port) < mtu) {
            self.pin_bridge_mtu(&bridge.name, mtu).await?;
        }
        for p in st.ports.values_mut().filter(|p| p.network == cfg.name) {
            p.handle.mtu = p.mtu.map_or(mtu, |m| m.min(mtu));
        }
        let entry = st.nets.entry(cfg.name.clone()).or_insert_with(|| NetState {
            config: cfg.clone(),
            mtu,
            dhcp: None,
        });
        match dhcp_settings {
            Some(s) => match &entry.dhcp {
                Some(srv) if srv.ifindex() == bridge.index && srv.is_running() => {
                    if srv.settings() != s {
                        srv.reconfigure(s);
                    }
                }
                _ => {
                    entry.dhcp = None;
                    let srv = DhcpServer::start(
                        &self.ns,
                        &bridge.name,
                        bridge.index,
                        s,
                        self.lease_file(name),
                    )
                    .await?;
                    entry.dhcp = Some(srv);
                }
            },
            None => entry.dhcp = None,
        }
        entry.config = cfg.clone();
        entry.mtu = mtu;
        let mut ports: Vec<String> = taps.into_iter().map(|(p, _)| p).collect();
        ports.sort();
        tracing::info!(bridge = %bridge.name, mtu, "network ensured");
        Ok(NetworkStatus {
            name: cfg.name.clone(),
            bridge: bridge.name,
            ports,
            dhcp_running: entry.dhcp.as_ref().is_some_and(DhcpServer::is_running),
        })
    }

    /// The MTU of the bridge and its ports.
    async fn effective_mtu(&self, cfg: &NetworkConfig) -> Result<u16> {
        let default = self.opts.default_mtu;
        match &cfg.kind {
            NetworkKind::Overlay {
                local, underlay, ..
            } => {
                let under = match underlay {
                    Some(u) => {
                        self.nl
                            .link(u)
                            .await?
                            .ok_or_else(|| Error::not_found("underlay interface", u.clone()))?
                            .mtu
                    }
                    None => match self.nl.index_of_address(*local).await? {
                        Some(i) => self
                            .nl
                            .link_by_index(i)
                            .await?
                            .map_or(u32::from(default), |l| l.mtu),
                        None => u32::from(default),
                    },
                };
                let overhead = if local.is_ipv4() {
                    VXLAN_OVERHEAD_V4
                } else {
                    VXLAN_OVERHEAD_V6
                };
                let max = u16::try_from(under)
                    .unwrap_or(u16::MAX)
                    .saturating_sub(overhead);
                match cfg.mtu {
                    Some(m) if m > max => Err(Error::invalid(
                        "network MTU",
                        format!(
                            "{m} does not fit the underlay: {under} minus {overhead} bytes of VXLAN encapsulation is {max}"
                        ),
                    )),
                    Some(m) => Ok(m),
                    None => Ok(max),
                }
            }
            NetworkKind::Bridge { uplink: Some(u) } | NetworkKind::Vlan { uplink: u, .. } => {
                match cfg.mtu {
                    Some(m) => Ok(m),
                    None => {
                        let l = self
                            .nl
                            .link(u)
                            .await?
                            .ok_or_else(|| Error::not_found("uplink interface", u.clone()))?;
                        Ok(u16::try_from(l.mtu).unwrap_or(default))
                    }
                }
            }
            _ => Ok(cfg.mtu.unwrap_or(default)),
        }
    }

    /// Creates a device, marks it as ours straight away, and returns it.
    async fn create_owned(
        &self,
        name: &str,
        msg: rtnetlink::packet_route::link::LinkMessage,
        alias: &str,
        refused: impl FnOnce(rtnetlink::Error) -> Error,
    ) -> Result<Link> {
        self.nl.add(msg).await.map_err(refused)?;
        let link = self
            .nl
            .link(name)
            .await?
            .ok_or_else(|| Error::not_found("device", name))?;
        let b = rtnetlink::LinkUnspec::new_with_index(link.index).alias(alias);
        if let Err(e) = self.nl.set(name, b.build()).await {
            let _ = self.nl.delete(&link).await;
            return Err(e);
        }
        tracing::debug!(name, alias, "device created");
        self.nl
            .link(name)
            .await?
            .ok_or_else(|| Error::not_found("device", name))
    }

    async fn ensure_bridge(&self, network: &str, mtu: u16) -> Result<Link> {
        let alias = names::network_alias(Role::Bridge, network);
        let link = match self
            .slot(Role::Bridge, network, |o| o.is(Role::Bridge, network))
            .await?
        {
            Slot::Owned(l) => *l,
            Slot::Free(n) => {
                let msg = LinkBridge::new(&n).build();
                self.create_owned(&n, msg, &alias, |e| {
                    nl_error(format!("create bridge {n}"), e)
                })
                .await?
            }
        };
        let mac = crate::mac::bridge(self.opts.node.as_deref(), network);
        self.nl
            .reconcile(&link, Some(u32::from(mtu)), Some(mac), Some(&alias))
            .await?;
        Ok(link)
    }

    async fn reconcile_addresses(&self, bridge: &Link, want: &[IpNet]) -> Result<()> {
        let have = self.nl.addresses(bridge.index).await?;
        for (net, msg) in have.iter().filter(|(n, _)| !want.contains(n)) {
            self.nl.del_address(*net, msg.clone()).await?;
        }
        for net in want.iter().filter(|w| !have.iter().any(|(n, _)| n == *w)) {
            self.nl.add_address(bridge.index, *net).await?;
        }
        Ok(())
    }

    /// A VLAN network: the uplink's VLAN-filtering trunk bridge (created on
    /// first use, the uplink its trunk port carrying VLAN `id` tagged) and a
    /// veth patch between it and the network's bridge, whose trunk end is an
    /// access port (PVID `id`, egress untagged). Returns the other end, to be
    /// plugged into the network's bridge.
    async fn ensure_vlan(&self, network: &str, id: u16, uplink: &str, mtu: u16) -> Result<Link> {
        let up = self
            .nl
            .link(uplink)
            .await?
            .ok_or_else(|| Error::not_found("uplink interface", uplink))?;
        let trunk = self.ensure_trunk(network, id, uplink).await?;
        if let Some(m) = up.master.filter(|m| *m != trunk.index) {
            let own_bridge = self.bridge_of(network).await?.map(|b| b.index);
            if own_bridge != Some(m) {
                return Err(Error::Busy {
                    kind: "interface",
                    name: uplink.to_string(),
                    reason: "it is a port of another bridge".into(),
                });
            }
            // This network used the uplink untagged before.
            self.nl.release(&up).await?;
        }
        self.nl.set_master(&up, trunk.index).await?;
        self.nl.reconcile(&up, None, None, None).await?;

        let vlans = self.nl.port_vlans().await?;
        let links = self.nl.links().await?;
        for (other, pvid) in trunk_patches(&links, &vlans, trunk.index) {
            if other != network && pvid == Some(id) {
                return Err(Error::Busy {
                    kind: "VLAN",
                    name: format!("{id} on {uplink}"),
                    reason: format!("network {other:?} already uses it"),
                });
            }
        }

        let (patch, peer) = self.ensure_patch(network, mtu).await?;
        self.nl.set_master(&patch, trunk.index).await?;
        // Access port: exactly VLAN `id`, as PVID and untagged.
        let have = port_vlans_of(&vlans, patch.index);
        for v in have.iter().filter(|v| v.vid != id) {
            self.nl.del_port_vlan(&patch, v.vid).await?;
        }
        let access = BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged;
        if !have.iter().any(|v| v.vid == id && v.flags.contains(access)) {
            self.nl.add_port_vlan(&patch, id, access).await?;
        }
        // Trunk port: VLAN `id` tagged.
        if !port_vlans_of(&vlans, up.index)
            .iter()
            .any(|v| v.vid == id && !v.flags.contains(BridgeVlanInfoFlags::Untagged))
        {
            self.nl
                .add_port_vlan(&up, id, BridgeVlanInfoFlags::empty())
                .await?;
        }
        Ok(peer)
    }

    /// The VLAN-filtering bridge of `uplink`, created if needed; the clear
    /// "unsupported" error when this kernel cannot filter VLANs on bridges.
    async fn ensure_trunk(&self, network: &str, id: u16, uplink: &str) -> Result<Link> {
        let unsupported = || {
            Error::unsupported(
                format!("VLAN network {network:?} (VLAN {id} on {uplink})"),
                VLAN_FILTERING_MISSING,
            )
        };
        let link = match self
            .slot(Role::Trunk, uplink, |o| o.is_trunk_of(uplink))
            .await?
        {
            Slot::Owned(l) => *l,
            Slot::Free(n) => {
                let alias = names::trunk_alias(uplink);
                self.create_owned(&n, trunk_bridge_message(&n), &alias, |e| match errno(&e) {
                    Some(libc::EOPNOTSUPP) => unsupported(),
                    _ => nl_error(format!("create trunk bridge {n} for {uplink}"), e),
                })
                .await?
            }
        };
        if link.vlan_filtering != Some(true) {
            // Created or adopted without filtering: turn it on, or give up
            // cleanly when the kernel ignores or refuses it.
            let mut msg = trunk_bridge_message(&link.name);
            msg.header.index = link.index;
            let set = self.nl.change(&link.name, msg).await;
            let now = self.nl.link(&link.name).await?;
            if set.is_err() || now.as_ref().and_then(|l| l.vlan_filtering) != Some(true) {
                self.nl.delete(&link).await?;
                return Err(unsupported());
            }
        }
        self.nl.reconcile(&link, None, None, None).await?;
        Ok(link)
    }

    /// The veth patch of a VLAN network: (trunk end, bridge end).
    async fn ensure_patch(&self, network: &str, mtu: u16) -> Result<(Link, Link)> {
        let end = self
            .slot(Role::Vlan, network, |o| o.is(Role::Vlan, network))
            .await?;
        let peer = self
            .slot(Role::VlanPeer, network, |o| o.is(Role::VlanPeer, network))
            .await?;
        let (end, peer) = match (end, peer) {
            (Slot::Owned(e), Slot::Owned(p))
                if e.kind == Some(InfoKind::Veth) && e.parent == Some(p.index) =>
            {
                (*e, *p)
            }
            (end, peer) => {
                // Missing, half of it, or an 802.1Q device of an older version.
                for s in [end, peer] {
                    if let Slot::Owned(l) = s {
                        self.nl.delete(&l).await?;
                    }
                }
                let Slot::Free(en) = self
                    .slot(Role::Vlan, network, |o| o.is(Role::Vlan, network))
                    .await?
                else {
                    return Err(Error::already_exists("VLAN patch", network));
                };
                let Slot::Free(pn) = self
                    .slot(Role::VlanPeer, network, |o| o.is(Role::VlanPeer, network))
                    .await?
                else {
                    return Err(Error::already_exists("VLAN patch", network));
                };
                let msg = LinkVeth::new(&en, &pn).mtu(u32::from(mtu)).build();
                let alias = names::network_alias(Role::Vlan, network);
                let e = self
                    .create_owned(&en, msg, &alias, |e| {
                        nl_error(format!("create VLAN patch {en}/{pn}"), e)
                    })
                    .await?;
                let p = self
                    .nl
                    .link(&pn)
                    .await?
                    .ok_or_else(|| Error::not_found("device", pn.clone()))?;
                (e, p)
            }
        };
        let peer_alias = names::network_alias(Role::VlanPeer, network);
        self.nl
            .reconcile(&end, Some(u32::from(mtu)), None, None)
            .await?;
        self.nl
            .reconcile(&peer, Some(u32::from(mtu)), None, Some(&peer_alias))
            .await?;
        Ok((end, peer))
    }

    /// Deletes trunk bridges no VLAN network patches into any more, and takes
    /// VLANs nobody uses off the remaining trunks' uplinks.
    pub(crate) async fn collect_trunks(&self) -> Result<()> {
        let links = self.nl.links().await?;
        let trunks: Vec<&Link> = links
            .iter()
            .filter(|l| {
                l.alias
                    .as_deref()
                    .and_then(names::parse_alias)
                    .is_some_and(|o| o.role == "trunk")
            })
            .collect();
        if trunks.is_empty() {
            return Ok(());
        }
        let vlans = self.nl.port_vlans().await?;
        for trunk in trunks {
            let patches = trunk_patches(&links, &vlans, trunk.index);
            if patches.is_empty() {
                // Deleting the bridge releases the uplink.
                self.nl.delete(trunk).await?;
                tracing::info!(trunk = %trunk.name, "trunk bridge removed: no VLAN network left on it");
                continue;
            }
            let used: Vec<u16> = patches.iter().filter_map(|(_, v)| *v).collect();
            for up in links.iter().filter(|l| {
                l.master == Some(trunk.index)
                    && l.alias.as_deref().and_then(names::parse_alias).is_none()
            }) {
                for v in port_vlans_of(&vlans, up.index) {
                    if !used.contains(&v.vid) {
                        self.nl.del_port_vlan(up, v.vid).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn ensure_vxlan(&self, cfg: &NetworkConfig, bridge: &Link, mtu: u16) -> Result<()> {
        let NetworkKind::Overlay {
            vni,
            local,
            peers,
            port,
            underlay,
        } = &cfg.kind
        else {
            return Ok(());
        };
        let network = cfg.name.as_str();
        let under = match underlay {
            Some(u) => Some(
                self.nl
                    .link(u)
                    .await?
                    .ok_or_else(|| Error::not_found("underlay interface", u.clone()))?
                    .index,
            ),
            None => None,
        };
        let want = VxlanParams {
            vni: Some(*vni),
            local: Some(*local),
            port: Some(*port),
            underlay: under,
            learning: Some(false),
        };
        let alias = names::network_alias(Role::Vxlan, network);
        let link = match self
            .slot(Role::Vxlan, network, |o| o.is(Role::Vxlan, network))
            .await?
        {
            Slot::Owned(l) if l.vxlan.as_ref() == Some(&want) => Some(*l),
            Slot::Owned(l) => {
                tracing::info!(name = %l.name, "VXLAN parameters changed: recreating the device");
                self.nl.delete(&l).await?;
                None
            }
            Slot::Free(_) => None,
        };
        let link = match link {
            Some(l) => l,
            None => {
                let Slot::Free(n) = self
                    .slot(Role::Vxlan, network, |o| o.is(Role::Vxlan, network))
                    .await?
                else {
                    return Err(Error::already_exists("VXLAN device", network));
                };
                let mut b: LinkMessageBuilder<LinkVxlan> =
                    LinkVxlan::new(&n, *vni).port(*port).learning(false);
                b = match local {
                    IpAddr::V4(a) => b.local(*a),
                    IpAddr::V6(a) => b.local6(*a),
                };
                if let Some(i) = under {
                    b = b.dev(i);
                }
                let msg = b.mtu(u32::from(mtu)).build();
                self.create_owned(&n, msg, &alias, |e| {
                    nl_error(format!("create VXLAN device {n} (VNI {vni})"), e)
                })
                .await?
            }
        };
        self.nl
            .reconcile(&link, Some(u32::from(mtu)), None, Some(&alias))
            .await?;
        self.nl.set_master(&link, bridge.index).await?;

        let mut want_peers: Vec<IpAddr> = peers.iter().copied().filter(|p| p != local).collect();
        want_peers.sort();
        want_peers.dedup();
        let have = self.nl.flood_peers(link.index).await?;
        for p in have.iter().filter(|p| !want_peers.contains(p)) {
            self.nl.del_flood_peer(link.index, *p).await?;
        }
        for p in want_peers.iter().filter(|p| !have.contains(p)) {
            self.nl.add_flood_peer(link.index, *p).await?;
        }
        tracing::debug!(vxlan = %link.name, peers = ?want_peers, "overlay flood entries reconciled");
        Ok(())
    }
}

/// What an `Unsupported` error says this kernel lacks for VLAN networks.
pub(crate) const VLAN_FILTERING_MISSING: &str = "this kernel: it has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING), which VLAN networks need";

fn port_vlans_of(vlans: &[(u32, Vec<BridgeVlanInfo>)], index: u32) -> Vec<BridgeVlanInfo> {
    vlans
        .iter()
        .filter(|(i, _)| *i == index)
        .flat_map(|(_, v)| v.iter().copied())
        .collect()
}

/// VLAN patches plugged into trunk `trunk`: (network, PVID).
fn trunk_patches(
    links: &[Link],
    vlans: &[(u32, Vec<BridgeVlanInfo>)],
    trunk: u32,
) -> Vec<(String, Option<u16>)> {
    links
        .iter()
        .filter(|l| l.master == Some(trunk))
        .filter_map(|l| {
            let o = names::parse_alias(l.alias.as_deref()?)?;
            (o.role == "vlan").then(|| {
                let pvid = port_vlans_of(vlans, l.index)
                    .iter()
                    .find(|v| v.flags.contains(BridgeVlanInfoFlags::Pvid))
                    .map(|v| v.vid);
                (o.network, pvid)
            })
        })
        .collect()
}

fn dhcp_settings(cfg: &NetworkConfig, mtu: u16) -> Result<Option<DhcpSettings>> {
    let (Some(d), Some(cidr)) = (&cfg.dhcp, cfg.cidr) else {
        return Ok(None);
    };
    let IpNet::V4(subnet) = cidr else {
        return Err(Error::invalid(
            "DHCP",
            format!("{cidr} is not IPv4 (the server is DHCPv4)"),
        ));
    };
    let server: Ipv4Addr = match (&cfg.kind, cfg.gateway) {
        (NetworkKind::Management { .. }, Some(IpAddr::V4(gw))) => gw,
        _ => dhcp::server_address(subnet.trunc(), d, cfg.gateway).ok_or_else(|| {
            Error::invalid(
                "DHCP",
                format!("no address of {subnet} is left for the DHCP server"),
            )
        })?,
    };
    DhcpSettings::from_config(d, cidr, server, cfg.gateway, Some(mtu)).map(Some)
}
