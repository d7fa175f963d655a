//! Random interleavings of writes, replica failures, rebuilds and snapshots on
//! a 3-replica engine, checked against a simple model (block → last seed).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use proptest::prelude::*;

use hci_core::block::{BlockDevice, DeviceCaps, Extent, WriteFlags, ZeroFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_core::{Error, Result};
use hci_storage::engine::rebuild::RebuildProgress;
use hci_storage::engine::{EngineOptions, ReplicaState, ReplicatedVolume};
use hci_storage::replica::{DirtyRegions, DirtyUpdate, FenceState, LocalNode, ReplicaNode};

const BLOCKS: u64 = 32;
const BS: usize = 4096;

/// A local node that can be switched off (every request then fails).
#[derive(Debug)]
struct Flaky {
    inner: LocalNode,
    label: String,
    down: Arc<AtomicBool>,
}

fn down_err(label: &str) -> Error {
    Error::Unavailable {
        what: label.to_string(),
        source: Some("injected failure".into()),
    }
}

impl Flaky {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(down_err(&self.label));
        }
        Ok(())
    }
}

#[async_trait]
impl ReplicaNode for Flaky {
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
        self.check()?;
        self.inner.fence_state(volume).await
    }
    async fn fence(&self, volume: &str, generation: u64) -> Result<FenceState> {
        self.check()?;
        self.inner.fence(volume, generation).await
    }
    async fn set_epoch(&self, volume: &str, generation: u64, epoch: u64) -> Result<()> {
        self.check()?;
        self.inner.set_epoch(volume, generation, epoch).await
    }
    async fn mark_clean(&self, volume: &str, generation: u64) -> Result<()> {
        self.check()?;
        self.inner.mark_clean(volume, generation).await
    }
    async fn ping(&self) -> Result<()> {
        self.check()
    }
    async fn dirty_regions(&self, volume: &str) -> Result<Option<DirtyRegions>> {
        self.check()?;
        self.inner.dirty_regions(volume).await
    }
    async fn update_dirty(&self, volume: &str, generation: u64, update: DirtyUpdate) -> Result<()> {
        self.check()?;
        self.inner.update_dirty(volume, generation, update).await
    }
    async fn open_fenced(
        &self,
        volume: &str,
        generation: u64,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        self.check()?;
        let dev = self.inner.open_fenced(volume, generation, options).await?;
        Ok(Arc::new(FlakyDev {
            dev,
            label: self.label.clone(),
            down: self.down.clone(),
        }))
    }
}

#[derive(Debug)]
struct FlakyDev {
    dev: Arc<dyn BlockDevice>,
    label: String,
    down: Arc<AtomicBool>,
}

impl FlakyDev {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(down_err(&self.label));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for FlakyDev {
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
        self.check()?;
        self.dev.write_at(buf, offset, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.check()?;
        self.dev.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.dev.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check()?;
        self.dev.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check()?;
        self.dev.block_status(offset, len).await
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u8),
    Zero(u64),
    Fail(usize),
    Rebuild(usize),
    Snapshot,
    Reopen,
    /// The engine crashes with a write to block `.0` in flight that reached
    /// only one replica (`.2`, with content `.1`) after the engine wrote it.
    Torn(u64, u8, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS, 1u8..=255).prop_map(|(b, s)| Op::Write(b, s)),
        1 => (0..BLOCKS).prop_map(Op::Zero),
        2 => (0usize..3).prop_map(Op::Fail),
        2 => (0usize..3).prop_map(Op::Rebuild),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
        1 => (0..BLOCKS, 1u8..=255, 0usize..3).prop_map(|(b, s, i)| Op::Torn(b, s, i)),
    ]
}

