//! Saving and restoring what KVM holds for a VM: vCPU registers and the
//! in-kernel irqchip, PIT and clock, plus dirty-page logging of guest memory
//! for live migration.
//!
//! The structures are KVM's own (`kvm-bindings` serialises them as bytes),
//! so a state only restores on a host with the same KVM structure layouts —
//! which the snapshot format's version guards.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    Msrs, kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{Vcpu, Vm};
use crate::error::{Result, VmmError};

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (`KVM_GET_XSAVE`), when the host's XSAVE area fits.
    pub xsave: Option<kvm_xsave>,
    /// Legacy FPU state, used when `xsave` is absent.
    pub fpu: Option<FpuState>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (index, value), including the TSC.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
}

/// `kvm_fpu`, which kvm-bindings does not serialise, as plain fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FpuState {
    fpr: Vec<u8>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<u8>,
    mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.iter().flatten().copied().collect(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.iter().flatten().copied().collect(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().flatten().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().flatten().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// The VM-wide in-kernel state: PIC pair, IO-APIC, PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    /// Master PIC, slave PIC, IO-APIC (`KVM_GET_IRQCHIP` of chips 0, 1, 2).
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock base.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::kvm(what, e)
}

impl Vcpu {
    /// Reads this vCPU's complete state (the vCPU must not be running).
    /// `msr_list` is the MSRs to save (see [`Vm::saved_msrs`]).
    pub fn save_state(&self, msr_list: &[u32], xsave_fits: bool) -> Result<VcpuState> {
        let fd = &self.fd;
        // MP state first: reading it settles pending APIC events into the state.
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let (xsave, fpu) = if xsave_fits {
            (
                Some(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?),
                None,
            )
        } else {
            let f = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
            (None, Some(FpuState::from_kvm(&f)))
        };
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let msrs = self.read_msrs(msr_list)?;
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            regs,
            sregs,
            xsave,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            mp_state,
        })
    }

    fn read_msrs(&self, list: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::invalid("MSR list", format!("{e:?}")))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        if n < list.len() {
            // The list was probed at VM creation; a shorter answer now is a bug.
            return Err(VmmError::Device {
                device: format!("vCPU {}", self.id),
                reason: format!(
                    "KVM returned {n} of {} MSRs (first missing: {:#x})",
                    list.len(),
                    list[n]
                ),
            });
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Loads a state saved by [`Vcpu::save_state`] (the vCPU must not be running).
    pub fn restore_state(&self, s: &VcpuState) -> Result<()> {
        let fd = &self.fd;
        if s.id != self.id {
            return Err(VmmError::invalid(
                "vCPU state",
                format!("saved for vCPU {}, loaded into vCPU {}", s.id, self.id),
            ));
        }
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::invalid("MSR list", format!("{e:?}")))?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set < entries.len() {
            warn!(
                vcpu = self.id,
                set,
                saved = entries.len(),
                first_refused = format_args!("{:#x}", entries[set].index),
                "KVM accepted only some saved MSRs"
            );
        }
        fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        match (&s.xsave, &s.fpu) {
            (Some(xsave), _) => {
                // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB) taken by
                // KVM_GET_XSAVE on a host whose XSAVE area fits it (checked
                // before saving); the kernel reads at most that struct.
                unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
            }
            (None, Some(fpu)) => fd.set_fpu(&fpu.to_kvm()).map_err(kvm_err("KVM_SET_FPU"))?,
            (None, None) => {}
        }
        if let Some(xcrs) = &s.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&s.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl Vm {
    /// Reads the irqchip, PIT and clock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmKvmState> {
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(VmKvmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Loads a state saved by [`Vm::save_state`] (before the vCPUs run).
    pub fn restore_state(&self, s: &VmKvmState) -> Result<()> {
        for chip in &s.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // Only the clock value can be set; flags describe the source host.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// The MSRs a snapshot saves: KVM's list of saveable MSRs, minus any
    /// this host's KVM refuses to read (probed on `vcpu`).
    pub fn saved_msrs(&self, vcpu: &Vcpu) -> Vec<u32> {
        let mut list: Vec<u32> = self.msr_index_list.clone();
        let mut ok = Vec::with_capacity(list.len());
        // Probe in one call; on a refusal drop that MSR and go on after it.
        while !list.is_empty() {
            let entries: Vec<kvm_msr_entry> = list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let Ok(mut msrs) = Msrs::from_entries(&entries) else {
                break;
            };
            let n = vcpu.fd.get_msrs(&mut msrs).unwrap_or(0).min(list.len());
            ok.extend_from_slice(&list[..n]);
            if n < list.len() {
                debug!(
                    msr = format_args!("{:#x}", list[n]),
                    "MSR not readable; not saved"
                );
                list.drain(..=n);
            } else {
                break;
            }
        }
        ok
    }

    /// Whether this host's XSAVE area fits `kvm_xsave` (4 KiB), so
    /// KVM_GET/SET_XSAVE carry all of it.
    pub fn xsave_fits(&self) -> bool {
        let size = self.fd.check_extension_int(kvm_ioctls::Cap::Xsave2);
        size <= 4096 && self.fd.check_extension(kvm_ioctls::Cap::Xsave)
    }

    /// Turns dirty-page logging of every memory slot on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the same live mapping owned by `self.mem` as when the
            // slot was created; only the flags change.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        }
        Ok(())
    }

    /// Per memory slot: the pages the guest wrote since the last call
    /// (one bit per 4 KiB page, from the slot's start), and clears the log.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        let mut out = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let size = usize::try_from(region.len())
                .map_err(|_| VmmError::invalid("memory", "slot too large"))?;
            out.push(
                self.fd
                    .get_dirty_log(slot as u32, size)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?,
            );
        }
        Ok(out)
    }
}
