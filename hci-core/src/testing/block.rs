//! Conformance suite for [`BlockDevice`].
//!
//! Every case is a public async function taking the device under test; a backend
//! crate runs them with one `#[test]` per case through
//! [`block_device_conformance!`](crate::block_device_conformance):
//!
//! ```ignore
//! async fn make() -> Arc<dyn BlockDevice> { /* a fresh, empty, writable device */ }
//! hci_core::block_device_conformance!(make);
//! ```
//!
//! `make` is called once per case and returns anything that dereferences to a
//! fresh, empty (all-zero), writable device of at least [`MIN_SIZE`] bytes.

use futures::future::join_all;

use crate::block::{BLOCK_SIZE, BlockDevice, ExtentKind, WriteFlags, ZeroFlags};
use crate::error::Error;

/// The smallest device the suite accepts.
pub const MIN_SIZE: u64 = 16 << 20;

/// Names of every case, in the order [`block_device_suite`] runs them.
pub const BLOCK_DEVICE_CASES: &[&str] = &[
    "fresh_device_reads_zero",
    "aligned_write_read_round_trip",
    "unaligned_write_read_across_blocks",
    "overwrite_replaces_only_its_range",
    "out_of_range_is_refused",
    "zero_length_requests_succeed",
    "write_zeroes_reads_zero",
    "discard_reads_zero_when_supported",
    "block_status_is_well_formed",
    "flush_and_fua_keep_data",
    "concurrent_writes_all_land",
    "last_byte_is_writable",
    "large_io_round_trips",
];

/// A deterministic, position-dependent pattern (never all zero).
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i)
                .wrapping_mul(2654435761)
                .wrapping_add(u64::from(seed) * 97);
            (x >> 7) as u8 | 1
        })
        .collect()
}

async fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    dev.read_at(&mut buf, offset)
        .await
        .unwrap_or_else(|e| panic!("read of {len} bytes at {offset} failed: {e}"));
    buf
}

async fn write(dev: &dyn BlockDevice, offset: u64, data: &[u8]) {
    dev.write_at(data, offset, WriteFlags::default())
        .await
        .unwrap_or_else(|e| panic!("write of {} bytes at {offset} failed: {e}", data.len()));
}

fn check_device(dev: &dyn BlockDevice) {
    assert!(
        dev.size() >= MIN_SIZE,
        "the suite needs a device of at least {MIN_SIZE} bytes"
    );
    assert!(!dev.is_read_only(), "the suite needs a writable device");
}

/// A fresh device reads as zeroes everywhere.
pub async fn fresh_device_reads_zero(dev: &dyn BlockDevice) {
    check_device(dev);
    let size = dev.size();
    for off in [0, 4096, size / 2, size - 65536] {
        assert!(
            read(dev, off, 65536).await.iter().all(|&b| b == 0),
            "fresh data at {off}"
        );
    }
}

/// Aligned writes read back exactly.
pub async fn aligned_write_read_round_trip(dev: &dyn BlockDevice) {
    check_device(dev);
    for (off, len) in [(0u64, 4096usize), (8192, 65536), (1 << 20, 131072)] {
        let data = pattern(off, len, 1);
        write(dev, off, &data).await;
        assert_eq!(read(dev, off, len).await, data, "read-back at {off}");
    }
    assert!(
        read(dev, 4096, 4096).await.iter().all(|&b| b == 0),
        "gap between writes"
    );
}

/// Unaligned writes spanning block boundaries read back exactly, neighbours intact.
pub async fn unaligned_write_read_across_blocks(dev: &dyn BlockDevice) {
    check_device(dev);
    let off = 3 * BLOCK_SIZE - 100;
    let data = pattern(off, 9000, 2);
    write(dev, off, &data).await;
    assert_eq!(read(dev, off, 9000).await, data);
    let around = read(dev, off - 100, 9200).await;
    assert!(
        around[..100].iter().all(|&b| b == 0),
        "bytes before an unaligned write changed"
    );
    assert!(
        around[9100..].iter().all(|&b| b == 0),
        "bytes after an unaligned write changed"
    );
    let one = [0x5au8];
    write(dev, 7, &one).await;
    assert_eq!(read(dev, 0, 16).await[7], 0x5a);
}

/// Overwriting part of a range changes only that part.
pub async fn overwrite_replaces_only_its_range(dev: &dyn BlockDevice) {
    check_device(dev);
    let base = pattern(0, 16384, 3);
    write(dev, 0, &base).await;
    let patch = pattern(5000, 3000, 4);
    write(dev, 5000, &patch).await;
    let mut expect = base.clone();
    expect[5000..8000].copy_from_slice(&patch);
    assert_eq!(read(dev, 0, 16384).await, expect);
}

