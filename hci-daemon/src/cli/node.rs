//! `hcictl node list|cordon|uncordon|drain|maintenance|remove`.
//!
//! Cordoning and maintenance are fields of the `Node` spec; a drain is the
//! `hci.dev/drain` annotation, carried out by the node's own daemon (it
//! shuts its VMs down cleanly and the leader places them elsewhere). The
//! drain commands follow the VMs still placed on the node until none is.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use chrono::Utc;
use hci_core::model::{ConditionStatus, Node, Resource, VirtualMachine, VmPhase};
use tonic::Code;

use super::{CliError, Client, Kind, explain};
use crate::controllers::scheduler::needs_node;

/// The annotation asking a node's daemon to drain it (see
/// `controllers::node`).
const DRAIN: &str = "hci.dev/drain";

fn parse<R: Resource>(r: &crate::proto::Resource) -> Result<R, CliError> {
    serde_json::from_str(&r.json)
        .map_err(|e| CliError::Api(format!("the daemon sent an unreadable {}: {e}", R::KIND)))
}

async fn nodes(c: &Client) -> Result<Vec<Node>, CliError> {
    let list = c
        .list(Kind::Node)
        .await
        .map_err(|s| explain("list nodes", &s))?;
    list.items.iter().map(parse).collect()
}

async fn vms(c: &Client) -> Result<Vec<VirtualMachine>, CliError> {
    let list = c
        .list(Kind::Vm)
        .await
        .map_err(|s| explain("list VMs", &s))?;
    list.items.iter().map(parse).collect()
}

fn condition<'a>(node: &'a Node, kind: &str) -> Option<&'a hci_core::model::Condition> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.kind == kind))
}

fn ready(node: &Node) -> &'static str {
    match condition(node, "Ready").map(|c| c.status) {
        Some(ConditionStatus::True) => "Ready",
        Some(ConditionStatus::False) => "NotReady",
        _ => "Unknown",
    }
}

fn scheduling(node: &Node) -> String {
    let mut s = if node.spec.maintenance {
        "Maintenance".to_string()
    } else if node.spec.cordoned {
        "Cordoned".to_string()
    } else {
        "Enabled".to_string()
    };
    if node.metadata.annotations.contains_key(DRAIN) || node.spec.maintenance {
        match condition(node, "Drained") {
            Some(c) if c.status == ConditionStatus::True => s.push_str(",Drained"),
            _ => s.push_str(",Draining"),
        }
    }
    s
}

