//! Whole-VM backups: every volume of a VM backed up together, with the VM's
//! spec and its volumes' specs, restorable as a new VM under a new name.
//!
//! A VM backup is one volume backup per disk (ordinary manifests under
//! `backups/`, each tagged with [`VM_BACKUP_KEY`] so retention leaves them
//! to their VM backup) plus a sealed JSON [`VmManifest`] at `vms/<id>`,
//! written last: a VM backup interrupted before that point is only volume
//! backups no VM manifest names, which [`Repository::prune`] and
//! [`Repository::delete`](hci_core::backup::BackupEngine::delete) treat as
//! ordinary backups.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use hci_core::backup::VolumeBackupRequest;
use hci_core::model::{Resource, VirtualMachine, VmSpec, Volume, VolumeSpec};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_core::{Error, Result};

use crate::format::{self, corrupt};
use crate::job::Job;
use crate::repo::{Repository, json_err, new_id, now};

/// Metadata key of a volume backup that is part of a VM backup (value: the
/// VM backup id).
pub const VM_BACKUP_KEY: &str = "hci.vm-backup";

/// One volume of a VM backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmVolumeBackup {
    /// Volume name at backup time (what the VM's disks name).
    pub volume: String,
    /// The volume's spec at backup time.
    pub spec: VolumeSpec,
    /// Snapshot the volume backup was taken from.
    pub snapshot: String,
    /// The volume backup's id.
    pub backup: String,
}

/// The manifest of a whole-VM backup (`vms/<id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmManifest {
    /// VM backup id.
    pub id: String,
    /// When it was taken.
    pub created: DateTime<Utc>,
    /// VM name at backup time.
    pub vm_name: String,
    /// The VM's spec at backup time.
    pub vm: VmSpec,
    /// Its volumes.
    pub volumes: Vec<VmVolumeBackup>,
    /// Bytes newly stored by all its volume backups.
    pub added_bytes: u64,
}

/// One volume of a [`VmBackupRequest`].
#[derive(Debug, Clone)]
pub struct VmVolumeRequest {
    /// Volume name in the backend.
    pub volume: String,
    /// The volume's spec (stored with the backup).
    pub spec: VolumeSpec,
    /// Snapshot to back up (must exist).
    pub snapshot: String,
    /// Previous backup of this volume whose snapshot still exists.
    pub base: Option<String>,
}

/// A request to back up a whole VM.
#[derive(Debug, Clone)]
pub struct VmBackupRequest {
    /// VM name.
    pub vm_name: String,
    /// The VM's spec.
    pub vm: VmSpec,
    /// Every volume its disks use, each with a snapshot taken for it.
    pub volumes: Vec<VmVolumeRequest>,
}

/// What restoring a VM backup under a new name creates.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRestorePlan {
    /// The new VM, its disks pointing at the new volumes.
    pub vm: VirtualMachine,
    /// The new volumes, each with the volume backup to restore into it.
    pub volumes: Vec<(Volume, String)>,
}

/// Name of the volume that restores `old` for the VM restored as `new_vm`.
pub fn restored_volume_name(new_vm: &str, old: &str) -> String {
    hci_core::model::copied_volume_name(new_vm, old)
}

impl VmManifest {
    /// The VM and volumes a restore under `new_name` creates: volumes are
    /// named `<new_name>-<old volume>`, the VM's disks renamed to match.
    pub fn restore_plan(&self, new_name: &str) -> VmRestorePlan {
        let spec = self.vm.for_copy(new_name);
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                let mut vs = v.spec.clone();
                vs.source = hci_core::model::VolumeSource::Blank;
                (
                    Volume::new(restored_volume_name(new_name, &v.volume), vs),
                    v.backup.clone(),
                )
            })
            .collect();
        VmRestorePlan {
            vm: VirtualMachine::new(new_name, spec),
            volumes,
        }
    }
}

fn vm_key(id: &str) -> Result<String> {
    if id.is_empty() || id.contains('/') {
        return Err(Error::invalid("VM backup id", format!("{id:?}")));
    }
    Ok(format!("vms/{id}"))
}

impl Repository {
    /// Backs up every volume of a VM, then records the VM manifest (see
    /// the module docs). A failure removes the volume backups already made.
    pub async fn backup_vm(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        request: VmBackupRequest,
        job: &Job,
    ) -> Result<VmManifest> {
        self.backup_vm_from(&|_| Ok(volumes.clone()), request, job)
            .await
    }

