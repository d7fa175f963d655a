//! In-process backups: [`BackupRepository`] over hci-backup's
//! [`Repository`] on a `file://` or `s3://` target.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hci_backup::{GcOptions, Repository, RetentionPolicy, open_target};
use hci_core::backup::{BackupEngine, BackupTarget, VolumeBackupRequest};
use hci_core::volume::VolumeBackend;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::error::{CoreResultExt, InvalidSpec};
use crate::runtime::wait;
use crate::volume::{VolumeHandle, VolumeStore};

/// A finished backup.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Unique backup id.
    pub id: String,
    /// Source volume.
    pub volume: String,
    /// Source snapshot.
    pub snapshot: String,
    /// Volume size in bytes.
    pub size: u64,
    /// When it was taken (UTC).
    pub created: DateTime<Utc>,
    /// Base backup id for incrementals, else None.
    pub base: Option<String>,
    /// Bytes newly stored on the target by this backup.
    pub added_bytes: u64,
    /// Metadata stored with the backup.
    pub metadata: BTreeMap<String, String>,
}

#[pymethods]
impl BackupInfo {
    fn __repr__(&self) -> String {
        format!(
            "BackupInfo(id={:?}, volume={:?}, snapshot={:?}, size={}, base={:?}, added_bytes={})",
            self.id, self.volume, self.snapshot, self.size, self.base, self.added_bytes
        )
    }
}

impl From<hci_core::backup::BackupInfo> for BackupInfo {
    fn from(b: hci_core::backup::BackupInfo) -> Self {
        BackupInfo {
            id: b.id,
            volume: b.volume,
            snapshot: b.snapshot,
            size: b.size,
            created: b.created,
            base: b.base,
            added_bytes: b.added_bytes,
            metadata: b.metadata.into_iter().collect(),
        }
    }
}

/// The result of verifying a backup.
#[pyclass(frozen, get_all, eq, module = "hci._hci")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Pieces checked.
    pub chunks_checked: u64,
    /// Pieces missing or failing their checksum.
    pub bad_chunks: Vec<String>,
}

#[pymethods]
impl VerifyReport {
    /// True if every piece is present and intact.
    #[getter]
    fn ok(&self) -> bool {
        self.bad_chunks.is_empty()
    }

    fn __bool__(&self) -> bool {
        self.ok()
    }

    fn __repr__(&self) -> String {
        format!(
            "VerifyReport(chunks_checked={}, bad_chunks={:?})",
            self.chunks_checked, self.bad_chunks
        )
    }
}

fn repo_key(key: Option<PyBackedBytes>) -> PyResult<Option<[u8; 32]>> {
    key.map(|k| {
        <[u8; 32]>::try_from(&k[..]).map_err(|_| {
            InvalidSpec::new_err(format!(
                "invalid repository key: must be 32 bytes, got {}",
                k.len()
            ))
        })
    })
    .transpose()
}

fn target(url: &str) -> PyResult<Arc<dyn BackupTarget>> {
    Ok(Arc::new(open_target(url).py_err()?))
}

/// A backup repository (deduplicated, compressed, optionally encrypted
/// packs) on a target: `file:///path` or `s3://bucket/prefix?endpoint=…`.
///
/// Create one with `BackupRepository.init()`, reopen it with
/// `BackupRepository.open()`.
#[pyclass(frozen, module = "hci._hci")]
#[derive(Debug)]
pub struct BackupRepository {
    url: String,
    repo: Arc<Repository>,
}

#[pymethods]
impl BackupRepository {
    /// Creates a repository on the empty target at `url`; with a 32-byte
    /// `key`, every piece is encrypted (AES-256-GCM).
    #[staticmethod]
    #[pyo3(signature = (url, *, key = None))]
    fn init(py: Python<'_>, url: &str, key: Option<PyBackedBytes>) -> PyResult<Self> {
        let key = repo_key(key)?;
        let t = target(url)?;
        let repo = wait(py, Repository::init(t, key.as_ref()))?.py_err()?;
        Ok(BackupRepository {
            url: url.to_string(),
            repo: Arc::new(repo),
        })
    }

