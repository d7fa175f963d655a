//! The VM manager: builds a VM from a [`VmSpec`] and runs its lifecycle.
//!
//! A [`Vm`] owns the KVM VM, guest memory, buses and devices, one thread per
//! vCPU, and a control thread that reacts to guest exits (reset, power-off,
//! crash) by stopping every vCPU. Lifecycle calls are synchronous and
//! serialised; [`VmState`] changes are published on a `watch` channel.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use hci_core::block::BlockDevice;
use hci_core::compute::{ExitReason, VmState};
use tokio::sync::watch;
use tracing::{info, info_span, warn};

use crate::boot::{self, KernelConfig, mptable::MAX_CPUS};
use crate::console::ConsoleHub;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN, KBD_IRQ, KeyboardBusy, ResetTrigger};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, SerialDevice};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockCounters, Executor};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetCounters, TapSource};
use crate::devices::virtio::rng::{Rng, RngCounters};
use crate::devices::{Bus, IrqLine};
use crate::error::{Result, VmmError};
use crate::kvm;
use crate::memory::{
    self, GuestMemory, MemoryBacking, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::vcpu::{self, ExitHandlers, VcpuThread, VmEvent, Want};

/// How long vCPUs get to acknowledge a pause or stop.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most virtio devices (IRQs 5..=23 of the IO-APIC).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// One disk of a [`VmSpec`].
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Name, also the virtio-blk serial number.
    pub name: String,
    /// The data.
    pub device: Arc<dyn BlockDevice>,
    /// Present the disk read-only.
    pub read_only: bool,
}

/// One NIC of a [`VmSpec`] (virtio-net on a TAP).
#[derive(Debug, Clone)]
pub struct NicSpec {
    /// NIC name (stats are reported under it).
    pub name: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// MTU announced to the guest (0: none).
    pub mtu: u16,
    /// The TAP queue.
    pub tap: TapSource,
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// vCPU count.
    pub cpus: u32,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Kernel image (PVH ELF or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; virtio-mmio device announcements are appended.
    pub cmdline: String,
    /// virtio-blk disks, in order (the first virtio-mmio slots).
    pub disks: Vec<DiskSpec>,
    /// virtio-net NICs, in order (the slots after the disks).
    pub nics: Vec<NicSpec>,
    /// Add a virtio-rng entropy device (the slot after the NICs).
    pub entropy: bool,
    /// What backs guest RAM.
    pub memory_backing: MemoryBacking,
    /// Also append console output to this file.
    pub console_log: Option<PathBuf>,
}

struct Inner {
    name: String,
    cpus: u32,
    memory_bytes: u64,
    memory: Arc<GuestMemory>,
    // Keeps the VM, its irqchip and memory slots alive.
    kvm: kvm::Vm,
    // The MSRs a snapshot saves (probed at creation).
    saved_msrs: Vec<u32>,
    serial: Arc<Mutex<SerialDevice>>,
    pending_vcpus: Mutex<Vec<kvm::Vcpu>>,
    threads: Mutex<Vec<VcpuThread>>,
    handlers: ExitHandlers,
    events_rx: Mutex<Option<Receiver<VmEvent>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<(String, Arc<BlockCounters>)>,
    nics: Vec<(String, Arc<NetCounters>)>,
    entropy: Option<Arc<RngCounters>>,
    console: Arc<ConsoleHub>,
    i8042: Arc<Mutex<I8042>>,
    state: watch::Sender<VmState>,
    lifecycle: Mutex<()>,
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    created: Instant,
    started: OnceLock<Instant>,
}

/// A VM built by the KVM VMM.
#[derive(Clone)]
pub struct Vm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.inner.name)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

fn state_name(s: &VmState) -> String {
    match s {
        VmState::Created => "created".into(),
        VmState::Running => "running".into(),
        VmState::Paused => "paused".into(),
        VmState::Stopped(r) => format!("stopped ({r:?})"),
    }
}

impl Vm {
    /// Builds a VM (vCPUs created, kernel loaded, not running).
    pub fn new(spec: VmSpec, executor: Executor) -> Result<Vm> {
        Self::build(spec, executor, None)
    }

    /// Builds a VM to load a saved state into (see
    /// [`crate::snapshot`]): nothing is booted, and guest RAM is `memory`
    /// (already filled, e.g. by an incoming migration) or fresh zeroed memory.
    pub fn new_for_restore(
        spec: VmSpec,
        executor: Executor,
        memory: Option<Arc<GuestMemory>>,
    ) -> Result<Vm> {
        let memory = match memory {
            Some(m) => m,
            None => memory::create_guest_memory_backed(spec.memory, &spec.memory_backing)?,
        };
        Self::build(spec, executor, Some(memory))
    }

