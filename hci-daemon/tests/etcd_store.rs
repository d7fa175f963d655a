//! The etcd state store against a real etcd (Debian's `etcd-server`): the
//! shared conformance suite, plus what only etcd does (compaction, a restart
//! of etcd under a live client).
#![cfg(feature = "etcd")]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use hci_core::Error;
use hci_core::store::{PutOptions, StateStore, WatchEvent};
use hci_daemon::store::{EtcdServer, EtcdStateStore};

/// One etcd for every case of this test binary (cases use their own key
/// prefixes). nextest runs each case in its own process, so this is one etcd
/// per case: statics are never dropped, so an exit hook kills it and removes
/// its data (etcd preallocates ~120 MiB of WAL; leaking it filled CI's disk).
fn server() -> &'static EtcdServer {
    static SERVER: OnceLock<EtcdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let root = tempfile::TempDir::new().expect("create a temp dir").keep();
        let s = EtcdServer::start_in(&root.join("etcd"))
            .expect("start etcd (install Debian's etcd-server)");
        clean_up_at_exit(&s, root);
        s
    })
}

fn clean_up_at_exit(s: &EtcdServer, root: PathBuf) {
    static AT_EXIT: OnceLock<(Option<i32>, PathBuf)> = OnceLock::new();
    if AT_EXIT.set((s.pid(), root)).is_err() {
        return;
    }
    extern "C" fn clean_up() {
        if let Some((pid, root)) = AT_EXIT.get() {
            if let Some(pid) = pid {
                // SAFETY: kill and waitpid have no memory-safety preconditions;
                // the status pointer may be null.
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                    libc::waitpid(*pid, std::ptr::null_mut(), 0);
                }
            }
            let _ = std::fs::remove_dir_all(root);
        }
    }
    // SAFETY: registers a plain extern "C" function with no captured state.
    unsafe { libc::atexit(clean_up) };
}

async fn make() -> Arc<EtcdStateStore> {
    let url = server().url();
    Arc::new(EtcdStateStore::open(&url).await.expect("connect to etcd"))
}

hci_core::state_store_conformance!(make);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_revision_is_compacted() {
    let etcd = EtcdServer::start().expect("start etcd");
    let s = EtcdStateStore::open(&etcd.url()).await.expect("connect");
    let mut last = 0;
    for i in 0..5 {
        last = s
            .put("/c/a", vec![i], PutOptions::default())
            .await
            .expect("put");
    }
    s.compact(last).await.expect("compact");
    // etcd confirms the watch first and cancels it right after, so the
    // error is the stream's first item (the trait allows either place).
    let first = match s.watch("/c/", last - 3).await {
        Err(e) => Some(Err(e)),
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the compacted watch said nothing"),
    };
    match first {
        Some(Err(Error::Compacted { requested, oldest })) => {
            assert_eq!((requested, oldest), (last - 3, last))
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // From the compaction point on, history is there.
    let mut w = s.watch("/c/", last).await.expect("watch at the compaction");
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(WatchEvent::Put(kv)))) => assert_eq!(kv.mod_revision, last),
        other => panic!("expected the last put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_an_etcd_restart() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let s = EtcdStateStore::open(&etcd.url()).await.expect("connect");
    let r1 = s
        .put("/r/a", b"before".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let mut w = s.watch("/r/", r1 + 1).await.expect("watch");
    etcd.kill();
    let down = s.get("/r/a").await;
    assert!(
        matches!(down, Err(Error::Unavailable { .. })),
        "a read with etcd down: expected Unavailable, got {down:?}"
    );
    // The watch ends with an error (the controllers relist then).
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Err(_))) | Ok(None) => {}
        other => panic!("the watch should break when etcd dies, got {other:?}"),
    }
    etcd.restart().expect("restart etcd");
    // The same client reconnects by itself; data and revisions survived.
    let mut got = None;
    for _ in 0..100 {
        match s.get("/r/a").await {
            Ok(kv) => {
                got = kv;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let kv = got.expect("the key after the restart");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (b"before".as_slice(), r1)
    );
    let r2 = s
        .put("/r/b", b"after".to_vec(), PutOptions::default())
        .await
        .expect("put after restart");
    assert!(r2 > r1);
    let mut w = s.watch("/r/", r1 + 1).await.expect("watch again");
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(ev))) => assert_eq!((ev.key(), ev.revision()), ("/r/b", r2)),
        other => panic!("expected the put after the restart, got {other:?}"),
    }
}
