//! VM snapshots: the machine state and the stream format shared by snapshot
//! files and live migration.
//!
//! # Format (version 1)
//!
//! A sequence of frames, each
//!
//! ```text
//! tag u8 | 0 0 0 | len u32 LE | payload (len bytes) | crc32c u32 LE of everything before it
//! ```
//!
//! - `HELLO` (first): magic `hci-vmst`, format version u32, vCPUs u32,
//!   memory bytes u64, then (migration only) the token's length u16 and
//!   bytes. A different version or magic is refused before anything else
//!   is read.
//! - `PAGES`: guest-physical address u64 then whole 4 KiB pages from there.
//! - `ZEROS`: address u64 and page count u32: pages that are now zero
//!   (only in migration passes after the first; a snapshot file simply
//!   leaves zero pages out, and fresh guest memory is zero).
//! - `STATE`: the [`MachineState`] as JSON (vCPUs, irqchip, PIT, clock,
//!   serial port, i8042, virtio transports with their queue positions).
//! - `END`: the number of pages sent, u64.
//!
//! Every frame is checksummed (crc32c); a frame longer than
//! [`MAX_FRAME`], a bad checksum or a missing `END` is a clear error.

use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::i8042::I8042Snapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::error::{Result, VmmError};
use crate::kvm::{VcpuState, VmKvmState};
use crate::memory::GuestMemory;

/// The snapshot/migration stream format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic at the start of the `HELLO` frame.
pub const MAGIC: [u8; 8] = *b"hci-vmst";
/// Guest page size the stream works in.
pub const PAGE: u64 = 4096;
/// Most pages in one `PAGES` frame.
pub const RUN_PAGES: usize = 256;
/// Largest frame payload accepted.
pub const MAX_FRAME: usize = RUN_PAGES * PAGE as usize + 64;

/// Frame tags.
pub mod tag {
    /// Format, shape and token.
    pub const HELLO: u8 = 1;
    /// Guest pages.
    pub const PAGES: u8 = 2;
    /// Pages that became zero.
    pub const ZEROS: u8 = 3;
    /// The machine state (JSON).
    pub const STATE: u8 = 4;
    /// End of the stream.
    pub const END: u8 = 5;
    /// Migration: the receiver's answer (status byte, message).
    pub const REPLY: u8 = 6;
}

/// Everything of a VM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// vCPU count.
    pub cpus: u32,
    /// Guest memory size, bytes.
    pub memory: u64,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// PIC, IO-APIC, PIT, kvmclock.
    pub kvm: VmKvmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042 controller.
    pub i8042: I8042Snapshot,
    /// Every virtio-mmio transport, in slot order.
    pub transports: Vec<TransportSnapshot>,
    /// Live migration: the disks the source released at the switch-over,
    /// for the target to take over (empty in snapshot files).
    #[serde(default)]
    pub handover: Vec<crate::handover::Released>,
}

/// The first frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Format version.
    pub version: u32,
    /// vCPU count.
    pub cpus: u32,
    /// Memory bytes.
    pub memory: u64,
    /// Migration token (empty in files).
    pub token: Vec<u8>,
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(26 + self.token.len());
        p.extend_from_slice(&MAGIC);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&self.cpus.to_le_bytes());
        p.extend_from_slice(&self.memory.to_le_bytes());
        let n = self.token.len().min(u16::MAX as usize);
        p.extend_from_slice(&(n as u16).to_le_bytes());
        p.extend_from_slice(&self.token[..n]);
        p
    }

    /// Decodes and checks magic and version.
    pub fn decode(p: &[u8]) -> Result<Hello> {
        if p.len() < 26 || p[..8] != MAGIC {
            return Err(corrupt(
                "this is not an hci VM snapshot or migration stream",
            ));
        }
        let version = u32_at(p, 8);
        if version != FORMAT_VERSION {
            return Err(VmmError::invalid(
                "snapshot",
                format!(
                    "format version {version}; this hci-vmm reads version {FORMAT_VERSION} only"
                ),
            ));
        }
        let n = usize::from(u16::from_le_bytes([p[24], p[25]]));
        let token = p
            .get(26..26 + n)
            .ok_or_else(|| corrupt("the header is cut short"))?
            .to_vec();
        Ok(Hello {
            version,
            cpus: u32_at(p, 12),
            memory: u64_at(p, 16),
            token,
        })
    }
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A corrupt stream.
pub fn corrupt(why: impl Into<String>) -> VmmError {
    VmmError::invalid("snapshot", why.into())
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[&[u8]]) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 8];
    head[0] = tag;
    head[4..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&head);
    w.write_all(&head)?;
    for p in payload {
        crc = crc32c::crc32c_append(crc, p);
        w.write_all(p)?;
    }
    w.write_all(&crc.to_le_bytes())
}

