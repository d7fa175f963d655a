//! Everything that talks to `/dev/kvm`.
//!
//! This is the only module that uses `kvm-ioctls` and `kvm-bindings`; the rest
//! of the VMM sees [`System`], [`Vm`], [`Vcpu`] and our own [`VmExit`].
//! Every ioctl the VMM issues lives here, with one `SAFETY` comment for each
//! unsafe call.

mod cpuid;
mod state;
mod vcpu;

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use tracing::debug;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

pub use self::state::{FpuState, VcpuState, VmKvmState};
pub use self::vcpu::{Kick, SystemEventKind, Vcpu, VmExit, install_kick_handler, kick_signal};
use crate::error::{Result, VmmError};
use crate::memory::{GuestMemory, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// An open `/dev/kvm`.
#[derive(Debug)]
pub struct System {
    kvm: Kvm,
}

impl System {
    /// Opens `/dev/kvm`.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new()
            .map_err(|e| VmmError::KvmUnavailable(io::Error::from_raw_os_error(e.errno())))?;
        Ok(System { kvm })
    }

    /// Largest vCPU count KVM accepts for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates a VM with an in-kernel irqchip and PIT and `mem` mapped as its RAM.
    pub fn create_vm(&self, mem: Arc<GuestMemory>) -> Result<Vm> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| VmmError::kvm("KVM_CREATE_VM", e))?;
        let tss = usize::try_from(KVM_TSS_ADDR)
            .map_err(|_| VmmError::invalid("TSS address", "too large"))?;
        fd.set_tss_address(tss)
            .map_err(|e| VmmError::kvm("KVM_SET_TSS_ADDR", e))?;
        if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR) {
            // Only Intel VMX needs it; other KVM flavours may refuse it.
            debug!(error = %e, "KVM_SET_IDENTITY_MAP_ADDR not accepted");
        }
        fd.create_irq_chip()
            .map_err(|e| VmmError::kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmmError::kvm("KVM_CREATE_PIT2", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let slot =
                u32::try_from(slot).map_err(|_| VmmError::invalid("memory", "too many regions"))?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which this `Vm`
            // keeps (field `mem`, dropped after `fd`), so it outlives the memory slot.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(|e| VmmError::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_index_list = self
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(Vm {
            fd,
            cpuid,
            mem,
            msr_index_list,
        })
    }
}

/// A KVM virtual machine. Dropping it destroys the VM.
#[derive(Debug)]
pub struct Vm {
    // Declared before `mem`: the VM (and its memory slots) goes before the memory.
    fd: VmFd,
    cpuid: CpuId,
    mem: Arc<GuestMemory>,
    msr_index_list: Vec<u32>,
}

impl Vm {
    /// The guest memory mapped into this VM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Creates vCPU `id` of `count`, with filtered CPUID, MSRs, FPU and LAPIC set up.
    pub fn create_vcpu(&self, id: u32, count: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::kvm("KVM_CREATE_VCPU", e))?;
        let cpuid = cpuid::for_vcpu(&self.cpuid, id, count)?;
        Vcpu::new(fd, id, &cpuid)
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmmError::kvm("KVM_IRQFD", e))
    }

    /// Makes a guest 4-byte write of `value` to MMIO `addr` signal `evt` without a VM exit.
    pub fn register_mmio_ioeventfd(&self, evt: &EventFd, addr: u64, value: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmmError::kvm("KVM_IOEVENTFD", e))
    }

    /// Undoes [`Vm::register_mmio_ioeventfd`].
    pub fn unregister_mmio_ioeventfd(&self, evt: &EventFd, addr: u64, value: u32) -> Result<()> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmmError::kvm("KVM_IOEVENTFD (deassign)", e))
    }
}
