//! A sparse in-memory block device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::block::{
    BLOCK_SIZE, BlockDevice, DeviceCaps, Extent, ExtentKind, WriteFlags, ZeroFlags, check_range,
    coalesce_extents,
};
use crate::error::{Error, Result};

const BS: usize = BLOCK_SIZE as usize;

/// The shared content of a [`MemBlockDevice`]: allocated 4 KiB blocks by index.
#[derive(Debug, Default, Clone)]
pub(crate) struct MemData {
    pub(crate) size: u64,
    pub(crate) blocks: BTreeMap<u64, Box<[u8; BS]>>,
}

impl MemData {
    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / BLOCK_SIZE;
            let within = (pos % BLOCK_SIZE) as usize;
            let n = (BS - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.blocks.get(&idx) {
                Some(b) => dst.copy_from_slice(&b[within..within + n]),
                None => dst.fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / BLOCK_SIZE;
            let within = (pos % BLOCK_SIZE) as usize;
            let n = (BS - within).min(buf.len() - done);
            let block = self
                .blocks
                .entry(idx)
                .or_insert_with(|| Box::new([0u8; BS]));
            block[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
    }

    /// Zeroes a range; whole blocks are released unless `keep` is set.
    fn zero(&mut self, offset: u64, len: u64, keep: bool) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / BLOCK_SIZE;
            let within = (pos % BLOCK_SIZE) as usize;
            let n = (BLOCK_SIZE - within as u64).min(end - pos) as usize;
            if n == BS && !keep {
                self.blocks.remove(&idx);
            } else if let Some(b) = self.blocks.get_mut(&idx) {
                b[within..within + n].fill(0);
            } else if keep {
                self.blocks.insert(idx, Box::new([0u8; BS]));
            }
            pos += n as u64;
        }
    }

    fn status(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / BLOCK_SIZE;
            let next = ((idx + 1) * BLOCK_SIZE).min(end);
            let kind = if self.blocks.contains_key(&idx) {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            out.push(Extent {
                offset: pos,
                len: next - pos,
                kind,
            });
            pos = next;
        }
        coalesce_extents(out)
    }

    /// Changes the size; blocks past a smaller size are dropped, the tail of a
    /// partial last block is zeroed.
    pub(crate) fn resize(&mut self, size: u64) {
        if size < self.size {
            let first_gone = size.div_ceil(BLOCK_SIZE);
            self.blocks.retain(|&i, _| i < first_gone);
            if !size.is_multiple_of(BLOCK_SIZE) {
                let tail = size % BLOCK_SIZE;
                self.zero(size, BLOCK_SIZE - tail, true);
            }
        }
        self.size = size;
    }

    /// Bytes held by allocated blocks.
    pub(crate) fn allocated(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK_SIZE
    }
}

/// A thin-provisioned block device held in memory, allocated in 4 KiB blocks.
///
/// Reference implementation of [`BlockDevice`] for tests and examples; clones of
/// a handle share the same content.
#[derive(Debug, Clone)]
pub struct MemBlockDevice {
    data: Arc<Mutex<MemData>>,
    read_only: bool,
}

impl MemBlockDevice {
    /// Creates an empty (all-zero, unallocated) device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_shared(
            Arc::new(Mutex::new(MemData {
                size,
                blocks: BTreeMap::new(),
            })),
            false,
        )
    }

    pub(crate) fn from_shared(data: Arc<Mutex<MemData>>, read_only: bool) -> Self {
        MemBlockDevice { data, read_only }
    }

    /// A read-only handle on the same content.
    pub fn read_only(&self) -> Self {
        MemBlockDevice {
            data: self.data.clone(),
            read_only: true,
        }
    }

    /// Grows or shrinks the device (all handles see the new size). New space reads
    /// as zeroes.
    pub fn resize(&self, size: u64) {
        self.lock().resize(size);
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.lock().allocated()
    }

    fn lock(&self) -> MutexGuard<'_, MemData> {
        // A panic while holding the lock cannot leave MemData inconsistent in a way
        // that matters for a test device, so recover from poisoning.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<MutexGuard<'_, MemData>> {
        if self.read_only {
            return Err(Error::ReadOnly {
                what: "in-memory device".into(),
            });
        }
        let g = self.lock();
        check_range(offset, len, g.size)?;
        Ok(g)
    }
}

#[async_trait]
impl BlockDevice for MemBlockDevice {
    fn size(&self) -> u64 {
        self.lock().size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn capabilities(&self) -> DeviceCaps {
        DeviceCaps {
            discard: true,
            write_zeroes: true,
            block_status: true,
            shared_flush: true,
        }
    }

    async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let g = self.lock();
        check_range(offset, buf.len() as u64, g.size)?;
        g.read(buf, offset);
        Ok(())
    }

    async fn write_at(&self, buf: &[u8], offset: u64, _flags: WriteFlags) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?
            .write(buf, offset);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?.zero(offset, len, false);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write(offset, len)?
            .zero(offset, len, flags.no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let g = self.lock();
        check_range(offset, len, g.size)?;
        if len == 0 {
            return Err(Error::invalid("block status length", "must not be 0"));
        }
        Ok(g.status(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn unaligned_io_and_holes() {
        rt().block_on(async {
            let d = MemBlockDevice::new(5 * BLOCK_SIZE);
            d.write_at(&[7u8; 5000], 4000, WriteFlags::default())
                .await
                .expect("write");
            let mut b = vec![1u8; 6000];
            d.read_at(&mut b, 3000).await.expect("read");
            assert!(b[..1000].iter().all(|&x| x == 0));
            assert!(b[1000..6000].iter().all(|&x| x == 7));
            assert_eq!(d.allocated(), 3 * BLOCK_SIZE);
            let st = d.block_status(0, 5 * BLOCK_SIZE).await.expect("status");
            assert_eq!(st[0].kind, ExtentKind::Data);
            assert_eq!(st[0].len, 3 * BLOCK_SIZE);
            d.write_zeroes(0, 2 * BLOCK_SIZE, ZeroFlags::default())
                .await
                .expect("zero");
            assert_eq!(d.allocated(), BLOCK_SIZE);
            assert!(
                d.write_at(&[0], 5 * BLOCK_SIZE, WriteFlags::default())
                    .await
                    .is_err()
            );
            assert!(
                d.read_only()
                    .write_at(&[0], 0, WriteFlags::default())
                    .await
                    .is_err()
            );
        });
    }
}
