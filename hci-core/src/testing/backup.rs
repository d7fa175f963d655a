//! Conformance suite for [`BackupTarget`].
//!
//! Run it with one `#[test]` per case through
//! [`backup_target_conformance!`](crate::backup_target_conformance):
//!
//! ```ignore
//! async fn make() -> MyFixture { /* a target; may be shared between cases */ }
//! hci_core::backup_target_conformance!(make);
//! ```
//!
//! `make` is called once per case and returns anything that dereferences to a
//! target, fresh or shared: each case writes under a prefix unique to the run
//! (`conformance/<case>-<uuid>/`), so a bucket may serve every case, run after run.

use std::future::Future;
use std::ops::Deref;

use bytes::Bytes;
use futures::future::join_all;

use crate::backup::BackupTarget;
use crate::error::Error;
use crate::testing::block::pattern;

/// Names of every case, in the order [`backup_target_suite`] runs them.
pub const BACKUP_TARGET_CASES: &[&str] = crate::backup_target_conformance! {@with [@names]};

/// A key prefix unique to one run of one case.
fn ns(case: &str) -> String {
    format!("conformance/{case}-{}/", uuid::Uuid::new_v4().simple())
}

fn k(ns: &str, key: &str) -> String {
    format!("{ns}{key}")
}

/// Objects round-trip; `head` reports their size.
pub async fn put_get_head_round_trip<T: BackupTarget + ?Sized>(t: &T) {
    let case = &ns("put_get_head_round_trip");
    let key = k(case, "obj");
    t.put_new(&key, Bytes::from_static(b"hello backup"))
        .await
        .expect("put_new");
    assert_eq!(
        t.get(&key).await.expect("get"),
        Bytes::from_static(b"hello backup")
    );
    let meta = t.head(&key).await.expect("head");
    assert_eq!((meta.key.as_str(), meta.size), (key.as_str(), 12));
    let empty = k(case, "empty");
    t.put_new(&empty, Bytes::new()).await.expect("empty object");
    assert_eq!(t.get(&empty).await.expect("get empty").len(), 0);
}

/// A second `put_new` on a key fails and leaves the first object.
pub async fn put_new_is_create_only<T: BackupTarget + ?Sized>(t: &T) {
    let key = k(&ns("put_new_is_create_only"), "obj");
    t.put_new(&key, Bytes::from_static(b"first"))
        .await
        .expect("put_new");
    match t.put_new(&key, Bytes::from_static(b"second")).await {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("second put_new: expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        t.get(&key).await.expect("get"),
        Bytes::from_static(b"first")
    );
}

/// Ranged reads return exactly the range.
pub async fn get_range_reads_exact_bytes<T: BackupTarget + ?Sized>(t: &T) {
    let key = k(&ns("get_range_reads_exact_bytes"), "obj");
    let data = pattern(0, 100_000, 1);
    t.put_new(&key, Bytes::from(data.clone()))
        .await
        .expect("put_new");
    for (a, b) in [(0u64, 10u64), (4096, 70_000), (99_990, 100_000), (5, 5)] {
        let got = t.get_range(&key, a..b).await.expect("get_range");
        assert_eq!(&got[..], &data[a as usize..b as usize], "range {a}..{b}");
    }
    assert!(
        t.get_range(&key, 99_000..200_000).await.is_err(),
        "get_range past the end of an object must fail"
    );
    assert!(
        t.get_range(&key, 200_000..200_010).await.is_err(),
        "get_range starting past the end of an object must fail"
    );
    let missing = k(&ns("get_range_reads_exact_bytes"), "missing");
    assert!(
        t.get_range(&missing, 0..1)
            .await
            .is_err_and(|e| e.is_not_found()),
        "get_range of a missing object must be NotFound"
    );
}

/// `list` returns the prefix's objects, sorted, with sizes.
pub async fn list_by_prefix_is_sorted<T: BackupTarget + ?Sized>(t: &T) {
    let case = &ns("list_by_prefix_is_sorted");
    for (name, len) in [("b", 2usize), ("a", 1), ("dir/c", 3), ("dir/d", 4)] {
        t.put_new(&k(case, name), Bytes::from(vec![1u8; len]))
            .await
            .expect("put_new");
    }
    t.put_new(
        &format!("{}-other/x", case.trim_end_matches('/')),
        Bytes::new(),
    )
    .await
    .expect("put_new");
    let all = t.list(&k(case, "")).await.expect("list");
    let got: Vec<(String, u64)> = all.into_iter().map(|m| (m.key, m.size)).collect();
    let want = vec![
        (k(case, "a"), 1),
        (k(case, "b"), 2),
        (k(case, "dir/c"), 3),
        (k(case, "dir/d"), 4),
    ];
    assert_eq!(got, want);
    assert_eq!(t.list(&k(case, "dir/")).await.expect("list dir").len(), 2);
    assert!(
        t.list(&k(case, "none/"))
            .await
            .expect("list empty")
            .is_empty()
    );
}

/// Deleted and absent objects are `NotFound`.
pub async fn delete_and_missing_objects<T: BackupTarget + ?Sized>(t: &T) {
    let key = k(&ns("delete_and_missing_objects"), "obj");
    let nf = |r: Result<(), Error>| matches!(r, Err(ref e) if e.is_not_found());
    assert!(
        t.get(&key).await.is_err_and(|e| e.is_not_found()),
        "get absent"
    );
    assert!(
        t.head(&key).await.is_err_and(|e| e.is_not_found()),
        "head absent"
    );
    assert!(nf(t.delete(&key).await), "delete absent");
    t.put_new(&key, Bytes::from_static(b"x"))
        .await
        .expect("put_new");
    t.delete(&key).await.expect("delete");
    assert!(
        t.get(&key).await.is_err_and(|e| e.is_not_found()),
        "get deleted"
    );
    t.put_new(&key, Bytes::from_static(b"again"))
        .await
        .expect("re-create after delete");
}

/// Multi-megabyte objects round-trip.
pub async fn large_objects_round_trip<T: BackupTarget + ?Sized>(t: &T) {
    let key = k(&ns("large_objects_round_trip"), "big");
    let data = pattern(0, 9 << 20, 2);
    t.put_new(&key, Bytes::from(data.clone()))
        .await
        .expect("put 9 MiB");
    assert!(
        t.get(&key).await.expect("get") == data,
        "9 MiB object differs"
    );
    assert_eq!(t.head(&key).await.expect("head").size, 9 << 20);
}

/// Of many concurrent creates of one key exactly one wins, intact.
pub async fn concurrent_creates_have_one_winner<T: BackupTarget + ?Sized>(t: &T) {
    let key = k(&ns("concurrent_creates_have_one_winner"), "obj");
    let bodies: Vec<Bytes> = (0..8u8)
        .map(|i| Bytes::from(pattern(0, 256 << 10, i)))
        .collect();
    let results = join_all(bodies.iter().map(|b| t.put_new(&key, b.clone()))).await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "expected exactly one winner, got {winners:?}"
    );
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, Error::AlreadyExists { .. }), "loser got {e}");
        }
    }
    assert_eq!(
        t.get(&key).await.expect("get"),
        bodies[winners[0]],
        "stored object is torn"
    );
}

