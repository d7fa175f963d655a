//! Cluster mode: three real daemons on one machine (three data
//! directories, one real etcd), VMs on hci's KVM VMM in-process (so
//! `kill -9` of a daemon takes its VMs with it, like a node that dies).
//!
//! Timings (kill → NotReady, kill → guest output on the new node, drain)
//! are printed, not asserted.
#![cfg(feature = "etcd")]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;

use hci_core::model::{
    BootSpec, ByteSize, EvictionStrategy, Node, Resource, RunStrategy, VirtualMachine, VmPhase,
    Volume, VolumePhase, VolumeSpec,
};

/// Lease TTL and failover grace of the test daemons: short, so the tests
/// are quick; `HCI_TEST_LEASE=10s HCI_TEST_GRACE=10s` measures the defaults.
fn lease() -> String {
    std::env::var("HCI_TEST_LEASE").unwrap_or_else(|_| "2s".into())
}

fn grace() -> String {
    std::env::var("HCI_TEST_GRACE").unwrap_or_else(|_| "2s".into())
}

/// How long a node is lost before its replicas are rebuilt elsewhere: long
/// enough that a daemon killed and spawned again at once is back before it
/// even on a loaded 2-core machine (6 s was not: its replica moved away).
const REPLICA_GRACE: &str = "15s";

impl Cluster {
    async fn start(nodes: &[&str]) -> Cluster {
        Cluster::start_with(nodes, None).await
    }

