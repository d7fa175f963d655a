//! The ten resource services: shared CRUD plus each kind's actions.

use hci_core::model::{
    Backup, BackupSource, BackupTarget, ByteSize, Image, Network, Node, Resource, RunStrategy,
    Schedule, Snapshot, SnapshotSpec, VirtualMachine, VirtualMachineSnapshot, Volume, VolumeSource,
    VolumeSpec,
};
use hci_core::{Error, Result};
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use super::console::{self, ConsoleStream};
use super::crud::{resource_service, to_proto};
use super::status::ResultExt;
use crate::proto;
use crate::proto::backup_service_server::BackupService;
use crate::proto::backup_target_service_server::BackupTargetService;
use crate::proto::image_service_server::ImageService;
use crate::proto::network_service_server::NetworkService;
use crate::proto::node_service_server::NodeService;
use crate::proto::schedule_service_server::ScheduleService;
use crate::proto::snapshot_service_server::SnapshotService;
use crate::proto::virtual_machine_service_server::VirtualMachineService;
use crate::proto::virtual_machine_snapshot_service_server::VirtualMachineSnapshotService;
use crate::proto::volume_service_server::VolumeService;

/// Annotation holding a power action for the VM controller to carry out
/// (`start`, `stop`, `restart`, `pause`, `resume`); it clears it when done.
pub const REQUESTED_ACTION: &str = "hci.dev/requested-action";
/// Annotation holding when [`REQUESTED_ACTION`] was requested (RFC 3339).
pub const REQUESTED_AT: &str = "hci.dev/requested-at";

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// A VM power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmAction {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
}

impl VmAction {
    fn name(self) -> &'static str {
        match self {
            VmAction::Start => "start",
            VmAction::Stop => "stop",
            VmAction::Restart => "restart",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
        }
    }
}

/// Records `action` in the VM: a run-strategy change where one expresses
/// it, otherwise a request annotation for the controller.
fn apply_vm_action(vm: &mut VirtualMachine, action: VmAction) {
    use RunStrategy::{Always, Halted, RerunOnFailure};
    match (action, vm.spec.run_strategy) {
        (VmAction::Start, Halted) => vm.spec.run_strategy = Always,
        (VmAction::Start, Always) | (VmAction::Stop, Halted) => {}
        (VmAction::Stop, Always | RerunOnFailure) => vm.spec.run_strategy = Halted,
        // Start under RerunOnFailure or Manual, Stop under Manual, and
        // every Restart, Pause and Resume.
        _ => {
            let annotations = &mut vm.metadata.annotations;
            annotations.insert(REQUESTED_ACTION.to_string(), action.name().to_string());
            annotations.insert(REQUESTED_AT.to_string(), chrono::Utc::now().to_rfc3339());
        }
    }
}

impl Api {
    async fn vm_action(
        &self,
        request: Request<proto::VmActionRequest>,
        action: VmAction,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        tracing::debug!(vm = req.name, action = action.name(), "VM action");
        let vm: VirtualMachine = self
            .resources()
            .modify(&req.name, nonzero(req.resource_version), |vm| {
                apply_vm_action(vm, action);
                Ok(())
            })
            .await
            .or_status()?;
        Ok(Response::new(to_proto(&vm)?))
    }
}

