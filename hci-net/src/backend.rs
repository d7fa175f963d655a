//! [`LinuxBridgeBackend`]: the `NetworkBackend` on Linux bridges.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use hci_core::net::{NetworkBackend, NetworkConfig, NetworkStatus, PortConfig, TapHandle};
use hci_core::{Error, Result};
use tokio::sync::Mutex;

use crate::dhcp::{DhcpNames, DhcpServer, Lease};
use crate::link::{Link, Netlink};
use crate::names::{self, Owner, Role};
use crate::netns::NetNs;
use crate::{nat, tap};

/// Settings of a [`LinuxBridgeBackend`].
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Namespace to manage (the node); [`NetNs::current`] by default.
    pub netns: NetNs,
    /// Directory for DHCP lease files (`dhcp-<network>.json`); leases are kept
    /// in memory only when `None`.
    pub state_dir: Option<PathBuf>,
    /// Open TAP queues with a 12-byte virtio-net header (`IFF_VNET_HDR`), as a
    /// virtio-net device model expects. On by default.
    pub vnet_hdr: bool,
    /// MTU of networks that set none and have no uplink to inherit it from.
    pub default_mtu: u16,
    /// Make TAP ports persistent (they outlive the backend's descriptors, and
    /// a restarted backend or a VMM process reopens them by name) rather
    /// than fd-owned (deleted by the kernel with the last queue descriptor,
    /// so a crashed process leaks nothing). On by default; per port with
    /// [`LinuxBridgeBackend::attach_port_with`].
    pub persistent_taps: bool,
    /// Name of the node this backend manages, mixed into the bridges'
    /// stable MACs so that the bridges of one network on two nodes differ
    /// (they share an L2 through an uplink or overlay: with one MAC, each
    /// would take the other's ARP replies for its own). `None`: the MAC
    /// comes from the network's name alone (one node).
    pub node: Option<String>,
}

/// How a TAP port is made (see [`LinuxBridgeBackend::attach_port_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapOptions {
    /// Persistent (survives its descriptors) or fd-owned.
    pub persistent: bool,
    /// Queues carry a 12-byte virtio-net header (`IFF_VNET_HDR`).
    pub vnet_hdr: bool,
    /// MTU of this port, at most the network's (the network's when `None`).
    pub mtu: Option<u16>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            netns: NetNs::current(),
            state_dir: None,
            vnet_hdr: true,
            default_mtu: 1500,
            persistent_taps: true,
            node: None,
        }
    }
}

/// Traffic counters of a port, as seen by the host side of its device (host
/// receive = guest transmit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Bytes received from the guest.
    pub rx_bytes: u64,
    /// Packets received from the guest.
    pub rx_packets: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent to the guest.
    pub tx_bytes: u64,
    /// Packets sent to the guest.
    pub tx_packets: u64,
    /// Packets for the guest dropped (e.g. nobody reading the queue).
    pub tx_dropped: u64,
}

/// Counters of one device on a network's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortCounters {
    /// Port name for VM TAPs; the interface name otherwise.
    pub port: String,
    /// Interface name.
    pub ifname: String,
    /// `tap` (a VM port made by the backend), `vxlan` (the overlay device),
    /// `vlan` (the patch to the VLAN trunk) or `interface` (an uplink or an
    /// interface attached with [`LinuxBridgeBackend::attach_interface`]).
    pub kind: &'static str,
    /// Its counters.
    pub stats: PortStats,
}

impl From<&rtnetlink::packet_route::link::Stats64> for PortStats {
    fn from(s: &rtnetlink::packet_route::link::Stats64) -> Self {
        PortStats {
            rx_bytes: s.rx_bytes,
            rx_packets: s.rx_packets,
            rx_dropped: s.rx_dropped,
            tx_bytes: s.tx_bytes,
            tx_packets: s.tx_packets,
            tx_dropped: s.tx_dropped,
        }
    }
}

/// What the backend remembers about a network it reconciled.
#[derive(Debug)]
pub(crate) struct NetState {
    pub config: NetworkConfig,
    pub mtu: u16,
    pub dhcp: Option<DhcpServer>,
}

/// A port the backend opened, with its queue descriptors.
#[derive(Debug)]
pub(crate) struct PortState {
    pub network: String,
    pub handle: TapHandle,
    /// MTU asked for this port, if below the network's.
    pub mtu: Option<u16>,
}

