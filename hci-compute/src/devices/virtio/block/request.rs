//! Parsing and serving virtio-blk requests (virtio spec 5.2.6).
//!
//! A request is a descriptor chain: a 16-byte header the device reads, then
//! data (read or written), then one status byte the device writes. The guest
//! controls every address, length and direction, so nothing here trusts it:
//! a chain that cannot be mapped is returned with no bytes written, a request
//! that is malformed or out of range completes with `IOERR`, an unknown type
//! with `UNSUPP`. Data moves through a bounded bounce buffer.

use std::future::Future;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hci_core::block::{BlockDevice, WriteFlags, ZeroFlags};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::{BlockCounters, Executor, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::memory::GuestMemory;

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest chunk moved between guest memory and the disk at once.
const BOUNCE_BYTES: usize = 256 * 1024;

/// Request types.
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Completion status: success.
pub const S_OK: u8 = 0;
/// Completion status: I/O error (also malformed or out-of-range requests).
pub const S_IOERR: u8 = 1;
/// Completion status: unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;

/// The request header: type, reserved, first sector (little endian).
struct Header {
    kind: u32,
    sector: u64,
}

impl Header {
    fn parse(b: [u8; 16]) -> Self {
        let [k0, k1, k2, k3, _, _, _, _, s @ ..] = b;
        Header {
            kind: u32::from_le_bytes([k0, k1, k2, k3]),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// One discard / write-zeroes segment: first sector, sector count, flags.
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

/// Bytes of one [`Segment`] on the wire.
const SEGMENT_SIZE: usize = 16;

impl Segment {
    fn parse(b: [u8; SEGMENT_SIZE]) -> Self {
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = b;
        Segment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }
}

/// Drives the block device's futures on a worker thread.
#[derive(Debug)]
pub enum Runner {
    /// Someone else's runtime.
    Handle(tokio::runtime::Handle),
    /// A runtime owned by the worker.
    Own(tokio::runtime::Runtime),
}

impl Runner {
    /// Makes a runner for `executor`.
    pub fn new(executor: Executor) -> std::io::Result<Self> {
        Ok(match executor {
            Executor::Handle(h) => Runner::Handle(h),
            Executor::Private => Runner::Own(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ),
        })
    }

    /// Runs `f` to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        match self {
            Runner::Handle(h) => h.block_on(f),
            Runner::Own(rt) => rt.block_on(f),
        }
    }
}

/// Serves requests of one virtio-blk queue.
#[derive(Debug)]
pub struct RequestHandler {
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
    serial: [u8; 20],
    counters: Arc<BlockCounters>,
    bounce: Vec<u8>,
}

/// Why a request failed (becomes the status byte).
struct Failed(u8);

/// Logs a disk backend's error that the guest will see as `IOERR` (the
/// status byte says nothing about why), then makes that status. Only the
/// first few and then every 1024th are logged: a guest retrying a broken
/// disk must not fill the log.
fn backend_failed(what: &str, offset: u64, e: &hci_core::Error) -> Failed {
    use std::sync::atomic::AtomicU64;
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let n = LOGGED.fetch_add(1, Ordering::Relaxed);
    if n < 16 || n.is_multiple_of(1024) {
        tracing::warn!(request = what, offset, error = %e, "virtio-blk request failed: IOERR to the guest");
    }
    Failed(S_IOERR)
}

impl RequestHandler {
    /// A handler serving `disk`.
    pub fn new(
        disk: Arc<dyn BlockDevice>,
        read_only: bool,
        serial: [u8; 20],
        counters: Arc<BlockCounters>,
    ) -> Self {
        RequestHandler {
            disk,
            read_only,
            serial,
            counters,
            bounce: Vec::new(),
        }
    }

    /// Serves every available request. Returns whether any was completed, or an
    /// error if the used ring cannot be written (the queue is then unusable).
    pub fn process_queue(
        &mut self,
        rt: &Runner,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, virtio_queue::Error> {
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = self.serve(rt, mem, chain);
            queue.add_used(mem, head, used)?;
            any = true;
        }
        Ok(any)
    }

    /// Serves one chain; returns the number of bytes written into it.
    fn serve(
        &mut self,
        rt: &Runner,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            // Addresses outside guest memory: nowhere to put a status.
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let Some(status_at) = writer.available_bytes().checked_sub(1) else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(status_at) else {
            return 0;
        };
        let status = match self.execute(rt, &mut reader, &mut writer) {
            Ok(()) => S_OK,
            Err(Failed(s)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                s
            }
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if status_writer.write_all(&[status]).is_err() {
            return writer.bytes_written() as u32;
        }
        writer.bytes_written() as u32 + 1
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Failed> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Failed(S_IOERR));
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failed(S_IOERR))?;
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.size() => Ok(offset),
            _ => Err(Failed(S_IOERR)),
        }
    }

    fn execute<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        rt: &Runner,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(), Failed> {
        let mut raw = [0u8; 16];
        reader.read_exact(&mut raw).map_err(|_| Failed(S_IOERR))?;
        let header = Header::parse(raw);
        let sector = header.sector;
        match header.kind {
            types::IN => {
                let len = writer.available_bytes() as u64;
                let mut offset = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_BYTES as u64) as usize;
                    self.bounce.resize(n, 0);
                    rt.block_on(self.disk.read_at(&mut self.bounce[..n], offset))
                        .map_err(|e| backend_failed("read", offset, &e))?;
                    writer
                        .write_all(&self.bounce[..n])
                        .map_err(|_| Failed(S_IOERR))?;
                    offset += n as u64;
                    left -= n as u64;
                }
                self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            types::OUT => {
                if self.read_only {
                    return Err(Failed(S_IOERR));
                }
                let len = reader.available_bytes() as u64;
                let mut offset = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE_BYTES as u64) as usize;
                    self.bounce.resize(n, 0);
                    reader
                        .read_exact(&mut self.bounce[..n])
                        .map_err(|_| Failed(S_IOERR))?;
                    rt.block_on(self.disk.write_at(
                        &self.bounce[..n],
                        offset,
                        WriteFlags::default(),
                    ))
                    .map_err(|e| backend_failed("write", offset, &e))?;
                    offset += n as u64;
                    left -= n as u64;
                }
                self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            types::FLUSH => rt
                .block_on(self.disk.flush())
                .map_err(|e| backend_failed("flush", 0, &e)),
            types::GET_ID => {
                let n = writer.available_bytes().min(self.serial.len());
                writer
                    .write_all(&self.serial[..n])
                    .map_err(|_| Failed(S_IOERR))
            }
            kind @ (types::DISCARD | types::WRITE_ZEROES) => {
                if self.read_only {
                    return Err(Failed(S_IOERR));
                }
                let size = SEGMENT_SIZE;
                let count = reader.available_bytes() / size;
                if count == 0
                    || !reader.available_bytes().is_multiple_of(size)
                    || count > MAX_DISCARD_SEGMENTS as usize
                {
                    return Err(Failed(S_UNSUPP));
                }
                for _ in 0..count {
                    let mut raw = [0u8; SEGMENT_SIZE];
                    reader.read_exact(&mut raw).map_err(|_| Failed(S_IOERR))?;
                    let seg = Segment::parse(raw);
                    let (flags, sectors) = (seg.flags, seg.num_sectors);
                    let unknown_flags = if kind == types::DISCARD {
                        flags
                    } else {
                        flags & !FLAG_UNMAP
                    };
                    if unknown_flags != 0 || sectors > MAX_DISCARD_SECTORS {
                        return Err(Failed(S_UNSUPP));
                    }
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    let offset = self.range(seg.sector, len)?;
                    let done = if kind == types::DISCARD {
                        rt.block_on(self.disk.discard(offset, len))
                    } else {
                        let zf = ZeroFlags {
                            fua: false,
                            no_hole: flags & FLAG_UNMAP == 0,
                        };
                        rt.block_on(self.disk.write_zeroes(offset, len, zf))
                    };
                    done.map_err(|e| backend_failed("discard/write-zeroes", offset, &e))?;
                }
                Ok(())
            }
            _ => Err(Failed(S_UNSUPP)),
        }
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
