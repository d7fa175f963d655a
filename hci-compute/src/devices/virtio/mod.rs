//! Virtio devices over the virtio-mmio transport (virtio 1.x, "version 2").
//!
//! A [`VirtioDevice`] is the device model (features, config space, what to do
//! with its queues); [`mmio::MmioTransport`] is the register interface the guest
//! drives. On `DRIVER_OK` the transport hands the device its queues, each with
//! the eventfd the guest's notifications arrive on, and an [`Interrupt`].
//!
//! Devices: [`block`] (virtio-blk over an hci `BlockDevice`), [`net`]
//! (virtio-net over a TAP queue) and [`rng`] (virtio-rng from the host's
//! entropy pool).

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::memory::GuestMemory;

/// `VIRTIO_F_VERSION_1`: virtio 1.x semantics (the only kind we offer).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device ID of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// Device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device ID of an entropy source.
pub const DEVICE_ID_RNG: u32 = 4;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: status bits the guest reads, and the line to raise.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
}

impl Interrupt {
    /// An interrupt raised by writing `line` (a KVM irqfd).
    pub fn new(line: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the guest a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        // A failed write would mean the eventfd counter overflowed: the line is up anyway.
        let _ = self.line.write(1);
    }

    /// Sets status `bits` and raises the line (a restored pending interrupt).
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        let _ = self.line.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd behind the line.
    pub fn line(&self) -> &EventFd {
        &self.line
    }
}

/// A queue ready for a device: the split queue and its notification eventfd.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index (devices with several queues tell them apart by it).
    pub index: usize,
    /// The queue, validated against guest memory.
    pub queue: Queue,
    /// Becomes readable when the guest notifies the queue.
    pub notify: EventFd,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device ID.
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: Arc<GuestMemory>,
        features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<()>;
    /// Stops serving queues (driver reset or VM teardown).
    fn reset(&mut self);
    /// Lets go of host resources for good (the VM stopped; the device is
    /// never activated again), e.g. a TAP queue another VM may want next.
    fn release(&mut self) {}
}

/// Copies `src[offset..]` into `data`, zero-filling past the end.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(start..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}
