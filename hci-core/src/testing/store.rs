//! Conformance suite for [`StateStore`].
//!
//! Run it with one `#[test]` per case through
//! [`state_store_conformance!`](crate::state_store_conformance):
//!
//! ```ignore
//! async fn make() -> MyFixture { /* a store; may be shared between cases */ }
//! hci_core::state_store_conformance!(make);
//! ```
//!
//! `make` is called once per case and returns anything that dereferences to a
//! store. Each case works under a key prefix of its own, unique to the run
//! (`/conformance/<case>-<uuid>/`), so one store (an etcd cluster, say) may serve
//! every case, concurrently and run after run; revisions are compared relative
//! to what the case observed. The lease cases take a few seconds (TTLs of 1–2 s).

use std::future::Future;
use std::ops::Deref;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;

use crate::error::Error;
use crate::store::{Precondition, PutOptions, StateStore, WatchEvent, WatchStream};

/// Names of every case, in the order [`state_store_suite`] runs them.
pub const STATE_STORE_CASES: &[&str] = crate::state_store_conformance! {@with [@names]};

const WAIT: Duration = Duration::from_secs(10);

/// A key prefix unique to one run of one case.
fn ns(case: &str) -> String {
    format!("/conformance/{case}-{}/", uuid::Uuid::new_v4().simple())
}

fn k(ns: &str, key: &str) -> String {
    format!("{ns}{key}")
}

async fn put<S: StateStore + ?Sized>(s: &S, key: &str, value: &str) -> u64 {
    s.put(key, value.as_bytes().to_vec(), PutOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

async fn next(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

async fn no_event(w: &mut WatchStream) {
    if let Ok(ev) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected watch event {ev:?}");
    }
}

fn put_event(ev: &WatchEvent) -> (&str, &[u8]) {
    match ev {
        WatchEvent::Put(kv) => (kv.key.as_str(), kv.value.as_slice()),
        other => panic!("expected a put event, got {other:?}"),
    }
}

/// Values round-trip; absent keys read as `None`.
pub async fn put_get_round_trip<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("put_get_round_trip"), "a");
    assert_eq!(s.get(&key).await.expect("get absent"), None);
    let rev = put(s, &key, "one").await;
    let kv = s.get(&key).await.expect("get").expect("key present");
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice()),
        (key.as_str(), b"one".as_slice())
    );
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.lease),
        (rev, rev, None)
    );
    s.put(&key, vec![0, 255, 7], PutOptions::default())
        .await
        .expect("binary value");
    assert_eq!(
        s.get(&key).await.expect("get").expect("present").value,
        vec![0, 255, 7]
    );
    assert!(
        s.put("", vec![], PutOptions::default()).await.is_err(),
        "empty key accepted"
    );
}

/// `list` returns exactly the prefix's keys, sorted, with the store revision.
pub async fn list_by_prefix_is_sorted_and_consistent<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("list_by_prefix_is_sorted_and_consistent");
    for name in ["b", "a", "c/x", "c/y"] {
        put(s, &k(case, name), name).await;
    }
    let sibling = format!("{}-other/a", case.trim_end_matches('/'));
    put(s, &sibling, "outside").await;
    let l = s.list(&k(case, "")).await.expect("list");
    let keys: Vec<&str> = l.items.iter().map(|kv| kv.key.as_str()).collect();
    let want = [k(case, "a"), k(case, "b"), k(case, "c/x"), k(case, "c/y")];
    assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
    let max = l.items.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
    assert!(
        l.revision >= max,
        "list revision {} older than its items ({max})",
        l.revision
    );
    assert_eq!(
        s.list(&k(case, "c/")).await.expect("list c/").items.len(),
        2
    );
    assert!(
        s.list(&k(case, "zzz"))
            .await
            .expect("empty list")
            .items
            .is_empty()
    );
}

