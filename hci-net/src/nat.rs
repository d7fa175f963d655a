//! Masquerade NAT for management networks, through nftables.
//!
//! One table `inet hci` per node (namespace), one base chain per network
//! (`nat-<network>`, hooked at postrouting/srcnat), replaced atomically: each
//! change is one `nft -f -` transaction that (re)declares the table and chain,
//! flushes the chain and adds its rule, so applying it twice is a no-op and a
//! crash never leaves half a rule set. Names that reach the script are
//! validated beforehand (DNS-1123 network names, plain interface names), so
//! nothing from a request can inject nft syntax.

use std::io::Write;
use std::process::{Command, Stdio};

use hci_core::{Error, Result};
use ipnet::IpNet;

use crate::netns::NetNs;

/// Name of the nftables table the backend owns.
pub(crate) const TABLE: &str = "hci";

fn chain(network: &str) -> String {
    format!("nat-{network}")
}

/// The nft script installing the masquerade rule of a management network.
pub(crate) fn masquerade_script(
    network: &str,
    cidr: IpNet,
    bridge: &str,
    uplink: Option<&str>,
) -> String {
    let chain = chain(network);
    let fam = if cidr.addr().is_ipv4() { "ip" } else { "ip6" };
    let out = match uplink {
        Some(u) => format!("oifname \"{u}\""),
        None => format!("oifname != \"{bridge}\""),
    };
    let cidr = cidr.trunc();
    format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {TABLE} {chain}\n\
         add rule inet {TABLE} {chain} {fam} saddr {cidr} {fam} daddr != {cidr} {out} masquerade\n"
    )
}

/// The nft script removing a network's chain (a no-op if it does not exist).
pub(crate) fn remove_script(network: &str) -> String {
    let chain = chain(network);
    format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} {chain}\n\
         flush chain inet {TABLE} {chain}\n\
         delete chain inet {TABLE} {chain}\n"
    )
}

/// The nft script removing the whole table.
pub(crate) fn remove_table_script() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Runs an nft script as one transaction inside `ns`.
pub(crate) fn apply(ns: &NetNs, script: &str) -> Result<()> {
    tracing::debug!(%script, "nft -f -");
    let output = ns
        .run(|| -> std::io::Result<std::process::Output> {
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(script.as_bytes())?;
            }
            child.wait_with_output()
        })
        .and_then(|r| r)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::unsupported(
                    "masquerade NAT",
                    "this node: the `nft` tool is missing (Debian package nftables)",
                )
            } else {
                Error::io("run nft", e)
            }
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Backend {
            backend: "nftables",
            message: format!(
                "nft failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            source: None,
        })
    }
}

/// Turns on IP forwarding for the family of `cidr` inside `ns` (never turned
/// off again: other networks or the host may rely on it).
pub(crate) fn enable_forwarding(ns: &NetNs, cidr: IpNet) -> Result<()> {
    let path = if cidr.addr().is_ipv4() {
        "/proc/sys/net/ipv4/ip_forward"
    } else {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    };
    ns.run(|| -> std::io::Result<()> {
        if std::fs::read_to_string(path)?.trim() != "1" {
            std::fs::write(path, "1")?;
        }
        Ok(())
    })
    .and_then(|r| r)
    .map_err(|e| Error::io(format!("enable forwarding ({path})"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_scoped_to_one_chain() {
        let cidr: IpNet = "10.0.3.1/24".parse().expect("cidr");
        let s = masquerade_script("mgmt", cidr, "hci-br-01234567", Some("eth0"));
        assert!(s.contains("add chain inet hci nat-mgmt { type nat hook postrouting"));
        assert!(
            s.contains("ip saddr 10.0.3.0/24 ip daddr != 10.0.3.0/24 oifname \"eth0\" masquerade")
        );
        let s = masquerade_script("mgmt", cidr, "hci-br-01234567", None);
        assert!(s.contains("oifname != \"hci-br-01234567\" masquerade"));
        let v6: IpNet = "fd00::1/64".parse().expect("cidr");
        assert!(masquerade_script("m6", v6, "br", None).contains("ip6 saddr fd00::/64"));
        assert!(remove_script("mgmt").ends_with("delete chain inet hci nat-mgmt\n"));
    }
}
