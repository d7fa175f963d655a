//! In-process volumes: [`VolumeStore`] over hci-storage's local replica
//! store or over replica servers (replicated volumes), [`VolumeHandle`]
//! handles for block I/O, NBD exports, and [`ReplicaServer`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use hci_core::block::{BlockDevice, ExtentKind, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, EncryptionKey, OpenVolume, VolumeBackend};
use hci_storage::engine::{EngineOptions, ReplicatedVolume, ReplicatedVolumeBackend};
use hci_storage::local::LocalVolumeBackend;
use hci_storage::nbd::{ExportOptions, Listen, NbdServer, ServerHandle};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::error::{CoreResultExt, HciError};
use crate::runtime::run;

/// What the store knows about one volume.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes allocated across the head and every snapshot.
    pub allocated: u64,
    /// Number of snapshots in the chain.
    pub snapshots: usize,
    /// Whether data is encrypted at rest.
    pub encrypted: bool,
    /// Revision bumped by every metadata change.
    pub revision: u64,
}

#[pymethods]
impl VolumeInfo {
    fn __repr__(&self) -> String {
        format!(
            "VolumeInfo(name={:?}, size={}, allocated={}, snapshots={}, encrypted={}, revision={})",
            self.name,
            self.size,
            self.allocated,
            self.snapshots,
            if self.encrypted { "True" } else { "False" },
            self.revision
        )
    }
}

impl From<hci_core::volume::VolumeInfo> for VolumeInfo {
    fn from(i: hci_core::volume::VolumeInfo) -> Self {
        VolumeInfo {
            name: i.name,
            size: i.size,
            allocated: i.allocated,
            snapshots: i.snapshots,
            encrypted: i.encrypted,
            revision: i.revision,
        }
    }
}

/// One snapshot of a volume.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name, unique within its volume.
    pub name: String,
    /// When it was taken (UTC).
    pub created: DateTime<Utc>,
    /// Volume size when it was taken.
    pub size: u64,
    /// Bytes allocated in this snapshot's own layer.
    pub allocated: u64,
}

#[pymethods]
impl SnapshotInfo {
    fn __repr__(&self) -> String {
        format!(
            "SnapshotInfo(name={:?}, created={:?}, size={}, allocated={})",
            self.name,
            self.created.to_rfc3339(),
            self.size,
            self.allocated
        )
    }
}

impl From<hci_core::volume::SnapshotInfo> for SnapshotInfo {
    fn from(i: hci_core::volume::SnapshotInfo) -> Self {
        SnapshotInfo {
            name: i.name,
            created: i.created,
            size: i.size,
            allocated: i.allocated,
        }
    }
}

/// A contiguous byte range with one allocation state.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
    /// `"data"`, `"zero"` (allocated, reads as zeroes) or `"hole"` (not allocated).
    pub kind: &'static str,
}

#[pymethods]
impl Extent {
    /// True if the range reads as zeroes.
    #[getter]
    fn reads_zero(&self) -> bool {
        self.kind != "data"
    }

    fn __repr__(&self) -> String {
        format!(
            "Extent(offset={}, length={}, kind={:?})",
            self.offset, self.length, self.kind
        )
    }
}

impl From<hci_core::block::Extent> for Extent {
    fn from(e: hci_core::block::Extent) -> Self {
        Extent {
            offset: e.offset,
            length: e.len,
            kind: match e.kind {
                ExtentKind::Data => "data",
                ExtentKind::Zero => "zero",
                ExtentKind::Hole => "hole",
            },
        }
    }
}

fn key(bytes: Option<PyBackedBytes>) -> Option<EncryptionKey> {
    bytes.map(|b| EncryptionKey::new(b.to_vec()))
}

/// A directory of local, thin-provisioned volumes with O(1) snapshots
/// (hci-storage's local replica store): one subdirectory per volume. Or,
/// from `VolumeStore.replicated()`, volumes replicated synchronously over
/// replica servers (and local directories).
///
/// A volume is locked by the process that opened it; call
/// `VolumeStore.release()` (or close its handles) before another process
/// (a VMM, the daemon) opens it.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct VolumeStore {
    pub(crate) backend: Arc<dyn VolumeBackend>,
    local: Option<Arc<LocalVolumeBackend>>,
    replicated: Option<Arc<ReplicatedVolumeBackend>>,
    label: String,
}

