//! Disks that move with a live migration: a [`HandoverDisk`] is the
//! [`BlockDevice`] a VM's virtio-blk (or NBD export) uses, in front of the
//! volume that this process owns — a local hci-storage volume (its lock) or
//! a replicated volume (its engine, fenced by generation).
//!
//! ```text
//! source                                   target
//!   open() — owns the volume                 prepare() — nothing owned yet:
//!   … guest I/O …                              replicated: replicas reached,
//!                                              handles open, nobody fenced;
//!                                              I/O waits
//!   pause, quiesce devices
//!   release() — flush; unlock the volume /
//!     stop the engine (no clean-shutdown
//!     write); generation → stream    ──►     activate(generation) — lock it /
//!                                              fence the old engine (one fence
//!                                              write per replica); waiting I/O
//!                                              goes on
//!   on failure: reacquire() (reopen;
//!     a newer generation fences any
//!     target that activated)
//! ```
//!
//! Local volumes need the source's release before the target can lock them;
//! replicated ones would fence the source the moment the target's engine
//! opened, so the target prepares early and activates only after the source
//! released.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::{Error, Result};
use hci_storage::engine::{PreparedVolume, ReplicatedVolume};
use hci_storage::local::{Replica, ReplicaDevice};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::replicated::{self, ReplicatedDisk};

/// Where a [`HandoverDisk`]'s volume lives.
#[derive(Debug, Clone)]
pub enum VolumeSource {
    /// A local hci-storage volume directory.
    Local {
        /// The volume's directory.
        path: PathBuf,
        /// Its key file, for an encrypted volume.
        key_file: Option<PathBuf>,
        /// Serve `hci_storage::local::control` on the volume's control
        /// socket while this process owns it (what `hci-vmm` does).
        control: bool,
    },
    /// A replicated volume over replica servers.
    Replicated {
        /// The volume's name on the replica servers.
        volume: String,
        /// The replica servers (`HOST:PORT`).
        replicas: Vec<String>,
        /// File holding the servers' token.
        token_file: PathBuf,
        /// Key file of an encrypted volume.
        key_file: Option<PathBuf>,
        /// Unix socket to answer `hci-storage replicas` requests on.
        control: Option<PathBuf>,
    },
}

impl VolumeSource {
    fn replicated(&self, read_only: bool) -> Option<ReplicatedDisk<'_>> {
        match self {
            VolumeSource::Replicated {
                volume,
                replicas,
                token_file,
                key_file,
                control,
            } => Some(ReplicatedDisk {
                volume,
                replicas,
                token_file,
                key_file: key_file.as_deref(),
                control: control.as_deref(),
                read_only,
            }),
            VolumeSource::Local { .. } => None,
        }
    }

    /// `volume PATH` or `replicated volume NAME`.
    pub fn describe(&self) -> String {
        match self {
            VolumeSource::Local { path, .. } => format!("volume {}", path.display()),
            VolumeSource::Replicated { volume, .. } => format!("replicated volume {volume}"),
        }
    }
}

/// What a source tells the target about one disk it released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The disk's name in the VM.
    pub disk: String,
    /// The generation of the replicated engine that was released (`None`
    /// for a local volume).
    pub generation: Option<u64>,
}

/// What this process holds of the volume while it owns it.
enum Owned {
    Local {
        replica: Arc<Replica>,
        control: Option<JoinHandle<()>>,
    },
    Replicated {
        engine: Arc<ReplicatedVolume>,
        control: Option<JoinHandle<()>>,
    },
}

impl Drop for Owned {
    fn drop(&mut self) {
        // The control socket's task holds the volume: stop it with us.
        let (Owned::Local { control, .. } | Owned::Replicated { control, .. }) = self;
        if let Some(t) = control.take() {
            t.abort();
        }
    }
}

enum Slot {
    /// This process owns the volume: I/O goes to `dev`.
    Active { dev: Arc<dyn BlockDevice> },
    /// Prepared, not owned: reads go to `dev` (a read-only engine, which
    /// fences nobody); writes wait, flushes have nothing to sync. A QEMU
    /// started for an incoming migration reads its disks while the source
    /// still runs (it drops what it read when the migration completes).
    Reading { dev: Arc<dyn BlockDevice> },
    /// Not owned (yet, or any more): I/O waits.
    Waiting,
    /// Never owned again: I/O fails with this reason.
    Failed(String),
}

