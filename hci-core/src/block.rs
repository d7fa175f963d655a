//! The block device contract: what a guest disk, an NBD export or a replica sees.
//!
//! Offsets and lengths are bytes. Implementations must accept any byte range
//! inside the device (callers usually send 512- or 4096-aligned requests, but a
//! conforming device handles unaligned ones too), return [`Error::OutOfRange`]
//! for ranges that extend past [`BlockDevice::size`], and [`Error::ReadOnly`]
//! for writes to read-only devices.
//!
//! Durability: a completed write is *visible* to later reads immediately and
//! *durable* after a completed [`BlockDevice::flush`], or at once when written
//! with [`WriteFlags::fua`].
//!
//! ```
//! # use hci_core::block::{BlockDevice, WriteFlags};
//! # use hci_core::memory::MemBlockDevice;
//! # tokio_test_block_on(async {
//! let dev = MemBlockDevice::new(1 << 20);
//! dev.write_at(b"hello", 4096, WriteFlags::default()).await?;
//! let mut buf = [0u8; 5];
//! dev.read_at(&mut buf, 4096).await?;
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), hci_core::Error>(()) });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f) }
//! ```

use std::fmt::Debug;

use async_trait::async_trait;

use crate::error::{Error, Result};

/// The granularity of allocation tracking, changed-block tracking and thin provisioning.
pub const BLOCK_SIZE: u64 = 4096;

/// Options for a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
}

impl WriteFlags {
    /// Flags with FUA set.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// Options for [`BlockDevice::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access.
    pub fua: bool,
    /// Keep the range allocated (NBD `NO_HOLE`): the device must not punch a hole.
    pub no_hole: bool,
}

/// What a device supports beyond plain reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// [`BlockDevice::discard`] releases space (otherwise it is a no-op that succeeds).
    pub discard: bool,
    /// [`BlockDevice::write_zeroes`] is efficient (no data written).
    pub write_zeroes: bool,
    /// [`BlockDevice::block_status`] reports real allocation (otherwise all `Data`).
    pub block_status: bool,
    /// A flush through one handle covers writes completed through every handle of the
    /// same device, so several connections may share it (NBD `MULTI_CONN`).
    pub shared_flush: bool,
}

impl Default for DeviceCaps {
    fn default() -> Self {
        DeviceCaps {
            discard: false,
            write_zeroes: false,
            block_status: false,
            shared_flush: true,
        }
    }
}

/// How a byte range is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated and holding data (may happen to contain zeroes).
    Data,
    /// Allocated, known to read as zeroes.
    Zero,
    /// Not allocated (thin): reads as zeroes and takes no space.
    Hole,
}

impl ExtentKind {
    /// True if the range reads as zeroes.
    pub fn reads_zero(self) -> bool {
        matches!(self, ExtentKind::Zero | ExtentKind::Hole)
    }
}

/// A contiguous range with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes (never 0).
    pub len: u64,
    /// How the range is backed.
    pub kind: ExtentKind,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteRange {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub len: u64,
}

impl ByteRange {
    /// Creates a range.
    pub fn new(offset: u64, len: u64) -> Self {
        ByteRange { offset, len }
    }

    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A random-access block device.
///
/// Every method takes `&self`: devices are shared between queues, connections and
/// threads, and must serve concurrent requests. Overlapping concurrent writes
/// have no defined order (as on real disks); non-overlapping ones never interfere.
#[async_trait]
pub trait BlockDevice: Send + Sync + Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// True if writes are refused.
    fn is_read_only(&self) -> bool;

    /// What the device supports.
    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps::default()
    }

    /// Reads `buf.len()` bytes at `offset`. Unwritten ranges read as zeroes.
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    async fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Tells the device the range is unused; it may release the space. Afterwards
    /// the range reads as zeroes if the device reports `discard` capability;
    /// otherwise its content is unspecified.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes the range read as zeroes, releasing space unless `flags.no_hole`.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Describes how `[offset, offset+len)` is backed, as sorted, non-overlapping,
    /// contiguous extents that start at `offset`. The reply may cover less than
    /// `len` (at least one extent), but never more than the device.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Merges adjacent extents of the same kind (for tidy block-status replies).
pub fn coalesce_extents(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        if e.len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.kind == e.kind && last.end() == e.offset => last.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

/// Merges overlapping or adjacent ranges into a sorted minimal list.
pub fn coalesce_ranges(ranges: impl IntoIterator<Item = ByteRange>) -> Vec<ByteRange> {
    let mut v: Vec<ByteRange> = ranges.into_iter().filter(|r| r.len > 0).collect();
    v.sort();
    let mut out: Vec<ByteRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_catch_overflow() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(4096, 1, 4096).is_err());
        assert!(check_range(u64::MAX, 2, 4096).is_err());
    }

    #[test]
    fn coalescing() {
        let e = |o, l, k| Extent {
            offset: o,
            len: l,
            kind: k,
        };
        let v = coalesce_extents([
            e(0, 10, ExtentKind::Data),
            e(10, 5, ExtentKind::Data),
            e(15, 5, ExtentKind::Hole),
            e(20, 0, ExtentKind::Data),
        ]);
        assert_eq!(
            v,
            vec![e(0, 15, ExtentKind::Data), e(15, 5, ExtentKind::Hole)]
        );
        let r = coalesce_ranges([
            ByteRange::new(8, 4),
            ByteRange::new(0, 8),
            ByteRange::new(20, 1),
        ]);
        assert_eq!(r, vec![ByteRange::new(0, 12), ByteRange::new(20, 1)]);
    }
}