fn assert_out_of_range<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
    match r {
        Err(Error::OutOfRange { .. }) => {}
        other => panic!("{what}: expected OutOfRange, got {other:?}"),
    }
}

/// Requests past the end (or overflowing u64) fail with `OutOfRange`.
pub async fn out_of_range_is_refused(dev: &dyn BlockDevice) {
    check_device(dev);
    let size = dev.size();
    let mut buf = vec![0u8; 4096];
    assert_out_of_range("read past end", dev.read_at(&mut buf, size - 2048).await);
    assert_out_of_range("read at end", dev.read_at(&mut buf, size).await);
    assert_out_of_range("read overflow", dev.read_at(&mut buf, u64::MAX - 10).await);
    assert_out_of_range(
        "write past end",
        dev.write_at(&buf, size - 2048, WriteFlags::default()).await,
    );
    assert_out_of_range(
        "write overflow",
        dev.write_at(&buf, u64::MAX, WriteFlags::default()).await,
    );
    assert_out_of_range("discard past end", dev.discard(size - 4096, 8192).await);
    assert_out_of_range(
        "write_zeroes past end",
        dev.write_zeroes(size, 4096, ZeroFlags::default()).await,
    );
    assert_out_of_range("block_status past end", dev.block_status(size, 4096).await);
    assert!(
        read(dev, size - 4096, 4096).await.iter().all(|&b| b == 0),
        "a refused write landed"
    );
}

/// Zero-length reads and writes inside the device succeed and change nothing.
pub async fn zero_length_requests_succeed(dev: &dyn BlockDevice) {
    check_device(dev);
    dev.read_at(&mut [], 4096).await.expect("zero-length read");
    dev.write_at(&[], 4096, WriteFlags::default())
        .await
        .expect("zero-length write");
    assert!(read(dev, 0, 8192).await.iter().all(|&b| b == 0));
}

/// `write_zeroes`, with and without `no_hole`, makes exactly its range read as zero.
pub async fn write_zeroes_reads_zero(dev: &dyn BlockDevice) {
    check_device(dev);
    let data = pattern(0, 65536, 5);
    write(dev, 0, &data).await;
    dev.write_zeroes(4096, 8192, ZeroFlags::default())
        .await
        .expect("write_zeroes");
    dev.write_zeroes(
        20000,
        5000,
        ZeroFlags {
            fua: false,
            no_hole: true,
        },
    )
    .await
    .expect("write_zeroes no_hole (unaligned)");
    let mut expect = data.clone();
    expect[4096..12288].fill(0);
    expect[20000..25000].fill(0);
    assert_eq!(
        read(dev, 0, 65536).await,
        expect,
        "write_zeroes changed the wrong bytes"
    );
}

/// A discarded range reads as zero when the device advertises `discard`.
pub async fn discard_reads_zero_when_supported(dev: &dyn BlockDevice) {
    check_device(dev);
    let data = pattern(0, 65536, 6);
    write(dev, 0, &data).await;
    dev.discard(8192, 16384).await.expect("discard");
    let got = read(dev, 0, 65536).await;
    assert_eq!(
        got[..8192],
        data[..8192],
        "discard touched bytes before its range"
    );
    assert_eq!(
        got[24576..],
        data[24576..],
        "discard touched bytes after its range"
    );
    if dev.capabilities().discard {
        assert!(
            got[8192..24576].iter().all(|&b| b == 0),
            "discarded range is not zero"
        );
    }
}

/// Block status starts at the offset, is contiguous, and reports written data as data.
pub async fn block_status_is_well_formed(dev: &dyn BlockDevice) {
    check_device(dev);
    write(dev, 1 << 20, &pattern(1 << 20, 8192, 7)).await;
    for (off, len) in [
        (0u64, dev.size()),
        (1 << 20, 8192),
        ((1 << 20) + 4096, 1 << 20),
        (512, 4096),
    ] {
        let ext = dev.block_status(off, len).await.expect("block_status");
        assert!(
            !ext.is_empty(),
            "block_status({off}, {len}) returned nothing"
        );
        assert_eq!(
            ext[0].offset, off,
            "first extent must start at the requested offset"
        );
        let mut pos = off;
        for e in &ext {
            assert_eq!(e.offset, pos, "extents must be contiguous: {ext:?}");
            assert!(e.len > 0, "empty extent in {ext:?}");
            pos += e.len;
        }
        assert!(pos <= dev.size(), "extents run past the device");
        assert!(pos <= off + len || pos <= dev.size(), "extents overrun");
        for e in &ext {
            let lo = e.offset.max(1 << 20);
            let hi = e.end().min((1 << 20) + 8192);
            if lo < hi {
                assert_eq!(
                    e.kind,
                    ExtentKind::Data,
                    "written data reported as {:?}",
                    e.kind
                );
            }
        }
    }
}

