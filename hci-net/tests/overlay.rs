//! VXLAN overlays between two "nodes" (namespaces) joined by a veth underlay.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Netns, Node, Vm, unique};
use hci_core::net::{NetworkBackend, NetworkConfig, NetworkKind};

/// Two nodes whose underlay addresses are `10.99.0.1` and `10.99.0.2`.
async fn two_nodes() -> (Node, Node) {
    let a = Node::new("ova").await;
    let b = Node::new("ovb").await;
    let ul = unique("ul");
    common::run(&[
        "ip", "link", "add", &ul, "netns", &a.ns.name, "type", "veth", "peer", "name", &ul,
        "netns", &b.ns.name,
    ]);
    for (n, ip) in [(&a, "10.99.0.1/24"), (&b, "10.99.0.2/24")] {
        n.ns.ip(&["addr", "add", ip, "dev", &ul]);
        n.ns.ip(&["link", "set", &ul, "up"]);
    }
    (a, b)
}

fn overlay(name: &str, vni: u32, local: &str, peers: &[&str]) -> NetworkConfig {
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    NetworkConfig {
        name: name.into(),
        kind: NetworkKind::Overlay {
            vni,
            local: ip(local),
            peers: peers.iter().map(|p| ip(p)).collect(),
            port: 4789,
            underlay: None,
        },
        cidr: None,
        gateway: None,
        dhcp: None,
        mtu: None,
    }
}

fn vxlan_of(ns: &Netns) -> Vec<String> {
    ns.hci_links()
        .into_iter()
        .filter(|l| l.starts_with("hci-vx-"))
        .collect()
}

#[tokio::test]
async fn vms_on_two_nodes_talk_over_the_overlay_and_peers_are_reconciled() {
    let (a, b) = two_nodes().await;
    let net_a = overlay("tenant", 4242, "10.99.0.1", &["10.99.0.2"]);
    let net_b = overlay("tenant", 4242, "10.99.0.2", &["10.99.0.1"]);
    let st_a = a.ensure_network(&net_a).await.expect("ensure on a");
    let st_b = b.ensure_network(&net_b).await.expect("ensure on b");

    // MTU accounting: 1500 on the underlay minus 50 bytes of VXLAN over IPv4.
    let d = a.ns.ip(&["-d", "link", "show", &st_a.bridge]);
    assert!(d.contains("mtu 1450"), "{d}");
    let vx = vxlan_of(&a.ns);
    assert_eq!(vx.len(), 1);
    let d = a.ns.ip(&["-d", "link", "show", &vx[0]]);
    assert!(
        d.contains("vxlan id 4242") && d.contains("nolearning") && d.contains("dstport 4789"),
        "{d}"
    );
    assert!(d.contains(&format!("master {}", st_a.bridge)), "{d}");
    let fdb = a.ns.exec(&["bridge", "fdb", "show", "dev", &vx[0]]);
    assert!(fdb.contains("00:00:00:00:00:00 dst 10.99.0.2"), "{fdb}");

    let vm_a = Vm::attach(&a.ns, &st_a.bridge, None, 1450).with_address("192.168.77.1/24");
    let _vm_b = Vm::attach(&b.ns, &st_b.bridge, None, 1450).with_address("192.168.77.2/24");
    assert!(
        vm_a.can_ping("192.168.77.2", Duration::from_secs(10)),
        "VM a cannot reach VM b over the overlay"
    );
    // Full-size frames fit: 1422 bytes of ICMP payload + 28 = 1450, with DF set.
    assert!(
        vm_a.ns.try_exec(&[
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1422",
            "192.168.77.2"
        ]),
        "MTU-sized ping failed"
    );

    // Node b leaves a's peer list: a's flood entry goes, traffic stops.
    a.ensure_network(&overlay("tenant", 4242, "10.99.0.1", &[]))
        .await
        .expect("no peers");
    let fdb = a.ns.exec(&["bridge", "fdb", "show", "dev", &vx[0]]);
    assert!(!fdb.contains("dst 10.99.0.2"), "{fdb}");
    vm_a.ns.exec(&["ip", "neigh", "flush", "all"]);
    assert!(
        !vm_a
            .ns
            .try_exec(&["ping", "-c", "2", "-W", "1", "192.168.77.2"]),
        "traffic still flows without the peer"
    );
    // ... and comes back with it (ensure is idempotent: one entry, not two).
    a.ensure_network(&net_a).await.expect("peer back");
    a.ensure_network(&net_a).await.expect("peer back, again");
    let fdb = a.ns.exec(&["bridge", "fdb", "show", "dev", &vx[0]]);
    assert_eq!(fdb.matches("dst 10.99.0.2").count(), 1, "{fdb}");
    assert!(vm_a.can_ping("192.168.77.2", Duration::from_secs(10)));

    // Changing the VNI recreates the device; removal leaves nothing.
    a.ensure_network(&overlay("tenant", 4343, "10.99.0.1", &["10.99.0.2"]))
        .await
        .expect("new vni");
    assert!(
        a.ns.ip(&["-d", "link", "show", &vxlan_of(&a.ns)[0]])
            .contains("vxlan id 4343")
    );
    a.remove_network("tenant").await.expect("remove");
    assert!(a.ns.hci_links().is_empty(), "{:?}", a.ns.hci_links());
}

