//! The snapshot controller: takes each `Snapshot` of a pool volume (in
//! O(1), the volume stays online), reports it Ready with its time and size,
//! and deletes the pool snapshot when the resource goes (merging its data
//! into its neighbour while the volume stays in use).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{ByteSize, Snapshot, SnapshotPhase, Volume};
use hci_core::volume::VolumeBackend;
use hci_core::{Error, Result};

use super::{Reconcile, Runtime, set_status};

pub(crate) struct SnapshotController {
    rt: Runtime,
}

impl SnapshotController {
    pub(crate) fn new(rt: Runtime) -> Self {
        SnapshotController { rt }
    }

    /// Deletes pool snapshot `name` from whichever volume holds it.
    async fn delete_everywhere(&self, name: &str) -> Result<()> {
        for volume in self.rt.volumes.names()? {
            let snaps = self.rt.volumes.list_snapshots(&volume).await?;
            if snaps.iter().any(|s| s.name == name) {
                self.rt.volumes.delete_snapshot(&volume, name).await?;
                tracing::info!(volume, snapshot = name, "snapshot deleted");
            }
        }
        Ok(())
    }
}

impl SnapshotController {
    /// Where volume `name`'s snapshots live: the local pool, or the replica
    /// servers of a replicated volume — with the control socket of the
    /// engine that owns it while a VM uses it (a snapshot must be taken by
    /// that engine, with writes held, to be the same on every replica).
    async fn backend_of(&self, name: &str) -> Result<(Arc<dyn VolumeBackend>, Option<PathBuf>)> {
        let vol: Option<Volume> = self.rt.resources.try_get(name).await?;
        match (vol, &self.rt.replicas) {
            (Some(v), Some(pool)) if v.spec.replicas > 1 => {
                let backend: Arc<dyn VolumeBackend> =
                    Arc::new(pool.backend(&super::replicas::placed(&v))?);
                let engine = v
                    .status_or_default()
                    .attached_to
                    .map(|vm| super::volume::engine_socket(&self.rt, &vm, name));
                Ok((backend, engine))
            }
            _ => Ok((self.rt.volumes.clone(), None)),
        }
    }
}

/// Takes snapshot `snapshot` through the engine answering on `socket`.
async fn engine_snapshot(socket: PathBuf, volume: &str, snapshot: &str) -> Result<()> {
    let req = hci_storage::control::ControlRequest::Snapshot {
        name: snapshot.to_string(),
    };
    let reply = tokio::task::spawn_blocking(move || hci_storage::control::call(&socket, &req))
        .await
        .map_err(super::join_err("engine control"))??;
    if reply.ok {
        Ok(())
    } else {
        Err(Error::Unavailable {
            what: format!("the engine of volume {volume:?}"),
            source: Some(reply.error.unwrap_or_default().into()),
        })
    }
}

/// Whether a pool snapshot belongs to a `Snapshot` resource (the
/// controllers' own snapshots have dots in their names).
fn is_resource_snapshot(name: &str) -> bool {
    !name.contains('.')
}

#[async_trait]
impl Reconcile for SnapshotController {
    type Kind = Snapshot;

    async fn reconcile(&self, name: &str, current: Option<Snapshot>) -> Result<Option<Duration>> {
        let Some(snap) = current else {
            self.delete_everywhere(name).await?;
            return Ok(None);
        };
        let volume = &snap.spec.volume;
        let (backend, engine) = self.backend_of(volume).await?;
        let existing = match backend.list_snapshots(volume).await {
            Ok(list) => list,
            Err(Error::NotFound { .. }) => {
                let message = format!("volume {volume:?} does not exist (yet)");
                set_status(&self.rt.resources, name, |s: &mut Snapshot| {
                    s.status_mut().phase = SnapshotPhase::Pending;
                    s.status_mut().message = message.clone();
                })
                .await?;
                // The volume controller may not have created it yet.
                return Ok(Some(Duration::from_secs(1)));
            }
            Err(e) => return Err(e),
        };
        let info = match existing.into_iter().find(|s| s.name == name) {
            Some(info) => info,
            None if snap.status_or_default().phase == SnapshotPhase::Ready => {
                // It was taken and is gone: a revert cannot remove it, so
                // someone deleted it behind the API. Say so.
                set_status(&self.rt.resources, name, |s: &mut Snapshot| {
                    s.status_mut().phase = SnapshotPhase::Failed;
                    s.status_mut().message =
                        format!("the snapshot is missing from volume {volume:?}");
                })
                .await?;
                return Ok(None);
            }
            None => match match engine {
                Some(socket) => match engine_snapshot(socket, volume, name).await {
                    Ok(()) => backend
                        .list_snapshots(volume)
                        .await?
                        .into_iter()
                        .find(|s| s.name == name)
                        .ok_or_else(|| Error::not_found("snapshot", name)),
                    Err(e) => Err(e),
                },
                None => backend.snapshot(volume, name).await,
            } {
                Ok(info) => {
                    tracing::info!(volume, snapshot = name, "snapshot taken");
                    self.rt
                        .events
                        .normal("Snapshot", name, "Taken", format!("of volume {volume}"))
                        .await;
                    info
                }
                Err(e) => {
                    let message = e.to_string();
                    self.rt
                        .events
                        .warning("Snapshot", name, "Failed", &message)
                        .await;
                    set_status(&self.rt.resources, name, |s: &mut Snapshot| {
                        s.status_mut().phase = SnapshotPhase::Failed;
                        s.status_mut().message = message.clone();
                    })
                    .await?;
                    return Err(e);
                }
            },
        };
        set_status(&self.rt.resources, name, |s: &mut Snapshot| {
            s.status_mut().phase = SnapshotPhase::Ready;
            s.status_mut().taken_at = Some(info.created);
            s.status_mut().size = Some(ByteSize(info.size));
            s.status_mut().message.clear();
        })
        .await?;
        Ok(None)
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        for volume in self.rt.volumes.names()? {
            // A volume a VMM process holds cannot be looked into: next time.
            let Ok(snaps) = self.rt.volumes.list_snapshots(&volume).await else {
                continue;
            };
            for snap in snaps {
                if is_resource_snapshot(&snap.name) && !existing.contains(&snap.name) {
                    tracing::info!(
                        volume,
                        snapshot = snap.name,
                        "removing a snapshot whose resource is gone"
                    );
                    if let Err(e) = self.rt.volumes.delete_snapshot(&volume, &snap.name).await {
                        tracing::warn!(volume, snapshot = snap.name, error = %e, "cannot remove an orphaned snapshot");
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_snapshots_are_not_resources() {
        assert!(is_resource_snapshot("nightly-1"));
        assert!(!is_resource_snapshot("hci.clone-1234"));
    }
}
