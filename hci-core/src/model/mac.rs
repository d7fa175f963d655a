//! MAC addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address, written `02:68:63:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// True for group (multicast/broadcast) addresses, which a NIC cannot use.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for locally administered addresses.
    pub fn is_local(&self) -> bool {
        self.0[0] & 2 == 2
    }

    /// True for individual (unicast) addresses other than all-zeroes: the
    /// addresses a NIC may use.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }

    /// A stable, locally administered unicast address derived from `name`
    /// (e.g. `"vm-name/nic-name"`), so a NIC keeps its MAC across restarts
    /// and nodes.
    ///
    /// ```
    /// use hci_core::model::MacAddress;
    /// let mac = MacAddress::from_name("web/eth0");
    /// assert_eq!(mac, MacAddress::from_name("web/eth0"));
    /// assert!(mac.is_local() && mac.is_unicast());
    /// assert_eq!(mac.to_string()[..6], *"02:68:");
    /// ```
    pub fn from_name(name: &str) -> Self {
        // FNV-1a, 64 bit: stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddress([0x02, 0x68, b[2], b[3], b[4], b[5]])
    }
}

/// Why a MAC address failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 02:68:63:00:00:01")]
pub struct ParseMacError(String);

impl FromStr for MacAddress {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(|| ParseMacError(s.to_string()))?;
            if p.len() != 2 {
                return Err(ParseMacError(s.to_string()));
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| ParseMacError(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.to_string()));
        }
        Ok(MacAddress(out))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_and_derive() {
        let m: MacAddress = "02:68:63:AA:bb:0c".parse().expect("parse");
        assert_eq!(m.to_string(), "02:68:63:aa:bb:0c");
        assert_eq!(
            "02-68-63-aa-bb-0c".parse::<MacAddress>().expect("dashes"),
            m
        );
        for bad in [
            "",
            "02:68:63:aa:bb",
            "02:68:63:aa:bb:0c:00",
            "2:68:63:aa:bb:0c",
            "zz:68:63:aa:bb:0c",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
        let a = MacAddress::from_name("vm/nic0");
        assert_eq!(a, MacAddress::from_name("vm/nic0"));
        assert_ne!(a, MacAddress::from_name("vm/nic1"));
        assert!(a.is_local() && !a.is_multicast() && a.is_unicast());
        // Pinned: changing the hash would change every derived MAC in a cluster.
        assert_eq!(
            MacAddress::from_name("web/eth0").to_string(),
            "02:68:c4:af:09:e4"
        );
        assert!(!MacAddress([0; 6]).is_unicast());
        assert!(
            "ff:ff:ff:ff:ff:ff"
                .parse::<MacAddress>()
                .expect("bcast")
                .is_multicast()
        );
    }
}