#[tokio::test]
async fn vms_on_different_overlays_are_isolated() {
    let (a, b) = two_nodes().await;
    let red_a = a
        .ensure_network(&overlay("red", 100, "10.99.0.1", &["10.99.0.2"]))
        .await
        .expect("red a");
    let red_b = b
        .ensure_network(&overlay("red", 100, "10.99.0.2", &["10.99.0.1"]))
        .await
        .expect("red b");
    let blue_b = b
        .ensure_network(&overlay("blue", 200, "10.99.0.2", &["10.99.0.1"]))
        .await
        .expect("blue b");
    a.ensure_network(&overlay("blue", 200, "10.99.0.1", &["10.99.0.2"]))
        .await
        .expect("blue a");
    // Same subnet on both overlays: only the VNI separates them.
    let vm_red_a = Vm::attach(&a.ns, &red_a.bridge, None, 1450).with_address("10.50.0.1/24");
    let _vm_red_b = Vm::attach(&b.ns, &red_b.bridge, None, 1450).with_address("10.50.0.2/24");
    let _vm_blue_b = Vm::attach(&b.ns, &blue_b.bridge, None, 1450).with_address("10.50.0.3/24");
    assert!(
        vm_red_a.can_ping("10.50.0.2", Duration::from_secs(10)),
        "same overlay must connect"
    );
    assert!(
        !vm_red_a
            .ns
            .try_exec(&["ping", "-c", "2", "-W", "1", "10.50.0.3"]),
        "different overlays must not connect"
    );
}

/// One node serves DHCP for the overlay; a VM on the other node gets its lease
/// through the VXLAN tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_reaches_vms_across_the_overlay() {
    let (a, b) = two_nodes().await;
    let mut with_dhcp = overlay("svc", 77, "10.99.0.1", &["10.99.0.2"]);
    with_dhcp.cidr = Some("10.88.0.0/24".parse().expect("cidr"));
    with_dhcp.gateway = Some("10.88.0.1".parse().expect("ip"));
    with_dhcp.dhcp = Some(hci_core::net::DhcpConfig {
        range_start: "10.88.0.10".parse().expect("ip"),
        range_end: "10.88.0.20".parse().expect("ip"),
        lease_time: Duration::from_secs(300),
        dns: vec![],
        reservations: vec![],
    });
    assert!(a.ensure_network(&with_dhcp).await.expect("a").dhcp_running);
    let st_b = b
        .ensure_network(&overlay("svc", 77, "10.99.0.2", &["10.99.0.1"]))
        .await
        .expect("b");
    let vm = Vm::attach(&b.ns, &st_b.bridge, None, 1450);
    let lease = common::udhcpc(&vm.ns).expect("no lease across the overlay");
    assert!(lease.ip.starts_with("10.88.0."), "{lease:?}");
    assert_eq!(
        (lease.mtu.as_str(), lease.router.as_str()),
        ("1450", "10.88.0.1")
    );
}
