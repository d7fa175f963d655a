//! virtio-net frame handling against virtio-queue's mock split queue and a
//! fake frame backend.

use std::collections::VecDeque;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// An in-memory backend: frames to hand to the guest, frames it sent.
#[derive(Debug, Default)]
struct Fake {
    vnet_hdr: bool,
    inbound: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    refuse_sends: bool,
    broken: bool,
}

impl FrameIo for Fake {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        let f = self
            .inbound
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.refuse_sends {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        self.sent.push(frame.to_vec());
        Ok(frame.len())
    }

    fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }
}

/// (address, length, device-writable); a chain ends where `NEXT` is not set.
type Desc = (u64, u32, bool);

struct Rig<'a> {
    mem: &'a crate::memory::GuestMemory,
    vq: MockSplitQueue<'a, crate::memory::GuestMemory>,
    queue: Queue,
    next_desc: u16,
    handler: NetHandler<Fake>,
    counters: Arc<NetCounters>,
}

fn mem() -> crate::memory::GuestMemory {
    crate::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

impl<'a> Rig<'a> {
    fn new(mem: &'a crate::memory::GuestMemory, vnet_hdr: bool) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let queue = vq.create_queue().unwrap();
        let counters = Arc::new(NetCounters::default());
        let handler = NetHandler::new(
            Fake {
                vnet_hdr,
                ..Fake::default()
            },
            counters.clone(),
        );
        Rig {
            mem,
            vq,
            queue,
            next_desc: 0,
            handler,
            counters,
        }
    }

    /// Makes `chains` available to the device.
    fn post(&mut self, chains: &[&[Desc]]) {
        let mut raw = Vec::new();
        let first = self.next_desc;
        for chain in chains {
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let idx = first + raw.len() as u16;
                let mut flags = if write { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                raw.push(RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    idx + 1,
                )));
            }
        }
        self.vq.add_desc_chains(&raw, first).unwrap();
        self.next_desc += raw.len() as u16;
    }

    /// The `n`th used element: (descriptor head, length).
    fn used(&self, n: usize) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(n).unwrap().load();
        (e.id(), e.len())
    }

    fn used_count(&self) -> u16 {
        self.vq.used().idx().load()
    }

    fn rx(&mut self) -> (bool, RxState) {
        self.handler.process_rx(self.mem, &mut self.queue).unwrap()
    }

    fn tx(&mut self) -> bool {
        self.handler.process_tx(self.mem, &mut self.queue).unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn with_hdr(hdr: [u8; HDR_LEN], f: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_vec();
    v.extend_from_slice(f);
    v
}

const ONE_BUFFER_HDR: [u8; HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[test]
fn received_frames_fill_buffers_with_a_clean_header() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    let f = frame(60, 1);
    // The TAP's header has junk (e.g. DATA_VALID): the guest must see zeros and num_buffers 1.
    r.handler
        .io
        .inbound
        .push_back(with_hdr([2, 1, 0, 0, 9, 9, 9, 9, 9, 9, 0, 0], &f));
    r.post(&[&[(0x10000, 2048, true)]]);
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(r.used(0), (0, (HDR_LEN + 60) as u32));
    assert_eq!(r.read(0x10000, HDR_LEN + 60), with_hdr(ONE_BUFFER_HDR, &f));
    assert_eq!(r.counters.rx_packets.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.rx_bytes.load(Ordering::Relaxed), 60);
}

#[test]
fn a_backend_without_vnet_header_gets_one_synthesized() {
    let mem = mem();
    let mut r = Rig::new(&mem, false);
    let f = frame(100, 3);
    r.handler.io.inbound.push_back(f.clone());
    // Header and frame split over two descriptors.
    r.post(&[&[(0x10000, 8, true), (0x20000, 2000, true)]]);
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(r.used(0).1, (HDR_LEN + 100) as u32);
    let mut got = r.read(0x10000, 8);
    got.extend(r.read(0x20000, HDR_LEN - 8 + 100));
    assert_eq!(got, with_hdr(ONE_BUFFER_HDR, &f));
}

#[test]
fn frames_wait_for_buffers_then_flow() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    for seed in 0..3 {
        r.handler
            .io
            .inbound
            .push_back(with_hdr([0; HDR_LEN], &frame(64, seed)));
    }
    assert_eq!(r.rx(), (false, RxState::NeedBuffers));
    assert!(r.handler.has_pending());
    r.post(&[&[(0x10000, 2048, true)], &[(0x20000, 2048, true)]]);
    assert_eq!(r.rx(), (true, RxState::NeedBuffers));
    assert_eq!(r.used_count(), 2);
    r.post(&[&[(0x30000, 2048, true)], &[(0x40000, 2048, true)]]);
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(r.used_count(), 3);
    assert!(!r.handler.has_pending());
    // In order, none lost.
    for (i, addr) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
        assert_eq!(r.read(addr + HDR_LEN as u64, 64), frame(64, i as u8));
    }
}

