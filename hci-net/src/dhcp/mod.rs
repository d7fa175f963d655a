//! The built-in DHCPv4 server.
//!
//! - [`DhcpSettings`]: a network's pool and options, validated from
//!   hci-core's [`DhcpConfig`];
//! - [`LeaseDb`]: allocation (reservations, MAC-stable addresses, offers,
//!   DECLINE/RELEASE) and lease persistence;
//! - [`handle_packet`]: one request in, at most one reply out — pure, so it is
//!   tested without sockets and fuzzed with random bytes;
//! - [`DhcpServer`]: the UDP socket bound to the bridge (`SO_BINDTODEVICE`)
//!   and the task serving it.
//!
//! Replies are broadcast, except ACKs to a client that already has an address
//! (renewal, INFORM), which are unicast to it. Relayed requests (`giaddr` set)
//! and BOOTP (no message type) are ignored.

mod handler;
mod leases;
mod server;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use hci_core::net::DhcpConfig;
use hci_core::{Error, Result};
use ipnet::{IpNet, Ipv4Net};

pub use handler::{Destination, Reply, handle_packet};
pub use leases::{Lease, LeaseDb, read_lease_file};
pub use server::DhcpServer;

/// A network's DHCP pool and the options announced with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    /// Subnet of the network.
    pub subnet: Ipv4Net,
    /// The server's own address on the bridge (server identifier).
    pub server: Ipv4Addr,
    /// First address of the pool.
    pub range_start: Ipv4Addr,
    /// Last address of the pool.
    pub range_end: Ipv4Addr,
    /// Router option, if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers option.
    pub dns: Vec<Ipv4Addr>,
    /// Lease duration.
    pub lease_time: Duration,
    /// Interface MTU option (26), if any.
    pub mtu: Option<u16>,
    /// Fixed MAC → address assignments.
    pub reservations: Vec<([u8; 6], Ipv4Addr)>,
    /// Domain name option (15), if any.
    pub domain: Option<String>,
    /// Host name option (12) for clients whose name is known (reservations,
    /// VM NICs), by MAC.
    pub hostnames: Vec<([u8; 6], String)>,
}

/// Names a network's DHCP server hands out besides addresses: the domain
/// (option 15) to every client and a host name (option 12) to each known
/// MAC — the VM's name for a VM NIC, the host of a reservation.
///
/// ```
/// use hci_net::dhcp::DhcpNames;
/// let names = DhcpNames {
///     domain: Some("lab.example".into()),
///     hostnames: vec![([0x02, 0x68, 0x63, 0, 0, 1], "web-1".into())],
/// };
/// names.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpNames {
    /// DNS domain of the network (`lab.example`).
    pub domain: Option<String>,
    /// Host names by MAC: single DNS labels (`web-1`).
    pub hostnames: Vec<([u8; 6], String)>,
}

/// Is `s` a DNS label (RFC 1123: 1-63 of a-z, A-Z, 0-9, '-', alphanumeric at both ends)?
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

impl DhcpNames {
    /// Checks the domain (dot-separated DNS labels, at most 253 bytes) and the
    /// host names (one DNS label each, one name per MAC).
    pub fn validate(&self) -> Result<()> {
        if let Some(d) = &self.domain
            && (d.len() > 253 || !d.split('.').all(is_dns_label))
        {
            return Err(Error::invalid(
                "DHCP domain",
                format!("{d:?} is not a DNS name (dot-separated labels of a-z, 0-9, '-')"),
            ));
        }
        for (i, (mac, h)) in self.hostnames.iter().enumerate() {
            if !is_dns_label(h) {
                return Err(Error::invalid(
                    "DHCP host name",
                    format!(
                        "{h:?} (for {}) is not a DNS label (1-63 of a-z, 0-9, '-')",
                        crate::mac::format(*mac)
                    ),
                ));
            }
            if self.hostnames[..i].iter().any(|(m, _)| m == mac) {
                return Err(Error::invalid(
                    "DHCP host name",
                    format!("{} has two host names", crate::mac::format(*mac)),
                ));
            }
        }
        Ok(())
    }
}

fn v4(what: &str, ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(Error::invalid(
            format!("DHCP {what}"),
            format!("{ip} is not IPv4 (the server is DHCPv4)"),
        )),
    }
}

