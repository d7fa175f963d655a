//! Replicated volumes ([`DiskBackend::Replicated`]) for QEMU VMs: this
//! process runs the volume's engine over its replica servers (a
//! [`HandoverDisk`]), answers its control socket when one is asked for, and
//! serves it to QEMU over NBD like any in-process device. A VM that
//! receives a live migration only prepares the engine (its NBD export
//! exists, requests wait) and takes the volume over once the migration
//! arrived; a VM that migrated away releases it. The engine is closed
//! cleanly when the VM's QEMU is gone (unless it was handed over).
//!
//! [`DiskBackend::Replicated`]: hci_core::compute::DiskBackend::Replicated

use std::sync::Arc;

use hci_core::Result;
use hci_core::compute::VmConfig;

use crate::handover::HandoverDisk;

/// The replicated volumes of a VM.
#[derive(Debug, Default, Clone)]
pub(super) struct Engines {
    pub(super) disks: Vec<Arc<HandoverDisk>>,
}

impl Engines {
    /// Closes every volume still owned here (marks replicas clean).
    pub(super) async fn close(self) {
        for d in self.disks {
            if let Err(e) = d.close().await {
                tracing::warn!(disk = d.name(), error = %e, "closing a replicated volume failed");
            }
        }
    }
}

/// Replaces every replicated disk of `config` by its [`HandoverDisk`]
/// (opened, or only prepared for an incoming migration); with
/// `volume_control`, local volumes too, serving their control sockets.
pub(super) async fn open_all(
    config: &mut VmConfig,
    incoming: bool,
    volume_control: bool,
) -> Result<Engines> {
    let disks =
        crate::handover::open_config_disks(config, incoming, volume_control, volume_control)
            .await?;
    Ok(Engines { disks })
}
