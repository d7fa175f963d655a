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
//!
//! Read-only devices (snapshots, read-only exports) have their own, shorter
//! suite: [`read_only_block_device_conformance!`](crate::read_only_block_device_conformance).

use std::future::Future;
use std::ops::Deref;

use futures::future::join_all;

use crate::block::{BLOCK_SIZE, BlockDevice, Extent, ExtentKind, WriteFlags, ZeroFlags};
use crate::error::Error;

/// The smallest device the suite accepts.
pub const MIN_SIZE: u64 = 16 << 20;

/// Names of every case, in the order [`block_device_suite`] runs them.
pub const BLOCK_DEVICE_CASES: &[&str] = crate::block_device_conformance! {@with [@names]};

/// Names of every read-only case, in the order [`read_only_block_device_suite`] runs them.
pub const READ_ONLY_BLOCK_DEVICE_CASES: &[&str] =
    crate::read_only_block_device_conformance! {@with [@names]};

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

async fn read<D: BlockDevice + ?Sized>(dev: &D, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    dev.read_at(&mut buf, offset)
        .await
        .unwrap_or_else(|e| panic!("read of {len} bytes at {offset} failed: {e}"));
    buf
}

async fn write<D: BlockDevice + ?Sized>(dev: &D, offset: u64, data: &[u8]) {
    dev.write_at(data, offset, WriteFlags::default())
        .await
        .unwrap_or_else(|e| panic!("write of {} bytes at {offset} failed: {e}", data.len()));
}

fn all_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}

fn check_device<D: BlockDevice + ?Sized>(dev: &D) {
    assert!(
        dev.size() >= MIN_SIZE,
        "the suite needs a device of at least {MIN_SIZE} bytes, got {}",
        dev.size()
    );
    assert!(!dev.is_read_only(), "the suite needs a writable device");
}

/// Checks the shape `block_status` promises: non-empty, starting at `offset`,
/// contiguous, no empty extent, inside the device.
fn check_extents(ext: &[Extent], offset: u64, len: u64, size: u64) {
    assert!(
        !ext.is_empty(),
        "block_status({offset}, {len}) returned no extent"
    );
    let mut pos = offset;
    for e in ext {
        assert_eq!(
            e.offset, pos,
            "block_status({offset}, {len}): extents must start at the offset and be contiguous: {ext:?}"
        );
        assert!(
            e.len > 0,
            "block_status({offset}, {len}): empty extent in {ext:?}"
        );
        pos = e
            .offset
            .checked_add(e.len)
            .unwrap_or_else(|| panic!("extent {e:?} overflows u64"));
    }
    assert!(
        pos <= size,
        "block_status({offset}, {len}) describes bytes past the device end ({size}): {ext:?}"
    );
}

/// A fresh device reads as zeroes everywhere.
pub async fn fresh_device_reads_zero<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let size = dev.size();
    for off in [0, 4096, size / 2, size - 65536] {
        assert!(
            all_zero(&read(dev, off, 65536).await),
            "a fresh device must read as zeroes (64 KiB at {off})"
        );
    }
}

/// Aligned writes read back exactly.
pub async fn aligned_write_read_round_trip<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    for (off, len) in [(0u64, 4096usize), (8192, 65536), (1 << 20, 131072)] {
        let data = pattern(off, len, 1);
        write(dev, off, &data).await;
        assert!(
            read(dev, off, len).await == data,
            "an aligned write of {len} bytes at {off} did not read back"
        );
    }
    assert!(
        all_zero(&read(dev, 4096, 4096).await),
        "an unwritten block between two writes is not zero"
    );
}

/// Unaligned writes spanning block boundaries read back exactly, neighbours intact.
pub async fn unaligned_write_read_across_blocks<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let off = 3 * BLOCK_SIZE - 100;
    let data = pattern(off, 9000, 2);
    write(dev, off, &data).await;
    assert!(
        read(dev, off, 9000).await == data,
        "an unaligned write across three blocks did not read back"
    );
    let around = read(dev, off - 100, 9200).await;
    assert!(
        all_zero(&around[..100]),
        "bytes before an unaligned write changed"
    );
    assert!(
        all_zero(&around[9100..]),
        "bytes after an unaligned write changed"
    );
    write(dev, 7, &[0x5a]).await;
    let head = read(dev, 0, 16).await;
    assert_eq!(head[7], 0x5a, "a one-byte write did not land");
    assert!(
        all_zero(&head[..7]) && all_zero(&head[8..]),
        "a one-byte write changed its neighbours"
    );
    let odd = read(dev, off + 1, 4097).await;
    assert!(
        odd[..] == data[1..4098],
        "an unaligned read inside written data is wrong"
    );
}

