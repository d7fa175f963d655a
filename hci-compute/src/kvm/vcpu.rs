//! One KVM vCPU: initial state, `KVM_RUN`, and kicking it out of `KVM_RUN`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::warn;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::boot::{self, EntryPoint};
use crate::error::{Result, VmmError};

/// Why a vCPU left `KVM_RUN`, in the VMM's own terms.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `in` from `port`; fill `data`.
    IoIn(u16, &'a mut [u8]),
    /// `out` of `data` to `port`.
    IoOut(u16, &'a [u8]),
    /// MMIO read at an address; fill the data.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write of the data at an address.
    MmioWrite(u64, &'a [u8]),
    /// The guest halted with interrupts off (never with an in-kernel LAPIC otherwise).
    Hlt,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// A system event (PSCI-style or `KVM_SYSTEM_EVENT_*`).
    SystemEvent(SystemEventKind),
    /// `KVM_RUN` was interrupted by a kick or signal; check for requests.
    Interrupted,
    /// The hardware refused to enter the guest.
    FailEntry(u64),
    /// KVM failed to handle an exit (e.g. emulation failure).
    InternalError,
    /// Any other exit, described.
    Other(String),
}

/// Kind of [`VmExit::SystemEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEventKind {
    /// Power off.
    Shutdown,
    /// Reboot.
    Reset,
    /// Guest crash.
    Crash,
    /// Another event type.
    Other(u32),
}

/// The signal used to kick vCPU threads out of `KVM_RUN` (`SIGRTMIN + 1`).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs the (empty) handler of [`kick_signal`] once per process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            result = Err(VmmError::io(
                "install the vCPU kick signal handler",
                io::Error::from_raw_os_error(e.errno()),
            ));
        }
    });
    result
}

/// Sets a vCPU's `kvm_run.immediate_exit` from another thread.
///
/// With `immediate_exit` set, the next `KVM_RUN` returns at once with `EINTR`,
/// which closes the race between checking for a request and entering the guest;
/// a [`kick_signal`] sent to the vCPU thread covers a vCPU already inside it.
#[derive(Debug)]
pub struct Kick {
    // Pointer to `kvm_run.immediate_exit`; `None` once the vCPU is gone.
    flag: Mutex<Option<NonNull<u8>>>,
}

// SAFETY: the pointer is only dereferenced under the mutex, while the vCPU's
// `kvm_run` mapping is alive (the `Vcpu` clears it under the same mutex before
// the mapping goes away), and only through atomic operations.
unsafe impl Send for Kick {}
// SAFETY: see `Send`: all access is serialised by the mutex and atomic.
unsafe impl Sync for Kick {}

impl Kick {
    fn store(&self, value: u8) {
        let guard = self.flag.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = *guard {
            // SAFETY: `p` points into the live, suitably aligned `kvm_run` mapping of
            // the vCPU (checked above under the lock); AtomicU8 has the layout of u8.
            let flag = unsafe { AtomicU8::from_ptr(p.as_ptr()) };
            flag.store(value, Ordering::SeqCst);
        }
    }

    /// Makes the vCPU's next (or current, with a signal) `KVM_RUN` return.
    pub fn request_exit(&self) {
        self.store(1);
    }
}

/// A vCPU; owned by its thread while running.
#[derive(Debug)]
pub struct Vcpu {
    pub(super) fd: VcpuFd,
    pub(super) id: u32,
    kick: Arc<Kick>,
}

