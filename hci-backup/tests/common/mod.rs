//! Shared fixtures: a local volume backend in a tempdir, data patterns.
#![allow(dead_code)]

use std::sync::Arc;

use hci_backup::Repository;
use hci_core::backup::{BackupEngine, BackupInfo, VolumeBackupRequest};
use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;

/// A volume backend in a temporary directory.
pub struct Vols {
    pub backend: Arc<LocalVolumeBackend>,
    pub dir: tempfile::TempDir,
}

pub fn vols() -> Vols {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Arc::new(LocalVolumeBackend::new(dir.path()).expect("backend"));
    Vols { backend, dir }
}

/// Deterministic pseudo-random bytes.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates volume `name` of `size` bytes: random, zero and text thirds-ish.
pub async fn make_volume(v: &Vols, name: &str, size: u64) -> Arc<dyn BlockDevice> {
    v.backend
        .create(name, CreateVolume::new(size))
        .await
        .expect("create volume");
    let dev = v
        .backend
        .open(name, OpenVolume::default())
        .await
        .expect("open volume");
    let half = (size / 2) as usize;
    dev.write_at(&random(half, 7), 0, WriteFlags::default())
        .await
        .expect("write random");
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n"
        .iter()
        .copied()
        .cycle()
        .take((size / 4) as usize)
        .collect();
    dev.write_at(&text, size / 4 * 3, WriteFlags::default())
        .await
        .expect("write text");
    dev.flush().await.expect("flush");
    dev
}

/// Writes `n` scattered 4 KiB blocks of fresh random data; returns bytes changed.
pub async fn scatter(dev: &Arc<dyn BlockDevice>, n: u64, seed: u64) -> u64 {
    let blocks = dev.size() / 4096;
    let mut x = seed | 1;
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (x >> 20) % blocks;
        dev.write_at(
            &random(4096, seed * 1000 + i),
            b * 4096,
            WriteFlags::default(),
        )
        .await
        .expect("scatter write");
    }
    dev.flush().await.expect("flush");
    n * 4096
}

/// Reads a whole device.
pub async fn read_all(dev: &dyn BlockDevice, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    dev.read_at(&mut buf, 0).await.expect("read");
    buf
}

/// Backs up `volume@snapshot`.
pub async fn backup(
    repo: &Repository,
    v: &Vols,
    volume: &str,
    snapshot: &str,
    base: Option<&str>,
) -> BackupInfo {
    repo.backup(
        v.backend.clone(),
        VolumeBackupRequest {
            volume: volume.into(),
            snapshot: snapshot.into(),
            base: base.map(str::to_string),
            metadata: vec![("spec".into(), "{}".into())],
        },
        None,
    )
    .await
    .expect("backup")
}

/// Restores `id` into a new volume and checks it equals `volume@snapshot`.
pub async fn assert_restores(repo: &Repository, v: &Vols, id: &str, volume: &str, snapshot: &str) {
    let snap = v
        .backend
        .open_snapshot(volume, snapshot, OpenVolume::default())
        .await
        .expect("open snapshot");
    let size = snap.size();
    let name = format!("restore-{}", uuid::Uuid::new_v4().simple());
    v.backend
        .create(&name, CreateVolume::new(size))
        .await
        .expect("create restore volume");
    let dev = v
        .backend
        .open(&name, OpenVolume::default())
        .await
        .expect("open restore volume");
    repo.restore(id, dev.clone(), None).await.expect("restore");
    let want = read_all(&*snap, size).await;
    let got = read_all(&*dev, size).await;
    assert!(
        want == got,
        "restore of {id} differs from {volume}@{snapshot}"
    );
    v.backend
        .delete(&name)
        .await
        .expect("delete restore volume");
}
