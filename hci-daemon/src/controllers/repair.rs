//! Keeping replicated volumes whole: who looks after a volume in cluster
//! mode, replicas moved off lost nodes, and rebuilds.
//!
//! **Who reconciles a volume** (cluster mode; [`handler`]): the node running
//! the VM it is attached to (that node has the engine's control socket),
//! else the node of its first replica, else — when that node is not alive —
//! the leader. So a volume whose owner died is still looked after: its
//! health shows the lost replica, and its replicas are repaired.
//!
//! **Lost replicas** ([`replace_lost`]): a replica whose node has been
//! NotReady for longer than [`super::ClusterOptions::replica_grace`] (or
//! whose node was removed) is given a new place on a Ready, uncordoned node
//! that holds no replica of the volume yet (least used first), recorded in
//! `status.replicas` in its slot. A node back before the grace keeps its
//! replica, which catches up.
//!
//! **Rebuilds**: while a VM uses the volume, its engine is told through the
//! control socket to drop a replica it lost and to add the placed replicas
//! it lacks or holds as failed/stale ([`engine_repair`]: `remove` then
//! `add`; the engine rebuilds in the background, copying only what
//! differs). A detached volume's stale or missing replicas are rebuilt by an
//! engine opened here for the time it takes ([`rebuild_detached`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use hci_core::Result;
use hci_core::model::{Node, Resource, VirtualMachine, Volume};
use hci_core::volume::OpenVolume;
use hci_storage::control::{ControlRequest, StatusView};
use hci_storage::engine::rebuild::RebuildProgress;
use hci_storage::replica::ReplicaNode;

use super::replicas::ReplicaPool;
use super::{Runtime, join_err, set_status};

/// How long a replica server has to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The node that reconciles `vol` in cluster mode (see the module docs);
/// `None` while there is no leader to fall back to.
pub(crate) async fn handler(
    rt: &Runtime,
    vol: &Volume,
    alive: &BTreeSet<String>,
) -> Result<Option<String>> {
    let st = vol.status_or_default();
    if let Some(vm) = &st.attached_to
        && let Some(v) = rt.resources.try_get::<VirtualMachine>(vm).await?
        && let Some(node) = v.status_or_default().node
        && alive.contains(&node)
    {
        return Ok(Some(node));
    }
    if let Some(first) = st.replicas.first()
        && alive.contains(&first.node)
    {
        return Ok(Some(first.node.clone()));
    }
    super::scheduler::leader(&**rt.resources.state_store()).await
}

/// Whether the VM `vol` is attached to runs on this node (so its engine's
/// control socket is here).
pub(crate) async fn engine_here(rt: &Runtime, vol: &Volume) -> Result<bool> {
    let Some(vm) = vol.status_or_default().attached_to else {
        return Ok(false);
    };
    Ok(rt
        .resources
        .try_get::<VirtualMachine>(&vm)
        .await?
        .and_then(|v| v.status_or_default().node)
        .is_some_and(|n| n == rt.node.name))
}

/// Nodes among `placement` lost for longer than `grace`: removed, or
/// without a liveness lease and NotReady since longer than that.
pub(crate) fn lost_nodes(
    placement: &[(String, String)],
    nodes: &[Node],
    alive: &BTreeSet<String>,
    grace: Duration,
) -> BTreeSet<String> {
    let now = Utc::now();
    let grace = chrono::Duration::from_std(grace).unwrap_or_default();
    placement
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !alive.contains(*n))
        .filter(|n| match nodes.iter().find(|x| x.name() == n.as_str()) {
            None => true,
            Some(node) => super::scheduler::not_ready_since(node).is_some_and(|t| t + grace <= now),
        })
        .cloned()
        .collect()
}

/// Picks a new place for a replica of a volume placed on `placement`:
/// a candidate node holding none of its replicas, the least used first.
pub(crate) fn replacement(
    placement: &[(String, String)],
    candidates: &[(String, Vec<String>)],
    alive: &BTreeSet<String>,
    used: &BTreeMap<String, usize>,
) -> Option<(String, String)> {
    let taken: BTreeSet<&str> = placement.iter().map(|(n, _)| n.as_str()).collect();
    candidates
        .iter()
        .filter(|(n, disks)| !taken.contains(n.as_str()) && alive.contains(n) && !disks.is_empty())
        .min_by_key(|(n, _)| (used.get(n).copied().unwrap_or(0), n.clone()))
        .map(|(n, disks)| (n.clone(), disks[0].clone()))
}

