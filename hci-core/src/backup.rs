//! The backup contracts: where backup data goes ([`BackupTarget`]) and the
//! engine that moves volume data there and back ([`BackupEngine`]).
//!
//! A target is a flat, create-only object namespace (S3 bucket prefix, a
//! directory on a filesystem or NFS mount). Objects are written once under a
//! content-derived or unique key and never overwritten, so concurrent clients
//! cannot clobber each other; deletion is explicit (garbage collection).

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::block::BlockDevice;
use crate::error::Result;
use crate::volume::VolumeBackend;

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Object key (`/`-separated, relative to the target root).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A place backups are stored.
#[async_trait]
pub trait BackupTarget: Send + Sync + Debug {
    /// Writes a new object. An existing key is [`crate::Error::AlreadyExists`]
    /// and the stored object is left untouched.
    async fn put_new(&self, key: &str, data: Bytes) -> Result<()>;

    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Reads a byte range of an object.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;

    /// Size and key of an object.
    async fn head(&self, key: &str) -> Result<ObjectMeta>;

    /// Lists objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Deletes an object. Deleting an absent key is `NotFound`.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// Progress of a long backup job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupProgress {
    /// Bytes to process in total.
    pub total_bytes: u64,
    /// Bytes processed so far.
    pub done_bytes: u64,
    /// Bytes uploaded (after dedup and compression).
    pub uploaded_bytes: u64,
}

/// A request to back up one volume snapshot.
#[derive(Debug, Clone)]
pub struct VolumeBackupRequest {
    /// Volume name in the backend.
    pub volume: String,
    /// Snapshot to back up (must exist).
    pub snapshot: String,
    /// A previous backup of the same volume whose snapshot still exists; only
    /// blocks changed since it are read.
    pub base: Option<String>,
    /// Opaque metadata stored with the backup (e.g. the VM and volume specs as JSON).
    pub metadata: Vec<(String, String)>,
}

/// A finished backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Unique backup id.
    pub id: String,
    /// Source volume.
    pub volume: String,
    /// Source snapshot.
    pub snapshot: String,
    /// Volume size.
    pub size: u64,
    /// When taken.
    pub created: DateTime<Utc>,
    /// Base backup id for incrementals.
    pub base: Option<String>,
    /// Bytes newly stored on the target by this backup.
    pub added_bytes: u64,
    /// Stored metadata.
    pub metadata: Vec<(String, String)>,
}

/// Result of verifying a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Pieces checked.
    pub chunks_checked: u64,
    /// Pieces missing or failing their checksum.
    pub bad_chunks: Vec<String>,
}

/// Moves volume data to and from a [`BackupTarget`].
#[async_trait]
pub trait BackupEngine: Send + Sync + Debug {
    /// Backs up a volume snapshot, incrementally when `request.base` is set.
    async fn backup(
        &self,
        volumes: Arc<dyn VolumeBackend>,
        request: VolumeBackupRequest,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<BackupInfo>;

    /// Writes a backup's content to `device` (at least as large as the backup),
    /// verifying every piece.
    async fn restore(
        &self,
        backup_id: &str,
        device: Arc<dyn BlockDevice>,
        progress: Option<watch::Sender<BackupProgress>>,
    ) -> Result<()>;

    /// Lists backups, oldest first.
    async fn list(&self) -> Result<Vec<BackupInfo>>;

    /// Checks that every piece of a backup is present and intact.
    async fn verify(&self, backup_id: &str) -> Result<VerifyReport>;

    /// Deletes a backup; data no other backup uses is reclaimed.
    async fn delete(&self, backup_id: &str) -> Result<()>;
}