#[pymethods]
impl VolumeStore {
    /// Opens (creating if needed) the store in directory `root`.
    #[new]
    fn new(root: PathBuf) -> PyResult<Self> {
        let local = Arc::new(LocalVolumeBackend::new(&root).py_err()?);
        Ok(VolumeStore {
            backend: local.clone(),
            local: Some(local),
            replicated: None,
            label: format!("{:?}", root.display().to_string()),
        })
    }

    /// A store whose every volume has one replica on each of `replicas`:
    /// replica servers (`"HOST:PORT"`, see `ReplicaServer`, all sharing
    /// `token`) or local directories (an in-process replica). Writes reach
    /// every healthy replica before they return; a replica that fails or
    /// does not answer within `timeout` seconds is dropped while one is left.
    #[staticmethod]
    #[pyo3(signature = (replicas, token, *, timeout = 3.0))]
    fn replicated(replicas: Vec<String>, token: PyBackedBytes, timeout: f64) -> PyResult<Self> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(crate::error::InvalidSpec::new_err(format!(
                "timeout: {timeout} is not a positive number of seconds"
            )));
        }
        let timeout = std::time::Duration::from_secs_f64(timeout);
        let mut nodes: Vec<Arc<dyn ReplicaNode>> = Vec::new();
        for r in &replicas {
            let path = std::path::Path::new(r);
            if path.is_dir() {
                nodes.push(Arc::new(
                    hci_storage::replica::LocalNode::new(path).py_err()?,
                ));
            } else {
                let mut sa = ServerAddr::new(r, token.to_vec());
                sa.timeout = timeout;
                nodes.push(Arc::new(RemoteNode::new(sa)));
            }
        }
        let options = EngineOptions {
            timeout,
            ..EngineOptions::default()
        };
        let backend = Arc::new(ReplicatedVolumeBackend::new(nodes, options).py_err()?);
        Ok(VolumeStore {
            backend: backend.clone(),
            local: None,
            replicated: Some(backend),
            label: format!("replicated={replicas:?}"),
        })
    }

    /// The store's directory (local stores only).
    #[getter]
    fn root(&self) -> PyResult<PathBuf> {
        match &self.local {
            Some(l) => Ok(l.root().to_path_buf()),
            None => Err(crate::error::Unsupported::new_err(
                "a replicated store has no directory: its replicas live on their servers",
            )),
        }
    }

    /// Whether volumes here are replicated.
    #[getter]
    fn is_replicated(&self) -> bool {
        self.replicated.is_some()
    }

    /// Creates an empty (all-zero) volume of `size` bytes (a multiple of 4096),
    /// encrypted at rest with AES-XTS-256 if a 64-byte `encryption_key` is given.
    #[pyo3(signature = (name, size, *, encryption_key = None))]
    fn create(
        &self,
        py: Python<'_>,
        name: &str,
        size: u64,
        encryption_key: Option<PyBackedBytes>,
    ) -> PyResult<VolumeInfo> {
        let params = CreateVolume {
            size,
            encryption_key: key(encryption_key),
        };
        Ok(run(py, self.backend.create(name, params))?.py_err()?.into())
    }

    /// Opens volume `name` for block I/O.
    #[pyo3(signature = (name, *, read_only = false, encryption_key = None))]
    fn open(
        &self,
        py: Python<'_>,
        name: &str,
        read_only: bool,
        encryption_key: Option<PyBackedBytes>,
    ) -> PyResult<VolumeHandle> {
        let options = OpenVolume {
            read_only,
            encryption_key: key(encryption_key),
        };
        if let (Some(r), false) = (&self.replicated, read_only) {
            // Keep the engine to close it cleanly with the handle.
            let r = r.clone();
            let engine = run(py, async move { r.open_engine(name, options).await })?.py_err()?;
            let device: Arc<dyn BlockDevice> = engine.clone();
            let mut h = VolumeHandle::new(self.backend.clone(), name, None, device);
            h.engine = Some(engine);
            return Ok(h);
        }
        let device = run(py, self.backend.open(name, options))?.py_err()?;
        let mut h = VolumeHandle::new(self.backend.clone(), name, None, device);
        h.local = self.local.clone();
        Ok(h)
    }

    /// Opens snapshot `snapshot` of volume `name` read-only.
    #[pyo3(signature = (name, snapshot, *, encryption_key = None))]
    fn open_snapshot(
        &self,
        py: Python<'_>,
        name: &str,
        snapshot: &str,
        encryption_key: Option<PyBackedBytes>,
    ) -> PyResult<VolumeHandle> {
        let options = OpenVolume {
            read_only: true,
            encryption_key: key(encryption_key),
        };
        let device = run(py, self.backend.open_snapshot(name, snapshot, options))?.py_err()?;
        let mut h = VolumeHandle::new(
            self.backend.clone(),
            name,
            Some(snapshot.to_string()),
            device,
        );
        h.local = self.local.clone();
        Ok(h)
    }

    /// Describes volume `name`.
    fn info(&self, py: Python<'_>, name: &str) -> PyResult<VolumeInfo> {
        Ok(run(py, self.backend.info(name))?.py_err()?.into())
    }

    /// Lists every volume, sorted by name.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<VolumeInfo>> {
        let v = run(py, self.backend.list())?.py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Deletes volume `name` and all its snapshots.
    fn delete(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        run(py, self.backend.delete(name))?.py_err()
    }

    /// Freezes the current content of `name` as snapshot `snapshot` (O(1)).
    fn snapshot(&self, py: Python<'_>, name: &str, snapshot: &str) -> PyResult<SnapshotInfo> {
        Ok(run(py, self.backend.snapshot(name, snapshot))?
            .py_err()?
            .into())
    }

    /// Lists the snapshots of `name`, oldest first.
    fn snapshots(&self, py: Python<'_>, name: &str) -> PyResult<Vec<SnapshotInfo>> {
        let v = run(py, self.backend.list_snapshots(name))?.py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Deletes a snapshot; the volume's content is unchanged.
    fn delete_snapshot(&self, py: Python<'_>, name: &str, snapshot: &str) -> PyResult<()> {
        run(py, self.backend.delete_snapshot(name, snapshot))?.py_err()
    }

    /// Discards the head: volume `name` reads as `snapshot` again.
    fn revert(&self, py: Python<'_>, name: &str, snapshot: &str) -> PyResult<()> {
        run(py, self.backend.revert(name, snapshot))?.py_err()
    }

    /// Creates volume `new_name` with the content of `name@snapshot`.
    #[pyo3(name = "clone")]
    fn clone_snapshot(
        &self,
        py: Python<'_>,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> PyResult<VolumeInfo> {
        Ok(
            run(py, self.backend.clone_snapshot(name, snapshot, new_name))?
                .py_err()?
                .into(),
        )
    }

    /// Grows volume `name` to `new_size` bytes; new space reads as zeroes.
    fn expand(&self, py: Python<'_>, name: &str, new_size: u64) -> PyResult<VolumeInfo> {
        Ok(run(py, self.backend.expand(name, new_size))?
            .py_err()?
            .into())
    }

    /// `(offset, length)` ranges that may differ between snapshot
    /// `from_snapshot` (None: the empty volume) and snapshot `to_snapshot`.
    fn changed_blocks(
        &self,
        py: Python<'_>,
        name: &str,
        from_snapshot: Option<&str>,
        to_snapshot: &str,
    ) -> PyResult<Vec<(u64, u64)>> {
        let v = run(
            py,
            self.backend
                .changed_blocks(name, from_snapshot, to_snapshot),
        )?
        .py_err()?;
        Ok(v.into_iter().map(|r| (r.offset, r.len)).collect())
    }

    /// Closes this process's hold on volume `name` so another process can
    /// open it. Raises `Busy` while handles of it are still open here.
    fn release(&self, name: &str) -> PyResult<()> {
        match &self.local {
            Some(l) => l.release(name).py_err(),
            // Replicated volumes are held by their handles' engines only.
            None => Ok(()),
        }
    }

    fn __repr__(&self) -> String {
        format!("VolumeStore({})", self.label)
    }
}

