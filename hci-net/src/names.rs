//! Device naming and ownership marks.
//!
//! Device names are `hci-<role>-<8 hex digits>` (15 bytes, the kernel's
//! limit): the digits are a hash of the owning network's (or port's) name with
//! a salt, so a name is derived deterministically and a collision with a
//! device of someone else moves to the next salt. Each device carries an
//! interface alias such as `hci network=lab port=vm1-nic0 mac=02:…` that says
//! who owns it; names alone are never trusted.

use hci_core::{Error, Result};

/// Prefix of every device this crate creates.
pub const DEVICE_PREFIX: &str = "hci-";

/// Longest interface name the kernel accepts (IFNAMSIZ − 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Salts tried before giving up on a name (a collision needs two 32-bit hashes to meet).
pub(crate) const MAX_SALT: u32 = 4;

/// Kind of device, with its name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Bridge,
    Tap,
    Vxlan,
    /// The access end of a VLAN network's patch (a veth in the uplink's trunk bridge).
    Vlan,
    /// The other end of that patch, a port of the network's own bridge.
    VlanPeer,
    /// The VLAN-filtering bridge of an uplink, shared by its VLAN networks.
    Trunk,
}

/// Every role, in the order devices are deleted (ports before bridges).
pub(crate) const ROLES: [Role; 6] = [
    Role::Tap,
    Role::Vxlan,
    Role::Vlan,
    Role::VlanPeer,
    Role::Bridge,
    Role::Trunk,
];

impl Role {
    /// Name prefix of this role's devices.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Role::Bridge => "hci-br-",
            Role::Tap => "hci-tp-",
            Role::Vxlan => "hci-vx-",
            Role::Vlan => "hci-vl-",
            Role::VlanPeer => "hci-vp-",
            Role::Trunk => "hci-tk-",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Role::Bridge => "bridge",
            Role::Tap => "tap",
            Role::Vxlan => "vxlan",
            Role::Vlan => "vlan",
            Role::VlanPeer => "vlanpeer",
            Role::Trunk => "trunk",
        }
    }
}

/// 64-bit FNV-1a: stable across versions and platforms, unlike `DefaultHasher`.
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The device name for `role` owned by `owner` (network or port name) with `salt`.
pub(crate) fn device_name(role: Role, owner: &str, salt: u32) -> String {
    let key = if salt == 0 {
        owner.to_string()
    } else {
        format!("{owner}#{salt}")
    };
    let h = fnv1a(key.as_bytes()) as u32;
    format!("{}{h:08x}", role.prefix())
}

/// Who a device belongs to, as recorded in its alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub role: &'static str,
    /// The owning network; empty for a trunk bridge (shared by networks).
    pub network: String,
    /// The uplink NIC of a trunk bridge.
    pub uplink: Option<String>,
    pub port: Option<String>,
    pub mac: Option<[u8; 6]>,
}

/// Alias for a network-level device.
pub(crate) fn network_alias(role: Role, network: &str) -> String {
    format!("hci role={} network={network}", role.tag())
}

/// Alias for the trunk bridge of `uplink`.
pub(crate) fn trunk_alias(uplink: &str) -> String {
    format!("hci role={} uplink={uplink}", Role::Trunk.tag())
}

/// Alias for a TAP port.
pub(crate) fn port_alias(network: &str, port: &str, mac: [u8; 6]) -> String {
    format!(
        "hci role=tap network={network} port={port} mac={}",
        crate::mac::format(mac)
    )
}

/// Parses an alias written by this crate; `None` for anything else.
pub(crate) fn parse_alias(alias: &str) -> Option<Owner> {
    let mut words = alias.split(' ');
    if words.next() != Some("hci") {
        return None;
    }
    let (mut role, mut network, mut port, mut mac, mut uplink) = (None, None, None, None, None);
    for w in words {
        let (k, v) = w.split_once('=')?;
        match k {
            "role" => role = ROLES.into_iter().map(Role::tag).find(|t| *t == v),
            "network" => network = Some(v.to_string()),
            "port" => port = Some(v.to_string()),
            "mac" => mac = crate::mac::parse(v),
            "uplink" => uplink = Some(v.to_string()),
            _ => {}
        }
    }
    let role = role?;
    let network = match network {
        Some(n) => n,
        None if role == Role::Trunk.tag() && uplink.is_some() => String::new(),
        None => return None,
    };
    Some(Owner {
        role,
        network,
        uplink,
        port,
        mac,
    })
}

impl Owner {
    pub(crate) fn is(&self, role: Role, network: &str) -> bool {
        self.role == role.tag() && self.network == network
    }

    /// Is this the trunk bridge of `uplink`?
    pub(crate) fn is_trunk_of(&self, uplink: &str) -> bool {
        self.role == Role::Trunk.tag() && self.uplink.as_deref() == Some(uplink)
    }
}

/// Checks a network name: a DNS-1123 label (it ends up in aliases and nft chain names).
pub(crate) fn validate_network_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "network name",
            format!(
                "{name:?} is not a DNS-1123 label (1-63 of a-z, 0-9, '-', alphanumeric at both ends)"
            ),
        ))
    }
}

/// Checks a port name: 1-200 printable ASCII characters without spaces or '='.
pub(crate) fn validate_port_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'=');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "port name",
            format!("{name:?} must be 1-200 printable characters without spaces or '='"),
        ))
    }
}

/// Checks an interface name given by the caller (uplinks, underlays).
pub(crate) fn validate_ifname(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'"' && b != b'\\' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{name:?} is not a valid interface name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_are_stable() {
        let n = device_name(Role::Bridge, "a-very-long-network-name-indeed", 0);
        assert_eq!(n.len(), MAX_IFNAME_LEN);
        assert!(n.starts_with("hci-br-"));
        assert_eq!(
            n,
            device_name(Role::Bridge, "a-very-long-network-name-indeed", 0)
        );
        assert_ne!(
            n,
            device_name(Role::Bridge, "a-very-long-network-name-indeed", 1)
        );
        assert_eq!(device_name(Role::Tap, "x", 0).len(), MAX_IFNAME_LEN);
        // FNV-1a test vector.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn aliases_round_trip() {
        let a = port_alias("lab", "vm1-nic0", [2, 0x68, 0x63, 1, 2, 3]);
        let o = parse_alias(&a).expect("parses");
        assert_eq!(o.role, "tap");
        assert_eq!(o.network, "lab");
        assert_eq!(o.port.as_deref(), Some("vm1-nic0"));
        assert_eq!(o.mac, Some([2, 0x68, 0x63, 1, 2, 3]));
        let b = parse_alias(&network_alias(Role::Bridge, "lab")).expect("parses");
        assert!(b.is(Role::Bridge, "lab"));
        assert!(!b.is(Role::Vxlan, "lab"));
        let t = parse_alias(&trunk_alias("eth1")).expect("parses");
        assert!(t.is_trunk_of("eth1") && !t.is_trunk_of("eth2"));
        assert!(!t.is(Role::Bridge, ""));
        assert_eq!(parse_alias("hci role=bridge uplink=eth1"), None);
        assert_eq!(parse_alias("uplink to the rack switch"), None);
        assert_eq!(parse_alias("hci role=nope network=x"), None);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_network_name("mgmt-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a b", "a\"b", &"x".repeat(64)] {
            assert!(validate_network_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_port_name("vm1-nic0").is_ok());
        assert!(validate_port_name("a=b").is_err());
        assert!(validate_ifname("uplink", "eth0").is_ok());
        assert!(validate_ifname("uplink", "eth0\" masquerade").is_err());
    }
}
