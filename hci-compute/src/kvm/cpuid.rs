//! CPUID for a vCPU: KVM's supported set, with topology and identity filled in.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use crate::error::{Result, VmmError};

/// CPUID.1:ECX bit 31 — running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28 — more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;

/// Number of bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts one entry for vCPU `id` of `count` (one package, one thread per core).
fn filter_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32) {
    match e.function {
        0x1 => {
            // Initial APIC ID, logical processor count, CLFLUSH size kept.
            e.ebx = (e.ebx & 0x0000_ffff) | ((count.min(255) & 0xff) << 16) | ((id & 0xff) << 24);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Cores per package - 1 in EAX[31:26]; caches are shared by one thread.
            e.eax = (e.eax & 0x0000_3fff) | ((count.saturating_sub(1).min(63)) << 26);
        }
        0xb | 0x1f => {
            e.edx = id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    // Core level: `count` cores.
                    e.eax = bits_for(count);
                    e.ebx = count;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n & 0xff;
                }
            }
        }
        // No architectural performance monitoring is promised to the guest.
        0xa => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `id` of `count`, derived from KVM's supported set.
pub(super) fn for_vcpu(supported: &CpuId, id: u32, count: u32) -> Result<CpuId> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    for e in &mut entries {
        filter_entry(e, id, count);
    }
    CpuId::from_entries(&entries).map_err(|e| VmmError::invalid("CPUID", format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0008_0800,
            edx: EDX_HTT,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        filter_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        let mut e = entry(1, 0);
        filter_entry(&mut e, 0, 1);
        assert_eq!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_one_package() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        filter_entry(&mut smt, 2, 3);
        filter_entry(&mut core, 2, 3);
        assert_eq!((smt.ebx, smt.edx), (1, 2));
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn cpuid_table_round_trips() {
        let supported = CpuId::from_entries(&[entry(0, 0), entry(1, 0)]).unwrap();
        let t = for_vcpu(&supported, 1, 2).unwrap();
        assert_eq!(t.as_slice().len(), 2);
        assert_eq!(t.as_slice()[1].ebx >> 24, 1);
    }
}