/// Flush and FUA writes succeed and keep the data.
pub async fn flush_and_fua_keep_data(dev: &dyn BlockDevice) {
    check_device(dev);
    let a = pattern(0, 8192, 8);
    write(dev, 0, &a).await;
    dev.flush().await.expect("flush");
    let b = pattern(65536, 4096, 9);
    dev.write_at(&b, 65536, WriteFlags::FUA)
        .await
        .expect("FUA write");
    dev.write_zeroes(
        0,
        4096,
        ZeroFlags {
            fua: true,
            no_hole: false,
        },
    )
    .await
    .expect("FUA zero");
    dev.flush().await.expect("second flush");
    assert!(read(dev, 0, 4096).await.iter().all(|&b| b == 0));
    assert_eq!(read(dev, 4096, 4096).await, a[4096..]);
    assert_eq!(read(dev, 65536, 4096).await, b);
}

/// Many concurrent non-overlapping writes all land.
pub async fn concurrent_writes_all_land(dev: &dyn BlockDevice) {
    check_device(dev);
    let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| (i * 3 * BLOCK_SIZE + 512, pattern(i, 5000, i as u8)))
        .collect();
    join_all(
        writes
            .iter()
            .map(|(off, data)| dev.write_at(data, *off, WriteFlags::default())),
    )
    .await
    .into_iter()
    .for_each(|r| r.expect("concurrent write"));
    let reads = join_all(writes.iter().map(|(off, d)| read(dev, *off, d.len()))).await;
    for ((off, data), got) in writes.iter().zip(reads) {
        assert_eq!(&got, data, "concurrent write at {off} lost or torn");
    }
}

/// The very last byte can be written and read.
pub async fn last_byte_is_writable(dev: &dyn BlockDevice) {
    check_device(dev);
    let size = dev.size();
    write(dev, size - 1, &[0xa5]).await;
    assert_eq!(read(dev, size - 4096, 4096).await[4095], 0xa5);
}

/// Multi-megabyte requests round-trip.
pub async fn large_io_round_trips(dev: &dyn BlockDevice) {
    check_device(dev);
    let data = pattern(4 << 20, 4 << 20, 10);
    write(dev, 4 << 20, &data).await;
    assert!(
        read(dev, 4 << 20, 4 << 20).await == data,
        "4 MiB read-back differs"
    );
}

/// Runs every case, each on a fresh device from `make`.
pub async fn block_device_suite<F, Fut, D>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = D>,
    D: std::ops::Deref,
    D::Target: BlockDevice + Sized,
{
    macro_rules! run {
        ($($case:ident),*) => { $( $case(&*make().await).await; )* };
    }
    run!(
        fresh_device_reads_zero,
        aligned_write_read_round_trip,
        unaligned_write_read_across_blocks,
        overwrite_replaces_only_its_range,
        out_of_range_is_refused,
        zero_length_requests_succeed,
        write_zeroes_reads_zero,
        discard_reads_zero_when_supported,
        block_status_is_well_formed,
        flush_and_fua_keep_data,
        concurrent_writes_all_land,
        last_byte_is_writable,
        large_io_round_trips
    );
}

/// Generates one `#[tokio::test]` per [`BlockDevice`] conformance case.
///
/// `$make` is an async function (or closure returning a future) producing a
/// fresh, empty, writable device of at least [`MIN_SIZE`] bytes, as anything
/// that dereferences to a `BlockDevice`.
#[macro_export]
macro_rules! block_device_conformance {
    ($make:expr) => {
        $crate::block_device_conformance!(@cases $make;
            fresh_device_reads_zero,
            aligned_write_read_round_trip,
            unaligned_write_read_across_blocks,
            overwrite_replaces_only_its_range,
            out_of_range_is_refused,
            zero_length_requests_succeed,
            write_zeroes_reads_zero,
            discard_reads_zero_when_supported,
            block_status_is_well_formed,
            flush_and_fua_keep_data,
            concurrent_writes_all_land,
            last_byte_is_writable,
            large_io_round_trips,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::block::$case(&*fixture).await;
            }
        )*
    };
}
