//! The volume controller: creates each `Volume` in the node's storage pool
//! (blank, or cloned from a snapshot, another volume or an imported image), grows it when its spec grows, reports size, allocation and
//! health in its status, and deletes the pool volume once the resource is
//! gone.
//!
//! Volumes with `replicas > 1` are created with one local replica until
//! replicated volumes land; the status says so (condition `Replicated`).

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{
    ByteSize, ConditionStatus, Image, ImagePhase, ReplicaStatus, Resource, Snapshot, Volume,
    VolumePhase, VolumeSource, set_condition,
};
use hci_core::volume::{CreateVolume, EncryptionKey, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};
use hci_storage::local::control::ControlClient;

use super::{Reconcile, Runtime, join_err, set_status};

/// Prefix of the snapshots the controller takes for its own use (clones of
/// a volume's current content). DNS-1123 labels have no dots, so these never
/// collide with `Snapshot` resources.
const INTERNAL_SNAPSHOT: &str = "hci.clone-";

/// Reads the volume key named by a volume's `spec.encryption.keyFile`.
pub(crate) fn encryption_key(volume: &Volume) -> Result<Option<EncryptionKey>> {
    let Some(enc) = &volume.spec.encryption else {
        return Ok(None);
    };
    let bytes = std::fs::read(&enc.key_file)
        .map_err(|e| Error::io(format!("read the key file {}", enc.key_file), e))?;
    Ok(Some(EncryptionKey::new(bytes)))
}

pub(crate) struct VolumeController {
    rt: Runtime,
}

impl VolumeController {
    pub(crate) fn new(rt: Runtime) -> Self {
        VolumeController { rt }
    }

    /// Creates pool volume `name` from the volume's source.
    async fn create(&self, vol: &Volume) -> Result<VolumeInfo> {
        let name = vol.name();
        let pool = &self.rt.volumes;
        let key = encryption_key(vol)?;
        match &vol.spec.source {
            VolumeSource::Blank => {
                pool.create(
                    name,
                    CreateVolume {
                        size: vol.spec.size.0,
                        encryption_key: key,
                    },
                )
                .await
            }
            VolumeSource::Snapshot { name: snap } => {
                let snapshot: Snapshot = self.rt.resources.get(snap).await?;
                pool.clone_snapshot(&snapshot.spec.volume, snap, name).await
            }
            VolumeSource::Volume { name: source } => {
                let tmp = format!(
                    "{INTERNAL_SNAPSHOT}{}",
                    vol.metadata.uid.map(|u| u.to_string()).unwrap_or_default()
                );
                pool.snapshot(source, &tmp).await?;
                let cloned = pool.clone_snapshot(source, &tmp, name).await;
                if let Err(e) = pool.delete_snapshot(source, &tmp).await {
                    tracing::warn!(volume = source, snapshot = tmp, error = %e, "cannot remove a clone's temporary snapshot");
                }
                cloned
            }
            VolumeSource::Image { name: image } => {
                let img: Image = self.rt.resources.get(image).await?;
                if img.status_or_default().phase != ImagePhase::Ready {
                    return Err(Error::Unavailable {
                        what: format!("image {image:?} (not imported yet)"),
                        source: None,
                    });
                }
                if key.is_some() {
                    return Err(Error::unsupported(
                        "encrypting a volume created from an image",
                        "the local pool (images are stored unencrypted)",
                    ));
                }
                let base = self.rt.images.replica(image)?;
                let dest = pool.root().join(name);
                tokio::task::spawn_blocking(move || {
                    base.clone_snapshot(super::image::BASE_SNAPSHOT, &dest)
                        .map(|_| ())
                })
                .await
                .map_err(join_err("local"))??;
                pool.info(name).await
            }
            VolumeSource::Backup { name: backup } => {
                super::backup::restore_volume(&self.rt, name, backup, vol, key).await
            }
        }
    }
}

#[async_trait]
impl Reconcile for VolumeController {
    type Kind = Volume;

