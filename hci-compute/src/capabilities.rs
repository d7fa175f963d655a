//! Snapshot, restore and live migration for the in-process KVM backend:
//! hci-core's [`Snapshottable`], [`Migratable`], [`RestoreVm`] and
//! [`ReceiveMigration`] over [`crate::snapshot`] and [`crate::migration`].

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use hci_core::compute::{
    Migratable, MigrationOptions, MigrationProgress, ReceiveMigration, RestoreVm, Snapshottable,
    VmConfig, VmHandle,
};
use hci_core::{Error, Result};
use tokio::sync::watch;

use crate::devices::virtio::block::Executor;
use crate::hypervisor::{KvmHypervisor, KvmVm, blocking, close_all};
use crate::vm::Vm;
use crate::{migration, snapshot};

/// Sets the flag when dropped: a dropped `migrate` future cancels the migration.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Snapshottable for KvmVm {
    async fn save(&self, path: &Path) -> Result<()> {
        let vm = self.vm().clone();
        let path = path.to_owned();
        blocking(move || snapshot::save(&vm, &path).map(|_| ()).map_err(Error::from)).await
    }
}

#[async_trait]
impl Migratable for KvmVm {
    async fn migrate(
        &self,
        target: &str,
        options: MigrationOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress> {
        let dropped = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(Arc::clone(&dropped));
        let vm = self.vm().clone();
        let disks = self.handover_disks().to_vec();
        let target = target.to_string();
        blocking(move || {
            let token = options.cancel.clone();
            let cancel = move || dropped.load(Ordering::SeqCst) || token.is_cancelled();
            migration::send(&vm, &disks, &target, &options, &progress, &cancel).map_err(Error::from)
        })
        .await
    }
}

impl KvmHypervisor {
    /// Restores the VM saved in `path` (see [`Snapshottable::save`]) with
    /// `config` (the same shape as when it was saved); it comes back paused.
    pub async fn restore_vm(&self, mut config: VmConfig, path: &Path) -> Result<KvmVm> {
        let disks = self.open_disks(&mut config, false).await?;
        let built = match self.spec(config) {
            Ok(spec) => {
                let executor = Executor::current();
                let path = path.to_owned();
                blocking(move || {
                    let vm = Vm::new_for_restore(spec, executor, None)?;
                    snapshot::restore(&vm, &path)?;
                    Ok(vm)
                })
                .await
            }
            Err(e) => Err(e),
        };
        match built {
            Ok(vm) => Ok(KvmVm::new(vm, disks)),
            Err(e) => {
                close_all(&disks).await;
                Err(e)
            }
        }
    }

    /// Receives one migration on `listener` (see [`migration::receive`]) and
    /// returns the VM running here. Volumes ([`DiskBackend::Volume`],
    /// [`DiskBackend::Replicated`]) are prepared first without taking them
    /// from the source (see [`crate::handover`]) and taken over at the
    /// switch-over, once the source has paused and released them.
    ///
    /// [`DiskBackend::Volume`]: hci_core::compute::DiskBackend::Volume
    /// [`DiskBackend::Replicated`]: hci_core::compute::DiskBackend::Replicated
    pub async fn receive_vm(
        &self,
        mut config: VmConfig,
        listener: std::net::TcpListener,
        token: &str,
    ) -> Result<KvmVm> {
        let disks = self.open_disks(&mut config, true).await?;
        let hv = self.clone();
        let token = token.to_string();
        let executor = Executor::current();
        let rt = tokio::runtime::Handle::current();
        let all = disks.clone();
        let r = blocking(move || {
            let accepted = migration::accept(
                &listener,
                &token,
                config.cpus,
                config.memory,
                hv.memory_backing(),
            )?;
            // The VM is built while pages arrive (it is most of the fixed
            // downtime) when every disk's size is known; a local volume
            // whose owner serves no control socket is sized only once taken.
            let early = if disks.iter().all(|d| d.size_known()) {
                let spec = hv.spec(config.clone())?;
                Some(Vm::new_for_restore(
                    spec,
                    executor.clone(),
                    Some(Arc::clone(&accepted.memory)),
                )?)
            } else {
                None
            };
            let incoming = accepted.read_state()?;
            let built = (|| -> Result<Vm> {
                // Every disk at once: a fence round on the replicas, a lock.
                let mut tasks = Vec::new();
                for d in &disks {
                    let released = incoming.state.handover.iter().find(|r| r.disk == d.name());
                    let Some(released) = released else {
                        return Err(Error::invalid(
                            format!("disk {}", d.name()),
                            "the source did not hand it over (does it own the volume?)",
                        ));
                    };
                    let (d, g) = (Arc::clone(d), released.generation);
                    tasks.push(rt.spawn(async move { d.activate(g).await }));
                }
                let mut first_err = None;
                for t in tasks {
                    let r = rt
                        .block_on(t)
                        .map_err(|e| Error::io("take a disk over", std::io::Error::other(e)))
                        .and_then(|r| r);
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
                let vm = match early {
                    Some(vm) => vm,
                    None => {
                        let spec = hv.spec(config)?;
                        Vm::new_for_restore(spec, executor, Some(Arc::clone(&incoming.memory)))?
                    }
                };
                vm.load(&incoming.state)?;
                vm.start()?;
                Ok(vm)
            })();
            match built {
                Ok(vm) => {
                    if let Err(e) = incoming.finish(Ok(())) {
                        // The source may resume too: never run two copies.
                        vm.kill();
                        return Err(e.into());
                    }
                    Ok(vm)
                }
                Err(e) => {
                    // Let go of what was taken, so the source can take it back.
                    for d in &disks {
                        if d.is_active() {
                            let _ = rt.block_on(d.release());
                        }
                    }
                    let _ = incoming.finish(Err(e.to_string()));
                    Err(e)
                }
            }
        })
        .await;
        match r {
            Ok(vm) => Ok(KvmVm::new(vm, all)),
            Err(e) => {
                for d in &all {
                    d.fail(&format!("the migration failed: {e}")).await;
                }
                close_all(&all).await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl RestoreVm for KvmHypervisor {
    async fn restore(&self, config: VmConfig, path: &Path) -> Result<Box<dyn VmHandle>> {
        Ok(Box::new(self.restore_vm(config, path).await?))
    }
}

#[async_trait]
impl ReceiveMigration for KvmHypervisor {
    async fn receive(
        &self,
        config: VmConfig,
        listen: &str,
        token: &str,
    ) -> Result<Box<dyn VmHandle>> {
        let listener = migration::listen(listen)?;
        Ok(Box::new(self.receive_vm(config, listener, token).await?))
    }
}
