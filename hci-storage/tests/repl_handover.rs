//! Engine hand-over (live migration of a replicated volume's writer):
//! `ReplicatedVolume::prepare` fences nobody, `PreparedVolume::activate`
//! takes the volume over, over two replica servers on loopback.

#![allow(clippy::print_stdout)] // the hand-over test prints its timings

use std::sync::Arc;
use std::time::Instant;

use hci_core::Error;
use hci_core::block::{BlockDevice, WriteFlags};
use hci_core::volume::{CreateVolume, OpenVolume};
use hci_storage::engine::{EngineOptions, ReplicaState, ReplicatedVolume, Robustness};
use hci_storage::replica::ReplicaNode;
use hci_storage::replica::client::{RemoteNode, ServerAddr};
use hci_storage::replica::server::ReplicaServer;

const TOKEN: &[u8] = b"handover-token";
const SIZE: u64 = 16 << 20;

struct Servers {
    nodes: Vec<Arc<dyn ReplicaNode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Servers {
    /// A fresh set of nodes (new connections), as another process has.
    fn nodes_again(&self) -> Vec<Arc<dyn ReplicaNode>> {
        self.nodes
            .iter()
            .map(|n| Arc::new(RemoteNode::new(ServerAddr::new(n.label(), TOKEN))) as _)
            .collect()
    }
}

async fn servers(n: usize) -> Servers {
    let (mut nodes, mut tasks, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        let srv = ReplicaServer::new(dir.path(), TOKEN).expect("server");
        let (addr, task) = srv.spawn("127.0.0.1:0").await.expect("spawn");
        let node: Arc<dyn ReplicaNode> =
            Arc::new(RemoteNode::new(ServerAddr::new(addr.to_string(), TOKEN)));
        node.backend()
            .create("v", CreateVolume::new(SIZE))
            .await
            .expect("create");
        nodes.push(node);
        tasks.push(task);
        dirs.push(dir);
    }
    Servers {
        nodes,
        tasks,
        _dirs: dirs,
    }
}

async fn open(nodes: &[Arc<dyn ReplicaNode>]) -> Arc<ReplicatedVolume> {
    ReplicatedVolume::open("v", nodes, OpenVolume::default(), EngineOptions::default())
        .await
        .expect("open")
}

fn block(i: u8) -> Vec<u8> {
    vec![i; 4096]
}

async fn read(dev: &dyn BlockDevice, off: u64) -> Vec<u8> {
    let mut b = vec![0; 4096];
    dev.read_at(&mut b, off).await.expect("read");
    b
}

#[tokio::test]
async fn prepare_fences_nobody_and_activate_takes_over_after_a_clean_close() {
    hand_over(false).await;
}

#[tokio::test]
async fn prepare_fences_nobody_and_activate_takes_over_after_a_release() {
    hand_over(true).await;
}

async fn hand_over(release: bool) {
    let s = servers(2).await;
    let old = open(&s.nodes).await;
    old.write_at(&block(1), 0, WriteFlags::default())
        .await
        .expect("write");

    let t = Instant::now();
    let prepared = ReplicatedVolume::prepare(
        "v",
        &s.nodes_again(),
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("prepare");
    let prepare_time = t.elapsed();
    assert_eq!(prepared.size(), SIZE);
    assert_eq!(prepared.generation(), old.generation() + 1);
    // The old engine keeps writing while the new one is prepared.
    old.write_at(&block(2), 4096, WriteFlags::default())
        .await
        .expect("the old engine still writes after prepare");
    old.flush().await.expect("flush");
    assert_eq!(old.status().await.robustness, Robustness::Healthy);

    // Switch-over: the old engine closes, the new one activates.
    let t = Instant::now();
    let new = if release {
        old.release().await.expect("release");
        let closed = t.elapsed();
        let new = prepared
            .activate_after_release(old.generation())
            .await
            .expect("activate");
        println!(
            "prepare {prepare_time:?}; switch-over: release {closed:?}, release + activate {:?}",
            t.elapsed()
        );
        new
    } else {
        old.close().await.expect("close");
        let closed = t.elapsed();
        let new = prepared.activate().await.expect("activate");
        println!(
            "prepare {prepare_time:?}; switch-over: close {closed:?}, close + activate {:?}",
            t.elapsed()
        );
        new
    };
    let r = old.write_at(&block(9), 0, WriteFlags::default()).await;
    assert!(r.is_err(), "the old engine must refuse I/O: {r:?}");
    assert_eq!(
        new.last_reconcile(),
        None,
        "a clean close or a release needs no reconcile"
    );
    assert_eq!(new.status().await.robustness, Robustness::Healthy);
    assert_eq!(read(&*new, 0).await, block(1));
    assert_eq!(read(&*new, 4096).await, block(2));
    new.write_at(&block(3), 8192, WriteFlags::default())
        .await
        .expect("the new engine writes");

    // The old generation is refused by every replica.
    for n in &s.nodes {
        let r = n.fence("v", old.generation()).await;
        assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
        let r = n
            .open_fenced("v", old.generation(), OpenVolume::default())
            .await;
        assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
    }
    new.close().await.expect("close");
}

#[tokio::test]
async fn activate_fences_an_engine_that_never_closed() {
    let s = servers(2).await;
    let old = open(&s.nodes).await;
    old.write_at(&block(7), 0, WriteFlags::default())
        .await
        .expect("write");
    let prepared = ReplicatedVolume::prepare(
        "v",
        &s.nodes_again(),
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("prepare");
    // The old engine "dies" without closing: the new one reconciles.
    let new = prepared.activate().await.expect("activate");
    assert!(new.last_reconcile().is_some(), "unclean: reconciled");
    assert_eq!(read(&*new, 0).await, block(7));
    let r = old.write_at(&block(8), 0, WriteFlags::default()).await;
    assert!(
        matches!(r, Err(Error::Fenced { .. })),
        "the old engine must be fenced: {r:?}"
    );
    assert_eq!(read(&*new, 0).await, block(7));
}

#[tokio::test]
async fn a_newer_engine_since_prepare_makes_activate_fail_fenced() {
    let s = servers(2).await;
    let old = open(&s.nodes).await;
    let prepared = ReplicatedVolume::prepare(
        "v",
        &s.nodes_again(),
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("prepare");
    // The source took its volume back (a failed switch-over reopens it).
    old.close().await.expect("close");
    let again = open(&s.nodes).await;
    // It read the same fence state as prepare did, so it has the same
    // generation: activate must not share it.
    assert_eq!(again.generation(), prepared.generation());
    let r = prepared.activate().await;
    assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
    again
        .write_at(&block(1), 0, WriteFlags::default())
        .await
        .expect("the reopened engine keeps writing");
}

#[tokio::test]
async fn a_replica_dropped_after_prepare_is_taken_as_stale() {
    let s = servers(2).await;
    let old = open(&s.nodes).await;
    let prepared = ReplicatedVolume::prepare(
        "v",
        &s.nodes_again(),
        OpenVolume::default(),
        EngineOptions::default(),
    )
    .await
    .expect("prepare");
    // The old engine loses replica 1 after prepare: replica 0 gets a newer
    // epoch (as when a write to replica 1 fails).
    let st = s.nodes[0].fence_state("v").await.expect("state");
    s.nodes[0]
        .set_epoch("v", old.generation(), st.epoch + 1)
        .await
        .expect("epoch");
    old.close().await.expect("close");
    let new = prepared.activate().await.expect("activate");
    let status = new.status().await;
    assert_eq!(status.replicas[0].state, ReplicaState::Healthy);
    assert_eq!(status.replicas[1].state, ReplicaState::Stale);
}