    async fn reconcile(&self, name: &str, current: Option<Volume>) -> Result<Option<Duration>> {
        let pool = &self.rt.volumes;
        let Some(vol) = current else {
            return match pool.delete(name).await {
                Ok(()) => {
                    tracing::info!(volume = name, "deleted");
                    Ok(None)
                }
                Err(Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            };
        };
        // Cluster mode: a volume lives on the node that took it first (the
        // first replica); the others leave it alone. Replicas across nodes
        // are not placed yet.
        if self.rt.cluster.is_some()
            && let Some(first) = vol.status_or_default().replicas.first()
            && first.node != self.rt.node.name
        {
            return Ok(None);
        }
        // A VMM process owns an attached volume (and its lock): talk to it
        // through the volume's control socket, never open it here (that
        // would take the lock from a VMM still starting).
        let owner = (self.rt.vm_processes && vol.status_or_default().attached_to.is_some())
            .then(|| ControlClient::new(&pool.root().join(name)));
        let info = if let Some(owner) = &owner {
            match owner.info().await {
                Ok(info) => info,
                // Starting or stopping: ask again shortly.
                Err(Error::Unavailable { .. }) => return Ok(Some(Duration::from_secs(2))),
                Err(e) => return Err(e),
            }
        } else {
            match pool.info(name).await {
                Ok(info) => info,
                Err(Error::NotFound { .. }) => {
                    set_status(&self.rt.resources, name, |v: &mut Volume| {
                        v.status_mut().phase = VolumePhase::Creating;
                    })
                    .await?;
                    match self.create(&vol).await {
                        Ok(info) => {
                            tracing::info!(volume = name, size = info.size, "created");
                            self.rt
                                .events
                                .normal("Volume", name, "Created", format!("{} bytes", info.size))
                                .await;
                            info
                        }
                        Err(Error::Unavailable { what, .. }) => {
                            // Its source is not ready yet (an image importing).
                            let message = format!("waiting for {what}");
                            set_status(&self.rt.resources, name, |v: &mut Volume| {
                                v.status_mut().phase = VolumePhase::Pending;
                                set_condition(
                                    &mut v.status_mut().conditions,
                                    "Ready",
                                    ConditionStatus::False,
                                    "WaitingForSource",
                                    &message,
                                );
                            })
                            .await?;
                            return Ok(Some(Duration::from_secs(1)));
                        }
                        Err(e) => {
                            let message = e.to_string();
                            self.rt
                                .events
                                .warning("Volume", name, "CreateFailed", &message)
                                .await;
                            set_status(&self.rt.resources, name, |v: &mut Volume| {
                                v.status_mut().phase = VolumePhase::Failed;
                                set_condition(
                                    &mut v.status_mut().conditions,
                                    "Ready",
                                    ConditionStatus::False,
                                    "CreateFailed",
                                    &message,
                                );
                            })
                            .await?;
                            return Err(e);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let info = if vol.spec.size.0 > info.size {
            let grown = match &owner {
                Some(owner) => owner.expand(vol.spec.size.0).await?,
                None => pool.expand(name, vol.spec.size.0).await?,
            };
            tracing::info!(volume = name, size = grown.size, "expanded");
            let online = if owner.is_some() {
                " online, through the VM process that owns it"
            } else {
                ""
            };
            self.rt
                .events
                .normal(
                    "Volume",
                    name,
                    "Expanded",
                    format!("to {} bytes{online}", grown.size),
                )
                .await;
            grown
        } else {
            info
        };
        let shrink = vol.spec.size.0 < info.size;
        let node = self.rt.node.name.clone();
        let wanted_replicas = vol.spec.replicas;
        let cluster = self.rt.cluster.is_some();
        set_status(&self.rt.resources, name, |v: &mut Volume| {
            let status = v.status_mut();
            status.size = Some(ByteSize(info.size));
            status.allocated = Some(ByteSize(info.allocated));
            // Cluster mode: another node took the volume first; keep its claim.
            if !cluster || status.replicas.first().is_none_or(|r| r.node == node) {
                status.replicas = vec![ReplicaStatus {
                    node: node.clone(),
                    healthy: true,
                    rebuild_percent: None,
                }];
            }
            status.phase = if status.attached_to.is_some() {
                VolumePhase::Attached
            } else {
                VolumePhase::Detached
            };
            let (ready, reason, message) = if shrink {
                (
                    ConditionStatus::False,
                    "ShrinkRefused",
                    format!(
                        "spec.size {} is below the current size {}: volumes never shrink",
                        vol.spec.size,
                        ByteSize(info.size)
                    ),
                )
            } else {
                (ConditionStatus::True, "Created", String::new())
            };
            set_condition(&mut status.conditions, "Ready", ready, reason, &message);
            if wanted_replicas > 1 {
                set_condition(
                    &mut status.conditions,
                    "Replicated",
                    ConditionStatus::False,
                    "SingleNode",
                    &format!(
                        "{wanted_replicas} replicas requested; one local replica until replication is wired into the daemon"
                    ),
                );
            }
        })
        .await?;
        Ok(None)
    }

    async fn sweep(&self, existing: &BTreeSet<String>) -> Result<()> {
        for info in self.rt.volumes.list().await? {
            if !existing.contains(&info.name) {
                tracing::info!(
                    volume = info.name,
                    "removing a volume whose resource is gone"
                );
                if let Err(e) = self.rt.volumes.delete(&info.name).await {
                    tracing::warn!(volume = info.name, error = %e, "cannot remove an orphaned volume");
                }
            }
        }
        Ok(())
    }
}
