//! Conformance suite for [`VolumeBackend`].
//!
//! Run it with one `#[test]` per case through
//! [`volume_backend_conformance!`](crate::volume_backend_conformance):
//!
//! ```ignore
//! async fn make() -> MyFixture { /* a fresh, empty backend */ }
//! hci_core::volume_backend_conformance!(make);
//! ```
//!
//! `make` is called once per case and returns anything that dereferences to a
//! fresh backend with no volumes. Volumes are at most 16 MiB and thin: a backend
//! only needs room for the few blocks each case writes.

use std::future::Future;
use std::ops::Deref;

use crate::block::{BLOCK_SIZE, BlockDevice, ByteRange, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::testing::block::pattern;
use crate::volume::{CreateVolume, EncryptionKey, OpenVolume, VolumeBackend};

const MIB: u64 = 1 << 20;

/// Names of every case, in the order [`volume_backend_suite`] runs them.
pub const VOLUME_BACKEND_CASES: &[&str] = crate::volume_backend_conformance! {@with [@names]};

async fn open<B: VolumeBackend + ?Sized>(b: &B, name: &str) -> std::sync::Arc<dyn BlockDevice> {
    b.open(name, OpenVolume::default())
        .await
        .unwrap_or_else(|e| panic!("open {name}: {e}"))
}

async fn create<B: VolumeBackend + ?Sized>(b: &B, name: &str, size: u64) {
    b.create(name, CreateVolume::new(size))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

async fn put(dev: &dyn BlockDevice, block: u64, seed: u8) {
    let off = block * BLOCK_SIZE;
    dev.write_at(
        &pattern(off, BLOCK_SIZE as usize, seed),
        off,
        WriteFlags::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("write block {block}: {e}"));
}

async fn expect_block(dev: &dyn BlockDevice, block: u64, seed: Option<u8>, what: &str) {
    let off = block * BLOCK_SIZE;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    dev.read_at(&mut buf, off)
        .await
        .unwrap_or_else(|e| panic!("{what}: read block {block}: {e}"));
    match seed {
        Some(s) => assert!(
            buf == pattern(off, BLOCK_SIZE as usize, s),
            "{what}: block {block} should hold pattern {s}"
        ),
        None => assert!(
            buf.iter().all(|&b| b == 0),
            "{what}: block {block} should be zero"
        ),
    }
}

async fn snap<B: VolumeBackend + ?Sized>(b: &B, name: &str, s: &str) {
    b.snapshot(name, s)
        .await
        .unwrap_or_else(|e| panic!("snapshot {name}@{s}: {e}"));
}

async fn open_snap<B: VolumeBackend + ?Sized>(
    b: &B,
    name: &str,
    s: &str,
) -> std::sync::Arc<dyn BlockDevice> {
    b.open_snapshot(name, s, OpenVolume::default())
        .await
        .unwrap_or_else(|e| panic!("open snapshot {name}@{s}: {e}"))
}

fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T, Error>, ok: fn(&Error) -> bool) {
    match r {
        Err(e) if ok(&e) => {}
        other => panic!("{what}: unexpected result {other:?}"),
    }
}

/// The basic life cycle.
pub async fn create_open_info_list_delete<B: VolumeBackend + ?Sized>(b: &B) {
    let info = b
        .create("vol-b", CreateVolume::new(16 * MIB))
        .await
        .expect("create");
    assert_eq!(
        (info.name.as_str(), info.size, info.snapshots),
        ("vol-b", 16 * MIB, 0)
    );
    assert!(!info.encrypted);
    create(b, "vol-a", 8 * MIB).await;
    let dev = open(b, "vol-a").await;
    assert_eq!(dev.size(), 8 * MIB);
    put(&*dev, 3, 1).await;
    dev.flush().await.expect("flush");
    let info = b.info("vol-a").await.expect("info");
    assert!(
        info.allocated >= BLOCK_SIZE,
        "allocated {} after a write",
        info.allocated
    );
    assert!(
        info.allocated < 8 * MIB,
        "a thin volume allocated {}",
        info.allocated
    );
    let names: Vec<String> = b
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["vol-a", "vol-b"], "list must be sorted by name");
    snap(b, "vol-a", "s").await;
    drop(dev);
    b.delete("vol-a").await.expect("delete");
    assert!(
        b.info("vol-a").await.is_err_and(|e| e.is_not_found()),
        "info of a deleted volume must be NotFound"
    );
    assert_eq!(b.list().await.expect("list").len(), 1);
    // Deleting a volume deletes its snapshots: a new volume of the same name starts empty.
    create(b, "vol-a", 8 * MIB).await;
    assert!(
        b.list_snapshots("vol-a")
            .await
            .expect("list_snapshots")
            .is_empty(),
        "a re-created volume inherited snapshots"
    );
    expect_block(&*open(b, "vol-a").await, 3, None, "a re-created volume").await;
}

