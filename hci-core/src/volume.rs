//! The volume contract: named, thin-provisioned block volumes with snapshots.
//!
//! A [`VolumeBackend`] manages many volumes (a directory of local replicas, a set
//! of remote replicas, RAM for tests). A volume has a writable *head* over a chain
//! of read-only *snapshots*; snapshots are cheap (O(1)), can be deleted while the
//! volume is in use (their data merges into a neighbour), reverted to, and cloned
//! into new volumes. [`VolumeBackend::changed_blocks`] lists the 4 KiB blocks that
//! differ between two snapshots, which is what incremental backup reads.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::block::{BlockDevice, ByteRange};
use crate::error::Result;

/// A data-encryption key for a volume (AES-XTS-256 uses 64 bytes).
///
/// The key never appears in `Debug` output or in serialized specs.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey(Vec<u8>);

impl EncryptionKey {
    /// Wraps raw key bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        EncryptionKey(bytes.into())
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({} bytes, redacted)", self.0.len())
    }
}

impl Drop for EncryptionKey {
    fn drop(&mut self) {
        // Best effort wipe; volatile so the compiler does not elide it.
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own buffer.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Parameters for creating a volume.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    /// Size in bytes; a nonzero multiple of 4096.
    pub size: u64,
    /// Encrypt data at rest with this key.
    pub encryption_key: Option<EncryptionKey>,
}

impl CreateVolume {
    /// A plain (unencrypted) volume of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateVolume {
            size,
            encryption_key: None,
        }
    }
}

/// Parameters for opening a volume.
#[derive(Debug, Clone, Default)]
pub struct OpenVolume {
    /// Open read-only.
    pub read_only: bool,
    /// Key for encrypted volumes (a wrong key is an error, never garbage).
    pub encryption_key: Option<EncryptionKey>,
}

/// What a backend knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes actually allocated across the head and every snapshot.
    pub allocated: u64,
    /// Number of snapshots in the chain.
    pub snapshots: usize,
    /// Whether data is encrypted at rest.
    pub encrypted: bool,
    /// Monotonic revision bumped by every metadata change (snapshot, revert,
    /// expand…); replication uses it to choose the newest replica.
    pub revision: u64,
}

/// One snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot name, unique within its volume.
    pub name: String,
    /// When it was taken.
    pub created: DateTime<Utc>,
    /// Volume size when it was taken.
    pub size: u64,
    /// Bytes allocated in this snapshot's own layer.
    pub allocated: u64,
}

/// A backend managing named volumes.
#[async_trait]
pub trait VolumeBackend: Send + Sync + fmt::Debug {
    /// Creates an empty (all-zero) volume.
    async fn create(&self, name: &str, params: CreateVolume) -> Result<VolumeInfo>;

    /// Opens a volume for I/O. Backends may allow several handles to one volume;
    /// metadata operations below act on the volume while handles stay usable.
    async fn open(&self, name: &str, options: OpenVolume) -> Result<Arc<dyn BlockDevice>>;

    /// Opens snapshot `snapshot` of volume `name` read-only (what backup reads).
    async fn open_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>>;

    /// Describes a volume.
    async fn info(&self, name: &str) -> Result<VolumeInfo>;

    /// Lists every volume, sorted by name.
    async fn list(&self) -> Result<Vec<VolumeInfo>>;

    /// Deletes a volume and all its snapshots.
    async fn delete(&self, name: &str) -> Result<()>;

    /// Freezes the current content as snapshot `snapshot`; writes continue in a new head.
    async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo>;

    /// Lists snapshots oldest first.
    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>>;

    /// Deletes a snapshot; the volume's content (and every other snapshot's) is unchanged.
    async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()>;

    /// Discards the head: the volume reads as snapshot `snapshot` again. Snapshots
    /// newer than it are kept.
    async fn revert(&self, name: &str, snapshot: &str) -> Result<()>;

    /// Creates volume `new_name` with the content of `name@snapshot`.
    async fn clone_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<VolumeInfo>;

    /// Grows the volume to `new_size` bytes (shrinking is refused). New space reads as zeroes.
    async fn expand(&self, name: &str, new_size: u64) -> Result<VolumeInfo>;

    /// Byte ranges (4 KiB aligned, sorted, coalesced) whose content may differ between
    /// snapshot `from` and snapshot `to` (`to` newer than `from`). With `from` = `None`,
    /// every range allocated in the chain up to `to`. Ranges may over-report (a block
    /// rewritten with the same data) but never under-report.
    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>>;
}