/// Every change gets a higher revision; create revision survives updates.
pub async fn revisions_are_monotonic<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("revisions_are_monotonic"), "a");
    let start = s.current_revision().await.expect("current_revision");
    let r1 = put(s, &key, "1").await;
    let r2 = put(s, &key, "2").await;
    let r3 = s.delete(&key, Precondition::None).await.expect("delete");
    let r4 = put(s, &key, "3").await;
    assert!(
        start < r1 && r1 < r2 && r2 < r3 && r3 < r4,
        "{start} {r1} {r2} {r3} {r4}"
    );
    assert!(s.current_revision().await.expect("current_revision") >= r4);
    let kv = s.get(&key).await.expect("get").expect("present");
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r4, r4),
        "recreated key"
    );
    let r5 = put(s, &key, "4").await;
    let kv = s.get(&key).await.expect("get").expect("present");
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r4, r5),
        "updated key"
    );
}

/// `MustNotExist` creates once and then fails with `AlreadyExists`.
pub async fn must_not_exist_precondition<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("must_not_exist_precondition"), "a");
    let create = PutOptions {
        precondition: Precondition::MustNotExist,
        lease: None,
    };
    s.put(&key, b"first".to_vec(), create)
        .await
        .expect("create");
    match s.put(&key, b"second".to_vec(), create).await {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("second create: expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        s.get(&key).await.expect("get").expect("present").value,
        b"first"
    );
}

/// `Revision(r)` succeeds only at revision `r`; a stale writer gets `Conflict`.
pub async fn revision_precondition_is_compare_and_swap<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("revision_precondition_is_compare_and_swap"), "a");
    let cas = |r| PutOptions {
        precondition: Precondition::Revision(r),
        lease: None,
    };
    match s.put(&key, b"x".to_vec(), cas(1)).await {
        Err(e) if e.is_not_found() => {}
        other => panic!("CAS on an absent key: expected NotFound, got {other:?}"),
    }
    let r1 = put(s, &key, "v1").await;
    let r2 = s
        .put(&key, b"v2".to_vec(), cas(r1))
        .await
        .expect("CAS at the current revision");
    match s.put(&key, b"stale".to_vec(), cas(r1)).await {
        Err(Error::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (r1, r2)),
        other => panic!("stale CAS: expected Conflict, got {other:?}"),
    }
    assert_eq!(
        s.get(&key).await.expect("get").expect("present").value,
        b"v2"
    );
}

/// Deletes honour preconditions; absent keys are `NotFound`.
pub async fn delete_semantics<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("delete_semantics"), "a");
    assert!(
        s.delete(&key, Precondition::None)
            .await
            .is_err_and(|e| e.is_not_found())
    );
    let r1 = put(s, &key, "v").await;
    match s.delete(&key, Precondition::Revision(r1 + 1000)).await {
        Err(Error::Conflict { .. }) => {}
        other => panic!("delete with a stale revision: expected Conflict, got {other:?}"),
    }
    assert!(
        s.get(&key).await.expect("get").is_some(),
        "a refused delete deleted"
    );
    let rd = s
        .delete(&key, Precondition::Revision(r1))
        .await
        .expect("delete at revision");
    assert!(rd > r1);
    assert_eq!(s.get(&key).await.expect("get"), None);
}

/// A watch from a past revision replays every change, then follows live ones.
pub async fn watch_replays_history_then_follows<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("watch_replays_history_then_follows");
    let r1 = put(s, &k(case, "a"), "1").await;
    put(s, &k(case, "b"), "2").await;
    let rd = s
        .delete(&k(case, "a"), Precondition::None)
        .await
        .expect("delete");
    let mut w = s.watch(&k(case, ""), r1).await.expect("watch");
    let e1 = next(&mut w).await;
    assert_eq!(put_event(&e1), (k(case, "a").as_str(), b"1".as_slice()));
    assert_eq!(e1.revision(), r1);
    assert_eq!(put_event(&next(&mut w).await).0, k(case, "b"));
    match next(&mut w).await {
        WatchEvent::Delete { key, mod_revision } => {
            assert_eq!((key, mod_revision), (k(case, "a"), rd))
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    let r4 = put(s, &k(case, "c"), "live").await;
    let e4 = next(&mut w).await;
    assert_eq!(put_event(&e4).0, k(case, "c"));
    assert_eq!(e4.revision(), r4);
}

/// A watch sees only its prefix.
pub async fn watch_filters_by_prefix<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("watch_filters_by_prefix");
    let mut w = s.watch(&k(case, "in/"), 0).await.expect("watch");
    put(s, &k(case, "out/x"), "no").await;
    put(s, &k(case, "in/x"), "yes").await;
    assert_eq!(put_event(&next(&mut w).await).0, k(case, "in/x"));
    no_event(&mut w).await;
}

