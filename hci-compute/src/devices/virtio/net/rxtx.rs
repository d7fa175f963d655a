//! Moving frames between virtio-net queues and a frame backend (a TAP queue).
//!
//! Every frame in a queue is a 12-byte `virtio_net_hdr` (virtio 1.x, with
//! `num_buffers`) followed by the Ethernet frame. No offloads are offered, so
//! the header carries nothing: on transmit it is ignored (and zeroed before it
//! reaches a TAP with `IFF_VNET_HDR`), on receive it is all zero except
//! `num_buffers = 1`.
//!
//! The guest controls every descriptor, so nothing here trusts it: a chain
//! that cannot be mapped is returned with nothing written, a receive buffer
//! too small for the next frame gets a zero-length completion (the frame is
//! dropped and counted), a transmit chain shorter than a header or longer than
//! [`MAX_FRAME`] is dropped and counted.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::NetCounters;
use crate::memory::GuestMemory;

/// Bytes of the virtio-net header with `VIRTIO_F_VERSION_1`.
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame moved (no GSO: anything an MTU of 65535 allows).
pub const MAX_FRAME: usize = 65_535 + 18;
/// Frames moved per call before other work gets a turn.
pub const BUDGET: usize = 256;

/// Where frames go to and come from.
pub trait FrameIo: Send {
    /// Reads one frame into `buf` (`WouldBlock` when none is queued).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Whether frames on this side carry a [`HDR_LEN`]-byte virtio-net header.
    fn has_vnet_hdr(&self) -> bool;
}

/// What a receive pass ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has no more frames.
    Drained,
    /// A frame is waiting for the guest to post receive buffers.
    NeedBuffers,
    /// The budget ran out with frames possibly left.
    Budget,
    /// The backend failed (e.g. its TAP was deleted): stop watching it.
    Failed,
}

/// Serves the receive and transmit queues of one virtio-net device.
#[derive(Debug)]
pub struct NetHandler<T> {
    io: T,
    counters: Arc<NetCounters>,
    /// Received header + frame; the header part is ours when the backend has none.
    frame: Box<[u8]>,
    /// Transmitted header + frame.
    tx_frame: Box<[u8]>,
    /// Bytes (header included) of a received frame not yet delivered.
    pending: Option<usize>,
    /// The last backend read failed with something other than `WouldBlock`.
    failed: bool,
}

impl<T: FrameIo> NetHandler<T> {
    /// A handler moving frames to and from `io`.
    pub fn new(io: T, counters: Arc<NetCounters>) -> Self {
        NetHandler {
            io,
            counters,
            frame: vec![0u8; HDR_LEN + MAX_FRAME].into_boxed_slice(),
            tx_frame: vec![0u8; HDR_LEN + MAX_FRAME].into_boxed_slice(),
            pending: None,
            failed: false,
        }
    }

    /// The frame backend.
    pub fn io(&self) -> &T {
        &self.io
    }

    /// Whether a received frame waits for a guest buffer.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Reads the next frame from the backend into `self.frame`; `None` when
    /// it has none, or fails (counted, and `self.failed` set).
    fn next_frame(&mut self) -> Option<usize> {
        self.failed = false;
        loop {
            let res = if self.io.has_vnet_hdr() {
                self.io.recv(&mut self.frame)
            } else {
                self.io
                    .recv(&mut self.frame[HDR_LEN..])
                    .map(|n| n + HDR_LEN)
            };
            match res {
                Ok(n) if n < HDR_LEN + 14 => {
                    // Shorter than an Ethernet header: not a frame.
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => {
                    // No offloads were negotiated: the header says nothing but
                    // "one buffer" (whatever the backend put there).
                    self.frame[..HDR_LEN].fill(0);
                    self.frame[10..HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
                    return Some(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => {
                    self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    self.failed = true;
                    return None;
                }
            }
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until
    /// either runs out or [`BUDGET`] frames moved. Returns whether any buffer
    /// was used, and why it stopped; an error means the used ring cannot be
    /// written (the queue is then unusable).
    pub fn process_rx(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<(bool, RxState), virtio_queue::Error> {
        let mut used = false;
        for _ in 0..BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => match self.next_frame() {
                    Some(len) => len,
                    None if self.failed => return Ok((used, RxState::Failed)),
                    None => return Ok((used, RxState::Drained)),
                },
            };
            self.pending = Some(len);
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Ok((used, RxState::NeedBuffers));
            };
            let head = chain.head_index();
            used = true;
            let Ok(mut writer) = Writer::new(mem, chain) else {
                // Unmappable buffer: return it empty, keep the frame for the next one.
                self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                queue.add_used(mem, head, 0)?;
                continue;
            };
            self.pending = None;
            if writer.available_bytes() < len {
                // Too small (we offer no mergeable buffers): drop the frame.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                queue.add_used(mem, head, 0)?;
                continue;
            }
            let written = match writer.write_all(&self.frame[..len]) {
                Ok(()) => {
                    self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .rx_bytes
                        .fetch_add((len - HDR_LEN) as u64, Ordering::Relaxed);
                    len
                }
                Err(_) => {
                    self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                    writer.bytes_written()
                }
            };
            queue.add_used(mem, head, written as u32)?;
        }
        Ok((used, RxState::Budget))
    }

    /// Sends every frame the guest queued for transmission. Returns whether
    /// any chain was completed; an error means the used ring cannot be written.
    pub fn process_tx(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            used = true;
            match Reader::new(mem, chain) {
                Ok(mut reader) => self.send_one(&mut reader),
                Err(_) => {
                    self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            queue.add_used(mem, head, 0)?;
        }
        Ok(used)
    }

    fn send_one<B: vm_memory::bitmap::BitmapSlice>(&mut self, reader: &mut Reader<'_, B>) {
        let len = reader.available_bytes();
        if !(HDR_LEN + 14..=HDR_LEN + MAX_FRAME).contains(&len) {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let buf = &mut self.tx_frame[..len];
        if reader.read_exact(buf).is_err() {
            self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // No offloads negotiated: nothing in the header may reach the backend.
        buf[..HDR_LEN].fill(0);
        let out: &[u8] = if self.io.has_vnet_hdr() {
            buf
        } else {
            &buf[HDR_LEN..]
        };
        loop {
            match self.io.send(out) {
                Ok(_) => {
                    self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .tx_bytes
                        .fetch_add((len - HDR_LEN) as u64, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Full or failing backend: drop, as a NIC would.
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "rxtx_tests.rs"]
mod tests;
