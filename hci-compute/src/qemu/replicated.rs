//! Replicated volumes ([`DiskBackend::Replicated`]) for QEMU VMs: this
//! process opens the volume's engine over its replica servers (fencing any
//! older engine), answers its control socket when one is asked for, and
//! serves the engine to QEMU over NBD like any in-process device. The
//! engine is closed cleanly when the VM's QEMU is gone.

use std::sync::Arc;

use hci_core::compute::{DiskBackend, VmConfig};
use hci_core::{Error, Result};
use hci_storage::engine::ReplicatedVolume;

/// Engines opened for a VM, and their control-socket tasks.
#[derive(Debug, Default)]
pub(super) struct Engines {
    pub(super) engines: Vec<Arc<ReplicatedVolume>>,
    pub(super) control: Vec<tokio::task::JoinHandle<()>>,
}

impl Engines {
    /// Stops the control sockets and closes every engine (marks replicas clean).
    pub(super) async fn close(self) {
        for t in self.control {
            t.abort();
        }
        for e in self.engines {
            if let Err(e) = e.close().await {
                tracing::warn!(error = %e, "closing a replicated volume failed");
            }
        }
    }
}

/// Replaces every [`DiskBackend::Replicated`] disk of `config` by the
/// opened engine ([`DiskBackend::Device`]).
pub(super) async fn open_all(config: &mut VmConfig) -> Result<Engines> {
    let mut out = Engines::default();
    for d in &mut config.disks {
        let DiskBackend::Replicated {
            volume,
            replicas,
            token_file,
            key_file,
            control,
        } = &d.backend
        else {
            continue;
        };
        let opened = crate::replicated::open(crate::replicated::ReplicatedDisk {
            volume,
            replicas,
            token_file,
            key_file: key_file.as_deref(),
            control: control.as_deref(),
            read_only: d.read_only,
        })
        .await;
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                out.close().await;
                return Err(Error::invalid(format!("disk {}", d.name), e.to_string()));
            }
        };
        out.control.extend(opened.control);
        d.backend = DiskBackend::Device(opened.engine.clone());
        out.engines.push(opened.engine);
    }
    Ok(out)
}
