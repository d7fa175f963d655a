//! Test harness: network namespaces as nodes and VMs, always cleaned up.
//!
//! These tests drive the real kernel: they need root (CAP_NET_ADMIN and
//! CAP_SYS_ADMIN for namespaces), `/dev/net/tun`, iproute2 (`ip`, `bridge`),
//! nftables (`nft`) and busybox (`udhcpc`). Without them they fail with a
//! message saying what is missing — never a silent pass.
#![allow(dead_code)]

use std::ops::Deref;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hci_net::{BackendOptions, LinuxBridgeBackend, NetNs};

/// Panics with a clear message unless the host can run these tests.
pub fn require_host() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "hci-net's integration tests create network namespaces, bridges and TAPs: run them as root (CAP_NET_ADMIN + CAP_SYS_ADMIN)"
    );
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: TAP devices cannot be created"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("busybox", "busybox-static"),
        ("ping", "iputils-ping"),
    ] {
        let found = Command::new(tool).arg("--help").output().is_ok();
        assert!(
            found,
            "`{tool}` is missing: install the Debian package {package}"
        );
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names in this process.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(args: &[&str]) -> String {
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

/// Runs a command and reports whether it succeeded.
pub fn try_run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        require_host();
        let name = unique(&format!("hcit-{tag}-"));
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside the namespace; true if it succeeded.
    pub fn try_exec(&self, args: &[&str]) -> bool {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        try_run(&full)
    }

    /// `ip -n NS ARGS…`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Names of every link in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Links whose name starts with the backend's prefix.
    pub fn hci_links(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l.starts_with(hci_net::DEVICE_PREFIX))
            .collect()
    }

    pub fn netns(&self) -> NetNs {
        NetNs::named(&self.name).expect("open namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A fake node: a namespace and a backend managing it. The backend is dropped
/// before the namespace.
#[derive(Debug)]
pub struct Node {
    pub backend: LinuxBridgeBackend,
    pub ns: Netns,
}

impl Node {
    pub async fn new(tag: &str) -> Self {
        Self::with_state(tag, None).await
    }

    pub async fn with_state(tag: &str, state_dir: Option<std::path::PathBuf>) -> Self {
        let ns = Netns::new(tag);
        let backend = LinuxBridgeBackend::new(BackendOptions {
            netns: ns.netns(),
            state_dir,
            ..Default::default()
        })
        .await
        .expect("backend");
        Self { backend, ns }
    }
}

impl Deref for Node {
    type Target = LinuxBridgeBackend;
    fn deref(&self) -> &LinuxBridgeBackend {
        &self.backend
    }
}

/// A "VM": a namespace whose `eth0` is a veth plugged into `bridge` on `node`.
#[derive(Debug)]
pub struct Vm {
    pub ns: Netns,
    /// Host-side veth name in the node.
    pub port: String,
}

impl Vm {
    pub fn attach(node: &Netns, bridge: &str, mac: Option<&str>, mtu: u16) -> Self {
        let ns = Netns::new("vm");
        let port = unique("vp");
        let mtu = mtu.to_string();
        node.ip(&[
            "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ]);
        node.ip(&["link", "set", &port, "master", bridge, "up"]);
        if let Some(mac) = mac {
            ns.ip(&["link", "set", "eth0", "address", mac]);
        }
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"]);
        Self { ns, port }
    }

    pub fn with_address(self, cidr: &str) -> Self {
        self.ns.ip(&["addr", "add", cidr, "dev", "eth0"]);
        self
    }

    /// Pings `target` until it answers or `within` passes.
    pub fn can_ping(&self, target: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.ns.try_exec(&["ping", "-c", "1", "-W", "1", target]) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }
}

/// What `udhcpc` reported for a lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpResult {
    pub ip: String,
    pub subnet: String,
    pub router: String,
    pub dns: String,
    pub mtu: String,
    pub serverid: String,
    pub hostname: String,
    pub domain: String,
}

/// Runs busybox `udhcpc` once in `vm` and returns what the server offered.
pub fn udhcpc(vm: &Netns) -> Option<DhcpResult> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("lease");
    let script = dir.path().join("script.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] || [ \"$1\" = renew ] || exit 0\n\
             printf 'ip=%s\\nsubnet=%s\\nrouter=%s\\ndns=%s\\nmtu=%s\\nserverid=%s\\nhostname=%s\\ndomain=%s\\n' \
             \"$ip\" \"$subnet\" \"$router\" \"$dns\" \"$mtu\" \"$serverid\" \"$hostname\" \"$domain\" > {}\n",
            out.display()
        ),
    )
    .expect("write script");
    run(&["chmod", "+x", script.to_str().expect("utf-8 path")]);
    let script_s = script.to_str().expect("utf-8 path");
    let ok = vm.try_exec(&[
        "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "6", "-T", "1", "-s", script_s,
    ]);
    if !ok {
        return None;
    }
    let text = std::fs::read_to_string(&out).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Some(DhcpResult {
        ip: get("ip"),
        subnet: get("subnet"),
        router: get("router"),
        dns: get("dns"),
        mtu: get("mtu"),
        serverid: get("serverid"),
        hostname: get("hostname"),
        domain: get("domain"),
    })
}