    fn build(
        spec: VmSpec,
        executor: Executor,
        restore_into: Option<Arc<GuestMemory>>,
    ) -> Result<Vm> {
        let _span = info_span!("create_vm", vm = %spec.name).entered();
        let created = Instant::now();
        if spec.cpus == 0 || spec.cpus > MAX_CPUS {
            return Err(VmmError::invalid(
                "vCPU count",
                format!("{} is outside 1..={MAX_CPUS}", spec.cpus),
            ));
        }
        let devices = spec.disks.len() + spec.nics.len() + usize::from(spec.entropy);
        if devices > MAX_VIRTIO_DEVICES {
            return Err(VmmError::invalid(
                "devices",
                format!(
                    "{devices} virtio devices (disks, NICs, entropy) requested; at most {MAX_VIRTIO_DEVICES} are supported"
                ),
            ));
        }
        kvm::install_kick_handler()?;
        let booting = restore_into.is_none();
        let memory = match restore_into {
            Some(m) => m,
            None => memory::create_guest_memory_backed(spec.memory, &spec.memory_backing)?,
        };
        let system = kvm::System::open()?;
        if spec.cpus as usize > system.max_vcpus() {
            return Err(VmmError::invalid(
                "vCPU count",
                format!("KVM allows at most {}", system.max_vcpus()),
            ));
        }
        let kvm_vm = system.create_vm(Arc::clone(&memory))?;
        let (events_tx, events_rx) = mpsc::channel();

        let log = match &spec.console_log {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| VmmError::io("open the console log", e))?,
            ),
            None => None,
        };
        let console = ConsoleHub::new(log);
        let mut pio = Bus::new();
        let serial_irq = eventfd()?;
        kvm_vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = SerialDevice::new(IrqLine(serial_irq), &console);
        pio.insert("com1", COM1_BASE, COM1_LEN, serial.clone())?;
        let tx = events_tx.clone();
        let reset = ResetTrigger(Arc::new(move || {
            let _ = tx.send(VmEvent::GuestExit(ExitReason::Reset));
        }));
        let kbd_irq = eventfd()?;
        kvm_vm.register_irqfd(&kbd_irq, KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(reset, Some(IrqLine(kbd_irq)))));
        pio.insert("i8042", I8042_BASE, I8042_LEN, i8042.clone())?;

        let mut virtio = VirtioSlots {
            kvm: &kvm_vm,
            memory: &memory,
            mmio: Bus::new(),
            transports: Vec::new(),
            cmdline: spec.cmdline.clone(),
        };
        let mut disks = Vec::new();
        for disk in &spec.disks {
            let block = Block::new(
                &disk.name,
                Arc::clone(&disk.device),
                disk.read_only,
                executor.clone(),
            );
            disks.push((disk.name.clone(), block.counters()));
            virtio.add("virtio-blk", Box::new(block))?;
        }
        let mut nics = Vec::new();
        for nic in &spec.nics {
            let net = Net::new(&nic.name, nic.mac, nic.mtu, &nic.tap)?;
            nics.push((nic.name.clone(), net.counters()));
            virtio.add("virtio-net", Box::new(net))?;
        }
        let mut entropy = None;
        if spec.entropy {
            let rng = Rng::new()?;
            entropy = Some(rng.counters());
            virtio.add("virtio-rng", Box::new(rng))?;
        }
        let VirtioSlots {
            mmio,
            transports,
            cmdline,
            ..
        } = virtio;

        let entry = if booting {
            Some(boot::load(
                &memory,
                &KernelConfig {
                    kernel: &spec.kernel,
                    initrd: spec.initrd.as_deref(),
                    cmdline: cmdline.trim(),
                    cpus: spec.cpus,
                },
            )?)
        } else {
            None
        };
        let mut vcpus = Vec::new();
        for id in 0..spec.cpus {
            let vcpu = kvm_vm.create_vcpu(id, spec.cpus)?;
            if id == 0
                && let Some(entry) = &entry
            {
                vcpu.set_boot_state(entry)?;
            }
            vcpus.push(vcpu);
        }
        let saved_msrs = vcpus
            .first()
            .map(|v| kvm_vm.saved_msrs(v))
            .unwrap_or_default();
        info!(cpus = spec.cpus, memory = spec.memory, disks = spec.disks.len(), nics = spec.nics.len(), elapsed = ?created.elapsed(), "VM created");
        let (state, _) = watch::channel(VmState::Created);
        Ok(Vm {
            inner: Arc::new(Inner {
                name: spec.name,
                cpus: spec.cpus,
                memory_bytes: spec.memory,
                memory,
                kvm: kvm_vm,
                saved_msrs,
                serial,
                pending_vcpus: Mutex::new(vcpus),
                threads: Mutex::new(Vec::new()),
                handlers: ExitHandlers {
                    pio: Arc::new(pio),
                    mmio: Arc::new(mmio),
                    events: events_tx,
                },
                events_rx: Mutex::new(Some(events_rx)),
                transports,
                disks,
                nics,
                entropy,
                console,
                i8042,
                state,
                lifecycle: Mutex::new(()),
                exit: Mutex::new(None),
                exited: Condvar::new(),
                created,
                started: OnceLock::new(),
            }),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.inner.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<VmState> {
        self.inner.state.subscribe()
    }

    /// The serial console.
    pub fn console(&self) -> &Arc<ConsoleHub> {
        &self.inner.console
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.inner.memory
    }

    /// Guest memory size, bytes.
    pub fn memory_size(&self) -> u64 {
        self.inner.memory_bytes
    }

    /// Number of vCPUs.
    pub fn cpus(&self) -> u32 {
        self.inner.cpus
    }

    /// When [`Vm::new`] began.
    pub fn created_at(&self) -> Instant {
        self.inner.created
    }

    /// When [`Vm::start`] ran.
    pub fn started_at(&self) -> Option<Instant> {
        self.inner.started.get().copied()
    }

    /// Per-disk (name, counters).
    pub fn disk_counters(&self) -> &[(String, Arc<BlockCounters>)] {
        &self.inner.disks
    }

    /// Per-NIC (name, counters).
    pub fn nic_counters(&self) -> &[(String, Arc<NetCounters>)] {
        &self.inner.nics
    }

    /// The entropy device's counters, if the VM has one.
    pub fn entropy_counters(&self) -> Option<&Arc<RngCounters>> {
        self.inner.entropy.as_ref()
    }

    /// (total vCPU CPU time, total exits) over all vCPU threads.
    pub fn vcpu_usage(&self) -> (Duration, u64) {
        let threads = self.inner.lock_threads();
        threads.iter().fold((Duration::ZERO, 0), |(t, e), v| {
            (t + v.control.cpu_time(), e + v.control.exits())
        })
    }

    /// Number of live vCPU threads.
    pub fn running_vcpu_threads(&self) -> usize {
        self.inner
            .lock_threads()
            .iter()
            .filter(|t| !t.control.exited())
            .count()
    }

    /// Starts the vCPUs.
    pub fn start(&self) -> Result<()> {
        self.launch("start", Want::Run)?;
        info!(vm = %self.inner.name, "VM started");
        Ok(())
    }

    /// Starts the vCPU threads parked: the VM goes from created to paused
    /// (a restored VM, resumed with [`Vm::resume`]).
    pub fn start_paused(&self) -> Result<()> {
        self.launch("start paused", Want::Pause)?;
        info!(vm = %self.inner.name, "VM started paused");
        Ok(())
    }

    /// From created to running (`Want::Run`) or paused (`Want::Pause`):
    /// the control thread, then one thread per vCPU in that state.
    fn launch(&self, op: &'static str, want: Want) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.lock_lifecycle();
        let state = self.state();
        if state != VmState::Created {
            return Err(VmmError::BadState {
                op,
                state: state_name(&state),
            });
        }
        let _ = inner.started.set(Instant::now());
        let rx = inner
            .events_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            let weak = Arc::downgrade(inner);
            std::thread::Builder::new()
                .name(format!("vmm-{}", inner.name))
                .spawn(move || control_loop(weak, rx))
                .map_err(|e| VmmError::io("spawn the VM control thread", e))?;
        }
        let vcpus = std::mem::take(
            &mut *inner
                .pending_vcpus
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut threads = inner.lock_threads();
        for vcpu in vcpus {
            threads.push(
                vcpu::spawn_as(&inner.name, vcpu, inner.handlers.clone(), want)
                    .map_err(|e| VmmError::io("spawn a vCPU thread", e))?,
            );
        }
        let state = if want == Want::Pause {
            // Parked threads acknowledge before the VM counts as paused.
            if !threads
                .iter()
                .all(|t| t.drive(Want::Pause, VCPU_ACK_TIMEOUT))
            {
                return Err(VmmError::Timeout(op));
            }
            VmState::Paused
        } else {
            VmState::Running
        };
        drop(threads);
        inner.state.send_replace(state);
        Ok(())
    }

    /// The KVM VM (for dirty logging during a migration).
    pub(crate) fn kvm(&self) -> &kvm::Vm {
        &self.inner.kvm
    }

    /// Stops every virtio device's workers (the VM must be paused), so no
    /// VMM thread writes guest memory until [`Vm::unquiesce_devices`].
    pub fn quiesce_devices(&self) {
        for t in &self.inner.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    /// Restarts devices stopped by [`Vm::quiesce_devices`].
    pub fn unquiesce_devices(&self) -> Result<()> {
        for t in &self.inner.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).unquiesce()?;
        }
        Ok(())
    }

    /// Reads the whole machine state except memory: vCPUs, irqchip, PIT,
    /// clock and devices. The VM must be paused and its devices quiesced.
    pub fn capture(&self) -> Result<crate::snapshot::MachineState> {
        let inner = &self.inner;
        let _g = inner.lock_lifecycle();
        let state = self.state();
        if state != VmState::Paused {
            return Err(VmmError::BadState {
                op: "save",
                state: state_name(&state),
            });
        }
        let xsave_fits = inner.kvm.xsave_fits();
        let mut vcpus = Vec::new();
        for t in inner.lock_threads().iter() {
            let msrs = inner.saved_msrs.clone();
            let s = t
                .control
                .run_parked(move |v| v.save_state(&msrs, xsave_fits), VCPU_ACK_TIMEOUT)
                .ok_or(VmmError::Timeout("read vCPU state"))??;
            vcpus.push(s);
        }
        let kvm = inner.kvm.save_state()?;
        let serial = inner
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let i8042 = inner
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot();
        let transports = inner
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).snapshot())
            .collect();
        Ok(crate::snapshot::MachineState {
            cpus: inner.cpus,
            memory: inner.memory_bytes,
            vcpus,
            kvm,
            serial,
            i8042,
            transports,
            handover: Vec::new(),
        })
    }

    /// Loads a machine state into a VM built by [`Vm::new_for_restore`]
    /// (not started yet); then [`Vm::start_paused`] and [`Vm::resume`].
    pub fn load(&self, s: &crate::snapshot::MachineState) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.lock_lifecycle();
        let state = self.state();
        if state != VmState::Created {
            return Err(VmmError::BadState {
                op: "restore",
                state: state_name(&state),
            });
        }
        if s.cpus != inner.cpus || s.memory != inner.memory_bytes {
            return Err(VmmError::invalid(
                "saved state",
                format!(
                    "it has {} vCPUs and {} bytes of memory; this VM has {} and {}",
                    s.cpus, s.memory, inner.cpus, inner.memory_bytes
                ),
            ));
        }
        if s.transports.len() != inner.transports.len() {
            return Err(VmmError::invalid(
                "saved state",
                format!(
                    "it has {} virtio devices; this VM has {}",
                    s.transports.len(),
                    inner.transports.len()
                ),
            ));
        }
        inner.kvm.restore_state(&s.kvm)?;
        {
            let vcpus = inner
                .pending_vcpus
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if vcpus.len() != s.vcpus.len() {
                return Err(VmmError::invalid("saved state", "vCPU count differs"));
            }
            for (v, st) in vcpus.iter().zip(&s.vcpus) {
                v.restore_state(st)?;
            }
        }
        inner
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&s.serial)
            .map_err(|e| VmmError::io("restore the serial port", e))?;
        inner
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&s.i8042);
        for (t, st) in inner.transports.iter().zip(&s.transports) {
            t.lock().unwrap_or_else(|p| p.into_inner()).restore(st)?;
        }
        Ok(())
    }

    /// Parks every vCPU.
    pub fn pause(&self) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.lock_lifecycle();
        let state = self.state();
        if state != VmState::Running {
            return Err(VmmError::BadState {
                op: "pause",
                state: state_name(&state),
            });
        }
        let threads = inner.lock_threads();
        for t in threads.iter() {
            t.control.request(Want::Pause);
        }
        if !threads
            .iter()
            .all(|t| t.drive(Want::Pause, VCPU_ACK_TIMEOUT))
        {
            // Leave the VM as it was: running.
            for t in threads.iter() {
                t.control.request(Want::Run);
            }
            return Err(VmmError::Timeout("pause"));
        }
        inner.state.send_replace(VmState::Paused);
        info!(vm = %inner.name, "VM paused");
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.lock_lifecycle();
        let state = self.state();
        if state != VmState::Paused {
            return Err(VmmError::BadState {
                op: "resume",
                state: state_name(&state),
            });
        }
        for t in inner.lock_threads().iter() {
            t.control.request(Want::Run);
        }
        inner.state.send_replace(VmState::Running);
        info!(vm = %inner.name, "VM resumed");
        Ok(())
    }

    /// Asks the guest to shut down by pressing Ctrl-Alt-Del on its
    /// keyboard (Linux reboots, which ends the VM with
    /// [`ExitReason::Reset`]). Only a running VM can be asked; the guest may
    /// ignore it.
    pub fn send_ctrl_alt_del(&self) -> Result<()> {
        let state = self.state();
        if state != VmState::Running {
            return Err(VmmError::BadState {
                op: "shut down",
                state: state_name(&state),
            });
        }
        let mut kbd = self.inner.i8042.lock().unwrap_or_else(|p| p.into_inner());
        kbd.ctrl_alt_del()
            .map_err(|KeyboardBusy| VmmError::Device {
                device: "i8042".into(),
                reason: KeyboardBusy.to_string(),
            })?;
        info!(vm = %self.inner.name, "Ctrl-Alt-Del sent");
        Ok(())
    }

    /// Stops the VM at once (a no-op if it already stopped).
    pub fn kill(&self) {
        self.inner.stop(ExitReason::Killed);
    }

    /// Blocks until the VM stops or `timeout` passes; returns the reason if stopped.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.inner.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = exit.as_ref() {
                return Some(r.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            exit = self
                .inner
                .exited
                .wait_timeout(exit, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Inner {
    fn lock_threads(&self) -> MutexGuard<'_, Vec<VcpuThread>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_lifecycle(&self) -> MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops vCPUs and devices and records `reason` (the first reason wins).
    fn stop(&self, reason: ExitReason) {
        let _g = self.lock_lifecycle();
        if matches!(*self.state.borrow(), VmState::Stopped(_)) {
            return;
        }
        let threads = std::mem::take(&mut *self.lock_threads());
        for t in &threads {
            t.control.request(Want::Stop);
        }
        for t in &threads {
            if !t.drive(Want::Stop, VCPU_ACK_TIMEOUT) {
                warn!(vm = %self.name, "a vCPU did not stop in time; waiting for it");
            }
        }
        for t in threads {
            t.join();
        }
        for t in &self.transports {
            // Stop device workers and let go of host resources (TAP queues):
            // a stopped VM never runs again.
            t.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        }
        let _ = self.handlers.events.send(VmEvent::Shutdown);
        self.console.close();
        info!(vm = %self.name, ?reason, "VM stopped");
        *self.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        self.exited.notify_all();
        self.state.send_replace(VmState::Stopped(reason));
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop(ExitReason::Killed);
    }
}

/// Turns guest exits reported by vCPUs and devices into a VM stop.
fn control_loop(vm: Weak<Inner>, rx: Receiver<VmEvent>) {
    // The first event decides: a guest exit stops the VM; Shutdown means it already stopped.
    if let Ok(VmEvent::GuestExit(reason)) = rx.recv()
        && let Some(inner) = vm.upgrade()
    {
        inner.stop(reason);
    }
}

/// Places virtio devices in consecutive virtio-mmio slots, each with its IRQ
/// (irqfd), queue-notify ioeventfds and a `virtio_mmio.device=` announcement.
struct VirtioSlots<'a> {
    kvm: &'a kvm::Vm,
    memory: &'a Arc<GuestMemory>,
    mmio: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline: String,
}

impl VirtioSlots<'_> {
    fn add(&mut self, label: &'static str, device: Box<dyn VirtioDevice>) -> Result<()> {
        let slot = self.transports.len();
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + slot as u32;
        let transport = MmioTransport::new(device, Arc::clone(self.memory), eventfd()?)?;
        self.kvm.register_irqfd(transport.irq_event(), irq)?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            self.kvm
                .register_mmio_ioeventfd(evt, base + QUEUE_NOTIFY_OFFSET, q as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(label, base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.transports.push(transport);
        self.cmdline
            .push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(())
    }
}

fn eventfd() -> Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::io("create an eventfd", e))
}
