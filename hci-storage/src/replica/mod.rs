//! Replicas as seen by the replicated engine: a [`ReplicaNode`] holds the
//! replicas of many volumes (in-process: [`LocalNode`]; over TCP:
//! [`client::RemoteNode`] talking to a [`server::ReplicaServer`]).
//!
//! Every node keeps, per volume, a small persistent [`FenceState`]: the newest
//! engine generation it has seen (older engines are refused with
//! [`Error::Fenced`]) and the membership epoch (bumped on the replicas that
//! stay in the set whenever the engine opens the volume or drops a replica, so
//! a replica that missed writes is recognisably stale).

pub mod client;
pub mod dirty;
pub mod proto;
pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{OpenVolume, VolumeBackend};
use hci_core::{Error, Result};

use crate::local::LocalVolumeBackend;

pub use dirty::{DirtyRegions, DirtyUpdate};

/// Fencing and membership state of one volume on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceState {
    /// Newest engine generation seen; older engines are refused.
    pub generation: u64,
    /// Membership epoch: replicas with the highest epoch hold every acknowledged write.
    pub epoch: u64,
    /// True if the last writable engine closed cleanly (flushed, nothing in
    /// flight), so the replicas of this epoch are known to be identical.
    #[serde(default)]
    pub clean: bool,
}

/// A place holding replicas: the engine's view of one node.
#[async_trait]
pub trait ReplicaNode: Send + Sync + std::fmt::Debug {
    /// A label for logs and status (address or path).
    fn label(&self) -> String;

    /// True if the replicas live in this process (preferred for reads).
    fn is_local(&self) -> bool;

    /// The volume operations (create, snapshot, revert, …) on this node.
    fn backend(&self) -> &dyn VolumeBackend;

    /// The fence state of `volume` (zeroes if never fenced).
    async fn fence_state(&self, volume: &str) -> Result<FenceState>;

    /// Records `generation` as the newest engine of `volume`; refused with
    /// [`Error::Fenced`] if a newer one was seen. Returns the state afterwards.
    async fn fence(&self, volume: &str, generation: u64) -> Result<FenceState>;

    /// Sets the membership epoch of `volume` on behalf of engine `generation`
    /// (and marks it in use: not clean).
    async fn set_epoch(&self, volume: &str, generation: u64, epoch: u64) -> Result<()>;

    /// Records that engine `generation` closed `volume` cleanly.
    async fn mark_clean(&self, volume: &str, generation: u64) -> Result<()>;

    /// The dirty-region log of `volume`: regions that may have had writes in
    /// flight when its last engine stopped. `None` if the node keeps no log
    /// for it (then reconcile must compare the whole volume). The default
    /// keeps none.
    async fn dirty_regions(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        let _ = volume;
        Ok(None)
    }

    /// Changes the dirty-region log of `volume` on behalf of engine
    /// `generation` (refused with [`Error::Fenced`] for an older engine);
    /// persisted before it returns. The default keeps no log and ignores it.
    async fn update_dirty(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        let _ = (volume, generation, update);
        Ok(())
    }

    /// Checks that the node answers (keepalive); in-process nodes always do.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// Opens the head of `volume` for engine `generation`: every later request
    /// through the handle is refused once a newer generation fenced the volume.
    async fn open_fenced(
        &self,
        volume: &str,
        generation: u64,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>>;
}

/// A [`ReplicaNode`] over a local directory of replicas.
#[derive(Debug)]
pub struct LocalNode {
    backend: LocalVolumeBackend,
    fences: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Serialises fence-file updates.
    write_lock: Mutex<()>,
    /// Dirty-region logs of the volumes whose log was read or written.
    dirty: Mutex<HashMap<String, dirty::DirtyLog>>,
}

impl LocalNode {
    /// A node over the replicas under `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let backend = LocalVolumeBackend::new(root)?;
        let dir = backend.root().join(".fence");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(LocalNode {
            backend,
            fences: Mutex::new(HashMap::new()),
            write_lock: Mutex::new(()),
            dirty: Mutex::new(HashMap::new()),
        })
    }

    /// The local backend behind the node.
    pub fn local(&self) -> &LocalVolumeBackend {
        &self.backend
    }

    fn fence_path(&self, volume: &str) -> Result<PathBuf> {
        crate::local::check_name("volume", volume)?;
        Ok(self
            .backend
            .root()
            .join(".fence")
            .join(format!("{volume}.json")))
    }