    /// Opens the existing repository at `url` (with its key, if encrypted).
    #[staticmethod]
    #[pyo3(signature = (url, *, key = None))]
    fn open(py: Python<'_>, url: &str, key: Option<PyBackedBytes>) -> PyResult<Self> {
        let key = repo_key(key)?;
        let t = target(url)?;
        let repo = wait(py, Repository::open(t, key.as_ref()))?.py_err()?;
        Ok(BackupRepository {
            url: url.to_string(),
            repo: Arc::new(repo),
        })
    }

    /// The target URL.
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// Backs up snapshot `snapshot` of volume `volume` in `store`. With
    /// `base` (an earlier backup of the same volume whose snapshot still
    /// exists) only blocks changed since it are read and stored.
    #[pyo3(signature = (store, volume, snapshot, *, base = None, metadata = None))]
    fn backup(
        &self,
        py: Python<'_>,
        store: &VolumeStore,
        volume: &str,
        snapshot: &str,
        base: Option<String>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> PyResult<BackupInfo> {
        let volumes: Arc<dyn VolumeBackend> = store.backend.clone();
        let request = VolumeBackupRequest {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            base,
            metadata: metadata.unwrap_or_default().into_iter().collect(),
        };
        let repo = self.repo.clone();
        Ok(
            wait(py, async move { repo.backup(volumes, request, None).await })?
                .py_err()?
                .into(),
        )
    }

    /// Writes backup `backup_id` onto `volume` (at least as large as the
    /// backup), verifying every piece.
    fn restore(&self, py: Python<'_>, backup_id: &str, volume: &VolumeHandle) -> PyResult<()> {
        let dev = volume.device()?;
        let repo = self.repo.clone();
        wait(py, async move { repo.restore(backup_id, dev, None).await })?.py_err()
    }

    /// Lists backups, oldest first.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<BackupInfo>> {
        let repo = self.repo.clone();
        let v = wait(py, async move { repo.list().await })?.py_err()?;
        Ok(v.into_iter().map(Into::into).collect())
    }

    /// Checks that every piece of backup `backup_id` is present and intact.
    fn verify(&self, py: Python<'_>, backup_id: &str) -> PyResult<VerifyReport> {
        let repo = self.repo.clone();
        let r = wait(py, async move { repo.verify(backup_id).await })?.py_err()?;
        Ok(VerifyReport {
            chunks_checked: r.chunks_checked,
            bad_chunks: r.bad_chunks,
        })
    }

    /// Deletes backup `backup_id`; data no other backup uses is reclaimed by `BackupRepository.gc()`.
    fn delete(&self, py: Python<'_>, backup_id: &str) -> PyResult<()> {
        let repo = self.repo.clone();
        wait(py, async move { repo.delete(backup_id).await })?.py_err()
    }

    /// Deletes backups the retention policy does not keep; returns their ids.
    #[pyo3(signature = (*, keep_last = 0, keep_daily = 0, keep_weekly = 0, keep_monthly = 0))]
    fn prune(
        &self,
        py: Python<'_>,
        keep_last: usize,
        keep_daily: usize,
        keep_weekly: usize,
        keep_monthly: usize,
    ) -> PyResult<Vec<String>> {
        let policy = RetentionPolicy {
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
        };
        let repo = self.repo.clone();
        wait(py, async move { repo.prune(&policy).await })?.py_err()
    }

    /// Reclaims packs no backup uses any more; returns the bytes deleted.
    fn gc(&self, py: Python<'_>) -> PyResult<u64> {
        let repo = self.repo.clone();
        let r = wait(py, async move { repo.gc(GcOptions::default()).await })?.py_err()?;
        Ok(r.deleted_bytes)
    }

    fn __repr__(&self) -> String {
        format!("BackupRepository({:?})", self.url)
    }
}