    /// [`Repository::backup_vm`] for volumes that live in different
    /// backends (local and replicated, say): `backend_of` names the backend
    /// holding each volume.
    #[instrument(skip(self, backend_of, request, job), fields(vm = %request.vm_name))]
    pub async fn backup_vm_from(
        &self,
        backend_of: &(dyn Fn(&str) -> Result<Arc<dyn VolumeBackend>> + Send + Sync),
        request: VmBackupRequest,
        job: &Job,
    ) -> Result<VmManifest> {
        let id = new_id();
        let mut done: Vec<VmVolumeBackup> = Vec::new();
        let mut added = 0;
        for v in &request.volumes {
            let r = match backend_of(&v.volume) {
                Ok(backend) => {
                    self.backup_with(
                        backend,
                        VolumeBackupRequest {
                            volume: v.volume.clone(),
                            snapshot: v.snapshot.clone(),
                            base: v.base.clone(),
                            metadata: vec![
                                (VM_BACKUP_KEY.into(), id.clone()),
                                ("vm".into(), request.vm_name.clone()),
                            ],
                        },
                        job,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(info) => {
                    added += info.added_bytes;
                    done.push(VmVolumeBackup {
                        volume: v.volume.clone(),
                        spec: v.spec.clone(),
                        snapshot: v.snapshot.clone(),
                        backup: info.id,
                    });
                }
                Err(e) => {
                    for d in &done {
                        if let Err(e) = self.target().delete(&format!("backups/{}", d.backup)).await
                        {
                            warn!(backup = %d.backup, error = %e, "cannot remove a partial VM backup's volume backup");
                        }
                    }
                    return Err(e);
                }
            }
        }
        let m = VmManifest {
            id: id.clone(),
            created: now(),
            vm_name: request.vm_name,
            vm: request.vm,
            volumes: done,
            added_bytes: added,
        };
        let json = serde_json::to_vec(&m).map_err(|e| json_err("VM manifest", e))?;
        let sealed = format::seal_meta(self.keys(), &json)?;
        self.target()
            .put_new(&vm_key(&id)?, Bytes::from(sealed))
            .await?;
        info!(backup = %id, vm = %m.vm_name, volumes = m.volumes.len(), "VM backup finished");
        Ok(m)
    }

    /// Reads a VM backup's manifest.
    pub async fn load_vm_backup(&self, id: &str) -> Result<VmManifest> {
        let key = vm_key(id)?;
        let raw = self.target().get(&key).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found("VM backup", id),
            e => e,
        })?;
        let what = format!("VM manifest {key}");
        let plain = format::open_meta(self.keys(), &raw, &what)?;
        let m: VmManifest =
            serde_json::from_slice(&plain).map_err(|e| corrupt(&what, format!("JSON: {e}")))?;
        if m.id != id {
            return Err(corrupt(&what, "names another backup"));
        }
        Ok(m)
    }

    /// Every VM backup, oldest first.
    pub async fn list_vm_backups(&self) -> Result<Vec<VmManifest>> {
        let mut out = Vec::new();
        for o in self.target().list("vms/").await? {
            match self.load_vm_backup(o.key.trim_start_matches("vms/")).await {
                Ok(m) => out.push(m),
                // Deleted between the listing and the read.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Deletes a VM backup: its manifest, then its volume backups. Space is
    /// reclaimed by [`Repository::gc`].
    pub async fn delete_vm_backup(&self, id: &str) -> Result<()> {
        let m = self.load_vm_backup(id).await?;
        self.target().delete(&vm_key(id)?).await?;
        for v in &m.volumes {
            match self.target().delete(&format!("backups/{}", v.backup)).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Restores a VM backup as a new VM named `new_name`: creates each
    /// volume (`<new_name>-<old volume>`) in `volumes` and restores it.
    /// Returns the plan, whose VM the caller defines (e.g. in the daemon).
    /// On failure the volumes created so far are deleted.
    #[instrument(skip(self, volumes, job))]
    pub async fn restore_vm(
        &self,
        id: &str,
        new_name: &str,
        volumes: Arc<dyn VolumeBackend>,
        job: &Job,
    ) -> Result<VmRestorePlan> {
        let m = self.load_vm_backup(id).await?;
        let plan = m.restore_plan(new_name);
        let mut created: Vec<String> = Vec::new();
        let mut result = Ok(());
        for (vol, backup) in &plan.volumes {
            let name = vol.name().to_string();
            let r = async {
                let size = self.load_manifest(backup).await?.header.size;
                volumes.create(&name, CreateVolume::new(size)).await?;
                created.push(name.clone());
                let dev = volumes.open(&name, OpenVolume::default()).await?;
                self.restore_with(backup, dev, job).await
            }
            .await;
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        if let Err(e) = result {
            for name in &created {
                if let Err(e) = volumes.delete(name).await {
                    warn!(volume = %name, error = %e, "cannot remove a partly restored volume");
                }
            }
            return Err(e);
        }
        info!(backup = %id, vm = %new_name, "VM restored");
        Ok(plan)
    }
}
