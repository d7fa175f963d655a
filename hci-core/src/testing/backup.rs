//! Conformance suite for [`BackupTarget`].
//!
//! Run it with one `#[test]` per case through
//! [`backup_target_conformance!`](crate::backup_target_conformance); `make`
//! returns anything that dereferences to a target (fresh or shared: cases use
//! their own key prefixes).

use bytes::Bytes;
use futures::future::join_all;

use crate::backup::BackupTarget;
use crate::error::Error;
use crate::testing::block::pattern;

/// Names of every case, in the order [`backup_target_suite`] runs them.
pub const BACKUP_TARGET_CASES: &[&str] = &[
    "put_get_head_round_trip",
    "put_new_is_create_only",
    "get_range_reads_exact_bytes",
    "list_by_prefix_is_sorted",
    "delete_and_missing_objects",
    "large_objects_round_trip",
    "concurrent_creates_have_one_winner",
];

fn k(case: &str, key: &str) -> String {
    format!("conformance/{case}/{key}")
}

/// Objects round-trip; `head` reports their size.
pub async fn put_get_head_round_trip(t: &dyn BackupTarget) {
    let key = k("put_get_head_round_trip", "obj");
    t.put_new(&key, Bytes::from_static(b"hello backup"))
        .await
        .expect("put_new");
    assert_eq!(
        t.get(&key).await.expect("get"),
        Bytes::from_static(b"hello backup")
    );
    let meta = t.head(&key).await.expect("head");
    assert_eq!((meta.key.as_str(), meta.size), (key.as_str(), 12));
    let empty = k("put_get_head_round_trip", "empty");
    t.put_new(&empty, Bytes::new()).await.expect("empty object");
    assert_eq!(t.get(&empty).await.expect("get empty").len(), 0);
}

/// A second `put_new` on a key fails and leaves the first object.
pub async fn put_new_is_create_only(t: &dyn BackupTarget) {
    let key = k("put_new_is_create_only", "obj");
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
pub async fn get_range_reads_exact_bytes(t: &dyn BackupTarget) {
    let key = k("get_range_reads_exact_bytes", "obj");
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
        "range past the end"
    );
}

/// `list` returns the prefix's objects, sorted, with sizes.
pub async fn list_by_prefix_is_sorted(t: &dyn BackupTarget) {
    let case = "list_by_prefix_is_sorted";
    for (name, len) in [("b", 2usize), ("a", 1), ("dir/c", 3), ("dir/d", 4)] {
        t.put_new(&k(case, name), Bytes::from(vec![1u8; len]))
            .await
            .expect("put_new");
    }
    t.put_new(&format!("conformance/{case}-other/x"), Bytes::new())
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
pub async fn delete_and_missing_objects(t: &dyn BackupTarget) {
    let key = k("delete_and_missing_objects", "obj");
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
pub async fn large_objects_round_trip(t: &dyn BackupTarget) {
    let key = k("large_objects_round_trip", "big");
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
pub async fn concurrent_creates_have_one_winner(t: &dyn BackupTarget) {
    let key = k("concurrent_creates_have_one_winner", "obj");
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

/// Runs every case against one target.
pub async fn backup_target_suite(t: &dyn BackupTarget) {
    put_get_head_round_trip(t).await;
    put_new_is_create_only(t).await;
    get_range_reads_exact_bytes(t).await;
    list_by_prefix_is_sorted(t).await;
    delete_and_missing_objects(t).await;
    large_objects_round_trip(t).await;
    concurrent_creates_have_one_winner(t).await;
}

/// Generates one `#[tokio::test]` per [`BackupTarget`] conformance case.
#[macro_export]
macro_rules! backup_target_conformance {
    ($make:expr) => {
        $crate::backup_target_conformance!(@cases $make;
            put_get_head_round_trip,
            put_new_is_create_only,
            get_range_reads_exact_bytes,
            list_by_prefix_is_sorted,
            delete_and_missing_objects,
            large_objects_round_trip,
            concurrent_creates_have_one_winner,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::backup::$case(&*fixture).await;
            }
        )*
    };
}