/// A watch from revision 0 starts now.
pub async fn watch_from_now_sees_only_new_changes<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("watch_from_now_sees_only_new_changes");
    put(s, &k(case, "old"), "before").await;
    let mut w = s.watch(&k(case, ""), 0).await.expect("watch");
    no_event(&mut w).await;
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(put(s, &k(case, &format!("n{i:02}")), "after").await);
    }
    for (i, rev) in revs.iter().enumerate() {
        let ev = next(&mut w).await;
        assert_eq!(
            put_event(&ev).0,
            k(case, &format!("n{i:02}")),
            "events out of order"
        );
        assert_eq!(ev.revision(), *rev);
    }
}

/// Keys attached to a lease vanish (with a delete event) when it expires.
pub async fn lease_expiry_deletes_keys<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("lease_expiry_deletes_keys");
    let lease = s.grant_lease(Duration::from_secs(1)).await.expect("grant");
    let key = k(case, "node");
    let mut w = s.watch(&k(case, ""), 0).await.expect("watch");
    s.put(
        &key,
        b"alive".to_vec(),
        PutOptions {
            precondition: Precondition::None,
            lease: Some(lease),
        },
    )
    .await
    .expect("put with lease");
    assert_eq!(
        s.get(&key).await.expect("get").expect("present").lease,
        Some(lease)
    );
    assert_eq!(put_event(&next(&mut w).await).0, key);
    match next(&mut w).await {
        WatchEvent::Delete { key: k2, .. } => assert_eq!(k2, key),
        other => panic!("expected the expiry delete, got {other:?}"),
    }
    assert_eq!(s.get(&key).await.expect("get"), None);
    assert!(
        s.keep_alive(lease).await.is_err(),
        "an expired lease was renewed"
    );
    let opts = PutOptions {
        precondition: Precondition::None,
        lease: Some(lease),
    };
    assert!(
        s.put(&key, b"x".to_vec(), opts).await.is_err(),
        "put on an expired lease"
    );
}

/// Renewing a lease keeps its keys past the TTL.
pub async fn keep_alive_keeps_keys<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("keep_alive_keeps_keys"), "node");
    let lease = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
    let opts = PutOptions {
        precondition: Precondition::None,
        lease: Some(lease),
    };
    s.put(&key, b"alive".to_vec(), opts).await.expect("put");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.keep_alive(lease).await.expect("keep_alive");
    }
    assert!(
        s.get(&key).await.expect("get").is_some(),
        "renewed lease expired"
    );
    s.revoke_lease(lease).await.expect("revoke");
}

/// Revoking deletes the lease's keys at once; unknown leases are `NotFound`.
pub async fn revoke_deletes_keys<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("revoke_deletes_keys");
    let lease = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
    let opts = PutOptions {
        precondition: Precondition::None,
        lease: Some(lease),
    };
    s.put(&k(case, "a"), b"1".to_vec(), opts)
        .await
        .expect("put a");
    s.put(&k(case, "b"), b"2".to_vec(), opts)
        .await
        .expect("put b");
    put(s, &k(case, "free"), "no lease").await;
    s.revoke_lease(lease).await.expect("revoke");
    let left: Vec<String> = s
        .list(&k(case, ""))
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, [k(case, "free")]);
    assert!(s.revoke_lease(lease).await.is_err_and(|e| e.is_not_found()));
    assert!(
        s.keep_alive(987_654_321)
            .await
            .is_err_and(|e| e.is_not_found())
    );
    let opts = PutOptions {
        precondition: Precondition::None,
        lease: Some(987_654_321),
    };
    assert!(
        s.put(&k(case, "c"), vec![], opts).await.is_err(),
        "put with an unknown lease"
    );
}