/// Keys that could escape the target root, or are empty, are refused with `Invalid`.
pub async fn invalid_keys_are_refused<T: BackupTarget + ?Sized>(t: &T) {
    let case = &ns("invalid_keys_are_refused");
    let bad = [
        String::new(),
        "/abs/key".to_string(),
        "../escape".to_string(),
        format!("{case}../../escape"),
        format!("{case}a/../../b"),
        format!("{case}nul\0"),
    ];
    for key in &bad {
        match t.put_new(key, Bytes::from_static(b"x")).await {
            Err(Error::Invalid { .. }) => {}
            other => panic!("put_new({key:?}): expected Invalid, got {other:?}"),
        }
    }
    assert!(
        t.list(case).await.expect("list").is_empty(),
        "a refused put_new stored something"
    );
}

/// Runs every case, each on a target from `make`.
pub async fn backup_target_suite<F, Fut, T>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Deref,
    T::Target: BackupTarget,
{
    crate::backup_target_conformance! {@with [@suite make]}
}

/// Generates one `#[tokio::test]` per [`BackupTarget`] conformance case.
///
/// `$make` is an async function (or a closure returning a future), called once
/// per case, producing anything that dereferences to a target, fresh or shared
/// (cases use their own key prefixes): `Fn() -> impl Future<Output = T>` with
/// `T: Deref<Target: BackupTarget>`.
///
/// This macro holds the one list of cases; [`BACKUP_TARGET_CASES`] and
/// [`backup_target_suite`] are generated from it through the internal `@` arms.
#[macro_export]
macro_rules! backup_target_conformance {
    ($make:expr) => {
        $crate::backup_target_conformance! {@with [@tests $make]}
    };
    (@with [$($how:tt)*]) => {
        $crate::backup_target_conformance! {$($how)*;
            put_get_head_round_trip,
            put_new_is_create_only,
            get_range_reads_exact_bytes,
            list_by_prefix_is_sorted,
            delete_and_missing_objects,
            large_objects_round_trip,
            concurrent_creates_have_one_winner,
            invalid_keys_are_refused,
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@suite $make:expr; $($case:ident),* $(,)?) => {
        $( $crate::testing::backup::$case(&*($make)().await).await; )*
    };
    (@tests $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::backup::$case(&*fixture).await;
            }
        )*
    };
}
