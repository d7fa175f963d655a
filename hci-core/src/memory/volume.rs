//! An in-memory [`VolumeBackend`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Utc;

use super::block::{MemBlockDevice, MemData};
use crate::block::{BLOCK_SIZE, BlockDevice, ByteRange, coalesce_ranges};
use crate::error::{Error, Result};
use crate::volume::{
    CreateVolume, EncryptionKey, OpenVolume, SnapshotInfo, VolumeBackend, VolumeInfo,
};

#[derive(Debug)]
struct MemSnapshot {
    info: SnapshotInfo,
    data: MemData,
}

#[derive(Debug)]
struct MemVolume {
    head: Arc<Mutex<MemData>>,
    snapshots: Vec<MemSnapshot>,
    key: Option<EncryptionKey>,
    revision: u64,
}

impl MemVolume {
    fn snapshot(&self, name: &str, volume: &str) -> Result<&MemSnapshot> {
        self.snapshots
            .iter()
            .find(|s| s.info.name == name)
            .ok_or_else(|| Error::not_found("snapshot", format!("{volume}@{name}")))
    }

    fn check_key(&self, name: &str, key: Option<&EncryptionKey>) -> Result<()> {
        match (&self.key, key) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(Error::invalid(
                format!("volume {name:?}"),
                "is encrypted: a key is required",
            )),
            (Some(k), Some(given)) if k == given => Ok(()),
            (Some(_), Some(_)) => Err(Error::invalid(
                format!("volume {name:?}"),
                "wrong encryption key",
            )),
        }
    }

    fn info(&self, name: &str) -> VolumeInfo {
        let head = lock(&self.head);
        let mut allocated = 0;
        let mut prev: Option<&MemData> = None;
        for s in &self.snapshots {
            allocated += own_blocks(&s.data, prev) * BLOCK_SIZE;
            prev = Some(&s.data);
        }
        allocated += own_blocks(&head, prev) * BLOCK_SIZE;
        VolumeInfo {
            name: name.to_string(),
            size: head.size,
            allocated,
            snapshots: self.snapshots.len(),
            encrypted: self.key.is_some(),
            revision: self.revision,
        }
    }
}

/// Blocks of `data` that differ from `below` (what a layer would hold).
fn own_blocks(data: &MemData, below: Option<&MemData>) -> u64 {
    match below {
        None => data.blocks.len() as u64,
        Some(b) => data
            .blocks
            .iter()
            .filter(|(i, blk)| b.blocks.get(i) != Some(blk))
            .count() as u64,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks a volume or snapshot name: non-empty, at most 255 bytes, no `/`, NUL or `..`.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    let bad = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 255 {
        Some("must be at most 255 bytes")
    } else if name.contains('/') || name.contains('\0') {
        Some("must not contain '/' or NUL")
    } else if name == "." || name == ".." {
        Some("must not be '.' or '..'")
    } else {
        None
    };
    match bad {
        Some(reason) => Err(Error::invalid(format!("{what} name {name:?}"), reason)),
        None => Ok(()),
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::invalid(
            "volume size",
            format!("{size} must be a nonzero multiple of {BLOCK_SIZE}"),
        ));
    }
    Ok(())
}

/// Volumes held in memory: the reference [`VolumeBackend`] for tests and examples.
///
/// Snapshots copy the block map (cheap for test-sized volumes); handles returned by
/// [`VolumeBackend::open`] share the head, so snapshot, revert and expand act on
/// open volumes.
#[derive(Debug, Default)]
pub struct MemVolumeBackend {
    volumes: Mutex<BTreeMap<String, MemVolume>>,
}

impl MemVolumeBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut MemVolume) -> Result<T>) -> Result<T> {
        let mut vols = lock(&self.volumes);
        let v = vols
            .get_mut(name)
            .ok_or_else(|| Error::not_found("volume", name))?;
        f(v)
    }
}

#[async_trait]
impl VolumeBackend for MemVolumeBackend {
    async fn create(&self, name: &str, params: CreateVolume) -> Result<VolumeInfo> {
        check_name("volume", name)?;
        check_size(params.size)?;
        let mut vols = lock(&self.volumes);
        if vols.contains_key(name) {
            return Err(Error::already_exists("volume", name));
        }
        let v = MemVolume {
            head: Arc::new(Mutex::new(MemData {
                size: params.size,
                blocks: BTreeMap::new(),
            })),
            snapshots: Vec::new(),
            key: params.encryption_key,
            revision: 1,
        };
        let info = v.info(name);
        vols.insert(name.to_string(), v);
        Ok(info)
    }

    async fn open(&self, name: &str, options: OpenVolume) -> Result<Arc<dyn BlockDevice>> {
        self.with(name, |v| {
            v.check_key(name, options.encryption_key.as_ref())?;
            Ok(Arc::new(MemBlockDevice::from_shared(
                v.head.clone(),
                options.read_only,
            )) as Arc<dyn BlockDevice>)
        })
    }