/// Creating an existing name fails and leaves the volume intact.
pub async fn duplicate_create_is_refused<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "dup", 4 * MIB).await;
    let dev = open(b, "dup").await;
    put(&*dev, 0, 2).await;
    drop(dev);
    expect_err(
        "second create",
        b.create("dup", CreateVolume::new(8 * MIB)).await,
        |e| matches!(e, Error::AlreadyExists { .. }),
    );
    let dev = open(b, "dup").await;
    assert_eq!(dev.size(), 4 * MIB);
    expect_block(&*dev, 0, Some(2), "after a refused create").await;
}

/// Every operation on a missing volume is `NotFound`.
pub async fn missing_volume_is_not_found<B: VolumeBackend + ?Sized>(b: &B) {
    let nf = |e: &Error| e.is_not_found();
    expect_err("open", b.open("ghost", OpenVolume::default()).await, nf);
    expect_err("info", b.info("ghost").await, nf);
    expect_err("delete", b.delete("ghost").await, nf);
    expect_err("snapshot", b.snapshot("ghost", "s").await, nf);
    expect_err("list_snapshots", b.list_snapshots("ghost").await, nf);
    expect_err("revert", b.revert("ghost", "s").await, nf);
    expect_err("expand", b.expand("ghost", 8 * MIB).await, nf);
    expect_err("clone", b.clone_snapshot("ghost", "s", "new").await, nf);
    expect_err(
        "open_snapshot",
        b.open_snapshot("ghost", "s", OpenVolume::default()).await,
        nf,
    );
    expect_err("delete_snapshot", b.delete_snapshot("ghost", "s").await, nf);
    expect_err(
        "changed_blocks",
        b.changed_blocks("ghost", None, "s").await,
        nf,
    );
    assert!(
        b.list().await.expect("list").is_empty(),
        "operations on a missing volume created one"
    );
}

/// Bad names and sizes are refused with `Invalid`.
pub async fn invalid_names_and_sizes_are_refused<B: VolumeBackend + ?Sized>(b: &B) {
    let inv = |e: &Error| matches!(e, Error::Invalid { .. });
    let long = "x".repeat(256);
    let bad = ["", "a/b", "/abs", "..", ".", "nul\0", long.as_str()];
    for name in bad {
        expect_err(
            &format!("create {name:?}"),
            b.create(name, CreateVolume::new(MIB)).await,
            inv,
        );
    }
    expect_err("size 0", b.create("zero", CreateVolume::new(0)).await, inv);
    expect_err(
        "size 1000",
        b.create("odd", CreateVolume::new(1000)).await,
        inv,
    );
    create(b, "ok", MIB).await;
    for name in bad {
        expect_err(
            &format!("snapshot {name:?}"),
            b.snapshot("ok", name).await,
            inv,
        );
    }
    snap(b, "ok", "s").await;
    for name in bad {
        expect_err(
            &format!("clone to {name:?}"),
            b.clone_snapshot("ok", "s", name).await,
            inv,
        );
    }
    let longest = "y".repeat(255);
    create(b, &longest, MIB).await;
    let names: Vec<String> = b
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        names,
        ["ok".to_string(), longest],
        "a refused create left something (or a 255-byte name was refused)"
    );
    assert_eq!(
        b.list_snapshots("ok").await.expect("list_snapshots").len(),
        1,
        "a refused snapshot left something"
    );
}

