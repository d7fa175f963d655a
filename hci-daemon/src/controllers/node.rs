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
