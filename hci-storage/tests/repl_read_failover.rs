//! A read must never fail while a healthy replica can serve it (issue 6).
//!
//! One replica refuses reads with the kind of error the engine used to pass
//! straight to the caller because it looks like the request's fault (a
//! garbled reply — "wrong length" — or a replica that lost the volume); the
//! engine must serve the read from the other replica and fail the refuser.
//! Only when every healthy replica refuses does the error reach the caller
//! (then it really is the request), and no replica is failed for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use async_trait::async_trait;

use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_core::{Error, Result};
use hci_storage::engine::{EngineOptions, ReplicaState, ReplicatedVolume, Robustness};
use hci_storage::replica::{DirtyRegions, DirtyUpdate, FenceState, LocalNode, ReplicaNode};

const SIZE: u64 = 1 << 20;

/// What a [`Refusing`] replica answers to reads and block-status requests.
const SERVE: u8 = 0;
const GARBLED: u8 = 1;
const LOST: u8 = 2;
/// Reads are served, writes refused as a garbled reply would be.
const WRITES_GARBLED: u8 = 3;

/// A real local replica whose device can be switched to refuse reads.
#[derive(Debug)]
struct Refusing {
    inner: LocalNode,
    label: String,
    mode: Arc<AtomicU8>,
}

#[async_trait]
impl ReplicaNode for Refusing {
    fn label(&self) -> String {
        self.label.clone()
    }
    fn is_local(&self) -> bool {
        false
    }
    fn backend(&self) -> &dyn VolumeBackend {
        self.inner.local()
    }
    async fn fence_state(&self, volume: &str) -> Result<FenceState> {
        self.inner.fence_state(volume).await
    }
    async fn fence(&self, volume: &str, generation: u64) -> Result<FenceState> {
        self.inner.fence(volume, generation).await
    }
    async fn set_epoch(&self, volume: &str, generation: u64, epoch: u64) -> Result<()> {
        self.inner.set_epoch(volume, generation, epoch).await
    }
    async fn mark_clean(&self, volume: &str, generation: u64) -> Result<()> {
        self.inner.mark_clean(volume, generation).await
    }
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
    async fn dirty_regions(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        self.inner.dirty_regions(volume).await
    }
    async fn update_dirty(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        self.inner.update_dirty(volume, generation, update).await
    }
    async fn open_fenced(
        &self,
        volume: &str,
        generation: u64,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        let dev = self.inner.open_fenced(volume, generation, options).await?;
        Ok(Arc::new(RefusingDev {
            dev,
            mode: self.mode.clone(),
        }))
    }
}

#[derive(Debug)]
struct RefusingDev {
    dev: Arc<dyn BlockDevice>,
    mode: Arc<AtomicU8>,
}