/// Concurrent writers get distinct revisions, and a watch sees every change
/// once, in revision order.
pub async fn concurrent_writes_are_totally_ordered<S: StateStore + ?Sized>(s: &S) {
    let case = &ns("concurrent_writes_are_totally_ordered");
    let from = s.current_revision().await.expect("current_revision") + 1;
    let mut w = s.watch(case, from).await.expect("watch");
    let keys: Vec<String> = (0..40).map(|i| k(case, &format!("k{}", i % 8))).collect();
    let revs: Vec<u64> = join_all(
        keys.iter()
            .map(|key| s.put(key, key.as_bytes().to_vec(), PutOptions::default())),
    )
    .await
    .into_iter()
    .map(|r| r.expect("concurrent put"))
    .collect();
    let mut sorted = revs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        revs.len(),
        "concurrent puts were given the same revision: {revs:?}"
    );
    let mut seen = Vec::new();
    for _ in 0..revs.len() {
        seen.push(next(&mut w).await.revision());
    }
    assert_eq!(
        seen, sorted,
        "the watch must deliver every change once, in revision order"
    );
    for key in keys.iter().take(8) {
        let kv = s.get(key).await.expect("get").expect("present");
        assert!(
            revs.contains(&kv.mod_revision),
            "{key} has a revision no put returned"
        );
    }
}

/// Of many writers racing a compare-and-swap from the same revision, exactly one wins.
pub async fn concurrent_compare_and_swap_has_one_winner<S: StateStore + ?Sized>(s: &S) {
    let key = k(&ns("concurrent_compare_and_swap_has_one_winner"), "leader");
    let r0 = put(s, &key, "nobody").await;
    let cas = PutOptions {
        precondition: Precondition::Revision(r0),
        lease: None,
    };
    let results = join_all((0..16u8).map(|i| s.put(&key, vec![i], cas))).await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "expected exactly one CAS winner, got {winners:?}"
    );
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, Error::Conflict { .. }),
                "a losing CAS must be Conflict, got {e}"
            );
        }
    }
    let kv = s.get(&key).await.expect("get").expect("present");
    assert_eq!(
        kv.value,
        vec![winners[0] as u8],
        "the stored value is not the winner's"
    );
    let creates = PutOptions {
        precondition: Precondition::MustNotExist,
        lease: None,
    };
    let key = k(&ns("concurrent_compare_and_swap_has_one_winner"), "create");
    let results = join_all((0..16u8).map(|i| s.put(&key, vec![i], creates))).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "expected exactly one MustNotExist winner: {results:?}"
    );
}

/// Runs every case, each on a store from `make`.
pub async fn state_store_suite<F, Fut, T>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Deref,
    T::Target: StateStore,
{
    crate::state_store_conformance! {@with [@suite make]}
}

/// Generates one `#[tokio::test]` per [`StateStore`] conformance case.
///
/// `$make` is an async function (or a closure returning a future), called once
/// per case, producing anything that dereferences to a store, fresh or shared
/// (cases use their own key prefixes): `Fn() -> impl Future<Output = T>` with
/// `T: Deref<Target: StateStore>`.
///
/// This macro holds the one list of cases; [`STATE_STORE_CASES`] and
/// [`state_store_suite`] are generated from it through the internal `@` arms.
#[macro_export]
macro_rules! state_store_conformance {
    ($make:expr) => {
        $crate::state_store_conformance! {@with [@tests $make]}
    };
    (@with [$($how:tt)*]) => {
        $crate::state_store_conformance! {$($how)*;
            put_get_round_trip,
            list_by_prefix_is_sorted_and_consistent,
            revisions_are_monotonic,
            must_not_exist_precondition,
            revision_precondition_is_compare_and_swap,
            delete_semantics,
            watch_replays_history_then_follows,
            watch_filters_by_prefix,
            watch_from_now_sees_only_new_changes,
            concurrent_writes_are_totally_ordered,
            concurrent_compare_and_swap_has_one_winner,
            lease_expiry_deletes_keys,
            keep_alive_keeps_keys,
            revoke_deletes_keys,
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@suite $make:expr; $($case:ident),* $(,)?) => {
        $( $crate::testing::store::$case(&*($make)().await).await; )*
    };
    (@tests $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::store::$case(&*fixture).await;
            }
        )*
    };
}