/// Moves the replicas of `vol` held by lost nodes to other nodes (cluster
/// mode) and records the new placement; returns it (unchanged when nothing
/// was lost or no node can take a replica).
pub(crate) async fn replace_lost(
    rt: &Runtime,
    pool: &ReplicaPool,
    vol: &Volume,
    placement: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let Some(cluster) = &rt.cluster else {
        return Ok(placement);
    };
    let store = rt.resources.state_store();
    let alive = super::scheduler::alive_nodes(&**store).await?;
    let nodes = rt.resources.list::<Node>().await?.items;
    let lost = lost_nodes(&placement, &nodes, &alive, cluster.replica_grace);
    if lost.is_empty() {
        return Ok(placement);
    }
    let candidates = super::replicas::candidates(&nodes, &rt.node.name, &pool.addresses());
    let mut used = BTreeMap::new();
    for v in rt.resources.list::<Volume>().await?.items {
        for r in v.status_or_default().replicas {
            *used.entry(r.node).or_insert(0usize) += 1;
        }
    }
    let mut next = placement.clone();
    let mut moves = Vec::new();
    for slot in 0..next.len() {
        if !lost.contains(&next[slot].0) {
            continue;
        }
        match replacement(&next, &candidates, &alive, &used) {
            Some(to) => {
                *used.entry(to.0.clone()).or_insert(0) += 1;
                moves.push((next[slot].clone(), to.clone()));
                next[slot] = to;
            }
            None => {
                tracing::warn!(
                    volume = vol.name(),
                    node = next[slot].0,
                    "a lost replica has nowhere to go"
                );
            }
        }
    }
    if moves.is_empty() {
        return Ok(placement);
    }
    let (before, after) = (placement.clone(), next.clone());
    let applied = AtomicBool::new(false);
    set_status(&rt.resources, vol.name(), |v: &mut Volume| {
        applied.store(false, Ordering::Relaxed);
        let now: Vec<(String, String)> = v
            .status_or_default()
            .replicas
            .iter()
            .filter_map(|r| r.address.clone().map(|a| (r.node.clone(), a)))
            .collect();
        if now != before {
            return;
        }
        let st = v.status_mut();
        for (r, (node, address)) in st.replicas.iter_mut().zip(&after) {
            if r.address.as_deref() != Some(address.as_str()) {
                r.node = node.clone();
                r.address = Some(address.clone());
                r.healthy = false;
                r.rebuild_percent = Some(0);
            }
        }
        applied.store(true, Ordering::Relaxed);
    })
    .await?;
    if !applied.load(Ordering::Relaxed) {
        // Changed meanwhile: the next reconcile starts from the new status.
        return Ok(placement);
    }
    for ((from, _), (to, address)) in moves {
        let message = format!(
            "node {from} has been lost for longer than {:?}: replica moved to node {to} ({address}), rebuilding",
            cluster.replica_grace
        );
        tracing::warn!(volume = vol.name(), "{message}");
        rt.events
            .warning("Volume", vol.name(), "ReplicaMoved", &message)
            .await;
    }
    Ok(next)
}

/// Sends `req` to the engine control socket `socket`.
async fn call(socket: &Path, req: ControlRequest) -> Result<hci_storage::control::ControlReply> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || hci_storage::control::call(&socket, &req))
        .await
        .map_err(join_err("engine control"))?
}

