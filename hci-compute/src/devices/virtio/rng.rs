//! virtio-rng (virtio spec 5.4): fills the guest's buffers from the host's
//! entropy pool (`/dev/urandom`, which never blocks once the pool is seeded).
//!
//! One request queue; each chain's device-writable bytes are filled, capped
//! at [`MAX_REQUEST_BYTES`] so a guest cannot make the worker stream
//! gigabytes for one request. A worker thread sleeps on the queue's
//! notification eventfd (a KVM ioeventfd).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use tracing::{debug, info_span, warn};
use virtio_queue::{Queue, QueueT, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, DEVICE_ID_RNG, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::error::{Result, VmmError};
use crate::memory::GuestMemory;

/// Queue size offered to the guest.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes served for one request.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Counters of an entropy device.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Random bytes handed to the guest.
    pub bytes: AtomicU64,
}

/// Serves requests of a virtio-rng queue from `source`.
#[derive(Debug)]
pub struct RngHandler<R> {
    source: R,
    counters: Arc<RngCounters>,
    bounce: Vec<u8>,
}

impl<R: Read> RngHandler<R> {
    /// A handler reading entropy from `source`.
    pub fn new(source: R, counters: Arc<RngCounters>) -> Self {
        RngHandler {
            source,
            counters,
            bounce: vec![0; MAX_REQUEST_BYTES],
        }
    }

    /// Serves every available request. Returns whether any was completed, or
    /// an error if the used ring cannot be written.
    pub fn process_queue(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> std::result::Result<bool, virtio_queue::Error> {
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match Writer::new(mem, chain) {
                Ok(mut writer) => self.fill(&mut writer),
                // Addresses outside guest memory: return the chain untouched.
                Err(_) => 0,
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(u64::from(written), Ordering::Relaxed);
            queue.add_used(mem, head, written)?;
            any = true;
        }
        Ok(any)
    }

    fn fill<B: vm_memory::bitmap::BitmapSlice>(&mut self, writer: &mut Writer<'_, B>) -> u32 {
        let n = writer.available_bytes().min(MAX_REQUEST_BYTES);
        let buf = &mut self.bounce[..n];
        if let Err(e) = self.source.read_exact(buf) {
            warn!(error = %e, "cannot read host entropy");
            return 0;
        }
        match writer.write_all(buf) {
            Ok(()) => n as u32,
            Err(_) => writer.bytes_written() as u32,
        }
    }
}

struct Worker {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-rng device.
pub struct Rng {
    source: File,
    counters: Arc<RngCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// An entropy device reading `/dev/urandom`.
    pub fn new() -> Result<Self> {
        let source =
            File::open("/dev/urandom").map_err(|e| VmmError::io("open /dev/urandom", e))?;
        Ok(Rng {
            source,
            counters: Arc::new(RngCounters::default()),
            worker: None,
        })
    }

    /// This device's counters.
    pub fn counters(&self) -> Arc<RngCounters> {
        Arc::clone(&self.counters)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
                device: "virtio-rng".into(),
                reason: "no queue was set up".into(),
            });
        };
        let wake = notify
            .try_clone()
            .map_err(|e| VmmError::io("clone a queue eventfd", e))?;
        let source = self
            .source
            .try_clone()
            .map_err(|e| VmmError::io("clone the entropy source", e))?;
        let mut handler = RngHandler::new(source, Arc::clone(&self.counters));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("virtio-rng".into())
            .spawn(move || {
                let _span = info_span!("virtio_rng").entered();
                loop {
                    if notify.read().is_err() || stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match handler.process_queue(&mem, &mut queue) {
                        Ok(true) => {
                            if queue.needs_notification(&*mem).unwrap_or(true) {
                                interrupt.signal_used_queue();
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(error = %e, "virtio-rng queue is broken; stopping it");
                            break;
                        }
                    }
                }
                debug!("virtio-rng worker stopped");
            })
            .map_err(|e| VmmError::io("spawn the virtio-rng worker", e))?;
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

impl Drop for Rng {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// A predictable "entropy" source: 1, 2, 3, …
    struct Counting(u8);

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            for b in buf.iter_mut() {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
            Ok(buf.len())
        }
    }

    /// Submits one chain of (address, length, device-writable); returns the used length.
    fn submit(
        mem: &crate::memory::GuestMemory,
        handler: &mut RngHandler<impl Read>,
        descs: &[(u64, u32, bool)],
    ) -> u32 {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(handler.process_queue(mem, &mut q).unwrap());
        vq.used().ring().ref_at(0).unwrap().load().len()
    }

    fn mem() -> crate::memory::GuestMemory {
        crate::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn fills_every_writable_byte() {
        let mem = mem();
        let counters = Arc::new(RngCounters::default());
        let mut h = RngHandler::new(Counting(0), counters.clone());
        let len = submit(&mem, &mut h, &[(0x10000, 8, true), (0x20000, 8, true)]);
        assert_eq!(len, 16);
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert_eq!(a, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b, [9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(counters.bytes.load(Ordering::Relaxed), 16);
        // Device-readable buffers are left alone; huge requests are capped.
        assert_eq!(submit(&mem, &mut h, &[(0x10000, 8, false)]), 0);
        assert_eq!(
            submit(&mem, &mut h, &[(0x10000, 0x80000, true)]),
            MAX_REQUEST_BYTES as u32
        );
    }

    #[test]
    fn the_host_pool_gives_different_bytes_each_time() {
        let mem = mem();
        let rng = super::Rng::new().unwrap();
        let mut h = RngHandler::new(rng.source.try_clone().unwrap(), rng.counters());
        assert_eq!(submit(&mem, &mut h, &[(0x10000, 32, true)]), 32);
        assert_eq!(submit(&mem, &mut h, &[(0x20000, 32, true)]), 32);
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Garbage chains never panic and never report more than they can hold.
        #[test]
        fn garbage_chains_never_panic(
            descs in prop::collection::vec(
                (prop_oneof![0x10000u64..0x10_0000, any::<u64>()], 0u32..200_000, any::<bool>()),
                1..6,
            ),
        ) {
            let mem = mem();
            let mut h = RngHandler::new(Counting(0), Arc::new(RngCounters::default()));
            let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            let len = submit(&mem, &mut h, &descs);
            prop_assert!(u64::from(len) <= writable.min(MAX_REQUEST_BYTES as u64));
        }
    }
}
