//! The VM snapshot controller: takes each `VirtualMachineSnapshot` — a
//! `Snapshot` of every volume of the VM, all taken while the VM is paused so
//! they hold one instant of the guest, and the VM's spec — and deletes those
//! snapshots with it.
//!
//! The volume snapshots are ordinary `Snapshot` resources named
//! `<vm snapshot>-<volume>` and annotated with [`VM_SNAPSHOT_ANNOTATION`]:
//! they are listed, cloned from and deleted like any other, and the snapshot
//! controller leaves taking them to this controller. A VM snapshot is
//! restored as a new VM by the API (`RestoreVmSnapshot`), which clones a
//! volume from each.
//!
//! In cluster mode the node that runs the VM (its `status.node`) takes it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hci_core::model::{
    Resource, Snapshot, SnapshotPhase, SnapshotSpec, VM_SNAPSHOT_ANNOTATION, VirtualMachine,
    VirtualMachineSnapshot, VmSnapshotVolume, Volume, check_dns_label, vm_snapshot_member,
};
use hci_core::{Error, Result};

use super::vm::VmController;
use super::{Reconcile, Runtime, replicas, set_status};

/// The kind events are recorded under.
const KIND: &str = "VirtualMachineSnapshot";

pub(crate) struct VmSnapshotController {
    rt: Runtime,
    vms: Arc<VmController>,
}

impl VmSnapshotController {
    pub(crate) fn new(rt: Runtime, vms: Arc<VmController>) -> Self {
        VmSnapshotController { rt, vms }
    }

    /// The `Snapshot` resources VM snapshot `name` made.
    async fn members(&self, name: &str) -> Result<Vec<Snapshot>> {
        Ok(self
            .rt
            .resources
            .list::<Snapshot>()
            .await?
            .items
            .into_iter()
            .filter(|s| {
                s.metadata
                    .annotations
                    .get(VM_SNAPSHOT_ANNOTATION)
                    .map(String::as_str)
                    == Some(name)
            })
            .collect())
    }

    /// Deletes the `Snapshot`s VM snapshot `name` made (the snapshot
    /// controller then removes them from their volumes).
    async fn delete_members(&self, name: &str) -> Result<()> {
        for s in self.members(name).await? {
            match self.rt.resources.delete::<Snapshot>(s.name(), None).await {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether this node takes snapshots of `vm`: the node that runs it.
    fn mine(&self, vm: &VirtualMachine) -> Result<bool> {
        if self.rt.cluster.is_none() {
            return Ok(true);
        }
        match vm.status_or_default().node {
            Some(node) => Ok(node == self.rt.node.name),
            None => Err(Error::invalid(
                format!("VM {:?}", vm.name()),
                "it is not placed on a node yet: start it once, then snapshot it",
            )),
        }
    }

    /// Takes VM snapshot `name` of `vm`.
    async fn take(&self, name: &str, vm: &VirtualMachine) -> Result<()> {
        let mut volumes: Vec<Volume> = Vec::new();
        for d in &vm.spec.disks {
            if !volumes.iter().any(|v| v.name() == d.volume) {
                volumes.push(self.rt.resources.get(&d.volume).await?);
            }
        }
        // One Snapshot resource per volume, made first: the snapshot sweep
        // removes volume snapshots that have no resource.
        let mut taken = Vec::new();
        for v in &volumes {
            let member = vm_snapshot_member(name, v.name());
            if let Err(reason) = check_dns_label(&member) {
                return Err(Error::invalid(
                    "metadata.name",
                    format!(
                        "the snapshot of volume {:?} would be named {member:?}, which {reason}",
                        v.name()
                    ),
                ));
            }
            match self.rt.resources.try_get::<Snapshot>(&member).await? {
                Some(s)
                    if s.metadata
                        .annotations
                        .get(VM_SNAPSHOT_ANNOTATION)
                        .map(String::as_str)
                        != Some(name) =>
                {
                    return Err(Error::already_exists("Snapshot", member));
                }
                Some(_) => {}
                None => {
                    let mut s = Snapshot::new(
                        &member,
                        SnapshotSpec {
                            volume: v.name().to_string(),
                        },
                    );
                    s.metadata
                        .annotations
                        .insert(VM_SNAPSHOT_ANNOTATION.into(), name.to_string());
                    match self.rt.resources.create(s).await {
                        Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            // Left by an attempt cut short: all are taken again, together.
            let (backend, _) = replicas::backend_for(&self.rt, v)?;
            match backend.list_snapshots(v.name()).await {
                Ok(snaps) if snaps.iter().any(|s| s.name == member) => {
                    backend.delete_snapshot(v.name(), &member).await?;
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            taken.push(VmSnapshotVolume {
                volume: v.name().to_string(),
                snapshot: member,
                spec: v.spec.clone(),
            });
        }
        let rt = &self.rt;
        self.vms
            .while_paused(vm.name(), async {
                for (v, t) in volumes.iter().zip(&taken) {
                    replicas::take_snapshot(rt, v, &t.snapshot).await?;
                }
                Ok(())
            })
            .await?;
        let spec = vm.spec.clone();
        set_status(
            &self.rt.resources,
            name,
            |s: &mut VirtualMachineSnapshot| {
                let st = s.status_mut();
                st.phase = SnapshotPhase::Ready;
                st.taken_at = Some(chrono::Utc::now());
                st.vm = Some(spec.clone());
                st.volumes = taken.clone();
                st.message.clear();
            },
        )
        .await?;
        tracing::info!(
            vm_snapshot = name,
            vm = vm.name(),
            volumes = taken.len(),
            "VM snapshot taken"
        );
        self.rt
            .events
            .normal(
                KIND,
                name,
                "Taken",
                format!("{} volumes of VM {}", taken.len(), vm.name()),
            )
            .await;
        Ok(())
    }
}

#[async_trait]
impl Reconcile for VmSnapshotController {
    type Kind = VirtualMachineSnapshot;

    async fn reconcile(
        &self,
        name: &str,
        current: Option<VirtualMachineSnapshot>,
    ) -> Result<Option<Duration>> {
        let Some(snap) = current else {
            self.delete_members(name).await?;
            return Ok(None);
        };
        if snap.status_or_default().phase != SnapshotPhase::Pending {
            return Ok(None);
        }
        let taken = async {
            let vm: VirtualMachine = self.rt.resources.get(&snap.spec.vm).await?;
            if !self.mine(&vm)? {
                return Ok(false);
            }
            self.take(name, &vm).await.map(|()| true)
        }
        .await;
        match taken {
            Ok(_) => Ok(None),
            Err(Error::Unavailable { what, .. }) => {
                let message = format!("waiting for {what}");
                set_status(
                    &self.rt.resources,
                    name,
                    |s: &mut VirtualMachineSnapshot| {
                        s.status_mut().message = message.clone();
                    },
                )
                .await?;
                Ok(Some(Duration::from_secs(2)))
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(vm_snapshot = name, error = %e, "VM snapshot failed");
                self.rt.events.warning(KIND, name, "Failed", &message).await;
                // What was taken is of no use on its own.
                self.delete_members(name).await?;
                set_status(
                    &self.rt.resources,
                    name,
                    |s: &mut VirtualMachineSnapshot| {
                        let st = s.status_mut();
                        st.phase = SnapshotPhase::Failed;
                        st.message = message.clone();
                    },
                )
                .await?;
                Ok(None)
            }
        }
    }
}
