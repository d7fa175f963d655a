//! vCPU threads: the run loop and the run/pause/stop state machine.
//!
//! Each vCPU runs on its own thread, looping on `KVM_RUN` and dispatching
//! port-I/O and MMIO exits to the buses. Another thread changes what a vCPU
//! should do through its [`VcpuControl`]: it records the request, sets the
//! vCPU's `immediate_exit` flag and signals the thread, so a vCPU inside the
//! guest or about to enter it comes back and parks (pause) or returns (stop).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hci_core::compute::ExitReason;
use tracing::{debug, info_span, warn};
use vmm_sys_util::signal::Killable;

use crate::devices::Bus;
use crate::kvm::{self, Kick, SystemEventKind, Vcpu, VmExit};
use crate::sys;

/// What a vCPU should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Park until told otherwise.
    Pause,
    /// Leave the thread.
    Stop,
}

/// Something the VM manager must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest ended (reset, power-off, crash) or the VMM failed.
    GuestExit(ExitReason),
    /// The manager is shutting down; the control thread should return.
    Shutdown,
}

/// Work for a parked vCPU's thread (reading or loading its state).
type Job = Box<dyn FnOnce(&mut Vcpu) + Send>;

struct Ctl {
    want: Want,
    parked: bool,
    exited: bool,
    job: Option<Job>,
}

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl")
            .field("want", &self.want)
            .field("parked", &self.parked)
            .field("exited", &self.exited)
            .finish_non_exhaustive()
    }
}

/// Shared between a vCPU thread and the VM manager.
#[derive(Debug)]
pub struct VcpuControl {
    id: u32,
    ctl: Mutex<Ctl>,
    changed: Condvar,
    attention: AtomicBool,
    kick: Arc<Kick>,
    exits: AtomicU64,
    tid: AtomicI32,
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the vCPU to run, pause or stop (returns at once; see [`VcpuControl::wait`]).
    pub fn request(&self, want: Want) {
        let mut ctl = self.lock();
        ctl.want = want;
        if want == Want::Run {
            ctl.parked = false;
        }
        self.attention.store(want != Want::Run, Ordering::SeqCst);
        drop(ctl);
        self.changed.notify_all();
        if want != Want::Run {
            self.kick.request_exit();
        }
    }

