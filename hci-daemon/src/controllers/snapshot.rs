//! The snapshot controller: takes each `Snapshot` of a pool volume (in
//! O(1), the volume stays online), reports it Ready with its time and size,
//! and deletes the pool snapshot when the resource goes (merging its data
//! into its neighbour while the volume stays in use).

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{
    ByteSize, Resource, Snapshot, SnapshotPhase, VM_SNAPSHOT_ANNOTATION, Volume,
};
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

    /// Deletes snapshot `name` from whichever volume holds it: the pool's
    /// volumes, and the replicated volumes on their replica servers.
    async fn delete_everywhere(&self, name: &str) -> Result<()> {
        for volume in self.rt.volumes.names()? {
            let snaps = self.rt.volumes.list_snapshots(&volume).await?;
            if snaps.iter().any(|s| s.name == name) {
                self.rt.volumes.delete_snapshot(&volume, name).await?;
                tracing::info!(volume, snapshot = name, "snapshot deleted");
            }
        }
        for v in self.rt.resources.list::<Volume>().await?.items {
            if v.spec.replicas <= 1 || super::replicas::placed(&v).is_empty() {
                continue;
            }
            let (backend, _) = super::replicas::backend_for(&self.rt, &v)?;
            let snaps = backend.list_snapshots(v.name()).await?;
            if snaps.iter().any(|s| s.name == name) {
                backend.delete_snapshot(v.name(), name).await?;
                tracing::info!(
                    volume = v.name(),
                    snapshot = name,
                    "snapshot deleted on every replica"
                );
            }
        }
        Ok(())
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
        let vol: Option<Volume> = self.rt.resources.try_get(volume).await?;
        let backend = match &vol {
            Some(v) => super::replicas::backend_for(&self.rt, v)?.0,
            None => self.rt.volumes.clone(),
        };
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
            None if snap
                .metadata
                .annotations
                .contains_key(VM_SNAPSHOT_ANNOTATION) =>
            {
                // A VM snapshot takes it, with the VM's other volumes.
                let by = snap.metadata.annotations[VM_SNAPSHOT_ANNOTATION].clone();
                let message = format!("taken with VirtualMachineSnapshot {by:?}");
                set_status(&self.rt.resources, name, |s: &mut Snapshot| {
                    s.status_mut().message = message.clone();
                })
                .await?;
                return Ok(Some(Duration::from_secs(1)));
            }
            None => {
                let taken = match &vol {
                    Some(v) => super::replicas::take_snapshot(&self.rt, v, name).await,
                    None => Err(Error::not_found("volume", volume.as_str())),
                };
                match taken {
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
                }
            }
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
