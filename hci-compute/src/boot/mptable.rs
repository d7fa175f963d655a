//! The Intel MultiProcessor Specification (1.4) table, so a guest kernel
//! without ACPI finds every vCPU, the IO-APIC and the ISA interrupt routing.
//!
//! The table lives at [`MPTABLE_START`] in the BIOS area (0xf0000), which Linux
//! scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::boot_err;
use crate::error::{Result, VmmError};
use crate::memory::{APIC_BASE, GuestMemory, IOAPIC_BASE};

/// Where the floating pointer and configuration table are written.
pub const MPTABLE_START: u64 = 0xf0000;
/// Largest vCPU count an MP table can describe (APIC IDs 0..=253, the IO-APIC takes the next).
pub const MAX_CPUS: u32 = 254;
/// IO-APIC input pins.
const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU | APIC
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table (header + entries) for `cpus` vCPUs.
fn config_table(cpus: u32) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id as u8);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]); // IO-APIC, enabled
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n -> IO-APIC pin n, except the timer (IRQ 0 -> pin 2, as KVM routes it).
    for irq in 0..IOAPIC_PINS {
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = (44 + entries.len()) as u16;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&len.to_le_bytes());
    t.push(4); // spec revision 1.4
    t.push(0); // checksum, below
    t.extend_from_slice(b"HCI     ");
    t.extend_from_slice(b"KVM VMM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(APIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// Writes the MP floating pointer and configuration table for `cpus` vCPUs.
pub fn write(mem: &GuestMemory, cpus: u32) -> Result<()> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(VmmError::invalid(
            "vCPU count",
            format!("{cpus} is outside 1..={MAX_CPUS}"),
        ));
    }
    let table_addr = MPTABLE_START + 16;
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length (16-byte units), revision, checksum, features
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(MPTABLE_START))
        .map_err(|e| boot_err("MP table", e))?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr))
        .map_err(|e| boot_err("MP table", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let mem = create_guest_memory(16 << 20).unwrap();
        write(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(table_addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
        let cpus = table[44..].chunks(20).take(4).filter(|e| e[0] == 0).count();
        assert_eq!(cpus, 4);
        assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
    }

    #[test]
    fn cpu_count_is_bounded() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert!(write(&mem, 0).is_err());
        assert!(write(&mem, MAX_CPUS + 1).is_err());
        assert!(write(&mem, MAX_CPUS).is_ok());
    }
}
