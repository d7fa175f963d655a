//! This node: its `Node` resource (registered at start with its capacity),
//! and a heartbeat that keeps its `Ready` condition and allocatable
//! resources current.

use std::sync::Arc;
use std::time::Duration;

use hci_core::model::{ByteSize, ConditionStatus, Node, NodeResources, NodeSpec, set_condition};
use hci_core::{Error, Result};

use super::vm::VmController;
use super::{Runtime, set_status};

/// How often the node's status is refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// Identity and capacity of the node a daemon runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (a DNS-1123 label; the host name by default).
    pub name: String,
    /// What the node has.
    pub capacity: NodeResources,
    /// What VMs may use: the capacity minus what the host keeps.
    pub allocatable: NodeResources,
    /// Addresses other nodes reach this one at (the first carries overlays).
    pub addresses: Vec<String>,
}

impl NodeInfo {
    /// This machine: CPUs, memory (less `reserved_memory` for the host) and
    /// the free space of the filesystem holding `data_dir`.
    pub fn detect(name: &str, data_dir: &std::path::Path, reserved_memory: u64) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| Error::io("read /proc/meminfo", e))?;
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| Error::invalid("/proc/meminfo", "has no MemTotal line"))?;
        let storage = fs_size(data_dir)?;
        // Whole MiB, so the figures read well (`23152Mi`).
        let mib = |b: u64| b & !((1 << 20) - 1);
        let capacity = NodeResources {
            cpus,
            memory: ByteSize(mib(memory)),
            storage: ByteSize(storage),
        };
        let allocatable = NodeResources {
            memory: ByteSize(mib(memory.saturating_sub(reserved_memory))),
            ..capacity
        };
        Ok(NodeInfo {
            name: name.to_string(),
            capacity,
            allocatable,
            addresses: vec![],
        })
    }
}

fn fs_size(path: &std::path::Path) -> Result<u64> {
    crate::sys::filesystem_size(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e))
}