/// Overwriting part of a range changes only that part.
pub async fn overwrite_replaces_only_its_range<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let base = pattern(0, 16384, 3);
    write(dev, 0, &base).await;
    let patch = pattern(5000, 3000, 4);
    write(dev, 5000, &patch).await;
    let mut expect = base.clone();
    expect[5000..8000].copy_from_slice(&patch);
    assert!(
        read(dev, 0, 16384).await == expect,
        "a partial overwrite changed bytes outside 5000..8000 or missed some"
    );
}

fn assert_out_of_range<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
    match r {
        Err(Error::OutOfRange { .. }) => {}
        other => panic!("{what}: expected OutOfRange, got {other:?}"),
    }
}

/// Requests past the end (or overflowing u64) fail with `OutOfRange`.
pub async fn out_of_range_is_refused<D: BlockDevice + ?Sized>(dev: &D) {
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
    assert_out_of_range("discard overflow", dev.discard(4096, u64::MAX).await);
    assert_out_of_range(
        "write_zeroes past end",
        dev.write_zeroes(size, 4096, ZeroFlags::default()).await,
    );
    assert_out_of_range(
        "write_zeroes overflow",
        dev.write_zeroes(u64::MAX - 1, 4096, ZeroFlags::default())
            .await,
    );
    assert_out_of_range("block_status past end", dev.block_status(size, 4096).await);
    assert_out_of_range(
        "block_status overflow",
        dev.block_status(4096, u64::MAX).await,
    );
    assert!(
        all_zero(&read(dev, size - 4096, 4096).await),
        "a refused write changed the last block"
    );
}

/// Zero-length requests inside the device (and at its very end) succeed and change nothing.
pub async fn zero_length_requests_succeed<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let size = dev.size();
    for off in [4096, size] {
        dev.read_at(&mut [], off)
            .await
            .unwrap_or_else(|e| panic!("zero-length read at {off}: {e}"));
        dev.write_at(&[], off, WriteFlags::default())
            .await
            .unwrap_or_else(|e| panic!("zero-length write at {off}: {e}"));
        dev.discard(off, 0)
            .await
            .unwrap_or_else(|e| panic!("zero-length discard at {off}: {e}"));
        dev.write_zeroes(off, 0, ZeroFlags::default())
            .await
            .unwrap_or_else(|e| panic!("zero-length write_zeroes at {off}: {e}"));
    }
    assert!(
        all_zero(&read(dev, 0, 8192).await),
        "a zero-length request changed data"
    );
}

/// `write_zeroes`, with and without `no_hole`, makes exactly its range read as zero.
pub async fn write_zeroes_reads_zero<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let data = pattern(0, 65536, 5);
    write(dev, 0, &data).await;
    dev.write_zeroes(4096, 8192, ZeroFlags::default())
        .await
        .expect("write_zeroes (aligned, may punch a hole)");
    dev.write_zeroes(
        20000,
        5000,
        ZeroFlags {
            fua: false,
            no_hole: true,
        },
    )
    .await
    .expect("write_zeroes with no_hole (unaligned)");
    dev.write_zeroes(40000, 100, ZeroFlags::default())
        .await
        .expect("write_zeroes (inside one block)");
    let mut expect = data.clone();
    expect[4096..12288].fill(0);
    expect[20000..25000].fill(0);
    expect[40000..40100].fill(0);
    assert!(
        read(dev, 0, 65536).await == expect,
        "write_zeroes changed the wrong bytes (or left some non-zero)"
    );
    // Zeroing never-written space is fine too.
    dev.write_zeroes(8 << 20, 1 << 20, ZeroFlags::default())
        .await
        .expect("write_zeroes over unwritten space");
    assert!(
        all_zero(&read(dev, 8 << 20, 1 << 20).await),
        "zeroed unwritten space is not zero"
    );
}

/// A discarded range reads as zero when the device advertises `discard`, and
/// discard never touches bytes outside its range.
pub async fn discard_reads_zero_when_supported<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let data = pattern(0, 65536, 6);
    write(dev, 0, &data).await;
    dev.discard(8192, 16384).await.expect("aligned discard");
    dev.discard(30000, 1000).await.expect("unaligned discard");
    let got = read(dev, 0, 65536).await;
    assert!(
        got[..8192] == data[..8192],
        "discard touched bytes before its range"
    );
    assert!(
        got[24576..30000] == data[24576..30000] && got[31000..] == data[31000..],
        "discard touched bytes after its range"
    );
    if dev.capabilities().discard {
        assert!(
            all_zero(&got[8192..24576]) && all_zero(&got[30000..31000]),
            "the device advertises discard but a discarded range is not zero"
        );
    }
}

