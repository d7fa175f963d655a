//! virtio-mmio register handling, with a fake device.

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::ActiveQueue;

#[derive(Default)]
struct Seen {
    activations: usize,
    resets: usize,
    releases: usize,
    features: u64,
    queues: usize,
    positions: Vec<(u16, u16)>,
}

struct Fake(Arc<Mutex<Seen>>);

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: Arc<GuestMemory>,
        features: u64,
        q: Vec<ActiveQueue>,
        _: Arc<Interrupt>,
    ) -> Result<()> {
        let mut s = self.0.lock().unwrap();
        s.activations += 1;
        s.features = features;
        s.queues = q.len();
        s.positions = q
            .iter()
            .map(|a| (a.queue.next_avail(), a.queue.next_used()))
            .collect();
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
    fn release(&mut self) {
        self.0.lock().unwrap().releases += 1;
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Seen>>) {
    let mem =
        Arc::new(crate::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    transport_on(mem)
}

fn transport_on(mem: Arc<GuestMemory>) -> (MmioTransport, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let t = MmioTransport::new(
        Box::new(Fake(seen.clone())),
        mem,
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    (t, seen)
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn set_up_queue(t: &mut MmioTransport, size: u32) {
    w32(t, reg::QUEUE_SEL, 0);
    w32(t, reg::QUEUE_NUM, size);
    w32(t, reg::QUEUE_DESC_LOW, 0x1000);
    w32(t, reg::QUEUE_AVAIL_LOW, 0x2000);
    w32(t, reg::QUEUE_USED_LOW, 0x3000);
    w32(t, reg::QUEUE_READY, 1);
}

fn negotiate(t: &mut MmioTransport, high: u32) -> u32 {
    w32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(t, reg::DRIVER_FEATURES_SEL, 1);
    w32(t, reg::DRIVER_FEATURES, high);
    w32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    r32(t, reg::STATUS)
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(r32(&mut t, reg::MAGIC), MAGIC);
    assert_eq!(r32(&mut t, reg::VERSION), 2);
    assert_eq!(r32(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 16);
    w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1);
    let mut b = [0u8; 2];
    t.read(reg::CONFIG + 2, &mut b);
    assert_eq!(b, [3, 4]);
    t.read(reg::CONFIG + 3, &mut b);
    assert_eq!(b, [4, 0]);
}

#[test]
fn driver_ok_activates_with_negotiated_features() {
    let (mut t, seen) = transport();
    assert_ne!(negotiate(&mut t, 1) & status::FEATURES_OK, 0);
    set_up_queue(&mut t, 16);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            (s.activations, s.features, s.queues),
            (1, VIRTIO_F_VERSION_1, 1)
        );
    }
    // Queue registers are frozen once live; a reset stops the device.
    w32(&mut t, reg::QUEUE_NUM, 4);
    w32(&mut t, reg::STATUS, 0);
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(r32(&mut t, reg::STATUS), 0);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn a_shut_down_transport_never_goes_live_again() {
    let (mut t, seen) = transport();
    negotiate(&mut t, 1);
    set_up_queue(&mut t, 16);
    let live = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    w32(&mut t, reg::STATUS, live);
    t.shutdown();
    {
        let s = seen.lock().unwrap();
        assert_eq!((s.activations, s.resets, s.releases), (1, 1, 1));
    }
    assert_eq!(r32(&mut t, reg::STATUS), 0);
    negotiate(&mut t, 1);
    set_up_queue(&mut t, 16);
    w32(&mut t, reg::STATUS, live);
    assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(seen.lock().unwrap().activations, 1);
}

#[test]
fn features_without_version_1_or_unoffered_are_refused() {
    let (mut t, _) = transport();
    assert_eq!(negotiate(&mut t, 0) & status::FEATURES_OK, 0);
    let (mut t, _) = transport();
    assert_eq!(negotiate(&mut t, 1 | 2) & status::FEATURES_OK, 0);
}

#[test]
fn invalid_queue_needs_reset_instead_of_activating() {
    let (mut t, seen) = transport();
    negotiate(&mut t, 1);
    set_up_queue(&mut t, 16);
    w32(&mut t, reg::QUEUE_READY, 0);
    w32(&mut t, reg::QUEUE_DESC_HIGH, 1); // outside guest memory
    w32(&mut t, reg::QUEUE_READY, 1);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(seen.lock().unwrap().activations, 0);
}

#[test]
fn notify_and_interrupt_ack() {
    let (mut t, _) = transport();
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(t.queue_events()[0].read().unwrap(), 1);
    w32(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
    t.interrupt.signal_used_queue();
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 1);
    w32(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn garbage_accesses_never_panic() {
    let (mut t, _) = transport();
    let mut seed: u64 = 0x1234_5678;
    for _ in 0..20_000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (seed >> 33) % 0x140;
        let len = [1usize, 2, 3, 4, 8][(seed >> 20) as usize % 5];
        let val = (seed >> 8).to_le_bytes();
        if seed & 1 == 0 {
            t.write(off, &val[..len]);
        } else {
            let mut b = vec![0u8; len];
            t.read(off, &mut b);
        }
    }
}

#[test]
fn quiesce_snapshot_and_restore_keep_queue_positions() {
    use vm_memory::Bytes;
    let mem =
        Arc::new(crate::memory::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let (mut t, seen) = transport_on(Arc::clone(&mem));
    negotiate(&mut t, 1);
    set_up_queue(&mut t, 16);
    w32(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(seen.lock().unwrap().activations, 1);
    // The device completed 5 requests: the used ring's idx (at used + 2) is 5.
    mem.write_obj(5u16, GuestAddress(0x3002)).unwrap();
    t.quiesce();
    assert_eq!(seen.lock().unwrap().resets, 1);
    let snap = t.snapshot();
    assert!(snap.active);
    assert_eq!(
        (
            snap.queues[0].next_avail,
            snap.queues[0].next_used,
            snap.queues[0].size
        ),
        (5, 5, 16)
    );
    // The source carries on from where it stopped.
    t.unquiesce().unwrap();
    assert_eq!(seen.lock().unwrap().activations, 2);
    assert_eq!(seen.lock().unwrap().positions, vec![(5, 5)]);

    // A fresh transport (the restore side) goes live at the same positions.
    let (mut t2, seen2) = transport();
    let json = serde_json::to_vec(&snap).unwrap();
    t2.restore(&serde_json::from_slice(&json).unwrap()).unwrap();
    assert_eq!(seen2.lock().unwrap().activations, 1);
    assert_eq!(seen2.lock().unwrap().positions, vec![(5, 5)]);
    assert_eq!(r32(&mut t2, reg::STATUS), r32(&mut t, reg::STATUS));
    assert_eq!(r32(&mut t2, reg::QUEUE_NUM_MAX), 16);

    // Another device type is refused.
    let mut other = snap.clone();
    other.device_type = 7;
    let (mut t3, _) = transport();
    assert!(t3.restore(&other).is_err());
}
