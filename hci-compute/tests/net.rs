//! virtio-net end to end: the `net` test guest on a TAP, pinged from the host.
//!
//! Each test works in a fresh network namespace (the "node"), so nothing
//! touches the host's own interfaces. These tests need root (namespaces,
//! bridges, TAPs), `/dev/net/tun`, iproute2 and ping; without them they fail
//! saying what is missing — never a silent pass.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hci_compute::devices::virtio::block::Executor;
use hci_compute::hypervisor::spec_from_config;
use hci_compute::test_guests::Guest;
use hci_compute::{KvmHypervisor, Vm};
use hci_core::compute::{ExitReason, NicConfig, NicModel, VmHandle};
use hci_core::net::{NetworkBackend, NetworkConfig, NetworkKind, PortConfig};
use hci_net::{BackendOptions, LinuxBridgeBackend, NetNs};
use tokio::time::timeout;

fn require_net_host() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the virtio-net tests create network namespaces, bridges and TAPs: run them as root"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: TAP devices cannot be created"
    );
    for (tool, package) in [("ip", "iproute2"), ("ping", "iputils-ping")] {
        assert!(
            Command::new(tool).arg("-V").output().is_ok(),
            "`{tool}` is missing: install the Debian package {package}"
        );
    }
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        require_net_host();
        let name = format!("hcivm-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    fn netns(&self) -> NetNs {
        NetNs::named(&self.name).expect("open the namespace")
    }

    /// `ping -c COUNT -W 2 TARGET` inside the namespace: (success, output).
    async fn ping(&self, target: &str, count: u32) -> (bool, String) {
        let args: Vec<String> = [
            "netns",
            "exec",
            &self.name,
            "ping",
            "-c",
            &count.to_string(),
            "-W",
            "2",
            target,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("ip").args(&args).output().expect("spawn ping")
        })
        .await
        .expect("the ping task");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nic(name: &str, tap: &str, mac: [u8; 6], mtu: u16) -> NicConfig {
    NicConfig {
        name: name.into(),
        tap: tap.into(),
        mac,
        model: NicModel::Virtio,
        mtu,
    }
}

fn console(vm: &Vm) -> String {
    String::from_utf8_lossy(&vm.console().history()).into_owned()
}