/// The MSRs set on every vCPU before boot.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Decodes a GDT descriptor into KVM's segment form.
fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let g = ((descriptor >> 55) & 1) as u8;
    let mut limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24),
        limit,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        avl: ((descriptor >> 52) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        g,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu {
    pub(super) fn new(mut fd: VcpuFd, id: u32, cpuid: &CpuId) -> Result<Self> {
        fd.set_cpuid2(cpuid)
            .map_err(|e| VmmError::kvm("KVM_SET_CPUID2", e))?;
        let entries = boot_msrs();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::invalid("MSR list", format!("{e:?}")))?;
        let set = fd
            .set_msrs(&msrs)
            .map_err(|e| VmmError::kvm("KVM_SET_MSRS", e))?;
        if set != entries.len() {
            warn!(
                vcpu = id,
                set,
                wanted = entries.len(),
                "KVM accepted only some boot MSRs"
            );
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu)
            .map_err(|e| VmmError::kvm("KVM_SET_FPU", e))?;
        Self::set_lint(&fd)?;
        let flag = NonNull::from(&mut fd.get_kvm_run().immediate_exit);
        Ok(Vcpu {
            fd,
            id,
            kick: Arc::new(Kick {
                flag: Mutex::new(Some(flag)),
            }),
        })
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 NMI, as firmware would set them.
    fn set_lint(fd: &VcpuFd) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_EXTINT: u32 = 0x7 << 8;
        const MODE_NMI: u32 = 0x4 << 8;
        const MODE_MASK: u32 = 0x7 << 8;
        let mut lapic = fd
            .get_lapic()
            .map_err(|e| VmmError::kvm("KVM_GET_LAPIC", e))?;
        for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = lapic.regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(bytes) & !MODE_MASK) | mode;
            for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                lapic.regs[off + i] = b as libc::c_char;
            }
        }
        fd.set_lapic(&lapic)
            .map_err(|e| VmmError::kvm("KVM_SET_LAPIC", e))
    }

    /// This vCPU's index (its APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle other threads use to make `KVM_RUN` return.
    pub fn kick(&self) -> Arc<Kick> {
        Arc::clone(&self.kick)
    }

    /// Clears a pending kick; call before checking for requests and entering the guest.
    pub fn clear_kick(&self) {
        self.kick.store(0);
    }

    /// Puts the boot vCPU at the kernel entry point.
    pub fn set_boot_state(&self, entry: &EntryPoint) -> Result<()> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VmmError::kvm("KVM_GET_SREGS", e))?;
        let gdt = boot::gdt(entry);
        let code = segment(gdt[boot::CODE_SEL as usize / 8], boot::CODE_SEL);
        let data = segment(gdt[boot::DATA_SEL as usize / 8], boot::DATA_SEL);
        let tss = segment(gdt[boot::TSS_SEL as usize / 8], boot::TSS_SEL);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = boot::GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = boot::IDT_ADDR;
        sregs.idt.limit = 7;
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match *entry {
            EntryPoint::Pvh { entry, start_info } => {
                sregs.cr0 = boot::CR0_PE | boot::CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = start_info;
            }
            EntryPoint::Linux64 { entry, boot_params } => {
                sregs.cr3 = boot::PML4_ADDR;
                sregs.cr4 = boot::CR4_PAE;
                sregs.cr0 = boot::CR0_PE | boot::CR0_ET | boot::CR0_PG;
                sregs.efer = boot::EFER_LME | boot::EFER_LMA;
                regs.rip = entry;
                regs.rsi = boot_params;
                regs.rsp = boot::BOOT_STACK;
                regs.rbp = boot::BOOT_STACK;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VmmError::kvm("KVM_SET_SREGS", e))?;
        self.fd
            .set_regs(&regs)
            .map_err(|e| VmmError::kvm("KVM_SET_REGS", e))
    }

    /// A one-line summary of the vCPU's registers, for crash reports.
    pub fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Result<VmExit<'_>> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(VmmError::kvm("KVM_RUN", e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
            VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::FailEntry(reason, _) => VmExit::FailEntry(reason),
            VcpuExit::InternalError => VmExit::InternalError,
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                other => SystemEventKind::Other(other),
            }),
            other => VmExit::Other(format!("{other:?}")),
        })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // The kvm_run mapping goes away with `fd`: stop others from touching it first.
        *self.kick.flag.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_decodes() {
        let s = segment(0x00af_9b00_0000_ffff, 0x08);
        assert_eq!(
            (s.base, s.limit, s.type_, s.l, s.db, s.g, s.present, s.s),
            (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
        );
        let s = segment(0x00cf_9300_0000_ffff, 0x10);
        assert_eq!((s.type_, s.db, s.l), (0x3, 1, 0));
    }
}