/// A snapshot keeps the content it was taken with while the head changes.
pub async fn snapshot_freezes_content<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 8 * MIB).await;
    let dev = open(b, "v").await;
    put(&*dev, 1, 1).await;
    put(&*dev, 2, 1).await;
    let info = b.snapshot("v", "s1").await.expect("snapshot");
    assert_eq!((info.name.as_str(), info.size), ("s1", 8 * MIB));
    put(&*dev, 2, 2).await;
    put(&*dev, 3, 2).await;
    let s1 = open_snap(b, "v", "s1").await;
    expect_block(&*s1, 1, Some(1), "s1").await;
    expect_block(&*s1, 2, Some(1), "s1").await;
    expect_block(&*s1, 3, None, "s1").await;
    expect_block(&*dev, 2, Some(2), "head").await;
    expect_block(&*dev, 3, Some(2), "head").await;
    let snaps = b.list_snapshots("v").await.expect("list_snapshots");
    assert_eq!(snaps.len(), 1);
    assert_eq!(b.info("v").await.expect("info").snapshots, 1);
}

/// Snapshots are read-only.
pub async fn snapshots_open_read_only<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    snap(b, "v", "s").await;
    let s = open_snap(b, "v", "s").await;
    assert!(s.is_read_only());
    expect_err(
        "write to a snapshot",
        s.write_at(&[1; 512], 0, WriteFlags::default()).await,
        |e| matches!(e, Error::ReadOnly { .. }),
    );
    let ro = b
        .open(
            "v",
            OpenVolume {
                read_only: true,
                encryption_key: None,
            },
        )
        .await
        .expect("open read-only");
    assert!(
        ro.write_at(&[1; 512], 0, WriteFlags::default())
            .await
            .is_err()
    );
}

/// Snapshot names are unique; missing ones are `NotFound`.
pub async fn duplicate_or_missing_snapshot_is_refused<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    snap(b, "v", "s").await;
    expect_err("duplicate snapshot", b.snapshot("v", "s").await, |e| {
        matches!(e, Error::AlreadyExists { .. })
    });
    let nf = |e: &Error| e.is_not_found();
    expect_err(
        "open",
        b.open_snapshot("v", "nope", OpenVolume::default()).await,
        nf,
    );
    expect_err("delete", b.delete_snapshot("v", "nope").await, nf);
    expect_err("revert", b.revert("v", "nope").await, nf);
    expect_err("clone", b.clone_snapshot("v", "nope", "c").await, nf);
    expect_err(
        "changed_blocks",
        b.changed_blocks("v", None, "nope").await,
        nf,
    );
}

/// Deleting a middle snapshot changes neither the head nor the other snapshots.
pub async fn delete_middle_snapshot_keeps_every_view<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 8 * MIB).await;
    let dev = open(b, "v").await;
    put(&*dev, 0, 1).await;
    put(&*dev, 1, 1).await;
    snap(b, "v", "s1").await;
    put(&*dev, 1, 2).await;
    put(&*dev, 2, 2).await;
    snap(b, "v", "s2").await;
    put(&*dev, 2, 3).await;
    put(&*dev, 3, 3).await;
    snap(b, "v", "s3").await;
    put(&*dev, 4, 4).await;
    b.delete_snapshot("v", "s2").await.expect("delete s2");
    let names: Vec<String> = b
        .list_snapshots("v")
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s3"]);
    let s1 = open_snap(b, "v", "s1").await;
    for (blk, want) in [(0, Some(1)), (1, Some(1)), (2, None), (3, None)] {
        expect_block(&*s1, blk, want, "s1 after deleting s2").await;
    }
    let s3 = open_snap(b, "v", "s3").await;
    for (blk, want) in [
        (0, Some(1)),
        (1, Some(2)),
        (2, Some(3)),
        (3, Some(3)),
        (4, None),
    ] {
        expect_block(&*s3, blk, want, "s3 after deleting s2").await;
    }
    for (blk, want) in [
        (0, Some(1)),
        (1, Some(2)),
        (2, Some(3)),
        (3, Some(3)),
        (4, Some(4)),
    ] {
        expect_block(&*dev, blk, want, "head after deleting s2").await;
    }
    b.delete_snapshot("v", "s1").await.expect("delete oldest");
    b.delete_snapshot("v", "s3").await.expect("delete newest");
    for (blk, want) in [
        (0, Some(1)),
        (1, Some(2)),
        (2, Some(3)),
        (3, Some(3)),
        (4, Some(4)),
    ] {
        expect_block(&*dev, blk, want, "head after deleting every snapshot").await;
    }
    let fresh = open(b, "v").await;
    expect_block(&*fresh, 1, Some(2), "a new handle").await;
}

