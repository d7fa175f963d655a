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

    fn activate(&mut self) -> Result<()> {
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