resource_service!(VirtualMachineService, VirtualMachine {
    async fn start(
        &self,
        request: Request<proto::VmActionRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        self.vm_action(request, VmAction::Start).await
    }

    async fn stop(
        &self,
        request: Request<proto::VmActionRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        self.vm_action(request, VmAction::Stop).await
    }

    async fn restart(
        &self,
        request: Request<proto::VmActionRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        self.vm_action(request, VmAction::Restart).await
    }

    async fn pause(
        &self,
        request: Request<proto::VmActionRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        self.vm_action(request, VmAction::Pause).await
    }

    async fn resume(
        &self,
        request: Request<proto::VmActionRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        self.vm_action(request, VmAction::Resume).await
    }

    async fn migrate(
        &self,
        request: Request<proto::MigrateVmRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        tracing::debug!(vm = req.name, target = req.target_node, "VM migration");
        let target = req.target_node.trim().to_string();
        if req.cancel {
            let vm: VirtualMachine = self
                .resources()
                .modify(&req.name, nonzero(req.resource_version), |vm: &mut VirtualMachine| {
                    // A request the source has not taken yet simply goes.
                    let requested = vm
                        .metadata
                        .annotations
                        .remove(crate::controllers::MIGRATE_TO)
                        .is_some();
                    let name = vm.metadata.name.clone();
                    match vm
                        .status_mut()
                        .migration
                        .as_mut()
                        .filter(|m| !m.phase.is_finished())
                    {
                        // The source stops it unless the switch-over has
                        // begun, and records which (the CLI follows).
                        Some(m) => m.cancel_requested = true,
                        None if requested => {}
                        None => {
                            return Err(hci_core::Error::invalid(
                                format!("VM {name:?}"),
                                "no live migration is under way",
                            ));
                        }
                    }
                    Ok(())
                })
                .await
                .or_status()?;
            return Ok(Response::new(to_proto(&vm)?));
        }
        let vm: VirtualMachine = self
            .resources()
            .modify(&req.name, nonzero(req.resource_version), |vm: &mut VirtualMachine| {
                let status = vm.status_or_default();
                if let Some(m) = &status.migration
                    && !m.phase.is_finished()
                {
                    return Err(hci_core::Error::Busy {
                        kind: "VirtualMachine",
                        name: vm.metadata.name.clone(),
                        reason: format!(
                            "a live migration to node {} is under way",
                            m.target_node
                        ),
                    });
                }
                if status.node.is_none() {
                    return Err(hci_core::Error::invalid(
                        format!("VM {:?}", vm.metadata.name),
                        "it runs on no node: only a running VM can be live-migrated",
                    ));
                }
                vm.metadata.annotations.insert(
                    crate::controllers::MIGRATE_TO.to_string(),
                    target.clone(),
                );
                Ok(())
            })
            .await
            .or_status()?;
        Ok(Response::new(to_proto(&vm)?))
    }

    type ConsoleStream = ConsoleStream;

    async fn console(
        &self,
        request: Request<Streaming<proto::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let Some(provider) = self.console.clone() else {
            return Err(Status::failed_precondition(
                "this daemon has no console backend: VM consoles arrive with the VM controller",
            ));
        };
        let stream = console::session(&*provider, self.resources(), request.into_inner()).await?;
        Ok(Response::new(stream))
    }
});

resource_service!(VolumeService, Volume {
    async fn snapshot_volume(
        &self,
        request: Request<proto::SnapshotVolumeRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        let volume: Volume = self.resources().get(&req.volume).await.or_status()?;
        let spec = SnapshotSpec {
            volume: volume.metadata.name,
        };
        let mut snapshot = Snapshot::new(req.snapshot, spec);
        snapshot.metadata.labels = req.labels.into_iter().collect();
        let snapshot = self.resources().create(snapshot).await.or_status()?;
        Ok(Response::new(to_proto(&snapshot)?))
    }

    async fn clone_volume(
        &self,
        request: Request<proto::CloneVolumeRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        let source: Volume = self.resources().get(&req.volume).await.or_status()?;
        let spec = VolumeSpec {
            source: VolumeSource::Volume { name: req.volume },
            ..source.spec
        };
        let clone = self.resources().create(Volume::new(req.name, spec)).await.or_status()?;
        Ok(Response::new(to_proto(&clone)?))
    }

    async fn expand_volume(
        &self,
        request: Request<proto::ExpandVolumeRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        let size = ByteSize(req.size);
        let volume: Volume = self
            .resources()
            .modify(&req.volume, nonzero(req.resource_version), |v: &mut Volume| {
                if size < v.spec.size {
                    let reason = format!(
                        "{size} is smaller than the volume ({}): volumes cannot shrink",
                        v.spec.size
                    );
                    return Err(Error::invalid("size", reason));
                }
                v.spec.size = size;
                Ok(())
            })
            .await
            .or_status()?;
        Ok(Response::new(to_proto(&volume)?))
    }
});

resource_service!(ImageService, Image {});
resource_service!(SnapshotService, Snapshot {});
resource_service!(NetworkService, Network {});
resource_service!(BackupTargetService, BackupTarget {});
resource_service!(ScheduleService, Schedule {});
resource_service!(NodeService, Node {});