/// An open handle keeps working through snapshot, delete-snapshot and expand.
pub async fn io_continues_across_snapshot_operations<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    let dev = open(b, "v").await;
    put(&*dev, 0, 1).await;
    snap(b, "v", "a").await;
    put(&*dev, 1, 2).await;
    snap(b, "v", "b").await;
    b.delete_snapshot("v", "a").await.expect("delete a");
    put(&*dev, 2, 3).await;
    b.expand("v", 8 * MIB).await.expect("expand");
    put(&*dev, 3, 4).await;
    dev.flush().await.expect("flush");
    let fresh = open(b, "v").await;
    for (blk, seed) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
        expect_block(&*dev, blk, Some(seed), "old handle").await;
        expect_block(&*fresh, blk, Some(seed), "new handle").await;
    }
}

/// Revert makes the volume read as the snapshot again; newer snapshots stay.
pub async fn revert_restores_the_snapshot<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    let dev = open(b, "v").await;
    put(&*dev, 0, 1).await;
    snap(b, "v", "s1").await;
    put(&*dev, 0, 2).await;
    put(&*dev, 1, 2).await;
    snap(b, "v", "s2").await;
    put(&*dev, 2, 3).await;
    drop(dev);
    b.revert("v", "s1").await.expect("revert");
    let dev = open(b, "v").await;
    expect_block(&*dev, 0, Some(1), "after revert").await;
    expect_block(&*dev, 1, None, "after revert").await;
    expect_block(&*dev, 2, None, "after revert").await;
    let s2 = open_snap(b, "v", "s2").await;
    expect_block(&*s2, 1, Some(2), "newer snapshot after revert").await;
    put(&*dev, 3, 5).await;
    expect_block(&*dev, 3, Some(5), "write after revert").await;
}

/// A clone has the snapshot's content and evolves independently.
pub async fn clone_is_independent_of_its_source<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "src", 4 * MIB).await;
    let dev = open(b, "src").await;
    put(&*dev, 0, 1).await;
    snap(b, "src", "s").await;
    put(&*dev, 0, 2).await;
    let info = b.clone_snapshot("src", "s", "copy").await.expect("clone");
    assert_eq!((info.name.as_str(), info.size), ("copy", 4 * MIB));
    expect_err(
        "clone onto an existing name",
        b.clone_snapshot("src", "s", "copy").await,
        |e| matches!(e, Error::AlreadyExists { .. }),
    );
    let c = open(b, "copy").await;
    expect_block(&*c, 0, Some(1), "clone").await;
    put(&*c, 1, 3).await;
    expect_block(&*dev, 1, None, "source after writing the clone").await;
    b.delete_snapshot("src", "s")
        .await
        .expect("delete the cloned snapshot");
    b.delete("src").await.expect("delete source");
    expect_block(&*c, 0, Some(1), "clone after deleting its source").await;
}

/// Expand keeps data, new space reads zero, shrinking is refused.
pub async fn expand_keeps_data_and_zeroes_new_space<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    let dev = open(b, "v").await;
    put(&*dev, 5, 1).await;
    let info = b.expand("v", 12 * MIB).await.expect("expand");
    assert_eq!(info.size, 12 * MIB);
    let dev = open(b, "v").await;
    assert_eq!(dev.size(), 12 * MIB);
    expect_block(&*dev, 5, Some(1), "after expand").await;
    expect_block(&*dev, (8 * MIB) / BLOCK_SIZE, None, "new space").await;
    put(&*dev, (12 * MIB) / BLOCK_SIZE - 1, 2).await;
    expect_err("shrink", b.expand("v", 4 * MIB).await, |e| {
        matches!(e, Error::Invalid { .. })
    });
    assert_eq!(b.info("v").await.expect("info").size, 12 * MIB);
}