/// Block status starts at the offset, is contiguous, reports written data as
/// `Data` (never as a hole), and zeroed ranges as something that reads as zero
/// or as `Data`.
pub async fn block_status_is_well_formed<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let size = dev.size();
    let written = (1u64 << 20, 8192u64);
    write(dev, written.0, &pattern(written.0, written.1 as usize, 7)).await;
    for (off, len) in [
        (0u64, size),
        (written.0, written.1),
        (written.0 + 4096, 1 << 20),
        (written.0 - 512, 1024),
        (512, 4096),
        (size - 1, 1),
    ] {
        let ext = dev
            .block_status(off, len)
            .await
            .unwrap_or_else(|e| panic!("block_status({off}, {len}): {e}"));
        check_extents(&ext, off, len, size);
        for e in &ext {
            let lo = e.offset.max(written.0);
            let hi = e.end().min(written.0 + written.1);
            if lo < hi {
                assert_eq!(
                    e.kind,
                    ExtentKind::Data,
                    "block_status({off}, {len}) reports written data at {lo}..{hi} as {:?}",
                    e.kind
                );
            }
        }
    }
    if dev.capabilities().block_status {
        let ext = dev
            .block_status(8 << 20, 1 << 20)
            .await
            .expect("block_status of unwritten space");
        check_extents(&ext, 8 << 20, 1 << 20, size);
        assert!(
            ext.iter().all(|e| e.kind.reads_zero()),
            "the device reports real allocation but calls never-written space data: {ext:?}"
        );
    }
}

/// Flush and FUA writes succeed and keep the data.
pub async fn flush_and_fua_keep_data<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    dev.flush().await.expect("flush of a clean device");
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
    .expect("FUA write_zeroes");
    dev.flush().await.expect("second flush");
    assert!(all_zero(&read(dev, 0, 4096).await), "FUA write_zeroes lost");
    assert!(
        read(dev, 4096, 4096).await == a[4096..],
        "flushed data changed"
    );
    assert!(read(dev, 65536, 4096).await == b, "FUA write lost");
}

/// Many concurrent non-overlapping writes all land, untorn.
pub async fn concurrent_writes_all_land<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    // 5000-byte writes 12 KiB apart: each shares blocks with nothing else, but
    // every one is unaligned, and pairs of writes share no block boundary.
    let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| (i * 3 * BLOCK_SIZE + 512, pattern(i, 5000, i as u8)))
        .collect();
    for r in join_all(
        writes
            .iter()
            .map(|(off, data)| dev.write_at(data, *off, WriteFlags::default())),
    )
    .await
    {
        r.expect("concurrent write");
    }
    // Adjacent writes sharing a block (byte-granular neighbours) also must not clobber each other.
    let base = 4 << 20;
    let packed: Vec<(u64, Vec<u8>)> = (0..32u64)
        .map(|i| (base + i * 1000, pattern(i, 1000, 100 + i as u8)))
        .collect();
    for r in join_all(
        packed
            .iter()
            .map(|(off, data)| dev.write_at(data, *off, WriteFlags::default())),
    )
    .await
    {
        r.expect("concurrent write sharing a block");
    }
    let reads = join_all(
        writes
            .iter()
            .chain(&packed)
            .map(|(off, d)| read(dev, *off, d.len())),
    )
    .await;
    for ((off, data), got) in writes.iter().chain(&packed).zip(reads) {
        assert!(&got == data, "a concurrent write at {off} was lost or torn");
    }
}

/// The very last byte can be written and read.
pub async fn last_byte_is_writable<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let size = dev.size();
    write(dev, size - 1, &[0xa5]).await;
    let tail = read(dev, size - 4096, 4096).await;
    assert_eq!(tail[4095], 0xa5, "the last byte did not read back");
    assert!(
        all_zero(&tail[..4095]),
        "writing the last byte changed the rest of its block"
    );
}

/// Multi-megabyte requests round-trip, unaligned ones included.
pub async fn large_io_round_trips<D: BlockDevice + ?Sized>(dev: &D) {
    check_device(dev);
    let data = pattern(4 << 20, 4 << 20, 10);
    write(dev, 4 << 20, &data).await;
    assert!(
        read(dev, 4 << 20, 4 << 20).await == data,
        "a 4 MiB write did not read back"
    );
    let off = (10 << 20) + 333;
    let data = pattern(off, (1 << 20) + 777, 11);
    write(dev, off, &data).await;
    assert!(
        read(dev, off, data.len()).await == data,
        "an unaligned 1 MiB write did not read back"
    );
}

/// Runs every case, each on a fresh device from `make`.
pub async fn block_device_suite<F, Fut, T>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Deref,
    T::Target: BlockDevice,
{
    crate::block_device_conformance! {@with [@suite make]}
}