/// An hci-net bridge network `network` in `ns` with `host_addr` on the
/// bridge, and port `port` (a TAP whose queue the backend keeps) for `mac`.
async fn bridge_port(
    ns: &Netns,
    network: &str,
    host_addr: &str,
    port: &str,
    mac: [u8; 6],
) -> (LinuxBridgeBackend, hci_core::net::TapHandle) {
    let backend = LinuxBridgeBackend::new(BackendOptions {
        netns: ns.netns(),
        ..Default::default()
    })
    .await
    .expect("network backend");
    let status = backend
        .ensure_network(&NetworkConfig {
            name: network.into(),
            kind: NetworkKind::Bridge { uplink: None },
            cidr: None,
            gateway: None,
            dhcp: None,
            mtu: None,
        })
        .await
        .expect("ensure the network");
    ns.ip(&["addr", "add", host_addr, "dev", &status.bridge]);
    let port = PortConfig {
        name: port.into(),
        mac,
        queues: 1,
    };
    let tap = backend
        .attach_port(network, &port)
        .await
        .expect("attach the VM's port");
    (backend, tap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_guest_answers_ping_on_an_hci_net_bridge() {
    require_kvm();
    let ns = Netns::new("ping");
    let mac = [0x02, 0x68, 0x63, 0x00, 0x00, 0x42];
    let (backend, tap) = bridge_port(&ns, "vmnet", "10.99.0.1/24", "pingvm-nic0", mac).await;

    // The backend keeps the TAP's only queue attached: hand its descriptor over.
    let hv = KvmHypervisor::new();
    hv.register_tap(&tap);
    let mut cfg = config("pingvm", guest(Guest::Net), 1, "ip=10.99.0.2");
    cfg.nics.push(nic("nic0", &tap.ifname, mac, tap.mtu));
    let vm = hv.create_vm(cfg).await.expect("create the VM");
    vm.start().await.unwrap();
    wait_console(&vm, "net up mac 02:68:63:00:00:42 ip 10.99.0.2\n");

    let (ok, out) = ns.ping("10.99.0.2", 3).await;
    assert!(ok, "ping failed:\n{out}\nconsole:\n{}", console(vm.vm()));
    assert!(out.contains("3 received"), "{out}");
    // The guest prints after its reply went out: give it a moment.
    wait_console(&vm, "icmp reply 3\n");
    assert!(console(vm.vm()).contains("arp reply 1\n"));

    // The VMM counted the frames, and so did the host side of the TAP.
    let counters = &vm.vm().nic_counters()[0].1;
    let (rx, tx) = (
        counters.rx_packets.load(Ordering::Relaxed),
        counters.tx_packets.load(Ordering::Relaxed),
    );
    assert!(rx >= 4 && tx >= 4, "rx {rx} tx {tx} packets");
    let stats = vm.stats().await.unwrap();
    let (name, received, sent) = &stats.nics[0];
    assert_eq!(name, "nic0");
    // Three 98-byte echo replies and a 60-byte ARP reply at least.
    assert!(*sent >= 3 * 98 + 60, "sent {sent}");
    assert!(*received >= 3 * 98 + 42, "received {received}");
    let port_stats = backend
        .port_stats("vmnet", "pingvm-nic0")
        .await
        .expect("port stats");
    assert!(
        port_stats.rx_packets >= 4 && port_stats.tx_packets >= 4,
        "{port_stats:?}"
    );
    assert_eq!(
        counters.rx_dropped.load(Ordering::Relaxed) + counters.tx_errors.load(Ordering::Relaxed),
        0
    );

    vm.kill().await.unwrap();
    assert_eq!(
        timeout(Duration::from_secs(10), vm.wait())
            .await
            .unwrap()
            .unwrap(),
        ExitReason::Killed
    );
    backend.remove_network("vmnet").await.expect("remove");
}

/// A VM in its own `hci-vmm` process gets the TAP queue hci-net keeps
/// through an inherited descriptor, and answers pings through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_process_inherits_its_tap_queue_and_answers_ping() {
    require_kvm();
    let ns = Netns::new("procnet");
    let mac = [0x02, 0x68, 0x63, 0x00, 0x00, 0x43];
    let (backend, tap) = bridge_port(&ns, "procnet", "10.99.3.1/24", "procvm-nic0", mac).await;
    let hv = hci_compute::ProcessHypervisor::with_vmm(env!("CARGO_BIN_EXE_hci-vmm"));
    hv.register_tap(&tap);
    let mut cfg = config(
        &format!("procvm-{}", std::process::id()),
        guest(Guest::Net),
        1,
        "ip=10.99.3.2 replies=2",
    );
    cfg.nics.push(nic("nic0", &tap.ifname, mac, tap.mtu));
    let run_dir = cfg.run_dir.clone();
    let vm = hci_core::compute::Hypervisor::create(&hv, cfg)
        .await
        .expect("create the VM process");
    vm.start().await.expect("start");
    let (ok, out) = ns.ping("10.99.3.2", 2).await;
    let log = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    assert!(
        ok,
        "ping failed:\n{out}\nconsole:\n{log}\nvmm log:\n{}",
        std::fs::read_to_string(run_dir.join("vmm.log")).unwrap_or_default()
    );
    // After two replies the guest resets: the VM process ends by itself.
    let reason = timeout(Duration::from_secs(20), vm.wait())
        .await
        .expect("the guest stops after its replies")
        .expect("wait");
    assert_eq!(reason, ExitReason::Reset);
    let log = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    assert!(log.contains("icmp reply 2\n"), "{log}");
    backend.remove_network("procnet").await.expect("remove");
}

/// Creates a persistent TAP `name` in `ns` with `addr` on its host side, up.
fn host_tap(ns: &Netns, name: &str, addr: &str) {
    ns.ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]);
    ns.ip(&["addr", "add", addr, "dev", name]);
    ns.ip(&["link", "set", name, "up"]);
}

