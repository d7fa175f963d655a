//! Replicated volumes ([`DiskBackend::Replicated`]) opened by the process
//! that runs a VM (`hci-vmm`, or the QEMU backend's owner): the engine over
//! the volume's replica servers (fencing any older engine) and, when a
//! control socket is asked for, the `hci_storage::control` channel on it.
//!
//! [`DiskBackend::Replicated`]: hci_core::compute::DiskBackend::Replicated

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
