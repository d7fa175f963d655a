//! Thin netlink layer: links, addresses and VXLAN forwarding entries.
//!
//! Everything here speaks `rtnetlink` over a socket opened inside the
//! backend's namespace; errors become [`hci_core::Error`] with the operation
//! as context.

use std::io;
use std::net::IpAddr;

use futures::TryStreamExt;
use hci_core::{Error, Result};
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, InfoVlan,
    InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, Stats64,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgeVlan, LinkUnspec};

use crate::netns::NetNs;

/// The errno carried by a netlink error, if any (positive, e.g. `libc::ENODEV`).
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// Maps a netlink error to an [`Error`] saying what was being done.
pub(crate) fn nl_error(context: impl Into<String>, e: rtnetlink::Error) -> Error {
    match errno(&e) {
        Some(code) => Error::io(context, io::Error::from_raw_os_error(code)),
        None => Error::Backend {
            backend: "netlink",
            message: context.into(),
            source: Some(Box::new(e)),
        },
    }
}

/// VXLAN parameters read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct VxlanParams {
    pub vni: Option<u32>,
    pub local: Option<IpAddr>,
    pub port: Option<u16>,
    pub underlay: Option<u32>,
    pub learning: Option<bool>,
}

/// What we need to know about a link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    pub mtu: u32,
    pub master: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub kind: Option<InfoKind>,
    pub up: bool,
    pub parent: Option<u32>,
    pub vxlan: Option<VxlanParams>,
    pub vlan_id: Option<u16>,
    /// `IFLA_BR_VLAN_FILTERING` of a bridge, as the kernel reports it.
    pub vlan_filtering: Option<bool>,
    pub stats: Option<Stats64>,
}

