//! [`VolumeBackend`] over a directory of replicas, and the [`BlockDevice`]
//! handles it opens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use hci_core::block::{BlockDevice, ByteRange, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{
    CreateVolume, EncryptionKey, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo,
};
use hci_core::{Error, Result};

use super::check_name;
use super::control::ControlClient;
use super::volume::{Replica, SnapshotView};

/// A writable (or read-only) handle on a replica's head.
#[derive(Debug, Clone)]
pub struct ReplicaDevice {
    replica: Arc<Replica>,
    read_only: bool,
}

impl ReplicaDevice {
    /// A handle on `replica`.
    pub fn new(replica: Arc<Replica>, read_only: bool) -> Self {
        ReplicaDevice { replica, read_only }
    }

    /// The replica behind the handle.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                what: format!("volume {}", self.replica.dir().display()),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for ReplicaDevice {
    fn size(&self) -> u64 {
        self.replica.size()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps {
            discard: true,
            write_zeroes: true,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.replica.read(buf, offset)
    }

    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.writable()?;
        self.replica.write(buf, offset, false)?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// `fdatasync` (milliseconds on a disk) runs on the blocking pool, so
    /// the thread keeps serving other requests meanwhile; this matters most
    /// on a single-threaded runtime, where it would stall every request.
    async fn flush(&self) -> Result<()> {
        let replica = self.replica.clone();
        LocalVolumeBackend::blocking(move || replica.flush()).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        self.replica.zero(offset, len, false, false)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        self.replica.zero(offset, len, flags.no_hole, false)?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Err(Error::invalid("block status length", "must not be 0"));
        }
        self.replica.block_status(offset, len)
    }
}

/// A read-only handle on one snapshot.
#[derive(Debug)]
pub struct SnapshotDevice {
    view: SnapshotView,
}

#[async_trait]
impl BlockDevice for SnapshotDevice {
    fn size(&self) -> u64 {
        self.view.size()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps {
            discard: false,
            write_zeroes: false,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.view.read(buf, offset)
    }

    async fn write_at(&self, _: &[u8], _: u64, _: WriteFlags) -> Result<()> {
        Err(Error::ReadOnly {
            what: "snapshot".into(),
        })
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(Error::ReadOnly {
            what: "snapshot".into(),
        })
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
        Err(Error::ReadOnly {
            what: "snapshot".into(),
        })
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if len == 0 {
            return Err(Error::invalid("block status length", "must not be 0"));
        }
        self.view.block_status(offset, len)
    }
}

/// Volumes as replica directories under one root: `ROOT/<volume>/`.
///
/// Opened replicas are cached, so every handle of a volume shares one block map
/// and sees snapshots, reverts and expansions at once. Metadata operations that
/// copy data (snapshot deletion, clone) run on Tokio's blocking pool.
#[derive(Debug)]
pub struct LocalVolumeBackend {
    root: PathBuf,
    open: Mutex<HashMap<String, Arc<Replica>>>,
}

impl LocalVolumeBackend {
    /// A backend storing volumes under `root` (created if absent).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("create directory {}", root.display()), e))?;
        Ok(LocalVolumeBackend {
            root,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> Result<PathBuf> {
        check_name("volume", name)?;
        Ok(self.root.join(name))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Replica>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes this backend's handle on volume `name` (its lock goes with
    /// it), so another process can open the volume — e.g. a VMM process
    /// that serves it to a guest. `Busy` while devices of it are still open
    /// here. The next call that needs the volume opens it again.
    pub fn release(&self, name: &str) -> Result<()> {
        let mut cache = self.cache();
        if let Some(r) = cache.get(name)
            && Arc::strong_count(r) > 1
        {
            return Err(Error::Busy {
                kind: "volume",
                name: name.to_string(),
                reason: "devices of it are still open in this process".into(),
            });
        }
        cache.remove(name);
        Ok(())
    }

    /// Names of the volumes under the root, sorted, without opening them
    /// (volumes locked by another process are listed too).
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("list {}", self.root.display()), e))?;
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') && e.path().join("volume.json").exists() {
                names.push(n);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The opened replica of volume `name`.
    pub fn replica(&self, name: &str) -> Result<Arc<Replica>> {
        let dir = self.dir(name)?;
        let mut cache = self.cache();
        if let Some(r) = cache.get(name) {
            return Ok(r.clone());
        }
        let r = Replica::open(&dir, None).map_err(|e| match e {
            Error::NotFound { .. } => Error::not_found("volume", name),
            other => other,
        })?;
        cache.insert(name.to_string(), r.clone());
        Ok(r)
    }

    /// Who has volume `name` open: this backend, or another process that
    /// serves its metadata operations on the volume's control socket.
    fn owner(&self, name: &str) -> Result<Owner> {
        match self.replica(name) {
            Ok(r) => Ok(Owner::Here(r)),
            Err(busy @ Error::Busy { .. }) => {
                let client = ControlClient::new(&self.dir(name)?);
                if client.exists() {
                    Ok(Owner::Remote(client))
                } else {
                    Err(busy)
                }
            }
            Err(e) => Err(e),
        }
    }

    fn unlocked(&self, name: &str, key: Option<&EncryptionKey>) -> Result<Arc<Replica>> {
        let r = self.replica(name)?;
        match key {
            Some(k) => r.unlock(k)?,
            None if r.is_encrypted() => {
                return Err(Error::invalid(
                    format!("volume {name:?}"),
                    "is encrypted: a key is required",
                ));
            }
            None => {}
        }
        Ok(r)
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Backend {
                backend: "local",
                message: e.to_string(),
                source: None,
            })?
    }
}

/// See [`LocalVolumeBackend::owner`].
enum Owner {
    Here(Arc<Replica>),
    Remote(ControlClient),
}

#[async_trait]
impl VolumeBackend for LocalVolumeBackend {
    async fn create(&self, name: &str, params: CreateVolume) -> Result<VolumeInfo> {
        let dir = self.dir(name)?;
        if dir.exists() {
            return Err(Error::already_exists("volume", name));
        }
        let r = Replica::create(&dir, params.size, params.encryption_key.as_ref())?;
        self.cache().insert(name.to_string(), r.clone());
        r.info(name)
    }

