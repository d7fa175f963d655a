//! PVH boot: the `hvm_start_info` block and its memory map.
//!
//! Layout at [`PVH_INFO_ADDR`]: `hvm_start_info` (56 bytes),
//! then the memory map (24 bytes per entry), then one module entry for the
//! initrd if there is one.

use linux_loader::loader::elf::start_info::{
    XEN_HVM_MEMMAP_TYPE_RAM, XEN_HVM_MEMMAP_TYPE_RESERVED, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress};

use super::{CMDLINE_ADDR, Initrd, PVH_INFO_ADDR, boot_err};
use crate::error::{Result, VmmError};
use crate::memory::{E820Kind, GuestMemory, e820_map};

const START_INFO_SIZE: u64 = 56;
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// Room reserved for the memory map (the info block lives below the zero page).
const MAX_MEMMAP_ENTRIES: usize = 64;

/// Writes `hvm_start_info`, the memory map and the initrd module entry.
pub fn write_start_info(mem: &GuestMemory, initrd: Option<Initrd>) -> Result<()> {
    let map = e820_map(mem);
    if map.len() > MAX_MEMMAP_ENTRIES {
        return Err(VmmError::invalid("memory map", "too many entries"));
    }
    let memmap_addr = PVH_INFO_ADDR + START_INFO_SIZE;
    let mut memmap = Vec::with_capacity(map.len() * MEMMAP_ENTRY_SIZE as usize);
    for e in &map {
        memmap.extend_from_slice(&e.addr.to_le_bytes());
        memmap.extend_from_slice(&e.size.to_le_bytes());
        let kind = match e.kind {
            E820Kind::Ram => XEN_HVM_MEMMAP_TYPE_RAM,
            E820Kind::Reserved => XEN_HVM_MEMMAP_TYPE_RESERVED,
        };
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(memmap_addr))
        .map_err(|e| boot_err("PVH memory map", e))?;

    let modlist_addr = memmap_addr + memmap.len() as u64;
    let nr_modules: u32 = match initrd {
        Some((addr, size)) => {
            let mut m = Vec::with_capacity(32);
            for v in [addr, size, 0, 0] {
                m.extend_from_slice(&v.to_le_bytes());
            }
            mem.write_slice(&m, GuestAddress(modlist_addr))
                .map_err(|e| boot_err("PVH module list", e))?;
            1
        }
        None => 0,
    };

    let mut info = Vec::with_capacity(START_INFO_SIZE as usize);
    info.extend_from_slice(&XEN_HVM_START_MAGIC_VALUE.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version (1: has memmap fields)
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&(if nr_modules > 0 { modlist_addr } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    info.extend_from_slice(&memmap_addr.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(info.len() as u64, START_INFO_SIZE);
    mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|e| boot_err("PVH start info", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn start_info_points_at_cmdline_and_memmap() {
        let mem = create_guest_memory(32 << 20).unwrap();
        write_start_info(&mem, Some((0x80_0000, 4096))).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let nr_modules: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let cmdline: u64 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 24)).unwrap();
        assert_eq!(cmdline, CMDLINE_ADDR);
        let memmap: u64 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 40)).unwrap();
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 48)).unwrap();
        assert_eq!(entries, 3);
        let last_size: u64 = mem.read_obj(GuestAddress(memmap + 2 * 24 + 8)).unwrap();
        assert_eq!(last_size, (32 << 20) - 0x10_0000);
    }
}