impl RefusingDev {
    fn check(&self) -> Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            // What `RemoteDevice` reports for a reply of the wrong length.
            GARBLED => Err(Error::invalid("replica read reply", "wrong length")),
            // What a replica server answers once the volume's replica is gone.
            LOST => Err(Error::not_found("volume", "v")),
            _ => Ok(()),
        }
    }

    fn check_write(&self) -> Result<()> {
        match self.mode.load(Ordering::SeqCst) {
            WRITES_GARBLED => Err(Error::invalid("replica write reply", "garbled")),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl BlockDevice for RefusingDev {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }
    fn capabilities(&self) -> DeviceCaps {
        self.dev.capabilities()
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check()?;
        self.dev.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()> {
        self.check_write()?;
        self.dev.write_at(buf, offset, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.dev.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.dev.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check()?;
        self.dev.block_status(offset, len).await
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    modes: Vec<Arc<AtomicU8>>,
    engine: Arc<ReplicatedVolume>,
}

async fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let modes: Vec<Arc<AtomicU8>> = (0..n).map(|_| Arc::new(AtomicU8::new(SERVE))).collect();
    let nodes: Vec<Arc<dyn ReplicaNode>> = modes
        .iter()
        .enumerate()
        .map(|(i, mode)| {
            Arc::new(Refusing {
                inner: LocalNode::new(dir.path().join(format!("n{i}"))).expect("node"),
                label: format!("n{i}"),
                mode: mode.clone(),
            }) as Arc<dyn ReplicaNode>
        })
        .collect();
    for n in &nodes {
        n.backend()
            .create("v", CreateVolume::new(SIZE))
            .await
            .expect("create");
    }
    let engine = ReplicatedVolume::open(
        "v",
        &nodes,
        OpenVolume::default(),
        EngineOptions {
            keepalive: None,
            ..EngineOptions::default()
        },
    )
    .await
    .expect("open");
    Setup {
        _dir: dir,
        modes,
        engine,
    }
}

fn pattern(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (b * 31 + i * 7 + 1) as u8).collect()
}

/// Writes a few blocks, switches replica `bad` to `mode`, then reads every
/// block (written and never written) many times: all reads succeed with the
/// right data, and `bad` ends up failed.
async fn reads_survive(mode: u8) {
    let s = setup(2).await;
    for i in 0..8u64 {
        s.engine
            .write_at(&pattern(i), i * 4096, WriteFlags::default())
            .await
            .expect("write");
    }
    s.modes[1].store(mode, Ordering::SeqCst);
    let mut buf = vec![0u8; 4096];
    // Reads alternate between the replicas: 64 of them certainly hit n1.
    for round in 0..64u64 {
        let i = round % 16;
        s.engine
            .read_at(&mut buf, i * 4096)
            .await
            .unwrap_or_else(|e| {
                panic!("read of block {i} failed with a healthy replica left: {e}")
            });
        let want = if i < 8 { pattern(i) } else { vec![0u8; 4096] };
        assert_eq!(buf, want, "block {i}");
    }
    s.engine
        .block_status(0, SIZE)
        .await
        .expect("block status with a healthy replica left");
    let st = s.engine.status().await;
    assert_eq!(st.robustness, Robustness::Degraded, "{st:?}");
    assert!(
        matches!(&st.replicas[1].state, ReplicaState::Failed(why) if why.contains("refused a read")),
        "{st:?}"
    );
    assert_eq!(st.replicas[0].state, ReplicaState::Healthy, "{st:?}");
    // Writes go on on the survivor.
    s.engine
        .write_at(&pattern(99), 0, WriteFlags::default())
        .await
        .expect("write after the failover");
    s.engine.read_at(&mut buf, 0).await.expect("read");
    assert_eq!(buf, pattern(99));
}

#[tokio::test]
async fn a_garbled_read_reply_fails_over_to_the_healthy_replica() {
    reads_survive(GARBLED).await;
}

#[tokio::test]
async fn a_replica_that_lost_the_volume_fails_over_to_the_healthy_replica() {
    reads_survive(LOST).await;
}

#[tokio::test]
async fn block_status_fails_over_too() {
    let s = setup(2).await;
    s.modes[0].store(GARBLED, Ordering::SeqCst);
    for _ in 0..4 {
        s.engine
            .block_status(0, SIZE)
            .await
            .expect("block status with a healthy replica left");
    }
    let st = s.engine.status().await;
    assert!(
        matches!(st.replicas[0].state, ReplicaState::Failed(_)),
        "{st:?}"
    );
}

#[tokio::test]
async fn an_error_every_replica_gives_reaches_the_caller_and_fails_none() {
    let s = setup(2).await;
    for m in &s.modes {
        m.store(GARBLED, Ordering::SeqCst);
    }
    let mut buf = vec![0u8; 4096];
    let e = s
        .engine
        .read_at(&mut buf, 0)
        .await
        .expect_err("every replica refuses");
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    let st = s.engine.status().await;
    assert_eq!(st.robustness, Robustness::Healthy, "{st:?}");
    // And once they serve again, so does the volume.
    for m in &s.modes {
        m.store(SERVE, Ordering::SeqCst);
    }
    s.engine.read_at(&mut buf, 0).await.expect("read");
    // Out of range is still the engine's own answer, failing nobody.
    let e = s
        .engine
        .read_at(&mut buf, SIZE)
        .await
        .expect_err("past the end");
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    assert_eq!(s.engine.status().await.robustness, Robustness::Healthy);
}

/// A write one replica refuses while a healthy one applies it: acknowledged,
/// and the refuser (which now lacks it) is failed, never read from again.
#[tokio::test]
async fn a_write_one_replica_refuses_is_acknowledged_and_the_refuser_failed() {
    let s = setup(2).await;
    s.modes[1].store(WRITES_GARBLED, Ordering::SeqCst);
    s.engine
        .write_at(&pattern(5), 0, WriteFlags::default())
        .await
        .expect("write with a healthy replica applying it");
    let st = s.engine.status().await;
    assert!(
        matches!(&st.replicas[1].state, ReplicaState::Failed(why) if why.contains("refused a write")),
        "{st:?}"
    );
    let mut buf = vec![0u8; 4096];
    for _ in 0..8 {
        s.engine.read_at(&mut buf, 0).await.expect("read");
        assert_eq!(
            buf,
            pattern(5),
            "a read came from the replica that missed the write"
        );
    }
    // Every replica refusing: the request's fault, nobody failed.
    let s = setup(2).await;
    for m in &s.modes {
        m.store(WRITES_GARBLED, Ordering::SeqCst);
    }
    s.engine
        .write_at(&pattern(1), 0, WriteFlags::default())
        .await
        .expect_err("every replica refuses");
    assert_eq!(s.engine.status().await.robustness, Robustness::Healthy);
}