/// An open volume (or read-only snapshot): byte-addressed block I/O.
///
/// Every call releases the GIL while it runs. Use it as a context manager,
/// or call `VolumeHandle.close()`, to drop the handle.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct VolumeHandle {
    backend: Arc<dyn VolumeBackend>,
    name: String,
    snapshot: Option<String>,
    device: Mutex<Option<Arc<dyn BlockDevice>>>,
    /// The engine of a replicated volume, closed with the handle.
    engine: Option<Arc<ReplicatedVolume>>,
    /// The local store, released when the handle closes.
    local: Option<Arc<LocalVolumeBackend>>,
}

impl VolumeHandle {
    fn new(
        backend: Arc<dyn VolumeBackend>,
        name: &str,
        snapshot: Option<String>,
        device: Arc<dyn BlockDevice>,
    ) -> Self {
        VolumeHandle {
            backend,
            name: name.to_string(),
            snapshot,
            device: Mutex::new(Some(device)),
            engine: None,
            local: None,
        }
    }

    /// The device, or an error once closed.
    pub(crate) fn device(&self) -> PyResult<Arc<dyn BlockDevice>> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| HciError::new_err(format!("volume {:?} is closed", self.name)))
    }

    /// The head's volume name, refusing snapshot views for metadata calls.
    fn head(&self) -> PyResult<&str> {
        match &self.snapshot {
            None => Ok(&self.name),
            Some(s) => Err(crate::error::ReadOnly::new_err(format!(
                "snapshot {s:?} of volume {:?} is read-only: use the volume's own handle",
                self.name
            ))),
        }
    }
}

