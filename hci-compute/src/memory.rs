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

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Result, VmmError};

/// Guest memory as the VMM uses it. Every write the VMM itself makes through
/// vm-memory (virtio devices, boot loading) sets a bit per 4 KiB page in the
/// region's [`AtomicBitmap`]; live migration adds those pages to KVM's dirty
/// log (which only sees guest writes).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

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

/// Size of the huge pages guest memory uses when asked to (x86_64's 2 MiB).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// What backs guest RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Private anonymous memory, faulted in as the guest touches it.
    #[default]
    Anonymous,
    /// A memfd mapped shared (a descriptor another process — a snapshot
    /// writer, a migration helper, a vhost-user backend — can map too). With
    /// `hugepages`, 2 MiB pages from the host's hugetlb pool, all reserved
    /// at start (a VM never dies of an empty pool later): the size must be a
    /// multiple of 2 MiB and the pool must hold enough free pages
    /// (`/proc/sys/vm/nr_hugepages`).
    Memfd {
        /// Back the memfd with 2 MiB huge pages.
        hugepages: bool,
    },
    /// A file, created or resized to the memory size and mapped shared
    /// (e.g. in `/dev/shm`, or on a hugetlbfs mount for huge pages).
    File(PathBuf),
}

/// Allocates anonymous guest memory of `size` bytes laid out by [`ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<Arc<GuestMemory>> {
    create_guest_memory_backed(size, &MemoryBacking::Anonymous)
}

/// Allocates `size` bytes of guest memory laid out by [`ram_ranges`] from `backing`.
pub fn create_guest_memory_backed(size: u64, backing: &MemoryBacking) -> Result<Arc<GuestMemory>> {
    let ranges = ram_ranges(size)?;
    let file = match backing {
        MemoryBacking::Anonymous => None,
        MemoryBacking::Memfd { hugepages } => {
            if *hugepages && !size.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(VmmError::invalid(
                    "memory size",
                    format!("{size} bytes is not a multiple of the 2 MiB huge page size"),
                ));
            }
            let file = crate::sys::memfd("hci-guest-ram", *hugepages)
                .map_err(|e| VmmError::io("create a memfd for guest memory", e))?;
            file.set_len(size)
                .map_err(|e| VmmError::io("size the guest memory memfd", e))?;
            if *hugepages {
                // Take every huge page now: a shared hugetlb mapping is
                // mapped without reservation, so a page missing later
                // would be a SIGBUS in the middle of a guest's run.
                crate::sys::fallocate(&file, size).map_err(|e| {
                    VmmError::Memory(format!(
                        "cannot reserve {} huge pages of 2 MiB for guest memory ({e}); \
                         free huge pages: {} (raise /proc/sys/vm/nr_hugepages)",
                        size / HUGE_PAGE_SIZE,
                        free_huge_pages().map_or_else(|| "unknown".into(), |n| n.to_string())
                    ))
                })?;
            }
            Some(file)
        }
        MemoryBacking::File(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| {
                    VmmError::Memory(format!(
                        "cannot open guest memory file {}: {e}",
                        path.display()
                    ))
                })?;
            file.set_len(size).map_err(|e| {
                VmmError::Memory(format!(
                    "cannot size guest memory file {}: {e}",
                    path.display()
                ))
            })?;
            Some(file)
        }
    };
    let file: Option<Arc<File>> = file.map(Arc::new);
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let ulen = usize::try_from(len)
            .map_err(|_| VmmError::invalid("memory size", "does not fit the host address space"))?;
        let fo = file
            .as_ref()
            .map(|f| FileOffset::from_arc(Arc::clone(f), offset));
        offset += len;
        regions.push((GuestAddress(start), ulen, fo));
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&regions)
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    Ok(Arc::new(mem))
}

/// Free 2 MiB huge pages in the host's pool.
pub fn free_huge_pages() -> Option<u64> {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
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
    fn memfd_and_file_backings_share_their_pages() {
        use vm_memory::Bytes;
        let mem = create_guest_memory_backed(16 << 20, &MemoryBacking::Memfd { hugepages: false })
            .unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mem = create_guest_memory_backed(8 << 20, &MemoryBacking::File(path.clone())).unwrap();
        mem.write_obj(0x5a5a_u16, GuestAddress(0x2000)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert_eq!(
            &bytes[0x2000..0x2002],
            &[0x5a, 0x5a],
            "the file holds guest RAM"
        );
    }

    #[test]
    fn huge_pages_need_whole_pages_and_a_pool() {
        let e = create_guest_memory_backed(5 << 20, &MemoryBacking::Memfd { hugepages: true })
            .unwrap_err();
        assert!(e.to_string().contains("2 MiB"), "{e}");
        if free_huge_pages() == Some(0) {
            let e = create_guest_memory_backed(8 << 20, &MemoryBacking::Memfd { hugepages: true })
                .unwrap_err();
            assert!(e.to_string().contains("nr_hugepages"), "{e}");
        }
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