/// A VM disk whose volume can be handed to another process at a live
/// migration's switch-over. See the [module docs](self).
pub struct HandoverDisk {
    name: String,
    source: VolumeSource,
    read_only: bool,
    size: std::sync::atomic::AtomicU64,
    slot: RwLock<Slot>,
    owned: Mutex<Option<Owned>>,
    prepared: tokio::sync::Mutex<Option<PreparedVolume>>,
    /// Set once this process owned the volume.
    owned_once: std::sync::atomic::AtomicBool,
    /// Bumped whenever `slot` changes, to wake waiting I/O.
    changed: tokio::sync::watch::Sender<u64>,
    /// Serialises open/release/activate.
    transition: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for HandoverDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoverDisk")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("active", &self.is_active())
            .finish()
    }
}

fn local_control_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl HandoverDisk {
    fn new(name: &str, source: VolumeSource, read_only: bool, size: u64) -> Arc<Self> {
        Arc::new(HandoverDisk {
            name: name.to_string(),
            source,
            read_only,
            size: std::sync::atomic::AtomicU64::new(size),
            slot: RwLock::new(Slot::Waiting),
            owned: Mutex::new(None),
            prepared: tokio::sync::Mutex::new(None),
            owned_once: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(0),
            transition: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens `source` now (locks the local volume / opens the engine with a
    /// new generation): this process owns it.
    pub async fn open(name: &str, source: VolumeSource, read_only: bool) -> Result<Arc<Self>> {
        let disk = Self::new(name, source, read_only, 0);
        {
            let _t = disk.transition.lock().await;
            disk.acquire(None, true).await?;
        }
        Ok(disk)
    }

    /// Makes the disk ready to take `source` over from another process
    /// without touching the owner's hold on it: a replicated volume's
    /// replicas are reached and its engine prepared
    /// ([`ReplicatedVolume::prepare`]); a local volume's size is asked from
    /// its owner's control socket when it has one (else `size()` is 0 until
    /// [`HandoverDisk::activate`]). I/O waits until then.
    pub async fn prepare(name: &str, source: VolumeSource, read_only: bool) -> Result<Arc<Self>> {
        let disk = Self::new(name, source, read_only, 0);
        match &disk.source {
            VolumeSource::Replicated { .. } => {
                let Some(spec) = disk.source.replicated(read_only) else {
                    return Err(Error::Cancelled);
                };
                let prepared = replicated::prepare(spec).await?;
                disk.set_size(prepared.size());
                *disk.prepared.lock().await = Some(prepared);
                let reader = replicated::prepare(ReplicatedDisk {
                    read_only: true,
                    control: None,
                    ..spec
                })
                .await?
                .activate()
                .await?;
                disk.set_slot(Slot::Reading { dev: reader });
            }
            VolumeSource::Local { path, .. } => {
                if let (Some(parent), Some(n)) = (path.parent(), path.file_name()) {
                    let backend = hci_storage::local::LocalVolumeBackend::new(parent)?;
                    let n = n.to_string_lossy().into_owned();
                    if let Ok(info) = hci_core::volume::VolumeBackend::info(&backend, &n).await {
                        disk.set_size(info.size);
                    }
                    // The backend may have opened (locked) the volume if
                    // nobody held it: let it go again.
                    drop(backend);
                }
            }
        }
        Ok(disk)
    }

    /// The disk's name in the VM.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its volume lives.
    pub fn source(&self) -> &VolumeSource {
        &self.source
    }

    /// The generation of the engine that owned a replicated volume when
    /// this disk was prepared (the one the hand-over takes it from), while
    /// prepared and not yet activated.
    pub async fn prepared_from(&self) -> Option<u64> {
        self.prepared
            .lock()
            .await
            .as_ref()
            .map(|p| p.generation().saturating_sub(1))
    }

    /// Whether this process owns the volume now.
    pub fn is_active(&self) -> bool {
        matches!(
            *self.slot.read().unwrap_or_else(|e| e.into_inner()),
            Slot::Active { .. }
        )
    }

    /// Whether the size is known (always once active; before, when prepare
    /// could learn it).
    pub fn size_known(&self) -> bool {
        self.size() > 0
    }

    /// The replicated engine while this process owns it.
    pub fn engine(&self) -> Option<Arc<ReplicatedVolume>> {
        match &*self.owned.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Owned::Replicated { engine, .. }) => Some(engine.clone()),
            _ => None,
        }
    }

    fn set_size(&self, size: u64) {
        self.size.store(size, std::sync::atomic::Ordering::SeqCst);
    }

    fn was_owned(&self) -> bool {
        self.owned_once.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_slot(&self, slot: Slot) {
        if matches!(slot, Slot::Active { .. }) {
            self.owned_once
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = slot;
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Takes the volume: a fresh open, or the prepared engine activated
    /// after the source released generation `released`; serves its control
    /// socket if asked and `control`.
    async fn acquire(&self, released: Option<u64>, control: bool) -> Result<()> {
        let serve = control;
        let owned = match &self.source {
            VolumeSource::Local {
                path,
                key_file,
                control,
            } => {
                let (path, key_file) = (path.clone(), key_file.clone());
                let replica = tokio::task::spawn_blocking(move || {
                    crate::hypervisor::open_replica(&path, key_file.as_deref())
                })
                .await
                .map_err(|e| Error::io("open a volume", std::io::Error::other(e)))??;
                let control = if *control && serve {
                    let VolumeSource::Local { path, .. } = &self.source else {
                        return Err(Error::Cancelled);
                    };
                    Some(hci_storage::local::control::serve(
                        replica.clone(),
                        &local_control_name(path),
                        path,
                    )?)
                } else {
                    None
                };
                let dev: Arc<dyn BlockDevice> =
                    Arc::new(ReplicaDevice::new(replica.clone(), self.read_only));
                self.set_size(dev.size());
                self.set_slot(Slot::Active { dev });
                Owned::Local { replica, control }
            }
            VolumeSource::Replicated { .. } => {
                let Some(spec) = self.source.replicated(self.read_only) else {
                    return Err(Error::Cancelled);
                };
                let prepared = self.prepared.lock().await.take();
                let engine = match prepared {
                    Some(p) => match released {
                        Some(g) => p.activate_after_release(g).await?,
                        None => p.activate().await?,
                    },
                    None => replicated::prepare(spec).await?.activate().await?,
                };
                let spec = ReplicatedDisk {
                    control: spec.control.filter(|_| serve),
                    ..spec
                };
                let control = match replicated::serve_control(&engine, spec) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = engine.close().await;
                        return Err(e);
                    }
                };
                let dev: Arc<dyn BlockDevice> = engine.clone();
                self.set_size(dev.size());
                self.set_slot(Slot::Active { dev });
                Owned::Replicated { engine, control }
            }
        };
        *self.owned.lock().unwrap_or_else(|e| e.into_inner()) = Some(owned);
        Ok(())
    }

    /// Target side of a hand-over: takes the volume over once the source
    /// released it (`released`: the generation its engine had, for a
    /// replicated volume). Waiting I/O then proceeds.
    pub async fn activate(&self, released: Option<u64>) -> Result<()> {
        let _t = self.transition.lock().await;
        if self.is_active() {
            return Ok(());
        }
        self.acquire(released, true).await
    }

    /// Source side of a hand-over (the VM paused and its devices
    /// quiesced): lets the volume go — a local volume's lock and control
    /// socket, a replicated volume's engine ([released](ReplicatedVolume::release),
    /// not closed: the target activates without a reconcile). No flush: the
    /// target's flushes sync the same files. I/O waits from now on. On error
    /// the disk stays active.
    pub async fn release(&self) -> Result<Released> {
        let _t = self.transition.lock().await;
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner()).take();
        let generation = match owned.as_mut() {
            None => {
                return Err(Error::Unavailable {
                    what: format!("disk {}", self.name),
                    source: Some("this process does not own its volume".into()),
                });
            }
            Some(Owned::Replicated { engine, .. }) => {
                if let Err(e) = engine.release().await {
                    *self.owned.lock().unwrap_or_else(|e| e.into_inner()) = owned;
                    return Err(e);
                }
                Some(engine.generation())
            }
            // Nothing to flush: the target opens the same files on this
            // host, and its flushes sync them (see
            // [`ReplicatedVolume::release`] for the same argument).
            Some(Owned::Local { .. }) => None,
        };
        self.set_slot(Slot::Waiting);
        let local = match &owned {
            Some(Owned::Local { replica, .. }) => Some(replica.clone()),
            _ => None,
        };
        drop(owned);
        if let Some(replica) = local {
            // The lock goes with the last reference: the control socket's
            // task (aborted) and its connections let go of theirs shortly.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut spins = 0u32;
            while Arc::strong_count(&replica) > 1 && std::time::Instant::now() < deadline {
                // Usually one turn of the runtime drops the aborted task.
                if spins < 100 {
                    tokio::task::yield_now().await;
                    spins += 1;
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            if Arc::strong_count(&replica) > 1 {
                let dev: Arc<dyn BlockDevice> =
                    Arc::new(ReplicaDevice::new(replica.clone(), self.read_only));
                self.set_slot(Slot::Active { dev });
                *self.owned.lock().unwrap_or_else(|e| e.into_inner()) = Some(Owned::Local {
                    replica,
                    control: None,
                });
                return Err(Error::Busy {
                    kind: "volume",
                    name: self.source.describe(),
                    reason: "still in use in this process".into(),
                });
            }
        }
        tracing::info!(disk = %self.name, ?generation, "disk released");
        Ok(Released {
            disk: self.name.clone(),
            generation,
        })
    }

    /// Source side after a failed switch-over: owns the volume again (a
    /// fresh open; for a replicated volume a newer generation, which fences
    /// a target that activated meanwhile). The control socket is not served
    /// again: a seccomp-filtered VMM may not create listening sockets any
    /// more (the daemon's requests through it fail until the VM restarts).
    pub async fn reacquire(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        if self.is_active() {
            return Ok(());
        }
        self.prepared.lock().await.take();
        self.acquire(None, false).await
    }

    /// Gives up: waiting and later I/O fail with `why`; a prepared engine
    /// is dropped (nobody was fenced).
    pub async fn fail(&self, why: &str) {
        let _t = self.transition.lock().await;
        self.prepared.lock().await.take();
        if !self.is_active() {
            self.set_slot(Slot::Failed(why.to_string()));
        }
    }

    /// Closes the volume for good (a replicated engine records a clean
    /// shutdown); later I/O fails.
    pub async fn close(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        self.prepared.lock().await.take();
        self.set_slot(Slot::Failed("the disk was closed".into()));
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (engine, replica) = match &owned {
            Some(Owned::Replicated { engine, .. }) => (Some(engine.clone()), None),
            Some(Owned::Local { replica, .. }) => (None, Some(replica.clone())),
            None => (None, None),
        };
        // The control socket this process served goes with it (after a
        // hand-over the path belongs to the target: not touched then).
        let socket = match (&owned, &self.source) {
            (
                Some(Owned::Local {
                    control: Some(_), ..
                }),
                VolumeSource::Local { path, .. },
            ) => Some(hci_storage::local::control::socket_path(path)),
            (
                Some(Owned::Replicated {
                    control: Some(_), ..
                }),
                VolumeSource::Replicated {
                    control: Some(p), ..
                },
            ) => Some(p.clone()),
            _ => None,
        };
        drop(owned);
        if let Some(p) = socket {
            let _ = std::fs::remove_file(p);
        }
        if let Some(engine) = engine {
            return engine.close().await;
        }
        if let Some(replica) = replica {
            return tokio::task::spawn_blocking(move || replica.flush())
                .await
                .map_err(|e| Error::io("flush a volume", std::io::Error::other(e)))?;
        }
        Ok(())
    }

    /// The device I/O goes to, waiting while the volume is not owned here
    /// (reads are served while prepared, when `read` and a reader exists).
    async fn device(&self, read: bool) -> Result<Arc<dyn BlockDevice>> {
        match &*self.slot.read().unwrap_or_else(|e| e.into_inner()) {
            Slot::Active { dev } => return Ok(dev.clone()),
            Slot::Reading { dev } if read => return Ok(dev.clone()),
            _ => {}
        }
        let mut rx = self.changed.subscribe();
        loop {
            match &*self.slot.read().unwrap_or_else(|e| e.into_inner()) {
                Slot::Active { dev } => return Ok(dev.clone()),
                Slot::Reading { dev } if read => return Ok(dev.clone()),
                Slot::Failed(why) => {
                    return Err(Error::Unavailable {
                        what: format!("disk {}", self.name),
                        source: Some(why.clone().into()),
                    });
                }
                Slot::Waiting | Slot::Reading { .. } => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::Cancelled);
            }
        }
    }
}

#[async_trait]
impl BlockDevice for HandoverDisk {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> DeviceCaps {
        // Local volumes and replicated engines offer the same.
        DeviceCaps {
            discard: true,
            write_zeroes: true,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.device(true).await?.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.device(false).await?.write_at(buf, offset, flags).await
    }

    async fn flush(&self) -> Result<()> {
        enum Next {
            Flush(Arc<dyn BlockDevice>),
            Done,
            Wait,
            Fail(String),
        }
        let next = match &*self.slot.read().unwrap_or_else(|e| e.into_inner()) {
            Slot::Active { dev } => Next::Flush(dev.clone()),
            // Prepared, never owned: nothing was written through this disk.
            Slot::Waiting | Slot::Reading { .. } if !self.was_owned() => Next::Done,
            // Released: a flush waits like a write (none comes from a
            // quiesced source).
            Slot::Waiting | Slot::Reading { .. } => Next::Wait,
            Slot::Failed(why) => Next::Fail(why.clone()),
        };
        match next {
            Next::Flush(dev) => dev.flush().await,
            Next::Done => Ok(()),
            Next::Wait => self.device(false).await?.flush().await,
            Next::Fail(why) => Err(Error::Unavailable {
                what: format!("disk {}", self.name),
                source: Some(why.into()),
            }),
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.device(false).await?.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.device(false)
            .await?
            .write_zeroes(offset, len, flags)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.device(true).await?.block_status(offset, len).await
    }
}

/// Opens (or, with `prepare`, prepares to take over in a live migration)
/// the volumes of `config`'s [`DiskBackend::Volume`] and
/// [`DiskBackend::Replicated`] disks as [`HandoverDisk`]s and replaces them
/// with the opened devices ([`DiskBackend::Device`]); `volume_control`:
/// local volumes serve their control socket while owned here; without
/// `local`, [`DiskBackend::Volume`] disks are left as they are. On error,
/// what was opened is closed.
///
/// [`DiskBackend::Volume`]: hci_core::compute::DiskBackend::Volume
/// [`DiskBackend::Replicated`]: hci_core::compute::DiskBackend::Replicated
/// [`DiskBackend::Device`]: hci_core::compute::DiskBackend::Device
pub async fn open_config_disks(
    config: &mut hci_core::compute::VmConfig,
    prepare: bool,
    volume_control: bool,
    local: bool,
) -> Result<Vec<Arc<HandoverDisk>>> {
    use hci_core::compute::DiskBackend;
    let mut opened: Vec<Arc<HandoverDisk>> = Vec::new();
    for d in &mut config.disks {
        let source = match &d.backend {
            DiskBackend::Volume { path, key_file } if local => VolumeSource::Local {
                path: path.clone(),
                key_file: key_file.clone(),
                control: volume_control,
            },
            DiskBackend::Replicated {
                volume,
                replicas,
                token_file,
                key_file,
                control,
            } => VolumeSource::Replicated {
                volume: volume.clone(),
                replicas: replicas.clone(),
                token_file: token_file.clone(),
                key_file: key_file.clone(),
                control: control.clone(),
            },
            _ => continue,
        };
        let what = format!("disk {} ({})", d.name, source.describe());
        let r = if prepare {
            HandoverDisk::prepare(&d.name, source, d.read_only).await
        } else {
            HandoverDisk::open(&d.name, source, d.read_only).await
        };
        match r {
            Ok(disk) => {
                d.backend = DiskBackend::Device(disk.clone());
                opened.push(disk);
            }
            Err(e) => {
                for o in &opened {
                    let _ = o.close().await;
                }
                return Err(Error::invalid(what, e.to_string()));
            }
        }
    }
    Ok(opened)
}