/// Changed blocks between snapshots are exactly the written 4 KiB blocks.
pub async fn changed_blocks_are_exact_at_4k<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 16 * MIB).await;
    let dev = open(b, "v").await;
    for blk in [0, 1, 2, 100] {
        put(&*dev, blk, 1).await;
    }
    snap(b, "v", "s1").await;
    for blk in [3, 10, 11, 1000, 2] {
        put(&*dev, blk, 2).await;
    }
    // Zeroing a block is a change too (whether or not the backend punches a hole).
    dev.write_zeroes(100 * BLOCK_SIZE, BLOCK_SIZE, ZeroFlags::default())
        .await
        .expect("write_zeroes block 100");
    snap(b, "v", "s2").await;
    put(&*dev, 50, 3).await;
    snap(b, "v", "s3").await;
    let r = |a: u64, n: u64| ByteRange::new(a * BLOCK_SIZE, n * BLOCK_SIZE);
    let full = b
        .changed_blocks("v", None, "s1")
        .await
        .expect("changed_blocks(None, s1)");
    assert_eq!(
        full,
        vec![r(0, 3), r(100, 1)],
        "everything allocated up to s1"
    );
    let d = b
        .changed_blocks("v", Some("s1"), "s2")
        .await
        .expect("changed_blocks(s1, s2)");
    assert_eq!(
        d,
        vec![r(2, 2), r(10, 2), r(100, 1), r(1000, 1)],
        "blocks changed between s1 and s2 (written, or zeroed)"
    );
    let full = b
        .changed_blocks("v", None, "s2")
        .await
        .expect("changed_blocks(None, s2)");
    for blk in [0, 1, 2, 3, 10, 11, 1000] {
        assert!(
            full.iter()
                .any(|x| x.offset <= blk * BLOCK_SIZE && (blk + 1) * BLOCK_SIZE <= x.end()),
            "changed_blocks(None, s2) misses written block {blk}: {full:?}"
        );
    }
    let d = b
        .changed_blocks("v", Some("s1"), "s3")
        .await
        .expect("changed_blocks(s1, s3)");
    assert_eq!(
        d,
        vec![r(2, 2), r(10, 2), r(50, 1), r(100, 1), r(1000, 1)],
        "s1 → s3 spans two layers"
    );
    b.delete_snapshot("v", "s2").await.expect("delete s2");
    let d = b
        .changed_blocks("v", Some("s1"), "s3")
        .await
        .expect("after deleting s2");
    assert_eq!(
        d,
        vec![r(2, 2), r(10, 2), r(50, 1), r(100, 1), r(1000, 1)],
        "deleting the snapshot between s1 and s3 lost change tracking"
    );
}

/// Every metadata change bumps the revision.
pub async fn revision_increases_on_metadata_changes<B: VolumeBackend + ?Sized>(b: &B) {
    create(b, "v", 4 * MIB).await;
    let mut last = b.info("v").await.expect("info").revision;
    let mut check = |what: &str, rev: u64| {
        assert!(
            rev > last,
            "revision did not increase after {what}: {rev} <= {last}"
        );
        last = rev;
    };
    snap(b, "v", "s1").await;
    check("snapshot", b.info("v").await.expect("info").revision);
    snap(b, "v", "s2").await;
    b.delete_snapshot("v", "s2").await.expect("delete snapshot");
    check("delete snapshot", b.info("v").await.expect("info").revision);
    b.revert("v", "s1").await.expect("revert");
    check("revert", b.info("v").await.expect("info").revision);
    b.expand("v", 8 * MIB).await.expect("expand");
    check("expand", b.info("v").await.expect("info").revision);
}