impl DhcpSettings {
    /// Validates `config` for a network with `cidr`, router `gateway` and
    /// `mtu`, with the server answering from `server`.
    pub fn from_config(
        config: &DhcpConfig,
        cidr: IpNet,
        server: Ipv4Addr,
        gateway: Option<IpAddr>,
        mtu: Option<u16>,
    ) -> Result<Self> {
        let subnet = match cidr {
            IpNet::V4(n) => n.trunc(),
            IpNet::V6(_) => {
                return Err(Error::invalid("DHCP subnet", format!("{cidr} is not IPv4")));
            }
        };
        let range_start = v4("range start", config.range_start)?;
        let range_end = v4("range end", config.range_end)?;
        if range_start > range_end {
            return Err(Error::invalid(
                "DHCP range",
                format!("{range_start} is after {range_end}"),
            ));
        }
        for ip in [range_start, range_end] {
            if !subnet.contains(&ip) || ip == subnet.network() || ip == subnet.broadcast() {
                return Err(Error::invalid(
                    "DHCP range",
                    format!("{ip} is not a host address of {subnet}"),
                ));
            }
        }
        let router = gateway.map(|g| v4("gateway", g)).transpose()?;
        let mut reservations = Vec::new();
        for (mac, ip) in &config.reservations {
            let ip = v4("reservation", *ip)?;
            if !subnet.contains(&ip) {
                return Err(Error::invalid(
                    "DHCP reservation",
                    format!("{ip} is outside {subnet}"),
                ));
            }
            if ip == subnet.network()
                || ip == subnet.broadcast()
                || ip == server
                || Some(ip) == router
            {
                return Err(Error::invalid(
                    "DHCP reservation",
                    format!(
                        "{ip} for {} is the network, broadcast, gateway or DHCP server address",
                        crate::mac::format(*mac)
                    ),
                ));
            }
            if reservations.iter().any(|(m, a)| m == mac || *a == ip) {
                return Err(Error::invalid(
                    "DHCP reservation",
                    format!("{} or {ip} is reserved twice", crate::mac::format(*mac)),
                ));
            }
            reservations.push((*mac, ip));
        }
        if config.lease_time < Duration::from_secs(60) {
            return Err(Error::invalid("DHCP lease time", "must be at least 60 s"));
        }
        Ok(Self {
            subnet,
            server,
            range_start,
            range_end,
            router,
            dns: config
                .dns
                .iter()
                .filter_map(|d| v4("dns", *d).ok())
                .collect(),
            lease_time: config.lease_time,
            mtu,
            reservations,
            domain: None,
            hostnames: Vec::new(),
        })
    }

    /// These settings announcing `names` (validated).
    pub fn with_names(mut self, names: &DhcpNames) -> Result<Self> {
        names.validate()?;
        self.domain = names.domain.clone();
        self.hostnames = names.hostnames.clone();
        Ok(self)
    }

    pub(crate) fn hostname_for(&self, mac: [u8; 6]) -> Option<&str> {
        self.hostnames
            .iter()
            .find(|(m, _)| *m == mac)
            .map(|(_, h)| h.as_str())
    }

    pub(crate) fn lease_secs(&self) -> u64 {
        self.lease_time.as_secs().min(u64::from(u32::MAX - 1))
    }

    pub(crate) fn in_range(&self, ip: Ipv4Addr) -> bool {
        ip >= self.range_start && ip <= self.range_end
    }

    pub(crate) fn reservation_for(&self, mac: [u8; 6]) -> Option<Ipv4Addr> {
        self.reservations
            .iter()
            .find(|(m, _)| *m == mac)
            .map(|(_, ip)| *ip)
    }

    pub(crate) fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.reservations.iter().any(|(_, a)| *a == ip)
    }

    /// The server, router, network and broadcast addresses are never leased.
    pub(crate) fn is_infrastructure(&self, ip: Ipv4Addr) -> bool {
        ip == self.server
            || Some(ip) == self.router
            || ip == self.subnet.network()
            || ip == self.subnet.broadcast()
    }
}

/// The address the DHCP server uses on a network that has no gateway on the
/// bridge: the highest host address of `subnet` that is neither the gateway,
/// in the pool nor reserved.
pub fn server_address(
    subnet: Ipv4Net,
    config: &DhcpConfig,
    gateway: Option<IpAddr>,
) -> Option<Ipv4Addr> {
    let (lo, hi) = (u32::from(subnet.network()), u32::from(subnet.broadcast()));
    let in_use = |ip: Ipv4Addr| {
        let ip_ = IpAddr::V4(ip);
        Some(ip_) == gateway
            || (ip_ >= config.range_start && ip_ <= config.range_end)
            || config.reservations.iter().any(|(_, a)| *a == ip_)
    };
    (lo.saturating_add(1)..hi)
        .rev()
        .map(Ipv4Addr::from)
        .find(|ip| !in_use(*ip))
}

#[cfg(test)]
mod tests;
