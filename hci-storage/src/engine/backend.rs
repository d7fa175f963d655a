//! [`ReplicatedVolumeBackend`]: volumes replicated over a fixed set of nodes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;

use hci_core::block::{BlockDevice, ByteRange, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo};
use hci_core::{Error, Result};

use super::{EngineOptions, ReplicatedVolume};
use crate::replica::ReplicaNode;

/// A [`VolumeBackend`] whose every volume has one replica on each node.
///
/// Opening a volume starts a [`ReplicatedVolume`] engine (fencing any older
/// engine elsewhere); further opens in the same process share that engine.
#[derive(Debug)]
pub struct ReplicatedVolumeBackend {
    nodes: Vec<Arc<dyn ReplicaNode>>,
    options: EngineOptions,
    engines: Mutex<HashMap<String, Weak<ReplicatedVolume>>>,
}

impl ReplicatedVolumeBackend {
    /// A backend over `nodes` (one replica per node).
    pub fn new(nodes: Vec<Arc<dyn ReplicaNode>>, options: EngineOptions) -> Result<Self> {
        if nodes.is_empty() {
            return Err(Error::invalid("replica set", "is empty"));
        }
        Ok(ReplicatedVolumeBackend {
            nodes,
            options,
            engines: Mutex::new(HashMap::new()),
        })
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Arc<dyn ReplicaNode>] {
        &self.nodes
    }

    /// The live engine of `name` in this process, if any.
    pub fn engine(&self, name: &str) -> Option<Arc<ReplicatedVolume>> {
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .and_then(Weak::upgrade)
    }

    /// Opens (or shares) the writable engine of `name`.
    pub async fn open_engine(
        &self,
        name: &str,
        options: OpenVolume,
    ) -> Result<Arc<ReplicatedVolume>> {
        if let Some(e) = self.engine(name)
            && e.key() == options.encryption_key.as_ref()
        {
            return Ok(e);
        }
        let opts = OpenVolume {
            read_only: false,
            ..options
        };
        let e = ReplicatedVolume::open(name, &self.nodes, opts, self.options.clone()).await?;
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Arc::downgrade(&e));
        Ok(e)
    }

    /// A node holding a current copy of `name` (local first).
    async fn source(&self, name: &str) -> Result<Arc<dyn ReplicaNode>> {
        if let Some(e) = self.engine(name)
            && let Some(n) = e.healthy_nodes().into_iter().next()
        {
            return Ok(n);
        }
        let t = self.options.timeout;
        let states = futures::future::join_all(
            self.nodes
                .iter()
                .map(|n| async move { tokio::time::timeout(t, n.fence_state(name)).await }),
        )
        .await;
        let mut best: Option<(u64, bool, &Arc<dyn ReplicaNode>)> = None;
        for (n, s) in self.nodes.iter().zip(states) {
            if let Ok(Ok(s)) = s {
                let cand = (s.epoch, n.is_local(), n);
                if best.is_none_or(|b| (cand.0, cand.1) > (b.0, b.1)) {
                    best = Some(cand);
                }
            }
        }
        best.map(|b| b.2.clone()).ok_or_else(|| Error::Unavailable {
            what: format!("volume {name}"),
            source: Some("no replica server answered".into()),
        })
    }

    /// Runs `f` on every node; all must succeed.
    async fn on_all<'a, T, F, Fut>(&'a self, f: F) -> Result<Vec<T>>
    where
        F: Fn(&'a dyn VolumeBackend) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let t = self.options.timeout;
        let rs = futures::future::join_all(self.nodes.iter().map(|n| {
            let fut = f(n.backend());
            async move {
                tokio::time::timeout(t, fut)
                    .await
                    .map_err(|_| Error::Unavailable {
                        what: n.label(),
                        source: Some("timed out".into()),
                    })?
            }
        }))
        .await;
        rs.into_iter().collect()
    }
}

