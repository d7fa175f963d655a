//! Guest physical memory: layout, allocation and the e820 map.
//!
//! ```text
//! 0            0x9fc00   0xa0000      1 MiB                 3 GiB        4 GiB
//! | RAM (low)  | EBDA/MP | legacy hole | RAM (kernel, ...)  | MMIO hole  | RAM (rest) ...
//! ```
//!
//! RAM is mapped from 0 up to the 32-bit MMIO hole (3 GiB – 4 GiB), and any
//! remainder above 4 GiB. The legacy area 0x9fc00–0x100000 is backed by RAM
//! (so one memory slot covers low memory) but reported as reserved in e820.
//! Virtio-mmio devices live in the hole from [`VIRTIO_MMIO_BASE`].

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Result, VmmError};

/// Guest memory as the VMM uses it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device; each device takes [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) given to virtio-mmio devices (COM1 uses 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Local APIC base address.
pub const APIC_BASE: u64 = 0xfee0_0000;
/// IO-APIC base address.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB), where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Smallest accepted guest memory.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The TSS area KVM needs on Intel hosts (three pages just below the MMIO windows).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page on Intel hosts (the page before the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Kind of an e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved.
    Reserved,
}

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

/// The RAM ranges `(start, len)` for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Result<Vec<(u64, u64)>> {
    if size < MIN_MEMORY {
        return Err(VmmError::invalid(
            "memory size",
            format!("{size} bytes is below the minimum of {MIN_MEMORY}"),
        ));
    }
    if !size.is_multiple_of(4096) {
        return Err(VmmError::invalid(
            "memory size",
            format!("{size} bytes is not a multiple of 4 KiB"),
        ));
    }
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((MMIO_HOLE_END, size - low));
    }
    Ok(v)
}

/// Allocates anonymous guest memory of `size` bytes laid out by [`ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<Arc<GuestMemory>> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)?
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| {
                    VmmError::invalid("memory size", "does not fit the host address space")
                })
        })
        .collect::<Result<_>>()?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok(Arc::new(mem))
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().0 == 0)
        .map(|r| r.len())
        .unwrap_or(0)
}

/// The e820 map for `mem`.
pub fn e820_map(mem: &GuestMemory) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    for r in mem.iter() {
        let start = r.start_addr().0;
        let end = start + r.len();
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Host virtual ranges `(host_addr, len)` backing guest RAM (for RSS accounting).
pub fn host_ranges(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
            Some((host as u64, r.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(64 << 20).unwrap(), vec![(0, 64 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(
            r,
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(ram_ranges(0).is_err());
        assert!(ram_ranges((64 << 20) + 1).is_err());
    }

    #[test]
    fn e820_reserves_the_legacy_area() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (16 << 20) - HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(low_ram_end(&mem), 16 << 20);
    }
}
