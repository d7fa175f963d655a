//! Cluster-wide controllers, run by one daemon at a time: the leader,
//! elected on an etcd lease (the key `/hci/cluster/leader` on the leader's
//! liveness lease, so a dead leader is replaced within a lease TTL).
//!
//! Every [`ClusterOptions::tick`] the leader:
//!
//! 1. **node health** — a node without its liveness key (its daemon stopped
//!    renewing the lease) gets `Ready=False` (`NodeLeaseExpired`);
//! 2. **failover** — the VMs placed on a node that has been NotReady for
//!    [`ClusterOptions::failover_grace`] are taken off it: with run strategy
//!    `Always`/`RerunOnFailure` they are placed again elsewhere, but only
//!    after [`fence`] says their volumes cannot be written by the lost node
//!    any more; a VM whose volume lives only on the lost node stays where it
//!    is, with a `Ready=False`/`NodeLost` condition saying why;
//! 3. **scheduling** — each VM that should run and has no node
//!    (`status.node`) is placed on a Ready, uncordoned node whose labels
//!    match its `nodeSelector`, with room for its CPUs and memory and a
//!    healthy replica of each of its volumes, preferring the node that is
//!    least loaded (memory share) after placement. The daemon of that node
//!    then starts it (the VM controller runs only VMs placed on its node).
//!
//! Draining is done by each node for itself (`node::drainer`): it shuts
//! its VMs down and clears their `status.node`, and step 3 places them.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use hci_core::model::{
    ConditionStatus, Node, NodeResources, Resource, RunStrategy, VirtualMachine, VmPhase, Volume,
    set_condition,
};
use hci_core::store::{LeaseId, Precondition, PutOptions, StateStore};
use hci_core::{Error, Result};

use super::node::{ALIVE_PREFIX, ClusterOptions, LEADER_KEY, LeaseCell};
use super::{Runtime, set_status};
use crate::api::REQUESTED_ACTION;
use crate::resources::ResourceStore;

/// vCPUs per allocatable CPU a node takes in total (as the VM controller's
/// admission allows).
const CPU_OVERCOMMIT: u32 = 8;

/// Takes part in the leader election while this node holds its liveness
/// lease, and runs the cluster-wide controllers while it leads.
pub(crate) async fn lead(rt: Runtime, options: ClusterOptions, lease: LeaseCell) {
    let store = rt.resources.state_store().clone();
    let me = rt.node.name.clone();
    let mut leading = false;
    let mut again = false;
    loop {
        if !again {
            tokio::time::sleep(options.tick).await;
        }
        again = false;
        let current = *lease.borrow();
        let now_leading = match current {
            Some(id) => match elect(&*store, &me, id).await {
                Ok(won) => won,
                Err(e) => {
                    tracing::debug!(error = %e, "leader election failed");
                    false
                }
            },
            None => false,
        };
        if now_leading != leading {
            if now_leading {
                tracing::info!(node = me, "leading the cluster-wide controllers");
            } else {
                tracing::info!(node = me, "no longer leading");
            }
            leading = now_leading;
        }
        if leading {
            match tick(&rt, options).await {
                Ok(changed) => again = changed,
                Err(e) => tracing::warn!(error = %e, "cluster controllers failed; retrying"),
            }
        }
    }
}

