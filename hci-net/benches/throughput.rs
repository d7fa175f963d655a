//! Side-by-side figures for hci-net (needs root, iperf3, busybox):
//!
//! - TCP throughput (iperf3, 3 s) between two namespaces over a direct veth
//!   pair (the ceiling), through an hci bridge network, and through an hci
//!   VXLAN overlay between two "nodes"; ratios against the veth pair;
//! - DHCP: leases per second of the server logic alone, and of a burst of
//!   real `udhcpc` clients against the running server.
//!
//! Run: `cargo bench -p hci-net --bench throughput`.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Node, Vm, unique};
use hci_core::net::{DhcpConfig, NetworkBackend, NetworkConfig, NetworkKind};

const SECONDS: &str = "3";

/// iperf3 from `client` to `server_ip` served in `server`; Gbit/s received.
///
/// The server runs until the measurement is done and the client retries
/// while the server is not listening yet (on a loaded machine it may take
/// more than a moment to start), so a slow start is not a failed run.
fn iperf(server: &Netns, client: &Netns, server_ip: &str) -> f64 {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &server.name, "iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    let mut full = vec!["ip", "netns", "exec", &client.name];
    full.extend_from_slice(&["iperf3", "-c", server_ip, "-t", SECONDS, "-J"]);
    let mut last = serde_json::Value::Null;
    let mut gbits = None;
    for attempt in 0..20 {
        std::thread::sleep(Duration::from_millis(if attempt == 0 { 200 } else { 500 }));
        let out = Command::new(full[0])
            .args(&full[1..])
            .output()
            .expect("iperf3 -c");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            gbits = Some(bps / 1e9);
            break;
        }
        last = v;
    }
    let _ = srv.kill();
    let _ = srv.wait();
    gbits.unwrap_or_else(|| panic!("iperf3 to {server_ip} failed 20 times: {}", last["error"]))
}

/// Client and server namespaces of one measured path, and what keeps it alive.
struct PathUnderTest {
    label: &'static str,
    client: Netns,
    server: Netns,
    server_ip: &'static str,
    _keep: Vec<Node>,
}

fn direct_veth() -> PathUnderTest {
    let (x, y) = (Netns::new("bx"), Netns::new("by"));
    let v = unique("bv");
    common::run(&[
        "ip", "link", "add", &v, "netns", &x.name, "type", "veth", "peer", "name", &v, "netns",
        &y.name,
    ]);
    for (ns, ip) in [(&x, "10.201.0.1/24"), (&y, "10.201.0.2/24")] {
        ns.ip(&["addr", "add", ip, "dev", &v]);
        ns.ip(&["link", "set", &v, "up"]);
    }
    PathUnderTest {
        label: "direct veth pair (ceiling)",
        client: x,
        server: y,
        server_ip: "10.201.0.2",
        _keep: vec![],
    }
}

fn net(name: &str, kind: NetworkKind) -> NetworkConfig {
    NetworkConfig {
        name: name.into(),
        kind,
        cidr: None,
        gateway: None,
        dhcp: None,
        mtu: None,
    }
}

async fn bridge() -> PathUnderTest {
    let node = Node::new("bbr").await;
    let st = node
        .ensure_network(&net("bench", NetworkKind::Bridge { uplink: None }))
        .await
        .unwrap();
    let a = Vm::attach(&node.ns, &st.bridge, None, 1500).with_address("10.202.0.1/24");
    let b = Vm::attach(&node.ns, &st.bridge, None, 1500).with_address("10.202.0.2/24");
    PathUnderTest {
        label: "hci bridge network, veth ports",
        client: a.ns,
        server: b.ns,
        server_ip: "10.202.0.2",
        _keep: vec![node],
    }
}

async fn overlay() -> PathUnderTest {
    let (na, nb) = (Node::new("boa").await, Node::new("bob").await);
    let ul = unique("ul");
    common::run(&[
        "ip",
        "link",
        "add",
        &ul,
        "netns",
        &na.ns.name,
        "type",
        "veth",
        "peer",
        "name",
        &ul,
        "netns",
        &nb.ns.name,
    ]);
    for (n, ip) in [(&na, "10.99.0.1/24"), (&nb, "10.99.0.2/24")] {
        n.ns.ip(&["addr", "add", ip, "dev", &ul]);
        n.ns.ip(&["link", "set", &ul, "up"]);
    }
    let ov = |local: &str, peer: &str| {
        net(
            "bench",
            NetworkKind::Overlay {
                vni: 900,
                local: local.parse().unwrap(),
                peers: vec![peer.parse().unwrap()],
                port: 4789,
                underlay: None,
            },
        )
    };
    let sa = na
        .ensure_network(&ov("10.99.0.1", "10.99.0.2"))
        .await
        .unwrap();
    let sb = nb
        .ensure_network(&ov("10.99.0.2", "10.99.0.1"))
        .await
        .unwrap();
    let a = Vm::attach(&na.ns, &sa.bridge, None, 1450).with_address("10.203.0.1/24");
    let b = Vm::attach(&nb.ns, &sb.bridge, None, 1450).with_address("10.203.0.2/24");
    assert!(a.can_ping("10.203.0.2", Duration::from_secs(5)));
    PathUnderTest {
        label: "hci VXLAN overlay, 2 nodes",
        client: a.ns,
        server: b.ns,
        server_ip: "10.203.0.2",
        _keep: vec![na, nb],
    }
}

