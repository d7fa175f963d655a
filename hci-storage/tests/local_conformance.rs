//! hci-core's conformance suites on the local replica store.

use std::ops::Deref;
use std::sync::Arc;

use hci_core::block::BlockDevice;
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::local::LocalVolumeBackend;

/// A backend in its own temporary directory (removed on drop).
struct Fixture {
    backend: LocalVolumeBackend,
    _dir: tempfile::TempDir,
}

impl Deref for Fixture {
    type Target = LocalVolumeBackend;
    fn deref(&self) -> &LocalVolumeBackend {
        &self.backend
    }
}

async fn backend() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = LocalVolumeBackend::new(dir.path()).expect("backend");
    Fixture { backend, _dir: dir }
}

mod volume_backend {
    hci_core::volume_backend_conformance!(super::backend);
}

/// A device plus what keeps its files alive.
struct Dev {
    dev: Arc<dyn BlockDevice>,
    _f: Fixture,
}

impl Deref for Dev {
    type Target = dyn BlockDevice;
    fn deref(&self) -> &(dyn BlockDevice + 'static) {
        &*self.dev
    }
}

async fn device() -> Dev {
    let f = backend().await;
    f.create("v", CreateVolume::new(32 << 20))
        .await
        .expect("create");
    let dev = f.open("v", OpenVolume::default()).await.expect("open");
    Dev { dev, _f: f }
}

/// The head of a volume with a snapshot under it (copy-on-write paths).
async fn device_over_snapshot() -> Dev {
    let f = backend().await;
    f.create("v", CreateVolume::new(32 << 20))
        .await
        .expect("create");
    f.snapshot("v", "base").await.expect("snapshot");
    let dev = f.open("v", OpenVolume::default()).await.expect("open");
    Dev { dev, _f: f }
}

async fn encrypted_device() -> Dev {
    let f = backend().await;
    let key = hci_core::volume::EncryptionKey::new(vec![42u8; 64]);
    let params = CreateVolume {
        size: 32 << 20,
        encryption_key: Some(key.clone()),
    };
    f.create("v", params).await.expect("create");
    f.snapshot("v", "base").await.expect("snapshot");
    let dev = f
        .open(
            "v",
            OpenVolume {
                read_only: false,
                encryption_key: Some(key),
            },
        )
        .await
        .expect("open");
    Dev { dev, _f: f }
}

mod head {
    hci_core::block_device_conformance!(super::device);
}

mod head_over_snapshot {
    hci_core::block_device_conformance!(super::device_over_snapshot);
}

mod encrypted_head {
    hci_core::block_device_conformance!(super::encrypted_device);
}
