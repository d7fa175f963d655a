//! Loading a guest: kernel image, command line, initrd, boot tables.
//!
//! Two entry protocols, chosen from the image:
//! - **PVH** ([`pvh`]) for ELF images with a `XEN_ELFNOTE_PHYS32_ENTRY` note
//!   (Linux vmlinux built with PVH, and hci's test guests): 32-bit protected
//!   mode, paging off, `%ebx` = `hvm_start_info`.
//! - **Linux 64-bit boot protocol** ([`linux`]) for bzImages and ELF images
//!   without that note: long mode on identity-mapped page tables, `%rsi` = the
//!   zero page.
//!
//! Either way the VMM writes a GDT at [`GDT_ADDR`] matching the segment state
//! it puts in the boot vCPU, and an MP table ([`mptable`]) describing the vCPUs.

pub mod linux;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::{
    Elf, KernelLoader, KernelLoaderResult, PvhBootCapability, bzimage::BzImage,
};
use tracing::{debug, info_span};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Result, VmmError};
use crate::memory::{self, GuestMemory, HIMEM_START};

/// Where the boot GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) boot IDT goes.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the Linux 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot page tables: PML4, then PDPT and PD in the next pages.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest accepted command line, including the terminating NUL.
pub const CMDLINE_MAX: usize = 0x10000;

/// GDT selector of the boot code segment.
pub const CODE_SEL: u16 = 0x08;
/// GDT selector of the boot data segment.
pub const DATA_SEL: u16 = 0x10;
/// GDT selector of the boot TSS.
pub const TSS_SEL: u16 = 0x18;

/// CR0.PE
pub const CR0_PE: u64 = 1;
/// CR0.ET
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA
pub const EFER_LMA: u64 = 1 << 10;

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode at `entry`, `%ebx = start_info`.
    Pvh {
        /// Physical entry address.
        entry: u64,
        /// Physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, `%rsi = boot_params`.
    Linux64 {
        /// Physical entry address.
        entry: u64,
        /// Physical address of the zero page.
        boot_params: u64,
    },
}

/// The boot GDT for an entry protocol: null, code, data, TSS.
pub fn gdt(entry: &EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Pvh { .. } => 0x00cf_9b00_0000_ffff, // 32-bit flat code
        EntryPoint::Linux64 { .. } => 0x00af_9b00_0000_ffff, // 64-bit code
    };
    [0, code, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067]
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelConfig<'a> {
    /// Kernel image (ELF or bzImage).
    pub kernel: &'a Path,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// Command line (the VMM appends device announcements for Linux).
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub cpus: u32,
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| VmmError::KernelFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the kernel, command line, initrd and boot tables; returns the entry point.
pub fn load(mem: &GuestMemory, cfg: &KernelConfig<'_>) -> Result<EntryPoint> {
    let _span = info_span!("load_kernel", kernel = %cfg.kernel.display()).entered();
    let mut file = open(cfg.kernel)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|source| VmmError::KernelFile {
            path: cfg.kernel.to_path_buf(),
            source,
        })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let (loaded, is_elf): (KernelLoaderResult, bool) = if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, himem).map_err(|e| boot_err("ELF kernel", e))?;
        (r, true)
    } else {
        let r = BzImage::load(mem, None, &mut file, himem)
            .map_err(|e| boot_err("bzImage kernel", e))?;
        (r, false)
    };
    debug!(load = loaded.kernel_load.0, end = loaded.kernel_end, pvh = %loaded.pvh_boot_cap, "kernel loaded");

    let cmdline_len = write_cmdline(mem, cfg.cmdline)?;
    mptable::write(mem, cfg.cpus)?;
    let initrd = match cfg.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            loaded.kernel_end,
            loaded.setup_header.map(|h| h.initrd_addr_max),
        )?),
        None => None,
    };

    let entry = match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(addr)) => {
            pvh::write_start_info(mem, initrd)?;
            EntryPoint::Pvh {
                entry: addr.0,
                start_info: PVH_INFO_ADDR,
            }
        }
        _ => {
            let entry = if is_elf {
                loaded.kernel_load.0
            } else {
                loaded.kernel_load.0 + 0x200
            };
            linux::write_zero_page(mem, loaded.setup_header, cmdline_len, initrd)?;
            linux::write_page_tables(mem)?;
            EntryPoint::Linux64 {
                entry,
                boot_params: ZERO_PAGE_ADDR,
            }
        }
    };
    write_gdt(mem, &entry)?;
    Ok(entry)
}

fn boot_err(what: &'static str, e: impl std::fmt::Display) -> VmmError {
    VmmError::Boot {
        what,
        reason: e.to_string(),
    }
}

fn write_gdt(mem: &GuestMemory, entry: &EntryPoint) -> Result<()> {
    for (i, d) in gdt(entry).iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| boot_err("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|e| boot_err("IDT", e))
}

/// Writes the NUL-terminated command line; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<usize> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(VmmError::invalid(
            "kernel command line",
            format!("longer than {} bytes", CMDLINE_MAX - 1),
        ));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(VmmError::invalid(
            "kernel command line",
            "contains a NUL byte",
        ));
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| boot_err("command line", e))?;
    Ok(cmdline.len())
}

/// A loaded initrd: `(address, size)`.
pub type Initrd = (u64, u64);

/// Places the initrd page-aligned at the top of low RAM (below `addr_max`, above the kernel).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    addr_max: Option<u32>,
) -> Result<Initrd> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| VmmError::KernelFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut top = memory::low_ram_end(mem);
    if let Some(max) = addr_max.filter(|m| *m != 0) {
        top = top.min(u64::from(max) + 1);
    }
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| {
            VmmError::invalid("initrd", format!("{size} bytes do not fit in guest memory"))
        })?;
    let len = usize::try_from(size).map_err(|_| VmmError::invalid("initrd", "too large"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| boot_err("initrd", e))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_checked_and_terminated() {
        let mem = memory::create_guest_memory(8 << 20).unwrap();
        assert_eq!(write_cmdline(&mem, "console=ttyS0").unwrap(), 13);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(write_cmdline(&mem, "a\0b").is_err());
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)).is_err());
    }

    #[test]
    fn missing_kernel_is_reported() {
        let mem = memory::create_guest_memory(8 << 20).unwrap();
        let cfg = KernelConfig {
            kernel: Path::new("/nonexistent/kernel"),
            initrd: None,
            cmdline: "",
            cpus: 1,
        };
        assert!(matches!(load(&mem, &cfg), Err(VmmError::KernelFile { .. })));
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, vec![0x55u8; 8192]).unwrap();
        let mem = memory::create_guest_memory(8 << 20).unwrap();
        let cfg = KernelConfig {
            kernel: &path,
            initrd: None,
            cmdline: "",
            cpus: 1,
        };
        assert!(matches!(load(&mem, &cfg), Err(VmmError::Boot { .. })));
    }
}