fn dhcp_config(start: &str, end: &str) -> DhcpConfig {
    DhcpConfig {
        range_start: start.parse().unwrap(),
        range_end: end.parse().unwrap(),
        lease_time: Duration::from_secs(3600),
        dns: vec![],
        reservations: vec![],
    }
}

/// DISCOVER + REQUEST per client through the server logic only, with the
/// lease file written (and synced) after each lease when `lease_file`.
fn dhcp_logic(clients: u32, lease_file: Option<std::path::PathBuf>) -> f64 {
    use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode};
    use dhcproto::{Decodable, Decoder, Encodable, Encoder};
    let cfg = dhcp_config("10.204.0.10", "10.204.255.200");
    let settings = hci_net::dhcp::DhcpSettings::from_config(
        &cfg,
        "10.204.0.0/16".parse().unwrap(),
        Ipv4Addr::new(10, 204, 0, 1),
        None,
        None,
    )
    .unwrap();
    let mut db = hci_net::dhcp::LeaseDb::open(settings, lease_file).unwrap();
    let packet = |kind, mac: [u8; 6], ip: Option<Ipv4Addr>| {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootRequest)
            .set_htype(HType::Eth)
            .set_chaddr(&mac);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(ip) = ip {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        let mut b = Vec::new();
        m.encode(&mut Encoder::new(&mut b)).unwrap();
        b
    };
    let t = Instant::now();
    for i in 0..clients {
        let b = i.to_be_bytes();
        let mac = [2, 0x68, 0x63, b[1], b[2], b[3]];
        let offer =
            hci_net::dhcp::handle_packet(&mut db, &packet(MessageType::Discover, mac, None), 1)
                .unwrap();
        let ip = Message::decode(&mut Decoder::new(&offer.packet))
            .unwrap()
            .yiaddr();
        let ack =
            hci_net::dhcp::handle_packet(&mut db, &packet(MessageType::Request, mac, Some(ip)), 1)
                .unwrap();
        assert_eq!(ack.kind, MessageType::Ack);
    }
    f64::from(clients) / t.elapsed().as_secs_f64()
}

/// A burst of real udhcpc clients, each in its own VM namespace.
async fn dhcp_burst(clients: usize) -> f64 {
    let node = Node::new("bdh").await;
    let mut cfg = net("bench", NetworkKind::Bridge { uplink: None });
    cfg.cidr = Some("10.205.0.0/24".parse().unwrap());
    cfg.dhcp = Some(dhcp_config("10.205.0.10", "10.205.0.200"));
    let st = node.ensure_network(&cfg).await.unwrap();
    let vms: Vec<Vm> = (0..clients)
        .map(|_| Vm::attach(&node.ns, &st.bridge, None, 1500))
        .collect();
    let t = Instant::now();
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(|| common::udhcpc(&vm.ns).is_some()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| matches!(r, Ok(true)))
            .count()
    });
    assert_eq!(got, clients, "every client must get a lease");
    clients as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let clients: usize = std::env::var("DHCP_CLIENTS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(16);
    let paths = [direct_veth(), bridge().await, overlay().await];
    // Interleaved rounds, so drift in the machine's load hits every path alike.
    let mut gbits = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        for (p, g) in paths.iter().zip(gbits.iter_mut()) {
            g.push(iperf(&p.server, &p.client, p.server_ip));
        }
    }
    let medians: Vec<f64> = gbits.iter().cloned().map(median).collect();
    let best: Vec<f64> = gbits
        .iter()
        .map(|g| g.iter().copied().fold(0.0, f64::max))
        .collect();
    println!(
        "TCP throughput, iperf3 -t {SECONDS}, one stream, {rounds} interleaved rounds (ratios to the direct veth pair):"
    );
    println!("| path | median Gbit/s | best Gbit/s | runs | median ratio | best ratio |");
    println!("|---|---|---|---|---|---|");
    for (i, (p, g)) in paths.iter().zip(&gbits).enumerate() {
        let runs: Vec<String> = g.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "| {} | {:.2} | {:.2} | {} | {:.2}x | {:.2}x |",
            p.label,
            medians[i],
            best[i],
            runs.join(" / "),
            medians[i] / medians[0],
            best[i] / best[0]
        );
    }
    drop(paths);
    let logic = dhcp_logic(20_000, None);
    let dir = tempfile::tempdir().unwrap();
    let persisted = dhcp_logic(1_000, Some(dir.path().join("leases.json")));
    let burst = dhcp_burst(clients).await;
    println!("DHCP:");
    println!("| what | leases/s |");
    println!("|---|---|");
    println!("| server logic alone, DISCOVER+REQUEST, 20,000 clients | {logic:.0} |");
    println!(
        "| server logic with the lease file saved and synced per lease, 1,000 clients | {persisted:.0} |"
    );
    println!(
        "| burst of {clients} real udhcpc clients at once (includes client start-up) | {burst:.1} |"
    );
}