/// Everything the backend remembers (the kernel is the source of truth for
/// what exists; this holds what cannot be read back: configs, DHCP servers,
/// TAP queue descriptors).
#[derive(Debug, Default)]
pub(crate) struct State {
    pub nets: BTreeMap<String, NetState>,
    /// Keyed by port name (unique on the node).
    pub ports: HashMap<String, PortState>,
    /// Names the DHCP server of each network hands out (set by the caller).
    pub dhcp_names: BTreeMap<String, DhcpNames>,
}

/// Result of looking for a device by its derived name.
pub(crate) enum Slot {
    /// Our device for this owner.
    Owned(Box<Link>),
    /// No device yet; this name is free.
    Free(String),
}

/// A [`NetworkBackend`] on Linux bridges, TAPs, VXLAN and nftables.
///
/// All kernel changes go through netlink in the namespace given by
/// [`BackendOptions::netns`]; operations are serialized by one lock.
#[derive(Debug)]
pub struct LinuxBridgeBackend {
    pub(crate) ns: NetNs,
    pub(crate) nl: Netlink,
    pub(crate) opts: BackendOptions,
    pub(crate) state: Mutex<State>,
}

impl LinuxBridgeBackend {
    /// Connects to the kernel in `opts.netns`. Must be called inside a tokio
    /// runtime, which then carries the netlink connection.
    pub async fn new(opts: BackendOptions) -> Result<Self> {
        let nl = Netlink::connect(&opts.netns).await?;
        if let Some(dir) = &opts.state_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create state directory {}", dir.display()), e))?;
        }
        Ok(Self {
            ns: opts.netns.clone(),
            nl,
            opts,
            state: Mutex::new(State::default()),
        })
    }

    /// The namespace this backend manages.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Finds the device of `role` owned by `key` (network name, or port name for
    /// TAPs) among its candidate names, or the first free candidate.
    pub(crate) async fn slot(
        &self,
        role: Role,
        key: &str,
        owns: impl Fn(&Owner) -> bool,
    ) -> Result<Slot> {
        let mut free = None;
        for salt in 0..names::MAX_SALT {
            let name = names::device_name(role, key, salt);
            match self.nl.link(&name).await? {
                Some(l)
                    if l.alias
                        .as_deref()
                        .and_then(names::parse_alias)
                        .is_some_and(|o| owns(&o)) =>
                {
                    return Ok(Slot::Owned(Box::new(l)));
                }
                Some(l) => {
                    tracing::debug!(name = %l.name, alias = ?l.alias, "device name taken by another owner")
                }
                None => {
                    if free.is_none() {
                        free = Some(name);
                    }
                }
            }
        }
        free.map(Slot::Free).ok_or_else(|| {
            Error::already_exists(
                "device",
                format!("every candidate device name for {key:?} is taken"),
            )
        })
    }

    /// The bridge of `network`, if it exists.
    pub(crate) async fn bridge_of(&self, network: &str) -> Result<Option<Link>> {
        Ok(
            match self
                .slot(Role::Bridge, network, |o| o.is(Role::Bridge, network))
                .await?
            {
                Slot::Owned(l) => Some(*l),
                Slot::Free(_) => None,
            },
        )
    }

    /// The network-level device of `role` (VXLAN, VLAN) of `network`, if any.
    pub(crate) async fn device_of(&self, role: Role, network: &str) -> Result<Option<Link>> {
        Ok(
            match self.slot(role, network, |o| o.is(role, network)).await? {
                Slot::Owned(l) => Some(*l),
                Slot::Free(_) => None,
            },
        )
    }

    /// TAP ports of `network` present in the kernel, with their port names.
    pub(crate) async fn taps_of(&self, links: &[Link], network: &str) -> Vec<(String, Link)> {
        links
            .iter()
            .filter_map(|l| {
                let o = names::parse_alias(l.alias.as_deref()?)?;
                (o.is(Role::Tap, network)).then(|| (o.port.unwrap_or_default(), l.clone()))
            })
            .collect()
    }

    /// Leases of `network`'s DHCP server.
    pub async fn leases(&self, network: &str) -> Result<Vec<Lease>> {
        let st = self.state.lock().await;
        let server = st.nets.get(network).and_then(|n| n.dhcp.as_ref());
        server
            .map(DhcpServer::leases)
            .ok_or_else(|| Error::not_found("DHCP server", network))
    }

    /// Sets the names `network`'s DHCP server hands out: the domain (option
    /// 15) and host names by MAC (option 12, e.g. the VM's name for its NIC).
    /// Applied at once to a running server and kept for later
    /// [`ensure_network`](NetworkBackend::ensure_network) calls; set them
    /// before the network's first `ensure_network` so that no client is
    /// answered without them. Forgotten when the network is removed.
    pub async fn set_dhcp_names(&self, network: &str, dhcp: DhcpNames) -> Result<()> {
        names::validate_network_name(network)?;
        dhcp.validate()?;
        let mut st = self.state.lock().await;
        if let Some(srv) = st.nets.get(network).and_then(|n| n.dhcp.as_ref()) {
            srv.reconfigure(srv.settings().with_names(&dhcp)?);
        }
        st.dhcp_names.insert(network.to_string(), dhcp);
        Ok(())
    }

    /// Counters of a port.
    pub async fn port_stats(&self, network: &str, port: &str) -> Result<PortStats> {
        let link = self
            .port_link(network, port)
            .await?
            .ok_or_else(|| Error::not_found("port", port))?;
        Ok(link.stats.as_ref().map(PortStats::from).unwrap_or_default())
    }

    /// Counters of every device on `network`'s bridge (VM TAPs, attached
    /// interfaces, uplink, VXLAN device, VLAN patch), sorted by port name,
    /// read from one dump of the namespace's links — for metrics.
    pub async fn network_stats(&self, network: &str) -> Result<Vec<PortCounters>> {
        names::validate_network_name(network)?;
        let bridge = self
            .bridge_of(network)
            .await?
            .ok_or_else(|| Error::not_found("network", network))?;
        let links = self.nl.links().await?;
        let mut out: Vec<PortCounters> = links
            .iter()
            .filter(|l| l.master == Some(bridge.index))
            .map(|l| {
                let owner = l.alias.as_deref().and_then(names::parse_alias);
                let (port, kind) = match owner {
                    Some(o) if o.role == "tap" => (o.port.unwrap_or_else(|| l.name.clone()), "tap"),
                    Some(o) if o.role == "vxlan" => (l.name.clone(), "vxlan"),
                    Some(o) if o.role == "vlanpeer" => (l.name.clone(), "vlan"),
                    _ => (l.name.clone(), "interface"),
                };
                PortCounters {
                    port,
                    ifname: l.name.clone(),
                    kind,
                    stats: l.stats.as_ref().map(PortStats::from).unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.port.cmp(&b.port));
        Ok(out)
    }

    async fn port_link(&self, network: &str, port: &str) -> Result<Option<Link>> {
        Ok(
            match self
                .slot(Role::Tap, port, |o| {
                    o.role == "tap" && o.port.as_deref() == Some(port)
                })
                .await?
            {
                Slot::Owned(l)
                    if l.alias
                        .as_deref()
                        .and_then(names::parse_alias)
                        .is_some_and(|o| o.network == network) =>
                {
                    Some(*l)
                }
                _ => None,
            },
        )
    }

    /// [`NetworkBackend::attach_port`] with explicit TAP options: persistent
    /// or fd-owned (the kernel deletes an fd-owned TAP with the last queue
    /// descriptor, e.g. when the VMM holding them exits), virtio-net header
    /// on the queues, and a port MTU below the network's. Attaching an
    /// existing port again returns it, with its MTU reconciled.
    #[tracing::instrument(name = "attach_port", skip(self, port), fields(port = %port.name))]
    pub async fn attach_port_with(
        &self,
        network: &str,
        port: &PortConfig,
        opts: TapOptions,
    ) -> Result<TapHandle> {
        names::validate_network_name(network)?;
        names::validate_port_name(&port.name)?;
        if !crate::mac::is_valid_unicast(port.mac) {
            return Err(Error::invalid(
                "port MAC",
                format!("{} is not a unicast address", crate::mac::format(port.mac)),
            ));
        }
        if port.queues == 0 || port.queues > 256 {
            return Err(Error::invalid(
                "port queues",
                format!("{} is not in 1..=256", port.queues),
            ));
        }
        let mut st = self.state.lock().await;
        self.attach_locked(&mut st, network, port, opts).await
    }

    /// Plugs an existing interface `ifname` that this backend did not create
    /// (a TAP opened by another VMM, the host end of a veth) into `network`'s
    /// bridge, sets its MTU to the network's and brings it up; with `mac`, also
    /// sets the interface's own address. The device stays the caller's: it is
    /// released, not deleted, when the network is removed.
    #[tracing::instrument(name = "attach_interface", skip(self))]
    pub async fn attach_interface(
        &self,
        network: &str,
        ifname: &str,
        mac: Option<[u8; 6]>,
    ) -> Result<()> {
        names::validate_network_name(network)?;
        if let Some(m) = mac
            && !crate::mac::is_valid_unicast(m)
        {
            return Err(Error::invalid(
                "interface MAC",
                format!("{} is not a unicast address", crate::mac::format(m)),
            ));
        }
        let _st = self.state.lock().await;
        let bridge = self
            .bridge_of(network)
            .await?
            .ok_or_else(|| Error::not_found("network", network))?;
        let link = self
            .nl
            .link(ifname)
            .await?
            .ok_or_else(|| Error::not_found("interface", ifname))?;
        if link.index == bridge.index
            || link.alias.as_deref().and_then(names::parse_alias).is_some()
        {
            return Err(Error::invalid(
                "interface",
                format!("{ifname} is a device of hci-net itself, not a port to attach"),
            ));
        }
        if let Some(m) = link.master.filter(|m| *m != bridge.index) {
            let holder = self
                .nl
                .link_by_index(m)
                .await?
                .map_or_else(|| format!("index {m}"), |l| l.name);
            return Err(Error::Busy {
                kind: "interface",
                name: ifname.to_string(),
                reason: format!("it is already a port of {holder}"),
            });
        }
        self.nl
            .reconcile(&link, Some(bridge.mtu), mac, None)
            .await?;
        self.nl.set_master(&link, bridge.index).await?;
        tracing::info!(network, ifname, bridge = %bridge.name, "interface attached");
        Ok(())
    }

    /// Releases an interface attached with [`Self::attach_interface`] from
    /// `network`'s bridge, leaving the device itself in place.
    #[tracing::instrument(name = "detach_interface", skip(self))]
    pub async fn detach_interface(&self, network: &str, ifname: &str) -> Result<()> {
        names::validate_network_name(network)?;
        let _st = self.state.lock().await;
        let bridge = self
            .bridge_of(network)
            .await?
            .ok_or_else(|| Error::not_found("network", network))?;
        let link = self
            .nl
            .link(ifname)
            .await?
            .filter(|l| l.master == Some(bridge.index))
            .ok_or_else(|| Error::not_found("port", format!("{ifname} on network {network}")))?;
        self.nl.release(&link).await?;
        tracing::info!(network, ifname, "interface detached");
        Ok(())
    }

    /// Removes every device, nftables table and DHCP server this crate made in
    /// the namespace — including leftovers of earlier runs. Returns how many
    /// devices were deleted. Meant for tests and node decommissioning.
    pub async fn cleanup_all(&self) -> Result<usize> {
        let mut st = self.state.lock().await;
        st.nets.clear();
        st.ports.clear();
        let links = self.nl.links().await?;
        let mut n = 0;
        for role in names::ROLES {
            for l in links.iter().filter(|l| l.name.starts_with(role.prefix())) {
                self.nl.delete(l).await?;
                n += 1;
            }
        }
        match self.nft(nat::remove_table_script()).await {
            Ok(()) | Err(Error::Unsupported { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(devices = n, "removed every hci network device");
        Ok(n)
    }

    /// Whether this kernel can run VLAN networks, which need bridge VLAN
    /// filtering (`CONFIG_BRIDGE_VLAN_FILTERING`): creates a scratch bridge
    /// with filtering on, reads the setting back and deletes the bridge.
    pub async fn supports_vlan_networks(&self) -> Result<bool> {
        let _st = self.state.lock().await;
        let key = format!("probe-{}", std::process::id());
        let Slot::Free(name) = self.slot(Role::Trunk, &key, |_| false).await? else {
            return Err(Error::already_exists("device", key));
        };
        match self.nl.add(crate::link::trunk_bridge_message(&name)).await {
            Ok(()) => {}
            Err(e) if crate::link::errno(&e) == Some(libc::EOPNOTSUPP) => return Ok(false),
            Err(e) => {
                return Err(crate::link::nl_error(
                    format!("create probe bridge {name}"),
                    e,
                ));
            }
        }
        let link = self.nl.link(&name).await?;
        let on = link.as_ref().and_then(|l| l.vlan_filtering) == Some(true);
        if let Some(l) = &link {
            self.nl.delete(l).await?;
        }
        tracing::debug!(supported = on, "bridge VLAN filtering probed");
        Ok(on)
    }

    /// Runs an nft script in the namespace off the async threads.
    pub(crate) async fn nft(&self, script: String) -> Result<()> {
        let ns = self.ns.clone();
        tokio::task::spawn_blocking(move || nat::apply(&ns, &script))
            .await
            .map_err(|e| Error::Backend {
                backend: "nftables",
                message: "nft task failed".into(),
                source: Some(Box::new(e)),
            })?
    }

    async fn open_tap(
        &self,
        ifname: &str,
        queues: u16,
        exclusive: bool,
        opts: TapOptions,
    ) -> Result<Vec<Arc<std::os::fd::OwnedFd>>> {
        let (ns, name) = (self.ns.clone(), ifname.to_string());
        let fds = tokio::task::spawn_blocking(move || {
            tap::open(
                &ns,
                &tap::TapSpec {
                    name: &name,
                    queues,
                    vnet_hdr: opts.vnet_hdr,
                    exclusive,
                    persistent: opts.persistent,
                },
            )
        })
        .await
        .map_err(|e| Error::Backend {
            backend: "tap",
            message: "tap task failed".into(),
            source: Some(Box::new(e)),
        })?
        .map_err(|e| Error::io(format!("open TAP {ifname} ({queues} queues)"), e))?;
        Ok(fds.into_iter().map(Arc::new).collect())
    }

    async fn attach_locked(
        &self,
        st: &mut State,
        network: &str,
        port: &PortConfig,
        opts: TapOptions,
    ) -> Result<TapHandle> {
        let bridge = self
            .bridge_of(network)
            .await?
            .ok_or_else(|| Error::not_found("network", network))?;
        let net_mtu = st
            .nets
            .get(network)
            .map(|n| n.mtu)
            .unwrap_or(u16::try_from(bridge.mtu).unwrap_or(1500));
        let mtu = match opts.mtu {
            Some(m) if !(68..=net_mtu).contains(&m) => {
                return Err(Error::invalid(
                    "port MTU",
                    format!("{m} is not in 68..={net_mtu} (the network's MTU)"),
                ));
            }
            Some(m) => m,
            None => net_mtu,
        };
        let alias = names::port_alias(network, &port.name, port.mac);
        let owns = |o: &Owner| o.role == "tap" && o.port.as_deref() == Some(port.name.as_str());
        let (link, fds) = match self.slot(Role::Tap, &port.name, owns).await? {
            Slot::Owned(link) => {
                let owner = link.alias.as_deref().and_then(names::parse_alias);
                if owner
                    .as_ref()
                    .is_none_or(|o| o.network != network || o.mac != Some(port.mac))
                {
                    return Err(Error::already_exists("port", port.name.clone()));
                }
                if let Some(p) = st
                    .ports
                    .get_mut(&port.name)
                    .filter(|p| p.network == network)
                {
                    if p.handle.fds.len() != usize::from(port.queues) {
                        return Err(Error::already_exists("port", port.name.clone()));
                    }
                    self.nl
                        .reconcile(&link, Some(u32::from(mtu)), None, None)
                        .await?;
                    self.nl.set_master(&link, bridge.index).await?;
                    p.handle.mtu = mtu;
                    p.mtu = opts.mtu;
                    return Ok(p.handle.clone());
                }
                // Adopting a port of an earlier run: reattach queues to the persistent TAP.
                let fds = self.open_tap(&link.name, port.queues, false, opts).await?;
                (*link, fds)
            }
            Slot::Free(ifname) => {
                let fds = self.open_tap(&ifname, port.queues, true, opts).await?;
                let link = self
                    .nl
                    .link(&ifname)
                    .await?
                    .ok_or_else(|| Error::not_found("TAP device", ifname.clone()))?;
                (link, fds)
            }
        };
        let configured = async {
            let mac = crate::mac::host_side(port.mac);
            self.nl
                .reconcile(&link, Some(u32::from(mtu)), Some(mac), Some(&alias))
                .await?;
            self.nl.set_master(&link, bridge.index).await?;
            if mtu < net_mtu {
                self.pin_bridge_mtu(&bridge.name, net_mtu).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = configured.await {
            let _ = self.nl.delete(&link).await;
            return Err(e);
        }
        let handle = TapHandle {
            ifname: link.name.clone(),
            mac: port.mac,
            mtu,
            fds,
        };
        st.ports.insert(
            port.name.clone(),
            PortState {
                network: network.to_string(),
                handle: handle.clone(),
                mtu: opts.mtu,
            },
        );
        tracing::info!(network, port = %port.name, ifname = %link.name, "port attached");
        Ok(handle)
    }

    /// Puts bridge `name` back at `mtu` after a port below it joined: a bridge
    /// whose MTU was never set explicitly follows its smallest port, and
    /// setting it once pins it.
    pub(crate) async fn pin_bridge_mtu(&self, name: &str, mtu: u16) -> Result<()> {
        if let Some(b) = self.nl.link(name).await? {
            self.nl
                .reconcile(&b, Some(u32::from(mtu)), None, None)
                .await?;
        }
        Ok(())
    }

    /// Deletes everything of `network` in the kernel; true if anything existed.
    pub(crate) async fn remove_devices(
        &self,
        network: &str,
        was_management: Option<bool>,
    ) -> Result<bool> {
        let links = self.nl.links().await?;
        let mut found = false;
        for (_, tap) in self.taps_of(&links, network).await {
            self.nl.delete(&tap).await?;
            found = true;
        }
        for role in [Role::Vxlan, Role::Vlan, Role::VlanPeer, Role::Bridge] {
            if let Some(l) = self.device_of(role, network).await? {
                self.nl.delete(&l).await?;
                found = true;
            }
        }
        self.collect_trunks().await?;
        // Unknown history (adopted network): try, and tolerate a node without nft.
        if was_management == Some(true) || (found && was_management.is_none()) {
            match self.nft(nat::remove_script(network)).await {
                Ok(()) => {}
                Err(Error::Unsupported { .. }) if was_management.is_none() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }

    pub(crate) fn lease_file(&self, network: &str) -> Option<PathBuf> {
        self.opts
            .state_dir
            .as_ref()
            .map(|d| d.join(format!("dhcp-{network}.json")))
    }
}

#[async_trait]
impl NetworkBackend for LinuxBridgeBackend {
    #[tracing::instrument(name = "ensure_network", skip_all, fields(network = %config.name))]
    async fn ensure_network(&self, config: &NetworkConfig) -> Result<NetworkStatus> {
        let mut st = self.state.lock().await;
        self.ensure_locked(&mut st, config).await
    }

    #[tracing::instrument(name = "remove_network", skip(self))]
    async fn remove_network(&self, name: &str) -> Result<()> {
        names::validate_network_name(name)?;
        let mut st = self.state.lock().await;
        let known = st.nets.remove(name);
        st.ports.retain(|_, p| p.network != name);
        st.dhcp_names.remove(name);
        let was_management = known
            .as_ref()
            .map(|n| matches!(n.config.kind, hci_core::net::NetworkKind::Management { .. }));
        drop(known); // stops the DHCP server, closes TAP queues
        let found = self.remove_devices(name, was_management).await?;
        if let Some(path) = self.lease_file(name) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "failed to remove lease file")
                }
            }
        }
        if !found && was_management.is_none() {
            return Err(Error::not_found("network", name));
        }
        tracing::info!("network removed");
        Ok(())
    }

    async fn list_networks(&self) -> Result<Vec<NetworkStatus>> {
        let st = self.state.lock().await;
        let links = self.nl.links().await?;
        let mut out = Vec::new();
        for l in &links {
            let Some(o) = l.alias.as_deref().and_then(names::parse_alias) else {
                continue;
            };
            if o.role != "bridge" {
                continue;
            }
            let mut ports: Vec<String> = self
                .taps_of(&links, &o.network)
                .await
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            ports.sort();
            let dhcp_running = st
                .nets
                .get(&o.network)
                .and_then(|n| n.dhcp.as_ref())
                .is_some_and(DhcpServer::is_running);
            out.push(NetworkStatus {
                name: o.network,
                bridge: l.name.clone(),
                ports,
                dhcp_running,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn attach_port(&self, network: &str, port: &PortConfig) -> Result<TapHandle> {
        let opts = TapOptions {
            persistent: self.opts.persistent_taps,
            vnet_hdr: self.opts.vnet_hdr,
            mtu: None,
        };
        self.attach_port_with(network, port, opts).await
    }

    #[tracing::instrument(name = "detach_port", skip(self))]
    async fn detach_port(&self, network: &str, port: &str) -> Result<()> {
        let mut st = self.state.lock().await;
        let remembered = st.ports.get(port).is_some_and(|p| p.network == network);
        if remembered {
            st.ports.remove(port);
        }
        match self.port_link(network, port).await? {
            Some(link) => self.nl.delete(&link).await?,
            None if remembered => {}
            None => return Err(Error::not_found("port", port)),
        }
        tracing::info!("port detached");
        Ok(())
    }
}