/// Creates or refreshes this node's `Node` resource.
pub(crate) async fn register(rt: &Runtime) -> Result<()> {
    let info = &rt.node;
    let spec = NodeSpec {
        addresses: info.addresses.clone(),
        ..NodeSpec::default()
    };
    if let Some(node) = rt.resources.try_get::<Node>(&info.name).await? {
        if node.spec.addresses != info.addresses {
            let addresses = info.addresses.clone();
            rt.resources
                .modify::<Node, _>(&info.name, None, |n| {
                    n.spec.addresses = addresses.clone();
                    Ok(())
                })
                .await?;
        }
    } else {
        let node = Node::new(info.name.clone(), spec);
        match rt.resources.create(node).await {
            Ok(_) | Err(Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(node = info.name, "node registered");
    }
    beat(rt, None).await
}

async fn beat(rt: &Runtime, vms: Option<&VmController>) -> Result<()> {
    let info = rt.node.clone();
    let running = match vms {
        Some(vms) => vms.running_count(),
        None => 0,
    };
    let now = chrono::Utc::now();
    let replica_servers = rt
        .replicas
        .as_ref()
        .map(|r| r.addresses())
        .unwrap_or_default();
    set_status(&rt.resources, &info.name, |n: &mut Node| {
        n.status_mut().capacity = info.capacity;
        n.status_mut().allocatable = info.allocatable;
        n.status_mut().version = env!("CARGO_PKG_VERSION").to_string();
        n.status_mut().replica_servers = replica_servers.clone();
        set_condition(
            &mut n.status_mut().conditions,
            "Ready",
            ConditionStatus::True,
            "DaemonRunning",
            &format!("{running} VMs running"),
        );
        set_condition(
            &mut n.status_mut().conditions,
            "KvmAvailable",
            if std::path::Path::new("/dev/kvm").exists() {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            "DevKvm",
            "",
        );
        // Only the heartbeat time moves on every beat; keep it coarse so an
        // idle node writes once per HEARTBEAT, not more.
        n.status_mut().last_heartbeat = Some(now);
    })
    .await
}

/// Refreshes the node's status every [`HEARTBEAT`].
pub(crate) async fn heartbeat(rt: Runtime, vms: Arc<VmController>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Err(e) = beat(&rt, Some(&vms)).await {
            tracing::warn!(error = %e, "node heartbeat failed");
        }
    }
}

/// Settings of cluster mode (`hci-daemon --store etcd://…`): liveness
/// leases, failover and the cluster-wide controllers (scheduler, node
/// health) that run on the elected leader only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterOptions {
    /// TTL of a node's liveness lease: a node whose daemon stops renewing
    /// it is marked NotReady about this long after its last renewal (etcd
    /// rounds TTLs up to its minimum, 2 s with default settings).
    pub lease_ttl: Duration,
    /// How long a node stays NotReady before its VMs with run strategy
    /// `Always`/`RerunOnFailure` are restarted on other nodes.
    pub failover_grace: Duration,
    /// How long a node stays NotReady before the replicas it holds are
    /// rebuilt on other nodes (a node back sooner keeps its replicas, which
    /// catch up).
    pub replica_grace: Duration,
    /// How often the leader looks at every node and VM (it also looks at
    /// once after any change of its own).
    pub tick: Duration,
}

impl Default for ClusterOptions {
    /// 10 s lease, 10 s grace: a failed node's VMs are restarted elsewhere
    /// about 20–25 s after the failure; its replicas are rebuilt elsewhere
    /// after 5 minutes.
    fn default() -> Self {
        ClusterOptions {
            lease_ttl: Duration::from_secs(10),
            failover_grace: Duration::from_secs(10),
            replica_grace: Duration::from_secs(300),
            tick: Duration::from_secs(1),
        }
    }
}

/// Keys of live nodes: `/hci/cluster/alive/<node>`, each on its node's lease.
pub const ALIVE_PREFIX: &str = "/hci/cluster/alive/";
/// The leader of the cluster-wide controllers (on the leader's lease).
pub const LEADER_KEY: &str = "/hci/cluster/leader";
/// Annotation on a `Node` asking its daemon to drain it (set by
/// `hcictl node drain`, removed by `uncordon`); its value is the time of
/// the request. `spec.maintenance` drains too.
pub const DRAIN_ANNOTATION: &str = "hci.dev/drain";

/// Whether a node is asked to be drained.
pub fn draining(node: &Node) -> bool {
    node.spec.maintenance || node.metadata.annotations.contains_key(DRAIN_ANNOTATION)
}

/// This node's liveness lease, shared by the agent (which renews it) and
/// the leader election (which puts the leader key on it).
pub(crate) type LeaseCell = tokio::sync::watch::Receiver<Option<hci_core::store::LeaseId>>;

/// Keeps this node's liveness lease and key alive: grants a lease, puts
/// `/hci/cluster/alive/<node>` on it, renews it every third of its TTL,
/// and starts over (re-registering, marking the node Ready again) when
/// the lease was lost — etcd unreachable for longer than the TTL.
pub(crate) async fn liveness(
    rt: Runtime,
    vms: Arc<VmController>,
    options: ClusterOptions,
    cell: tokio::sync::watch::Sender<Option<hci_core::store::LeaseId>>,
) {
    use hci_core::store::PutOptions;
    let store = rt.resources.state_store().clone();
    let key = format!("{ALIVE_PREFIX}{}", rt.node.name);
    let renew = (options.lease_ttl / 3).max(Duration::from_millis(200));
    loop {
        let lease = async {
            let lease = store.grant_lease(options.lease_ttl).await?;
            let value = serde_json::json!({
                "node": rt.node.name,
                "since": chrono::Utc::now(),
            });
            store
                .put(
                    &key,
                    value.to_string().into_bytes(),
                    PutOptions {
                        lease: Some(lease),
                        ..PutOptions::default()
                    },
                )
                .await?;
            Ok::<_, Error>(lease)
        }
        .await;
        let lease = match lease {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the node's liveness lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tracing::info!(node = rt.node.name, lease, "liveness lease taken");
        let _ = cell.send(Some(lease));
        if let Err(e) = beat(&rt, Some(&vms)).await {
            tracing::warn!(error = %e, "node heartbeat failed");
        }
        loop {
            tokio::time::sleep(renew).await;
            match store.keep_alive(lease).await {
                Ok(()) => {}
                Err(Error::NotFound { .. }) => {
                    tracing::warn!(
                        node = rt.node.name,
                        "the liveness lease expired (etcd was unreachable for longer than its TTL): registering again"
                    );
                    let _ = cell.send(None);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the liveness lease"),
            }
        }
    }
}

/// When the drain of `node` started (its `Drained` condition's first
/// transition), if known.
fn drain_started(node: &Node) -> Option<chrono::DateTime<chrono::Utc>> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == "Drained"))
        .and_then(|c| c.last_transition)
}

