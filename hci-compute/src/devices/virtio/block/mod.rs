//! virtio-blk served straight from an hci [`BlockDevice`].
//!
//! One request queue, processed on a worker thread that sleeps on the queue's
//! notification eventfd (a KVM ioeventfd). Requests are parsed and validated
//! in [`request`]; the block device's async calls are driven on the tokio
//! runtime the VM was created from, or on a private one.

pub mod request;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use hci_core::block::BlockDevice;
use tracing::{debug, info_span, warn};
use virtio_queue::QueueT;

pub use self::request::{RequestHandler, Runner, SECTOR_SIZE};
use super::{
    ActiveQueue, DEVICE_ID_BLOCK, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};
use crate::error::{Result, VmmError};
use crate::memory::GuestMemory;

/// Feature bits (virtio spec 5.2.3).
pub mod features {
    /// Maximum segments per request in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const RO: u64 = 1 << 5;
    /// Block size in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Queue size offered to the guest.
pub const QUEUE_SIZE: u16 = 256;
/// Largest discard / write-zeroes request, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments accepted in one discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// I/O counters of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests that failed or were malformed.
    pub errors: AtomicU64,
}

/// Runs the block device's futures from a plain thread.
#[derive(Debug, Clone)]
pub enum Executor {
    /// A runtime owned elsewhere (the one the VM was created from).
    Handle(tokio::runtime::Handle),
    /// Create a private current-thread runtime on the worker.
    Private,
}

impl Executor {
    /// The current tokio runtime, if any; otherwise a private one.
    pub fn current() -> Self {
        tokio::runtime::Handle::try_current().map_or(Executor::Private, Executor::Handle)
    }
}

struct Worker {
    stop: Arc<AtomicBool>,
    wake: vmm_sys_util::eventfd::EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-blk device.
pub struct Block {
    name: String,
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
    serial: [u8; 20],
    executor: Executor,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device named `name` (also its serial number, truncated to 20 bytes).
    pub fn new(
        name: &str,
        disk: Arc<dyn BlockDevice>,
        read_only: bool,
        executor: Executor,
    ) -> Self {
        let mut serial = [0u8; 20];
        let n = name.len().min(20);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        Block {
            name: name.to_string(),
            read_only: read_only || disk.is_read_only(),
            disk,
            serial,
            executor,
            counters: Arc::new(BlockCounters::default()),
            worker: None,
        }
    }

    /// This disk's I/O counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        Arc::clone(&self.counters)
    }

    fn config(&self) -> Vec<u8> {
        let sectors = self.disk.size() / SECTOR_SIZE;
        let mut c = Vec::with_capacity(60);
        c.extend_from_slice(&sectors.to_le_bytes()); // capacity
        c.extend_from_slice(&0u32.to_le_bytes()); // size_max
        c.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c.extend_from_slice(&[0; 4]); // geometry
        c.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c.extend_from_slice(&[0; 8]); // topology
        c.push(0); // writeback
        c.push(0);
        c.extend_from_slice(&1u16.to_le_bytes()); // num_queues
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c.extend_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c.push(1); // write_zeroes_may_unmap
        c.extend_from_slice(&[0; 3]);
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | features::SEG_MAX | features::BLK_SIZE | features::FLUSH;
        if self.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        _features: u64,
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<()> {
        self.reset();
        let Some(ActiveQueue {
            mut queue, notify, ..
        }) = queues.pop()
        else {
            return Err(VmmError::Device {
                device: self.name.clone(),
                reason: "no queue was set up".into(),
            });
        };
        let wake = notify
            .try_clone()
            .map_err(|e| VmmError::io("clone a queue eventfd", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handler = RequestHandler::new(
            Arc::clone(&self.disk),
            self.read_only,
            self.serial,
            Arc::clone(&self.counters),
        );
        let executor = self.executor.clone();
        let name = self.name.clone();
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("virtio-blk-{name}"))
            .spawn(move || {
                let _span = info_span!("virtio_blk", disk = %name).entered();
                let rt = match Runner::new(executor) {
                    Ok(rt) => rt,
                    Err(e) => return warn!(error = %e, "cannot create a runtime for the disk"),
                };
                loop {
                    if notify.read().is_err() || stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match handler.process_queue(&rt, &mem, &mut queue) {
                        Ok(true) => {
                            if queue.needs_notification(&*mem).unwrap_or(true) {
                                interrupt.signal_used_queue();
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(error = %e, "virtio-blk queue is broken; stopping it");
                            break;
                        }
                    }
                }
                debug!("virtio-blk worker stopped");
            })
            .map_err(|e| VmmError::io("spawn the virtio-blk worker", e))?;
        self.worker = Some(Worker { stop, wake, thread });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop.store(true, Ordering::SeqCst);
            let _ = w.wake.write(1);
            let _ = w.thread.join();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}
