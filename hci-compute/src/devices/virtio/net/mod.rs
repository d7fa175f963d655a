//! virtio-net (virtio spec 5.1) over one TAP queue.
//!
//! Two queues (receive 0, transmit 1), no offloads, no mergeable buffers, no
//! control queue: features are `VERSION_1`, `MAC`, `STATUS` (link always up)
//! and `MTU` when one is set. One worker thread per device waits in `epoll`
//! on the TAP descriptor and on both queues' notification eventfds (KVM
//! ioeventfds) and raises the device's interrupt (a KVM irqfd); frame handling
//! itself lives in [`rxtx`].
//!
//! The TAP comes either by name (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, in the VMM's network namespace) or as an open queue
//! descriptor, e.g. one of hci-net's `TapHandle::fds` — the only way when the
//! port's owner keeps its single queue attached.

pub mod rxtx;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

use tracing::{debug, info_span, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use self::rxtx::{FrameIo, HDR_LEN, MAX_FRAME, NetHandler, RxState};
use super::{
    ActiveQueue, DEVICE_ID_NET, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};
use crate::error::{Result, VmmError};
use crate::memory::GuestMemory;
use crate::sys::tap::Tap;

/// Feature bits (virtio spec 5.1.3).
pub mod features {
    /// The device reports its MTU in config space.
    pub const MTU: u64 = 1 << 3;
    /// The device has a MAC address in config space.
    pub const MAC: u64 = 1 << 5;
    /// The config space has a link status field.
    pub const STATUS: u64 = 1 << 16;
}

/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Where a NIC's TAP comes from.
#[derive(Debug, Clone)]
pub enum TapSource {
    /// Attach to the TAP of this name in the VMM's network namespace.
    Name(String),
    /// Use this attached TAP queue descriptor (it is duplicated, not consumed).
    Fd(Arc<OwnedFd>),
}

/// Traffic counters of one NIC, from the guest's point of view.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, no virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames for the guest dropped (buffer too small, runt frames).
    pub rx_dropped: AtomicU64,
    /// Receive errors (unmappable buffers, backend read failures).
    pub rx_errors: AtomicU64,
    /// Frames the guest sent.
    pub tx_packets: AtomicU64,
    /// Bytes the guest sent (Ethernet frames, no virtio header).
    pub tx_bytes: AtomicU64,
    /// Frames the backend refused.
    pub tx_dropped: AtomicU64,
    /// Malformed transmit chains.
    pub tx_errors: AtomicU64,
}