    /// Waits until the vCPU has parked (for `Pause`) or exited; false on timeout.
    pub fn wait(&self, want: Want, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.lock();
        loop {
            let done = ctl.exited || (want == Want::Pause && ctl.parked);
            if done {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ctl = self
                .changed
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether the thread has returned.
    pub fn exited(&self) -> bool {
        self.lock().exited
    }

    /// VM exits handled so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// CPU time used by the vCPU thread.
    pub fn cpu_time(&self) -> Duration {
        match self.tid.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            tid => sys::thread_cpu_time(tid).unwrap_or_default(),
        }
    }

    /// Called on the vCPU thread at a safe point: parks while paused (running
    /// jobs handed to the parked vCPU); returns false to stop.
    fn checkpoint(&self, vcpu: &mut Vcpu) -> bool {
        let mut ctl = self.lock();
        loop {
            match ctl.want {
                Want::Run => return true,
                Want::Stop => return false,
                Want::Pause => {
                    if !ctl.parked {
                        ctl.parked = true;
                        self.changed.notify_all();
                    }
                    if let Some(job) = ctl.job.take() {
                        drop(ctl);
                        job(vcpu);
                        ctl = self.lock();
                        continue;
                    }
                    ctl = self.changed.wait(ctl).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Runs `f` on the vCPU's own thread while it is parked (paused) and
    /// returns its result; `None` if the vCPU is not parked or does not
    /// answer within `timeout`.
    pub fn run_parked<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
        timeout: Duration,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut ctl = self.lock();
            if ctl.want != Want::Pause || !ctl.parked || ctl.exited {
                return None;
            }
            ctl.job = Some(Box::new(move |v: &mut Vcpu| {
                let _ = tx.send(f(v));
            }));
        }
        self.changed.notify_all();
        rx.recv_timeout(timeout).ok()
    }
}

/// A started vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    /// Its control block.
    pub control: Arc<VcpuControl>,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Signals the thread so a blocking `KVM_RUN` returns.
    pub fn signal(&self) {
        if !self.control.exited() {
            // The thread is not joined yet, so its pthread handle is valid.
            if let Err(e) = self.handle.kill(kvm::kick_signal()) {
                debug!(vcpu = self.control.id, error = %e, "kick signal failed");
            }
        }
    }

    /// Asks for `want` and waits until the vCPU complies, re-signalling meanwhile.
    pub fn drive(&self, want: Want, timeout: Duration) -> bool {
        self.control.request(want);
        let deadline = Instant::now() + timeout;
        loop {
            self.signal();
            if self.control.wait(want, Duration::from_millis(20)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Waits for the thread to return (after a `Stop`).
    pub fn join(self) {
        if self.handle.join().is_err() {
            warn!(vcpu = self.control.id, "vCPU thread panicked");
        }
    }
}

/// Buses and event channel a vCPU dispatches to.
#[derive(Debug, Clone)]
pub struct ExitHandlers {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where guest exits are reported.
    pub events: Sender<VmEvent>,
}

/// Starts `vcpu` on its own thread, initially running.
pub fn spawn(vm_name: &str, vcpu: Vcpu, handlers: ExitHandlers) -> std::io::Result<VcpuThread> {
    spawn_as(vm_name, vcpu, handlers, Want::Run)
}

/// Starts `vcpu` on its own thread, initially running or paused (`want`).
pub fn spawn_as(
    vm_name: &str,
    vcpu: Vcpu,
    handlers: ExitHandlers,
    want: Want,
) -> std::io::Result<VcpuThread> {
    let control = Arc::new(VcpuControl {
        id: vcpu.id(),
        ctl: Mutex::new(Ctl {
            want,
            parked: false,
            exited: false,
            job: None,
        }),
        changed: Condvar::new(),
        attention: AtomicBool::new(want != Want::Run),
        kick: vcpu.kick(),
        exits: AtomicU64::new(0),
        tid: AtomicI32::new(0),
    });
    let c = Arc::clone(&control);
    let vm = vm_name.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id()))
        .spawn(move || {
            let _span = info_span!("vcpu", vm = %vm, id = vcpu.id()).entered();
            c.tid.store(sys::gettid(), Ordering::Relaxed);
            if let Some(reason) = run_loop(vcpu, &c, &handlers) {
                let _ = handlers.events.send(VmEvent::GuestExit(reason));
            }
            c.lock().exited = true;
            c.changed.notify_all();
        })?;
    Ok(VcpuThread { control, handle })
}

/// Runs until told to stop (returns `None`) or the guest ends (returns why).
fn run_loop(mut vcpu: Vcpu, c: &VcpuControl, h: &ExitHandlers) -> Option<ExitReason> {
    let reason = run_until_exit(&mut vcpu, c, h)?;
    if let ExitReason::Crashed(what) = reason {
        return Some(ExitReason::Crashed(format!(
            "{what} on vCPU {}: {}",
            vcpu.id(),
            vcpu.describe_state()
        )));
    }
    Some(reason)
}

fn run_until_exit(vcpu: &mut Vcpu, c: &VcpuControl, h: &ExitHandlers) -> Option<ExitReason> {
    loop {
        vcpu.clear_kick();
        if c.attention.load(Ordering::SeqCst) && !c.checkpoint(vcpu) {
            return None;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => return Some(ExitReason::VmmError(e.to_string())),
        };
        c.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            VmExit::IoIn(port, data) => pio(h, port, |bus, addr, d| bus.read(addr, d), data),
            VmExit::IoOut(port, data) => {
                let mut buf = [0u8; 4];
                // Copy so reads and writes share one splitting path.
                if data.len() <= 4 {
                    buf[..data.len()].copy_from_slice(data);
                    let n = data.len();
                    pio(h, port, |bus, addr, d| bus.write(addr, d), &mut buf[..n]);
                } else {
                    for b in data {
                        h.pio.write(u64::from(port), &[*b]);
                    }
                }
            }
            VmExit::MmioRead(addr, data) => {
                h.mmio.read(addr, data);
            }
            VmExit::MmioWrite(addr, data) => {
                h.mmio.write(addr, data);
            }
            VmExit::Interrupted => {}
            VmExit::Hlt => return Some(ExitReason::Poweroff),
            VmExit::Shutdown => {
                return Some(ExitReason::Crashed(
                    "triple fault (KVM_EXIT_SHUTDOWN)".into(),
                ));
            }
            VmExit::SystemEvent(SystemEventKind::Shutdown) => return Some(ExitReason::Poweroff),
            VmExit::SystemEvent(SystemEventKind::Reset) => return Some(ExitReason::Reset),
            VmExit::SystemEvent(kind) => {
                return Some(ExitReason::Crashed(format!("system event {kind:?}")));
            }
            VmExit::FailEntry(reason) => {
                return Some(ExitReason::Crashed(format!(
                    "hardware entry failure {reason:#x}"
                )));
            }
            VmExit::InternalError => return Some(ExitReason::Crashed("KVM internal error".into())),
            VmExit::Other(what) => {
                return Some(ExitReason::Crashed(format!("unexpected exit {what}")));
            }
        }
    }
}

/// Port I/O of 1, 2 or 4 bytes goes to the device as one access; longer
/// (string) transfers byte by byte.
fn pio(h: &ExitHandlers, port: u16, op: impl Fn(&Bus, u64, &mut [u8]) -> bool, data: &mut [u8]) {
    if matches!(data.len(), 1 | 2 | 4) {
        op(&h.pio, u64::from(port), data);
    } else {
        for b in data.chunks_mut(1) {
            op(&h.pio, u64::from(port), b);
        }
    }
}