/// Whether `me` leads: holds [`LEADER_KEY`] on `lease`, or takes it now.
async fn elect(store: &dyn StateStore, me: &str, lease: LeaseId) -> Result<bool> {
    if let Some(kv) = store.get(LEADER_KEY).await? {
        return Ok(kv.value == me.as_bytes() && kv.lease == Some(lease));
    }
    let take = PutOptions {
        precondition: Precondition::MustNotExist,
        lease: Some(lease),
    };
    match store.put(LEADER_KEY, me.as_bytes().to_vec(), take).await {
        Ok(_) => Ok(true),
        Err(Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The name of the current leader, if any.
pub async fn leader(store: &dyn StateStore) -> Result<Option<String>> {
    Ok(store
        .get(LEADER_KEY)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Names of the nodes holding a liveness lease now.
pub async fn alive_nodes(store: &dyn StateStore) -> Result<BTreeSet<String>> {
    Ok(store
        .list(ALIVE_PREFIX)
        .await?
        .items
        .into_iter()
        .filter_map(|kv| kv.key.strip_prefix(ALIVE_PREFIX).map(str::to_string))
        .collect())
}

fn ready(node: &Node) -> Option<&hci_core::model::Condition> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == "Ready"))
}

fn is_ready(node: &Node) -> bool {
    ready(node).is_some_and(|c| c.status == ConditionStatus::True)
}

/// Since when a node has been NotReady (`None`: it is Ready).
pub(crate) fn not_ready_since(node: &Node) -> Option<DateTime<Utc>> {
    match ready(node) {
        Some(c) if c.status != ConditionStatus::True => Some(c.last_transition.unwrap_or_default()),
        Some(_) => None,
        None => Some(DateTime::<Utc>::default()),
    }
}

fn running_phase(phase: VmPhase) -> bool {
    matches!(
        phase,
        VmPhase::Running | VmPhase::Paused | VmPhase::Starting | VmPhase::Stopping
    )
}

/// Whether a VM should be on a node now (and so be scheduled).
pub fn needs_node(vm: &VirtualMachine) -> bool {
    let status = vm.status_or_default();
    match vm.spec.run_strategy {
        RunStrategy::Always => true,
        RunStrategy::RerunOnFailure => status.phase != VmPhase::Stopped,
        RunStrategy::Manual => {
            let asked = vm
                .metadata
                .annotations
                .get(REQUESTED_ACTION)
                .is_some_and(|a| a == "start" || a == "restart");
            asked
                || running_phase(status.phase)
                || (status.phase == VmPhase::Pending && status.started_at.is_some())
        }
        RunStrategy::Halted => false,
    }
}

/// Whether a VM placed on a node counts against its capacity.
fn consumes(vm: &VirtualMachine) -> bool {
    needs_node(vm) || running_phase(vm.status_or_default().phase)
}

/// One pass of the cluster-wide controllers; true if it changed anything
/// (the leader then looks again at once).
async fn tick(rt: &Runtime, options: ClusterOptions) -> Result<bool> {
    let store = rt.resources.state_store();
    let alive = alive_nodes(&**store).await?;
    let mut changed = false;
    // 1. Node health.
    for node in rt.resources.list::<Node>().await?.items {
        let lease_expired = ready(&node).is_some_and(|c| c.reason == "NodeLeaseExpired");
        if alive.contains(node.name()) {
            // Back (or marked from a stale view): Ready again at once rather
            // than at its next heartbeat.
            if lease_expired && !is_ready(&node) {
                set_status(&rt.resources, node.name(), |n: &mut Node| {
                    set_condition(
                        &mut n.status_mut().conditions,
                        "Ready",
                        ConditionStatus::True,
                        "DaemonRunning",
                        "liveness lease renewed",
                    );
                })
                .await?;
                changed = true;
            }
            continue;
        }
        if !is_ready(&node) && ready(&node).is_some() {
            continue;
        }
        // Look again: the node may have come back since the list.
        let key = format!("{ALIVE_PREFIX}{}", node.name());
        if store.get(&key).await?.is_some() {
            continue;
        }
        let message = format!(
            "its daemon stopped renewing its liveness lease (TTL {:?})",
            options.lease_ttl
        );
        set_status(&rt.resources, node.name(), |n: &mut Node| {
            set_condition(
                &mut n.status_mut().conditions,
                "Ready",
                ConditionStatus::False,
                "NodeLeaseExpired",
                &message,
            );
        })
        .await?;
        tracing::warn!(node = node.name(), "node NotReady: {message}");
        rt.events
            .warning("Node", node.name(), "NotReady", &message)
            .await;
        changed = true;
    }
    let nodes: BTreeMap<String, Node> = rt
        .resources
        .list::<Node>()
        .await?
        .items
        .into_iter()
        .map(|n| (n.name().to_string(), n))
        .collect();
    // 2. Failover.
    let now = Utc::now();
    let grace = chrono::Duration::from_std(options.failover_grace).unwrap_or_default();
    for vm in rt.resources.list::<VirtualMachine>().await?.items {
        let Some(on) = vm.status_or_default().node.clone() else {
            continue;
        };
        if alive.contains(&on) {
            continue;
        }
        let since = match nodes.get(&on) {
            // A removed node: nothing will come back.
            None => None,
            Some(node) => match not_ready_since(node) {
                Some(since) if since + grace <= now => Some(since),
                _ => continue,
            },
        };
        changed |= failover(rt, &vm, &on, since, now).await?;
    }
    // 3. Scheduling.
    changed |= schedule(rt, &nodes, &alive).await?;
    Ok(changed)
}

/// Takes `vm` off the lost node `on`; see the module docs.
async fn failover(
    rt: &Runtime,
    vm: &VirtualMachine,
    on: &str,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<bool> {
    let name = vm.name();
    let status = vm.status_or_default();
    let restart = match vm.spec.run_strategy {
        RunStrategy::Always => true,
        RunStrategy::RerunOnFailure => status.phase != VmPhase::Stopped,
        RunStrategy::Manual | RunStrategy::Halted => false,
    };
    let down = match since {
        Some(since) => format!(
            "node {on} has been NotReady for {} s",
            (now - since).num_seconds()
        ),
        None => format!("node {on} was removed"),
    };
    if restart && let Some(blocker) = fence(&rt.resources, rt.replicas.as_deref(), vm, on).await? {
        let message = format!("{down}; not restarted elsewhere: {blocker}");
        let before = status
            .conditions
            .iter()
            .find(|c| c.kind == "Ready")
            .map(|c| c.reason.clone());
        set_status(&rt.resources, name, |v: &mut VirtualMachine| {
            let s = v.status_mut();
            s.message = message.clone();
            set_condition(
                &mut s.conditions,
                "Ready",
                ConditionStatus::False,
                "NodeLost",
                &message,
            );
        })
        .await?;
        if before.as_deref() != Some("NodeLost") {
            rt.events
                .warning("VirtualMachine", name, "NodeLost", &message)
                .await;
        }
        return Ok(false);
    }
    let message = if restart {
        format!("{down}: restarting on another node")
    } else {
        format!(
            "{down}: stopped (run strategy {:?} does not restart it)",
            vm.spec.run_strategy
        )
    };
    let on_owned = on.to_string();
    set_status(&rt.resources, name, |v: &mut VirtualMachine| {
        let s = v.status_mut();
        if s.node.as_deref() != Some(on_owned.as_str()) {
            return;
        }
        s.node = None;
        s.phase = if restart {
            VmPhase::Pending
        } else {
            VmPhase::Stopped
        };
        s.message = message.clone();
        set_condition(
            &mut s.conditions,
            "Ready",
            ConditionStatus::False,
            "NodeLost",
            &message,
        );
    })
    .await?;
    tracing::warn!(vm = name, node = on, restart, "failover: {message}");
    rt.events
        .warning("VirtualMachine", name, "NodeLost", &message)
        .await;
    Ok(true)
}

/// The fencing step of a failover: makes sure the lost node `dead` can
/// never write `vm`'s volumes again before the VM starts elsewhere.
/// Returns why the VM cannot move, if it cannot.
///
/// - A volume without a healthy replica outside `dead` (every local
///   volume of a VM that ran there) cannot move: the VM waits for its
///   node.
/// - A replicated volume with a replica on `dead` is fenced by opening its
///   engine here over its replica servers: the new engine generation makes
///   the replicas refuse the lost node's engine from then on (the replica
///   on `dead` does not answer and is left out; it rebuilds when its node
///   returns). Without `replicas` (this node serves none) it cannot be.
/// - A volume that lives only on other nodes needs nothing.
pub async fn fence(
    resources: &ResourceStore,
    replicas: Option<&super::replicas::ReplicaPool>,
    vm: &VirtualMachine,
    dead: &str,
) -> Result<Option<String>> {
    for disk in &vm.spec.disks {
        let Some(vol) = resources.try_get::<Volume>(&disk.volume).await? else {
            continue;
        };
        let status = vol.status_or_default();
        let on_dead = status.replicas.iter().any(|r| r.node == dead);
        let elsewhere = status.replicas.iter().any(|r| r.node != dead && r.healthy);
        if !elsewhere {
            return Ok(Some(format!(
                "volume {:?} has no healthy replica outside node {dead} (a local volume cannot move; the VM waits for its node)",
                disk.volume
            )));
        }
        if !on_dead {
            continue;
        }
        let addresses = super::replicas::placed(&vol);
        let (Some(pool), true) = (replicas, vol.spec.replicas > 1 && !addresses.is_empty()) else {
            return Ok(Some(format!(
                "volume {:?} has a replica on node {dead} and cannot be fenced from here",
                disk.volume
            )));
        };
        let key = super::volume::encryption_key(&vol)?;
        let fenced = async {
            let engine = pool
                .backend(&addresses)?
                .open_engine(
                    vol.name(),
                    hci_core::volume::OpenVolume {
                        read_only: false,
                        encryption_key: key,
                    },
                )
                .await?;
            let generation = engine.generation();
            engine.close().await?;
            Ok::<_, hci_core::Error>(generation)
        }
        .await;
        match fenced {
            Ok(generation) => {
                tracing::info!(
                    volume = vol.name(),
                    node = dead,
                    generation,
                    "fenced: the lost node's engine is refused from now on"
                );
            }
            Err(e) => {
                return Ok(Some(format!(
                    "volume {:?} could not be fenced: {e}",
                    disk.volume
                )));
            }
        }
    }
    Ok(None)
}

/// Why node `name` may not be removed now, if it may not: its daemon
/// runs (the node is Ready), VMs are placed on it, or it holds the only
/// healthy replica of a volume. The API refuses such deletes (hcictl checks
/// the same first, for a friendlier message).
pub async fn node_removal_blocker(resources: &ResourceStore, name: &str) -> Result<Option<String>> {
    let Some(node) = resources.try_get::<Node>(name).await? else {
        return Ok(None);
    };
    if is_ready(&node) {
        return Ok(Some(format!(
            "node {name} is Ready: drain it and stop its daemon before removing it"
        )));
    }
    let on: Vec<String> = resources
        .list::<VirtualMachine>()
        .await?
        .items
        .into_iter()
        .filter(|vm| vm.status_or_default().node.as_deref() == Some(name))
        .map(|vm| vm.name().to_string())
        .collect();
    if !on.is_empty() {
        return Ok(Some(format!(
            "node {name} still holds VMs: {} (drain it first, or wait for the failover)",
            on.join(", ")
        )));
    }
    for vol in resources.list::<Volume>().await?.items {
        let replicas = vol.status_or_default().replicas;
        let here = replicas.iter().any(|r| r.node == name && r.healthy);
        let elsewhere = replicas.iter().any(|r| r.node != name && r.healthy);
        if here && !elsewhere {
            return Ok(Some(format!(
                "node {name} holds the only healthy replica of volume {:?}",
                vol.name()
            )));
        }
    }
    Ok(None)
}

/// What is placed on a node.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    cpus: u32,
    memory: u64,
    vms: usize,
}

/// Places every VM that needs a node; true if any was placed.
async fn schedule(
    rt: &Runtime,
    nodes: &BTreeMap<String, Node>,
    alive: &BTreeSet<String>,
) -> Result<bool> {
    let vms = rt.resources.list::<VirtualMachine>().await?.items;
    let mut load: BTreeMap<String, Load> = BTreeMap::new();
    for vm in &vms {
        if let Some(on) = &vm.status_or_default().node
            && consumes(vm)
        {
            let l = load.entry(on.clone()).or_default();
            l.cpus += vm.spec.cpus;
            l.memory += vm.spec.memory.0;
            l.vms += 1;
        }
    }
    let mut waiting: Vec<&VirtualMachine> = vms
        .iter()
        .filter(|vm| vm.status_or_default().node.is_none() && needs_node(vm))
        .collect();
    // Oldest first, so a stream of new VMs cannot starve an old one.
    waiting.sort_by_key(|vm| (vm.metadata.created_at, vm.name().to_string()));
    let mut placed_any = false;
    for vm in waiting {
        let replicas = volume_nodes(rt, vm).await?;
        match choose(vm, nodes, alive, &load, replicas.as_ref()) {
            Ok(node) => {
                let message = format!("placed on node {node}");
                let target = node.clone();
                let mut placed = false;
                let result = rt
                    .resources
                    .modify::<VirtualMachine, _>(vm.name(), None, |v| {
                        placed = false;
                        let s = v.status_mut();
                        if s.node.is_some() {
                            return Ok(());
                        }
                        s.node = Some(target.clone());
                        if s.phase != VmPhase::Stopped {
                            s.phase = VmPhase::Pending;
                        }
                        set_condition(
                            &mut s.conditions,
                            "Scheduled",
                            ConditionStatus::True,
                            "Scheduled",
                            &message,
                        );
                        placed = true;
                        Ok(())
                    })
                    .await;
                match result {
                    Ok(_) if placed => {
                        let l = load.entry(node.clone()).or_default();
                        l.cpus += vm.spec.cpus;
                        l.memory += vm.spec.memory.0;
                        l.vms += 1;
                        placed_any = true;
                        tracing::info!(vm = vm.name(), node, "VM scheduled");
                        rt.events
                            .normal("VirtualMachine", vm.name(), "Scheduled", &message)
                            .await;
                    }
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(why) => {
                let message = format!("no node can run it: {why}");
                let result = set_status(&rt.resources, vm.name(), |v: &mut VirtualMachine| {
                    let s = v.status_mut();
                    if s.phase != VmPhase::Stopped {
                        s.phase = VmPhase::Pending;
                    }
                    s.message = message.clone();
                    set_condition(
                        &mut s.conditions,
                        "Scheduled",
                        ConditionStatus::False,
                        "Unschedulable",
                        &message,
                    );
                })
                .await;
                match result {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(placed_any)
}

/// Picks the node a live migration of `vm` goes to: `wanted` if given
/// (checked like a placement), else the best node by the placement rules;
/// never `source`. `Err` says why no node fits.
pub(crate) async fn migration_target(
    rt: &Runtime,
    vm: &VirtualMachine,
    source: &str,
    wanted: Option<&str>,
) -> Result<std::result::Result<String, String>> {
    let alive = alive_nodes(&**rt.resources.state_store()).await?;
    let nodes: BTreeMap<String, Node> = rt
        .resources
        .list::<Node>()
        .await?
        .items
        .into_iter()
        .filter(|n| n.name() != source && wanted.is_none_or(|w| n.name() == w))
        .map(|n| (n.name().to_string(), n))
        .collect();
    if let Some(w) = wanted
        && !nodes.contains_key(w)
    {
        return Ok(Err(if w == source {
            format!("the VM already runs on node {w}")
        } else {
            format!("there is no node {w:?}")
        }));
    }
    let mut load: BTreeMap<String, Load> = BTreeMap::new();
    for other in rt.resources.list::<VirtualMachine>().await?.items {
        if let Some(on) = &other.status_or_default().node
            && consumes(&other)
        {
            let l = load.entry(on.clone()).or_default();
            l.cpus += other.spec.cpus;
            l.memory += other.spec.memory.0;
            l.vms += 1;
        }
    }
    let replicas = volume_nodes(rt, vm).await?;
    Ok(choose(vm, &nodes, &alive, &load, replicas.as_ref()))
}

/// For each disk of `vm`, the nodes holding a healthy replica of its
/// volume (`None` if the VM has no disks). A volume without replicas yet
/// gives an empty set (the VM waits).
async fn volume_nodes(
    rt: &Runtime,
    vm: &VirtualMachine,
) -> Result<Option<Vec<(String, BTreeSet<String>)>>> {
    if vm.spec.disks.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for disk in &vm.spec.disks {
        let nodes = match rt.resources.try_get::<Volume>(&disk.volume).await? {
            Some(vol) => vol
                .status_or_default()
                .replicas
                .iter()
                .filter(|r| r.healthy)
                .map(|r| r.node.clone())
                .collect(),
            None => BTreeSet::new(),
        };
        out.push((disk.volume.clone(), nodes));
    }
    Ok(Some(out))
}

/// Picks the node for `vm`, or says why none fits.
fn choose(
    vm: &VirtualMachine,
    nodes: &BTreeMap<String, Node>,
    alive: &BTreeSet<String>,
    load: &BTreeMap<String, Load>,
    volumes: Option<&Vec<(String, BTreeSet<String>)>>,
) -> std::result::Result<String, String> {
    let mut best: Option<(u128, usize, &str)> = None;
    let mut refusals = Vec::new();
    for (name, node) in nodes {
        let refuse = |why: String| format!("{name}: {why}");
        if !alive.contains(name) || !is_ready(node) {
            refusals.push(refuse("NotReady".into()));
            continue;
        }
        if node.spec.maintenance {
            refusals.push(refuse("in maintenance".into()));
            continue;
        }
        if node.spec.cordoned {
            refusals.push(refuse("cordoned".into()));
            continue;
        }
        if let Some((k, v)) = vm
            .spec
            .node_selector
            .iter()
            .find(|(k, v)| node.metadata.labels.get(*k) != Some(*v))
        {
            refusals.push(refuse(format!("no label {k}={v}")));
            continue;
        }
        if let Some(volumes) = volumes
            && let Some((vol, _)) = volumes.iter().find(|(_, on)| !on.contains(name))
        {
            refusals.push(refuse(format!(
                "holds no healthy replica of volume {vol:?}"
            )));
            continue;
        }
        let alloc: NodeResources = node
            .status
            .as_ref()
            .map(|s| s.allocatable)
            .unwrap_or_default();
        let used = load.get(name).copied().unwrap_or_default();
        let free = alloc.memory.0.saturating_sub(used.memory);
        if free < vm.spec.memory.0 {
            refusals.push(refuse(format!(
                "{} memory free, needs {}",
                hci_core::model::ByteSize(free),
                vm.spec.memory
            )));
            continue;
        }
        if used.cpus + vm.spec.cpus > alloc.cpus * CPU_OVERCOMMIT {
            refusals.push(refuse(format!(
                "{} of {} vCPUs taken, needs {}",
                used.cpus,
                alloc.cpus * CPU_OVERCOMMIT,
                vm.spec.cpus
            )));
            continue;
        }
        // Spread: the lowest memory share after placement (per mille),
        // then the fewest VMs, then the name.
        let share =
            u128::from(used.memory + vm.spec.memory.0) * 1000 / u128::from(alloc.memory.0.max(1));
        let key = (share, used.vms, name.as_str());
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    match best {
        Some((_, _, name)) => Ok(name.to_string()),
        None if nodes.is_empty() => Err("no nodes are registered".into()),
        None => Err(format!(
            "0 of {} nodes fit ({})",
            nodes.len(),
            refusals.join("; ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::model::{BootSpec, ByteSize, NodeSpec, NodeStatus};

    fn node(name: &str, memory_gib: u64, ready: bool) -> Node {
        let mut n = Node::new(name.to_string(), NodeSpec::default());
        let mut status = NodeStatus {
            allocatable: NodeResources {
                cpus: 2,
                memory: ByteSize(memory_gib << 30),
                storage: ByteSize(0),
            },
            ..NodeStatus::default()
        };
        set_condition(
            &mut status.conditions,
            "Ready",
            if ready {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            "",
            "",
        );
        n.status = Some(status);
        n
    }

    fn vm(memory_mib: u64) -> VirtualMachine {
        VirtualMachine::builder("v")
            .cpus(1)
            .memory(ByteSize(memory_mib << 20))
            .boot(BootSpec::kernel("guest:kbd", ""))
            .build()
    }

    fn cluster(nodes: Vec<Node>) -> (BTreeMap<String, Node>, BTreeSet<String>) {
        let alive = nodes.iter().map(|n| n.name().to_string()).collect();
        (
            nodes
                .into_iter()
                .map(|n| (n.name().to_string(), n))
                .collect(),
            alive,
        )
    }

    #[test]
    fn spreads_by_memory_share() {
        let (nodes, alive) = cluster(vec![node("a", 4, true), node("b", 4, true)]);
        let mut load = BTreeMap::new();
        load.insert(
            "a".to_string(),
            Load {
                cpus: 1,
                memory: 1 << 30,
                vms: 1,
            },
        );
        assert_eq!(
            choose(&vm(512), &nodes, &alive, &load, None),
            Ok("b".into())
        );
        assert_eq!(
            choose(&vm(512), &nodes, &alive, &BTreeMap::new(), None),
            Ok("a".into())
        );
    }

    #[test]
    fn skips_unready_cordoned_unlabelled_and_full_nodes() {
        let mut cordoned = node("c", 8, true);
        cordoned.spec.cordoned = true;
        let mut labelled = node("d", 1, true);
        labelled
            .metadata
            .labels
            .insert("zone".to_string(), "x".to_string());
        let (nodes, mut alive) = cluster(vec![
            node("a", 8, false),
            node("b", 8, true),
            cordoned,
            labelled,
        ]);
        alive.remove("b");
        let mut want = vm(2048);
        want.spec
            .node_selector
            .insert("zone".to_string(), "x".to_string());
        let why = choose(&want, &nodes, &alive, &BTreeMap::new(), None).expect_err("no fit");
        assert!(why.contains("a: NotReady"), "{why}");
        assert!(why.contains("b: NotReady"), "{why}");
        assert!(why.contains("c: cordoned"), "{why}");
        assert!(why.contains("d: 1Gi memory free, needs 2Gi"), "{why}");
        want.spec.memory = ByteSize(512 << 20);
        assert_eq!(
            choose(&want, &nodes, &alive, &BTreeMap::new(), None),
            Ok("d".into())
        );
    }

    #[tokio::test]
    async fn fence_keeps_vms_with_volumes_on_the_lost_node() {
        use hci_core::model::{ReplicaStatus, VolumeSpec};
        let resources =
            ResourceStore::new(std::sync::Arc::new(hci_core::memory::MemStateStore::new()));
        let replica = |node: &str| ReplicaStatus {
            node: node.to_string(),
            healthy: true,
            rebuild_percent: None,
            address: None,
        };
        for (name, on) in [("local", vec!["a"]), ("remote", vec!["b"])] {
            let mut v = Volume::new(name.to_string(), VolumeSpec::blank(ByteSize::mib(64)));
            v.status_mut().replicas = on.into_iter().map(replica).collect();
            resources.create(v).await.expect("create volume");
        }
        let diskless = vm(64);
        assert_eq!(
            fence(&resources, None, &diskless, "a")
                .await
                .expect("fence"),
            None
        );
        let mut remote = vm(64);
        remote.spec.disks = VirtualMachine::builder("x")
            .disk("d", "remote")
            .build()
            .spec
            .disks;
        assert_eq!(
            fence(&resources, None, &remote, "a").await.expect("fence"),
            None
        );
        let mut local = vm(64);
        local.spec.disks = VirtualMachine::builder("x")
            .disk("d", "local")
            .build()
            .spec
            .disks;
        let why = fence(&resources, None, &local, "a")
            .await
            .expect("fence")
            .expect("a local volume on the lost node blocks");
        assert!(
            why.contains("volume \"local\" has no healthy replica outside node a"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn nodes_in_use_cannot_be_removed() {
        use hci_core::model::{ReplicaStatus, VolumeSpec};
        let resources =
            ResourceStore::new(std::sync::Arc::new(hci_core::memory::MemStateStore::new()));
        for (name, ready) in [("up", true), ("down", false), ("gone", false)] {
            resources.create(node(name, 4, ready)).await.expect("node");
        }
        let mut v = vm(64);
        v.status_mut().node = Some("down".into());
        resources.create(v).await.expect("vm");
        let mut vol = Volume::new("only", VolumeSpec::blank(ByteSize::mib(64)));
        vol.status_mut().replicas = vec![ReplicaStatus {
            node: "gone".into(),
            healthy: true,
            rebuild_percent: None,
            address: None,
        }];
        resources.create(vol).await.expect("volume");
        let why = |n: &'static str| {
            let resources = resources.clone();
            async move { node_removal_blocker(&resources, n).await.expect("check") }
        };
        assert!(why("up").await.is_some_and(|w| w.contains("is Ready")));
        assert!(
            why("down")
                .await
                .is_some_and(|w| w.contains("still holds VMs: v"))
        );
        assert!(
            why("gone")
                .await
                .is_some_and(|w| w.contains("only healthy replica"))
        );
        assert_eq!(why("nowhere").await, None);
        let mut moved: Volume = resources.get("only").await.expect("volume");
        moved.status_mut().replicas[0].node = "up".into();
        resources.update(moved).await.expect("status");
        assert_eq!(why("gone").await, None);
    }

    #[test]
    fn follows_volume_replicas() {
        let (nodes, alive) = cluster(vec![node("a", 4, true), node("b", 4, true)]);
        let volumes = vec![("disk".to_string(), BTreeSet::from(["b".to_string()]))];
        assert_eq!(
            choose(&vm(64), &nodes, &alive, &BTreeMap::new(), Some(&volumes)),
            Ok("b".into())
        );
        let nowhere = vec![("disk".to_string(), BTreeSet::new())];
        assert!(choose(&vm(64), &nodes, &alive, &BTreeMap::new(), Some(&nowhere)).is_err());
    }
}