#[test]
fn small_buffers_drop_the_frame_and_bad_buffers_keep_it() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    r.handler
        .io
        .inbound
        .push_back(with_hdr([0; HDR_LEN], &frame(1000, 1)));
    r.handler
        .io
        .inbound
        .push_back(with_hdr([0; HDR_LEN], &frame(200, 2)));
    r.post(&[
        &[(0x10000, 500, true)],        // too small: frame 1 dropped
        &[(0x1_0000_0000, 2048, true)], // outside memory: returned empty
        &[(0x20000, 2048, false)],      // device-readable only: too small
        &[(0x30000, 2048, true)],
    ]);
    r.handler
        .io
        .inbound
        .push_front(with_hdr([0; HDR_LEN], &frame(4, 0))); // a runt before them
    // The runt and frame 1 (buffer too small) are dropped; frame 2 survives the
    // unmappable buffer but not the read-only one; then the backend is empty.
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(r.used_count(), 3);
    assert_eq!((r.used(0).1, r.used(1).1, r.used(2).1), (0, 0, 0));
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 3);
    assert_eq!(r.counters.rx_errors.load(Ordering::Relaxed), 1);
    r.handler
        .io
        .inbound
        .push_back(with_hdr([0; HDR_LEN], &frame(300, 5)));
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(r.used(3), (3, (HDR_LEN + 300) as u32));
    assert_eq!(r.read(0x30000 + HDR_LEN as u64, 300), frame(300, 5));
}

#[test]
fn transmitted_frames_reach_the_backend_without_header_junk() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    let f = frame(80, 9);
    // The guest sets NEEDS_CSUM and a GSO type we never offered: zeroed.
    mem.write_slice(&[1, 3, 0, 1, 0, 2, 0, 3, 0, 4, 0, 0], GuestAddress(0x10000))
        .unwrap();
    mem.write_slice(&f[..30], GuestAddress(0x20000)).unwrap();
    mem.write_slice(&f[30..], GuestAddress(0x30000)).unwrap();
    r.post(&[&[
        (0x10000, HDR_LEN as u32, false),
        (0x20000, 30, false),
        (0x30000, 50, false),
    ]]);
    assert!(r.tx());
    assert_eq!(r.used(0), (0, 0));
    assert_eq!(r.handler.io.sent, vec![with_hdr([0; HDR_LEN], &f)]);
    assert_eq!(r.counters.tx_packets.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.tx_bytes.load(Ordering::Relaxed), 80);

    // Without a vnet header on the backend, only the frame goes out.
    let mut r = Rig::new(&mem, false);
    r.post(&[&[
        (0x10000, HDR_LEN as u32, false),
        (0x20000, 30, false),
        (0x30000, 50, false),
    ]]);
    assert!(r.tx());
    assert_eq!(r.handler.io.sent, vec![f]);
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    r.post(&[
        &[(0x10000, 10, false)], // shorter than a header + Ethernet header
        &[(0x10000, 70_000, false), (0x30000, 70_000, false)], // longer than any frame
        &[(0xf_fff0, 64, false)], // runs off the end of memory
        &[(0x10000, 64, true)],  // nothing to read
    ]);
    assert!(r.tx());
    assert_eq!(r.used_count(), 4);
    assert!(r.handler.io.sent.is_empty());
    assert_eq!(r.counters.tx_errors.load(Ordering::Relaxed), 4);
    // A backend refusing frames: dropped and counted, the chain still completes.
    r.handler.io.refuse_sends = true;
    r.post(&[&[(0x10000, 64, false)]]);
    assert!(r.tx());
    assert_eq!(r.counters.tx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(r.used_count(), 5);
}

