//! The suites can fail: deliberately broken implementations must not pass them.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use hci_core::Result;
use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::memory::{MemBackupTarget, MemBlockDevice, MemStateStore, MemVolumeBackend};
use hci_core::store::{
    KeyValue, LeaseId, ListResult, Precondition, PutOptions, StateStore, WatchStream,
};
use hci_core::testing;
use hci_core::volume::{CreateVolume, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo};

async fn must_fail(what: &str, fut: impl Future<Output = ()>) {
    let r = AssertUnwindSafe(fut).catch_unwind().await;
    assert!(
        r.is_err(),
        "{what}: the broken implementation passed the suite"
    );
}

/// Drops every second write.
#[derive(Debug)]
struct ForgetfulDevice {
    inner: MemBlockDevice,
    writes: AtomicU64,
}

#[async_trait]
impl BlockDevice for ForgetfulDevice {
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
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
            return Ok(());
        }
        self.inner.write_at(buf, offset, flags).await
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
        self.inner.block_status(offset, len).await
    }
}

/// Ignores preconditions.
#[derive(Debug, Default)]
struct CarelessStore(MemStateStore);

#[async_trait]
impl StateStore for CarelessStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.0.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<ListResult> {
        self.0.list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, options: PutOptions) -> Result<u64> {
        let o = PutOptions {
            precondition: Precondition::None,
            ..options
        };
        self.0.put(key, value, o).await
    }
    async fn delete(&self, key: &str, _p: Precondition) -> Result<u64> {
        self.0.delete(key, Precondition::None).await
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<WatchStream> {
        self.0.watch(prefix, from).await
    }
    async fn current_revision(&self) -> Result<u64> {
        self.0.current_revision().await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.0.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.0.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.0.revoke_lease(lease).await
    }
}

/// Reports no changed blocks and never bumps revisions.
#[derive(Debug, Default)]
struct LazyVolumes(MemVolumeBackend);

#[async_trait]
impl VolumeBackend for LazyVolumes {
    async fn create(&self, name: &str, p: CreateVolume) -> Result<VolumeInfo> {
        self.0.create(name, p).await
    }
    async fn open(&self, name: &str, o: OpenVolume) -> Result<std::sync::Arc<dyn BlockDevice>> {
        self.0.open(name, o).await
    }
    async fn open_snapshot(
        &self,
        name: &str,
        s: &str,
        o: OpenVolume,
    ) -> Result<std::sync::Arc<dyn BlockDevice>> {
        self.0.open_snapshot(name, s, o).await
    }
    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.0
            .info(name)
            .await
            .map(|i| VolumeInfo { revision: 1, ..i })
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.0.list().await
    }
    async fn delete(&self, name: &str) -> Result<()> {
        self.0.delete(name).await
    }
    async fn snapshot(&self, name: &str, s: &str) -> Result<SnapshotInfo> {
        self.0.snapshot(name, s).await
    }
    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        self.0.list_snapshots(name).await
    }
    async fn delete_snapshot(&self, name: &str, s: &str) -> Result<()> {
        self.0.delete_snapshot(name, s).await
    }
    async fn revert(&self, name: &str, s: &str) -> Result<()> {
        self.0.revert(name, s).await
    }
    async fn clone_snapshot(&self, name: &str, s: &str, new: &str) -> Result<VolumeInfo> {
        self.0.clone_snapshot(name, s, new).await
    }
    async fn expand(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.0.expand(name, size).await
    }
    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<hci_core::block::ByteRange>> {
        self.0.changed_blocks(name, from, to).await?;
        Ok(vec![])
    }
}

#[tokio::test]
async fn the_reference_implementations_pass_the_whole_suites() {
    testing::block::block_device_suite(|| async { Box::new(MemBlockDevice::new(32 << 20)) }).await;
    testing::store::state_store_suite(&MemStateStore::new()).await;
    testing::volume::volume_backend_suite(|| async { Box::new(MemVolumeBackend::new()) }).await;
    testing::backup::backup_target_suite(&MemBackupTarget::new()).await;
}

#[tokio::test]
async fn a_device_that_drops_writes_fails_the_block_suite() {
    let dev = ForgetfulDevice {
        inner: MemBlockDevice::new(32 << 20),
        writes: AtomicU64::new(0),
    };
    must_fail(
        "forgetful device",
        testing::block::aligned_write_read_round_trip(&dev),
    )
    .await;
}

#[tokio::test]
async fn a_store_that_ignores_preconditions_fails_the_store_suite() {
    let s = CarelessStore::default();
    must_fail(
        "careless store",
        testing::store::must_not_exist_precondition(&s),
    )
    .await;
    must_fail(
        "careless store",
        testing::store::revision_precondition_is_compare_and_swap(&s),
    )
    .await;
}

#[tokio::test]
async fn a_backend_without_change_tracking_fails_the_volume_suite() {
    let b = LazyVolumes::default();
    must_fail(
        "lazy volumes",
        testing::volume::changed_blocks_are_exact_at_4k(&b),
    )
    .await;
    let b = LazyVolumes::default();
    must_fail(
        "lazy volumes",
        testing::volume::revision_increases_on_metadata_changes(&b),
    )
    .await;
}