/// Whether the replica server at `address` answers.
async fn answers(pool: &ReplicaPool, address: &str) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, pool.node(address).ping())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Brings the engine of an attached volume in line with `placement`: drops
/// replicas it holds that are no longer placed, and adds (rebuilding) the
/// placed ones it lacks or holds as failed or stale, when their servers
/// answer. `view` is the engine's status. Returns true if it asked for
/// anything.
pub(crate) async fn engine_repair(
    pool: &ReplicaPool,
    name: &str,
    socket: &Path,
    view: &StatusView,
    placement: &[(String, String)],
) -> bool {
    let mut asked = false;
    for (_, address) in placement {
        let state = view
            .replicas
            .iter()
            .find(|r| &r.node == address)
            .map(|r| r.state.as_str());
        if !matches!(state, None | Some("failed" | "stale")) || !answers(pool, address).await {
            continue;
        }
        if state.is_some() {
            let _ = call(
                socket,
                ControlRequest::Remove {
                    replica: address.clone(),
                },
            )
            .await;
        }
        match call(
            socket,
            ControlRequest::Add {
                replica: address.clone(),
            },
        )
        .await
        {
            Ok(r) if r.ok => {
                tracing::info!(
                    volume = name,
                    replica = address,
                    "replica re-added: rebuilding"
                );
                asked = true;
            }
            Ok(r) => {
                tracing::warn!(volume = name, replica = address, error = ?r.error, "the engine refused to add a replica")
            }
            Err(e) => {
                tracing::warn!(volume = name, replica = address, error = %e, "cannot reach the engine")
            }
        }
    }
    let placed: BTreeSet<&str> = placement.iter().map(|(_, a)| a.as_str()).collect();
    for r in &view.replicas {
        if placed.contains(r.node.as_str()) {
            continue;
        }
        match call(
            socket,
            ControlRequest::Remove {
                replica: r.node.clone(),
            },
        )
        .await
        {
            Ok(reply) if reply.ok => {
                tracing::info!(
                    volume = name,
                    replica = r.node,
                    "replica no longer placed removed from the engine"
                );
                asked = true;
            }
            Ok(reply) => {
                tracing::debug!(volume = name, replica = r.node, error = ?reply.error, "cannot remove a replica yet")
            }
            Err(e) => tracing::debug!(volume = name, error = %e, "cannot reach the engine"),
        }
    }
    asked
}

/// A detached replica's state, as its server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// It answers and holds the volume at this membership epoch.
    Epoch(u64),
    /// It answers but holds no copy.
    Missing,
    /// It does not answer.
    Down,
}

/// Asks each replica server of `name` what it holds.
pub(crate) async fn probe(pool: &ReplicaPool, name: &str, addresses: &[String]) -> Vec<Probe> {
    let probes = addresses.iter().map(|a| async move {
        let node = pool.node(a);
        let info = tokio::time::timeout(PROBE_TIMEOUT, node.backend().info(name)).await;
        match info {
            Ok(Ok(_)) => match tokio::time::timeout(PROBE_TIMEOUT, node.fence_state(name)).await {
                Ok(Ok(st)) => Probe::Epoch(st.epoch),
                _ => Probe::Down,
            },
            Ok(Err(e)) if e.is_not_found() => Probe::Missing,
            _ => Probe::Down,
        }
    });
    futures::future::join_all(probes).await
}

/// Which probed replicas are current: those at the highest epoch seen.
pub(crate) fn current(probes: &[Probe]) -> Vec<bool> {
    let max = probes
        .iter()
        .filter_map(|p| match p {
            Probe::Epoch(e) => Some(*e),
            _ => None,
        })
        .max();
    probes
        .iter()
        .map(|p| matches!(p, Probe::Epoch(e) if Some(*e) == max))
        .collect()
}

/// Rebuilds the replicas of detached volume `name` at `rebuild` (stale or
/// missing, their servers answering) from the current ones, with an engine
/// opened over `addresses` for the time it takes, then closed cleanly.
/// `progress` accumulates over every replica.
pub(crate) async fn rebuild_detached(
    pool: Arc<ReplicaPool>,
    name: String,
    addresses: Vec<String>,
    rebuild: Vec<String>,
    key: Option<hci_core::volume::EncryptionKey>,
    progress: Arc<RebuildProgress>,
) -> Result<()> {
    let engine = pool
        .backend(&addresses)?
        .open_engine(
            &name,
            OpenVolume {
                read_only: false,
                encryption_key: key,
            },
        )
        .await?;
    let mut result = Ok(());
    for address in &rebuild {
        let healthy =
            engine.status().await.replicas.iter().any(|r| {
                &r.node == address && r.state == hci_storage::engine::ReplicaState::Healthy
            });
        if healthy {
            continue;
        }
        let node: Arc<dyn ReplicaNode> = pool.node(address);
        match engine.add_replica(node, progress.clone()).await {
            Ok(report) => tracing::info!(
                volume = name,
                replica = address,
                scanned = report.bytes_scanned,
                sent = report.bytes_sent,
                "detached replica rebuilt"
            ),
            Err(e) => {
                tracing::warn!(volume = name, replica = address, error = %e, "rebuild failed");
                result = Err(e);
                break;
            }
        }
    }
    let closed = engine.close().await;
    result.and(closed)
}