/// Reads one frame into `buf`; returns its tag. Errors name what is wrong.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<u8> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt("the stream ends early (truncated file or a broken connection)")
        } else {
            VmmError::io("read the snapshot stream", e)
        }
    })?;
    let len = u32_at(&head, 4) as usize;
    if len > MAX_FRAME || head[1..4] != [0, 0, 0] {
        return Err(corrupt(format!(
            "a frame header is damaged (tag {}, length {len})",
            head[0]
        )));
    }
    buf.resize(len + 4, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt("the stream ends inside a frame (truncated)")
        } else {
            VmmError::io("read the snapshot stream", e)
        }
    })?;
    let want = u32_at(buf, len);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &buf[..len]);
    if crc != want {
        return Err(corrupt(format!(
            "checksum mismatch in a frame (tag {}, {len} bytes): the data is corrupted",
            head[0]
        )));
    }
    buf.truncate(len);
    Ok(head[0])
}

/// Counts what a page writer sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Pages sent with their data.
    pub pages: u64,
    /// Pages sent as zero (or skipped as zero).
    pub zero_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
}

/// Writes guest pages in runs, leaving out zero pages (`skip_zero`) or
/// sending them as `ZEROS`.
#[derive(Debug)]
pub struct PageWriter {
    buf: Vec<u8>,
    /// Totals.
    pub sent: Sent,
}

impl Default for PageWriter {
    fn default() -> Self {
        PageWriter {
            buf: vec![0; RUN_PAGES * PAGE as usize],
            sent: Sent::default(),
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|c| <[u8; 8]>::try_from(c).is_ok_and(|w| u64::from_ne_bytes(w) == 0))
        && page.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

impl PageWriter {
    /// Sends `count` pages starting at guest address `gpa` (at most
    /// [`RUN_PAGES`], all inside one memory region).
    pub fn run(
        &mut self,
        w: &mut impl Write,
        mem: &GuestMemory,
        gpa: u64,
        count: usize,
        skip_zero: bool,
    ) -> Result<()> {
        let len = count * PAGE as usize;
        let buf = &mut self.buf[..len];
        mem.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| VmmError::Memory(format!("read guest memory at {gpa:#x}: {e}")))?;
        let mut i = 0;
        while i < count {
            let zero = is_zero(&buf[i * PAGE as usize..(i + 1) * PAGE as usize]);
            let mut j = i + 1;
            while j < count && is_zero(&buf[j * PAGE as usize..(j + 1) * PAGE as usize]) == zero {
                j += 1;
            }
            let at = gpa + i as u64 * PAGE;
            let n = (j - i) as u64;
            if zero {
                self.sent.zero_pages += n;
                if !skip_zero {
                    let mut p = [0u8; 12];
                    p[..8].copy_from_slice(&at.to_le_bytes());
                    p[8..].copy_from_slice(&(n as u32).to_le_bytes());
                    write_frame(w, tag::ZEROS, &[&p])
                        .map_err(|e| VmmError::io("write zero pages", e))?;
                    self.sent.bytes += 24;
                }
            } else {
                let data = &buf[i * PAGE as usize..j * PAGE as usize];
                write_frame(w, tag::PAGES, &[&at.to_le_bytes(), data])
                    .map_err(|e| VmmError::io("write guest pages", e))?;
                self.sent.pages += n;
                self.sent.bytes += 20 + data.len() as u64;
            }
            i = j;
        }
        Ok(())
    }

    /// Sends every page of guest memory, skipping zero pages.
    pub fn all(&mut self, w: &mut impl Write, mem: &GuestMemory) -> Result<()> {
        for region in mem.iter() {
            let start = region.start_addr().0;
            let pages = (region.len() / PAGE) as usize;
            let mut p = 0;
            while p < pages {
                let n = (pages - p).min(RUN_PAGES);
                self.run(w, mem, start + p as u64 * PAGE, n, true)?;
                p += n;
            }
        }
        Ok(())
    }

    /// Sends the pages listed (ascending addresses), zero pages as `ZEROS`.
    pub fn pages(&mut self, w: &mut impl Write, mem: &GuestMemory, gpas: &[u64]) -> Result<()> {
        let mut i = 0;
        while i < gpas.len() {
            let mut j = i + 1;
            while j < gpas.len()
                && j - i < RUN_PAGES
                && gpas[j] == gpas[j - 1] + PAGE
                && mem.address_in_range(GuestAddress(gpas[j]))
                && same_region(mem, gpas[i], gpas[j])
            {
                j += 1;
            }
            self.run(w, mem, gpas[i], j - i, false)?;
            i = j;
        }
        Ok(())
    }
}

fn same_region(mem: &GuestMemory, a: u64, b: u64) -> bool {
    mem.iter().any(|r| {
        let s = r.start_addr().0;
        let e = s + r.len();
        (s..e).contains(&a) && (s..e).contains(&b)
    })
}

/// Applies a `PAGES` or `ZEROS` frame to guest memory; returns pages written.
pub fn apply_pages(mem: &GuestMemory, t: u8, p: &[u8]) -> Result<u64> {
    if p.len() < 8 {
        return Err(corrupt("a page frame is too short"));
    }
    let gpa = u64_at(p, 0);
    let (len, zeros) = match t {
        tag::PAGES => {
            let data = &p[8..];
            if !(data.len() as u64).is_multiple_of(PAGE) {
                return Err(corrupt("a page frame holds a partial page"));
            }
            (data.len() as u64, None)
        }
        _ => {
            if p.len() != 12 {
                return Err(corrupt("a zero-page frame has the wrong size"));
            }
            let n = u64::from(u32_at(p, 8));
            if n > RUN_PAGES as u64 {
                return Err(corrupt("a zero-page frame is too long"));
            }
            (n * PAGE, Some(vec![0u8; (n * PAGE) as usize]))
        }
    };
    let end = gpa
        .checked_add(len)
        .ok_or_else(|| corrupt("page address overflows"))?;
    if !gpa.is_multiple_of(PAGE)
        || len == 0
        || !mem.address_in_range(GuestAddress(gpa))
        || !mem.address_in_range(GuestAddress(end - 1))
        || !same_region(mem, gpa, end - 1)
    {
        return Err(corrupt(format!(
            "pages at {gpa:#x}..{end:#x} lie outside guest memory"
        )));
    }
    let data = zeros.as_deref().unwrap_or(&p[8..]);
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|e| VmmError::Memory(format!("write guest memory at {gpa:#x}: {e}")))?;
    Ok(len / PAGE)
}

