//! hci-core's conformance suites on the replicated engine over 1, 2 and 3
//! replica servers on loopback, plus fencing.

use std::ops::Deref;
use std::sync::Arc;

use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume, VolumeBackend};
use hci_storage::engine::{EngineOptions, ReplicatedVolume, ReplicatedVolumeBackend, Robustness};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use hci_storage::replica::server::ReplicaServer;

const TOKEN: &[u8] = b"test-token";

/// N replica servers on loopback and a backend over them.
struct Cluster {
    backend: ReplicatedVolumeBackend,
    nodes: Vec<Arc<dyn ReplicaNode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Deref for Cluster {
    type Target = ReplicatedVolumeBackend;
    fn deref(&self) -> &ReplicatedVolumeBackend {
        &self.backend
    }
}

async fn cluster(n: usize) -> Cluster {
    let mut dirs = Vec::new();
    let mut tasks = Vec::new();
    let mut nodes: Vec<Arc<dyn ReplicaNode>> = Vec::new();
    for _ in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        let srv = ReplicaServer::new(dir.path(), TOKEN).expect("server");
        let (addr, task) = srv.spawn("127.0.0.1:0").await.expect("spawn");
        nodes.push(Arc::new(RemoteNode::new(ServerAddr::new(
            addr.to_string(),
            TOKEN,
        ))));
        dirs.push(dir);
        tasks.push(task);
    }
    let backend =
        ReplicatedVolumeBackend::new(nodes.clone(), EngineOptions::default()).expect("backend");
    Cluster {
        backend,
        nodes,
        tasks,
        _dirs: dirs,
    }
}

struct Dev {
    dev: Arc<dyn BlockDevice>,
    _c: Cluster,
}

impl Deref for Dev {
    type Target = dyn BlockDevice;
    fn deref(&self) -> &(dyn BlockDevice + 'static) {
        &*self.dev
    }
}

async fn device(n: usize) -> Dev {
    let c = cluster(n).await;
    c.create("v", CreateVolume::new(32 << 20))
        .await
        .expect("create");
    let dev = c.open("v", OpenVolume::default()).await.expect("open");
    Dev { dev, _c: c }
}

macro_rules! replicas {
    ($($m:ident: $n:expr),*) => {$(
        mod $m {
            async fn cluster() -> super::Cluster {
                super::cluster($n).await
            }
            async fn device() -> super::Dev {
                super::device($n).await
            }
            mod backend {
                hci_core::volume_backend_conformance!(super::cluster);
            }
            mod device {
                hci_core::block_device_conformance!(super::device);
            }
        }
    )*};
}

replicas!(one: 1, two: 2, three: 3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_engine_is_fenced() {
    let c = cluster(2).await;
    c.create("v", CreateVolume::new(4 << 20))
        .await
        .expect("create");
    let old = ReplicatedVolume::open(
        "v",
        &c.nodes,
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("first engine");
    old.write_at(&[1u8; 4096], 0, WriteFlags::default())
        .await
        .expect("write through the first engine");
    let new = ReplicatedVolume::open(
        "v",
        &c.nodes,
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("second engine");
    assert!(new.generation() > old.generation());
    let err = old
        .write_at(&[2u8; 4096], 0, WriteFlags::default())
        .await
        .expect_err("the older engine must be refused");
    assert!(
        matches!(err, hci_core::Error::Fenced { .. }),
        "expected Fenced, got {err:?}"
    );
    new.write_at(&[3u8; 4096], 0, WriteFlags::default())
        .await
        .expect("the newer engine writes");
    let mut buf = [0u8; 4096];
    new.read_at(&mut buf, 0).await.expect("read");
    assert_eq!(buf, [3u8; 4096]);
    // Both replicas are still healthy: a fenced engine's refusals fail no replica.
    assert_eq!(new.status().await.robustness, Robustness::Healthy);
}
