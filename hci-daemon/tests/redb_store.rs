//! The redb state store: the shared conformance suite, plus what only a
//! durable store must do (reopen, history bounds, leases across restarts).

use std::ops::Deref;
use std::time::Duration;

use futures::StreamExt;
use hci_core::Error;
use hci_core::store::{Precondition, PutOptions, StateStore, WatchEvent, WatchStream};
use hci_daemon::store::{RedbOptions, RedbStateStore};
use tempfile::TempDir;

/// A store in its own temporary directory.
struct Fixture {
    store: RedbStateStore,
    _dir: TempDir,
}

impl Deref for Fixture {
    type Target = RedbStateStore;
    fn deref(&self) -> &RedbStateStore {
        &self.store
    }
}

async fn make() -> Fixture {
    let dir = TempDir::new().expect("temp dir");
    let store = RedbStateStore::open(dir.path().join("state.redb"))
        .await
        .expect("open store");
    Fixture { store, _dir: dir }
}

hci_core::state_store_conformance!(make);

async fn put(s: &RedbStateStore, key: &str, value: &str) -> u64 {
    s.put(key, value.as_bytes().to_vec(), PutOptions::default())
        .await
        .expect("put")
}

async fn next(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

#[tokio::test]
async fn data_and_revision_survive_reopen() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("state.redb");
    let (rev_a, last) = {
        let s = RedbStateStore::open(&path).await.expect("open");
        let rev_a = put(&s, "/r/a", "1").await;
        put(&s, "/r/b", "2").await;
        let last = s.delete("/r/b", Precondition::None).await.expect("delete");
        (rev_a, last)
    };
    let s = RedbStateStore::open(&path).await.expect("reopen");
    assert_eq!(s.current_revision().await.expect("revision"), last);
    let a = s.get("/r/a").await.expect("get").expect("a kept");
    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"1"[..], rev_a));
    assert_eq!(s.get("/r/b").await.expect("get"), None);
    // Revisions continue from where they stopped, and the log replays history.
    let next_rev = put(&s, "/r/c", "3").await;
    assert_eq!(next_rev, last + 1);
    let mut w = s.watch("/r/", rev_a).await.expect("watch");
    assert_eq!(next(&mut w).await.revision(), rev_a);
    assert_eq!(next(&mut w).await.key(), "/r/b");
    assert!(matches!(next(&mut w).await, WatchEvent::Delete { .. }));
    assert_eq!(next(&mut w).await.revision(), next_rev);
}

#[tokio::test]
async fn old_history_is_compacted() {
    let dir = TempDir::new().expect("temp dir");
    let options = RedbOptions {
        history: 5,
        ..RedbOptions::default()
    };
    let s = RedbStateStore::open_with(dir.path().join("s.redb"), options)
        .await
        .expect("open");
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(put(&s, &format!("/c/{i}"), "v").await);
    }
    match s.watch("/c/", revs[0]).await {
        Err(Error::Compacted { requested, oldest }) => {
            assert_eq!(requested, revs[0]);
            assert_eq!(oldest, revs[5]);
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    let mut w = s.watch("/c/", revs[5]).await.expect("watch kept history");
    for rev in &revs[5..] {
        assert_eq!(next(&mut w).await.revision(), *rev);
    }
}

#[tokio::test]
async fn watch_catches_up_across_many_changes_without_gaps() {
    let dir = TempDir::new().expect("temp dir");
    let options = RedbOptions {
        event_buffer: 16,
        ..RedbOptions::default()
    };
    let s = RedbStateStore::open_with(dir.path().join("s.redb"), options)
        .await
        .expect("open");
    let first = put(&s, "/w/start", "0").await;
    // A watcher that does not read while 600 changes happen must lag on the
    // live channel and recover from the log, in order, with no duplicates.
    let mut w = s.watch("/w/", first).await.expect("watch");
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..600 {
                put(&s, &format!("/w/{}", i % 7), "v").await;
            }
        })
    };
    for expected in first..=first + 600 {
        assert_eq!(next(&mut w).await.revision(), expected);
    }
    writer.await.expect("writer");
}

#[tokio::test]
async fn lease_survives_reopen_then_expires() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("s.redb");
    let lease = {
        let s = RedbStateStore::open(&path).await.expect("open");
        let lease = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
        let opts = PutOptions {
            precondition: Precondition::None,
            lease: Some(lease),
        };
        s.put("/l/node", b"up".to_vec(), opts).await.expect("put");
        lease
    };
    let s = RedbStateStore::open(&path).await.expect("reopen");
    s.keep_alive(lease).await.expect("lease kept across reopen");
    assert!(s.get("/l/node").await.expect("get").is_some());
    let mut w = s.watch("/l/", 0).await.expect("watch");
    match next(&mut w).await {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "/l/node"),
        other => panic!("expected expiry, got {other:?}"),
    }
    assert!(s.keep_alive(lease).await.is_err_and(|e| e.is_not_found()));
    // A lease id is never reused, even after a reopen.
    let again = s.grant_lease(Duration::from_secs(5)).await.expect("grant");
    assert!(again > lease);
}

#[tokio::test]
async fn lease_expired_while_closed_is_reaped_on_open() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("s.redb");
    {
        let s = RedbStateStore::open(&path).await.expect("open");
        let lease = s
            .grant_lease(Duration::from_millis(200))
            .await
            .expect("grant");
        let opts = PutOptions {
            precondition: Precondition::None,
            lease: Some(lease),
        };
        s.put("/l/x", b"v".to_vec(), opts).await.expect("put");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = RedbStateStore::open(&path).await.expect("reopen");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.get("/l/x").await.expect("get").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "lease not reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn second_open_of_the_same_file_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("s.redb");
    let _s = RedbStateStore::open(&path).await.expect("open");
    assert!(RedbStateStore::open(&path).await.is_err());
}

#[tokio::test]
async fn dropping_the_store_ends_its_watches() {
    let dir = TempDir::new().expect("temp dir");
    let s = RedbStateStore::open(dir.path().join("s.redb"))
        .await
        .expect("open");
    let mut w = s.watch("/", 0).await.expect("watch");
    drop(s);
    let end = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(matches!(end, Ok(None)), "watch did not end: {end:?}");
}
