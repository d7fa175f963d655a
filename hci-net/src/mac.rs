//! MAC addresses: formatting, parsing and stable generation.
//!
//! Generated guest MACs share the locally administered prefix
//! [`GUEST_PREFIX`] (`02:68:63`, "hc"), followed by 24 bits of a hash of a
//! seed (e.g. `vm/nic`), so the same VM NIC always gets the same MAC — and the
//! same DHCP lease.

use crate::names::fnv1a;

/// Prefix of generated guest MACs (locally administered, unicast).
pub const GUEST_PREFIX: [u8; 3] = [0x02, 0x68, 0x63];

/// Prefix of the MACs given to bridges (locally administered, unicast).
pub(crate) const BRIDGE_PREFIX: [u8; 3] = [0x02, 0x68, 0x62];

/// A stable guest MAC derived from `seed`.
///
/// ```
/// let a = hci_net::mac::generate("vm1/nic0");
/// assert_eq!(a, hci_net::mac::generate("vm1/nic0"));
/// assert_eq!(&a[..3], &hci_net::mac::GUEST_PREFIX);
/// ```
pub fn generate(seed: &str) -> [u8; 6] {
    with_prefix(GUEST_PREFIX, seed)
}

pub(crate) fn with_prefix(prefix: [u8; 3], seed: &str) -> [u8; 6] {
    let h = fnv1a(seed.as_bytes()).to_be_bytes();
    [prefix[0], prefix[1], prefix[2], h[5], h[6], h[7]]
}

/// The stable MAC of network `network`'s bridge on node `node` (on every
/// node the same when `node` is `None`).
pub(crate) fn bridge(node: Option<&str>, network: &str) -> [u8; 6] {
    match node {
        Some(node) => with_prefix(BRIDGE_PREFIX, &format!("{node}/{network}")),
        None => with_prefix(BRIDGE_PREFIX, network),
    }
}

/// The host-side MAC of a TAP carrying guest `mac`: first octet `0xfe`, so the
/// bridge never adopts it as its own address and it never equals the guest's.
pub(crate) fn host_side(mac: [u8; 6]) -> [u8; 6] {
    [0xfe, mac[1], mac[2], mac[3], mac[4], mac[5]]
}

/// Formats as `aa:bb:cc:dd:ee:ff`.
///
/// ```
/// assert_eq!(hci_net::mac::format([2, 0x68, 0x63, 0, 0xa, 0xff]), "02:68:63:00:0a:ff");
/// ```
pub fn format(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or `-` separated); `None` if malformed.
///
/// ```
/// assert_eq!(hci_net::mac::parse("02:68:63:00:0A:ff"), Some([2, 0x68, 0x63, 0, 0xa, 0xff]));
/// assert_eq!(hci_net::mac::parse("02:68:63"), None);
/// ```
pub fn parse(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// True for a unicast MAC that is not all zeros (what a guest NIC may use).
pub fn is_valid_unicast(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_of_one_network_on_two_nodes_differ() {
        let (a, b) = (bridge(Some("n1"), "net"), bridge(Some("n2"), "net"));
        assert_ne!(a, b);
        assert_eq!(a, bridge(Some("n1"), "net"));
        assert_eq!(&a[..3], &BRIDGE_PREFIX);
        assert_eq!(bridge(None, "net"), with_prefix(BRIDGE_PREFIX, "net"));
    }

    #[test]
    fn generated_macs_are_local_unicast() {
        for seed in ["a", "b", "vm/nic0", ""] {
            let m = generate(seed);
            assert!(is_valid_unicast(m));
            assert_eq!(m[0] & 0b10, 0b10, "locally administered");
        }
        assert_ne!(generate("a"), generate("b"));
        assert_eq!(host_side(generate("a"))[0], 0xfe);
        assert!(!is_valid_unicast([1, 0, 0, 0, 0, 0]));
        assert_eq!(parse(&format(generate("x"))), Some(generate("x")));
        assert_eq!(parse("zz:00:00:00:00:00"), None);
        assert_eq!(parse("00:00:00:00:00:00:00"), None);
    }
}