/// `hcictl node list`: each node with readiness, scheduling state and what
/// is placed on it.
pub async fn list(c: &Client) -> Result<String, CliError> {
    let nodes = nodes(c).await?;
    if nodes.is_empty() {
        return Ok("No nodes found.\n".into());
    }
    let mut placed: BTreeMap<String, (usize, u32, u64)> = BTreeMap::new();
    for vm in vms(c).await? {
        let status = vm.status_or_default();
        if let Some(node) = &status.node
            && (needs_node(&vm) || status.phase != VmPhase::Stopped)
        {
            let e = placed.entry(node.clone()).or_default();
            e.0 += 1;
            e.1 += vm.spec.cpus;
            e.2 += vm.spec.memory.0;
        }
    }
    let now = Utc::now();
    let mut rows = vec![[
        "NAME".to_string(),
        "STATUS".into(),
        "SCHEDULING".into(),
        "VMS".into(),
        "CPUS".into(),
        "MEMORY".into(),
        "HEARTBEAT".into(),
    ]];
    for n in &nodes {
        let (count, cpus, mem) = placed.get(n.name()).copied().unwrap_or_default();
        let alloc = n.status.as_ref().map(|s| s.allocatable).unwrap_or_default();
        let beat = n
            .status
            .as_ref()
            .and_then(|s| s.last_heartbeat)
            .map_or("-".to_string(), |t| {
                format!("{}s ago", (now - t).num_seconds().max(0))
            });
        rows.push([
            n.name().to_string(),
            ready(n).to_string(),
            scheduling(n),
            count.to_string(),
            format!("{cpus}/{}", alloc.cpus),
            format!("{}/{}", hci_core::model::ByteSize(mem), alloc.memory),
            beat,
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Changes a node's spec/annotations, retrying when someone else wrote it
/// meanwhile (its daemon writes the status every heartbeat).
async fn change(
    c: &Client,
    name: &str,
    mut f: impl FnMut(&mut Node) -> Result<(), CliError>,
) -> Result<Node, CliError> {
    let what = format!("node/{name}");
    for _ in 0..10 {
        let current = c
            .get(Kind::Node, name)
            .await
            .map_err(|s| explain(&what, &s))?;
        let mut node: Node = parse(&current)?;
        f(&mut node)?;
        let json = serde_json::to_string(&node).map_err(|e| CliError::Input(e.to_string()))?;
        match c.update(Kind::Node, json, current.resource_version).await {
            Ok(r) => return parse(&r),
            Err(s) if s.code() == Code::Aborted => continue,
            Err(s) => return Err(explain(&what, &s)),
        }
    }
    Err(CliError::Api(format!(
        "{what}: kept changing under us; try again"
    )))
}

/// `hcictl node cordon NAME`: no new VMs are placed there.
pub async fn cordon(c: &Client, name: &str) -> Result<String, CliError> {
    change(c, name, |n| {
        n.spec.cordoned = true;
        Ok(())
    })
    .await?;
    Ok(format!("node/{name} cordoned\n"))
}

/// `hcictl node uncordon NAME`: VMs may be placed there again (also ends a
/// drain; a node in maintenance needs `maintenance off`).
pub async fn uncordon(c: &Client, name: &str) -> Result<String, CliError> {
    change(c, name, |n| {
        if n.spec.maintenance {
            return Err(CliError::Input(format!(
                "node {name} is in maintenance: use `hcictl node maintenance off {name}`"
            )));
        }
        n.spec.cordoned = false;
        n.metadata.annotations.remove(DRAIN);
        Ok(())
    })
    .await?;
    Ok(format!("node/{name} uncordoned\n"))
}

/// `hcictl node drain NAME`: cordons the node and has its daemon shut its
/// VMs down cleanly so that they are placed elsewhere; follows the progress
/// until no VM is left there (or `timeout`).
pub async fn drain(c: &Client, name: &str, timeout: Duration) -> Result<String, CliError> {
    change(c, name, |n| {
        n.spec.cordoned = true;
        n.metadata
            .annotations
            .insert(DRAIN.to_string(), Utc::now().to_rfc3339());
        Ok(())
    })
    .await?;
    follow_drain(c, name, timeout).await?;
    Ok(format!("node/{name} drained\n"))
}

/// `hcictl node maintenance on|off NAME`.
pub async fn maintenance(
    c: &Client,
    name: &str,
    on: bool,
    timeout: Duration,
) -> Result<String, CliError> {
    change(c, name, |n| {
        n.spec.maintenance = on;
        n.spec.cordoned = on;
        if !on {
            n.metadata.annotations.remove(DRAIN);
        }
        Ok(())
    })
    .await?;
    if !on {
        return Ok(format!("node/{name} out of maintenance (uncordoned)\n"));
    }
    follow_drain(c, name, timeout).await?;
    Ok(format!(
        "node/{name} in maintenance: drained, and kept out until `hcictl node maintenance off {name}`\n"
    ))
}

/// Prints the VMs left on the node whenever that changes, until none is.
async fn follow_drain(c: &Client, name: &str, timeout: Duration) -> Result<(), CliError> {
    let started = Instant::now();
    let mut last = String::new();
    let mut stderr = std::io::stderr();
    loop {
        let node: Node = parse(
            &c.get(Kind::Node, name)
                .await
                .map_err(|s| explain(&format!("node/{name}"), &s))?,
        )?;
        let mut left: Vec<String> = vms(c)
            .await?
            .into_iter()
            .filter(|vm| vm.status_or_default().node.as_deref() == Some(name))
            .map(|vm| {
                let phase = vm.status_or_default().phase;
                format!("{} ({phase})", vm.name())
            })
            .collect();
        left.sort();
        let drained =
            condition(&node, "Drained").is_some_and(|c| c.status == ConditionStatus::True);
        if left.is_empty() && drained {
            let _ = writeln!(
                stderr,
                "node {name}: no VMs left ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let blocked = condition(&node, "Drained")
            .filter(|c| c.reason == "DrainBlocked")
            .map(|c| c.message.clone());
        if let Some(why) = blocked {
            return Err(CliError::Api(format!(
                "node {name} cannot be drained: {why} (change their evictionStrategy or stop them)"
            )));
        }
        let line = if left.is_empty() {
            format!("node {name}: no VMs left; waiting for the node to confirm")
        } else {
            format!("node {name}: {} VMs left: {}", left.len(), left.join(", "))
        };
        if line != last {
            let _ = writeln!(stderr, "{line} ({:.1} s)", started.elapsed().as_secs_f64());
            last = line;
        }
        if started.elapsed() > timeout {
            return Err(CliError::Api(format!(
                "node {name}: still {} VMs after {timeout:?} (the drain goes on; follow it with `hcictl node list`)",
                left.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `hcictl node remove NAME`: deletes a node that is gone for good. The
/// daemon refuses while the node's daemon runs (it is Ready), while VMs are
/// placed on it, or while it holds the only healthy replica of a volume
/// (`scheduler::node_removal_blocker`).
pub async fn remove(c: &Client, name: &str) -> Result<String, CliError> {
    c.delete(Kind::Node, name)
        .await
        .map_err(|s| explain(&format!("node/{name}"), &s))?;
    Ok(format!("node/{name} removed\n"))
}
