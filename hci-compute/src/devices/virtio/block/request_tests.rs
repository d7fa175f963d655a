//! virtio-blk request handling against virtio-queue's mock split queue.

use std::sync::Arc;

use hci_core::block::BlockDevice;
use hci_core::memory::MemBlockDevice;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::block::{BlockCounters, Executor};

const DISK: u64 = 1 << 20;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x40000;

struct Rig {
    mem: crate::memory::GuestMemory,
    disk: Arc<MemBlockDevice>,
    handler: RequestHandler,
    rt: Runner,
    counters: Arc<BlockCounters>,
}

/// (address, length, device-writable)
type Desc = (u64, u32, bool);

impl Rig {
    fn new(read_only: bool) -> Rig {
        let mem = crate::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let disk = Arc::new(MemBlockDevice::new(DISK));
        let counters = Arc::new(BlockCounters::default());
        let mut serial = [0u8; 20];
        serial[..4].copy_from_slice(b"disk");
        let handler = RequestHandler::new(disk.clone(), read_only, serial, counters.clone());
        Rig {
            mem,
            disk,
            handler,
            rt: Runner::new(Executor::Private).unwrap(),
            counters,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Submits one chain; returns (used len, status byte, used id).
    fn submit(&mut self, descs: &[Desc]) -> (u32, u8, u32) {
        self.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), 16);
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
        let done = self
            .handler
            .process_queue(&self.rt, &self.mem, &mut q)
            .unwrap();
        assert!(done);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used.len(), status, used.id())
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.rt.block_on(self.disk.read_at(&mut b, offset)).unwrap();
        b
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

#[test]
fn write_then_read_round_trips() {
    let mut r = Rig::new(false);
    let data = pattern(4096);
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    r.header(types::OUT, 8);
    let (len, status, _) = r.submit(&[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)]);
    assert_eq!((len, status), (1, S_OK));
    assert_eq!(r.disk_bytes(8 * 512, 4096), data);

    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    r.header(types::IN, 8);
    // The data is split over two descriptors; the status byte shares the second.
    let (len, status, _) = r.submit(&[
        (HDR, 16, false),
        (DATA, 1024, true),
        (DATA + 1024, 3072, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, status), (4097, S_OK));
    let mut back = vec![0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    assert_eq!(r.counters.read_bytes.load(Ordering::Relaxed), 4096);
    assert_eq!(r.counters.write_bytes.load(Ordering::Relaxed), 4096);
}

#[test]
fn flush_and_get_id() {
    let mut r = Rig::new(false);
    r.header(types::FLUSH, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).1, S_OK);
    r.header(types::GET_ID, 0);
    let (len, status, _) = r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!((len, status), (21, S_OK));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..5], b"disk\0");
}

fn segment(r: &Rig, at: u64, sector: u64, sectors: u32, flags: u32) {
    r.mem.write_obj(sector, GuestAddress(at)).unwrap();
    r.mem.write_obj(sectors, GuestAddress(at + 8)).unwrap();
    r.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes_clear_ranges() {
    let mut r = Rig::new(false);
    r.rt.block_on(r.disk.write_at(&[0xffu8; 8192], 0, Default::default()))
        .unwrap();
    segment(&r, DATA, 0, 4, 0);
    r.header(types::DISCARD, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
            .1,
        S_OK
    );
    segment(&r, DATA, 4, 4, 1);
    segment(&r, DATA + 16, 12, 4, 0);
    r.header(types::WRITE_ZEROES, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)])
            .1,
        S_OK
    );
    assert_eq!(r.disk_bytes(0, 4096), vec![0u8; 4096]);
    // Unknown flag bits and ragged segment lists are unsupported.
    segment(&r, DATA, 0, 1, 1);
    r.header(types::DISCARD, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
            .1,
        S_UNSUPP
    );
    r.header(types::WRITE_ZEROES, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)])
            .1,
        S_UNSUPP
    );
    // A segment past the end is an I/O error.
    segment(&r, DATA, DISK / 512, 1, 0);
    r.header(types::DISCARD, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
}

#[test]
fn bad_requests_get_error_statuses() {
    let mut r = Rig::new(false);
    // Unknown type.
    r.header(99, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).1, S_UNSUPP);
    // Past the end, and overflowing sector numbers.
    r.header(types::IN, DISK / 512);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
    r.header(types::OUT, u64::MAX);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
    // Not a whole number of sectors.
    r.header(types::OUT, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)])
            .1,
        S_IOERR
    );
    // Header too short, or device-writable.
    r.header(types::IN, 0);
    assert_eq!(r.submit(&[(HDR, 8, false), (STATUS, 1, true)]).1, S_IOERR);
    assert_eq!(r.submit(&[(HDR, 16, true), (STATUS, 1, true)]).1, S_IOERR);
    assert_eq!(r.counters.errors.load(Ordering::Relaxed), 6);
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut r = Rig::new(true);
    for kind in [types::OUT, types::DISCARD, types::WRITE_ZEROES] {
        r.header(kind, 0);
        segment(&r, DATA, 0, 1, 0);
        assert_eq!(
            r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
                .1,
            S_IOERR
        );
    }
    r.header(types::IN, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .1,
        S_OK
    );
}

#[test]
fn unmappable_chains_complete_without_a_status() {
    let mut r = Rig::new(false);
    r.header(types::IN, 0);
    // Data outside guest memory: the chain is returned with nothing written.
    let (len, status, _) = r.submit(&[
        (HDR, 16, false),
        (0x1_0000_0000, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, status), (0, 0xaa));
    // No writable byte at all: nowhere to put a status.
    let (len, status, _) = r.submit(&[(HDR, 16, false)]);
    assert_eq!((len, status), (0, 0xaa));
    // A huge length wrapping the address space.
    let (len, _, _) = r.submit(&[
        (HDR, 16, false),
        (u64::MAX - 10, u32::MAX, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(len, 0);
}

#[test]
fn data_larger_than_the_bounce_buffer_is_streamed() {
    let mut r = Rig::new(false);
    let len = 512 * 1024; // two bounce buffers
    let data = pattern(len);
    r.mem.write_slice(&data, GuestAddress(0x80000)).unwrap();
    r.header(types::OUT, 0);
    let (_, status, _) = r.submit(&[
        (HDR, 16, false),
        (0x80000, len as u32, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(status, S_OK);
    assert_eq!(r.disk_bytes(0, len), data);
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![0x10000u64..0x10_0000, any::<u64>(), Just(0xf_ffff)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the guest puts in a chain, the device completes it without
        /// panicking and never reports more bytes than the chain can take.
        #[test]
        fn garbage_chains_never_panic(
            descs in prop::collection::vec((addr(), 0u32..70_000, any::<bool>()), 1..6),
            kind in prop_oneof![0u32..16, any::<u32>()],
            sector in prop_oneof![0u64..4096, any::<u64>()],
            segment in (any::<u64>(), any::<u32>(), any::<u32>()),
        ) {
            let mut r = Rig::new(false);
            r.header(kind, sector);
            segment_at(&r, DATA, segment);
            let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            let (len, _, id) = r.submit(&descs);
            prop_assert!(u64::from(len) <= writable);
            prop_assert_eq!(id, 0);
        }
    }

    fn segment_at(r: &Rig, at: u64, (sector, sectors, flags): (u64, u32, u32)) {
        r.mem.write_obj(sector, GuestAddress(at)).unwrap();
        r.mem.write_obj(sectors, GuestAddress(at + 8)).unwrap();
        r.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }
}
