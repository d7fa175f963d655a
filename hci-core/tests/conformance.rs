//! The conformance suites run against hci-core's in-memory reference backends.

mod block {
    use hci_core::memory::MemBlockDevice;
    async fn make() -> Box<MemBlockDevice> {
        Box::new(MemBlockDevice::new(32 << 20))
    }
    hci_core::block_device_conformance!(make);
}

mod faulty_block {
    use hci_core::memory::MemBlockDevice;
    use hci_core::testing::faulty::FaultyBlockDevice;
    async fn make() -> Box<FaultyBlockDevice<MemBlockDevice>> {
        Box::new(FaultyBlockDevice::new(MemBlockDevice::new(32 << 20)))
    }
    hci_core::block_device_conformance!(make);
}

mod faulty_store {
    use hci_core::memory::MemStateStore;
    use hci_core::testing::faulty::FaultyStateStore;
    async fn make() -> Box<FaultyStateStore<MemStateStore>> {
        Box::new(FaultyStateStore::new(MemStateStore::new()))
    }
    hci_core::state_store_conformance!(make);
}

mod volume {
    use hci_core::memory::MemVolumeBackend;
    async fn make() -> Box<MemVolumeBackend> {
        Box::new(MemVolumeBackend::new())
    }
    hci_core::volume_backend_conformance!(make);
}

mod store {
    use hci_core::memory::MemStateStore;
    async fn make() -> Box<MemStateStore> {
        Box::new(MemStateStore::new())
    }
    hci_core::state_store_conformance!(make);
}

mod backup_target {
    use hci_core::memory::MemBackupTarget;
    async fn make() -> Box<MemBackupTarget> {
        Box::new(MemBackupTarget::new())
    }
    hci_core::backup_target_conformance!(make);
}

mod mem_volume_head_device {
    use std::sync::Arc;

    use hci_core::block::BlockDevice;
    use hci_core::memory::MemVolumeBackend;
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    /// A volume's head, opened through the backend, is a conforming device too.
    async fn make() -> Arc<dyn BlockDevice> {
        let b = MemVolumeBackend::new();
        b.create("v", CreateVolume::new(32 << 20))
            .await
            .expect("create");
        b.open("v", OpenVolume::default()).await.expect("open")
    }
    hci_core::block_device_conformance!(make);
}

mod read_only_block {
    use hci_core::block::WriteFlags;
    use hci_core::memory::MemBlockDevice;
    async fn make() -> Box<MemBlockDevice> {
        let dev = MemBlockDevice::new(4 << 20);
        hci_core::block::BlockDevice::write_at(&dev, &[7; 5000], 4000, WriteFlags::default())
            .await
            .expect("write");
        Box::new(dev.read_only())
    }
    hci_core::read_only_block_device_conformance!(make);
}

mod mem_volume_snapshot_device {
    use std::sync::Arc;

    use hci_core::block::{BlockDevice, WriteFlags};
    use hci_core::memory::MemVolumeBackend;
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    /// A snapshot opened through the backend is a conforming read-only device.
    async fn make() -> Arc<dyn BlockDevice> {
        let b = MemVolumeBackend::new();
        b.create("v", CreateVolume::new(4 << 20))
            .await
            .expect("create");
        let head = b.open("v", OpenVolume::default()).await.expect("open");
        head.write_at(&[9; 8192], 0, WriteFlags::default())
            .await
            .expect("write");
        b.snapshot("v", "s").await.expect("snapshot");
        b.open_snapshot("v", "s", OpenVolume::default())
            .await
            .expect("open snapshot")
    }
    hci_core::read_only_block_device_conformance!(make);
}

mod mem_volume_read_only_head {
    use std::sync::Arc;

    use hci_core::block::BlockDevice;
    use hci_core::memory::MemVolumeBackend;
    use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};

    /// A volume opened read-only is a conforming read-only device.
    async fn make() -> Arc<dyn BlockDevice> {
        let b = MemVolumeBackend::new();
        b.create("v", CreateVolume::new(4 << 20))
            .await
            .expect("create");
        let ro = OpenVolume {
            read_only: true,
            encryption_key: None,
        };
        b.open("v", ro).await.expect("open read-only")
    }
    hci_core::read_only_block_device_conformance!(make);
}