async fn read_block(dev: &dyn BlockDevice, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    dev.read_at(&mut buf, b * BS as u64)
        .await
        .expect("a read failed with a healthy replica left");
    buf
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let downs: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let flaky: Vec<Arc<Flaky>> = (0..3)
        .map(|i| {
            Arc::new(Flaky {
                inner: LocalNode::new(dir.path().join(format!("n{i}"))).expect("node"),
                label: format!("n{i}"),
                down: downs[i].clone(),
            })
        })
        .collect();
    let nodes: Vec<Arc<dyn ReplicaNode>> = flaky
        .iter()
        .map(|f| f.clone() as Arc<dyn ReplicaNode>)
        .collect();
    for n in &nodes {
        n.backend()
            .create("v", CreateVolume::new(BLOCKS * BS as u64))
            .await
            .expect("create");
    }
    let open = || async {
        ReplicatedVolume::open(
            "v",
            &nodes,
            OpenVolume::default(),
            EngineOptions {
                keepalive: None,
                ..EngineOptions::default()
            },
        )
        .await
        .expect("open")
    };
    let mut vol = open().await;
    let mut model: HashMap<u64, u8> = HashMap::new();
    let mut snaps: Vec<(String, HashMap<u64, u8>)> = Vec::new();
    for op in ops {
        let healthy: Vec<usize> = vol
            .status()
            .await
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == ReplicaState::Healthy)
            .map(|(i, _)| i)
            .collect();
        match op {
            Op::Write(b, s) => {
                vol.write_at(&vec![s; BS], b * BS as u64, WriteFlags::default())
                    .await
                    .expect("write");
                model.insert(b, s);
            }
            Op::Zero(b) => {
                vol.write_zeroes(b * BS as u64, BS as u64, ZeroFlags::default())
                    .await
                    .expect("zero");
                model.remove(&b);
            }
            Op::Fail(i) => {
                // Keep one replica that is healthy and really up.
                let alive = healthy
                    .iter()
                    .filter(|&&j| j != i && !downs[j].load(Ordering::SeqCst))
                    .count();
                if alive > 0 {
                    downs[i].store(true, Ordering::SeqCst);
                }
            }
            Op::Rebuild(i) => {
                if !healthy.contains(&i) {
                    downs[i].store(false, Ordering::SeqCst);
                    match vol
                        .add_replica(nodes[i].clone(), Arc::new(RebuildProgress::default()))
                        .await
                    {
                        // The rebuild source may be down without the engine knowing yet.
                        Ok(_) | Err(Error::Unavailable { .. }) => {}
                        Err(e) => panic!("rebuild: {e:?}"),
                    }
                }
            }
            Op::Snapshot => {
                let name = format!("s{}", snaps.len());
                vol.snapshot(&name).await.expect("snapshot");
                snaps.push((name, model.clone()));
            }
            Op::Reopen => {
                vol.flush().await.expect("flush");
                drop(vol);
                vol = open().await;
            }
            Op::Torn(b, s, i) => {
                let Some(&i) = healthy
                    .iter()
                    .find(|&&j| j >= i && !downs[j].load(Ordering::SeqCst))
                else {
                    continue;
                };
                // The engine writes (marking the region dirty everywhere)...
                let old = s.wrapping_add(1).max(1);
                vol.write_at(&vec![old; BS], b * BS as u64, WriteFlags::default())
                    .await
                    .expect("write");
                // ...then a later write reaches replica i only, and the
                // engine dies without a flush.
                let dev = nodes[i]
                    .open_fenced("v", vol.generation(), OpenVolume::default())
                    .await
                    .expect("open replica");
                dev.write_at(&vec![s; BS], b * BS as u64, WriteFlags::default())
                    .await
                    .expect("direct write");
                drop(dev);
                drop(vol);
                vol = open().await;
                // Either version is right; every replica must hold the same.
                let got = read_block(&*vol, b).await;
                assert!(
                    got == vec![s; BS] || got == vec![old; BS],
                    "block {b} after a torn write"
                );
                model.insert(b, got[0]);
                let rec = vol.last_reconcile().expect("an unclean open reconciles");
                assert!(!rec.full, "every replica keeps a dirty-region log: {rec:?}");
            }
        }
    }
    for b in 0..BLOCKS {
        let want = vec![model.get(&b).copied().unwrap_or(0); BS];
        assert!(
            read_block(&*vol, b).await == want,
            "block {b} differs from the model"
        );
    }
    // Every healthy replica holds exactly the model, head and snapshots.
    vol.flush().await.expect("flush");
    let st = vol.status().await;
    for (i, r) in st.replicas.iter().enumerate() {
        if r.state != ReplicaState::Healthy {
            continue;
        }
        let node = &nodes[i];
        let dev = node
            .open_fenced("v", vol.generation(), OpenVolume::default())
            .await
            .expect("open replica");
        for b in 0..BLOCKS {
            let want = vec![model.get(&b).copied().unwrap_or(0); BS];
            assert!(read_block(&*dev, b).await == want, "replica {i} block {b}");
        }
        for (name, m) in &snaps {
            let Ok(view) = node
                .backend()
                .open_snapshot("v", name, OpenVolume::default())
                .await
            else {
                panic!("replica {i} lacks snapshot {name}");
            };
            for b in 0..BLOCKS {
                let want = vec![m.get(&b).copied().unwrap_or(0); BS];
                assert!(
                    read_block(&*view, b).await == want,
                    "replica {i} snapshot {name} block {b}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn replicated_volume_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(ops));
    }
}