    /// Daemons whose VMs run in `vmm` processes (in-process: `None`).
    async fn start_with(nodes: &[&str], vmm: Option<&Path>) -> Cluster {
        let mut args: Vec<String> = [
            "--node-lease-ttl",
            &lease(),
            "--failover-grace",
            &grace(),
            "--replica-rebuild-grace",
            REPLICA_GRACE,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        match vmm {
            Some(vmm) => args.extend([
                "--vm-mode".into(),
                "process".into(),
                "--vmm".into(),
                vmm.display().to_string(),
            ]),
            None => args.extend(["--vm-mode".into(), "in-process".into()]),
        }
        Cluster::start_with_args(nodes, args).await
    }

    /// Waits until `vm` runs on a node other than `not_on` and its guest
    /// printed `kbd ready` there; returns that node.
    async fn wait_running(&self, vm: &str, not_on: Option<&str>, within: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(Some(v)) = self.resources.try_get::<VirtualMachine>(vm).await {
                let s = v.status_or_default();
                if let Some(node) = s.node.as_deref()
                    && Some(node) != not_on
                    && s.phase == VmPhase::Running
                    && self.daemon(node).console(vm).contains("kbd ready")
                {
                    return node.to_string();
                }
            }
            assert!(
                start.elapsed() < within,
                "VM {vm} not running (elsewhere than {not_on:?}) within {within:?}: {:?}\n{}",
                self.resources.try_get::<VirtualMachine>(vm).await,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Cluster {
    /// Creates a 16 MiB volume `name` with two replicas (once every node
    /// publishes its replica server) and waits until it is made; returns
    /// the nodes holding its replicas.
    async fn replicated_volume(&self, name: &str) -> BTreeSet<String> {
        self.replicated_servers().await;
        self.resources
            .create(Volume::new(
                name,
                VolumeSpec::blank(ByteSize::mib(16)).with_replicas(2),
            ))
            .await
            .expect("create volume");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v: Volume = self.resources.get(name).await.expect("volume");
            let st = v.status_or_default();
            let nodes: BTreeSet<String> = st.replicas.iter().map(|r| r.node.clone()).collect();
            if st.phase == VolumePhase::Detached && st.replicas.len() == 2 {
                assert_eq!(nodes.len(), 2, "replicas share a node: {st:?}");
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "volume not ready: {v:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node publishes its replica server.
    async fn replicated_servers(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for d in &self.daemons {
            loop {
                let node: Node = self.resources.get(&d.name).await.expect("node");
                if !node.status_or_default().replica_servers.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} publishes no replica server",
                    d.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Waits until volume `name` has all its replicas healthy, none on
    /// `not_on`, in phase `phase`; returns its replicas `(node, address)`.
    async fn wait_whole(
        &self,
        name: &str,
        not_on: Option<&str>,
        phase: VolumePhase,
        within: Duration,
    ) -> Vec<(String, String)> {
        let start = Instant::now();
        loop {
            let v: Volume = self.resources.get(name).await.expect("volume");
            let st = v.status_or_default();
            let whole = st.phase == phase
                && st.replicas.len() == usize::from(v.spec.replicas)
                && st
                    .replicas
                    .iter()
                    .all(|r| r.healthy && r.rebuild_percent.is_none())
                && st.replicas.iter().all(|r| Some(r.node.as_str()) != not_on);
            if whole {
                return st
                    .replicas
                    .iter()
                    .map(|r| (r.node.clone(), r.address.clone().unwrap_or_default()))
                    .collect();
            }
            assert!(
                start.elapsed() < within,
                "volume {name} not whole (off {not_on:?}) within {within:?}: {st:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The replica token every daemon shares.
    fn token(&self) -> Vec<u8> {
        let path = self.daemons[0].dir.with_file_name("replica.token");
        std::fs::read_to_string(path)
            .expect("replica token")
            .trim()
            .as_bytes()
            .to_vec()
    }
}

/// SHA-256 of the whole of replica `volume` at `address` (read through a
/// read-only engine over that one replica).
async fn replica_digest(address: &str, token: &[u8], volume: &str) -> String {
    use hci_core::volume::{OpenVolume, VolumeBackend};
    use hci_storage::engine::{EngineOptions, ReplicatedVolumeBackend};
    use hci_storage::replica::client::{RemoteNode, ServerAddr};
    use sha2::Digest;
    let node: Arc<dyn hci_storage::replica::ReplicaNode> =
        Arc::new(RemoteNode::new(ServerAddr::new(address, token.to_vec())));
    let backend =
        ReplicatedVolumeBackend::new(vec![node], EngineOptions::default()).expect("backend");
    let dev = backend
        .open(
            volume,
            OpenVolume {
                read_only: true,
                encryption_key: None,
            },
        )
        .await
        .expect("open the replica read-only");
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < dev.size() {
        let n = ((dev.size() - off) as usize).min(buf.len());
        dev.read_at(&mut buf[..n], off).await.expect("read replica");
        hash.update(&buf[..n]);
        off += n as u64;
    }
    format!("{:x}", hash.finalize())
}

fn vm(name: &str, strategy: RunStrategy) -> VirtualMachine {
    VirtualMachine::builder(name)
        .cpus(1)
        .memory(ByteSize::mib(64))
        .boot(BootSpec::kernel("guest:kbd", ""))
        .run_strategy(strategy)
        .eviction_strategy(EvictionStrategy::Shutdown)
        .build()
}

fn kvm_or_skip() -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: cluster tests need /dev/kvm");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_drain_and_node_commands() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(&["n1", "n2", "n3"]).await;
    c.resources
        .create(vm("ha", RunStrategy::Always))
        .await
        .expect("create VM");
    let first = c.wait_running("ha", None, Duration::from_secs(120)).await;
    eprintln!("VM ha runs on {first}");

    // kill -9 the node's daemon (its in-process VM dies with it).
    let store = c.resources.state_store().clone();
    let leader = hci_daemon::controllers::scheduler::leader(&*store)
        .await
        .expect("leader");
    eprintln!("leader before the kill: {leader:?}");
    let killed = Instant::now();
    c.daemon_mut(&first).kill();
    c.wait_ready(&first, false, Duration::from_secs(30)).await;
    let not_ready = killed.elapsed();
    let second = c
        .wait_running("ha", Some(&first), Duration::from_secs(60))
        .await;
    let moved = killed.elapsed();
    eprintln!(
        "failover (lease {}, grace {}): {first} NotReady {:.1} s after kill -9; \
         guest output on {second} {:.1} s after kill -9",
        lease(),
        grace(),
        not_ready.as_secs_f64(),
        moved.as_secs_f64()
    );
    let leader_after = hci_daemon::controllers::scheduler::leader(&*store)
        .await
        .expect("leader");
    eprintln!("leader after the failover: {leader_after:?}");
    assert!(leader_after.is_some_and(|l| l != first));
    let v: VirtualMachine = c.resources.get("ha").await.expect("get");
    assert!(
        v.status_or_default()
            .conditions
            .iter()
            .any(|c| c.reason == "NodeLost" || c.kind == "Scheduled"),
        "{v:?}"
    );

    // The lost node comes back: Ready again, and the VM stays where it is.
    c.daemon_mut(&first).spawn();
    c.wait_ready(&first, true, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v: VirtualMachine = c.resources.get("ha").await.expect("get");
    assert_eq!(v.status_or_default().node.as_deref(), Some(second.as_str()));

    // hcictl node list shows the three nodes and the VM.
    let (ok, list) = c.daemon(&first).hcictl(&["node", "list"]);
    assert!(ok, "{list}");
    for n in ["n1", "n2", "n3"] {
        assert!(list.contains(n), "{list}");
    }
    assert_eq!(
        list.matches("Ready").count() - list.matches("NotReady").count(),
        3,
        "{list}"
    );

    // Removing a Ready node is refused.
    let (ok, out) = c.daemon(&first).hcictl(&["node", "remove", &second]);
    assert!(!ok && out.contains("is Ready"), "{out}");

    // Drain the VM's node: the VM shuts down cleanly and runs elsewhere.
    let drained = Instant::now();
    let (ok, out) = c.daemon(&first).hcictl(&["node", "drain", &second]);
    assert!(ok, "drain failed: {out}\n{}", c.logs());
    assert!(out.contains("drained"), "{out}");
    assert!(
        c.daemon(&second).console("ha").contains("ctrl-alt-del"),
        "the guest was not shut down cleanly: {}",
        c.daemon(&second).console("ha")
    );
    let third = c
        .wait_running("ha", Some(&second), Duration::from_secs(60))
        .await;
    eprintln!(
        "drain of {second}: VM ha running on {third} after {:.1} s\n{out}",
        drained.elapsed().as_secs_f64()
    );
    let (ok, list) = c.daemon(&first).hcictl(&["node", "list"]);
    assert!(ok && list.contains("Cordoned,Drained"), "{list}");
    // A cordoned node gets no new VMs.
    let n: Node = c.resources.get(&second).await.expect("node");
    assert!(n.spec.cordoned);
    let (ok, out) = c.daemon(&first).hcictl(&["node", "uncordon", &second]);
    assert!(ok, "{out}");
    let n: Node = c.resources.get(&second).await.expect("node");
    assert!(!n.spec.cordoned && !n.metadata.annotations.contains_key("hci.dev/drain"));

    // Maintenance on the node now running the VM moves it again.
    let (ok, out) = c
        .daemon(&first)
        .hcictl(&["node", "maintenance", "on", &third]);
    assert!(ok, "maintenance failed: {out}\n{}", c.logs());
    let fourth = c
        .wait_running("ha", Some(&third), Duration::from_secs(60))
        .await;
    eprintln!("maintenance on {third}: VM ha now on {fourth}");
    let (ok, out) = c
        .daemon(&first)
        .hcictl(&["node", "maintenance", "off", &third]);
    assert!(ok, "{out}");

    // A VM on a local volume cannot move: when its node dies it stays
    // there with a condition saying why, and runs again when the node is back.
    c.resources
        .create(Volume::blank("data", ByteSize::mib(64)))
        .await
        .expect("create volume");
    let mut pinned = vm("pinned", RunStrategy::Always);
    pinned.spec.disks = VirtualMachine::builder("x")
        .disk("data", "data")
        .build()
        .spec
        .disks;
    c.resources.create(pinned).await.expect("create VM");
    let home = c
        .wait_running("pinned", None, Duration::from_secs(120))
        .await;
    let vol: Volume = c.resources.get("data").await.expect("volume");
    assert_eq!(vol.status_or_default().replicas[0].node, home);
    c.daemon_mut(&home).kill();
    c.wait_ready(&home, false, Duration::from_secs(30)).await;
    let start = Instant::now();
    let reason = loop {
        let v: VirtualMachine = c.resources.get("pinned").await.expect("get");
        let s = v.status_or_default();
        if let Some(cond) = s.conditions.iter().find(|c| c.reason == "NodeLost") {
            assert_eq!(s.node.as_deref(), Some(home.as_str()), "moved: {v:?}");
            break cond.message.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{v:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("VM pinned on a local volume of {home}: {reason}");
    assert!(reason.contains("cannot move"), "{reason}");
    let restarted = chrono::Utc::now();
    c.daemon_mut(&home).spawn();
    let start = Instant::now();
    loop {
        let v: VirtualMachine = c.resources.get("pinned").await.expect("get");
        let s = v.status_or_default();
        if s.phase == VmPhase::Running && s.started_at.is_some_and(|t| t > restarted) {
            assert_eq!(s.node.as_deref(), Some(home.as_str()));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{v:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = &c.etcd;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_mid_operation_converges() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(&["e1", "e2", "e3"]).await;
    // Halted VMs need no node: they test the state, not the CPU.
    for i in 0..10 {
        c.resources
            .create(vm(&format!("halted-{i}"), RunStrategy::Halted))
            .await
            .expect("create");
    }
    // Volumes (local and replicated) and a VM using one, created just
    // before etcd dies: their controllers are mid-way when it goes.
    c.replicated_servers().await;
    c.resources
        .create(Volume::new(
            "inflight-r",
            VolumeSpec::blank(ByteSize::mib(16)).with_replicas(2),
        ))
        .await
        .expect("create volume");
    for i in 0..2 {
        c.resources
            .create(Volume::blank(format!("inflight-{i}"), ByteSize::mib(16)))
            .await
            .expect("create volume");
    }
    let mut inflight = vm("inflight", RunStrategy::Always);
    inflight.spec.boot = BootSpec::kernel("guest:blk", "stay=1");
    inflight.spec.disks = VirtualMachine::builder("x")
        .disk("data", "inflight-r")
        .build()
        .spec
        .disks;
    c.resources.create(inflight).await.expect("create VM");
    c.etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Writes fail while etcd is down…
    assert!(
        c.resources
            .create(vm("during", RunStrategy::Halted))
            .await
            .is_err()
    );
    c.etcd.restart().expect("restart etcd");
    let back = Instant::now();
    // …and work again once it is back (the client reconnects).
    let mut created = false;
    for _ in 0..100 {
        if c.resources
            .create(vm("after", RunStrategy::Always))
            .await
            .is_ok()
        {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created, "no write succeeded after etcd came back");
    // Every node is Ready again, the VM created after the restart runs.
    for n in ["e1", "e2", "e3"] {
        c.wait_ready(n, true, Duration::from_secs(60)).await;
    }
    let on = c
        .wait_running("after", None, Duration::from_secs(120))
        .await;
    eprintln!(
        "etcd restart: VM created after it runs on {on} {:.1} s after etcd came back",
        back.elapsed().as_secs_f64()
    );
    // Nothing was lost.
    let names: Vec<String> = c
        .resources
        .list::<VirtualMachine>()
        .await
        .expect("list")
        .items
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    for i in 0..10 {
        assert!(names.contains(&format!("halted-{i}")), "{names:?}");
    }
    assert_eq!(
        c.resources.list::<Node>().await.expect("nodes").items.len(),
        3
    );
    // What was in flight finished: the volumes are made (the replicated
    // one on two nodes) and the VM on it runs.
    c.wait_running_console("inflight", None, "virtio-blk OK", Duration::from_secs(120))
        .await;
    c.wait_whole(
        "inflight-r",
        None,
        VolumePhase::Attached,
        Duration::from_secs(60),
    )
    .await;
    for i in 0..2 {
        c.wait_whole(
            &format!("inflight-{i}"),
            None,
            VolumePhase::Detached,
            Duration::from_secs(60),
        )
        .await;
    }
    // Exactly one leader.
    let store = c.resources.state_store();
    let leader = hci_daemon::controllers::scheduler::leader(&**store)
        .await
        .expect("leader");
    assert!(leader.is_some_and(|l| ["e1", "e2", "e3"].contains(&l.as_str())));
    c.daemon_mut("e1").kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_replicated_volume_fails_over_after_fencing() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(&["r1", "r2", "r3"]).await;
    let replica_nodes = c.replicated_volume("rv").await;
    eprintln!("replicas of rv on {replica_nodes:?}");
    let mut spec = vm("rvm", RunStrategy::Always);
    spec.spec.boot = BootSpec::kernel("guest:blk", "stay=1");
    spec.spec.disks = VirtualMachine::builder("x")
        .disk("data", "rv")
        .build()
        .spec
        .disks;
    c.resources.create(spec).await.expect("create VM");
    let first = wait_blk(&c, None).await;
    eprintln!("rvm runs on {first}");
    // The generation of the engine the VM's node runs now.
    let socket = c.daemon(&first).dir.join("data/run/rvm/rv.engine.sock");
    let old = tokio::task::spawn_blocking(move || {
        hci_storage::control::call(&socket, &hci_storage::control::ControlRequest::Status)
    })
    .await
    .expect("join")
    .expect("engine status")
    .status
    .expect("status");
    // Kill a node that holds a replica and runs the VM if possible.
    let killed = Instant::now();
    c.daemon_mut(&first).kill();
    let second = wait_blk(&c, Some(&first)).await;
    eprintln!(
        "replicated failover: guest wrote and read its disk on {second} {:.1} s after kill -9 of {first}",
        killed.elapsed().as_secs_f64()
    );
    let all_logs = c.logs();
    assert!(
        all_logs.contains("fenced") || !replica_nodes.contains(&first),
        "no fencing was logged:\n{all_logs}"
    );

    // The old engine is refused: a writer at its generation cannot open
    // any replica the volume has now.
    let v: Volume = c.resources.get("rv").await.expect("volume");
    let token = c.token();
    for r in v
        .status_or_default()
        .replicas
        .iter()
        .filter(|r| r.node != first)
    {
        use hci_storage::replica::ReplicaNode;
        let address = r.address.clone().expect("address");
        let node = hci_storage::replica::client::RemoteNode::new(
            hci_storage::replica::client::ServerAddr::new(&address, token.clone()),
        );
        let opened = node
            .open_fenced(
                "rv",
                old.generation,
                hci_core::volume::OpenVolume {
                    read_only: false,
                    encryption_key: None,
                },
            )
            .await;
        match opened {
            Err(hci_core::Error::Fenced { .. }) => {}
            other => panic!(
                "an engine at the old generation {} was not refused by {address}: {:?}",
                old.generation,
                other.map(|_| "opened")
            ),
        }
    }

    // The lost node's daemon comes back on the same data: it does not
    // start the VM again (it moved), and the volume becomes whole.
    let console_before = c.daemon(&first).console("rvm");
    c.daemon_mut(&first).spawn();
    c.wait_ready(&first, true, Duration::from_secs(30)).await;
    let replicas = c
        .wait_whole("rv", None, VolumePhase::Attached, Duration::from_secs(120))
        .await;
    eprintln!("rv whole again after {first} returned: {replicas:?}");
    let v: VirtualMachine = c.resources.get("rvm").await.expect("vm");
    assert_eq!(v.status_or_default().node.as_deref(), Some(second.as_str()));
    assert_eq!(
        c.daemon(&first).console("rvm"),
        console_before,
        "the returned node ran the VM again"
    );
}

/// Waits until VM `rvm` runs on a node other than `not_on` and its `blk`
/// guest wrote and read back its disk there; returns that node.
async fn wait_blk(c: &Cluster, not_on: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(v)) = c.resources.try_get::<VirtualMachine>("rvm").await {
            let s = v.status_or_default();
            if let Some(node) = s.node.clone()
                && Some(node.as_str()) != not_on
                && s.phase == VmPhase::Running
                && c.daemon(&node).console("rvm").contains("virtio-blk OK")
            {
                return node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rvm not running: {:?}\n{}",
            c.resources.try_get::<VirtualMachine>("rvm").await,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts the `writes N` lines of a `blk writes=1` guest's console, and
/// fails on any `FAIL`.
fn guest_writes(console: &str) -> usize {
    assert!(!console.contains("FAIL"), "guest I/O failed:\n{console}");
    console.lines().filter(|l| l.starts_with("writes ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_catch_up_or_are_rebuilt_elsewhere_while_the_guest_writes() {
    if !kvm_or_skip() {
        return;
    }
    let mut c = Cluster::start(&["b1", "b2", "b3"]).await;
    let replica_nodes = c.replicated_volume("bv").await;
    let mut spec = vm("bvm", RunStrategy::Always);
    spec.spec.boot = BootSpec::kernel("guest:blk", "stay=1 writes=1");
    spec.spec.disks = VirtualMachine::builder("x")
        .disk("data", "bv")
        .build()
        .spec
        .disks;
    c.resources.create(spec).await.expect("create VM");
    let home = c
        .wait_running_console("bvm", None, "writes ", Duration::from_secs(120))
        .await;
    let other = replica_nodes
        .iter()
        .find(|n| **n != home)
        .expect("a replica off the VM's node")
        .clone();
    let spare = ["b1", "b2", "b3"]
        .into_iter()
        .find(|n| !replica_nodes.contains(*n))
        .expect("a node without a replica")
        .to_string();
    eprintln!("bvm on {home}; replicas on {replica_nodes:?}; spare node {spare}");

    // 1. The other replica's daemon dies and comes back at once (before
    //    the grace): its replica is added back and catches up.
    c.daemon_mut(&other).kill();
    let start = Instant::now();
    loop {
        let v: Volume = c.resources.get("bv").await.expect("volume");
        if v.status_or_default().replicas.iter().any(|r| !r.healthy) {
            break;
        }
        // The engine notices at the guest's next write.
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{v:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.daemon_mut(&other).spawn();
    let back = Instant::now();
    let replicas = c
        .wait_whole("bv", None, VolumePhase::Attached, Duration::from_secs(60))
        .await;
    assert!(replicas.iter().any(|(n, _)| *n == other), "{replicas:?}");
    eprintln!(
        "stale replica on {other} caught up {:.1} s after its daemon restarted",
        back.elapsed().as_secs_f64()
    );

    // 2. It dies for good: after the grace its replica is rebuilt on the
    //    spare node, and the guest's writes never fail meanwhile.
    let before = guest_writes(&c.daemon(&home).console("bvm"));
    let killed = Instant::now();
    c.daemon_mut(&other).kill();
    let replicas = c
        .wait_whole(
            "bv",
            Some(&other),
            VolumePhase::Attached,
            Duration::from_secs(120),
        )
        .await;
    eprintln!(
        "replica of {other} rebuilt on {:?} {:.1} s after kill -9 (lease {}, replica grace {REPLICA_GRACE})",
        replicas.iter().map(|r| &r.0).collect::<Vec<_>>(),
        killed.elapsed().as_secs_f64(),
        lease()
    );
    assert!(replicas.iter().any(|(n, _)| *n == spare), "{replicas:?}");
    // The guest went on writing (and checking) all along, and still does.
    let during = guest_writes(&c.daemon(&home).console("bvm"));
    assert!(during > before, "the guest stopped writing");
    let start = Instant::now();
    while guest_writes(&c.daemon(&home).console("bvm")) <= during {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest stopped writing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 3. Stopped, the volume's replicas are identical byte for byte.
    c.resources
        .modify::<VirtualMachine, _>("bvm", None, |v| {
            v.spec.run_strategy = RunStrategy::Halted;
            Ok(())
        })
        .await
        .expect("halt the VM");
    c.wait_whole("bv", None, VolumePhase::Detached, Duration::from_secs(60))
        .await;
    let token = c.token();
    let mut digests = BTreeSet::new();
    for (node, address) in &replicas {
        let d = replica_digest(address, &token, "bv").await;
        eprintln!("replica on {node}: sha256 {d}");
        digests.insert(d);
    }
    assert_eq!(digests.len(), 1, "the replicas differ");

    // 4. Detached, its owner lost: the node that died comes back (its old
    //    copy, placed elsewhere now, is swept), the VM's node dies. Another
    //    node looks after the volume, and after the grace its replica moves
    //    to the returned node, rebuilt there by a brief engine.
    c.daemon_mut(&other).spawn();
    c.wait_ready(&other, true, Duration::from_secs(30)).await;
    // Its copy, placed elsewhere now, is swept from its disk.
    let stale_copy = c.daemon(&other).dir.join("data/replicas/bv");
    let start = Instant::now();
    while stale_copy.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} kept a replica placed elsewhere",
            other
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    c.daemon_mut(&home).kill();
    let replicas = c
        .wait_whole(
            "bv",
            Some(&home),
            VolumePhase::Detached,
            Duration::from_secs(120),
        )
        .await;
    eprintln!(
        "detached volume: replica of {home} rebuilt on {:?} {:.1} s after kill -9",
        replicas.iter().map(|r| &r.0).collect::<Vec<_>>(),
        killed.elapsed().as_secs_f64()
    );
    assert!(replicas.iter().any(|(n, _)| *n == other), "{replicas:?}");
    let mut after = BTreeSet::new();
    for (_, address) in &replicas {
        after.insert(replica_digest(address, &token, "bv").await);
    }
    assert_eq!(after, digests, "the rebuilt replica differs");
    let _ = &c.etcd;
}

impl Cluster {
    /// Waits until `vm` runs (not on `not_on`) and its console shows
    /// `text`; returns its node.
    async fn wait_running_console(
        &self,
        vm: &str,
        not_on: Option<&str>,
        text: &str,
        within: Duration,
    ) -> String {
        let start = Instant::now();
        loop {
            if let Ok(Some(v)) = self.resources.try_get::<VirtualMachine>(vm).await {
                let s = v.status_or_default();
                if let Some(node) = s.node.as_deref()
                    && Some(node) != not_on
                    && s.phase == VmPhase::Running
                    && self.daemon(node).console(vm).contains(text)
                {
                    return node.to_string();
                }
            }
            assert!(
                start.elapsed() < within,
                "VM {vm} not running with {text:?} on its console within {within:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Process mode: the daemon of the VM's node dies but its `hci-vmm` runs
/// on. Once the VM is fenced and restarted elsewhere, the old `hci-vmm`
/// notices (a replica follows a newer engine) and stops its guest with exit
/// reason "fenced"; the daemon, back, does not start the VM again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_vmm_stops_once_its_vm_moved() {
    if !kvm_or_skip() {
        return;
    }
    let vmm = Path::new(env!("CARGO_BIN_EXE_hci-daemon")).with_file_name("hci-vmm");
    if !vmm.is_file() {
        eprintln!(
            "SKIPPED: {} is not built (cargo build -p hci-compute --bin hci-vmm)",
            vmm.display()
        );
        return;
    }
    let mut c = Cluster::start_with(&["p1", "p2", "p3"], Some(&vmm)).await;
    c.replicated_volume("pv").await;
    let mut spec = vm("pvm", RunStrategy::Always);
    spec.spec.boot = BootSpec::kernel("guest:blk", "stay=1 writes=1");
    spec.spec.disks = VirtualMachine::builder("x")
        .disk("data", "pv")
        .build()
        .spec
        .disks;
    c.resources.create(spec).await.expect("create VM");
    let first = c
        .wait_running_console("pvm", None, "writes ", Duration::from_secs(120))
        .await;
    let exit_file = c.daemon(&first).dir.join("data/run/pvm/exit.json");
    let killed = Instant::now();
    c.daemon_mut(&first).kill();
    let second = c
        .wait_running_console(
            "pvm",
            Some(&first),
            "virtio-blk OK",
            Duration::from_secs(60),
        )
        .await;
    let start = Instant::now();
    let exit = loop {
        let text = std::fs::read_to_string(&exit_file).unwrap_or_default();
        if !text.is_empty() {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the old hci-vmm on {first} still runs after pvm moved to {second}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "old hci-vmm on {first} stopped {:.1} s after kill -9 of its daemon (VM now on {second}): {exit}",
        killed.elapsed().as_secs_f64()
    );
    assert!(exit.contains("fenced"), "{exit}");
    let console = c.daemon(&first).console("pvm");
    c.daemon_mut(&first).spawn();
    c.wait_ready(&first, true, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v: VirtualMachine = c.resources.get("pvm").await.expect("vm");
    assert_eq!(v.status_or_default().node.as_deref(), Some(second.as_str()));
    assert_eq!(
        c.daemon(&first).console("pvm"),
        console,
        "the VM ran again on {first}"
    );
}