#[pymethods]
impl VolumeHandle {
    /// The volume's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot this handle reads, or None for the writable head.
    #[getter]
    fn snapshot_name(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }

    /// Size in bytes.
    #[getter]
    fn size(&self) -> PyResult<u64> {
        Ok(self.device()?.size())
    }

    /// True if writes are refused.
    #[getter]
    fn read_only(&self) -> PyResult<bool> {
        Ok(self.device()?.is_read_only())
    }

    /// True once the handle is closed.
    #[getter]
    fn closed(&self) -> bool {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Reads `length` bytes at `offset`; unwritten ranges read as zeroes.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let dev = self.device()?;
        let buf = run(py, async move {
            let mut buf = vec![0u8; length];
            dev.read_at(&mut buf, offset).await.map(|()| buf)
        })?
        .py_err()?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Writes `data` (bytes or bytearray) at `offset`; with
    /// `fua=True` the write is durable when it returns.
    #[pyo3(signature = (offset, data, *, fua = false))]
    fn write(&self, py: Python<'_>, offset: u64, data: PyBackedBytes, fua: bool) -> PyResult<()> {
        let dev = self.device()?;
        let flags = WriteFlags { fua };
        // Borrow the payload: the Python object is released with the GIL held.
        let buf: &[u8] = &data;
        run(py, async move { dev.write_at(buf, offset, flags).await })?.py_err()
    }

    /// Makes every completed write durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let dev = self.device()?;
        run(py, async move { dev.flush().await })?.py_err()
    }

