//! Replicated volumes ([`DiskBackend::Replicated`]) opened by the process
//! that runs a VM (`hci-vmm`, or the QEMU backend's owner): the engine over
//! the volume's replica servers (fencing any older engine) and, when a
//! control socket is asked for, the `hci_storage::control` channel on it.
//!
//! [`DiskBackend::Replicated`]: hci_core::compute::DiskBackend::Replicated

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::handover::{HandoverDisk, VolumeSource};
use hci_core::block::BlockDevice;
use hci_core::volume::{EncryptionKey, OpenVolume};
use hci_core::{Error, Result};
use hci_storage::engine::{EngineOptions, PreparedVolume, ReplicatedVolume};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

/// Bound on a replica server's answers.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a replicated volume lives and how to reach it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicatedDisk<'a> {
    /// The volume's name on the replica servers.
    pub volume: &'a str,
    /// The replica servers (`HOST:PORT`).
    pub replicas: &'a [String],
    /// File holding the servers' token.
    pub token_file: &'a Path,
    /// Key file of an encrypted volume.
    pub key_file: Option<&'a Path>,
    /// Unix socket to answer `hci-storage replicas` requests on.
    pub control: Option<&'a Path>,
    /// Open read-only (no fencing).
    pub read_only: bool,
}

/// An opened replicated volume.
#[derive(Debug)]
pub struct OpenedReplicated {
    /// Its engine (close it when the VM is gone: a clean close spares the
    /// next engine the crash reconcile).
    pub engine: Arc<ReplicatedVolume>,
    /// The control socket's task, if one was asked for.
    pub control: Option<tokio::task::JoinHandle<()>>,
}

fn read(what: &str, f: &Path) -> Result<Vec<u8>> {
    std::fs::read(f).map_err(|e| Error::io(format!("read the {what} {}", f.display()), e))
}

/// The replica servers of a volume, as the engine sees them.
type Nodes = Vec<Arc<dyn ReplicaNode>>;

/// The engine's view of `disk`'s replica servers and its key.
fn nodes(disk: ReplicatedDisk<'_>) -> Result<(Nodes, Option<EncryptionKey>)> {
    if disk.replicas.is_empty() {
        return Err(Error::invalid(
            format!("replicated volume {}", disk.volume),
            "needs at least one replica server",
        ));
    }
    let token = token(disk)?;
    let key = match disk.key_file {
        Some(f) => Some(EncryptionKey::new(read("key file", f)?)),
        None => None,
    };
    let nodes = disk.replicas.iter().map(|a| node(a, &token)).collect();
    Ok((nodes, key))
}

fn token(disk: ReplicatedDisk<'_>) -> Result<Vec<u8>> {
    Ok(
        String::from_utf8_lossy(&read("token file", disk.token_file)?)
            .trim()
            .as_bytes()
            .to_vec(),
    )
}

fn node(at: &str, token: &[u8]) -> Arc<dyn ReplicaNode> {
    let mut sa = ServerAddr::new(at, token.to_vec());
    sa.timeout = REPLICA_TIMEOUT;
    Arc::new(RemoteNode::new(sa))
}

/// Opens `disk`'s engine and serves its control socket when asked.
pub async fn open(disk: ReplicatedDisk<'_>) -> Result<OpenedReplicated> {
    let (nodes, key) = nodes(disk)?;
    let engine = ReplicatedVolume::open(
        disk.volume,
        &nodes,
        OpenVolume {
            read_only: disk.read_only,
            encryption_key: key,
        },
        EngineOptions::default(),
    )
    .await?;
    match serve_control(&engine, disk) {
        Ok(control) => Ok(OpenedReplicated { engine, control }),
        Err(e) => {
            let _ = engine.close().await;
            Err(e)
        }
    }
}

/// Prepares `disk`'s engine for a hand-over ([`ReplicatedVolume::prepare`]):
/// replicas reached and size known, nobody fenced; activate it at the
/// switch-over, then [`serve_control`].
pub async fn prepare(disk: ReplicatedDisk<'_>) -> Result<PreparedVolume> {
    let (nodes, key) = nodes(disk)?;
    ReplicatedVolume::prepare(
        disk.volume,
        &nodes,
        OpenVolume {
            read_only: disk.read_only,
            encryption_key: key,
        },
        EngineOptions::default(),
    )
    .await
}

