//! hci's test guests, built from source with the machine's gcc on demand.
//!
//! Under a paravirtual KVM (`kvm_pvm`) guest code at CPL0 is emulated at about
//! 1 µs per instruction while CPL3 code runs natively, so a Linux guest is far
//! too slow to test with. These guests instead spend ~20 instructions at CPL0
//! (PVH entry → long mode → `iretq` to CPL3 with IOPL=3) and then drive the
//! devices from CPL3 with port I/O and MMIO polling (sources in `guests/`):
//!
//! - `hello`: prints `hello from guest` on COM1, resets through the i8042;
//! - `spin`: prints `spinning`, then a `.` every `every=` (10⁷) iterations, forever;
//! - `blk`: writes a 4 KiB pattern (byte i = `(i*31+7) & 0xff`) at sector
//!   `sector=` (8) of the first virtio-blk disk, flushes, reads back, checks a
//!   read past the end fails, asks for the serial, prints `virtio-blk OK` or
//!   `virtio-blk FAIL: …`, and resets (with `stay=1` it stays up until
//!   Ctrl-Alt-Del; `writes=1` then keeps writing, flushing and checking
//!   blocks after `sector`, printing `writes N` every 100 good rounds);
//! - `net`: a tiny host on the first virtio-net NIC: takes its address from
//!   `ip=a.b.c.d`, prints `net up mac … ip …`, then answers ARP requests and
//!   ICMP echo requests for it (`arp reply N`, `icmp reply N`) forever, or
//!   until `replies=N` echo replies (then `net done` and a reset);
//! - `rng`: reads the first virtio-rng device twice, prints `virtio-rng OK`
//!   or `virtio-rng FAIL: …`, and resets;
//! - `chaos`: a hostile driver scribbling over the registers and rings of the
//!   first virtio device of type `device=` (2) (`seed=`, `iters=`), then
//!   prints `chaos survived` and resets;
//! - `kbd`: runs the i8042 self-test, prints `kbd self-test 0x…55 ctr 0x…`
//!   and `kbd ready`, waits for Ctrl-Alt-Del on its keyboard (a graceful
//!   shutdown request), prints `ctrl-alt-del` and resets.
//!
//! The same ELF boots in QEMU (`-kernel guest.elf`), which the benchmarks use.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

const BOOT_S: &str = include_str!("../guests/boot.S");
const LINKER_SCRIPT: &str = include_str!("../guests/guest.ld");
const GUEST_H: &str = include_str!("../guests/guest.h");
const LIB_C: &str = include_str!("../guests/lib.c");
const VIRTIO_H: &str = include_str!("../guests/virtio.h");
const VIRTIO_C: &str = include_str!("../guests/virtio.c");
const HELLO_C: &str = include_str!("../guests/hello.c");
const SPIN_C: &str = include_str!("../guests/spin.c");
const BLK_C: &str = include_str!("../guests/blk.c");
const CHAOS_C: &str = include_str!("../guests/chaos.c");
const NET_C: &str = include_str!("../guests/net.c");
const RNG_C: &str = include_str!("../guests/rng.c");
const DIRTY_C: &str = include_str!("../guests/dirty.c");
const KBD_C: &str = include_str!("../guests/kbd.c");

/// gcc flags: freestanding, static, no SSE (CR4.OSFXSR stays off), no red zone.
const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-fno-pic",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-O2",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=4096",
    "-Wl,--no-warn-rwx-segments",
];

/// A test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Prints a line and resets.
    Hello,
    /// Loops forever, printing progress dots.
    Spin,
    /// Exercises virtio-blk and reports OK/FAIL.
    Blk,
    /// Throws garbage at a virtio device's registers and queues.
    Chaos,
    /// Answers ARP and ping on a virtio-net NIC.
    Net,
    /// Reads a virtio-rng device and reports OK/FAIL.
    Rng,
    /// Writes memory pages nonstop and prints a running counter.
    Dirty,
    /// Tests the i8042 and waits for Ctrl-Alt-Del.
    Kbd,
}

impl Guest {
    /// Every guest.
    pub const ALL: [Guest; 8] = [
        Guest::Hello,
        Guest::Spin,
        Guest::Blk,
        Guest::Chaos,
        Guest::Net,
        Guest::Rng,
        Guest::Dirty,
        Guest::Kbd,
    ];