    /// Tells the volume `[offset, offset+length)` is unused (it reads as zeroes after).
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        let dev = self.device()?;
        run(py, async move { dev.discard(offset, length).await })?.py_err()
    }

    /// Makes the range read as zeroes, releasing space unless `no_hole=True`.
    #[pyo3(signature = (offset, length, *, no_hole = false, fua = false))]
    fn write_zeroes(
        &self,
        py: Python<'_>,
        offset: u64,
        length: u64,
        no_hole: bool,
        fua: bool,
    ) -> PyResult<()> {
        let dev = self.device()?;
        let flags = ZeroFlags { fua, no_hole };
        run(
            py,
            async move { dev.write_zeroes(offset, length, flags).await },
        )?
        .py_err()
    }

    /// Describes how `[offset, offset+length)` is backed (default: the whole
    /// volume) as sorted, contiguous extents.
    #[pyo3(signature = (offset = 0, length = None))]
    fn block_status(
        &self,
        py: Python<'_>,
        offset: u64,
        length: Option<u64>,
    ) -> PyResult<Vec<Extent>> {
        let dev = self.device()?;
        let v = run(py, async move {
            let size = dev.size();
            let end = match length {
                Some(l) => offset.saturating_add(l),
                None => size,
            };
            let mut out: Vec<hci_core::block::Extent> = Vec::new();
            let mut pos = offset;
            loop {
                let reply = dev.block_status(pos, end.saturating_sub(pos)).await?;
                let Some(last) = reply.last() else { break };
                pos = last.end();
                out.extend(reply);
                if pos >= end {
                    break;
                }
            }
            Ok::<_, hci_core::Error>(hci_core::block::coalesce_extents(out))
        })?
        .py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Takes snapshot `snapshot` of this volume.
    fn snapshot(&self, py: Python<'_>, snapshot: &str) -> PyResult<SnapshotInfo> {
        let name = self.head()?;
        Ok(run(py, self.backend.snapshot(name, snapshot))?
            .py_err()?
            .into())
    }

    /// Lists this volume's snapshots, oldest first.
    fn snapshots(&self, py: Python<'_>) -> PyResult<Vec<SnapshotInfo>> {
        let v = run(py, self.backend.list_snapshots(&self.name))?.py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Reverts this volume to `snapshot` (the handle stays usable).
    fn revert(&self, py: Python<'_>, snapshot: &str) -> PyResult<()> {
        let name = self.head()?;
        run(py, self.backend.revert(name, snapshot))?.py_err()
    }

    /// Creates volume `new_name` with the content of snapshot `snapshot`.
    #[pyo3(name = "clone")]
    fn clone_snapshot(
        &self,
        py: Python<'_>,
        snapshot: &str,
        new_name: &str,
    ) -> PyResult<VolumeInfo> {
        Ok(run(
            py,
            self.backend.clone_snapshot(&self.name, snapshot, new_name),
        )?
        .py_err()?
        .into())
    }

    /// Grows this volume to `new_size` bytes.
    fn expand(&self, py: Python<'_>, new_size: u64) -> PyResult<VolumeInfo> {
        let name = self.head()?;
        Ok(run(py, self.backend.expand(name, new_size))?
            .py_err()?
            .into())
    }

    /// Describes this volume.
    fn info(&self, py: Python<'_>) -> PyResult<VolumeInfo> {
        Ok(run(py, self.backend.info(&self.name))?.py_err()?.into())
    }

    /// Serves this volume over NBD at `listen` (`HOST:PORT`, port 0 picks
    /// one, or `unix:/path.sock`) under `export_name` (default: the volume
    /// name). Stop it with `NbdExport.stop()` or a `with` block.
    #[pyo3(signature = (listen = "127.0.0.1:0", *, export_name = None, read_only = false, description = ""))]
    fn export_nbd(
        &self,
        py: Python<'_>,
        listen: &str,
        export_name: Option<&str>,
        read_only: bool,
        description: &str,
    ) -> PyResult<NbdExport> {
        let dev = self.device()?;
        let listen: Listen = listen.parse().py_err()?;
        let export = export_name.unwrap_or(&self.name).to_string();
        let server = Arc::new(NbdServer::new());
        server
            .add_export(
                &export,
                dev,
                ExportOptions {
                    read_only,
                    description: description.to_string(),
                },
            )
            .py_err()?;
        let srv = server.clone();
        let handle = run(py, async move { srv.serve(listen).await })?.py_err()?;
        Ok(NbdExport {
            uri: handle.uri(&export),
            export,
            handle: Mutex::new(Some(handle)),
            _server: server,
        })
    }

    /// Writes `count` blocks of `block_size` bytes from Rust, cycling over
    /// the first `span` bytes: the Rust side of the binding-overhead benchmark.
    /// Returns the elapsed seconds.
    #[pyo3(name = "_bench_rust_writes", signature = (count, block_size = 4096, span = 64 << 20))]
    fn bench_rust_writes(
        &self,
        py: Python<'_>,
        count: u64,
        block_size: u64,
        span: u64,
    ) -> PyResult<f64> {
        let dev = self.device()?;
        let blocks = (span / block_size.max(1)).max(1);
        run(py, async move {
            let buf = vec![0x5au8; block_size as usize];
            let start = std::time::Instant::now();
            for i in 0..count {
                dev.write_at(&buf, (i % blocks) * block_size, WriteFlags::default())
                    .await?;
            }
            Ok::<_, hci_core::Error>(start.elapsed().as_secs_f64())
        })?
        .py_err()
    }

    /// Drops the handle; later calls on it raise `HciError`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let dev = self.device.lock().unwrap_or_else(|e| e.into_inner()).take();
        if dev.is_none() {
            return Ok(());
        }
        drop(dev);
        if let Some(engine) = &self.engine {
            // A clean close spares the next engine the crash reconcile.
            let engine = engine.clone();
            return run(py, async move { engine.close().await })?.py_err();
        }
        // Let another process open the volume if no other handle here holds it.
        if let Some(local) = &self.local {
            let _ = local.release(&self.name);
        }
        Ok(())
    }

    /// For a replicated volume: its robustness (`"healthy"`, `"degraded"` or
    /// `"faulted"`) and each replica's `(label, state)`; `None` otherwise.
    fn replica_status(&self, py: Python<'_>) -> PyResult<Option<ReplicaReport>> {
        let Some(engine) = self.engine.clone() else {
            return Ok(None);
        };
        let st = run(py, async move { engine.status().await })?;
        let robustness = match st.robustness {
            hci_storage::engine::Robustness::Healthy => "healthy",
            hci_storage::engine::Robustness::Degraded => "degraded",
            hci_storage::engine::Robustness::Faulted => "faulted",
        };
        let replicas = st
            .replicas
            .into_iter()
            .map(|r| {
                let state = match r.state {
                    hci_storage::engine::ReplicaState::Healthy => "healthy".to_string(),
                    hci_storage::engine::ReplicaState::Rebuilding => "rebuilding".to_string(),
                    hci_storage::engine::ReplicaState::Stale => "stale".to_string(),
                    hci_storage::engine::ReplicaState::Failed(why) => format!("failed: {why}"),
                };
                (r.node, state)
            })
            .collect();
        Ok(Some((robustness.to_string(), replicas)))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
        py: Python<'_>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("VolumeHandle({:?}, snapshot={s:?})", self.name),
            None => format!("VolumeHandle({:?})", self.name),
        }
    }
}

