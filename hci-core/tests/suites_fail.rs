//! The suites can fail: deliberately broken implementations must not pass them.
//!
//! Each broken implementation wraps a reference one and breaks one promise. It
//! is run through the whole `*_suite` (which must panic) and through the case
//! meant to catch that flaw (which must panic too), so a suite that stops
//! checking something shows up here.

use std::future::Future;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use hci_core::Result;
use hci_core::backup::{BackupTarget, ObjectMeta};
use hci_core::block::{
    BlockDevice, ByteRange, DeviceCaps, Extent, ExtentKind, WriteFlags, ZeroFlags,
};
use hci_core::memory::{MemBackupTarget, MemBlockDevice, MemStateStore, MemVolumeBackend};
use hci_core::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchStream,
};
use hci_core::testing;
use hci_core::volume::{CreateVolume, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo};

/// Runs `fut` and fails the test unless it panics (a broken contract was caught).
async fn must_fail(what: &str, fut: impl Future<Output = ()>) {
    let r = AssertUnwindSafe(fut).catch_unwind().await;
    assert!(
        r.is_err(),
        "{what}: the broken implementation passed the suite"
    );
}

// ---------------------------------------------------------------- block devices

#[derive(Debug, Clone, Copy)]
enum DeviceFlaw {
    /// Drops every second write (and still reports success).
    DropsEverySecondWrite,
    /// Reports every range as a hole, written data included.
    ClaimsEverythingIsAHole,
    /// Accepts requests past the end by clamping them.
    ClampsOutOfRange,
}

#[derive(Debug)]
struct BrokenDevice {
    inner: MemBlockDevice,
    flaw: DeviceFlaw,
    writes: AtomicU64,
}

impl BrokenDevice {
    fn new(flaw: DeviceFlaw) -> Box<Self> {
        Box::new(BrokenDevice {
            inner: MemBlockDevice::new(32 << 20),
            flaw,
            writes: AtomicU64::new(0),
        })
    }

    fn clamp(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.inner.size();
        if offset >= size {
            return None;
        }
        Some((offset, len.min(size - offset)))
    }
}

#[async_trait]
impl BlockDevice for BrokenDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn capabilities(&self) -> DeviceCaps {
        self.inner.capabilities()
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let DeviceFlaw::ClampsOutOfRange = self.flaw {
            let Some((o, l)) = self.clamp(offset, buf.len() as u64) else {
                return Ok(());
            };
            return self.inner.read_at(&mut buf[..l as usize], o).await;
        }
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        match self.flaw {
            DeviceFlaw::DropsEverySecondWrite
                if self.writes.fetch_add(1, Ordering::SeqCst) % 2 == 1 =>
            {
                Ok(())
            }
            DeviceFlaw::ClampsOutOfRange => match self.clamp(offset, buf.len() as u64) {
                Some((o, l)) => self.inner.write_at(&buf[..l as usize], o, flags).await,
                None => Ok(()),
            },
            _ => self.inner.write_at(buf, offset, flags).await,
        }
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self.flaw {
            DeviceFlaw::ClaimsEverythingIsAHole => {
                self.inner.block_status(offset, len).await?;
                Ok(vec![Extent {
                    offset,
                    len,
                    kind: ExtentKind::Hole,
                }])
            }
            _ => self.inner.block_status(offset, len).await,
        }
    }
}

#[tokio::test]
async fn broken_block_devices_fail_the_block_suite() {
    for (flaw, case) in [
        (
            DeviceFlaw::DropsEverySecondWrite,
            "aligned_write_read_round_trip",
        ),
        (
            DeviceFlaw::ClaimsEverythingIsAHole,
            "block_status_is_well_formed",
        ),
        (DeviceFlaw::ClampsOutOfRange, "out_of_range_is_refused"),
    ] {
        let what = format!("{flaw:?}");
        must_fail(
            &what,
            testing::block::block_device_suite(|| async move { BrokenDevice::new(flaw) }),
        )
        .await;
        let dev = BrokenDevice::new(flaw);
        match case {
            "aligned_write_read_round_trip" => {
                must_fail(&what, testing::block::aligned_write_read_round_trip(&*dev)).await
            }
            "block_status_is_well_formed" => {
                must_fail(&what, testing::block::block_status_is_well_formed(&*dev)).await
            }
            _ => must_fail(&what, testing::block::out_of_range_is_refused(&*dev)).await,
        }
    }
}

#[tokio::test]
async fn a_writable_device_fails_the_read_only_suite() {
    must_fail(
        "writable device",
        testing::block::read_only_block_device_suite(|| async {
            Box::new(MemBlockDevice::new(1 << 20))
        }),
    )
    .await;
}

// ---------------------------------------------------------------- state stores

#[derive(Debug, Clone, Copy)]
enum StoreFlaw {
    /// Writes and deletes ignore their preconditions.
    IgnoresPreconditions,
    /// Watches replay from one revision too late (an off-by-one).
    ReplaysOneTooLate,
    /// Leases live a thousand times longer than asked.
    LeasesNeverExpire,
}

