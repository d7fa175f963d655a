//! `VirtualMachineSnapshot`: every volume of a VM at one instant, with the
//! VM's spec, to restore as a new VM.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::resource::{Envelope, EnvelopeRef, Resource, ResourceRef, check_envelope, resource};
use super::{
    ObjectMeta, SnapshotPhase, ValidationErrors, VirtualMachine, VmSpec, Volume, VolumeSource,
    VolumeSpec, validate_name,
};
use crate::error::{Error, Result};

resource! {
    /// Every volume of a VM at one instant (the VM is paused while its
    /// volumes are snapshotted), with the VM's spec at that time.
    VirtualMachineSnapshot, "VirtualMachineSnapshot", VirtualMachineSnapshotSpec, VirtualMachineSnapshotStatus
}

/// Annotation on the `Snapshot` of each volume that a VM snapshot took:
/// the VM snapshot's name.
pub const VM_SNAPSHOT_ANNOTATION: &str = "hci.dev/vm-snapshot";

/// Desired state of a VM snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshotSpec {
    /// The VM to snapshot.
    pub vm: String,
}

/// One volume of a VM snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSnapshotVolume {
    /// The VM's volume.
    pub volume: String,
    /// Its `Snapshot` resource.
    pub snapshot: String,
    /// The volume's spec when the snapshot was taken.
    pub spec: VolumeSpec,
}

/// Observed state of a VM snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshotStatus {
    /// Phase.
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// When it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_at: Option<DateTime<Utc>>,
    /// The VM's spec when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,
    /// Each volume of the VM and its snapshot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VmSnapshotVolume>,
    /// Detail on failure.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Resource for VirtualMachineSnapshot {
    const KIND: &'static str = "VirtualMachineSnapshot";

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }

    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::new();
        self.metadata.validate_into(&mut errs);
        validate_name("spec.vm", &self.spec.vm, &mut errs);
        errs.into_result()
    }

    fn references(&self) -> Vec<ResourceRef> {
        vec![ResourceRef {
            kind: "VirtualMachine",
            name: self.spec.vm.clone(),
            path: "spec.vm".into(),
        }]
    }
}

/// Name of the `Snapshot` a VM snapshot takes of `volume`.
pub fn vm_snapshot_member(vm_snapshot: &str, volume: &str) -> String {
    format!("{vm_snapshot}-{volume}")
}

/// Name of the copy of volume `old` made for a VM copied as `new_vm`
/// (a restore of a VM snapshot or of a whole-VM backup).
pub fn copied_volume_name(new_vm: &str, old: &str) -> String {
    format!("{new_vm}-{old}")
}

impl VmSpec {
    /// This spec for a copy of the VM named `new_vm`, whose disks use the
    /// copies of its volumes named by [`copied_volume_name`].
    pub fn for_copy(&self, new_vm: &str) -> VmSpec {
        let mut spec = self.clone();
        for d in &mut spec.disks {
            d.volume = copied_volume_name(new_vm, &d.volume);
        }
        spec
    }
}

impl VirtualMachineSnapshot {
    /// What restoring this snapshot as the new VM `new_name` creates: a
    /// volume `<new_name>-<volume>` cloned from each volume's snapshot
    /// (same size, replicas and storage class), and the VM on them.
    pub fn restore_plan(&self, new_name: &str) -> Result<(VirtualMachine, Vec<Volume>)> {
        let status = self.status.clone().unwrap_or_default();
        let what = format!("VirtualMachineSnapshot {:?}", self.metadata.name);
        let vm = match (status.phase, status.vm) {
            (SnapshotPhase::Ready, Some(vm)) => vm,
            (SnapshotPhase::Failed, _) => {
                return Err(Error::invalid(what, "it failed: it cannot be restored"));
            }
            _ => {
                return Err(Error::Unavailable {
                    what: format!("{what} (not taken yet)"),
                    source: None,
                });
            }
        };
        let volumes = status
            .volumes
            .iter()
            .map(|v| {
                let mut spec = v.spec.clone();
                spec.source = VolumeSource::Snapshot {
                    name: v.snapshot.clone(),
                };
                Volume::new(copied_volume_name(new_name, &v.volume), spec)
            })
            .collect();
        Ok((
            VirtualMachine::new(new_name, vm.for_copy(new_name)),
            volumes,
        ))
    }
}