/// A running NBD export of a volume.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct NbdExport {
    uri: String,
    export: String,
    handle: Mutex<Option<ServerHandle>>,
    _server: Arc<NbdServer>,
}

#[pymethods]
impl NbdExport {
    /// The NBD URI clients connect to (`nbd://127.0.0.1:PORT/NAME` or
    /// `nbd+unix:///NAME?socket=PATH`).
    #[getter]
    fn uri(&self) -> &str {
        &self.uri
    }

    /// The export name.
    #[getter]
    fn export_name(&self) -> &str {
        &self.export
    }

    /// The bound `(host, port)` for TCP listeners, else None.
    #[getter]
    fn address(&self) -> Option<(String, u16)> {
        let h = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        h.as_ref()
            .and_then(|h| h.tcp_addr)
            .map(|a| (a.ip().to_string(), a.port()))
    }

    /// Stops accepting connections (open ones finish on their own).
    fn stop(&self) {
        let h = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            h.shutdown();
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> bool {
        self.stop();
        false
    }

    fn __repr__(&self) -> String {
        format!("NbdExport({:?})", self.uri)
    }
}

/// A replicated volume's robustness and each replica's `(label, state)`.
type ReplicaReport = (String, Vec<(String, String)>);

/// A replica server: serves the replicas in directory `root` to engines
/// over TCP (hci-storage's replica protocol), to clients that present
/// `token`. Runs in this process until `close()` or exit.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct ReplicaServer {
    address: String,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[pymethods]
impl ReplicaServer {
    /// Starts serving `root` on `listen` (`"HOST:PORT"`; port 0 picks one).
    #[new]
    #[pyo3(signature = (root, token, *, listen = "127.0.0.1:0"))]
    fn new(py: Python<'_>, root: PathBuf, token: PyBackedBytes, listen: &str) -> PyResult<Self> {
        std::fs::create_dir_all(&root)
            .map_err(|e| HciError::new_err(format!("create {}: {e}", root.display())))?;
        let server =
            hci_storage::replica::server::ReplicaServer::new(root, token.to_vec()).py_err()?;
        let listen = listen.to_string();
        let (addr, task) = run(py, async move { server.spawn(&listen).await })?.py_err()?;
        Ok(ReplicaServer {
            address: addr.to_string(),
            task: Mutex::new(Some(task)),
        })
    }

    /// Where it listens (`"HOST:PORT"`).
    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// Stops accepting connections. Engines already connected keep being
    /// served until they disconnect (or this process exits).
    fn close(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!("ReplicaServer({:?})", self.address)
    }
}