#[derive(Debug)]
struct BrokenStore {
    inner: MemStateStore,
    flaw: StoreFlaw,
}

impl BrokenStore {
    fn new(flaw: StoreFlaw) -> Box<Self> {
        Box::new(BrokenStore {
            inner: MemStateStore::new(),
            flaw,
        })
    }
}

#[async_trait]
impl StateStore for BrokenStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<ListResult> {
        self.inner.list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        let options = match self.flaw {
            StoreFlaw::IgnoresPreconditions => PutOptions {
                precondition: Precondition::None,
                ..options
            },
            _ => options,
        };
        self.inner.put(key, value, options).await
    }
    async fn delete(&self, key: &str, p: Precondition) -> Result<u64> {
        match self.flaw {
            StoreFlaw::IgnoresPreconditions => self.inner.delete(key, Precondition::None).await,
            _ => self.inner.delete(key, p).await,
        }
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream> {
        match self.flaw {
            StoreFlaw::ReplaysOneTooLate if from > 0 => self.inner.watch(prefix, from + 1).await,
            _ => self.inner.watch(prefix, from).await,
        }
    }
    async fn current_revision(&self) -> Result<u64> {
        self.inner.current_revision().await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        match self.flaw {
            StoreFlaw::LeasesNeverExpire => self.inner.grant_lease(ttl * 1000).await,
            _ => self.inner.grant_lease(ttl).await,
        }
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_state_stores_fail_the_store_suite() {
    for flaw in [
        StoreFlaw::IgnoresPreconditions,
        StoreFlaw::ReplaysOneTooLate,
        StoreFlaw::LeasesNeverExpire,
    ] {
        let what = format!("{flaw:?}");
        if !matches!(flaw, StoreFlaw::LeasesNeverExpire) {
            // The whole suite waits 10 s for the expiry that never comes; the case below suffices.
            must_fail(
                &what,
                testing::store::state_store_suite(|| async move { BrokenStore::new(flaw) }),
            )
            .await;
        }
        let s = BrokenStore::new(flaw);
        match flaw {
            StoreFlaw::IgnoresPreconditions => {
                must_fail(&what, testing::store::must_not_exist_precondition(&*s)).await;
                must_fail(
                    &what,
                    testing::store::revision_precondition_is_compare_and_swap(&*s),
                )
                .await;
                must_fail(
                    &what,
                    testing::store::concurrent_compare_and_swap_has_one_winner(&*s),
                )
                .await;
            }
            StoreFlaw::ReplaysOneTooLate => {
                must_fail(
                    &what,
                    testing::store::watch_replays_history_then_follows(&*s),
                )
                .await
            }
            StoreFlaw::LeasesNeverExpire => {
                must_fail(&what, testing::store::lease_expiry_deletes_keys(&*s)).await
            }
        }
    }
}

// ---------------------------------------------------------------- volume backends

#[derive(Debug, Clone, Copy)]
enum VolumeFlaw {
    /// Reports no changed blocks.
    NoChangeTracking,
    /// Never bumps the revision.
    FrozenRevision,
    /// Snapshots are live views of the head instead of frozen copies.
    SnapshotsFollowTheHead,
}

#[derive(Debug)]
struct BrokenVolumes {
    inner: MemVolumeBackend,
    flaw: VolumeFlaw,
}

impl BrokenVolumes {
    fn new(flaw: VolumeFlaw) -> Box<Self> {
        Box::new(BrokenVolumes {
            inner: MemVolumeBackend::new(),
            flaw,
        })
    }
}

#[async_trait]
impl VolumeBackend for BrokenVolumes {
    async fn create(&self, name: &str, p: CreateVolume) -> Result<VolumeInfo> {
        self.inner.create(name, p).await
    }
    async fn open(&self, name: &str, o: OpenVolume) -> Result<Arc<dyn BlockDevice>> {
        self.inner.open(name, o).await
    }
    async fn open_snapshot(
        &self,
        name: &str,
        s: &str,
        o: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        let snap = self.inner.open_snapshot(name, s, o.clone()).await?;
        match self.flaw {
            VolumeFlaw::SnapshotsFollowTheHead => {
                self.inner
                    .open(
                        name,
                        OpenVolume {
                            read_only: true,
                            ..o
                        },
                    )
                    .await
            }
            _ => Ok(snap),
        }
    }
    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        let info = self.inner.info(name).await?;
        Ok(match self.flaw {
            VolumeFlaw::FrozenRevision => VolumeInfo {
                revision: 1,
                ..info
            },
            _ => info,
        })
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.inner.list().await
    }
    async fn delete(&self, name: &str) -> Result<()> {
        self.inner.delete(name).await
    }
    async fn snapshot(&self, name: &str, s: &str) -> Result<SnapshotInfo> {
        self.inner.snapshot(name, s).await
    }
    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        self.inner.list_snapshots(name).await
    }
    async fn delete_snapshot(&self, name: &str, s: &str) -> Result<()> {
        self.inner.delete_snapshot(name, s).await
    }
    async fn revert(&self, name: &str, s: &str) -> Result<()> {
        self.inner.revert(name, s).await
    }
    async fn clone_snapshot(&self, name: &str, s: &str, new: &str) -> Result<VolumeInfo> {
        self.inner.clone_snapshot(name, s, new).await
    }
    async fn expand(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.inner.expand(name, size).await
    }
    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>> {
        let ranges = self.inner.changed_blocks(name, from, to).await?;
        Ok(match self.flaw {
            VolumeFlaw::NoChangeTracking => vec![],
            _ => ranges,
        })
    }
}

