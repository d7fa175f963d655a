//! Linux 64-bit boot protocol: the zero page and identity-mapped page tables.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{CMDLINE_ADDR, Initrd, PML4_ADDR, ZERO_PAGE_ADDR, boot_err};
use crate::error::{Result, VmmError};
use crate::memory::{E820Kind, GuestMemory, e820_map};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Writes `boot_params`: setup header (from the bzImage, or a minimal one for
/// an ELF vmlinux), command line, initrd and the e820 map.
pub fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> Result<()> {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image =
            u32::try_from(addr).map_err(|_| VmmError::invalid("initrd", "above 4 GiB"))?;
        params.hdr.ramdisk_size =
            u32::try_from(size).map_err(|_| VmmError::invalid("initrd", "larger than 4 GiB"))?;
    }
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(VmmError::invalid("memory map", "too many e820 entries"));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        let r#type = match e.kind {
            E820Kind::Ram => E820_RAM,
            E820Kind::Reserved => E820_RESERVED,
        };
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| boot_err("zero page", e))
}

/// Identity-maps the first 1 GiB with 2 MiB pages: PML4 → PDPT → PD.
pub fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    let pdpt = PML4_ADDR + 0x1000;
    let pd = PML4_ADDR + 0x2000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_ADDR))
        .map_err(|e| boot_err("page tables", e))?;
    mem.write_obj(pd | 0x3, GuestAddress(pdpt))
        .map_err(|e| boot_err("page tables", e))?;
    let mut entries = Vec::with_capacity(512 * 8);
    for i in 0..512u64 {
        entries.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&entries, GuestAddress(pd))
        .map_err(|e| boot_err("page tables", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn zero_page_has_header_cmdline_and_e820() {
        let mem = create_guest_memory(32 << 20).unwrap();
        write_zero_page(&mem, None, 10, Some((0x100_0000, 0x2000))).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x100_0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x10_0000);
    }

    #[test]
    fn page_tables_map_2mib_pages() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pd1: u64 = mem.read_obj(GuestAddress(PML4_ADDR + 0x2000 + 8)).unwrap();
        assert_eq!(pd1, (1 << 21) | 0x83);
    }
}