    async fn open_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        options: OpenVolume,
    ) -> Result<Arc<dyn BlockDevice>> {
        self.with(name, |v| {
            v.check_key(name, options.encryption_key.as_ref())?;
            let data = v.snapshot(snapshot, name)?.data.clone();
            Ok(Arc::new(MemBlockDevice::from_shared(
                Arc::new(Mutex::new(data)),
                true,
            )) as Arc<dyn BlockDevice>)
        })
    }

    async fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.with(name, |v| Ok(v.info(name)))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>> {
        Ok(lock(&self.volumes).iter().map(|(n, v)| v.info(n)).collect())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        lock(&self.volumes)
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::not_found("volume", name))
    }

    async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        check_name("snapshot", snapshot)?;
        self.with(name, |v| {
            if v.snapshots.iter().any(|s| s.info.name == snapshot) {
                return Err(Error::already_exists(
                    "snapshot",
                    format!("{name}@{snapshot}"),
                ));
            }
            let data = lock(&v.head).clone();
            let allocated = own_blocks(&data, v.snapshots.last().map(|s| &s.data)) * BLOCK_SIZE;
            let info = SnapshotInfo {
                name: snapshot.to_string(),
                created: Utc::now(),
                size: data.size,
                allocated,
            };
            v.snapshots.push(MemSnapshot {
                info: info.clone(),
                data,
            });
            v.revision += 1;
            Ok(info)
        })
    }

    async fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        self.with(name, |v| {
            Ok(v.snapshots.iter().map(|s| s.info.clone()).collect())
        })
    }

    async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        self.with(name, |v| {
            let pos = v
                .snapshots
                .iter()
                .position(|s| s.info.name == snapshot)
                .ok_or_else(|| Error::not_found("snapshot", format!("{name}@{snapshot}")))?;
            v.snapshots.remove(pos);
            v.revision += 1;
            Ok(())
        })
    }

    async fn revert(&self, name: &str, snapshot: &str) -> Result<()> {
        self.with(name, |v| {
            let data = v.snapshot(snapshot, name)?.data.clone();
            *lock(&v.head) = data;
            v.revision += 1;
            Ok(())
        })
    }

    async fn clone_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<VolumeInfo> {
        check_name("volume", new_name)?;
        let mut vols = lock(&self.volumes);
        if vols.contains_key(new_name) {
            return Err(Error::already_exists("volume", new_name));
        }
        let src = vols
            .get(name)
            .ok_or_else(|| Error::not_found("volume", name))?;
        let data = src.snapshot(snapshot, name)?.data.clone();
        let v = MemVolume {
            head: Arc::new(Mutex::new(data)),
            snapshots: Vec::new(),
            key: src.key.clone(),
            revision: 1,
        };
        let info = v.info(new_name);
        vols.insert(new_name.to_string(), v);
        Ok(info)
    }

    async fn expand(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        check_size(new_size)?;
        self.with(name, |v| {
            let size = lock(&v.head).size;
            if new_size < size {
                return Err(Error::invalid(
                    "volume size",
                    format!("cannot shrink volume {name:?} from {size} to {new_size} bytes"),
                ));
            }
            if new_size > size {
                lock(&v.head).resize(new_size);
                v.revision += 1;
            }
            Ok(v.info(name))
        })
    }

    async fn changed_blocks(
        &self,
        name: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<ByteRange>> {
        self.with(name, |v| {
            let to_pos = v
                .snapshots
                .iter()
                .position(|s| s.info.name == to)
                .ok_or_else(|| Error::not_found("snapshot", format!("{name}@{to}")))?;
            let to_data = &v.snapshots[to_pos].data;
            let ranges = match from {
                None => to_data
                    .blocks
                    .keys()
                    .map(|i| ByteRange::new(i * BLOCK_SIZE, BLOCK_SIZE))
                    .collect::<Vec<_>>(),
                Some(from) => {
                    let from_pos = v
                        .snapshots
                        .iter()
                        .position(|s| s.info.name == from)
                        .ok_or_else(|| Error::not_found("snapshot", format!("{name}@{from}")))?;
                    if from_pos >= to_pos {
                        return Err(Error::invalid(
                            "changed blocks",
                            format!("snapshot {from:?} is not older than {to:?}"),
                        ));
                    }
                    let from_data = &v.snapshots[from_pos].data;
                    let mut idx: Vec<u64> = to_data
                        .blocks
                        .iter()
                        .filter(|(i, b)| from_data.blocks.get(i) != Some(b))
                        .map(|(i, _)| *i)
                        .collect();
                    idx.extend(
                        from_data
                            .blocks
                            .keys()
                            .filter(|i| !to_data.blocks.contains_key(i)),
                    );
                    idx.into_iter()
                        .map(|i| ByteRange::new(i * BLOCK_SIZE, BLOCK_SIZE))
                        .collect()
                }
            };
            let size = to_data.size;
            Ok(coalesce_ranges(
                ranges.into_iter().filter(|r| r.offset < size),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    //! The backend against a flat model: a head and snapshots as plain byte vectors.

    use proptest::prelude::*;

    use super::*;
    use crate::block::{WriteFlags, ZeroFlags};

    const SIZE: u64 = 16 * BLOCK_SIZE;

    #[derive(Debug, Clone)]
    enum Op {
        Write { off: u64, len: u64, seed: u8 },
        Zero { off: u64, len: u64, no_hole: bool },
        Discard { off: u64, len: u64 },
        Snapshot,
        DeleteSnapshot(usize),
        Revert(usize),
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(3 * BLOCK_SIZE)))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
            1 => (range(), any::<bool>()).prop_map(|((off, len), no_hole)| Op::Zero { off, len, no_hole }),
            1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
            2 => Just(Op::Snapshot),
            1 => any::<usize>().prop_map(Op::DeleteSnapshot),
            1 => any::<usize>().prop_map(Op::Revert),
        ]
    }

    async fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut buf = vec![0u8; dev.size() as usize];
        dev.read_at(&mut buf, 0).await.expect("read");
        buf
    }

    fn covered(ranges: &[ByteRange], block: u64) -> bool {
        let (lo, hi) = (block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE);
        ranges.iter().any(|r| r.offset <= lo && hi <= r.end())
    }

    async fn run(ops: Vec<Op>) {
        let b = MemVolumeBackend::new();
        b.create("v", CreateVolume::new(SIZE))
            .await
            .expect("create");
        let dev = b.open("v", OpenVolume::default()).await.expect("open");
        let mut head = vec![0u8; SIZE as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut next_snap = 0;
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect();
                    dev.write_at(&data, off, WriteFlags::default())
                        .await
                        .expect("write");
                    head[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                Op::Zero { off, len, no_hole } => {
                    let flags = ZeroFlags {
                        fua: false,
                        no_hole,
                    };
                    dev.write_zeroes(off, len, flags)
                        .await
                        .expect("write_zeroes");
                    head[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    dev.discard(off, len).await.expect("discard");
                    head[off as usize..(off + len) as usize].fill(0);
                }
                Op::Snapshot => {
                    let name = format!("s{next_snap}");
                    next_snap += 1;
                    b.snapshot("v", &name).await.expect("snapshot");
                    snaps.push((name, head.clone()));
                }
                Op::DeleteSnapshot(i) if !snaps.is_empty() => {
                    let (name, _) = snaps.remove(i % snaps.len());
                    b.delete_snapshot("v", &name)
                        .await
                        .expect("delete_snapshot");
                }
                Op::Revert(i) if !snaps.is_empty() => {
                    let (name, data) = &snaps[i % snaps.len()];
                    b.revert("v", name).await.expect("revert");
                    head = data.clone();
                }
                Op::DeleteSnapshot(_) | Op::Revert(_) => {}
            }
            assert!(read_all(&*dev).await == head, "head differs from the model");
        }
        let info = b.info("v").await.expect("info");
        assert_eq!(info.snapshots, snaps.len());
        for (name, data) in &snaps {
            let s = b
                .open_snapshot("v", name, OpenVolume::default())
                .await
                .expect("open snapshot");
            assert!(
                read_all(&*s).await == *data,
                "snapshot {name} differs from the model"
            );
        }
        let blocks = |d: &[u8], i: u64| {
            d[(i * BLOCK_SIZE) as usize..((i + 1) * BLOCK_SIZE) as usize].to_vec()
        };
        for (j, (to, to_data)) in snaps.iter().enumerate() {
            let all = b
                .changed_blocks("v", None, to)
                .await
                .expect("changed_blocks(None)");
            for i in 0..SIZE / BLOCK_SIZE {
                if blocks(to_data, i).iter().any(|&x| x != 0) {
                    assert!(
                        covered(&all, i),
                        "changed_blocks(None, {to}) misses block {i}"
                    );
                }
            }
            for (from, from_data) in &snaps[..j] {
                let d = b
                    .changed_blocks("v", Some(from), to)
                    .await
                    .expect("changed_blocks");
                for i in 0..SIZE / BLOCK_SIZE {
                    if blocks(from_data, i) != blocks(to_data, i) {
                        assert!(
                            covered(&d, i),
                            "changed_blocks({from}, {to}) misses block {i}"
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_backend_matches_a_flat_model(ops in proptest::collection::vec(op(), 1..40)) {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(run(ops));
        }
    }
}