impl FrameIo for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tap::recv(self, buf)
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::send(self, frame)
    }

    fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr()
    }
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-net device backed by a TAP queue.
pub struct Net {
    name: String,
    mac: [u8; 6],
    mtu: u16,
    ifname: String,
    /// `None` once released.
    tap: Option<Tap>,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.name)
            .field("tap", &self.ifname)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A NIC named `name` with guest MAC `mac` on the TAP from `source`; an
    /// `mtu` of 0 leaves the MTU to the guest.
    pub fn new(name: &str, mac: [u8; 6], mtu: u16, source: &TapSource) -> Result<Self> {
        let opened = match source {
            TapSource::Name(ifname) => {
                Tap::open(ifname).map_err(|e| (format!("cannot attach to TAP {ifname}"), e))
            }
            TapSource::Fd(fd) => fd
                .try_clone()
                .and_then(Tap::from_fd)
                .map_err(|e| ("cannot use the TAP descriptor".to_string(), e)),
        };
        let tap = opened.map_err(|(what, e)| VmmError::Device {
            device: name.to_string(),
            reason: format!("{what}: {e}"),
        })?;
        debug!(
            nic = name,
            tap = tap.ifname(),
            vnet_hdr = tap.vnet_hdr(),
            "TAP attached"
        );
        Ok(Net {
            name: name.to_string(),
            mac,
            mtu,
            ifname: tap.ifname().to_string(),
            tap: Some(tap),
            counters: Arc::new(NetCounters::default()),
            worker: None,
        })
    }

    /// This NIC's traffic counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }

    /// Name of the TAP interface.
    pub fn tap_name(&self) -> &str {
        &self.ifname
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | features::MAC | features::STATUS;
        if self.mtu >= 68 {
            f |= features::MTU;
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
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<()> {
        self.reset();
        let failed = |reason: &str| VmmError::Device {
            device: self.name.clone(),
            reason: reason.into(),
        };
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                RX_QUEUE => rx = Some(q),
                TX_QUEUE => tx = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(failed(
                "the receive and transmit queues must both be set up",
            ));
        };
        let tap = self
            .tap
            .as_ref()
            .ok_or_else(|| failed("the TAP was released"))?
            .try_clone()
            .map_err(|e| VmmError::io("duplicate the TAP descriptor", e))?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("create an eventfd", e))?;
        let stop_rx = stop
            .try_clone()
            .map_err(|e| VmmError::io("clone an eventfd", e))?;
        let worker = NetWorker {
            handler: NetHandler::new(tap, Arc::clone(&self.counters)),
            mem,
            rx,
            tx,
            interrupt,
            stop: stop_rx,
        };
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-net-{name}"))
            .spawn(move || {
                let _span = info_span!("virtio_net", nic = %name).entered();
                if let Err(e) = worker.run() {
                    warn!(error = %e, "virtio-net worker stopped");
                }
                debug!("virtio-net worker stopped");
            })
            .map_err(|e| VmmError::io("spawn the virtio-net worker", e))?;
        self.worker = Some(Worker { stop, thread });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop.write(1);
            let _ = w.thread.join();
        }
    }

    fn release(&mut self) {
        self.reset();
        self.tap = None;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;

/// Why a worker gave up.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("epoll failed")]
    Epoll(#[source] std::io::Error),
    #[error("a queue's used ring cannot be written")]
    Queue(#[source] virtio_queue::Error),
}

/// The device's event loop: TAP readable → receive, notifications → move frames.
struct NetWorker {
    handler: NetHandler<Tap>,
    mem: Arc<GuestMemory>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    interrupt: Arc<Interrupt>,
    stop: EventFd,
}

impl NetWorker {
    fn run(mut self) -> std::result::Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let tap_fd = self.handler.io().as_raw_fd();
        for (fd, token) in [
            (self.stop.as_raw_fd(), TOKEN_STOP),
            (self.rx.notify.as_raw_fd(), TOKEN_RX),
            (self.tx.notify.as_raw_fd(), TOKEN_TX),
            (tap_fd, TOKEN_TAP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(WorkerError::Epoll)?;
        }
        // Level-triggered; removed (not just masked: EPOLLERR is always
        // reported) while a frame waits for buffers, and for good once the
        // TAP fails.
        let mut tap_watched = true;
        // Buffers or frames may already be queued from before activation.
        self.transmit()?;
        let mut state = self.receive()?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            let want = matches!(state, RxState::Drained | RxState::Budget);
            if want != tap_watched {
                let (op, set) = if want {
                    (ControlOperation::Add, EventSet::IN)
                } else {
                    (ControlOperation::Delete, EventSet::empty())
                };
                epoll
                    .ctl(op, tap_fd, EpollEvent::new(set, TOKEN_TAP))
                    .map_err(WorkerError::Epoll)?;
                tap_watched = want;
            }
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            let (mut rx, mut tx) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_RX => {
                        let _ = self.rx.notify.read();
                        rx = true;
                    }
                    TOKEN_TX => {
                        let _ = self.tx.notify.read();
                        tx = true;
                    }
                    TOKEN_TAP => rx = true,
                    _ => {}
                }
            }
            if tx {
                self.transmit()?;
            }
            if rx && state != RxState::Failed {
                state = self.receive()?;
                if state == RxState::Failed {
                    warn!("the TAP cannot be read any more; receive stopped");
                }
            }
        }
    }

    fn transmit(&mut self) -> std::result::Result<(), WorkerError> {
        let used = self
            .handler
            .process_tx(&self.mem, &mut self.tx.queue)
            .map_err(WorkerError::Queue)?;
        if used {
            signal(&self.interrupt, &self.mem, &mut self.tx.queue);
        }
        Ok(())
    }

    /// Receives what it can; says why it stopped (while a frame waits for
    /// guest buffers, the guest's notification resumes it).
    fn receive(&mut self) -> std::result::Result<RxState, WorkerError> {
        let (used, state) = self
            .handler
            .process_rx(&self.mem, &mut self.rx.queue)
            .map_err(WorkerError::Queue)?;
        if used {
            signal(&self.interrupt, &self.mem, &mut self.rx.queue);
        }
        Ok(state)
    }
}

fn signal(interrupt: &Interrupt, mem: &GuestMemory, queue: &mut Queue) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}