/// Writes the state frame and the end frame.
pub fn write_state_and_end(w: &mut impl Write, state: &MachineState, pages: u64) -> Result<()> {
    let json =
        serde_json::to_vec(state).map_err(|e| VmmError::invalid("machine state", e.to_string()))?;
    write_frame(w, tag::STATE, &[&json]).map_err(|e| VmmError::io("write the machine state", e))?;
    write_frame(w, tag::END, &[&pages.to_le_bytes()])
        .map_err(|e| VmmError::io("write the snapshot end", e))
}

/// Decodes a `STATE` frame.
pub fn decode_state(p: &[u8]) -> Result<MachineState> {
    serde_json::from_slice(p).map_err(|e| corrupt(format!("the machine state is unreadable: {e}")))
}

/// Saves a paused VM to `path` (written to a temporary file, then renamed).
pub fn save(vm: &crate::vm::Vm, path: &Path) -> Result<Sent> {
    vm.quiesce_devices();
    let result = save_quiesced(vm, path);
    vm.unquiesce_devices()?;
    result
}

fn save_quiesced(vm: &crate::vm::Vm, path: &Path) -> Result<Sent> {
    let state = vm.capture()?;
    let tmp = path.with_extension("partial");
    let file =
        std::fs::File::create(&tmp).map_err(|e| VmmError::io("create the snapshot file", e))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, file);
    let hello = Hello {
        version: FORMAT_VERSION,
        cpus: vm.cpus(),
        memory: vm.memory_size(),
        token: Vec::new(),
    };
    write_frame(&mut w, tag::HELLO, &[&hello.encode()])
        .map_err(|e| VmmError::io("write the snapshot", e))?;
    let mut pages = PageWriter::default();
    pages.all(&mut w, vm.memory())?;
    write_state_and_end(&mut w, &state, pages.sent.pages)?;
    let file = w
        .into_inner()
        .map_err(|e| VmmError::io("write the snapshot", e.into_error()))?;
    file.sync_all()
        .map_err(|e| VmmError::io("sync the snapshot", e))?;
    std::fs::rename(&tmp, path).map_err(|e| VmmError::io("rename the snapshot into place", e))?;
    Ok(pages.sent)
}

/// Reads a snapshot's header: its vCPU count and memory size (to build the
/// VM it restores into).
pub fn read_header(path: &Path) -> Result<Hello> {
    let mut r = std::fs::File::open(path).map_err(|e| VmmError::io("open the snapshot", e))?;
    let mut buf = Vec::new();
    if read_frame(&mut r, &mut buf)? != tag::HELLO {
        return Err(corrupt("the file does not start with a snapshot header"));
    }
    Hello::decode(&buf)
}

/// Reads a whole stream into `mem`: checks the header against the VM's
/// shape, applies every page and returns the machine state once `END`
/// arrives.
pub fn read_stream(
    r: &mut impl Read,
    mem: &GuestMemory,
    cpus: u32,
    memory: u64,
) -> Result<MachineState> {
    let mut buf = Vec::with_capacity(MAX_FRAME + 4);
    if read_frame(r, &mut buf)? != tag::HELLO {
        return Err(corrupt("the stream does not start with a header"));
    }
    let hello = Hello::decode(&buf)?;
    check_shape(&hello, cpus, memory)?;
    read_body(r, mem, &mut buf)
}