impl Link {
    fn from_message(m: LinkMessage) -> Self {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            alias: None,
            mtu: 0,
            master: None,
            mac: None,
            kind: None,
            up: m.header.flags.contains(LinkFlags::Up),
            parent: None,
            vxlan: None,
            vlan_id: None,
            vlan_filtering: None,
            stats: None,
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::IfAlias(s) => l.alias = Some(s),
                LinkAttribute::Mtu(v) => l.mtu = v,
                LinkAttribute::Controller(v) if v != 0 => l.master = Some(v),
                LinkAttribute::Link(v) if v != 0 => l.parent = Some(v),
                LinkAttribute::Address(a) => l.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Stats64(s) => l.stats = Some(s),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(k),
                            LinkInfo::Data(InfoData::Vxlan(v)) => l.vxlan = Some(vxlan_params(v)),
                            LinkInfo::Data(InfoData::Bridge(b)) => {
                                l.vlan_filtering = b.iter().find_map(|x| match x {
                                    InfoBridge::VlanFiltering(on) => Some(*on),
                                    _ => None,
                                })
                            }
                            LinkInfo::Data(InfoData::Vlan(v)) => {
                                l.vlan_id = v.iter().find_map(|x| match x {
                                    InfoVlan::Id(id) => Some(*id),
                                    _ => None,
                                })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

fn vxlan_params(infos: Vec<InfoVxlan>) -> VxlanParams {
    let mut p = VxlanParams::default();
    for i in infos {
        match i {
            InfoVxlan::Id(v) => p.vni = Some(v),
            InfoVxlan::Local(a) => p.local = Some(IpAddr::V4(a)),
            InfoVxlan::Local6(a) => p.local = Some(IpAddr::V6(a)),
            InfoVxlan::Port(v) => p.port = Some(v),
            InfoVxlan::Link(v) if v != 0 => p.underlay = Some(v),
            InfoVxlan::Learning(v) => p.learning = Some(v),
            _ => {}
        }
    }
    p
}

/// `RTM_NEWLINK` for a bridge with VLAN filtering on
/// (`IFLA_BR_VLAN_FILTERING` = 1) and no default PVID
/// (`IFLA_BR_VLAN_DEFAULT_PVID` = 0, so a new port carries no VLAN until one
/// is given to it).
pub(crate) fn trunk_bridge_message(name: &str) -> LinkMessage {
    LinkBridge::new(name)
        .vlan_filtering(true)
        .vlan_default_pvid(0)
        .build()
}

/// `RTM_SETLINK`/`RTM_DELLINK` body for one VLAN of a bridge port: family
/// `AF_BRIDGE`, the port's index, and `IFLA_AF_SPEC` holding one
/// `IFLA_BRIDGE_VLAN_INFO { flags, vid }`.
pub(crate) fn port_vlan_message(port: u32, vid: u16, flags: BridgeVlanInfoFlags) -> LinkMessage {
    LinkBridgeVlan::new(port).vlan(vid, flags).build()
}

/// The `IFLA_BRIDGE_VLAN_INFO` entries of an `AF_BRIDGE` link message,
/// ranges expanded.
pub(crate) fn vlans_of(m: &LinkMessage) -> Vec<BridgeVlanInfo> {
    let mut out = Vec::new();
    let mut range_start: Option<u16> = None;
    for a in &m.attributes {
        let LinkAttribute::AfSpecBridge(specs) = a else {
            continue;
        };
        for spec in specs {
            let AfSpecBridge::VlanInfo(v) = spec else {
                continue;
            };
            if v.flags.contains(BridgeVlanInfoFlags::RangeBegin) {
                range_start = Some(v.vid);
            } else if v.flags.contains(BridgeVlanInfoFlags::RangeEnd) {
                let flags = v.flags - BridgeVlanInfoFlags::RangeEnd;
                for vid in range_start.take().unwrap_or(v.vid)..=v.vid {
                    out.push(BridgeVlanInfo { vid, flags });
                }
            } else {
                out.push(*v);
            }
        }
    }
    out
}

/// A netlink route connection inside one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route netlink socket inside `ns` and spawns its connection task
    /// on the current tokio runtime.
    pub(crate) async fn connect(ns: &NetNs) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let socket = ns
            .run(move || {
                let _guard = rt.enter();
                <rtnetlink::sys::TokioSocket as rtnetlink::sys::AsyncSocket>::new(
                    rtnetlink::sys::protocols::NETLINK_ROUTE,
                )
            })
            .and_then(|r| r)
            .map_err(|e| Error::io(format!("open a netlink socket in {ns:?}"), e))?;
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link called `name`, if it exists.
    pub(crate) async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_name(name).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_error(format!("look up link {name}"), e)),
        }
    }

    /// The link with `index`, if it exists.
    pub(crate) async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(Link::from_message)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_error(format!("look up link #{index}"), e)),
        }
    }

    /// Every link in the namespace.
    pub(crate) async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("list links", e))?;
        Ok(msgs.into_iter().map(Link::from_message).collect())
    }

    /// Creates a link (`RTM_NEWLINK` with `NLM_F_EXCL`).
    pub(crate) async fn add(&self, msg: LinkMessage) -> std::result::Result<(), rtnetlink::Error> {
        self.handle.link().add(msg).execute().await
    }

    /// Changes attributes of an existing link.
    pub(crate) async fn set(&self, what: &str, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_error(format!("configure {what}"), e))
    }

    /// Changes a link's kind-specific settings (`RTM_NEWLINK` on an existing
    /// link: `ip link set DEV type KIND …`).
    pub(crate) async fn change(&self, what: &str, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| nl_error(format!("configure {what}"), e))
    }

    /// Sets MTU, MAC, alias and up state of `link` where they differ.
    pub(crate) async fn reconcile(
        &self,
        link: &Link,
        mtu: Option<u32>,
        mac: Option<[u8; 6]>,
        alias: Option<&str>,
    ) -> Result<()> {
        let mut b = LinkUnspec::new_with_index(link.index);
        let mut changed = false;
        if let Some(mtu) = mtu.filter(|m| *m != link.mtu) {
            b = b.mtu(mtu);
            changed = true;
        }
        if let Some(mac) = mac.filter(|m| Some(*m) != link.mac) {
            b = b.address(mac.to_vec());
            changed = true;
        }
        if let Some(alias) = alias.filter(|a| Some(*a) != link.alias.as_deref()) {
            b = b.alias(alias);
            changed = true;
        }
        if changed {
            self.set(&link.name, b.build()).await?;
        }
        if !link.up {
            self.set(
                &link.name,
                LinkUnspec::new_with_index(link.index).up().build(),
            )
            .await?;
        }
        Ok(())
    }

    /// Makes `link` a port of bridge `master` (no-op if it already is).
    pub(crate) async fn set_master(&self, link: &Link, master: u32) -> Result<()> {
        if link.master == Some(master) {
            return Ok(());
        }
        self.set(
            &link.name,
            LinkUnspec::new_with_index(link.index)
                .controller(master)
                .build(),
        )
        .await
    }

    /// Releases `link` from its bridge.
    pub(crate) async fn release(&self, link: &Link) -> Result<()> {
        if link.master.is_none() {
            return Ok(());
        }
        self.set(
            &link.name,
            LinkUnspec::new_with_index(link.index)
                .nocontroller()
                .build(),
        )
        .await
    }

    /// Deletes a link; an already absent link is fine.
    pub(crate) async fn delete(&self, link: &Link) -> Result<()> {
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_error(format!("delete link {}", link.name), e)),
        }
    }

    /// Global and site addresses of a link (link-local ones are the kernel's business).
    pub(crate) async fn addresses(&self, index: u32) -> Result<Vec<(IpNet, AddressMessage)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("list addresses", e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index
                || matches!(m.header.scope, AddressScope::Link | AddressScope::Host)
            {
                continue;
            }
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(net) = ip.and_then(|ip| IpNet::new(ip, m.header.prefix_len).ok()) {
                out.push((net, m));
            }
        }
        Ok(out)
    }

    /// Index of the link holding address `ip`, if any.
    pub(crate) async fn index_of_address(&self, ip: IpAddr) -> Result<Option<u32>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(ip)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("list addresses", e))?;
        Ok(msgs
            .iter()
            .find(|m| m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(a) | AddressAttribute::Address(a) if *a == ip)))
            .map(|m| m.header.index))
    }

    /// Adds an address to a link.
    pub(crate) async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_error(format!("add address {net}"), e)),
        }
    }

    /// Removes an address (as returned by [`Netlink::addresses`]).
    pub(crate) async fn del_address(&self, net: IpNet, msg: AddressMessage) -> Result<()> {
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(nl_error(format!("remove address {net}"), e)),
        }
    }

    /// Adds VLAN `vid` with `flags` to bridge port `port`
    /// (`bridge vlan add dev PORT vid VID [pvid] [untagged]`).
    pub(crate) async fn add_port_vlan(
        &self,
        port: &Link,
        vid: u16,
        flags: BridgeVlanInfoFlags,
    ) -> Result<()> {
        self.handle
            .link()
            .set(port_vlan_message(port.index, vid, flags))
            .execute()
            .await
            .map_err(|e| nl_error(format!("add VLAN {vid} to bridge port {}", port.name), e))
    }

    /// Removes VLAN `vid` from bridge port `port`; an absent VLAN is fine.
    pub(crate) async fn del_port_vlan(&self, port: &Link, vid: u16) -> Result<()> {
        let msg = port_vlan_message(port.index, vid, BridgeVlanInfoFlags::empty());
        match self.handle.link().del_with_message(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(()),
            Err(e) => Err(nl_error(
                format!("remove VLAN {vid} from bridge port {}", port.name),
                e,
            )),
        }
    }

    /// VLANs of every bridge port in the namespace, by port index
    /// (`bridge vlan show`: an `AF_BRIDGE` dump with `RTEXT_FILTER_BRVLAN`).
    pub(crate) async fn port_vlans(&self) -> Result<Vec<(u32, Vec<BridgeVlanInfo>)>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Brvlan])
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("list bridge port VLANs", e))?;
        Ok(msgs
            .into_iter()
            .map(|m| (m.header.index, vlans_of(&m)))
            .collect())
    }

    fn flood_entry(index: u32, peer: IpAddr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
        m.attributes
            .push(NeighbourAttribute::Destination(match peer {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        m
    }

    /// Peers of the all-zero (flood) forwarding entries of VXLAN device `index`.
    pub(crate) async fn flood_peers(&self, index: u32) -> Result<Vec<IpAddr>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("list forwarding entries", e))?;
        let mut peers = Vec::new();
        for m in msgs.into_iter().filter(|m| m.header.ifindex == index) {
            let zero = m.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l.iter().all(|b| *b == 0)));
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                // AF_BRIDGE entries carry the VXLAN remote as raw bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
                    4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                },
                _ => None,
            });
            if let (true, Some(dst)) = (zero, dst) {
                peers.push(dst);
            }
        }
        Ok(peers)
    }

    /// Appends a flood entry towards `peer` (`bridge fdb append 00:00:00:00:00:00 dst PEER`).
    pub(crate) async fn add_flood_peer(&self, index: u32, peer: IpAddr) -> Result<()> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(Self::flood_entry(
            index, peer,
        )));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let mut handle = self.handle.clone();
        let mut resp = handle
            .request(req)
            .map_err(|e| nl_error(format!("add flood entry to {peer}"), e))?;
        while let Some(msg) = futures::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(err) = msg.payload
                && err.code.is_some_and(|c| c.get().abs() != libc::EEXIST)
            {
                return Err(nl_error(
                    format!("add flood entry to {peer}"),
                    rtnetlink::Error::NetlinkError(err),
                ));
            }
        }
        Ok(())
    }

    /// Removes the flood entry towards `peer`.
    pub(crate) async fn del_flood_peer(&self, index: u32, peer: IpAddr) -> Result<()> {
        match self
            .handle
            .neighbours()
            .del(Self::flood_entry(index, peer))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(nl_error(format!("remove flood entry to {peer}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::{Emitable, Parseable};

    use super::*;

    fn emit(m: &LinkMessage) -> Vec<u8> {
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    #[test]
    fn port_vlan_message_is_an_af_bridge_vlan_info() {
        let flags = BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged;
        let m = port_vlan_message(7, 42, flags);
        assert_eq!(m.header.interface_family, AddressFamily::Bridge);
        assert_eq!(m.header.index, 7);
        assert_eq!(
            m.attributes,
            vec![LinkAttribute::AfSpecBridge(vec![AfSpecBridge::VlanInfo(
                BridgeVlanInfo { flags, vid: 42 }
            )])]
        );
        // ifinfomsg (AF_BRIDGE = 7, index 7), then IFLA_AF_SPEC (26) nesting
        // IFLA_BRIDGE_VLAN_INFO (2) = { flags: PVID|UNTAGGED = 6, vid: 42 }.
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            7, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            12, 0, 26, 0,
            8, 0, 2, 0, 6, 0, 42, 0,
        ];
        assert_eq!(emit(&m), want);
        // Tagged trunk membership: no flags.
        let t = emit(&port_vlan_message(3, 4094, BridgeVlanInfoFlags::empty()));
        assert_eq!(&t[t.len() - 4..], &[0, 0, 0xfe, 0x0f]);
    }

    #[test]
    fn trunk_bridge_message_turns_filtering_on_without_a_default_pvid() {
        let m = trunk_bridge_message("hci-tk-01234567");
        let bytes = emit(&m);
        let parsed = LinkMessage::parse(bytes.as_slice()).expect("parses");
        assert_eq!(parsed.header, m.header);
        let l = Link::from_message(parsed.clone());
        assert_eq!(l.name, "hci-tk-01234567");
        assert_eq!(l.kind, Some(InfoKind::Bridge));
        assert_eq!(l.vlan_filtering, Some(true));
        let data = parsed.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => i.iter().find_map(|x| match x {
                LinkInfo::Data(InfoData::Bridge(b)) => Some(b.clone()),
                _ => None,
            }),
            _ => None,
        });
        let data = data.expect("IFLA_INFO_DATA of a bridge");
        assert!(data.contains(&InfoBridge::VlanFiltering(true)), "{data:?}");
        assert!(data.contains(&InfoBridge::VlanDefaultPvid(0)), "{data:?}");
    }

    #[test]
    fn vlan_dumps_expand_ranges() {
        let mut m = LinkMessage::default();
        m.header.interface_family = AddressFamily::Bridge;
        m.attributes.push(LinkAttribute::AfSpecBridge(vec![
            AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
                vid: 10,
            }),
            AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: BridgeVlanInfoFlags::RangeBegin,
                vid: 20,
            }),
            AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: BridgeVlanInfoFlags::RangeEnd,
                vid: 22,
            }),
        ]));
        let v = vlans_of(&m);
        let vids: Vec<u16> = v.iter().map(|x| x.vid).collect();
        assert_eq!(vids, [10, 20, 21, 22]);
        assert!(v[0].flags.contains(BridgeVlanInfoFlags::Pvid));
        assert!(v[1..].iter().all(|x| x.flags.is_empty()));
    }
}