    /// Short name (also the ELF file stem).
    pub fn name(self) -> &'static str {
        match self {
            Guest::Hello => "hello",
            Guest::Spin => "spin",
            Guest::Blk => "blk",
            Guest::Chaos => "chaos",
            Guest::Net => "net",
            Guest::Rng => "rng",
            Guest::Dirty => "dirty",
            Guest::Kbd => "kbd",
        }
    }

    fn sources(self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![("boot.S", BOOT_S), ("lib.c", LIB_C)];
        match self {
            Guest::Hello => v.push(("hello.c", HELLO_C)),
            Guest::Spin => v.push(("spin.c", SPIN_C)),
            Guest::Blk => {
                v.push(("virtio.c", VIRTIO_C));
                v.push(("blk.c", BLK_C));
            }
            Guest::Chaos => {
                v.push(("virtio.c", VIRTIO_C));
                v.push(("chaos.c", CHAOS_C));
            }
            Guest::Net => {
                v.push(("virtio.c", VIRTIO_C));
                v.push(("net.c", NET_C));
            }
            Guest::Rng => {
                v.push(("virtio.c", VIRTIO_C));
                v.push(("rng.c", RNG_C));
            }
            Guest::Dirty => {
                v.push(("virtio.c", VIRTIO_C));
                v.push(("dirty.c", DIRTY_C));
            }
            Guest::Kbd => v.push(("kbd.c", KBD_C)),
        }
        v
    }
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Builds `guest` into `out_dir` (reusing an identical earlier build) and returns the ELF path.
pub fn build(guest: Guest, out_dir: &Path) -> io::Result<PathBuf> {
    let sources = guest.sources();
    let mut all: Vec<&str> = vec![LINKER_SCRIPT, GUEST_H, VIRTIO_H];
    all.extend(CFLAGS);
    all.extend(sources.iter().flat_map(|(n, s)| [*n, *s]));
    let hash = fnv1a(&all);
    let elf = out_dir.join(format!("{}-{hash:016x}.elf", guest.name()));
    if elf.is_file() {
        return Ok(elf);
    }
    static BUILDS: AtomicU64 = AtomicU64::new(0);
    let unique = BUILDS.fetch_add(1, Ordering::Relaxed);
    let src = out_dir.join(format!(
        "src-{}-{hash:016x}-{}-{unique}",
        guest.name(),
        std::process::id()
    ));
    fs::create_dir_all(&src)?;
    for (name, text) in [
        ("guest.ld", LINKER_SCRIPT),
        ("guest.h", GUEST_H),
        ("virtio.h", VIRTIO_H),
    ]
    .into_iter()
    .chain(sources.iter().copied())
    {
        fs::write(src.join(name), text)?;
    }
    let tmp = src.join("guest.elf");
    let output = Command::new("gcc")
        .args(CFLAGS)
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg("-o")
        .arg(&tmp)
        .args(sources.iter().map(|(n, _)| src.join(n)))
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run gcc to build test guests: {e}"),
            )
        })?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "gcc failed building the {} guest:\n{}",
            guest.name(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    // Rename is atomic, so concurrent builders never see a partial file.
    fs::rename(&tmp, &elf)?;
    let _ = fs::remove_dir_all(&src);
    Ok(elf)
}

/// Builds `guest` into `$HCI_GUEST_DIR`, or a directory under the system temp dir.
pub fn build_default(guest: Guest) -> io::Result<PathBuf> {
    let dir = std::env::var_os("HCI_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hci-test-guests"));
    fs::create_dir_all(&dir)?;
    build(guest, &dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_builds_into_a_pvh_elf() {
        let dir = tempfile::tempdir().unwrap();
        for g in Guest::ALL {
            let elf = build(g, dir.path()).unwrap();
            let bytes = fs::read(&elf).unwrap();
            assert_eq!(&bytes[..4], b"\x7fELF");
            // The PVH note: name "Xen", type 18.
            assert!(
                bytes.windows(8).any(|w| w == b"\x12\0\0\0Xen\0"),
                "{} has no PVH note",
                g.name()
            );
            assert_eq!(build(g, dir.path()).unwrap(), elf, "second build is reused");
        }
    }
}