/// Percent of `progress` done (below 100 until finished).
pub(crate) fn percent(progress: &RebuildProgress) -> u8 {
    let done = progress.done.load(Ordering::Relaxed);
    let total = progress.total.load(Ordering::Relaxed).max(1);
    (done.saturating_mul(100) / total).min(99) as u8
}

/// The volumes whose replicas this node's disks (`mine`, their server
/// addresses) should keep: every volume not yet placed, and every
/// replicated volume placed on one of them. A replica of a volume placed
/// elsewhere was moved off this node while it was lost.
pub(crate) fn replicas_to_keep(volumes: &[Volume], mine: &[String]) -> BTreeSet<String> {
    volumes
        .iter()
        .filter(|v| {
            let placed = super::replicas::placed(v);
            placed.is_empty() || placed.iter().any(|a| mine.contains(a))
        })
        .map(|v| v.name().to_string())
        .collect()
}

/// Marks the volume of a lost node (a local volume, its only replica
/// there) as such: its replica unhealthy, `Ready=False`/`NodeLost`. The
/// node's own daemon rewrites the status when it is back.
pub(crate) async fn mark_node_lost(rt: &Runtime, vol: &Volume) -> Result<()> {
    let node = vol
        .status_or_default()
        .replicas
        .first()
        .map(|r| r.node.clone())
        .unwrap_or_default();
    let message =
        format!("its node {node} is not alive; the volume is unavailable until it returns");
    let st = vol.status_or_default();
    let marked = st.replicas.iter().all(|r| !r.healthy)
        && st
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.reason == "NodeLost");
    if marked {
        return Ok(());
    }
    set_status(&rt.resources, vol.name(), |v: &mut Volume| {
        let st = v.status_mut();
        for r in &mut st.replicas {
            r.healthy = false;
        }
        hci_core::model::set_condition(
            &mut st.conditions,
            "Ready",
            hci_core::model::ConditionStatus::False,
            "NodeLost",
            &message,
        );
    })
    .await?;
    rt.events
        .warning("Volume", vol.name(), "NodeLost", &message)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_avoids_nodes_with_a_replica_and_prefers_the_least_used() {
        let placement = vec![
            ("a".to_string(), "a:1".to_string()),
            ("b".to_string(), "b:1".to_string()),
        ];
        let candidates: Vec<(String, Vec<String>)> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| (n.to_string(), vec![format!("{n}:1")]))
            .collect();
        let alive: BTreeSet<String> = ["a", "c", "d"].iter().map(|s| s.to_string()).collect();
        let used = BTreeMap::from([("c".to_string(), 3), ("d".to_string(), 1)]);
        assert_eq!(
            replacement(&placement, &candidates, &alive, &used),
            Some(("d".to_string(), "d:1".to_string()))
        );
        let alive: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(replacement(&placement, &candidates, &alive, &used), None);
    }

    #[test]
    fn replicas_placed_elsewhere_are_not_kept() {
        use hci_core::model::{ByteSize, ReplicaStatus, VolumeSpec};
        let vol = |name: &str, at: &[&str]| {
            let mut v = Volume::new(name.to_string(), VolumeSpec::blank(ByteSize::mib(1)));
            v.status_mut().replicas = at
                .iter()
                .map(|a| ReplicaStatus {
                    node: String::new(),
                    healthy: true,
                    rebuild_percent: None,
                    address: Some(a.to_string()),
                })
                .collect();
            v
        };
        let volumes = [
            vol("here", &["me:1", "b:1"]),
            vol("moved", &["b:1", "c:1"]),
            vol("new", &[]),
        ];
        let keep = replicas_to_keep(&volumes, &["me:1".to_string()]);
        assert_eq!(
            keep,
            ["here", "new"].iter().map(|s| s.to_string()).collect()
        );
    }

    #[test]
    fn only_replicas_at_the_highest_epoch_are_current() {
        assert_eq!(
            current(&[
                Probe::Epoch(4),
                Probe::Epoch(3),
                Probe::Missing,
                Probe::Down,
                Probe::Epoch(4)
            ]),
            [true, false, false, false, true]
        );
        assert_eq!(current(&[Probe::Down, Probe::Missing]), [false, false]);
    }
}
