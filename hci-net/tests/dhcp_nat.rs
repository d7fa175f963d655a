//! The built-in DHCP server with a real client (busybox udhcpc), and the
//! management network's masquerade NAT.

mod common;

use std::time::Duration;

use common::{Netns, Node, Vm, udhcpc, unique};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind};

fn dhcp_net(name: &str, kind: NetworkKind, net: &str, mtu: Option<u16>) -> NetworkConfig {
    let ip = |last: u8| format!("{net}.{last}").parse().expect("ip");
    NetworkConfig {
        name: name.into(),
        kind,
        cidr: Some(format!("{net}.0/24").parse().expect("cidr")),
        gateway: Some(ip(1)),
        dhcp: Some(DhcpConfig {
            range_start: ip(100),
            range_end: ip(150),
            lease_time: Duration::from_secs(600),
            dns: vec![ip(53)],
            reservations: vec![([0x02, 0x68, 0x63, 0, 0x10, 0x02], ip(42))],
        }),
        mtu,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udhcpc_gets_a_stable_lease_with_router_dns_and_mtu() {
    let state = tempfile::tempdir().expect("tempdir");
    let node = Node::with_state("dhcp", Some(state.path().to_path_buf())).await;
    let cfg = dhcp_net(
        "lab",
        NetworkKind::Bridge { uplink: None },
        "10.60.0",
        Some(1400),
    );
    // Names first, so that no client is answered without them.
    node.set_dhcp_names(
        "lab",
        hci_net::dhcp::DhcpNames {
            domain: Some("lab.example".into()),
            hostnames: vec![([0x02, 0x68, 0x63, 0, 0x10, 0x02], "db-1".into())],
        },
    )
    .await
    .expect("names");
    let st = node.ensure_network(&cfg).await.expect("ensure");
    assert!(st.dhcp_running);
    // Not a management network: the server answers from the highest free address.
    assert!(
        node.ns
            .ip(&["addr", "show", "dev", &st.bridge])
            .contains("10.60.0.254/24")
    );

    let vm = Vm::attach(&node.ns, &st.bridge, Some("02:68:63:00:10:01"), 1400);
    let lease = udhcpc(&vm.ns).expect("udhcpc got no lease");
    let last: u8 = lease
        .ip
        .rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("ip");
    assert!(
        lease.ip.starts_with("10.60.0.") && (100..=150).contains(&last),
        "{lease:?}"
    );
    assert_eq!(
        (
            lease.subnet.as_str(),
            lease.router.as_str(),
            lease.dns.as_str(),
            lease.mtu.as_str(),
            lease.serverid.as_str()
        ),
        (
            "255.255.255.0",
            "10.60.0.1",
            "10.60.0.53",
            "1400",
            "10.60.0.254"
        ),
    );
    assert_eq!(
        (lease.domain.as_str(), lease.hostname.as_str()),
        ("lab.example", ""),
        "the domain for everyone, no host name for an unknown MAC"
    );
    // A new client run (new xid, no memory) gets the same address.
    assert_eq!(udhcpc(&vm.ns).expect("second lease").ip, lease.ip);

    // A reservation wins over the pool.
    let reserved = Vm::attach(&node.ns, &st.bridge, Some("02:68:63:00:10:02"), 1400);
    let r = udhcpc(&reserved.ns).expect("reserved lease");
    assert_eq!(
        (r.ip.as_str(), r.hostname.as_str(), r.domain.as_str()),
        ("10.60.0.42", "db-1", "lab.example")
    );
    let leases = node.leases("lab").await.expect("leases");
    assert_eq!(leases.iter().filter(|l| l.bound).count(), 2, "{leases:?}");

    // Server restart: stop it, start a new backend on the same state: leases are back.
    let mut no_dhcp = cfg.clone();
    no_dhcp.dhcp = None;
    assert!(
        !node
            .ensure_network(&no_dhcp)
            .await
            .expect("stop dhcp")
            .dhcp_running
    );
    assert!(udhcpc(&vm.ns).is_none(), "no server, no lease");
    let backend2 = hci_net::LinuxBridgeBackend::new(hci_net::BackendOptions {
        netns: node.ns.netns(),
        state_dir: Some(state.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .expect("backend 2");
    assert!(
        backend2
            .ensure_network(&cfg)
            .await
            .expect("restart")
            .dhcp_running
    );
    let restored = backend2.leases("lab").await.expect("leases");
    assert!(
        restored
            .iter()
            .any(|l| l.ip.to_string() == lease.ip && l.bound),
        "{restored:?}"
    );
    assert_eq!(udhcpc(&vm.ns).expect("lease after restart").ip, lease.ip);
    backend2.remove_network("lab").await.expect("remove");
    assert!(
        !state.path().join("dhcp-lab.json").exists(),
        "the lease file goes with the network"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_vm_reaches_the_outside_through_masquerade() {
    let node = Node::new("nat").await;
    let inet = Netns::new("inet");
    let up = unique("up");
    common::run(&[
        "ip",
        "link",
        "add",
        &up,
        "netns",
        &node.ns.name,
        "type",
        "veth",
        "peer",
        "name",
        &up,
        "netns",
        &inet.name,
    ]);
    node.ns.ip(&["addr", "add", "198.51.100.1/24", "dev", &up]);
    node.ns.ip(&["link", "set", &up, "up"]);
    inet.ip(&["addr", "add", "198.51.100.2/24", "dev", &up]);
    inet.ip(&["link", "set", &up, "up"]);

    let cfg = dhcp_net(
        "mgmt",
        NetworkKind::Management {
            uplink: Some(up.clone()),
        },
        "10.70.0",
        None,
    );
    let st = node.ensure_network(&cfg).await.expect("ensure");
    node.ensure_network(&cfg).await.expect("idempotent");
    let rules = node.ns.exec(&["nft", "list", "table", "inet", "hci"]);
    assert_eq!(rules.matches("masquerade").count(), 1, "{rules}");
    assert_eq!(
        node.ns
            .exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );

    // The VM configures itself from DHCP (gateway = the bridge) and pings "the internet",
    // which has no route back to 10.70.0.0/24: only masquerade makes the reply come back.
    let vm = Vm::attach(&node.ns, &st.bridge, None, 1500);
    let lease = udhcpc(&vm.ns).expect("lease");
    assert_eq!(
        (lease.router.as_str(), lease.serverid.as_str()),
        ("10.70.0.1", "10.70.0.1")
    );
    vm.ns
        .ip(&["addr", "add", &format!("{}/24", lease.ip), "dev", "eth0"]);
    vm.ns.ip(&["route", "add", "default", "via", &lease.router]);
    assert!(
        vm.can_ping("198.51.100.2", Duration::from_secs(10)),
        "no NAT'd connectivity to the outside"
    );

    node.remove_network("mgmt").await.expect("remove");
    let rules = node.ns.exec(&["nft", "list", "table", "inet", "hci"]);
    assert!(!rules.contains("nat-mgmt"), "{rules}");
    assert!(node.ns.hci_links().is_empty());
}
