//! Replicated volumes ([`DiskBackend::Replicated`]) for QEMU VMs: this
//! process opens the volume's engine over its replica servers (fencing any
//! older engine), answers its control socket when one is asked for, and
//! serves the engine to QEMU over NBD like any in-process device. The
//! engine is closed cleanly when the VM's QEMU is gone.

use std::sync::Arc;
use std::time::Duration;

use hci_core::compute::{DiskBackend, VmConfig};
use hci_core::volume::{EncryptionKey, OpenVolume};
use hci_core::{Error, Result};
use hci_storage::engine::{EngineOptions, ReplicatedVolume};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};

/// Bound on a replica server's answers.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);

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

fn read(what: &str, f: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(f).map_err(|e| Error::io(format!("read the {what} {}", f.display()), e))
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
        if replicas.is_empty() {
            return Err(Error::invalid(
                format!("disk {}", d.name),
                "a replicated volume needs at least one replica server",
            ));
        }
        let token = String::from_utf8_lossy(&read("token file", token_file)?)
            .trim()
            .as_bytes()
            .to_vec();
        let key = match key_file {
            Some(f) => Some(EncryptionKey::new(read("key file", f)?)),
            None => None,
        };
        let node = {
            let token = token.clone();
            move |at: &str| -> Arc<dyn ReplicaNode> {
                let mut sa = ServerAddr::new(at, token.clone());
                sa.timeout = REPLICA_TIMEOUT;
                Arc::new(RemoteNode::new(sa))
            }
        };
        let nodes: Vec<Arc<dyn ReplicaNode>> = replicas.iter().map(|a| node(a)).collect();
        let engine = match ReplicatedVolume::open(
            volume,
            &nodes,
            OpenVolume {
                read_only: d.read_only,
                encryption_key: key,
            },
            EngineOptions::default(),
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                out.close().await;
                return Err(e);
            }
        };
        if let Some(path) = control {
            let vol = volume.clone();
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
                Ok(node(at))
            };
            match hci_storage::control::Controller::new(engine.clone(), Box::new(resolve))
                .serve(path)
            {
                Ok(t) => out.control.push(t),
                Err(e) => {
                    out.engines.push(engine);
                    out.close().await;
                    return Err(e);
                }
            }
        }
        d.backend = DiskBackend::Device(engine.clone());
        out.engines.push(engine);
    }
    Ok(out)
}