    fn load(&self, volume: &str) -> Result<FenceState> {
        let path = self.fence_path(volume)?;
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
                what: format!("fence state {}", path.display()),
                source: Some(Box::new(e)),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FenceState::default()),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    fn store(&self, volume: &str, st: FenceState) -> Result<()> {
        let path = self.fence_path(volume)?;
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(&st).map_err(|e| Error::Backend {
            backend: "replica",
            message: "encode fence state".into(),
            source: Some(Box::new(e)),
        })?;
        write_synced(&tmp, &body)?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("rename {}", tmp.display()), e))?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn current(&self, volume: &str) -> Result<Arc<AtomicU64>> {
        let mut map = self.fences.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(volume) {
            return Ok(c.clone());
        }
        let c = Arc::new(AtomicU64::new(self.load(volume)?.generation));
        map.insert(volume.to_string(), c.clone());
        Ok(c)
    }

    fn fence_sync(&self, volume: &str, generation: u64) -> Result<FenceState> {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.load(volume)?;
        if generation < st.generation {
            return Err(fenced(volume, generation, st.generation));
        }
        if generation > st.generation {
            st.generation = generation;
            self.store(volume, st)?;
        }
        self.current(volume)?
            .fetch_max(generation, Ordering::SeqCst);
        Ok(st)
    }

    fn set_epoch_sync(&self, volume: &str, generation: u64, epoch: u64) -> Result<()> {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.load(volume)?;
        if generation < st.generation {
            return Err(fenced(volume, generation, st.generation));
        }
        st.generation = generation;
        st.epoch = epoch;
        st.clean = false;
        self.store(volume, st)
    }

    fn mark_clean_sync(&self, volume: &str, generation: u64) -> Result<()> {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.load(volume)?;
        if generation < st.generation {
            return Err(fenced(volume, generation, st.generation));
        }
        st.clean = true;
        self.store(volume, st)
    }

    fn dirty_path(&self, volume: &str) -> Result<PathBuf> {
        Ok(self.fence_path(volume)?.with_extension("dirty"))
    }

    fn dirty_regions_sync(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        let path = self.dirty_path(volume)?;
        let mut logs = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = logs.get(volume) {
            return Ok(Some(l.regions()));
        }
        let Some(l) = dirty::DirtyLog::load(&path)? else {
            return Ok(None);
        };
        let r = l.regions();
        logs.insert(volume.to_string(), l);
        Ok(Some(r))
    }

    fn update_dirty_sync(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        let seen = self.current(volume)?.load(Ordering::SeqCst);
        if generation < seen {
            return Err(fenced(volume, generation, seen));
        }
        let path = self.dirty_path(volume)?;
        let mut logs = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        let (region_size, runs, mark) = match update {
            DirtyUpdate::Reset { region_size } => {
                logs.remove(volume);
                let l = dirty::DirtyLog::create(&path, region_size)?;
                logs.insert(volume.to_string(), l);
                return Ok(());
            }
            DirtyUpdate::Mark(r) => (r.region_size, r.runs, true),
            DirtyUpdate::Clear(r) => (r.region_size, r.runs, false),
        };
        if !logs.contains_key(volume) {
            let l = match dirty::DirtyLog::load(&path)? {
                Some(l) => l,
                None => dirty::DirtyLog::create(&path, region_size)?,
            };
            logs.insert(volume.to_string(), l);
        }
        match logs.get_mut(volume) {
            Some(l) => l.update(region_size, &runs, mark),
            None => Err(Error::Cancelled),
        }
    }

    /// Forgets the fence state of a deleted volume.
    pub fn forget(&self, volume: &str) {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(volume);
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(volume);
        if let Ok(p) = self.dirty_path(volume) {
            let _ = std::fs::remove_file(p);
        }
        if let Ok(p) = self.fence_path(volume) {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn write_synced(path: &Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    f.write_all(body)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn fenced(volume: &str, ours: u64, current: u64) -> Error {
    Error::Fenced {
        what: format!("volume {volume}"),
        ours,
        current,
    }
}

#[async_trait]
impl ReplicaNode for LocalNode {
    fn label(&self) -> String {
        self.backend.root().display().to_string()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn backend(&self) -> &dyn VolumeBackend {
        &self.backend
    }

    async fn fence_state(&self, volume: &str) -> Result<FenceState> {
        self.load(volume)
    }

    async fn fence(&self, volume: &str, generation: u64) -> Result<FenceState> {
        self.fence_sync(volume, generation)
    }

    async fn set_epoch(&self, volume: &str, generation: u64, epoch: u64) -> Result<()> {
        self.set_epoch_sync(volume, generation, epoch)
    }

    async fn mark_clean(&self, volume: &str, generation: u64) -> Result<()> {
        self.mark_clean_sync(volume, generation)
    }

    async fn dirty_regions(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        self.dirty_regions_sync(volume)
    }

    async fn update_dirty(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        self.update_dirty_sync(volume, generation, update)
    }

    async fn open_fenced(
        &self,
        volume: &str,
        generation: u64,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        let current = self.current(volume)?;
        let seen = current.load(Ordering::SeqCst);
        if generation < seen {
            return Err(fenced(volume, generation, seen));
        }
        let inner = self.backend.open(volume, options).await?;
        Ok(Arc::new(FencedDevice {
            volume: volume.to_string(),
            generation,
            current,
            inner,
        }))
    }
}

/// A device that refuses every request once a newer engine fenced its volume.
#[derive(Debug)]
pub struct FencedDevice {
    volume: String,
    generation: u64,
    current: Arc<AtomicU64>,
    inner: Arc<dyn BlockDevice>,
}

impl FencedDevice {
    fn check(&self) -> Result<()> {
        let cur = self.current.load(Ordering::SeqCst);
        if self.generation < cur {
            return Err(fenced(&self.volume, self.generation, cur));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for FencedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn capabilities(&self) -> DeviceCaps {
        self.inner.capabilities()
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check()?;
        self.inner.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.check()?;
        self.inner.write_at(buf, offset, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.check()?;
        self.inner.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.inner.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check()?;
        self.inner.block_status(offset, len).await
    }
}