/// Checks a header's vCPU count and memory size against the VM's.
pub fn check_shape(hello: &Hello, cpus: u32, memory: u64) -> Result<()> {
    if hello.cpus != cpus || hello.memory != memory {
        return Err(VmmError::invalid(
            "snapshot",
            format!(
                "it holds a VM with {} vCPUs and {} bytes of memory; the VM restored into has {cpus} and {memory}",
                hello.cpus, hello.memory
            ),
        ));
    }
    Ok(())
}

/// Reads frames after the header until `END`.
pub fn read_body(r: &mut impl Read, mem: &GuestMemory, buf: &mut Vec<u8>) -> Result<MachineState> {
    let mut state = None;
    let mut pages = 0u64;
    loop {
        match read_frame(r, buf)? {
            t @ (tag::PAGES | tag::ZEROS) => {
                let n = apply_pages(mem, t, buf)?;
                if t == tag::PAGES {
                    pages += n;
                }
            }
            tag::STATE => state = Some(decode_state(buf)?),
            tag::END => {
                if buf.len() != 8 || u64_at(buf, 0) != pages {
                    return Err(corrupt(
                        "the page count at the end does not match the pages read",
                    ));
                }
                return state.ok_or_else(|| corrupt("the stream has no machine state"));
            }
            other => return Err(corrupt(format!("unexpected frame tag {other}"))),
        }
    }
}

/// Restores memory and machine state from `path` into `vm` (built by
/// [`crate::vm::Vm::new_for_restore`], not started), then starts it paused.
pub fn restore(vm: &crate::vm::Vm, path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| VmmError::io("open the snapshot", e))?;
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    let state = read_stream(&mut r, vm.memory(), vm.cpus(), vm.memory_size())?;
    vm.load(&state)?;
    vm.start_paused()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut v = Vec::new();
        write_frame(&mut v, tag::END, &[b"abc", b"def"]).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut v.as_slice(), &mut buf).unwrap(), tag::END);
        assert_eq!(buf, b"abcdef");
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            assert!(
                read_frame(&mut bad.as_slice(), &mut buf).is_err(),
                "byte {i}"
            );
        }
        assert!(read_frame(&mut &v[..v.len() - 1], &mut buf).is_err());
    }

    #[test]
    fn hello_checks_magic_and_version() {
        let h = Hello {
            version: FORMAT_VERSION,
            cpus: 2,
            memory: 64 << 20,
            token: b"t".to_vec(),
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut other = h.clone();
        other.version = 99;
        let e = Hello::decode(&other.encode()).unwrap_err().to_string();
        assert!(e.contains("version 99"), "{e}");
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Hello::decode(&bad).is_err());
        assert!(Hello::decode(&bad[..10]).is_err());
    }

    #[test]
    fn pages_round_trip_sparse() {
        let mem = crate::memory::create_guest_memory(8 << 20).unwrap();
        mem.write_slice(&[7u8; 10], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[9u8; 1], GuestAddress(0x7f_f000)).unwrap();
        let mut out = Vec::new();
        let mut w = PageWriter::default();
        w.all(&mut out, &mem).unwrap();
        assert_eq!(w.sent.pages, 2);
        assert!(out.len() < 3 * PAGE as usize, "zero pages were written");
        let target = crate::memory::create_guest_memory(8 << 20).unwrap();
        let mut r = out.as_slice();
        let mut buf = Vec::new();
        while !r.is_empty() {
            let t = read_frame(&mut r, &mut buf).unwrap();
            apply_pages(&target, t, &buf).unwrap();
        }
        let mut b = [0u8; 10];
        target.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(b, [7u8; 10]);
        // A page that became zero travels as a ZEROS frame.
        mem.write_slice(&[0u8; 10], GuestAddress(0x5000)).unwrap();
        let mut out = Vec::new();
        PageWriter::default()
            .pages(&mut out, &mem, &[0x5000, 0x6000])
            .unwrap();
        let t = read_frame(&mut out.as_slice(), &mut buf).unwrap();
        assert_eq!(t, tag::ZEROS);
        apply_pages(&target, t, &buf).unwrap();
        target.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(b, [0u8; 10]);
    }

    proptest::proptest! {
        #[test]
        fn garbage_streams_are_errors_not_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mem = crate::memory::create_guest_memory(4 << 20).unwrap();
            let _ = read_stream(&mut bytes.as_slice(), &mem, 1, 4 << 20);
            let _ = Hello::decode(&bytes);
            let _ = apply_pages(&mem, tag::PAGES, &bytes);
            let _ = apply_pages(&mem, tag::ZEROS, &bytes);
        }
    }
}