/// Serves `engine`'s control socket when `disk` asks for one.
pub fn serve_control(
    engine: &Arc<ReplicatedVolume>,
    disk: ReplicatedDisk<'_>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(path) = disk.control else {
        return Ok(None);
    };
    let token = token(disk)?;
    let vol = disk.volume.to_string();
    let resolve = move |r: &str| -> Result<Arc<dyn ReplicaNode>> {
        let at = match r.rsplit_once('/') {
            Some((at, v)) if v == vol => at,
            Some((_, v)) => {
                return Err(Error::invalid(
                    format!("replica {r:?}"),
                    format!("names volume {v}, this engine serves {vol}"),
                ));
            }
            None => r,
        };
        Ok(node(at, &token))
    };
    hci_storage::control::Controller::new(engine.clone(), Box::new(resolve))
        .serve(path)
        .map(Some)
}

/// Watches whether another engine has taken a volume over: the fencing
/// watchdog of a process that runs a VM on a replicated volume.
///
/// When a node is lost, the cluster moves its VMs only after opening their
/// volumes' engines elsewhere, which bumps the volumes' generation; the
/// replicas refuse the old engine from then on. A VM process that outlived
/// its node's daemon (or was cut off from the cluster) would run on
/// headless with a disk that refuses every write. [`FenceWatch::fenced`]
/// notices that — a replica reports a newer generation than the engine's
/// own — so the process can stop its guest rather than run without its
/// disk.
#[derive(Debug)]
pub struct FenceWatch {
    disk: Arc<HandoverDisk>,
    nodes: Vec<Arc<dyn ReplicaNode>>,
}

impl FenceWatch {
    /// A watch over `disk` when it is a replicated volume (`None` for a
    /// local one), asking its replica servers (and the engine's current
    /// healthy replicas, which may be new); reads the token now, so it can
    /// run where opening files is no longer allowed.
    pub fn new(disk: Arc<HandoverDisk>) -> Result<Option<Self>> {
        let VolumeSource::Replicated {
            replicas,
            token_file,
            ..
        } = disk.source()
        else {
            return Ok(None);
        };
        let token = String::from_utf8_lossy(&read("token file", token_file)?)
            .trim()
            .as_bytes()
            .to_vec();
        let nodes = replicas
            .iter()
            .map(|at| {
                let mut sa = ServerAddr::new(at, token.clone());
                sa.timeout = REPLICA_TIMEOUT;
                Arc::new(RemoteNode::new(sa)) as Arc<dyn ReplicaNode>
            })
            .collect();
        Ok(Some(FenceWatch { disk, nodes }))
    }

    /// Whether a replica follows a newer engine now: a description of the
    /// first one found (unreachable replicas say nothing). Nothing while
    /// this process does not own the volume (prepared for an incoming
    /// migration, or released to the target of an outgoing one).
    pub async fn check(&self) -> Option<String> {
        let engine = self.disk.engine()?;
        let ours = engine.generation();
        let name = engine.name();
        let mut seen = std::collections::BTreeSet::new();
        let current = engine.healthy_nodes();
        for node in self.nodes.iter().chain(current.iter()) {
            if !seen.insert(node.label()) {
                continue;
            }
            if let Ok(Ok(st)) = tokio::time::timeout(REPLICA_TIMEOUT, node.fence_state(name)).await
                && st.generation > ours
                && self.disk.is_active()
            {
                return Some(format!(
                    "volume {name}: replica {} follows engine generation {}, this engine's is {ours} (another engine took the volume over)",
                    node.label(),
                    st.generation
                ));
            }
        }
        None
    }

    /// Resolves once [`FenceWatch::check`] finds the engine fenced, looking
    /// every `every`; never for a read-only disk (it does not fence, and a
    /// writer elsewhere is normal).
    pub async fn fenced(self, every: Duration) -> String {
        if self.disk.is_read_only() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(every).await;
            if let Some(why) = self.check().await {
                return why;
            }
        }
    }
}