#[tokio::test]
async fn broken_volume_backends_fail_the_volume_suite() {
    for flaw in [
        VolumeFlaw::NoChangeTracking,
        VolumeFlaw::FrozenRevision,
        VolumeFlaw::SnapshotsFollowTheHead,
    ] {
        let what = format!("{flaw:?}");
        must_fail(
            &what,
            testing::volume::volume_backend_suite(|| async move { BrokenVolumes::new(flaw) }),
        )
        .await;
        let b = BrokenVolumes::new(flaw);
        match flaw {
            VolumeFlaw::NoChangeTracking => {
                must_fail(&what, testing::volume::changed_blocks_are_exact_at_4k(&*b)).await
            }
            VolumeFlaw::FrozenRevision => {
                must_fail(
                    &what,
                    testing::volume::revision_increases_on_metadata_changes(&*b),
                )
                .await
            }
            VolumeFlaw::SnapshotsFollowTheHead => {
                must_fail(&what, testing::volume::snapshot_freezes_content(&*b)).await
            }
        }
    }
}

// ---------------------------------------------------------------- backup targets

#[derive(Debug, Clone, Copy)]
enum TargetFlaw {
    /// `put_new` overwrites an existing object.
    Overwrites,
    /// `put_new` checks for the key, then writes: racing creators all "win".
    CheckThenWrite,
}

#[derive(Debug)]
struct BrokenTarget {
    inner: MemBackupTarget,
    flaw: TargetFlaw,
}

impl BrokenTarget {
    fn new(flaw: TargetFlaw) -> Box<Self> {
        Box::new(BrokenTarget {
            inner: MemBackupTarget::new(),
            flaw,
        })
    }
}

#[async_trait]
impl BackupTarget for BrokenTarget {
    async fn put_new(&self, key: &str, data: Bytes) -> Result<()> {
        match self.flaw {
            TargetFlaw::Overwrites => {
                let _ = self.inner.delete(key).await;
            }
            TargetFlaw::CheckThenWrite => {
                if self.inner.head(key).await.is_ok() {
                    return Err(hci_core::Error::already_exists("object", key));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = self.inner.delete(key).await;
            }
        }
        self.inner.put_new(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
}

#[tokio::test]
async fn broken_backup_targets_fail_the_backup_suite() {
    for flaw in [TargetFlaw::Overwrites, TargetFlaw::CheckThenWrite] {
        let what = format!("{flaw:?}");
        must_fail(
            &what,
            testing::backup::backup_target_suite(|| async move { BrokenTarget::new(flaw) }),
        )
        .await;
        let t = BrokenTarget::new(flaw);
        match flaw {
            TargetFlaw::Overwrites => {
                must_fail(&what, testing::backup::put_new_is_create_only(&*t)).await
            }
            TargetFlaw::CheckThenWrite => {
                must_fail(
                    &what,
                    testing::backup::concurrent_creates_have_one_winner(&*t),
                )
                .await
            }
        }
    }
}

// ---------------------------------------------------------------- the references pass

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_implementations_pass_the_whole_suites() {
    testing::block::block_device_suite(|| async { Box::new(MemBlockDevice::new(32 << 20)) }).await;
    testing::block::read_only_block_device_suite(|| async {
        Box::new(MemBlockDevice::new(1 << 20).read_only())
    })
    .await;
    let shared = Arc::new(MemStateStore::new());
    testing::store::state_store_suite(|| {
        let s = shared.clone();
        async move { s }
    })
    .await;
    testing::volume::volume_backend_suite(|| async { Box::new(MemVolumeBackend::new()) }).await;
    testing::backup::backup_target_suite(|| async { Box::new(MemBackupTarget::new()) }).await;
}

#[test]
fn case_lists_match_the_suites() {
    assert_eq!(testing::block::BLOCK_DEVICE_CASES.len(), 13);
    assert_eq!(testing::block::READ_ONLY_BLOCK_DEVICE_CASES.len(), 2);
    assert_eq!(testing::volume::VOLUME_BACKEND_CASES.len(), 15);
    assert_eq!(testing::store::STATE_STORE_CASES.len(), 14);
    assert_eq!(testing::backup::BACKUP_TARGET_CASES.len(), 8);
}