#[test]
fn a_failing_backend_is_reported() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    r.post(&[&[(0x10000, 2048, true)]]);
    r.handler.io.broken = true;
    assert_eq!(r.rx(), (false, RxState::Failed));
    assert_eq!(r.counters.rx_errors.load(Ordering::Relaxed), 1);
    r.handler.io.broken = false;
    assert_eq!(r.rx(), (false, RxState::Drained));
}

#[test]
fn receive_stops_after_its_budget() {
    let mem = mem();
    let mut r = Rig::new(&mem, true);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 512);
    r.queue = vq.create_queue().unwrap();
    let raw: Vec<RawDescriptor> = (0..BUDGET + 10)
        .map(|i| {
            let addr = 0x20000 + (i as u64 % 8) * 0x1000;
            RawDescriptor::from(SplitDescriptor::new(
                addr,
                2048,
                VRING_DESC_F_WRITE as u16,
                0,
            ))
        })
        .collect();
    vq.add_desc_chains(&raw, 0).unwrap();
    for _ in 0..BUDGET + 5 {
        r.handler
            .io
            .inbound
            .push_back(with_hdr([0; HDR_LEN], &frame(64, 0)));
    }
    assert_eq!(r.rx(), (true, RxState::Budget));
    assert_eq!(vq.used().idx().load() as usize, BUDGET);
    assert_eq!(r.rx(), (true, RxState::Drained));
    assert_eq!(vq.used().idx().load() as usize, BUDGET + 5);
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![0x10000u64..0x10_0000, any::<u64>(), Just(0xf_fff0)]
    }

    fn chain() -> impl Strategy<Value = Vec<Desc>> {
        prop::collection::vec((addr(), 0u32..70_000, any::<bool>()), 1..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the guest posts, receive and transmit complete every chain
        /// without panicking, and never claim more bytes than a chain can hold.
        #[test]
        fn garbage_chains_never_panic(
            chains in prop::collection::vec(chain(), 1..6),
            frames in prop::collection::vec(0usize..3000, 0..6),
            vnet_hdr in any::<bool>(),
            transmit in any::<bool>(),
        ) {
            let mem = mem();
            let mut r = Rig::new(&mem, vnet_hdr);
            for (i, len) in frames.iter().enumerate() {
                r.handler.io.inbound.push_back(frame(*len, i as u8));
            }
            let refs: Vec<&[Desc]> = chains.iter().map(|c| c.as_slice()).collect();
            r.post(&refs);
            if transmit {
                prop_assert!(r.tx());
                prop_assert_eq!(usize::from(r.used_count()), chains.len());
            } else {
                r.rx();
            }
            for n in 0..usize::from(r.used_count()) {
                let (id, len) = r.used(n);
                // Chain k starts at the sum of the earlier chains' lengths.
                let mut start = 0u32;
                let mut found = None;
                for c in &chains {
                    if start == id {
                        found = Some(c);
                    }
                    start += c.len() as u32;
                }
                prop_assert!(found.is_some(), "used id {} is not a chain head", id);
                let c = found.unwrap();
                let writable: u64 = c.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
                prop_assert!(u64::from(len) <= writable);
                if transmit {
                    prop_assert_eq!(len, 0);
                }
            }
        }
    }
}
