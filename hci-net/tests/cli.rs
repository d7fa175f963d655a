//! The `hci-net` command line, run as a real process inside namespaces that
//! act as nodes (`ip netns exec NODE hci-net …`).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Netns, Vm, unique};

const BIN: &str = env!("CARGO_BIN_EXE_hci-net");

/// `hci-net --state-dir STATE ARGS…` in `node`.
fn cli(node: &Netns, state: &Path, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &node.name, BIN, "--state-dir"])
        .arg(state)
        .args(args)
        .output()
        .expect("spawn hci-net")
}

/// Like [`cli`], panicking with stderr unless it succeeds; returns stdout.
fn cli_ok(node: &Netns, state: &Path, args: &[&str]) -> String {
    let out = cli(node, state, args);
    assert!(
        out.status.success(),
        "hci-net {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr of a command that must fail.
fn cli_err(node: &Netns, state: &Path, args: &[&str]) -> String {
    let out = cli(node, state, args);
    assert!(!out.status.success(), "hci-net {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `hci-net up`, killed on drop if the test did not stop it.
struct Up {
    child: Option<Child>,
    stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Up {
    /// Starts `hci-net up ARGS…` in `node` and waits for its ready line.
    fn start(node: &Netns, state: &Path, args: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.name, BIN, "--state-dir"])
            .arg(state)
            .arg("up")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hci-net up");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if !line.contains("is up") {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = child.wait();
            panic!("hci-net up {args:?} did not come up: {line}{err}");
        }
        Self {
            child: Some(child),
            stdout: Some(stdout),
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// Sends `signal` and waits for the exit; returns (success, rest of stdout).
    fn stop(mut self, signal: &str) -> (bool, String) {
        common::run(&["kill", &format!("-{signal}"), &self.pid()]);
        self.wait()
    }

    /// Waits for the exit (someone else stopped it).
    fn wait(&mut self) -> (bool, String) {
        let mut child = self.child.take().expect("running");
        let mut rest = String::new();
        if let Some(mut out) = self.stdout.take() {
            let _ = out.read_to_string(&mut rest);
        }
        let status = child.wait().expect("wait for hci-net up");
        (status.success(), rest)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_network(dir: &Path, name: &str, spec: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: hci.dev/v1\nkind: Network\nmetadata: {{ name: {name} }}\nspec:\n{spec}"
        ),
    )
    .expect("write network");
    path
}

/// A "VM" namespace whose `eth0` is a veth; the host end stays unplugged in
/// `node` (for `hci-net port add`). Returns the VM and the host end's name.
fn unplugged_vm(node: &Netns, mac: &str) -> (Netns, String) {
    let vm = Netns::new("cvm");
    let port = unique("cp");
    node.ip(&[
        "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &vm.name,
    ]);
    vm.ip(&["link", "set", "eth0", "address", mac, "up"]);
    (vm, port)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn up_serves_dhcp_to_an_attached_veth_and_down_removes_everything() {
    let node = Netns::new("cn");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let net = unique("lab");
    let file = write_network(
        dir.path(),
        &net,
        "  kind: { type: bridge }\n  cidr: 10.61.0.0/24\n  gateway: 10.61.0.1\n  dhcp: { start: 10.61.0.100, end: 10.61.0.150 }\n",
    );
    let up = Up::start(
        &node,
        &state,
        &[
            "-f",
            path_str(&file),
            "--reserve",
            "02:68:63:00:61:09=10.61.0.9,web-9",
            "--domain",
            "cli.example",
        ],
    );

    let (vm, port) = unplugged_vm(&node, "02:68:63:00:61:09");
    let out = cli_ok(&node, &state, &["port", "add", &net, "--ifname", &port]);
    assert!(out.contains("attached"), "{out}");

    // A real client with a host name gets its reservation, and the reserved
    // host name and the domain from the server.
    let names = dir.path().join("names");
    let script = dir.path().join("names.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$hostname $domain\" > {}\nexit 0\n",
            names.display()
        ),
    )
    .expect("write script");
    common::run(&["chmod", "+x", path_str(&script)]);
    let ok = vm.try_exec(&[
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-f",
        "-q",
        "-n",
        "-t",
        "6",
        "-T",
        "1",
        "-x",
        "hostname:vm-cli",
        "-s",
        path_str(&script),
    ]);
    assert!(ok, "udhcpc got no lease through hci-net up");
    assert_eq!(
        std::fs::read_to_string(&names).expect("names").trim(),
        "web-9 cli.example"
    );
    let table = cli_ok(&node, &state, &["leases", &net]);
    let row = table
        .lines()
        .find(|l| l.contains("02:68:63:00:61:09"))
        .unwrap_or_else(|| panic!("no lease row for the VM:\n{table}"));
    assert!(row.contains("10.61.0.9") && row.contains("vm-cli"), "{row}");
    let json = cli_ok(&node, &state, &["leases", &net, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("leases json");
    assert_eq!(v[0]["ip"], "10.61.0.9", "{json}");

    let stats = cli_ok(&node, &state, &["stats", &net]);
    let row = stats
        .lines()
        .find(|l| l.starts_with(&port))
        .unwrap_or_else(|| panic!("no stats row for {port}:\n{stats}"));
    assert!(row.contains("interface"), "{row}");
    let json = cli_ok(&node, &state, &["stats", &net, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("stats json");
    assert!(
        v[0]["rxPackets"].as_u64().is_some_and(|n| n > 0),
        "the DHCP exchange crossed the port: {json}"
    );

    let ls = cli_ok(&node, &state, &["ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with(&net) && l.contains(&up.pid())),
        "{ls}"
    );

    // `down` stops the serving `up`, which removes the network; the veth the
    // test made stays (it is not ours) but is released.
    let mut up = up;
    let out = cli_ok(&node, &state, &["down", &net]);
    assert!(out.contains("removed"), "{out}");
    let (success, rest) = up.wait();
    assert!(success, "up exited with failure: {rest}");
    assert!(node.hci_links().is_empty(), "left: {:?}", node.hci_links());
    assert!(
        node.links().contains(&port),
        "the caller's veth must survive"
    );
    assert!(
        !node.ip(&["link", "show", &port]).contains("master"),
        "released"
    );
    assert!(!state.join(format!("dhcp-{net}.json")).exists());
    let err = cli_err(&node, &state, &["down", &net]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn up_cleans_up_on_sigterm_and_sigint_unless_keep() {
    let node = Netns::new("cs");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let net = unique("mg");
    let file = write_network(
        dir.path(),
        &net,
        "  kind: { type: management }\n  cidr: 10.62.0.0/24\n  gateway: 10.62.0.1\n  dhcp: { start: 10.62.0.10, end: 10.62.0.20 }\n",
    );
    let f = path_str(&file);

    let up = Up::start(&node, &state, &["-f", f]);
    assert!(!node.hci_links().is_empty());
    let (ok, out) = up.stop("TERM");
    assert!(ok && out.contains("removed"), "{out}");
    assert!(node.hci_links().is_empty(), "left: {:?}", node.hci_links());
    let ruleset = node.exec(&["nft", "list", "ruleset"]);
    assert!(
        !ruleset.contains("masquerade"),
        "NAT rules of the network must be gone:\n{ruleset}"
    );

    let up = Up::start(&node, &state, &["-f", f, "--keep"]);
    let (ok, out) = up.stop("INT");
    assert!(ok && out.contains("kept"), "{out}");
    let kept = node.hci_links();
    assert!(!kept.is_empty(), "--keep must leave the bridge");

    // A second `up` adopts the kept network and leaves it in place on exit.
    let up = Up::start(&node, &state, &["-f", f]);
    let (ok, out) = up.stop("TERM");
    assert!(ok && out.contains("left in place"), "{out}");
    assert_eq!(node.hci_links(), kept);

    cli_ok(&node, &state, &["down", &net]);
    assert!(node.hci_links().is_empty(), "left: {:?}", node.hci_links());
}

#[tokio::test]
async fn overlay_between_two_nodes_from_the_command_line() {
    let (a, b) = (Netns::new("coa"), Netns::new("cob"));
    let ul = unique("ul");
    common::run(&[
        "ip", "link", "add", &ul, "netns", &a.name, "type", "veth", "peer", "name", &ul, "netns",
        &b.name,
    ]);
    for (n, ip) in [(&a, "10.98.0.1/24"), (&b, "10.98.0.2/24")] {
        n.ip(&["addr", "add", ip, "dev", &ul]);
        n.ip(&["link", "set", &ul, "up"]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = unique("ov");
    let file = write_network(dir.path(), &net, "  kind: { type: overlay, vni: 6161 }\n");
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    // The local underlay address is derived from the route to the peer.
    let _up_a = Up::start(&a, &sa, &["-f", path_str(&file), "--peer", "10.98.0.2"]);
    let _up_b = Up::start(&b, &sb, &["-f", path_str(&file), "--peer", "10.98.0.1"]);
    let (vm_a, pa) = unplugged_vm(&a, "02:68:63:00:62:01");
    let (vm_b, pb) = unplugged_vm(&b, "02:68:63:00:62:02");
    cli_ok(&a, &sa, &["port", "add", &net, "--ifname", &pa]);
    cli_ok(&b, &sb, &["port", "add", &net, "--ifname", &pb]);
    // Ports take the network's MTU (1500 - 50 bytes of VXLAN).
    assert!(a.ip(&["link", "show", &pa]).contains("mtu 1450"));
    for (vm, ip) in [(&vm_a, "10.51.0.1/24"), (&vm_b, "10.51.0.2/24")] {
        vm.ip(&["link", "set", "eth0", "mtu", "1450"]);
        vm.ip(&["addr", "add", ip, "dev", "eth0"]);
    }
    let vm = Vm { ns: vm_a, port: pa };
    assert!(
        vm.can_ping("10.51.0.2", Duration::from_secs(10)),
        "VMs on two nodes must reach each other over the overlay"
    );
    drop(vm_b);
}

#[test]
fn errors_are_clear() {
    let node = Netns::new("ce");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");

    // Bad YAML: the file, the field and the line/column.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: hci.dev/v1\nkind: Network\nmetadata: { name: x }\nspec:\n  kind: { type: bridge }\n  cidrr: 10.0.0.0/8\n",
    )
    .expect("write");
    let err = cli_err(&node, &state, &["up", "-f", path_str(&bad)]);
    assert!(
        err.contains("bad.yaml") && err.contains("cidrr") && err.contains("line 6 column 3"),
        "{err}"
    );
    // Valid YAML, invalid network.
    let inval = write_network(dir.path(), "inval", "  kind: { type: management }\n");
    let err = cli_err(&node, &state, &["up", "-f", path_str(&inval)]);
    assert!(err.contains("spec.cidr"), "{err}");

    // Missing network.
    let err = cli_err(&node, &state, &["port", "add", "nope", "--ifname", "lo"]);
    assert!(err.contains("network \"nope\" not found"), "{err}");
    let err = cli_err(&node, &state, &["down", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = cli_err(&node, &state, &["leases", "nope"]);
    assert!(err.contains("no leases recorded"), "{err}");

    // VLAN networks on this kernel: the missing feature is named, nothing leaks.
    node.ip(&[
        "link", "add", "trunk0", "type", "veth", "peer", "name", "trunk1",
    ]);
    let vlan = write_network(
        dir.path(),
        "tagged",
        "  kind: { type: vlan, id: 100 }\n  uplink: trunk0\n",
    );
    if node.try_exec(&[
        "ip",
        "link",
        "add",
        "probe-br",
        "type",
        "bridge",
        "vlan_filtering",
        "1",
    ]) {
        node.ip(&["link", "del", "probe-br"]);
        eprintln!(
            "NOTE: this kernel has bridge VLAN filtering, so the unsupported-VLAN error is not exercised here"
        );
    } else {
        let err = cli_err(&node, &state, &["up", "-f", path_str(&vlan)]);
        assert!(
            err.contains("bridge VLAN filtering") && err.contains("CONFIG_BRIDGE_VLAN_FILTERING"),
            "{err}"
        );
        assert!(node.hci_links().is_empty(), "left: {:?}", node.hci_links());
    }

    // No CAP_NET_ADMIN: said so before touching anything.
    let lab = write_network(dir.path(), "capless", "  kind: { type: bridge }\n");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            "setpriv",
            "--bounding-set=-net_admin",
            BIN,
        ])
        .arg("--state-dir")
        .arg(&state)
        .args(["up", "-f", path_str(&lab)])
        .output()
        .expect("spawn setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs CAP_NET_ADMIN"), "{err}");
    assert!(node.hci_links().is_empty());
}