resource_service!(VirtualMachineSnapshotService, VirtualMachineSnapshot {
    async fn restore_vm_snapshot(
        &self,
        request: Request<proto::RestoreVmSnapshotRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        if req.vm.is_empty() {
            return Err(Error::invalid("vm", "is required: the name of the new VM")).or_status();
        }
        let snapshot: VirtualMachineSnapshot =
            self.resources().get(&req.snapshot).await.or_status()?;
        let (vm, volumes) = snapshot.restore_plan(&req.vm).or_status()?;
        for v in volumes {
            self.resources().create(v).await.or_status()?;
        }
        let vm = self.resources().create(vm).await.or_status()?;
        Ok(Response::new(to_proto(&vm)?))
    }
});

impl Api {
    /// The volume a restore of `backup` creates.
    async fn restore_spec(&self, backup: &Backup, size: u64) -> Result<VolumeSpec> {
        let BackupSource::Volume { name: source } = &backup.spec.source else {
            return Err(Error::invalid(
                "vm",
                "a VirtualMachine backup restores as a VM: set vm to the new VM's name",
            ));
        };
        let source: Option<Volume> = self.resources().try_get(source).await?;
        let mut spec = match (&source, size) {
            (_, size) if size != 0 => VolumeSpec::blank(ByteSize(size)),
            (Some(v), _) => VolumeSpec::blank(v.spec.size),
            (None, _) => {
                return Err(Error::invalid(
                    "size",
                    "is required: the backed-up volume no longer exists to take it from",
                ));
            }
        };
        if let Some(v) = source {
            spec.replicas = v.spec.replicas;
            spec.storage_class = v.spec.storage_class;
        }
        spec.source = VolumeSource::Backup {
            name: backup.name().to_string(),
        };
        Ok(spec)
    }
}

resource_service!(BackupService, Backup {
    async fn restore_backup(
        &self,
        request: Request<proto::RestoreBackupRequest>,
    ) -> Result<Response<proto::Resource>, Status> {
        let req = request.into_inner();
        let backup: Backup = self.resources().get(&req.backup).await.or_status()?;
        if let BackupSource::VirtualMachine { .. } = &backup.spec.source {
            if req.vm.is_empty() {
                return Err(Error::invalid("vm", "is required to restore a VM backup")).or_status();
            }
            let (vm, volumes) =
                crate::controllers::backup::vm_restore_plan(self.resources(), &backup, &req.vm)
                    .await
                    .or_status()?;
            for v in volumes {
                self.resources().create(v).await.or_status()?;
            }
            let vm = self.resources().create(vm).await.or_status()?;
            return Ok(Response::new(to_proto(&vm)?));
        }
        let spec = self.restore_spec(&backup, req.size).await.or_status()?;
        let volume = self.resources().create(Volume::new(req.volume, spec)).await.or_status()?;
        Ok(Response::new(to_proto(&volume)?))
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use hci_core::model::{BootSpec, FirmwareBoot, FirmwareKind, VmSpec};

    fn vm(strategy: RunStrategy) -> VirtualMachine {
        let boot = BootSpec::Firmware(FirmwareBoot {
            kind: FirmwareKind::Uefi,
            secure_boot: false,
        });
        let mut vm = VirtualMachine::new("vm", VmSpec::new(1, ByteSize::mib(256), boot));
        vm.spec.run_strategy = strategy;
        vm
    }

    #[test]
    fn power_actions() {
        let mut v = vm(RunStrategy::Halted);
        apply_vm_action(&mut v, VmAction::Start);
        assert_eq!(v.spec.run_strategy, RunStrategy::Always);
        assert!(v.metadata.annotations.is_empty());
        apply_vm_action(&mut v, VmAction::Stop);
        assert_eq!(v.spec.run_strategy, RunStrategy::Halted);
        let mut v = vm(RunStrategy::Manual);
        apply_vm_action(&mut v, VmAction::Start);
        assert_eq!(v.spec.run_strategy, RunStrategy::Manual);
        assert_eq!(
            v.metadata
                .annotations
                .get(REQUESTED_ACTION)
                .map(String::as_str),
            Some("start")
        );
        let mut v = vm(RunStrategy::Always);
        apply_vm_action(&mut v, VmAction::Restart);
        assert_eq!(
            v.metadata
                .annotations
                .get(REQUESTED_ACTION)
                .map(String::as_str),
            Some("restart")
        );
        assert!(v.metadata.annotations.contains_key(REQUESTED_AT));
    }
}