fn check_read_only<D: BlockDevice + ?Sized>(dev: &D) {
    assert!(
        dev.is_read_only(),
        "the read-only suite needs a device that says it is read-only"
    );
    assert!(
        dev.size() > 0,
        "the read-only suite needs a non-empty device"
    );
}

fn assert_read_only<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
    match r {
        Err(Error::ReadOnly { .. }) => {}
        other => panic!("{what} on a read-only device: expected ReadOnly, got {other:?}"),
    }
}

/// Every kind of write is refused with `ReadOnly` and changes nothing.
pub async fn read_only_device_refuses_writes<D: BlockDevice + ?Sized>(dev: &D) {
    check_read_only(dev);
    let len = dev.size().min(8192);
    let before = read(dev, 0, len as usize).await;
    let ones = vec![1u8; len as usize];
    assert_read_only("write", dev.write_at(&ones, 0, WriteFlags::default()).await);
    assert_read_only("FUA write", dev.write_at(&ones, 0, WriteFlags::FUA).await);
    assert_read_only(
        "write_zeroes",
        dev.write_zeroes(0, len, ZeroFlags::default()).await,
    );
    assert_read_only("discard", dev.discard(0, len).await);
    assert!(
        read(dev, 0, len as usize).await == before,
        "a refused write changed the data"
    );
}

/// Reads, flush and block status work on a read-only device; ranges are still checked.
pub async fn read_only_device_reads<D: BlockDevice + ?Sized>(dev: &D) {
    check_read_only(dev);
    let size = dev.size();
    let a = read(dev, 0, size.min(1 << 20) as usize).await;
    let b = read(dev, 0, size.min(1 << 20) as usize).await;
    assert!(a == b, "two reads of a read-only device differ");
    read(dev, size - 1, 1).await;
    dev.flush().await.expect("flush of a read-only device");
    let ext = dev
        .block_status(0, size)
        .await
        .expect("block_status of a read-only device");
    check_extents(&ext, 0, size, size);
    let mut buf = [0u8; 2];
    assert_out_of_range(
        "read past the end of a read-only device",
        dev.read_at(&mut buf, size - 1).await,
    );
}

/// Runs every read-only case, each on a fresh device from `make`.
pub async fn read_only_block_device_suite<F, Fut, T>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Deref,
    T::Target: BlockDevice,
{
    crate::read_only_block_device_conformance! {@with [@suite make]}
}

/// Generates one `#[tokio::test]` per [`BlockDevice`] conformance case.
///
/// `$make` is an async function (or a closure returning a future), called once
/// per case, producing anything that dereferences to a fresh, empty, writable
/// device of at least [`MIN_SIZE`] bytes: `Fn() -> impl Future<Output = T>`
/// with `T: Deref<Target: BlockDevice>` (`Box<MyDevice>`, `Arc<dyn BlockDevice>`,
/// or a fixture owning the device's resources).
///
/// This macro holds the one list of cases; [`BLOCK_DEVICE_CASES`] and
/// [`block_device_suite`] are generated from it through the internal `@` arms.
#[macro_export]
macro_rules! block_device_conformance {
    ($make:expr) => {
        $crate::block_device_conformance! {@with [@tests $make]}
    };
    (@with [$($how:tt)*]) => {
        $crate::block_device_conformance! {$($how)*;
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
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@suite $make:expr; $($case:ident),* $(,)?) => {
        $( $crate::testing::block::$case(&*($make)().await).await; )*
    };
    (@tests $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::block::$case(&*fixture).await;
            }
        )*
    };
}

/// Generates one `#[tokio::test]` per read-only [`BlockDevice`] case.
///
/// `$make` is called once per case and produces anything that dereferences to
/// a read-only device (any content, any non-zero size), with the same signature
/// as for [`block_device_conformance!`](crate::block_device_conformance).
#[macro_export]
macro_rules! read_only_block_device_conformance {
    ($make:expr) => {
        $crate::read_only_block_device_conformance! {@with [@tests $make]}
    };
    (@with [$($how:tt)*]) => {
        $crate::read_only_block_device_conformance! {$($how)*;
            read_only_device_refuses_writes,
            read_only_device_reads,
        }
    };
    (@names; $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
    (@suite $make:expr; $($case:ident),* $(,)?) => {
        $( $crate::testing::block::$case(&*($make)().await).await; )*
    };
    (@tests $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = ($make)().await;
                $crate::testing::block::$case(&*fixture).await;
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_case_lists_name_every_case_once() {
        assert_eq!(BLOCK_DEVICE_CASES.len(), 13);
        assert_eq!(BLOCK_DEVICE_CASES[0], "fresh_device_reads_zero");
        let mut v = BLOCK_DEVICE_CASES.to_vec();
        v.extend(READ_ONLY_BLOCK_DEVICE_CASES);
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 15);
    }
}