/// Builds a VM from `cfg` on a thread inside `ns`, so NICs attach to TAPs by name there.
fn vm_in(ns: &Netns, cfg: hci_core::compute::VmConfig) -> Vm {
    require_kvm();
    let spec = spec_from_config(cfg).expect("valid config");
    ns.netns()
        .run(|| Vm::new(spec, Executor::Private))
        .expect("enter the namespace")
        .expect("create the VM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_are_attached_by_name_and_the_guest_stops_after_its_replies() {
    let ns = Netns::new("byname");
    host_tap(&ns, "vmtap0", "10.99.1.1/24");
    let mac = [0x02, 0, 0, 0, 0x10, 0x01];
    let mut cfg = config("byname", guest(Guest::Net), 1, "ip=10.99.1.2 replies=2");
    cfg.nics.push(nic("eth0", "vmtap0", mac, 1500));
    let vm = vm_in(&ns, cfg);
    vm.start().unwrap();
    let hub = vm.console().clone();
    assert!(
        hub.wait_for(b"net up mac 02:00:00:00:10:01", Duration::from_secs(20)),
        "{}",
        console(&vm)
    );
    let (ok, out) = ns.ping("10.99.1.2", 2).await;
    assert!(ok, "ping failed:\n{out}\nconsole:\n{}", console(&vm));
    let vm2 = vm.clone();
    let reason = tokio::task::spawn_blocking(move || vm2.wait_timeout(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(reason, Some(ExitReason::Reset), "{}", console(&vm));
    assert!(
        console(&vm).ends_with("icmp reply 2\nnet done\n"),
        "{}",
        console(&vm)
    );

    // A TAP that does not exist is an error naming it, not a fresh unconnected device.
    let mut cfg = config("notap", guest(Guest::Net), 1, "ip=10.99.1.3");
    cfg.nics.push(nic("eth0", "nosuchtap", mac, 1500));
    let spec = spec_from_config(cfg).unwrap();
    let err = ns
        .netns()
        .run(|| Vm::new(spec, Executor::Private))
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuchtap"), "{err}");
    assert!(!ns.ip(&["link", "show"]).contains("nosuchtap"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_deleted_under_a_running_vm_is_survived() {
    let ns = Netns::new("deltap");
    host_tap(&ns, "vmtap2", "10.99.3.1/24");
    let mut cfg = config("deltap", guest(Guest::Net), 1, "ip=10.99.3.2");
    cfg.nics
        .push(nic("eth0", "vmtap2", [2, 0, 0, 0, 0x30, 1], 1500));
    let vm = vm_in(&ns, cfg);
    vm.start().unwrap();
    assert!(
        vm.console().wait_for(b"net up", Duration::from_secs(20)),
        "{}",
        console(&vm)
    );
    let (ok, out) = ns.ping("10.99.3.2", 1).await;
    assert!(ok, "{out}");
    ns.ip(&["link", "del", "vmtap2"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The worker noticed once and stopped watching the dead TAP (no busy loop).
    let c = &vm.nic_counters()[0].1;
    assert_eq!(c.rx_errors.load(Ordering::Relaxed), 1);
    assert!(vm.state() == hci_core::compute::VmState::Running);
    vm.kill();
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(10)),
        Some(ExitReason::Killed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_driver_cannot_crash_the_net_device() {
    let ns = Netns::new("chaos");
    host_tap(&ns, "vmtap1", "10.99.2.1/24");
    // Traffic towards the guest while it misbehaves (no ARP needed): the device must keep going.
    ns.ip(&[
        "neigh",
        "add",
        "10.99.2.2",
        "lladdr",
        "02:00:00:00:20:01",
        "dev",
        "vmtap1",
    ]);
    let flood = {
        let name = ns.name.clone();
        std::thread::spawn(move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &name,
                    "ping",
                    "-c",
                    "200",
                    "-i",
                    "0.01",
                    "-W",
                    "1",
                    "10.99.2.2",
                ])
                .output()
        })
    };
    for seed in [4, 5] {
        let mut cfg = config(
            &format!("netchaos-{seed}"),
            guest(Guest::Chaos),
            1,
            &format!("seed={seed} iters=20000 device=1"),
        );
        cfg.nics
            .push(nic("eth0", "vmtap1", [2, 0, 0, 0, 0x20, 1], 1500));
        let vm = vm_in(&ns, cfg);
        vm.start().unwrap();
        let vm2 = vm.clone();
        let reason = tokio::task::spawn_blocking(move || vm2.wait_timeout(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            reason,
            Some(ExitReason::Reset),
            "seed {seed}: {}",
            console(&vm)
        );
        assert!(
            console(&vm).ends_with("chaos survived\n"),
            "seed {seed}: {}",
            console(&vm)
        );
        let c = &vm.nic_counters()[0].1;
        eprintln!(
            "seed {seed}: rx {} dropped {} errors {}, tx {} errors {}",
            c.rx_packets.load(Ordering::Relaxed),
            c.rx_dropped.load(Ordering::Relaxed),
            c.rx_errors.load(Ordering::Relaxed),
            c.tx_packets.load(Ordering::Relaxed),
            c.tx_errors.load(Ordering::Relaxed),
        );
    }
    let _ = flood.join();
}