/// Drains a `LiveMigrate` VM by live migration: asks for one (any node)
/// unless one is under way. False when the VM should be shut down instead:
/// it does not run, or its migration failed since the drain started.
async fn live_migrate(
    rt: &Runtime,
    vms: &VmController,
    vm: &hci_core::model::VirtualMachine,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    use hci_core::model::{MigrationPhase, Resource as _, VmPhase};
    let status = vm.status_or_default();
    if vms.is_migrating(vm.name()) || vm.metadata.annotations.contains_key(super::vm::MIGRATE_TO) {
        return true;
    }
    if let Some(m) = &status.migration {
        if !m.phase.is_finished() {
            return true;
        }
        let recent = match (m.finished_at, since) {
            (Some(done), Some(since)) => done >= since,
            _ => false,
        };
        if m.phase == MigrationPhase::Failed && recent {
            tracing::info!(
                vm = vm.name(),
                "live migration failed during the drain: shutting it down"
            );
            return false;
        }
    }
    if status.phase != VmPhase::Running {
        return false;
    }
    let requested = rt
        .resources
        .modify::<hci_core::model::VirtualMachine, _>(vm.name(), None, |v| {
            v.metadata
                .annotations
                .insert(super::vm::MIGRATE_TO.to_string(), String::new());
            Ok(())
        })
        .await;
    match requested {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(vm = vm.name(), error = %e, "cannot ask for a live migration");
            true
        }
    }
}

/// Drains this node while it is asked to (`hcictl node drain`, maintenance
/// mode): running (not paused) VMs with eviction strategy `LiveMigrate` are
/// live-migrated to other nodes (shut down like the others if that fails);
/// the others are shut down cleanly and handed back to the scheduler; VMs
/// with eviction strategy `None` block the drain. Progress is the node's
/// `Drained` condition.
pub(crate) async fn drainer(rt: Runtime, vms: Arc<VmController>, options: ClusterOptions) {
    use hci_core::model::{EvictionStrategy, Resource as _, VirtualMachine};
    let mut evicting: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    loop {
        tokio::time::sleep(options.tick).await;
        while evicting.try_join_next().is_some() {}
        let node = match rt.resources.try_get::<Node>(&rt.node.name).await {
            Ok(Some(node)) => node,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read this node");
                continue;
            }
        };
        let drain = draining(&node);
        let had = node
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.kind == "Drained"));
        if !drain {
            if had {
                let _ = set_status(&rt.resources, &rt.node.name, |n: &mut Node| {
                    n.status_mut().conditions.retain(|c| c.kind != "Drained");
                })
                .await;
            }
            continue;
        }
        let placed: Vec<VirtualMachine> = match rt.resources.list::<VirtualMachine>().await {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|vm| vm.status_or_default().node.as_deref() == Some(&rt.node.name))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list VMs");
                continue;
            }
        };
        let mut blocked = Vec::new();
        let mut leaving = Vec::new();
        for vm in &placed {
            let name = vm.name().to_string();
            if vm.spec.eviction_strategy == EvictionStrategy::None {
                blocked.push(name);
                continue;
            }
            leaving.push(name.clone());
            if vm.spec.eviction_strategy == EvictionStrategy::LiveMigrate
                && live_migrate(&rt, &vms, vm, drain_started(&node)).await
            {
                continue;
            }
            if vms.start_eviction(&name) {
                let vms = vms.clone();
                let why = if node.spec.maintenance {
                    "maintenance"
                } else {
                    "drain"
                };
                evicting.spawn(async move {
                    if let Err(e) = vms.evict(&name, why).await {
                        tracing::warn!(vm = name, error = %e, "eviction failed; retrying");
                    }
                });
            }
        }
        let (status, reason, message) = if placed.is_empty() {
            (ConditionStatus::True, "Drained", "no VMs left".to_string())
        } else if leaving.is_empty() {
            (
                ConditionStatus::False,
                "DrainBlocked",
                format!(
                    "blocked by VMs with evictionStrategy None: {}",
                    blocked.join(", ")
                ),
            )
        } else {
            let mut m = format!("{} VMs left: {}", placed.len(), leaving.join(", "));
            if !blocked.is_empty() {
                m.push_str(&format!(
                    "; blocked by evictionStrategy None: {}",
                    blocked.join(", ")
                ));
            }
            (ConditionStatus::False, "Draining", m)
        };
        let _ = set_status(&rt.resources, &rt.node.name, |n: &mut Node| {
            set_condition(
                &mut n.status_mut().conditions,
                "Drained",
                status,
                reason,
                &message,
            );
        })
        .await;
    }
}