/// An encrypted volume opens only with its key, and a missing or wrong key is
/// `Invalid` or `Corrupt`, never garbage. A backend may instead refuse to create
/// encrypted volumes with `Unsupported` (creating nothing); the case then prints
/// `SKIPPED` (shown with `--nocapture`) and checks only that.
pub async fn encrypted_volume_needs_the_right_key<B: VolumeBackend + ?Sized>(b: &B) {
    let key = EncryptionKey::new(vec![7u8; 64]);
    let params = CreateVolume {
        size: 4 * MIB,
        encryption_key: Some(key.clone()),
    };
    match b.create("secret", params).await {
        Err(Error::Unsupported { .. }) => {
            // Refusing encryption is conformant; leaving a half-made volume is not.
            assert!(
                b.info("secret").await.is_err_and(|e| e.is_not_found()),
                "a refused encrypted create left a volume behind"
            );
            eprintln!("SKIPPED encrypted_volume_needs_the_right_key: encryption is unsupported");
            return;
        }
        Err(e) => panic!("create encrypted: {e}"),
        Ok(info) => assert!(info.encrypted, "info must say the volume is encrypted"),
    }
    let with = |k: Option<EncryptionKey>| OpenVolume {
        read_only: false,
        encryption_key: k,
    };
    let dev = b
        .open("secret", with(Some(key.clone())))
        .await
        .expect("open with the key");
    put(&*dev, 1, 9).await;
    dev.flush().await.expect("flush");
    drop(dev);
    let refused = |e: &Error| matches!(e, Error::Invalid { .. } | Error::Corrupt { .. });
    expect_err(
        "open an encrypted volume without a key (must be Invalid or Corrupt)",
        b.open("secret", with(None)).await,
        refused,
    );
    let wrong = EncryptionKey::new(vec![8u8; 64]);
    expect_err(
        "open with a wrong key (must be Invalid or Corrupt)",
        b.open("secret", with(Some(wrong.clone()))).await,
        refused,
    );
    snap(b, "secret", "s").await;
    expect_err(
        "open a snapshot with a wrong key (must be Invalid or Corrupt)",
        b.open_snapshot("secret", "s", with(Some(wrong))).await,
        refused,
    );
    let dev = b
        .open("secret", with(Some(key)))
        .await
        .expect("reopen with the key");
    expect_block(&*dev, 1, Some(9), "encrypted round trip").await;
    expect_block(&*dev, 2, None, "unwritten block of an encrypted volume").await;
}

/// Runs every case, each on a fresh backend from `make`.
pub async fn volume_backend_suite<F, Fut, T>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Deref,
    T::Target: VolumeBackend,
{
    crate::volume_backend_conformance! {@with [@suite make]}
}

/// Generates one `#[tokio::test]` per [`VolumeBackend`] conformance case.
///
/// `$make` is an async function (or a closure returning a future), called once
/// per case, producing anything that dereferences to a fresh backend with no
/// volumes: `Fn() -> impl Future<Output = T>` with `T: Deref<Target: VolumeBackend>`.
///
/// This macro holds the one list of cases; [`VOLUME_BACKEND_CASES`] and
/// [`volume_backend_suite`] are generated from it through the internal `@` arms.
#[macro_export]
macro_rules! volume_backend_conformance {
    ($make:expr) => {
        $crate::volume_backend_conformance! {@with [@tests $make]}
    };
    (@with [$($how:tt)*]) => {
        $crate::volume_backend_conformance! {$($how)*;
            create_open_info_list_delete,
            duplicate_create_is_refused,
            missing_volume_is_not_found,
            invalid_names_and_sizes_are_refused,
            snapshot_freezes_content,
            snapshots_open_read_only,
            duplicate_or_missing_snapshot_is_refused,
            delete_middle_snapshot_keeps_every_view,
            io_continues_across_snapshot_operations,
            revert_restores_the_snapshot,
            clone_is_independent_of_its_source,
            expand_keeps_data_and_zeroes_new_space,
            changed_blocks_are_exact_at_4k,
            revision_increases_on_metadata_changes,
            encrypted_volume_needs_the_right_key,
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@suite $make:expr; $($case:ident),* $(,)?) => {
        $( $crate::testing::volume::$case(&*($make)().await).await; )*
    };
    (@tests $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::volume::$case(&*fixture).await;
            }
        )*
    };
}
