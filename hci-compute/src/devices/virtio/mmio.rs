//! The virtio-mmio transport (virtio 1.x, register layout "version 2").
//!
//! Every register access is validated: unknown offsets read as 0, writes in
//! the wrong state are ignored, and a queue that does not fit guest memory
//! sets `DEVICE_NEEDS_RESET` instead of reaching the device.

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::devices::BusDevice;
use crate::error::{Result, VmmError};
use crate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x0048_4349; // "HCI"

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the queue-notify register (for ioeventfd registration).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One virtqueue's configuration and position, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// A virtio-mmio transport's registers and queues, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    /// Virtio device type (checked on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Feature selectors.
    pub device_features_sel: u32,
    /// Driver feature selector.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Selected queue.
    pub queue_sel: u32,
    /// Interrupt status bits not yet acknowledged.
    pub interrupt_status: u32,
    /// Whether the device was serving its queues.
    pub active: bool,
    /// Per queue.
    pub queues: Vec<QueueSnapshot>,
}

/// One virtio device behind the MMIO register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    active: bool,
    released: bool,
    // Stopped by `quiesce` and to be restarted by `unquiesce`.
    quiesced: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd of its interrupt line.
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestMemory>, irq: EventFd) -> Result<Self> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| VmmError::Device {
                device: format!("virtio type {}", device.device_type()),
                reason: format!("bad queue size {max}: {e}"),
            })?);
            // Blocking: device workers sleep in read() until the guest notifies.
            notify.push(EventFd::new(0).map_err(|e| VmmError::io("create a queue eventfd", e))?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            active: false,
            released: false,
            quiesced: false,
        })
    }

    /// The per-queue notification eventfds, in queue order.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The interrupt line's eventfd.
    pub fn irq_event(&self) -> &EventFd {
        self.interrupt.line()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is only writable before the driver goes live.
        if self.active || self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Resets the transport and stops the device (as a driver writing status 0).
    pub fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.quiesced = false;
        self.interrupt.ack(u32::MAX);
    }

    /// Resets the transport and releases the device's host resources: the
    /// device never goes live again (the VM stopped).
    pub fn shutdown(&mut self) {
        self.reset();
        self.device.release();
        self.released = true;
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // FEATURES_OK sticks only if the driver took VERSION_1 and nothing we did not offer.
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                self.status = new & !status::FEATURES_OK;
                return;
            }
        }
        self.status = new;
        let going_live = new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0;
        if going_live && self.released {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        if going_live
            && new & status::FEATURES_OK != 0
            && let Err(e) = self.activate()
        {
            warn!(error = %e, "virtio device activation failed");
            self.status |= status::DEVICE_NEEDS_RESET;
        }
    }

    /// Stops the device's workers so nothing touches guest memory or the
    /// queues (the vCPUs are paused); every request a worker took is
    /// completed first, so each queue's position is its used index.
    pub fn quiesce(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
            self.quiesced = true;
        }
    }

    /// Restarts a device stopped by [`MmioTransport::quiesce`], from the
    /// positions in guest memory.
    pub fn unquiesce(&mut self) -> Result<()> {
        if !self.quiesced {
            return Ok(());
        }
        self.quiesced = false;
        let positions = self.positions_from_memory();
        self.activate_at(&positions)
    }

    /// Each queue's position (next available = next used = the used ring's
    /// index) read from guest memory; valid once the device is quiesced.
    fn positions_from_memory(&self) -> Vec<(u16, u16)> {
        self.queues
            .iter()
            .map(|q| {
                if !q.ready() {
                    return (0, 0);
                }
                let idx = q
                    .used_idx(&*self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_or(0, |w| w.0);
                (idx, idx)
            })
            .collect()
    }

    /// The transport's state. Call with the device quiesced (vCPUs paused,
    /// [`MmioTransport::quiesce`] done) so queue positions are settled.
    pub fn snapshot(&self) -> TransportSnapshot {
        let positions = self.positions_from_memory();
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            active: self.active || self.quiesced,
            queues: self
                .queues
                .iter()
                .zip(positions)
                .map(|(q, (next_avail, next_used))| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next_avail,
                    next_used,
                })
                .collect(),
        }
    }

    /// Loads a state from [`MmioTransport::snapshot`] into a fresh
    /// transport and, if the device was live, starts it at the saved queue
    /// positions (before the vCPUs run).
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<()> {
        let bad = |reason: String| VmmError::Device {
            device: format!("virtio type {}", self.device.device_type()),
            reason,
        };
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(bad(format!(
                "the snapshot has a device of type {} with {} queues here",
                s.device_type,
                s.queues.len()
            )));
        }
        self.reset();
        for (q, snap) in self.queues.iter_mut().zip(&s.queues) {
            q.set_size(snap.size);
            q.set_desc_table_address(Some(snap.desc as u32), Some((snap.desc >> 32) as u32));
            q.set_avail_ring_address(Some(snap.avail as u32), Some((snap.avail >> 32) as u32));
            q.set_used_ring_address(Some(snap.used as u32), Some((snap.used >> 32) as u32));
            q.set_ready(snap.ready);
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        if s.active {
            let positions: Vec<(u16, u16)> = s
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            self.activate_at(&positions)?;
        }
        if s.interrupt_status != 0 {
            self.interrupt.raise(s.interrupt_status);
        }
        Ok(())
    }

    fn activate(&mut self) -> Result<()> {
        let zero = vec![(0, 0); self.queues.len()];
        self.activate_at(&zero)
    }

    /// Hands the device its ready queues starting at `positions` (next
    /// available, next used) and wakes its workers once, so requests the
    /// guest queued meanwhile are seen.
    fn activate_at(&mut self, positions: &[(u16, u16)]) -> Result<()> {
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&*self.mem) {
                return Err(VmmError::Device {
                    device: "virtio-mmio".into(),
                    reason: format!("queue {i} is invalid"),
                });
            }
            let mut queue = Queue::new(q.max_size()).map_err(|e| VmmError::Device {
                device: "virtio-mmio".into(),
                reason: e.to_string(),
            })?;
            queue.set_size(q.size());
            queue.set_desc_table_address(
                Some(q.desc_table() as u32),
                Some((q.desc_table() >> 32) as u32),
            );
            queue.set_avail_ring_address(
                Some(q.avail_ring() as u32),
                Some((q.avail_ring() >> 32) as u32),
            );
            queue.set_used_ring_address(
                Some(q.used_ring() as u32),
                Some((q.used_ring() >> 32) as u32),
            );
            queue.set_ready(true);
            if let Some(&(next_avail, next_used)) = positions.get(i) {
                queue.set_next_avail(next_avail);
                queue.set_next_used(next_used);
            }
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| VmmError::io("clone a queue eventfd", e))?;
            active.push(ActiveQueue {
                index: i,
                queue,
                notify,
            });
        }
        debug!(
            queues = active.len(),
            features = self.driver_features,
            "virtio device activated"
        );
        self.device.activate(
            Arc::clone(&self.mem),
            self.driver_features,
            active,
            Arc::clone(&self.interrupt),
        )?;
        self.active = true;
        if positions.iter().any(|&p| p != (0, 0)) {
            for evt in &self.notify {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let configuring_features = self.status & status::DRIVER != 0
            && self.status & (status::FEATURES_OK | status::DRIVER_OK) == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if configuring_features => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Invalid sizes are recorded and rejected by `is_valid` at activation.
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                let high = offset == reg::QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_desc_table_address(None, Some(v))
                    } else {
                        q.set_desc_table_address(Some(v), None)
                    }
                }
            }
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => {
                let high = offset == reg::QUEUE_AVAIL_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_avail_ring_address(None, Some(v))
                    } else {
                        q.set_avail_ring_address(Some(v), None)
                    }
                }
            }
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH => {
                let high = offset == reg::QUEUE_USED_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_used_ring_address(None, Some(v))
                    } else {
                        q.set_used_ring_address(Some(v), None)
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by a KVM ioeventfd without an exit; forward otherwise.
                if let Some(evt) = self.notify.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => debug!(offset, value = v, "ignored virtio-mmio register write"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