#[async_trait]
impl VolumeBackend for ReplicatedVolumeBackend {
    async fn create(&self, name: &str, params: CreateVolume) -> Result<VolumeInfo> {
        let rs = futures::future::join_all(
            self.nodes
                .iter()
                .map(|n| n.backend().create(name, params.clone())),
        )
        .await;
        if rs.iter().any(|r| r.is_err()) {
            // Undo the replicas this call created, so a failed create leaves nothing.
            for (n, r) in self.nodes.iter().zip(&rs) {
                if r.is_ok() {
                    let _ = n.backend().delete(name).await;
                }
            }
        }
        let mut v = rs.into_iter().collect::<Result<Vec<_>>>()?;
        v.pop()
            .ok_or_else(|| Error::invalid("replica set", "is empty"))
    }

    async fn open(&self, name: &str, options: OpenVolume) -> Result<Arc<dyn BlockDevice>> {
        if options.read_only {
            if let Some(e) = self.engine(name)
                && e.key() == options.encryption_key.as_ref()
            {
                return Ok(Arc::new(ReadOnly(e)));
            }
            let e =
                ReplicatedVolume::open(name, &self.nodes, options, self.options.clone()).await?;
            return Ok(e);
        }
        Ok(self.open_engine(name, options).await?)
    }

    async fn open_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        self.source(name)
            .await?
            .backend()
            .open_snapshot(name, snapshot, options)
            .await
    }

    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.source(name).await?.backend().info(name).await
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut last = None;
        for n in &self.nodes {
            match tokio::time::timeout(self.options.timeout, n.backend().list()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {}
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable {
            what: "replica servers".into(),
            source: Some("none answered".into()),
        }))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let rs =
            futures::future::join_all(self.nodes.iter().map(|n| n.backend().delete(name))).await;
        if rs.iter().all(|r| matches!(r, Err(Error::NotFound { .. }))) {
            return Err(Error::not_found("volume", name));
        }
        for r in rs {
            match r {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        if let Some(e) = self.engine(name) {
            return e.snapshot(snapshot).await;
        }
        let mut v = self.on_all(|b| b.snapshot(name, snapshot)).await?;
        v.pop()
            .ok_or_else(|| Error::invalid("replica set", "is empty"))
    }

    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        self.source(name)
            .await?
            .backend()
            .list_snapshots(name)
            .await
    }

    async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        self.on_all(|b| b.delete_snapshot(name, snapshot))
            .await
            .map(|_| ())
    }

    async fn revert(&self, name: &str, snapshot: &str) -> Result<()> {
        self.on_all(|b| b.revert(name, snapshot)).await.map(|_| ())
    }

    async fn clone_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<VolumeInfo> {
        let mut v = self
            .on_all(|b| b.clone_snapshot(name, snapshot, new_name))
            .await?;
        v.pop()
            .ok_or_else(|| Error::invalid("replica set", "is empty"))
    }

    async fn expand(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let mut v = self.on_all(|b| b.expand(name, new_size)).await?;
        let info = v
            .pop()
            .ok_or_else(|| Error::invalid("replica set", "is empty"))?;
        if let Some(e) = self.engine(name) {
            e.set_size(info.size);
        }
        Ok(info)
    }

    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>> {
        self.source(name)
            .await?
            .backend()
            .changed_blocks(name, from, to)
            .await
    }
}

/// A read-only view of a shared engine.
#[derive(Debug)]
struct ReadOnly(Arc<ReplicatedVolume>);

impl ReadOnly {
    fn refuse(&self) -> Error {
        Error::ReadOnly {
            what: format!("volume {}", self.0.name()),
        }
    }
}

#[async_trait]
impl BlockDevice for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn capabilities(&self) -> DeviceCaps {
        self.0.capabilities()
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset).await
    }

    async fn write_at(&self, _buf: &[u8], _offset: u64, _flags: WriteFlags) -> Result<()> {
        Err(self.refuse())
    }

    async fn flush(&self) -> Result<()> {
        self.0.flush().await
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.refuse())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> Result<()> {
        Err(self.refuse())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.block_status(offset, len).await
    }
}