    async fn open(&self, name: &str, options: OpenVolume) -> Result<Arc<dyn BlockDevice>> {
        let r = self.unlocked(name, options.encryption_key.as_ref())?;
        Ok(Arc::new(ReplicaDevice::new(r, options.read_only)))
    }

    async fn open_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        let view = match self.owner(name)? {
            Owner::Here(_) => {
                let r = self.unlocked(name, options.encryption_key.as_ref())?;
                r.open_snapshot(snapshot)
            }
            // Another process owns the volume: snapshots are immutable, read
            // them without its lock.
            Owner::Remote(_) => Replica::open_snapshot_shared(
                &self.dir(name)?,
                snapshot,
                options.encryption_key.as_ref(),
            ),
        }
        .map_err(|e| qualify(e, name, snapshot))?;
        Ok(Arc::new(SnapshotDevice { view }))
    }

    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        match self.owner(name)? {
            Owner::Here(r) => r.info(name),
            Owner::Remote(c) => c.info().await,
        }
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for n in self.names()? {
            out.push(self.info(&n).await?);
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        if !dir.join("volume.json").exists() {
            return Err(Error::not_found("volume", name));
        }
        self.cache().remove(name);
        // Rename first so a crash never leaves a half-deleted volume under its name.
        let trash = self.root.join(format!(".{name}.deleting"));
        std::fs::rename(&dir, &trash)
            .map_err(|e| Error::io(format!("delete {}", dir.display()), e))?;
        std::fs::remove_dir_all(&trash)
            .map_err(|e| Error::io(format!("delete {}", trash.display()), e))
    }

    async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        match self.owner(name)? {
            Owner::Here(r) => r.snapshot(snapshot),
            Owner::Remote(c) => c.snapshot(snapshot).await,
        }
        .map_err(|e| qualify(e, name, snapshot))
    }

    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        match self.owner(name)? {
            Owner::Here(r) => Ok(r.snapshots()),
            Owner::Remote(c) => c.list_snapshots().await,
        }
    }

    async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        match self.owner(name)? {
            Owner::Here(r) => {
                let (n, s) = (name.to_string(), snapshot.to_string());
                Self::blocking(move || r.delete_snapshot(&s).map_err(|e| qualify(e, &n, &s))).await
            }
            Owner::Remote(c) => c
                .delete_snapshot(snapshot)
                .await
                .map_err(|e| qualify(e, name, snapshot)),
        }
    }

    async fn revert(&self, name: &str, snapshot: &str) -> Result<()> {
        self.replica(name)?
            .revert(snapshot)
            .map_err(|e| qualify(e, name, snapshot))
    }

    async fn clone_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<VolumeInfo> {
        let dest = self.dir(new_name)?;
        if dest.exists() {
            return Err(Error::already_exists("volume", new_name));
        }
        let r = match self.owner(name)? {
            Owner::Here(r) => r,
            Owner::Remote(c) => {
                // The owner writes the clone and lets go of it.
                let info = c
                    .clone_snapshot(snapshot, &dest)
                    .await
                    .map_err(|e| qualify(e, name, snapshot))?;
                return Ok(VolumeInfo {
                    name: new_name.to_string(),
                    ..info
                });
            }
        };
        let (n, s) = (name.to_string(), snapshot.to_string());
        let clone =
            Self::blocking(move || r.clone_snapshot(&s, &dest).map_err(|e| qualify(e, &n, &s)))
                .await?;
        self.cache().insert(new_name.to_string(), clone.clone());
        clone.info(new_name)
    }

    async fn expand(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        match self.owner(name)? {
            Owner::Here(r) => {
                r.expand(new_size)?;
                r.info(name)
            }
            Owner::Remote(c) => c.expand(new_size).await,
        }
    }

    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>> {
        match self.owner(name)? {
            Owner::Here(r) => r.changed_blocks(from, to),
            Owner::Remote(c) => c.changed_blocks(from, to).await,
        }
        .map_err(|e| match e {
            Error::NotFound {
                kind: "snapshot",
                name: s,
            } => Error::not_found("snapshot", format!("{name}@{s}")),
            other => other,
        })
    }
}

fn qualify(e: Error, volume: &str, snapshot: &str) -> Error {
    match e {
        Error::NotFound {
            kind: "snapshot", ..
        } => Error::not_found("snapshot", format!("{volume}@{snapshot}")),
        Error::AlreadyExists {
            kind: "snapshot", ..
        } => Error::already_exists("snapshot", format!("{volume}@{snapshot}")),
        other => other,
    }
}
