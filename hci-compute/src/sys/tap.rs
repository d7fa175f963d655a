//! TAP devices: opening `/dev/net/tun` by interface name, adopting a queue
//! descriptor someone else opened (hci-net's ports), and the per-device
//! settings virtio-net needs (12-byte vnet header, no offloads, non-blocking).
//!
//! JUSTIFICATION: the kernel configures TAP queues only through ioctls on the
//! queue descriptor (`TUNSETIFF`, `TUNGETIFF`, `TUNSETVNETHDRSZ`,
//! `TUNSETOFFLOAD`) and the non-blocking flag through `fcntl`; each takes a
//! plain integer or a `struct ifreq`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// The device-type bits of the flags (`IFF_TUN` | `IFF_TAP`).
const IFF_TYPE_MASK: libc::c_short = 0x0003;

/// Size of the virtio-net header with `num_buffers` (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` restricted to the name and flags members (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> io::Result<IfReq> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        Ok(req)
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// One open queue of a TAP device, non-blocking, without offloads.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ifname: String,
    vnet_hdr: bool,
}

impl Tap {
    /// Attaches to the existing TAP `name` in the calling thread's network
    /// namespace, with a 12-byte vnet header.
    pub fn open(name: &str) -> io::Result<Tap> {
        // TUNSETIFF would quietly create a missing device, wired to nothing.
        if !interface_exists(name)? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {name} in this network namespace"),
            ));
        }
        let file = match attach(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) {
            // The device exists as a multi-queue TAP: attach as one more queue.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                attach(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)?
            }
            other => other?,
        };
        Tap::from_fd(file.into())
    }

    /// Adopts an attached TAP queue descriptor (e.g. a `TapHandle`'s); works
    /// with or without `IFF_VNET_HDR`.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        let mut req = IfReq::new("x", 0)?;
        // SAFETY: TUNGETIFF writes a `struct ifreq` through the pointer, which
        // points to a live, properly sized `#[repr(C)]` local for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if req.flags & IFF_TYPE_MASK != IFF_TAP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a TAP device", req.name()),
            ));
        }
        let vnet_hdr = req.flags & IFF_VNET_HDR != 0;
        if vnet_hdr {
            let len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
            // points to a live local for the duration of the call.
            let rc =
                unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &len as *const libc::c_int) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // No offloads: the kernel hands us complete, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value (a flag word).
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        set_nonblocking(fd.as_fd())?;
        Ok(Tap {
            file: File::from(fd),
            ifname: req.name(),
            vnet_hdr,
        })
    }

    /// Interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Whether frames carry a 12-byte virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Another descriptor for the same queue.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            ifname: self.ifname.clone(),
            vnet_hdr: self.vnet_hdr,
        })
    }

    /// Reads one frame (`WouldBlock` when none is queued).
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

fn attach(name: &str, flags: libc::c_short) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq::new(name, flags)?;
    // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads and
    // writes a `struct ifreq`, and `req` is a live, properly sized and aligned
    // `#[repr(C)]` ifreq (name NUL-terminated by construction) for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Whether a network interface `name` exists in the calling thread's namespace.
fn interface_exists(name: &str) -> io::Result<bool> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    Ok(unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
}

/// Sets `O_NONBLOCK` on the open file description of `fd`.
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor borrowed for the call; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer flag word on a borrowed descriptor.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert!(IfReq::new("hci-tp-01234567", 0).is_ok());
        assert!(IfReq::new("sixteen-chars-xx", 0).is_err());
        assert!(IfReq::new("", 0).is_err());
        assert_eq!(IfReq::new("tap0", 0).unwrap().name(), "tap0");
    }

    #[test]
    fn non_tap_descriptors_are_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(Tap::from_fd(f.into()).is_err());
    }

    /// Needs CAP_NET_ADMIN (the test hosts run as root).
    #[test]
    fn opens_a_tap_by_name_and_adopts_its_descriptor() {
        let name = format!("hcit{}", std::process::id() % 1_000_000);
        let err = Tap::open(&name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        // Create it (non-persistent: it goes away with the last descriptor).
        let creator = attach(&name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap_or_else(|e| {
            panic!("creating TAP {name} needs /dev/net/tun and CAP_NET_ADMIN: {e}")
        });
        drop(creator);
        // A multi-queue TAP without vnet header: a second queue inherits the
        // device's flags, and TUNGETIFF tells us.
        let creator = attach(&name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE).unwrap();
        let tap = Tap::open(&name).unwrap();
        assert!(!tap.vnet_hdr());
        drop((tap, creator));
        let creator = attach(&name, IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR).unwrap();
        let tap = Tap::open(&name).unwrap();
        drop(creator);
        assert_eq!(tap.ifname(), name);
        assert!(tap.vnet_hdr());
        // Nothing queued (the interface is down): non-blocking read.
        let mut buf = [0u8; 64];
        let mut clone = tap.try_clone().unwrap();
        assert_eq!(
            clone.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let adopted = Tap::from_fd(OwnedFd::from(clone.file)).unwrap();
        assert_eq!(
            (adopted.ifname(), adopted.vnet_hdr()),
            (name.as_str(), true)
        );
    }
}
